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
