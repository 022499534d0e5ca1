"""
Streams (inputs, targets) batches for pretraining: documents are tokenized on the fly, each
prefixed with BOS, and packed back to back into one token stream that is cut into B×T batches.

Stream layout. Each batch takes the next B*T+1 tokens of the stream; inputs are the first B*T,
targets the last B*T (next token), and the stream advances by B*T, so the last target of one batch
is the first input of the next and no token pair is dropped. Rows are consecutive slices of the
stream: targets[b, t] == stream[start + b*T + t + 1].

Distribution. Rank r of W reads row groups r, r+W, r+2W, ... of every shard of the split, so ranks
see disjoint documents. When the split is exhausted the stream starts over (epoch + 1), for train
and val alike; callers take as many batches as they need.

Resumption. Every batch comes with `state`, a small JSON-able dict pointing at the first token not
yet consumed (epoch, shard, row group, document, token offset). Passing it back as `resume_state`
(same shards, tokenizer, B*T need not match, same rank and world size) continues the stream
EXACTLY: the resumed batches equal the uninterrupted ones. Under DDP each rank should save its own
state. A state from another rank or world size (e.g. rank 0's state given to every rank, as nanochat
does) is honoured approximately: the rank skips to the next round of row groups after the saved
one, so no data is repeated and at most one round is skipped.
"""
from collections import deque

import torch

from nanochat.common import UserError, get_dist_info
from nanochat.dataset import split_files


def _row_groups(paths, rank, world_size, epoch, pq_idx, rg_idx):
    """Yield (epoch, pq_idx, rg_idx, texts) for this rank forever, starting at the given row group."""
    import pyarrow.parquet as pq
    while True:
        while pq_idx < len(paths):
            pf = pq.ParquetFile(paths[pq_idx])
            while rg_idx < pf.num_row_groups:
                yield epoch, pq_idx, rg_idx, pf.read_row_group(rg_idx, columns=["text"]).column("text").to_pylist()
                rg_idx += world_size
            pq_idx, rg_idx = pq_idx + 1, rank
        epoch, pq_idx = epoch + 1, 0


def _start_position(resume_state, rank, world_size):
    """(epoch, pq_idx, rg_idx, doc_idx, tok_idx) where this rank's stream begins."""
    if resume_state is None:
        return 0, 0, rank, 0, 0
    s = resume_state
    if s.get("rank") == rank and s.get("world_size") == world_size:
        return s["epoch"], s["pq_idx"], s["rg_idx"], s["doc_idx"], s["tok_idx"]
    # someone else's position: go to the next round of row groups, starting from the beginning of one
    rg_idx = (s["rg_idx"] // world_size + 1) * world_size + rank
    return s["epoch"], s["pq_idx"], rg_idx, 0, 0


def tokenizing_distributed_data_loader(tokenizer, B, T, split, device="cpu", resume_state=None, bos=True,
                                       rank=None, world_size=None, data_dir=None, tokenizer_threads=4):
    """
    Infinite generator of (inputs (B,T) long, targets (B,T) long, state) on `device`.
    rank / world_size default to torchrun's environment (override them to simulate ranks in tests).
    See the module docstring for the stream layout and what resumption guarantees.
    """
    if B < 1 or T < 1:
        raise ValueError(f"B and T must be positive, got B={B} T={T}")
    _, env_rank, _, env_world = get_dist_info()
    rank = env_rank if rank is None else rank
    world_size = env_world if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    paths = split_files(split, data_dir)
    import pyarrow.parquet as pq
    if not any(pq.ParquetFile(p).num_row_groups > rank for p in paths):
        raise UserError(f"the {split} split has fewer row groups than rank {rank} + 1 (world size {world_size}): "
                        "rebuild the data with smaller row groups or use fewer ranks")
    bos_id = tokenizer.get_bos_token_id() if bos else None
    epoch, pq_idx, rg_idx, doc_idx, tok_idx = _start_position(resume_state, rank, world_size)
    row_groups = _row_groups(paths, rank, world_size, epoch, pq_idx, rg_idx)
    device = torch.device(device)
    use_pin = device.type == "cuda"

    # the buffer: [location, tokens, start] per document, start = first token not yet consumed
    docs, buffered = deque(), 0
    first = True
    needed = B * T + 1
    while True:
        while buffered < needed:
            ep, pi, ri, texts = next(row_groups)
            d0 = doc_idx if first else 0  # resuming: the saved row group restarts at the saved document
            token_lists = tokenizer.encode(texts[d0:], prepend=bos_id, num_threads=tokenizer_threads)
            for j, toks in enumerate(token_lists):
                start = tok_idx if first and j == 0 else 0
                if start < len(toks):
                    docs.append([(ep, pi, ri, d0 + j), toks, start])
                    buffered += len(toks) - start
            first = False
        # gather needed tokens (peeking one past the batch), then consume B*T of them
        out, remaining = [], needed
        for _, toks, start in docs:
            piece = toks[start:start + remaining]
            out.extend(piece)
            remaining -= len(piece)
            if remaining == 0:
                break
        consume = B * T
        while consume:
            entry = docs[0]
            avail = len(entry[1]) - entry[2]
            if avail <= consume:
                docs.popleft()
                consume -= avail
            else:
                entry[2] += consume
                consume = 0
        buffered -= B * T
        (ep, pi, ri, di), _, ti = docs[0]  # never empty: we peeked one token past the batch
        state = {"epoch": ep, "pq_idx": pi, "rg_idx": ri, "doc_idx": di, "tok_idx": ti,
                 "rank": rank, "world_size": world_size}
        scratch = torch.tensor(out, dtype=torch.long, pin_memory=use_pin)
        inputs = scratch[:-1].view(B, T).to(device, non_blocking=use_pin)
        targets = scratch[1:].view(B, T).to(device, non_blocking=use_pin)
        yield inputs, targets, state
