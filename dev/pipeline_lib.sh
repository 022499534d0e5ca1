# shellcheck shell=bash
# The pipeline shared by run10.sh, speedrun.sh and run1000.sh (sourced, not run). A run script sets
# its knobs (the variables below), then calls `pipeline_main "$@"`:
#
#   NAME DESCRIPTION     for --help
#   NPROC                GPUs (torchrun processes; 1 = plain python)
#   DEPTH                the model size dial of base_train
#   NUM_SHARDS           FineWeb-Edu shards to download (the last one is validation)
#   TOK_TRAIN_ARGS BASE_TRAIN_ARGS MID_TRAIN_ARGS SFT_ARGS CHAT_EVAL_ARGS   extra flags (bash arrays)
#
# Flags: --dry-run prints every command of the plan, one per line on stdout, and runs nothing
# (progress notes go to stderr); --mc trains with MegaContext (see MC_FLAGS below; MC_EXTRA_FLAGS,
# a bash array, adds --mc-* flags to base_train, whose MCConfig the later stages inherit).
# Environment: NANOCHAT_BASE_DIR (default ~/.cache/nanochat) holds everything the run makes;
# WANDB_RUN names a wandb run (default "dummy": no wandb).

DRY_RUN=0
MC=0
MC_FLAGS=()
MC_BASE_FLAGS=()
MC_MID_FLAGS=()
MC_EXTRA_FLAGS=("${MC_EXTRA_FLAGS[@]}")
BG_PIDS=()

note() { echo "[$NAME] $*" >&2; }
die() { echo "[$NAME] error: $*" >&2; exit 2; }

usage() {
  cat <<EOF
usage: bash $NAME [--dry-run] [--mc]

$DESCRIPTION

  --dry-run   print the commands of the plan, one per line, and run nothing
  --mc        train with MegaContext (learned context compression)
  -h, --help  this help

Environment: NANOCHAT_BASE_DIR (default ~/.cache/nanochat), WANDB_RUN (default dummy = no wandb),
WANDB_API_KEY (for wandb), NPROC (GPUs to use, default $NPROC).
EOF
}

parse_args() {
  for arg in "$@"; do
    case "$arg" in
      --dry-run) DRY_RUN=1 ;;
      --mc) MC=1 ;;
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

