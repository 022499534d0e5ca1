"""
The long-context part of --mc midtraining (docs/architecture.md): synthetic tasks rendered into
MCBatch(x, y, s, blocks) for the MegaContext objective.

Every row of a batch has a history of exactly s tokens (block-aligned, s = multiple x budget) and a
target segment [s, T) holding the question and its answer; labels (y) are only on the answer tokens
(for chats: on the assistant's reply), so the loss, the counterfactual delta_nll and LensNet's
labels all measure "did the history deliver the fact". Rows are right-padded with BOS (label -1).
`blocks[r]` lists the history blocks (K-token, aligned) that hold row r's needle (the asked key's
digits first, then the rest of its sentence), or is None where no single place holds it (chats, copy
rows): the needle recipe (megacontext/training/needle.py) opens these blocks and teaches LensNet to find them.

    mix = MCMixture(tokenizer, cfg, filler_text)
    b = mix.batch(B, rng)                 # a long-context batch, history = m x budget (fewer rows if m > 4)
    b = mix.batch(B, rng, warmup=True)    # the copy warm-up: histories that fit the budget raw

Tasks: passkey, multikey (near-miss decoys, the question names the key), kv_recall (tasks/longctx.py),
chat_passkey, chat_multikey, chat_kv_recall (the same asked in a conversation, tasks/chat_view.py), chat_memory
(a fact the user stated early, with decoys), longchat (tasks/memory.py conversations with many filler turns; the question is the last user
turn), text (corpus text continued after the history: plain LM through the MC objective) and copy (the
warm-up's induction rows, short and raw: without them the rest of midtraining erases the copying they taught,
and a model that cannot copy an unseen word cannot answer from what the user said). Optional:
qa1, qa2, qa3 and chat_qa1, chat_qa2, chat_qa3 (bAbI-style stories, tasks/babi.py, raw and in a conversation;
the blocks of every supporting fact, the answering one's first).
The warm-up comes first: induction rows (a random-token history, then a span of it repeated,
every repeated token labelled) and short pass keys. Answer-only rows carry ~5 labelled tokens each,
too little signal for a small GPT to form its copying (induction) heads; 64 labelled copy tokens a row
do it in ~200 steps (dev/LOG.md, 2026-11-22).
"""
from dataclasses import dataclass

import torch

from tasks.longctx import STORY_TASKS, key_span, kv_recall, multikey, passkey, raw_example

TASKS = ("passkey", "multikey", "kv_recall", "chat_passkey", "chat_multikey", "chat_kv_recall", "chat_memory",
         "longchat", "text", "copy")
# bAbI-style stories (tasks/babi.py), raw and in chat: available by name (tasks=..., --mc-mix-tasks)
OPTIONAL_TASKS = STORY_TASKS + tuple(f"chat_{t}" for t in STORY_TASKS)
STORY_FACTS = 30  # the longest story a row draws (a few dozen facts), when the history has room for it
TEXT_TARGET = 64  # "text" rows: labelled continuation tokens after the history


@dataclass
class MCBatch:
    x: torch.Tensor   # (B, T) inputs
    y: torch.Tensor   # (B, T) next-token labels, -1 = no loss
    s: int            # history length (x[:, :s] is the history)
    blocks: list      # per row: history block indices holding the answer, or None


def load_filler(max_chars=400_000):
    """Natural text for the haystacks: the start of the pretraining corpus (train shards)."""
    from nanochat.common import UserError
    from nanochat.dataset import parquets_iter_batched
    parts, n = [], 0
    try:
        for batch in parquets_iter_batched("train"):
            for t in batch:
                parts.append(t)
                n += len(t)
                if n >= max_chars:
                    return "\n\n".join(parts)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise UserError(f"--mc midtraining needs the pretraining shards for filler text ({e}): "
                        f"run `python -m nanochat.dataset` first") from None
    if not parts:
        raise UserError("--mc midtraining needs filler text but the train shards are empty")
    return "\n\n".join(parts)


