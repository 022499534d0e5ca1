"""MCSession: long prompts within budget, exact incremental decoding, nll, chat, persistence across processes, errors."""
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch

from megacontext.config import MCConfig
from megacontext.gistnet import GistNet
from megacontext.lensnet import LensNet
from megacontext.reranker import Reranker
from megacontext.focus import near_kept
from megacontext.runtime import MCSession, SessionError
from megacontext.working_context import WorkingContext, check_invariants, materialize, wc_cost
from nanochat.common import UserError
from nanochat.gpt import GPT, config_from_depth

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_cfg(**kw):
    base = dict(block_size=4, max_level=4, budget=48, tail_tokens=8, lens_dim=32, lens_heads=4, tau=0.1)
    base.update(kw)
    return MCConfig(**base)


def randomise(module, scale=0.3):
    """Non-trivial weights: nanochat zero-inits residual projections (and GistNet its head)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("c_proj.weight") or name == "head.weight" or name == "smear":
                p.uniform_(-scale, scale)
    return module


def tiny_nets(cfg, vocab, seed=0):
    torch.manual_seed(seed)
    gpt = GPT(config_from_depth(1, vocab, 128, aspect_ratio=32, head_dim=16))
    gpt.init_weights()
    randomise(gpt)
    gistnet = randomise(GistNet(gpt.config.n_embd, cfg, gpt.config.n_head))
    lensnet = randomise(LensNet(gpt.config.n_embd, cfg))
    with torch.no_grad():
        lensnet.key.weight.mul_(4.0)  # strong enough scores that LensNet asks for edits
    return gpt.eval(), gistnet.eval(), lensnet.eval()


@pytest.fixture
def tok(tiny_base_env):
    from nanochat.tokenizer import get_tokenizer
    return get_tokenizer()


def make_session(tok, cfg=None, seed=0, memory_dir=None):
    cfg = cfg or tiny_cfg()
    gpt, gistnet, lensnet = tiny_nets(cfg, tok.get_vocab_size(), seed)
    return MCSession(gpt, gistnet, lensnet, tok, cfg, memory_dir=memory_dir, device="cpu")


def text_of(tokens, tok, docs):
    """At least `tokens` tokens of the docs, joined (an error when they hold fewer: the test would be void)."""
    out, n = [], 0
    for d in docs:
        out.append(d)
        n += len(tok.encode(d))
        if n >= tokens:
            return "\n".join(out)
    raise AssertionError(f"the test docs hold {n} tokens, fewer than {tokens}")


@pytest.mark.parametrize("positions", ["slot", "gaussian"])
def test_long_prompt_is_answered_within_budget_and_decoding_is_exact(tok, tiny_docs, positions):
    s = make_session(tok, tiny_cfg(positions=positions))
    s.kv.check_exact = True  # every sync is compared with a full recompute (fp32, 1e-4)
    prompt = text_of(20 * s.cfg.budget, tok, tiny_docs)
    n_prompt = len(tok.encode(prompt))
    assert n_prompt >= 20 * s.cfg.budget
    answer = s.generate(prompt, max_tokens=20)
    assert isinstance(answer, str)
    st = s.stats()
    assert n_prompt < st["num_tokens"] <= n_prompt + 20  # prompt and answer are in the memory
    assert st["wc_cost"] <= st["budget"] == 48
    check_invariants(s.wc, s.cfg, s.cfg.budget)
    # more turns: incremental ingest (refocus every K tokens) and decode stay exact and within budget
    for i in range(3):
        before = s.refocus_count
        n = s.ingest(tok.encode(tiny_docs[i])[:45])  # <= budget: appended a block at a time
        assert s.refocus_count - before >= n // s.K
        s.generate(" question", max_tokens=10, temperature=0.8, top_k=20, seed=i)
        assert s.stats()["wc_cost"] <= 48
    assert s.edit_count > 0 and s.kv.syncs > 30
    # decode is incremental: far fewer slots computed than one full recompute per token
    assert s.kv.recomputed < s.kv.syncs * s.cfg.budget / 2
    assert max(s.stats()["level_counts"]) >= 3  # a ~10k-token history reaches level 3 or above at K=4


def test_nll_matches_reference_and_does_not_append(tok, tiny_docs):
    s = make_session(tok)
    s.ingest_text(tiny_docs[0])
    before = s.stats()
    text = " the king and the queen of the castle"
    got = s.nll(text)
    assert s.stats() == before
    # reference: the materialized WC followed by the text's tokens as raw slots, one forward
    ids = tok.encode(text)
    mat = materialize(s.wc, s.tree, s.gpt.transformer.wte, s.cfg)
    x = torch.cat([mat.embeds[0], s.gpt.transformer.wte(torch.tensor(ids[:-1]))])[None]
    T = mat.embeds.size(1)
    with torch.no_grad():
        logits = s.gpt(inputs_embeds=x, pos=torch.arange(x.size(1), dtype=torch.float32)[None])[0]
    ref = torch.nn.functional.cross_entropy(logits[T - 1:], torch.tensor(ids)).item()
    assert abs(got - ref) < 1e-4
    assert 0 < got < 2 * np.log(tok.get_vocab_size())
    assert s.nll(text) == pytest.approx(got, abs=1e-6)  # repeatable: the cache was restored
    with pytest.raises(SessionError, match="budget"):
        s.nll(" king" * 200)


def test_chat_turns_are_rendered_into_memory(tok):
    s = make_session(tok)
    s.add_turn("user", "hello there")
    s.add_turn("assistant", "hi")
    n0 = s.num_tokens
    pieces = list(s.chat("what is the key?", max_tokens=5))
    ids = s.tree.tokens(0, s.num_tokens).tolist()
    sp = tok.encode_special
    assert ids[0] == tok.get_bos_token_id() and ids.count(sp("<|user_start|>")) == 2
    user = [sp("<|user_start|>")] + tok.encode("what is the key?") + [sp("<|user_end|>"), sp("<|assistant_start|>")]
    assert ids[n0:n0 + len(user)] == user
    assert ids[-1] == sp("<|assistant_end|>")  # the turn is closed even when max_tokens cut it
    answer = ids[n0 + len(user):]
    assert "".join(pieces) == tok.decode([t for t in answer if t != sp("<|assistant_end|>")])


def test_bad_inputs_raise_clear_errors(tok, tmp_path):
    s = make_session(tok)
    for bad in ("", "   ", []):
        with pytest.raises(ValueError, match="empty"):
            s.generate(bad)
    with pytest.raises(SessionError, match="memory is empty"):
        list(s.generate_ids(3))
    with pytest.raises(SessionError, match="no memory_dir"):
        s.save()
    with pytest.raises(UserError, match="outside the vocabulary"):
        s.ingest([10 ** 6])
    # a directory that holds something else is not silently reused
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("hi")
    with pytest.raises(SessionError, match="not empty"):
        make_session(tok, memory_dir=str(other))


def test_memory_identity_and_corruption_errors(tok, tiny_docs, tmp_path):
    d = str(tmp_path / "mem")
    s = make_session(tok, memory_dir=d)
    s.ingest_text(tiny_docs[1])
    s.save()
    s.close()
    with pytest.raises(SessionError, match="different model"):
        make_session(tok, seed=1, memory_dir=d)
    with pytest.raises(SessionError, match="block_size"):
        make_session(tok, cfg=tiny_cfg(block_size=8, tail_tokens=8), memory_dir=d)
    reopened = make_session(tok, memory_dir=d)  # same weights: fine
    assert reopened.stats()["num_tokens"] == s.stats()["num_tokens"]
    reopened.close()
    # corrupted session.json
    bad = str(tmp_path / "bad")
    shutil.copytree(d, bad)
    with open(os.path.join(bad, "session.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(SessionError, match="corrupted"):
        make_session(tok, memory_dir=bad)
    # session.json that claims more history than the tree holds
    state = json.load(open(os.path.join(d, "session.json")))
    state["wc"]["num_tokens"] += 1000
    bad2 = str(tmp_path / "bad2")
    shutil.copytree(d, bad2)
    json.dump(state, open(os.path.join(bad2, "session.json"), "w"))
    with pytest.raises(SessionError, match="corrupted"):
        make_session(tok, memory_dir=bad2)
    # a damaged tree file
    bad3 = str(tmp_path / "bad3")
    shutil.copytree(d, bad3)
    with open(os.path.join(bad3, "tree", "L0.ctx"), "r+b") as f:
        f.write(b"garbage!")
    with pytest.raises(UserError):
        make_session(tok, memory_dir=bad3)


def write_checkpoint(base, cfg, nets, source_dir="base_checkpoints", with_mc=True):
    from nanochat.checkpoint_manager import save_checkpoint
    gpt, gistnet, lensnet = nets
    model_data = {"gpt": gpt.state_dict()}
    meta = {"model_config": asdict(gpt.config), "step": 0}
    if with_mc:
        model_data.update(gistnet=gistnet.state_dict(), lensnet=lensnet.state_dict(),
                          reranker=Reranker(gpt.config.n_embd, cfg).state_dict())
        meta["mc_config"] = cfg.to_dict()
    save_checkpoint(os.path.join(base, source_dir, "d1"), 0, model_data, None, meta)


def test_load_needs_megacontext_weights(tok, tiny_base_env):
    cfg = tiny_cfg()
    write_checkpoint(tiny_base_env, cfg, tiny_nets(cfg, tok.get_vocab_size()), with_mc=False)
    with pytest.raises(UserError, match="has no MegaContext weights.*--mc"):
        MCSession.load(source="base", device="cpu")


CHILD = """
import json, sys
from megacontext.runtime import MCSession
s = MCSession.open(sys.argv[1], device="cpu")
stats = s.stats()
ids = list(s.generate_ids(max_tokens=int(sys.argv[2]), stop=False))
print(json.dumps({"stats": stats, "ids": ids, "after": s.stats()}))
"""


def test_near_kept_marks_only_gists_towards_the_kept_blocks():
    cfg = tiny_cfg()  # K = 4
    # level-2 region 0 (blocks 0-3), gist 4, raw 5 and 6, gists 7 and 8, the raw tail (blocks 9-12)
    wc = WorkingContext(np.array([2, 1, 0, 0, 1, 1, 0, 0, 0, 0]), np.array([0, 4, 5, 6, 7, 8, 9, 10, 11, 12]), 52)
    check_invariants(wc, cfg)
    # kept 6: only gist 7 (next to it) may still expand; the far region and gist 4 (next to the unkept raw 5)
    # may not, and raw entries never expand
    assert near_kept(wc, [6], 4).tolist() == [False, False, False, False, True, False, False, False, False, False]
    # kept block 2, folded into region 0 by a forced collapse: the region may open again towards it
    assert near_kept(wc, [6, 2], 4).tolist() == [True, False, False, False, True, False, False, False, False, False]


def test_reply_tokens_never_fold_the_blocks_focus_opened(tok):
    """The reply's tokens push a full WC over budget: the allocator must fold something else than the blocks
    focus opened for the question (it used to fold the block holding the answer)."""
    folded_without = 0
    for seed in range(4):
        s = make_session(tok, tiny_cfg(), seed=seed)
        s.ingest(np.random.default_rng(seed).integers(10, tok.get_vocab_size(), 12 * s.cfg.budget).tolist())
        kept = list(s.kept)
        assert kept and wc_cost(s.wc, s.K) > s.cfg.budget - (s.K - 1)  # focus opened blocks and filled the WC
        edits = s.edit_count
        for _ in s.generate_ids(12, stop=False):
            raw = set(s.wc.indices[s.wc.levels == 0].tolist())
            assert set(kept) <= raw and wc_cost(s.wc, s.K) <= s.cfg.budget
        assert s.edit_count > edits  # the allocator did fold something to make room
        s2 = make_session(tok, tiny_cfg(), seed=seed)  # the same without keeping: what the test guards against
        s2.ingest(np.random.default_rng(seed).integers(10, tok.get_vocab_size(), 12 * s.cfg.budget).tolist())
        s2.kept = []
        list(s2.generate_ids(12, stop=False))
        folded_without += not set(kept) <= set(s2.wc.indices[s2.wc.levels == 0].tolist())
    assert folded_without > 0


def test_reply_opens_blocks_only_next_to_what_focus_opened(tok, monkeypatch):
    """While the reply is written, the allocator's expansions go only towards the blocks focus opened for
    the message (their neighbours, or themselves after a forced fold), not to whatever LensNet likes."""
    import megacontext.focus as focus

    def elsewhere(n_seeds=4):
        """Blocks the reply opened raw that neither focus kept nor lie next to a kept block, over n_seeds."""
        out = 0
        for seed in range(n_seeds):
            s = make_session(tok, tiny_cfg(), seed=seed)
            s.ingest(np.random.default_rng(seed).integers(10, tok.get_vocab_size(), 12 * s.cfg.budget).tolist())
            near = {b + d for b in s.kept for d in (-1, 0, 1)}
            before, old = set(s.wc.indices[s.wc.levels == 0].tolist()), s.tree.num_tokens // s.K
            for _ in s.generate_ids(24, stop=False):
                raw = set(s.wc.indices[s.wc.levels == 0].tolist())
                out += len({b for b in raw - before - near if b < old})  # new tail blocks do not count
                before |= raw
        return out

    assert elsewhere() == 0
    monkeypatch.setattr(focus, "near_kept", lambda wc, kept, K: wc.levels >= 1)  # the rule off: every gist may open
    assert elsewhere() > 0, "the reply never opened a block elsewhere: this test cannot tell the rule from none"


def test_saved_session_continues_identically_in_a_new_process(tok, tiny_base_env, tiny_docs, tmp_path):
    cfg = tiny_cfg()
    write_checkpoint(tiny_base_env, cfg, tiny_nets(cfg, tok.get_vocab_size(), seed=7))
    d1, d2 = str(tmp_path / "mem"), str(tmp_path / "copy")
    s = MCSession.load(source="base", device="cpu", memory_dir=d1)
    s.ingest_text(text_of(3000, tok, tiny_docs))
    list(s.generate_ids(6, stop=False))
    s.ingest_text(tiny_docs[5][:50])  # ends mid-block: the refocus counter must persist too
    s.save()
    shutil.copytree(d1, d2)  # the snapshot the new process opens; s keeps going in d1
    saved = json.loads(json.dumps(s.stats()))
    ids = list(s.generate_ids(max_tokens=40, stop=False))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", CHILD, d2, "40"], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    child = json.loads(out.stdout.strip().splitlines()[-1])
    assert child["stats"] == saved
    assert child["ids"] == ids
    assert child["after"] == json.loads(json.dumps(s.stats()))
    assert saved["refocus_count"] > 0 and saved["wc_cost"] <= cfg.budget and saved["num_tokens"] >= 3000


def test_mc_bench_writes_the_documented_json(tmp_path, monkeypatch):
    from scripts import mc_bench
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    res = mc_bench.main(["--histories", "300,3000", "--depth", "1", "--vocab", "256", "--budget", "192",
                         "--decode-tokens", "8", "--rounds", "1", "--refocus-events", "2", "--full-kv-max", "1000",
                         "--device", "cpu"])
    out = json.load(open(tmp_path / "base" / "report" / "mc_bench.json"))
    assert out == json.loads(json.dumps(res))
    assert set(out["decode_ms_per_token"]) == {"300", "3000"}
    assert out["decode_ms_per_token"]["300"]["full_kv"] > 0 and out["decode_ms_per_token"]["3000"]["full_kv"] is None
    assert out["decode_ms_per_token"]["3000"]["megacontext"] > 0
    assert out["ingest_tok_per_s"] > 0 and out["refocus_speedup"] > 0 and set(out["rss_mb"]) == {"300", "3000"}
    assert out["decode_ratio_last_first"] > 0
    # L0 stores 4-byte ids; gists add 2 * 64 bytes per 32 tokens at level 1 (fp16): ~8 bytes/token
    assert 4 < out["bytes_per_token"] < 12
    assert all(w["wc_cost"] <= 192 for w in out["wc"].values())
    # side by side with plain KV decoding, and the refocus figures, at both ends
    v = out["decode_vs_plain"]
    assert v["history"] == 300 and min(v["megacontext"], v["full_kv"], v["window"]) > 0
    assert v["ratio_full_kv"] > 0 and v["ratio_window"] > 0 and 0 < v["window_slots"] <= 192
    assert out["config"]["source"] == "random-init"  # no SFT checkpoint in this base dir
    assert set(out["refocus"]) == {"300", "3000"}
    for r in out["refocus"].values():
        assert r["max_abs_logit_diff"] <= 1e-4 and 0 < r["slots_mean"] <= r["of"] and r["refocus_ms"] > 0
    assert out["refocus_slots_recomputed"]["mean"] == out["refocus"]["3000"]["slots_mean"]


def test_mc_bench_benchmarks_the_sft_checkpoint_when_there_is_one(tok, tiny_base_env, tmp_path):
    from scripts import mc_bench
    assert mc_bench.mc_checkpoint_source() is None
    cfg = tiny_cfg()
    write_checkpoint(tiny_base_env, cfg, tiny_nets(cfg, tok.get_vocab_size()), source_dir="chatsft_checkpoints",
                     with_mc=False)
    assert mc_bench.mc_checkpoint_source() is None  # a plain SFT checkpoint: random init
    write_checkpoint(tiny_base_env, cfg, tiny_nets(cfg, tok.get_vocab_size()), source_dir="chatsft_checkpoints")
    assert mc_bench.mc_checkpoint_source() == "sft"
    res = mc_bench.main(["--histories", "100,400", "--decode-tokens", "8", "--rounds", "1", "--ratio-rounds", "1",
                         "--refocus-events", "2", "--device", "cpu", "--no-report", "--out", str(tmp_path / "b.json")])
    assert res["config"]["source"] == "sft" and res["config"]["budget"] == cfg.budget  # the checkpoint's budget
    assert all(r["max_abs_logit_diff"] <= 1e-4 for r in res["refocus"].values())


def test_mc_bench_decodes_in_a_full_working_context(tmp_path, monkeypatch):
    # the ratio t(longest)/t(shortest) must time history lengths, not WC sizes: with the blocks focus kept still
    # held (the bench asks no question), a random-init LensNet never refilled the room focus left, and these
    # WCs stayed at 242 and 258 of 512 slots
    from scripts import mc_bench
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    res = mc_bench.main(["--histories", "1000,3000", "--depth", "1", "--vocab", "256", "--budget", "512",
                         "--decode-tokens", "40", "--rounds", "1", "--refocus-events", "2", "--full-kv-max", "0",
                         "--device", "cpu", "--no-report"])
    assert all(0.85 * 512 < w["wc_cost"] <= 512 for w in res["wc"].values()), res["wc"]
