"""
Stopping a training run cleanly on SIGTERM (a preempted or stopped rented GPU) or SIGINT (Ctrl-C).

    with GracefulStop() as stop:                  # in main(), around run_distributed
        ...                                       # the training loop, after each optimizer step:
        signum = stop.requested(ddp, device)      # every rank gets the same answer
        if signum:
            save(step)
            stop.exit(signum, f"saved {checkpoint_dir} step {step}")   # one line, then status 143 / 130

The handler only records the signal: stopping in the middle of a step (or of a checkpoint write) would lose
the step or corrupt the checkpoint, and only the training loop knows where a step ends. Under torchrun every
rank checks the flag with one all_reduce (MAX) after each step, so all ranks stop after the same step and
cooperate in its checkpoint even when only some of them got the signal, or got it a step apart; they leave
together (a barrier), so that torchrun, which stops the other ranks as soon as one exits, never cuts short
rank 0's writing of the checkpoint.
A second Ctrl-C quits at once, without saving. More SIGTERMs change nothing (a machine that is being stopped
may send several: torchrun forwards its own, systemd signals every process); whoever sends them follows up
with SIGKILL if the save takes too long: torchrun after 30 s, so a checkpoint must be written within that.
"""
import os
import signal
import sys

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGINT)
RESUME_HINT = "to resume, run the same command with --resume=auto"


class GracefulStop:
    """A context manager: SIGTERM and SIGINT set a flag while inside it (the previous handlers come back on exit)."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def __enter__(self):
        for sig in SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread of the main interpreter: signals stay as they are
                pass
        return self

    def __exit__(self, *exc):
        self._restore()
        return False

    def _restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        first = not self.signum
        self.signum = max(self.signum, signum)  # SIGTERM (15) over SIGINT (2), as across ranks
        if signum == signal.SIGINT and signal.SIGINT in self._previous:  # the next Ctrl-C: KeyboardInterrupt
            signal.signal(signal.SIGINT, self._previous.pop(signal.SIGINT))
        if first:
            again = " (Ctrl-C again quits at once, without saving)" if signum == signal.SIGINT else ""
            # os.write, not print: print from a signal handler can re-enter the stdout buffer it interrupted
            os.write(sys.stderr.fileno(), (f"{signal.Signals(signum).name}: stopping after this step and "
                                           f"saving a checkpoint{again}\n").encode())

    def requested(self, ddp=False, device="cpu"):
        """The signal to stop for (0: none). Under DDP a collective: every rank must call it after every step."""
        if not ddp:
            return self.signum
        flag = torch.tensor(self.signum, dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # SIGTERM (15) wins over SIGINT (2)
        return int(flag.item())

    @staticmethod
    def exit(signum, saved, master=True):
        """Print where the run was saved and how to resume (rank 0), then exit with 128 + signum (143, 130),
        every rank at once."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()  # rank 0 has written the whole checkpoint
        if master:
            print(f"stopped by {signal.Signals(signum).name}: {saved}; {RESUME_HINT}", flush=True)
        sys.exit(128 + signum)

