#!/usr/bin/env bash
# The distillation table of the README, on the tweet corpus (python prepare.py first).
#   experiments/distill_tweets.sh                  # everything; hours on 2 busy CPU cores, minutes on a GPU
#   OUT=/tmp/kd SEEDS="42" STUDENT_EPOCHS=1 experiments/distill_tweets.sh   # a cheaper pass
#   TEACHER=ckpt/teacher/best THREADS=1 ...         # reuse a teacher; one thread per process on a busy machine
# Each step is skipped when its output exists, so the script can be re-run after an interruption.
# Results: $OUT/<run>.test.json (trainer.py's evaluation on data/tweets/test.csv), $OUT/speed.json,
# and the table printed by experiments/table.py at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/distill_tweets}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-4}     # validation is run after every epoch; `best` keeps the top one
STUDENT_EPOCHS=${STUDENT_EPOCHS:-3}
SEEDS=${SEEDS:-"42 43"}
TEACHER=${TEACHER:-$OUT/teacher/best}
UNLABELED=${UNLABELED:-data/tweets/unlabeled.csv}
THREADS=${THREADS:-0}                   # 0 = all cores; 1 is faster when other jobs share them
PY="nice -n 5 python"
LOGS="--trainer.log_dir $OUT/runs --ckpt.keep_last 1 --trainer.num_threads $THREADS"
mkdir -p "$OUT"

# 1. the teacher: MiniLM (6 layers) fine-tuned on the 4,000 labelled tweets
[ -e "$TEACHER" ] || $PY trainer.py --trainer.epochs "$TEACHER_EPOCHS" \
    --ckpt.model_state_save_dir "$OUT/teacher" $LOGS
KD="distill.py --config_path configs/distill.yaml --model.model_path $TEACHER \
    --trainer.epochs $STUDENT_EPOCHS $LOGS --ckpt.overwrite true"
LABELS_ONLY="--distill.loss_types [labels] --distill.loss_weights [1.0]"

student() {  # name, then distill.py options
    local name=$1; shift
    [ -e "$OUT/$name/best" ] || $PY $KD --ckpt.model_state_save_dir "$OUT/$name" "$@"
}

# 2. students: 3 layers distilled, the same cut fine-tuned on labels alone, 2 layers, transfer data
for seed in $SEEDS; do
    student "kd3-s$seed" --trainer.seed "$seed" --distill.student_layers [0,2,5]
    student "ft3-s$seed" --trainer.seed "$seed" --distill.student_layers [0,2,5] $LABELS_ONLY
done
first_seed=${SEEDS%% *}
student "kd2-s$first_seed" --trainer.seed "$first_seed" --distill.student_layers [0,5]
student "kd3u-s$first_seed" --trainer.seed "$first_seed" --distill.student_layers [0,2,5] \
    --distill.unlabeled_filepaths "[$UNLABELED]"

# 3. every model on the 5,000 held-out test tweets, with trainer.py's evaluate command
[ -s "$OUT/teacher.test.json" ] || $PY trainer.py --data.train_filepath null \
    --data.val_filepath data/tweets/test.csv --model.model_path "$TEACHER" --trainer.log_dir "$OUT/eval" --trainer.num_threads $THREADS \
    | tail -n 1 > "$OUT/teacher.test.json"
for dir in "$OUT"/*-s*/best; do
    name=$(basename "$(dirname "$dir")")
    [ -s "$OUT/$name.test.json" ] || $PY trainer.py --data.train_filepath null \
        --data.val_filepath data/tweets/test.csv --model.model_path "$dir" \
        --trainer.log_dir "$OUT/eval" --trainer.num_threads $THREADS | tail -n 1 > "$OUT/$name.test.json"
done

# 4. evaluation throughput: teacher and students in one run, interleaved, median of 5 rounds
[ -s "$OUT/speed.json" ] || $PY experiments/eval_speed.py "$TEACHER" \
    "$OUT/kd3-s$first_seed/best" "$OUT/kd2-s$first_seed/best" > "$OUT/speed.json"

python experiments/table.py "$OUT"
