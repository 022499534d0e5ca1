"""
Supervised fine-tuning (SFT): train on whole conversations, one per row, with the loss only on
what the assistant says.

    python -m scripts.chat_sft                           # from the largest mid model
    python -m scripts.chat_sft --source base             # skip midtraining
    python -m scripts.chat_sft --mixture offline --device-batch-size 4 --num-iterations 50   # toy CPU run

Batches. Each row is one rendered conversation (cut at --max-seq-len tokens), rows are padded on
the right to the longest row of the micro-batch; targets are the next token where the tokenizer's
mask says the assistant produced it, and -1 (ignored) everywhere else: BOS, user turns,
<|assistant_start|>, tool outputs and the padding. Causal attention means the right padding never
changes the real tokens' outputs. The loss is the mean over the assistant tokens of a micro-batch.

`--mixture full` (default) adds SmolTalk, ARC and GSM8K from the Hugging Face hub to the code-made
tasks; `--mixture offline` uses only the code-made tasks (Identity, Arithmetic, Spelling, Memory).
The LR starts at --init-lr-frac of the base LRs and decays linearly to 0.
Writes $NANOCHAT_BASE_DIR/chatsft_checkpoints/<model_tag>/. Nets other than the GPT stored in the
source checkpoint (MegaContext's GistNet/LensNet) are carried over.

Resuming. Every `--save-every` steps, and on SIGTERM / SIGINT (after the current step; exit status 143 / 130),
the run saves a checkpoint with its optimizer states and how many batches each rank has drawn: `--resume`
continues from it exactly (the same batches, the same losses), `--resume=auto` too, or starts afresh when
there is no checkpoint, or does nothing when the last one finished the run.

MegaContext (`--mc`): the source checkpoint must hold GistNet, LensNet and its mc_config (else a
one-line error); the loss is MCObjective's on every micro-batch long enough for a history block and
a target segment (shorter ones train the plain LM), and the MCConfig comes from the source
(--mc-* flags may override only the training/focus knobs, see megacontext/training/trainer.py).
"""
import argparse
import math
import os
import sys
import time

import torch
from tqdm import tqdm

from nanochat.common import (UserError, run_main, run_distributed, get_base_dir, print0,
                             autocast_ctx, init_wandb)
from nanochat.checkpoint_manager import (load_model, checkpoint_dir_for, save_checkpoint, save_meta, resume_step,
                                        restore_checkpoint)
from nanochat.optim import setup_optimizers, sync_grads
from nanochat.stopping import GracefulStop
from scripts.base_train import all_reduce_mean, gather_objects, mc_log_line, mc_report_rows
from megacontext.config import add_mc_args
from megacontext.training.telemetry import MetricWindow, for_wandb
from tasks.common import TaskMixture
from tasks.arithmetic import Arithmetic
from tasks.identity import Identity
from tasks.memory import Memory
from tasks.spelling import Spelling


