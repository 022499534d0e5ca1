"""The report card: sections written incrementally, assembled in pipeline order, summary + timings."""
import datetime
import os
import subprocess
import sys

import pytest

import nanochat.report as report_mod
from nanochat.report import Report, get_report, parse_section, render_section, slugify, markdown_table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def clock(monkeypatch):
    """A controllable clock for the report's timestamps (so durations are exact)."""
    t = {"now": datetime.datetime(2025, 1, 1, 12, 0, 0)}
    monkeypatch.setattr(report_mod, "_now", lambda: t["now"])

    def advance(**kw):
        t["now"] += datetime.timedelta(**kw)
    return advance


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.delenv("RANK", raising=False)
    return tmp_path


def test_section_round_trip():
    ts = datetime.datetime(2025, 3, 4, 5, 6, 7)
    text = render_section("Chat evaluation sft", [{"ARC-Easy": 0.3125, "steps": 12}, "free **markdown**"], ts)
    title, parsed_ts, metrics = parse_section(text)
    assert title == "Chat evaluation sft"
    assert parsed_ts == ts
    assert metrics == {"ARC-Easy": "0.3125", "steps": "12"}
    assert "free **markdown**" in text
    assert slugify("Chat evaluation sft") == "chat-evaluation-sft"


def test_markdown_table():
    t = markdown_table(["a", "b"], [[1, 0.5], ["x", 123456]])
    assert t.splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.5000 |", "| x | 123,456 |"]


def test_full_report(base_dir, clock):
    r = get_report()
    assert isinstance(r, Report)
    r.reset()
    assert (base_dir / "report" / "header.md").exists()
    # stages log out of pipeline order; generate must reorder them
    clock(minutes=30)
    r.log("Base model training", [{"depth": 2, "Minimum validation bpb": 1.25, "matrix_lr": 0.02}])
    clock(minutes=5)
    r.log("Chat evaluation sft", [{"ARC-Easy": 0.31, "num_samples": 100}])
    clock(seconds=90)
    r.log("Chat evaluation mid", {"ARC-Easy": 0.29, "GSM8K": 0.01})
    clock(minutes=1)
    r.log("Tokenizer training", [{"vocab_size": 512}])
    r.log("Something new", ["hello"])
    path = r.generate()
    assert path == str(base_dir / "report" / "report.md")
    text = open(path).read()

    # header: environment
    import torch
    assert text.startswith("# nanochat + MegaContext training report")
    for needle in ("Commit:", "Platform:", "CPUs:", "GPUs:", f"PyTorch: {torch.__version__}"):
        assert needle in text
    # fixed pipeline order, unknown sections after the known ones, summary last
    order = [text.index(f"## {s}") for s in ("Environment", "Tokenizer training", "Base model training",
                                             "Chat evaluation mid", "Chat evaluation sft", "Something new",
                                             "Summary")]
    assert order == sorted(order)
    summary = text[text.index("## Summary"):]
    # metrics table: rows are metrics, columns are stages; settings are not metrics
    assert "| Metric | BASE | MID | SFT |" in summary
    assert "| ARC-Easy | - | 0.2900 | 0.3100 |" in summary
    assert "| GSM8K | - | 0.0100 | - |" in summary
    assert "| Minimum validation bpb | 1.2500 | - | - |" in summary
    for not_metric in ("depth", "matrix_lr", "num_samples", "vocab_size"):
        assert f"| {not_metric} |" not in summary
    # timings: each stage's duration is the time since the previous event
    assert "| Base model training | 2025-01-01 12:30:00 | 30m00s |" in summary
    assert "| Chat evaluation sft | 2025-01-01 12:35:00 | 5m00s |" in summary
    assert "| Chat evaluation mid | 2025-01-01 12:36:30 | 1m30s |" in summary
    assert "Total wall clock time: 37m30s" in summary


def test_relog_overwrites_and_reset_clears(base_dir, clock):
    r = get_report()
    r.reset()
    r.log("Chat evaluation sft", {"ARC-Easy": 0.1})
    r.log("Chat evaluation sft", {"ARC-Easy": 0.2})  # a re-run of the stage replaces its section
    text = open(r.generate()).read()
    assert text.count("## Chat evaluation sft") == 1 and "0.2000" in text and "0.1000" not in text
    r.reset()
    assert sorted(os.listdir(base_dir / "report")) == ["header.md"]
    text = open(r.generate()).read()
    assert "Chat evaluation sft" not in text and "no evaluation metrics logged yet" in text


def test_generate_without_reset(base_dir, clock):
    r = get_report()
    r.log("Base model loss", {"val bpb": 1.5})
    text = open(r.generate()).read()
    assert "run started: unknown" in text and "| val bpb | 1.5000 |" in text
    assert "Total wall clock time: unknown" in text


def test_non_master_rank_writes_nothing(base_dir, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    r = get_report()
    r.log("Chat evaluation sft", {"x": 1})
    r.reset()
    assert not (base_dir / "report").exists()


def test_cli(base_dir, capsys):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "nanochat.report", "reset"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (base_dir / "report" / "header.md").exists()
    Report(str(base_dir / "report")).log("Chat SFT", {"val loss": 2.0})
    report_mod.main(["generate"])  # the same entry point, in-process (a torch import is slow here)
    assert "## Chat SFT" in (base_dir / "report" / "report.md").read_text()
    with pytest.raises(SystemExit) as e:
        report_mod.main(["bogus"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
