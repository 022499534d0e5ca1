"""
The long-context evaluation (scripts/mc_eval.py and megacontext/eval/):
budgets counted per method, the exact-match scorer, the reading paths against full recomputes, the
JSON shape, determinism, plots, the report section, and checkpoints with and without MC weights.
"""
import json
import os
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megacontext.eval.baselines import (FOCUSED, METHODS, SINKS, Models, answer_matches, boundary_level, build_contexts,
                                        continuation_nll, greedy_decode, mean_pool_reader, shared_length, span_is_raw)
from megacontext.focus import question_focus
from megacontext.config import MCConfig
from megacontext.gistnet import GistLevels, GistNet, build_gists
from megacontext.kvcache import full_logits
from megacontext.lensnet import LensNet
from megacontext.reranker import Reranker
from megacontext.working_context import append_tokens, recency_pyramid, wc_cost
from nanochat.common import UserError
from nanochat.gpt import GPT, GPTConfig

V = 512


def tiny_models(budget=128, tail=32, seq_len=256, seed=0, n_embd=64, max_level=3):
    """A depth-1 GPT whose every weight is random (not the identity-at-init blocks), so that context,
    positions and gists change its outputs; plus an untrained GistNet and a LensNet."""
    torch.manual_seed(seed)
    cfg = MCConfig(budget=budget, tail_tokens=tail, max_level=max_level, lens_dim=32, lens_heads=2, lens_layers=1)
    gpt = GPT(GPTConfig(sequence_len=seq_len, vocab_size=V, n_layer=1, n_head=2, n_kv_head=2, n_embd=n_embd))
    with torch.no_grad():
        for name, p in gpt.named_parameters():
            p.normal_(0, 1.0 if "wte" in name else 0.5 / p.size(-1) ** 0.5)
    gistnet = GistNet(n_embd, cfg, 2)
    lensnet = LensNet(n_embd, cfg)
    return gpt.eval(), gistnet.eval(), lensnet.eval(), cfg


def make_tree(ids, gistnet, gpt, cfg):
    from megacontext.eval.harness import make_tree as mk
    return mk(ids, gistnet, gpt, cfg)


# -----------------------------------------------------------------------------
# the scorer

def test_answer_matches_rejects_near_misses():
    assert answer_matches(" 12345", " 12345")
    assert answer_matches("12345. Remember", " 12345")
    assert answer_matches(" 12345\n", "12345")
    for near in (" 12346", " 02345", " 1234", " 123456", " 12 345", " x12345", "", " ", " 1234.5", "-12345"):
        assert not answer_matches(near, " 12345"), near
    assert answer_matches(" blue door", "blue")
    assert not answer_matches(" blueberry", "blue")


