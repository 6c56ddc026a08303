#!/usr/bin/env bash
# Does --module.class_weights balanced help a rare class? The tweet task with "positive" cut to about
# 5% of the training rows, trained with and without balanced weights, tested at the natural balance.
#   experiments/imbalance.sh                       # 2 seeds x {null, balanced}, 2 epochs each
#   OUT=/tmp/imb SEEDS="42" THREADS=1 experiments/imbalance.sh
# Each step is skipped when its output exists, so the script can be re-run after an interruption.
# Results: $OUT/<run>.test.json (trainer.py's eval_metrics.json on data/tweets/test.csv, per_class
# included), $OUT/<run>.train.log, and experiments/results/imbalance.md written by imbalance_table.py.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/imbalance}
SEEDS=${SEEDS:-"42 43"}
EPOCHS=${EPOCHS:-2}
THREADS=${THREADS:-1}                   # 1 is faster when other jobs share the two cores
POSITIVE_SHARE=${POSITIVE_SHARE:-0.05}
TRAIN=data/tweets_imbalanced/train.csv
PY="nice -n 5 python"
mkdir -p "$OUT" "$(dirname "$TRAIN")"

# 1. the imbalanced training file: every negative and neutral row, a seeded sample of positive rows
#    sized so that positives are POSITIVE_SHARE of the result; the rows keep their original order
[ -e "$TRAIN" ] || python - "$POSITIVE_SHARE" "$TRAIN" <<'EOF'
import csv, random, sys
share, out = float(sys.argv[1]), sys.argv[2]
with open("data/tweets/train.csv", encoding="utf-8", newline="") as f:
    reader = csv.DictReader(f)
    fields, rows = reader.fieldnames, list(reader)
positive = [i for i, r in enumerate(rows) if r["sentiment"] == "positive"]
others = len(rows) - len(positive)
keep = set(random.Random(0).sample(positive, round(share * others / (1 - share))))
with open(out, "w", encoding="utf-8", newline="") as f:
    writer = csv.DictWriter(f, fields)
    writer.writeheader()
    writer.writerows(r for i, r in enumerate(rows) if r["sentiment"] != "positive" or i in keep)
EOF

# 2. train, then evaluate the best checkpoint (chosen on data/tweets/val.csv) on the natural-balance test set
for seed in $SEEDS; do
  for weights in null balanced; do
    name=$weights-s$seed
    [ -e "$OUT/$name.test.json" ] && continue
    [ -e "$OUT/ckpt-$name/best" ] || $PY trainer.py --data.train_filepath "$TRAIN" --trainer.epochs "$EPOCHS" \
        --trainer.seed "$seed" --module.class_weights "$weights" --trainer.num_threads "$THREADS" \
        --trainer.log_dir "$OUT/runs" --ckpt.model_state_save_dir "$OUT/ckpt-$name" --ckpt.keep_last 1 \
        2>&1 | tee "$OUT/$name.train.log"
    $PY trainer.py --data.train_filepath null --data.val_filepath data/tweets/test.csv \
        --model.model_path "$OUT/ckpt-$name/best" --trainer.num_threads "$THREADS" \
        --trainer.log_dir "$OUT/runs" 2>&1 | tee "$OUT/$name.eval.log"
    # the evaluation names the run folder it wrote eval_metrics.json to
    cp "$(sed -n 's/^metrics written to //p' "$OUT/$name.eval.log" | tail -1)" "$OUT/$name.test.json"
  done
done

python experiments/imbalance_table.py "$OUT" "$TRAIN" > experiments/results/imbalance.md
cat experiments/results/imbalance.md
