#!/usr/bin/env bash
# The test command (README): sets up .venv if needed, then runs the whole suite, slow tests included.
# Extra arguments go to pytest, e.g. `bash dev/test.sh -m "not slow"`.
set -euo pipefail
source "$(dirname "$0")/setup.sh"
# 2 cores here: one thread per op keeps tests that spawn processes from oversubscribing
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export HF_HUB_OFFLINE=1 WANDB_MODE="${WANDB_MODE:-disabled}"
python -m pytest -q "$@"
