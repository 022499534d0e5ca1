"""
run10.sh / speedrun.sh / run1000.sh: `--dry-run` prints the plan and runs nothing; every module the
plan runs exists, its --help works, and it accepts every flag the plan passes it; MegaContext is on unless
--no-mc; `--smoke` runs the very pipeline at toy size on this CPU (2 torchrun ranks over gloo), and a second
run skips every finished stage.
"""
import json
import re
import os
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["run10.sh", "speedrun.sh", "run1000.sh"]
STAGES = ["nanochat.report reset", "scripts.tok_train", "scripts.tok_eval", "scripts.base_train",
          "scripts.base_loss", "scripts.base_eval", "scripts.mid_train", "scripts.chat_eval --source=mid",
          "scripts.chat_sft", "scripts.chat_eval --source=sft", "scripts.mc_eval", "scripts.mc_bench",
          "nanochat.report generate"]


def dry_run(script, *args, tmp_path):
    home = tmp_path / "home"
    env = {**os.environ, "HOME": str(home), "NANOCHAT_BASE_DIR": str(tmp_path / "base"), "WANDB_RUN": "myrun"}
    out = subprocess.run(["bash", os.path.join(REPO, script), "--dry-run", *args], cwd=str(tmp_path), env=env,
                         capture_output=True, text=True, timeout=60)
    return out


def launched(words):
    """(module, the arguments it receives) of a `python -m X ...` / `torchrun ... -m X -- ...` command."""
    i = words.index("-m")
    args = words[i + 2:]
    return words[i + 1], args[1:] if args[:1] == ["--"] else args


def module_steps(plan):
    """(module, [flags]) for each `python -m X` / `torchrun ... -m X` line (the venv and pip lines aside)."""
    steps = []
    for line in plan.splitlines():
        words = shlex.split(line.rstrip("&"))
        if "-m" not in words or words[0] not in ("python", "torchrun"):
            continue
        module, args = launched(words)
        steps.append((module, [w.split("=")[0] for w in args if w.startswith("-")]))
    return steps


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plans")
    result = {}
    for script in SCRIPTS:
        out = dry_run(script, tmp_path=tmp)
        assert out.returncode == 0, f"{script} --dry-run failed:\n{out.stderr}"
        result[script] = out.stdout
    # a dry run creates nothing: no base dir, no home cache
    assert not (tmp / "base").exists() and not (tmp / "home").exists()
    return result


@pytest.mark.parametrize("script", SCRIPTS)
def test_plan_has_every_stage_in_order(plans, script):
    plan = plans[script]
    lines = plan.splitlines()
    positions = []
    for stage in STAGES:
        hits = [i for i, line in enumerate(lines) if stage in line.replace(" -- ", " ")]  # torchrun's "--"
        assert hits, f"{script}: no step for {stage!r} in the plan:\n{plan}"
        positions.append(hits[0])
    assert positions == sorted(positions), f"{script}: stages out of order:\n{plan}"
    # set-up before anything runs: venv, torch before the package, base dir exported
    torch_line = next(i for i, line in enumerate(lines) if line.startswith(".venv/bin/pip install torch=="))
    assert torch_line < lines.index(".venv/bin/pip install -e .")  # a pinned build, never "whatever is newest"
    assert any(line.startswith("export NANOCHAT_BASE_DIR=") for line in lines)
    assert lines.index("wait") < positions[STAGES.index("scripts.base_train")]  # data complete before training
    # the wandb run name from the environment reaches every training command
    for stage in ("scripts.base_train", "scripts.mid_train", "scripts.chat_sft", "scripts.mc_eval"):
        assert "--run=myrun" in lines[positions[STAGES.index(stage)]]
    # an interrupted training stage continues from its last checkpoint when the script runs again
    for stage in ("scripts.base_train", "scripts.mid_train", "scripts.chat_sft"):
        assert "--resume=auto" in lines[positions[STAGES.index(stage)]]
    # MegaContext by default: every training stage, and the evaluation and benchmark of the trained model
    for stage in ("scripts.base_train", "scripts.mid_train", "scripts.chat_sft"):
        assert "--mc" in shlex.split(lines[positions[STAGES.index(stage)]])
    assert "--baselines-only" not in lines[positions[STAGES.index("scripts.mc_eval")]]
    assert "--source=sft" in lines[positions[STAGES.index("scripts.mc_bench")]]


