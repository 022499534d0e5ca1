"""
The end-to-end MegaContext training objective (docs/architecture.md).

One step on a batch x, y (B, T) of next-token pairs (y[:, t] = x[:, t + 1], -1 = no loss):
1. split at a block-aligned s: history x[:, :s], target inputs x[:, s:] with labels y[:, s:]
   (the input at position t predicts token t + 1: labels come from y, never from x);
2. GistNet builds all gist levels of the histories, batched and WITH gradient (`build_gists`);
3. WC variants of each history under the budget B_h: recency pyramid, a random level mix,
   LensNet-driven focus, and raw truncation (the history cut to its newest B_h tokens);
4. one packed GPT forward over every (variant, row): `[WC(history) ; target segment]`, next-token
   loss on the target segment only; the loss reaches GPT and GistNet (gists are not detached);
5. LensNet from counterfactuals: for a base WC with room for one more expansion, the NLL change
   when each single gist is expanded (no grad) gives delta_nll (> 0: the expansion helps); LensNet
   scores the base WC WITH grad and learns a listwise softmax over every legal entry (target = the
   counterfactual best) plus a per-entry binary loss (target sigmoid(delta / lens_temp)); illegal
   entries (raw blocks) are masked; its loss flows into GistNet through the entry embeddings.
6. with gist_bow_weight > 0, a bag-of-words loss on the level-1 gists (`bow_loss`): read through the
   GPT's frozen lm_head, each gist must predict its own block's tokens, so that the GPT can copy the
   recurring tokens of a gisted history (on prose most of what history adds).
A share `train_plain_lm` of steps trains plain full-detail LM instead, so base quality holds; with
`train_lm_weight` > 0 every other step adds the plain LM loss of the whole row as well (base quality bought
with retrieval: see MCConfig).

Level-2 salience: level-2 gists in a base WC are counterfactual candidates like any other gist (their
expansion is scored by delta_nll), so LensNet learns coarse scores.

The retrieval recipe (needle rows whose answer blocks are known) is in megacontext/training/needle.py.
"""
import numpy as np
import torch
import torch.nn.functional as F

from megacontext.allocator import expand
from megacontext.focus import greedy_focus
from megacontext.gistnet import GistLevels, build_gists
from megacontext.packing import chunked_row_nll, pack, raw_suffix_part, row_nll, wc_part
from megacontext.training.telemetry import PhaseTimer
from megacontext.working_context import all_raw, coarsest_wc, min_cost, recency_pyramid, swap_share, wc_cost



# -----------------------------------------------------------------------------
# splitting and building working-context variants (pure, numpy)

