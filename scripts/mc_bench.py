"""
MegaContext cost benchmark (docs/architecture.md): per-token decode time and resident memory at
growing history lengths with a fixed working-context budget, against plain full-KV decoding where
it fits; ingest throughput; tree bytes per token on disk; refocus cost, incremental vs full recompute.

    python -m scripts.mc_bench                       # the SFT checkpoint if it has MegaContext weights, else a
                                                     # random-init depth-2 model; 1e3 .. 1e6 tokens, CPU ok
    python -m scripts.mc_bench --source random --out report/mc_bench.json

The history is random token ids (cost does not depend on content). Decode runs the real session
loop: every generated token is appended to the on-disk tree, refocus runs every K tokens (or when the
WC goes over budget), and the KV cache recomputes only from the first edited slot.

Figures measured side by side, in alternating rounds (so that a drift in machine speed, e.g. a shared
CPU, cancels out of each round's ratio; the per-history table is timed minutes apart):
- `decode_vs_plain`: MegaContext at the shortest history against plain KV-cached decoding of the same
  history (`full_kv`: every token in the cache) and of a window of the same size as the WC (`window`: the
  newest W tokens, W = the WC's cost), ms/token and the ratios (target <= 1.2);
- `decode_ratio_last_first`: t(longest)/t(shortest) (flat: target <= 1.2);
- `refocus`: at each refocus while decoding, the incremental K/V sync against a full recompute of the same
  window (`refocus_speedup`, target >= 3), the slots recomputed, the max |logit difference| of the last
  slot against a from-scratch forward (kvcache.full_logits; exact: <= 1e-4), and the refocus itself
  (LensNet + reranker + allocator), ms.
"""
import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch

from nanochat.common import UserError, autodetect_device_type, get_base_dir, rss_mb, run_main
from nanochat.report import git_commit


