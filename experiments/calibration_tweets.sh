#!/usr/bin/env bash
# Does temperature scaling (module.calibrate, on by default) make the default job's probabilities mean
# what they say? The quick start's run, then its best checkpoint evaluated on the 5,000 held-out tweets
# of data/tweets/test.csv at its temperature and without it (module.calibrate false), abstaining below
# 0.6 in both (the same rows answered only if the temperature is 1).
#   experiments/calibration_tweets.sh
#   OUT=/tmp/calib THREADS=1 experiments/calibration_tweets.sh
# Each step is skipped when its output exists, so the script can be re-run after an interruption.
# Results: $OUT/train.log (its validations: temperature, ece, ece_uncalibrated, brier, nll), and
# $OUT/test.calibrated.json / $OUT/test.uncalibrated.json (trainer.py's final JSON lines on test.csv,
# their whole output in test.*.log). Run it in the project's venv (python is its interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/calibration}
THREADS=${THREADS:-0}                   # 0: trainer.py's default (the cores); 1 when other jobs share them
PY="nice -n 5 python"
CKPT=${CKPT:-$OUT/checkpoints}      # an existing save folder (its train.log in $OUT) skips step 1
mkdir -p "$OUT"

# 1. the default job (config.yaml), in a save folder of its own
[ -e "$OUT/train.log" ] || { $PY trainer.py --ckpt.model_state_save_dir "$CKPT" --trainer.log_dir "$OUT/runs" \
    --trainer.num_threads "$THREADS" > "$OUT/train.log.tmp" && mv "$OUT/train.log.tmp" "$OUT/train.log"; }

# 2. its best checkpoint on the held-out test file: at its temperature, and at 1.0
for mode in calibrated uncalibrated; do
    extra=()
    [ "$mode" = uncalibrated ] && extra=(--module.calibrate false)
    [ -e "$OUT/test.$mode.json" ] || { $PY trainer.py --data.train_filepath null --data.val_filepath data/tweets/test.csv \
        --model.model_path "$CKPT/best" --data.abstain_below 0.6 --trainer.log_dir "$OUT/runs" \
        --trainer.num_threads "$THREADS" "${extra[@]}" > "$OUT/test.$mode.log" \
        && tail -n 1 "$OUT/test.$mode.log" > "$OUT/test.$mode.json"; }
done
grep -E "^(validation|calibration|abstention)" "$OUT/train.log"
cat "$OUT/test.calibrated.json" "$OUT/test.uncalibrated.json"
