"""
MegaContext long-context evaluation (DESIGN.md sections 10 and 12): every method at the same budget
on the same examples, written to JSON, to the report (markdown tables) and to PNG plots.

    python -m scripts.mc_eval --source sft                     # full counts (GPU sized)
    python -m scripts.mc_eval --source sft --quick             # small counts (dev/runcpu.sh)
    python -m scripts.mc_eval --random-init --depth 2 --quick  # no checkpoint: a smoke test / timing run

Methods (megacontext/baselines.py): truncation, sinks (StreamingLLM window), mean_pool (gists = mean
of children, no GistNet), mc_recency (GistNet gists, recency pyramid, no LensNet), mc_lensnet
(LensNet focus alone), megacontext (two-stage focus: LensNet shortlists, the reranker reads the raw
candidates with the question and picks; slot positions), megacontext_gaussian (the same working
context, gaussian positions), full (all tokens raw; null where the history exceeds the GPT's sequence_len). The
baselines read exactly the same number of GPT input slots, and the focused methods never more (focus stops
short of the budget once it has nothing near its needle left to open): counted and checked per example.

Tasks (tasks/longctx.py), filler = validation-shard text: passkey (5-digit key, greedy decoding, exact
match that rejects near misses) at history = multiple x budget for each --multiples and needle depths
--depths (trials cycle through the depths; 'random' draws one per trial); needle (multi-key with
near-miss decoys; the question names the key); kv_recall; long_doc (mean NLL of the last --doc-target
tokens of --doc-tokens stretches of validation text, and the share of the truncation->full gap closed);
quality (the training-proof figures, on the same validation text: per gist level, the target NLL with
the history raw / as gists / dropped to the raw tail / absent, the gists' substitutability for the raw
tokens and the LM guard, each also without a raw tail (the whole history as gists against none of it);
LensNet's pair agreement and top-1 against counterfactual expansions).

Output JSON: {"config", "passkey": {"<multiple>": {"<method>": acc}}, "needle": {...}, "kv_recall":
{...}, "long_doc": {"<method>": nll, "gap_closed": float}} plus extras: passkey_depth {"<multiple>":
{"<depth>": {"<method>": acc}}}, passkey_alignment {"<multiple>": {"<level>": {"n": trials, "<method>":
acc}}} (level = the coarsest block-tree boundary the needle sentence crosses: 0 inside one block, 1
across two blocks of one region, 2 across two level-2 regions, ...), lens_hit_rate {"<task>":
{"<multiple>": {"<method>": share of examples whose asked key (or needle) is raw in the working
context}}}, context_slots, long_doc_gap_closed (per method), position_scheme (slot vs gaussian),
timings, and quality: {"level_1": Q, "level_2": Q, "level_1_no_tail": Q, "level_2_no_tail": Q, "lens": L,
"reasons": {"<entry>": why it is null}}
with Q = null or {"history_tokens", "target_tokens", "rows", "nll_raw", "nll_gists", "nll_dropped",
"nll_none", "substitutability", "substitutability_ci" ([lo, hi]: a 90 % bootstrap interval over rows),
"lm_guard": bool, "raw_fits_context": bool} and L = null or {"history_tokens", "rows", "agreement",
"top1", "delta_nll" (the best single expansion's NLL drop, nats summed over the target, as the
objective's mc/delta_nll), "agreement_ci", "recency_agreement" (the agreement of ranking the newest gist
first), "split_half_agreement" (the target's first half's deltas ordering its second half's: how far
the ordering can be predicted at all)} (numbers may be null). Same checkpoint + flags -> same
numbers.

A checkpoint without GistNet/LensNet weights is an error; --baselines-only runs the methods that need
none (truncation, sinks, mean_pool, full) and reports the MegaContext methods (and quality) as null.
"""
import argparse
import dataclasses
import json
import os
import time

import numpy as np
import torch

from nanochat.common import UserError, autodetect_device_type, get_base_dir, run_main
from megacontext.baselines import (FOCUSED, MC_METHODS, METHODS, Models, answer_matches, boundary_level, build_contexts,
                                   continuation_nll, greedy_decode, span_is_raw)
from megacontext.eval_report import (EXACT_TASKS, alignment_lines, headline, mean_or_none, pct, report_markdown,
                                     validate_result, write_plots)
from megacontext.quality import QUALITY_LEVELS, doc_windows, quality_lines, quality_plan, run_quality

QUALITY_ENTRIES = [k for k, _, _ in QUALITY_LEVELS] + ["lens"]

