"""Position schemes: slot indices, Gaussian span centres, exact RoPE for raw tokens, damping of gists."""
import math

import numpy as np
import pytest
import torch

from megacontext.config import MCConfig
from megacontext.positions import damping, wc_positions
from megacontext.working_context import WorkingContext, entry_spans, recency_pyramid, slot_spans
from nanochat.gpt import rope_cos_sin

K = 32


def mixed_wc():
    wc = recency_pyramid(50_000, 512, MCConfig())
    assert set(wc.level_counts()) == {0, 1, 2}
    return wc


def test_slot_positions_are_slot_indices():
    wc = mixed_wc()
    pos, sigma = wc_positions(wc, K, "slot")
    assert sigma is None and torch.equal(pos, torch.arange(int(slot_spans(wc, K)[-1, 1])).float())


def test_gaussian_centres_and_widths():
    wc = mixed_wc()
    pos, sigma = wc_positions(wc, K, "gaussian")
    spans = slot_spans(wc, K)
    starts, ends = entry_spans(wc, K)
    for j, L in enumerate(wc.levels.tolist()):
        a, b = spans[j]
        if L == 0:
            assert torch.equal(pos[a:b], torch.arange(starts[j], ends[j]).float()) and (sigma[a:b] == 0).all()
        else:
            assert pos[a].item() == (starts[j] + ends[j] - 1) / 2 and sigma[a].item() == 32 ** L
    # a partial raw tail keeps exact token positions too
    wc = WorkingContext([1, 0], [0, 1], 45)
    pos, sigma = wc_positions(wc, K, "gaussian")
    assert pos.tolist() == [15.5] + list(range(32, 45)) and sigma.tolist() == [32.0] + [0.0] * 13
    with pytest.raises(ValueError, match="unknown position scheme"):
        wc_positions(wc, K, "learned")


def test_raw_token_rope_is_bit_identical_to_plain_path():
    wc = mixed_wc()
    pos, sigma = wc_positions(wc, K, "gaussian")
    raw = sigma == 0
    head_dim = 64
    cos, sin = rope_cos_sin(pos[None], head_dim, sigma=sigma[None])
    # the plain path: integer token positions, no sigma at all
    cos0, sin0 = rope_cos_sin(pos[raw].long()[None], head_dim)
    assert torch.equal(cos[0, raw.nonzero()[:, 0]], cos0[0]) and torch.equal(sin[0, raw.nonzero()[:, 0]], sin0[0])


def test_gist_frequencies_are_damped_by_the_stated_factor():
    head_dim, base = 64, 10000.0
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
    for width in (32, 1024):
        mu = torch.tensor([[(width - 1) / 2 + 3 * width]])
        sig = torch.tensor([[float(width)]])
        cos, sin = rope_cos_sin(mu, head_dim, base, sigma=sig)
        cos_u, sin_u = rope_cos_sin(mu, head_dim, base)
        factor = torch.exp(-0.5 * (inv_freq * width) ** 2)
        torch.testing.assert_close(cos[0, 0, 0], cos_u[0, 0, 0] * factor, rtol=0, atol=1e-7)
        torch.testing.assert_close(sin[0, 0, 0], sin_u[0, 0, 0] * factor, rtol=0, atol=1e-7)
        torch.testing.assert_close(damping(torch.tensor(float(width)), head_dim, base), factor)
        amp = (cos[0, 0, 0] ** 2 + sin[0, 0, 0] ** 2).sqrt()
        # highest frequency (w = 1) wiped out, lowest kept, monotone in between
        assert amp[0] < 1e-30 and amp[-1] > 0.5 and (amp[1:] >= amp[:-1] - 1e-7).all()
        k = int(np.argmin(np.abs((inv_freq * width).numpy() - 1.0)))  # w * sigma ~ 1: factor ~ e^-1/2
        assert math.isclose(amp[k].item(), math.exp(-0.5 * (inv_freq[k].item() * width) ** 2), rel_tol=1e-4)
