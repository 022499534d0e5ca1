"""
Gist quality and LensNet agreement on held-out text (the figures that show what training bought), for
scripts/mc_eval.py's `quality` task, and the token windows of held-out text that it and the long-doc
task read.

- gist substitutability per level: target NLL with the history raw / as gists / dropped (raw tail
  only) / absent, and (dropped - gists) / (dropped - raw); level 2's raw reference may exceed the
  GPT's context, which the JSON says (raw_fits_context);
- the same per level without a raw tail (level_1_no_tail, level_2_no_tail: the whole history as gists,
  against none of it). With the tail, the ratio asks what gists add beyond the tokens a working context
  always keeps raw; on a GPT that barely reads past its tail that is a ratio of two hundredths of a nat.
  Without it, it asks whether gists carry what their own tokens carried, the nearest block's included;
- the LM guard: gists must beat no history at every level;
- LensNet pair agreement and top-1 against counterfactual delta_nll, beside the agreement of ranking the
  newest gist first (a GPT that reads its far context gains most from the nearest block: LensNet earns
  its keep only above that baseline), and the deltas' split-half agreement (the first half of the
  target's deltas ordering the second half's: near 0.5, the ordering is noise that no target-blind scorer
  can predict);
- 90 % bootstrap intervals over rows for the substitutability and the agreement: on a toy GPT the gap
  (dropped - raw) is a few hundredths of a nat, and 64 rows moved the ratio by 0.08 against 256.
"""
import dataclasses
import math

import numpy as np
import torch

SEED_STREAM = 5  # the lens rows' rng is default_rng([seed, 5]) (5 = mc_eval's task id for quality)

QUALITY_BATCH = 4  # rows per gist_substitutability call (bounds memory: four history variants per row)

QUALITY_LEVEL_KEYS = ("history_tokens", "target_tokens", "rows", "nll_raw", "nll_gists", "nll_dropped", "nll_none",
                      "substitutability")

QUALITY_LEVELS = (("level_1", 1, False), ("level_2", 2, False), ("level_1_no_tail", 1, True),
                  ("level_2_no_tail", 2, True))  # (entry, gist level, no raw tail)

QUALITY_LENS_KEYS = ("history_tokens", "rows", "agreement", "top1", "delta_nll")

BOOTSTRAP = 2000  # resamples of the rows for each interval


def bootstrap_ci(columns, stat, seed, n=BOOTSTRAP, level=0.9):
    """
    Percentile interval [lo, hi] of stat(*column means) over n resamples of the rows (columns: equal-length
    sequences, resampled together). Resamples where stat is not finite (a ratio whose gap vanished) are
    dropped; None when fewer than half remain or there are fewer than two rows.
    """
    cols = np.asarray(columns, dtype=np.float64)
    if cols.ndim != 2 or cols.shape[1] < 2:
        return None
    idx = np.random.default_rng([seed, 7]).integers(0, cols.shape[1], (n, cols.shape[1]))
    means = cols[:, idx].mean(-1)  # (columns, n)
    with np.errstate(divide="ignore", invalid="ignore"):
        vals = np.asarray(stat(*means), dtype=np.float64)
    vals = vals[np.isfinite(vals)]
    if len(vals) < n // 2:
        return None
    lo, hi = np.quantile(vals, [(1 - level) / 2, (1 + level) / 2])
    return [round(float(lo), 4), round(float(hi), 4)]


def substitutability_ratio(dropped, gists, raw):
    """(dropped - gists) / (dropped - raw), NaN where the gap is not positive (undefined)."""
    gap = dropped - raw
    return np.where(gap > 1e-6, (dropped - gists) / np.where(gap > 1e-6, gap, 1.0), np.nan)


