"""
MCSession: a persistent memory with a working context (docs/architecture.md). Everything the model
reads or writes goes into an append-only tree (RAM, or on disk with `memory_dir`); the GPT reads a
working context (WC) of at most `budget` slots over the whole history.

    s = MCSession.load(source="sft", memory_dir="~/mem")   # or MCSession(gpt, gistnet, lensnet, tok, cfg)
    s.ingest_text(book)                                    # any length: the tree keeps everything
    for piece in s.chat("Who wrote the letter?"): print(piece, end="")
    s.save()                                               # later: MCSession.open("~/mem")

What the WC holds is decided by the focus policy (megacontext/focus.py): after every ingest (a document,
a question, a chat turn) `question_focus` rebuilds it for the present, and while tokens are appended (the
reply) `incremental_refocus` keeps it within budget, after every K tokens or whenever the WC goes over,
with the blocks the question focus opened pinned. The GPT only runs on a WC within budget, through a
WCKVCache (kvcache.py) that recomputes only from the first edited slot, so per-token decode cost does not
grow with the history. A refocus runs LensNet once (again only after a pass that expanded), the reranker only
where it could change the pass, and folds what the budget forces next to the present, so the slots recomputed
after it are about the raw tail's (focus.incremental_refocus); decoding reads the newest tokens from RAM
(`RecentTokens`). `python -m scripts.mc_bench` measures all of it against plain KV-cached decoding.

Collaborators: loading a checkpoint (megacontext/checkpoint.py), persistence (megacontext/memory_store.py),
the chat format, sampling, stop tokens and stream decoding (nanochat/tokenizer.py, nanochat/engine.py).
"""
import dataclasses
import logging
import os

import torch

from nanochat.engine import sample_next_token
from nanochat.tokenizer import chat_stop_ids, decode_stream
from megacontext.allocator import CooldownState
from megacontext.focus import incremental_refocus, question_focus
from megacontext.kvcache import WCKVCache
from megacontext.memory_store import (SESSION_FILE, Saved, SessionError, module_fingerprint, read_saved, read_state,
                                      write_state)
from megacontext.tree import MCTree, validate_ids
from megacontext.working_context import all_raw, append_tokens, recency_pyramid, wc_cost

logger = logging.getLogger("nanochat")

__all__ = ["MCSession", "SessionError", "SESSION_FILE"]


class RecentTokens:
    """
    The tree as decoding reads it: its newest `keep` token ids from RAM, everything else (older tokens, gists)
    from the tree, so reads return exactly the tree's ids. Every decode step reads the newest tokens (the new
    slot; at a refocus the raw tail and the reranker's question), and an on-disk tree maps its token file again
    for each read past what it mapped last (~0.15 ms a token on CPU, a tenth of a depth-2 GPT step).
    The session reports what it appends (`appended`); if the tree grew some other way, the RAM copy is not used
    until the next append re-reads it from the tree.
    """

    def __init__(self, tree, keep):
        self.tree, self.keep = tree, int(keep)
        self._ids, self._start = None, 0  # int64 ids of tokens [start, start + len(ids))

    def _fresh(self):
        return self._ids is not None and self._start + len(self._ids) == self.tree.num_tokens

    def appended(self, ids):
        """The tree has just appended `ids` (a 1-D int64 tensor)."""
        n = self.tree.num_tokens
        if self._ids is not None and self._start + len(self._ids) + len(ids) == n:
            buf = torch.cat([self._ids, ids.to(self._ids.device)])[-self.keep:]
        else:
            buf = self.tree.tokens(max(0, n - self.keep), n)
        self._ids, self._start = buf, n - len(buf)

    def tokens(self, start, end):
        if self._fresh() and self._start <= start <= end <= self._start + len(self._ids):
            return self._ids[start - self._start:end - self._start]
        return self.tree.tokens(start, end)

    def gists(self, level, start, end):
        return self.tree.gists(level, start, end)

    @property
    def num_tokens(self):
        return self.tree.num_tokens

    def __getattr__(self, name):  # vocab_size, device, ...: the tree's
        if name == "tree":
            raise AttributeError(name)
        return getattr(self.tree, name)


