"""
Evaluate a base model: bits per byte on the validation shard, a cloze accuracy made from the
validation shard, the DCLM CORE metric (as nanochat reports it, see nanochat/core_eval.py), and a
few greedy samples.

    python -m scripts.base_eval                          # the largest base model, last step
    python -m scripts.base_eval --model-tag d4 --cloze-items 200
    python -m scripts.base_eval --core on --core-max-per-task 100   # a quick, approximate CORE
    torchrun --nproc_per_node=8 -m scripts.base_eval     # DDP: work is split over ranks

CORE needs the eval bundle in $NANOCHAT_BASE_DIR/eval_bundle. --core auto (the default) downloads it
on CUDA machines unless NANOCHAT_OFFLINE=1 or HF_HUB_OFFLINE=1 is set; elsewhere it runs CORE only
when the bundle is already there, and otherwise skips it with a note. --core on requires it
(downloading it if it can), --core off skips it, --core-bundle DIR uses an unzipped bundle elsewhere.

Cloze: an item is the first --cloze-context tokens of a validation document (after <|bos|>) and
--cloze-choices candidate continuations of --cloze-continuation tokens: the document's true next
tokens, and spans taken from other validation documents. The model picks the candidate with the
lowest summed loss. Chance is 1/choices; a model that has learned anything about its language
(or, on tiny synthetic data, about its documents' structure) beats it. The items are a pure
function of the validation shard, the tokenizer and --seed, so runs compare.
"""
import argparse
import os
import random

import torch
import torch.distributed as dist

from nanochat.common import (UserError, run_main, compute_init, compute_cleanup, leave_together, print0,
                             autocast_ctx, autodetect_device_type, get_base_dir)
from nanochat.checkpoint_manager import load_model
from nanochat.engine import Engine
from nanochat.loss_eval import evaluate_bpb

SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
]


def make_cloze_items(texts, tokenizer, num_items, context_tokens=32, continuation_tokens=8, num_choices=4, seed=0):
    """
    Items {"context": ids, "choices": [ids] * num_choices, "answer": index of the true continuation}
    from documents long enough for context + continuation. Distractors are same-length spans of
    other documents; every choice differs from the true one.
    """
    if num_choices < 2:
        raise UserError("--cloze-choices must be at least 2")
    bos = tokenizer.get_bos_token_id()
    docs = [ids for ids in tokenizer.encode(list(texts), prepend=bos) if len(ids) >= 1 + context_tokens + continuation_tokens]
    if len(docs) < num_choices:
        raise UserError(f"the validation shard has only {len(docs)} documents of at least "
                        f"{context_tokens + continuation_tokens} tokens; need {num_choices} (lower --cloze-context)")
    rng = random.Random(seed)
    items = []
    for k in range(num_items):
        d = k % len(docs)
        doc = docs[d]
        cut = 1 + context_tokens
        true = doc[cut:cut + continuation_tokens]
        choices = [true]
        tries = 0
        while len(choices) < num_choices and tries < 100 * num_choices:
            tries += 1
            other = docs[rng.randrange(len(docs))]
            s = rng.randrange(1, len(other) - continuation_tokens + 1)
            span = other[s:s + continuation_tokens]
            if span not in choices:
                choices.append(span)
        if len(choices) < num_choices:
            continue
        answer = rng.randrange(num_choices)
        choices[0], choices[answer] = choices[answer], choices[0]
        items.append({"context": doc[:cut], "choices": choices, "answer": answer})
    return items


@torch.no_grad()
def cloze_accuracy(model, items, indices=None):
    """Share of items (those in `indices`, default all) whose true continuation has the lowest loss."""
    device = model.get_device()
    indices = range(len(items)) if indices is None else indices
    correct = total = 0
    for i in indices:
        item = items[i]
        rows = torch.tensor([item["context"] + c for c in item["choices"]], dtype=torch.long, device=device)
        x, y = rows[:, :-1], rows[:, 1:].clone()
        y[:, :len(item["context"]) - 1] = -1  # score only the continuation tokens
        with autocast_ctx(device.type):
            losses = model(x, y, loss_reduction="none").view(y.shape).sum(dim=1)
        correct += int(losses.argmin().item() == item["answer"])
        total += 1
    return correct, total


