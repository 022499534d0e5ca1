# shellcheck shell=bash
# Sourced by dev/test.sh and dev/runcpu.sh: make .venv with the CPU build of torch (installed first,
# so the `torch>=2.4` requirement never pulls a multi-GB CUDA build) and this package.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q torch==2.13.0
fi
.venv/bin/pip install -q -e ".[dev]"
export PATH="$PWD/.venv/bin:$PATH"
