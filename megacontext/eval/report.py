"""
The documented shape of scripts/mc_eval.py's JSON result (`validate_result`), its report section
(markdown tables: per-task accuracy, passkey by depth and by needle alignment, long-document NLL, the
quality figures, the slot/gaussian verdict, where MegaContext loses), the summary bullets and the plots.
"""
import math
import os
import re

from megacontext.eval.quality import quality_markdown, quality_problems
from megacontext.eval.stats import fmt

EXACT_TASKS = ("passkey", "needle", "kv_recall", "qa1", "qa2", "qa3")  # the qa tasks only when asked for
BASELINES = ("truncation", "sinks", "mean_pool", "bm25", "bm25_truncate")  # the budgeted methods MC must beat
CHAT_NAMES = {"passkey": "passkey", "needle": "multi-key", "kv_recall": "key-value recall",
              "chat_memory": "chat memory", "qa1": "qa1 (one supporting fact)", "qa2": "qa2 (two supporting facts)",
              "qa3": "qa3 (three supporting facts)"}


def mean_or_none(xs):
    xs = [float(x) for x in xs if x is not None]
    return round(sum(xs) / len(xs), 4) if xs else None


def validate_result(res):
    """Raise ValueError naming what breaks the documented JSON shape (docs/architecture.md)."""
    problems = []

    def number_or_null(v):
        return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))

    for key in ("config", "passkey", "needle", "kv_recall", "long_doc"):
        if not isinstance(res.get(key), dict):
            problems.append(f"{key!r} must be an object")
    for task in EXACT_TASKS:
        for mult, cell in (res.get(task) or {}).items():
            if not re.fullmatch(r"\d+(\.\d+)?", mult) or not isinstance(cell, dict):
                problems.append(f"{task}[{mult!r}] must map a multiple (a number) to {{method: accuracy}}")
                continue
            for m, v in cell.items():
                if not number_or_null(v) or (v is not None and not 0 <= v <= 1):
                    problems.append(f"{task}[{mult}][{m}] = {v!r} is not an accuracy in [0, 1] or null")
    for task, view in (res.get("chat") or {}).items():
        for mult, cell in (view.get("acc") or {}).items() if isinstance(view, dict) else [("?", None)]:
            if not isinstance(cell, dict) or not all(number_or_null(v) and (v is None or 0 <= v <= 1)
                                                     for v in cell.values()):
                problems.append(f"chat[{task}].acc[{mult}] must map methods to accuracies in [0, 1] or null")
    for mult, row in (res.get("passkey_alignment") or {}).items():
        for level, cell in row.items() if isinstance(row, dict) else [(None, None)]:
            if not (str(level).isdigit() and isinstance(cell, dict) and isinstance(cell.get("n"), int)
                    and all(number_or_null(v) and (v is None or 0 <= v <= 1) for m, v in cell.items() if m != "n")):
                problems.append(f"passkey_alignment[{mult}] must map levels (digits) to {{'n': trials, method: "
                                f"accuracy}}, got {level!r}: {cell!r}")
    ld = res.get("long_doc") or {}
    if "gap_closed" not in ld:
        problems.append("long_doc needs 'gap_closed'")
    for m, v in ld.items():
        if not number_or_null(v):
            problems.append(f"long_doc[{m}] = {v!r} is not a number or null")
    if "quality" in res:  # main always writes it; older JSON may lack it
        problems += quality_problems(res["quality"], number_or_null)
    if problems:
        raise ValueError("mc_eval JSON does not match its documented shape: " + "; ".join(problems))
    return True


def focus_method(methods):
    """The method the per-depth and per-alignment tables show: megacontext when it ran."""
    return "megacontext" if "megacontext" in methods else methods[0]


def depth_grid(res):
    """{multiple: {depth: accuracy}} of focus_method's passkey cells."""
    focus = focus_method(res["config"]["methods"])
    return {m: {d: v.get(focus) for d, v in row.items()} for m, row in res["passkey_depth"].items()}


def pct(v):
    return "-" if v is None else f"{100 * v:.1f}%"


