"""dev/readme_results.py: the README's results table is written from an evaluation's JSON, with the commit."""
import json

import pytest

from nanochat.common import UserError


def result():
    cell = {"megacontext": 1.0, "bm25": 0.5, "truncation": 0.0, "full": None}
    ci = {"megacontext": {"n": 20, "ci": [0.8389, 1.0]}, "bm25": {"n": 20, "ci": [0.2993, 0.7007]},
          "truncation": {"n": 20, "ci": [0.0, 0.1611]}, "full": {"n": 0, "ci": None}}
    return {"config": {"commit": "abc1234", "source": "sft", "n_layer": 2, "budget": 256, "filler": "heldout",
                       "sequence_len": 256},
            "passkey": {"4": cell}, "intervals": {"passkey": {"4": ci}},
            "chat": {"chat_memory": {"acc": {"1": {"session": 0.9}}, "intervals": {"1": {"session": {"n": 10,
                                                                                                   "ci": [0.596, 0.9821]}}}}}}


def test_table_carries_the_commit_intervals_and_trials(tmp_path):
    from dev.readme_results import END, START, main, replace_block, results_markdown
    md = results_markdown(result())
    assert "commit `abc1234`" in md and "held-out" in md
    assert "| megacontext | 100.0% (84-100, n=20) |" in md and "| bm25 | 50.0% (30-70, n=20) |" in md
    assert "| full | - |" in md and "| session | 90.0% (60-98, n=10) |" in md
    assert "Multi-key" not in md  # not measured: no table
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{START}\nold table\n{END}\n\nafter\n")
    (tmp_path / "r.json").write_text(json.dumps(result()))
    args = ["--json", str(tmp_path / "r.json"), "--readme", str(readme)]
    with pytest.raises(SystemExit) as e:  # stale: --check fails
        main(args + ["--check"])
    assert e.value.code == 1
    main(args)
    text = readme.read_text()
    assert "old table" not in text and md in text and text.endswith(f"{END}\n\nafter\n")
    main(args + ["--check"])  # now up to date: no exit
    with pytest.raises(UserError, match="results:start"):
        replace_block("no markers here", md)


def bench():
    return {"config": {"source": "sft", "n_layer": 2, "budget": 256, "device": "cpu", "torch_threads": 2},
            "decode_ms_per_token": {"1000": {"megacontext": 1.4, "full_kv": 1.07},
                                    "1000000": {"megacontext": 1.69, "full_kv": None}},
            "decode_vs_plain": {"history": 1000, "rounds": 7, "ratio_full_kv": 1.36, "ratio_window": 1.54,
                                "window_slots": 499},
            "decode_ratio_last_first": 1.03, "ingest_tok_per_s": 63189.0, "bytes_per_token": 12.26,
            "refocus": {"1000": {"slots_mean": 121.0, "of": 482, "speedup": 2.45, "max_abs_logit_diff": 2.2e-08}}}


def test_cost_table_comes_from_the_same_runs_bench(tmp_path):
    from dev.readme_results import COST_END, COST_START, END, START, cost_markdown, main
    md = cost_markdown(bench(), "abc1234")
    assert "commit `abc1234`" in md  # the bench JSON has none: the evaluation's
    assert "| MegaContext | 1.40 | 1.69 |" in md and "| plain KV cache over the whole history | 1.07 | - |" in md
    assert "1.36x plain KV" in md and "t(1,000,000) / t(1,000) = 1.03" in md and "121 of 482 slots" in md
    readme = tmp_path / "README.md"
    readme.write_text(f"{START}\n{END}\n\n{COST_START}\nold\n{COST_END}\n")
    (tmp_path / "mc_eval.json").write_text(json.dumps(result()))
    (tmp_path / "mc_bench.json").write_text(json.dumps(bench()))
    main(["--json", str(tmp_path / "mc_eval.json"), "--readme", str(readme)])  # the bench beside the JSON
    text = readme.read_text()
    assert md in text and "old" not in text
    with pytest.raises(UserError, match="mc_bench"):
        main(["--json", str(tmp_path / "mc_eval.json"), "--readme", str(readme), "--bench", str(tmp_path / "no.json")])


def depth_bench(depth, width, mc, kv, window, speedup):
    return {"config": {"source": "random-init", "n_layer": depth, "n_embd": width, "budget": 512, "device": "cpu",
                       "torch_threads": 2, "commit": "def5678"},
            "decode_vs_plain": {"history": 1000, "rounds": 7, "megacontext": mc, "full_kv": kv, "window": window,
                                "ratio_full_kv": round(mc / kv, 3), "ratio_window": round(mc / window, 3),
                                "window_slots": 499},
            "refocus": {"1000": {"slots_mean": 90.0, "of": 482, "speedup": speedup, "max_abs_logit_diff": 4.7e-08}}}


def test_scale_table_lists_every_depth_bench_beside_the_json_in_depth_order(tmp_path):
    from dev.readme_results import COST_END, COST_START, END, SCALE_END, SCALE_START, START, main
    readme = tmp_path / "README.md"
    readme.write_text(f"{START}\n{END}\n\n{COST_START}\n{COST_END}\n\n{SCALE_START}\nold\n{SCALE_END}\n")
    (tmp_path / "mc_eval.json").write_text(json.dumps(result()))
    (tmp_path / "mc_bench_depth12.json").write_text(json.dumps(depth_bench(12, 768, 48.0, 48.3, 44.2, 3.32)))
    (tmp_path / "mc_bench_depth2.json").write_text(json.dumps(depth_bench(2, 128, 2.36, 1.91, 1.69, 2.25)))
    (tmp_path / "mc_bench_depth2.json.bak").write_text("not json")  # not a depth bench: ignored
    main(["--json", str(tmp_path / "mc_eval.json"), "--readme", str(readme)])
    text = readme.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| 2 |") or line.startswith("| 12 |")]
    assert rows == ["| 2 | 128 | 2.36 | 1.91 | 1.24x | 1.69 | 1.40x | 2.25x (5e-08) |",
                    "| 12 | 768 | 48.00 | 48.30 | 0.99x | 44.20 | 1.09x | 3.32x (5e-08) |"]
    assert "commit `def5678`" in text and "old" not in text
    main(["--json", str(tmp_path / "mc_eval.json"), "--readme", str(readme), "--check"])
