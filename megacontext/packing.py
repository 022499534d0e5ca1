"""
Packed GPT rows `[history part ; target segment]`: one forward scores a target segment after many
different views of the same history (working contexts, a raw suffix, nothing). The training objective
and the evaluation's gist-quality figures both read through here.

A history part is a WC's slot embeddings and positions (`wc_part`) or the newest raw tokens
(`raw_suffix_part`). Target positions continue the history: slot n + j, or the absolute token position
s + j (sigma 0, exact RoPE) under the gaussian scheme.
"""
from dataclasses import dataclass

import torch

from megacontext.positions import wc_positions
from megacontext.working_context import wc_slot_embeddings


@dataclass
class HistPart:
    embeds: torch.Tensor        # (n, d) history slots
    pos: torch.Tensor           # (n,) float32
    sigma: torch.Tensor = None  # (n,) float32 for the gaussian scheme


@dataclass
class Packed:
    embeds: torch.Tensor        # (R, T, d), right-padded
    pos: torch.Tensor           # (R, T)
    sigma: torch.Tensor         # (R, T) or None
    labels: torch.Tensor        # (R, T) long: -1 on history slots and padding, next tokens on targets
    hist_lens: list             # slots taken by each row's history


def wc_part(wc, reader, wte, cfg):
    pos, sigma = wc_positions(wc, cfg.block_size, cfg.positions)
    return HistPart(wc_slot_embeddings(wc, reader, wte, cfg), pos, sigma)


def raw_suffix_part(hist_ids, keep, wte, cfg):
    """Truncation: the newest `keep` tokens of a history, raw (keep = 0: no context at all)."""
    s = hist_ids.numel()
    keep = min(keep, s)
    emb = wte(hist_ids[s - keep:])
    if cfg.positions == "slot":
        return HistPart(emb, torch.arange(keep, dtype=torch.float32))
    return HistPart(emb, torch.arange(s - keep, s, dtype=torch.float32), torch.zeros(keep))


def pack(parts, tgt_ids, tgt_labels, s, wte, cfg):
    """
    Rows `[part_r ; target_r]`. tgt_ids (R, m) are the target segment's inputs x[s:], tgt_labels (R, m)
    their next tokens y[s:].
    """
    R, m = tgt_ids.shape
    tgt = wte(tgt_ids)
    lens = [p.embeds.size(0) for p in parts]
    T = max(lens) + m
    d = tgt.size(-1)
    device = tgt.device
    gaussian = cfg.positions == "gaussian"
    embeds, pos, sigma = [], torch.zeros(R, T), torch.zeros(R, T) if gaussian else None
    labels = torch.full((R, T), -1, dtype=torch.long, device=device)
    for r, (p, n) in enumerate(zip(parts, lens)):
        embeds.append(torch.cat([p.embeds.to(tgt.dtype), tgt[r], tgt.new_zeros(T - n - m, d)]))
        pos[r, :n] = p.pos
        pos[r, n:n + m] = (s if gaussian else n) + torch.arange(m, dtype=torch.float32)
        if gaussian and n:
            sigma[r, :n] = p.sigma
        labels[r, n:n + m] = tgt_labels[r]
    return Packed(torch.stack(embeds), pos.to(device), None if sigma is None else sigma.to(device), labels, lens)


def packed_nll(gpt, packed):
    """(R, T) next-token NLL of packed rows, 0 where unlabelled (logits only at the labelled slots)."""
    h = gpt(inputs_embeds=packed.embeds, pos=packed.pos, pos_sigma=packed.sigma, return_hidden=True)
    return gpt.labelled_nll(h, packed.labels)


def row_nll(gpt, packed):
    """(sum of next-token NLL over each row's labelled target tokens (R,), label counts (R,))."""
    return packed_nll(gpt, packed).sum(1), (packed.labels != -1).sum(1)


def chunked_row_nll(gpt, parts, tgt_ids, tgt_labels, s, wte, cfg, chunk=64):
    """row_nll over many parts, `chunk` rows per forward (bounds memory)."""
    sums, counts = [], []
    for i in range(0, len(parts), chunk):
        p = pack(parts[i:i + chunk], tgt_ids[i:i + chunk], tgt_labels[i:i + chunk], s, wte, cfg)
        a, b = row_nll(gpt, p)
        sums.append(a)
        counts.append(b)
    return torch.cat(sums), torch.cat(counts)
