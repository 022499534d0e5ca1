"""GistNet: init is a mean pool, bidirectional RoPE blocks, build_gists/GistLevels, fingerprint, it learns."""
import pytest
import torch
import torch.nn as nn

from megacontext.config import MCConfig
from megacontext.gistnet import GistLevels, GistNet, build_gists, gistnet_fingerprint

D = 32


def make_cfg(**kw):
    kw.setdefault("max_level", 3)
    kw.setdefault("gist_layers", 1)
    return MCConfig(**kw)


def randomize(gistnet, seed=0):
    """Give the zero-initialised parts (residual outputs, level embedding, head, query) random weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gistnet.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return gistnet


@pytest.mark.parametrize("pool", ["mean", "attn"])
def test_untrained_gistnet_is_exact_mean_pool(pool):
    """A mean pool rescaled to the RMS of its children (per group): gists weigh like the tokens they replace."""
    torch.manual_seed(0)
    net = GistNet(D, make_cfg(gist_pool=pool, gist_layers=2), n_head=2)
    x = torch.randn(7, 32, D) * torch.linspace(0.1, 50, 7)[:, None, None]  # groups at very different scales
    rms = x.pow(2).mean(dim=(1, 2)).sqrt()[:, None]
    mean = x.mean(dim=1)
    for level in (1, 2, 3):
        torch.testing.assert_close(net(x, level), mean / mean.pow(2).mean(1, keepdim=True).sqrt() * rms,
                                   rtol=1e-3, atol=1e-4)  # rms_norm's eps


def test_trained_gists_stay_at_their_childrens_scale():
    """Nothing downstream bounds a gist's norm (the GPT normalizes its inputs): GistNet does, whatever its weights."""
    net = randomize(GistNet(D, make_cfg(gist_layers=2), n_head=2))
    with torch.no_grad():
        net.head.weight.mul_(1000)
    x = torch.randn(5, 32, D) * 3
    g = net(x, 1)
    torch.testing.assert_close(g.pow(2).mean(1).sqrt(), x.pow(2).mean(dim=(1, 2)).sqrt())


def test_input_validation():
    net = GistNet(D, make_cfg(), n_head=2)
    with pytest.raises(ValueError, match=r"shape \(groups, 32, 32\)"):
        net(torch.randn(3, 31, D), 1)
    with pytest.raises(ValueError, match="shape"):
        net(torch.randn(3, 32, D + 1), 1)
    with pytest.raises(ValueError, match="level"):
        net(torch.randn(3, 32, D), 0)
    with pytest.raises(ValueError, match="level"):
        net(torch.randn(3, 32, D), 4)  # max_level = 3
    with pytest.raises(ValueError, match="divisible"):
        GistNet(30, make_cfg(), n_head=4)


def test_gist_heads_override_and_arch():
    net = GistNet(D, make_cfg(gist_heads=4, gist_layers=2, gist_pool="attn"), n_head=1)
    assert net.arch() == {"n_embd": D, "n_head": 4, "n_layer": 2, "pool": "attn", "block_size": 32, "max_level": 3}
    assert len(net.blocks) == 2 and net.level_emb.num_embeddings == 4


def test_attention_is_bidirectional_and_positional():
    torch.manual_seed(0)
    net = randomize(GistNet(D, make_cfg(), n_head=2))
    x = torch.randn(1, 32, D, requires_grad=True)
    captured = {}
    net.blocks[0].register_forward_hook(lambda m, i, o: captured.update(out=o))
    net(x, 1)
    # the FIRST child's block output depends on the LAST child: attention is not causal
    (g,) = torch.autograd.grad(captured["out"][0, 0].sum(), x)
    assert g[0, 31].abs().sum() > 0
    # RoPE inside the group: the same children in another order give another gist
    perm = torch.randperm(32)
    assert not torch.allclose(net(x, 1), net(x[:, perm], 1), atol=1e-5)
    # the level embedding tells levels apart
    assert not torch.allclose(net(x, 1), net(x, 2), atol=1e-5)


