"""
The retrieval recipe (DESIGN.md section 8; dev/LOG.md 2026-11-21, prototypes v1-v3), for long-context
rows whose answer blocks are known (tasks/longctx.py key_spans, tasks/mc_mixture.py): after a short all-raw
copy warm-up, the GPT and GistNet learn on gisted histories with the needle's blocks opened coarse to
fine (`open_blocks`), with an answer-weighted loss; LensNet learns listwise over ALL entries with coarse /
fine / redirect / start / continue targets (`lens_curriculum`) and its loss trains GistNet; the reranker
learns to pick the needle's block out of LensNet's own level-1 shortlist (`rerank_step`). The needle's
block is the counterfactual best expansion (v2: 100 %), so no counterfactual forwards are spent on these
rows. `start_wc` is where focus starts at inference and `lens_focus` the two-stage focus itself: the one procedure that
scripts/mc_eval.py measures and the runtime (megacontext/runtime.py) reads with.
"""
import numpy as np
import torch
import torch.nn.functional as F

from megacontext.allocator import Edit, apply_edits, collapse_groups
from megacontext.gistnet import build_gists
from megacontext.objective import _as_rng, bow_loss, coarsest_wc, expand, pack, packed_nll, random_mix, wc_part
from megacontext.reranker import candidate_ids, question_len, rerank_loss, rerank_scores, shortlist
from megacontext.telemetry import PhaseTimer
from megacontext.working_context import all_raw, entry_spans, tail_start, wc_cost


def entry_covering(wc, token, K):
    """Index of the WC entry whose span holds token position `token`."""
    starts, _ = entry_spans(wc, K)
    return int(np.searchsorted(starts, token, side="right") - 1)


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


def needle_variant(num_tokens, blocks, budget, cfg, rng, extra=2):
    """Coarsest WC + the needle blocks opened + up to `extra` random expansions that still fit `budget`."""
    K = cfg.block_size
    wc = open_blocks(coarsest_wc(num_tokens, cfg), blocks, cfg)
    for _ in range(int(rng.integers(0, extra + 1))):
        gist = np.flatnonzero(wc.levels >= 1)
        if len(gist) == 0 or wc_cost(wc, K) + K - 1 > budget:
            break
        wc = expand(wc, int(rng.choice(gist)), cfg)
    return wc


def weighted_target_nll(gpt, packed, weights):
    """Weighted mean next-token NLL over labelled slots: weights (R, T) (e.g. answer tokens x5)."""
    losses = packed_nll(gpt, packed)
    w = weights.to(losses.dtype) * (packed.labels != -1)
    return (losses * w).sum() / w.sum().clamp_min(1e-6)


def lens_target_loss(z, legal, target, bce_weight=0.5):
    """LensNet listwise CE over the legal entries of each row with a known best entry `target` (B,)
    (the counterfactual best: for a needle task the entry that holds the needle) + per-entry BCE
    (target entry 1, others 0) so that scores are comparable across passes and levels. z: LensNet
    logits (see lens_loss)."""
    masked = torch.where(legal, z, torch.full_like(z, -1e4))
    ce = F.cross_entropy(masked, target)
    onehot = F.one_hot(target, z.size(1)).to(z.dtype)
    bce = F.binary_cross_entropy_with_logits(2 * z[legal], onehot[legal])
    hit = (masked.argmax(1) == target).float().mean()
    return ce + bce_weight * bce, ce.detach(), hit.detach()


START_ROOM = 1  # expansions focus's start leaves room for (folding makes room for more: lens_focus)


def start_wc(num_tokens, budget, cfg, room=START_ROOM):
    """Where focus starts: the finest uniform gist tiling (levels <= L, smallest L) that leaves room for `room`
    expansions within `budget`, its newest level-L gists then refined one level while the room remains (older
    history stays coarser), else the coarsest WC. Starting at level 1 wherever the budget allows lets LensNet
    shortlist among those blocks at once (the reranker then reads the shortlist raw); longer histories start
    coarser and go coarse to fine. Room for one, not two: a needle's key and its label often lie in two blocks,
    but lens_focus folds unwanted groups to open the second, and a start one level finer lets the reranker read
    the whole history's blocks (multi-key at 16x on the runcpu model: 73 -> 90 %; dev/LOG.md, session 5).
    Every start is the coarsest WC plus expansions, so focus ends on the same cost as any other method that
    fills the budget (costs differ by K - 1 steps)."""
    K = cfg.block_size
    for L in range(1, cfg.max_level + 1):
        wc = coarsest_wc(num_tokens, cfg, max_level=L)
        if wc_cost(wc, K) + room * (K - 1) <= budget:
            break
    while wc.levels.max(initial=0) >= 2 and wc_cost(wc, K) + (room + 1) * (K - 1) <= budget:
        wc = expand(wc, int(np.flatnonzero(wc.levels == wc.levels.max())[-1]), cfg)
    return wc


