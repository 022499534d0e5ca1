"""
The focus allocator: turns LensNet's signed scores into a few legal edits of the working context
(docs/architecture.md). It is the pure last step of the focus policy (megacontext/focus.py).

- expand (L, i): the gist (L, i) becomes its K children (a level-1 gist becomes raw block i);
- collapse (L, p): the K aligned level-(L-1) siblings of node (L, p), or for L = 1 the full raw
  block p, become the node (L, p).
An Edit names the node that is expanded or created, so expand(L, i) followed by collapse(L, i)
restores the entries exactly. Every expand costs K - 1 and every collapse saves K - 1.

One pass (`plan_edits`, pure):
1. if the WC is over budget (tokens were appended), forced collapses of the lowest-scored, then
   oldest, legal groups until the cost fits; groups still in cooldown only when nothing else is
   left (the budget wins over the cooldown), and not capped by max_edits (the budget must hold).
   `pins` (raw blocks, most wanted first: the blocks focus opened for a question) fold only after
   every other group, in cooldown or not, the least wanted pin first.
   With `late_margin` (the runtime passes tau), the groups scored within late_margin of the lowest
   are equally good and the newest of them folds first: the GPT's K/V are recomputed from the first
   edited slot on (megacontext/kvcache.py), so a fold next to the present costs a few dozen slots
   where the oldest costs the whole window.
   A pass that had to collapse stops there.
2. otherwise up to max_edits voluntary edits, strongest |score| first: expand a gist whose score
   > tau, collapse a sibling group whose mean score < -tau; an expansion must fit the budget, paid
   for if need be by collapses chosen in the same pass (collapses are listed first, so no
   intermediate state exceeds the budget); each entry takes part in at most one edit per pass; an
   edit that would undo one of the last `cooldown` passes is skipped. A pinned block is never
   collapsed voluntarily, and where `expandable` (a mask over the entries) is given, only the gists
   it marks may expand.
Chained passes (rescoring in between) let a level-2 gist reach raw tokens: L2 -> L1 -> L0.
"""
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from megacontext.working_context import (DEBUG, WCError, WorkingContext, check_budget_fits, check_invariants,
                                         entry_spans, tail_start, wc_cost)


class Edit(NamedTuple):
    op: str      # "expand" or "collapse"
    level: int   # the node expanded, or the parent node a collapse creates
    index: int


@dataclass(frozen=True)
class CooldownState:
    pass_idx: int = 0      # the number of the next pass
    history: tuple = ()    # ((op, level, index, pass_idx), ...) edits still inside the cooldown window


REVERSES = {"expand": "collapse", "collapse": "expand"}


def _node_keys(levels, indices):
    return np.asarray(indices, dtype=np.int64) * 64 + np.asarray(levels, dtype=np.int64)


def blocked_nodes(state, op, levels, indices, cooldown):
    """bool mask: doing `op` on nodes (levels, indices) would reverse an edit of the last `cooldown` passes."""
    keys = [int(_node_keys(l, i)) for o, l, i, p in state.history
            if o == REVERSES[op] and state.pass_idx - p <= cooldown]
    if not keys:
        return np.zeros(len(levels), dtype=bool)
    return np.isin(_node_keys(levels, indices), np.array(keys, dtype=np.int64))


def next_cooldown_state(state, edits, cooldown):
    t = state.pass_idx
    kept = tuple(h for h in state.history if t + 1 - h[3] <= cooldown)
    return CooldownState(t + 1, kept + tuple((e.op, int(e.level), int(e.index), t) for e in edits))


def _children(level, index, K):
    if level == 1:
        return np.zeros(1, np.int64), np.array([index], np.int64)
    return np.full(K, level - 1, np.int64), index * K + np.arange(K, dtype=np.int64)


