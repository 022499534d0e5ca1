"""
wandb: `--run NAME` with WANDB_MODE=offline writes a run directory holding the logged metrics;
the default `--run dummy` never imports wandb (so it can never touch the network).
"""
import glob
import json
import os
import re
import struct
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_TRAIN = ["--depth=1", "--max-seq-len=32", "--device-batch-size=2", "--total-batch-size=64",
              "--num-iterations=4", "--eval-every=2", "--eval-tokens=128", "--sample-every=-1",
              "--device-type=cpu"]


def read_wandb_records(path):
    """
    The protobuf records of a .wandb file. The format is LevelDB's log: a 7-byte file header
    (':W&B', magic, version), then 32 KiB blocks of chunks with a 7-byte header (crc32, length,
    type: 1 full, 2 first, 3 middle, 4 last). wandb no longer ships a Python reader, so here is one.
    """
    from wandb.proto import wandb_internal_pb2 as pb
    block = 32768
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the rest of a block too small for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        chunk, pos = data[pos:pos + length], pos + length
        if kind == 0:  # zero padding at the end of a block
            continue
        if kind == 1:
            payload = chunk
        elif kind == 2:
            pending = chunk
            continue
        elif kind == 3:
            pending += chunk
            continue
        else:
            payload, pending = pending + chunk, b""
        record = pb.Record()
        record.ParseFromString(payload)
        yield record


def train(base, workdir, *extra, env_extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update({"NANOCHAT_BASE_DIR": base, "OMP_NUM_THREADS": "1", "WANDB_DIR": str(workdir),
                "PYTHONPATH": REPO + os.pathsep + env.get("PYTHONPATH", "")}, **(env_extra or {}))
    # run from workdir: wandb would otherwise drop ./wandb into the checkout
    return subprocess.run([sys.executable, "-m", "scripts.base_train", *TINY_TRAIN, *extra], cwd=str(workdir),
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_offline_run_logs_metrics(tiny_base_env, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    out = train(tiny_base_env, work, "--run=tiny-offline", env_extra={"WANDB_MODE": "offline"})
    assert out.returncode == 0, out.stderr[-3000:]
    runs = glob.glob(str(work / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1, f"expected one offline run directory, found {runs}"
    history, names = [], []
    for r in read_wandb_records(runs[0]):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            names.append((r.run.display_name, r.run.project))
        elif kind == "history":
            # keys with a "/" come as nested_key parts
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in r.history.item})
    assert ("tiny-offline", "nanochat") in names
    train_rows = [h for h in history if "train/loss" in h]
    assert [h["step"] for h in train_rows] == [1, 2, 3, 4]
    # wandb's own step is the training step: validation rows do not push the train rows along the x-axis
    assert all(h["_step"] == h["step"] for h in history if "step" in h), history
    assert len([h for h in history if "val/bpb" in h]) >= 2
    # the logged loss is the one the script printed
    printed = re.findall(r"step 00004/00004 .*?loss: ([0-9.]+)", out.stdout)
    assert printed, out.stdout[-2000:]
    assert abs(train_rows[-1]["train/loss"] - float(printed[-1])) < 1e-5


@pytest.mark.slow
def test_a_resumed_run_logs_to_the_same_wandb_run(tiny_base_env, tmp_path):
    """The checkpoint keeps the wandb run's id; a resumed training continues that run instead of opening another."""
    work = tmp_path / "work"
    work.mkdir()
    env = {"WANDB_MODE": "offline"}
    first = train(tiny_base_env, work, "--run=tiny-resume", "--save-every=2", "--model-tag=wresume", env_extra=env)
    assert first.returncode == 0, first.stderr[-3000:]
    again = train(tiny_base_env, work, "--run=tiny-resume", "--save-every=2", "--model-tag=wresume", "--resume=2",
                  env_extra=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout
    runs = sorted(glob.glob(str(work / "wandb" / "offline-run-*")))
    assert len(runs) == 2, runs
    ids = {os.path.basename(r).rsplit("-", 1)[1] for r in runs}
    assert len(ids) == 1, runs  # both directories belong to one run id
    with open(os.path.join(tiny_base_env, "base_checkpoints", "wresume", "meta_000004.json")) as f:
        assert json.load(f)["loop_state"]["wandb_id"] == ids.pop()


@pytest.mark.slow
def test_a_named_run_without_credentials_logs_offline_instead_of_prompting(tiny_base_env, tmp_path):
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()  # no ~/.netrc: `wandb login` never ran here
    out = train(tiny_base_env, work, "--run=no-key", "--num-iterations=1", env_extra={"HOME": str(home)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "no credentials" in out.stdout and "wandb sync" in out.stdout
    assert len(glob.glob(str(work / "wandb" / "offline-run-*"))) == 1


@pytest.mark.slow
def test_dummy_run_never_imports_wandb(tiny_base_env, tmp_path):
    # a trap: a `wandb` package first on the path that fails loudly if anything imports it
    trap = tmp_path / "trap" / "wandb"
    trap.mkdir(parents=True)
    (trap / "__init__.py").write_text('raise ImportError("TRAP: wandb was imported during a --run=dummy run")\n')
    work = tmp_path / "work"
    work.mkdir()
    env_extra = {"PYTHONPATH": os.pathsep.join([str(trap.parent), REPO]), "WANDB_MODE": "online"}
    out = train(tiny_base_env, work, env_extra=env_extra)  # default --run is dummy
    assert out.returncode == 0, out.stderr[-3000:]
    assert "TRAP" not in out.stderr
    assert not (work / "wandb").exists()
    # and the trap itself works: naming a run does reach for wandb
    out = train(tiny_base_env, work, "--run=named", "--num-iterations=1", env_extra=env_extra)
    assert out.returncode != 0 and "TRAP: wandb was imported" in out.stderr
