"""
Every training stage survives a preemption: SIGTERM (or Ctrl-C) stops it after the current step with a
checkpoint of that step (status 143 / 130, no traceback), and `--resume=auto` continues from it to the
same losses and weights as the uninterrupted run (CPU, OMP_NUM_THREADS=1: bit for bit). `--resume=auto`
starts afresh without a checkpoint and does nothing, touching nothing, once the stage finished. A checkpoint
written by an incompatible run is refused in one line.
"""
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from nanochat.common import UserError
from test_base_train import REPO, assert_one_line_error, run_script
from test_mc_train import MC, MID, SFT, TINY, base_mc
from test_mid_train import make_base_checkpoint


def step_losses(stdout):
    """{step: the loss as printed} from the step lines of any stage (printed to 6 decimals)."""
    pattern = r"^step (\d+)(?:/\d+)? .*?\| loss: ([0-9.]+)"
    return {int(m.group(1)): m.group(2) for m in re.finditer(pattern, stdout, re.M)}


def worker_pid(parent, rank):
    """The pid of torchrun's worker of that rank (Linux /proc: a child of `parent` with RANK=rank)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if ppid == parent and f"RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no worker of rank {rank} under pid {parent}")


def interrupt(module, args, base_dir, at_step, sig=signal.SIGTERM, timeout=240, torchrun=0, rank=0):
    """Run a script and send it `sig` once it printed the loss of step `at_step` (under torchrun: to the worker
    of `rank` only). Returns (returncode, stdout, stderr)."""
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), OMP_NUM_THREADS="1", WANDB_MODE="disabled",
               HF_HUB_OFFLINE="1")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
    cmd = launcher + ["-m", module] + (["--"] if torchrun else []) + list(args)
    err_path = os.path.join(base_dir, f"stderr_{module}.txt")  # a file: a full stderr pipe could block the child
    with open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        out = []
        for line in proc.stdout:
            out.append(line)
            if re.match(rf"step 0*{at_step}(/\d+)? .*\| loss: ", line):
                os.kill(worker_pid(proc.pid, rank) if torchrun else proc.pid, sig)
                break
        out.append(proc.stdout.read())
        proc.wait(timeout=timeout)
    with open(err_path) as f:
        stderr = f.read()
    os.remove(err_path)
    return proc.returncode, "".join(out), stderr


def stopped_step(rc, stdout, stderr, sig=signal.SIGTERM, torchrun=False):
    """The step a stopped run saved, after checking its exit status and its one line about it. (torchrun reports
    its workers' status 143 as a failure of its own, with its traceback.)"""
    if not torchrun:
        assert rc == 128 + sig, (rc, stdout[-2000:], stderr[-3000:])
        assert "Traceback" not in stderr, stderr
    m = re.search(rf"^stopped by {sig.name}: saved (\S+) step (\d+); to resume, run the same command with "
                  r"--resume=auto$", stdout, re.M)
    assert m, stdout[-2000:]
    return m.group(1), int(m.group(2))


def load_weights(ckpt_dir, step):
    from nanochat.checkpoint_manager import load_checkpoint
    return load_checkpoint(ckpt_dir, step, torch.device("cpu"))[0]


def assert_same_weights(a, b):
    assert set(a) == set(b)
    for name in a:
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), (name, k)


def mtimes(root):
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, files in os.walk(root) for f in files}


def check_preempted_run_resumes_exactly(module, args, base, stage_dir, n, stops):
    """The uninterrupted run of n steps, then the same run with --resume=auto, stopped by SIGTERM once it printed
    each step of `stops` and started again: every piece logs the uninterrupted losses of its steps, and the
    final weights are the uninterrupted ones. Returns (checkpoint dir, the uninterrupted stdout, the steps
    saved by the stops)."""
    ckpt = os.path.join(base, stage_dir, "d1")
    full = run_script(module, args, base)
    assert full.returncode == 0, full.stderr[-3000:]
    ref_losses, ref_weights = step_losses(full.stdout), load_weights(ckpt, n)
    assert sorted(ref_losses) == list(range(1, n + 1)), full.stdout[-3000:]
    for f in os.listdir(ckpt):
        os.remove(os.path.join(ckpt, f))

    saved = [0]
    for at_step in stops:
        rc, out, err = interrupt(module, args + ["--resume=auto"], base, at_step)
        where, j = stopped_step(rc, out, err)
        assert where == ckpt and at_step <= j < n
        assert os.path.exists(os.path.join(ckpt, f"model_{j:06d}.pt"))
        assert saved[-1] == 0 or f"resumed from {ckpt} step {saved[-1]}" in out
        assert step_losses(out) == {s: ref_losses[s] for s in range(saved[-1] + 1, j + 1)}
        saved.append(j)

    again = run_script(module, args + ["--resume=auto"], base)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {ckpt} step {saved[-1]}" in again.stdout
    assert step_losses(again.stdout) == {s: ref_losses[s] for s in range(saved[-1] + 1, n + 1)}
    assert_same_weights(load_weights(ckpt, n), ref_weights)
    return ckpt, full.stdout, saved[1:]


