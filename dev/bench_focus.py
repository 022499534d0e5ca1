"""
Benchmark the focus loop on CPU: allocator time per refocus pass and LensNet forward time for
working contexts of W_max = 512, 2048, 8192 (and whatever --sizes says).

    OMP_NUM_THREADS=1 python -m dev.bench_focus [--sizes 512,2048,8192] [--passes 50] [--out FILE.json]

Each size builds the recency pyramid of a --tokens long history at budget W_max, then runs
--passes refocus passes with random scores, appending one block of tokens before every other pass
(so half of the passes are forced collapses back under the budget). The allocator is vectorised
numpy: its time should grow about linearly with the number of entries.

The session's decode loop (a random-init depth-2 GPT at budget 512, the mc_bench setting):

    OMP_NUM_THREADS=1 python -m dev.bench_focus --profile-decode [--rules-off all] [--histories 1e3,1e5]
    OMP_NUM_THREADS=1 python -m dev.bench_focus --ablation [--histories 1e3,1e5]

--profile-decode: where a token's time goes (wall ms per generated token, by phase: the GPT step, the K/V
sync's layout and tree reads, sampling, the tree append, LensNet, the reranker, the allocator), with the
cost-cutting rules named in --rules-off undone ("all": the decode loop as it was before them).
--ablation: the rules added one at a time (RULES, in order), each timed in alternating rounds against plain
KV-cached decoding (of the whole history and of a window of the WC's size), with the refocus figures of
scripts/mc_bench.py (incremental K/V sync vs a full recompute, slots recomputed, LensNet/reranker calls).
"""
import argparse
import collections
import contextlib
import functools
import json
import os
import shutil
import tempfile
import time

import numpy as np
import torch

from nanochat.common import UserError, run_main
from megacontext.allocator import CooldownState, plan_edits, refocus
from megacontext.config import MCConfig
from megacontext.lensnet import LensNet
from megacontext.working_context import append_tokens, recency_pyramid, wc_cost


def bench_allocator(W, cfg, tokens, passes, rng):
    wc = recency_pyramid(tokens, W, cfg)
    state = CooldownState()
    t_pass, t_plan, n_entries = [], [], []
    for p in range(passes):
        if p % 2 == 1:
            wc = append_tokens(wc, wc.num_tokens + cfg.block_size, cfg)
        scores = rng.uniform(-1, 1, len(wc))
        n_entries.append(len(wc))
        t0 = time.perf_counter()
        plan_edits(wc, scores, W, state, cfg)
        t1 = time.perf_counter()
        _, wc, state = refocus(wc, scores, W, state, cfg)
        t2 = time.perf_counter()
        t_plan.append(t1 - t0)
        t_pass.append(t2 - t1)
    assert wc_cost(wc, cfg.block_size) <= W
    return {"entries": int(np.mean(n_entries)), "refocus_ms": 1e3 * float(np.median(t_pass)),
            "plan_ms": 1e3 * float(np.median(t_plan))}


@torch.no_grad()
def bench_lensnet(W, cfg, n_embd, repeats):
    lens = LensNet(n_embd, cfg).eval()
    x = torch.randn(1, W, n_embd)
    types = torch.randint(0, cfg.max_level + 1, (1, W))
    tail = torch.zeros(1, W, dtype=torch.bool)
    tail[:, -4:] = True
    lens(x, types, tail)  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        lens(x, types, tail)
        ts.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(ts))


# -----------------------------------------------------------------------------
# the session's decode loop: where a token's time goes, and what each cost-cutting rule buys

RULES = ("late_folds", "one_lens", "rerank_skip", "append_path", "recent_reader", "cost_cache")
RULE_NOTES = {
    "late_folds": "forced folds: the newest of the groups within tau of the lowest (allocator late_margin)",
    "one_lens": "one LensNet forward a refocus (scores carried over collapse-only passes)",
    "rerank_skip": "the reranker only where it can change the pass (allocator.permutation_invariant)",
    "append_path": "K/V sync of appended tokens without rebuilding the window's slot layout",
    "recent_reader": "the newest tokens read from RAM (runtime.RecentTokens), not the on-disk tree",
    "cost_cache": "the WC's cost carried across appends instead of recomputed",
}


