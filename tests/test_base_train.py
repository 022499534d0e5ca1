"""
Base training end to end on the tiny offline corpus (subprocesses, as a user runs them): the loss
falls, `--resume` continues the loss curve exactly, base_loss reads the checkpoint and beats the
unigram baseline, torchrun with 2 gloo ranks keeps the ranks in sync, and missing inputs end in one
clear line. Plus the bits-per-byte arithmetic against a reference computation.
"""
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from nanochat.loss_eval import evaluate_bpb, unigram_bpb, unigram_bpb_from_counts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--depth=1", "--aspect-ratio=32", "--head-dim=16", "--max-seq-len=64", "--device-batch-size=4",
        "--sample-every=-1", "--eval-tokens=1024"]


def run_script(module, args, base_dir, torchrun=0, timeout=240):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), OMP_NUM_THREADS="1", WANDB_MODE="disabled",
               HF_HUB_OFFLINE="1")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
    cmd = launcher + ["-m", module] + (["--"] if torchrun else []) + list(args)  # as dev/pipeline_lib.sh launches
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def step_losses(stdout):
    return {int(m.group(1)): float(m.group(2))
            for m in re.finditer(r"^step (\d+)/\d+ .*?\| loss: ([0-9.]+)", stdout, re.M)}


def assert_one_line_error(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


# ----------------------------------------------------------------------------- bits per byte

class TableModel:
    """A 'model' whose per-position loss is a fixed function of the target: loss = 0.1 * (y + 1)."""

    def __call__(self, x, y, loss_reduction="mean"):
        assert loss_reduction == "none"
        return torch.where(y >= 0, 0.1 * (y.float() + 1), torch.zeros_like(y, dtype=torch.float32))


def test_evaluate_bpb_matches_reference():
    token_bytes = torch.tensor([0, 1, 2, 3, 1])  # token 0 is special (0 bytes)
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        y = torch.randint(0, 5, (2, 6), generator=gen)
        y[0, 0] = -1  # ignored target
        batches.append((torch.zeros_like(y), y, {"state": 0}))
    nats = nbytes = 0.0
    for _, y, _ in batches:
        for t in y.flatten().tolist():
            if t >= 0 and token_bytes[t] > 0:
                nats += 0.1 * (t + 1)
                nbytes += token_bytes[t].item()
    expected = nats / (math.log(2) * nbytes)
    got = evaluate_bpb(TableModel(), iter(batches), 3, token_bytes)
    assert got == pytest.approx(expected, rel=1e-6)  # the per-token losses are fp32
    # only the first `steps` batches count
    assert evaluate_bpb(TableModel(), iter(batches), 1, token_bytes) != pytest.approx(expected)


def test_unigram_bpb_matches_reference():
    token_bytes = torch.tensor([0, 1, 2, 4])
    train = [(None, torch.tensor([[1, 1, 1, 2, 0, 3]]))]
    val = [(None, torch.tensor([[1, 2, 3, 0, -1]]))]
    counts = torch.tensor([1.0, 3, 1, 1])
    probs = (counts + 0.5) / (counts.sum() + 0.5 * 4)
    nats = -(math.log(probs[1]) + math.log(probs[2]) + math.log(probs[3]))  # token 0 and -1 not scored
    expected = nats / (math.log(2) * (1 + 2 + 4))
    assert unigram_bpb(train, val, 1, 1, token_bytes, alpha=0.5) == pytest.approx(expected, rel=1e-9)
    # a model that knows the val distribution beats a uniform one
    assert unigram_bpb_from_counts(torch.tensor([0.0, 1, 1, 1]), torch.tensor([0.0, 1, 1, 1]), token_bytes, 0.0) < \
        unigram_bpb_from_counts(torch.zeros(4), torch.tensor([0.0, 1, 1, 1]), token_bytes, 1.0)


# ----------------------------------------------------------------------------- the script

def test_lr_schedule():
    from scripts.base_train import lr_multiplier, muon_momentum
    lrm = [lr_multiplier(i, 10, 0.2, 0.4, 0.1) for i in range(11)]
    assert lrm[0] == 0.5 and lrm[1] == 1.0 and lrm[6] == 1.0
    assert lrm[10] == pytest.approx(0.1) and all(a >= b for a, b in zip(lrm[2:], lrm[3:]))
    assert muon_momentum(0) == 0.85 and muon_momentum(300) == pytest.approx(0.95)


TRAIN_ARGS = TINY + ["--total-batch-size=512", "--num-iterations=8", "--eval-every=4", "--save-every=4"]


@pytest.fixture(scope="module")
def trained(tiny_base_dir, tmp_path_factory):
    """One 8-step training run (checkpoints at 4 and 8) in a module-wide base dir: (base_dir, stdout)."""
    base = tmp_path_factory.mktemp("trained")
    for sub in ("base_data", "tokenizer"):
        shutil.copytree(os.path.join(tiny_base_dir, sub), base / sub)
    proc = run_script("scripts.base_train", TRAIN_ARGS, base)
    assert proc.returncode == 0, proc.stderr
    return str(base), proc.stdout


def val_bpbs(stdout):
    return [float(v) for v in re.findall(r"^step \d+ \| val bpb: ([0-9.]+)", stdout, re.M)]


def test_training_learns_and_checkpoints(trained):
    base, stdout = trained
    losses = step_losses(stdout)
    assert sorted(losses) == list(range(1, 9))
    assert losses[1] == pytest.approx(math.log(512), abs=0.05)  # fresh model: uniform prediction
    assert losses[8] < losses[1] - 0.5  # it learns
    ckpt = os.path.join(base, "base_checkpoints", "d1")
    assert {"model_000004.pt", "model_000008.pt", "meta_000008.json", "optim_000004_rank0.pt"} <= set(os.listdir(ckpt))
    bpb = val_bpbs(stdout)
    assert len(bpb) == 3 and bpb[-1] < bpb[0]  # evaluated at steps 0, 4, 8
    with open(os.path.join(ckpt, "meta_000008.json")) as f:
        meta = json.load(f)
    # the final checkpoint is saved before the final evaluation, then its meta gets the result
    assert meta["step"] == 8 and meta["val_bpb"] == pytest.approx(bpb[-1], abs=1e-6)
    assert len(meta["dataloader_state"]) == 1
    with open(os.path.join(base, "report", "base-model-training.md")) as f:
        assert "Minimum validation bpb" in f.read()


def test_resume_continues_the_loss_curve(trained):
    base, stdout = trained
    proc = run_script("scripts.base_train", TRAIN_ARGS + ["--resume=4"], base)
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in proc.stdout
    losses, resumed = step_losses(stdout), step_losses(proc.stdout)
    assert sorted(resumed) == [5, 6, 7, 8]
    for s in resumed:
        assert abs(resumed[s] - losses[s]) <= 1e-4, (s, resumed[s], losses[s])
    assert abs(val_bpbs(proc.stdout)[-1] - val_bpbs(stdout)[-1]) <= 1e-5


def test_base_loss_beats_unigram(trained):
    base, _ = trained
    out = run_script("scripts.base_loss", ["--device-batch-size=4", "--split-tokens=2048", "--max-tokens=4"], base)
    assert out.returncode == 0, out.stderr
    m = re.search(r"model val bpb ([0-9.]+) vs unigram ([0-9.]+)", out.stdout)
    assert m and float(m.group(1)) < float(m.group(2)), out.stdout
    with open(os.path.join(base, "report", "base-model-loss.md")) as f:
        assert "unigram bpb" in f.read()


@pytest.mark.slow
def test_torchrun_two_gloo_ranks_agree_and_resume(tiny_base_env):
    args = TINY + ["--total-batch-size=512", "--num-iterations=4", "--eval-every=0", "--save-every=2",
                   "--model-tag=ddp"]
    final = r"rank (\d)/2 \| final train loss: (\S+) \| param checksum: (\S+)"
    proc = run_script("scripts.base_train", args, tiny_base_env, torchrun=2)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "4 x 64 x 2 ranks x 1 accumulation" in proc.stdout, proc.stdout
    finals = sorted(re.findall(final, proc.stdout))
    assert [r for r, _, _ in finals] == ["0", "1"], proc.stdout
    assert finals[0][1:] == finals[1][1:], proc.stdout  # same loss, bit-identical weights on both ranks
    ckpt = os.path.join(tiny_base_env, "base_checkpoints", "ddp")
    assert {"optim_000004_rank0.pt", "optim_000004_rank1.pt", "model_000004.pt"} <= set(os.listdir(ckpt)), proc.stdout
    # each rank resumes its own data position: the same losses and the same final weights
    again = run_script("scripts.base_train", args + ["--resume=2"], tiny_base_env, torchrun=2)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    losses, resumed = step_losses(proc.stdout), step_losses(again.stdout)
    assert sorted(resumed) == [3, 4], again.stdout
    for s in resumed:
        assert abs(resumed[s] - losses[s]) <= 1e-4, (proc.stdout, again.stdout)
    assert sorted(re.findall(final, again.stdout)) == finals, (proc.stdout, again.stdout)


@pytest.mark.parametrize("case", ["no_tokenizer", "no_shards", "no_checkpoint_resume", "no_checkpoint_loss"])
def test_missing_inputs_end_in_one_line(case, tiny_base_env, tmp_path):
    args = TINY + ["--total-batch-size=-1", "--num-iterations=2"]
    if case == "no_tokenizer":
        empty = tmp_path / "empty"
        empty.mkdir()
        assert_one_line_error(run_script("scripts.base_train", args, empty), "tok_train")
    elif case == "no_shards":
        shutil.rmtree(os.path.join(tiny_base_env, "base_data"))
        assert_one_line_error(run_script("scripts.base_train", args, tiny_base_env), "nanochat.dataset")
    elif case == "no_checkpoint_resume":
        assert_one_line_error(run_script("scripts.base_train", args + ["--resume"], tiny_base_env),
                              "base_checkpoints")
    else:
        assert_one_line_error(run_script("scripts.base_loss", [], tiny_base_env), "base_checkpoints", "base_train")