def split_point(T, cfg, rng):
    """A block-aligned history length s with at least train_min_target tokens after it; prefers
    histories with at least one gist (s >= tail_tokens + K) when T allows."""
    K = cfg.block_size
    hi = (T - cfg.train_min_target) // K
    if hi < 1:
        raise ValueError(f"sequences of {T} tokens are too short for a history block plus a target segment "
                         f"of {cfg.train_min_target} tokens (block_size {K})")
    lo = min(hi, (cfg.tail_tokens + K) // K + 1)
    return K * int(rng.integers(lo, hi + 1))


def as_rng(rng):
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def random_mix(num_tokens, budget, cfg, rng):
    """A random level mix: the coarsest WC, then random gists expanded while the budget allows."""
    K = cfg.block_size
    wc = coarsest_wc(num_tokens, cfg)
    cost = wc_cost(wc, K)
    while cost + K - 1 <= budget:
        gist = np.flatnonzero(wc.levels >= 1)
        if len(gist) == 0:
            break
        wc = expand(wc, int(rng.choice(gist)), cfg)
        cost += K - 1
    return wc


# -----------------------------------------------------------------------------
# LensNet targets and losses

def lens_targets(delta, temp):
    """Binary targets in (0, 1), increasing with delta_nll (the NLL drop an expansion buys)."""
    return torch.sigmoid(torch.as_tensor(delta, dtype=torch.float32) / temp)


def lens_loss(z, delta, legal, temp):
    """
    z (B, W) LensNet logits (score = tanh(z), `lensnet.score(..., logits=True)`); delta (B, W)
    counterfactual NLL drops; legal (B, W) bool (a counterfactual exists). Listwise: softmax(z) over
    each row's legal entries with target = the row's best expansion; binary: BCE of (score + 1) / 2 =
    sigmoid(2 z) against sigmoid(delta / temp), computed from logits so that it never saturates.
    Rows with fewer than two legal entries, or all deltas tied, contribute only the binary term.
    """
    delta = delta.to(z.device, torch.float32)
    legal = legal.to(z.device)
    masked = torch.where(legal, z, torch.full_like(z, -1e4))
    best = torch.where(legal, delta, torch.full_like(delta, -float("inf"))).argmax(1)
    lo = torch.where(legal, delta, torch.full_like(delta, float("inf"))).min(1).values
    hi = torch.where(legal, delta, torch.full_like(delta, -float("inf"))).max(1).values
    rows = (legal.sum(1) >= 2) & (hi - lo > 1e-3)  # a tie (e.g. context is useless) has no best entry
    listwise = F.cross_entropy(masked[rows], best[rows]) if rows.any() else z.sum() * 0
    bce = F.binary_cross_entropy_with_logits(2 * z[legal], lens_targets(delta[legal], temp).to(z.device)) \
        if legal.any() else z.sum() * 0
    return listwise + bce, listwise, bce


def bow_loss(gists, ids, lm_head_weight, K):
    """
    Bag-of-words loss of level-1 gists (B, G, d) over their blocks' tokens ids (B, >= G * K): read through the GPT's
    lm_head (frozen here, so the LM is not bent toward the gists), each gist's softmax must put mass on its own
    block's tokens (mean -log p over the block). Why: on prose most of what the history beyond the raw tail adds is
    tokens that recur (dev/LOG.md, 2026-11-22, 'midtraining unlearns prose'), and a gist the lm_head can read that
    way is one the GPT can copy from.
    """
    B, G, d = gists.shape
    if G == 0:
        return gists.sum() * 0
    logp = F.linear(F.rms_norm(gists, (d,)), lm_head_weight.detach().to(gists.dtype)).float().log_softmax(-1)
    return -logp.gather(-1, ids[:, :G * K].reshape(B, G, K)).mean()


def pair_agreement(scores, delta, legal, eps=1e-3):
    """
    Share of legal entry pairs (|delta_i - delta_j| > eps) that the scores order like delta; NaN if
    none. A tie in the scores counts one half, so constant (e.g. saturated) scores read 0.5, chance.
    """
    agree = total = 0.0
    for sc, de, lg in zip(scores, delta, legal):
        sc, de = sc[lg].detach().float().cpu(), de[lg].float().cpu()
        ds, dd = sc[:, None] - sc[None, :], de[:, None] - de[None, :]
        keep = dd.abs() > eps
        agree += float(((ds * dd) > 0)[keep].sum()) + 0.5 * float((ds == 0)[keep].sum())
        total += float(keep.sum())
    return agree / total / 1.0 if total else float("nan")


# -----------------------------------------------------------------------------
# the objective

class MCObjective:
    def __init__(self, gpt, gistnet, lensnet, cfg, lm=None):
        """lm: what runs the plain-LM share's fixed-shape full rows (e.g. torch.compile(gpt); default gpt).
        Every packed forward calls gpt itself: its rows change shape every step."""
        self.gpt, self.gistnet, self.lensnet, self.cfg = gpt, gistnet, lensnet, cfg
        self.lm = gpt if lm is None else lm  # not `lm or gpt`: a compiled module refuses bool()
        self.variants = [v for v in cfg.train_variants.split(",") if v]
        self.B_h = cfg.hist_budget()

    def parameters_mc(self):
        """GistNet's and LensNet's parameters (the GPT's are the base optimizer's): put them in an optimizer."""
        return list(self.gistnet.parameters()) + list(self.lensnet.parameters())

    @property
    def wte(self):
        return self.gpt.transformer.wte

    def readers(self, x, s, levels=None):
        """Per-row GistLevels over the history x[:, :s] (gists with grad when grad is enabled); `levels`:
        build_gists' output when the caller already has it."""
        levels = build_gists(self.gistnet, self.wte(x[:, :s]), self.cfg) if levels is None else levels
        return [GistLevels(x[b, :s], [None] + [lv[b] for lv in levels[1:]]) for b in range(x.size(0))]

    def _lens_scores(self, wc, reader):
        with torch.no_grad():
            scores, _ = self.lensnet.score([wc], [reader], self.wte)
        return scores[0].float().cpu().numpy()

    def _variant_part(self, name, b, x, s, reader, rng):
        cfg, B_h = self.cfg, self.B_h
        if name == "truncate":
            return raw_suffix_part(x[b, :s], B_h, self.wte, cfg), None
        if s <= B_h:  # the whole history fits raw: every WC variant is the raw history
            wc = all_raw(s, cfg)
        elif name == "pyramid":
            wc = recency_pyramid(s, B_h, cfg)
        elif name == "random":
            wc = random_mix(s, B_h, cfg, rng)
        else:  # "lens"
            wc = greedy_focus(coarsest_wc(s, cfg), B_h, cfg, lambda w: self._lens_scores(w, reader))
        return wc_part(wc, reader, self.wte, cfg), wc

    def counterfactuals(self, x, y, s, readers, rng, base="random"):
        """
        Base WCs (budget B_h - (K - 1), so one more expansion fits B_h) and, per row, delta_nll for
        expanding each candidate gist alone: (base_wcs, delta (B, W) float, legal (B, W) bool,
        base_nll (B,) summed nats). No gradient.
        """
        cfg, K = self.cfg, self.cfg.block_size
        B = x.size(0)
        bases, parts, owners, cands = [], [], [], []
        with torch.no_grad():
            for b in range(B):
                bud = max(self.B_h - (K - 1), min_cost(s, cfg))
                wc = (recency_pyramid(s, bud, cfg) if base == "pyramid" or rng.random() < 0.5
                      else random_mix(s, bud, cfg, rng))
                bases.append(wc)
                gist = np.flatnonzero(wc.levels >= 1)
                if cfg.lens_cands and len(gist) > cfg.lens_cands:
                    gist = np.sort(rng.choice(gist, cfg.lens_cands, replace=False))
                cands.append(gist)
                parts.append(wc_part(wc, readers[b], self.wte, cfg))
                owners.append(b)
                for j in gist:
                    parts.append(wc_part(expand(wc, int(j), cfg), readers[b], self.wte, cfg))
                    owners.append(b)
            own = torch.tensor(owners, device=x.device)
            nll, _ = chunked_row_nll(self.gpt, parts, x[own, s:], y[own, s:], s, self.wte, cfg)
        W = max(len(wc) for wc in bases)
        delta = torch.zeros(B, W)
        legal = torch.zeros(B, W, dtype=torch.bool)
        base_nll = torch.zeros(B)
        i = 0
        for b in range(B):
            base_nll[b] = nll[i]
            for k, j in enumerate(cands[b]):
                delta[b, j] = float(nll[i] - nll[i + 1 + k])
                legal[b, j] = True
            i += 1 + len(cands[b])
        return bases, delta, legal, base_nll

    def loss(self, x, y, rng, step=0, s=None):
        """(scalar loss, metrics dict). x, y: (B, T) next-token pairs; rng: numpy Generator or seed;
        s: the history length (block-aligned), default a random split (`split_point`)."""
        cfg, rng = self.cfg, as_rng(rng)
        valid = y[:, :-1] != -1
        if (y[:, :-1][valid] != x[:, 1:][valid]).any():
            raise ValueError("y must be x shifted by one (y[:, t] = x[:, t + 1], or -1): the loss predicts "
                             "the NEXT token, never the input")
        timer = PhaseTimer(x.device)
        if cfg.train_plain_lm > 0 and rng.random() < cfg.train_plain_lm:
            with timer("lm"):
                loss = self.lm(x, y)
            return loss, {"mc/plain_lm_loss": loss.detach(), **timer.pop()}
        B, T = x.shape
        explicit_split = s is not None
        if s is None:
            s = split_point(T, cfg, rng)
        elif s % cfg.block_size or not 0 < s < T:
            raise ValueError(f"the split s={s} must be a positive multiple of {cfg.block_size} below T={T}")
        with timer("gist"):
            levels = build_gists(self.gistnet, self.wte(x[:, :s]), cfg)
            readers = self.readers(x, s, levels)
        metrics = {"mc/hist_tokens": float(s), "mc/compression": s / self.B_h}
        bow = None
        if cfg.gist_bow_weight > 0:
            bow = bow_loss(levels[1], x[:, :s], self.gpt.lm_head.weight, cfg.block_size)
            metrics["mc/gist_bow"] = bow.detach()
        # --- the LM on every WC variant, one packed forward
        with timer("select"):
            parts, wcs, swaps = [], [], []
            # what swap_rate compares the LensNet-driven WCs with
            pyramid = recency_pyramid(s, self.B_h, cfg) if "lens" in self.variants and s > self.B_h else None
            for name in self.variants:
                for b in range(B):
                    p, wc = self._variant_part(name, b, x, s, readers[b], rng)
                    parts.append(p)
                    if wc is not None:
                        wcs.append(wc)
                    if name == "lens" and pyramid is not None:
                        swaps.append(swap_share(wc, pyramid))
        with timer("lm"):
            rep = torch.arange(B, device=x.device).repeat(len(self.variants))
            packed = pack(parts, x[rep, s:], y[rep, s:], s, self.wte, cfg)
            sums, counts = row_nll(self.gpt, packed)
            sums, counts = sums.view(len(self.variants), B).sum(1), counts.view(len(self.variants), B).sum(1)
            per_variant = sums / counts.clamp_min(1)
            lm_loss = per_variant.mean()
        for name, v in zip(self.variants, per_variant):
            metrics[f"mc/loss_by_variant/{name}"] = v.detach()
        for L in range(cfg.max_level + 1):
            metrics[f"mc/lod_count/{L}"] = float(np.mean([int((wc.levels == L).sum()) for wc in wcs])) if wcs else 0.0
        if wcs:
            metrics["mc/budget_utilization"] = float(np.mean([wc_cost(wc, cfg.block_size) for wc in wcs])) / self.B_h
        if swaps:  # how far learned focus departs from the recency default (0: it only repeats recency)
            metrics["mc/swap_rate"] = float(np.mean(swaps))
        loss = lm_loss if bow is None else lm_loss + cfg.gist_bow_weight * bow
        # --- LensNet from counterfactual single expansions
        if cfg.lens_weight > 0 and s > self.B_h:
            with timer("counterfactual"):
                bases, delta, legal, _ = self.counterfactuals(x, y, s, readers, rng)
            if legal.any():
                with timer("lens"):
                    scores, _ = self.lensnet.score(bases, readers, self.wte, logits=True)
                    l_total, l_list, l_bce = lens_loss(scores, delta, legal, cfg.lens_temp)
                loss = loss + cfg.lens_weight * l_total
                best = torch.where(legal, delta, torch.full_like(delta, -float("inf"))).max(1).values
                metrics.update({"mc/lens_loss": l_total.detach(), "mc/lens_listwise": l_list.detach(),
                                "mc/lens_binary": l_bce.detach(),
                                "mc/delta_nll": best[legal.any(1)].mean(),
                                "mc/lens_agreement": pair_agreement(scores, delta, legal),
                                "mc/lens_top1": top1_share(scores, delta, legal)})
        if cfg.train_lm_weight > 0 and not explicit_split:
            # the whole row raw as well: every token keeps its plain next-token loss on MC steps (a row with an
            # explicit split is a long-context task row, longer than the GPT reads at once)
            with timer("row_lm"):
                row_lm = self.lm(x, y)
            loss = loss + cfg.train_lm_weight * row_lm
            metrics["mc/row_lm_loss"] = row_lm.detach()
        metrics["mc/loss"] = loss.detach()
        metrics.update(timer.pop())
        return loss, metrics


def top1_share(scores, delta, legal):
    """Share of rows whose best-scored legal entry is the counterfactual best."""
    neg = torch.full_like(delta, -float("inf"))
    pick = torch.where(legal.to(scores.device), scores.detach(), neg.to(scores.device)).argmax(1).cpu()
    best = torch.where(legal, delta, neg).argmax(1)
    rows = legal.any(1)
    return float((pick == best)[rows].float().mean()) if rows.any() else float("nan")


__all__ = ["MCObjective", "split_point", "as_rng", "random_mix", "lens_loss", "lens_targets", "bow_loss",
           "pair_agreement", "top1_share"]
