"""
Benchmark the focus loop on CPU: allocator time per refocus pass and LensNet forward time for
working contexts of W_max = 512, 2048, 8192 (and whatever --sizes says).

    OMP_NUM_THREADS=1 python -m dev.bench_focus [--sizes 512,2048,8192] [--passes 50] [--out FILE.json]

Each size builds the recency pyramid of a --tokens long history at budget W_max, then runs
--passes refocus passes with random scores, appending one block of tokens before every other pass
(so half of the passes are forced collapses back under the budget). The allocator is vectorised
numpy: its time should grow about linearly with the number of entries.
"""
import argparse
import json
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="512,2048,8192", help="comma-separated W_max values")
    ap.add_argument("--tokens", type=int, default=10_000_000, help="history length in tokens")
    ap.add_argument("--passes", type=int, default=50, help="refocus passes per size")
    ap.add_argument("--n-embd", type=int, default=256, help="GPT width fed to LensNet")
    ap.add_argument("--lens-repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
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
