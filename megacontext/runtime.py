"""
MCSession: the MegaContext runtime (DESIGN.md sections 9 and 12). Everything the model reads or
writes goes into an append-only tree (RAM, or on disk with `memory_dir`); the GPT reads a working
context (WC) of at most `budget` slots over the whole history, refocused by LensNet + the allocator.

    s = MCSession.load(source="sft", memory_dir="~/mem")   # or MCSession(gpt, gistnet, lensnet, tok, cfg)
    s.ingest_text(book)                                    # any length: the tree keeps everything
    for piece in s.chat("Who wrote the letter?"): print(piece, end="")
    s.save()                                               # later: MCSession.open("~/mem")

Cadence: tokens are appended a block at a time; after every K tokens (and whenever appended tokens
push the WC over budget) a refocus runs: LensNet scores -> allocator edits, up to `passes` chained
passes so a level-2 gist can reach raw tokens. A chunk longer than the budget is appended to the tree
in one batched call. After every ingest (a document, a question, a chat turn) the WC is rebuilt by
`focus`: two-stage focus from the start tiling (retrieval.lens_focus, the procedure mc_eval measures),
so the GPT answers a new message with the blocks that message asks about open. The allocator's
incremental edits then keep the WC in budget while the reply is generated; the raw blocks focus opened
are the last it collapses, the latest opened first (focus opens best first). Without that, the reply's
first token pushed a full WC over budget and the allocator folded the block holding the answer
(passkey at 4x through the runtime: 87 % vs 100 % for the same WC read without appending; dev/LOG.md,
session 6). It opens only blocks next to those (`keep_scores`). (With the allocator alone, a
pass key 4-64x the budget behind the question was raw 0-10 % of the time: from a recency pyramid there
was no room to open it; dev/LOG.md, session 4.) The GPT only
runs on a WC within budget, through a WCKVCache (kvcache.py) that recomputes only from the first
edited slot, so per-token decode cost does not grow with the history.

On disk, memory_dir holds `tree/` (MCTree files) and `session.json` (WC entries, cooldown state,
counters, MCConfig, the fingerprints of GPT/GistNet/LensNet, and where the model came from).
"""
import dataclasses
import hashlib
import json
import logging
import os

import numpy as np
import torch

from nanochat.common import UserError
from megacontext.allocator import PINNED, CooldownState, refocus as allocator_refocus
from megacontext.config import MCConfig
from megacontext.kvcache import WCKVCache
from megacontext.tree import MCTree, validate_ids
from megacontext.reranker import rerank_scores
from megacontext.retrieval import covers_any, lens_focus
from megacontext.working_context import (WCError, WorkingContext, all_raw, append_tokens, check_invariants,
                                         recency_pyramid, wc_cost)

logger = logging.getLogger("nanochat")

SESSION_FILE = "session.json"
SESSION_VERSION = 1


class SessionError(UserError, ValueError):
    """A bad input to a session, or a memory directory that cannot be used."""


