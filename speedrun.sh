#!/usr/bin/env bash
# The ~$100 run, nanochat's speedrun: a depth-20 model (~560M parameters) trained end to end
# (tokenizer, pretraining, midtraining, SFT, evaluation, report) on one 8xH100 node in about 4 hours.
#
#   bash speedrun.sh --dry-run       # print the plan
#   WANDB_RUN=speedrun screen -L -Logfile speedrun.log -S speedrun bash speedrun.sh
#   bash speedrun.sh --smoke         # the same pipeline at toy size on this machine's CPU (a few minutes)
#
# MegaContext is on (--no-mc trains the plain baseline). Re-running the script continues an interrupted run.
# Everything lands in $NANOCHAT_BASE_DIR (default ~/.cache/nanochat); see SETUP.md.
NAME=speedrun.sh
DESCRIPTION="The speedrun: depth 20 on 8xH100, about 4 hours, tokenizer to chat model and report."
NPROC=${NPROC:-8}
DEPTH=20
NUM_SHARDS=240          # ~11B tokens: 20 tokens per parameter (Chinchilla) for d20, plus the val shard
BASE_TRAIN_ARGS=(--device-batch-size=32)
source "$(dirname "$0")/dev/pipeline_lib.sh"
pipeline_main "$@"
