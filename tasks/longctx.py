"""
Synthetic long-context tasks (docs/architecture.md): facts hidden in a long history, asked about at the end.
Every task is a *plan* builder (PLANS below): `plan = PLANS[task](rng, split)` says in text what is stated
(needles, the asked one first, and decoys), what is asked and what the answer is, and renders two ways:

- raw (`raw_example`, or the per-task functions passkey / multikey / kv_recall / chat_memory): the needles
  inserted into filler text at random depths, then the question, as a `LongCtxExample`;
- chat (tasks/chat_view.py): a conversation whose user states the facts, pastes long filler text and chats,
  then asks; scored on the reply (`score_reply`).

Adding a task = one plan builder + one line in PLANS. `split` is "train" (midtraining, the default) or "eval"
(scripts/mc_eval.py): the halves share no template, label, name or key value (tasks/splits.py).

A LongCtxExample (raw view):

    ids           the token ids: [filler with needles ... | question | answer | "."]
    answer_span   (a, b): ids[a:b] are the answer tokens and the "." that ends them, as in the needle
                  (a model trained on the span learns to stop the number: scoring rejects extra digits)
    question_start  where the question begins (history = ids[:question_start])
    needle_spans  token spans of the needles; needle_spans[0] holds the asked one
    decoy_spans   token spans of near-miss decoys (multi-key needle)
    answer        the answer text
    key_spans     token spans of the key digits inside each needle (passkey)
    plan          the Plan it was rendered from (score_reply(plan, text) scores a free-form reply)

Pieces are tokenized separately and concatenated, so the answer's tokens (and every span) are exact
whatever the tokenizer merges across piece boundaries. A chat-only task (chat_memory) has no raw text: its
raw view is its chat view rendered with the chat special tokens (tasks/chat_view.chat_to_raw), where the
answer is the reference reply and ids[a:b] its tokens and <|assistant_end|>.

- `passkey`: one 5-digit key in filler, varied needle and question wording.
- `multikey`: several keys labelled by colour; near-miss decoys use the ASKED colour with another
  noun ("the red code is ..."), so only reading the question and the needle together answers it.
- `kv_recall`: many `key -> value` records scattered in filler; the question names one key.
- `chat_memory`: the user states a fact early ("my lucky number is 58"), the same kind of fact about other
  people as decoys, many turns of chat, then asks it back (tasks/memory.py has the short SFT version).
- `qa1`, `qa2`, `qa3`: bAbI-style stories (tasks/babi.py), one, two and three supporting facts (the needles).
"""
import re
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from tasks.splits import (KV, KV_REPLY, MEMORY, MEMORY_OPEN, MULTIKEY, MULTIKEY_REPLY, PASSKEY, PASSKEY_REPLY, Fact,
                          check_split, inventory, key_parity)

ANSWER_END = "."  # ends every answer, as the needles end their keys
KEY_PATTERN = r"\d{5}"  # the kind of every key: a reply naming another 5-digit number is wrong
OPEN_SHARE = 0.5  # share of training chat-memory facts that are open facts (made_up_value, open_fact)
_EVAL_NAMES = {n.lower() for n in inventory("eval")["names"]}  # a made-up value never is one of these
# the training half under its historical names (tests, and callers that predate the split)
PASSKEY_NEEDLES = PASSKEY["train"]["needles"]
PASSKEY_QUESTIONS = [raw for raw, _ in PASSKEY["train"]["questions"]]
COLOURS = MULTIKEY["train"]["labels"]
MULTI_NEEDLES = MULTIKEY["train"]["needles"]
MULTI_DECOYS = MULTIKEY["train"]["decoys"]
MULTI_QUESTIONS = [raw for raw, _ in MULTIKEY["train"]["questions"]]  # the wording midtraining asks with
MULTI_QUESTIONS_HELDOUT = [raw for raw, _ in MULTIKEY["eval"]["questions"]]  # the eval half's wording
KV_WORDS = KV["train"]["labels"]


@dataclass
class LongCtxExample:
    ids: list
    answer_span: tuple
    question_start: int
    answer: str
    needle_spans: list = field(default_factory=list)
    decoy_spans: list = field(default_factory=list)
    key_spans: list = field(default_factory=list)  # token spans of the key digits inside each needle
    plan: object = None  # the Plan it was rendered from