TASK_IDS = {"passkey": 1, "needle": 2, "kv_recall": 3, "long_doc": 4, "quality": 5}
QUICK = {"trials": 6, "needle_trials": 4, "multiples": "1,4,16", "depths": "0.1,0.5,0.9", "docs": 4}
FULL = {"trials": 50, "needle_trials": None, "multiples": "1,4,16,64,256", "depths": "0.1,0.3,0.5,0.7,0.9", "docs": 50}
SECTION = "MegaContext evaluation"


# -----------------------------------------------------------------------------
# inputs: models, text, examples

class CachedTokenizer:
    """Memoizes encode() of long strings: the task generators re-encode the whole filler every example."""

    def __init__(self, tok):
        self.tok, self._cache = tok, {}

    def encode(self, text):
        if len(text) < 256:
            return self.tok.encode(text)
        if text not in self._cache:
            self._cache[text] = list(self.tok.encode(text))
        return self._cache[text]

    def decode(self, ids):
        return self.tok.decode(ids)


def random_init_models(args, device):
    from megacontext.checkpoint import build_mc_modules
    from megacontext.config import MCConfig
    from nanochat.gpt import GPT, config_from_depth
    from nanochat.tokenizer import get_tokenizer
    tok = get_tokenizer()
    cfg = MCConfig(budget=args.budget or 512, tail_tokens=128 if args.tail_tokens is None else args.tail_tokens)
    torch.manual_seed(args.seed)
    gpt = GPT(config_from_depth(args.depth, tok.get_vocab_size(), 2 * cfg.budget))
    gpt.init_weights()
    nets = {k: v.to(device).eval() for k, v in build_mc_modules(gpt, cfg, device="cpu").items()}
    info = {"source": "random-init", "model_tag": None, "step": None, "mc_weights": True}
    return Models(gpt.to(device).eval(), nets["gistnet"], nets["lensnet"], tok, cfg, nets["reranker"]), info


def checkpoint_models(args, device):
    """GPT + GistNet + LensNet + MCConfig of a checkpoint (GPT only, with --baselines-only, if MC weights lack)."""
    from megacontext.config import MCConfig
    from megacontext.runtime import MCSession
    try:
        s = MCSession.load(args.source, args.model_tag, args.step, device)
        models, info = Models(s.gpt, s.gistnet, s.lensnet, s.tokenizer, s.cfg, s.reranker), dict(s.source_info)
        info["mc_weights"] = True
    except UserError as e:  # SessionError, or the MC loader's "no MegaContext weights"
        if "no MegaContext weights" not in str(e) or not args.baselines_only:
            hint = " (or pass --baselines-only to evaluate the methods that need no MC weights)" \
                if "no MegaContext weights" in str(e) else ""
            raise UserError(f"{e}{hint}") from None
        from nanochat.checkpoint_manager import load_model
        gpt, tok, meta = load_model(args.source, device, "eval", model_tag=args.model_tag, step=args.step)
        gpt = gpt.float() if device.type != "cuda" else gpt
        models = Models(gpt, None, None, tok, MCConfig(), None)
        info = {"source": args.source, "model_tag": args.model_tag, "step": meta.get("step"), "mc_weights": False}
    changes = {k: v for k, v in (("budget", args.budget), ("tail_tokens", args.tail_tokens),
                                 ("rerank_k", args.rerank_k)) if v is not None}
    try:
        return models._replace(cfg=dataclasses.replace(models.cfg, **changes)), info
    except ValueError as e:
        raise UserError(str(e)) from None


def val_texts(max_chars):
    """Validation-shard documents in order, up to about max_chars characters (a full shard can be huge)."""
    from nanochat.dataset import parquets_iter_batched
    texts, n = [], 0
    for batch in parquets_iter_batched("val"):
        for t in batch:
            if t.strip() and n < max_chars:
                texts.append(t)
                n += len(t)
        if n >= max_chars:
            break
    if not texts:
        raise UserError("the validation shard holds no text: rebuild the data with `python -m nanochat.dataset`")
    return texts


def example_rng(seed, task, multiple, trial):
    """One generator per example: the same example whatever other flags (methods, trials) say."""
    return np.random.default_rng([seed, TASK_IDS[task], int(multiple), int(trial)])


