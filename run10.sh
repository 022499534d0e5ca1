#!/usr/bin/env bash
# The ~$10 run: a depth-10 model (~130M parameters) on ONE GPU (an H100: about 3 hours), the
# same pipeline as speedrun.sh at a size a single rented GPU finishes in an afternoon.
#
#   bash run10.sh --dry-run
#   WANDB_RUN=d10 screen -L -Logfile run10.log -S run10 bash run10.sh
# MegaContext is on (--no-mc trains the plain baseline). Re-running the script continues an interrupted run.
NAME=run10.sh
DESCRIPTION="The small run: depth 10 on one GPU, a few hours, tokenizer to chat model and report."
NPROC=${NPROC:-1}
DEPTH=10
NUM_SHARDS=60           # ~2.7B tokens at 20 tokens per parameter, plus the val shard
TOK_TRAIN_ARGS=(--max-chars=1000000000)
BASE_TRAIN_ARGS=(--device-batch-size=32)
CHAT_EVAL_ARGS=(--max-problems=500)   # a quicker evaluation for a quick run
source "$(dirname "$0")/dev/pipeline_lib.sh"
pipeline_main "$@"
