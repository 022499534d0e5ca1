"""
MegaContext long-context evaluation (docs/architecture.md): every method at the same budget
on the same examples, written to JSON, to the report (markdown tables) and to PNG plots.

    python -m scripts.mc_eval --source sft                     # full counts (GPU sized)
    python -m scripts.mc_eval --source sft --quick             # small counts (dev/runcpu.sh)
    python -m scripts.mc_eval --random-init --depth 2 --quick  # no checkpoint: a smoke test / timing run

Methods (megacontext/eval/baselines.py): truncation, sinks (StreamingLLM window), mean_pool (gists = mean
of children, no GistNet), mc_recency (GistNet gists, recency pyramid, no LensNet), mc_lensnet
(LensNet focus alone), megacontext (two-stage focus: LensNet shortlists, the reranker reads the raw
candidates with the question and picks; slot positions), megacontext_gaussian (the same working
context, gaussian positions), bm25 (retrieval: the history's 32-token blocks ranked by BM25 against the
question, the best opened raw with their neighbours, the rest of the budget the gist pyramid focus starts
from), bm25_truncate (the same blocks, the rest the newest raw tokens: a plain RAG prompt), oracle (exactly
the blocks the answer needs opened: the ceiling of any focus), full (all tokens raw; null where the history
exceeds the GPT's sequence_len), and in the chat view session / session_reopened (the conversation ingested
into an MCSession, the question asked with MCSession.chat; the second after the memory was saved to disk and
reopened). The baselines read exactly the same number of GPT input slots, and the focused methods never more:
counted and checked per example.

Tasks (tasks/longctx.py), the evaluation half of every task (tasks/splits.py: needle sentences, question
wordings, names and keys training never used) in held-out filler (--filler heldout: a public-domain corpus no
training stage reads, `python -m nanochat.dataset --heldout`): passkey (5-digit key, greedy decoding, exact
match that rejects near misses) at history = multiple x budget for each --multiples and needle depths
--depths (trials cycle through the depths; 'random' draws one per trial); needle (multi-key with
near-miss decoys; the question names the key); kv_recall; each asked in raw text and as a conversation
(--views raw,chat: facts stated by the user, pasted text and small talk, the question as the last user turn,
the reply scored strictly); chat_memory (chat only: a fact the user states early, same-kind decoys about
others, asked back many turns later); long_doc (mean NLL of the last --doc-target
tokens of --doc-tokens stretches of validation text, and the share of the truncation->full gap closed);
quality (the training-proof figures, on the same validation text: per gist level, the target NLL with
the history raw / as gists / dropped to the raw tail / absent, the gists' substitutability for the raw
tokens and the LM guard, each also without a raw tail (the whole history as gists against none of it);
LensNet's pair agreement and top-1 against counterfactual expansions, beside its split-half ceiling).
Every accuracy carries its trial count and 95 % Wilson interval, in the JSON ("intervals"), the console,
the report and the plots' error bars.

Output JSON: {"config", "passkey": {"<multiple>": {"<method>": acc}}, "needle": {...}, "kv_recall":
{...}, "long_doc": {"<method>": nll, "gap_closed": float}, "intervals": {"<task>": {"<multiple>":
{"<method>": {"n": trials, "ci": [lo, hi]}}}}, "chat": {"<task>": {"acc", "intervals", "context_slots",
"hit_rate"}}} plus extras: passkey_depth {"<multiple>":
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
none (truncation, sinks, mean_pool, bm25_truncate, full) and reports the MegaContext methods (and quality) as
null.
"""
import argparse
import dataclasses
import json
import os
import time

import torch

from nanochat.common import UserError, autodetect_device_type, get_base_dir, run_main
from nanochat.report import git_commit
from megacontext.eval.baselines import ALL_METHODS, MC_METHODS, Models
from megacontext.eval.harness import (CHAT_TASKS, RAW_TASKS, SESSION_METHODS, TASK_IDS, CachedTokenizer,
                                      position_verdict, run_exact_task, run_long_doc, val_texts)