def make_example(task, filler, tok, rng, n_tokens, depth=None):
    from tasks.longctx import MULTI_QUESTIONS_HELDOUT, kv_recall, multikey, passkey
    if task == "passkey":
        return passkey(filler, tok, rng, n_tokens, depth=depth)
    if task == "needle":  # asked with wording that midtraining never used
        return multikey(filler, tok, rng, n_tokens, questions=MULTI_QUESTIONS_HELDOUT)
    return kv_recall(filler, tok, rng, n_tokens)


def make_tree(ids, gistnet, gpt, cfg, chunk=1 << 15):
    """A RAM tree over the history (GistNet gists stored like the runtime's, in the storage dtype)."""
    from megacontext.tree import MCTree
    tree = MCTree.ram(cfg, gistnet, gpt.transformer.wte, vocab_size=gpt.config.vocab_size)
    for a in range(0, len(ids), chunk):
        tree.append(ids[a:a + chunk])
    return tree


# -----------------------------------------------------------------------------
# evaluation

def check_same_budget(ctxs, where):
    """The budgeted baselines must have read exactly the same number of GPT input slots, and the focused
    methods (FOCUSED: lens_focus may stop short of the budget) no more than they did."""
    slots = {m: c.slots for m, c in ctxs.items() if c is not None and m != "full"}
    fixed = {s for m, s in slots.items() if m not in FOCUSED}
    if len(fixed) > 1 or (fixed and any(s > max(fixed) for s in slots.values())):
        raise AssertionError(f"methods read different numbers of slots at {where}: {slots}")
    return slots


@torch.no_grad()
def eval_example(ex, models, methods, budget):
    """{method: (correct or None, slots or None, needle raw in the WC or None)} for one example."""
    gpt, gistnet, lensnet, tok, cfg, reranker = models
    hist = ex.ids[:ex.answer_span[0]]  # history + question: the question is the present (raw tail)
    n_new = ex.answer_span[1] - ex.answer_span[0] + 1  # one more token, so an extra digit is seen
    tree = make_tree(hist, gistnet, gpt, cfg) if any(m in MC_METHODS for m in methods) else None
    ctxs = build_contexts(hist, budget, cfg, gpt, methods, gistnet, lensnet, tree, reranker)
    check_same_budget(ctxs, f"{len(hist)} tokens")
    out = {}
    for m, c in ctxs.items():
        if c is None:
            out[m] = (None, None, None)
            continue
        ok = answer_matches(tok.decode(greedy_decode(gpt, c, n_new)), ex.answer)
        asked = (getattr(ex, "key_spans", None) or ex.needle_spans)[0]  # the key's tokens when known
        hit = span_is_raw(c.wc, asked, cfg.block_size) if c.wc is not None else None
        out[m] = (ok, c.slots, hit)
    return out


def run_exact_task(task, models, methods, budget, multiples, trials, depths, filler, seed, progress=True):
    """Accuracy, slots and LensNet hit rates per multiple and method (+ per depth and per needle alignment,
    `boundary_level` of the needle sentence, for passkey)."""
    from tqdm import tqdm
    tok = models.tok
    acc, slots, hits, by_depth, by_align = {}, {}, {}, {}, {}
    bar = tqdm(total=len(multiples) * trials, desc=task, disable=not progress, leave=False)
    skipped = []
    for mult in multiples:
        recs = []
        for t in range(trials):
            depth = depths[t % len(depths)] if task == "passkey" and depths else None  # None: a random depth
            try:
                ex = make_example(task, filler, tok, example_rng(seed, task, mult, t), mult * budget, depth)
            except ValueError as e:  # the history cannot hold the needles (a tiny budget): the cell is null
                if "too short" not in str(e):
                    raise
                skipped.append(f"{task} {mult}x: {e}")
                bar.update(trials - t)
                break
            align = (boundary_level(ex.needle_spans[0], models.cfg.block_size, models.cfg.max_level)
                     if task == "passkey" else None)
            recs.append((depth, eval_example(ex, models, methods, budget), align))
            bar.update(1)
        recs = recs if len(recs) == trials else []
        k = str(mult)
        acc[k] = {m: mean_or_none(r[m][0] for _, r, _ in recs) for m in methods}
        slots[k] = {m: mean_or_none(r[m][1] for _, r, _ in recs) for m in methods}
        hits[k] = {m: mean_or_none(r[m][2] for _, r, _ in recs) for m in methods
                   if m not in ("truncation", "sinks", "full")}
        if task == "passkey" and depths:
            by_depth[k] = {str(d): {m: mean_or_none(r[m][0] for dd, r, _ in recs if dd == d) for m in methods}
                           for d in depths}
        if task == "passkey":
            by_align[k] = {str(L): {"n": sum(a == L for *_, a in recs),
                                    **{m: mean_or_none(r[m][0] for _, r, a in recs if a == L) for m in methods}}
                           for L in sorted({a for *_, a in recs})}
    bar.close()
    return acc, slots, hits, by_depth, by_align, skipped