@contextlib.contextmanager
def rules_off(off, session):
    """Undo the named rules in the current code (monkeypatching it back to what it did before them)."""
    import megacontext.focus as focus
    from megacontext.kvcache import WCKVCache
    from megacontext.runtime import MCSession
    undo = []

    def patch(obj, name, value):
        undo.append((obj, name, obj.__dict__.get(name), name in obj.__dict__))
        setattr(obj, name, value)

    if "late_folds" in off:  # the pass and the reranker's check both without the margin
        alloc, inv = focus.allocator_refocus, focus.permutation_invariant
        patch(focus, "allocator_refocus", lambda *a, **k: alloc(*a, **{**k, "late_margin": None}))
        patch(focus, "permutation_invariant", lambda *a, **k: inv(*a, **{**k, "late_margin": None}))
    if "one_lens" in off:
        patch(focus, "carry_scores", lambda *a: None)
    if "rerank_skip" in off:
        patch(focus, "permutation_invariant", lambda *a, **k: False)
    if "append_path" in off:
        patch(WCKVCache, "_appended", lambda self, wc: False)
    if "recent_reader" in off:  # every read from the tree
        patch(session.reader, "tokens", session.tree.tokens)
        patch(session.reader, "appended", lambda ids: None)
    if "cost_cache" in off:
        after = MCSession._after_append

        def no_cache(self, n):
            self._cost = None
            return after(self, n)
        patch(MCSession, "_after_append", no_cache)
    try:
        yield
    finally:
        for obj, name, old, had in reversed(undo):
            if had:
                setattr(obj, name, old)
            else:
                delattr(obj, name)


def bench_session(H, budget=512, depth=2, vocab=8192):
    """The mc_bench session (random-init, on-disk tree) holding a history of H random tokens, decoding from the
    recency pyramid with nothing pinned."""
    from scripts.mc_bench import ingest_unheld, random_session
    d = tempfile.mkdtemp(prefix="bench_focus_")
    s = random_session(argparse.Namespace(budget=budget, depth=depth, vocab=vocab), torch.device("cpu"),
                       os.path.join(d, "mem"))
    ingest_unheld(s, np.random.default_rng(0).integers(0, vocab, H))
    return s, d


