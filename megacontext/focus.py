"""
The focus policy: what the GPT reads of the whole history, decided in one place (docs/architecture.md).

    LensNet scores every entry of a working context (WC)
      -> shortlist: its best level-1 gists (and the best blocks inside its best level-2 regions)
      -> reranker: reads those blocks raw with the question and reorders the shortlist
      -> allocator: turns the scores into legal expand / collapse edits within the budget

Three entry points, one per moment a WC is chosen:
- `question_focus`: a new message arrived (a question, a document, a chat turn). The WC is rebuilt from
  the start tiling (`start_wc`), the best gist expanded one at a time coarse to fine, until no expansion
  fits; it returns the raw blocks it opened, best first. This is what mc_eval measures and what
  MCSession reads with before it answers.
- `incremental_refocus`: while tokens are appended (the reply), LensNet + reranker + allocator edit the
  WC in place to keep it within budget. The blocks the question focus opened are `pins` (folded last)
  and only gists next to them may expand (`near_kept`): the reply must not lose the answer's block, nor
  open another key's.
- `greedy_focus`: the training objective's LensNet-driven WC variant (the best-scored gists expanded,
  several per pass, no reranker).

`open_blocks` is the oracle: exactly the given blocks opened coarse to fine (the training recipe's needle
WCs and the evaluation's ceiling).
"""
import numpy as np
import torch

from megacontext.allocator import (Edit, apply_edits, collapse_groups, expand, permutation_invariant,
                                   refocus as allocator_refocus)
from megacontext.reranker import candidate_ids, question_len
from megacontext.working_context import all_raw, coarsest_wc, entry_spans, wc_cost


# -----------------------------------------------------------------------------
# where focus starts, and block arithmetic

def start_wc(num_tokens, budget, cfg, room=None):
    """Where focus starts: the finest uniform gist tiling (levels <= L, smallest L) that leaves room for `room`
    (default cfg.focus_start_room) expansions within `budget`, its newest level-L gists then refined one level while the room remains (older
    history stays coarser), else the coarsest WC. Starting at level 1 wherever the budget allows lets LensNet
    shortlist among those blocks at once (the reranker then reads the shortlist raw); longer histories start
    coarser and go coarse to fine. Room for one, not two: a needle's key and its label often lie in two blocks,
    but question_focus folds unwanted groups to open the second, and a start one level finer lets the reranker
    read the whole history's blocks (multi-key at 16x on the runcpu model: 73 -> 90 %;
    dev/LOG.md, 2026-11-22, 'focus that reads inside regions').
    Every start is the coarsest WC plus expansions, so focus ends on the same cost as any other method that
    fills the budget (costs differ by K - 1 steps)."""
    K = cfg.block_size
    room = cfg.focus_start_room if room is None else room
    for L in range(1, cfg.max_level + 1):
        wc = coarsest_wc(num_tokens, cfg, max_level=L)
        if wc_cost(wc, K) + room * (K - 1) <= budget:
            break
    while wc.levels.max(initial=0) >= 2 and wc_cost(wc, K) + (room + 1) * (K - 1) <= budget:
        wc = expand(wc, int(np.flatnonzero(wc.levels == wc.levels.max())[-1]), cfg)
    return wc


def entry_covering(wc, token, K):
    """Index of the WC entry whose span holds token position `token`."""
    starts, _ = entry_spans(wc, K)
    return int(np.searchsorted(starts, token, side="right") - 1)