def test_scorer_on_decoded_tokens(tiny_base_dir, monkeypatch):
    """The scorer sees decoded text: a near miss tokenized differently is still rejected."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", tiny_base_dir)
    from nanochat.tokenizer import get_tokenizer
    tok = get_tokenizer()
    for gen, ok in ((" 48213.", True), (" 48214.", False), (" 482130", False), (" 4821", False)):
        assert answer_matches(tok.decode(tok.encode(gen)), " 48213") is ok


# -----------------------------------------------------------------------------
# budgets, counted

@pytest.mark.parametrize("n", [40, 128, 161, 300, 1000, 5000])
def test_every_method_reads_the_same_counted_budget(n):
    gpt, gistnet, lensnet, cfg = tiny_models()
    ids = np.random.default_rng(n).integers(0, V, n).tolist()
    tree = make_tree(ids, gistnet, gpt, cfg)
    ctxs = build_contexts(ids, cfg.budget, cfg, gpt, METHODS, gistnet, lensnet, tree)
    L = shared_length(n, cfg.budget, cfg)
    assert L <= cfg.budget and (n <= cfg.budget) == (L == n)
    if n > cfg.budget:  # no expansion of the recency pyramid would still fit
        assert L == wc_cost(recency_pyramid(n, cfg.budget, cfg), cfg.block_size) > cfg.budget - (cfg.block_size - 1)
    wte = gpt.transformer.wte
    for m, c in ctxs.items():
        if m == "full":
            assert (c is None) == (n > gpt.config.sequence_len)
            if c is not None:
                assert c.slots == n
            continue
        assert c.embeds.size(0) == c.pos.numel() == c.slots, m  # counted GPT input length
        assert c.slots == L if m not in FOCUSED else c.slots <= L, m  # focus may stop short, never go over
        if c.wc is not None:
            assert wc_cost(c.wc, cfg.block_size) == c.slots and c.wc.num_tokens == n
    # what the raw baselines read, token for token
    assert torch.equal(ctxs["truncation"].embeds, wte(torch.tensor(ids[n - L:])))
    s = min(SINKS, L) if L < n else L
    assert torch.equal(ctxs["sinks"].embeds[:s], wte(torch.tensor(ids[:s])))
    if L > s:
        assert torch.equal(ctxs["sinks"].embeds[s:], wte(torch.tensor(ids[n - (L - s):])))
    # the two position schemes read the same focused working context
    assert ctxs["megacontext"].wc == ctxs["megacontext_gaussian"].wc
    assert ctxs["megacontext"].sigma is None and ctxs["megacontext_gaussian"].sigma is not None


def test_eval_refuses_unequal_budgets():
    from megacontext.eval.harness import check_same_budget
    from megacontext.eval.baselines import Context
    a = Context(torch.zeros(10, 4), torch.arange(10.0))
    b = Context(torch.zeros(11, 4), torch.arange(11.0))
    assert check_same_budget({"truncation": a, "mc_recency": a, "full": b}, "x") == {"truncation": 10, "mc_recency": 10}
    with pytest.raises(AssertionError, match="different numbers of slots"):
        check_same_budget({"truncation": a, "sinks": b}, "x")
    # focus may read fewer slots than the baselines, never more
    assert check_same_budget({"truncation": b, "megacontext": a}, "x") == {"truncation": 11, "megacontext": 10}
    with pytest.raises(AssertionError, match="different numbers of slots"):
        check_same_budget({"truncation": a, "megacontext": b}, "x")


# -----------------------------------------------------------------------------
# readers and reading paths against references

def test_mean_pool_gists_equal_an_untrained_gistnet():
    """An untrained GistNet is exactly a mean pool: the no-GistNet baseline must give the same gists."""
    gpt, gistnet, _, cfg = tiny_models()
    ids = torch.randint(0, V, (32 ** 2 * 2 + 77,))
    mp = mean_pool_reader(ids.tolist(), gpt.transformer.wte, cfg, chunk=1000)
    with torch.no_grad():
        ref = GistLevels(ids, build_gists(gistnet, gpt.transformer.wte(ids), cfg))
    for L in range(1, cfg.max_level + 1):
        assert mp.count(L) == ref.count(L) == ids.numel() // 32 ** L
        torch.testing.assert_close(mp.gists(L, 0, mp.count(L)), ref.gists(L, 0, ref.count(L)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scheme_method", ["mean_pool", "megacontext", "megacontext_gaussian", "truncation"])
def test_continuation_nll_and_decode_match_full_recompute(scheme_method):
    gpt, gistnet, lensnet, cfg = tiny_models()
    rng = np.random.default_rng(1)
    ids = rng.integers(0, V, 700).tolist()
    hist, tgt = ids[:650], ids[650:]
    tree = make_tree(hist, gistnet, gpt, cfg)
    ctx = build_contexts(hist, cfg.budget, cfg, gpt, [scheme_method], gistnet, lensnet, tree)[scheme_method]
    s, m = continuation_nll(gpt, ctx, tgt)
    if ctx.wc is not None:  # reference: the WC grown by the target tokens, read from scratch
        scheme = "gaussian" if scheme_method.endswith("gaussian") else "slot"
        reader = mean_pool_reader(ids, gpt.transformer.wte, cfg) if scheme_method == "mean_pool" \
            else make_tree(ids, gistnet, gpt, cfg)
        logits = full_logits(gpt, append_tokens(ctx.wc, len(ids), cfg), reader, cfg, scheme)
    else:
        with torch.no_grad():
            logits = gpt(torch.tensor([ids[650 - ctx.slots:-1]]))[0]
    ref = F.cross_entropy(logits[ctx.slots - 1:ctx.slots - 1 + m], torch.tensor(tgt), reduction="sum")
    assert m == len(tgt) and abs(s - float(ref)) < 1e-3 * m
    # greedy decoding with the KV cache = argmax of full recomputes, token by token
    out = greedy_decode(gpt, ctx, 5)
    seq = []
    for t in out:
        x = torch.cat([ctx.embeds, gpt.transformer.wte(torch.tensor(seq, dtype=torch.long))]) if seq else ctx.embeds
        pos = torch.cat([ctx.pos, ctx.next_pos + torch.arange(len(seq), dtype=torch.float32)])
        sig = None if ctx.sigma is None else torch.cat([ctx.sigma, torch.zeros(len(seq))])[None]
        with torch.no_grad():
            lg = gpt(inputs_embeds=x[None], pos=pos[None], pos_sigma=sig)[0, -1]
        assert int(lg.argmax()) == t
        seq.append(t)


def test_question_focus_fills_the_budget_until_it_opens_a_block_and_hit_detection():
    gpt, gistnet, lensnet, cfg = tiny_models()
    n = 3000
    ids = np.random.default_rng(3).integers(0, V, n).tolist()
    tree = make_tree(ids, gistnet, gpt, cfg)
    trace = []
    wc = question_focus(n, cfg.budget, cfg, lensnet, tree, gpt.transformer.wte, trace=trace)
    full = wc_cost(wc, 32) == shared_length(n, cfg.budget, cfg)
    assert full or any(level == 1 for level, _ in trace)  # short of the budget only once a block was opened
    pyr = recency_pyramid(n, cfg.budget, cfg)
    assert span_is_raw(pyr, (n - 10, n), 32) and not span_is_raw(pyr, (5, 9), 32)


def test_boundary_level_names_the_coarsest_boundary_a_span_crosses():
    K = 4  # blocks of 4 tokens, regions of 16, level-3 nodes of 64
    assert boundary_level((0, 4), K, 3) == 0 and boundary_level((5, 8), K, 3) == 0  # inside one block
    assert boundary_level((3, 5), K, 3) == 1 and boundary_level((17, 31), K, 3) == 1  # two blocks, one region
    assert boundary_level((15, 17), K, 3) == 2 and boundary_level((47, 49), K, 3) == 2  # two regions
    assert boundary_level((63, 65), K, 3) == 3 and boundary_level((63, 65), K, 2) == 2  # capped at max_level
    for a in range(0, 70):  # brute force: the coarsest level whose nodes split the span's tokens
        for b in range(a + 1, 72):
            split = [L for L in (1, 2, 3) if len({t // K ** L for t in range(a, b)}) > 1]
            assert boundary_level((a, b), K, 3) == max(split, default=0)


# -----------------------------------------------------------------------------
# the script: JSON shape, determinism, plots, report

def _run(out, extra=()):
    from scripts.mc_eval import main
    return main(["--random-init", "--filler", "val", "--depth", "1", "--budget", "128", "--tail-tokens", "32", "--trials", "4",
                 "--needle-trials", "2", "--multiples", "1,4", "--depths", "0.1,0.9", "--docs", "2",
                 "--out", str(out)] + list(extra))


def _strip_timings(d):
    return {k: v for k, v in d.items() if k != "timings"}


def test_eval_json_shape_determinism_plots_and_report(tiny_base_env, tmp_path):
    from megacontext.eval.report import validate_result
    res = _run(tmp_path / "a" / "mc_eval.json")
    with open(tmp_path / "a" / "mc_eval.json") as f:
        a = json.load(f)
    assert validate_result(a)
    assert set(a) >= {"config", "passkey", "needle", "kv_recall", "long_doc"}
    from megacontext.eval.baselines import ALL_METHODS
    from megacontext.eval.harness import SESSION_METHODS
    assert list(a["passkey"]) == ["1", "4"] and set(a["passkey"]["1"]) == set(ALL_METHODS)  # raw: no session
    assert a["passkey"]["4"]["full"] is None and a["passkey"]["1"]["full"] is not None  # 4x > sequence_len
    assert "gap_closed" in a["long_doc"] and set(a["long_doc"]) == set(ALL_METHODS) - {"oracle"} | {"gap_closed"}
    # every accuracy carries its trial count and 95 % Wilson interval, which brackets it
    for mult, cell in a["passkey"].items():
        for m, v in cell.items():
            iv = a["intervals"]["passkey"][mult][m]
            assert (v is None) == (iv["ci"] is None) and (v is None or iv["ci"][0] <= v <= iv["ci"][1])
            assert v is None or iv["n"] == 4
    # the chat view: every task asked as a conversation, read also through MCSession (and after a reopen)
    assert set(a["chat"]) <= {"passkey", "needle", "kv_recall", "chat_memory"} and "passkey" in a["chat"]
    assert set(a["chat"]["passkey"]["acc"]["1"]) == set(ALL_METHODS) | set(SESSION_METHODS)
    assert a["config"]["split"] == "eval"
    assert set(a["passkey_depth"]["1"]) == {"0.1", "0.9"}
    for row in a["passkey_alignment"].values():  # every trial counted under exactly one alignment
        assert sum(c["n"] for c in row.values()) == 4 and all(set(c) == {"n"} | set(ALL_METHODS) for c in row.values())
    for task in ("passkey", "needle", "kv_recall"):  # the counted budget, recorded per cell
        for cell in a["context_slots"][task].values():
            fixed = {v for m, v in cell.items() if m not in FOCUSED + ("full",) and v is not None}
            assert len(fixed) <= 1 and all(v <= 128 for v in fixed)
            limit = max(fixed) if fixed else 128
            assert all(cell[m] is None or cell[m] <= limit for m in FOCUSED if m in cell)
    assert a["position_scheme"]["winner"] in ("slot", "gaussian", "tie")
    # what wandb receives: every non-null cell under a flat key, the same numbers as the JSON
    from scripts.mc_eval import wandb_figures
    figs = wandb_figures(a)
    assert figs["mc_eval/passkey/4x/truncation"] == a["passkey"]["4"]["truncation"]
    assert "mc_eval/passkey/4x/full" not in figs  # null: the history exceeds the GPT's sequence length
    assert figs["mc_eval/long_doc/megacontext"] == a["long_doc"]["megacontext"]
    # determinism: same flags, same numbers
    _run(tmp_path / "b" / "mc_eval.json")
    with open(tmp_path / "b" / "mc_eval.json") as f:
        b = json.load(f)
    assert _strip_timings(a) == _strip_timings(b) == json.loads(json.dumps(_strip_timings(res)))
    # plots: real PNG files beside the JSON
    for name in ("mc_eval_passkey.png", "mc_eval_depth.png"):
        with open(tmp_path / "a" / name, "rb") as f:
            head = f.read(8)
        assert head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(tmp_path / "a" / name) > 1000
    # report section: tables for every task and method, the verdict, the losses
    with open(os.path.join(tiny_base_env, "report", "megacontext-evaluation.md")) as f:
        md = f.read()
    for s in ("## MegaContext evaluation", "### Passkey retrieval", "### Passkey by needle alignment",
              "### Multi-key needle", "### Key-value recall", "### Long-document NLL", "slot vs gaussian",
              "Where MegaContext loses", "| megacontext_gaussian |", "mc_eval_passkey.png", "### In chat: passkey",
              "| session_reopened |", "| bm25 |", "| oracle |", "95 % Wilson interval"):
        assert s in md, s
    from nanochat.report import get_report
    assert "### Passkey retrieval" in open(get_report().generate()).read()


def test_random_depths_vary_the_needle_alignment(tiny_base_env, tmp_path):
    """--depths random: no depth table, and the needles land at varied offsets (a fixed depth puts every
    trial's needle at nearly the same token), so the alignment split holds more than one level."""
    res = _run(tmp_path / "r.json", ["--depths", "random", "--tasks", "passkey", "--trials", "24", "--multiples", "4",
                                     "--methods", "truncation,megacontext", "--no-report"])
    assert res["config"]["depths"] == "random" and res["passkey_depth"] == {}
    row = res["passkey_alignment"]["4"]
    assert sum(c["n"] for c in row.values()) == 24 and len(row) >= 2
    from scripts.mc_eval import UserError, main
    with pytest.raises(UserError, match="random"):
        main(["--random-init", "--depths", "0.5,1.5", "--out", str(tmp_path / "x.json")])


def test_a_history_below_the_budget_gives_full_attention_its_cell(tiny_base_env, tmp_path):
    """--multiples 0.5: a history the GPT reads whole, so `full` (the model's ceiling) is measured there, and only
    there; whole multiples keep their keys and their examples."""
    from megacontext.eval.harness import example_rng
    from scripts.mc_eval import multiple
    assert multiple("0.5") == 0.5 and multiple("4") == 4 and isinstance(multiple("4.0"), int)
    draw = lambda m: example_rng(0, "passkey", m, 0).integers(1 << 30)  # noqa: E731
    assert draw(0.5) != draw(0) and draw(4) == draw(4.0)
    res = _run(tmp_path / "r.json", ["--tasks", "passkey", "--multiples", "0.5,16", "--methods", "truncation,full",
                                     "--no-report"])
    assert res["config"]["multiples"] == [0.5, 16] and set(res["passkey"]) == {"0.5", "16"}
    assert res["passkey"]["0.5"]["full"] is not None and res["passkey"]["16"]["full"] is None
    assert res["intervals"]["passkey"]["0.5"]["full"]["n"] == 4


def test_validate_result_rejects_bad_shapes():
    from megacontext.eval.report import validate_result
    good = {"config": {}, "passkey": {"4": {"truncation": 0.5, "full": None}}, "needle": {}, "kv_recall": {},
            "long_doc": {"truncation": 2.0, "gap_closed": None}}
    assert validate_result(good)
    for bad in ({**good, "passkey": {"4x": {"truncation": 0.5}}}, {**good, "passkey": {"4": {"truncation": 1.5}}},
                {**good, "long_doc": {"truncation": 2.0}}, {k: v for k, v in good.items() if k != "needle"},
                {**good, "long_doc": {"truncation": float("nan"), "gap_closed": 0.1}},
                {**good, "passkey_alignment": {"4": {"two": {"n": 1, "truncation": 0.5}}}},
                {**good, "passkey_alignment": {"4": {"2": {"truncation": 0.5}}}}):
        with pytest.raises(ValueError, match="documented shape"):
            validate_result(bad)


def _save_ckpt(base, with_mc):
    from nanochat.checkpoint_manager import save_checkpoint
    gpt, gistnet, lensnet, cfg = tiny_models(budget=128, tail=32, seq_len=256)
    data = {"gpt": gpt.state_dict()}
    meta = {"model_config": asdict(gpt.config), "step": 5}
    if with_mc:
        data.update(gistnet=gistnet.state_dict(), lensnet=lensnet.state_dict(),
                    reranker=Reranker(gpt.config.n_embd, cfg).state_dict())
        meta["mc_config"] = cfg.to_dict()
    save_checkpoint(os.path.join(base, "base_checkpoints", "d1"), 5, data, None, meta)


def test_checkpoint_sources(tiny_base_env, tmp_path):
    from scripts.mc_eval import main
    flags = ["--trials", "2", "--needle-trials", "1", "--multiples", "4", "--depths", "0.5", "--docs", "1",
             "--tasks", "passkey,long_doc", "--no-report"]
    _save_ckpt(tiny_base_env, with_mc=False)
    with pytest.raises(UserError, match="baselines-only"):
        main(["--source", "base", "--filler", "val", "--out", str(tmp_path / "x.json")] + flags)
    res = main(["--source", "base", "--filler", "val", "--baselines-only", "--budget", "128", "--tail-tokens", "32",
                "--out", str(tmp_path / "y.json")] + flags)
    assert res["config"]["mc_weights"] is False and set(res["passkey"]["4"]) == {"truncation", "sinks", "mean_pool",
                                                                                  "bm25_truncate", "full"}
    assert res["position_scheme"]["winner"] is None
    _save_ckpt(tiny_base_env, with_mc=True)
    res = main(["--source", "base", "--filler", "val", "--out", str(tmp_path / "z.json")] + flags)
    assert res["config"]["mc_weights"] is True and res["config"]["budget"] == 128 and res["config"]["step"] == 5
    from megacontext.eval.baselines import ALL_METHODS
    assert set(res["passkey"]["4"]) == set(ALL_METHODS)


def test_plot_decode_ms(tmp_path):
    from megacontext.eval.plots import plot_decode_ms
    bench = {"config": {"budget": 512}, "decode_ms_per_token": {"1000": {"megacontext": 2.0, "full_kv": 1.5},
                                                                "1000000": {"megacontext": 2.1, "full_kv": None}}}
    p = plot_decode_ms(bench, str(tmp_path / "d.png"))
    with open(p, "rb") as f:
        assert f.read(4) == b"\x89PNG"


def test_long_doc_nll_and_gap_closed(tiny_base_dir, tiny_docs, monkeypatch):
    """run_long_doc on a GPT that reads its context: per-method NLL and the gap formula, exactly."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", tiny_base_dir)
    from nanochat.tokenizer import get_tokenizer
    from megacontext.eval.harness import CachedTokenizer, doc_windows, run_long_doc
    gpt, gistnet, lensnet, cfg = tiny_models(budget=128, tail=32, seq_len=256)
    tok = CachedTokenizer(get_tokenizer())
    texts = tiny_docs[-24:]
    nll, gaps, used = run_long_doc(Models(gpt, gistnet, lensnet, tok, cfg), list(METHODS), 128, texts, 256, 32, 3,
                                   progress=False)
    assert used == len(doc_windows(texts, tok, 256, 3)) == 3
    assert all(isinstance(nll[m], float) and 0 < nll[m] < 20 for m in METHODS)
    assert len({nll[m] for m in METHODS}) > 1  # the context matters to this GPT: methods differ
    lo, hi = nll["full"], nll["truncation"]
    for m in ("sinks", "mean_pool", "mc_recency", "mc_lensnet", "megacontext", "megacontext_gaussian"):
        if hi - lo > 1e-6:
            assert gaps[m] == pytest.approx((hi - nll[m]) / (hi - lo), abs=2e-3)
        else:  # full attention no better than truncation: there is no gap to close
            assert gaps[m] is None
    assert gaps["truncation"] is None and gaps["full"] is None


def test_gap_closed_is_undefined_without_a_gap():
    from megacontext.eval.harness import gaps_closed
    g = gaps_closed({"truncation": 3.0, "megacontext": 2.5, "sinks": 3.2, "full": 2.0})
    assert g == {"truncation": None, "megacontext": 0.5, "sinks": -0.2, "full": None}
    # full attention worse than truncation (e.g. a model that never learned to use context): no share
    assert gaps_closed({"truncation": 3.0, "megacontext": 2.5, "full": 3.1})["megacontext"] is None


def test_report_quotes_where_megacontext_loses():
    from megacontext.eval.report import report_markdown
    from megacontext.eval.harness import position_verdict
    methods = ["truncation", "megacontext", "megacontext_gaussian", "full"]
    res = {"config": {"methods": methods, "budget": 512, "block_size": 32, "sequence_len": 1024, "source": "sft",
                      "step": 3, "trials": 50, "needle_trials": 50, "depths": [0.5], "doc_target": 64,
                      "doc_tokens": 1024, "docs_used": 50},
           "passkey": {"4": {"truncation": 0.5, "megacontext": 0.1, "megacontext_gaussian": 0.3, "full": None}},
           "needle": {"4": {"truncation": 0.0, "megacontext": 0.2, "megacontext_gaussian": 0.2, "full": None}},
           "kv_recall": {}, "long_doc": {"truncation": 3.0, "megacontext": 3.2, "megacontext_gaussian": 3.1,
                                         "full": 2.5, "gap_closed": -0.4}}
    res["position_scheme"] = position_verdict(res)
    assert res["position_scheme"]["winner"] == "gaussian" and res["position_scheme"]["cells"] == 2
    md = report_markdown(res, {})
    assert "passkey 4x: megacontext 10.0% < truncation 50.0%" in md
    assert "long_doc: megacontext NLL 3.2000 > truncation 3.0000" in md
    assert "needle 4x" not in md.split("Where MegaContext loses")[1]
    assert "**gaussian**" in md


def test_mc_bench_report_section(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    from scripts.mc_bench import report_markdown
    res = {"config": {"budget": 512, "source": "random-init", "n_layer": 2, "n_embd": 128, "device": "cpu",
                      "block_size": 32},
           "decode_ms_per_token": {"1000": {"megacontext": 2.5, "full_kv": 1.25}, "1000000": {"megacontext": 2.75,
                                                                                               "full_kv": None}},
           "rss_mb": {"1000": 300.0, "1000000": 900.0}, "wc": {"1000": {"wc_cost": 500}, "1000000": {"wc_cost": 505}}}
    md = report_markdown(res, str(tmp_path / "report" / "mc_bench_decode.png"))
    assert "| 1,000 | 2.500 | 1.250 | 300.0 | 500 |" in md and "| 1,000,000 | 2.750 | - | 900.0 | 505 |" in md
    assert "](mc_bench_decode.png)" in md  # relative to report.md


# -----------------------------------------------------------------------------
# quality: gist substitutability per level, LensNet pair agreement

def test_quality_plan_histories():
    from megacontext.eval.quality import lens_candidates, quality_plan
    cfg = MCConfig(budget=128, tail_tokens=32)
    hist, why = quality_plan(cfg, 256, 64)
    assert hist == {"level_1": 192, "level_2": 32 * 32 + 32, "lens": 192} and why == {}
    assert lens_candidates(192, cfg) >= 2
    # a tail of 128 in a 256-token GPT: level 1 fits, but its base WC (B_h 256) is all raw -> a longer lens history
    cfg = MCConfig(budget=512, tail_tokens=128, train_hist_budget=256)
    hist, why = quality_plan(cfg, 256, 64)
    assert hist["level_1"] == 192 and lens_candidates(192, cfg) == 0
    assert hist["lens"] > 192 and hist["lens"] % 32 == 0 and lens_candidates(hist["lens"], cfg) >= 2
    hist, why = quality_plan(replace(cfg, max_level=1), 200, 64)  # no room for tail + block + target
    assert hist["level_1"] is None and hist["level_2"] is None and set(why) == {"level_1", "level_2"}
    assert hist["lens"] is not None  # the agreement needs no raw reference


def test_quality_figures(tiny_base_dir, tiny_docs, monkeypatch):
    """run_quality on a GPT that reads its context: shapes, the substitutability formula, the guard,
    agreement in [0, 1], determinism, and null + reasons without MC weights."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", tiny_base_dir)
    from nanochat.tokenizer import get_tokenizer
    from megacontext.eval.report import validate_result
    from megacontext.eval.quality import quality_problems, run_quality
    from megacontext.eval.harness import CachedTokenizer
    gpt, gistnet, lensnet, cfg = tiny_models(budget=128, tail=32, seq_len=256)
    models = Models(gpt, gistnet, lensnet, CachedTokenizer(get_tokenizer()), cfg)
    q = run_quality(models, tiny_docs[-24:], 32, 2, seed=0, progress=False)
    number = lambda v: v is None or isinstance(v, (int, float))  # noqa: E731
    assert quality_problems(q, number) == []
    l1, l2, lens = q["level_1"], q["level_2"], q["lens"]
    assert l1["history_tokens"] == 224 and l1["raw_fits_context"] is True and l1["rows"] == 2  # 224 + 32 <= 256
    assert l2["history_tokens"] == 1056 and l2["raw_fits_context"] is False  # beyond the GPT's 256 tokens
    for key, r in (("level_1", l1), ("level_2", l2)):
        assert all(0 < r[f"nll_{k}"] < 20 for k in ("raw", "gists", "dropped", "none"))
        assert r["lm_guard"] == (r["nll_gists"] < r["nll_none"])
        gap = r["nll_dropped"] - r["nll_raw"]
        if gap > 1e-6:
            assert r["substitutability"] == pytest.approx((r["nll_dropped"] - r["nll_gists"]) / gap, abs=1e-4)
            ci = r["substitutability_ci"]
            assert ci is None or ci[0] <= ci[1]
        else:
            assert r["substitutability"] is None and "undefined" in q["reasons"][key]
    # without a raw tail: the same windows, so raw and none are the tailed entry's to the digit, dropped is
    # none, and the gists are the whole history's (a reference computation with tail_tokens 0)
    from megacontext.eval.metrics import gist_substitutability
    from megacontext.eval.quality import doc_windows
    for key, r in (("level_1", l1), ("level_2", l2)):
        r0 = q[f"{key}_no_tail"]
        assert r0["history_tokens"] == r["history_tokens"] and r0["rows"] == r["rows"]
        assert (r0["nll_raw"], r0["nll_none"]) == (r["nll_raw"], r["nll_none"]) and r0["nll_dropped"] == r0["nll_none"]
        s = r["history_tokens"]
        w = torch.tensor(doc_windows(tiny_docs[-24:], models.tok, s + 33, 2))
        ref = gist_substitutability(gpt, gistnet, w[:, :-1], w[:, 1:], s, replace(cfg, tail_tokens=0),
                                    int(key[-1]), per_row=True)
        assert r0["nll_gists"] == pytest.approx(float(np.mean(ref["rows"]["gists"])), abs=1e-5)
        assert r0["nll_gists"] != r["nll_gists"]  # the tail's tokens are gists now
    tailless = run_quality(models._replace(cfg=replace(cfg, tail_tokens=0)), tiny_docs[-24:], 32, 2, seed=0,
                           progress=False)
    assert tailless["level_1_no_tail"] is None and "tail_tokens 0" in tailless["reasons"]["level_1_no_tail"]
    assert tailless["level_1"]["nll_gists"] == pytest.approx(q["level_1_no_tail"]["nll_gists"], abs=1e-5)
    assert lens["history_tokens"] == 224 and 0 < lens["rows"] <= 2
    assert 0 <= lens["agreement"] <= 1 and 0 <= lens["top1"] <= 1 and lens["delta_nll"] is not None
    # a row with a pair to order for LensNet has one for the newest-first baseline too: never missing here
    assert 0 <= lens["recency_agreement"] <= 1 and 0 <= lens["split_half_agreement"] <= 1
    assert run_quality(models, tiny_docs[-24:], 32, 2, seed=0, progress=False) == q  # deterministic
    none = run_quality(Models(gpt, None, None, models.tok, cfg), tiny_docs[-24:], 32, 2, seed=0, progress=False)
    assert none["level_1"] is None and none["lens"] is None and set(none["reasons"]) == {
        "level_1", "level_2", "level_1_no_tail", "level_2_no_tail", "lens"}
    base = {"config": {}, "passkey": {}, "needle": {}, "kv_recall": {}, "long_doc": {"gap_closed": None}}
    assert validate_result({**base, "quality": q}) and validate_result({**base, "quality": none})