def test_gpu_counts_and_sizes(plans):
    def base_train_line(script):
        return next(line for line in plans[script].splitlines() if "scripts.base_train" in line)
    assert base_train_line("run10.sh").startswith("python -m scripts.base_train")
    for script, depth in (("speedrun.sh", 20), ("run1000.sh", 32)):
        line = base_train_line(script)
        assert line.startswith("torchrun --standalone --nproc_per_node=8 -m scripts.base_train")
        assert f"--depth={depth}" in line
    assert "--depth=10" in base_train_line("run10.sh")


def test_torchrun_hands_every_flag_to_the_module(plans):
    """torchrun's own parser reads options after `-m MODULE` too (it took --run=NAME for its --run-path and
    stopped every multi-GPU run): each torchrun line must give the module exactly the plan's flags."""
    from torch.distributed.run import get_args_parser
    lines = [shlex.split(line.rstrip("&")) for script in SCRIPTS for line in plans[script].splitlines()
             if line.startswith("torchrun ")]
    assert any("--run=myrun" in words for words in lines)
    for words in lines:
        module, want = launched(words)
        args = get_args_parser().parse_args(words[1:])
        assert args.module and args.training_script == module
        assert args.training_script_args == want, words


def test_every_step_runs_help_and_accepts_its_flags(plans):
    steps = [s for script in SCRIPTS for s in module_steps(plans[script])]
    modules = sorted({m for m, _ in steps})
    assert {"scripts.tok_train", "scripts.base_train", "scripts.chat_sft", "nanochat.report"} <= set(modules)
    # one interpreter runs every module's --help (torch is imported once, not once per module)
    probe = (
        "import contextlib, io, json, runpy, sys\n"
        "res = {}\n"
        "for mod in json.loads(sys.argv[1]):\n"
        "    sys.argv = [mod, '--help']\n"
        "    buf = io.StringIO()\n"
        "    code = 'no exit'\n"
        "    try:\n"
        "        with contextlib.redirect_stdout(buf):\n"
        "            runpy.run_module(mod, run_name='__main__', alter_sys=True)\n"
        "    except SystemExit as e:\n"
        "        code = e.code or 0\n"
        "    except Exception as e:\n"
        "        code = repr(e)\n"
        "    res[mod] = [code, buf.getvalue()]\n"
        "print(json.dumps(res))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", probe, json.dumps(modules)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    for mod in modules:
        code, help_text = results[mod]
        assert code == 0, f"python -m {mod} --help exited with {code}"
        assert "usage:" in help_text
    for mod, flags in steps:
        for flag in flags:
            assert re.search(re.escape(flag) + r"(?![\w-])", results[mod][1]), \
                f"the plan passes {flag} to {mod}, whose --help does not list it"


def test_no_mc_and_bad_arguments(tmp_path):
    for script in SCRIPTS:
        mc, plain = dry_run(script, tmp_path=tmp_path), dry_run(script, "--no-mc", tmp_path=tmp_path)
        assert plain.returncode == 0, plain.stderr
        assert dry_run(script, "--mc", tmp_path=tmp_path).stdout == mc.stdout  # --mc: the default, spelled out
        # --no-mc keeps the whole pipeline but the benchmark of a MegaContext model it does not have
        assert [m for m, _ in module_steps(plain.stdout)] == [m for m, _ in module_steps(mc.stdout)
                                                             if m != "scripts.mc_bench"]
        assert not any(w.startswith("--mc") for line in plain.stdout.splitlines() for w in shlex.split(line))
        assert "--baselines-only" in next(line for line in plain.stdout.splitlines() if "scripts.mc_eval" in line)
        assert "nanochat.report generate" in plain.stdout.splitlines()[-1]
        # with MegaContext: --mc and the memory dials only (each flag once: the run script's own
        # --device-batch-size is dropped, not left for argparse to override); no list of knobs
        for mod, want in (("scripts.base_train", ["--mc", "--device-batch-size", "--mc-train-row-share"]),
                          ("scripts.mid_train", ["--mc", "--device-batch-size"]), ("scripts.chat_sft", ["--mc"])):
            words = next(shlex.split(line) for line in mc.stdout.splitlines() if f"-m {mod} " in line)
            mc_words = [w.split("=")[0] for w in words
                        if w.startswith("--mc") or (w.startswith("--device-batch") and mod != "scripts.chat_sft")]
            assert mc_words == want, (script, mod, words)
        bad = dry_run(script, "--nope", tmp_path=tmp_path)
        assert bad.returncode == 2 and "unknown argument: --nope" in bad.stderr
    h = subprocess.run(["bash", os.path.join(REPO, "speedrun.sh"), "--help"], capture_output=True, text=True, timeout=30)
    assert h.returncode == 0 and all(f in h.stdout for f in ("--dry-run", "--no-mc", "--smoke", "--restart"))


def test_smoke_plan_is_the_pipeline_on_two_cpu_ranks(tmp_path):
    plan = dry_run("speedrun.sh", "--smoke", tmp_path=tmp_path)
    assert plan.returncode == 0, plan.stderr
    lines = plan.stdout.splitlines()
    assert "source dev/setup.sh" in lines and not any("pip install torch==" in line for line in lines)
    assert any("nanochat.dataset --offline" in line for line in lines)
    train = [line for line in lines if "scripts.base_train" in line or "scripts.mid_train" in line]
    assert train and all(line.startswith("torchrun --standalone --nproc_per_node=2 ") for line in train)
    full = dry_run("speedrun.sh", tmp_path=tmp_path).stdout
    assert {m for m, _ in module_steps(plan.stdout)} == {m for m, _ in module_steps(full)}  # every stage


def _bin_dir(tmp_path, gpus):
    """A PATH holding only what the scripts' machine check needs, plus a fake nvidia-smi listing
    `gpus` GPUs (none at all when gpus is None)."""
    import shutil
    b = tmp_path / f"bin{gpus}"
    b.mkdir()
    for tool in ("dirname", "grep"):
        os.symlink(shutil.which(tool), b / tool)
    if gpus is not None:
        lines = "".join(f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i})\\n" for i in range(gpus))
        (b / "nvidia-smi").write_text(f"#!{shutil.which('bash')}\nprintf '{lines}'\n")
        (b / "nvidia-smi").chmod(0o755)
    return str(b)


