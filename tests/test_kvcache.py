"""WCKVCache: incremental K/V with temporal invalidation equals a full recompute of the same working context."""
import numpy as np
import pytest
import torch

from megacontext.allocator import Edit, apply_edits, collapse_groups, refocus
from megacontext.config import MCConfig
from megacontext.gistnet import GistNet
from megacontext.kvcache import WCKVCache, first_difference, full_logits, slot_keys
from megacontext.tree import MCTree
from megacontext.working_context import append_tokens, check_invariants, recency_pyramid, slot_spans, wc_cost
from nanochat.gpt import GPT, config_from_depth

V = 64


def tiny_cfg(**kw):
    base = dict(block_size=4, max_level=3, budget=60, tail_tokens=8, lens_dim=32, lens_heads=4)
    base.update(kw)
    return MCConfig(**base)


def tiny_gpt(seed=0, depth=2):
    """A GPT with non-trivial weights: nanochat zero-inits c_proj, which would make attention a no-op."""
    torch.manual_seed(seed)
    gpt = GPT(config_from_depth(depth, V, 128, aspect_ratio=16, head_dim=16))
    gpt.init_weights()
    with torch.no_grad():
        for name, p in gpt.named_parameters():
            if name.endswith("c_proj.weight"):
                p.uniform_(-0.3, 0.3)
        gpt.smear.uniform_(-0.5, 0.5)  # the smear starts at 0: a non-zero gate tests its cache path
    return gpt.eval()


def tiny_gistnet(gpt, cfg, seed=1):
    torch.manual_seed(seed)
    net = GistNet(gpt.config.n_embd, cfg, gpt.config.n_head)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("c_proj.weight") or name.startswith("head"):
                p.uniform_(-0.3, 0.3)
    return net.eval()


def check_exact(kv, wc, tree, cfg):
    """Sync, compare every recomputed slot's logits with a from-scratch forward; returns slots recomputed."""
    out = kv.sync(wc, tree, all_logits=True)
    ref = full_logits(kv.gpt, wc, tree, cfg)
    n = out.size(0)
    assert ref.size(0) == len(kv)
    err = (out - ref[-n:]).abs().max().item()
    assert err <= 1e-4, f"incremental logits differ from a full recompute by {err}"
    assert torch.equal(kv.last_logits, out[-1])
    return n


def random_edit(wc, cfg, rng):
    """A random legal expand or collapse that keeps the budget, with the entry position it starts at."""
    K = cfg.block_size
    options = []
    if wc_cost(wc, K) + K - 1 <= cfg.budget:
        for j in np.flatnonzero(wc.levels >= 1):
            options.append((int(j), Edit("expand", int(wc.levels[j]), int(wc.indices[j]))))
    g = collapse_groups(wc, cfg)
    for j in range(len(g["pos"])):
        options.append((int(g["pos"][j]), Edit("collapse", int(g["level"][j]), int(g["index"][j]))))
    if not options:
        return None, None
    return options[rng.integers(len(options))]