def covers_any(level, index, blocks, K):
    """Whether gist (level, index) covers one of the raw blocks `blocks` (block indices; negative ones never)."""
    return any(n >= 0 and n // K ** (level - 1) == index for n in blocks)


def leads_next_to(level, index, blocks, K):
    """Whether gist (level, index) covers a block next to one of `blocks` (raw block indices), i.e. whether
    expanding it opens or leads towards where the rest of a needle cut by a block or region edge lies."""
    return covers_any(level, index, [n for b in blocks for n in (b - 1, b + 1)], K)


def near_kept(wc, kept, K):
    """bool mask over wc's entries: the gists that cover a block of `kept` or a block next to one (a kept
    block a forced collapse folded may open again, and so may the rest of a needle cut by a block edge).
    Vectorised (`covers_any` for every entry at once: it runs at every refocus pass of a reply)."""
    near = np.array([n for b in kept for n in (b - 1, b, b + 1) if n >= 0], dtype=np.int64)
    lv = wc.levels
    if len(near) == 0:
        return np.zeros(len(lv), dtype=bool)
    blocks = np.power(np.int64(K), np.maximum(lv - 1, 0))  # raw blocks under one gist of each entry's level
    return (lv >= 1) & (near[None, :] // blocks[:, None] == wc.indices[:, None]).any(1)


def open_blocks(wc, blocks, cfg):
    """The WC with each raw block in `blocks` opened coarse to fine (its covering gists expanded until
    the block is a raw entry): the oracle / "needle expanded" variant."""
    K = cfg.block_size
    for blk in blocks:
        while True:
            j = entry_covering(wc, int(blk) * K, K)
            if wc.levels[j] == 0:
                break
            wc = expand(wc, j, cfg)
    return wc


# -----------------------------------------------------------------------------
# the two stages: LensNet's shortlist, the reranker's pick

def lens_scores(lensnet, wc, reader, wte):
    """LensNet's scores (W,) float64 numpy for one WC (no gradient)."""
    with torch.no_grad():
        return lensnet.score([wc], [reader], wte)[0][0].float().cpu().numpy().astype(np.float64)


def shortlist(scores, wc, k, legal=None):
    """The entries of LensNet's top-k level-1 gists (best first); `legal` masks entries that may not expand."""
    ok = wc.levels == 1 if legal is None else (wc.levels == 1) & legal
    l1 = np.flatnonzero(ok)
    return l1[np.argsort(-np.asarray(scores, dtype=np.float64)[l1], kind="stable")][:k]


@torch.no_grad()
def rerank_scores(scores, wc, reader, reranker, wte, cfg):
    """
    LensNet's scores for wc with its top-k level-1 shortlist reordered by the reranker: the shortlist keeps
    LensNet's set of score values, handed out in the reranker's order (its pick gets the shortlist's best
    score). The allocator's thresholds and every other entry are untouched, so the allocator expands the
    reranker's pick where it would have expanded LensNet's.
    scores: (W,) numpy or tensor; returns a float64 numpy copy. The question is the newest Q tokens.
    """
    out = np.array(scores.float().cpu().numpy() if torch.is_tensor(scores) else scores, dtype=np.float64)
    short = shortlist(out, wc, cfg.rerank_k)
    if reranker is None or cfg.rerank_k < 2 or len(short) < 2:
        return out
    n = wc.num_tokens
    question = reader.tokens(max(0, n - question_len(cfg)), n)
    if question.numel() < question_len(cfg):  # a history shorter than the question (tiny budgets)
        return out
    logits = reranker(candidate_ids(reader, wc, short, question, cfg), wte)
    order = short[torch.argsort(logits.float().cpu(), descending=True, stable=True).numpy()]
    out[order] = out[short]  # short is sorted best first: the reranker's i-th choice gets LensNet's i-th score
    return out


@torch.no_grad()
def focus_pick(wc, scores, reader, lensnet, reranker, wte, cfg):
    """
    The gist one focus pass expands: LensNet's best (`scores`, numpy) when that lies at level >= 3 or there is no
    reranker; else the reranker's choice. It reads, with the question, the raw blocks of LensNet's top-k level-1
    gists and of the top-k level-1 children of each of LensNet's top-k level-2 gists (each region expanded
    tentatively and rescored by LensNet, in one batch), and the pass expands its best block's level-1 gist, or the
    level-2 gist above it. Why look one level down: LensNet scores a region by one gist of 32 blocks and cannot bind
    the question there (several keys are all salient), so coarse to fine opened the wrong region; the reranker can,
    once it reads the blocks (multi-key at 64x on the runcpu model: 30 -> 100 %; dev/LOG.md, 2026-11-22, 'focus that
    reads inside regions'). The reranker scores each candidate alone, so logits compare across regions.
    """
    gist = np.flatnonzero(wc.levels >= 1)
    best = int(gist[np.argmax(scores[gist])])
    k, n, Q = cfg.rerank_k, wc.num_tokens, question_len(cfg)
    if reranker is None or k < 2 or wc.levels[best] > 2 or n < Q:
        return best
    question = reader.tokens(n - Q, n)
    rows, owners = [], []
    l1 = shortlist(scores, wc, k)
    if len(l1):
        rows.append(candidate_ids(reader, wc, l1, question, cfg))
        owners += l1.tolist()
    l2 = np.flatnonzero(wc.levels == 2)
    l2 = l2[np.argsort(-scores[l2], kind="stable")][:k]
    if len(l2):
        tries = [expand(wc, int(j), cfg) for j in l2]
        s2 = lensnet.score(tries, [reader] * len(tries), wte)[0].float().cpu().numpy()
        for t, j, s in zip(tries, l2.tolist(), s2):
            kids = j + np.arange(cfg.block_size)  # the region's children take its place in the WC
            rows.append(candidate_ids(reader, t, kids[np.argsort(-s[kids], kind="stable")][:k], question, cfg))
            owners += [j] * min(k, cfg.block_size)
    if len(owners) < 2:
        return best
    return owners[int(reranker(torch.cat(rows), wte).float().argmax())]


# -----------------------------------------------------------------------------
# the entry points

def question_focus(num_tokens, budget, cfg, lensnet, reader, wte, reranker=None, collapses=None, trace=None):
    """
    Focus for the present (a new question): from `start_wc`, expand the pass's pick (`focus_pick`) and rescore,
    one expansion a pass, until none fits the budget. One at a time because LensNet is trained for its top-1
    (the needle's covering gist at each level): expanding its top-k at once spends the budget on k - 1 guesses
    before the chosen level-2 region's children have been scored.
    When no expansion fits, up to `collapses` (default cfg.focus_collapses) times the legal group of K level-1 gists that LensNet wants least
    (lowest mean score, after the reranker's reordering) folds into its level-2 parent, freeing K - 1 slots for one
    more expansion: a needle's key and label can need a block more than the start left room for (passkey at 16x on
    the runcpu model: 92 -> 100 %; dev/LOG.md, 2026-11-22, 'gists grew 100x past the tokens'). A region focus itself
    opened is never folded: it was opened to find a block in it, which the next pass expands. Where no such group is
    left (past K regions the start is all level-2 gists), K level-2 regions fold into their level-3 parent instead
    (passkey at 256x: the opened region's block was one slot over the budget; dev/LOG.md, 2026-11-22, 'the eval's
    depths fix each needle's alignment').
    Once focus has opened a block, it goes on only towards that block's neighbours (`leads_next_to`: the rest of a
    needle that a block or region edge cuts) and stops at the first pick elsewhere, before folding anything for it,
    so the WC may end below the budget. Spare room spent elsewhere opened other keys' blocks, and the GPT copied a
    wrong colour's key (multi-key at 16x, budget 224: 63-93 % -> 97-100 % on four checkpoints; dev/LOG.md,
    2026-11-23, 'budget 224 with neighbour-only focus'). `trace`: a list that receives the (level, index) of each
    gist focus expands, best first (the level-1 ones are the blocks it opened: the runtime's pins).
    """
    if num_tokens <= budget:
        return all_raw(num_tokens, cfg)
    K = cfg.block_size
    collapses = cfg.focus_collapses if collapses is None else collapses
    wc = start_wc(num_tokens, budget, cfg)
    opened = set()  # level-2 regions this focus expanded
    raw = set()  # blocks this focus opened
    while True:
        gist = np.flatnonzero(wc.levels >= 1)
        room = wc_cost(wc, K) + K - 1 <= budget
        if len(gist) == 0 or (not room and collapses <= 0):  # decided before scoring: no forward wasted
            break
        scores = lens_scores(lensnet, wc, reader, wte)
        j = focus_pick(wc, scores, reader, lensnet, reranker, wte, cfg) if room or raw else None
        if raw and not leads_next_to(int(wc.levels[j]), int(wc.indices[j]), raw, K):
            break
        if room:
            if wc.levels[j] == 1:
                raw.add(int(wc.indices[j]))
            if wc.levels[j] == 2:
                opened.add(int(wc.indices[j]))
            if trace is not None:
                trace.append((int(wc.levels[j]), int(wc.indices[j])))
            wc = expand(wc, j, cfg)
            continue
        scores = rerank_scores(scores, wc, reader, reranker, wte, cfg)
        groups = collapse_groups(wc, cfg, scores)
        # K level-1 siblings (never one holding a raw block), not a region focus opened; where there are
        # none, K level-2 siblings (never one focus opened: that is level-1 gists now) into level 3
        fold = np.flatnonzero((groups["level"] == 2) & ~np.isin(groups["index"], list(opened)))
        if len(fold) == 0:
            fold = np.flatnonzero(groups["level"] == 3)
        if len(fold) == 0:
            break
        k = fold[np.argmin(groups["score"][fold])]
        wc = apply_edits(wc, [Edit("collapse", int(groups["level"][k]), int(groups["index"][k]))], cfg)
        collapses -= 1
    return wc


def carry_scores(old, scores, new, K):
    """Scores for the entries of `new` from those of `old` (the same history, edited): an entry both hold keeps its
    score; a gist a collapse created gets the mean of the entries it folded (allocator._splice's rule); an entry an
    expansion created, the score of the gist it came from."""
    so, _ = entry_spans(old, K)
    sn, en = entry_spans(new, K)
    lo = np.searchsorted(so, sn, side="left")
    hi = np.searchsorted(so, en, side="left")
    cs = np.concatenate([[0.0], np.cumsum(scores)])
    cover = np.searchsorted(so, sn, side="right") - 1
    n = hi - lo
    return np.where(n > 0, (cs[hi] - cs[lo]) / np.maximum(n, 1), np.asarray(scores)[cover])


@torch.no_grad()
def incremental_refocus(wc, reader, lensnet, reranker, wte, cfg, cooldown, kept=(), stats=None):
    """
    Up to cfg.refocus_passes chained allocator passes over LensNet's scores (the reranker reordering its level-1
    shortlist), rescoring in between so that a level-2 gist can reach raw tokens. With `kept` (the raw blocks
    the last question focus opened, best first):
    - they are the allocator's pins: a forced collapse folds them after every other group, the least wanted
      first, and no voluntary collapse picks them. Without that, the reply's first token pushed a full WC
      over budget and the allocator folded the block holding the answer (passkey at 4x through the runtime:
      87 % against 100 %; dev/LOG.md, 2026-11-22, 'the eval's depths fix each needle's alignment');
    - only the gists next to them may expand (`near_kept`): focus's own neighbour-only rule, carried through
      the reply. LensNet scores every labelled key alike, and a refocus during the answer spent the room
      focus left on another key's block (multi-key at 16x through the runtime: 28 of 30 right, 29 with the
      rule; dev/LOG.md, 2026-11-23, 'the reply opens blocks only next to focus's').
    What a refocus costs, and the three rules that keep it small (deterministic; measured by scripts/mc_bench.py):
    - forced collapses fold the newest of the groups scored within tau of the lowest (allocator `late_margin`):
      the GPT's K/V are recomputed from the first edited slot on, and the common refocus (the fold after each
      completed block) then lands next to the raw tail, not anywhere in the window;
    - LensNet is run again only after a pass that expanded (its new entries need scores); after a pass that
      only collapsed, the next pass reads the same scores carried over (`carry_scores`: a folded group scores
      its mean), so a refocus costs one LensNet forward, not one per pass;
    - the reranker runs only where its reordering could change the pass (`allocator.permutation_invariant`:
      exact, the pass is the same either way).
    stats: an optional dict that counts "lens", "rerank" and "rerank_skipped". Returns (edits, wc, cooldown).
    """
    K = cfg.block_size
    edits = []
    raw = None  # LensNet's scores of wc (fresh, or carried over a collapse-only pass)
    count = stats if stats is not None else {}
    for _ in range(cfg.refocus_passes):
        if raw is None:
            raw = lens_scores(lensnet, wc, reader, wte)
            count["lens"] = count.get("lens", 0) + 1
        expandable = near_kept(wc, kept, K) if len(kept) else None
        scores = raw
        short = shortlist(raw, wc, cfg.rerank_k)
        if reranker is not None and cfg.rerank_k >= 2 and len(short) >= 2:
            if permutation_invariant(wc, raw, short, cfg.budget, cooldown, cfg, pins=kept, expandable=expandable,
                                     late_margin=cfg.tau):
                count["rerank_skipped"] = count.get("rerank_skipped", 0) + 1
            else:
                scores = rerank_scores(raw, wc, reader, reranker, wte, cfg)
                count["rerank"] = count.get("rerank", 0) + 1
        e, new, cooldown = allocator_refocus(wc, scores, cfg.budget, cooldown, cfg, pins=kept, expandable=expandable,
                                             late_margin=cfg.tau)
        edits += e
        if not e:
            break
        raw = None if any(x.op == "expand" for x in e) else carry_scores(wc, raw, new, K)
        wc = new
    return edits, wc, cooldown


def greedy_focus(base, budget, cfg, score_fn, max_passes=8):
    """The training objective's LensNet-driven WC: from `base`, repeatedly expand the best-scored gists that fit
    the budget (up to max_edits per pass, rescoring in between, so a level-2 gist can reach raw tokens)."""
    K = cfg.block_size
    wc = base
    for _ in range(max_passes):
        room = (budget - wc_cost(wc, K)) // (K - 1)
        gist = np.flatnonzero(wc.levels >= 1)
        if room < 1 or len(gist) == 0:
            break
        scores = np.asarray(score_fn(wc), dtype=np.float64)
        best = gist[np.argsort(-scores[gist], kind="stable")][:min(room, cfg.max_edits)]
        wc = apply_edits(wc, [Edit("expand", int(wc.levels[j]), int(wc.indices[j])) for j in best], cfg)
    return wc
