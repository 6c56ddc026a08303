#!/usr/bin/env bash
# sweep.py on the default job: learning rate x seed on the tweets, spent by successive halving.
#   experiments/sweep_tweets.sh                    # 3 learning rates x 2 seeds, 2 epochs
#   OUT=/tmp/sw EPOCHS=3 experiments/sweep_tweets.sh
# Every trial trains to epoch 1; the best half by validation acc_and_f1 resume to the next rung. The
# winner's best checkpoint and the default config's (as shipped: 1 epoch, lr 5e-5, seed 42) are then
# tested on data/tweets/test.csv. Re-running after an interruption goes on where it stopped (the
# sweep resumes; finished steps are skipped). Results: $OUT/sweep/results.csv (the sweep's table),
# $OUT/sweep.log, $OUT/{sweep,default}.test.json (the last line of each test evaluation).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/sweep_tweets}
EPOCHS=${EPOCHS:-2}
GRID=${GRID:-"{module.max_lr: [2e-5, 5e-5, 1e-4], trainer.seed: [42, 43]}"}
PY="nice -n 5 python"
mkdir -p "$OUT"

# 1. the sweep
$PY sweep.py --trainer.epochs "$EPOCHS" --sweep.dir "$OUT/sweep" --sweep.grid "$GRID" | tee "$OUT/sweep.log"

# 2. the default config as shipped, for comparison
[ -e "$OUT/default/best" ] || $PY trainer.py --trainer.log_dir "$OUT/runs" \
    --ckpt.model_state_save_dir "$OUT/default" > "$OUT/default.train.log"

# 3. both tested on the 5,000 held-out tweets
for name in sweep default; do
  [ -e "$OUT/$name.test.json" ] && continue
  $PY trainer.py --data.train_filepath null --data.val_filepath data/tweets/test.csv \
      --model.model_path "$OUT/$name/best" --trainer.log_dir "$OUT/runs" > "$OUT/$name.test.log"
  tail -1 "$OUT/$name.test.log" > "$OUT/$name.test.json"
done
cat "$OUT/sweep.test.json" "$OUT/default.test.json"