@pytest.mark.parametrize("scheme", ["slot", "gaussian"])
def test_incremental_equals_full_recompute_over_random_ops(scheme):
    cfg = tiny_cfg(positions=scheme)
    gpt = tiny_gpt()
    tree = MCTree.ram(cfg, tiny_gistnet(gpt, cfg), gpt)
    rng = np.random.default_rng(0)
    tree.append(rng.integers(0, V, 150))
    wc = recency_pyramid(150, cfg.budget, cfg)
    kv = WCKVCache(gpt, cfg, capacity=8)  # small on purpose: the cache must grow
    assert check_exact(kv, wc, tree, cfg) == len(kv)  # first sync: a full prefill
    seen = set()
    for _ in range(70):
        op = ["decode", "ingest", "edit"][rng.integers(3)]
        if op == "decode":  # one greedy token: exactly one slot is computed
            t = int(torch.argmax(kv.last_logits))
            tree.append([t])
            wc = append_tokens(wc, tree.num_tokens, cfg)
            if wc_cost(wc, cfg.block_size) > cfg.budget:
                continue  # the runtime refocuses first; the next op re-syncs
            assert check_exact(kv, wc, tree, cfg) == 1
        elif op == "ingest":  # a few tokens, then an allocator pass with random scores (forced + voluntary edits)
            old = slot_keys(wc, cfg.block_size, cfg.max_level)
            tree.append(rng.integers(0, V, int(rng.integers(1, 12))))
            wc = append_tokens(wc, tree.num_tokens, cfg)
            _, wc, _ = refocus(wc, rng.uniform(-1, 1, len(wc)), cfg.budget, None, cfg)
            new = slot_keys(wc, cfg.block_size, cfg.max_level)
            assert check_exact(kv, wc, tree, cfg) == max(1, len(new) - first_difference(old, new))
        else:  # one random legal edit: recompute from the edited entry's first slot on, no earlier
            j, e = random_edit(wc, cfg, rng)
            if e is None:
                continue
            first_slot = int(slot_spans(wc, cfg.block_size)[j, 0])
            wc = apply_edits(wc, [e], cfg, cfg.budget)
            T = int(slot_spans(wc, cfg.block_size)[-1, 1])
            assert check_exact(kv, wc, tree, cfg) == T - first_slot
            seen.add(e.op)
        check_invariants(wc, cfg, cfg.budget)
        seen.add(op)
    assert seen >= {"decode", "ingest", "expand", "collapse"}
    assert kv.syncs > 40 and tree.num_tokens > 150


def test_unchanged_wc_costs_nothing_and_stale_kv_is_caught():
    """Temporal invalidation matters: K/V kept past an edit would give logits far from the truth."""
    cfg = tiny_cfg()
    gpt = tiny_gpt(seed=3)
    tree = MCTree.ram(cfg, tiny_gistnet(gpt, cfg), gpt)
    tree.append(np.random.default_rng(1).integers(0, V, 200))
    wc = recency_pyramid(200, cfg.budget, cfg)
    kv = WCKVCache(gpt, cfg)
    check_exact(kv, wc, tree, cfg)
    before = kv.last_logits.clone()
    assert kv.sync(wc, tree) == 0 and torch.equal(kv.last_logits, before)
    j = int(np.flatnonzero(wc.levels >= 1)[0])  # expand the oldest gist: everything after it moves
    edited = apply_edits(wc, [Edit("expand", int(wc.levels[j]), int(wc.indices[j]))], cfg)
    new_keys = slot_keys(edited, cfg.block_size, cfg.max_level)
    kv.keys = new_keys[:len(kv)].copy()  # pretend the edit only appended slots: the kept K/V are now stale
    kv.sync(edited, tree)
    ref = full_logits(gpt, edited, tree, cfg)[-1]
    assert (kv.last_logits - ref).abs().max().item() > 1e-3
    kv.reset()
    assert kv.sync(edited, tree) == len(new_keys)
    assert (kv.last_logits - ref).abs().max().item() <= 1e-4


def test_score_continuation_restores_the_cache():
    cfg = tiny_cfg(positions="gaussian")
    gpt = tiny_gpt(seed=5)
    tree = MCTree.ram(cfg, tiny_gistnet(gpt, cfg), gpt)
    tree.append(np.random.default_rng(2).integers(0, V, 90))
    wc = recency_pyramid(90, cfg.budget, cfg)
    kv = WCKVCache(gpt, cfg)
    kv.sync(wc, tree)
    T, last = len(kv), kv.last_logits.clone()
    extra = [3, 9, 27, 17]
    cont = kv.score_continuation(wc, extra)
    assert kv.kv.pos == T and torch.equal(kv.last_logits, last)
    # the same tokens appended to the tree and the WC give the same logits (they are raw slots)
    tree.append(extra)
    wc2 = append_tokens(wc, tree.num_tokens, cfg)
    ref = full_logits(gpt, wc2, tree, cfg)[T:]
    assert (cont - ref).abs().max().item() <= 1e-4
    with pytest.raises(ValueError, match="empty working context"):
        WCKVCache(gpt, cfg).sync(recency_pyramid(0, cfg.budget, cfg), tree)
