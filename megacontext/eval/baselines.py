"""
Context builders for the long-context evaluation (docs/architecture.md): every way of showing the
GPT a history of N tokens through a fixed budget, so that `scripts/mc_eval.py` can compare them on
the same examples.

    truncation            the newest L raw tokens
    sinks                 the first `SINKS` tokens + the newest L - SINKS (StreamingLLM-style window)
    mean_pool             recency pyramid whose gists are plain means of their children (no GistNet)
    mc_recency            recency pyramid with GistNet gists (MegaContext without LensNet)
    mc_lensnet            LensNet focus alone (coarse to fine), slot positions
    megacontext           two-stage focus: LensNet shortlists, the reranker reads the raw candidates and picks
                          (megacontext/reranker.py), slot positions
    megacontext_gaussian  the same working context read with gaussian positions
    full                  every token raw (the upper bound; None where N exceeds the GPT's sequence_len)
    bm25                  retrieval: BM25 over the raw blocks, queried with the question (megacontext/eval/bm25.py);
                          the best blocks and their neighbours opened raw in the gist pyramid focus starts from
    bm25_truncate         the same blocks in a plain RAG prompt: retrieved blocks in history order, then the newest
                          raw tokens (no gists)
    oracle                the WC that opens exactly the blocks the answer needs (`needed_spans`) from the same
                          start: the ceiling of a perfect focus, at every history length

Same budget, counted: every method but `full` gives the GPT at most L = `shared_length(N, budget,
cfg)` input slots, the cost of the recency pyramid (the largest cost <= budget that a legal working
context reaches; every expansion costs K - 1, so a WC cannot always fill the budget to the slot).
The raw baselines take exactly L tokens. LensNet focus (FOCUSED) expands until no expansion fits,
which lands on the same cost, unless it stops early: once it has opened a block it opens only that
block's neighbours (focus.question_focus); bm25 and oracle stop once their blocks are open, so they are FOCUSED
too. bm25_truncate takes exactly L. `Context.slots` is what the tests count.

bm25 and bm25_truncate need the tokenizer (`tok`), oracle the answer's token spans (`needed_spans`); they are
not in METHODS (the default list) but in ALL_METHODS, so that a caller asks for them knowingly.

A Context is read by `greedy_decode` (exact-match tasks) or `continuation_nll` (long-document loss);
tokens read after a context continue its positions (slot index, or the absolute token index under
the gaussian scheme, where raw tokens have exact RoPE).
"""
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from nanochat.common import autocast_ctx
from megacontext.eval import bm25 as rag
from megacontext.gistnet import GistLevels, at_children_scale, build_gists
from megacontext.focus import question_focus
from megacontext.positions import wc_positions
from megacontext.working_context import (all_raw, entry_spans, recency_pyramid, wc_cost, wc_slot_embeddings)

METHODS = ("truncation", "sinks", "mean_pool", "mc_recency", "mc_lensnet", "megacontext", "megacontext_gaussian",
           "full")
RAG_METHODS = ("bm25", "bm25_truncate")  # need the tokenizer
CEILINGS = ("oracle",)  # needs the answer's spans
ALL_METHODS = METHODS + RAG_METHODS + CEILINGS
# need the MC nets (bm25 and oracle: GistNet's tree, for the gists around their raw blocks)
MC_METHODS = ("mc_recency", "mc_lensnet", "megacontext", "megacontext_gaussian", "bm25", "oracle")
# at most L slots, not exactly L: question_focus stops near its block, bm25 and oracle once their blocks are open
FOCUSED = ("mc_lensnet", "megacontext", "megacontext_gaussian", "bm25", "oracle")
SINKS = 4  # attention-sink tokens kept from the start (StreamingLLM keeps 4)


class Models(NamedTuple):
    """What the evaluation reads: the nets (None where a checkpoint has no MC weights), tokenizer and config."""
    gpt: object
    gistnet: object
    lensnet: object
    tok: object
    cfg: object
    reranker: object = None


