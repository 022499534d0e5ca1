"""
The retrieval recipe (dev/LOG.md from 2026-11-21 on), for long-context
rows whose answer blocks are known (tasks/longctx.py key_spans, tasks/mc_mixture.py): after a short all-raw
copy warm-up, the GPT and GistNet learn on gisted histories with the needle's blocks opened coarse to
fine (`open_blocks`), with an answer-weighted loss; LensNet learns listwise over ALL entries with coarse /
fine / redirect / start / continue targets (`lens_curriculum`) and its loss trains GistNet; the reranker
learns to pick the needle's block out of LensNet's own level-1 shortlist (`rerank_step`). The needle's
block is the counterfactual best expansion (in an early prototype, 100 % of the time), so no counterfactual
forwards are spent on these rows. LensNet's `start` examples are where focus starts at inference
(megacontext/focus.py: start_wc, question_focus).
"""
import numpy as np
import torch
import torch.nn.functional as F

from megacontext.allocator import expand
from megacontext.focus import entry_covering, open_blocks, shortlist, start_wc
from megacontext.gistnet import build_gists
from megacontext.packing import pack, packed_nll, wc_part
from megacontext.reranker import candidate_ids, question_len
from megacontext.training.objective import as_rng, bow_loss, random_mix
from megacontext.training.telemetry import PhaseTimer
from megacontext.working_context import all_raw, coarsest_wc, tail_start, wc_cost


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


def lens_curriculum(num_tokens, block, cfg, rng, p_redirect=0.4, rest=()):
    """
    Coarse-to-fine LensNet examples for one needle block: `coarse` = the coarsest WC
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
    With cfg.gist_bow_weight > 0 the gists keep their bag-of-words loss here too: without it these rows (80 % of
    runcpu's midtraining) eroded it from 6.28 to 7.32-7.36 nats (held out; 6.09-6.27 with it), and level-1
    substitutability read 0.51 / 0.29 / 0.54 / 0.39 over four seeds and 0.21 in runcpu's run, against 0.26 / 0.39 /
    0.44 without: inside the seed spread (dev/LOG.md, 2026-11-23, 'what the far history offers on prose is a unigram
    cache').
    Every gist is computed fresh by the current GistNet (no mixed versions). Returns (loss, metrics).
    """
    cfg, rng, B_h = obj.cfg, as_rng(rng), obj.B_h
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


def rerank_loss(logits, target):
    """Listwise CE over one shortlist: logits (C,), target = the index of the block that holds the answer."""
    return F.cross_entropy(logits[None], torch.tensor([target], device=logits.device))


__all__ = ["needle_variant", "weighted_target_nll", "lens_target_loss", "lens_curriculum", "question_end",
           "needle_loss", "rerank_step", "rerank_loss"]
