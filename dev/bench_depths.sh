#!/usr/bin/env bash
# MegaContext's decode and refocus cost against model size: mc_bench on random-init GPTs of several depths
# (the width follows the depth, as in training), side by side with plain KV-cached decoding at 1,000 and
# 10,000 tokens of history. One JSON per depth in $NANOCHAT_BASE_DIR/report/mc_bench_depth<N>.json, which
# `python -m dev.readme_results` turns into the README's table. On 2 CPU cores, depths 2, 8 and 12 take ~9 min.
#
#   bash dev/bench_depths.sh            # depths 2 8 12
#   bash dev/bench_depths.sh 2 8 12 20  # depth 20 (speedrun's) too: far longer on a CPU, meant for a GPU
set -euo pipefail
cd "$(dirname "$0")/.."
depths=("$@")
[ ${#depths[@]} -gt 0 ] || depths=(2 8 12)
report="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}/report"
mkdir -p "$report"
for d in "${depths[@]}"; do
  python -m scripts.mc_bench --source random --depth "$d" --histories 1e3,1e4 --no-report \
    --out "$report/mc_bench_depth$d.json"
done