class MCSession:

    def __init__(self, gpt, gistnet, lensnet, tokenizer, cfg, memory_dir=None, device=None, budget=None,
                 source_info=None, reranker=None):
        """
        gpt/gistnet/lensnet: the three nets (moved to `device`, default the GPT's); reranker: the second
        stage of focus (megacontext/reranker.py; None: LensNet alone); tokenizer: may be
        None for id-only use; cfg: MCConfig (budget overrides cfg.budget). memory_dir: a directory for
        a persistent memory: created when absent or empty, restored (identity-checked) when it holds a session.
        """
        if budget is not None:
            cfg = dataclasses.replace(cfg, budget=int(budget))  # re-validates
        self.cfg = cfg
        self.K = cfg.block_size
        self.device = torch.device(device) if device is not None else gpt.get_device()
        self.gpt = gpt.to(self.device).eval()
        self.gistnet = gistnet.to(self.device).eval()
        self.lensnet = lensnet.to(self.device).eval()
        self.reranker = None if reranker is None else reranker.to(self.device).eval()
        self.tokenizer = tokenizer
        self.source_info = source_info or {}
        self.identity = {"gpt": module_fingerprint(self.gpt), "gistnet": module_fingerprint(self.gistnet),
                         "lensnet": module_fingerprint(self.lensnet)}
        self.memory_dir = os.path.abspath(os.path.expanduser(memory_dir)) if memory_dir else None
        self.kv = WCKVCache(self.gpt, cfg)
        self.cooldown = CooldownState()
        self.kept = []           # raw blocks the last focus opened, best first (collapsed last)
        self.refocus_count = 0
        self.edit_count = 0
        self.since_refocus = 0   # tokens appended since the last refocus
        wte = self.gpt.transformer.wte
        if self.memory_dir is None:
            self.tree = MCTree.ram(cfg, self.gistnet, wte)
            self.wc = all_raw(0, cfg)
        elif os.path.exists(os.path.join(self.memory_dir, SESSION_FILE)):
            self._restore(wte)
        else:
            if os.path.isdir(self.memory_dir) and os.listdir(self.memory_dir):
                raise SessionError(f"{self.memory_dir} is not empty and holds no {SESSION_FILE}: not a MegaContext "
                                   f"memory (corrupted, or another directory); use an empty or new directory")
            os.makedirs(self.memory_dir, exist_ok=True)
            self.tree = MCTree.create(self._tree_dir(), cfg, self.gistnet, wte, model_id=self.identity["gpt"])
            self.wc = all_raw(0, cfg)
            self.save()
        self.reader = RecentTokens(self.tree, cfg.budget + 2 * self.K)  # what decode and refocus read through
        self.focus_counts = {}  # incremental_refocus's LensNet and reranker calls (not saved)
        self._cost = None       # (wc, its cost) as _after_append left them

    # --- loading --------------------------------------------------------------------------------

    @classmethod
    def load(cls, source="sft", model_tag=None, step=None, device=None, budget=None, memory_dir=None, **kw):
        """Build a session from a checkpoint that holds GPT, GistNet and LensNet weights and an MCConfig."""
        from megacontext.checkpoint import load_mc_checkpoint
        m = load_mc_checkpoint(source, model_tag, step, device)
        return cls(m.gpt, m.gistnet, m.lensnet, m.tokenizer, m.cfg, memory_dir=memory_dir, device=m.gpt.get_device(),
                   budget=budget, source_info=m.source_info, reranker=m.reranker, **kw)

    @classmethod
    def open(cls, memory_dir, source=None, model_tag=None, step=None, device=None, budget=None, **kw):
        """Reopen a saved memory with the checkpoint it recorded (or the one named here)."""
        memory_dir = os.path.abspath(os.path.expanduser(memory_dir))
        rec = read_state(memory_dir).get("source") or {}
        if source is None and not rec.get("source"):
            raise SessionError(f"{memory_dir} was made from models given directly, not a checkpoint: "
                               f"pass source= (or build the nets and use MCSession(..., memory_dir=...))")
        if source is None:
            source, model_tag, step = rec["source"], model_tag or rec.get("model_tag"), step or rec.get("step")
        return cls.load(source, model_tag, step, device, budget, memory_dir=memory_dir, **kw)

    def _tree_dir(self):
        return os.path.join(self.memory_dir, "tree")

    def _restore(self, wte):
        d = self.memory_dir
        saved = read_saved(d, self.identity, self.cfg)
        self.tree = MCTree.open(self._tree_dir(), self.gistnet, wte, model_id=self.identity["gpt"], cfg=self.cfg)
        self.reader = RecentTokens(self.tree, self.cfg.budget + 2 * self.K)
        self.focus_counts = {}
        self._cost = None
        if self.tree.stale:
            raise SessionError(f"memory {d}: the tree's gists are stale ({self.tree.stale_reason})")
        N, wc = self.tree.num_tokens, saved.wc
        if wc.num_tokens > N:
            raise SessionError(f"memory {d} is corrupted: {SESSION_FILE} covers {wc.num_tokens} tokens, "
                               f"the tree holds {N}")
        self.wc, self.cooldown, self.kept = wc, saved.cooldown, saved.kept
        self.refocus_count, self.since_refocus, self.edit_count = (saved.refocus_count, saved.since_refocus,
                                                                   saved.edit_count)
        if N > wc.num_tokens:  # tokens committed after the last save (e.g. a crash): catch the WC up
            logger.warning(f"memory {d}: {N - wc.num_tokens} tokens were appended after the last save; "
                           f"catching the working context up")
            if N - wc.num_tokens > self.cfg.budget:
                self.wc = recency_pyramid(N, self.cfg.budget, self.cfg)
                self.refocus()
            else:
                self._after_append(N - wc.num_tokens)
        if wc_cost(self.wc, self.K) > self.cfg.budget:  # reopened with a smaller budget
            self.wc = recency_pyramid(self.wc.num_tokens, self.cfg.budget, self.cfg)
            self.refocus()

    # --- memory ---------------------------------------------------------------------------------

    @property
    def num_tokens(self):
        return self.tree.num_tokens

    def _encode(self, text):
        if not isinstance(text, str):
            raise SessionError(f"expected text (str), got {type(text).__name__}")
        if self.tokenizer is None:
            raise SessionError("this session has no tokenizer: pass token ids instead of text")
        return self.tokenizer.encode(text)

    def ingest_text(self, text, progress=False):
        """Append text to the memory; returns the number of tokens appended."""
        return self.ingest(self._encode(text), progress=progress)

    def ingest(self, ids, progress=False):
        """Append token ids of any length to the memory (tree + working context); returns how many."""
        ids = validate_ids(ids, self.tree.vocab_size)
        n = ids.numel()
        if n == 0:
            return 0
        if n > self.cfg.budget:
            # a jump far past the present: append in one batched call, re-assemble the WC, refocus
            step = 1 << 16
            bar = None
            if progress:
                from tqdm import tqdm
                bar = tqdm(total=n, desc="ingest", unit="tok", unit_scale=True)
            for a in range(0, n, step):
                self._append(ids[a:a + step])
                if bar is not None:
                    bar.update(min(step, n - a))
            if bar is not None:
                bar.close()
        else:
            pos = 0
            while pos < n:  # a block at a time, so the refocus cadence does not depend on the chunking
                take = min(n - pos, self.K - self.since_refocus)
                self._append(ids[pos:pos + take])
                self._after_append(take)
                pos += take
        self.focus()
        return n

    @torch.no_grad()
    def focus(self):
        """Rebuild the WC for the present (focus.question_focus over the whole history): the newest tokens (the
        question) are what LensNet and the reranker score against. The blocks it opens become the pins the
        allocator keeps while the reply is written."""
        trace = []
        self.wc = question_focus(self.tree.num_tokens, self.cfg.budget, self.cfg, self.lensnet, self.tree,
                                 self.gpt.transformer.wte, self.reranker, trace=trace)
        self.kept = [i for level, i in trace if level == 1]  # level-1 gists expanded: the blocks opened raw
        self.cooldown = CooldownState()  # a new WC: no fresh edit of the old one to protect
        self.refocus_count += 1
        self.since_refocus = 0

    def _append(self, ids):
        """Append validated ids (1-D int64 tensor) to the tree, and tell the reader."""
        self.tree.append(ids)
        self.reader.appended(ids)

    def _after_append(self, n):
        old = self.wc
        self.wc = append_tokens(old, self.tree.num_tokens, self.cfg)
        # appended tokens are raw, one slot each: the cost of the WC this method left last, plus n
        known = self._cost is not None and self._cost[0] is old
        cost = self._cost[1] + self.wc.num_tokens - old.num_tokens if known else wc_cost(self.wc, self.K)
        self._cost = (self.wc, cost)
        self.since_refocus += n
        if self.since_refocus >= self.K or cost > self.cfg.budget:
            self.refocus()

    @torch.no_grad()
    def refocus(self):
        """Incremental focus (focus.incremental_refocus: LensNet + reranker + allocator, up to cfg.refocus_passes
        chained passes, the kept blocks pinned). Returns the edits made."""
        if self.tree.num_tokens == 0:
            return []
        edits, self.wc, self.cooldown = incremental_refocus(self.wc, self.reader, self.lensnet, self.reranker,
                                                            self.gpt.transformer.wte, self.cfg, self.cooldown,
                                                            self.kept, stats=self.focus_counts)
        self.refocus_count += 1
        self.edit_count += len(edits)
        self.since_refocus = 0
        return edits

    # --- reading: logits, generation, likelihood ----------------------------------------------

    def _prompt_ids(self, prompt):
        if isinstance(prompt, str):
            if not prompt.strip():
                raise SessionError("the prompt is empty: give some text to answer")
            return self._encode(prompt)
        ids = validate_ids(prompt, self.tree.vocab_size).tolist()
        if not ids:
            raise SessionError("the prompt is empty: give at least one token")
        return ids

    def generate_ids(self, max_tokens=64, temperature=0.0, top_k=None, seed=42, stop=True):
        """
        Decode from the current memory: yields token ids, each appended to the memory before the
        next is computed (so the answer becomes history). Stops after a stop token (<|assistant_end|>,
        <|bos|>; it is appended and yielded) when stop=True, or after max_tokens.
        """
        if max_tokens < 0 or temperature < 0:
            raise SessionError("max_tokens and temperature must be >= 0")
        if self.tree.num_tokens == 0:
            raise SessionError("the memory is empty: ingest a prompt first")
        stops = chat_stop_ids(self.tokenizer) if stop else set()
        rng = torch.Generator(device=self.device)
        rng.manual_seed(seed)
        for _ in range(max_tokens):
            self.kv.sync(self.wc, self.reader)
            t = int(sample_next_token(self.kv.last_logits[None], rng, temperature, top_k))
            self._append(torch.tensor([t]))
            self._after_append(1)
            yield t
            if t in stops:
                return

    def _decode_text(self, id_stream):
        """Turn a stream of ids into text pieces (up to a stop token, incomplete UTF-8 held back)."""
        if self.tokenizer is None:
            raise SessionError("this session has no tokenizer: use generate_ids")
        yield from decode_stream(self.tokenizer, id_stream, chat_stop_ids(self.tokenizer))

    def stream(self, prompt, max_tokens=64, temperature=0.0, top_k=None, seed=42):
        """Append `prompt` (text or ids, any length) to the memory, then yield the continuation's text."""
        ids = self._prompt_ids(prompt)
        self.ingest(ids)
        if self.since_refocus:  # let LensNet see the prompt (the present) before answering
            self.refocus()
        yield from self._decode_text(self.generate_ids(max_tokens, temperature, top_k, seed))

    def generate(self, prompt, max_tokens=64, temperature=0.0, top_k=None, seed=42):
        return "".join(self.stream(prompt, max_tokens, temperature, top_k, seed))

    # --- chat -----------------------------------------------------------------------------------

    def render_turn(self, role, content):
        """Token ids of one chat message in the tokenizer's chat format (BOS first in an empty memory)."""
        if role not in ("user", "assistant"):
            raise SessionError(f"role must be 'user' or 'assistant', got {role!r}")
        if not isinstance(content, str) or not content.strip():
            raise SessionError(f"the {role} message is empty")
        tok = self.tokenizer
        if tok is None:
            raise SessionError("chat needs a tokenizer")
        return ([tok.get_bos_token_id()] if self.tree.num_tokens == 0 else []) + tok.render_turn(role, content)

    def add_turn(self, role, content):
        """Render a finished chat message (e.g. a transcript being replayed) into the memory."""
        return self.ingest(self.render_turn(role, content))

    def chat(self, message, max_tokens=256, temperature=0.0, top_k=None, seed=42):
        """One chat exchange: the user turn goes into memory, the answer streams out (and into memory).
        The assistant turn is always closed with <|assistant_end|>, even when max_tokens cuts it."""
        tok = self.tokenizer
        end = tok.encode_special("<|assistant_end|>") if tok is not None else None
        ids = self.render_turn("user", message) + [tok.encode_special("<|assistant_start|>")]
        out = []
        for piece in self.stream(ids, max_tokens, temperature, top_k, seed):
            out.append(piece)
            yield piece
        if self.tree.tokens(self.tree.num_tokens - 1, self.tree.num_tokens).item() != end:
            self.ingest([end])

    # --- likelihood -----------------------------------------------------------------------------

    @torch.no_grad()
    def nll(self, text):
        """
        Mean next-token NLL (nats) of `text` read raw after the current working context, without
        appending it. The text must fit the budget; longer texts belong in ingest. In an empty memory
        the first token is given, not scored.
        """
        ids = self._encode(text) if isinstance(text, str) else validate_ids(text, self.tree.vocab_size).tolist()
        if not ids:
            raise SessionError("nll needs a non-empty text")
        if len(ids) > self.cfg.budget:
            raise SessionError(f"nll scores text read raw after the memory, at most the budget "
                               f"({self.cfg.budget} tokens); got {len(ids)}: ingest long texts instead")
        device = self.device
        target = torch.tensor(ids, device=device)
        if self.tree.num_tokens == 0:
            if len(ids) < 2:
                raise SessionError("nll of a single token needs a non-empty memory")
            self.kv.reset()
            logits = self._score_empty(ids)
            return torch.nn.functional.cross_entropy(logits, target[1:]).item()
        self.kv.sync(self.wc, self.reader)
        rest = self.kv.score_continuation(self.wc, ids[:-1]) if len(ids) > 1 else None
        logits = self.kv.last_logits[None] if rest is None else torch.cat([self.kv.last_logits[None], rest])
        return torch.nn.functional.cross_entropy(logits, target).item()

    def _score_empty(self, ids):
        x = torch.tensor([ids[:-1]], device=self.device)
        pos = torch.arange(len(ids) - 1, device=self.device, dtype=torch.float32)[None]
        return self.gpt(x, pos=pos)[0]

    # --- state ----------------------------------------------------------------------------------

    def stats(self):
        return {"num_tokens": int(self.tree.num_tokens), "wc_cost": wc_cost(self.wc, self.K),
                "budget": self.cfg.budget, "level_counts": self.wc.level_counts(),
                "refocus_count": self.refocus_count, "wc_entries": len(self.wc), "edit_count": self.edit_count,
                "tree_counts": self.tree.level_counts()}

    def save(self):
        """Flush the tree and write session.json (atomically), so MCSession.open continues from here."""
        if self.memory_dir is None:
            raise SessionError("this session has no memory_dir: create it with memory_dir=DIR to save it")
        self.tree.flush()
        write_state(self.memory_dir, self.identity, self.source_info, self.cfg,
                    Saved(self.wc, self.cooldown, self.refocus_count, self.since_refocus, self.edit_count, self.kept))

    def close(self):
        self.tree.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        s = self.stats()
        where = self.memory_dir or "RAM"
        return (f"MCSession({where}, tokens={s['num_tokens']}, wc_cost={s['wc_cost']}/{s['budget']}, "
                f"levels={s['level_counts']})")