@pytest.mark.parametrize("gpus, message", [(None, "no NVIDIA GPU found"),
                                           (1, "speedrun.sh uses 8 GPUs but this machine has 1")])
def test_real_run_checks_the_gpus_first(tmp_path, gpus, message):
    """Without --dry-run, a machine without enough GPUs is refused at once, with one clear line."""
    import shutil
    env = {"PATH": _bin_dir(tmp_path, gpus), "HOME": str(tmp_path), "NANOCHAT_BASE_DIR": str(tmp_path / "b")}
    out = subprocess.run([shutil.which("bash"), os.path.join(REPO, "speedrun.sh")], cwd=str(tmp_path), env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert not (tmp_path / "b").exists()


def smoke(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "OMP_"))}
    env.update({"NANOCHAT_BASE_DIR": str(tmp_path / "base"), "HF_HUB_OFFLINE": "1"})
    return subprocess.run(["bash", os.path.join(REPO, "speedrun.sh"), "--smoke", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("mc", [True, False], ids=["mc", "no-mc"])
def test_smoke_runs_the_gpu_pipeline_on_cpu_and_a_rerun_skips_every_stage(tmp_path, mc):
    out = smoke(tmp_path, *([] if mc else ["--no-mc"]))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    report = (tmp_path / "base" / "report" / "report.md").read_text()
    for section in ("Base model training", "Midtraining", "Chat SFT", "MegaContext evaluation"):
        assert section in report, section
    assert ("MegaContext benchmark" in report) == mc
    ev = json.loads((tmp_path / "base" / "report" / "mc_eval.json").read_text())
    assert ev["config"]["mc_weights"] == mc and ev["passkey"]["4"]["truncation"] is not None
    assert (ev["passkey"]["4"].get("megacontext") is not None) == mc
    again = smoke(tmp_path, *([] if mc else ["--no-mc"]))
    assert again.returncode == 0, again.stderr[-3000:]
    skipped = re.findall(r"skip (\S+): finished in an earlier run", again.stderr)
    assert {"tokenizer", "base-train", "mid-train", "sft", "mc-eval"} <= set(skipped), again.stderr[-3000:]
    assert "+ torchrun" not in again.stderr  # nothing trained again
    other = smoke(tmp_path, *(["--no-mc"] if mc else []))  # the other plan in the same base dir: refused
    assert other.returncode == 2 and "other settings" in other.stderr
