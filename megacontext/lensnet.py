"""
LensNet (docs/architecture.md): a small non-causal encoder over the working-context entries that
gives each entry a signed score in (-1, 1): > +tau asks for more detail (expand), < -tau for less.

Input per entry: its embedding (the mean token embedding of a raw block, the row of a gist, in the
GPT's embedding space), projected to LensNet's own width, plus a type embedding (raw block, gist
level 1..max_level, or raw tail = "the present"), with slot positions through RoPE. The encoder is
`nanochat.gpt.Block` with causal=False, so every entry sees the present (a causal scorer could not: older
entries would be scored without the question). Score_i = tanh(<k(h_i), q(pool)> / sqrt(d) + b), pool = mean
of the encoded raw-tail entries.
Nothing is detached: gradients reach the entry embeddings, so LensNet's loss trains GistNet.
"""
import math

import numpy as np
import torch
import torch.nn as nn

from nanochat.gpt import Block, GPTConfig, init_transformer_weights, norm, rope_cos_sin
from megacontext.working_context import WorkingContext, entry_embeddings, entry_spans, tail_start


def entry_types(wc, cfg):
    """(types, is_tail) numpy: type = level (0 raw block, L gist), max_level + 1 for raw-tail entries.
    With no protected tail (tail_tokens=0 on a block boundary) the newest entry stands for the present."""
    _, ends = entry_spans(wc, cfg.block_size)
    tail = ends > tail_start(wc.num_tokens, cfg)
    if len(wc) and not tail.any():
        tail[-1] = True
    types = np.where(tail, cfg.max_level + 1, wc.levels)
    return types, tail


def lens_inputs(wcs, readers, wte, cfg):
    """Batch WCs for LensNet: x (B, W, n_embd), types (B, W), tail (B, W) bool, mask (B, W) bool (right-padded)."""
    if isinstance(wcs, WorkingContext):
        wcs = [wcs]
    if not isinstance(readers, (list, tuple)):
        readers = [readers] * len(wcs)
    xs = [entry_embeddings(wc, r, wte, cfg) for wc, r in zip(wcs, readers)]
    B, W, d = len(xs), max(len(wc) for wc in wcs), xs[0].size(1)
    device = xs[0].device
    x = torch.stack([torch.cat([e, e.new_zeros(W - e.size(0), d)]) for e in xs])
    types = torch.zeros(B, W, dtype=torch.long)
    tail = torch.zeros(B, W, dtype=torch.bool)
    mask = torch.zeros(B, W, dtype=torch.bool)
    for r, wc in enumerate(wcs):
        t, tl = entry_types(wc, cfg)
        types[r, :len(wc)] = torch.from_numpy(t)
        tail[r, :len(wc)] = torch.from_numpy(tl)
        mask[r, :len(wc)] = True
    return x, types.to(device), tail.to(device), mask.to(device)


class LensNet(nn.Module):
    def __init__(self, n_embd, cfg):
        super().__init__()
        self.cfg = cfg
        d = cfg.lens_dim
        self.in_proj = nn.Linear(n_embd, d, bias=False)
        self.type_emb = nn.Embedding(cfg.max_level + 2, d)
        bcfg = GPTConfig(n_embd=d, n_head=cfg.lens_heads, n_kv_head=cfg.lens_heads, n_layer=cfg.lens_layers)
        self.blocks = nn.ModuleList([Block(bcfg, i) for i in range(cfg.lens_layers)])
        self.key = nn.Linear(d, d, bias=False)
        self.query = nn.Linear(d, d, bias=False)
        self.bias = nn.Parameter(torch.zeros(()))
        self.head_dim = d // cfg.lens_heads
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        d = self.cfg.lens_dim
        init_transformer_weights(self.blocks, d)  # zero c_proj: each block starts as the identity
        bound = math.sqrt(3.0 / d)
        for lin in (self.in_proj, self.key, self.query):
            nn.init.uniform_(lin.weight, -math.sqrt(3.0 / lin.in_features), math.sqrt(3.0 / lin.in_features))
        nn.init.uniform_(self.type_emb.weight, -bound, bound)
        self.bias.zero_()

    def encode(self, x, types, mask=None):
        """(B, W, n_embd) entry embeddings -> (B, W, lens_dim) bidirectional encodings."""
        B, W, _ = x.shape
        h = norm(self.in_proj(norm(x))) + self.type_emb(types)
        pos = torch.arange(W, device=x.device)[None, :].expand(B, W)
        cos_sin = rope_cos_sin(pos, self.head_dim)
        attn_mask = None if mask is None or bool(mask.all()) else mask[:, None, None, :]
        for block in self.blocks:
            h = block(h, cos_sin, causal=False, attn_mask=attn_mask)
        return norm(h)

    def forward(self, x, types, tail, mask=None, logits=False):
        """Signed scores (B, W) in (-1, 1); padded entries (mask False) score exactly 0. logits=True: the
        pre-tanh values z (score = tanh(z)), what the training losses read: a loss on tanh(z) has no
        gradient once |z| is large (float32 tanh rounds to +-1), and LensNet would stay saturated."""
        h = self.encode(x, types, mask)
        present = tail if mask is None else (tail & mask)
        w = present.to(h.dtype)[..., None]
        pooled = (h * w).sum(1) / w.sum(1).clamp_min(1.0)             # (B, d): the present
        z = (self.key(h) * self.query(pooled)[:, None, :]).sum(-1) / math.sqrt(h.size(-1)) + self.bias
        scores = z if logits else torch.tanh(z)
        return scores if mask is None else scores * mask.to(scores.dtype)

    def score(self, wcs, readers, wte, logits=False):
        """Score WCs directly: (B, W) scores (pre-tanh with logits=True) and the (B, W) validity mask."""
        x, types, tail, mask = lens_inputs(wcs, readers, wte, self.cfg)
        x = x.to(self.in_proj.weight.dtype)
        return self(x, types, tail, mask, logits=logits), mask