def test_build_gists_matches_per_group_calls_and_carries_grad():
    torch.manual_seed(0)
    cfg = make_cfg()
    net = randomize(GistNet(D, cfg, n_head=2))
    N = 32 * 32 * 2 + 32 * 3 + 5  # 2 level-2 gists, 67 level-1 gists, 5-token tail
    emb = torch.randn(N, D, requires_grad=True)
    levels = build_gists(net, emb, cfg)
    assert levels[0] is None and len(levels) == 4
    assert [lv.shape[0] for lv in levels[1:]] == [67, 2, 0]
    for i in (0, 40, 66):  # each gist = GistNet of exactly the 32 children it claims
        torch.testing.assert_close(levels[1][i], net(emb[i * 32:(i + 1) * 32][None], 1)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(levels[2][1], net(levels[1][32:64][None], 2)[0], rtol=1e-5, atol=1e-5)
    levels[2].sum().backward()
    assert emb.grad is not None and emb.grad[:2048].abs().sum() > 0
    assert emb.grad[2048:].abs().sum() == 0  # tokens outside level-2 gists' span get no gradient from them
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad and p is not net.level_emb.weight) \
        and net.level_emb.weight.grad[2].abs().sum() > 0


def test_build_gists_batched_and_one_call_per_level():
    torch.manual_seed(0)
    cfg = make_cfg()
    net = randomize(GistNet(D, cfg, n_head=2))
    emb = torch.randn(3, 32 * 40, D)
    calls = []
    net.register_forward_hook(lambda m, i, o: calls.append((i[1], i[0].shape[0])))
    batch = build_gists(net, emb, cfg)
    assert calls == [(1, 3 * 40), (2, 3)]  # one call per non-empty level, all sequences together
    for b in range(3):
        single = build_gists(net, emb[b], cfg)
        for L in (1, 2):
            torch.testing.assert_close(batch[L][b], single[L], rtol=1e-5, atol=1e-5)
    split = build_gists(net, emb[0], cfg, max_batch=7)
    torch.testing.assert_close(split[1], batch[1][0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="max_level"):
        build_gists(net, emb[0], cfg, max_level=5)


def test_gist_levels_reader_protocol():
    torch.manual_seed(0)
    cfg = make_cfg()
    net = randomize(GistNet(D, cfg, n_head=2))
    ids = torch.randint(0, 50, (32 * 33 + 7,))
    wte = nn.Embedding(50, D)
    reader = GistLevels(ids, build_gists(net, wte(ids), cfg))
    assert reader.num_tokens == 32 * 33 + 7 and reader.dim == D
    assert [reader.count(L) for L in range(5)] == [32 * 33 + 7, 33, 1, 0, 0]
    assert torch.equal(reader.tokens(3, 40), ids[3:40]) and reader.tokens(3, 40).dtype == torch.long
    g = reader.gists(1, 30, 33)
    assert g.shape == (3, D) and g.dtype == torch.float32 and g.requires_grad
    g.sum().backward()
    assert wte.weight.grad.abs().sum() > 0  # the reader's gists reach GistNet and the embedding
    with pytest.raises(IndexError, match="out of bounds"):
        reader.gists(1, 30, 34)
    with pytest.raises(IndexError):
        reader.tokens(0, 32 * 33 + 8)
    with pytest.raises(ValueError):
        reader.gists(0, 0, 1)


def test_fingerprint_tracks_weights():
    cfg = make_cfg()
    a = GistNet(D, cfg, n_head=2)
    b = GistNet(D, cfg, n_head=2)
    b.load_state_dict(a.state_dict())
    assert gistnet_fingerprint(a) == gistnet_fingerprint(b) and len(gistnet_fingerprint(a)) == 16
    with torch.no_grad():
        b.head.weight[0, 0] += 1e-3
    assert gistnet_fingerprint(a) != gistnet_fingerprint(b)
    c = GistNet(D, make_cfg(gist_pool="attn"), n_head=2)
    assert gistnet_fingerprint(c) != gistnet_fingerprint(a)


def test_gistnet_learns_what_mean_pooling_cannot():
    """Target: the mean of |child| (nonlinear). The untrained mean pool is far off; training must close the gap."""
    torch.manual_seed(0)
    net = GistNet(D, make_cfg(), n_head=2)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    x_val = torch.randn(64, 32, D)

    def val_loss():
        with torch.no_grad():
            return (net(x_val, 1) - x_val.abs().mean(1)).pow(2).mean().item()
    start = val_loss()
    for _ in range(100):
        x = torch.randn(32, 32, D)
        loss = (net(x, 1) - x.abs().mean(1)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = val_loss()
    assert end < 0.1 * start, (start, end)
