"""Question focus (megacontext/focus.py) with a LensNet stand-in: it folds unwanted groups to open one more block,
goes on only towards a block's neighbours once it has opened one, and folds regions when no block group is left."""
import torch

from megacontext.config import MCConfig
from megacontext.eval.baselines import span_is_raw
from megacontext.focus import entry_covering, leads_next_to, question_focus, start_wc
from megacontext.working_context import check_invariants, entry_spans, wc_cost


class WantsBlocks:
    """A LensNet stand-in that wants the gists covering the given raw blocks (score 1) and nothing else (-0.5)."""

    def __init__(self, blocks, K):
        self.blocks, self.K = blocks, K

    def score(self, wcs, readers, wte):
        wc = wcs[0]
        starts, ends = entry_spans(wc, self.K)
        want = [(lv >= 1) and any(a <= b * self.K < e for b in self.blocks)
                for lv, a, e in zip(wc.levels, starts, ends)]
        return torch.tensor([[1.0 if w else -0.5 for w in want]]), None


def test_question_focus_collapses_an_unwanted_group_to_open_one_more_block():
    cfg = MCConfig(block_size=8, max_level=2, budget=64, tail_tokens=8, lens_dim=32, lens_heads=2, lens_layers=1)
    K, n = cfg.block_size, 400
    start = start_wc(n, cfg.budget, cfg)
    l1 = [int(i) for lv, i in zip(start.levels, start.indices) if lv == 1]
    wanted = l1[:3]  # a needle over three blocks in a row; the start leaves room for one
    assert wanted == [wanted[0], wanted[0] + 1, wanted[0] + 2]
    assert (cfg.budget - wc_cost(start, K)) // (K - 1) == 1
    net = WantsBlocks(wanted, K)
    without = question_focus(n, cfg.budget, cfg, net, None, None, collapses=0)
    assert sum(span_is_raw(without, (b * K, b * K + K), K) for b in wanted) == 1
    wc = question_focus(n, cfg.budget, cfg, net, None, None)
    check_invariants(wc, cfg, cfg.budget)
    assert all(span_is_raw(wc, (b * K, b * K + K), K) for b in wanted)
    assert wc_cost(wc, K) == wc_cost(without, K)  # the same budget, spent on the wanted blocks


def test_leads_next_to_covers_a_block_s_neighbours_at_every_level():
    K = 4
    for blocks in ([0], [5], [7, 8], [15, 16, 40]):
        near = {n for b in blocks for n in (b - 1, b + 1) if n >= 0}
        for level in (1, 2, 3):
            for index in range(12):  # brute force: a gist covers blocks [index * K^(L-1), (index + 1) * K^(L-1))
                span = range(index * K ** (level - 1), (index + 1) * K ** (level - 1))
                assert leads_next_to(level, index, blocks, K) == any(n in span for n in near), (blocks, level, index)


def test_question_focus_goes_on_only_towards_the_neighbours_of_a_block_it_opened(monkeypatch):
    """A needle across a region edge: focus opens its first block, then the neighbouring region and block.
    A wanted block elsewhere stops focus, with room left, instead of letting a second needle in."""
    cfg = MCConfig(block_size=4, max_level=2, budget=40, tail_tokens=4, lens_dim=32, lens_heads=2, lens_layers=1)
    K, n = cfg.block_size, 200
    start = start_wc(n, cfg.budget, cfg)
    regions = [int(i) for lv, i in zip(start.levels, start.indices) if lv == 2]
    r = regions[1]
    edge = [r * K - 1, r * K]  # the last block of region r - 1 and the first of region r
    assert all(start.levels[entry_covering(start, b * K, K)] == 2 for b in edge)
    wc = question_focus(n, cfg.budget, cfg, WantsBlocks(edge, K), None, None)
    check_invariants(wc, cfg, cfg.budget)
    assert all(span_is_raw(wc, (b * K, b * K + K), K) for b in edge)
    far = edge[:1] + [regions[-1] * K + 1]  # the same first block, and one in another region
    import megacontext.focus as R
    events = []  # expansions and folds, in order
    for name in ("expand", "apply_edits"):
        monkeypatch.setattr(R, name, lambda *a, _f=getattr(R, name), _n=name, **k: events.append(_n) or _f(*a, **k))
    trace = []
    wc = question_focus(n, cfg.budget, cfg, WantsBlocks(far, K), None, None, trace=trace)
    assert events[-1] == "expand"  # the far pick stopped focus before it folded a group to make room for it
    check_invariants(wc, cfg, cfg.budget)
    assert span_is_raw(wc, (far[0] * K, far[0] * K + K), K) and not span_is_raw(wc, (far[1] * K, far[1] * K + K), K)
    assert trace == [(2, far[0] // K), (1, far[0])]  # its region, its block, and nothing after
    assert wc == question_focus(n, cfg.budget, cfg, WantsBlocks(far[:1], K), None, None)  # no fold made for it either
    alone = question_focus(n, cfg.budget, cfg, WantsBlocks(far[1:], K), None, None)
    assert span_is_raw(alone, (far[1] * K, far[1] * K + K), K)  # within reach: the rule kept it closed, not the budget


def test_question_focus_folds_level_2_regions_into_level_3_when_no_level_1_group_is_left():
    """Past K regions the start is all level-2 gists: the wanted block's region opens, and the block needs
    one more expansion than the budget leaves, so K older regions fold into their level-3 parent."""
    cfg = MCConfig(block_size=4, max_level=3, budget=28, tail_tokens=4, lens_dim=32, lens_heads=2, lens_layers=1)
    K, n, blk = cfg.block_size, 254, 21  # block 21 lies in region 5, outside the first level-3 node (regions 0-3)
    start = start_wc(n, cfg.budget, cfg)
    assert start.levels[entry_covering(start, blk * K, K)] == 2 and (start.levels == 3).sum() == 0
    assert wc_cost(start, K) + 2 * (K - 1) > cfg.budget  # region + block do not fit as they are
    wc = question_focus(n, cfg.budget, cfg, WantsBlocks([blk], K), None, None)
    check_invariants(wc, cfg, cfg.budget)
    assert span_is_raw(wc, (blk * K, blk * K + K), K)
    assert (wc.levels == 3).sum() == 1  # K regions that LensNet does not want, folded into one gist
