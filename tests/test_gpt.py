"""
The GPT and its optimizers: KV-cached decoding equals the full forward, the inputs_embeds path
equals the ids path, training cannot beat ln(V) on random tokens (no target leak) but does learn
repetitive data, and the Muon / AdamW set-up covers every parameter once.
"""
import math

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import Muon, clip_grads, setup_optimizers, sync_grads, zeropower_via_newtonschulz5


def tiny_gpt(vocab=97, n_layer=2, n_embd=64, n_head=4, n_kv_head=4, seq=64, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=seq, vocab_size=vocab, n_layer=n_layer, n_head=n_head,
                          n_kv_head=n_kv_head, n_embd=n_embd))
    model.init_weights()
    # nanochat zero-inits the output projections; perturb them so every layer matters in the tests
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("c_proj.weight"):
                p.normal_(0, 0.02)
        model.smear.uniform_(-0.5, 0.5)  # the smear starts at 0: a non-zero gate tests its cache path
    return model.eval()


@pytest.mark.parametrize("n_kv_head", [4, 2])  # MHA and GQA
def test_kv_cache_decoding_matches_full_forward(n_kv_head):
    model = tiny_gpt(n_kv_head=n_kv_head)
    torch.manual_seed(1)
    B, T = 2, 24
    ids = torch.randint(0, 97, (B, T))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_kv_cache(batch_size=B, seq_len=4)  # small on purpose: it must grow
        pieces = [model(ids[:, :10], kv_cache=cache)]  # prefill
        for t in range(10, 16):  # single-token steps
            pieces.append(model(ids[:, t:t + 1], kv_cache=cache))
        pieces.append(model(ids[:, 16:], kv_cache=cache))  # a multi-token chunk after decoding
    cached = torch.cat(pieces, dim=1)
    assert cache.pos == T
    assert cached.shape == full.shape
    assert (cached - full).abs().max().item() <= 1e-4


def test_kv_cache_expand_batch_and_truncate():
    model = tiny_gpt()
    ids = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        full = model(ids.expand(3, -1))
        cache = model.new_kv_cache(batch_size=1)
        model(ids[:, :8], kv_cache=cache)
        cache.expand_batch(3)
        tail = model(ids[:, 8:].expand(3, -1), kv_cache=cache)
        assert (tail - full[:, 8:]).abs().max().item() <= 1e-4
        # truncate to 5 and recompute the rest: same logits again
        cache.truncate(5)
        again = model(ids[:, 5:].expand(3, -1), kv_cache=cache)
    assert (again - full[:, 5:]).abs().max().item() <= 1e-4


def test_inputs_embeds_equal_ids_path():
    model = tiny_gpt()
    ids = torch.randint(0, 97, (2, 16))
    targets = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        emb = model.transformer.wte(ids)
        a, b = model(ids), model(inputs_embeds=emb)
        la, lb = model(ids, targets), model(inputs_embeds=emb, targets=targets)
        # explicit default positions give the same result too
        pos = torch.arange(16)[None].expand(2, 16)
        c = model(inputs_embeds=emb, pos=pos, pos_sigma=torch.zeros(2, 16))
    assert (a - b).abs().max().item() <= 1e-6
    assert (a - c).abs().max().item() <= 1e-6
    assert abs(la.item() - lb.item()) <= 1e-6


def test_loss_reduction_none_matches_mean_and_ignores_minus_one():
    model = tiny_gpt()
    ids = torch.randint(0, 97, (2, 8))
    y = torch.randint(0, 97, (2, 8))
    y[0, :3] = -1
    with torch.no_grad():
        per = model(ids, y, loss_reduction="none").view(2, 8)
        mean = model(ids, y)
    assert torch.all(per[0, :3] == 0)
    assert torch.allclose(per[y >= 0].mean(), mean, atol=1e-6)


def _train_steps(model, batch_fn, steps, lr_scale=1.0):
    opts = setup_optimizers(model, unembedding_lr=0.004 * lr_scale, embedding_lr=0.2 * lr_scale,
                            matrix_lr=0.02 * lr_scale)
    model.train()
    losses = []
    for step in range(steps):
        x, y = batch_fn(step)
        loss = model(x, y)
        loss.backward()
        for o in opts:
            o.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_random_tokens_never_beat_log_vocab():
    # fresh uniformly random tokens every step: nothing is learnable, so a loss below ln(V) means
    # the targets leak into the inputs (trap 1 of the design)
    V, B, T = 128, 8, 32
    model = tiny_gpt(vocab=V, n_layer=1, n_embd=32, n_head=2, n_kv_head=2)
    gen = torch.Generator().manual_seed(0)

    def batch(step):
        seq = torch.randint(0, V, (B, T + 1), generator=gen)
        return seq[:, :-1], seq[:, 1:]

    losses = _train_steps(model, batch, 60)
    assert min(losses) >= math.log(V) - 0.05, min(losses)


