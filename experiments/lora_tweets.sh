#!/usr/bin/env bash
# LoRA against full fine-tuning, and a head learning rate / layer-wise learning-rate decay against
# plain fine-tuning, on the default tweet job (MiniLM, 4,000 tweets, 1 epoch, validated on 1,000).
#   experiments/lora_tweets.sh                           # 11 recipes x 2 seeds, then 3 epochs of two
#   LONG=0 experiments/lora_tweets.sh                    # without the 3-epoch runs
#   OUT=/tmp/lora SEEDS="42" THREADS=1 experiments/lora_tweets.sh
# Each run is skipped when its result exists, so the script can be re-run after an interruption.
# Results: $OUT/<run>.out (trainer.py's stdout: its start-up lines and final JSON line), the
# checkpoints in $OUT/ckpt-<run>, and experiments/results/lora.md written by lora_table.py.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/lora}
SEEDS=${SEEDS:-"42 1"}
THREADS=${THREADS:-1}                   # 1 is faster when other jobs share the two cores
LORA_LR=${LORA_LR:-1e-3}                # LoRA's adapters learn from zero: a rate 20x full fine-tuning's
PY="nice -n 5 python"
mkdir -p "$OUT"

run() {  # run NAME [trainer.py options]: one training run, its stdout kept in $OUT/NAME.out
  local name=$1
  shift
  [ -e "$OUT/$name.out" ] && return 0
  $PY trainer.py --trainer.num_threads "$THREADS" --trainer.log_dir "$OUT/runs" --ckpt.keep_last 1 \
      --ckpt.model_state_save_dir "$OUT/ckpt-$name" --ckpt.overwrite true "$@" > "$OUT/$name.tmp" 2> "$OUT/$name.err"
  mv "$OUT/$name.tmp" "$OUT/$name.out"
}

for seed in $SEEDS; do
  run "full-s$seed" --trainer.seed "$seed"
  for rank in 8 4 16; do
    run "lora$rank-s$seed" --trainer.seed "$seed" --model.lora_rank "$rank" --module.max_lr "$LORA_LR"
  done
  run "lora8-lr5e-4-s$seed" --trainer.seed "$seed" --model.lora_rank 8 --module.max_lr 5e-4
  run "decay-s$seed" --trainer.seed "$seed" --module.layer_lr_decay 0.8
  run "head-s$seed" --trainer.seed "$seed" --module.head_lr 1e-3
  run "decay-head-s$seed" --trainer.seed "$seed" --module.layer_lr_decay 0.8 --module.head_lr 1e-3
done

# beyond the grid: a higher LoRA rate on both seeds, and three epochs on one seed (LONG=0 skips those)
for seed in $SEEDS; do
  for rank in 8 4 16; do
    run "lora$rank-lr2e-3-s$seed" --trainer.seed "$seed" --model.lora_rank "$rank" --module.max_lr 2e-3
  done
done
if [ "${LONG:-1}" = 1 ]; then
  run "lora8-3ep-s42" --trainer.epochs 3 --model.lora_rank 8 --module.max_lr "$LORA_LR"
  run "full-3ep-s42" --trainer.epochs 3
fi

python experiments/lora_table.py "$OUT" > experiments/results/lora.md
cat experiments/results/lora.md