def get_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m scripts.chat_sft", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="dummy", help="wandb run name ('dummy': no wandb, no network)")
    p.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    p.add_argument("--source", choices=["mid", "base"], default="mid", help="checkpoint to fine-tune")
    p.add_argument("--model-tag", default=None, help="source model tag, and the output tag (default: largest)")
    p.add_argument("--step", type=int, default=None, help="source checkpoint step (default: last)")
    p.add_argument("--mixture", choices=["full", "offline"], default="full",
                   help="full: hub datasets + code-made tasks; offline: code-made tasks only (no network)")
    p.add_argument("--max-seq-len", type=int, default=-1, help="longest conversation in tokens (default: the model's sequence_len)")
    p.add_argument("--device-batch-size", type=int, default=4, help="conversations per rank per micro-step")
    p.add_argument("--target-examples-per-step", type=int, default=32,
                   help="conversations per optimizer step over all ranks (gradient accumulation fills the gap)")
    p.add_argument("--num-epochs", type=int, default=1, help="passes over the mixture when --num-iterations=-1")
    p.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: from --num-epochs)")
    p.add_argument("--embedding-lr", type=float, default=0.2)
    p.add_argument("--unembedding-lr", type=float, default=0.004)
    p.add_argument("--matrix-lr", type=float, default=0.02)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--init-lr-frac", type=float, default=0.02, help="starting LR as a fraction of the base LRs")
    p.add_argument("--eval-every", type=int, default=100, help="val loss every N steps (0: only at the end)")
    p.add_argument("--eval-steps", type=int, default=100, help="micro-batches per val loss evaluation")
    p.add_argument("--eval-metrics-every", type=int, default=200,
                   help="task accuracy (offline tasks) every N steps (0: only at the end, -1: never)")
    p.add_argument("--eval-metrics-max-problems", type=int, default=64, help="problems per task for those accuracies")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--save-every", type=int, default=500,
                   help="checkpoint every N steps (-1: only at the end). A hard crash loses at most N steps "
                        "(SIGTERM and Ctrl-C save the current one); 500 is one intermediate checkpoint in "
                        "nanochat's ~700-step SFT, as each save writes the model and every rank's optimizer state")
    p.add_argument("--keep-checkpoints", type=int, default=2,
                   help="keep the newest N checkpoint steps, delete older ones (0: keep all)")
    p.add_argument("--resume", nargs="?", const="last", default=None, metavar="STEP",
                   help="continue from the last checkpoint of this stage (or from step STEP); --resume=auto: "
                        "from the last checkpoint if there is one, nothing to do if it finished the run")
    p.add_argument("--mc", action="store_true", help="train with MegaContext (needs a source checkpoint trained with --mc)")
    add_mc_args(p)
    return p.parse_args(argv)


