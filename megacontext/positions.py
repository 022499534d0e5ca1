"""
Position data for the GPT slots of a working context (docs/architecture.md). Two schemes:

- `slot` (default): position = slot index 0..T-1. Positions never exceed W_max, so a model trained
  on windows of W_max works at any history length; an all-raw WC gets exactly standard RoPE.
- `gaussian`: position = absolute span centre mu in tokens, plus a width sigma that damps each
  RoPE frequency w by exp(-1/2 (w sigma)^2) (nanochat.gpt.rope_cos_sin does the damping). A raw
  token t has mu = t, sigma = 0: exact RoPE, bit for bit. A gist over [a, b) has
  mu = (a + b - 1) / 2 (the mean of its token positions) and sigma = b - a (its span width).

Slots: a raw block contributes one slot per token, a gist one slot.
"""
import numpy as np
import torch

SCHEMES = ("slot", "gaussian")


def slot_layout(levels, indices, num_tokens, K):
    """Per-slot (entry id, absolute start, end, is_raw token position) as numpy arrays."""
    size = np.power(np.int64(K), np.maximum(levels, 1))
    starts = indices * size
    ends = np.where(levels == 0, np.minimum(starts + K, num_tokens), starts + size)
    n = np.where(levels == 0, ends - starts, 1)
    entry = np.repeat(np.arange(len(levels)), n)
    first_slot = np.cumsum(n) - n
    offset = np.arange(int(n.sum())) - first_slot[entry]  # token offset inside a raw block
    return entry, starts, ends, offset


def wc_positions(wc, K, scheme="slot"):
    """(pos, sigma) float32 tensors of shape (T,) for one working context; sigma None for `slot`."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown position scheme {scheme!r}, expected one of {SCHEMES}")
    entry, starts, ends, offset = slot_layout(wc.levels, wc.indices, wc.num_tokens, K)
    T = len(entry)
    if scheme == "slot":
        return torch.arange(T, dtype=torch.float32), None
    raw = wc.levels[entry] == 0
    a, b = starts[entry], ends[entry]
    # float64 here so half-integer centres stay exact before the float32 cast
    mu = np.where(raw, (a + offset).astype(np.float64), (a + b - 1) / 2.0)
    sigma = np.where(raw, 0.0, (b - a).astype(np.float64))
    return torch.from_numpy(mu).float(), torch.from_numpy(sigma).float()


def damping(sigma, head_dim, base=10000.0):
    """The per-frequency factor exp(-1/2 (w sigma)^2) that the gaussian scheme applies, (..., head_dim/2)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    return torch.exp(-0.5 * (torch.as_tensor(sigma, dtype=torch.float32)[..., None] * inv_freq) ** 2)
