"""
MegaContext cost benchmark (docs/architecture.md): per-token decode time and resident memory at
growing history lengths with a fixed working-context budget, against plain full-KV decoding where
it fits; ingest throughput; tree bytes per token on disk; refocus cost, incremental vs full recompute.

    python -m scripts.mc_bench                       # random-init depth-2 model, 1e3 .. 1e6 tokens, CPU ok
    python -m scripts.mc_bench --source sft --out report/mc_bench.json

The history is random token ids (cost does not depend on content). Decode runs the real session
loop: every generated token is appended to the on-disk tree, refocus runs every K tokens, and the
KV cache recomputes only from the first edited slot. The headline ratio t(longest)/t(shortest) is
timed in alternating rounds on two live sessions, so that a drift in machine speed over the run (the
per-history table is timed minutes apart) cancels out of each round.
"""
import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch

from nanochat.common import UserError, autodetect_device_type, get_base_dir, rss_mb, run_main


def sync_device(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_session(args, device, memory_dir):
    from megacontext.checkpoint import build_mc_modules
    from megacontext.config import MCConfig
    from megacontext.runtime import MCSession
    from nanochat.gpt import GPT, config_from_depth
    torch.manual_seed(0)
    # tau near 1: a random-init LensNet's scores are noise, and its voluntary folds would time a WC of whatever
    # size they leave; the allocator then only folds what the budget forces, and the bench times full WCs
    cfg = MCConfig(budget=args.budget, tau=0.999)
    gpt = GPT(config_from_depth(args.depth, args.vocab, 2 * args.budget))
    gpt.init_weights()
    nets = build_mc_modules(gpt, cfg, device="cpu")
    return MCSession(gpt, nets["gistnet"], nets["lensnet"], None, cfg, memory_dir=memory_dir, device=device,
                     reranker=nets["reranker"])


def ingest_unheld(session, ids, progress=False):
    """Ingest, then decode from the recency pyramid at the full budget, nothing pinned. The bench asks no
    question, and the WC a question focus leaves depends on the LensNet: with its blocks held (the neighbour-only
    rule of focus.incremental_refocus) a random-init LensNet never refilled the room focus left, a 1k history
    decoded in a WC of ~200 of 512 slots against 484 at 1M, and t(1M)/t(1k) timed WC sizes, not history lengths
    (1.19-1.30 instead of 1.02-1.07; dev/LOG.md, 2026-11-23, 'what the far history offers on prose is a
    unigram cache')."""
    from megacontext.allocator import CooldownState
    from megacontext.working_context import all_raw, recency_pyramid
    session.ingest(ids, progress=progress)
    n, cfg = session.num_tokens, session.cfg
    session.wc = all_raw(n, cfg) if n <= cfg.budget else recency_pyramid(n, cfg.budget, cfg)
    session.kept, session.cooldown = [], CooldownState()


def time_decode(session, n_tokens, rounds, device):
    """Median over rounds of the mean ms per generated token (the session's full decode loop)."""
    list(session.generate_ids(8, stop=False))  # warm-up: the first sync after an ingest is a full prefill
    means = []
    for _ in range(rounds):
        sync_device(device)
        t0 = time.perf_counter()
        for _ in session.generate_ids(n_tokens, stop=False):
            pass
        sync_device(device)
        means.append((time.perf_counter() - t0) * 1000 / n_tokens)
    return float(np.median(means))


def interleaved_ratio(short, long, n_tokens, rounds, device):
    """Median over rounds of t(long) / t(short), the two decodes timed back to back in each round."""
    return float(np.median([time_decode(long, n_tokens, 1, device) / time_decode(short, n_tokens, 1, device)
                            for _ in range(rounds)]))


@torch.no_grad()
def time_full_kv(gpt, ids, n_tokens, rounds, device, chunk=2048):
    """Plain decoding with a KV cache over the whole history (prefilled in chunks): ms per token."""
    kv = gpt.new_kv_cache(1, seq_len=len(ids) + n_tokens * rounds + 8)
    x = torch.as_tensor(ids, device=device)[None]
    for a in range(0, x.size(1), chunk):
        logits = gpt(x[:, a:a + chunk], kv_cache=kv)
    tok = logits[:, -1].argmax(-1, keepdim=True)
    means = []
    for _ in range(rounds):
        sync_device(device)
        t0 = time.perf_counter()
        for _ in range(n_tokens):
            tok = gpt(tok, kv_cache=kv)[:, -1].argmax(-1, keepdim=True)
        sync_device(device)
        means.append((time.perf_counter() - t0) * 1000 / n_tokens)
    del kv
    return float(np.median(means))


def refocus_speedup(session, rng, n_events, device):
    """After each of n_events refocus points (K new tokens), time the incremental K/V sync and a full recompute."""
    incr = full = 0.0
    slots = []
    for _ in range(n_events):
        session.kv.sync(session.wc, session.tree)
        session.ingest(rng.integers(0, session.tree.vocab_size, session.K - session.since_refocus))  # ends in a refocus
        sync_device(device)
        t0 = time.perf_counter()
        slots.append(session.kv.sync(session.wc, session.tree))
        sync_device(device)
        t1 = time.perf_counter()
        session.kv.reset()
        session.kv.sync(session.wc, session.tree)
        sync_device(device)
        incr += t1 - t0
        full += time.perf_counter() - t1
    return full / max(incr, 1e-9), float(np.mean(slots)), len(session.kv)


def main(argv=None):
    parser = argparse.ArgumentParser(description="MegaContext cost benchmark: decode ms/token vs history length "
                                                 "at a fixed budget, against plain full-KV decoding.")
    parser.add_argument("--out", default=None, help="JSON output (default: $NANOCHAT_BASE_DIR/report/mc_bench.json)")
    parser.add_argument("--source", default=None, choices=["base", "mid", "sft"],
                        help="benchmark a checkpoint with MegaContext weights (default: a random-init model)")
    parser.add_argument("--model-tag", default=None)
    parser.add_argument("--step", type=int, default=None)
    parser.add_argument("--depth", type=int, default=2, help="random-init model depth (default 2)")
    parser.add_argument("--vocab", type=int, default=8192, help="random-init model vocabulary (default 8192)")
    parser.add_argument("--budget", type=int, default=512, help="working-context budget W_max (default 512)")
    parser.add_argument("--histories", default="1e3,1e4,1e5,1e6", help="comma list of history lengths in tokens")
    parser.add_argument("--decode-tokens", type=int, default=96, help="tokens timed per round (default 96)")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds; the median is reported")
    parser.add_argument("--full-kv-max", type=int, default=1 << 15,
                        help="longest history for the full-KV baseline (null beyond; default 32768)")
    parser.add_argument("--refocus-events", type=int, default=16)
    parser.add_argument("--memory-dir", default=None, help="where the tree goes (default: a temporary directory)")
    parser.add_argument("--device", default=None, help="cuda / mps / cpu (default: autodetect)")
    parser.add_argument("--no-report", action="store_true", help="do not write the report section")
    args = parser.parse_args(argv)
    try:
        histories = sorted({int(float(h)) for h in args.histories.split(",") if h.strip()})
    except ValueError:
        raise UserError(f"--histories must be a comma list of numbers, got {args.histories!r}") from None
    if not histories or histories[0] < 1 or args.decode_tokens < 1 or args.rounds < 1:
        raise UserError("--histories must be positive and --decode-tokens/--rounds >= 1")
    out = args.out or os.path.join(get_base_dir(), "report", "mc_bench.json")
    device = torch.device(args.device or autodetect_device_type())
    tmp = None
    if args.memory_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="mc_bench_")
        args.memory_dir = os.path.join(tmp.name, "mem")
    if os.path.exists(os.path.join(args.memory_dir, "session.json")):
        raise UserError(f"{args.memory_dir} already holds a memory: the benchmark needs a fresh directory")
    if args.source:
        from megacontext.runtime import MCSession
        s = MCSession.load(args.source, args.model_tag, args.step, device, args.budget, memory_dir=args.memory_dir)
    else:
        s = random_session(args, device, args.memory_dir)
    rng = np.random.default_rng(0)
    V = s.tree.vocab_size
    res = {"config": {"device": str(device), "n_layer": s.gpt.config.n_layer, "n_embd": s.gpt.config.n_embd,
                      "vocab": V, "budget": s.cfg.budget, "block_size": s.K, "max_level": s.cfg.max_level,
                      "positions": s.cfg.positions, "decode_tokens": args.decode_tokens, "rounds": args.rounds,
                      "source": args.source or "random-init", "torch_threads": torch.get_num_threads()},
           "decode_ms_per_token": {}, "rss_mb": {}, "wc": {}}
    ingest_tok = ingest_s = 0.0
    print(f"device {device}, GPT depth {s.gpt.config.n_layer} width {s.gpt.config.n_embd}, budget {s.cfg.budget}")
    for H in histories:
        n = H - s.num_tokens
        if n > 0:
            ids = rng.integers(0, V, n)
            t0 = time.perf_counter()
            ingest_unheld(s, ids, progress=n > (1 << 17))
            sync_device(device)
            ingest_s += time.perf_counter() - t0
            ingest_tok += n
        mc = time_decode(s, args.decode_tokens, args.rounds, device)
        res["rss_mb"][str(H)] = round(rss_mb(), 1)
        st = s.stats()
        res["wc"][str(H)] = {"wc_cost": st["wc_cost"], "entries": st["wc_entries"],
                             "level_counts": {str(k): v for k, v in st["level_counts"].items()}}
        full = None
        if H <= args.full_kv_max:
            full = time_full_kv(s.gpt, s.tree.tokens(0, H), args.decode_tokens, args.rounds, device)
        res["decode_ms_per_token"][str(H)] = {"megacontext": round(mc, 3), "full_kv": None if full is None else round(full, 3)}
        print(f"history {H:>9,d}: megacontext {mc:7.2f} ms/tok   full-KV "
              f"{'   n/a' if full is None else f'{full:7.2f}'} ms/tok   rss {res['rss_mb'][str(H)]:.0f} MB   "
              f"wc {st['wc_cost']}/{st['budget']} ({st['wc_entries']} entries)")
    res["ingest_tok_per_s"] = round(ingest_tok / max(ingest_s, 1e-9), 1)
    first, last = str(histories[0]), str(histories[-1])
    with tempfile.TemporaryDirectory(prefix="mc_bench_first_") as d:  # the shortest history again, beside the longest
        short = type(s)(s.gpt, s.gistnet, s.lensnet, s.tokenizer, s.cfg, memory_dir=os.path.join(d, "mem"),
                        device=device, reranker=s.reranker)  # the same nets, its own on-disk tree
        ingest_unheld(short, rng.integers(0, V, histories[0]))
        ratio = interleaved_ratio(short, s, args.decode_tokens, args.rounds, device)
        short.close()
    s.tree.flush()
    res["bytes_per_token"] = round(s.tree.disk_bytes() / s.num_tokens, 3)
    speedup, mean_slots, T = refocus_speedup(s, rng, args.refocus_events, device)
    res["refocus_speedup"] = round(speedup, 2)
    res["refocus_slots_recomputed"] = {"mean": round(mean_slots, 1), "of": T}
    res["decode_ratio_last_first"] = round(ratio, 3)
    print(f"ingest {res['ingest_tok_per_s']:,.0f} tok/s, {res['bytes_per_token']:.2f} bytes/token on disk, "
          f"refocus incremental vs full recompute {speedup:.2f}x ({mean_slots:.0f} of {T} slots recomputed), "
          f"t({last})/t({first}) = {ratio:.2f} in alternating rounds (target <= 1.2)")
    s.close()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=2)
    print(f"wrote {out}")
    if tmp is not None:
        tmp.cleanup()
    from megacontext.eval.plots import plot_decode_ms
    png = plot_decode_ms(res, os.path.join(os.path.dirname(os.path.abspath(out)), "mc_bench_decode.png"))
    if not args.no_report:
        from nanochat.report import get_report
        get_report().log("MegaContext benchmark", [
            {k: res[k] for k in ("ingest_tok_per_s", "bytes_per_token", "refocus_speedup", "decode_ratio_last_first")},
            report_markdown(res, png)])
    return res