@dataclass
class Plan:
    """One example as text, before rendering. Statements = needles (the asked one first), then decoys; each
    has a raw text (inserted into filler) and a chat text (a user turn)."""
    task: str
    split: str
    needles: list          # raw texts
    decoys: list
    question: str          # raw: the text between the history and the answer
    answer: str            # the asked value ("12345", "teal"); the raw answer text is " " + answer
    chat_needles: list     # the statements as the user says them
    chat_decoys: list
    chat_question: str     # the user's last turn
    reply: str             # the reference reply
    values: list           # every value of the asked kind in play: a reply naming another one is wrong
    value_pattern: str = None  # regex of the value's kind: a reply naming another match is wrong
    depths: list = None    # per statement: a fraction of the history, or None (random)
    locate_key: bool = False   # raw view: record the key's token span (key_spans)
    chat_only: bool = False    # no raw texts: the raw view is the chat view with the chat special tokens


def random_key(rng, digits=5, split=None):
    """digits random digits; with a split, the digit sum has that split's parity (tasks/splits.py): the last
    digit is moved up by one when the parity is wrong, which keeps every key of the half equally likely."""
    d = [int(x) for x in rng.integers(0, 10, digits)]
    if split is not None and sum(d) % 2 != key_parity(split):
        d[-1] = (d[-1] + 1) % 10
    return "".join(str(x) for x in d)


def distinct_keys(rng, n, split):
    keys = [random_key(rng, split=split) for _ in range(n)]
    while len(set(keys)) < n:
        keys = [random_key(rng, split=split) for _ in range(n)]
    return keys


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _question(q):
    """A question template: a (raw, chat) pair, or a raw string alone (chat: the raw without its answer prefix)."""
    if isinstance(q, str):
        return q, re.sub(r"\s*(The .* is|\S+ ->)$", "", q.strip())
    return q


# ------------------------------------------------------------------------------------------ plan builders
def passkey_plan(rng, split="train", key=None):
    s = PASSKEY[check_split(split)]
    key = key or random_key(rng, split=split)
    needle = _pick(rng, s["needles"]).format(key=key)
    raw_q, chat_q = _pick(rng, s["questions"])
    return Plan("passkey", split, [needle], [], raw_q, key, [needle.strip()], [], chat_q,
                PASSKEY_REPLY.format(v=key), [key], KEY_PATTERN, locate_key=True)


def multikey_plan(rng, split="train", n_keys=4, n_decoys=2, questions=None):
    """n_keys colour-labelled keys (the first one asked) + n_decoys near misses with the asked colour, asked with
    one of `questions` (default: the split's; raw strings or (raw, chat) pairs)."""
    s = MULTIKEY[check_split(split)]
    if not 1 <= n_keys <= len(s["labels"]):
        raise ValueError(f"n_keys must be in 1..{len(s['labels'])}, got {n_keys}")
    cols = [s["labels"][i] for i in rng.choice(len(s["labels"]), n_keys, replace=False)]
    keys = distinct_keys(rng, n_keys + n_decoys, split)
    ask = cols[0]
    needles = [_pick(rng, s["needles"]).format(c=c, key=k) for c, k in zip(cols, keys)]
    decoys = [s["decoys"][i % len(s["decoys"])].format(c=ask, key=k) for i, k in enumerate(keys[n_keys:])]
    raw_q, chat_q = _question(_pick(rng, questions or s["questions"]))
    return Plan("multikey", split, needles, decoys, raw_q.format(c=ask), keys[0], [t.strip() for t in needles],
                [t.strip() for t in decoys], chat_q.format(c=ask), MULTIKEY_REPLY.format(c=ask, v=keys[0]), keys,
                KEY_PATTERN)