from megacontext.eval.report import (EXACT_TASKS, alignment_lines, headline, report_markdown, validate_result,
                                     write_plots)
from megacontext.eval.quality import QUALITY_LEVELS, quality_lines, quality_plan, run_quality
from megacontext.eval.stats import fmt

QUALITY_ENTRIES = [k for k, _, _ in QUALITY_LEVELS] + ["lens"]

METHODS = ALL_METHODS + SESSION_METHODS
VIEWS = ("raw", "chat")
QUICK = {"trials": 6, "needle_trials": 4, "multiples": "1,4,16", "depths": "0.1,0.5,0.9", "docs": 4}
# >= 100 trials a cell: a 95 % interval at 100 % then reaches down to 96 %
FULL = {"trials": 100, "needle_trials": None, "multiples": "0.5,1,4,16,64,256", "depths": "0.1,0.3,0.5,0.7,0.9",
        "docs": 50}
SECTION = "MegaContext evaluation"


# -----------------------------------------------------------------------------
# the models

def random_init_models(args, device):
    from megacontext.checkpoint import build_mc_modules
    from megacontext.config import MCConfig
    from nanochat.gpt import GPT, config_from_depth
    from nanochat.tokenizer import get_tokenizer
    tok = get_tokenizer()
    cfg = MCConfig(budget=args.budget or 512, tail_tokens=args.tail_tokens)
    torch.manual_seed(args.seed)
    gpt = GPT(config_from_depth(args.depth, tok.get_vocab_size(), 2 * cfg.budget))
    gpt.init_weights()
    nets = {k: v.to(device).eval() for k, v in build_mc_modules(gpt, cfg, device="cpu").items()}
    info = {"source": "random-init", "model_tag": None, "step": None, "mc_weights": True}
    return Models(gpt.to(device).eval(), nets["gistnet"], nets["lensnet"], tok, cfg, nets["reranker"]), info


def checkpoint_models(args, device):
    """GPT + GistNet + LensNet + MCConfig of a checkpoint (GPT only, with --baselines-only, if MC weights lack)."""
    from megacontext.checkpoint import load_mc_checkpoint
    from megacontext.config import MCConfig
    try:
        m = load_mc_checkpoint(args.source, args.model_tag, args.step, device)
        models, info = Models(m.gpt, m.gistnet, m.lensnet, m.tokenizer, m.cfg, m.reranker), dict(m.source_info)
        info["mc_weights"] = True
    except UserError as e:  # a missing checkpoint, or the MC loader's "no MegaContext weights"
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


# -----------------------------------------------------------------------------

