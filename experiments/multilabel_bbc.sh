#!/usr/bin/env bash
# The README's multi-label figures: our trainer on the joined BBC leads (python experiments/bbc.py
# first), thresholds tuned on val.csv, then test.csv evaluated at the tuned thresholds and at 0.5.
# The Hugging Face Trainer on the same data and hyperparameters: experiments/hf_multilabel.py.
#   experiments/multilabel_bbc.sh                 # seeds 42 and 43, 6 epochs; OUT=/tmp/... SEEDS=42 to vary
# Results: $OUT/<seed>.at-tuned.json and $OUT/<seed>.at-0.5.json (trainer.py's evaluation JSON line).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/multilabel_bbc}
SEEDS=${SEEDS:-"42 43"}
EPOCHS=${EPOCHS:-6}
DATA=data/bbc_multilabel
TASK="--data.label_col topics --data.labels_list [business,entertainment,politics,sports,tech] --data.multi_label true
      --module.max_seq_len 128 --trainer.log_dir $OUT/runs"
mkdir -p "$OUT"
for seed in $SEEDS; do
    ckpt=$OUT/ckpt-$seed
    [ -e "$ckpt/best" ] || { /usr/bin/time -f "train seconds %e" python trainer.py $TASK \
        --data.train_filepath $DATA/train.csv --data.val_filepath $DATA/val.csv --module.threshold tune \
        --trainer.epochs "$EPOCHS" --trainer.seed "$seed" --ckpt.model_state_save_dir "$ckpt" --ckpt.keep_last 1 \
        > "$OUT/$seed.train.log" 2> "$OUT/$seed.train.err"; tail -1 "$OUT/$seed.train.err"; }
    for at in tuned 0.5; do
        threshold=$([ "$at" = tuned ] || echo "--module.threshold $at")
        python trainer.py $TASK --data.train_filepath null --data.val_filepath $DATA/test.csv \
            --model.model_path "$ckpt/best" $threshold 2>/dev/null | tail -1 > "$OUT/$seed.at-$at.json"
        echo "seed $seed, thresholds $at: $(cat "$OUT/$seed.at-$at.json")"
    done
done