def test_quality_task_runs_random_init(tiny_base_env, tmp_path):
    """`--tasks quality --random-init` (and with --baselines-only) runs, validates and reports."""
    from megacontext.eval.report import validate_result
    for extra in ([], ["--baselines-only"]):
        res = _run(tmp_path / "q.json", ["--tasks", "quality", "--doc-target", "32"] + extra)
        with open(tmp_path / "q.json") as f:
            assert validate_result(json.load(f))
        q = res["quality"]
        assert q["level_1"]["history_tokens"] == 224 and q["level_2"]["raw_fits_context"] is False
        assert "quality" in res["timings"] and res["passkey"] == {}
    with open(os.path.join(tiny_base_env, "report", "megacontext-evaluation.md")) as f:
        md = f.read()
    assert "### Gist quality and LensNet agreement" in md and "| 1 | 224 |" in md and "LensNet pair agreement" in md
    assert "| 1, no raw tail | 224 |" in md and "| 2, no raw tail | 1056 |" in md
    # --quick lowers only the counts left unset: explicit flags win even when they equal the full defaults
    res = _run(tmp_path / "q.json", ["--tasks", "quality", "--no-report", "--quick", "--multiples", "1,4,16,64,256",
                                     "--docs", "50"])
    assert res["config"]["multiples"] == [1, 4, 16, 64, 256] and res["config"]["docs"] == 50
    assert res["config"]["trials"] == 4 and res["config"]["depths"] == [0.1, 0.9]


