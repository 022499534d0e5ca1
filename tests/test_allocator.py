"""Focus allocator: legality, budget, cooldown, forced collapses, chaining, bad input (with hypothesis)."""
import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from megacontext.allocator import (CooldownState, Edit, apply_edits, collapse_groups, plan_edits, refocus)
from megacontext.config import MCConfig
from megacontext.working_context import (BudgetError, WCError, WorkingContext, append_tokens, check_invariants,
                                         entry_spans, recency_pyramid, tail_start, wc_cost)


def cfg_k4(**kw):
    base = dict(block_size=4, max_level=3, tail_tokens=8, budget=64)
    base.update(kw)
    return MCConfig(**base)


def tail_entries(wc, cfg):
    """The entries covering the protected raw tail, as a list (they must never change but by growth)."""
    _, ends = entry_spans(wc, cfg.block_size)
    return [e for e, end in zip(wc.entries(), ends) if end > tail_start(wc.num_tokens, cfg)]


# -----------------------------------------------------------------------------
# long random sequences of refocus passes and appends

@settings(max_examples=60, deadline=None)
@given(K=st.sampled_from([2, 4, 32]), tail_blocks=st.integers(0, 3), max_level=st.integers(1, 3),
       N0=st.integers(1, 5000), extra=st.integers(0, 300), cooldown=st.integers(0, 3),
       max_edits=st.integers(1, 6), seed=st.integers(0, 2 ** 31), steps=st.integers(1, 25))
def test_random_passes_and_appends_keep_invariants(K, tail_blocks, max_level, N0, extra, cooldown, max_edits,
                                                   seed, steps):
    budget = tail_blocks * K + K + extra
    cfg = MCConfig(block_size=K, tail_tokens=tail_blocks * K, max_level=max_level, budget=budget,
                   cooldown=cooldown, max_edits=max_edits)
    rng = np.random.default_rng(seed)
    try:
        wc = recency_pyramid(N0, budget, cfg)
    except BudgetError:
        assume(False)  # no legal WC at this budget: draw another example
    state = CooldownState()
    log = []  # (pass, edit) of voluntary passes, for the cooldown check
    for step in range(steps):
        if rng.random() < 0.3:  # append a chunk of tokens
            grown = append_tokens(wc, wc.num_tokens + int(rng.integers(0, 3 * K + 1)), cfg)
            check_invariants(grown, cfg)
            wc = grown
        scores = rng.uniform(-1, 1, len(wc)) * rng.choice([0.1, 1.0])
        over = wc_cost(wc, K) > budget
        tail_before = tail_entries(wc, cfg)
        try:
            edits, new, new_state = refocus(wc, scores, budget, state, cfg)
        except BudgetError:  # the history outgrew what any WC at this budget/max_level can hold
            return
        check_invariants(new, cfg, budget)  # contiguity, alignment, coverage from 0, raw tail, cost
        assert tail_entries(new, cfg) == tail_before  # the protected tail is untouched
        replay = wc
        for e in edits:  # every edit is legal, one at a time, in order
            replay = apply_edits(replay, [e], cfg)
        assert replay == new
        if not over:
            assert len(edits) <= max_edits
            for e in edits:  # no reversal of an edit made in the last `cooldown` passes
                undo = "collapse" if e.op == "expand" else "expand"
                assert not any(p >= step - cooldown and (o.op, o.level, o.index) == (undo, e.level, e.index)
                               for p, o in log), (e, log)
                # voluntary edits follow the scores' sign
            log += [(step, e) for e in edits]
        wc, state = new, new_state


@settings(max_examples=60, deadline=None)
@given(N=st.integers(40, 5000), seed=st.integers(0, 2 ** 31))
def test_expand_then_collapse_restores_entries(N, seed):
    cfg = cfg_k4(budget=100)
    wc = recency_pyramid(N, 100, cfg)
    rng = np.random.default_rng(seed)
    gists = np.flatnonzero(wc.levels >= 1)
    if len(gists):
        j = int(rng.choice(gists))
        e = (int(wc.levels[j]), int(wc.indices[j]))
        assert apply_edits(apply_edits(wc, [Edit("expand", *e)], cfg), [Edit("collapse", *e)], cfg) == wc
    g = collapse_groups(wc, cfg)
    if len(g["pos"]):
        k = int(rng.integers(len(g["pos"])))
        e = (int(g["level"][k]), int(g["index"][k]))
        assert apply_edits(apply_edits(wc, [Edit("collapse", *e)], cfg), [Edit("expand", *e)], cfg) == wc


# -----------------------------------------------------------------------------
# deterministic behaviour

