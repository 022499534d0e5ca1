# shellcheck shell=bash
# The pipeline shared by run10.sh, speedrun.sh and run1000.sh (sourced, not run). A run script sets
# its knobs (the variables below), then calls `pipeline_main "$@"`:
#
#   NAME DESCRIPTION     for --help
#   NPROC                GPUs (torchrun processes; 1 = plain python)
#   DEPTH                the model size dial of base_train (MegaContext's sizes follow the sequence length)
#   NUM_SHARDS           FineWeb-Edu shards to download (the last one is validation)
#   TOK_TRAIN_ARGS BASE_TRAIN_ARGS MID_TRAIN_ARGS SFT_ARGS CHAT_EVAL_ARGS   extra flags (bash arrays)
#   MC_DEVICE_BATCH      rows per micro-step of base_train and mid_train with MegaContext (default 8: memory)
#
# Flags: --dry-run prints every command of the plan, one per line on stdout, and runs nothing (progress
# notes go to stderr); MegaContext is on by default and --no-mc trains the plain baseline; --smoke runs the
# same pipeline on this machine's CPU at toy size (2 torchrun ranks over gloo, the offline corpus, a few
# steps of every stage) as a test of the pipeline itself.
# Re-running a script continues: finished stages are skipped (a marker per stage under
# $NANOCHAT_BASE_DIR/pipeline/), downloaded shards are verified and kept, and an interrupted training
# stage resumes from its last checkpoint (--resume=auto).
# Environment: NANOCHAT_BASE_DIR (default ~/.cache/nanochat) holds everything the run makes; WANDB_RUN names
# a wandb run (default "dummy": no wandb); TORCH_VERSION / TORCH_INDEX_URL choose the torch build.

DRY_RUN=0
MC=1
SMOKE=0
RESTART=0
TORCH_VERSION=${TORCH_VERSION:-2.11.0}  # the version the CUDA path has run on (one H100, dev/LOG.md)
BG_PIDS=()

note() { echo "[$NAME] $*" >&2; }
die() { echo "[$NAME] error: $*" >&2; exit 2; }

usage() {
  cat <<EOF
usage: bash $NAME [--dry-run] [--no-mc] [--smoke] [--restart]

$DESCRIPTION

  --dry-run   print the commands of the plan, one per line, and run nothing
  --no-mc     train the plain baseline (MegaContext, learned context compression, is on by default)
  --mc        MegaContext on (the default; kept for older command lines)
  --smoke     the same pipeline at toy size on this machine's CPU: 2 torchrun ranks over gloo, the offline
              corpus, a few steps of every stage, the evaluations and the report (a few minutes)
  --restart   forget which stages finished and run them all again (checkpoints and data are kept)
  -h, --help  this help

Re-running the script continues where it stopped: finished stages are skipped, an interrupted training
stage resumes from its last checkpoint.

Environment: NANOCHAT_BASE_DIR (default ~/.cache/nanochat; --smoke: ~/.cache/nanochat-smoke), WANDB_RUN
(default dummy = no wandb), WANDB_API_KEY (without it a named run logs offline), NPROC (GPUs to use, default
$NPROC), TORCH_VERSION (default $TORCH_VERSION) and TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cu126
for an older driver).
EOF
}

parse_args() {
  for arg in "$@"; do
    case "$arg" in
      --dry-run) DRY_RUN=1 ;;
      --mc) MC=1 ;;
      --no-mc) MC=0 ;;
      --smoke) SMOKE=1 ;;
      --restart) RESTART=1 ;;
      -h|--help) usage; exit 0 ;;
      *) usage >&2; die "unknown argument: $arg" ;;
    esac
  done
}

without_batch_size() {  # the arguments less any --device-batch-size=N, one per line (for mapfile)
  local a
  for a in "$@"; do
    case "$a" in --device-batch-size=*) ;; *) echo "$a" ;; esac
  done
}

quote_cmd() {  # the command as one shell-quoted line
  local out
  out=$(printf '%q ' "$@")
  echo "${out% }"
}

run() {  # print the command (dry run), or echo it to stderr and run it; any failure stops the run
  if [ "$DRY_RUN" = 1 ]; then
    quote_cmd "$@"
  else
    echo "+ $(quote_cmd "$@")" >&2
    "$@"
  fi
}