def profile_decode(H, off, n_tokens):
    """Wall ms per generated token by phase (perf_counter wrappers; a phase's time includes the phases under it)."""
    import megacontext.focus as focus
    import megacontext.kvcache as kvcache
    import megacontext.runtime as runtime
    from megacontext.lensnet import LensNet
    from megacontext.reranker import Reranker
    from megacontext.tree import MCTree
    acc, calls = collections.defaultdict(float), collections.Counter()
    s, d = bench_session(H)
    wrapped = []

    def wrap(obj, name, label):
        f = getattr(obj, name)

        @functools.wraps(f)
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                acc[label] += time.perf_counter() - t0
                calls[label] += 1
        wrapped.append((obj, name, f))
        setattr(obj, name, timed)

    with rules_off(off, s):
        list(s.generate_ids(40, stop=False))
        for obj, name, label in [
                (kvcache.WCKVCache, "sync", "K/V sync (total)"),
                (kvcache, "slot_keys", "  slot keys + layout"), (kvcache, "suffix_slot_embeddings", "  slot embeddings (tree reads)"),
                (kvcache, "wc_positions", "  positions"), (kvcache.WCKVCache, "_forward", "  GPT forward + head"),
                (runtime, "sample_next_token", "sampling"), (MCTree, "append", "tree append (+ GistNet)"),
                (runtime, "append_tokens", "WC append"), (runtime, "wc_cost", "WC cost"),
                (runtime.MCSession, "refocus", "refocus (total)"), (LensNet, "score", "  LensNet"),
                (focus, "rerank_scores", "  reranker"), (Reranker, "forward", "    reranker forward"),
                (focus, "permutation_invariant", "  reranker skip check"), (focus, "allocator_refocus", "  allocator")]:
            wrap(obj, name, label)
        r0, y0, f0 = s.kv.recomputed, s.kv.syncs, s.refocus_count
        t0 = time.perf_counter()
        list(s.generate_ids(n_tokens, stop=False))
        total = time.perf_counter() - t0
        for obj, name, f in reversed(wrapped):
            setattr(obj, name, f)
    events = s.refocus_count - f0
    print(f"\nhistory {H:,}, rules off: {','.join(off) or 'none'}: {1e3 * total / n_tokens:.3f} ms/token over "
          f"{n_tokens} tokens; WC {s.stats()['wc_cost']} slots, {len(s.wc)} entries; {events} refocuses; "
          f"{s.kv.recomputed - r0 - (s.kv.syncs - y0 - events)} slots recomputed after them "
          f"({(s.kv.recomputed - r0 - (s.kv.syncs - y0 - events)) / max(events, 1):.0f} each)")
    for label in acc:
        print(f"  {label:34s} {1e3 * acc[label] / n_tokens:7.3f} ms/token  {calls[label]:5d} calls "
              f"{1e3 * acc[label] / calls[label]:8.3f} ms/call")
    s.close()
    shutil.rmtree(d, ignore_errors=True)
    return {label: 1e3 * acc[label] / n_tokens for label in acc} | {"total": 1e3 * total / n_tokens}


