"""Working context: recency pyramid, invariants, append, materialize, and the GPT path on a real GPT."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from megacontext.config import MCConfig
from megacontext.working_context import (BudgetError, WCError, WorkingContext, all_raw, append_tokens,
                                         check_invariants, entry_embeddings, entry_spans, forward_wc,
                                         materialize, min_cost, recency_pyramid, tail_start, wc_cost)
from nanochat.common import UserError
from nanochat.gpt import GPT, GPTConfig


class TinyReader:
    """The tree reader protocol over a token tensor and random gist rows per level (test stand-in)."""

    def __init__(self, tokens, K, dim, max_level, seed=0):
        g = torch.Generator().manual_seed(seed)
        self._tokens = tokens
        self.num_tokens, self.dim = len(tokens), dim
        self._gists = {L: torch.randn(len(tokens) // K ** L, dim, generator=g) for L in range(1, max_level + 1)}

    def count(self, level):
        return self.num_tokens if level == 0 else self._gists[level].size(0)

    def tokens(self, start, end):
        assert 0 <= start <= end <= self.num_tokens
        return self._tokens[start:end]

    def gists(self, level, start, end):
        assert 0 <= start <= end <= self.count(level), (level, start, end)
        return self._gists[level][start:end]


def small_cfg(**kw):
    base = dict(block_size=4, max_level=3, tail_tokens=8, budget=64)
    base.update(kw)
    return MCConfig(**base)


# -----------------------------------------------------------------------------
# recency pyramid

@pytest.mark.parametrize("N", [1, 31, 32, 33, 128, 500, 512, 513, 5000, 100_003, 10_000_000])
def test_pyramid_default_config(N):
    cfg = MCConfig()
    wc = recency_pyramid(N, cfg.budget, cfg)
    check_invariants(wc, cfg, cfg.budget)
    assert wc_cost(wc, 32) <= cfg.budget
    assert (np.diff(wc.levels) <= 0).all(), "detail must not decrease towards the present"
    if N <= cfg.budget:
        assert wc == all_raw(N, cfg)
    else:  # the budget is used: no further expansion (+31) would have fit
        assert wc_cost(wc, 32) + 31 > cfg.budget


def test_pyramid_ten_million_tokens_uses_high_levels():
    cfg = MCConfig()
    wc = recency_pyramid(10_000_000, 512, cfg)
    counts = wc.level_counts()
    assert counts.get(4, 0) >= 1 and counts.get(0, 0) >= 4  # coarse far past, raw present
    starts, ends = entry_spans(wc, 32)
    assert starts[0] == 0 and ends[-1] == 10_000_000


@settings(max_examples=150, deadline=None)
@given(N=st.integers(1, 300_000), K=st.sampled_from([2, 4, 32]), tail_blocks=st.integers(0, 4),
       max_level=st.integers(1, 4), extra=st.integers(0, 3000))
def test_pyramid_properties(N, K, tail_blocks, max_level, extra):
    cfg = MCConfig(block_size=K, tail_tokens=tail_blocks * K, max_level=max_level,
                   budget=tail_blocks * K + K)
    budget = tail_blocks * K + K + extra
    try:
        wc = recency_pyramid(N, budget, cfg)
    except BudgetError as e:
        assert min_cost(N, cfg) > budget and str(budget) in str(e)
        return
    check_invariants(wc, cfg, budget)
    assert (np.diff(wc.levels) <= 0).all()
    assert wc_cost(wc, K) + K - 1 > budget or (wc.levels == 0).all()


def test_pyramid_budget_errors_are_clear():
    cfg = MCConfig(tail_tokens=128)
    with pytest.raises(BudgetError, match="smaller than the protected raw tail"):
        recency_pyramid(1000, 100, cfg)
    with pytest.raises(BudgetError, match=r"--mc-max-level to >= 3"):
        recency_pyramid(1_000_000, 512, MCConfig(max_level=1))
    with pytest.raises(UserError):  # scripts print it as one line
        recency_pyramid(10_000_000, 200, MCConfig(max_level=2, budget=200))


# -----------------------------------------------------------------------------
# invariants and append

def test_check_invariants_catches_each_violation():
    cfg = small_cfg()
    ok = WorkingContext([3, 2, 0, 0, 0], [0, 4, 20, 21, 22], 90)  # [0,64) [64,80) [80,84) [84,88) [88,90)
    check_invariants(ok, cfg, budget=64)
    assert wc_cost(ok, 4) == 12
    cases = {
        "start at token 0": WorkingContext([2, 0, 0, 0], [4, 20, 21, 22], 90),
        "not contiguous": WorkingContext([3, 2, 0, 0, 0], [0, 3, 20, 21, 22], 90),
        "coverage ends": WorkingContext([3, 2, 0, 0], [0, 4, 20, 21], 90),
        "protected raw tail": WorkingContext([3, 2, 1, 0, 0], [0, 4, 20, 21, 22], 90),
        "levels must lie": WorkingContext([4, 0], [0, 0], 4),
        "exceeds the budget": ok,
    }
    for msg, wc in cases.items():
        with pytest.raises(WCError, match=msg):
            check_invariants(wc, cfg, budget=10 if msg == "exceeds the budget" else None)


def test_append_keeps_invariants_and_raw_tail():
    cfg = small_cfg()
    wc = recency_pyramid(203, 64, cfg)
    for new in (203, 204, 207, 250, 1000):
        wc = append_tokens(wc, new, cfg)
        check_invariants(wc, cfg)  # cost may exceed the budget until the next refocus
        starts, ends = entry_spans(wc, 4)
        assert ends[-1] == new and (wc.levels[ends > tail_start(new, cfg)] == 0).all()
    with pytest.raises(WCError, match="cannot shrink"):
        append_tokens(wc, 10, cfg)


# -----------------------------------------------------------------------------
# materialize

def test_materialize_embeddings_positions_and_spans():
    cfg = small_cfg()
    N, d = 150, 8
    reader = TinyReader(torch.randint(0, 50, (N,)), 4, d, 3)
    wte = torch.nn.Embedding(50, d)
    wc = recency_pyramid(N, 40, cfg)
    assert set(wc.level_counts()) >= {0, 1}
    mat = materialize(wc, reader, wte, cfg, scheme="gaussian")
    spans = mat.slot_spans[0]
    starts, ends = entry_spans(wc, 4)
    T = int(spans[-1, 1])
    assert mat.embeds.shape == (1, T, d) and T == wc_cost(wc, 4) and mat.mask.all()
    for j, (L, i) in enumerate(wc.entries()):
        a, b = spans[j]
        x = mat.embeds[0, a:b]
        if L == 0:
            assert torch.equal(x, wte(reader.tokens(starts[j], ends[j])))
            assert torch.equal(mat.pos[0, a:b], torch.arange(starts[j], ends[j]).float())
            assert (mat.sigma[0, a:b] == 0).all()
        else:
            assert b == a + 1 and torch.equal(x[0], reader.gists(L, i, i + 1)[0])
            assert mat.pos[0, a] == (starts[j] + ends[j] - 1) / 2 and mat.sigma[0, a] == ends[j] - starts[j]
    slot = materialize(wc, reader, wte, cfg, scheme="slot")
    assert slot.sigma is None and torch.equal(slot.pos[0], torch.arange(T).float())
    # entry embeddings: mean of the tokens of a raw block, the gist row of a gist
    ee = entry_embeddings(wc, reader, wte, cfg)
    for j, (L, i) in enumerate(wc.entries()):
        a, b = spans[j]
        torch.testing.assert_close(ee[j], mat.embeds[0, a:b].mean(0))


def test_materialize_batch_pads_unequal_rows():
    cfg = small_cfg()
    readers = [TinyReader(torch.randint(0, 50, (n,)), 4, 8, 3, seed=n) for n in (37, 150)]
    wte = torch.nn.Embedding(50, 8)
    wcs = [recency_pyramid(37, 64, cfg), recency_pyramid(150, 40, cfg)]
    mat = materialize(wcs, readers, wte, cfg)
    lengths = [wc_cost(w, 4) for w in wcs]
    assert mat.lengths.tolist() == lengths and mat.embeds.size(1) == max(lengths)
    assert mat.mask.sum(1).tolist() == lengths
    r = int(np.argmin(lengths))
    assert (mat.embeds[r, lengths[r]:] == 0).all()
    alone = materialize(wcs[r], readers[r], wte, cfg)
    assert torch.equal(alone.embeds[0], mat.embeds[r, :lengths[r]])


# -----------------------------------------------------------------------------
# the GPT path: an all-raw WC is exactly the plain GPT forward

def _random_gpt(vocab=64, seed=0):
    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(sequence_len=256, vocab_size=vocab, n_layer=2, n_head=2, n_kv_head=2, n_embd=32))
    gpt.init_weights()
    with torch.no_grad():  # nanochat zero-inits c_proj: randomise it so attention and MLP matter
        for name, p in gpt.named_parameters():
            if name.endswith("c_proj.weight"):
                p.uniform_(-0.3, 0.3)
    return gpt.eval()


@pytest.mark.parametrize("scheme", ["slot", "gaussian"])
def test_all_raw_wc_forward_equals_plain_gpt(scheme):
    cfg = MCConfig(budget=256, positions=scheme)
    gpt = _random_gpt()
    lens = (100, 100, 70)
    toks = [torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(n + k)) for k, n in enumerate(lens)]
    readers = [TinyReader(t, 32, 32, 4) for t in toks]
    wcs = [recency_pyramid(n, cfg.budget, cfg) for n in lens]
    assert all((w.levels == 0).all() for w in wcs)
    with torch.no_grad():
        # equal lengths: no padding, bit-identical logits
        mat = materialize(wcs[:2], readers[:2], gpt.transformer.wte, cfg)
        assert (mat.sigma is not None) == (scheme == "gaussian")
        got = forward_wc(gpt, mat)
        want = gpt(torch.stack(toks[:2]))
        assert torch.equal(got, want)
        # unequal lengths: right padding never reaches the valid (causal) slots
        mat = materialize(wcs, readers, gpt.transformer.wte, cfg)
        got = forward_wc(gpt, mat)
        for r, t in enumerate(toks):
            torch.testing.assert_close(got[r, :len(t)], gpt(t[None])[0], atol=1e-5, rtol=1e-5)
        # and the position data matters (RoPE is relative, so stretch rather than shift them)
        assert not torch.allclose(gpt(inputs_embeds=mat.embeds[:1], pos=mat.pos[:1] * 3), got[:1])
        # the loss path with targets works on the WC too
        tgt = torch.stack(toks[:2])[:, 1:]
        mat2 = materialize(wcs[:2], readers[:2], gpt.transformer.wte, cfg)
        loss = forward_wc(gpt, mat2, targets=torch.cat([tgt, torch.full((2, 1), -1)], 1))
        assert torch.isclose(loss, gpt(torch.stack(toks[:2])[:, :-1], targets=tgt))


def test_materialize_mixed_wc_runs_through_gpt_with_gists():
    cfg = MCConfig(budget=256, positions="gaussian")
    gpt = _random_gpt()
    N = 2000
    reader = TinyReader(torch.randint(0, 64, (N,)), 32, 32, 4)
    wc = recency_pyramid(N, 256, cfg)
    assert wc.level_counts().get(1, 0) > 0
    mat = materialize(wc, reader, gpt.transformer.wte, cfg)
    out = forward_wc(gpt, mat)
    assert out.shape == (1, wc_cost(wc, 32), 64) and torch.isfinite(out).all()