run_bg() {  # like run, in the background; wait_bg waits for all of them
  if [ "$DRY_RUN" = 1 ]; then
    echo "$(quote_cmd "$@") &"
  else
    echo "+ $(quote_cmd "$@") &" >&2
    "$@" &
    BG_PIDS+=("$!")
  fi
}

wait_bg() {
  if [ "$DRY_RUN" = 1 ]; then
    echo "wait"
    return
  fi
  local pid
  for pid in "${BG_PIDS[@]}"; do
    wait "$pid" || die "a background step (pid $pid) failed"
  done
  BG_PIDS=()
}

setenv() {  # export NAME=VALUE (printed in the plan: later commands depend on it)
  if [ "$DRY_RUN" = 1 ]; then
    echo "export $1=$(printf '%q' "$2")"
  else
    export "$1=$2"
  fi
}

launch() {  # a python module on all NPROC processes (torchrun), or as plain python when NPROC=1
  local module=$1
  shift
  if [ "$NPROC" -gt 1 ]; then
    # "--": torchrun parses options after the module too, and takes --run=NAME for an abbreviation
    # of its own --run-path ("ambiguous option"): every multi-GPU training command failed on it
    run torchrun --standalone --nproc_per_node="$NPROC" -m "$module" -- "$@"
  else
    run python -m "$module" "$@"
  fi
}

# --- stages: a marker per finished stage, so that re-running the script skips it -------------------

stage() {  # stage NAME COMMAND...: run the command unless the stage finished in an earlier run
  local name=$1
  shift
  if [ "$DRY_RUN" != 1 ] && [ -f "$DONE_DIR/$name.done" ]; then
    note "skip $name: finished in an earlier run (--restart runs every stage again)"
    return 0
  fi
  "$@"
  [ "$DRY_RUN" = 1 ] || touch "$DONE_DIR/$name.done"
}

