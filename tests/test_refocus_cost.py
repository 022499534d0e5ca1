"""What keeps decoding cheap: the incremental K/V cache stays exact over any sequence of appends and refocuses, the
reranker is skipped only where it cannot change a pass, forced collapses land next to the present, and the
recent-token reader returns exactly the tree's ids."""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import megacontext.focus as focus
from megacontext.allocator import (CooldownState, Edit, apply_edits, collapse_groups, permutation_invariant,
                                   plan_edits, refocus)
from megacontext.config import MCConfig
from megacontext.focus import carry_scores, shortlist
from megacontext.gistnet import GistNet
from megacontext.kvcache import full_logits
from megacontext.reranker import Reranker
from megacontext.runtime import MCSession, RecentTokens
from megacontext.tree import MCTree
from megacontext.working_context import (BudgetError, WCError, WorkingContext, all_raw, append_tokens, check_invariants,
                                         recency_pyramid, wc_cost)
from nanochat.gpt import GPT, config_from_depth
from test_runtime import tiny_nets

V = 64


def tiny_session(seed=0, memory_dir=None, **kw):
    base = dict(block_size=4, max_level=3, budget=48, tail_tokens=8, lens_dim=32, lens_heads=4, tau=0.1,
                rerank_k=4, rerank_dim=32, rerank_layers=1)
    base.update(kw)
    cfg = MCConfig(**base)
    gpt, gistnet, lensnet = tiny_nets(cfg, V, seed)
    reranker = Reranker(gpt.config.n_embd, cfg)
    return MCSession(gpt, gistnet, lensnet, None, cfg, memory_dir=memory_dir, device="cpu", reranker=reranker.eval())


def assert_exact(s):
    """Sync the session's cache; every slot's logits equal a from-scratch forward of the same WC (1e-4)."""
    out = s.kv.sync(s.wc, s.reader, all_logits=True)
    ref = full_logits(s.gpt, s.wc, s.tree, s.cfg)
    assert ref.size(0) == len(s.kv) and out.size(0) >= 1
    err = (out - ref[-out.size(0):]).abs().max().item()
    assert err <= 1e-4, f"incremental logits differ from a full recompute by {err}"
    assert torch.equal(s.kv.last_logits, out[-1])


# -----------------------------------------------------------------------------
# exactness over random sequences of appends, decodes and refocuses

@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2 ** 16), scheme=st.sampled_from(["slot", "gaussian"]),
       ops=st.lists(st.tuples(st.sampled_from(["decode", "chunk", "long", "refocus", "pin", "nll"]),
                              st.integers(1, 40)), min_size=3, max_size=10))
def test_incremental_cache_equals_a_full_forward_after_any_sequence(seed, scheme, ops):
    s = tiny_session(seed % 4, positions=scheme)
    s.kv.check_exact = True  # every sync inside the session is checked too (the last slot, 1e-4)
    rng = np.random.default_rng(seed)
    s.ingest(rng.integers(0, V, 3 * s.cfg.budget))
    for op, n in ops:
        if op == "decode":  # the session's own loop: append, refocus every K tokens or over budget
            list(s.generate_ids(n, temperature=1.0, seed=int(rng.integers(1000)), stop=False))
        elif op == "chunk":  # a message within budget: a block at a time, then a question focus
            s.ingest(rng.integers(0, V, n))
        elif op == "long":  # far past the present: one batched append, a new focus
            s.ingest(rng.integers(0, V, s.cfg.budget + 8 * n))
        elif op == "refocus":
            s.refocus()
        elif op == "pin":  # no pins: the allocator folds anything (the bench's setting)
            s.kept = []
        else:
            s.nll(rng.integers(0, V, 1 + n % 8).tolist())
        check_invariants(s.wc, s.cfg, s.cfg.budget)
        assert_exact(s)
    assert s.kv.syncs > 0


def test_decode_steps_forward_one_slot_and_refocuses_only_the_end_of_the_window(tmp_path):
    """With a full WC and nothing pinned (the bench), each decode step forwards exactly one slot, and the sync after
    a refocus recomputes the slots from the fold next to the raw tail, not the window."""
    s = tiny_session(1, memory_dir=str(tmp_path / "mem"), tau=0.999)
    s.ingest(np.random.default_rng(0).integers(0, V, 40 * s.cfg.budget))
    s.wc, s.kept, s.cooldown = recency_pyramid(s.num_tokens, s.cfg.budget, s.cfg), [], CooldownState()
    list(s.generate_ids(2, stop=False))
    slots, refocus_slots = [], []
    for _ in range(120):
        before = s.refocus_count
        list(s.generate_ids(1, stop=False))
        n = s.kv.sync(s.wc, s.reader)
        (refocus_slots if s.refocus_count != before else slots).append(n)
        assert_exact(s)
    assert len(refocus_slots) >= 10 and set(slots) == {1}  # a decode step: the new token's slot alone
    T = len(s.kv)
    # the tail (8 tokens + the partial block) plus the fold: far from the window's ~48 slots
    assert np.mean(refocus_slots) < 0.4 * T, (refocus_slots, T)
    assert s.focus_counts["lens"] == s.refocus_count - 1  # one LensNet forward a refocus (the focus at ingest: none)