def test_loss_falls_on_repetitive_data():
    V, B, T = 64, 4, 32
    model = tiny_gpt(vocab=V, n_layer=1, n_embd=32, n_head=2, n_kv_head=2)
    pattern = torch.arange(8).repeat(T // 8 + 1)  # 0 1 2 ... 7 0 1 ...

    def batch(step):
        seq = pattern[: T + 1].expand(B, -1)
        return seq[:, :-1], seq[:, 1:]

    losses = _train_steps(model, batch, 40)
    assert losses[0] > math.log(V) - 0.5
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


def test_newton_schulz_orthogonalises():
    torch.manual_seed(0)
    for m, n in [(32, 64), (64, 32), (48, 48)]:
        k = min(m, n)
        U, _ = torch.linalg.qr(torch.randn(m, k))
        V, _ = torch.linalg.qr(torch.randn(n, k))
        G = U @ torch.diag(torch.logspace(-1.5, 1, k)) @ V.T  # condition number ~300
        X = zeropower_via_newtonschulz5(G, steps=5)
        s = torch.linalg.svdvals(X)
        # NS5 with these coefficients maps singular values (not too small) into roughly [0.7, 1.2]
        assert s.min() > 0.5 and s.max() < 1.3, ((m, n), s.min().item(), s.max().item())
        # and keeps the singular vectors: X is close to U V^T
        assert torch.nn.functional.cosine_similarity(X.flatten(), (U @ V.T).flatten(), dim=0) > 0.97


def test_muon_step_direction_and_rejects_non_matrices():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(16, 8))
    opt = Muon([w], lr=0.1, momentum=0.0, nesterov=False)
    w0 = w.detach().clone()
    w.grad = torch.randn(16, 8)
    opt.step()
    expected = w0 - 0.1 * math.sqrt(16 / 8) * zeropower_via_newtonschulz5(w.grad)
    assert torch.allclose(w.detach(), expected, atol=1e-6)
    with pytest.raises(ValueError):
        Muon([torch.nn.Parameter(torch.randn(4))])


def test_setup_optimizers_groups_and_lr_scaling():
    model = tiny_gpt(n_embd=64)
    extra = torch.nn.Linear(4, 4)
    adamw, muon = setup_optimizers(model, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02,
                                   extra_adamw_params=[{"params": extra.parameters(), "lr": 0.001}])
    scale = (64 / 768) ** -0.5
    lrs = [g["lr"] for g in adamw.param_groups]
    assert lrs == pytest.approx([0.004 * scale, 0.2 * scale, 0.02 * scale, 0.001 * scale])  # ..., smear, extra
    assert all(g["initial_lr"] == g["lr"] for o in (adamw, muon) for g in o.param_groups)
    ids = lambda ps: {id(p) for p in ps}
    muon_ids = ids(p for g in muon.param_groups for p in g["params"])
    adam_ids = ids(p for g in adamw.param_groups for p in g["params"])
    assert muon_ids == ids(model.transformer.h.parameters())
    assert muon_ids.isdisjoint(adam_ids)
    assert muon_ids | adam_ids == ids(model.parameters()) | ids(extra.parameters())
    # a GPT parameter passed again as an extra would be stepped twice
    with pytest.raises(ValueError):
        setup_optimizers(model, extra_adamw_params=[model.lm_head.weight])


def test_sync_grads_is_a_noop_without_process_group():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    sync_grads([p])
    assert torch.equal(p.grad, torch.full((3,), 2.0))


def test_labelled_nll_equals_full_cross_entropy_in_value_and_grad():
    """labelled_nll (logits only at labelled positions, in checkpointed chunks) is the per-position loss
    of forward(..., loss_reduction='none'), 0 where unlabelled, with the same gradients."""
    model = tiny_gpt().train()
    torch.manual_seed(2)
    ids = torch.randint(0, 97, (3, 20))
    targets = torch.randint(0, 97, (3, 20))
    targets[:, :7] = -1          # an unlabelled prefix (a packed row's working context)
    targets[1, 15:] = -1         # and a padded end
    ref = model(ids, targets, loss_reduction="none").view(3, 20)
    ref.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    got = model.labelled_nll(model(ids, return_hidden=True), targets, chunk=5)  # 5: several chunks
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert (got[targets == -1] == 0).all() and (got[targets != -1] > 0).all()
    got.sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    with torch.no_grad():  # the no-grad path (counterfactuals) gives the same values
        torch.testing.assert_close(model.labelled_nll(model(ids, return_hidden=True), targets, chunk=7), ref.detach(),
                                   rtol=1e-5, atol=1e-6)


def test_clip_grads_clips_each_module_and_skips_one_without_grads():
    """The returned norm is over every module before clipping; a module without grads (the reranker outside
    midtraining: torch gives it a CPU zero, which on CUDA could not be stacked with the others) adds 0."""
    torch.manual_seed(0)
    a, b, idle = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    for m, scale in ((a, 3.0), (b, 0.1)):
        for p in m.parameters():
            p.grad = scale * torch.randn_like(p)
    na = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in a.parameters()))
    nb = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in b.parameters()))
    total = clip_grads([a, idle, b], max_norm=1.0)
    assert total == pytest.approx(math.sqrt(na ** 2 + nb ** 2), rel=1e-6)
    assert math.sqrt(sum(float(p.grad.pow(2).sum()) for p in a.parameters())) == pytest.approx(1.0, rel=1e-5)
    assert math.sqrt(sum(float(p.grad.pow(2).sum()) for p in b.parameters())) == pytest.approx(nb, rel=1e-6)
    assert all(p.grad is None for p in idle.parameters())
