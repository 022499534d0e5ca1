"""
The training-proof metrics on held-out rows: how much of the raw history the gists replace
(`gist_substitutability`), and how well LensNet orders expansions against their counterfactual value
(`lens_pair_agreement`). megacontext/eval/quality.py runs them for scripts/mc_eval.py.
"""
import copy

import torch

from megacontext.gistnet import GistLevels, build_gists
from megacontext.packing import chunked_row_nll, raw_suffix_part, wc_part
from megacontext.training.objective import as_rng, pair_agreement, top1_share
from megacontext.working_context import all_raw, coarsest_wc, tail_start


@torch.no_grad()
def gist_substitutability(gpt, gistnet, x, y, s, cfg, level=1, per_row=False):
    """
    Mean next-token NLL of the target x[:, s:] (labels y[:, s:]) with the history [0, s) given as:
    `raw` (all tokens), `gists` (everything before the raw tail as gists of level <= `level`, coarsest
    tiling), `dropped` (the raw tail only), `none` (no history). substitutability =
    (NLL_dropped - NLL_gists) / (NLL_dropped - NLL_raw): 1 = the gists replace the raw tokens fully,
    0 = they add nothing. The LM guard compares nll_gists with nll_none and nll_raw. per_row=True adds
    "rows": {name: each row's mean NLL} (what a confidence interval resamples).
    """
    wte = gpt.transformer.wte
    B = x.size(0)
    levels = build_gists(gistnet, wte(x[:, :s]), cfg)
    readers = [GistLevels(x[b, :s], [None] + [lv[b] for lv in levels[1:]]) for b in range(B)]
    keep = s - tail_start(s, cfg)
    out, rows = {}, {}
    for name in ("raw", "gists", "dropped", "none"):
        if name == "raw":
            parts = [wc_part(all_raw(s, cfg), r, wte, cfg) for r in readers]
        elif name == "gists":
            parts = [wc_part(coarsest_wc(s, cfg, max_level=level), r, wte, cfg) for r in readers]
        else:
            parts = [raw_suffix_part(x[b, :s], keep if name == "dropped" else 0, wte, cfg) for b in range(B)]
        sums, counts = chunked_row_nll(gpt, parts, x[:, s:], y[:, s:], s, wte, cfg)
        out[f"nll_{name}"] = float(sums.sum() / counts.sum().clamp_min(1))
        rows[name] = (sums / counts.clamp_min(1)).tolist()
    gap = out["nll_dropped"] - out["nll_raw"]
    out["substitutability"] = (out["nll_dropped"] - out["nll_gists"]) / gap if abs(gap) > 1e-9 else float("nan")
    return dict(out, rows=rows) if per_row else out


@torch.no_grad()
def lens_pair_agreement(objective, x, y, s, rng):
    """On held-out rows: LensNet's pair agreement and top-1 against counterfactual delta_nll on
    recency-pyramid base WCs. Returns {agreement, top1, delta_nll, recency}. It orders LensNet's logits, like
    training's mc/lens_agreement: tanh(z) rounds to -1 in float32 once z < ~ -9, and a LensNet trained to
    reject every entry but a needle's ties there, which pair_agreement counts as chance. `recency` is the
    same agreement for the baseline that ranks the newest gist first (no LensNet): what a LensNet adds is
    its agreement beyond that, not beyond 0.5. `split_half` orders the deltas measured on the target's
    second half by those measured on its first half (same candidates): how far the ordering is a property
    of the history at all. Near 0.5, which expansion helps depends on the very tokens being predicted, and
    no scorer that cannot see them (LensNet cannot) orders the full-target deltas much better."""
    rng = as_rng(rng)
    readers = objective.readers(x, s)
    twins = [copy.deepcopy(rng) for _ in range(2)]  # the halves' calls draw the same candidates as the full one
    bases, delta, legal, _ = objective.counterfactuals(x, y, s, readers, rng, base="pyramid")
    mid = s + (y.size(1) - s) // 2
    first, second = y.clone(), y.clone()
    first[:, mid:], second[:, s:mid] = -1, -1  # labels -1 are not scored
    halves = [objective.counterfactuals(x, h, s, readers, r, base="pyramid")[1] for h, r in zip((first, second), twins)]
    scores, _ = objective.lensnet.score(bases, readers, objective.wte, logits=True)
    best = torch.where(legal, delta, torch.full_like(delta, -float("inf"))).max(1).values
    newest_first = torch.arange(delta.size(1), dtype=torch.float32).expand_as(delta)  # WC entries are in time order
    return {"agreement": pair_agreement(scores, delta, legal), "top1": top1_share(scores, delta, legal),
            "delta_nll": float(best[legal.any(1)].mean()) if legal.any() else float("nan"),
            "recency": pair_agreement(newest_first, delta, legal), "split_half": pair_agreement(*halves, legal)}