def module_fingerprint(module):
    """A short, dtype/device independent hash of a module's weights (a strided sample of each tensor)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().reshape(-1)
        sample = t[::max(1, t.numel() // 4096)].float().cpu().contiguous()
        h.update(f"{name}:{tuple(module.state_dict()[name].shape)}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def _atomic_write_json(path, obj):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _stop_ids(tokenizer):
    if tokenizer is None:
        return set()
    stops = {tokenizer.get_bos_token_id()}
    try:
        stops.add(tokenizer.encode_special("<|assistant_end|>"))
    except (ValueError, KeyError):
        pass
    return stops


def sample_token(logits, temperature, top_k, rng):
    """logits (V,) -> int. temperature 0 is greedy."""
    if temperature == 0.0:
        return int(torch.argmax(logits))
    if top_k:
        vals, idx = torch.topk(logits, min(top_k, logits.numel()))
        return int(idx[torch.multinomial(torch.softmax(vals / temperature, -1), 1, generator=rng)])
    return int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=rng))


def keep_scores(scores, wc, kept, cfg):
    """
    The allocator's scores while a reply is generated after a focus that opened the raw blocks `kept` (best
    first):
    - those blocks are lifted above every LensNet score (in (-1, 1)) and above allocator.PINNED:
      PINNED + 1 - r / len(kept) for rank r, so a forced collapse folds them after every other group
      (cooldown or not), the latest-kept first, and no voluntary collapse (score < -tau) picks them;
    - a gist is held at tau at most (so never expanded) unless expanding it opens or leads towards a kept
      block (one a forced collapse folded) or a block next to one: focus's own rule
      (`retrieval.leads_next_to`), carried through the reply. LensNet scores every labelled key alike, and
      a refocus during the answer spent the room focus left on another key's block (multi-key at 16x
      through the runtime: 28 of 30 right, 29 with the rule; dev/LOG.md, session 13).
    Negative scores are untouched: the allocator still folds what LensNet wants least.
    """
    if not kept:
        return scores
    scores = np.array(scores, dtype=np.float64, copy=True)
    rank = {b: r for r, b in enumerate(kept)}
    near = [n for b in kept for n in (b - 1, b, b + 1)]
    for j in range(len(wc)):
        level, index = int(wc.levels[j]), int(wc.indices[j])
        if level == 0:
            r = rank.get(index)
            if r is not None:
                scores[j] = PINNED + 1.0 - r / len(kept)
        elif not covers_any(level, index, near, cfg.block_size):
            scores[j] = min(scores[j], cfg.tau)
    return scores


class MCSession:

    def __init__(self, gpt, gistnet, lensnet, tokenizer, cfg, memory_dir=None, device=None, budget=None,
                 passes=2, source_info=None, reranker=None):
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
        self.passes = passes
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

    # --- loading --------------------------------------------------------------------------------

    @classmethod
    def load(cls, source="sft", model_tag=None, step=None, device=None, budget=None, memory_dir=None, **kw):
        """Build a session from a checkpoint that holds GPT, GistNet and LensNet weights and an MCConfig."""
        from nanochat.common import autodetect_device_type
        from nanochat.checkpoint_manager import checkpoint_dir_for, load_model
        from megacontext.checkpoint import load_mc_modules
        device = torch.device(device or autodetect_device_type())
        gpt, tokenizer, meta = load_model(source, device, "eval", model_tag=model_tag, step=step)
        ckdir = checkpoint_dir_for(source, model_tag)
        step = meta.get("step", step) if step is None else step
        nets = load_mc_modules(gpt, meta["model_data"], meta, f"checkpoint {ckdir} (step {step})", device=device)
        gistnet, lensnet = nets["gistnet"], nets["lensnet"]
        cfg = MCConfig.from_dict(meta["mc_config"])
        gpt = gpt.float() if device.type != "cuda" else gpt
        info = {"source": source, "model_tag": os.path.basename(ckdir), "step": step}
        return cls(gpt, gistnet, lensnet, tokenizer, cfg, memory_dir=memory_dir, device=device, budget=budget,
                   source_info=info, reranker=nets["reranker"], **kw)

    @classmethod
    def open(cls, memory_dir, source=None, model_tag=None, step=None, device=None, budget=None, **kw):
        """Reopen a saved memory with the checkpoint it recorded (or the one named here)."""
        memory_dir = os.path.abspath(os.path.expanduser(memory_dir))
        state = cls._read_state(memory_dir)
        rec = state.get("source") or {}
        if source is None and not rec.get("source"):
            raise SessionError(f"{memory_dir} was made from models given directly, not a checkpoint: "
                               f"pass source= (or build the nets and use MCSession(..., memory_dir=...))")
        if source is None:
            source, model_tag, step = rec["source"], model_tag or rec.get("model_tag"), step or rec.get("step")
        return cls.load(source, model_tag, step, device, budget, memory_dir=memory_dir, **kw)

    def _tree_dir(self):
        return os.path.join(self.memory_dir, "tree")

    @staticmethod
    def _read_state(memory_dir):
        path = os.path.join(memory_dir, SESSION_FILE)
        if not os.path.isfile(path):
            raise SessionError(f"{memory_dir}: no {SESSION_FILE}, not a saved MegaContext memory")
        try:
            with open(path, encoding="utf-8") as f:
                state = json.load(f)
            if not isinstance(state, dict) or state.get("version") != SESSION_VERSION:
                raise ValueError(f"unknown version {state.get('version') if isinstance(state, dict) else state!r}")
            for key in ("identity", "mc_config", "wc", "cooldown", "refocus_count", "since_refocus"):
                if key not in state:
                    raise ValueError(f"missing {key!r}")
        except (OSError, ValueError) as e:
            raise SessionError(f"{path} is corrupted ({e}); the memory cannot be restored") from None
        return state

    def _restore(self, wte):
        d = self.memory_dir
        state = self._read_state(d)
        ident = state["identity"]
        for net in ("gpt", "gistnet"):
            if ident.get(net) != self.identity[net]:
                raise SessionError(f"memory {d} was made by a different model ({net} {ident.get(net)}, the current "
                                   f"{net} is {self.identity[net]}): open it with the checkpoint that made it, "
                                   f"or start a new memory")
        if ident.get("lensnet") != self.identity["lensnet"]:
            logger.warning(f"memory {d} was focused by another LensNet; continuing with the current one")
        try:
            known = {f.name for f in dataclasses.fields(MCConfig)}  # tolerate knobs added or removed since
            scfg = MCConfig.from_dict({k: v for k, v in state["mc_config"].items() if k in known})
            wc = WorkingContext(np.array(state["wc"]["levels"], np.int64), np.array(state["wc"]["indices"], np.int64),
                                int(state["wc"]["num_tokens"]))
            cd = state["cooldown"]
            cooldown = CooldownState(int(cd["pass_idx"]), tuple((str(o), int(l), int(i), int(p))
                                                                 for o, l, i, p in cd["history"]))
        except (KeyError, TypeError, ValueError) as e:
            raise SessionError(f"{d}/{SESSION_FILE} is corrupted ({e})") from None
        for f in ("block_size", "max_level", "storage_dtype", "positions"):
            if getattr(scfg, f) != getattr(self.cfg, f):
                raise SessionError(f"memory {d} was made with {f}={getattr(scfg, f)!r}, the model's config "
                                   f"has {getattr(self.cfg, f)!r}")
        self.tree = MCTree.open(self._tree_dir(), self.gistnet, wte, model_id=self.identity["gpt"], cfg=self.cfg)
        if self.tree.stale:
            raise SessionError(f"memory {d}: the tree's gists are stale ({self.tree.stale_reason})")
        N = self.tree.num_tokens
        if wc.num_tokens > N:
            raise SessionError(f"memory {d} is corrupted: session.json covers {wc.num_tokens} tokens, "
                               f"the tree holds {N}")
        try:
            check_invariants(wc, self.cfg)
        except WCError as e:
            raise SessionError(f"memory {d} is corrupted: {e}") from None
        self.wc, self.cooldown = wc, cooldown
        self.refocus_count, self.since_refocus = int(state["refocus_count"]), int(state["since_refocus"])
        self.edit_count = int(state.get("edit_count", 0))
        self.kept = [int(b) for b in state.get("kept", [])]  # older memories lack it: nothing kept
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
                self.tree.append(ids[a:a + step])
                if bar is not None:
                    bar.update(min(step, n - a))
            if bar is not None:
                bar.close()
        else:
            pos = 0
            while pos < n:  # a block at a time, so the refocus cadence does not depend on the chunking
                take = min(n - pos, self.K - self.since_refocus)
                self.tree.append(ids[pos:pos + take])
                self._after_append(take)
                pos += take
        self.focus()
        return n

    @torch.no_grad()
    def focus(self):
        """Rebuild the WC with two-stage focus over the whole history (retrieval.lens_focus: from the start
        tiling, LensNet's best gist expanded one at a time, the reranker choosing among the blocks LensNet
        shortlists in the WC and inside its best level-2 regions). The newest tokens (the question) are the
        present it scores against."""
        trace = []
        self.wc = lens_focus(self.tree.num_tokens, self.cfg.budget, self.cfg, self.lensnet, self.tree,
                             self.gpt.transformer.wte, self.reranker, trace=trace)
        self.kept = [i for level, i in trace if level == 1]  # level-1 gists expanded: the blocks opened raw
        self.cooldown = CooldownState()  # a new WC: no fresh edit of the old one to protect
        self.refocus_count += 1
        self.since_refocus = 0

    def _after_append(self, n):
        self.wc = append_tokens(self.wc, self.tree.num_tokens, self.cfg)
        self.since_refocus += n
        if self.since_refocus >= self.K or wc_cost(self.wc, self.K) > self.cfg.budget:
            self.refocus()

    @torch.no_grad()
    def refocus(self):
        """LensNet scores (the reranker reordering its level-1 shortlist) -> allocator edits, up to `passes`
        chained passes. Returns the edits made."""
        edits = []
        if self.tree.num_tokens == 0:
            return edits
        wte = self.gpt.transformer.wte
        for _ in range(self.passes):
            scores, _ = self.lensnet.score([self.wc], self.tree, wte)
            scores = keep_scores(rerank_scores(scores[0], self.wc, self.tree, self.reranker, wte, self.cfg),
                                 self.wc, self.kept, self.cfg)
            e, self.wc, self.cooldown = allocator_refocus(self.wc, scores, self.cfg.budget, self.cooldown, self.cfg)
            edits += e
            if not e:
                break
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
        stops = _stop_ids(self.tokenizer) if stop else set()
        rng = torch.Generator(device=self.device)
        rng.manual_seed(seed)
        for _ in range(max_tokens):
            self.kv.sync(self.wc, self.tree)
            t = sample_token(self.kv.last_logits, temperature, top_k, rng)
            self.tree.append([t])
            self._after_append(1)
            yield t
            if t in stops:
                return

    def _decode_text(self, id_stream):
        """Turn a stream of ids into text pieces, holding back incomplete UTF-8 sequences."""
        if self.tokenizer is None:
            raise SessionError("this session has no tokenizer: use generate_ids")
        ids, sent, stops = [], "", _stop_ids(self.tokenizer)
        for t in id_stream:
            if t in stops:
                continue
            ids.append(t)
            text = self.tokenizer.decode(ids)
            if not text.endswith("\ufffd") and len(text) > len(sent):
                yield text[len(sent):]
                sent = text
        text = self.tokenizer.decode(ids)
        if len(text) > len(sent):
            yield text[len(sent):]

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
        ids = [tok.get_bos_token_id()] if self.tree.num_tokens == 0 else []
        return ids + [tok.encode_special(f"<|{role}_start|>")] + tok.encode(content) + \
            [tok.encode_special(f"<|{role}_end|>")]

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
        self.kv.sync(self.wc, self.tree)
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

    def _state(self):
        return {"version": SESSION_VERSION, "identity": self.identity, "source": self.source_info,
                "mc_config": self.cfg.to_dict(),
                "wc": {"levels": self.wc.levels.tolist(), "indices": self.wc.indices.tolist(),
                       "num_tokens": self.wc.num_tokens},
                "cooldown": {"pass_idx": self.cooldown.pass_idx, "history": [list(h) for h in self.cooldown.history]},
                "refocus_count": self.refocus_count, "since_refocus": self.since_refocus,
                "edit_count": self.edit_count, "kept": list(self.kept)}

    def save(self):
        """Flush the tree and write session.json (atomically), so MCSession.open continues from here."""
        if self.memory_dir is None:
            raise SessionError("this session has no memory_dir: create it with memory_dir=DIR to save it")
        self.tree.flush()
        _atomic_write_json(os.path.join(self.memory_dir, SESSION_FILE), self._state())

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