def test_scores_inside_tau_do_nothing_and_signs_drive_edits():
    cfg = MCConfig()
    wc = recency_pyramid(100_000, 512, cfg)
    assert plan_edits(wc, np.full(len(wc), 0.19), 512, None, cfg) == []
    # a strong positive score on one old gist expands it (after freeing budget by a collapse)
    scores = np.zeros(len(wc))
    j = 3
    scores[j] = 0.9
    edits = plan_edits(wc, scores, 10_000, None, cfg)
    assert edits == [Edit("expand", int(wc.levels[j]), int(wc.indices[j]))]
    # a group with mean < -tau collapses; at most max_edits per pass, strongest first
    scores = np.where(wc.levels == 1, -0.9, 0.0)
    edits = plan_edits(wc, scores, 512, None, cfg)
    assert 1 <= len(edits) <= cfg.max_edits and all(e.op == "collapse" for e in edits)


def test_expand_respects_budget():
    cfg = MCConfig()
    wc = recency_pyramid(100_000, 512, cfg)
    cost = wc_cost(wc, 32)
    scores = np.where(wc.levels >= 1, 0.9, 0.0)
    assert plan_edits(wc, scores, cost + 30, None, cfg) == []
    assert len(plan_edits(wc, scores, cost + 31, None, cfg)) == 1
    assert len(plan_edits(wc, scores, cost + 31 * 9, None, cfg)) == cfg.max_edits


def test_chained_passes_take_a_level2_gist_to_raw_tokens():
    cfg = MCConfig(max_level=2)
    wc = recency_pyramid(40_000, 512, cfg)
    target = 5000  # the token the "question" is about, deep inside an old level-2 gist
    starts, ends = entry_spans(wc, 32)
    assert wc.levels[(starts <= target) & (target < ends)][0] == 2
    state = None
    for _ in range(2):  # rescore between passes: +1 on the entry holding the target, -1 on stale raw blocks
        starts, ends = entry_spans(wc, 32)
        holds = (starts <= target) & (target < ends)
        scores = np.where(holds, 1.0, np.where((wc.levels == 0) & (ends <= tail_start(wc.num_tokens, cfg)), -1.0, 0.0))
        edits, wc, state = refocus(wc, scores, 512, state, cfg)
        check_invariants(wc, cfg, 512)
    starts, ends = entry_spans(wc, 32)
    assert wc.levels[(starts <= target) & (target < ends)][0] == 0  # L2 -> L1 -> raw


def test_cooldown_blocks_reversal_for_cooldown_passes():
    cfg = MCConfig(cooldown=2)
    wc = recency_pyramid(100_000, 512, cfg)
    budget = wc_cost(wc, 32) + 31
    j = int(np.flatnonzero(wc.levels == 2)[0])
    node = (2, int(wc.indices[j]))
    scores = np.zeros(len(wc))
    scores[j] = 1.0
    edits, wc, state = refocus(wc, scores, budget, None, cfg)
    assert edits == [Edit("expand", *node)]
    history = []
    for _ in range(4):  # now its children score very low: the collapse waits for two passes
        starts, _ = entry_spans(wc, 32)
        kids = (wc.levels == 1) & (wc.indices // 32 == node[1])
        edits, wc, state = refocus(wc, np.where(kids, -1.0, 0.0), budget, state, cfg)
        history.append(Edit("collapse", *node) in edits)
    assert history == [False, False, True, False]


def test_forced_collapse_folds_a_pinned_block_after_groups_in_cooldown():
    """A pinned block (the runtime's kept blocks) outranks the cooldown: when the budget needs a fold, a block
    opened in the last pass folds before the one focus opened for the question."""
    cfg = MCConfig(block_size=4, max_level=1, budget=40, tail_tokens=8, cooldown=2)
    levels = np.array([1, 1, 0, 1, 1, 0, 1, 1, 1, 0])  # blocks 2 and 5 raw; block 9 is the raw tail
    wc = WorkingContext(levels, np.arange(10), 40)
    grown = append_tokens(wc, 44, cfg)  # a new raw block: the tail now covers blocks 9-10
    budget = wc_cost(grown, 4) - 3  # one fold (K - 1 slots) short
    state = CooldownState(1, (("expand", 1, 5, 0),))  # block 5 was opened in the last pass
    g = collapse_groups(grown, cfg, np.zeros(len(grown)))
    assert sorted(int(i) for i in g["index"]) == [2, 5]  # the only legal folds: the two raw blocks
    liked = np.where((grown.levels == 0) & (grown.indices == 2), 0.5, 0.0)
    assert plan_edits(grown, liked, budget, state, cfg) == [Edit("collapse", 1, 2)]  # the cooldown protects 5
    assert plan_edits(grown, liked, budget, state, cfg, pins=[2]) == [Edit("collapse", 1, 5)]  # pinned: 2 stays


def test_pins_fold_last_the_least_wanted_first_and_never_voluntarily():
    """Forced folds take every unpinned group first, then the pins from the last one (least wanted) back;
    a pinned block is never a voluntary collapse, whatever its score."""
    cfg = MCConfig(block_size=4, max_level=1, budget=40, tail_tokens=8, cooldown=0)
    levels = np.array([0, 0, 0, 1, 0, 1, 1, 1, 1, 0])  # blocks 0, 1, 2, 4 raw; block 9 is the raw tail
    wc = WorkingContext(levels, np.arange(10), 40)
    grown = append_tokens(wc, 44, cfg)
    scores = np.zeros(len(grown))
    for need, folded in ((1, [4]), (2, [4, 1]), (3, [4, 1, 0]), (4, [4, 1, 0, 2])):
        budget = wc_cost(grown, 4) - 3 * need
        edits = plan_edits(grown, scores, budget, None, cfg, pins=[2, 0, 1])
        assert sorted(e.index for e in edits) == sorted(folded), need
    hated = np.where(grown.levels == 0, -0.9, 0.0)  # every raw block asks to fold
    edits = plan_edits(grown, hated, 10 ** 6, None, cfg, pins=[2, 0, 1])
    assert {e.index for e in edits if e.op == "collapse"} == {4}


def test_expandable_mask_limits_voluntary_expansions():
    cfg = MCConfig(block_size=4, max_level=1, budget=400, tail_tokens=8, max_edits=8)
    wc = WorkingContext(np.array([1, 1, 1, 1, 0, 0]), np.arange(6), 24)
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.0, 0.0])
    assert {e.index for e in plan_edits(wc, scores, 400, None, cfg)} == {0, 1, 2, 3}
    mask = np.array([False, True, False, True, False, False])
    assert {e.index for e in plan_edits(wc, scores, 400, None, cfg, expandable=mask)} == {1, 3}
    with pytest.raises(ValueError, match="expandable"):
        plan_edits(wc, scores, 400, None, cfg, expandable=mask[:3])