open_stages() {  # the marker directory; a base dir that holds another plan's markers is refused
  DONE_DIR="$BASE_DIR/pipeline/$NAME"
  local plan="mc=$MC smoke=$SMOKE depth=$DEPTH nproc=$NPROC"
  [ "$DRY_RUN" = 1 ] && return 0
  [ "$RESTART" = 1 ] && rm -rf "$DONE_DIR"
  mkdir -p "$DONE_DIR"
  if [ -f "$DONE_DIR/plan" ] && [ "$(cat "$DONE_DIR/plan")" != "$plan" ]; then
    die "$BASE_DIR holds a $NAME run with other settings ($(cat "$DONE_DIR/plan"); this one: $plan):
use another NANOCHAT_BASE_DIR, or --restart to run every stage again there"
  fi
  echo "$plan" > "$DONE_DIR/plan"
  if ls "$DONE_DIR"/*.done >/dev/null 2>&1; then
    note "continuing the run in $BASE_DIR: $(ls "$DONE_DIR"/*.done | wc -l) stages already finished"
  fi
}

# --- the machine ------------------------------------------------------------------------------------

check_machine() {
  [ "$DRY_RUN" = 1 ] && return 0
  [ "$SMOKE" = 1 ] && return 0
  command -v nvidia-smi >/dev/null 2>&1 ||
    die "no NVIDIA GPU found (nvidia-smi is missing): $NAME is for GPU machines (see SETUP.md; --smoke runs it at toy size on a CPU)"
  local n
  n=$(nvidia-smi -L | grep -c '^GPU')
  [ "$n" -ge "$NPROC" ] || die "$NAME uses $NPROC GPUs but this machine has $n (set NPROC=$n to use them, for a longer run)"
}

check_torch_cuda() {  # after the install: torch must see the GPUs, or the run would start NPROC CPU processes
  [ "$DRY_RUN" = 1 ] && return 0
  [ "$SMOKE" = 1 ] && return 0
  local seen driver_cuda torch_cuda
  seen=$(python -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
  [ "$seen" -ge "$NPROC" ] && return 0
  driver_cuda=$(nvidia-smi 2>/dev/null | grep -o 'CUDA Version: [0-9.]*' | grep -o '[0-9.]*$' || echo unknown)
  torch_cuda=$(python -c 'import torch; print(torch.version.cuda)' 2>/dev/null || echo unknown)
  die "torch $TORCH_VERSION (built for CUDA $torch_cuda) sees $seen of $NPROC GPUs; the NVIDIA driver supports CUDA \
$driver_cuda. Install a torch built for the driver, e.g. TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 \
bash $NAME (cu126 needs a driver >= 560, cu128 >= 570, cu130 >= 580), or update the driver (see SETUP.md)"
}

setup_env() {
  setenv OMP_NUM_THREADS 1
  if [ "$SMOKE" = 1 ]; then
    BASE_DIR=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat-smoke}
    setenv NANOCHAT_BASE_DIR "$BASE_DIR"
    setenv HF_HUB_OFFLINE 1
    # the CPU build of torch from dev/setup.sh, as the tests use
    if [ "$DRY_RUN" = 1 ]; then
      echo "source dev/setup.sh"
    else
      # shellcheck disable=SC1091
      source dev/setup.sh
    fi
  else
    BASE_DIR=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}
    setenv NANOCHAT_BASE_DIR "$BASE_DIR"
    # the virtual environment: a pinned torch first (PyPI's Linux wheel is a CUDA build), then this package
    [ -x .venv/bin/python ] || run python3 -m venv .venv
    run .venv/bin/pip install --upgrade pip
    run .venv/bin/pip install "torch==$TORCH_VERSION" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
    run .venv/bin/pip install -e .
    if [ "$DRY_RUN" = 1 ]; then
      echo "source .venv/bin/activate"
    else
      # shellcheck disable=SC1091
      source .venv/bin/activate
    fi
  fi
  run mkdir -p "$BASE_DIR"
  check_torch_cuda
  WANDB_RUN=${WANDB_RUN:-dummy}
}

# --- sizes ------------------------------------------------------------------------------------------

smoke_sizes() {  # --smoke: every stage at toy size, 2 ranks, the offline corpus
  NPROC=2
  DEPTH=2
  local T=256 B=2
  local TOTAL=$((B * T * NPROC))
  TOK_TRAIN_ARGS=(--vocab-size=1024)
  BASE_TRAIN_ARGS=(--max-seq-len=$T --device-batch-size=$B --total-batch-size=$TOTAL --num-iterations=4
                   --eval-every=2 --eval-tokens=$TOTAL --sample-every=-1 --head-dim=64 --save-every=2)
  BASE_LOSS_ARGS=(--device-batch-size=$B --max-seq-len=$T --split-tokens=$TOTAL)
  BASE_EVAL_ARGS=(--max-seq-len=$T --eval-tokens=$TOTAL --cloze-items=8)
  MID_TRAIN_ARGS=(--mixture=offline --max-seq-len=$T --device-batch-size=$B --total-batch-size=$TOTAL
                  --num-iterations=3 --eval-every=0 --eval-tokens=$TOTAL)
  SFT_ARGS=(--mixture=offline --max-seq-len=$T --device-batch-size=$B --num-iterations=2 --eval-every=0
            --eval-steps=1 --eval-metrics-every=-1)
  CHAT_EVAL_ARGS=(--task-name=offline --max-problems=4 --max-new-tokens=16)
  MC_EVAL_ARGS=(--quick --trials=2 --needle-trials=2 --multiples=1,4 --docs=2 --filler=val)
  MC_BENCH_ARGS=(--histories=1000,4000 --decode-tokens=16 --rounds=1 --refocus-events=2 --full-kv-max=1000)
  MC_MID_EXTRA=(--mc-mix-multiples=1,4)
  MC_BATCH=()
}

mc_flags() {  # the MegaContext part of each command (empty arrays with --no-mc)
  MC_BASE_FLAGS=() MC_MID_FLAGS=() MC_SFT_FLAGS=()
  MC_EVAL_FLAGS=(--baselines-only)
  if [ "$MC" = 1 ]; then
    # --mc and the memory dials only: every other MegaContext knob is MCConfig's default recipe, sized from the
    # sequence length (budget = T, tail T/8, training histories 3T/8), and mid_train and chat_sft inherit the
    # base checkpoint's config. On one H100 at depth 20 the objective on every row of a 32-row micro-step ran
    # out of 80 GB: 8 rows per micro-step, the objective on a quarter of them (2.0x a plain step, 37 GB peak;
    # dev/LOG.md, 2026-11-23, 'on the H100, neither a deeper GPT'). The total batch stays the run's.
    MC_BASE_FLAGS=(--mc "${MC_BATCH[@]}" "${MC_BASE_MEMORY[@]}")
    MC_MID_FLAGS=(--mc "${MC_BATCH[@]}" "${MC_MID_EXTRA[@]}")
    MC_SFT_FLAGS=(--mc)
    MC_EVAL_FLAGS=()
  fi
}

pipeline_main() {
  parse_args "$@"
  # the extra-flag arrays a run script left unset are empty (set -u below would reject them)
  TOK_TRAIN_ARGS=("${TOK_TRAIN_ARGS[@]}") BASE_TRAIN_ARGS=("${BASE_TRAIN_ARGS[@]}")
  MID_TRAIN_ARGS=("${MID_TRAIN_ARGS[@]}") SFT_ARGS=("${SFT_ARGS[@]}") CHAT_EVAL_ARGS=("${CHAT_EVAL_ARGS[@]}")
  BASE_LOSS_ARGS=() BASE_EVAL_ARGS=() MC_EVAL_ARGS=() MC_BENCH_ARGS=() MC_MID_EXTRA=()
  MC_BATCH=(--device-batch-size="${MC_DEVICE_BATCH:-8}") MC_BASE_MEMORY=(--mc-train-row-share=0.25)
  if [ "$SMOKE" = 1 ]; then
    smoke_sizes
    MC_BASE_MEMORY=()
  fi
  mc_flags
  if [ "$MC" = 1 ] && [ ${#MC_BATCH[@]} -gt 0 ]; then  # --mc sets its own rows per micro-step: one per command
    mapfile -t BASE_TRAIN_ARGS < <(without_batch_size "${BASE_TRAIN_ARGS[@]}")
    mapfile -t MID_TRAIN_ARGS < <(without_batch_size "${MID_TRAIN_ARGS[@]}")
  fi
  cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
  check_machine
  set -euo pipefail
  [ "$DRY_RUN" = 1 ] && note "dry run: the commands below are printed, not run"
  [ "$MC" = 1 ] || note "--no-mc: the plain baseline (no MegaContext); mc_eval runs its baselines only"
  setup_env
  open_stages

  stage report-reset run python -m nanochat.report reset

  if [ "$SMOKE" = 1 ]; then
    note "data: the offline corpus"
    stage data run python -m nanochat.dataset --offline
  else
    note "data + tokenizer: 8 shards for the tokenizer now, the rest in the background (verified, kept on re-runs)"
    run python -m nanochat.dataset -n 8
    run_bg python -m nanochat.dataset -n "$NUM_SHARDS"
  fi
  if [ "$SMOKE" != 1 ]; then  # the smoke's evaluation reads the validation shard instead: no download in tests
    stage heldout run python -m nanochat.dataset --heldout
  fi
  stage tokenizer run python -m scripts.tok_train "${TOK_TRAIN_ARGS[@]}"
  stage tok-eval run python -m scripts.tok_eval
  wait_bg

  note "pretraining"
  stage base-train launch scripts.base_train --depth="$DEPTH" --run="$WANDB_RUN" --resume=auto \
    "${BASE_TRAIN_ARGS[@]}" "${MC_BASE_FLAGS[@]}"
  stage base-loss launch scripts.base_loss "${BASE_LOSS_ARGS[@]}"
  stage base-eval launch scripts.base_eval "${BASE_EVAL_ARGS[@]}"

  note "midtraining (chat format, tools, skills; with MegaContext the long-context tasks too)"
  stage mid-train launch scripts.mid_train --run="$WANDB_RUN" --resume=auto "${MID_TRAIN_ARGS[@]}" \
    "${MC_MID_FLAGS[@]}"
  stage mid-eval launch scripts.chat_eval --source=mid "${CHAT_EVAL_ARGS[@]}"

  note "supervised fine-tuning"
  stage sft launch scripts.chat_sft --run="$WANDB_RUN" --resume=auto "${SFT_ARGS[@]}" "${MC_SFT_FLAGS[@]}"
  stage sft-eval launch scripts.chat_eval --source=sft "${CHAT_EVAL_ARGS[@]}"

  note "MegaContext evaluation and benchmark"
  stage mc-eval run python -m scripts.mc_eval --source=sft --run="$WANDB_RUN" "${MC_EVAL_FLAGS[@]}" \
    "${MC_EVAL_ARGS[@]}"
  if [ "$MC" = 1 ]; then
    stage mc-bench run python -m scripts.mc_bench --source=sft "${MC_BENCH_ARGS[@]}"
  fi

  note "report card"
  run python -m nanochat.report generate
  [ "$DRY_RUN" = 1 ] || note "done: report in $BASE_DIR/report/report.md; chat with: python -m scripts.chat_web"
}