# -----------------------------------------------------------------------------
# the reranker's skip is exact

def test_skipping_the_reranker_never_changes_what_the_reply_reads(monkeypatch):
    """Two identical sessions decode; one runs the reranker at every pass. They must read the same WCs and write
    the same tokens, and the skip must actually happen (and not always)."""
    def run(always):
        if always:
            monkeypatch.setattr(focus, "permutation_invariant", lambda *a, **k: False)
        else:
            monkeypatch.undo()
        out = []
        for seed in range(3):
            s = tiny_session(seed)
            rng = np.random.default_rng(seed)
            s.ingest(rng.integers(0, V, 12 * s.cfg.budget))
            ids = list(s.generate_ids(30, temperature=1.0, seed=seed, stop=False))
            s.ingest(rng.integers(0, V, 10))
            ids += list(s.generate_ids(30, temperature=1.0, seed=seed, stop=False))
            out.append((ids, s.wc.entries(), s.edit_count, dict(s.focus_counts)))
        return out
    fast, slow = run(False), run(True)
    assert [o[:3] for o in fast] == [o[:3] for o in slow]
    skipped = sum(o[3].get("rerank_skipped", 0) for o in fast)
    ran = sum(o[3].get("rerank", 0) for o in fast)
    assert skipped > 0 and ran > 0, (skipped, ran)
    assert sum(o[2] for o in fast) > 0  # the allocator did edit


def permutation_case(rng):
    """One random allocator pass: a WC after a few passes and appends (maybe over budget), scores, pins, a mask, a
    cooldown, members (LensNet's shortlist, what the reranker reorders; or entries of collapse groups, the forced
    folds' candidates; or any). Where permutation_invariant says so, every permutation of the members' scores must
    give the same edits (24 random ones and the two extremes). Returns whether it said so (None: no case)."""
    K = int(rng.choice([2, 4]))
    cfg = MCConfig(block_size=K, tail_tokens=2 * K, max_level=3, budget=8 * K + int(rng.integers(0, 40)),
                   tau=float(rng.choice([0.0, 0.1, 0.5])), cooldown=1, max_edits=3)
    margin = [None, 0.0, 0.1, 0.5, 0.999][rng.integers(5)]
    try:
        wc = recency_pyramid(int(rng.integers(20, 3000)), cfg.budget, cfg)
        state = CooldownState()
        for _ in range(int(rng.integers(0, 3))):  # a few earlier passes: a non-trivial cooldown
            wc = append_tokens(wc, wc.num_tokens + int(rng.integers(0, K + 1)), cfg)
            _, wc, state = refocus(wc, rng.uniform(-1, 1, len(wc)), cfg.budget, state, cfg, late_margin=margin)
    except (BudgetError, WCError):
        return None
    wc = append_tokens(wc, wc.num_tokens + int(rng.integers(0, 3 * K)), cfg)  # maybe over budget: a forced pass
    scores = rng.uniform(-1, 1, len(wc)) * float(rng.choice([0.05, 0.3, 1.0]))
    raw = np.flatnonzero(wc.levels == 0)
    pins = [int(b) for b in rng.choice(wc.indices[raw], min(int(rng.integers(0, 3)), len(raw)), replace=False)]
    expandable = rng.random(len(wc)) < 0.5 if rng.random() < 0.5 else None
    k, pick = int(rng.integers(2, 9)), rng.integers(3)
    g = collapse_groups(wc, cfg)
    grouped = np.concatenate([np.arange(p, p + n) for p, n in zip(g["pos"], g["n"])] + [np.zeros(0, np.int64)])
    pool = grouped if pick == 1 and len(grouped) else np.arange(len(wc))
    members = shortlist(scores, wc, k) if pick == 0 else rng.choice(pool, min(k, len(pool)), replace=False)
    args, kw = (cfg.budget, state, cfg), dict(pins=pins, expandable=expandable, late_margin=margin)
    try:
        base = plan_edits(wc, scores, *args, **kw)
    except (BudgetError, WCError):  # nothing left to fold at this budget
        return None
    if not permutation_invariant(wc, scores, members, *args, **kw):
        return False
    vals = scores[members]
    for perm in [rng.permutation(len(members)) for _ in range(24)] + [np.argsort(vals), np.argsort(-vals)]:
        other = scores.copy()
        other[members] = vals[perm]
        assert plan_edits(wc, other, *args, **kw) == base, (wc.entries(), scores, members, perm, kw)
    return True


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2 ** 63))
def test_permutation_invariant_is_sound(seed):
    """Where permutation_invariant says so, every permutation of the members' scores gives the same edits."""
    permutation_case(np.random.default_rng(seed))


