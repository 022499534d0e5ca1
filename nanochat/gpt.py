"""
The GPT, nanochat style:
- rotary embeddings (RoPE) computed from explicit positions, so a working context of gists can
  carry its own position data (slot index, or a damped Gaussian span for the `gaussian` scheme)
- QK norm, ReLU^2 MLP, untied token embedding and lm_head, logit soft-cap
- weightless RMSNorm, no biases, optional GQA, F.scaled_dot_product_attention

`forward` takes token ids or input embeddings (plus optional positions), an optional KV cache,
and targets with ignore_index=-1. `Block` is reused by GistNet and LensNet with causal=False.
"""
import math
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# On Hopper, recent torch picks cuDNN's SDPA backend first. It was slow on MegaContext's many small, odd-shaped
# forwards: at d20 on an H100 the --mc step took 948 ms with it and 516 ms without (GistNet 76 -> 12 ms,
# LensNet 54 -> 7, focus 74 -> 12), the plain step unchanged (dev/LOG.md, 2026-11-22, 'cuDNN attention was half the --mc step'). Flash /
# memory-efficient attention take over; the flag does nothing on CPU or MPS.
torch.backends.cuda.enable_cudnn_sdp(False)

SMEAR = 5  # how many inputs before each position the smear mixes into it (see GPT.__init__)


@dataclass
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 65536
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    rope_base: float = 10000.0
    softcap: float = 15.0


