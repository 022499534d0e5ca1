"""LensNet: shapes and range, non-causality, padding, learning, and gradients into GistNet."""
import numpy as np
import torch
import torch.nn.functional as F

from megacontext.config import MCConfig
from megacontext.lensnet import LensNet, entry_types, lens_inputs
from megacontext.working_context import entry_spans, recency_pyramid, tail_start


def tiny_cfg(**kw):
    base = dict(block_size=4, max_level=3, tail_tokens=8, budget=64, lens_dim=32, lens_layers=2, lens_heads=4)
    base.update(kw)
    return MCConfig(**base)


def randomise_residuals(lens):
    """A 'trained' LensNet: nanochat zero-inits the residual projections, which makes each block an identity."""
    with torch.no_grad():
        for name, p in lens.named_parameters():
            if name.endswith("c_proj.weight"):
                p.uniform_(-0.3, 0.3)
    return lens


class TinyReader:
    def __init__(self, tokens, K, dim, max_level, seed=0):
        g = torch.Generator().manual_seed(seed)
        self._tokens, self.num_tokens, self.dim = tokens, len(tokens), dim
        self._gists = {L: torch.randn(len(tokens) // K ** L, dim, generator=g) for L in range(1, max_level + 1)}

    def count(self, level):
        return self.num_tokens if level == 0 else self._gists[level].size(0)

    def tokens(self, start, end):
        return self._tokens[start:end]

    def gists(self, level, start, end):
        return self._gists[level][start:end]


def test_entry_types_mark_levels_and_the_present():
    cfg = tiny_cfg()
    wc = recency_pyramid(300, 40, cfg)
    types, tail = entry_types(wc, cfg)
    _, ends = entry_spans(wc, 4)
    assert (tail == (ends > tail_start(300, cfg))).all() and tail.sum() == 2  # 8 tail tokens = 2 full blocks
    assert (types[tail] == cfg.max_level + 1).all() and (types[~tail] == wc.levels[~tail]).all()


def test_scores_shape_range_and_padding():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    lens = randomise_residuals(LensNet(16, cfg))
    wte = torch.nn.Embedding(50, 16)
    wcs = [recency_pyramid(n, 40, cfg) for n in (30, 300)]
    readers = [TinyReader(torch.randint(0, 50, (n,)), 4, 16, 3, seed=n) for n in (30, 300)]
    scores, mask = lens.score(wcs, readers, wte)
    assert scores.shape == (2, max(len(w) for w in wcs)) and mask.sum(1).tolist() == [len(w) for w in wcs]
    assert (scores.abs() < 1).all() and (scores[~mask] == 0).all()
    for r in range(2):  # padding changes nothing for the valid entries
        alone, _ = lens.score(wcs[r], readers[r], wte)
        torch.testing.assert_close(scores[r, :len(wcs[r])], alone[0], atol=1e-5, rtol=1e-5)


def test_non_causal_last_entry_changes_first_scores():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    W = 12
    x = torch.randn(1, W, 16)
    types = torch.tensor([[2, 2, 1, 1, 1, 1, 1, 0, 0, 0, 4, 4]])
    tail = types == cfg.max_level + 1
    x2 = x.clone()
    x2[0, -1] += torch.randn(16)  # only the newest entry (the present) changes
    for lens in (LensNet(16, cfg), randomise_residuals(LensNet(16, cfg))):
        s1, s2 = lens(x, types, tail), lens(x2, types, tail)
        assert (s1[0, :3] - s2[0, :3]).abs().min() > 1e-6
    # the encoder itself is bidirectional: the first entry's encoding sees the last entry
    h1, h2 = lens.encode(x, types), lens.encode(x2, types)
    assert (h1[0, 0] - h2[0, 0]).abs().max() > 1e-4
    # ...and an entry before position 0 does not exist, but a change at the front reaches the back too
    x3 = x.clone()
    x3[0, 0] += 1.0
    assert (lens.encode(x3, types)[0, -1] - h1[0, -1]).abs().max() > 1e-4


def test_lensnet_learns_to_score_marked_entries():
    torch.manual_seed(0)
    cfg = tiny_cfg(lens_layers=1)
    lens = LensNet(16, cfg)
    opt = torch.optim.AdamW(lens.parameters(), lr=3e-3)
    B, W = 16, 10
    types = torch.tensor([[1] * 8 + [4, 4]]).expand(B, W)
    tail = types == 4

    def batch():
        x = torch.randn(B, W, 16)
        key = torch.randn(B, 16)
        x[:, 8:] += 2 * key[:, None]             # the present mentions a key ...
        hit = torch.randint(0, 8, (B,))
        x[torch.arange(B), hit] += 2 * key       # ... and one past entry matches it
        target = -torch.ones(B, W)
        target[torch.arange(B), hit] = 1.0
        return x, target

    losses = []
    for step in range(60):
        x, target = batch()
        s = lens(x, types, tail)
        loss = F.mse_loss(s[:, :8], target[:, :8] * 0.8)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5]), (losses[:5], losses[-10:])


def test_lens_loss_gradient_reaches_gistnet():
    import megacontext.gistnet as gistnet_mod
    torch.manual_seed(0)
    cfg = tiny_cfg()
    d = 16
    wte = torch.nn.Embedding(50, d)
    gistnet = gistnet_mod.GistNet(d, cfg, 2)
    ids = torch.randint(0, 50, (300,))
    levels = gistnet_mod.build_gists(gistnet, wte(ids), cfg)
    reader = gistnet_mod.GistLevels(ids, levels)
    wc = recency_pyramid(300, 40, cfg)
    assert wc.level_counts().get(1, 0) and wc.level_counts().get(2, 0)
    lens = LensNet(d, cfg)
    scores, mask = lens.score(wc, reader, wte)
    # listwise loss over all entries: pretend the first gist is the counterfactual-best one
    loss = F.cross_entropy(scores * 5, torch.tensor([0]))
    loss.backward(retain_graph=True)
    for name in ("head.weight", "level_emb.weight"):
        g = dict(gistnet.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name
    assert wte.weight.grad is not None and wte.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in lens.parameters())
    # the same through materialize into the GPT input: gists there carry GistNet's graph too
    from megacontext.working_context import materialize
    gistnet.zero_grad()
    mat = materialize(wc, reader, wte, cfg)
    mat.embeds.sum().backward()
    assert dict(gistnet.named_parameters())["head.weight"].grad.abs().sum() > 0


def test_lens_inputs_mean_tokens_for_raw_blocks():
    cfg = tiny_cfg()
    wte = torch.nn.Embedding(50, 16)
    ids = torch.randint(0, 50, (30,))
    wc = recency_pyramid(30, 40, cfg)
    x, types, tail, mask = lens_inputs(wc, TinyReader(ids, 4, 16, 3), wte, cfg)
    torch.testing.assert_close(x[0, 0], wte(ids[:4]).mean(0))
    torch.testing.assert_close(x[0, -1], wte(ids[28:30]).mean(0))  # the partial block: its 2 tokens