def build_mixture(mixture, split):
    """The SFT conversations (split train or val); the code-made tasks are seeded and identical on all ranks."""
    train = split == "train"
    gen_split = "train" if train else "test"
    n = (lambda k: k) if train else (lambda k: max(25, k // 10))
    tasks = [Identity(gen_split, size=n(500)), Arithmetic(gen_split, size=n(2000)),
             Spelling(gen_split, size=n(2000)), Memory(gen_split, size=n(2000))]
    if mixture == "full":
        from tasks.smoltalk import SmolTalk
        from tasks.arc import ARC
        from tasks.gsm8k import GSM8K
        if train:
            tasks += [SmolTalk("train", stop=10000), ARC("ARC-Easy", "train"), ARC("ARC-Challenge", "train"),
                      GSM8K("main", "train")]
        else:
            tasks += [SmolTalk("test", stop=1000)]
    elif mixture != "offline":
        raise UserError(f"unknown mixture {mixture!r}: choose full or offline")
    return TaskMixture(tasks, seed=0 if train else 1)


def sft_collate(batch, pad_id):
    """
    batch: list of (ids, mask) from tokenizer.render_conversation. Returns (inputs, targets), both
    (len(batch), longest - 1) long: inputs are ids[:-1] right-padded with pad_id; targets are
    ids[1:] where mask[1:] == 1, else -1 (and -1 over the padding).
    """
    ncols = max(len(ids) for ids, _ in batch) - 1
    if ncols < 1:
        raise ValueError("every conversation must render to at least 2 tokens")
    inputs = torch.full((len(batch), ncols), pad_id, dtype=torch.long)
    targets = torch.full((len(batch), ncols), -1, dtype=torch.long)
    for i, (ids, mask) in enumerate(batch):
        ids_t = torch.tensor(ids, dtype=torch.long)
        n = len(ids) - 1
        inputs[i, :n] = ids_t[:-1]
        row = ids_t[1:].clone()
        row[torch.tensor(mask[1:], dtype=torch.long) == 0] = -1
        targets[i, :n] = row
    return inputs, targets


def sft_batches(task, tokenizer, B, max_tokens, rank=0, world_size=1, device="cpu", skip=0):
    """Infinite generator of (inputs, targets, progress): B conversations per batch, rank-strided.
    skip: pass over the first `skip` batches without building them (a resumed run fast-forwards the stream)."""
    if len(task) < world_size:
        raise UserError(f"the mixture has {len(task)} conversations, fewer than {world_size} ranks")
    pad_id = tokenizer.get_bos_token_id()  # any id works: its targets are -1
    cursor, epoch, batch = rank, 0, []
    while True:
        ids, mask = tokenizer.render_conversation(task[cursor], max_tokens=max_tokens)
        if sum(mask[1:]):  # a conversation cut before the assistant speaks teaches nothing
            batch.append((ids, mask))
        cursor += world_size
        if cursor >= len(task):
            cursor, epoch = rank, epoch + 1
        if len(batch) == B and skip:
            batch, skip = [], skip - 1
        elif len(batch) == B:
            x, y = sft_collate(batch, pad_id)
            batch = []
            yield x.to(device), y.to(device), epoch + (cursor - rank) / len(task)


def close_rows(x, y):
    """
    For MCObjective, which checks y[:, t] == x[:, t + 1] wherever y is labelled: sft_collate's
    inputs stop one token early (a row's last label is its last token, whose input slot is padding),
    so append one column and write each row's last token into the padding slot after it. Only slots
    whose own label is -1 (padding) are written, so the real inputs are never changed.
    """
    x2 = torch.cat([x, x[:, -1:]], dim=1)
    y2 = torch.cat([y, torch.full_like(y[:, -1:], -1)], dim=1)
    fix = (y2[:, :-1] != -1) & (y2[:, 1:] == -1) & (x2[:, 1:] != y2[:, :-1])
    x2[:, 1:] = torch.where(fix, y2[:, :-1], x2[:, 1:])
    return x2, y2


def main(argv=None):
    args = get_args(argv)
    with GracefulStop() as stop:
        run_distributed(lambda *a: _train(*a, stop=stop), args)


def _train(args, ddp, rank, world_size, device, stop):
    from scripts.chat_eval import run_chat_eval
    master = rank == 0
    device_type = device.type
    autocast = autocast_ctx(device_type)

    src_dir = checkpoint_dir_for(args.source, args.model_tag)
    model_tag = os.path.basename(src_dir)
    checkpoint_dir = os.path.join(get_base_dir(), "chatsft_checkpoints", model_tag)
    resume_from, finished = resume_step(checkpoint_dir, args.resume)
    if finished:
        print0(f"{checkpoint_dir} step {resume_from} is already finished, nothing to do")
        return
    orig_model, tokenizer, src_meta = load_model(args.source, device, phase="train", model_tag=model_tag, step=args.step)
    passthrough = src_meta.pop("model_data", {})
    extra_modules = {}  # name -> nn.Module trained with the GPT (--mc adds GistNet/LensNet here)
    mc_cfg, mc_trainer = None, None
    if args.mc:
        from megacontext.training.trainer import mc_from_source
        where = f"the {args.source} checkpoint {src_dir} (step {src_meta.get('step')})"
        mc_cfg, extra_modules, passthrough, mc_trainer = mc_from_source(args, orig_model, passthrough, src_meta,
                                                                        where, device, rank)
        print0(f"MegaContext: carried GistNet + LensNet from the {args.source} checkpoint | {mc_cfg}")
    # no torch.compile: every micro-batch has its own length (compiling each shape costs more than it saves)
    model = orig_model
    print0(f"loaded {args.source} model {model_tag} step {src_meta.get('step')} | parameters: {orig_model.num_params():,}")

    B = args.device_batch_size
    max_tokens = args.max_seq_len if args.max_seq_len > 0 else orig_model.config.sequence_len
    examples_per_micro = B * world_size
    if B < 1 or args.target_examples_per_step % examples_per_micro:
        raise UserError(f"--target-examples-per-step {args.target_examples_per_step} must be a multiple of "
                        f"device_batch_size * world_size = {examples_per_micro}")
    grad_accum_steps = args.target_examples_per_step // examples_per_micro
    train_task, val_task = build_mixture(args.mixture, "train"), build_mixture(args.mixture, "val")
    num_iterations = args.num_iterations
    if num_iterations <= 0:
        num_iterations = max(1, args.num_epochs * len(train_task) // args.target_examples_per_step)
    print0(f"mixture {args.mixture}: {len(train_task):,} train / {len(val_task):,} val conversations | "
           f"{args.target_examples_per_step} conversations per step ({grad_accum_steps} accumulation) | "
           f"{num_iterations} steps")

    def eval_val_loss():
        loader = sft_batches(val_task, tokenizer, B, max_tokens, rank, world_size, device)
        orig_model.eval()
        total = torch.zeros((), dtype=torch.float64, device=device) if device_type != "mps" else torch.zeros((), device=device)
        count = torch.zeros_like(total)
        with torch.no_grad(), autocast:
            for _ in range(args.eval_steps):
                x, y, _ = next(loader)
                losses = orig_model(x, y, loss_reduction="none").view(-1)
                valid = y.view(-1) >= 0
                total += losses[valid].sum().to(total.dtype)
                count += valid.sum().to(total.dtype)
        orig_model.train()
        total, count = all_reduce_mean(total), all_reduce_mean(count)
        return (total / count.clamp(min=1)).item()

    def eval_metrics():
        orig_model.eval()
        out = {}
        for name in ("Arithmetic", "Spelling", "Memory", "Identity"):
            out[name] = run_chat_eval(name, orig_model, tokenizer, max_problems=args.eval_metrics_max_problems,
                                      max_new_tokens=64, temperature=0.0, quiet=True)
        orig_model.train()
        return out

    extra_params = [p for m in extra_modules.values() for p in m.parameters()]
    optimizers = setup_optimizers(orig_model, unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                  matrix_lr=args.matrix_lr, weight_decay=args.weight_decay,
                                  extra_adamw_params=extra_params or None)
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["initial_lr"] * args.init_lr_frac
            group["lr"] = group["initial_lr"]
    all_params = list(orig_model.parameters()) + extra_params

    # ---- resume: weights, optimizer states, the loop's state and how many batches this rank has drawn
    source = {"stage": args.source, "model_tag": model_tag, "step": src_meta.get("step")}
    # what fixes the order of the data: a resumed run replays the stream by counting batches
    data_order = {"mixture": args.mixture, "seed": args.seed, "device_batch_size": B, "max_seq_len": max_tokens,
                  "grad_accum_steps": grad_accum_steps, "mc": args.mc}
    mc_config = mc_cfg.to_dict() if mc_cfg is not None else src_meta.get("mc_config")
    start_step, loop_state, data_state = 0, {}, {"batches": 0}
    if resume_from is not None:
        _, meta = restore_checkpoint(checkpoint_dir, resume_from, device, {"gpt": orig_model, **extra_modules},
                                     optimizers, rank=rank, world_size=world_size,
                                     model_config=orig_model.config_dict(), mc_config=mc_config, source=source,
                                     data_order=data_order)
        start_step, loop_state, data_state = meta["step"], meta["loop_state"], meta["data_state"][rank]
        if start_step > num_iterations:
            raise UserError(f"the checkpoint is at step {start_step}, past --num-iterations {num_iterations}")
        print0(f"resumed from {checkpoint_dir} step {start_step}")
    train_loader = sft_batches(train_task, tokenizer, B, max_tokens, rank, world_size, device,
                               skip=data_state["batches"])

    user_config = vars(args)
    wandb_run = init_wandb(args.run, "nanochat-sft", user_config, master, resume_id=loop_state.get("wandb_id"))
    val_loss, train_loss_value = loop_state.get("val_loss"), loop_state.get("train_loss")
    metrics, total_time = loop_state.get("metrics", {}), loop_state.get("total_time", 0.0)
    mc_window, mc_last, tokens_seen = MetricWindow(), loop_state.get("mc_last", {}), loop_state.get("tokens_seen", 0)
    meta = {k: v for k, v in src_meta.items() if k not in ("dataloader_state", "loop_state", "user_config", "finished")}

    def save(step):
        meta.update(model_config=orig_model.config_dict(), user_config=user_config, step=step,
                    train_loss=train_loss_value, val_loss=val_loss, metrics=metrics, world_size=world_size,
                    source=source, data_order=data_order, data_state=gather_objects(dict(data_state)),
                    loop_state={"val_loss": val_loss, "train_loss": train_loss_value, "metrics": metrics,
                                "total_time": total_time, "tokens_seen": tokens_seen, "mc_last": mc_last,
                                "wandb_id": wandb_run.id})
        if mc_config is not None:
            meta["mc_config"] = mc_config
        model_data = {"gpt": orig_model.state_dict(), **passthrough,
                      **{n: m.state_dict() for n, m in extra_modules.items()}}
        save_checkpoint(checkpoint_dir, step, model_data, [o.state_dict() for o in optimizers], meta, rank=rank,
                        keep=args.keep_checkpoints or None)

    pbar = tqdm(total=num_iterations, initial=start_step, desc="chat_sft", unit="step",
                disable=not master or not sys.stderr.isatty(), dynamic_ncols=True)
    step = start_step
    while True:
        last_step = step == num_iterations
        if last_step:
            save(step)  # before the final evaluations: a crash in them must not lose the training
        elif args.save_every > 0 and step % args.save_every == 0 and step != start_step:
            save(step)
            print0(f"saved checkpoint step {step} to {checkpoint_dir}")
        if last_step or (args.eval_every > 0 and step % args.eval_every == 0):
            val_loss = eval_val_loss()
            print0(f"step {step:05d} | val loss: {val_loss:.4f}")
            wandb_run.log({"step": step, "val/loss": val_loss})
        if args.eval_metrics_every >= 0 and (last_step or (args.eval_metrics_every > 0 and step > 0
                                                            and step % args.eval_metrics_every == 0)):
            metrics = eval_metrics()
            print0(f"step {step:05d} | " + " | ".join(f"{k}: {v:.4f}" for k, v in metrics.items()))
            wandb_run.log({"step": step, **{f"val/{k}": v for k, v in metrics.items()}})
        if last_step:
            break

        t0 = time.time()
        loss_sum = torch.zeros((), device=device)
        num_tokens = 0
        for micro in range(grad_accum_steps):
            x, y, _ = next(train_loader)
            data_state["batches"] += 1
            with autocast:
                if mc_trainer is not None:
                    loss, extra_logs = mc_trainer.loss(*close_rows(x, y), step, micro)
                else:
                    loss, extra_logs = model(x, y), {}
            mc_window.add(extra_logs)
            tokens_seen += x.numel()
            loss_sum += loss.detach()
            num_tokens += int((y >= 0).sum())
            (loss / grad_accum_steps).backward()
        if ddp:
            sync_grads(all_params)
        lrm = 1.0 - step / num_iterations  # linear decay to 0
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lrm
        for opt in optimizers:
            opt.step()
        for m in [orig_model, *extra_modules.values()]:
            m.zero_grad(set_to_none=True)
        train_loss_value = all_reduce_mean(loss_sum / grad_accum_steps).item()
        if not math.isfinite(train_loss_value):
            raise RuntimeError(f"the training loss is {train_loss_value} at step {step}: diverged")
        dt = time.time() - t0
        total_time += dt
        step += 1
        pbar.update(1)
        msg = (f"step {step:05d}/{num_iterations:05d} | loss: {train_loss_value:.6f} | lrm: {lrm:.3f} "
               f"| assistant tokens: {num_tokens:,} | dt: {dt * 1000:.0f}ms")
        mc_means = mc_window.flush()
        if mc_means:
            mc_last = mc_means
            msg += " | " + mc_log_line(mc_means)
        if master:
            tqdm.write(msg) if not pbar.disable else print(msg, flush=True)
        wandb_run.log({"step": step, "train/loss": train_loss_value, "train/lrm": lrm,
                       "train/num_tokens": num_tokens, **for_wandb(mc_means)})
        signum = stop.requested(ddp, device)  # after every step, on every rank: they stop together
        if signum:
            save(step)
            pbar.close()
            wandb_run.finish()
            stop.exit(signum, f"saved {checkpoint_dir} step {step}", master)
    pbar.close()

    if master:  # the final evaluations' results, and the mark that --resume=auto has nothing left to do
        meta.update(val_loss=val_loss, metrics=metrics, finished=True)
        meta["loop_state"].update(val_loss=val_loss, metrics=metrics)
        save_meta(checkpoint_dir, step, meta)
    print0(f"saved {checkpoint_dir} step {num_iterations} | val loss: {val_loss:.4f} | time: {total_time / 60:.2f}m")

    from nanochat.report import get_report
    if master:
        get_report().log(section="Chat SFT", data=[
            user_config,
            {"Number of iterations": num_iterations, "Training conversations": len(train_task),
             "DDP world size": world_size},
            {"Final train loss": train_loss_value, "Validation loss": val_loss, **metrics},
            *mc_report_rows(mc_cfg, mc_last, train_loss_value, None,
                            int(tokens_seen * world_size / total_time) if total_time > 0 else None),
        ])
    wandb_run.finish()


if __name__ == "__main__":
    run_main(main)
