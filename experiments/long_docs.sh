#!/usr/bin/env bash
# The README's long-document figures: BBC news topics (python experiments/bbc.py first), articles
# truncated at 128 tokens, cut into 128-token windows, and truncated at 512, each trained on
# data/bbc/train.csv (best of its epochs on val.csv) and evaluated on test.csv. Run inside the venv.
#   experiments/long_docs.sh                    # seeds 42 and 43; OUT=/tmp/... SEEDS=42 RUNS="windows128" to vary
# Results: $OUT/<run>-<seed>.test.json (trainer.py's evaluation JSON line) and $OUT/<run>-<seed>.seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/long_docs}
SEEDS=${SEEDS:-"42 43"}
EPOCHS=${EPOCHS:-2}
RUNS=${RUNS:-"truncate128 windows128 truncate512"}
TASK="--data.label_col topic --data.labels_list [business,entertainment,politics,sports,tech] --trainer.log_dir $OUT/runs"
declare -A OPTIONS=(
    [truncate128]="--module.max_seq_len 128"
    [windows128]="--module.max_seq_len 128 --data.long_texts windows --data.window_stride 32 --data.max_windows 4"
    [truncate512]="--module.max_seq_len 512"
)
mkdir -p "$OUT"
for run in $RUNS; do
    for seed in $SEEDS; do
        name=$run-$seed
        [ "$run" = truncate512 ] && [ "$seed" != "${SEEDS%% *}" ] && continue  # one seed: 4x the tokens
        if [ ! -e "$OUT/ckpt-$name/best" ]; then
            start=$(date +%s)
            python trainer.py $TASK ${OPTIONS[$run]} --data.train_filepath data/bbc/train.csv \
                --data.val_filepath data/bbc/val.csv --trainer.epochs "$EPOCHS" --trainer.seed "$seed" \
                --ckpt.model_state_save_dir "$OUT/ckpt-$name" --ckpt.keep_last 1 > "$OUT/$name.train.log" 2> "$OUT/$name.train.err"
            echo $(( $(date +%s) - start )) > "$OUT/$name.seconds"
        fi
        python trainer.py $TASK ${OPTIONS[$run]} --data.train_filepath null --data.val_filepath data/bbc/test.csv \
            --model.model_path "$OUT/ckpt-$name/best" 2>/dev/null | tail -1 > "$OUT/$name.test.json"
        echo "$name: $(cat "$OUT/$name.seconds") s training; test $(cut -c1-120 "$OUT/$name.test.json")"
    done
done