@torch.no_grad()
def focus_pick(wc, scores, reader, lensnet, reranker, wte, cfg):
    """
    The gist one focus pass expands: LensNet's best (`scores`, numpy) when that lies at level >= 3 or there is
    no reranker; else the reranker's choice. It reads, with the question, the raw blocks of LensNet's top-k
    level-1 gists and of the top-k level-1 children of each of LensNet's top-k level-2 gists (each region
    expanded tentatively and rescored by LensNet, in one batch), and the pass expands its best block's level-1
    gist, or the level-2 gist above it. Why look one level down: LensNet scores a region by one gist of 32
    blocks and cannot bind the question there (several keys are all salient), so coarse to fine opened the
    wrong region; the reranker can, once it reads the blocks (multi-key at 64x on the runcpu model: 30 ->
    100 %; dev/LOG.md, session 5). The reranker scores each candidate alone, so logits compare across regions.
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


MAX_COLLAPSES = 3  # groups of level-1 gists focus may fold into their level-2 parent to make room (a needle
# across two regions at 64x, budget 224, needed the third: dev/LOG.md, session 9)


def covers_any(level, index, blocks, K):
    """Whether gist (level, index) covers one of the raw blocks `blocks` (block indices; negative ones never)."""
    return any(n >= 0 and n // K ** (level - 1) == index for n in blocks)


def leads_next_to(level, index, blocks, K):
    """Whether gist (level, index) covers a block next to one of `blocks` (raw block indices), i.e. whether
    expanding it opens or leads towards where the rest of a needle cut by a block or region edge lies."""
    return covers_any(level, index, [n for b in blocks for n in (b - 1, b + 1)], K)


def lens_focus(num_tokens, budget, cfg, lensnet, reader, wte, reranker=None, collapses=MAX_COLLAPSES, trace=None):
    """LensNet focus: from `start_wc` (level 1 where the history allows, else coarser), expand the best-scored
    gist and rescore, one expansion a pass, until none fits the budget. One at a time because LensNet is
    trained for its top-1 (the needle's covering gist at each level): expanding its top-k at once spends the
    budget on k - 1 guesses before the chosen level-2 region's children have been scored. With a `reranker`
    (and cfg.rerank_k > 1), a pass whose best gist lies at level 1 or 2 expands the reranker's pick instead
    (`focus_pick`): the second stage reads raw blocks in the WC or one expansion away with the question.
    When no expansion fits, up to `collapses` times the legal group of K level-1 gists that LensNet wants
    least (lowest mean score) folds into its level-2 parent, freeing K - 1 slots for one more expansion: a
    needle's key and label can need a block more than the start left room for (passkey at 16x on the
    runcpu model: 92 -> 100 %; dev/LOG.md, session 4). A region focus itself opened is never folded: it was
    opened to find a block in it, which the next pass expands. Where no such group is left (past K regions
    the start is all level-2 gists), K level-2 regions fold into their level-3 parent instead (passkey at
    256x: the opened region's block was one slot over the budget; dev/LOG.md, session 6).
    Once focus has opened a block, it goes on only towards that block's neighbours (`leads_next_to`: the rest
    of a needle that a block or region edge cuts) and stops at the first pick elsewhere, before folding
    anything for it, so the WC may end below the budget. Spare room spent elsewhere opened other keys'
    blocks, and the GPT copied a wrong colour's key (multi-key at 16x, budget 224: 63-93 % -> 97-100 % on
    four checkpoints; dev/LOG.md, session 12). `trace`: a list that receives the (level, index) of each gist
    focus expands, best first (the runtime keeps those blocks)."""
    if num_tokens <= budget:
        return all_raw(num_tokens, cfg)
    K = cfg.block_size
    wc = start_wc(num_tokens, budget, cfg)
    opened = set()  # level-2 regions this focus expanded
    raw = set()  # blocks this focus opened
    while True:
        gist = np.flatnonzero(wc.levels >= 1)
        room = wc_cost(wc, K) + K - 1 <= budget
        if len(gist) == 0 or (not room and collapses <= 0):  # decided before scoring: no forward wasted
            break
        with torch.no_grad():
            scores = lensnet.score([wc], [reader], wte)[0][0].float().cpu().numpy().astype(np.float64)
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


def lens_curriculum(num_tokens, block, cfg, rng, p_redirect=0.4, rest=()):
    """
    Coarse-to-fine LensNet examples for one needle block (v2 prototype): `coarse` = the coarsest WC
    (target = the entry covering the block, a level-2 region or a level-1 gist); `fine` = its covering
    gists expanded down to level 1 (target = the block's level-1 gist); `redirect` = a WRONG level-2
    region expanded (target = the right region's level-2 entry: "look elsewhere"); `start` = where focus
    starts at inference (`start_wc` at cfg.budget) when that is none of these; and for each block in
    `rest` (the needle's other blocks, e.g. "The red key | is 12345."), `continue` = the start with
    `block` opened, target = the entry covering that block. Returns [(wc, target)], empty when the
    block lies in the raw tail.
    """
    K = cfg.block_size
    base = coarsest_wc(num_tokens, cfg)
    if base.levels[entry_covering(base, block * K, K)] == 0:
        return []  # the needle is in the raw tail: nothing to find
    out = [(base, entry_covering(base, block * K, K))]
    fine = base
    while True:
        j = entry_covering(fine, block * K, K)
        if fine.levels[j] <= 1:
            break
        fine = expand(fine, j, cfg)
    if fine is not base:
        out.append((fine, entry_covering(fine, block * K, K)))
    tgt = entry_covering(base, block * K, K)
    wrong = [j for j in np.flatnonzero(base.levels >= 2) if j != tgt]
    if wrong and rng.random() < p_redirect:
        red = expand(base, int(rng.choice(wrong)), cfg)
        out.append((red, entry_covering(red, block * K, K)))
    first = start_wc(num_tokens, cfg.budget, cfg)
    if all(first != wc for wc, _ in out):
        out.append((first, entry_covering(first, block * K, K)))
    opened = open_blocks(first, [block], cfg)
    for other in rest:
        j = entry_covering(opened, other * K, K)
        if opened.levels[j] >= 1:
            out.append((opened, j))
    return out


def question_end(labels, s, cfg):
    """Where the answer starts in a row (its first labelled target + 1), i.e. the end of the question that
    follows the history [0, s); s itself when that would put the question outside the raw tail."""
    lab = torch.nonzero(labels[s:] != -1)
    if lab.numel() == 0:
        return s
    q = s + int(lab[0, 0]) + 1
    return q if tail_start(q, cfg) <= s else s


def needle_loss(obj, x, y, s, blocks, rng, weights=None, extra=2, lens_weight=1.0, gist_only=0.25, reranker=None):
    """
    One retrieval step on rows whose answer needs raw block blocks[b] of the history x[b, :s] (an int, or
    a list of the blocks the needle spans, the key's first: all are opened for the GPT; LensNet is taught
    to find the first, then the others with the first open):
    GPT + GistNet learn to copy from gisted contexts with the needle opened (a share `gist_only` of
    rows gets a random level mix instead, so the GPT also sees contexts where it is missing), with an
    answer-weighted next-token loss (`weights` (B, m) on the target segment, default 1); LensNet
    learns coarse / fine / redirect listwise choices over all entries, and its loss reaches GistNet.
    With a `reranker` (and cfg.rerank_k > 0), it learns to pick the answer's block out of LensNet's own
    top-k level-1 shortlist of one example per row (the answer block added when LensNet missed it).
    With cfg.gist_bow_weight > 0 the gists keep their bag-of-words loss here too: without it these rows (80 %
    of runcpu's midtraining) eroded it from 6.28 to 7.32-7.36 nats (held out; 6.09-6.27 with it), and
    level-1 substitutability read 0.51 / 0.29 / 0.54 / 0.39 over four seeds and 0.21 in runcpu's run, against
    0.26 / 0.39 / 0.44 without: inside the seed spread (dev/LOG.md, session 14).
    Every gist is computed fresh by the current GistNet (no mixed versions). Returns (loss, metrics).
    """
    cfg, rng, B_h = obj.cfg, _as_rng(rng), obj.B_h
    B, m = x.size(0), x.size(1) - s
    timer = PhaseTimer(x.device)
    with timer("gist"):
        levels = build_gists(obj.gistnet, obj.wte(x[:, :s]), cfg)
        readers = obj.readers(x, s, levels)
    with timer("select"):
        parts, lens_wcs, lens_rd, lens_tg, lens_row = [], [], [], [], []
        for b in range(B):
            need = [int(k) for k in np.atleast_1d(blocks[b])]
            if s <= B_h:
                wc = all_raw(s, cfg)
            elif rng.random() < gist_only:
                wc = random_mix(s, B_h, cfg, rng)
            else:
                wc = needle_variant(s, need, B_h, cfg, rng, extra)
            parts.append(wc_part(wc, readers[b], obj.wte, cfg))
            if s > B_h and lens_weight > 0:
                # LensNet reads the history AND the question (raw in its tail), as it does at inference,
                # where the WC covers everything before the answer: a multi-key question names its key
                q = question_end(y[b], s, cfg)
                rd = readers[b].with_tokens(x[b, :q]) if q > s else readers[b]
                for lw, t in lens_curriculum(q, need[0], cfg, rng, rest=need[1:]):
                    lens_wcs.append(lw)
                    lens_rd.append(rd)
                    lens_tg.append(t)
                    lens_row.append((b, q, need))
    with timer("lm"):
        packed = pack(parts, x[:, s:], y[:, s:], s, obj.wte, cfg)
        w = torch.ones(B, m) if weights is None else weights.float()
        W = torch.zeros(packed.labels.shape, device=x.device)
        for r, n in enumerate(packed.hist_lens):
            W[r, n:n + m] = w[r].to(x.device)
        lm = weighted_target_nll(obj.gpt, packed, W)
    loss, metrics = lm, {"mc/needle_lm": lm.detach(), "mc/hist_tokens": float(s)}
    if cfg.gist_bow_weight > 0:
        bow = bow_loss(levels[1], x[:, :s], obj.gpt.lm_head.weight, cfg.block_size)
        loss = loss + cfg.gist_bow_weight * bow
        metrics["mc/gist_bow"] = bow.detach()
    if lens_wcs:
        with timer("lens"):
            scores, mask = obj.lensnet.score(lens_wcs, lens_rd, obj.wte, logits=True)
            legal = mask.clone()
            for r, wc in enumerate(lens_wcs):
                legal[r, :len(wc)] &= torch.from_numpy(wc.levels >= 1).to(legal.device)
            l, ce, hit = lens_target_loss(scores, legal, torch.tensor(lens_tg, device=scores.device))
        loss = loss + lens_weight * l
        metrics.update({"mc/lens_loss": l.detach(), "mc/lens_ce": ce, "mc/lens_hit": hit})
        if reranker is not None and cfg.rerank_k > 0:
            with timer("rerank"):
                r_loss, r_hit = rerank_step(reranker, obj.wte, x, scores.detach(), legal, lens_wcs, lens_rd, lens_tg,
                                            lens_row, cfg)
            if r_loss is not None:
                loss = loss + lens_weight * r_loss
                metrics.update({"mc/lens_rerank_loss": r_loss.detach(), "mc/lens_rerank_hit": r_hit})
    metrics["mc/loss"] = loss.detach()
    metrics.update(timer.pop())
    return loss, metrics


def rerank_step(reranker, wte, x, z, legal, wcs, readers, targets, rows, cfg):
    """The reranker's listwise loss over LensNet's top-k level-1 shortlist, on every LensNet example whose
    target is a level-1 gist (it learns slowly: a plateau near chance before it binds question and block,
    tests/test_reranker.py). The target's block is added when LensNet missed it; the needle's other blocks
    are left out (they are not wrong). Returns (mean loss, hit rate) or (None, None) without such examples."""
    K, Q = cfg.block_size, question_len(cfg)
    cands, answers = [], []
    for r, (wc, t) in enumerate(zip(wcs, targets)):
        if wc.levels[t] != 1:
            continue
        b, q, need = rows[r]
        ok = legal[r, :len(wc)].cpu().numpy().copy()  # a copy: the LensNet loss saved `legal` for backward
        for blk in need:
            j = entry_covering(wc, blk * K, K)
            ok[j] &= j == t  # the needle's other blocks are not wrong answers: leave them out
        short = list(shortlist(z[r, :len(wc)].float().cpu().numpy(), wc, cfg.rerank_k, ok))
        if t not in short:
            short[-1:] = [t]
        if len(short) < 2:
            continue
        cands.append(candidate_ids(readers[r], wc, short, x[b, q - Q:q], cfg))
        answers.append(short.index(t))
    if not cands:
        return None, None
    logits = reranker(torch.cat(cands), wte).split([c.size(0) for c in cands])  # one forward for all
    losses = torch.stack([rerank_loss(lg, a) for lg, a in zip(logits, answers)])
    hits = [float(int(lg.argmax()) == a) for lg, a in zip(logits, answers)]
    return losses.mean(), sum(hits) / len(hits)


__all__ = ["entry_covering", "covers_any", "leads_next_to", "open_blocks", "needle_variant", "weighted_target_nll",
           "lens_target_loss", "start_wc", "focus_pick", "lens_curriculum", "question_end", "needle_loss",
           "rerank_step"]