def report_markdown(res, png):
    """The report section body: decode cost per history length, and the plot (linked relative to report/)."""
    c = res["config"]
    lines = [f"Fixed budget {c['budget']} ({c['source']}, {c['n_layer']} layers x {c['n_embd']}, {c['device']}); "
             f"decode runs the real session loop (tree append, refocus every {c['block_size']} tokens).", "",
             "| history (tokens) | MegaContext ms/token | full KV ms/token | RSS MB | WC cost |",
             "|---|---|---|---|---|"]
    for h, row in res["decode_ms_per_token"].items():
        full = "-" if row["full_kv"] is None else f"{row['full_kv']:.3f}"
        lines.append(f"| {int(h):,} | {row['megacontext']:.3f} | {full} | {res['rss_mb'][h]} | "
                     f"{res['wc'][h]['wc_cost']} |")
    report_dir = os.path.join(get_base_dir(), "report")
    link = os.path.relpath(png, report_dir) if os.path.dirname(os.path.abspath(png)) == report_dir else png
    if "decode_ratio_last_first" in res:
        first, last = list(res["decode_ms_per_token"])[0], list(res["decode_ms_per_token"])[-1]
        lines += ["", f"t({int(last):,}) / t({int(first):,}) = {res['decode_ratio_last_first']:.2f}, timed in "
                      "alternating rounds on two live sessions (target <= 1.2)."]
    lines += ["", f"![decode ms/token vs history]({link})"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_main(main)