def ablation(H, rounds, n_tokens, events, chunk=8, full_max=1 << 15):
    """The rules added one at a time; each variant timed against plain KV decoding in alternating rounds."""
    from scripts.mc_bench import PlainDecoder, mc_step, refocus_events
    rows = []
    print(f"\nhistory {H:,}: {rounds} rounds of {n_tokens} tokens, interleaved {chunk} at a time "
          f"(medians; ratios per round)")
    print(f"{'rules on':>40} {'MC ms':>7} {'window':>7} {'full':>7} {'/window':>8} {'/full':>6} {'speedup':>8} "
          f"{'slots':>9} {'refocus ms':>10} {'lens/rf':>7} {'rr/rf':>6}")
    for i in range(len(RULES) + 1):
        on, off = RULES[:i], RULES[i:]
        s, d = bench_session(H)
        with rules_off(off, s):
            plain = PlainDecoder(s.gpt, torch.device("cpu"))
            window = PlainDecoder(s.gpt, torch.device("cpu"))
            list(s.generate_ids(40, stop=False))
            t = []
            full = H <= full_max  # plain decoding of the whole history, where it fits
            for _ in range(rounds):
                n = s.num_tokens
                ids = s.tree.tokens(n - min(n, H if full else 4 * s.cfg.budget), n)
                W = int(s.stats()["wc_cost"])
                if full:
                    plain.start(ids, n_tokens)
                window.start(ids[len(ids) - W:], n_tokens)  # plain: a window of the WC's size
                r = np.zeros(3)
                for a in range(0, n_tokens, chunk):
                    c = min(chunk, n_tokens - a)
                    r += (mc_step(s, c, torch.device("cpu")), window.step(c), plain.step(c) if full else np.nan)
                t.append(1e3 * r / n_tokens)
            t = np.array(t)
            f0 = s.refocus_count
            rf = refocus_events(s, events, torch.device("cpu"))
            n_rf = max(s.refocus_count - f0, 1)
        row = {"rules_on": list(on), "mc_ms": float(np.median(t[:, 0])), "window_ms": float(np.median(t[:, 1])),
               "full_ms": float(np.median(t[:, 2])), "ratio_window": float(np.median(t[:, 0] / t[:, 1])),
               "ratio_full": float(np.median(t[:, 0] / t[:, 2])), "refocus": rf}
        rows.append(row)
        name = on[-1] if on else "none (before)"
        print(f"{'+ ' + name if on else name:>40} {row['mc_ms']:7.3f} {row['window_ms']:7.3f} {row['full_ms']:7.3f} "
              f"{row['ratio_window']:8.2f} {row['ratio_full']:6.2f} {rf['speedup']:8.2f} "
              f"{rf['slots_mean']:4.0f}/{rf['of']:<4d} {rf['refocus_ms']:10.2f} "
              f"{rf['calls'].get('lens', 0) / n_rf:7.2f} {rf['calls'].get('rerank', 0) / n_rf:6.2f}")
        s.close()
        shutil.rmtree(d, ignore_errors=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="512,2048,8192", help="comma-separated W_max values")
    ap.add_argument("--tokens", type=int, default=10_000_000, help="history length in tokens")
    ap.add_argument("--passes", type=int, default=50, help="refocus passes per size")
    ap.add_argument("--n-embd", type=int, default=256, help="GPT width fed to LensNet")
    ap.add_argument("--lens-repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    ap.add_argument("--profile-decode", action="store_true", help="time the session's decode loop by phase")
    ap.add_argument("--ablation", action="store_true", help="time the decode loop with the rules added one at a time")
    ap.add_argument("--rules-off", default="", help=f"with --profile-decode: rules to undo, 'all' or a comma list "
                                                   f"of {', '.join(RULES)}")
    ap.add_argument("--histories", default="1e3,1e5", help="history lengths for --profile-decode / --ablation")
    ap.add_argument("--decode-tokens", type=int, default=320)
    ap.add_argument("--rounds", type=int, default=5, help="--ablation: alternating rounds per variant")
    ap.add_argument("--events", type=int, default=8, help="--ablation: refocuses timed per variant")
    args = ap.parse_args()
    if args.profile_decode or args.ablation:
        histories = [int(float(h)) for h in args.histories.split(",") if h.strip()]
        off = RULES if args.rules_off == "all" else tuple(r for r in args.rules_off.split(",") if r)
        unknown = set(off) - set(RULES)
        if unknown:
            raise UserError(f"--rules-off: unknown rules {sorted(unknown)}; known: {', '.join(RULES)}")
        print(f"torch threads {torch.get_num_threads()}; rules: " +
              "; ".join(f"{r}: {RULE_NOTES[r]}" for r in RULES))
        out = {}
        for H in histories:
            out[H] = (profile_decode(H, off, args.decode_tokens) if args.profile_decode
                      else ablation(H, args.rounds, 96, args.events))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(out, f, indent=2)
            print(f"wrote {args.out}")
        return
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        raise UserError(f"--sizes must be comma-separated integers, got {args.sizes!r}")
    rng = np.random.default_rng(0)
    rows = {}
    print(f"history {args.tokens:,} tokens, torch threads {torch.get_num_threads()}")
    print(f"{'W_max':>6} {'entries':>8} {'plan ms':>9} {'refocus ms':>11} {'us/entry':>9} {'LensNet ms':>11}")
    for W in sizes:
        cfg = MCConfig(budget=W)
        a = bench_allocator(W, cfg, args.tokens, args.passes, rng)
        a["lensnet_ms"] = bench_lensnet(a["entries"], cfg, args.n_embd, args.lens_repeats)
        rows[W] = a
        print(f"{W:>6} {a['entries']:>8} {a['plan_ms']:>9.3f} {a['refocus_ms']:>11.3f} "
              f"{1e3 * a['refocus_ms'] / a['entries']:>9.3f} {a['lensnet_ms']:>11.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"tokens": args.tokens, "sizes": rows}, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    run_main(main)
