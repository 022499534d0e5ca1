"""
Benchmark the MegaContext tree: ingest tokens/s with a tiny GistNet, bytes per token on disk, and
resident memory after ingesting 1e5 and 1e6 tokens (each run in a fresh process, so RSS is clean).

    python dev/bench_tree.py                      # disk and RAM backends, 1e5 and 1e6 tokens
    python dev/bench_tree.py --sizes 100000 --backends disk --chunk 32

Prints a table and one JSON line (`BENCH_TREE {...}`) for the report.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nanochat.common import rss_mb  # noqa: E402


def worker(args):
    import numpy as np
    import torch
    from megacontext.config import MCConfig
    from megacontext.gistnet import GistNet
    from megacontext.tree import MCTree

    torch.manual_seed(0)
    cfg = MCConfig(max_level=4, gist_layers=args.gist_layers)
    net = GistNet(args.dim, cfg, n_head=args.heads)
    wte = torch.nn.Embedding(args.vocab, args.dim)
    ids = np.random.default_rng(0).integers(0, args.vocab, size=args.tokens)
    tmp = tempfile.mkdtemp(prefix="bench_tree_", dir=args.dir)
    try:
        if args.backend == "disk":
            tree = MCTree.create(os.path.join(tmp, "t"), cfg, net, wte, fsync=args.fsync)
        else:
            tree = MCTree.ram(cfg, net, wte)
        tree.append(ids[:args.chunk])  # warm-up (first calls allocate), not timed
        rss0 = rss_mb()
        t0 = time.perf_counter()
        for i in range(args.chunk, args.tokens, args.chunk):
            tree.append(ids[i:i + args.chunk])
        dt = time.perf_counter() - t0
        rss1 = rss_mb()
        tree.close()
        res = {"backend": args.backend, "tokens": args.tokens, "chunk": args.chunk,
               "tok_per_s": (args.tokens - args.chunk) / dt, "seconds": dt,
               "bytes_per_token": tree.disk_bytes() / args.tokens if args.backend == "disk" else None,
               "rss_before_mb": rss0, "rss_after_mb": rss1, "counts": tree.level_counts()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(res))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="tokens to ingest per run")
    p.add_argument("--backends", nargs="+", default=["disk", "ram"], choices=["disk", "ram"])
    p.add_argument("--chunk", type=int, default=1024, help="tokens per append call")
    p.add_argument("--dim", type=int, default=64, help="GistNet / embedding width")
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--gist-layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--fsync", action="store_true", help="fsync every commit (disk backend)")
    p.add_argument("--dir", default=None, help="where the temporary disk trees go (default: system temp)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend", default="disk", help=argparse.SUPPRESS)
    p.add_argument("--tokens", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    results = []
    for backend in args.backends:
        for n in args.sizes:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--backend", backend, "--tokens", str(n),
                   "--chunk", str(args.chunk), "--dim", str(args.dim), "--heads", str(args.heads),
                   "--gist-layers", str(args.gist_layers), "--vocab", str(args.vocab)]
            cmd += ["--fsync"] if args.fsync else []
            cmd += ["--dir", args.dir] if args.dir else []
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
            r = results[-1]
            print(f"  done {backend} {n:,} tokens in {r['seconds']:.1f}s", file=sys.stderr)
    print(f"GistNet d={args.dim} heads={args.heads} layers={args.gist_layers}, chunk={args.chunk} tokens/append, "
          f"torch threads={os.environ.get('OMP_NUM_THREADS', 'default')}")
    print(f"{'backend':8} {'tokens':>10} {'tok/s':>10} {'bytes/tok':>10} {'RSS before MB':>14} {'RSS after MB':>13}")
    for r in results:
        bpt = f"{r['bytes_per_token']:.3f}" if r["bytes_per_token"] is not None else "-"
        print(f"{r['backend']:8} {r['tokens']:>10,} {r['tok_per_s']:>10,.0f} {bpt:>10} "
              f"{r['rss_before_mb']:>14.1f} {r['rss_after_mb']:>13.1f}")
    print("BENCH_TREE " + json.dumps({"config": vars(args) | {"worker": None}, "results": results}))


if __name__ == "__main__":
    main()