def _acc_table(table, methods, intervals=None):
    """Accuracy per method and multiple, with its 95 % Wilson interval and trial count where known."""
    mults = list(table)
    lines = ["| method | " + " | ".join(f"{m}x" for m in mults) + " |", "|---" * (len(mults) + 1) + "|"]
    for meth in [x for x in methods if any(x in table[m] for m in mults)]:
        cells = []
        for m in mults:
            iv = ((intervals or {}).get(m) or {}).get(meth) or {}
            cells.append(fmt(table[m].get(meth), iv.get("ci"), iv.get("n")))
        lines.append(f"| {meth} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def losses(res, methods):
    """Cells where full MegaContext does worse than the best budgeted baseline (quoted in the report)."""
    out = []
    tables = [(task, res[task]) for task in EXACT_TASKS if res.get(task)]
    tables += [(f"chat {t}", v["acc"]) for t, v in res.get("chat", {}).items()]
    for task, table in tables:
        for mult, cell in table.items():
            mc = cell.get("megacontext")
            base = {b: cell.get(b) for b in BASELINES if cell.get(b) is not None}
            if mc is not None and base and max(base.values()) > mc:
                b = max(base, key=base.get)
                out.append(f"{task} {mult}x: megacontext {pct(mc)} < {b} {pct(base[b])}")
    ld = res["long_doc"]
    base = {b: ld.get(b) for b in BASELINES if ld.get(b) is not None}
    if ld.get("megacontext") is not None and base and min(base.values()) < ld["megacontext"]:
        b = min(base, key=base.get)
        out.append(f"long_doc: megacontext NLL {ld['megacontext']:.4f} > {b} {base[b]:.4f}")
    return out


def report_markdown(res, images):
    """The report section body: tables, plots (images: {name: path or link}), the slot/gaussian verdict."""
    c = res["config"]
    methods = c["methods"]
    pv = res["position_scheme"]
    parts = [f"The baselines read the same number of GPT input slots, the focused methods at most as many (budget "
             f"{c['budget']}, block {c['block_size']}; mean slots read per cell: `context_slots` in the JSON); "
             f"`full` reads the whole history where it fits the GPT's sequence length ({c['sequence_len']}). "
             f"Model: {c['source']}" + (f" step {c['step']}" if c.get("step") is not None else "") +
             (" (random init: numbers are a smoke test, not evidence)" if c["source"] == "random-init" else "") + "."]
    parts.append("Cells: accuracy (95 % Wilson interval, trials).")
    parts.append(f"### Passkey retrieval (exact match, {c['trials']} trials per cell, depths {c['depths']})\n\n"
                 + _acc_table(res["passkey"], methods, res.get("intervals", {}).get("passkey")))
    if "passkey" in images:
        parts.append(f"![passkey accuracy vs history]({images['passkey']})")
    if res.get("passkey_depth"):
        focus, grid = focus_method(methods), depth_grid(res)
        depths = list(next(iter(grid.values())))
        lines = ["| depth | " + " | ".join(f"{m}x" for m in grid) + " |", "|---" * (len(grid) + 1) + "|"]
        lines += [f"| {float(d):.0%} | " + " | ".join(pct(grid[m][d]) for m in grid) + " |" for d in depths]
        parts.append(f"### Passkey by needle depth ({focus})\n\n" + "\n".join(lines) + "\n")
        if "depth" in images:
            parts.append(f"![passkey depth x length]({images['depth']})")
    if res.get("passkey_alignment"):
        parts.append(alignment_markdown(res["passkey_alignment"], methods))
    parts.append(f"### Multi-key needle with near-miss decoys ({c['needle_trials']} trials per cell)\n\n"
                 + _acc_table(res["needle"], methods, res.get("intervals", {}).get("needle")))
    parts.append(f"### Key-value recall ({c['needle_trials']} trials per cell)\n\n"
                 + _acc_table(res["kv_recall"], methods, res.get("intervals", {}).get("kv_recall")))
    for task in ("qa1", "qa2", "qa3"):
        if res.get(task):
            parts.append(f"### {CHAT_NAMES[task]} in raw text ({c['needle_trials']} trials per cell)\n\n"
                         + _acc_table(res[task], methods, res.get("intervals", {}).get(task)))
    for task, view in res.get("chat", {}).items():
        parts.append(f"### In chat: {CHAT_NAMES.get(task, task)} (the history as conversation turns, the question as "
                     f"the last user turn, the reply scored; `session`: through MCSession.chat, `session_reopened`: "
                     f"after the memory was saved and reopened)\n\n"
                     + _acc_table(view["acc"], methods, view["intervals"]))
    ld, gaps = res["long_doc"], res.get("long_doc_gap_closed", {})
    rows = ["| method | NLL (nats/token) | share of truncation->full gap closed |", "|---|---|---|"]
    rows += [f"| {m} | {'-' if ld.get(m) is None else f'{ld[m]:.4f}'} | {pct(gaps.get(m))} |" for m in methods]
    parts.append(f"### Long-document NLL (last {c['doc_target']} of {c['doc_tokens']} tokens, {c['docs_used']} "
                 f"stretches of validation text)\n\n" + "\n".join(rows) + "\n")
    hit = res.get("lens_hit_rate", {}).get("passkey", {})
    if hit:
        hm = [m for m in ("mean_pool", "mc_recency", "megacontext") if m in methods]
        lines = ["| method | " + " | ".join(f"{m}x" for m in hit) + " |", "|---" * (len(hit) + 1) + "|"]
        lines += [f"| {m} | " + " | ".join(pct(hit[k].get(m)) for k in hit) + " |" for m in hm]
        parts.append("### Passkey needle raw in the working context (LensNet hit rate)\n\n" + "\n".join(lines) + "\n")
    if res.get("quality") and "quality" in c.get("tasks", ["quality"]):
        parts.append(quality_markdown(res["quality"], c))
    verdict = ("not measured (needs megacontext and megacontext_gaussian, i.e. MC weights)" if pv["winner"] is None else
               f"**{pv['winner']}** (mean accuracy over {pv['cells']} cells: slot {pct(pv['mean_acc_slot'])}, "
               f"gaussian {pct(pv['mean_acc_gaussian'])}; long-doc NLL slot {pv['long_doc_nll_slot']}, "
               f"gaussian {pv['long_doc_nll_gaussian']})")
    parts.append(f"### Position scheme: slot vs gaussian\n\nWinner on this checkpoint: {verdict}.")
    lost = losses(res, methods) if pv["winner"] is not None else []
    parts.append("### Where MegaContext loses\n\n" + ("\n".join(f"- {x}" for x in lost) if lost else
                 "No cell where full MegaContext is below the best budgeted baseline."))
    return "\n\n".join(parts) + "\n"


ALIGN_NAMES = {0: "inside one block", 1: "across two blocks", 2: "across two level-2 regions"}


def _align_name(level):
    return ALIGN_NAMES.get(int(level), f"across two level-{level} nodes")


def alignment_lines(by_align, methods):
    """One printed line per multiple: megacontext's passkey accuracy (trials) per needle alignment."""
    focus = focus_method(methods)
    return [f"passkey   {mult:>4s}x  {focus} by needle alignment: "
            + ", ".join(f"{_align_name(L)} {pct(c.get(focus))} ({c['n']})" for L, c in row.items())
            for mult, row in by_align.items()]


def alignment_markdown(by_align, methods):
    """Passkey accuracy by the coarsest tree boundary the needle crosses (cells: accuracy (trials))."""
    focus = focus_method(methods)
    levels = sorted({L for row in by_align.values() for L in row}, key=int)
    lines = ["| needle | " + " | ".join(f"{m}x" for m in by_align) + " |", "|---" * (len(by_align) + 1) + "|"]
    for L in levels:
        cells = [by_align[m].get(L) for m in by_align]
        lines.append(f"| {_align_name(L)} | " + " | ".join("-" if c is None else f"{pct(c.get(focus))} ({c['n']})"
                                                          for c in cells) + " |")
    return (f"### Passkey by needle alignment ({focus}; accuracy (trials))\n\n"
            "A needle across a level-L boundary is shown raw only with two level-L nodes opened.\n\n"
            + "\n".join(lines) + "\n")


def headline(res):
    """A few '- key: value' bullets for the report's summary table (MC column)."""
    out = {}
    for m in ("truncation", "megacontext"):
        v = mean_or_none(cell.get(m) for cell in res["passkey"].values())
        if v is not None:
            out[f"mc passkey acc {m}"] = v
    if res["long_doc"].get("gap_closed") is not None:
        out["mc long_doc gap_closed"] = res["long_doc"]["gap_closed"]
    q = res.get("quality") or {}
    for key, name in (("level_1", "L1"), ("level_1_no_tail", "L1 no tail")):
        if (q.get(key) or {}).get("substitutability") is not None:
            out[f"mc gist substitutability {name}"] = q[key]["substitutability"]
    if (q.get("lens") or {}).get("agreement") is not None:
        out["mc lens pair agreement"] = q["lens"]["agreement"]
    return out


def write_plots(res, out_dir):
    from megacontext.eval.plots import plot_accuracy_vs_multiple, plot_depth_heatmap
    paths = {"passkey": plot_accuracy_vs_multiple(res["passkey"], os.path.join(out_dir, "mc_eval_passkey.png"),
                                                  intervals=res.get("intervals", {}).get("passkey"))}
    if res.get("passkey_depth"):
        paths["depth"] = plot_depth_heatmap(depth_grid(res), os.path.join(out_dir, "mc_eval_depth.png"),
                                            title=f"{focus_method(res['config']['methods'])}: passkey accuracy "
                                                  "by needle depth")
    return paths