def kv_plan(rng, split="train", n_pairs=6):
    """n_pairs records `key -> 5-digit value`; the question names the first key."""
    s = KV[check_split(split)]
    if not 1 <= n_pairs <= len(s["labels"]):
        raise ValueError(f"n_pairs must be in 1..{len(s['labels'])}, got {n_pairs}")
    names = [s["labels"][i] for i in rng.choice(len(s["labels"]), n_pairs, replace=False)]
    vals = [random_key(rng, split=split) for _ in names]
    recs = [_pick(rng, s["needles"]).format(k=k, v=v) for k, v in zip(names, vals)]
    raw_q, chat_q = _pick(rng, s["questions"])
    return Plan("kv_recall", split, recs, [], raw_q.format(k=names[0]), vals[0], [r.strip() for r in recs], [],
                chat_q.format(k=names[0]), KV_REPLY.format(k=names[0], v=vals[0]), vals, KEY_PATTERN)


def made_up_value(rng):
    """A value no list holds (training half): a pseudo-word of 2-3 syllables, capitalised half the time, or a
    number 100-999; never a word of the evaluation half."""
    o = MEMORY_OPEN
    while True:
        if rng.random() < 0.25:
            v = str(int(rng.integers(100, 1000)))
        else:
            v = "".join(_pick(rng, o["onsets"]) + _pick(rng, o["vowels"]) + _pick(rng, o["codas"])
                        for _ in range(int(rng.integers(2, 4))))
            v = v.capitalize() if rng.random() < 0.5 else v
        if v.lower() not in _EVAL_NAMES:
            return v


def open_fact(rng, n_values):
    """(kind, Fact, lead_in) of an open fact (tasks/splits.MEMORY_OPEN): a random attribute in random shapes,
    Fact.values = n_values distinct made-up values (the caller picks the asked one and the decoys among them)."""
    o = MEMORY_OPEN
    vals = []
    while len(vals) < n_values:
        v = made_up_value(rng)
        if v.lower() not in {x.lower() for x in vals}:
            vals.append(v)
    a, verb = _pick(rng, o["attributes"]), _pick(rng, o["verbs"])
    fill = lambda t: t.replace("{a}", a).replace("{verb}", verb)  # noqa: E731  ({v}, {owner} stay placeholders)
    shape = rng.random()
    if shape < 0.5:    # "my bike is Zanfar" / "What is my bike?"
        parts = _pick(rng, o["states"]), _pick(rng, o["decoys"]), _pick(rng, o["asks"]), o["reply"]
    elif shape < 0.8:  # "the bike I use most is Zanfar" / "Which bike do I use most?"
        parts = _pick(rng, o["verb_states"]), _pick(rng, o["decoys"]), _pick(rng, o["verb_asks"]), o["verb_reply"]
    else:              # "I studied in Zanfar" / "Where did I study?"
        parts = _pick(rng, o["events"])
    return "open", Fact(*map(fill, parts), vals), _pick(rng, o["lead_ins"])


def chat_memory_plan(rng, split="train", n_decoys=2, kind=None, open_share=OPEN_SHARE):
    """A personal fact stated early (depth 0-0.2 of the history), n_decoys facts of the same kind about other
    people anywhere, asked back at the end. Chat only (no raw text). In the training half, open_share of the
    facts are open facts (open_fact: any attribute, made-up values) unless `kind` names a fixed kind."""
    s = MEMORY[check_split(split)]
    lead_in = s["lead_in"]
    if kind is None and split == "train" and rng.random() < open_share:
        kind, f, lead_in = open_fact(rng, 1 + n_decoys)
    else:
        kind = kind or _pick(rng, sorted(s["facts"]))
        f = s["facts"][kind]
    if not 0 <= n_decoys <= min(len(s["owners"]), len(f.values) - 1):
        raise ValueError(f"n_decoys must be in 0..{min(len(s['owners']), len(f.values) - 1)}, got {n_decoys}")
    vals = [f.values[i] for i in rng.choice(len(f.values), 1 + n_decoys, replace=False)]
    owners = [s["owners"][i] for i in rng.choice(len(s["owners"]), n_decoys, replace=False)]
    fact = lead_in.format(s=f.state.format(v=vals[0]))
    decoys = [s["decoy_lead_in"].format(s=f.decoy.format(owner=o, v=v)) for o, v in zip(owners, vals[1:])]
    return Plan("chat_memory", split, [], [], "", vals[0], [fact], decoys, f.ask, f.reply.format(v=vals[0]),
                list(f.values), depths=[float(rng.uniform(0, 0.2))] + [None] * n_decoys, chat_only=True)


