"""The reranker (second stage of focus): it reorders only LensNet's level-1 shortlist, two-stage focus opens its
pick, needle_loss trains every one of its weights, and it learns to bind a question to the block that answers it."""
import numpy as np
import torch
import torch.nn as nn

from megacontext.eval.baselines import span_is_raw
from megacontext.config import MCConfig
from megacontext.gistnet import GistLevels, GistNet, build_gists
from megacontext.lensnet import LensNet
from megacontext.focus import entry_covering, focus_pick, question_focus, rerank_scores, shortlist, start_wc
from megacontext.reranker import PAD, Reranker, candidate_ids, margin, match_flags
from megacontext.training.needle import needle_loss
from megacontext.training.objective import MCObjective
from megacontext.working_context import check_invariants, wc_cost
from nanochat.gpt import GPT, GPTConfig

V, D = 64, 32
MARK = 5  # the token the marker reranker looks for


def cfg_(**kw):
    base = dict(block_size=8, max_level=2, budget=64, tail_tokens=8, gist_layers=1, lens_dim=32, lens_heads=2,
                lens_layers=1, train_hist_budget=32, train_min_target=8, train_plain_lm=0.0, rerank_dim=32,
                rerank_layers=1)
    return MCConfig(**{**base, **kw})


class MarkerReranker(nn.Module):
    """Scores a candidate by how many MARK tokens its block holds: a reranker whose right answer is known."""

    def __init__(self, cfg):
        super().__init__()
        self.K, self.m = cfg.block_size, margin(cfg)

    def forward(self, ids, wte):
        return (ids[:, -(self.K + self.m):-self.m] == MARK).float().sum(1)


def reader_over(ids, cfg, seed=0):
    torch.manual_seed(seed)
    wte = nn.Embedding(V, D)
    gistnet = GistNet(D, cfg, 2)
    with torch.no_grad():
        levels = build_gists(gistnet, wte(ids), cfg, max_level=cfg.max_level)
    return GistLevels(ids, levels), wte


def test_rerank_scores_reorders_only_the_level_1_shortlist():
    cfg = cfg_(rerank_k=3)
    K = cfg.block_size
    ids = torch.randint(6, V, (200,), generator=torch.Generator().manual_seed(0))
    reader, wte = reader_over(ids, cfg)
    wc = start_wc(200, cfg.budget, cfg)
    rng = np.random.default_rng(0)
    scores = rng.normal(size=len(wc))
    short = shortlist(scores, wc, 3)
    assert len(short) == 3 and all(wc.levels[j] == 1 for j in short)
    assert list(scores[short]) == sorted(scores[wc.levels == 1], reverse=True)[:3]
    pick = int(short[2])  # LensNet's third choice holds the marker
    a = int(wc.indices[pick]) * K
    ids2 = ids.clone()
    ids2[a + 3] = MARK
    reader2 = GistLevels(ids2, [None] + [reader.gists(L, 0, reader.count(L)) for L in range(1, reader.max_level + 1)])
    out = rerank_scores(scores, wc, reader2, MarkerReranker(cfg), wte, cfg)
    assert out[pick] == scores[short[0]]  # the reranker's pick takes LensNet's best shortlist score
    assert sorted(out[short]) == sorted(scores[short])  # the shortlist keeps its set of scores
    rest = np.setdiff1d(np.arange(len(wc)), short)
    assert np.array_equal(out[rest], scores[rest])  # every other entry is untouched
    assert np.array_equal(rerank_scores(scores, wc, reader2, None, wte, cfg), scores)  # no reranker: LensNet's
    assert np.array_equal(rerank_scores(scores, wc, reader2, MarkerReranker(cfg), wte,
                                        MCConfig(**{**cfg.to_dict(), "rerank_k": 0})), scores)


