"""
The end-to-end objective on the real GPT / GistNet / LensNet (tiny): next-token labels, gradients into
every MegaContext module, the random-token floor ln(V), LensNet loss direction, and telemetry.
"""
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megacontext.config import MCConfig
from megacontext.gistnet import GistNet, build_gists
from megacontext.lensnet import LensNet
from megacontext.allocator import expand
from megacontext.eval.metrics import gist_substitutability, lens_pair_agreement
from megacontext.focus import entry_covering, greedy_focus, open_blocks, start_wc
from megacontext.packing import pack, raw_suffix_part, row_nll, wc_part
from megacontext.training.needle import (lens_curriculum, lens_target_loss, needle_loss, needle_variant,
                                         weighted_target_nll)
from megacontext.training.objective import (MCObjective, bow_loss, lens_loss, lens_targets, pair_agreement, random_mix,
                                            split_point)
from megacontext.training.telemetry import MetricWindow, PhaseTimer, for_wandb, format_metrics, format_table
from megacontext.working_context import WCError, check_invariants, coarsest_wc, recency_pyramid, swap_share, wc_cost
from nanochat.gpt import GPT, GPTConfig

V = 64


def make(seed=0, positions="slot", plain=0.0, **kw):
    torch.manual_seed(seed)
    cfg = MCConfig(block_size=8, max_level=2, budget=64, tail_tokens=8, positions=positions, gist_layers=1,
                   lens_dim=32, lens_heads=2, lens_layers=1, train_hist_budget=32, train_min_target=8,
                   train_plain_lm=plain, **kw)
    gpt = GPT(GPTConfig(sequence_len=256, vocab_size=V, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    gpt.init_weights()
    return MCObjective(gpt, GistNet(32, cfg, 2), LensNet(32, cfg), cfg), cfg


def batch(B=2, T=160, seed=0):
    seq = torch.randint(0, V, (B, T + 1), generator=torch.Generator().manual_seed(seed))
    return seq[:, :-1], seq[:, 1:]


def test_config_knobs_validate():
    with pytest.raises(ValueError, match="train_hist_budget"):
        MCConfig(budget=256, tail_tokens=32, train_hist_budget=32)  # below tail + K
    with pytest.raises(ValueError, match="train_variants"):
        MCConfig(train_variants="pyramid,bogus")
    assert MCConfig(budget=64, tail_tokens=0).hist_budget() == 32  # 0 resolves to budget // 2


@pytest.mark.parametrize("positions", ["slot", "gaussian"])
def test_target_labels_are_the_next_tokens(positions):
    obj, cfg = make(positions=positions)
    # a sequence where "copy the input" and "predict the next token" always disagree
    seq = torch.arange(161)[None] % V
    x, y = seq[:, :-1], seq[:, 1:]
    s, m = 96, 64
    rd = obj.readers(x, s)[0]
    parts = [wc_part(coarsest_wc(s, cfg), rd, obj.wte, cfg), raw_suffix_part(x[0, :s], 32, obj.wte, cfg)]
    p = pack(parts, x[[0, 0], s:], y[[0, 0], s:], s, obj.wte, cfg)
    for r, n in enumerate(p.hist_lens):
        assert torch.equal(p.labels[r, n:n + m], seq[0, s + 1:s + 1 + m])       # the NEXT tokens
        assert not torch.equal(p.labels[r, n:n + m], x[0, s:s + m])             # never the inputs
        assert (p.labels[r, :n] == -1).all() and (p.labels[r, n + m:] == -1).all()
        assert torch.equal(p.embeds[r, n:n + m], obj.wte(x[0, s:]))            # inputs are x[s:]
        if positions == "slot":
            assert torch.equal(p.pos[r, n:n + m], n + torch.arange(m, dtype=torch.float32))
        else:
            assert torch.equal(p.pos[r, n:n + m], s + torch.arange(m, dtype=torch.float32))
            assert (p.sigma[r, n:n + m] == 0).all()
    # the loss is cross-entropy of the logits at each target input against the next token
    sums, counts = row_nll(obj.gpt, p)
    logits = obj.gpt(inputs_embeds=p.embeds, pos=p.pos, pos_sigma=p.sigma)
    for r, n in enumerate(p.hist_lens):
        ref = F.cross_entropy(logits[r, n:n + m], seq[0, s + 1:s + 1 + m], reduction="sum")
        torch.testing.assert_close(sums[r], ref, rtol=1e-5, atol=1e-4)
        assert counts[r] == m
    # copy targets (the trap) are refused
    with pytest.raises(ValueError, match="NEXT token"):
        obj.loss(x, x.clone(), np.random.default_rng(0))


def test_one_step_changes_every_gistnet_and_lensnet_parameter():
    obj, cfg = make()
    with torch.no_grad():  # leave the zero-initialised residual branches: otherwise step 1 cannot reach them
        for p in obj.parameters_mc():
            p.add_(0.02 * torch.randn_like(p))
    before = {n: p.detach().clone() for n, p in [*obj.gistnet.named_parameters(), *obj.lensnet.named_parameters()]}
    opt = torch.optim.AdamW(list(obj.gpt.parameters()) + obj.parameters_mc(), lr=1e-3, weight_decay=0.0)
    x, y = batch()
    loss, m = obj.loss(x, y, np.random.default_rng(1))
    assert "mc/lens_loss" in m and m["mc/budget_utilization"] <= 1.0
    loss.backward()
    opt.step()
    after = dict([*obj.gistnet.named_parameters(), *obj.lensnet.named_parameters()])
    unchanged = [n for n, p in after.items() if torch.equal(p.detach(), before[n])]
    assert not unchanged, f"parameters not updated: {unchanged}"


def test_bow_loss_matches_reference_and_trains_only_the_gists():
    g = torch.randn(2, 3, 16, requires_grad=True)
    W = torch.randn(40, 16, requires_grad=True)
    ids = torch.randint(0, 40, (2, 3 * 4 + 5))  # extra ids past the last complete block are ignored
    got = bow_loss(g, ids, W, 4)
    ref = []
    for b in range(2):
        for j in range(3):
            v = g[b, j] / (g[b, j].pow(2).mean() + torch.finfo(torch.float32).eps).sqrt()
            logp = torch.log_softmax(W @ v, -1)
            ref += [-logp[int(t)] for t in ids[b, 4 * j:4 * j + 4]]
    torch.testing.assert_close(got, torch.stack(ref).mean())
    got.backward()
    assert g.grad.abs().sum() > 0 and W.grad is None  # the lm_head is read, never trained by it
    assert float(bow_loss(g[:, :0].detach(), ids, W, 4)) == 0.0


def test_bow_weight_adds_the_bow_term_and_it_falls():
    x, y = batch()
    losses = {}
    for w in (0.0, 1.0):
        obj, cfg = make(gist_bow_weight=w)
        losses[w] = obj.loss(x, y, np.random.default_rng(3), s=96)
    (l0, m0), (l1, m1) = losses[0.0], losses[1.0]
    assert "mc/gist_bow" not in m0
    torch.testing.assert_close(l1 - l0, m1["mc/gist_bow"], rtol=1e-5, atol=1e-5)  # the same draws otherwise
    # trained alone, GistNet learns to put its block's tokens into its gists
    obj, cfg = make(gist_bow_weight=1.0)
    with torch.no_grad():  # a fresh lm_head is ~0: every softmax would be uniform whatever the gist
        obj.gpt.lm_head.weight.normal_(0, 1, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(obj.gistnet.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        g = build_gists(obj.gistnet, obj.wte(x[:, :96]), cfg)[1]
        loss = bow_loss(g, x[:, :96], obj.gpt.lm_head.weight, cfg.block_size)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < first - 0.5, (first, float(loss.detach()))


def test_row_lm_weight_adds_the_whole_rows_plain_loss_on_random_splits_only():
    x, y = batch()
    out = {}
    for w in (0.0, 0.5):
        obj, cfg = make(train_lm_weight=w)
        out[w] = obj.loss(x, y, np.random.default_rng(3)), obj.loss(x, y, np.random.default_rng(3), s=96)
    (l0, m0), (e0, _) = out[0.0]
    (l1, m1), (e1, em1) = out[0.5]
    assert "mc/row_lm_loss" not in m0
    plain = obj.gpt(x, y)  # the same weights: make() seeds them
    torch.testing.assert_close(m1["mc/row_lm_loss"], plain.detach())
    torch.testing.assert_close(l1 - l0, 0.5 * plain.detach(), rtol=1e-5, atol=1e-5)  # the same draws otherwise
    # an explicit split is a long-context task row: it is never read whole
    assert "mc/row_lm_loss" not in em1
    torch.testing.assert_close(e1, e0)


def test_random_tokens_never_beat_ln_v():
    obj, cfg = make(seed=1, plain=0.25)
    opt = torch.optim.AdamW(list(obj.gpt.parameters()) + obj.parameters_mc(), lr=3e-3, weight_decay=0.0)
    rng = np.random.default_rng(0)
    floor = math.log(V) - 0.05
    seen = 0
    for step in range(40):
        x, y = batch(B=2, T=128, seed=100 + step)  # fresh uniform tokens every step
        loss, m = obj.loss(x, y, rng, step)
        lm = [v for k, v in m.items() if k.startswith("mc/loss_by_variant/") or k == "mc/plain_lm_loss"]
        assert lm and all(float(v) >= floor for v in lm), (step, m)
        seen += len(lm)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert seen > 40


def test_lens_loss_varies_and_reaches_gistnet():
    obj, cfg = make()
    x, y = batch()
    s = 96
    rng = np.random.default_rng(0)
    readers = obj.readers(x, s)
    bases, delta, legal, base_nll = obj.counterfactuals(x, y, s, readers, rng)
    assert legal.any() and not delta.requires_grad
    # delta is exactly NLL(base) - NLL(base with that gist expanded), in summed nats
    b, j = 0, int(np.flatnonzero(legal[0].numpy())[0])
    with torch.no_grad():
        ref = [row_nll(obj.gpt, pack([wc_part(w, readers[b], obj.wte, cfg)], x[:1, s:], y[:1, s:], s, obj.wte,
                                     cfg))[0][0] for w in (bases[b], expand(bases[b], j, cfg))]
    torch.testing.assert_close(delta[b, j], ref[0] - ref[1], rtol=1e-4, atol=1e-4)
    scores, _ = obj.lensnet.score(bases, readers, obj.wte)
    l1, _, _ = lens_loss(scores, delta, legal, cfg.lens_temp)
    l2, _, _ = lens_loss(scores, -delta + 3 * legal.float() * torch.arange(delta.size(1)), legal, cfg.lens_temp)
    assert abs(float(l1.detach()) - float(l2.detach())) > 1e-3  # depends on the counterfactual labels
    l2.backward()
    g = obj.gistnet.head.weight.grad
    assert g is not None and g.abs().sum() > 0  # LensNet's loss trains GistNet (gists not detached)


def test_lens_targets_and_gradients_have_the_right_sign():
    delta = torch.tensor([[0.5, -0.5, 2.0, 0.0]])
    t = lens_targets(delta, 1.0)
    assert t[0, 2] > t[0, 0] > t[0, 3] > t[0, 1]  # an expansion that lowers NLL more gets a higher target
    scores = torch.zeros(1, 4, requires_grad=True)
    legal = torch.tensor([[True, True, True, False]])
    loss, listwise, bce = lens_loss(scores, delta, legal, 1.0)
    loss.backward()
    g = scores.grad[0]
    assert g[2] < 0 < g[1]          # descent raises the best block's score and lowers the harmful one's
    assert g[3] == 0                # illegal entries are masked out
    assert listwise > 0 and bce > 0
    assert pair_agreement(torch.tensor([[0.1, -0.2, 0.9]]), delta[:, :3], legal[:, :3]) == 1.0
    assert pair_agreement(torch.tensor([[0.9, 0.1, -0.2]]), delta[:, :3], legal[:, :3]) == pytest.approx(1 / 3)
    # tied (saturated) scores are chance, not disagreement
    assert pair_agreement(torch.tensor([[1.0, 1.0, 1.0]]), delta[:, :3], legal[:, :3]) == pytest.approx(0.5)


def test_split_and_wc_builders_keep_invariants():
    obj, cfg = make()
    rng = np.random.default_rng(0)
    for T in (64, 160, 1200):
        for _ in range(10):
            s = split_point(T, cfg, rng)
            assert s % cfg.block_size == 0 and 0 < s <= T - cfg.train_min_target
    with pytest.raises(ValueError, match="too short"):
        split_point(10, cfg, rng)
    for n in (100, 600, 1100):
        wc = random_mix(n, 40, cfg, rng)
        check_invariants(wc, cfg, 40)
        assert wc_cost(wc, cfg.block_size) > 40 - cfg.block_size + 1  # no room left for another expansion
        f = greedy_focus(coarsest_wc(n, cfg), 40, cfg, lambda w: -np.arange(len(w), dtype=float))
        check_invariants(f, cfg, 40)


def test_eval_helpers_run_and_are_consistent():
    obj, cfg = make(lens_cands=0)  # every gist a candidate: enough pairs to tell an ordering from a tie
    x, y = batch(B=2, T=160)
    out = gist_substitutability(obj.gpt, obj.gistnet, x, y, 128, cfg, level=1)
    assert set(out) == {"nll_raw", "nll_gists", "nll_dropped", "nll_none", "substitutability"}
    if not math.isnan(out["substitutability"]):
        gap = out["nll_dropped"] - out["nll_raw"]
        assert out["substitutability"] == pytest.approx((out["nll_dropped"] - out["nll_gists"]) / gap)
    lp = lens_pair_agreement(obj, x, y, 128, 0)
    assert set(lp) == {"agreement", "top1", "delta_nll", "recency", "split_half"}
    # the ordering is LensNet's, not tanh's rounding: a bias that saturates every score changes nothing.
    # A fresh GPT (zero output projections) ignores its context, so every delta ties: perturb it first
    with torch.no_grad():
        for p in obj.gpt.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    lp = lens_pair_agreement(obj, x, y, 128, 0)
    with torch.no_grad():
        obj.lensnet.bias.fill_(-40.0)
        assert (obj.lensnet.score([coarsest_wc(128, cfg)], [obj.readers(x, 128)[0]], obj.wte)[0] == -1).all()
    sat = lens_pair_agreement(obj, x, y, 128, 0)
    assert math.isfinite(lp["agreement"]) and lp["agreement"] != 0.5  # else tanh's ties could not be told apart
    assert sat["agreement"] == lp["agreement"] and sat["top1"] == lp["top1"]


def test_recency_baseline_ranks_the_newest_gist_first(monkeypatch):
    """lens_pair_agreement's `recency` orders the candidates newest first, whatever LensNet says: deltas
    that grow towards the present read 1, deltas that shrink read 0, and ties are left out."""
    obj, cfg = make()
    x, y = batch(B=1, T=160)
    real = obj.counterfactuals

    def stub(sign):
        def counterfactuals(*a, **k):
            bases, delta, legal, base_nll = real(*a, **k)
            legal = torch.zeros_like(legal)
            legal[0, :3] = True  # three candidates, entries 0 < 1 < 2 in time
            delta = torch.zeros_like(delta)
            delta[0, :3] = sign * torch.tensor([0.5, 1.0, 2.0]) if sign else torch.tensor([1.0, 1.0, 1.0])
            return bases, delta, legal, base_nll
        return counterfactuals
    for sign, want in ((1.0, 1.0), (-1.0, 0.0)):
        monkeypatch.setattr(obj, "counterfactuals", stub(sign))
        assert lens_pair_agreement(obj, x, y, 128, 0)["recency"] == want
    monkeypatch.setattr(obj, "counterfactuals", stub(0.0))
    assert math.isnan(lens_pair_agreement(obj, x, y, 128, 0)["recency"])  # all tied: no pair to order


def test_split_half_orders_the_second_half_deltas_by_the_first_halfs(monkeypatch):
    """lens_pair_agreement's `split_half` scores each half of the target alone (the other half's labels
    -1) and orders the second half's deltas by the first half's: the same order reads 1, the reverse 0.
    With LensNet's candidates subsampled (lens_cands), all three calls draw the same candidates."""
    obj, cfg = make(lens_cands=2)
    x, y = batch(B=1, T=160)
    s = 128
    real, calls = obj.counterfactuals, []

    def record(x_, y_, *a, **k):
        out = real(x_, y_, *a, **k)
        calls.append(out[2].clone())
        return out
    monkeypatch.setattr(obj, "counterfactuals", record)
    lens_pair_agreement(obj, x, y, s, np.random.default_rng(3))
    from megacontext.eval.quality import lens_candidates
    assert lens_candidates(s, cfg) == 7 and len(calls) == 3 and int(calls[0].sum()) == 2  # 2 drawn of 7
    assert all(torch.equal(c, calls[0]) for c in calls)

    def stub(sign):
        def counterfactuals(x_, y_, *a, **k):
            bases, delta, legal, base_nll = real(x_, y_, *a, **k)
            legal = torch.zeros_like(legal)
            legal[0, :3] = True
            first_only, second_only = bool((y_[0, s + 16:] == -1).all()), bool((y_[0, s:s + 16] == -1).all())
            assert not (first_only and second_only) and (y_[0, s:] != -1).any()
            d = torch.tensor([1.0, 2.0, 3.0]) * (sign if second_only else 1.0)
            delta = torch.zeros_like(delta)
            delta[0, :3] = d
            return bases, delta, legal, base_nll
        return counterfactuals
    for sign, want in ((1.0, 1.0), (-1.0, 0.0)):
        monkeypatch.setattr(obj, "counterfactuals", stub(sign))
        assert lens_pair_agreement(obj, x, y, s, 0)["split_half"] == want


def test_telemetry_window_timer_and_format():
    w = MetricWindow()
    w.add({"mc/a": 1.0, "mc/b": torch.tensor(2.0)})
    w.add({"mc/a": 3.0, "mc/c": float("nan")})
    assert w.mean() == {"mc/a": 2.0, "mc/b": 2.0}
    assert w.flush() == {"mc/a": 2.0, "mc/b": 2.0} and len(w) == 0
    t = PhaseTimer("cpu")
    with t("gist"):
        sum(range(1000))
    d = t.pop()
    assert list(d) == ["mc/gist_ms"] and d["mc/gist_ms"] >= 0 and t.pop() == {}
    assert for_wandb({"x": torch.tensor(1.5), "y": float("nan")}, step=3) == {"x": 1.5, "step": 3}
    assert format_metrics({"mc/b": 2, "mc/a": 1, "z": 0}, keys=["mc/"]) == "mc/a=1 | mc/b=2"
    assert "| mc/a | 1 |" in format_table({"mc/a": 1})


def test_swap_rate_is_lens_focus_departure_from_the_recency_pyramid(monkeypatch):
    obj, cfg = make(train_variants="pyramid,lens")
    x, y = batch()
    s, B_h = 96, obj.B_h
    pyr = recency_pyramid(s, B_h, cfg)
    assert swap_share(pyr, pyr) == 0.0
    with pytest.raises(WCError, match="96 and 64"):
        swap_share(pyr, recency_pyramid(64, B_h, cfg))
    # a LensNet that prefers the oldest gists: focus opens old blocks where the pyramid opens the newest
    oldest = lambda wc, reader: -np.arange(len(wc), dtype=np.float64)
    monkeypatch.setattr(MCObjective, "_lens_scores", lambda self, wc, reader: oldest(wc, reader))
    _, m = obj.loss(x, y, np.random.default_rng(0), s=s)
    lens = greedy_focus(coarsest_wc(s, cfg), B_h, cfg, lambda w: oldest(w, None))
    new = {(int(L), int(i)) for L, i in zip(lens.levels, lens.indices)}
    old = {(int(L), int(i)) for L, i in zip(pyr.levels, pyr.indices)}
    assert 0 < m["mc/swap_rate"] == len(new - old) / len(lens) < 1
    # a focus that lands on the pyramid itself swaps nothing
    monkeypatch.setattr("megacontext.training.objective.greedy_focus", lambda base, budget, cfg, fn: recency_pyramid(s, budget, cfg))
    _, m = obj.loss(x, y, np.random.default_rng(0), s=s)
    assert m["mc/swap_rate"] == 0.0
    # without a LensNet-driven variant there is nothing to measure
    obj.variants = ["pyramid"]
    assert "mc/swap_rate" not in obj.loss(x, y, np.random.default_rng(0), s=s)[1]


# -----------------------------------------------------------------------------
# the retrieval recipe: needle opened, answer-weighted loss, LensNet coarse / fine / redirect targets

def test_open_blocks_and_lens_curriculum_targets_hold_the_needle():
    obj, cfg = make()
    K, rng = cfg.block_size, np.random.default_rng(0)
    n = 8 * 8 * 3 + 8  # three level-2 regions (64 tokens each) + a level-1 gist + the raw tail
    for blk in (0, 5, 9, 17, 24):
        wc = open_blocks(coarsest_wc(n, cfg), [blk], cfg)
        check_invariants(wc, cfg)
        j = entry_covering(wc, blk * K, K)
        assert wc.levels[j] == 0 and wc.indices[j] == blk  # the needle block is a raw entry
        v = needle_variant(n, [blk], 32, cfg, rng, extra=3)
        check_invariants(v, cfg, 32)
        assert any(v.levels[i] == 0 and v.indices[i] == blk for i in range(len(v)))
        if blk == 24:  # inside the raw tail: nothing for LensNet to find
            assert lens_curriculum(n, blk, cfg, rng) == []
            continue
        for _ in range(5):
            for w, t in lens_curriculum(n, blk, cfg, rng, p_redirect=1.0):
                check_invariants(w, cfg)
                L, i = int(w.levels[t]), int(w.indices[t])
                assert L >= 1 and i * K ** L <= blk * K < (i + 1) * K ** L  # the target covers the needle
    for seed in range(3):  # coarse, fine, redirect and focus's level-1 start for a needle inside a level-2 region
        ex = lens_curriculum(n, 2, cfg, np.random.default_rng(seed), p_redirect=1.0)
        assert len(ex) == 4 and ex[-1][0] == start_wc(n, cfg.budget, cfg) and set(ex[-1][0].levels) == {0, 1}


def test_start_wc_is_the_finest_tiling_that_leaves_room():
    cfg = MCConfig(block_size=8, max_level=3, budget=64, tail_tokens=8, lens_dim=32, lens_heads=2)
    K = cfg.block_size
    for room in (1, 2):
        for n in (70, 100, 200, 400, 1000, 5000):
            for budget in (40, 64, 100):
                wc = start_wc(n, budget, cfg, room=room)
                check_invariants(wc, cfg)
                coarse = coarsest_wc(n, cfg)
                assert (wc_cost(wc, K) - wc_cost(coarse, K)) % (K - 1) == 0  # the coarsest WC + whole expansions
                top = int(wc.levels.max(initial=0))
                if top > 1:  # a finer uniform tiling would leave no room
                    finer = coarsest_wc(n, cfg, max_level=top - 1)
                    assert wc_cost(finer, K) + room * (K - 1) > budget
                    # refined newest first: every top-level gist is older than every level top-1 one
                    tops, below = np.flatnonzero(wc.levels == top), np.flatnonzero(wc.levels == top - 1)
                    if len(below) and wc != coarse:
                        assert tops.max() < below.min() or wc_cost(wc, K) + (room + 1) * (K - 1) > budget
                    if wc_cost(wc, K) + room * (K - 1) <= budget:  # one more refinement would eat the room
                        assert wc_cost(wc, K) + (room + 1) * (K - 1) > budget or top < 2
                if wc != coarse:
                    assert wc_cost(wc, K) + room * (K - 1) <= budget


def test_lens_target_loss_descends_towards_the_target():
    scores = torch.zeros(2, 4, requires_grad=True)
    legal = torch.tensor([[True, True, False, True], [True, True, True, True]])
    loss, ce, hit = lens_target_loss(scores, legal, torch.tensor([1, 3]))
    loss.backward()
    g = scores.grad
    assert g[0, 1] < 0 and g[0, 0] > 0 and g[0, 2] == 0 and g[1, 3] < 0
    assert float(ce) == pytest.approx(0.5 * (math.log(3) + math.log(4)), rel=1e-5)


def test_weighted_target_nll_matches_reference():
    obj, cfg = make()
    x, y = batch(B=2, T=96)
    s = 64
    rd = obj.readers(x, s)
    p = pack([wc_part(coarsest_wc(s, cfg), r, obj.wte, cfg) for r in rd], x[:, s:], y[:, s:], s, obj.wte, cfg)
    w = torch.rand(p.labels.shape) + 0.5
    got = weighted_target_nll(obj.gpt, p, w)
    logits = obj.gpt(inputs_embeds=p.embeds, pos=p.pos)
    ce = F.cross_entropy(logits.flatten(0, 1), p.labels.flatten(), ignore_index=-1, reduction="none").view_as(w)
    m = (p.labels != -1).float()
    torch.testing.assert_close(got, (ce * w * m).sum() / (w * m).sum(), rtol=1e-5, atol=1e-5)


def test_needle_loss_trains_every_module_and_learns_a_fixed_needle():
    obj, cfg = make(seed=3)
    with torch.no_grad():
        for p in obj.parameters_mc():
            p.add_(0.02 * torch.randn_like(p))
    s = 200
    x, y = batch(B=2, T=232, seed=5)
    blocks = [3, 17]
    before = {n: p.detach().clone() for n, p in [*obj.gistnet.named_parameters(), *obj.lensnet.named_parameters()]}
    opt = torch.optim.AdamW(list(obj.gpt.parameters()) + obj.parameters_mc(), lr=3e-3, weight_decay=0.0)
    first = None
    for step in range(12):
        loss, m = needle_loss(obj, x, y, s, blocks, np.random.default_rng(step), weights=torch.full((2, 32), 2.0))
        assert "mc/lens_loss" in m and "mc/needle_lm" in m
        first = first if first is not None else float(m["mc/lens_ce"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 0:
            after = dict([*obj.gistnet.named_parameters(), *obj.lensnet.named_parameters()])
            unchanged = [n for n, p in after.items() if torch.equal(p.detach(), before[n])]
            assert not unchanged, unchanged
    assert float(m["mc/lens_ce"]) < first  # LensNet (with GistNet) learns where the needle is


def test_needle_loss_keeps_the_gists_bag_of_words_term():
    obj, cfg = make(seed=3, gist_bow_weight=0.5)
    plain = MCObjective(obj.gpt, obj.gistnet, obj.lensnet, dataclasses.replace(cfg, gist_bow_weight=0.0))
    s = 200
    x, y = batch(B=2, T=232, seed=5)
    loss, m = needle_loss(obj, x, y, s, [3, 17], np.random.default_rng(0))
    loss0, m0 = needle_loss(plain, x, y, s, [3, 17], np.random.default_rng(0))
    ref = bow_loss(build_gists(obj.gistnet, obj.wte(x[:, :s]), cfg)[1], x[:, :s], obj.gpt.lm_head.weight, 8)
    torch.testing.assert_close(m["mc/gist_bow"], ref.detach())
    torch.testing.assert_close(loss - loss0, 0.5 * ref, rtol=1e-5, atol=1e-5)
    assert "mc/gist_bow" not in m0


def test_question_end_and_readers_over_the_question():
    """LensNet's needle examples cover history + question (the question in the raw tail), as at inference."""
    from megacontext.gistnet import GistLevels
    from megacontext.training.needle import question_end
    cfg = MCConfig(block_size=8, max_level=2, budget=64, tail_tokens=8)
    s = 32
    y = torch.full((50,), -1)
    assert question_end(y, s, cfg) == s  # no answer: nothing after the history
    y[s + 4] = 7  # the question is x[s:s+5], the answer starts at s+5
    assert question_end(y, s, cfg) == s + 5
    y2 = torch.full((80,), -1)
    y2[s + 30] = 7  # a "question" of 31 tokens would push gists past the history: keep s
    assert question_end(y2, s, cfg) == s
    ids = torch.arange(40)
    rd = GistLevels(ids[:s], [None, torch.zeros(4, 6)])
    longer = rd.with_tokens(ids)
    assert longer.num_tokens == 40 and longer.count(1) == 4
    with pytest.raises(ValueError, match="extend"):
        rd.with_tokens(ids.flip(0))