def collapse_groups(wc, cfg, scores=None):
    """
    Every legal collapse group of `wc`, vectorised: dict of arrays `pos` (first entry), `n` (entries),
    `level`/`index` (the parent created), `start` (first token) and `score` (mean entry score).
    Legal: a full raw block, or K same-level aligned siblings, whose parent is at most max_level
    and ends before the protected raw tail.
    """
    K, lv, ix = cfg.block_size, wc.levels, wc.indices
    W = len(lv)
    starts, ends = entry_spans(wc, K)
    ts = tail_start(wc.num_tokens, cfg)
    raw = np.flatnonzero((lv == 0) & (ends - starts == K) & (ends <= ts))
    # the last entry of each entry's equal-level run (inside a run, indices are consecutive)
    change = np.flatnonzero(np.diff(lv))
    run_last = np.append(change, W - 1)[np.searchsorted(change, np.arange(W))]
    parent_end = (ix // K + 1) * np.power(np.int64(K), lv + 1)
    sib = np.flatnonzero((lv >= 1) & (lv < cfg.max_level) & (ix % K == 0)
                         & (run_last >= np.arange(W) + K - 1) & (parent_end <= ts))
    pos = np.concatenate([raw, sib])
    n = np.concatenate([np.ones(len(raw), np.int64), np.full(len(sib), K, np.int64)])
    g = {"pos": pos, "n": n,
         "level": np.concatenate([np.ones(len(raw), np.int64), lv[sib] + 1]),
         "index": np.concatenate([ix[raw], ix[sib] // K]),
         "start": starts[pos]}
    if scores is not None:
        cs = np.concatenate([[0.0], np.cumsum(scores)])
        g["score"] = (cs[pos + n] - cs[pos]) / n
    return g


def _splice(wc, scores, picks, K):
    """Apply disjoint edits given by entry position at once (O(W)); new entries inherit the mean score."""
    lv_parts, ix_parts, sc_parts, last = [], [], [], 0
    for pos, n, op, L, i in sorted(picks):
        lv_parts += [wc.levels[last:pos]]
        ix_parts += [wc.indices[last:pos]]
        sc_parts += [scores[last:pos]]
        if op == "collapse":
            nl, ni = np.array([L]), np.array([i])
        else:
            nl, ni = _children(L, i, K)
        lv_parts.append(nl)
        ix_parts.append(ni)
        sc_parts.append(np.full(len(nl), scores[pos:pos + n].mean()))
        last = pos + n
    lv_parts.append(wc.levels[last:])
    ix_parts.append(wc.indices[last:])
    sc_parts.append(scores[last:])
    return (WorkingContext(np.concatenate(lv_parts), np.concatenate(ix_parts), wc.num_tokens),
            np.concatenate(sc_parts))


def _as_scores(wc, scores):
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().float().cpu().numpy()
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or len(scores) != len(wc):
        raise ValueError(f"scores must be a vector with one value per entry: the working context has "
                         f"{len(wc)} entries, got shape {tuple(np.shape(scores))}")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    return scores


def _pin_ranks(g, pins):
    """Each collapse group's rank in `pins` (0 = most wanted), -1 where the group is not a pinned raw block."""
    rank = np.full(len(g["pos"]), -1, np.int64)
    if len(pins):
        pins = np.asarray(pins, dtype=np.int64)
        at = {int(b): r for r, b in enumerate(pins.tolist())}
        for j in np.flatnonzero(g["n"] == 1):  # a one-entry group is a full raw block (level-1 parent)
            rank[j] = at.get(int(g["index"][j]), -1)
    return rank


def _forced_order(g, scores, late, rank, late_margin):
    """The order in which a forced pass folds the collapse groups `g`: unpinned first, then not in cooldown,
    then the lowest score, oldest first (a pin: the least wanted first). With late_margin, inside each
    (pinned, cooldown) class of unpinned groups, those within late_margin of the class's lowest score come
    first, newest first; the rest follow by score, oldest first."""
    pinned = rank >= 0
    key = np.where(pinned, -rank, scores)
    if late_margin is None:
        return np.lexsort((g["start"], key, late, pinned))
    cls = 2 * pinned + late
    lowest = np.full(4, np.inf)
    np.minimum.at(lowest, cls, scores)
    band = ~pinned & (scores <= lowest[cls] + late_margin)
    return np.lexsort((g["start"], np.where(band, -g["start"], key), ~band, late, pinned))


def plan_edits(wc, scores, budget, cooldown_state, cfg, pins=(), expandable=None, late_margin=None):
    """The pure core: (wc, scores, budget, cooldown state, pins, expandable) -> list[Edit] (see the module
    docstring). pins: raw block indices, most wanted first; expandable: None or a bool mask over the entries;
    late_margin: None, or a score margin within which forced collapses prefer the newest group."""
    K, tau = cfg.block_size, cfg.tau
    scores = _as_scores(wc, scores)
    if expandable is not None:
        expandable = np.asarray(expandable, dtype=bool)
        if expandable.shape != (len(wc),):
            raise ValueError(f"expandable must mark each of the {len(wc)} entries, got shape {expandable.shape}")
    state = cooldown_state or CooldownState()
    check_budget_fits(wc.num_tokens, budget, cfg)
    cost = wc_cost(wc, K)
    edits = []
    # 1. forced collapses back under the budget
    if cost > budget:
        sim, sim_scores = wc, scores
        while cost > budget:
            g = collapse_groups(sim, cfg, sim_scores)
            if len(g["pos"]) == 0:
                raise WCError(f"no legal collapse left with cost {cost} > budget {budget}")
            late = blocked_nodes(state, "collapse", g["level"], g["index"], cfg.cooldown)
            need = -(-(cost - budget) // (K - 1))
            # unpinned first, then not in cooldown, then the lowest score (a pin: the least wanted), oldest
            pick = _forced_order(g, g["score"], late, _pin_ranks(g, pins), late_margin)[:need]
            picks = [(int(g["pos"][j]), int(g["n"][j]), "collapse", int(g["level"][j]), int(g["index"][j]))
                     for j in pick]
            edits += [Edit("collapse", p[3], p[4]) for p in picks]
            sim, sim_scores = _splice(sim, sim_scores, picks, K)
            cost -= len(picks) * (K - 1)
        return edits
    # 2. voluntary edits, strongest first
    lv, ix = wc.levels, wc.indices
    ex = np.flatnonzero((lv >= 1) & (scores > tau) & (True if expandable is None else expandable))
    ex = ex[~blocked_nodes(state, "expand", lv[ex], ix[ex], cfg.cooldown)]
    g = collapse_groups(wc, cfg, scores)
    ok = ((g["score"] < -tau) & (_pin_ranks(g, pins) < 0)
          & ~blocked_nodes(state, "collapse", g["level"], g["index"], cfg.cooldown))
    co = np.flatnonzero(ok)
    is_col = np.concatenate([np.zeros(len(ex), bool), np.ones(len(co), bool)])
    strength = np.concatenate([scores[ex], -g["score"][co]])
    order = np.argsort(-strength, kind="stable")
    cols_left = np.cumsum(is_col[order][::-1])[::-1]  # collapses at or after each rank
    used = np.zeros(len(wc), dtype=bool)
    room = (budget - cost) // (K - 1)  # expansions that fit with no collapse
    n_exp = n_col = 0
    for r, c in enumerate(order.tolist()):
        if len(edits) == cfg.max_edits:
            break
        if not is_col[c]:
            j = int(ex[c])
            debt = n_exp + 1 - n_col - room  # collapses still needed for this expansion to fit
            if debt > 0 and (cols_left[r] == 0 or debt > cfg.max_edits - len(edits) - 1):
                if cols_left[r] == 0:
                    break  # nothing later can make room
                continue
            if used[j]:
                continue
            used[j] = True
            n_exp += 1
            edits.append(Edit("expand", int(lv[j]), int(ix[j])))
        else:
            j = int(co[c - len(ex)])
            p, n = int(g["pos"][j]), int(g["n"][j])
            if used[p:p + n].any():
                continue
            used[p:p + n] = True
            n_col += 1
            edits.append(Edit("collapse", int(g["level"][j]), int(g["index"][j])))
    # expansions taken on credit that no later collapse paid for: drop the weakest
    while n_exp - n_col > room:
        k = max(i for i, e in enumerate(edits) if e.op == "expand")
        edits.pop(k)
        n_exp -= 1
    # apply collapses before expansions so that no intermediate state exceeds the budget
    edits = [e for e in edits if e.op == "collapse"] + [e for e in edits if e.op == "expand"]
    return edits


def permutation_invariant(wc, scores, members, budget, cooldown_state, cfg, pins=(), expandable=None,
                          late_margin=None):
    """
    True when plan_edits returns the same edits for every permutation of scores[members] (a sufficient test:
    False means "it might not"). The focus policy's reranker only hands LensNet's shortlist scores out in
    another order (focus.rerank_scores), so where this holds, running it cannot change the pass.
    Over budget: no group the permutation can move (one holding members, unpinned) is picked, and none can
    reach the picks (its lowest possible mean stays above the lowest unmoved score of its class plus
    late_margin, and above every out-of-band pick of its class). Within budget: no member can be a voluntary
    expansion (none expandable, or every member score <= tau), and no group holding members can reach a
    mean below -tau.
    """
    scores = _as_scores(wc, scores)
    members = np.unique(np.asarray(members, dtype=np.int64))
    vals = np.sort(scores[members])
    if len(vals) < 2 or vals[0] == vals[-1]:
        return True
    K, tau = cfg.block_size, cfg.tau
    state = cooldown_state or CooldownState()
    check_budget_fits(wc.num_tokens, budget, cfg)
    cost = wc_cost(wc, K)
    g = collapse_groups(wc, cfg, scores)
    # the range of each group's mean over every permutation: its members take the m lowest or highest values
    inm = np.zeros(len(wc), dtype=bool)
    inm[members] = True
    cm = np.concatenate([[0], np.cumsum(inm)])
    cs = np.concatenate([[0.0], np.cumsum(np.where(inm, 0.0, scores))])
    pos, n = g["pos"], g["n"]
    m = cm[pos + n] - cm[pos]
    fixed = cs[pos + n] - cs[pos]
    lo = (fixed + np.concatenate([[0.0], np.cumsum(vals)])[m]) / n
    rank = _pin_ranks(g, pins)
    moved = (m > 0) & (rank < 0)  # a pin folds by rank, whatever its score
    if cost > budget:
        need = -(-(cost - budget) // (K - 1))
        if not moved.any():
            return True
        if len(pos) < need:
            return False  # chained folds of folds: not analysed
        late = blocked_nodes(state, "collapse", g["level"], g["index"], cfg.cooldown)
        pick = _forced_order(g, g["score"], late, rank, late_margin)[:need]
        if moved[pick].any():
            return False
        cls = 2 * (rank >= 0) + late
        c = cls[pick].max()  # groups of earlier classes are all picked; of later classes, never
        mine = moved & (cls == c)
        if not mine.any():
            return True
        unmoved = (cls == c) & ~moved
        if not unmoved.any():
            return False
        floor = g["score"][unmoved].min()
        if late_margin is None:
            # the picks of class c are its lowest unmoved scores: a moved group must stay above the highest
            return bool((lo[mine] > g["score"][pick[cls[pick] == c]].max()).all())
        top = floor + late_margin  # the band of equally good folds, as it is
        picked = pick[cls[pick] == c]
        out = picked[g["score"][picked] > top]  # picks past the band (by score, oldest first)
        if len(out):  # a moved group must stay out of the band and behind those picks
            return bool((lo[mine] > top).all() and (lo[mine] > g["score"][out].max()).all())
        # every pick of class c is in the band, the newest first. The band's edge moves with the class's lowest
        # score, between min(floor, lowest lo) + late_margin and `top`: the picks stay picked if they stay in the
        # band at its lowest edge, and no other group that is in it at its highest is newer than the oldest pick
        if g["score"][picked].max() > min(floor, lo[mine].min()) + late_margin:
            return False
        rest = np.ones(len(pos), dtype=bool)
        rest[picked] = False
        join = rest & (cls == c) & (np.where(moved, lo, g["score"]) <= top)
        return bool((g["start"][join] < g["start"][picked].min()).all())
    lv, ix = wc.levels, wc.indices
    grow = (lv[members] >= 1) & ~blocked_nodes(state, "expand", lv[members], ix[members], cfg.cooldown)
    if expandable is not None:
        grow &= np.asarray(expandable, dtype=bool)[members]
    if grow.any() and vals[-1] > tau:
        return False
    fold = moved & ~blocked_nodes(state, "collapse", g["level"], g["index"], cfg.cooldown)
    return bool((lo[fold] >= -tau).all())


def _apply_one(wc, e, cfg):
    K = cfg.block_size
    op, L, i = e[0], int(e[1]), int(e[2])
    if op not in REVERSES:
        raise WCError(f"illegal edit {tuple(e)}: op must be 'expand' or 'collapse'")
    if L < 1 or L > cfg.max_level:
        raise WCError(f"illegal edit {tuple(e)}: the node level must be in [1, {cfg.max_level}] "
                      f"(raw blocks cannot be expanded; collapse names the parent gist)")
    starts, _ = entry_spans(wc, K)
    a = i * K ** L
    j = int(np.searchsorted(starts, a))
    if op == "expand":
        if j >= len(wc) or starts[j] != a or wc.levels[j] != L or wc.indices[j] != i:
            raise WCError(f"illegal edit {tuple(e)}: gist ({L}, {i}) is not an entry of the working context")
        nl, ni = _children(L, i, K)
        n = 1
    else:
        ts = tail_start(wc.num_tokens, cfg)
        if a + K ** L > ts:
            raise WCError(f"illegal edit {tuple(e)}: node ({L}, {i}) covers tokens [{a}, {a + K ** L}) "
                          f"but tokens from {ts} on are the protected raw tail (or not there yet)")
        cl, ci = _children(L, i, K)
        n = len(cl)
        if j + n > len(wc) or starts[j] != a or not (np.array_equal(wc.levels[j:j + n], cl)
                                                      and np.array_equal(wc.indices[j:j + n], ci)):
            raise WCError(f"illegal edit {tuple(e)}: the entries at tokens [{a}, {a + K ** L}) are not "
                          f"the {n} level-{L - 1} children of node ({L}, {i})")
        nl, ni = np.array([L]), np.array([i])
    return WorkingContext(np.concatenate([wc.levels[:j], nl, wc.levels[j + n:]]),
                          np.concatenate([wc.indices[:j], ni, wc.indices[j + n:]]), wc.num_tokens)


def apply_edits(wc, edits, cfg, budget=None):
    """Apply edits in order, each checked legal against the WC left by the previous ones (WCError if not)."""
    for e in edits:
        wc = _apply_one(wc, e, cfg)
    if budget is not None and wc_cost(wc, cfg.block_size) > budget:
        raise WCError(f"edits leave the working context at cost {wc_cost(wc, cfg.block_size)} > budget {budget}")
    if DEBUG:
        check_invariants(wc, cfg, budget)
    return wc


def expand(wc, j, cfg):
    """The WC with its entry j (a gist) expanded into its children."""
    return apply_edits(wc, [Edit("expand", int(wc.levels[j]), int(wc.indices[j]))], cfg)


def refocus(wc, scores, budget, cooldown_state, cfg, pins=(), expandable=None, late_margin=None):
    """One allocator pass: (edits, new_wc, new_cooldown_state)."""
    state = cooldown_state or CooldownState()
    edits = plan_edits(wc, scores, budget, state, cfg, pins, expandable, late_margin)
    new_wc = apply_edits(wc, edits, cfg, budget)
    return edits, new_wc, next_cooldown_state(state, edits, cfg.cooldown)