def needle_blocks(key, needle, K):
    """The K-token blocks a needle touches, the key's first: the GPT copies the key with its label ("The red
    key is") in view only when all of them are raw, and focus finds the key's block first."""
    kb = list(range(key[0] // K, (key[1] - 1) // K + 1))
    return kb + [j for j in range(needle[0] // K, (needle[1] - 1) // K + 1) if j not in kb]


def with_spans(blocks, spans, K, offset=0):
    """blocks, then the K-token blocks of each token span (shifted by offset) not listed yet: a story's other
    supporting facts, which the answer needs raw as well."""
    blocks = list(blocks)
    for a, b in spans:
        blocks += [j for j in range((a + offset) // K, (b + offset - 1) // K + 1) if j not in blocks]
    return blocks


def _labels_on(ids, a, b):
    """x = ids, y[t] = ids[t + 1] only where that is one of ids[a:b] (else -1). x keeps the last
    token so that y[t] = x[t + 1] holds on every labelled position of a right-padded row."""
    x = list(ids)
    y = [-1] * len(x)
    for t in range(a - 1, b - 1):
        y[t] = ids[t + 1]
    return x, y


class MCMixture:
    def __init__(self, tokenizer, cfg, filler, multiples=(1, 4, 16, 64), tasks=TASKS, chat_tasks=True):
        unknown = [t for t in tasks if t not in TASKS + OPTIONAL_TASKS]
        if unknown or not tasks:
            raise ValueError(f"unknown long-context tasks {unknown}: choose from {TASKS + OPTIONAL_TASKS}")
        if not multiples or min(multiples) <= 0:
            raise ValueError(f"history multiples must be positive, got {multiples}")
        self.tok, self.cfg, self.filler = tokenizer, cfg, filler
        self.multiples, self.tasks = tuple(multiples), tuple(tasks)
        self.K = cfg.block_size
        self.bos = tokenizer.get_bos_token_id()
        self.n_plain = min(tokenizer.encode_special(t) for t in tokenizer.get_special_tokens())
        self.filler_ids = list(tokenizer.encode(filler))
        if len(self.filler_ids) < 4 * self.K:
            raise ValueError("the filler text is too short")

    # --- sizes
    def history_len(self, multiple):
        """s for a history of `multiple` x budget tokens (block-aligned, at least two blocks)."""
        return max(2 * self.K, int(multiple * self.cfg.budget) // self.K * self.K)

    def _short_len(self, rng):
        """A short history (2-4 blocks, within the training-history budget): read raw, no gists."""
        return self.K * int(rng.integers(2, max(2, min(4, self.cfg.hist_budget() // self.K)) + 1))

    def _filler(self, rng, n):
        ids = self.filler_ids
        reps = -(-(n + len(ids)) // len(ids))
        start = int(rng.integers(0, len(ids)))
        return (ids * (reps + 1))[start:start + n]

    # --- one row: (ids, answer span (a, b), s) with ids[:s] the history
    def _row(self, task, s, rng):
        if task == "longchat":
            return self._chat_row(s, rng)
        if task in STORY_TASKS:
            return self._story_row(task, s, rng)
        if task.startswith("chat_"):
            try:
                return self._chat_task_row(task if task == "chat_memory" else task.removeprefix("chat_"), s, rng)
            except ValueError:  # a history too short for the conversation: a pass key instead
                task = "passkey"
        if task == "text":
            return self._text_row(s, rng)
        # several needles may not fit a short history (small vocabularies spend many tokens on
        # them): retry with fewer, then fall back to one pass key
        # always the training half of the tasks (tasks/splits.py): the evaluation asks with the other half
        tries = {"passkey": [lambda: passkey(self.filler, self.tok, rng, s, key_in_block=self.K, split="train")],
                 "multikey": [lambda: multikey(self.filler, self.tok, rng, s, n_keys=int(rng.integers(2, 5)),
                                               n_decoys=int(rng.integers(0, 3)), split="train"),
                              lambda: multikey(self.filler, self.tok, rng, s, n_keys=2, n_decoys=0, split="train")],
                 "kv_recall": [lambda: kv_recall(self.filler, self.tok, rng, s, n_pairs=int(rng.integers(2, 8)),
                                                 split="train"),
                               lambda: kv_recall(self.filler, self.tok, rng, s, n_pairs=1, split="train")]}[task]
        for make in tries + [lambda: passkey(self.filler, self.tok, rng, s, split="train")]:
            try:
                ex = make()
                break
            except ValueError:
                continue
        else:
            raise ValueError(f"a history of {s} tokens is too short for any long-context task")
        assert ex.question_start == s, (ex.question_start, s)
        a, b = ex.key_spans[0] if ex.key_spans else key_span(ex.ids, ex.needle_spans[0],
                                                                    list(self.tok.encode(ex.answer.strip())))
        return ex.ids, ex.answer_span, needle_blocks((a, b), ex.needle_spans[0], self.K)

    def _story_row(self, task, s, rng):
        """A bAbI-style story (tasks/babi.py) in s tokens of filler: a few to a few dozen facts (more where the
        history has room: ~10 tokens a fact, a tenth of the history at most), then the question and its one-word
        answer. The needle blocks are every supporting fact's, the answering fact's first (its answer word's
        block leading): the GPT needs all of them raw, and LensNet learns to find the answer's first."""
        lo = {"qa1": 2, "qa2": 3, "qa3": 4}[task]
        hi = max(lo, min(STORY_FACTS, s // 100))
        for kw in ({"n_facts": (lo, hi)}, {"n_facts": lo}):  # a short history may not hold a long story
            try:
                ex = raw_example(task, self.filler, self.tok, rng, s, split="train", **kw)
                break
            except ValueError:
                continue
        else:
            return self._row("passkey", s, rng)
        assert ex.question_start == s, (ex.question_start, s)
        blocks = needle_blocks(ex.key_spans[0], ex.needle_spans[0], self.K)
        return ex.ids, ex.answer_span, with_spans(blocks, ex.needle_spans[1:], self.K)

    def _chat_row(self, s, rng):
        """A Memory conversation whose filler turns fill about s tokens; everything before the last
        user turn is the history (left-padded with corpus text to exactly s tokens)."""
        from tasks.memory import Memory
        turns = max(0, s // 40)
        user_start = self.tok.encode_special("<|user_start|>")
        while True:
            conv = Memory("train", size=10**6, filler_turns=(turns, turns),
                          heldout=False).get_example(int(rng.integers(10**6)))
            ids, mask = self.tok.render_conversation(conv, max_tokens=10**9)
            q = max(i for i, t in enumerate(ids) if t == user_start)
            if q <= s or turns == 0:
                break
            turns = turns * 3 // 4
        if q > s:  # even a chat with no filler is longer than the history: keep its end
            ids, mask, q = ids[q - s:], mask[q - s:], s
        pad = self._filler(rng, s - q)
        ids, mask = pad + list(ids), [0] * len(pad) + list(mask)
        # the answer = the assistant's final reply (its mask); find its span after the question
        a = next(i for i in range(s, len(ids)) if mask[i])
        return ids, (a, len(ids)), None

    def _chat_task_row(self, task, s, rng):
        """A task asked the way users ask (tasks/chat_view.py): its facts stated in a conversation among small talk
        and pasted corpus text, the question as the last user turn, the target the assistant's reply (for
        chat_memory: a fact the user stated early, others' facts of the same kind as decoys). Its fact sits in
        known blocks, so the needle recipe opens them and teaches LensNet to find them, as for the raw needles:
        the chat runtime reads the memory this way."""
        from tasks.chat_view import chat_example, chat_to_raw
        ex = chat_to_raw(chat_example(task, self.filler, self.tok, rng, s, split="train"), self.tok)
        q = ex.question_start
        if q > s:
            raise ValueError(f"a history of {s} tokens is too short for a chat-memory conversation ({q})")
        pad = self._filler(rng, s - q)  # corpus text before the conversation: the history is exactly s tokens
        n = len(pad)
        ids = pad + list(ex.ids)
        (ka, kb), needle = ex.key_spans[0], ex.needle_spans[0]
        answer = (ex.answer_span[0] + n, ex.answer_span[1] + n)
        blocks = needle_blocks((ka + n, kb + n), (needle[0] + n, needle[1] + n), self.K)
        if task in STORY_TASKS:  # the answer needs every supporting fact raw, not just the answering one
            blocks = with_spans(blocks, ex.needle_spans[1:], self.K, offset=n)
        return ids, answer, blocks

    def _text_row(self, s, rng):
        """Plain language modelling across the history: s tokens of corpus text, then the next TEXT_TARGET
        tokens labelled. The MC objective reads the history as WC variants (and LensNet learns from their
        counterfactuals), and text keeps being modelled: midtraining on synthetic tasks alone drove the
        runcpu model's NLL on held-out prose to 17.8 nats (dev/LOG.md)."""
        ids = self._filler(rng, s + TEXT_TARGET)
        return ids, (s + 1, len(ids)), None

    def _copy_row(self, s, rng):
        """An induction row: s random tokens (ordinary, non-special ids), then a span of K..2K of them
        repeated; the target is the repeat (labels from its second token: the first is unpredictable)."""
        hist = rng.integers(0, self.n_plain, s).tolist()
        n = int(rng.integers(min(s, self.K), min(s, 2 * self.K) + 1))
        start = int(rng.integers(0, s - n + 1))
        ids = hist + hist[start:start + n]
        return ids, (s + 1, len(ids)), None

    # --- batches
    def _collate(self, rows, s):
        xs, ys = [], []
        for ids, (a, b), _ in rows:
            x, y = _labels_on(ids, a, b)
            xs.append(x)
            ys.append(y)
        T = max(len(x) for x in xs)
        X = torch.full((len(xs), T), self.bos, dtype=torch.long)
        Y = torch.full((len(xs), T), -1, dtype=torch.long)
        for r, (x, y) in enumerate(zip(xs, ys)):
            X[r, :len(x)] = torch.tensor(x)
            Y[r, :len(y)] = torch.tensor(y)
        return MCBatch(X, Y, s, [blocks for _, _, blocks in rows])

    def batch(self, B, rng, warmup=False):
        """An MCBatch of B rows. One history length and one task per batch (equal-length rows)."""
        if warmup:
            s = self._short_len(rng)
            kind = "copy" if rng.random() < 0.85 else "passkey"
            rows = [self._copy_row(s, rng) if kind == "copy" else self._row("passkey", s, rng) for _ in range(B)]
            return self._collate(rows, s)
        task = self.tasks[int(rng.integers(len(self.tasks)))]
        if task == "copy":  # induction rows as in the warm-up, short and raw: they keep the copying heads alive
            s = self._short_len(rng)
            return self._collate([self._copy_row(s, rng) for _ in range(B)], s)
        m = self.multiples[int(rng.integers(len(self.multiples)))]
        s = self.history_len(m)
        # fewer rows for long histories (B up to 4x the budget, then B * 4 / m, at least 2): GistNet runs
        # with gradient over every history token, and the GPT's copying learns as much from short ones
        B = min(B, max(2, int(B * 4 // max(m, 4))))
        if task in ("text", "longchat"):  # the full objective (variants + counterfactuals) costs ~4x a row
            B = max(2, B // 4)
        return self._collate([self._row(task, s, rng) for _ in range(B)], s)


def parse_list(text, typ=str):
    """'1,4,16' -> [1, 4, 16] (for the --mc-mix-* flags)."""
    return [typ(v) for v in str(text).split(",") if v.strip()]


__all__ = ["MCBatch", "MCMixture", "load_filler", "parse_list", "TASKS", "OPTIONAL_TASKS"]
