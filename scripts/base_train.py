"""
Pretrain the base GPT on the parquet shards.

    python -m scripts.base_train --depth=20                          # one GPU / CPU
    torchrun --nproc_per_node=8 -m scripts.base_train -- --depth=20  # DDP (NCCL; gloo on CPU)
    python -m scripts.base_train --depth=2 --max-seq-len=128 --device-batch-size=4 \
        --total-batch-size=512 --num-iterations=50 --eval-every=25   # toy run on a CPU

Checkpoints go to $NANOCHAT_BASE_DIR/base_checkpoints/<model_tag>/. `--resume` continues a run
from its last checkpoint (model, optimizers, data position, step), reproducing the loss curve
exactly on CPU; `--resume=auto` does so when there is a checkpoint, starts afresh when there is none,
and does nothing when the run already finished. The final checkpoint is written before the final
evaluation, so a crash in the evaluation never loses the training. SIGTERM or SIGINT (a preempted
machine, Ctrl-C) stops the run after the current step with a checkpoint of it (exit status 143 / 130).

`--mc` trains with MegaContext (docs/architecture.md): GistNet and LensNet (widths from the GPT) join
the run as AdamW groups, the loss is megacontext.training.objective.MCObjective's (its plain-LM share keeps
base quality), and checkpoints carry "gistnet", "lensnet" and meta["mc_config"]. The `--mc-*` flags
set the MCConfig; the objective's metrics are averaged over each --log-every window.

DDP does not use the DistributedDataParallel wrapper: gradients are averaged by optim.sync_grads
after the accumulation micro-steps, the same path for the GPT and for any extra module.
"""
import argparse
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from nanochat.common import (UserError, run_main, run_distributed, get_base_dir, print0, print_line,
                             autocast_ctx, init_wandb)
from nanochat.gpt import GPT, config_from_depth
from nanochat.optim import clip_grads, setup_optimizers, sync_grads
from nanochat.checkpoint_manager import save_checkpoint, save_meta, load_checkpoint, resume_step
from nanochat.loss_eval import evaluate_bpb
from nanochat.engine import Engine
from nanochat.stopping import GracefulStop
from megacontext.config import add_mc_args
from megacontext.training.telemetry import MetricWindow, for_wandb, format_metrics

SAMPLE_PROMPTS = [
    "The capital of France is",
    "The opposite of hot is",
    "Once upon a time",
    "If yesterday was Friday, then tomorrow will be",
]


def get_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m scripts.base_train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="dummy", help="wandb run name ('dummy': no wandb, no network)")
    p.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    # model
    p.add_argument("--depth", type=int, default=20, help="layers; width = depth * aspect ratio")
    p.add_argument("--aspect-ratio", type=int, default=64, help="n_embd = depth * aspect_ratio")
    p.add_argument("--head-dim", type=int, default=128, help="target attention head dimension")
    p.add_argument("--max-seq-len", type=int, default=2048, help="training sequence length T")
    # batch and horizon
    p.add_argument("--device-batch-size", type=int, default=32, help="sequences per rank per micro-step")
    p.add_argument("--total-batch-size", type=int, default=524288,
                   help="tokens per optimizer step over all ranks (-1: one micro-step per rank); "
                        "gradient accumulation = total / (B * T * world)")
    p.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: from the ratio below)")
    p.add_argument("--target-param-data-ratio", type=float, default=20,
                   help="training tokens per parameter (Chinchilla=20), used when --num-iterations=-1")
    # optimization
    p.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW lr of wte (scaled by (d/768)^-0.5)")
    p.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW lr of lm_head (scaled likewise)")
    p.add_argument("--matrix-lr", type=float, default=0.02, help="Muon lr of the block matrices")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=float, default=1.0,
                   help="clip the grad norm of each net (GPT, GistNet, LensNet, reranker) on its own (0: off)")
    p.add_argument("--warmup-ratio", type=float, default=0.0, help="share of steps with linear LR warmup")
    p.add_argument("--warmdown-ratio", type=float, default=0.2, help="share of final steps with linear LR decay")
    p.add_argument("--final-lr-frac", type=float, default=0.0, help="LR at the end as a fraction of the peak")
    # evaluation, sampling, checkpoints
    p.add_argument("--eval-every", type=int, default=250, help="evaluate val bpb every N steps (0: only at the end)")
    p.add_argument("--eval-tokens", type=int, default=20 * 524288, help="tokens per val evaluation")
    p.add_argument("--sample-every", type=int, default=2000, help="print samples every N steps (0: only at the end, -1: never)")
    p.add_argument("--save-every", type=int, default=1000,
                   help="checkpoint every N steps (-1: only at the end); SIGTERM / Ctrl-C also save, then stop")
    p.add_argument("--keep-checkpoints", type=int, default=2,
                   help="keep the newest N checkpoint steps, delete older ones (0: keep all)")
    p.add_argument("--log-every", type=int, default=1, help="print the train loss every N steps")
    p.add_argument("--model-tag", default="", help="checkpoint directory name (default: d<depth>)")
    p.add_argument("--resume", nargs="?", const="last", default=None, metavar="STEP",
                   help="continue from the last checkpoint of --model-tag (or from step STEP); --resume=auto: "
                        "from the last checkpoint if there is one, nothing to do if it finished the run")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--mc", action="store_true", help="train with MegaContext (GistNet + LensNet, MCObjective)")
    add_mc_args(p)
    return p.parse_args(argv)