def test_permutation_invariant_is_sound_over_fixed_cases():
    """The same over 1200 fixed cases (the rare ones, e.g. a band of equally good folds that a permutation moves,
    need many), and the test says yes often enough to mean something."""
    rng = np.random.default_rng(20261124)
    said = [permutation_case(rng) for _ in range(1200)]
    assert said.count(True) >= 150, said.count(True)


def test_permutation_invariant_sees_the_band_move():
    """A moved group that is the lowest now can rise under a permutation: the band of equally good folds then
    widens, and a newer group outside it now can become the fold; or one can fall, and the band narrows past the
    fold. Neither is invariant."""
    cfg = MCConfig(block_size=4, max_level=1, budget=40, tail_tokens=8, tau=0.5, cooldown=0)
    wc = append_tokens(WorkingContext(np.array([1, 0, 0, 0, 0, 0]), np.arange(6), 24), 25, cfg)
    budget = wc_cost(wc, 4) - 3  # one fold: of raw blocks 1, 2, 3
    scores = np.array([0.26, -0.99, -0.34, 0.24, 0.0, 0.0, 0.0])
    members = np.array([0, 1])  # the gist (in no group) and raw block 1, the lowest
    assert plan_edits(wc, scores, budget, None, cfg, late_margin=0.999) == [Edit("collapse", 1, 2)]
    swapped = scores.copy()
    swapped[[0, 1]] = scores[[1, 0]]
    assert plan_edits(wc, swapped, budget, None, cfg, late_margin=0.999) == [Edit("collapse", 1, 3)]
    assert not permutation_invariant(wc, scores, members, budget, None, cfg, late_margin=0.999)
    # and narrow: a moved group that can drop below the lowest pulls the band's edge under the fold
    scores = np.array([-0.9, 0.2, 0.4, 0.95, 0.0, 0.0, 0.0])
    assert plan_edits(wc, scores, budget, None, cfg, late_margin=0.5) == [Edit("collapse", 1, 2)]
    swapped = scores.copy()
    swapped[[0, 1]] = scores[[1, 0]]
    assert plan_edits(wc, swapped, budget, None, cfg, late_margin=0.5) == [Edit("collapse", 1, 1)]
    assert not permutation_invariant(wc, scores, members, budget, None, cfg, late_margin=0.5)


def test_permutation_invariant_holds_in_the_common_refocus():
    """The bench's steady state (a full WC, one block appended, no pins, tau near 1): the forced fold and the voluntary
    pass after it cannot depend on the shortlist's order, so the reranker is not run."""
    cfg = MCConfig(budget=512, tau=0.999)
    rng = np.random.default_rng(0)
    hits = 0
    for N in (1000, 20_000, 300_000):
        wc = recency_pyramid(N, 512, cfg)
        grown = append_tokens(wc, N + 32, cfg)
        for _ in range(10):
            scores = np.tanh(rng.normal(0, 1, len(grown)))
            short = shortlist(scores, grown, cfg.rerank_k)
            hits += permutation_invariant(grown, scores, short, 512, None, cfg, late_margin=cfg.tau)
            _, new, state = refocus(grown, scores, 512, None, cfg, late_margin=cfg.tau)
            kept = carry_scores(grown, scores, new, 32)
            hits += permutation_invariant(new, kept, shortlist(kept, new, 8), 512, state, cfg, late_margin=cfg.tau)
    assert hits >= 50, hits


# -----------------------------------------------------------------------------
# forced collapses next to the present, and carried scores

def test_forced_collapse_folds_the_newest_of_the_equally_good_groups():
    cfg = MCConfig(block_size=4, max_level=1, budget=40, tail_tokens=8, cooldown=0)
    wc = WorkingContext(np.array([0, 0, 0, 1, 0, 1, 1, 1, 1, 0]), np.arange(10), 40)  # raw blocks 0, 1, 2, 4
    grown = append_tokens(wc, 44, cfg)
    budget = wc_cost(grown, 4) - 3  # one fold short
    scores = np.zeros(len(grown))
    scores[0] = -0.05  # block 0: the lowest, but only just
    assert plan_edits(grown, scores, budget, None, cfg) == [Edit("collapse", 1, 0)]  # lowest, then oldest
    assert plan_edits(grown, scores, budget, None, cfg, late_margin=0.1) == [Edit("collapse", 1, 4)]  # the newest
    assert plan_edits(grown, scores, budget, None, cfg, late_margin=0.01) == [Edit("collapse", 1, 0)]
    scores[0] = -0.5  # clearly the least wanted: still folded first
    assert plan_edits(grown, scores, budget, None, cfg, late_margin=0.1) == [Edit("collapse", 1, 0)]
    # pins still fold last, whatever the margin
    assert plan_edits(grown, np.zeros(len(grown)), budget, None, cfg, pins=[4], late_margin=0.1) == [
        Edit("collapse", 1, 2)]
    # two folds: the two newest of the band
    assert plan_edits(grown, np.zeros(len(grown)), budget - 3, None, cfg, late_margin=0.1) == [
        Edit("collapse", 1, 4), Edit("collapse", 1, 2)]


