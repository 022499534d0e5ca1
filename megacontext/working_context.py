"""
The working context (WC): the fixed-budget view of the whole history that the GPT actually reads.

A WC is an ordered list of entries `(level, index)` stored as two int64 numpy arrays (no Python
object per entry, so every operation here is vectorised or linear in the number of entries):
- level >= 1: the tree node covering tokens [index * K^level, (index + 1) * K^level), one gist row;
- level 0: raw block `index` = tokens [index * K, min(index * K + K, N)), one slot per token
  (the last block may be a partial raw tail).
Cost: a raw block costs its token count (K when full), a gist costs 1.

Invariants (`check_invariants`, run at every edit when MC_DEBUG=1): the entries tile [0, N)
contiguously from token 0, gists are complete nodes no higher than max_level, the protected raw tail
(the newest `tail_tokens` plus the partial block) is raw, and cost <= budget.

`materialize` turns a batch of WCs into GPT input embeddings plus position data (see positions.py);
`forward_wc` runs the real GPT on them.
"""
import os
from dataclasses import dataclass

import numpy as np
import torch

from nanochat.common import UserError
from megacontext.positions import wc_positions

# MC_DEBUG=1 checks every invariant after every edit/append (tests and debugging; costs O(W) each)
DEBUG = os.environ.get("MC_DEBUG", "0") == "1"


class WCError(ValueError):
    """An illegal edit or a broken working-context invariant (a bug in the caller, not the user)."""


class BudgetError(UserError, ValueError):
    """The budget (or max_level) is too small for the history: the user must change a flag."""


@dataclass(frozen=True, eq=False)
class WorkingContext:
    levels: np.ndarray   # (W,) int64
    indices: np.ndarray  # (W,) int64
    num_tokens: int      # N: the history length the entries tile

    def __post_init__(self):
        lv = np.ascontiguousarray(self.levels, dtype=np.int64).reshape(-1)
        ix = np.ascontiguousarray(self.indices, dtype=np.int64).reshape(-1)
        if lv.shape != ix.shape:
            raise WCError(f"levels {lv.shape} and indices {ix.shape} must have the same length")
        object.__setattr__(self, "levels", lv)
        object.__setattr__(self, "indices", ix)
        object.__setattr__(self, "num_tokens", int(self.num_tokens))

    def __len__(self):
        return len(self.levels)

    def __eq__(self, other):
        return (isinstance(other, WorkingContext) and self.num_tokens == other.num_tokens
                and np.array_equal(self.levels, other.levels) and np.array_equal(self.indices, other.indices))

    def entries(self):
        """[(level, index), ...] as Python ints (for tests and printing, not the hot path)."""
        return list(zip(self.levels.tolist(), self.indices.tolist()))

    def level_counts(self):
        lv, n = np.unique(self.levels, return_counts=True)
        return {int(a): int(b) for a, b in zip(lv, n)}

    def __repr__(self):
        return f"WorkingContext(N={self.num_tokens}, W={len(self)}, levels={self.level_counts()})"


# -----------------------------------------------------------------------------
# arithmetic on spans and costs

def node_size(level, K):
    """Tokens covered by one entry of `level` (a raw block spans K tokens, like a level-1 gist)."""
    return np.power(np.int64(K), np.maximum(np.asarray(level, dtype=np.int64), 1))


def entry_spans(wc, K):
    """Token spans [starts, ends) of every entry, (W,) int64 each."""
    starts = wc.indices * node_size(wc.levels, K)
    ends = np.where(wc.levels == 0, np.minimum(starts + K, wc.num_tokens), starts + node_size(wc.levels, K))
    return starts, ends


def entry_costs(wc, K):
    starts, ends = entry_spans(wc, K)
    return np.where(wc.levels == 0, ends - starts, 1)


def wc_cost(wc, K):
    return int(entry_costs(wc, K).sum())


def swap_share(wc, ref):
    """Share of wc's entries (level, index) that ref does not hold: how much detail a focus moved away
    from ref (0: the same WC; training logs it against the recency pyramid as mc/swap_rate)."""
    if wc.num_tokens != ref.num_tokens:
        raise WCError(f"cannot compare WCs over {wc.num_tokens} and {ref.num_tokens} tokens")
    have = set(zip(ref.levels.tolist(), ref.indices.tolist()))
    return sum((L, i) not in have for L, i in zip(wc.levels.tolist(), wc.indices.tolist())) / len(wc)