def test_graceful_stop_flags_then_lets_a_second_signal_through():
    # Python's own Ctrl-C handler before the run, whatever an earlier test in this process left installed
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _graceful_stop_signals()
    finally:
        signal.signal(signal.SIGINT, outer)


def _graceful_stop_signals():
    from nanochat.stopping import GracefulStop
    before = signal.getsignal(signal.SIGINT)
    with GracefulStop() as stop:
        assert stop.requested() == 0
        os.kill(os.getpid(), signal.SIGINT)  # Python runs the handler before the next bytecode
        assert stop.requested() == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):  # the second Ctrl-C quits at once
            os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(SystemExit) as e:
            stop.exit(signal.SIGINT, "saved nowhere", master=False)
        assert e.value.code == 130
    assert signal.getsignal(signal.SIGINT) is before
    with GracefulStop() as stop:  # SIGTERM: however many come, the run still stops after its step, with 143
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested() == signal.SIGTERM
        with pytest.raises(SystemExit) as e:
            stop.exit(stop.requested(), "saved nowhere", master=False)
        assert e.value.code == 143
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_resume_step_plans(tmp_path):
    from nanochat.checkpoint_manager import resume_step, save_checkpoint
    d = str(tmp_path)
    assert resume_step(d, None) == (None, False) and resume_step(d, "auto") == (None, False)
    with pytest.raises(UserError, match="no checkpoints"):
        resume_step(d, "last")
    with pytest.raises(UserError, match="auto, last or a step"):
        resume_step(d, "lats")
    save_checkpoint(d, 3, {"gpt": {}}, None, {"step": 3})
    save_checkpoint(d, 5, {"gpt": {}}, None, {"step": 5, "finished": True})
    assert resume_step(d, "auto") == (5, True) and resume_step(d, "last") == (5, False)
    assert resume_step(d, "3") == (3, False)


def test_base_train_sigterm_then_resume_auto(tiny_base_env):
    args = TINY[:3] + ["--max-seq-len=64", "--device-batch-size=4", "--total-batch-size=512", "--num-iterations=24",
                       "--sample-every=-1", "--eval-tokens=512", "--eval-every=0"]
    check_preempted_run_resumes_exactly("scripts.base_train", args, tiny_base_env, "base_checkpoints", 24, [3])


def test_mid_train_mc_sigterm_then_resume_auto(tiny_base_env):
    """--mc: stopped inside the copy warm-up, whose exit test (10 copy batches with a loss under 100 nats)
    passes after the resume, then stopped again among long-context rows, chat rows and pretraining text: the
    warm-up's state, the chat stream's position and the text loader's state all carry over."""
    base_mc(["--num-iterations=2", "--mc-train-plain-lm=0", "--eval-every=0"])
    # ~15 ms steps: 24 of them leave the signals time to arrive before the run ends
    args = MID + MC[:1] + ["--num-iterations=24", "--mc-mix-share=0.2", "--mc-mix-warmup=0.75",
                           "--mc-warmup-exit=100", "--mc-warmup-rows-mult=1", "--mc-mix-multiples=1,4",
                           "--mc-mix-batch-size=2", "--text-share=0.4", "--save-every=5",
                           "--keep-checkpoints=0"]  # the stops' checkpoints are read after the resumed run
    ckpt, ref, (j1, j2) = check_preempted_run_resumes_exactly("scripts.mid_train", args, tiny_base_env,
                                                              "mid_checkpoints", 24, [4, 17])
    done = int(re.search(r"copy warm-up done at step (\d+)", ref).group(1))
    assert j1 < done < j2  # the first stop is inside the warm-up, the second after it
    with open(os.path.join(ckpt, f"meta_{j2:06d}.json")) as f:
        state = json.load(f)["data_state"][0]
    assert state["chat_batches"] > 0 and state["text_state"]  # both streams had moved at the second stop
    with open(os.path.join(ckpt, "meta_000024.json")) as f:
        meta = json.load(f)
    assert meta["finished"] and meta["loop_state"]["warm_done"] and meta["loop_state"]["mc_rows"] > 0