@torch.no_grad()
def run_long_doc(models, methods, budget, texts, doc_tokens, target, n_docs, progress=True):
    """Mean NLL (nats/token) of each window's last `target` tokens given the rest, per method; gap closed."""
    from tqdm import tqdm
    gpt, gistnet, lensnet, tok, cfg, reranker = models
    windows = doc_windows(texts, tok, doc_tokens, n_docs)
    sums = {m: 0.0 for m in methods}
    counts = {m: 0 for m in methods}
    for w in tqdm(windows, desc="long_doc", disable=not progress, leave=False):
        hist, tgt = w[:-target], w[-target:]
        tree = make_tree(hist, gistnet, gpt, cfg) if any(m in MC_METHODS for m in methods) else None
        ctxs = build_contexts(hist, budget, cfg, gpt, methods, gistnet, lensnet, tree, reranker)
        check_same_budget(ctxs, f"long_doc {len(hist)} tokens")
        for m, c in ctxs.items():
            if c is not None:
                s, n = continuation_nll(gpt, c, tgt)
                sums[m] += s
                counts[m] += n
    nll = {m: round(sums[m] / counts[m], 4) if counts[m] else None for m in methods}
    return nll, gaps_closed(nll), len(windows)


def gaps_closed(nll):
    """Each method's share of the truncation -> full NLL gap it closes; None where undefined, including
    when full attention is not better than truncation (no gap to close)."""
    lo, hi = nll.get("full"), nll.get("truncation")
    gaps = {}
    for m, v in nll.items():
        if m in ("truncation", "full") or v is None or lo is None or hi is None or hi - lo < 1e-6:
            gaps[m] = None
        else:
            gaps[m] = round((hi - v) / (hi - lo), 4)
    return gaps


# -----------------------------------------------------------------------------
# quality: gist substitutability per level and LensNet pair agreement (the training-proof figures)


def position_verdict(res):
    """slot vs gaussian: mean accuracy over every exact-match cell; long-doc NLL breaks ties."""
    a = {"slot": [], "gaussian": []}
    for task in EXACT_TASKS:
        for cell in res[task].values():
            s, g = cell.get("megacontext"), cell.get("megacontext_gaussian")
            if s is not None and g is not None:
                a["slot"].append(s)
                a["gaussian"].append(g)
    out = {"cells": len(a["slot"]), "mean_acc_slot": mean_or_none(a["slot"]),
           "mean_acc_gaussian": mean_or_none(a["gaussian"]),
           "long_doc_nll_slot": res["long_doc"].get("megacontext"),
           "long_doc_nll_gaussian": res["long_doc"].get("megacontext_gaussian")}
    winner = None
    if out["cells"]:
        d = out["mean_acc_slot"] - out["mean_acc_gaussian"]
        winner = "slot" if d > 1e-9 else "gaussian" if d < -1e-9 else None
        if winner is None and None not in (out["long_doc_nll_slot"], out["long_doc_nll_gaussian"]):
            d = out["long_doc_nll_gaussian"] - out["long_doc_nll_slot"]
            winner = "slot" if d > 1e-6 else "gaussian" if d < -1e-6 else None
        winner = winner or "tie"
    out["winner"] = winner
    return out


# -----------------------------------------------------------------------------