def test_carry_scores_keeps_entries_and_averages_folds():
    cfg = MCConfig(block_size=4, max_level=2, budget=80, tail_tokens=8, cooldown=0)
    wc = WorkingContext(np.array([1, 1, 1, 1, 0, 0, 0]), np.array([0, 1, 2, 3, 4, 5, 6]), 28)
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    folded = apply_edits(wc, [Edit("collapse", 2, 0), Edit("collapse", 1, 4)], cfg)
    assert np.allclose(carry_scores(wc, scores, folded, 4), [0.25, 0.5, 0.6, 0.7])
    opened = apply_edits(folded, [Edit("expand", 2, 0)], cfg)  # children of a gist take its score
    assert np.allclose(carry_scores(folded, carry_scores(wc, scores, folded, 4), opened, 4),
                       [0.25] * 4 + [0.5, 0.6, 0.7])
    grown = append_tokens(wc, 30, cfg)  # a new block: the nearest older entry's score
    assert np.allclose(carry_scores(wc, scores, grown, 4), list(scores) + [0.7])


def test_near_kept_marks_what_covers_any_marks():
    """The vectorised mask equals the rule as written, entry by entry (focus.covers_any)."""
    rng = np.random.default_rng(5)
    for K, N in ((4, 3000), (32, 400_000), (2, 700)):
        cfg = MCConfig(block_size=K, max_level=4, budget=30 * K, tail_tokens=2 * K)
        wc = recency_pyramid(N, cfg.budget, cfg)
        for _ in range(5):
            kept = rng.integers(0, N // K, int(rng.integers(0, 4))).tolist() + [0]
            near = [n for b in kept for n in (b - 1, b, b + 1)]
            ref = [L >= 1 and focus.covers_any(L, i, near, K) for L, i in wc.entries()]
            assert focus.near_kept(wc, kept, K).tolist() == ref
    assert focus.near_kept(wc, [], K).tolist() == [False] * len(wc)


# -----------------------------------------------------------------------------
# the recent-token reader

def test_recent_tokens_reads_exactly_the_tree(tmp_path):
    cfg = MCConfig(block_size=4, max_level=2, budget=48, tail_tokens=8, lens_dim=32, lens_heads=4)
    gpt = GPT(config_from_depth(1, V, 128, aspect_ratio=32, head_dim=16))
    tree = MCTree.create(str(tmp_path / "tree"), cfg, GistNet(gpt.config.n_embd, cfg, gpt.config.n_head),
                         gpt.transformer.wte)
    r = RecentTokens(tree, keep=20)
    rng = np.random.default_rng(0)
    for step in range(60):
        ids = torch.as_tensor(rng.integers(0, V, int(rng.integers(1, 9))), dtype=torch.int64)
        tree.append(ids)
        if step % 7 != 3:  # sometimes the tree grows behind the reader's back
            r.appended(ids)
        n = tree.num_tokens
        for _ in range(5):
            a = int(rng.integers(0, n + 1))
            b = int(rng.integers(a, n + 1))
            assert torch.equal(r.tokens(a, b), tree.tokens(a, b))
        assert r.num_tokens == n and r.vocab_size == tree.vocab_size
        if n >= 4:
            assert torch.equal(r.gists(1, 0, n // 4), tree.gists(1, 0, n // 4))
    with pytest.raises(IndexError):
        r.tokens(0, tree.num_tokens + 1)
    tree.close()


def test_all_raw_history_decodes_like_the_plain_gpt():
    """Below the budget the WC is every token raw: decoding through the cache is the plain GPT, logit for logit."""
    s = tiny_session(2, tau=0.999)  # no voluntary folds: the WC stays all raw
    ids = np.random.default_rng(3).integers(0, V, 30).tolist()
    s.ingest(ids)
    assert s.wc == all_raw(30, s.cfg)
    out = list(s.generate_ids(10, stop=False))
    x = torch.tensor([ids + out[:-1]])
    with torch.no_grad():
        ref = s.gpt(x)[0, len(ids) - 1:].argmax(-1).tolist()
    assert ref == out