def test_two_stage_focus_opens_the_reranker_pick():
    cfg = cfg_(rerank_k=64)  # every level-1 gist is shortlisted: the reranker alone decides
    K, n = cfg.block_size, 200
    lensnet = LensNet(D, cfg)
    for blk in (2, 11, 20):
        ids = torch.randint(6, V, (n,), generator=torch.Generator().manual_seed(blk))
        ids[blk * K + 4] = MARK
        reader, wte = reader_over(ids, cfg)
        wc = question_focus(n, cfg.budget, cfg, lensnet, reader, wte, MarkerReranker(cfg))
        assert span_is_raw(wc, (blk * K, blk * K + K), K)
        one = question_focus(n, cfg.budget, cfg, lensnet, reader, wte)  # LensNet alone: its own choice, same budget
        assert one.num_tokens == wc.num_tokens and max(wc_cost(one, K), wc_cost(wc, K)) <= cfg.budget


def test_focus_looks_inside_level_2_regions_for_the_reranker():
    """A marked block inside a level-2 gist of focus's start is opened: the reranker reads the blocks of each
    region LensNet shortlists (expanded tentatively), focus opens the region, folds another group to make
    room (never the region it opened), and opens the block. A random LensNet alone picks regions blindly."""
    cfg = cfg_(rerank_k=64)  # every region, and every block in it, is read
    K, n = cfg.block_size, 2000
    start = start_wc(n, cfg.budget, cfg)
    found_alone = 0
    for seed in range(6):  # random LensNets: which group the fold picks varies with them
        torch.manual_seed(seed)
        lensnet = LensNet(D, cfg)
        for blk in (20, 100, 180):
            assert start.levels[entry_covering(start, blk * K, K)] == 2  # hidden in a region at the start
            ids = torch.randint(6, V, (n,), generator=torch.Generator().manual_seed(blk))
            ids[blk * K + 4] = MARK
            reader, wte = reader_over(ids, cfg)
            scores = lensnet.score([start], [reader], wte)[0][0].detach().numpy().astype(np.float64)
            best = int(np.argmax(np.where(start.levels >= 1, scores, -np.inf)))
            assert focus_pick(start, scores, reader, lensnet, None, wte, cfg) == best  # no reranker: LensNet's
            assert focus_pick(start, scores, reader, lensnet, MarkerReranker(cfg), wte, cfg) == \
                entry_covering(start, blk * K, K)
            wc = question_focus(n, cfg.budget, cfg, lensnet, reader, wte, MarkerReranker(cfg))
            check_invariants(wc, cfg, cfg.budget)
            assert span_is_raw(wc, (blk * K, blk * K + K), K)
            found_alone += span_is_raw(question_focus(n, cfg.budget, cfg, lensnet, reader, wte), (blk * K, blk * K + K), K)
    assert found_alone < 18


def test_needle_loss_trains_every_reranker_weight():
    cfg = cfg_(rerank_k=3)
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(sequence_len=256, vocab_size=V, n_layer=1, n_head=2, n_kv_head=2, n_embd=D))
    gpt.init_weights()
    obj = MCObjective(gpt, GistNet(D, cfg, 2), LensNet(D, cfg), cfg)
    reranker = Reranker(D, cfg)
    before = {k: v.clone() for k, v in reranker.state_dict().items()}
    opt = torch.optim.AdamW(reranker.parameters(), lr=1e-2, weight_decay=0.0)
    s, T = 160, 176
    x = torch.randint(6, V, (2, T), generator=torch.Generator().manual_seed(1))
    y = torch.full((2, T), -1)
    y[:, s + 4:T - 1] = x[:, s + 5:T]
    for step in range(2):  # c_proj starts at zero (identity blocks): the layers below it move from step 2
        loss, metrics = needle_loss(obj, x, y, s, [[3], [9, 10]], np.random.default_rng(step), reranker=reranker)
        assert "mc/lens_rerank_loss" in metrics and 0 <= metrics["mc/lens_rerank_hit"] <= 1
        opt.zero_grad()
        loss.backward()
        opt.step()
    changed = [k for k, v in reranker.state_dict().items() if not torch.equal(v, before[k])]
    assert sorted(changed) == sorted(before)
    _, metrics = needle_loss(obj, x, y, s, [[3], [9]], np.random.default_rng(0), reranker=None)
    assert "mc/lens_rerank_loss" not in metrics