def sync_device(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def mc_checkpoint_source():
    """"sft" when $NANOCHAT_BASE_DIR/chatsft_checkpoints holds a checkpoint with MegaContext weights (its meta
    names an mc_config), else None (the bench then builds a random-init model)."""
    from nanochat.checkpoint_manager import checkpoint_dir_for, find_last_step, read_meta
    try:
        d = checkpoint_dir_for("sft")
        return "sft" if read_meta(d, find_last_step(d)).get("mc_config") else None
    except (UserError, OSError, ValueError):
        return None


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
    return float(np.median([time_decode_once(session, n_tokens, device) for _ in range(rounds)]))


class PlainDecoder:
    """Plain greedy decoding with a KV cache (nanochat's GPT, no MegaContext): `start(ids)` prefills (in chunks),
    `step(n)` decodes n tokens and returns the seconds they took."""

    def __init__(self, gpt, device, chunk=2048):
        self.gpt, self.device, self.chunk = gpt, device, chunk
        self.kv = self.tok = None

    @torch.no_grad()
    def start(self, ids, room):
        self.kv = self.gpt.new_kv_cache(1, seq_len=len(ids) + room + 8)
        x = torch.as_tensor(ids, device=self.device)[None]
        for a in range(0, x.size(1), self.chunk):
            logits = self.gpt(x[:, a:a + self.chunk], kv_cache=self.kv)
        self.tok = logits[:, -1].argmax(-1, keepdim=True)

    @torch.no_grad()
    def step(self, n):
        sync_device(self.device)
        t0 = time.perf_counter()
        tok = self.tok
        for _ in range(n):
            tok = self.gpt(tok, kv_cache=self.kv)[:, -1].argmax(-1, keepdim=True)
        sync_device(self.device)
        self.tok = tok
        return time.perf_counter() - t0

    def time(self, ids, n_tokens):
        """ms per token of n_tokens decoded after ids."""
        self.start(ids, n_tokens)
        return self.step(n_tokens) * 1000 / n_tokens


def mc_step(session, n, device):
    """Seconds the session takes to generate n tokens (its full decode loop)."""
    sync_device(device)
    t0 = time.perf_counter()
    for _ in session.generate_ids(n, stop=False):
        pass
    sync_device(device)
    return time.perf_counter() - t0


def side_by_side(short, long, n_tokens, rounds, device, chunk=8):
    """
    Alternating rounds of n_tokens, each interleaved `chunk` tokens at a time (a shared CPU's speed drifts on the
    scale of seconds; interleaving finely puts every method under the same drift): MegaContext decoding at the
    short history, plain KV decoding of a history of the same length (`full_kv`: the newest H tokens, H = the
    short history's length when the rounds start) and of its newest W tokens (`window`, W = the short session's
    WC cost), and MegaContext at the long history. Medians over rounds of the ms/token and of the per-round ratios.
    """
    plain_full, plain_window = PlainDecoder(short.gpt, device), PlainDecoder(short.gpt, device)
    list(short.generate_ids(8, stop=False))  # warm-up: the first sync after an ingest is a full prefill
    list(long.generate_ids(8, stop=False))
    H = short.num_tokens
    rows = []
    for _ in range(rounds):
        n = short.num_tokens
        ids = short.tree.tokens(n - H, n)
        W = int(short.stats()["wc_cost"])
        plain_full.start(ids, n_tokens)
        plain_window.start(ids[len(ids) - W:], n_tokens)
        t = np.zeros(4)
        for a in range(0, n_tokens, chunk):
            c = min(chunk, n_tokens - a)
            t += (mc_step(short, c, device), plain_full.step(c), plain_window.step(c), mc_step(long, c, device))
        rows.append(t * 1000 / n_tokens)
    a = np.array(rows)
    med = lambda v: float(np.median(v))  # noqa: E731
    return {"megacontext": round(med(a[:, 0]), 3), "full_kv": round(med(a[:, 1]), 3), "window": round(med(a[:, 2]), 3),
            "window_slots": W, "ratio_full_kv": round(med(a[:, 0] / a[:, 1]), 3),
            "ratio_window": round(med(a[:, 0] / a[:, 2]), 3), "rounds": rounds, "chunk": chunk,
            "megacontext_last": round(med(a[:, 3]), 3), "ratio_last_first": round(med(a[:, 3] / a[:, 0]), 3)}


def time_decode_once(session, n_tokens, device):
    return mc_step(session, n_tokens, device) * 1000 / n_tokens


@torch.no_grad()
def time_full_kv(gpt, ids, n_tokens, rounds, device, chunk=2048):
    """Plain decoding with a KV cache over the whole history (prefilled in chunks): ms per token."""
    plain = PlainDecoder(gpt, device, chunk)
    return float(np.median([plain.time(ids, n_tokens) for _ in range(rounds)]))


def refocus_events(session, n_events, device):
    """
    Decode until each of n_events refocuses (the session's own cadence: every K tokens, or when the WC goes
    over budget), then time the incremental K/V sync that follows against a full recompute of the same window,
    and check the incremental logits against a from-scratch forward. The refocus itself (LensNet, reranker,
    allocator) is timed as it runs inside the decode loop.
    """
    from megacontext.kvcache import full_logits
    spent = []
    inner = session.refocus

    def timed_refocus():
        sync_device(device)
        t0 = time.perf_counter()
        out = inner()
        sync_device(device)
        spent.append(time.perf_counter() - t0)
        return out

    session.refocus = timed_refocus
    incr = full = 0.0
    slots, errs, edits = [], [], []
    counts0 = dict(session.focus_counts)
    try:
        list(session.generate_ids(1, stop=False))  # the cache holds the current WC
        for _ in range(n_events):
            before, e0 = session.refocus_count, session.edit_count
            for _ in session.generate_ids(8 * session.K, stop=False):
                if session.refocus_count != before:
                    break
            edits.append(session.edit_count - e0)
            sync_device(device)
            t0 = time.perf_counter()
            slots.append(session.kv.sync(session.wc, session.reader))
            sync_device(device)
            t1 = time.perf_counter()
            got = session.kv.last_logits.clone()
            ref = full_logits(session.gpt, session.wc, session.reader, session.cfg)[-1]
            errs.append((got - ref).abs().max().item())
            session.kv.reset()
            sync_device(device)
            t2 = time.perf_counter()
            session.kv.sync(session.wc, session.reader)
            sync_device(device)
            incr += t1 - t0
            full += time.perf_counter() - t2
    finally:
        del session.refocus  # the class's method again
    counts = {k: v - counts0.get(k, 0) for k, v in session.focus_counts.items()}
    return {"speedup": round(full / max(incr, 1e-9), 2), "slots_mean": round(float(np.mean(slots)), 1),
            "of": len(session.kv), "max_abs_logit_diff": float(max(errs)),
            "incremental_ms": round(1000 * incr / n_events, 3), "full_ms": round(1000 * full / n_events, 3),
            "refocus_ms": round(1000 * float(np.mean(spent)), 3) if spent else None,
            "edits_per_refocus": round(float(np.mean(edits)), 2), "events": n_events, "calls": counts}


def main(argv=None):
    parser = argparse.ArgumentParser(description="MegaContext cost benchmark: decode ms/token vs history length "
                                                 "at a fixed budget, against plain KV-cached decoding.")
    parser.add_argument("--out", default=None, help="JSON output (default: $NANOCHAT_BASE_DIR/report/mc_bench.json)")
    parser.add_argument("--source", default=None, choices=["base", "mid", "sft", "random"],
                        help="the checkpoint to benchmark (default: sft when $NANOCHAT_BASE_DIR/chatsft_checkpoints "
                             "holds one with MegaContext weights, else a random-init model: random)")
    parser.add_argument("--model-tag", default=None)
    parser.add_argument("--step", type=int, default=None)
    parser.add_argument("--depth", type=int, default=2, help="random-init model depth (default 2)")
    parser.add_argument("--vocab", type=int, default=8192, help="random-init model vocabulary (default 8192)")
    parser.add_argument("--budget", type=int, default=None,
                        help="working-context budget W_max (default: the checkpoint's; 512 at random init)")
    parser.add_argument("--histories", default="1e3,1e4,1e5,1e6", help="comma list of history lengths in tokens")
    parser.add_argument("--decode-tokens", type=int, default=96, help="tokens timed per round (default 96)")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds of the per-history table (median)")
    parser.add_argument("--ratio-rounds", type=int, default=7,
                        help="alternating rounds of the side-by-side ratios (median; default 7)")
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
    if (not histories or histories[0] < 1 or args.decode_tokens < 1 or args.rounds < 1 or args.ratio_rounds < 1
            or args.refocus_events < 1):
        raise UserError("--histories must be positive and --decode-tokens/--rounds/--ratio-rounds/--refocus-events >= 1")
    out = args.out or os.path.join(get_base_dir(), "report", "mc_bench.json")
    device = torch.device(args.device or autodetect_device_type())
    source = args.source or mc_checkpoint_source() or "random"
    if args.source is None:
        print("benchmarking " + ("the SFT checkpoint (it has MegaContext weights)" if source == "sft" else
                                 "a random-init model: no SFT checkpoint with MegaContext weights in "
                                 f"{os.path.join(get_base_dir(), 'chatsft_checkpoints')}"))
    tmp = None
    if args.memory_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="mc_bench_")
        args.memory_dir = os.path.join(tmp.name, "mem")
    if os.path.exists(os.path.join(args.memory_dir, "session.json")):
        raise UserError(f"{args.memory_dir} already holds a memory: the benchmark needs a fresh directory")
    if source != "random":
        from megacontext.runtime import MCSession
        s = MCSession.load(source, args.model_tag, args.step, device, args.budget, memory_dir=args.memory_dir)
    else:
        args.budget = args.budget or 512
        s = random_session(args, device, args.memory_dir)
    rng = np.random.default_rng(0)
    V = s.tree.vocab_size
    info = {"source": source if source != "random" else "random-init"}
    if source != "random":
        info.update({k: s.source_info.get(k) for k in ("model_tag", "step")})
    res = {"config": {"device": str(device), "n_layer": s.gpt.config.n_layer, "n_embd": s.gpt.config.n_embd,
                      "vocab": V, "budget": s.cfg.budget, "block_size": s.K, "max_level": s.cfg.max_level,
                      "positions": s.cfg.positions, "tau": s.cfg.tau, "decode_tokens": args.decode_tokens,
                      "rounds": args.rounds, "ratio_rounds": args.ratio_rounds, **info,
                      "torch_threads": torch.get_num_threads(), "commit": git_commit()},
           "decode_ms_per_token": {}, "rss_mb": {}, "wc": {}}
    ingest_tok = ingest_s = 0.0
    print(f"device {device}, GPT depth {s.gpt.config.n_layer} width {s.gpt.config.n_embd}, budget {s.cfg.budget}, "
          f"{res['config']['source']}")
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
        side = side_by_side(short, s, args.decode_tokens, args.ratio_rounds, device)
        ratio = side["ratio_last_first"]
        refocus_first = refocus_events(short, args.refocus_events, device)
        short.close()
    s.tree.flush()
    res["bytes_per_token"] = round(s.tree.disk_bytes() / s.num_tokens, 3)
    refocus_last = refocus_events(s, args.refocus_events, device)
    res["refocus_speedup"] = refocus_last["speedup"]
    res["refocus_slots_recomputed"] = {"mean": refocus_last["slots_mean"], "of": refocus_last["of"]}
    res["refocus"] = {first: refocus_first, last: refocus_last}
    res["decode_ratio_last_first"] = round(ratio, 3)
    res["decode_vs_plain"] = {"history": histories[0], **side}
    print(f"ingest {res['ingest_tok_per_s']:,.0f} tok/s, {res['bytes_per_token']:.2f} bytes/token on disk")
    print(f"side by side at {histories[0]:,} tokens ({args.ratio_rounds} alternating rounds, medians): megacontext "
          f"{side['megacontext']:.3f} ms/tok, plain full-KV {side['full_kv']:.3f} (x{side['ratio_full_kv']:.2f}), "
          f"plain KV of the newest {side['window_slots']} tokens {side['window']:.3f} (x{side['ratio_window']:.2f}) "
          f"(target <= 1.2); t({last})/t({first}) = {ratio:.2f} (target <= 1.2)")
    for h, r in res["refocus"].items():
        print(f"refocus at {int(h):,} tokens: incremental vs full recompute {r['speedup']:.2f}x "
              f"({r['slots_mean']:.0f} of {r['of']} slots recomputed, {r['incremental_ms']:.2f} vs {r['full_ms']:.2f} ms; "
              f"max |logit diff| {r['max_abs_logit_diff']:.1e}), refocus itself {r['refocus_ms']:.2f} ms "
              f"({r['edits_per_refocus']:.1f} edits; calls {r['calls']})")
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
    if "decode_vs_plain" in res:
        v = res["decode_vs_plain"]
        lines += ["", f"Side by side at {int(v['history']):,} tokens ({v['rounds']} alternating rounds): MegaContext "
                      f"{v['megacontext']:.3f} ms/token, plain KV over the whole history {v['full_kv']:.3f} "
                      f"(ratio {v['ratio_full_kv']:.2f}), plain KV over the newest {v['window_slots']} tokens "
                      f"{v['window']:.3f} (ratio {v['ratio_window']:.2f}; target <= 1.2)."]
    for h, r in res.get("refocus", {}).items():
        lines += ["", f"Refocus at {int(h):,} tokens: the incremental K/V sync is {r['speedup']:.2f}x faster than "
                      f"recomputing the window ({r['slots_mean']:.0f} of {r['of']} slots; max |logit difference| "
                      f"{r['max_abs_logit_diff']:.1e}); LensNet + reranker + allocator {r['refocus_ms']:.2f} ms."]
    lines += ["", f"![decode ms/token vs history]({link})"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_main(main)
