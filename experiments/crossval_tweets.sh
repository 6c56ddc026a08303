#!/usr/bin/env bash
# Know the default job's data: check_data.py's leak check, then crossval.py's 5 folds of the 4,000
# training tweets (1 epoch each, as the default job trains) against the single validation split's figure.
#   experiments/crossval_tweets.sh                  # writes under /tmp/crossval_tweets
#   OUT=/tmp/cv FOLDS=3 experiments/crossval_tweets.sh
# Results: $OUT/check.log (the check's table and findings; its report $OUT/data_check.json),
# $OUT/crossval/results.json (each fold's acc_and_f1, their mean and std), $OUT/crossval/label_issues.csv,
# $OUT/single.log (trainer.py on the full training file, validated on data/tweets/val.csv).
# Re-running after an interruption goes on: crossval resumes, finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/crossval_tweets}
FOLDS=${FOLDS:-5}
PY="nice -n 5 python"
mkdir -p "$OUT"

# 1. duplicates, conflicts and leaks between the training, validation and test tweets
[ -e "$OUT/data_check.json" ] || $PY check_data.py --check.extra_filepaths "[data/tweets/test.csv]" \
    --check.output "$OUT/data_check.json" | tee "$OUT/check.log"

# 2. k folds of the training file, each trained for 1 epoch and validated on the fold it holds out
$PY crossval.py --crossval.folds "$FOLDS" --crossval.dir "$OUT/crossval" | tee "$OUT/crossval.log"

# 3. the default job as shipped: the single validation split's figure
[ -e "$OUT/single/best" ] || $PY trainer.py --trainer.log_dir "$OUT/runs" \
    --ckpt.model_state_save_dir "$OUT/single" > "$OUT/single.log"
tail -1 "$OUT/single.log"
head -11 "$OUT/crossval/label_issues.csv"
