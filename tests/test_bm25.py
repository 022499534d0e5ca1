"""
The retrieval baseline and the oracle (megacontext/eval/bm25.py, build_contexts' bm25 / bm25_truncate / oracle):
BM25's ranking against a hand computation, the blocks it opens, the counted budget, the plain RAG prompt, the oracle
at every history length, and the working-context invariants of every WC built.
"""
import math
import os

import numpy as np
import pytest
import torch

from megacontext.config import MCConfig
from megacontext.eval import bm25 as rag
from megacontext.eval.baselines import ALL_METHODS, FOCUSED, METHODS, build_contexts, shared_length, span_is_raw
from megacontext.focus import open_blocks, start_wc
from megacontext.working_context import check_invariants, coarsest_wc, tail_start, wc_cost

K = 32
NEEDLE = " Note: the zebra quartz is 48213. "
QUESTION = "\nWhere is the zebra quartz? The zebra quartz is"


@pytest.fixture(scope="module")
def tok(tiny_base_dir):
    from nanochat.tokenizer import Tokenizer
    return Tokenizer.from_directory(os.path.join(tiny_base_dir, "tokenizer"))


@pytest.fixture(scope="module")
def filler_ids(tok, tiny_docs):
    return tok.encode(" ".join(tiny_docs))


def tiny_models(cfg, vocab=512, n_embd=64):
    from megacontext.gistnet import GistNet
    from nanochat.gpt import GPT, GPTConfig
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(sequence_len=256, vocab_size=vocab, n_layer=1, n_head=2, n_kv_head=2, n_embd=n_embd))
    with torch.no_grad():
        for name, p in gpt.named_parameters():
            p.normal_(0, 1.0 if "wte" in name else 0.5 / p.size(-1) ** 0.5)
    return gpt.eval(), GistNet(n_embd, cfg, 2).eval()


