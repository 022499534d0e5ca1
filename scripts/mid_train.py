"""
Midtraining: teach the base model the chat format, special tokens and a few skills on a mixture
of rendered conversations, nanochat style.

    python -m scripts.mid_train                                  # from the largest base model
    python -m scripts.mid_train --mixture offline --device-batch-size 4 --max-seq-len 256 \
        --total-batch-size -1 --num-iterations 100               # toy CPU run, no downloads
    torchrun --nproc_per_node=8 -m scripts.mid_train             # DDP

Data. Conversations (see build_mixture) are rendered with the tokenizer (each begins with <|bos|>)
and packed back to back into one token stream that is cut into B x T rows, like pretraining data:
no padding, conversations may straddle rows. By default the loss is on ALL tokens (nanochat's
midtraining: the model also learns to predict user turns, which is cheap extra language data);
`--masked-loss` keeps only the assistant tokens, as SFT does.
`--mixture full` (default) mixes SmolTalk, MMLU (auxiliary train) and GSM8K from the Hugging Face
hub with the code-made tasks; `--mixture offline` uses the code-made tasks only (Identity,
Arithmetic, Spelling, Memory) and needs no network.

`--text-share F` replays pretraining text (the train shards, B x T rows as in base training) in a share F
of the micro-batches, with the chat rows' loss (the MC objective under --mc): a small mixture otherwise
unlearns the base model's language modelling. Its val bpb is logged beside the mixture's.

Horizon. `--num-iterations -1` (default) is one pass over the mixture (per rank). The LR is
constant for 80% of the run, then decays linearly to 0.

Writes $NANOCHAT_BASE_DIR/mid_checkpoints/<model_tag>/ (the base model's tag by default). Any
other nets stored in the base checkpoint (MegaContext's GistNet/LensNet) are carried over unchanged.

Resuming. Every `--save-every` steps, and on SIGTERM / SIGINT (after the current step; exit status 143 / 130),
the run saves a checkpoint with its optimizer states and how far each data stream has gone: `--resume`
continues from it exactly (the same batches, the same losses), `--resume=auto` too, or starts afresh when
there is no checkpoint, or does nothing when the last one finished the run.

MegaContext (`--mc`): the base checkpoint must hold GistNet, LensNet and its mc_config (else a
one-line error); they are trained on with MCObjective as the loss, and the MCConfig comes from the
checkpoint (--mc-* flags may override only the training/focus knobs, see
megacontext/training/trainer.py). A share `--mc-mix-share` of micro-batches are long-context rows from
tasks/mc_mixture.py (passkey, multi-key needle, key-value recall, long chats; histories of
`--mc-mix-multiples` x the budget), preceded for the first `--mc-mix-warmup` of the run by the copy
warm-up, which takes every micro-batch (2-4 block contexts: random-token span copies and short pass keys).
"""
import argparse
import math
import os
import sys
import time
from collections import deque

import numpy as np
import torch
from tqdm import tqdm

from nanochat.common import (UserError, run_main, run_distributed, get_base_dir, print0, print_line,
                             autocast_ctx, init_wandb)
from nanochat.checkpoint_manager import (load_model, checkpoint_dir_for, save_checkpoint, save_meta, resume_step,
                                        restore_checkpoint)
from nanochat.loss_eval import evaluate_bpb
from nanochat.optim import clip_grads, setup_optimizers, sync_grads
from nanochat.stopping import GracefulStop
from scripts.base_train import muon_momentum, all_reduce_mean, gather_objects, mc_log_line, mc_report_rows
from megacontext.config import add_mc_args
from megacontext.training.telemetry import MetricWindow, for_wandb
from tasks.common import TaskMixture
from tasks.arithmetic import Arithmetic
from tasks.identity import Identity
from tasks.memory import Memory
from tasks.spelling import Spelling


