#!/usr/bin/env bash
# The ~$1000 run: a depth-32 model (~1.9B parameters) on one 8xH100 node, about 33 hours.
# Same pipeline as speedrun.sh; a bigger model, more data, smaller micro-batches (memory).
#
#   bash run1000.sh --dry-run
#   WANDB_RUN=d32 screen -L -Logfile run1000.log -S run1000 bash run1000.sh
# MegaContext is on (--no-mc trains the plain baseline). Re-running the script continues an interrupted run.
NAME=run1000.sh
DESCRIPTION="The big run: depth 32 on 8xH100, about 33 hours, tokenizer to chat model and report."
NPROC=${NPROC:-8}
DEPTH=32
NUM_SHARDS=800          # ~38B tokens at 20 tokens per parameter, plus the val shard
BASE_TRAIN_ARGS=(--device-batch-size=8)
MID_TRAIN_ARGS=(--device-batch-size=8)
SFT_ARGS=(--device-batch-size=2)
MC_DEVICE_BATCH=4       # with MegaContext: half of speedrun's 8 rows, for a model 1.6x as wide (not yet measured)
source "$(dirname "$0")/dev/pipeline_lib.sh"
pipeline_main "$@"