def get_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m scripts.base_eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-tag", default=None, help="base model tag (default: largest)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: last)")
    p.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    p.add_argument("--device-batch-size", type=int, default=32, help="rows per forward for bpb")
    p.add_argument("--max-seq-len", type=int, default=-1, help="T for bpb (default: the model's sequence_len)")
    p.add_argument("--eval-tokens", type=int, default=20 * 524288, help="validation tokens for bpb")
    p.add_argument("--cloze-items", type=int, default=500, help="cloze items (0: skip the cloze)")
    p.add_argument("--cloze-context", type=int, default=32, help="context tokens per item")
    p.add_argument("--cloze-continuation", type=int, default=8, help="tokens per candidate continuation")
    p.add_argument("--cloze-choices", type=int, default=4, help="candidates per item")
    p.add_argument("--core", choices=["auto", "on", "off"], default="auto",
                   help="the CORE metric: auto = when the bundle is there (downloaded on CUDA), on = required, off")
    p.add_argument("--core-bundle", default=None, metavar="DIR",
                   help="an unzipped eval bundle (default: $NANOCHAT_BASE_DIR/eval_bundle)")
    p.add_argument("--core-max-per-task", type=int, default=-1, help="examples per CORE task (-1: all)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens per sample")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    device_type = args.device_type or autodetect_device_type()
    ddp, rank, _, world_size, device = compute_init(device_type)
    try:
        results = _evaluate(args, ddp, rank, world_size, device)
        leave_together()
        return results
    finally:
        compute_cleanup()


def resolve_core_bundle(mode, bundle_arg, device_type, ddp=False, rank=0):
    """
    (bundle directory or None, note on why not) for --core / --core-bundle. Decided before the model is
    loaded, so that `--core on` without a bundle fails at once. Only `auto` on CUDA and `on` may download.
    Under DDP rank 0 decides (and downloads) and the other ranks take its outcome, so that all agree.
    """
    from nanochat.core_eval import is_bundle, default_bundle_dir, ensure_eval_bundle, network_disabled

    def decide():  # -> (path, note, error)
        if mode == "off":
            return None, "off (--core off)", None
        if bundle_arg:
            if not is_bundle(bundle_arg):
                return None, None, (f"--core-bundle {bundle_arg} is not a CORE eval bundle "
                                    "(it needs core.yaml, eval_meta_data.csv and eval_data/)")
            return os.path.abspath(bundle_arg), None, None
        base_dir = get_base_dir()
        dest = default_bundle_dir(base_dir)
        if is_bundle(dest):
            return dest, None, None
        if mode == "auto" and (device_type != "cuda" or network_disabled()):
            why = "not on CUDA" if device_type != "cuda" else f"{network_disabled()} is set"
            return None, (f"skipped: no eval bundle at {dest}, and --core auto does not download it ({why}); "
                          "--core on downloads it, --core-bundle DIR uses a copy"), None
        try:
            return ensure_eval_bundle(base_dir), None, None
        except UserError as e:
            if mode == "on":
                return None, None, str(e)
            return None, f"skipped: {e}", None

    outcome = list(decide()) if rank == 0 else [None, None, None]
    if ddp and dist.is_initialized():
        dist.broadcast_object_list(outcome, src=0)
    path, note, error = outcome
    if error is not None:
        raise UserError(error)
    if path is not None and not is_bundle(path):  # rank 0 has it, but this rank's machine does not
        raise UserError(f"rank {rank} cannot see the CORE eval bundle at {path}: "
                        "put a copy there or pass --core-bundle")
    return path, note


