"""
Evaluate a base checkpoint: bits per byte on the train and val splits, the unigram baseline
(token frequencies of the train split, evaluated on val) that the model must beat, and a few
greedy samples.

    python -m scripts.base_loss                       # the largest model, its last step
    python -m scripts.base_loss --model-tag=d2 --split-tokens=65536
    torchrun --nproc_per_node=8 -m scripts.base_loss  # the evaluation is split over ranks
"""
import argparse
import os

from nanochat.common import (UserError, run_main, compute_init, compute_cleanup, leave_together, print0,
                             autocast_ctx, autodetect_device_type)
from nanochat.checkpoint_manager import load_model
from nanochat.loss_eval import evaluate_bpb, unigram_bpb
from nanochat.engine import Engine

PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
]


def get_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m scripts.base_loss", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    p.add_argument("--model-tag", default=None, help="checkpoint tag (default: the largest model)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last one)")
    p.add_argument("--device-batch-size", type=int, default=32, help="sequences per rank per batch")
    p.add_argument("--max-seq-len", type=int, default=None, help="evaluation length (default: the training length)")
    p.add_argument("--split-tokens", type=int, default=20 * 524288, help="tokens evaluated per split")
    p.add_argument("--unigram-tokens", type=int, default=None,
                   help="train tokens counted for the unigram baseline (default: --split-tokens)")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per sample (0: no samples)")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    device_type = args.device_type or autodetect_device_type()
    ddp, rank, local_rank, world_size, device = compute_init(device_type)
    try:
        _evaluate(args, world_size, device)
        leave_together()
    finally:
        compute_cleanup()


def _evaluate(args, world_size, device):
    from nanochat.tokenizer import get_token_bytes
    from nanochat.dataloader import tokenizing_distributed_data_loader
    model, tokenizer, meta = load_model("base", device, phase="eval", model_tag=args.model_tag, step=args.step)
    B = args.device_batch_size
    T = args.max_seq_len or model.config.sequence_len
    if B < 1 or T < 2:
        raise UserError("--device-batch-size must be >= 1 and --max-seq-len >= 2")
    tokens_per_step = B * T * world_size
    steps = max(1, args.split_tokens // tokens_per_step)
    unigram_steps = max(1, (args.unigram_tokens or args.split_tokens) // tokens_per_step)
    token_bytes = get_token_bytes(device)
    print0(f"model step {meta['step']} | {model.num_params():,} parameters | "
           f"evaluating {steps * tokens_per_step:,} tokens per split")

    bpb = {}
    for split in ("train", "val"):
        loader = tokenizing_distributed_data_loader(tokenizer, B, T, split, device)
        with autocast_ctx(device.type):
            bpb[split] = evaluate_bpb(model, loader, steps, token_bytes)
        print0(f"{split} bpb: {bpb[split]:.6f}")
    uni = unigram_bpb(tokenizing_distributed_data_loader(tokenizer, B, T, "train", device),
                      tokenizing_distributed_data_loader(tokenizer, B, T, "val", device),
                      unigram_steps, steps, token_bytes)
    print0(f"unigram baseline (val) bpb: {uni:.6f}")
    print0(f"model val bpb {bpb['val']:.4f} vs unigram {uni:.4f} "
           f"({'better' if bpb['val'] < uni else 'NOT better'} than the unigram baseline)")

    samples = []
    if args.max_tokens > 0 and int(os.environ.get("RANK", 0)) == 0:
        engine = Engine(model, tokenizer)
        for prompt in PROMPTS:
            ids = tokenizer.encode(prompt, prepend="<|bos|>")
            results, _ = engine.generate_batch(ids, num_samples=1, max_tokens=args.max_tokens, temperature=0)
            text = tokenizer.decode(results[0][1:])
            samples.append(text)
            print0(repr(text))

    from nanochat.report import get_report
    get_report().log(section="Base model loss", data=[
        {"model step": meta["step"], "train bpb": bpb["train"], "val bpb": bpb["val"], "unigram bpb": uni},
        "Samples:\n\n" + "\n".join(f"- {s!r}" for s in samples) if samples else "",
    ])


if __name__ == "__main__":
    run_main(main)