def multiple(s):
    """A history multiple: an int where it is whole (1, 4, ...), else a float (0.5: a history full attention fits)."""
    v = float(s)
    return int(v) if v.is_integer() else v


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
                   help="a checkpoint without MegaContext weights: run truncation, sinks, mean_pool, "
                        "bm25_truncate and full only")
    p.add_argument("--budget", type=int, default=None, help="working-context budget (default: the checkpoint's; "
                                                                "512 with --random-init)")
    p.add_argument("--tail-tokens", type=int, default=None, help="protected raw tail (default: the checkpoint's; an "
                                                                     "eighth of the budget with --random-init)")
    p.add_argument("--rerank-k", type=int, default=None, help="LensNet shortlist the reranker picks from (default: "
                                                              "the checkpoint's; 0: LensNet alone)")
    # the counts below default to None so that --quick lowers only what the user did not pass
    p.add_argument("--trials", type=int, default=None, help="passkey examples per history multiple (default 50)")
    p.add_argument("--needle-trials", type=int, default=None, help="multi-key / kv-recall examples per multiple "
                                                                   "(default: --trials)")
    p.add_argument("--multiples", default=None,
                   help="histories as multiples of the budget (default 0.5,1,4,16,64,256; below 1, e.g. 0.5, a "
                        "history the GPT reads whole: full attention's cell, the model's own ceiling)")
    p.add_argument("--depths", default=None, help="passkey needle depths (fractions; default 0.1,0.3,0.5,0.7,0.9), "
                                                  "or 'random': a uniform random depth per trial (no depth table). A "
                                                  "fixed depth puts every trial's needle at nearly the same token, "
                                                  "hence the same block alignment")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--tasks", default="passkey,needle,kv_recall,chat_memory,long_doc,quality",
                   help="passkey, needle (multi-key), kv_recall (asked raw and/or in chat, --views), chat_memory (chat "
                        "only), long_doc, quality; also qa1, qa2, qa3 (bAbI-style: one, two, three supporting facts)")
    p.add_argument("--views", default="raw,chat", help="how the exact-match tasks are asked: raw text, and/or as a "
                                                       "conversation (the session methods read it through MCSession)")
    p.add_argument("--filler", choices=["heldout", "val"], default="heldout",
                   help="haystack text: heldout = a corpus no training stage reads (python -m nanochat.dataset "
                        "--heldout), val = the validation shard")
    p.add_argument("--docs", type=int, default=None, help="long-document stretches (default 50)")
    p.add_argument("--doc-tokens", type=int, default=None, help="tokens per long-document stretch, history + "
                                                                "target (default: the GPT's sequence_len)")
    p.add_argument("--doc-target", type=int, default=64, help="scored tokens at the end of each stretch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help=f"small counts for CPU runs: {QUICK}")
    p.add_argument("--no-report", action="store_true", help="do not write the report section")
    p.add_argument("--run", default="dummy", help="wandb run name that receives the figures ('dummy': no wandb)")
    p.add_argument("--device", default=None, help="cuda / mps / cpu (default: autodetect)")
    args = p.parse_args(argv)
    for k, v in (QUICK if args.quick else FULL).items():  # quick lowers only what the user did not pass
        if getattr(args, k) is None:
            setattr(args, k, v)
    if (args.source is None) == (not args.random_init):
        raise UserError("pass exactly one of --source {base,mid,sft} or --random-init")
    multiples = sorted(set(parse_list(args.multiples, multiple, "multiples")))
    depths = None if args.depths == "random" else parse_list(args.depths, float, "depths")
    methods = parse_list(args.methods, str, "methods")
    tasks = parse_list(args.tasks, str, "tasks")
    views = parse_list(args.views, str, "views")
    bad = [m for m in methods if m not in METHODS] + [t for t in tasks if t not in TASK_IDS] + \
        [v for v in views if v not in VIEWS]
    if bad:
        raise UserError(f"unknown method/task/view {bad}: methods are {METHODS}, tasks {tuple(TASK_IDS)}, "
                        f"views {VIEWS}")
    if multiples[0] <= 0 or not all(0 <= d <= 1 for d in depths or []) or args.trials < 1 or args.docs < 1:
        raise UserError("--multiples must be > 0, --depths in [0, 1] (or 'random'), --trials and --docs >= 1")
    needle_trials = args.needle_trials or args.trials
    device = torch.device(args.device or autodetect_device_type())
    t_start = time.perf_counter()
    load = random_init_models if args.random_init else checkpoint_models
    models, info = load(args, device)
    gpt, cfg = models.gpt, models.cfg
    if not info["mc_weights"]:
        methods = [m for m in methods if m not in MC_METHODS + SESSION_METHODS]
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
    if args.filler == "heldout":
        from nanochat.dataset import load_heldout_text
        filler = load_heldout_text(max_chars=max(4_000_000, 8 * multiples[-1] * budget))
    else:
        filler = " ".join(texts)
    out = args.out or os.path.join(get_base_dir(), "report", "mc_eval.json")
    config = {"source": info["source"], "model_tag": info.get("model_tag"), "step": info.get("step"),
              "mc_weights": info["mc_weights"], "device": str(device), "n_layer": gpt.config.n_layer,
              "n_embd": gpt.config.n_embd, "vocab": gpt.config.vocab_size, "sequence_len": gpt.config.sequence_len,
              "budget": budget, "block_size": cfg.block_size, "tail_tokens": cfg.tail_tokens,
              "max_level": cfg.max_level, "positions": cfg.positions, "methods": methods, "tasks": tasks,
              "multiples": multiples, "depths": depths or "random", "trials": args.trials, "views": views,
              "filler": args.filler, "split": "eval", "commit": git_commit(),
              "needle_trials": needle_trials,
              "docs": args.docs, "doc_tokens": doc_tokens, "doc_target": args.doc_target, "seed": args.seed,
              "quick": args.quick}
    res = {"config": config, "passkey": {}, "needle": {}, "kv_recall": {}, "long_doc": {"gap_closed": None},
           "passkey_depth": {}, "passkey_alignment": {}, "lens_hit_rate": {}, "context_slots": {},
           "long_doc_gap_closed": {}, "skipped": [], "intervals": {}, "chat": {},
           "timings": {}, "quality": {**dict.fromkeys(QUALITY_ENTRIES),
                                      "reasons": dict.fromkeys(QUALITY_ENTRIES, "not in --tasks")}}
    print(f"mc_eval: {info['source']} GPT depth {gpt.config.n_layer} width {gpt.config.n_embd}, budget {budget}, "
          f"methods {methods}, device {device}")
    raw_methods = [m for m in methods if m not in SESSION_METHODS]
    for view, task in [(v, t) for v in views for t in (RAW_TASKS if v == "raw" else CHAT_TASKS)]:
        if task not in tasks:
            continue
        t0 = time.perf_counter()
        n = args.trials if task == "passkey" else needle_trials
        acc, slots, hits, by_depth, by_align, skipped, cis = run_exact_task(
            task, models, raw_methods if view == "raw" else methods, budget, multiples, n, depths, filler, args.seed,
            view=view)
        res["skipped"] += skipped
        if view == "chat":
            res["chat"][task] = {"acc": acc, "intervals": cis, "context_slots": slots, "hit_rate": hits}
        else:
            res[task], res["context_slots"][task], res["lens_hit_rate"][task] = acc, slots, hits
            res["intervals"][task] = cis
            if task == "passkey":
                res["passkey_depth"], res["passkey_alignment"] = by_depth, by_align
        label = task if view == "raw" else f"chat:{task}"
        res["timings"][label] = round(time.perf_counter() - t0, 2)
        for mult, cell in acc.items():
            print(f"{label:9s} {mult:>4s}x  " + "  ".join(f"{m} {fmt(v, cis[mult][m]['ci'], cis[mult][m]['n'])}"
                                                         for m, v in cell.items()))
        for line in alignment_lines(res["passkey_alignment"], methods) if label == "passkey" else ():
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
    from nanochat.common import init_wandb
    wandb_run = init_wandb(args.run, "nanochat", {"mc_eval": config})
    wandb_run.log(wandb_figures(res))
    wandb_run.finish()
    return res


def wandb_figures(res):
    """The result's figures as flat wandb keys: mc_eval/<task>/<multiple>x/<method>, mc_eval/long_doc/<method>,
    mc_eval/quality/<entry>/<figure>."""
    out = {}
    for task in EXACT_TASKS:
        for mult, cell in res.get(task, {}).items():
            out.update({f"mc_eval/{task}/{mult}x/{m}": v for m, v in cell.items() if v is not None})
    for task, view in res.get("chat", {}).items():
        for mult, cell in view["acc"].items():
            out.update({f"mc_eval/chat_{task}/{mult}x/{m}": v for m, v in cell.items() if v is not None})
    out.update({f"mc_eval/long_doc/{m}": v for m, v in res["long_doc"].items() if isinstance(v, (int, float))})
    for entry, q in res["quality"].items():
        if isinstance(q, dict) and entry != "reasons":
            out.update({f"mc_eval/quality/{entry}/{k}": v for k, v in q.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return out


if __name__ == "__main__":
    run_main(main)
