#!/usr/bin/env bash
# sweep.py on the default job: learning rate x seed on the tweets, spent by successive halving.
#   experiments/sweep_tweets.sh                    # 3 learning rates x 2 seeds, 2 epochs
#   OUT=/tmp/sw EPOCHS=3 experiments/sweep_tweets.sh
#   TRAIN_ROWS=400 VAL_ROWS=300 TEST_ROWS=1000 experiments/sweep_tweets.sh   # the first rows of each file only
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

# 0. the data: data/tweets, or the first *_ROWS rows of its files when those are set
for split in train val test; do
  rows_var=$(echo "${split}_ROWS" | tr a-z A-Z)
  [ -e "$OUT/$split.csv" ] || python - "data/tweets/$split.csv" "$OUT/$split.csv" "${!rows_var:-all}" <<'PY'
import csv, itertools, sys
source, target, rows = sys.argv[1], sys.argv[2], sys.argv[3]
with open(source, encoding="utf-8", newline="") as f, open(target, "w", encoding="utf-8", newline="") as out:
    reader, writer = csv.reader(f), csv.writer(out)
    writer.writerow(next(reader))
    writer.writerows(reader if rows == "all" else itertools.islice(reader, int(rows)))
PY
done
DATA=(--data.train_filepath "$OUT/train.csv" --data.val_filepath "$OUT/val.csv")

# 1. the sweep
$PY sweep.py "${DATA[@]}" --trainer.epochs "$EPOCHS" --sweep.dir "$OUT/sweep" --sweep.grid "$GRID" | tee "$OUT/sweep.log"

# 2. the default config as shipped, for comparison
[ -e "$OUT/default/best" ] || $PY trainer.py "${DATA[@]}" --trainer.log_dir "$OUT/runs" \
    --ckpt.model_state_save_dir "$OUT/default" > "$OUT/default.train.log"

# 3. both tested on the held-out tweets
for name in sweep default; do
  [ -e "$OUT/$name.test.json" ] && continue
  $PY trainer.py --data.train_filepath null --data.val_filepath "$OUT/test.csv" \
      --model.model_path "$OUT/$name/best" --trainer.log_dir "$OUT/runs" > "$OUT/$name.test.log"
  tail -1 "$OUT/$name.test.log" > "$OUT/$name.test.json"
done
cat "$OUT/sweep.test.json" "$OUT/default.test.json"