def test_forced_collapse_after_append_lowest_then_oldest():
    cfg = MCConfig()
    wc = recency_pyramid(5000, 512, cfg)
    grown = append_tokens(wc, 5000 + 64, cfg)  # two more raw blocks: over budget
    assert wc_cost(grown, 32) > 512
    scores = np.zeros(len(grown))
    g = collapse_groups(grown, cfg, scores)
    # make one legal group clearly the lowest scored
    k = len(g["pos"]) // 2
    p = int(g["pos"][k])
    scores[p:p + int(g["n"][k])] = -0.5
    edits, new, _ = refocus(grown, scores, 512, None, cfg)
    need = -(-(wc_cost(grown, 32) - 512) // 31)
    assert len(edits) == need and all(e.op == "collapse" for e in edits)
    assert edits[0] == Edit("collapse", int(g["level"][k]), int(g["index"][k]))
    # the rest (ties at score 0) are the oldest legal groups
    rest = sorted(range(len(g["pos"])), key=lambda i: g["start"][i])
    rest = [Edit("collapse", int(g["level"][i]), int(g["index"][i])) for i in rest if i != k][:need - 1]
    assert edits[1:] == rest
    assert wc_cost(new, 32) <= 512


def test_forced_collapse_far_over_budget_chains_levels():
    cfg = cfg_k4(max_level=3, budget=40)
    wc = recency_pyramid(30, 40, cfg)
    big = append_tokens(wc, 400, cfg)  # cost ~ 400 at budget 40: needs collapses of collapses
    edits, new, _ = refocus(big, np.zeros(len(big)), 40, None, cfg)
    check_invariants(new, cfg, 40)
    assert max(e.level for e in edits) >= 2


# -----------------------------------------------------------------------------
# bad input

def test_illegal_edits_raise_clear_errors():
    cfg = cfg_k4()
    wc = WorkingContext([3, 2, 0, 0, 0], [0, 4, 20, 21, 22], 90)  # tail starts at 80
    check_invariants(wc, cfg, 64)
    bad = {
        Edit("expand", 0, 20): "raw blocks cannot be expanded",
        Edit("expand", 2, 5): "not an entry",
        Edit("expand", 1, 16): "not an entry",
        Edit("collapse", 3, 0): "not the 4 level-2 children",
        Edit("collapse", 1, 20): "protected raw tail",
        Edit("collapse", 4, 0): r"level must be in \[1, 3\]",
        Edit("shrink", 1, 0): "op must be",
    }
    for e, msg in bad.items():
        with pytest.raises(WCError, match=msg):
            apply_edits(wc, [e], cfg)
    # legal ones go through, and apply_edits can enforce the budget
    out = apply_edits(wc, [Edit("expand", 2, 4)], cfg)
    with pytest.raises(WCError, match="budget"):
        apply_edits(out, [Edit("expand", 1, 16)], cfg, budget=16)


def test_bad_budget_and_score_length_raise():
    cfg = MCConfig(tail_tokens=128)
    wc = recency_pyramid(5000, 512, cfg)
    with pytest.raises(BudgetError, match="smaller than the protected raw tail"):
        refocus(wc, np.zeros(len(wc)), 100, None, cfg)
    with pytest.raises(ValueError, match=f"has {len(wc)} entries"):
        refocus(wc, np.zeros(len(wc) + 1), 512, None, cfg)
    with pytest.raises(ValueError, match="finite"):
        refocus(wc, np.full(len(wc), np.nan), 512, None, cfg)
