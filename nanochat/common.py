"""
Small utilities shared by every stage: device and dtype choice, distributed set-up, the base
directory where artifacts are staged, rank-0 printing, and the one-line user error.
"""
import os
import sys
import logging

import torch
import torch.distributed as dist

logger = logging.getLogger("nanochat")


class UserError(Exception):
    """A mistake the user can fix (missing file, bad flag). Scripts print it as one line, no traceback."""


def run_main(main):
    """Run a script's main(); a UserError becomes one clear line on stderr and exit code 2.
    A gloo (CPU) rank that finished together with the others ends here with os._exit: see leave_together."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    if _gloo_left_together():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def get_base_dir():
    """Where tokenizer, data, checkpoints and the report live ($NANOCHAT_BASE_DIR, default ~/.cache/nanochat)."""
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    os.makedirs(base, exist_ok=True)
    return base


def autodetect_device_type():
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def compute_dtype(device_type):
    """bf16 autocast on CUDA SM80+ (Ampere and newer), fp32 everywhere else."""
    if device_type == "cuda" and torch.cuda.get_device_capability()[0] >= 8:
        return torch.bfloat16
    return torch.float32


def autocast_ctx(device_type):
    """The autocast context for forward passes (a no-op where we compute in fp32)."""
    import contextlib
    dtype = compute_dtype(device_type)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.amp.autocast(device_type=device_type, dtype=dtype)


def is_ddp():
    return int(os.environ.get("RANK", -1)) != -1


def get_dist_info():
    """(is_ddp, rank, local_rank, world_size) from torchrun's environment."""
    if is_ddp():
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs)


def print_line(msg):
    """Print one whole line from any rank. print() writes the text and the newline separately, so the lines of
    two ranks sharing a pipe can run together; a single os.write of the line with its newline cannot."""
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (msg + "\n").encode())


def compute_init(device_type=None, seed=42):
    """
    Set up the process: device, seeds, threads, and DDP when launched by torchrun
    (NCCL on CUDA, gloo on CPU so the distributed path is testable without a GPU).
    Returns (ddp, rank, local_rank, world_size, device).
    """
    device_type = device_type or autodetect_device_type()
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device-type cuda was requested but CUDA is not available")
    torch.manual_seed(seed)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ddp, rank, local_rank, world_size = get_dist_info()
    if ddp and device_type == "cpu":
        # share the cores between ranks instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    if ddp:
        if device_type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            device = torch.device(device_type)
            dist.init_process_group(backend="gloo")
        dist.barrier()
    else:
        device = torch.device(device_type)
    return ddp, rank, local_rank, world_size, device


_left_together = False


def leave_together():
    """Under DDP, wait until every rank got here. Called on the success path only (a rank that raised must not
    wait for one that never comes).
    Why: a gloo rank tearing its group down (destroy_process_group, then interpreter shutdown) while the other
    rank was still alive aborted now and then under load ("terminate called without an active exception",
    SIGABRT) after all its work was done, and torchrun failed the whole stage. The barrier alone made it rarer,
    not gone. So a gloo rank that got here skips the teardown: compute_cleanup leaves the group alone and
    run_main ends the process with os._exit(0) once stdout and stderr are flushed (every file, checkpoint and
    wandb run is closed by then). NCCL keeps the documented destroy_process_group."""
    global _left_together
    if is_ddp() and dist.is_initialized():
        dist.barrier()
        _left_together = True


def _gloo_left_together():
    return _left_together and dist.is_initialized() and dist.get_backend() == "gloo"


def compute_cleanup():
    if is_ddp() and dist.is_initialized() and not _gloo_left_together():
        dist.destroy_process_group()


def run_distributed(train, args):
    """The body of a training script's main(): set up the process (DDP under torchrun), run
    train(args, ddp, rank, world_size, device), and always tear the process group down."""
    ddp, rank, local_rank, world_size, device = compute_init(args.device_type or autodetect_device_type(),
                                                             seed=args.seed)
    if ddp:
        # ranks share one stdout: write whole lines, or a block-buffered flush can split a line of
        # one rank around a line of another
        sys.stdout.reconfigure(line_buffering=True)
    try:
        out = train(args, ddp, rank, world_size, device)
        leave_together()
        return out
    finally:
        compute_cleanup()


def rss_mb():
    """Current resident set size in MB (Linux /proc; the peak RSS elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


class DummyWandb:
    """Stands in for wandb when --run=dummy: logs nothing, never touches the network."""
    id = None

    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


def wandb_credentials():
    """Whether wandb can log in without asking: WANDB_API_KEY, or the netrc entry `wandb login` writes."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        with open(netrc, encoding="utf-8") as f:
            return "api.wandb.ai" in f.read()
    except OSError:
        return False


class WandbRun:
    """A wandb run whose x-axis is the training step: every log call names its step (the dict's "step"), so
    validation and training metrics logged at one step land on it, and wandb's own counter never drifts."""

    def __init__(self, run):
        self.run = run
        self.id = run.id  # kept in the checkpoint, so that a resumed run continues this wandb run

    def log(self, data, step=None):
        step = data.get("step") if step is None else step
        self.run.log(data, step=None if step is None else int(step))

    def finish(self):
        self.run.finish()


def init_wandb(run, project, config, master_process=True, resume_id=None):
    """A real wandb run when `run` names one, otherwise a dummy. Without credentials (and no WANDB_MODE set)
    it logs offline with a note instead of prompting: a prompt inside screen or under torchrun would hang
    every rank. resume_id: the id of the run a resumed checkpoint logged to (its loop_state's "wandb_id"), so
    that a preempted and resumed training is one wandb run, not two."""
    if run == "dummy" or not master_process:
        return DummyWandb()
    import wandb
    mode = os.environ.get("WANDB_MODE")
    if not mode and not wandb_credentials():
        mode = "offline"
        print(f"wandb: no credentials (WANDB_API_KEY or `wandb login`): logging run {run!r} offline under "
              f"./wandb; upload it later with `wandb sync`")
    resume = {"id": resume_id, "resume": "allow"} if resume_id else {}
    return WandbRun(wandb.init(project=project, name=run, config=config, mode=mode, **resume))
