#!/usr/bin/env bash
# The test command (README): sets up .venv if needed (CPU torch from the local wheel first, so the
# `torch>=2.4` requirement never pulls a CUDA build), then runs the whole suite, slow tests included.
# Extra arguments go to pytest, e.g. `bash dev/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q torch==2.13.0
fi
.venv/bin/pip install -q -e ".[dev]"
# 2 cores here: one thread per op keeps tests that spawn processes from oversubscribing
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export HF_HUB_OFFLINE=1 WANDB_MODE="${WANDB_MODE:-disabled}"
.venv/bin/python -m pytest -q "$@"