def parse_list(s, typ, name):
    try:
        vals = [typ(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--{name} must be a comma list, got {s!r}") from None
    if not vals:
        raise UserError(f"--{name} is empty")
    return vals


def main(argv=None):
    p = argparse.ArgumentParser(description="MegaContext long-context evaluation: passkey, multi-key needle, key-value "
                                            "recall and long-document NLL, every method at the same budget.")
    p.add_argument("--source", choices=["base", "mid", "sft"], default=None, help="checkpoint stage to evaluate")
    p.add_argument("--model-tag", default=None)
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--out", default=None, help="JSON output (default: $NANOCHAT_BASE_DIR/report/mc_eval.json); "
                                               "plots go beside it")
    p.add_argument("--random-init", action="store_true", help="evaluate a random-init model (no checkpoint)")
    p.add_argument("--depth", type=int, default=2, help="random-init GPT depth (default 2)")
    p.add_argument("--baselines-only", action="store_true",
                   help="a checkpoint without MegaContext weights: run truncation/sinks/mean_pool/full only")
    p.add_argument("--budget", type=int, default=None, help="working-context budget (default: the checkpoint's; 512)")
    p.add_argument("--tail-tokens", type=int, default=None, help="protected raw tail (default: the checkpoint's; 128)")
    p.add_argument("--rerank-k", type=int, default=None, help="LensNet shortlist the reranker picks from (default: "
                                                              "the checkpoint's; 0: LensNet alone)")
    # the counts below default to None so that --quick lowers only what the user did not pass
    p.add_argument("--trials", type=int, default=None, help="passkey examples per history multiple (default 50)")
    p.add_argument("--needle-trials", type=int, default=None, help="multi-key / kv-recall examples per multiple "
                                                                   "(default: --trials)")
    p.add_argument("--multiples", default=None, help="histories as multiples of the budget (default 1,4,16,64,256)")
    p.add_argument("--depths", default=None, help="passkey needle depths (fractions; default 0.1,0.3,0.5,0.7,0.9), "
                                                  "or 'random': a uniform random depth per trial (no depth table). A "
                                                  "fixed depth puts every trial's needle at nearly the same token, "
                                                  "hence the same block alignment")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--tasks", default="passkey,needle,kv_recall,long_doc,quality")
    p.add_argument("--docs", type=int, default=None, help="long-document stretches (default 50)")
    p.add_argument("--doc-tokens", type=int, default=None, help="tokens per long-document stretch, history + "
                                                                "target (default: the GPT's sequence_len)")
    p.add_argument("--doc-target", type=int, default=64, help="scored tokens at the end of each stretch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help=f"small counts for CPU runs: {QUICK}")
    p.add_argument("--no-report", action="store_true", help="do not write the report section")
    p.add_argument("--device", default=None, help="cuda / mps / cpu (default: autodetect)")
    args = p.parse_args(argv)
    for k, v in (QUICK if args.quick else FULL).items():  # quick lowers only what the user did not pass
        if getattr(args, k) is None:
            setattr(args, k, v)
    if (args.source is None) == (not args.random_init):
        raise UserError("pass exactly one of --source {base,mid,sft} or --random-init")
    multiples = sorted(set(parse_list(args.multiples, int, "multiples")))
    depths = None if args.depths == "random" else parse_list(args.depths, float, "depths")
    methods = parse_list(args.methods, str, "methods")
    tasks = parse_list(args.tasks, str, "tasks")
    bad = [m for m in methods if m not in METHODS] + [t for t in tasks if t not in TASK_IDS]
    if bad:
        raise UserError(f"unknown method/task {bad}: methods are {METHODS}, tasks {tuple(TASK_IDS)}")
    if multiples[0] < 1 or not all(0 <= d <= 1 for d in depths or []) or args.trials < 1 or args.docs < 1:
        raise UserError("--multiples must be >= 1, --depths in [0, 1] (or 'random'), --trials and --docs >= 1")
    needle_trials = args.needle_trials or args.trials
    device = torch.device(args.device or autodetect_device_type())
    t_start = time.perf_counter()
    load = random_init_models if args.random_init else checkpoint_models
    models, info = load(args, device)
    gpt, cfg = models.gpt, models.cfg
    if not info["mc_weights"]:
        methods = [m for m in methods if m not in MC_METHODS]
        print(f"warning: {args.source} checkpoint has no MegaContext weights: running {methods} only")
    budget = cfg.budget
    doc_tokens = args.doc_tokens or gpt.config.sequence_len
    if doc_tokens <= args.doc_target or args.doc_target < 2:
        raise UserError(f"--doc-tokens ({doc_tokens}) must exceed --doc-target ({args.doc_target}) >= 2")
    models = models._replace(tok=CachedTokenizer(models.tok))
    # enough text for the longest history several times over (~4 characters per token) and the long documents
    q_hist, _ = quality_plan(cfg, gpt.config.sequence_len, args.doc_target)
    q_tokens = max([s + args.doc_target + 1 for s in q_hist.values() if s] or [0]) if "quality" in tasks else 0
    texts = val_texts(max(4_000_000, 24 * multiples[-1] * budget, 24 * args.docs * max(doc_tokens, q_tokens)))
    filler = " ".join(texts)
    out = args.out or os.path.join(get_base_dir(), "report", "mc_eval.json")
    config = {"source": info["source"], "model_tag": info.get("model_tag"), "step": info.get("step"),
              "mc_weights": info["mc_weights"], "device": str(device), "n_layer": gpt.config.n_layer,
              "n_embd": gpt.config.n_embd, "vocab": gpt.config.vocab_size, "sequence_len": gpt.config.sequence_len,
              "budget": budget, "block_size": cfg.block_size, "tail_tokens": cfg.tail_tokens,
              "max_level": cfg.max_level, "positions": cfg.positions, "methods": methods, "tasks": tasks,
              "multiples": multiples, "depths": depths or "random", "trials": args.trials,
              "needle_trials": needle_trials,
              "docs": args.docs, "doc_tokens": doc_tokens, "doc_target": args.doc_target, "seed": args.seed,
              "quick": args.quick}
    res = {"config": config, "passkey": {}, "needle": {}, "kv_recall": {}, "long_doc": {"gap_closed": None},
           "passkey_depth": {}, "passkey_alignment": {}, "lens_hit_rate": {}, "context_slots": {},
           "long_doc_gap_closed": {}, "skipped": [],
           "timings": {}, "quality": {**dict.fromkeys(QUALITY_ENTRIES),
                                      "reasons": dict.fromkeys(QUALITY_ENTRIES, "not in --tasks")}}
    print(f"mc_eval: {info['source']} GPT depth {gpt.config.n_layer} width {gpt.config.n_embd}, budget {budget}, "
          f"methods {methods}, device {device}")
    for task in EXACT_TASKS:
        if task not in tasks:
            continue
        t0 = time.perf_counter()
        n = args.trials if task == "passkey" else needle_trials
        acc, slots, hits, by_depth, by_align, skipped = run_exact_task(task, models, methods, budget, multiples, n,
                                                                       depths, filler, args.seed)
        res[task], res["context_slots"][task], res["lens_hit_rate"][task] = acc, slots, hits
        res["skipped"] += skipped
        if task == "passkey":
            res["passkey_depth"], res["passkey_alignment"] = by_depth, by_align
        res["timings"][task] = round(time.perf_counter() - t0, 2)
        for mult, cell in acc.items():
            print(f"{task:9s} {mult:>4s}x  " + "  ".join(f"{m} {pct(v)}" for m, v in cell.items()))
        for line in alignment_lines(res["passkey_alignment"], methods) if task == "passkey" else ():
            print(line)
    if "long_doc" in tasks:
        t0 = time.perf_counter()
        nll, gaps, used = run_long_doc(models, methods, budget, texts, doc_tokens, args.doc_target, args.docs)
        res["long_doc"] = dict(nll, gap_closed=gaps.get("megacontext"))
        res["long_doc_gap_closed"] = gaps
        res["timings"]["long_doc"] = round(time.perf_counter() - t0, 2)
        print("long_doc  NLL  " + "  ".join(f"{m} {'-' if v is None else f'{v:.4f}'}" for m, v in nll.items())
              + f"  gap closed {res['long_doc']['gap_closed']}")
    else:
        used = 0
    if "quality" in tasks:
        t0 = time.perf_counter()
        res["quality"] = run_quality(models, texts, args.doc_target, args.docs, args.seed)
        res["skipped"] += [f"quality {k}: {v}" for k, v in res["quality"]["reasons"].items()]
        res["timings"]["quality"] = round(time.perf_counter() - t0, 2)
        for line in quality_lines(res["quality"]):
            print(line)
    config["docs_used"] = used
    res["position_scheme"] = position_verdict(res)
    res["timings"]["total"] = round(time.perf_counter() - t_start, 2)
    validate_result(res)
    out_dir = os.path.dirname(os.path.abspath(out))
    os.makedirs(out_dir, exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=2)
    images = write_plots(res, out_dir)
    print(f"wrote {out} and {', '.join(os.path.basename(p) for p in images.values())}; "
          f"slot vs gaussian: {res['position_scheme']['winner']}; {res['timings']['total']:.0f} s")
    if not args.no_report:
        from nanochat.report import get_report
        report_dir = os.path.join(get_base_dir(), "report")
        links = {k: os.path.relpath(v, report_dir) if os.path.dirname(os.path.abspath(v)) == report_dir else v
                 for k, v in images.items()}
        get_report().log(SECTION, [headline(res), report_markdown(res, links)])
    return res


if __name__ == "__main__":
    run_main(main)