def test_chat_sft_sigterm_resume_auto_then_nothing_to_do(tiny_base_env):
    make_base_checkpoint(tiny_base_env, seq_len=192)
    # ~15 ms steps: 24 of them leave the signal time to arrive before the run ends
    args = SFT + ["--source=base", "--num-iterations=24", "--init-lr-frac=1.0", "--save-every=5"]
    ckpt, _, _ = check_preempted_run_resumes_exactly("scripts.chat_sft", args, tiny_base_env,
                                                     "chatsft_checkpoints", 24, [2])
    # finished: --resume=auto does nothing and touches nothing
    before = mtimes(tiny_base_env)
    again = run_script("scripts.chat_sft", args + ["--resume=auto"], tiny_base_env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{ckpt} step 24 is already finished, nothing to do" in again.stdout
    assert mtimes(tiny_base_env) == before


def test_resume_refuses_another_world_size(tiny_base_env):
    """A checkpoint written by 2 ranks (its meta says so) is refused by a 1-rank run, in one line."""
    make_base_checkpoint(tiny_base_env, seq_len=192)
    args = SFT + ["--source=base", "--num-iterations=24"]
    rc, out, err = interrupt("scripts.chat_sft", args, tiny_base_env, 1)
    where, j = stopped_step(rc, out, err)
    path = os.path.join(where, f"meta_{j:06d}.json")
    with open(path) as f:
        meta = json.load(f)
    meta["world_size"], meta["data_state"] = 2, meta["data_state"] * 2
    with open(path, "w") as f:
        json.dump(meta, f)
    proc = run_script("scripts.chat_sft", args + ["--resume=auto"], tiny_base_env)
    assert_one_line_error(proc, f"cannot resume {where} step {j}", "world_size=2", "world_size=1")


@pytest.mark.slow
def test_torchrun_ranks_stop_together_and_resume(tiny_base_env):
    """torchrun, 2 ranks, SIGTERM to rank 1 alone: rank 0 learns of it through the all_reduce of the flag, both
    save the same step (each its data position: chat and pretraining-text streams) and resume it exactly."""
    make_base_checkpoint(tiny_base_env, seq_len=64)
    args = ["--mixture=offline", "--max-seq-len=64", "--device-batch-size=2", "--total-batch-size=-1",
            "--eval-every=0", "--eval-tokens=256", "--num-iterations=24", "--text-share=0.4"]
    ckpt = os.path.join(tiny_base_env, "mid_checkpoints", "d1")
    full = run_script("scripts.mid_train", args, tiny_base_env, torchrun=2)
    assert full.returncode == 0, full.stderr[-3000:]
    ref_losses, ref_weights = step_losses(full.stdout), load_weights(ckpt, 24)
    for f in os.listdir(ckpt):
        os.remove(os.path.join(ckpt, f))
    rc, out, err = interrupt("scripts.mid_train", args + ["--resume=auto"], tiny_base_env, 6, torchrun=2, rank=1)
    where, j = stopped_step(rc, out, err, torchrun=True)
    assert where == ckpt and 6 <= j < 24, out
    assert {f"optim_{j:06d}_rank0.pt", f"optim_{j:06d}_rank1.pt", f"model_{j:06d}.pt"} <= set(os.listdir(ckpt))
    with open(os.path.join(ckpt, f"meta_{j:06d}.json")) as f:
        states = json.load(f)["data_state"]
    assert len(states) == 2 and all(s["chat_batches"] > 0 and s["text_state"] for s in states)
    assert states[0]["text_state"]["rank"] == 0 and states[1]["text_state"]["rank"] == 1
    again = run_script("scripts.mid_train", args + ["--resume=auto"], tiny_base_env, torchrun=2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert step_losses(again.stdout) == {s: ref_losses[s] for s in range(j + 1, 25)}
    assert_same_weights(load_weights(ckpt, 24), ref_weights)
