"""
Training cost of --mc: the median optimizer-step time of the same GPT trained plainly and with
MegaContext (GistNet + LensNet + MCObjective), side by side in one process on the same batches
(the two runs alternate, and which one goes first alternates too, so drift in machine load hits
both equally). Prints the ratio and where the MegaContext step's time goes (median mc/*_ms).

    python dev/bench_train.py                                   # depth 2, T=256, B=8, random tokens
    python dev/bench_train.py --depth 4 --seq-len 256 --batch-size 16 --mc-budget 128 --mc-tail-tokens 32
    python dev/bench_train.py --out bench_train.json

Random token ids are used: step time does not depend on what the tokens are.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megacontext.checkpoint import build_mc_modules  # noqa: E402
from megacontext.training.trainer import MCTrainer, resolve_mc_config  # noqa: E402
from megacontext.config import add_mc_args  # noqa: E402
from nanochat.common import UserError, autocast_ctx, autodetect_device_type, run_main  # noqa: E402
from nanochat.gpt import GPT, config_from_depth  # noqa: E402
from nanochat.optim import setup_optimizers  # noqa: E402


def get_args(argv=None):
    p = argparse.ArgumentParser(prog="python dev/bench_train.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--aspect-ratio", type=int, default=64)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256, help="T of a training row")
    p.add_argument("--batch-size", type=int, default=8, help="rows per step")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=20, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="also write the figures to this JSON file")
    p.add_argument("--compile", type=int, default=-1,
                   help="torch.compile the GPT as base_train does (default: on CUDA only): the plain side, and the "
                        "--mc side's plain-LM rows; its packed rows stay eager (they change shape every step)")
    p.add_argument("--profile", type=int, default=0,
                   help="then profile this many --mc steps (torch.profiler): the top ops by self CPU and by device "
                        "time, and how much of the wall time the device was busy")
    add_mc_args(p)
    return p.parse_args(argv)


def make_gpt(args, device):
    torch.manual_seed(args.seed)
    cfg = config_from_depth(args.depth, args.vocab_size, args.seq_len, args.aspect_ratio, args.head_dim)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device=device)
    model.init_weights()
    return model


def main(argv=None):
    args = get_args(argv)
    device = torch.device(args.device_type or autodetect_device_type())
    cfg = resolve_mc_config(args)
    if args.seq_len < cfg.block_size + cfg.train_min_target:
        raise UserError(f"--seq-len must be >= block_size + train_min_target = {cfg.block_size + cfg.train_min_target}")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    autocast = autocast_ctx(device.type)
    plain, mc_gpt = make_gpt(args, device), make_gpt(args, device)
    compiled = args.compile == 1 or (args.compile == -1 and device.type == "cuda")
    plain_fwd = torch.compile(plain, dynamic=False) if compiled else plain
    nets = build_mc_modules(mc_gpt, cfg, device)
    # as in base_train: the plain-LM rows of the --mc side go through the compiled GPT too
    trainer = MCTrainer(mc_gpt, nets, cfg, seed=args.seed, lm=torch.compile(mc_gpt, dynamic=False) if compiled else None)
    mc_params = [p for m in nets.values() for p in m.parameters()]
    opt_plain = setup_optimizers(plain)
    opt_mc = setup_optimizers(mc_gpt, extra_adamw_params=mc_params)
    g = torch.Generator().manual_seed(args.seed)
    times = {"plain": [], "mc": []}
    phases = {}
    B, T = args.batch_size, args.seq_len
    print(f"GPT depth {args.depth} ({plain.num_params():,} params) | GistNet+LensNet {sum(p.numel() for p in mc_params):,} "
          f"| B={B} T={T} | budget {cfg.budget}, B_h {cfg.hist_budget()} | device {device.type} "
          f"| plain side {'compiled' if compiled else 'eager'}")

    def step(side, x, y, it):
        sync()
        t0 = time.perf_counter()
        with autocast:
            if side == "plain":
                loss, metrics = plain_fwd(x, y), {}
            else:
                loss, metrics = trainer.loss(x, y, it)
        loss.backward()
        for opt in (opt_plain if side == "plain" else opt_mc):
            opt.step()
        for m in ([plain] if side == "plain" else [mc_gpt, *nets.values()]):
            m.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t0, metrics

    for it in range(args.warmup + args.steps):
        ids = torch.randint(0, args.vocab_size, (B, T + 1), generator=g).to(device)
        x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
        order = ("plain", "mc") if it % 2 == 0 else ("mc", "plain")
        for side in order:
            dt, metrics = step(side, x, y, it)
            if it >= args.warmup:
                times[side].append(1000 * dt)
                for k, v in metrics.items():
                    if k.endswith("_ms"):
                        phases.setdefault(k, []).append(float(v))
    med = {k: statistics.median(v) for k, v in times.items()}
    peak_gb = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    out = {"plain_ms": med["plain"], "mc_ms": med["mc"], "ratio": med["mc"] / med["plain"],
           "plain_mean_ms": statistics.mean(times["plain"]), "mc_mean_ms": statistics.mean(times["mc"]),
           "cuda_peak_gb": peak_gb,  # both sides together (they share the process)
           # phase medians over the steps that had the phase (plain-LM share steps have only lm_ms)
           "mc_phases_ms": {k: statistics.median(v) for k, v in sorted(phases.items())},
           "phase_steps": {k: len(v) for k, v in sorted(phases.items())},
           "config": {"depth": args.depth, "B": B, "T": T, "steps": args.steps, "device": device.type,
                      "plain_compiled": compiled, "mc": cfg.to_dict()}}
    print(f"median step: plain {med['plain']:.1f} ms | --mc {med['mc']:.1f} ms | ratio {out['ratio']:.2f}x "
          f"(means {out['plain_mean_ms']:.1f} / {out['mc_mean_ms']:.1f} ms)"
          + (f" | CUDA peak {peak_gb:.1f} GiB" if device.type == "cuda" else ""))
    print("where --mc step time goes (median ms over the steps with that phase; n steps):")
    for k, v in out["mc_phases_ms"].items():
        print(f"  {k:<24} {v:8.2f}   (n={out['phase_steps'][k]})")
    if args.profile:
        out["profile"] = profile_steps(args, step, device, g)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.out}")
    return out


def profile_steps(args, step, device, g):
    """Profile args.profile --mc steps; print the top ops and return the device-busy share of the wall time."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    B, T = args.batch_size, args.seq_len
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for it in range(args.profile):
            ids = torch.randint(0, args.vocab_size, (B, T + 1), generator=g).to(device)
            step("mc", ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), 10_000 + it)
    wall_ms = 1000 * (time.perf_counter() - t0)
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=15))
    busy_ms = float("nan")
    if device.type == "cuda":
        print(events.table(sort_by="self_device_time_total", row_limit=15))
        busy_ms = sum(e.self_device_time_total for e in events) / 1000
        launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
        print(f"profiled {args.profile} --mc steps: wall {wall_ms:.0f} ms, device busy {busy_ms:.0f} ms "
              f"({100 * busy_ms / wall_ms:.0f} %), {launches / args.profile:.0f} kernel launches per step")
    return {"steps": args.profile, "wall_ms": wall_ms, "device_busy_ms": busy_ms}


if __name__ == "__main__":
    run_main(main)