launch() {  # a python module on all NPROC GPUs (torchrun), or as plain python when NPROC=1
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

check_machine() {
  [ "$DRY_RUN" = 1 ] && return 0
  command -v nvidia-smi >/dev/null 2>&1 ||
    die "no NVIDIA GPU found (nvidia-smi is missing): $NAME is for GPU machines (see SETUP.md)"
  local n
  n=$(nvidia-smi -L | grep -c '^GPU')
  [ "$n" -ge "$NPROC" ] || die "$NAME uses $NPROC GPUs but this machine has $n (set NPROC=$n to use them, for a longer run)"
}

setup_env() {
  setenv OMP_NUM_THREADS 1
  setenv NANOCHAT_BASE_DIR "${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
  run mkdir -p "${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
  # the virtual environment: torch first (PyPI's Linux wheel is the CUDA build), then this package
  [ -x .venv/bin/python ] || run python3 -m venv .venv
  run .venv/bin/pip install --upgrade pip
  run .venv/bin/pip install torch
  run .venv/bin/pip install -e .
  if [ "$DRY_RUN" = 1 ]; then
    echo "source .venv/bin/activate"
  else
    # shellcheck disable=SC1091
    source .venv/bin/activate
  fi
  WANDB_RUN=${WANDB_RUN:-dummy}
  if [ "$WANDB_RUN" != dummy ] && [ -z "${WANDB_API_KEY:-}" ] && [ "${WANDB_MODE:-}" != offline ]; then
    note "WANDB_RUN=$WANDB_RUN but WANDB_API_KEY is not set: wandb will use the credentials of 'wandb login'"
  fi
  if [ "$MC" = 1 ]; then
    # MegaContext: the flags appended to the training commands (base_train, mid_train, chat_sft).
    # base_train builds GistNet + LensNet and stores them with the MCConfig (the --mc-* flags, here
    # the defaults: budget 512, K=32); mid_train and chat_sft load them from the previous stage and
    # take the MCConfig from its checkpoint, mid_train also mixing the long-context tasks in.
    # MC_EXTRA_FLAGS (a bash array a run script may set) adds e.g. --mc-budget=1024 to base_train.
    # Measured on one H100 at depth 20, T=2048, V=65536 (dev/bench_train.py, dev/LOG.md, 2026-11-22, 'the first CUDA runs'):
    # the MCConfig defaults (4 variants, a counterfactual for every gist, every row) ran out of its 80 GB at
    # 8 rows per micro-step; 2 variants, 4 counterfactuals and the objective on 2 of 8 rows peaked at 53 GB
    # and cost ~4.7x a plain step (the rest of the rows train plain LM). Hence 8 rows per micro-step under
    # --mc (the total batch, and so the tokens per step, stay the run's: more accumulation steps).
    MC_FLAGS=(--mc)
    MC_BASE_FLAGS=(--mc --device-batch-size=8 --mc-train-variants=pyramid,lens --mc-lens-cands=4
                   --mc-train-rows=2 "${MC_EXTRA_FLAGS[@]}")
    MC_MID_FLAGS=(--mc --device-batch-size=8)
  fi
}

pipeline_main() {
  parse_args "$@"
  # the extra-flag arrays a run script left unset are empty (set -u below would reject them)
  TOK_TRAIN_ARGS=("${TOK_TRAIN_ARGS[@]}") BASE_TRAIN_ARGS=("${BASE_TRAIN_ARGS[@]}")
  MID_TRAIN_ARGS=("${MID_TRAIN_ARGS[@]}") SFT_ARGS=("${SFT_ARGS[@]}") CHAT_EVAL_ARGS=("${CHAT_EVAL_ARGS[@]}")
  if [ "$MC" = 1 ]; then  # --mc sets its own rows per micro-step: one --device-batch-size per command
    mapfile -t BASE_TRAIN_ARGS < <(without_batch_size "${BASE_TRAIN_ARGS[@]}")
    mapfile -t MID_TRAIN_ARGS < <(without_batch_size "${MID_TRAIN_ARGS[@]}")
  fi
  cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
  check_machine
  set -euo pipefail
  [ "$DRY_RUN" = 1 ] && note "dry run: the commands below are printed, not run"
  setup_env

  note "report: start a new report card"
  run python -m nanochat.report reset

  note "data + tokenizer: 8 shards for the tokenizer now, the rest in the background"
  run python -m nanochat.dataset -n 8
  run_bg python -m nanochat.dataset -n "$NUM_SHARDS"
  run python -m scripts.tok_train "${TOK_TRAIN_ARGS[@]}"
  run python -m scripts.tok_eval
  wait_bg

  note "pretraining"
  launch scripts.base_train --depth="$DEPTH" --run="$WANDB_RUN" "${BASE_TRAIN_ARGS[@]}" "${MC_BASE_FLAGS[@]}"
  launch scripts.base_loss
  launch scripts.base_eval

  note "midtraining (chat format, tools, skills)"
  launch scripts.mid_train --run="$WANDB_RUN" "${MID_TRAIN_ARGS[@]}" "${MC_MID_FLAGS[@]}"
  launch scripts.chat_eval --source=mid "${CHAT_EVAL_ARGS[@]}"

  note "supervised fine-tuning"
  launch scripts.chat_sft --run="$WANDB_RUN" "${SFT_ARGS[@]}" "${MC_FLAGS[@]}"
  launch scripts.chat_eval --source=sft "${CHAT_EVAL_ARGS[@]}"

  note "MegaContext evaluation and benchmark"
  run python -m scripts.mc_eval --source=sft
  run python -m scripts.mc_bench

  note "report card"
  run python -m nanochat.report generate
  [ "$DRY_RUN" = 1 ] || note "done: report in $NANOCHAT_BASE_DIR/report/report.md; chat with: python -m scripts.chat_web"
}