def get_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m scripts.mid_train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="dummy", help="wandb run name ('dummy': no wandb, no network)")
    p.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    p.add_argument("--model-tag", default=None, help="base model tag to start from, and the output tag (default: largest)")
    p.add_argument("--step", type=int, default=None, help="base checkpoint step (default: last)")
    p.add_argument("--mixture", choices=["full", "offline"], default="full",
                   help="full: hub datasets + code-made tasks; offline: code-made tasks only (no network)")
    p.add_argument("--masked-loss", type=int, default=0, help="1: loss on assistant tokens only (default 0: all tokens)")
    p.add_argument("--max-seq-len", type=int, default=-1, help="T (default: the model's sequence_len)")
    p.add_argument("--device-batch-size", type=int, default=32, help="rows per rank per micro-step")
    p.add_argument("--total-batch-size", type=int, default=524288,
                   help="tokens per optimizer step over all ranks (-1: one micro-step per rank)")
    p.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: one pass over the mixture)")
    p.add_argument("--embedding-lr", type=float, default=0.2)
    p.add_argument("--unembedding-lr", type=float, default=0.004)
    p.add_argument("--matrix-lr", type=float, default=0.02)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--init-lr-frac", type=float, default=1.0, help="LR as a fraction of the base LRs")
    p.add_argument("--grad-clip", type=float, default=1.0,
                   help="clip the grad norm of each net (GPT, GistNet, LensNet, reranker) on its own (0: off)")
    p.add_argument("--eval-every", type=int, default=150, help="val bpb every N steps (0: only at the end)")
    p.add_argument("--eval-tokens", type=int, default=20 * 524288, help="tokens per val evaluation")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--save-every", type=int, default=500,
                   help="checkpoint every N steps (-1: only at the end). A hard crash loses at most N steps "
                        "(SIGTERM and Ctrl-C save the current one); 500 is one intermediate checkpoint in "
                        "nanochat's ~800-step midtraining, as each save writes the model and every rank's "
                        "optimizer state")
    p.add_argument("--keep-checkpoints", type=int, default=2,
                   help="keep the newest N checkpoint steps, delete older ones (0: keep all)")
    p.add_argument("--resume", nargs="?", const="last", default=None, metavar="STEP",
                   help="continue from the last checkpoint of this stage (or from step STEP); --resume=auto: "
                        "from the last checkpoint if there is one, nothing to do if it finished the run")
    p.add_argument("--text-share", type=float, default=0.0,
                   help="share of micro-batches (after --mc's copy warm-up) that replay pretraining text from the "
                        "train shards with the chat rows' loss, so that a small mixture does not unlearn the base "
                        "model's language modelling (runcpu's offline mixture took validation-text NLL from 4.39 "
                        "to 6.28 nats/token without it); its val bpb is logged as val/text_bpb")
    p.add_argument("--mc", action="store_true", help="train with MegaContext (needs a base checkpoint trained with --mc)")
    add_mc_args(p)  # the mixture's knobs too: --mc-mix-share, --mc-mix-warmup, --mc-mix-tasks, ...
    return p.parse_args(argv)


