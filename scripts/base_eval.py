"""
Evaluate a base model offline: bits per byte on the validation shard, a cloze accuracy made from
the validation shard, and a few greedy samples.

    python -m scripts.base_eval                          # the largest base model, last step
    python -m scripts.base_eval --model-tag d4 --cloze-items 200
    torchrun --nproc_per_node=8 -m scripts.base_eval     # DDP: work is split over ranks

Cloze: an item is the first --cloze-context tokens of a validation document (after <|bos|>) and
--cloze-choices candidate continuations of --cloze-continuation tokens: the document's true next
tokens, and spans taken from other validation documents. The model picks the candidate with the
lowest summed loss. Chance is 1/choices; a model that has learned anything about its language
(or, on tiny synthetic data, about its documents' structure) beats it. The items are a pure
function of the validation shard, the tokenizer and --seed, so runs compare.
"""
import argparse
import random

import torch
import torch.distributed as dist

from nanochat.common import (UserError, run_main, compute_init, compute_cleanup, print0, autocast_ctx,
                             autodetect_device_type)
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
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens per sample")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    device_type = args.device_type or autodetect_device_type()
    ddp, rank, _, world_size, device = compute_init(device_type)
    try:
        return _evaluate(args, ddp, rank, world_size, device)
    finally:
        compute_cleanup()


def _evaluate(args, ddp, rank, world_size, device):
    from nanochat.tokenizer import get_token_bytes
    from nanochat.dataloader import tokenizing_distributed_data_loader
    from nanochat.dataset import parquets_iter_batched
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
        get_report().log(section="Base model evaluation", data=[
            {"model tag": args.model_tag or "(largest)", "checkpoint step": meta.get("step"),
             "bpb eval tokens": steps * B * T * world_size, "cloze items": args.cloze_items},
            results,
            "Samples (greedy):\n```\n" + "\n".join(repr(s) for s in samples) + "\n```",
        ])
    return results


if __name__ == "__main__":
    run_main(main)
