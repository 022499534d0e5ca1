"""
Telemetry for MegaContext training (docs/architecture.md): average metrics over a logging window,
time the phases of a step, and format the result for wandb and for the report.

    win = MetricWindow()
    timer = PhaseTimer(device)                 # cuda: synchronises so times are real, not launch times
    with timer("gist"): ...                    # -> metrics["mc/gist_ms"]
    win.add({**metrics, **timer.pop()})        # every step
    if step % 50 == 0: wandb_run.log(win.flush(), step=step)

Names follow the design: `mc/loss_by_variant/<name>`, `mc/delta_nll`, `mc/lens_loss`,
`mc/lens_agreement`, `mc/lod_count/<L>`, `mc/swap_rate` (share of the LensNet-driven WC's entries that the
recency pyramid at the same budget does not hold), `mc/budget_utilization`, `mc/<phase>_ms`.
"""
import math
import time
from collections import defaultdict
from contextlib import contextmanager

import torch


def _to_float(v):
    if isinstance(v, torch.Tensor):
        v = v.detach().float().item()
    return float(v)


class MetricWindow:
    """Running means of named scalars; a name missing from some steps is averaged over the steps that had it."""

    def __init__(self):
        self.reset()

    def reset(self):
        self._sum = defaultdict(float)
        self._n = defaultdict(int)

    def add(self, metrics):
        for k, v in metrics.items():
            v = _to_float(v)
            if math.isnan(v):  # e.g. an agreement with no comparable pair: not a measurement
                continue
            self._sum[k] += v
            self._n[k] += 1

    def mean(self):
        return {k: self._sum[k] / self._n[k] for k in sorted(self._sum)}

    def flush(self):
        """The window's means, then start a new window."""
        out = self.mean()
        self.reset()
        return out

    def __len__(self):
        return len(self._sum)


class PhaseTimer:
    """Accumulates wall time per phase (ms) until `pop()`; synchronises CUDA around each phase."""

    def __init__(self, device=None):
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self._sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        self._ms = defaultdict(float)

    @contextmanager
    def __call__(self, phase):
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self._ms[phase] += 1000.0 * (time.perf_counter() - t0)

    def pop(self, prefix="mc/"):
        out = {f"{prefix}{k}_ms": v for k, v in self._ms.items()}
        self._ms = defaultdict(float)
        return out


def for_wandb(metrics, step=None):
    """Plain float dict for wandb.log (tensors become floats, NaNs are left out)."""
    out = {}
    for k, v in metrics.items():
        v = _to_float(v)
        if not math.isnan(v):
            out[k] = v
    if step is not None:
        out["step"] = step
    return out


def format_metrics(metrics, keys=None, digits=4):
    """One readable line, `name=value` sorted by name (optionally only names starting with `keys`)."""
    items = sorted(metrics.items())
    if keys:
        items = [(k, v) for k, v in items if any(k.startswith(p) for p in keys)]
    return " | ".join(f"{k}={_to_float(v):.{digits}g}" for k, v in items)


def format_table(metrics, title="MegaContext telemetry"):
    """A markdown table for the report."""
    lines = [f"### {title}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_to_float(v):.4g} |" for k, v in sorted(metrics.items())]
    return "\n".join(lines) + "\n"