def test_bootstrap_ci_brackets_the_estimate_and_narrows_with_rows():
    from megacontext.eval.quality import bootstrap_ci, substitutability_ratio
    rng = np.random.default_rng(0)
    raw = 6.0 + rng.normal(0, 0.3, 64)
    dropped, gists = raw + 0.1 + rng.normal(0, 0.05, 64), raw + 0.05 + rng.normal(0, 0.05, 64)
    point = float(substitutability_ratio(dropped.mean(), gists.mean(), raw.mean()))
    lo, hi = bootstrap_ci([dropped, gists, raw], substitutability_ratio, seed=0)
    assert lo < point < hi and 0.2 < lo and hi < 0.8  # 0.5 by construction, within the sampling noise
    lo4, hi4 = bootstrap_ci([np.tile(c, 4) for c in (dropped, gists, raw)], substitutability_ratio, seed=0)
    assert hi4 - lo4 < 0.7 * (hi - lo)  # four times the rows: about half the width
    assert bootstrap_ci([[0.7] * 10], lambda a: a, seed=0) == [0.7, 0.7]  # no spread, no interval
    assert bootstrap_ci([[0.7]], lambda a: a, seed=0) is None  # one row cannot be resampled
    flat = np.full(16, 6.0)  # the gap vanishes in every resample: undefined, not a number
    assert bootstrap_ci([flat, flat, flat], substitutability_ratio, seed=0) is None
    assert bootstrap_ci([dropped, gists, raw], substitutability_ratio, seed=0) == [lo, hi]  # seeded