MC_LOG_KEYS = ("mc/loss", "mc/lens_loss", "mc/lens_agreement", "mc/delta_nll", "mc/budget_utilization",
               "mc/swap_rate", "mc/needle_lm", "mc/lens_hit", "mc/lens_rerank_hit")


def mc_log_line(means):
    """The compact MegaContext part of a step line: the main metrics and the phase timings."""
    keys = [k for k in MC_LOG_KEYS if k in means] + sorted(k for k in means if k.endswith("_ms"))
    return format_metrics({k.removeprefix("mc/"): means[k] for k in keys}, digits=4)


def lr_multiplier(it, num_iterations, warmup_ratio, warmdown_ratio, final_lr_frac):
    """Linear warmup, constant, linear warmdown to final_lr_frac."""
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if it < warmup:
        return (it + 1) / warmup
    if it <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - it) / warmdown
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(it):
    """Muon momentum warms up from 0.85 to 0.95 over the first 300 steps (nanochat)."""
    frac = min(it / 300, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


def peak_flops(device):
    """Peak bf16 dense FLOP/s of one accelerator, for MFU (None where unknown, e.g. CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    for key, flops in [("h200", 989e12), ("h100", 989e12), ("a100", 312e12), ("l40", 181e12),
                       ("a10", 125e12), ("4090", 165e12), ("3090", 71e12)]:
        if key in name:
            return flops
    return None


def mc_report_rows(mc_cfg, mc_means, train_loss, val_bpb, tok_per_sec):
    """The MegaContext part of a stage's report section (empty without --mc)."""
    if mc_cfg is None:
        return []
    from megacontext.training.trainer import mc_report
    return [{"MegaContext": "on", "mc_config": mc_cfg.to_dict()},
            {"train/loss": train_loss, "val/bpb": val_bpb, "train/tok_per_sec": tok_per_sec, **mc_report(mc_means)}]


def all_reduce_mean(t):
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def gather_objects(obj):
    """Every rank's obj, as a list indexed by rank (a one-element list without DDP)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def main(argv=None):
    args = get_args(argv)
    if args.depth < 1 or args.max_seq_len < 2 or args.device_batch_size < 1:
        raise UserError("--depth, --device-batch-size must be >= 1 and --max-seq-len >= 2")
    with GracefulStop() as stop:
        run_distributed(lambda *a: _train(*a, stop=stop), args)


def _train(args, ddp, rank, world_size, device, stop):
    from nanochat.tokenizer import get_tokenizer, get_token_bytes
    from nanochat.dataloader import tokenizing_distributed_data_loader
    master = rank == 0
    model_tag = args.model_tag or f"d{args.depth}"
    checkpoint_dir = os.path.join(get_base_dir(), "base_checkpoints", model_tag)
    resume_from, finished = resume_step(checkpoint_dir, args.resume)
    if finished:
        print0(f"{checkpoint_dir} step {resume_from} is already finished, nothing to do")
        return
    device_type = device.type
    autocast = autocast_ctx(device_type)
    sync = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)

    tokenizer = get_tokenizer()
    token_bytes = get_token_bytes(device)
    vocab_size = tokenizer.get_vocab_size()
    print0(f"vocab size: {vocab_size:,}")

    # ---- model
    config = config_from_depth(args.depth, vocab_size, args.max_seq_len, args.aspect_ratio, args.head_dim)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    orig_model = model  # uncompiled: for eval, sampling and state dicts
    if device_type == "cuda":
        model = torch.compile(model, dynamic=False)
    num_params = orig_model.num_params()
    flops_per_token = orig_model.estimate_flops()
    print0(f"model config: {config}")
    print0(f"parameters: {num_params:,} | FLOPs per token: {flops_per_token:e}")
    # Extra modules trained with the GPT (MegaContext's GistNet/LensNet with --mc):
    # name -> nn.Module. They get AdamW groups, grad sync and a state dict in every checkpoint.
    extra_modules, mc_cfg, mc_trainer = {}, None, None
    if args.mc:
        from megacontext.checkpoint import build_mc_modules
        from megacontext.training.trainer import MCTrainer, resolve_mc_config
        mc_cfg = resolve_mc_config(args, seq_len=args.max_seq_len)
        if args.max_seq_len < mc_cfg.block_size + mc_cfg.train_min_target:
            raise UserError(f"--mc needs --max-seq-len >= block_size + train_min_target = "
                            f"{mc_cfg.block_size + mc_cfg.train_min_target} (got {args.max_seq_len})")
        extra_modules = build_mc_modules(orig_model, mc_cfg, device)
        # the packed forwards call the uncompiled GPT (their rows change shape every step); the plain-LM
        # rows, always B x T, go through the compiled one
        mc_trainer = MCTrainer(orig_model, extra_modules, mc_cfg, seed=args.seed, rank=rank, lm=model)
        print0(f"MegaContext: {mc_cfg} | " + " + ".join(f"{n} {sum(p.numel() for p in m.parameters()):,}"
                                                        for n, m in extra_modules.items()) + " parameters")

    # ---- batch geometry and horizon
    B, T = args.device_batch_size, args.max_seq_len
    tokens_per_fwdbwd = B * T
    world_tokens = tokens_per_fwdbwd * world_size
    total_batch_size = world_tokens if args.total_batch_size == -1 else args.total_batch_size
    if total_batch_size <= 0 or total_batch_size % world_tokens:
        raise UserError(f"--total-batch-size {total_batch_size} must be a positive multiple of "
                        f"device_batch_size * max_seq_len * world_size = {B}*{T}*{world_size} = {world_tokens}")
    grad_accum_steps = total_batch_size // world_tokens
    if args.num_iterations > 0:
        num_iterations = args.num_iterations
    elif args.target_param_data_ratio > 0:
        num_iterations = max(1, int(args.target_param_data_ratio * num_params) // total_batch_size)
    else:
        raise UserError("give --num-iterations or a positive --target-param-data-ratio")
    print0(f"tokens per step: {total_batch_size:,} = {B} x {T} x {world_size} ranks x {grad_accum_steps} accumulation")
    print0(f"iterations: {num_iterations:,} | training tokens: {num_iterations * total_batch_size:,} "
           f"| tokens:params = {num_iterations * total_batch_size / num_params:.2f}")

    # ---- optimizers
    extra_params = [p for m in extra_modules.values() for p in m.parameters()]
    optimizers = setup_optimizers(orig_model, unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                  matrix_lr=args.matrix_lr, weight_decay=args.weight_decay,
                                  extra_adamw_params=extra_params or None)
    adamw, muon = optimizers
    all_params = list(orig_model.parameters()) + extra_params

    # ---- resume
    start_step, loader_state, loop_state = 0, None, {}
    if resume_from is not None:
        step = resume_from
        model_data, optim_data, meta = load_checkpoint(checkpoint_dir, step, device, load_optimizer=True, rank=rank)
        if args.mc and meta.get("mc_config") != mc_cfg.to_dict():
            raise UserError(f"cannot resume {checkpoint_dir} step {step}: its mc_config {meta.get('mc_config')} "
                            f"differs from this run's {mc_cfg.to_dict()}")
        if not args.mc and meta.get("mc_config"):
            raise UserError(f"cannot resume {checkpoint_dir} step {step}: it was trained with --mc; add --mc")
        if meta["model_config"] != orig_model.config_dict():
            raise UserError(f"cannot resume {checkpoint_dir} step {step}: its model config "
                            f"{meta['model_config']} differs from this run's {orig_model.config_dict()}")
        states = meta.get("dataloader_state") or []
        if len(states) != world_size:
            raise UserError(f"cannot resume: the checkpoint was written by {len(states)} ranks, this run has {world_size}")
        orig_model.load_state_dict(model_data["gpt"])
        for name, module in extra_modules.items():
            if name not in model_data:
                raise UserError(f"cannot resume: the checkpoint has no {name!r} weights")
            module.load_state_dict(model_data[name])
        for opt, sd in zip(optimizers, optim_data):
            opt.load_state_dict(sd)
        start_step, loader_state, loop_state = meta["step"], states[rank], meta.get("loop_state", {})
        print0(f"resumed from {checkpoint_dir} step {start_step}")
    if start_step > num_iterations:
        raise UserError(f"the checkpoint is at step {start_step}, past --num-iterations {num_iterations}")

    # ---- data
    train_loader = tokenizing_distributed_data_loader(tokenizer, B, T, "train", device, resume_state=loader_state)
    eval_steps = max(1, args.eval_tokens // world_tokens)

    def eval_val_bpb():
        val_loader = tokenizing_distributed_data_loader(tokenizer, B, T, "val", device)
        orig_model.eval()
        with autocast:
            bpb = evaluate_bpb(orig_model, val_loader, eval_steps, token_bytes)
        orig_model.train()
        return bpb

    def sample():
        if not master:
            return
        orig_model.eval()
        engine = Engine(orig_model, tokenizer)
        for prompt in SAMPLE_PROMPTS:
            ids = tokenizer.encode(prompt, prepend="<|bos|>")
            results, _ = engine.generate_batch(ids, num_samples=1, max_tokens=16, temperature=0)
            print0(repr(tokenizer.decode(results[0][1:])))
        orig_model.train()

    wandb_run = init_wandb(args.run, "nanochat", vars(args), master, resume_id=loop_state.get("wandb_id"))
    user_config = vars(args)
    min_val_bpb = loop_state.get("min_val_bpb", float("inf"))
    val_bpb = loop_state.get("val_bpb")
    train_loss_value = loop_state.get("train_loss")
    total_time = loop_state.get("total_time", 0.0)
    mfu = None
    peak = peak_flops(device)
    mc_window, mc_last = MetricWindow(), {}  # objective metrics over the log window; the last window's means

    def save(step, say=True):
        states = gather_objects(loader_state)
        meta = {"model_config": orig_model.config_dict(), "user_config": user_config, "step": step,
                "train_loss": train_loss_value, "val_bpb": val_bpb, "world_size": world_size,
                "device_batch_size": B, "max_seq_len": T, "dataloader_state": states,
                "loop_state": {"min_val_bpb": min_val_bpb, "val_bpb": val_bpb, "train_loss": train_loss_value,
                               "total_time": total_time, "wandb_id": wandb_run.id}}
        if mc_cfg is not None:
            meta["mc_config"] = mc_cfg.to_dict()
        model_data = {"gpt": orig_model.state_dict(), **{n: m.state_dict() for n, m in extra_modules.items()}}
        save_checkpoint(checkpoint_dir, step, model_data, [o.state_dict() for o in optimizers], meta, rank=rank,
                        keep=args.keep_checkpoints or None)
        if say:
            print0(f"saved checkpoint step {step} to {checkpoint_dir}")
        return meta

    pbar = tqdm(total=num_iterations, initial=start_step, desc="base_train", unit="step",
                disable=not master or not sys.stderr.isatty(), dynamic_ncols=True)
    step = start_step
    while True:
        last_step = step == num_iterations
        if last_step:
            # the final checkpoint first: a crash in the evaluation must not lose the training
            meta = save(step)
        elif args.save_every > 0 and step % args.save_every == 0 and step != start_step:
            save(step)
        if last_step or (args.eval_every > 0 and step % args.eval_every == 0):
            val_bpb = eval_val_bpb()
            min_val_bpb = min(min_val_bpb, val_bpb)
            print0(f"step {step:05d} | val bpb: {val_bpb:.6f}")
            wandb_run.log({"step": step, "val/bpb": val_bpb})
            if last_step and master:
                meta["val_bpb"], meta["finished"] = val_bpb, True  # --resume=auto: nothing left to do
                meta["loop_state"]["val_bpb"], meta["loop_state"]["min_val_bpb"] = val_bpb, min_val_bpb
                save_meta(checkpoint_dir, step, meta)
        if args.sample_every >= 0 and (last_step or (args.sample_every > 0 and step > 0 and step % args.sample_every == 0)):
            sample()
        if last_step:
            break

        # ---- one optimizer step
        sync()
        t0 = time.time()
        loss_sum = torch.zeros((), device=device)
        for micro in range(grad_accum_steps):
            x, y, loader_state = next(train_loader)
            with autocast:
                if mc_trainer is not None:
                    loss, extra_logs = mc_trainer.loss(x, y, step, micro)
                else:
                    loss, extra_logs = model(x, y), {}
            mc_window.add(extra_logs)
            loss_sum += loss.detach()
            (loss / grad_accum_steps).backward()
        if ddp:
            sync_grads(all_params)
        grad_norm = None
        if args.grad_clip > 0:
            grad_norm = clip_grads([orig_model, *extra_modules.values()], args.grad_clip)
        lrm = lr_multiplier(step, num_iterations, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lrm
        for group in muon.param_groups:
            group["momentum"] = muon_momentum(step)
        for opt in optimizers:
            opt.step()
        orig_model.zero_grad(set_to_none=True)
        for m in extra_modules.values():
            m.zero_grad(set_to_none=True)
        train_loss = all_reduce_mean(loss_sum / grad_accum_steps)
        train_loss_value = train_loss.item()
        sync()
        dt = time.time() - t0
        if step > start_step:  # the first step (compilation, warm-up) does not count
            total_time += dt
        step += 1
        pbar.update(1)

        if not math.isfinite(train_loss_value):
            raise RuntimeError(f"the training loss is {train_loss_value} at step {step}: diverged")
        tok_per_sec = int(total_batch_size / dt)
        mfu = 100 * flops_per_token * total_batch_size / dt / (peak * world_size) if peak else None
        if step % args.log_every == 0 or step == num_iterations:
            mfu_s = f"{mfu:.2f}" if mfu is not None else "n/a"
            gn_s = f" | grad norm: {grad_norm:.4f}" if grad_norm is not None else ""
            msg = (f"step {step:05d}/{num_iterations:05d} ({100 * step / num_iterations:.2f}%) | "
                   f"loss: {train_loss_value:.6f}{gn_s} | lrm: {lrm:.2f} | dt: {dt * 1000:.2f}ms | "
                   f"tok/sec: {tok_per_sec:,} | mfu: {mfu_s} | total time: {total_time / 60:.2f}m")
            mc_means = mc_window.flush()
            if mc_means:
                mc_last = mc_means
                msg += " | " + mc_log_line(mc_means)
            if master:
                tqdm.write(msg) if not pbar.disable else print(msg, flush=True)
            log = {"step": step, "train/loss": train_loss_value, "train/lrm": lrm, "train/dt": dt,
                   "train/tok_per_sec": tok_per_sec, **for_wandb(mc_means)}
            if mfu is not None:
                log["train/mfu"] = mfu
            if grad_norm is not None:
                log["train/grad_norm"] = grad_norm
            wandb_run.log(log)
        signum = stop.requested(ddp, device)  # after every step, on every rank: they stop together
        if signum:
            save(step, say=False)
            pbar.close()
            wandb_run.finish()
            stop.exit(signum, f"saved {checkpoint_dir} step {step}", master)
    pbar.close()

    if ddp:
        # every rank must hold the same weights and agree on the loss: a cheap, visible check
        from megacontext.training.trainer import param_checksum
        mc_sums = "".join(f" | {n} checksum: {param_checksum([m]):.10e}" for n, m in extra_modules.items())
        print_line(f"rank {rank}/{world_size} | final train loss: {train_loss_value} | "
                   f"param checksum: {param_checksum([orig_model]):.10e}{mc_sums}")
    if device_type == "cuda":
        print0(f"peak memory: {torch.cuda.max_memory_allocated() / 1024**2:.2f}MiB")
    print0(f"total training time: {total_time / 60:.2f}m | min val bpb: {min_val_bpb:.6f}")
    from nanochat.report import get_report
    if master:
        get_report().log(section="Base model training", data=[
            user_config,
            {"Number of parameters": num_params, "Number of FLOPs per token": f"{flops_per_token:e}",
             "Calculated number of iterations": num_iterations,
             "Number of training tokens": num_iterations * total_batch_size,
             "Tokens : Params ratio": num_iterations * total_batch_size / num_params,
             "DDP world size": world_size},
            {"Final train loss": train_loss_value, "Minimum validation bpb": min_val_bpb,
             "Final validation bpb": val_bpb, "MFU %": f"{mfu:.2f}%" if mfu is not None else "n/a",
             "Total training time": f"{total_time / 60:.2f}m"},
            *mc_report_rows(mc_cfg, mc_last, train_loss_value, val_bpb, tok_per_sec if step > start_step else None),
        ])
    wandb_run.finish()


if __name__ == "__main__":
    run_main(main)