def config_from_depth(depth, vocab_size, sequence_len, aspect_ratio=64, head_dim=128):
    """The single dial: width = depth * 64, heads of 128 dims (fewer for tiny models)."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    n_embd = depth * aspect_ratio
    n_head = max(1, (n_embd + head_dim - 1) // head_dim)
    while n_embd % n_head:
        n_head += 1
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth,
                     n_head=n_head, n_kv_head=n_head, n_embd=n_embd)


def norm(x):
    # weightless RMSNorm
    return F.rms_norm(x, (x.size(-1),))


def rope_inv_freq(head_dim, base=10000.0, device=None):
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))


def rope_cos_sin(pos, head_dim, base=10000.0, sigma=None):
    """
    cos/sin tables of shape (B, T, 1, head_dim/2) in fp32 for positions `pos` (B, T), which may be
    fractional. With `sigma` (B, T), each frequency w is damped by exp(-1/2 (w*sigma)^2): the
    expected rotation of a position spread N(mu, sigma^2) over a gist's span. sigma = 0 leaves the
    rotation exact, so raw tokens keep standard RoPE bit for bit.
    """
    inv_freq = rope_inv_freq(head_dim, base, device=pos.device)
    angles = pos.to(torch.float32)[..., None] * inv_freq  # (B, T, D/2)
    cos, sin = angles.cos(), angles.sin()
    if sigma is not None:
        damp = torch.exp(-0.5 * (sigma.to(torch.float32)[..., None] * inv_freq) ** 2)
        damp = torch.where(sigma[..., None] > 0, damp, torch.ones_like(damp))  # exact 1.0 for raw tokens
        cos, sin = cos * damp, sin * damp
    return cos[:, :, None, :], sin[:, :, None, :]


def apply_rotary_emb(x, cos, sin):
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class KVCache:
    """
    Per-layer keys/values of everything seen so far, (B, H_kv, T, D) per layer, grown on demand,
    and the input embeddings (B, T, d) (the smear of the next inputs reads the two before them).
    `truncate(n)` drops every entry from position n on: the MegaContext runtime uses it to keep
    the K/V of slots before the first edited working-context entry and recompute the rest.
    """

    def __init__(self, batch_size, num_heads, head_dim, num_layers, seq_len=256, device=None, dtype=torch.float32):
        shape = (num_layers, batch_size, num_heads, seq_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.emb = None  # (B, cap, d), allocated by the first insert_emb
        self.pos = 0

    def _grow(self, needed):
        cap = self.k.size(3)
        if needed <= cap:
            return
        new_cap = max(needed, 2 * cap)
        pad = list(self.k.shape)
        pad[3] = new_cap - cap
        self.k = torch.cat([self.k, self.k.new_zeros(pad)], dim=3)
        self.v = torch.cat([self.v, self.v.new_zeros(pad)], dim=3)
        if self.emb is not None:
            self.emb = torch.cat([self.emb, self.emb.new_zeros(self.emb.size(0), new_cap - cap, self.emb.size(2))], 1)

    def insert_emb(self, x):
        """Store the inputs x (B, T, d) at positions pos..pos+T; return the SMEAR inputs before them
        (B, SMEAR, d), zeros before position 0."""
        if self.emb is None:
            self.emb = x.new_zeros(x.size(0), self.k.size(3), x.size(2))
        t0 = self.pos
        self._grow(t0 + x.size(1))
        self.emb[:, t0:t0 + x.size(1)] = x
        before = self.emb[:, max(t0 - SMEAR, 0):t0]
        return torch.cat([x.new_zeros(x.size(0), SMEAR - before.size(1), x.size(2)), before], dim=1)

    def insert_kv(self, layer_idx, k, v):
        t0, t1 = self.pos, self.pos + k.size(2)
        self._grow(t1)
        self.k[layer_idx, :, :, t0:t1] = k
        self.v[layer_idx, :, :, t0:t1] = v
        if layer_idx == self.k.size(0) - 1:
            self.pos = t1
        return self.k[layer_idx, :, :, :t1], self.v[layer_idx, :, :, :t1]

    def truncate(self, n):
        if not 0 <= n <= self.pos:
            raise ValueError(f"cannot truncate a KV cache of length {self.pos} to {n}")
        self.pos = n

    def expand_batch(self, batch_size):
        """Copy a batch-1 prefill into `batch_size` rows (several samples from one prompt)."""
        if self.k.size(1) != 1:
            raise ValueError("expand_batch needs a batch-1 cache")
        self.k = self.k.expand(-1, batch_size, -1, -1, -1).contiguous()
        self.v = self.v.expand(-1, batch_size, -1, -1, -1).contiguous()
        if self.emb is not None:
            self.emb = self.emb.expand(batch_size, -1, -1).contiguous()


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.n_embd = config.n_head, config.n_kv_head, config.n_embd
        self.head_dim = config.n_embd // config.n_head
        assert config.n_embd % config.n_head == 0 and config.n_head % config.n_kv_head == 0
        self.c_q = nn.Linear(self.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(self.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(self.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_embd, self.n_embd, bias=False)

    def forward(self, x, cos_sin, kv_cache=None, causal=True, attn_mask=None):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)  # QK norm
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if kv_cache is not None:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)
        Tq, Tk = q.size(2), k.size(2)
        if self.n_kv_head != self.n_head:  # GQA
            rep = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        mask = attn_mask
        if causal and Tq == Tk and mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            if causal:
                # queries are the last Tq positions of the Tk keys (a cache holds the prefix)
                qi = torch.arange(Tk - Tq, Tk, device=q.device)[:, None]
                ki = torch.arange(Tk, device=q.device)[None, :]
                cm = ki <= qi
                mask = cm if mask is None else (mask & cm)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())  # ReLU^2


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos_sin, kv_cache=None, causal=True, attn_mask=None):
        x = x + self.attn(norm(x), cos_sin, kv_cache, causal, attn_mask)
        return x + self.mlp(norm(x))


def init_transformer_weights(module, n_embd):
    """nanochat's init: uniform(+-sqrt(3/d)) for matrices, zero output projections."""
    bound = math.sqrt(3.0) / math.sqrt(n_embd)
    for name, p in module.named_parameters():
        if p.dim() < 2:
            continue
        if name.endswith("c_proj.weight"):
            nn.init.zeros_(p)
        else:
            nn.init.uniform_(p, -bound, bound)


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # smear (token shift): input t += smear[i] * input t-1-i for the SMEAR inputs before it, per-channel
        # gates that start at 0. It hands every position its predecessors, so one attention layer can match
        # "the tokens before j" and copy (an induction head); without it a small GPT needs a previous-token
        # head first, and at depth 2 on CPU that circuit did not form in 500 midtraining steps. Five, not
        # one: with one-digit tokens, a key such as 68788 has two 8s, and "the token after the 8" is
        # ambiguous (most copying errors of the runcpu model, dev/LOG.md 2026-11-22); and the first digit
        # of "The red key is 12345" sits five tokens after the label (' red', ' ke', 'y', ' is', ' '), so
        # the match that tells the asked key from the other keys needs all five.
        self.smear = nn.Parameter(torch.zeros(SMEAR, config.n_embd))

    @property
    def head_dim(self):
        return self.config.n_embd // self.config.n_head

    @torch.no_grad()
    def init_weights(self):
        init_transformer_weights(self.transformer.h, self.config.n_embd)
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        nn.init.zeros_(self.smear)

    def get_device(self):
        return self.transformer.wte.weight.device

    def new_kv_cache(self, batch_size=1, seq_len=256, dtype=None):
        c = self.config
        return KVCache(batch_size, c.n_kv_head, self.head_dim, c.n_layer, seq_len,
                       device=self.get_device(), dtype=dtype or self.transformer.wte.weight.dtype)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self):
        """FLOPs per token for forward + backward (6N for matmuls + attention), for MFU."""
        n = self.num_params() - self.transformer.wte.weight.numel()
        c = self.config
        return 6 * n + 12 * c.n_layer * c.n_embd * c.sequence_len

    def forward(self, idx=None, targets=None, kv_cache=None, loss_reduction="mean", *,
                inputs_embeds=None, pos=None, pos_sigma=None, return_hidden=False):
        """
        idx: (B, T) token ids, or inputs_embeds: (B, T, n_embd) (e.g. wte(ids) mixed with gists).
        pos: (B, T) positions for RoPE (default: consecutive, continuing the KV cache).
        pos_sigma: (B, T) Gaussian span widths (0 = exact RoPE) for the `gaussian` scheme.
        Returns the loss when targets are given (ignore_index=-1), else fp32 logits (B, T, V).
        """
        if (idx is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of idx or inputs_embeds")
        x = self.transformer.wte(idx) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        if pos is None:
            t0 = kv_cache.pos if kv_cache is not None else 0
            pos = torch.arange(t0, t0 + T, device=x.device)[None, :].expand(B, T)
        cos_sin = rope_cos_sin(pos, self.head_dim, self.config.rope_base, pos_sigma)
        before = kv_cache.insert_emb(x) if kv_cache is not None else x.new_zeros(B, SMEAR, x.size(2))
        ctx = torch.cat([before, x], dim=1)  # (B, SMEAR + T, d)
        gate = self.smear.to(x.dtype)
        x = x + sum(gate[i] * ctx[:, SMEAR - 1 - i:SMEAR - 1 - i + T] for i in range(SMEAR))
        x = norm(x)
        for block in self.transformer.h:
            x = block(x, cos_sin, kv_cache)
        x = norm(x)
        if return_hidden:
            return x
        return self.head(x, targets, loss_reduction)

    def head(self, x, targets=None, loss_reduction="mean"):
        """lm_head with the logit soft-cap; loss against targets (ignore_index=-1) if given."""
        sc = self.config.softcap
        logits = self.lm_head(x).float()
        logits = sc * torch.tanh(logits / sc)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1, reduction=loss_reduction)

    def labelled_nll(self, h, targets, chunk=8192):
        """
        Per-position next-token NLL (fp32, shaped like targets, 0 where targets == -1) from final hidden
        states h (B, T, d) (`forward(..., return_hidden=True)`). Logits are made only at labelled positions,
        `chunk` of them at a time, and under grad each chunk's are recomputed in backward (checkpoint). Why:
        MegaContext's packed rows label only their target segment, and at V = 65536 full fp32 logits of a
        64-row counterfactual chunk of 2k-token rows alone would take ~35 GiB.
        """
        sel = targets != -1
        hs, ts = h[sel], targets[sel]

        def ce(a, b):
            return F.cross_entropy(self.head(a), b, reduction="none")

        grad = torch.is_grad_enabled() and hs.requires_grad
        parts = [checkpoint(ce, hs[i:i + chunk], ts[i:i + chunk], use_reentrant=False) if grad
                 else ce(hs[i:i + chunk], ts[i:i + chunk]) for i in range(0, hs.size(0), chunk)]
        out = torch.zeros(targets.shape, dtype=torch.float32, device=h.device)
        return out.masked_scatter(sel, torch.cat(parts)) if parts else out

    def config_dict(self):
        return asdict(self.config)