def test_quality_shape_and_report_rows():
    from megacontext.eval.report import validate_result
    from megacontext.eval.quality import quality_markdown
    lvl = {"history_tokens": 960, "target_tokens": 64, "rows": 4, "nll_raw": 3.0, "nll_gists": 3.2,
           "nll_dropped": 3.4, "nll_none": 4.0, "substitutability": 0.5, "lm_guard": True, "raw_fits_context": True}
    q = {"level_1": {**lvl, "substitutability_ci": [0.25, 0.75]}, "level_2": None,
         "lens": {"history_tokens": 960, "rows": 4, "agreement": 0.8, "top1": 0.5, "delta_nll": 1.25,
                  "agreement_ci": [0.7, 0.9], "recency_agreement": 0.625, "split_half_agreement": 0.55},
         "reasons": {"level_2": "max_level 1"}}
    base = {"config": {}, "passkey": {}, "needle": {}, "kv_recall": {}, "long_doc": {"gap_closed": None}}
    assert validate_result({**base, "quality": q})
    for bad in ({**q, "lens": {**q["lens"], "agreement": 1.5}}, {**q, "level_1": {**lvl, "lm_guard": "yes"}},
                {**q, "level_1": {**lvl, "nll_raw": float("nan")}}, {k: v for k, v in q.items() if k != "lens"},
                {**q, "level_2": 3.0}, {**q, "level_1": {k: v for k, v in lvl.items() if k != "rows"}}, [],
                {**q, "level_1": {**lvl, "substitutability_ci": [0.75, 0.25]}},
                {**q, "lens": {**q["lens"], "agreement_ci": 0.8}},
                {**q, "lens": {**q["lens"], "recency_agreement": 2.0}},
                {**q, "lens": {**q["lens"], "split_half_agreement": -0.1}}):
        with pytest.raises(ValueError, match="documented shape"):
            validate_result({**base, "quality": bad})
    md = quality_markdown(q, {"doc_target": 64, "sequence_len": 1024})
    assert "| 1 | 960 | 3.0000 | 3.2000 | 3.4000 | 4.0000 | 0.500 (90 % CI 0.250 to 0.750) | pass |" in md
    assert "no raw tail" not in md  # JSON from before the no-tail entries: no rows, no note
    q0 = {**q, "level_1_no_tail": {**lvl, "nll_dropped": 4.0, "substitutability": 0.8}, "level_2_no_tail": None,
          "reasons": {**q["reasons"], "level_2_no_tail": "max_level 1"}}
    assert validate_result({**base, "quality": q0})
    with pytest.raises(ValueError, match="documented shape"):
        validate_result({**base, "quality": {**q0, "level_1_no_tail": {**lvl, "lm_guard": "yes"}}})
    md0 = quality_markdown(q0, {"doc_target": 64, "sequence_len": 1024})
    assert "| 1, no raw tail | 960 | 3.0000 | 3.2000 | 4.0000 | 4.0000 | 0.800 | pass |" in md0
    assert "level 2, no raw tail: not measured (max_level 1)" in md0 and "against no history at all" in md0
    from megacontext.eval.report import headline
    assert headline({**base, "quality": q0}) == {"mc gist substitutability L1": 0.5,
                                                 "mc gist substitutability L1 no tail": 0.8, "mc lens pair agreement": 0.8}
    assert "| 2 | - |" in md and "level 2: not measured (max_level 1)" in md
    assert ("**0.800** (90 % CI 0.700 to 0.900) (target >= 0.75, random 0.5, newest gist first 0.625, the deltas' "
            "split-half agreement 0.550); top-1 0.500") in md
    old = {**q, "lens": {k: v for k, v in q["lens"].items()  # JSON from before these two
                         if k not in ("recency_agreement", "split_half_agreement")}}
    assert validate_result({**base, "quality": old}) and "(target >= 0.75, random 0.5); top-1" in quality_markdown(
        old, {"doc_target": 64, "sequence_len": 1024})
    md = quality_markdown({**q, "level_1": {**lvl, "raw_fits_context": False, "lm_guard": False}},
                          {"doc_target": 64, "sequence_len": 512})
    assert "3.0000* |" in md and "FAIL" in md and "exceeds the GPT's sequence length (512)" in md