@dataclass
class Context:
    embeds: torch.Tensor          # (T, d) GPT input embeddings
    pos: torch.Tensor             # (T,) float32 RoPE positions
    sigma: torch.Tensor = None    # (T,) float32 gaussian widths, None for slot positions
    next_pos: float = 0.0         # position of the first token read after the context
    wc: object = None             # the WorkingContext, for WC-based methods
    shown: object = None          # (T,) history positions of the tokens read, for raw contexts that skip some

    @property
    def slots(self):
        return int(self.embeds.size(0))


def shared_length(num_tokens, budget, cfg):
    """L: the GPT input slots every budgeted method uses for a history of num_tokens."""
    if num_tokens <= budget:
        return num_tokens
    return wc_cost(recency_pyramid(num_tokens, budget, cfg), cfg.block_size)


# -----------------------------------------------------------------------------
# raw-token baselines

def _raw(ids, wte, device):
    ids = torch.as_tensor(ids, dtype=torch.long, device=device)
    return wte(ids)


def raw_context(ids, wte):
    """All tokens raw at positions 0..n-1 (the `full` method, and the raw baselines' building block)."""
    w = wte.weight
    x = _raw(ids, wte, w.device)
    return Context(x, torch.arange(x.size(0), dtype=torch.float32, device=w.device), None, float(x.size(0)))


def truncation(ids, length, wte):
    """The newest `length` tokens, positions 0..length-1 (RoPE is relative: the offset does not matter)."""
    return raw_context(list(ids)[len(ids) - length:], wte)


def sink_window(ids, length, wte, sinks=SINKS):
    """StreamingLLM: the first `sinks` tokens + the newest length - sinks, at consecutive cache positions."""
    ids = list(ids)
    if length >= len(ids):
        return raw_context(ids, wte)
    s = min(sinks, length)
    return raw_context(ids[:s] + ids[len(ids) - (length - s):], wte)


# -----------------------------------------------------------------------------
# working-context baselines

class MeanPool:
    """A stand-in for GistNet: a gist is the mean of its K children (levels > 1: means of means), at their
    scale (an untrained GistNet exactly)."""

    def __init__(self, max_level):
        self.max_level = max_level

    def __call__(self, x, level):
        return at_children_scale(x.mean(dim=1), x)