def tail_start(num_tokens, cfg):
    """First token of the protected raw tail: the newest tail_tokens complete tokens + the partial block."""
    K = cfg.block_size
    return max(0, (num_tokens // K) * K - cfg.tail_tokens)


def raw_tail_cost(num_tokens, cfg):
    return num_tokens - tail_start(num_tokens, cfg)


def _coarsest_counts(end, max_level, K):
    """Number of gists per level (dict) in the coarsest aligned tiling of [0, end), end % K == 0."""
    counts, pos = {}, 0
    for L in range(max_level, 0, -1):
        unit = K ** L
        n = (end - pos) // unit
        counts[L] = n
        pos += n * unit
    assert pos == end, "coarsest tiling needs a block-aligned end"
    return counts


def min_cost(num_tokens, cfg, max_level=None):
    """The cheapest legal WC: coarsest tiling of everything before the tail + the raw tail."""
    ts = tail_start(num_tokens, cfg)
    counts = _coarsest_counts(ts, max_level or cfg.max_level, cfg.block_size)
    return sum(counts.values()) + num_tokens - ts


def coarsest_tiling(end, max_level, K):
    """(levels, indices) of the coarsest aligned gist tiling of [0, end): big nodes first."""
    levels, indices, pos = [], [], 0
    for L, n in _coarsest_counts(end, max_level, K).items():
        unit = K ** L
        levels.append(np.full(n, L, dtype=np.int64))
        indices.append(pos // unit + np.arange(n, dtype=np.int64))
        pos += n * unit
    if not levels:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(levels), np.concatenate(indices)


def check_budget_fits(num_tokens, budget, cfg):
    """Clear errors when no legal WC of `num_tokens` fits `budget` (raw tail, then coarsest tiling)."""
    tail = raw_tail_cost(num_tokens, cfg)
    if budget < tail:
        raise BudgetError(f"budget {budget} is smaller than the protected raw tail ({tail} tokens: "
                          f"tail_tokens={cfg.tail_tokens} plus the partial block); raise --mc-budget to "
                          f">= {tail} or lower --mc-tail-tokens")
    need = min_cost(num_tokens, cfg)
    if need > budget:
        fit = next((m for m in range(cfg.max_level + 1, 13) if min_cost(num_tokens, cfg, m) <= budget), None)
        hint = f" or --mc-max-level to >= {fit}" if fit else ""
        raise BudgetError(f"a history of {num_tokens} tokens needs a budget of at least {need} "
                          f"(coarsest tiling at max_level={cfg.max_level} + {tail} raw tail tokens), "
                          f"got {budget}: raise --mc-budget to >= {need}{hint}")


# -----------------------------------------------------------------------------
# construction

def all_raw(num_tokens, cfg):
    """Every token raw: the WC of a short history (cost = num_tokens)."""
    nb = -(-num_tokens // cfg.block_size)
    return WorkingContext(np.zeros(nb, np.int64), np.arange(nb, dtype=np.int64), num_tokens)


def coarsest_wc(num_tokens, cfg, max_level=None):
    """The cheapest legal WC: the coarsest aligned tiling (levels <= max_level) + the raw tail."""
    K = cfg.block_size
    ts = tail_start(num_tokens, cfg)
    lv, ix = coarsest_tiling(ts, max_level or cfg.max_level, K)
    nb = -(-num_tokens // K)
    return WorkingContext(np.concatenate([lv, np.zeros(nb - ts // K, np.int64)]),
                          np.concatenate([ix, np.arange(ts // K, nb, dtype=np.int64)]), num_tokens)


def recency_pyramid(num_tokens, budget, cfg):
    """
    The initial WC for any history length: the raw tail, the coarsest aligned tiling of everything
    before it (never drops history), then refinement while the budget allows, always expanding the
    gist that is coarsest relative to its age (span / distance to the present, ties -> newest), so
    detail falls off with age. Every expansion costs K - 1 (a gist becomes K children, a level-1
    gist a full raw block), so the number of refinements is known up front.
    """
    K = cfg.block_size
    check_budget_fits(num_tokens, budget, cfg)
    ts = tail_start(num_tokens, cfg)
    levels, indices = coarsest_tiling(ts, cfg.max_level, K)
    nb = -(-num_tokens // K)
    levels = np.concatenate([levels, np.zeros(nb - ts // K, np.int64)])
    indices = np.concatenate([indices, np.arange(ts // K, nb, dtype=np.int64)])
    cost = int((levels >= 1).sum()) + num_tokens - ts
    while cost + K - 1 <= budget:
        gist = np.flatnonzero(levels >= 1)
        if len(gist) == 0:
            break
        lv = levels[gist]
        start = indices[gist] * node_size(lv, K)
        prio = node_size(lv, K).astype(np.float64) / (num_tokens - start)
        j = gist[len(gist) - 1 - np.argmax(prio[::-1])]  # max priority, the newest among ties
        L, i = int(levels[j]), int(indices[j])
        child_lv = np.full(1 if L == 1 else K, L - 1, np.int64)
        child_ix = np.array([i]) if L == 1 else i * K + np.arange(K, dtype=np.int64)
        levels = np.concatenate([levels[:j], child_lv, levels[j + 1:]])
        indices = np.concatenate([indices[:j], child_ix, indices[j + 1:]])
        cost += K - 1
    wc = WorkingContext(levels, indices, num_tokens)
    if DEBUG:
        check_invariants(wc, cfg, budget)
    return wc


def append_tokens(wc, new_num_tokens, cfg):
    """
    The WC after the history grew to `new_num_tokens`: the partial last block grows (its span is
    arithmetic) and new tokens arrive as raw blocks, so the new tail is raw. The cost may now exceed
    the budget; the allocator's next pass collapses the lowest-scored legal groups back under it.
    """
    K, old = cfg.block_size, wc.num_tokens
    if new_num_tokens < old:
        raise WCError(f"append_tokens cannot shrink the history ({old} -> {new_num_tokens} tokens)")
    nb_old, nb_new = -(-old // K), -(-new_num_tokens // K)
    new = np.arange(nb_old, nb_new, dtype=np.int64)
    out = WorkingContext(np.concatenate([wc.levels, np.zeros(len(new), np.int64)]),
                         np.concatenate([wc.indices, new]), new_num_tokens)
    if DEBUG:
        check_invariants(out, cfg)
    return out


# -----------------------------------------------------------------------------
# invariants

def check_invariants(wc, cfg, budget=None):
    """Raise WCError naming the first broken invariant; budget=None skips the cost check."""
    K, N = cfg.block_size, wc.num_tokens
    lv, ix = wc.levels, wc.indices

    def bad(msg):
        raise WCError(f"working-context invariant broken: {msg} ({wc!r})")

    if N < 0:
        bad("negative num_tokens")
    if len(wc) == 0:
        if N:
            bad("no entries but a non-empty history")
        return
    if lv.min() < 0 or lv.max() > cfg.max_level:
        bad(f"levels must lie in [0, {cfg.max_level}]")
    if ix.min() < 0:
        bad("negative node index")
    starts, ends = entry_spans(wc, K)
    if starts[0] != 0:
        bad(f"coverage must start at token 0, starts at {starts[0]}")
    gap = np.flatnonzero(starts[1:] != ends[:-1])
    if len(gap):
        j = gap[0]
        bad(f"entries {j} {wc.entries()[j]} and {j + 1} {wc.entries()[j + 1]} are not contiguous")
    if ends[-1] != N:
        bad(f"coverage ends at token {ends[-1]}, history has {N}")
    if (starts >= ends).any() or (ends > N).any():
        bad("an entry covers no tokens or tokens past the history (an incomplete gist)")
    ts = tail_start(N, cfg)
    if ((lv >= 1) & (ends > ts)).any():
        bad(f"a gist covers the protected raw tail [{ts}, {N})")
    if budget is not None:
        cost = wc_cost(wc, K)
        if cost > budget:
            bad(f"cost {cost} exceeds the budget {budget}")


# -----------------------------------------------------------------------------
# materialize: WCs -> GPT inputs

@dataclass
class Materialized:
    embeds: torch.Tensor      # (B, T, d) input embeddings, zero padded on the right
    pos: torch.Tensor         # (B, T) float32 positions for RoPE
    sigma: torch.Tensor       # (B, T) float32 Gaussian widths, or None for the slot scheme
    lengths: torch.Tensor     # (B,) long: valid slots per row
    mask: torch.Tensor        # (B, T) bool: True on valid slots
    slot_spans: list          # per row, (W, 2) int64 numpy: entry j fills slots [a, b)


def _runs(levels):
    """(start, end) of maximal runs of equal level; inside a run, indices are consecutive."""
    cut = np.flatnonzero(np.diff(levels)) + 1
    b = np.concatenate([[0], cut, [len(levels)]])
    return zip(b[:-1].tolist(), b[1:].tolist())


def _embed_device(wte):
    w = getattr(wte, "weight", None)
    return (w.device, w.dtype) if w is not None else (torch.device("cpu"), torch.float32)


def wc_slot_embeddings(wc, reader, wte, cfg):
    """(T, d) slot embeddings of one WC: wte(tokens) for raw blocks, tree rows for gists, in order."""
    K = cfg.block_size
    device, dtype = _embed_device(wte)
    starts, ends = entry_spans(wc, K)
    pieces = []
    for a, b in _runs(wc.levels):
        L = int(wc.levels[a])
        if L == 0:  # a run of raw blocks is one contiguous token range
            ids = reader.tokens(int(starts[a]), int(ends[b - 1])).to(device)
            pieces.append(wte(ids))
        else:
            i0 = int(wc.indices[a])
            pieces.append(reader.gists(L, i0, i0 + (b - a)).to(device=device, dtype=dtype))
    if not pieces:
        raise WCError("cannot materialize an empty working context")
    return torch.cat(pieces, dim=0)


def slot_spans(wc, K):
    """(W, 2) slot ranges of the entries: a raw block fills one slot per token, a gist one slot."""
    starts, ends = entry_spans(wc, K)
    n = np.where(wc.levels == 0, ends - starts, 1)
    e = np.cumsum(n)
    return np.stack([e - n, e], axis=1)


def materialize(wcs, readers, wte, cfg, scheme=None):
    """
    Batch many WCs into GPT inputs. `readers`: one reader for all rows or one per row (reader
    protocol: tokens(a, b), gists(level, a, b)); `wte`: the GPT's token embedding (nn.Embedding);
    `scheme`: "slot" or "gaussian" (default cfg.positions). Rows of unequal length are right-padded
    with zeros; under causal attention the valid slots never see the padding.
    """
    if isinstance(wcs, WorkingContext):
        wcs = [wcs]
    if not isinstance(readers, (list, tuple)):
        readers = [readers] * len(wcs)
    if len(readers) != len(wcs):
        raise WCError(f"{len(wcs)} working contexts but {len(readers)} readers")
    scheme = scheme or cfg.positions
    rows = [wc_slot_embeddings(wc, r, wte, cfg) for wc, r in zip(wcs, readers)]
    posdata = [wc_positions(wc, cfg.block_size, scheme) for wc in wcs]
    lengths = [x.size(0) for x in rows]
    B, T, d = len(rows), max(lengths), rows[0].size(1)
    device = rows[0].device
    if all(n == T for n in lengths):  # the common case in training: no padding, no copies of masks
        embeds = torch.stack(rows)
    else:
        embeds = torch.cat([torch.cat([x, x.new_zeros(T - x.size(0), d)])[None] for x in rows])
    pos = torch.zeros(B, T, dtype=torch.float32)
    sigma = torch.zeros(B, T, dtype=torch.float32) if scheme == "gaussian" else None
    mask = torch.zeros(B, T, dtype=torch.bool)
    for r, (p, s) in enumerate(posdata):
        n = lengths[r]
        pos[r, :n] = p
        mask[r, :n] = True
        if sigma is not None:
            sigma[r, :n] = s
    return Materialized(embeds, pos.to(device), None if sigma is None else sigma.to(device),
                        torch.tensor(lengths, device=device), mask.to(device),
                        [slot_spans(wc, cfg.block_size) for wc in wcs])


def entry_embeddings(wc, reader, wte, cfg):
    """(W, d) one vector per entry: the mean token embedding of a raw block, the row of a gist."""
    x = wc_slot_embeddings(wc, reader, wte, cfg)
    spans = slot_spans(wc, cfg.block_size)
    seg = torch.from_numpy(np.repeat(np.arange(len(wc)), spans[:, 1] - spans[:, 0])).to(x.device)
    out = x.new_zeros(len(wc), x.size(1)).index_add(0, seg, x)
    counts = torch.from_numpy(spans[:, 1] - spans[:, 0]).to(x.device, x.dtype)
    return out / counts[:, None]


def forward_wc(gpt, mat, targets=None, **kwargs):
    """The GPT on materialized WCs (the input-embedding path of nanochat.gpt.GPT.forward)."""
    return gpt(inputs_embeds=mat.embeds, pos=mat.pos, pos_sigma=mat.sigma, targets=targets, **kwargs)