def _core_table(core):
    from nanochat.report import markdown_table
    return markdown_table(
        ["Task", "Type", "Shots", "Examples", "Random baseline %", "Accuracy", "Centered"],
        [[t["label"], t["task_type"], t["num_fewshot"], t["num_examples"], t["random_baseline"],
          core["results"][t["label"]], core["centered_results"][t["label"]]] for t in core["tasks"]]
        + [["CORE", "", "", "", "", "", core["core_metric"]]])


def _evaluate(args, ddp, rank, world_size, device):
    from nanochat.tokenizer import get_token_bytes
    from nanochat.dataloader import tokenizing_distributed_data_loader
    from nanochat.dataset import parquets_iter_batched
    core_bundle, core_note = resolve_core_bundle(args.core, args.core_bundle, device.type, ddp, rank)
    model, tokenizer, meta = load_model("base", device, phase="eval", model_tag=args.model_tag, step=args.step)
    print0(f"base model step {meta.get('step')} | parameters: {model.num_params():,}")
    results = {}

    # ---- bits per byte on the validation shard
    B = args.device_batch_size
    T = args.max_seq_len if args.max_seq_len > 0 else model.config.sequence_len
    steps = max(1, args.eval_tokens // (B * T * world_size))
    loader = tokenizing_distributed_data_loader(tokenizer, B, T, "val", device)
    with autocast_ctx(device.type):
        results["Validation bpb"] = evaluate_bpb(model, loader, steps, get_token_bytes(device))
    print0(f"val bpb: {results['Validation bpb']:.4f} ({steps * B * T * world_size:,} tokens)")

    # ---- cloze accuracy from the validation shard
    if args.cloze_items > 0:
        texts = [t for batch in parquets_iter_batched("val") for t in batch]
        items = make_cloze_items(texts, tokenizer, args.cloze_items, args.cloze_context, args.cloze_continuation,
                                 args.cloze_choices, args.seed)
        correct, total = cloze_accuracy(model, items, range(rank, len(items), world_size))
        t = torch.tensor([correct, total], dtype=torch.float32, device=device)  # NCCL reduces device tensors
        if ddp and dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        acc = (t[0] / t[1].clamp(min=1)).item()
        results[f"Cloze accuracy ({args.cloze_choices} choices)"] = acc
        print0(f"cloze accuracy: {100 * acc:.2f}% over {int(t[1])} items (chance {100 / args.cloze_choices:.1f}%)")

    # ---- CORE (DCLM), as nanochat computes it
    core = None
    if core_bundle is not None:
        from nanochat.core_eval import evaluate_core
        print0(f"CORE: eval bundle {core_bundle}")
        core = evaluate_core(model, tokenizer, core_bundle, max_per_task=args.core_max_per_task)
        results["CORE metric"] = core["core_metric"]
        print0(_core_table(core), end="")
        print0(f"CORE metric: {core['core_metric']:.4f}")
    else:
        print0(f"CORE: {core_note}")

    # ---- greedy samples
    samples = []
    if rank == 0:
        engine = Engine(model, tokenizer)
        for prompt in SAMPLE_PROMPTS:
            ids = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
            out, _ = engine.generate_batch(ids, num_samples=1, max_tokens=args.max_new_tokens, temperature=0.0)
            samples.append(tokenizer.decode(out[0][1:]))
            print(repr(samples[-1]))

    if rank == 0:
        from nanochat.report import get_report
        core_section = f"CORE: {core_note}"
        if core is not None:
            cap = "all" if args.core_max_per_task <= 0 else f"at most {args.core_max_per_task}"
            core_section = (f"CORE ({len(core['tasks'])} tasks, {cap} examples per task, eval bundle {core_bundle}):"
                            "\n\n" + _core_table(core))
        get_report().log(section="Base model evaluation", data=[
            {"model tag": args.model_tag or "(largest)", "checkpoint step": meta.get("step"),
             "bpb eval tokens": steps * B * T * world_size, "cloze items": args.cloze_items},
            results,
            core_section,
            "Samples (greedy):\n```\n" + "\n".join(repr(s) for s in samples) + "\n```",
        ])
    return results


if __name__ == "__main__":
    run_main(main)