@torch.no_grad()
def mean_pool_reader(ids, wte, cfg, chunk=1 << 16):
    """A reader (tree protocol) whose gists are mean-pooled token embeddings, built in chunks of tokens."""
    K, w = cfg.block_size, wte.weight
    ids_t = torch.as_tensor(ids, dtype=torch.long, device=w.device)
    n = ids_t.numel() // K * K
    chunk = max(K, chunk // K * K)
    pool = MeanPool(cfg.max_level)
    l1 = [pool(wte(ids_t[a:min(a + chunk, n)]).float().view(-1, K, w.size(1)), 1) for a in range(0, n, chunk)]
    l1 = torch.cat(l1) if l1 else torch.zeros(0, w.size(1), device=w.device)
    levels = [None, l1] + build_gists(MeanPool(cfg.max_level), l1, cfg, max_level=cfg.max_level - 1)[1:]
    return GistLevels(ids_t, levels)


def wc_context(wc, reader, wte, cfg, scheme):
    """GPT inputs of one working context under `scheme` ("slot" or "gaussian")."""
    x = wc_slot_embeddings(wc, reader, wte, cfg)
    pos, sigma = wc_positions(wc, cfg.block_size, scheme)
    nxt = float(x.size(0)) if scheme == "slot" else float(wc.num_tokens)
    return Context(x, pos.to(x.device), None if sigma is None else sigma.to(x.device), nxt, wc)


def pyramid_or_raw(num_tokens, budget, cfg):
    return all_raw(num_tokens, cfg) if num_tokens <= budget else recency_pyramid(num_tokens, budget, cfg)


def span_is_raw(wc, span, K):
    """True when every token of span [a, b) sits in a raw entry of wc (the needle can be read exactly)."""
    a, b = span
    starts, ends = entry_spans(wc, K)
    touch = (starts < b) & (ends > a)
    return bool((wc.levels[touch] == 0).all())


def shows_span(ctx, span, K):
    """Whether a context reads every token of span [a, b) raw (span_is_raw for a WC); None where unknown."""
    if ctx.wc is not None:
        return span_is_raw(ctx.wc, span, K)
    if ctx.shown is not None:
        a, b = span
        return bool(np.isin(np.arange(a, b), ctx.shown).all())
    return None


def boundary_level(span, K, max_level):
    """
    The coarsest tree boundary the token span [a, b) crosses: 0 inside one K-token block, L when its
    first and last tokens lie in different level-L nodes (K^L tokens each; level 1 = blocks, level 2 =
    regions of K blocks). Such a span is shown raw only with two level-L nodes opened, which a small
    budget may not hold, so the eval reports passkey accuracy by this level.
    """
    a, b = span
    return sum(a // K ** L != (b - 1) // K ** L for L in range(1, max_level + 1))


def _require(m, **given):
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise ValueError(f"method {m!r} needs build_contexts(..., {', '.join(f'{k}=...' for k in missing)})")


@torch.no_grad()
def build_contexts(ids, budget, cfg, gpt, methods=METHODS, gistnet=None, lensnet=None, tree=None, reranker=None,
                   tok=None, needed_spans=None):
    """
    {method: Context or None} for the history `ids` (list of token ids) at `budget`. `tree`: a reader
    over ids with GistNet gists (MCTree.ram), needed by the MegaContext methods, bm25 and oracle; `lensnet` (and
    `reranker`, the second stage) for the focused ones; `tok` (decode) for bm25 and bm25_truncate; `needed_spans`
    (token spans [a, b) the answer needs, e.g. [example.needle_spans[0]]) for oracle. `full` is None when the
    history exceeds the GPT's sequence_len.
    """
    wte = gpt.transformer.wte
    n = len(ids)
    L = shared_length(n, budget, cfg)
    out = {}
    pyramid = focused = retrieved = None
    for m in methods:
        if m == "truncation":
            out[m] = truncation(ids, L, wte)
        elif m == "sinks":
            out[m] = sink_window(ids, L, wte)
        elif m == "full":
            out[m] = raw_context(ids, wte) if n <= gpt.config.sequence_len else None
        elif m == "mean_pool":
            pyramid = pyramid or pyramid_or_raw(n, budget, cfg)
            out[m] = wc_context(pyramid, mean_pool_reader(ids, wte, cfg), wte, cfg, cfg.positions)
        elif m == "mc_recency":
            pyramid = pyramid or pyramid_or_raw(n, budget, cfg)
            out[m] = wc_context(pyramid, tree, wte, cfg, cfg.positions)
        elif m == "mc_lensnet":
            out[m] = wc_context(question_focus(n, budget, cfg, lensnet, tree, wte), tree, wte, cfg, "slot")
        elif m in ("megacontext", "megacontext_gaussian"):
            focused = focused or question_focus(n, budget, cfg, lensnet, tree, wte, reranker)
            out[m] = wc_context(focused, tree, wte, cfg, "slot" if m == "megacontext" else "gaussian")
        elif m in RAG_METHODS:
            _require(m, tok=tok, **({"tree": tree} if m == "bm25" else {}))
            retrieved = retrieved or rag.retrieve(ids, tok, cfg)
            scores, groups = retrieved
            if m == "bm25":
                out[m] = wc_context(rag.open_plan(n, budget, cfg, groups, scores), tree, wte, cfg, "slot")
            else:
                shown = rag.rag_tokens(n, L, cfg, groups)
                out[m] = raw_context([ids[i] for i in shown.tolist()], wte)
                out[m].shown = shown
        elif m == "oracle":
            _require(m, needed_spans=needed_spans, tree=tree)
            out[m] = wc_context(rag.open_needed(n, budget, cfg, needed_spans), tree, wte, cfg, "slot")
        else:
            raise ValueError(f"unknown method {m!r}; known: {ALL_METHODS}")
    return out


# -----------------------------------------------------------------------------
# reading a context: greedy decoding and continuation loss

def _forward(gpt, embeds, pos, sigma, kv=None):
    device = gpt.get_device()
    with autocast_ctx(device.type):
        h = gpt(inputs_embeds=embeds[None], pos=pos[None], pos_sigma=None if sigma is None else sigma[None],
                kv_cache=kv, return_hidden=True)
    return h[0]


def _head(gpt, h):
    """fp32 logits of hidden states (inside autocast, like the forward: bf16 hidden states on CUDA)."""
    with autocast_ctx(gpt.get_device().type):
        return gpt.head(h).float()


@torch.no_grad()
def greedy_decode(gpt, ctx, n_new):
    """The n_new greedy tokens (list of ids) after a context, with a KV cache."""
    device = gpt.get_device()
    kv = gpt.new_kv_cache(1, seq_len=ctx.slots + n_new + 1)
    h = _forward(gpt, ctx.embeds, ctx.pos, ctx.sigma, kv)
    tok = int(_head(gpt, h[-1:]).argmax(-1))
    out = [tok]
    wte = gpt.transformer.wte
    for i in range(1, n_new):
        # a raw token after the context: the next position, exact RoPE (sigma None = 0)
        pos = torch.tensor([ctx.next_pos + i - 1], dtype=torch.float32, device=device)
        h = _forward(gpt, wte(torch.tensor([tok], device=device)), pos, None, kv)
        tok = int(_head(gpt, h[-1:]).argmax(-1))
        out.append(tok)
    return out


@torch.no_grad()
def continuation_nll(gpt, ctx, target):
    """(sum of NLL in nats, count) of the token ids `target` read raw after the context."""
    device = gpt.get_device()
    target = torch.as_tensor(target, dtype=torch.long, device=device)
    m = target.numel()
    x = torch.cat([ctx.embeds, gpt.transformer.wte(target[:-1]).to(ctx.embeds.dtype)])
    pos = torch.cat([ctx.pos, ctx.next_pos + torch.arange(m - 1, dtype=torch.float32, device=device)])
    sigma = None if ctx.sigma is None else torch.cat([ctx.sigma, torch.zeros(m - 1, device=device)])
    h = _forward(gpt, x, pos, sigma)
    logits = _head(gpt, h[ctx.slots - 1:])
    return float(F.cross_entropy(logits, target, reduction="sum")), m


def answer_matches(text, answer):
    """
    Exact match of a generated continuation against the answer: the first whitespace-delimited run of
    digits must equal the answer's digits exactly (near misses - one digit off, a digit missing or
    extra - are wrong). Non-numeric answers: the stripped text must start with the stripped answer,
    followed by a non-alphanumeric character or the end.
    """
    want = answer.strip()
    got = text.lstrip()
    if want.isdigit():
        run = 0
        while run < len(got) and got[run].isdigit():
            run += 1
        return run > 0 and got[:run] == want
    if not got.startswith(want):
        return False
    rest = got[len(want):]
    return not rest or not rest[0].isalnum()


__all__ = ["Models", "METHODS", "RAG_METHODS", "CEILINGS", "ALL_METHODS", "MC_METHODS", "FOCUSED", "SINKS", "Context",
           "shared_length", "raw_context", "truncation", "sink_window", "MeanPool", "mean_pool_reader", "wc_context",
           "pyramid_or_raw", "span_is_raw", "shows_span", "build_contexts", "greedy_decode", "continuation_nll",
           "answer_matches"]