def build_mixture(mixture, split):
    """
    The conversations of midtraining. split: "train" or "val". The code-made tasks are seeded, so
    the mixture is identical on every rank and every run. (The --mc midtraining of a later issue
    adds its long-context synthetic tasks here.)
    """
    train = split == "train"
    gen_split = "train" if train else "test"
    n = (lambda k: k) if train else (lambda k: max(50, k // 20))
    tasks = [Identity(gen_split, size=n(1000)), Arithmetic(gen_split, size=n(10000)),
             Spelling(gen_split, size=n(10000)), Memory(gen_split, size=n(5000))]
    if mixture == "full":
        from tasks.smoltalk import SmolTalk
        from tasks.mmlu import MMLU
        from tasks.gsm8k import GSM8K
        if train:
            tasks += [SmolTalk("train"), MMLU("auxiliary_train", "train"), GSM8K("main", "train")]
        else:
            tasks += [SmolTalk("test", stop=5000), MMLU("all", "test", stop=1000), GSM8K("main", "test", stop=400)]
    elif mixture != "offline":
        raise UserError(f"unknown mixture {mixture!r}: choose full or offline")
    return TaskMixture(tasks, seed=0 if train else 1)


def text_loaders(tokenizer, B, T, device, resume_state=None):
    """{"train": the pretraining train stream (from resume_state, a state it yielded), "val": a factory of fresh
    val streams} for --text-share."""
    from nanochat.dataloader import tokenizing_distributed_data_loader
    try:
        train = tokenizing_distributed_data_loader(tokenizer, B, T, "train", device, resume_state=resume_state)
        first = next(train)  # a generator opens the shards lazily: open them now, for a clear error
    except (FileNotFoundError, ValueError, OSError) as e:
        raise UserError(f"--text-share replays the pretraining shards ({e}): run `python -m nanochat.dataset` "
                        "first, or drop --text-share") from None

    def stream():
        yield first
        yield from train
    return {"train": stream(), "val": lambda: tokenizing_distributed_data_loader(tokenizer, B, T, "val", device)}


def packed_batches(task, tokenizer, B, T, rank=0, world_size=1, masked=False, device="cpu", max_conv_tokens=None,
                   skip=0):
    """
    Infinite generator of (inputs (B,T), targets (B,T), progress): conversations rank, rank+W, ...
    of `task` rendered and packed into one stream; each batch takes the next B*T+1 tokens and the
    stream advances by B*T (the last target of a batch is the first input of the next).
    masked: targets whose token is not the assistant's are -1. progress = passes over the task
    started so far as a float (1.0 = this rank has read all its conversations once).
    skip: pass over the first `skip` batches without building them (a resumed run fast-forwards the stream).
    """
    if len(task) < world_size:
        raise UserError(f"the mixture has {len(task)} conversations, fewer than {world_size} ranks")
    max_conv_tokens = max_conv_tokens or 10**9
    ids_buf, mask_buf = deque(), deque()
    cursor, epoch = rank, 0
    needed = B * T + 1
    while True:
        while len(ids_buf) < needed:
            ids, mask = tokenizer.render_conversation(task[cursor], max_tokens=max_conv_tokens)
            ids_buf.extend(ids)
            mask_buf.extend(mask)
            cursor += world_size
            if cursor >= len(task):
                cursor, epoch = rank, epoch + 1
        if skip:
            for _ in range(B * T):
                ids_buf.popleft()
                mask_buf.popleft()
            skip -= 1
            continue
        ids = torch.tensor([ids_buf[i] for i in range(needed)], dtype=torch.long)
        x, y = ids[:-1].view(B, T), ids[1:].clone()
        if masked:
            m = torch.tensor([mask_buf[i] for i in range(1, needed)], dtype=torch.bool)
            y[~m] = -1
        for _ in range(B * T):
            ids_buf.popleft()
            mask_buf.popleft()
        progress = epoch + (cursor - rank) / len(task)
        yield x.to(device), y.view(B, T).to(device), progress


def lr_multiplier(progress):
    """Constant, then linear decay to 0 over the last 20% of the run (progress in [0, 1])."""
    return 1.0 if progress < 0.8 else max(0.0, 1.0 - (progress - 0.8) / 0.2)


def main(argv=None):
    args = get_args(argv)
    with GracefulStop() as stop:
        run_distributed(lambda *a: _train(*a, stop=stop), args)


def _train(args, ddp, rank, world_size, device, stop):
    from nanochat.tokenizer import get_token_bytes
    master = rank == 0
    device_type = device.type
    autocast = autocast_ctx(device_type)

    # ---- model: the base checkpoint (its other nets, e.g. MegaContext's, pass through unchanged)
    base_dir = checkpoint_dir_for("base", args.model_tag)
    model_tag = os.path.basename(base_dir)
    checkpoint_dir = os.path.join(get_base_dir(), "mid_checkpoints", model_tag)
    resume_from, finished = resume_step(checkpoint_dir, args.resume)
    if finished:
        print0(f"{checkpoint_dir} step {resume_from} is already finished, nothing to do")
        return
    orig_model, tokenizer, base_meta = load_model("base", device, phase="train", model_tag=model_tag, step=args.step)
    passthrough = base_meta.pop("model_data", {})
    extra_modules = {}  # name -> nn.Module trained with the GPT (--mc adds GistNet/LensNet here)
    mc_cfg, mc_trainer, mix = None, None, None
    model = torch.compile(orig_model, dynamic=False) if device_type == "cuda" else orig_model
    if args.mc:
        from megacontext.training.trainer import mc_from_source
        from tasks.mc_mixture import MCMixture, load_filler, parse_list
        where = f"the base checkpoint {base_dir} (step {base_meta.get('step')})"
        mc_cfg, extra_modules, passthrough, mc_trainer = mc_from_source(args, orig_model, passthrough, base_meta,
                                                                        where, device, rank, lm=model)
        mix_rows = mc_cfg.mix_batch_size or args.device_batch_size
        try:
            mix = MCMixture(tokenizer, mc_cfg, load_filler(), multiples=parse_list(mc_cfg.mix_multiples, float),
                            tasks=parse_list(mc_cfg.mix_tasks))
        except ValueError as e:
            raise UserError(f"--mc-mix-*: {e}") from None
        print0(f"MegaContext: carried GistNet + LensNet from the base checkpoint | {mc_cfg}")
    token_bytes = get_token_bytes(device)
    print0(f"loaded base model {model_tag} step {base_meta.get('step')} | parameters: {orig_model.num_params():,}")

    # ---- batch geometry
    B = args.device_batch_size
    T = args.max_seq_len if args.max_seq_len > 0 else orig_model.config.sequence_len
    world_tokens = B * T * world_size
    total_batch_size = world_tokens if args.total_batch_size == -1 else args.total_batch_size
    if B < 1 or T < 2 or total_batch_size <= 0 or total_batch_size % world_tokens:
        raise UserError(f"--total-batch-size {total_batch_size} must be a positive multiple of "
                        f"device_batch_size * max_seq_len * world_size = {B}*{T}*{world_size} = {world_tokens}")
    grad_accum_steps = total_batch_size // world_tokens
    print0(f"tokens per step: {total_batch_size:,} = {B} x {T} x {world_size} ranks x {grad_accum_steps} accumulation")

    # ---- data
    train_task, val_task = build_mixture(args.mixture, "train"), build_mixture(args.mixture, "val")
    print0(f"mixture {args.mixture}: {len(train_task):,} train / {len(val_task):,} val conversations "
           f"| loss on {'assistant tokens' if args.masked_loss else 'all tokens'}")
    eval_steps = max(1, args.eval_tokens // world_tokens)
    if not 0 <= args.text_share <= 1:
        raise UserError(f"--text-share must be in [0, 1], got {args.text_share}")

    def eval_val_bpb(loader):
        orig_model.eval()
        with autocast:
            bpb = evaluate_bpb(orig_model, loader, eval_steps, token_bytes)
        orig_model.train()
        return bpb

    # ---- optimizers
    extra_params = [p for m in extra_modules.values() for p in m.parameters()]
    optimizers = setup_optimizers(orig_model, unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                  matrix_lr=args.matrix_lr, weight_decay=args.weight_decay,
                                  extra_adamw_params=extra_params or None)
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["initial_lr"] * args.init_lr_frac
    muon = optimizers[1]
    all_params = list(orig_model.parameters()) + extra_params

    # ---- resume: weights, optimizer states, the loop's state and how far each data stream of this rank has gone
    source = {"stage": "base", "model_tag": model_tag, "step": base_meta.get("step")}
    # what fixes the order of the data: a resumed run replays the streams by counting batches
    data_order = {"mixture": args.mixture, "masked_loss": bool(args.masked_loss), "text_share": args.text_share,
                  "seed": args.seed, "device_batch_size": B, "max_seq_len": T, "grad_accum_steps": grad_accum_steps,
                  "mc": args.mc}
    mc_config = mc_cfg.to_dict() if mc_cfg is not None else base_meta.get("mc_config")
    start_step, loop_state, data_state = 0, {}, {"chat_batches": 0, "text_state": None}
    if resume_from is not None:
        _, meta = restore_checkpoint(checkpoint_dir, resume_from, device, {"gpt": orig_model, **extra_modules},
                                     optimizers, rank=rank, world_size=world_size,
                                     model_config=orig_model.config_dict(), mc_config=mc_config, source=source,
                                     data_order=data_order)
        start_step, loop_state, data_state = meta["step"], meta["loop_state"], meta["data_state"][rank]
        print0(f"resumed from {checkpoint_dir} step {start_step}")
    train_loader = packed_batches(train_task, tokenizer, B, T, rank, world_size, bool(args.masked_loss), device,
                                  skip=data_state["chat_batches"])
    text_loader = (text_loaders(tokenizer, B, T, device, resume_state=data_state["text_state"])
                   if args.text_share > 0 else None)

    user_config = vars(args)
    wandb_run = init_wandb(args.run, "nanochat-mid", user_config, master, resume_id=loop_state.get("wandb_id"))
    num_iterations = args.num_iterations
    if 0 < num_iterations < start_step:
        raise UserError(f"the checkpoint is at step {start_step}, past --num-iterations {num_iterations}")
    val_bpb, min_val_bpb = loop_state.get("val_bpb"), loop_state.get("min_val_bpb", float("inf"))
    train_loss_value, total_time = loop_state.get("train_loss"), loop_state.get("total_time", 0.0)
    text_bpb, text_rows = loop_state.get("text_bpb"), loop_state.get("text_rows", 0)
    pbar = tqdm(total=num_iterations if num_iterations > 0 else None, initial=start_step, desc="mid_train", unit="step",
                disable=not master or not sys.stderr.isatty(), dynamic_ncols=True)
    step, progress = start_step, loop_state.get("progress", 0.0)
    mc_window, mc_last, mc_rows = MetricWindow(), loop_state.get("mc_last", {}), loop_state.get("mc_rows", 0)
    # the copy warm-up's exit test (the mean of its last 10 copy batches' losses) carries over a resume
    copy_losses = deque(loop_state.get("copy_losses", []), maxlen=10)
    warm_done, warmup_steps = loop_state.get("warm_done", False), loop_state.get("warmup_steps", 0)
    meta = {k: v for k, v in base_meta.items()
            if k not in ("dataloader_state", "loop_state", "user_config", "finished")}

    def save(step, say=True):
        meta.update(model_config=orig_model.config_dict(), user_config=user_config, step=step,
                    train_loss=train_loss_value, val_bpb=val_bpb, world_size=world_size, device_batch_size=B,
                    max_seq_len=T, source=source, data_order=data_order, data_state=gather_objects(dict(data_state)),
                    loop_state={"progress": progress, "val_bpb": val_bpb, "min_val_bpb": min_val_bpb,
                                "train_loss": train_loss_value, "total_time": total_time, "text_bpb": text_bpb,
                                "text_rows": text_rows, "mc_rows": mc_rows, "mc_last": mc_last,
                                "copy_losses": list(copy_losses), "warm_done": warm_done,
                                "warmup_steps": warmup_steps, "wandb_id": wandb_run.id})
        if mc_config is not None:
            meta["mc_config"] = mc_config
        model_data = {"gpt": orig_model.state_dict(), **passthrough,
                      **{n: m.state_dict() for n, m in extra_modules.items()}}
        save_checkpoint(checkpoint_dir, step, model_data, [o.state_dict() for o in optimizers], meta, rank=rank,
                        keep=args.keep_checkpoints or None)
        if say:
            print0(f"saved checkpoint step {step} to {checkpoint_dir}")

    while True:
        # a pass over the mixture ends the run when no step count was given; ranks must agree
        if num_iterations > 0:
            last_step = step >= num_iterations
        else:
            done = torch.tensor(float(progress >= 1.0), device=device)
            last_step = bool(all_reduce_mean(done).item() > 0) if ddp else progress >= 1.0
        if last_step:
            save(step, say=False)  # before the final evaluation: a crash in it must not lose the training
        elif args.save_every > 0 and step % args.save_every == 0 and step != start_step:
            save(step)
        if last_step or (args.eval_every > 0 and step % args.eval_every == 0):
            val_bpb = eval_val_bpb(packed_batches(val_task, tokenizer, B, T, rank, world_size,
                                                  bool(args.masked_loss), device))
            min_val_bpb = min(min_val_bpb, val_bpb)
            logs = {"step": step, "val/bpb": val_bpb}
            if text_loader is not None:
                text_bpb = logs["val/text_bpb"] = eval_val_bpb(text_loader["val"]())
            print0(f"step {step:05d} | val bpb: {val_bpb:.4f}"
                   + (f" | pretraining-text val bpb: {text_bpb:.4f}" if text_bpb is not None else ""))
            wandb_run.log(logs)
        if last_step:
            break

        t0 = time.time()
        loss_sum = torch.zeros((), device=device)
        warm_frac = step / num_iterations if num_iterations > 0 else progress
        copy_stats = torch.zeros(2, device=device)  # (sum of copy-batch losses, number of copy batches)
        step_warm = mc_trainer is not None and not warm_done and warm_frac < mc_cfg.mix_warmup
        for micro in range(grad_accum_steps):
            # its own stream of draws, so that --text-share 0 leaves the chat / long-context draws as they were
            if (text_loader is not None and not step_warm
                    and np.random.default_rng([args.seed, step, micro, 1]).random() < args.text_share):
                x, y, data_state["text_state"] = next(text_loader["train"])
                text_rows += x.size(0)
                with autocast:
                    loss, extra_logs = (mc_trainer.loss(x, y, step, micro) if mc_trainer is not None
                                        else (model(x, y), {}))
                mc_window.add(extra_logs)
            elif mc_trainer is not None:
                # chat or long-context is drawn without the rank (every rank takes the same branch); the
                # rows and their task are drawn per rank, from rngs seeded by (seed, rank, step, micro): a
                # resumed run draws them again without any saved state. The copy warm-up takes every
                # micro-batch: copying heads form in ~300 steps of pure copy rows and not at all when chat
                # batches dilute them
                if step_warm or np.random.default_rng([args.seed, step, micro]).random() < mc_cfg.mix_share:
                    b = mix.batch(mix_rows * (mc_cfg.warmup_rows_mult if step_warm else 1),
                                  mc_trainer.rng(step, 1000 + micro), warmup=step_warm)
                    b.x, b.y = b.x.to(device), b.y.to(device)
                    mc_rows += b.x.size(0)
                    with autocast:
                        if all(k is not None for k in b.blocks):  # the answer's blocks are known
                            loss, extra_logs = mc_trainer.needle(b, step, micro)
                        else:
                            loss, extra_logs = mc_trainer.loss(b.x, b.y, step, micro, s=b.s)
                    if step_warm and all(k is None for k in b.blocks):  # a copy batch: the warm-up's exit test
                        copy_stats += torch.stack([loss.detach().float(), torch.ones((), device=device)])
                else:
                    x, y, progress = next(train_loader)
                    data_state["chat_batches"] += 1
                    with autocast:
                        loss, extra_logs = mc_trainer.loss(x, y, step, micro)
                mc_window.add(extra_logs)
            else:
                x, y, progress = next(train_loader)
                data_state["chat_batches"] += 1
                with autocast:
                    loss, extra_logs = model(x, y), {}
            loss_sum += loss.detach()
            (loss / grad_accum_steps).backward()
        if ddp:
            sync_grads(all_params)
        if args.grad_clip > 0:
            clip_grads([orig_model, *extra_modules.values()], args.grad_clip)
        frac = step / num_iterations if num_iterations > 0 else progress
        lrm = lr_multiplier(frac)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lrm
        for group in muon.param_groups:
            group["momentum"] = muon_momentum(step)
        for opt in optimizers:
            opt.step()
        for m in [orig_model, *extra_modules.values()]:
            m.zero_grad(set_to_none=True)
        train_loss_value = all_reduce_mean(loss_sum / grad_accum_steps).item()
        if step_warm:  # the same on every rank (it depends on the step and all-reduced losses only)
            total, n = all_reduce_mean(copy_stats).tolist()  # ranks draw their own batch kinds: average the sums
            warmup_steps = step + 1
            if n > 0:
                copy_losses.append(total / n)
            if len(copy_losses) == copy_losses.maxlen and sum(copy_losses) / len(copy_losses) < mc_cfg.warmup_exit:
                warm_done = True
                print0(f"copy warm-up done at step {step + 1}: copy-row loss {sum(copy_losses) / len(copy_losses):.3f}")
        if not math.isfinite(train_loss_value):
            raise RuntimeError(f"the training loss is {train_loss_value} at step {step}: diverged")
        dt = time.time() - t0
        total_time += dt if step > start_step else 0.0  # the first step (compilation, warm-up) does not count
        step += 1
        pbar.update(1)
        msg = (f"step {step:05d} | loss: {train_loss_value:.6f} | lrm: {lrm:.2f} | epoch progress: {progress:.3f} "
               f"| dt: {dt * 1000:.0f}ms | tok/sec: {int(total_batch_size / dt):,}")
        mc_means = mc_window.flush()
        if mc_means:
            mc_last = mc_means
            msg += " | " + mc_log_line(mc_means)
        if master:
            tqdm.write(msg) if not pbar.disable else print(msg, flush=True)
        wandb_run.log({"step": step, "train/loss": train_loss_value, "train/lrm": lrm,
                       "train/tok_per_sec": int(total_batch_size / dt), **for_wandb(mc_means)})
        signum = stop.requested(ddp, device)  # after every step, on every rank: they stop together
        if signum:
            save(step, say=False)
            pbar.close()
            wandb_run.finish()
            stop.exit(signum, f"saved {checkpoint_dir} step {step}", master)
    pbar.close()
    if ddp and mc_trainer is not None:
        # every rank must hold the same GPT + GistNet + LensNet weights: a cheap, visible check
        from megacontext.training.trainer import param_checksum
        print_line(f"rank {rank}/{world_size} | mc final loss: {train_loss_value} | "
                   f"mc checksum: {param_checksum([orig_model, *extra_modules.values()]):.10e}")

    if master:  # the final evaluation's result, and the mark that --resume=auto has nothing left to do
        meta.update(val_bpb=val_bpb, finished=True)
        meta["loop_state"].update(val_bpb=val_bpb, min_val_bpb=min_val_bpb, text_bpb=text_bpb)
        save_meta(checkpoint_dir, step, meta)
    print0(f"saved {checkpoint_dir} step {step} | min val bpb: {min_val_bpb:.4f} | time: {total_time / 60:.2f}m")

    from nanochat.report import get_report
    if master:
        get_report().log(section="Midtraining", data=[
            user_config,
            {"Number of iterations": step, "Mixture conversations": len(train_task), "DDP world size": world_size},
            {"Final train loss": train_loss_value, "Minimum validation bpb": min_val_bpb, "Final validation bpb": val_bpb},
            *([{"Pretraining-text rows (--text-share)": text_rows, "Pretraining-text val bpb": text_bpb}]
              if text_loader is not None else []),
            *mc_report_rows(mc_cfg, mc_last, train_loss_value, val_bpb,
                            int(total_batch_size * max(step - 1, 0) / total_time) if total_time > 0 else None),
            *([{"Long-context rows (mc_mixture)": mc_rows, "Copy warm-up steps": warmup_steps,
                "Copy warm-up ended by": "the GPT copying" if warm_done else "its step cap"}]
              if mc_cfg is not None else []),
        ])
    wandb_run.finish()


if __name__ == "__main__":
    run_main(main)