def history(tok, filler_ids, n_filler, blk, offset):
    """n_filler filler tokens with NEEDLE placed at token blk * K + offset, then QUESTION: (ids, needle span)."""
    needle = tok.encode(NEEDLE)
    reps = -(-n_filler // len(filler_ids)) + 1
    fill = (filler_ids * reps)[:n_filler - len(needle)]
    a = blk * K + offset
    ids = fill[:a] + needle + fill[a:] + tok.encode(QUESTION)
    return ids, (a, a + len(needle))


def reference_bm25(docs, query, k1, b):
    """BM25 by hand, bm25s's default (Lucene) variant: sum over the query's distinct terms of
    ln(1 + (N - df + 0.5) / (df + 0.5)) * tf / (tf + k1 (1 - b + b |d| / avgdl))."""
    N = len(docs)
    avgdl = sum(map(len, docs)) / N
    out = []
    for d in docs:
        s = 0.0
        for t in dict.fromkeys(query):
            df = sum(t in e for e in docs)
            tf = d.count(t)
            if df and tf:
                s += math.log(1 + (N - df + 0.5) / (df + 0.5)) * tf / (tf + k1 * (1 - b + b * len(d) / avgdl))
        out.append(s)
    return np.array(out)


# -----------------------------------------------------------------------------
# the scorer

@pytest.mark.parametrize("k1,b", [(rag.SETTINGS.k1, rag.SETTINGS.b), (1.5, 0.75), (0.9, 0.0)])
def test_block_scores_rank_like_a_bm25_computed_by_hand(k1, b):
    docs = [["red", "key", "door", "door"], ["blue", "key"], ["red", "red", "red", "lock", "gate", "wall", "moat"],
            ["green", "key", "red", "lock"], ["wall", "moat"], [], ["key", "key", "key", "blue", "red", "moat", "gate"]]
    query = ["red", "key", "lock", "unknown", "red"]  # an unknown term, a repeated one
    got, ref = rag.bm25_scores(docs, query, k1, b), reference_bm25(docs, query, k1, b)
    pos = ref[ref > 0]
    assert len(set(np.round(pos, 6))) == len(pos) == 5  # no ties but the two documents matching nothing
    assert np.argsort(-got, kind="stable").tolist() == np.argsort(-ref, kind="stable").tolist()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert not rag.bm25_scores(docs, ["unknown"], k1, b).any() and not rag.bm25_scores([[], []], ["a"], k1, b).any()


def test_words_documents_and_query():
    s = rag.BM25Settings(stopwords=True, stem=True, query="line", margin=2)
    pieces = ["The", " zeb", "ras", " of", " Rome", ".", "\n", "Where", " are", " zebras", "?"]
    terms, pos = rag.history_words(pieces, s)
    # lower-cased, "the", "of", "are" dropped, plurals stemmed, each word at the token it starts in
    assert terms == ["zebra", "rome", "where", "zebra"] and pos.tolist() == [1, 4, 7, 9]
    assert rag.query_terms(pieces, MCConfig(budget=128, tail_tokens=32), s) == ["where", "zebra"]  # the last line, once
    assert rag.block_docs(terms, pos, 2, 4, 0) == [["zebra"], ["rome", "where"]]
    assert rag.block_docs(terms, pos, 2, 4, 2) == [["zebra", "rome"], ["rome", "where", "zebra"]]  # +- 2 tokens
    assert rag.s_stem("keys") == "key" and rag.s_stem("queries") == "query" and rag.s_stem("glass") == "glass"


# -----------------------------------------------------------------------------
# the methods in build_contexts

@pytest.mark.parametrize("mult", [1, 4, 16, 64])
def test_bm25_opens_the_matching_block_and_its_neighbour_within_the_budget(tok, filler_ids, mult):
    budget = 224
    cfg = MCConfig(budget=budget, tail_tokens=32)
    n_filler = mult * budget
    blk = max(0, min(n_filler // K // 3, tail_start(n_filler, cfg) // K - 2))
    ids, needle = history(tok, filler_ids, n_filler, blk, K - 12)  # "zebra" ends its block, the key is in the next
    n = len(ids)
    gpt, gistnet = tiny_models(cfg)
    from megacontext.eval.harness import make_tree
    tree = make_tree(ids, gistnet, gpt, cfg)
    ctxs = build_contexts(ids, budget, cfg, gpt, ["bm25", "bm25_truncate", "oracle", "truncation"], gistnet, None,
                          tree, tok=tok, needed_spans=[needle])
    L = shared_length(n, budget, cfg)
    _, groups = rag.retrieve(ids, tok, cfg)
    head, nbrs = groups[0]  # the block with the rare words (or its neighbour, whose margin holds them) first
    assert head in (blk, blk + 1) and {blk, blk + 1} <= {head, *nbrs}
    for m in ("bm25", "oracle"):
        wc = ctxs[m].wc
        check_invariants(wc, cfg, budget)
        assert wc_cost(wc, K) == ctxs[m].slots <= L and m in FOCUSED
        assert span_is_raw(wc, needle, K) and span_is_raw(wc, (blk * K, blk * K + 2 * K), K), m
        assert span_is_raw(wc, (tail_start(n, cfg), n), K)  # the question: the raw tail
    # the plain RAG prompt: exactly L tokens, the needle's blocks and the newest tokens raw, in history order
    c, t = ctxs["bm25_truncate"], ctxs["truncation"]
    assert c.slots == t.slots == L and c.wc is None and len(c.shown) == L
    assert np.all(np.diff(c.shown) > 0) and np.isin(np.arange(*needle), c.shown).all()
    assert np.isin(np.arange(tail_start(n, cfg), n), c.shown).all()
    assert torch.equal(c.embeds, gpt.transformer.wte(torch.tensor([ids[i] for i in c.shown.tolist()])))
    from megacontext.eval.harness import check_same_budget
    check_same_budget(ctxs, "test")
    assert not any(c.embeds.requires_grad for c in ctxs.values())  # built under no_grad, like every method


@pytest.mark.parametrize("mult", [1, 2, 4, 16, 32, 64])
def test_bm25_wc_never_exceeds_the_shared_length(tok, filler_ids, mult):
    """Without a GPT: the plan of random queries (other blocks, ties, nothing matching) always fits in L slots."""
    budget = 224
    cfg = MCConfig(budget=budget, tail_tokens=32)
    rng = np.random.default_rng(mult)
    for trial in range(3):
        n_filler = mult * budget + int(rng.integers(0, K))
        blk = int(rng.integers(0, max(1, tail_start(n_filler, cfg) // K - 1)))
        ids, needle = history(tok, filler_ids, n_filler, blk, int(rng.integers(0, K)))
        if trial == 2:  # a question with no word of the history: nothing to retrieve
            ids = ids[:len(ids) - len(tok.encode(QUESTION))] + tok.encode("\nXyzzy plugh?")
        n, L = len(ids), shared_length(len(ids), budget, cfg)
        scores, groups = rag.retrieve(ids, tok, cfg)
        wc = rag.open_plan(n, budget, cfg, groups, scores)
        check_invariants(wc, cfg, budget)
        assert wc_cost(wc, K) <= L
        shown = rag.rag_tokens(n, L, cfg, groups)
        assert len(shown) == L and shown[-1] == n - 1 and len(np.unique(shown)) == L
        if trial == 2:  # nothing retrieved: the start of focus, and truncation
            assert not groups and wc == (rag.all_raw(n, cfg) if n <= budget else start_wc(n, budget, cfg))
            assert shown.tolist() == list(range(n - L, n))


def test_build_contexts_asks_for_what_the_new_methods_need():
    cfg = MCConfig(budget=128, tail_tokens=32)
    gpt, gistnet = tiny_models(cfg)
    ids = np.random.default_rng(0).integers(0, 512, 1000).tolist()
    for m, need in (("bm25", "tok"), ("bm25_truncate", "tok"), ("oracle", "needed_spans")):
        with pytest.raises(ValueError, match=need):
            build_contexts(ids, 128, cfg, gpt, [m], gistnet, None, None)
    assert set(METHODS) < set(ALL_METHODS) and {"bm25", "bm25_truncate", "oracle"} <= set(ALL_METHODS)


# -----------------------------------------------------------------------------
# the oracle

def cheapest_with(n, blocks, cfg):
    """The cost of the cheapest legal WC holding `blocks` raw: the coarsest tiling with their ancestors opened."""
    return wc_cost(open_blocks(coarsest_wc(n, cfg), blocks, cfg), cfg.block_size)


@pytest.mark.parametrize("budget", [224, 512])
def test_oracle_opens_the_needed_span_at_every_length(budget):
    cfg = MCConfig(budget=budget, tail_tokens=32)
    region = K * K
    for mult in (1, 4, 16, 64, 256):
        n = mult * budget + 17  # the history and a question
        ts = tail_start(n, cfg)
        spans = [(5, 12), (K - 3, K + 5)]  # inside a block; across a block edge
        for r in range(1, ts // region + 1):  # across every level-2 region edge the history has
            spans.append((r * region - 4, r * region + 6))
        spans += [(ts // 2 - 2, ts // 2 + 9), (ts - K - 3, ts - 1)]
        for span in spans:
            if span[1] > ts:
                continue
            wc = rag.open_needed(n, budget, cfg, [span])
            check_invariants(wc, cfg, budget)
            assert wc_cost(wc, K) <= shared_length(n, budget, cfg)
            blocks = rag.span_blocks([span], K)
            feasible = cheapest_with(n, blocks, cfg) <= budget
            assert span_is_raw(wc, span, K) == feasible, (mult, span)
            # every length the training mixture uses holds a span across a region edge
            assert feasible or mult == 256, (mult, span)
            if feasible:  # exactly the needed blocks opened: every other raw block is the tail's
                raw = set(wc.indices[wc.levels == 0].tolist())
                assert raw - set(blocks) == set(range(ts // K, -(-n // K)))
