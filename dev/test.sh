#!/usr/bin/env bash
# The test command (README): sets up .venv if needed, then runs the whole suite, slow tests included.
# Extra arguments go to pytest, e.g. `bash dev/test.sh -m "not slow"`.
set -euo pipefail
source "$(dirname "$0")/setup.sh"
# The browser test (tests/test_chat_browser.py) drives Debian's Chromium through Playwright (`playwright install`
# cannot download browsers here). Install it when missing and apt-get can; never fail set-up over it: the test
# is skipped, with the reason, where Chromium is absent.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  as_root=""
  [ "$(id -u)" = 0 ] || as_root="sudo -n"
  { $as_root apt-get update -qq && DEBIAN_FRONTEND=noninteractive $as_root apt-get install -y -qq chromium; } \
    >/dev/null 2>&1 || echo "note: could not install chromium with apt-get; the browser test will be skipped" >&2
fi
# 2 cores here: one thread per op keeps tests that spawn processes from oversubscribing
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export HF_HUB_OFFLINE=1 WANDB_MODE="${WANDB_MODE:-disabled}"
python -m pytest -q "$@"