def _story_plan(task):
    """A bAbI-style story task's plan builder (tasks/babi.py, imported on use: it builds on this module)."""
    def build(rng, split="train", **kwargs):
        from tasks.babi import story_plan
        return story_plan(task, rng, split, **kwargs)
    return build


STORY_TASKS = ("qa1", "qa2", "qa3")  # tasks/babi.py: one, two and three supporting facts
PLANS = {"passkey": passkey_plan, "multikey": multikey_plan, "kv_recall": kv_plan, "chat_memory": chat_memory_plan,
         **{t: _story_plan(t) for t in STORY_TASKS}}


def make_plan(task, rng, split="train", **kwargs):
    if task not in PLANS:
        raise ValueError(f"unknown long-context task {task!r}: choose from {tuple(PLANS)}")
    return PLANS[task](rng, split=split, **kwargs)


# ------------------------------------------------------------------------------------------ raw view
def _filler_ids(filler, tokenizer, rng, n_tokens):
    """n_tokens of filler starting at a random point (the filler text is repeated if too short)."""
    ids = list(tokenizer.encode(filler))
    if not ids:
        raise ValueError("filler text encodes to no tokens")
    reps = -(-(n_tokens + len(ids)) // len(ids))
    ids = ids * reps
    start = int(rng.integers(0, len(ids) - n_tokens + 1))
    return ids[start:start + n_tokens]


def _assemble(filler, tokenizer, rng, n_tokens, inserts, question, answer, depths=None):
    """
    Filler of about n_tokens history tokens with `inserts` (texts) placed at increasing random depths
    (or the given fractions; None in the list: a random one), then the question and the answer. Returns
    (ids, insert spans in the order given, question_start, answer_span).
    """
    enc = [list(tokenizer.encode(t)) for t in inserts]
    fill_n = n_tokens - sum(len(e) for e in enc)
    if fill_n < len(inserts) + 1:
        raise ValueError(f"history of {n_tokens} tokens is too short for {len(inserts)} needles "
                         f"({sum(len(e) for e in enc)} tokens)")
    fill = _filler_ids(filler, tokenizer, rng, fill_n)
    if depths is None:
        cuts = np.sort(rng.choice(np.arange(1, fill_n), size=len(inserts), replace=False))
        order = rng.permutation(len(inserts))  # which insert goes at which depth
    else:
        depths = [float(rng.random()) if d is None else d for d in depths]
        cuts = np.clip((np.asarray(depths, dtype=float) * fill_n).astype(int), 0, fill_n)
        order = np.argsort(cuts, kind="stable")
        cuts = cuts[order]
    ids, spans, prev = [], [None] * len(inserts), 0
    for cut, k in zip(cuts.tolist(), order.tolist()):
        ids += fill[prev:cut]
        spans[k] = (len(ids), len(ids) + len(enc[k]))
        ids += enc[k]
        prev = cut
    ids += fill[prev:]
    q = len(ids)
    ids += list(tokenizer.encode(question))
    a = len(ids)
    ids += list(tokenizer.encode(answer)) + list(tokenizer.encode(ANSWER_END))
    return ids, spans, q, (a, len(ids))


def key_span(ids, span, key_ids):
    """The token span of key_ids inside ids[span] (the last occurrence: the key ends the sentence's clause)."""
    a, b = span
    n = len(key_ids)
    for i in range(b - n, a - 1, -1):
        if ids[i:i + n] == key_ids:
            return (i, i + n)
    raise ValueError("key tokens not found inside the needle (a tokenizer merged them with their neighbours)")


def render_raw(plan, filler, tokenizer, rng, n_tokens, depth=None, key_in_block=0):
    """
    The plan's needles in ~n_tokens of filler, the asked one at `depth` (a fraction of the history; default
    random, as are the others). key_in_block=K > 0 resamples the placement until the key's tokens lie inside
    one aligned K-token block (one expanded block then holds the whole answer; passkey only).
    """
    if plan.chat_only:
        from tasks.chat_view import chat_to_raw, render_chat
        return chat_to_raw(render_chat(plan, filler, tokenizer, rng, n_tokens, depth=depth), tokenizer)
    if key_in_block and not plan.locate_key:
        raise ValueError(f"key_in_block needs a task that locates its key, not {plan.task}")
    if hasattr(plan, "render_raw"):  # a plan that lays itself out (tasks/babi.py: a story keeps its order)
        return plan.render_raw(filler, tokenizer, rng, n_tokens, depth=depth)
    inserts = plan.needles + plan.decoys
    key_ids = list(tokenizer.encode(plan.answer))
    for _ in range(1000):
        depths = None if depth is None else [depth] + [None] * (len(inserts) - 1)
        ids, spans, q, ans = _assemble(filler, tokenizer, rng, n_tokens, inserts, plan.question, " " + plan.answer,
                                       depths)
        n = len(plan.needles)
        ex = LongCtxExample(ids, ans, q, " " + plan.answer, needle_spans=spans[:n], decoy_spans=spans[n:],
                            plan=plan)
        if not plan.locate_key:
            return ex
        ks = key_span(ids, spans[0], key_ids)
        ex.key_spans = [ks]
        if not key_in_block or ks[0] // key_in_block == (ks[1] - 1) // key_in_block:
            return ex
        if depth is not None:  # a fixed depth cannot move: nudge it by a few tokens
            depth = min(1.0, depth + 7.0 / max(n_tokens, 1))
    raise ValueError(f"could not place the key inside one {key_in_block}-token block")


def raw_example(task, filler, tokenizer, rng, n_tokens, split="train", depth=None, key_in_block=0, **kwargs):
    """One raw example of `task` (kwargs go to its plan builder, e.g. n_keys for multikey)."""
    plan = make_plan(task, rng, split, **kwargs)
    return render_raw(plan, filler, tokenizer, rng, n_tokens, depth=depth, key_in_block=key_in_block)


# the per-task functions callers have used since before the plans
def passkey(filler, tokenizer, rng, n_tokens, depth=None, key=None, key_in_block=0, split="train"):
    """One 5-digit pass key at `depth` (fraction of the history, default random) in ~n_tokens of filler."""
    return raw_example("passkey", filler, tokenizer, rng, n_tokens, split, depth, key_in_block, key=key)


def multikey(filler, tokenizer, rng, n_tokens, n_keys=4, n_decoys=2, questions=None, split="train"):
    """Colour-labelled keys and near misses; `questions` overrides the split's wording (MULTI_QUESTIONS_HELDOUT)."""
    return raw_example("multikey", filler, tokenizer, rng, n_tokens, split, n_keys=n_keys, n_decoys=n_decoys,
                       questions=questions)


def kv_recall(filler, tokenizer, rng, n_tokens, n_pairs=6, split="train"):
    return raw_example("kv_recall", filler, tokenizer, rng, n_tokens, split, n_pairs=n_pairs)


def chat_memory(filler, tokenizer, rng, n_tokens, split="train", n_decoys=2, depth=None):
    """The chat-memory conversation with ~n_tokens of history, rendered with the chat special tokens (the
    tokenizer must have them); `filler` is the text the user pastes (None: small talk only)."""
    return raw_example("chat_memory", filler, tokenizer, rng, n_tokens, split, depth, n_decoys=n_decoys)


TASKS = {"passkey": passkey, "multikey": multikey, "kv_recall": kv_recall, "chat_memory": chat_memory,
         **{t: partial(raw_example, t) for t in STORY_TASKS}}  # (filler, tokenizer, rng, n_tokens, split, depth, ...)


# ------------------------------------------------------------------------------------------ scoring
def has_word(text, word):
    """word in text as a whole word (case-insensitive): 7 is not found inside 77, nor red inside bored."""
    return re.search(r"(?<![\w])" + re.escape(word.lower()) + r"(?![\w])", text.lower()) is not None


def score_reply(plan, reply):
    """Strict: the reply names the asked value, and no other value of its kind (another key, a decoy, another
    value of the fact's kind), so echoing a decoy or listing candidates fails."""
    if isinstance(plan, LongCtxExample):
        plan = plan.plan
    if not has_word(reply, plan.answer):
        return False
    if any(has_word(reply, v) for v in plan.values if v != plan.answer):
        return False
    if plan.value_pattern:
        found = re.findall(r"(?<![\w])" + plan.value_pattern + r"(?![\w])", reply)
        return all(v == plan.answer for v in found)
    return True
