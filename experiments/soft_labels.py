"""What a teacher's soft labels hold, per data file: its accuracy on the file's gold labels, how sure
it is (mean top probability) and how much it spreads over the other classes, at temperatures 1, 2, 4.

    python trainer.py --data.train_filepath null --data.val_filepath null --model.model_path TEACHER \
        --data.predict_filepath data/tweets/train.csv --data.predict_output /tmp/teacher-train.csv
    python experiments/soft_labels.py /tmp/teacher-train.csv /tmp/teacher-val.csv ...

Each argument is a predictions CSV of trainer.py (the input columns, with the gold `sentiment`, and a
prob_<label> per class). A teacher that was trained on a file is surer of it than of held-out text: on
its own training rows its soft labels say little more than the gold labels do, which is what a student
distilled on those rows learns from.
"""
import csv
import sys

import numpy as np

LABELS = ["negative", "neutral", "positive"]


def read(path):
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    probs = np.array([[float(row[f"prob_{name}"]) for name in LABELS] for row in rows])
    gold = np.array([LABELS.index(row["sentiment"]) for row in rows])
    return probs, gold


def soften(probs, temperature):
    """softmax(logits / T) from softmax(logits): p^(1/T), normalised."""
    powered = np.power(np.clip(probs, 1e-12, 1), 1 / temperature)
    return powered / powered.sum(axis=1, keepdims=True)


def main(paths):
    print("file | rows | teacher acc | mean top prob T=1 | T=2 | T=4 | mean mass off the top class T=2")
    for path in paths:
        probs, gold = read(path)
        accuracy = (probs.argmax(axis=1) == gold).mean()
        tops = [soften(probs, t).max(axis=1).mean() for t in (1, 2, 4)]
        off = 1 - tops[1]
        print(f"{path} | {len(gold)} | {accuracy:.3f} | {tops[0]:.3f} | {tops[1]:.3f} | {tops[2]:.3f} | {off:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