def test_match_flags_mark_question_tokens_and_bigrams():
    ids = torch.tensor([[5, 6, 7, 6, 7, 9, 5, 8, PAD],
                        [5, 6, PAD, 6, 5, 6, PAD, 6, 9]])  # question (3 tokens) | rest
    assert match_flags(ids, 3).tolist() == [[0, 0, 0, 2, 2, 0, 1, 0, 0],   # (6, 7) is a question bigram
                                            [0, 0, 0, 1, 2, 2, 0, 1, 0]]   # PAD neither matches nor bridges


def test_reranker_learns_which_block_the_question_asks_for():
    """Multi-key in miniature: each candidate block holds a (colour, noun) pair. The question holds (asked colour,
    KEY); the answer's block holds the same pair, a decoy holds (asked colour, another noun), the others
    (another colour, KEY). Only the bigram through both tells them apart: a gist cannot, a unigram match
    cannot. With the exact-match flags it learns within 50 steps; without them it sat at 0.36 after 150 and
    needed ~400 (measured on this setup)."""
    cfg = cfg_(rerank_k=4, rerank_dim=64, rerank_layers=2)
    K, Q, C, KEY = cfg.block_size, 8, 4, 16
    torch.manual_seed(0)
    wte = nn.Embedding(V, D)
    net = Reranker(D, cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    m = margin(cfg)

    def example():
        colours = (torch.randperm(8, generator=gen)[:C] + 8).tolist()  # tokens 8..15
        nouns = [KEY, 17 + int(torch.randint(0, 4, (1,), generator=gen)), KEY, KEY]  # 1: the decoy's noun
        colours[1] = colours[0]  # the decoy shares the asked colour
        ids = torch.randint(21, V, (C, Q + K + 2 * m), generator=gen)
        for c in range(C):
            j = Q + m + int(torch.randint(0, K - 1, (1,), generator=gen))
            ids[c, j], ids[c, j + 1] = colours[c], nouns[c]
        q = int(torch.randint(0, Q - 1, (1,), generator=gen))
        ids[:, q], ids[:, q + 1] = colours[0], KEY  # the question names the asked key
        perm = torch.randperm(C, generator=gen)
        return ids[perm], int((perm == 0).nonzero())

    for _ in range(100):
        ids, t = zip(*[example() for _ in range(8)])
        logits = net(torch.cat(ids), wte).view(len(ids), C)  # 8 lists of C candidates in one forward
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor(t))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = np.mean([int(net(ids, wte).argmax()) == t for ids, t in (example() for _ in range(200))])
    assert acc >= 0.9, acc  # chance is 0.25; a unigram match alone gets 0.5 (the answer or the decoy)


def test_candidate_ids_are_question_then_block_with_margins():
    cfg = cfg_()
    K, m = cfg.block_size, margin(cfg)
    ids = torch.arange(200) % V
    reader, _ = reader_over(ids, cfg)
    wc = start_wc(200, cfg.budget, cfg)
    first, mid = [int(j) for j in np.flatnonzero(wc.levels == 1)[[0, 4]]]
    q = torch.tensor([1, 2, 3])
    rows = candidate_ids(reader, wc, [mid, first], q, cfg)
    a = int(wc.indices[mid]) * K
    assert rows[0].tolist() == [1, 2, 3] + ids[a - m:a + K + m].tolist()
    assert rows[1].tolist() == [1, 2, 3] + [PAD] * m + ids[:K + m].tolist()  # block 0: nothing before it
    Reranker(D, cfg)(rows, nn.Embedding(V, D))  # the padding is readable
