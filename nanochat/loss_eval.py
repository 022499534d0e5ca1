"""
Evaluating a language model in bits per byte (bpb): the summed next-token loss in nats over the
target tokens, divided by ln 2 times the number of UTF-8 bytes those tokens stand for. Unlike the
mean loss, bpb does not depend on the tokenizer's vocabulary size, so models with different
tokenizers compare. Special tokens (0 bytes, e.g. <|bos|>) and ignored targets (-1) count neither
in the numerator nor in the denominator.

`unigram_bpb` is the baseline a model must beat: the token frequencies of the training data,
add-alpha smoothed, evaluated on the validation data with the same accounting.
"""
import math

import torch
import torch.distributed as dist


def _xy(batch):
    # loaders yield (inputs, targets) or (inputs, targets, state)
    return batch[0], batch[1]


def _target_bytes(y, token_bytes):
    """Bytes per target position (0 for ignored targets and for special tokens)."""
    valid = y >= 0
    y_safe = torch.where(valid, y, torch.zeros_like(y))
    return torch.where(valid, token_bytes[y_safe], torch.zeros_like(y_safe, dtype=token_bytes.dtype))


def _all_reduce_sum(*tensors):
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes):
    """
    model(x, y, loss_reduction="none") must return per-position losses in nats.
    batches: an iterator of (x, y[, state]); `steps` batches are used (per rank).
    token_bytes: (V,) int tensor, bytes of each token id (0 for special tokens), on the model's device.
    Sums are all-reduced across ranks, so every rank returns the same number.
    """
    device = token_bytes.device
    acc = torch.float32 if device.type == "mps" else torch.float64  # mps has no float64
    total_nats = torch.zeros((), dtype=acc, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    it = iter(batches)
    for _ in range(steps):
        x, y = _xy(next(it))
        loss = model(x, y, loss_reduction="none").view(-1).to(acc)
        nbytes = _target_bytes(y.view(-1), token_bytes)
        total_nats += torch.where(nbytes > 0, loss, torch.zeros_like(loss)).sum()
        total_bytes += nbytes.sum()
    _all_reduce_sum(total_nats, total_bytes)
    total_bytes = total_bytes.item()
    if total_bytes == 0:
        return float("inf")
    return total_nats.item() / (math.log(2) * total_bytes)


@torch.no_grad()
def unigram_counts(batches, steps, vocab_size):
    """Counts of each target token id over `steps` batches (ignored targets skipped), all-reduced."""
    counts = None
    it = iter(batches)
    for _ in range(steps):
        _, y = _xy(next(it))
        y = y.reshape(-1)
        y = y[y >= 0]
        c = torch.bincount(y.cpu(), minlength=vocab_size).to(torch.float64)
        counts = c if counts is None else counts + c
    if counts is None:
        counts = torch.zeros(vocab_size, dtype=torch.float64)
    _all_reduce_sum(counts)
    return counts


def unigram_bpb_from_counts(train_counts, val_counts, token_bytes, alpha=1.0):
    """bpb of the add-alpha smoothed unigram model from train_counts on the tokens in val_counts."""
    train_counts = train_counts.to(torch.float64).cpu()
    val_counts = val_counts.to(torch.float64).cpu()
    token_bytes = token_bytes.cpu().to(torch.float64)
    probs = (train_counts + alpha) / (train_counts.sum() + alpha * train_counts.numel())
    scored = token_bytes > 0  # the same positions evaluate_bpb scores
    nats = -(val_counts[scored] * probs[scored].log()).sum().item()
    nbytes = (val_counts[scored] * token_bytes[scored]).sum().item()
    if nbytes == 0:
        return float("inf")
    return nats / (math.log(2) * nbytes)


def unigram_bpb(train_batches, val_batches, train_steps, val_steps, token_bytes, alpha=1.0):
    """
    The unigram baseline: token frequencies estimated on `train_steps` train batches, evaluated on
    `val_steps` val batches, in the same bits-per-byte accounting as evaluate_bpb.
    """
    V = token_bytes.numel()
    train_counts = unigram_counts(train_batches, train_steps, V)
    val_counts = unigram_counts(val_batches, val_steps, V)
    return unigram_bpb_from_counts(train_counts, val_counts, token_bytes, alpha)