def test_wilson_interval_against_reference_values():
    """Reference values of the 95 % Wilson score interval (computed by hand from its closed form)."""
    from megacontext.eval.stats import cell, fmt, wilson
    assert wilson(0, 0) is None
    assert wilson(20, 20) == [0.8389, 1.0] and wilson(0, 20) == [0.0, 0.1611]
    assert wilson(100, 100) == [0.963, 1.0] and wilson(99, 100) == [0.9455, 0.9982]
    assert wilson(5, 10) == [0.2366, 0.7634]
    for k, n in ((3, 7), (50, 100), (1, 250)):
        lo, hi = wilson(k, n)
        assert lo <= k / n <= hi and 0 <= lo and hi <= 1
    assert wilson(50, 400)[1] - wilson(50, 400)[0] < wilson(5, 40)[1] - wilson(5, 40)[0]  # narrows with n
    assert cell([True, None, False, True]) == {"acc": 0.6667, "n": 3, "ci": wilson(2, 3)}
    assert cell([None]) == {"acc": None, "n": 0, "ci": None}
    assert fmt(1.0, [0.963, 1.0], 100) == "100.0% (96-100, n=100)" and fmt(None) == "-"


def test_story_tasks_run_raw_and_in_chat_and_the_oracle_opens_every_supporting_fact(tiny_base_env, tmp_path,
                                                                                       monkeypatch):
    import megacontext.eval.harness as H
    asked_for = []

    def recording(*a, **k):
        asked_for.append(k["needed_spans"])
        return build(*a, **k)
    build = H.build_contexts
    monkeypatch.setattr(H, "build_contexts", recording)
    seen = []
    make = H.make_example
    monkeypatch.setattr(H, "make_example", lambda *a, **k: seen.append(make(*a, **k)) or seen[-1])
    res = _run(tmp_path / "q.json", ["--tasks", "qa2", "--multiples", "4", "--needle-trials", "2", "--no-report",
                                     "--methods", "truncation,bm25,oracle,megacontext,session"])
    assert set(res["qa2"]["4"]) == {"truncation", "bm25", "oracle", "megacontext"}  # raw: no session
    assert set(res["chat"]["qa2"]["acc"]["4"]) == {"truncation", "bm25", "oracle", "megacontext", "session"}
    # the oracle is asked to open every supporting fact (two for qa2), not just the first needle
    for (ex, _), spans in zip(seen, asked_for):
        assert len(ex.needle_spans) == 2 and all(sp in spans for sp in ex.needle_spans)