def doc_windows(texts, tok, doc_tokens, n_docs):
    """n_docs non-overlapping stretches of doc_tokens tokens of contiguous validation text (evenly spaced)."""
    ids = []
    for t in texts:  # encode only as much text as the windows need
        ids += tok.encode(t + "\n\n")
        if len(ids) >= 4 * doc_tokens * n_docs:
            break
    n = min(n_docs, len(ids) // doc_tokens)
    if n == 0:
        return []
    stride = len(ids) // n
    return [ids[i * stride:i * stride + doc_tokens] for i in range(n)]


def lens_candidates(s, cfg):
    """Gists in the base WC that MCObjective.counterfactuals(base="pyramid") builds for a history of s
    tokens: a recency pyramid under B_h - (K - 1) (one more expansion fits B_h), or the cheapest legal WC."""
    from megacontext.working_context import min_cost, recency_pyramid
    bud = max(cfg.hist_budget() - (cfg.block_size - 1), min_cost(s, cfg))
    return int((recency_pyramid(s, bud, cfg).levels >= 1).sum())


def quality_plan(cfg, seq_len, target):
    """
    History lengths of the quality figures, ({"level_1", "level_2", "lens": s or None}, {entry: reason}):
    level 1: the longest block-aligned history whose raw reference [history ; target] fits the GPT's
      trained context, with at least one level-1 gist before the raw tail (s >= tail + K);
    level 2: the shortest history holding one level-2 gist (K^2 + tail, block-aligned); its raw
      reference may exceed sequence_len (the result says so: raw_fits_context);
    lens: counterfactuals expand single gists of the base WC (`lens_candidates`); LensNet needs two of
      them to order a pair. The level-1 history when its base has two gists, else the shortest of 2, 4,
      8, 16 x B_h (block-aligned) whose base does: the GPT reads only the WC (<= B_h slots) + the target,
      so a history beyond sequence_len is fine here (the agreement needs no raw reference).
    """
    K, tail = cfg.block_size, cfg.tail_tokens
    hist, reasons = {}, {}
    s1 = K * ((seq_len - target) // K)
    hist["level_1"] = s1 if s1 >= tail + K else None
    if hist["level_1"] is None:
        reasons["level_1"] = (f"sequence_len {seq_len} cannot hold a raw tail of {tail} + one {K}-token block + "
                              f"a {target}-token target")
    hist["level_2"] = K * -(-(K * K + tail) // K) if cfg.max_level >= 2 else None
    if hist["level_2"] is None:
        reasons["level_2"] = "max_level 1: there are no level-2 gists"
    cands = ([s1] if hist["level_1"] else []) + [K * -(-(f * cfg.hist_budget()) // K) for f in (2, 4, 8, 16)]
    hist["lens"] = next((s for s in cands if lens_candidates(s, cfg) >= 2), None)
    if hist["lens"] is None:
        reasons["lens"] = f"no history up to {cands[-1]} tokens gives two counterfactual candidates"
    return hist, reasons


def token_batches(windows, device, batch):
    """(x, y) batches of next-token pairs: a window of n + 1 tokens gives x = its first n, y = its last n."""
    for i in range(0, len(windows), batch):
        w = torch.tensor(windows[i:i + batch], dtype=torch.long, device=device)
        yield w[:, :-1], w[:, 1:]


@torch.no_grad()
def run_quality(models, texts, target, n_docs, seed, batch=QUALITY_BATCH, progress=True):
    """
    The quality figures on n_docs windows of validation text (cut like long_doc's), each scored on its
    last `target` tokens: per level, `gist_substitutability` (NLLs with the history raw / as gists /
    dropped to the raw tail / absent) in batches of `batch` rows, and LensNet's pair agreement
    (`lens_pair_agreement`) row by row. {"level_1", "level_2", "lens", "reasons"}; see the module docstring.
    """
    from tqdm import tqdm
    from megacontext.eval.metrics import gist_substitutability, lens_pair_agreement
    from megacontext.training.objective import MCObjective
    from nanochat.common import autocast_ctx
    gpt, gistnet, lensnet, tok, cfg = models.gpt, models.gistnet, models.lensnet, models.tok, models.cfg
    seq_len = gpt.config.sequence_len
    out = dict.fromkeys([k for k, _, _ in QUALITY_LEVELS] + ["lens"])
    if gistnet is None:
        return dict(out, reasons={k: "needs GistNet and LensNet weights (this checkpoint has none)" for k in out})
    hist, reasons = quality_plan(cfg, seq_len, target)
    device = gpt.get_device()
    windows = {}

    def cut(key, s):  # windows of history + target + the last label
        if s not in windows:
            windows[s] = doc_windows(texts, tok, s + target + 1, n_docs)
        if not windows[s]:
            reasons[key] = f"the validation text holds no stretch of {s + target + 1} tokens"
        return windows[s]

    with autocast_ctx(device.type):
        for key, level, no_tail in QUALITY_LEVELS:
            s = hist[f"level_{level}"]  # the same histories (and windows) with and without the tail
            if no_tail and cfg.tail_tokens == 0:
                reasons[key] = f"the working context keeps no raw tail (tail_tokens 0): level_{level} is this figure"
                continue
            ws = cut(key, s) if s is not None else []
            if not ws:
                if s is None:
                    reasons.setdefault(key, reasons.get(f"level_{level}", "no history for this level"))
                continue
            c = dataclasses.replace(cfg, tail_tokens=0) if no_tail else cfg
            rows = {k: [] for k in ("raw", "gists", "dropped", "none")}
            desc = f"quality L{level}" + (" no tail" if no_tail else "")
            for x, y in tqdm(list(token_batches(ws, device, batch)), desc=desc, disable=not progress, leave=False):
                r = gist_substitutability(gpt, gistnet, x, y, s, c, level, per_row=True)
                for k in rows:
                    rows[k] += r["rows"][k]
            # every row scores `target` tokens: the mean of the row means is the token mean
            nll = {k: round(float(np.mean(v)), 6) for k, v in rows.items()}
            gap = nll["dropped"] - nll["raw"]
            out[key] = {"history_tokens": s, "target_tokens": target, "rows": len(ws),
                        **{f"nll_{k}": v for k, v in nll.items()},
                        # like gaps_closed: undefined unless the raw history beats the raw tail alone
                        "substitutability": round((nll["dropped"] - nll["gists"]) / gap, 4) if gap > 1e-6 else None,
                        "substitutability_ci": bootstrap_ci([rows["dropped"], rows["gists"], rows["raw"]],
                                                            substitutability_ratio, seed) if gap > 1e-6 else None,
                        "lm_guard": bool(nll["gists"] < nll["none"]), "raw_fits_context": s + target <= seq_len}
            if out[key]["substitutability"] is None:
                floor = "no history" if no_tail else "the raw tail"
                reasons[key] = (f"the raw history does not lower the target NLL below {floor}'s (NLL raw >= "
                               "dropped): substitutability is undefined")
        key, s = "lens", hist["lens"]
        ws = cut(key, s) if s is not None and lensnet is not None else []
        if lensnet is None:
            reasons[key] = "needs LensNet weights"
        if ws:
            # every gist of the base WC is a candidate (lens_cands = 0): the checkpoint's lens_cands
            # subsamples them for training speed, the evaluation scores them all
            objective = MCObjective(gpt, gistnet, lensnet, dataclasses.replace(cfg, lens_cands=0))
            rng = np.random.default_rng([seed, SEED_STREAM])
            rows = []  # row by row: the agreement is the mean over rows of each row's pair agreement
            for x, y in tqdm(list(token_batches(ws, device, 1)), desc="quality lens", disable=not progress,
                             leave=False):
                rows.append(lens_pair_agreement(objective, x, y, s, rng))

            # a row whose deltas all tie (the context does not matter) has no best expansion: only rows
            # with a pair to order count, for top-1 too
            rows = [r for r in rows if math.isfinite(r["agreement"])]

            def avg(k):
                v = [r[k] for r in rows if math.isfinite(r[k])]
                return round(sum(v) / len(v), 4) if v else None

            out[key] = {"history_tokens": s, "rows": len(rows), "agreement": avg("agreement"), "top1": avg("top1"),
                        "delta_nll": avg("delta_nll"), "recency_agreement": avg("recency"),
                        "split_half_agreement": avg("split_half"),
                        "agreement_ci": bootstrap_ci([[r["agreement"] for r in rows]], lambda a: a, seed)}
            if out[key]["agreement"] is None:
                reasons[key] = "no row has two candidates with different counterfactual delta_nll"
    return dict(out, reasons=reasons)


def _ci(r, key):
    """' (90 % CI lo to hi)' from r[key], or '' when there is none."""
    ci = r.get(key)
    return "" if not ci else f" (90 % CI {ci[0]:.3f} to {ci[1]:.3f})"


def quality_lines(q):
    """One printed line per quality entry."""
    def f(v, fmt=".4f"):
        return "-" if v is None else format(v, fmt)
    lines = []
    for key, level, no_tail in QUALITY_LEVELS:
        r, name = q.get(key), f"L{level}" + (" no tail" if no_tail else "")
        if r is None:
            if key in q:  # absent: JSON from before the no-tail entries
                lines.append(f"quality   {name}: null ({q['reasons'].get(key, '')})")
            continue
        lines.append(f"quality   {name} s={r['history_tokens']} rows={r['rows']}: NLL raw {f(r['nll_raw'])} gists "
                     f"{f(r['nll_gists'])} dropped {f(r['nll_dropped'])} none {f(r['nll_none'])}  substitutability "
                     f"{f(r['substitutability'], '.3f')}{_ci(r, 'substitutability_ci')}  lm_guard {r['lm_guard']}"
                     + ("" if r["raw_fits_context"] else "  (raw reference beyond sequence_len)"))
    r = q.get("lens")
    lines.append(f"quality   lens: null ({q['reasons'].get('lens', '')})" if r is None else
                 f"quality   lens s={r['history_tokens']} rows={r['rows']}: pair agreement {f(r['agreement'], '.3f')}"
                 f"{_ci(r, 'agreement_ci')} "
                 f"(newest-first baseline {f(r.get('recency_agreement'), '.3f')}, "
                 f"split-half {f(r.get('split_half_agreement'), '.3f')}) "
                 f"top1 {f(r['top1'], '.3f')} best delta_nll {f(r['delta_nll'])} nats/row")
    return lines


def quality_problems(q, number_or_null):
    """What breaks the documented shape of the "quality" object (see the module docstring)."""
    if not isinstance(q, dict):
        return ["'quality' must be an object"]
    out = []
    levels = [(k, QUALITY_LEVEL_KEYS, ("lm_guard", "raw_fits_context"), no_tail) for k, _, no_tail in QUALITY_LEVELS]
    for name, keys, flags, optional in levels + [("lens", QUALITY_LENS_KEYS, (), False)]:
        if optional and name not in q:  # the no-tail entries: JSON from before them lacks them
            continue
        if name not in q:
            out.append(f"quality needs {name!r} (an object or null)")
            continue
        r = q[name]
        if r is None:
            continue
        if not isinstance(r, dict):
            out.append(f"quality[{name}] must be an object or null")
            continue
        for k in keys:
            if k not in r or not number_or_null(r[k]):
                out.append(f"quality[{name}][{k}] = {r.get(k)!r} is not a number or null")
        for k in flags:
            if not (r.get(k) is None or isinstance(r.get(k), bool)):
                out.append(f"quality[{name}][{k}] = {r.get(k)!r} is not a bool or null")
        for k in ("agreement", "top1", "recency_agreement", "split_half_agreement"):  # the last two: optional
            if (k in keys or k in r) and r.get(k) is not None and number_or_null(r[k]) and not 0 <= r[k] <= 1:
                out.append(f"quality[{name}][{k}] = {r[k]!r} is not in [0, 1]")
        ci = r.get("agreement_ci" if name == "lens" else "substitutability_ci")  # optional: older JSON lacks it
        if ci is not None and not (isinstance(ci, list) and len(ci) == 2 and all(number_or_null(v) and v is not None
                                                                                  for v in ci) and ci[0] <= ci[1]):
            out.append(f"quality[{name}] interval {ci!r} is not [lo, hi] with lo <= hi")
    reasons = q.get("reasons", {})
    if not isinstance(reasons, dict) or not all(isinstance(v, str) for v in reasons.values()):
        out.append("quality['reasons'] must map entries to strings")
    return out


def quality_markdown(q, c):
    """The quality table (one row per gist level) and the LensNet line."""
    def f(v):
        return "-" if v is None else f"{v:.4f}"
    reasons = q.get("reasons", {})
    rows = ["| level | history tokens | NLL raw | NLL gists | NLL dropped (raw tail only) | NLL none | "
            "substitutability (target >= 0.5) | LM guard (gists < none) |", "|---" * 8 + "|"]
    notes = []
    for key, lv, no_tail in QUALITY_LEVELS:
        r, level = q.get(key), f"{lv}, no raw tail" if no_tail else lv
        if r is None:
            if key in q:  # absent: JSON from before the no-tail entries
                rows.append(f"| {level} | - | - | - | - | - | - | - |")
                notes.append(f"level {level}: not measured ({reasons.get(key, 'no reason given')})")
            continue
        star = "" if r["raw_fits_context"] else "*"
        sub = "-" if r["substitutability"] is None else f"{r['substitutability']:.3f}{_ci(r, 'substitutability_ci')}"
        guard = "-" if r["lm_guard"] is None else ("pass" if r["lm_guard"] else "FAIL")
        rows.append(f"| {level} | {r['history_tokens']} | {f(r['nll_raw'])}{star} | {f(r['nll_gists'])} | "
                    f"{f(r['nll_dropped'])} | {f(r['nll_none'])} | {sub} | {guard} |")
        if r["substitutability"] is None and key in reasons:
            notes.append(f"level {level}: {reasons[key]}")
        if star:
            notes.append(f"*level {level}: the raw reference ({r['history_tokens'] + r['target_tokens']} tokens) "
                         f"exceeds the GPT's sequence length ({c['sequence_len']})")
    lens = q.get("lens")
    if lens is None:
        line = f"LensNet pair agreement: not measured ({reasons.get('lens', 'no reason given')})."
    else:
        ag = "-" if lens["agreement"] is None else f"{lens['agreement']:.3f}"
        t1 = "-" if lens["top1"] is None else f"{lens['top1']:.3f}"
        rec, half = lens.get("recency_agreement"), lens.get("split_half_agreement")
        line = (f"LensNet pair agreement with counterfactual delta_nll: **{ag}**{_ci(lens, 'agreement_ci')} (target >= "
                f"0.75, random 0.5" + ("" if rec is None else f", newest gist first {rec:.3f}")
                + ("" if half is None else f", the deltas' split-half agreement {half:.3f}") + "); "
                f"top-1 {t1} ({lens['rows']} rows, {lens['history_tokens']}-token histories)"
                + (f"; {reasons['lens']}." if lens["agreement"] is None and "lens" in reasons else "."))
    n = max([r["rows"] for r in (q.get("level_1"), q.get("level_2")) if r] or [0])
    if any(q.get(k) for k, _, no_tail in QUALITY_LEVELS if no_tail):
        notes.append("no raw tail: the whole history as gists, against no history at all (dropped = none); with "
                     "the tail, the ratio counts only what gists add beyond the tokens the working context keeps raw")
    return (f"### Gist quality and LensNet agreement (last {c['doc_target']} tokens of {n} stretches of validation "
            f"text)\n\n" + "\n".join(rows) + "\n" + "".join(f"\n{x}\n" for x in notes) + "\n" + line)
