"""experiments/results/imbalance.md from the outputs of experiments/imbalance.sh.

    python experiments/imbalance_table.py OUT_DIR data/tweets_imbalanced/train.csv
"""
import csv
import json
import re
import statistics
import sys
from collections import Counter
from pathlib import Path

RARE = "positive"
COMMAND = ("experiments/imbalance.sh   # per run: python trainer.py --data.train_filepath "
           "data/tweets_imbalanced/train.csv --trainer.epochs 2 --trainer.seed S --module.class_weights W "
           "--trainer.log_dir OUT/runs --ckpt.model_state_save_dir OUT/ckpt-NAME --ckpt.keep_last 1, then "
           "python trainer.py --data.train_filepath null --data.val_filepath data/tweets/test.csv "
           "--model.model_path OUT/ckpt-NAME/best --trainer.log_dir OUT/runs")


def logged_weights(out):
    """The 'class weights: ...' line a balanced run's trainer.py printed (the same for every seed)."""
    for log in sorted(out.glob("balanced-*.train.log")):
        match = re.search(r"class weights: (.*)", log.read_text())
        if match:
            return match.group(1)
    return "(not found in the training logs)"


def row_of(path):
    weights, seed = re.fullmatch(r"(\w+)-s(\d+)\.test\.json", path.name).groups()
    m = json.loads(path.read_text())
    rare = m["per_class"][RARE]
    return {"weights": weights, "seed": int(seed), "f1_macro": m["f1_macro"], "acc": m["acc"],
            "rare_f1": rare["f1"], "rare_recall": rare["recall"], "rare_precision": rare["precision"]}


def main(out, train_file):
    out = Path(out)
    with open(train_file, encoding="utf-8", newline="") as f:
        counts = Counter(r["sentiment"] for r in csv.DictReader(f))
    total = sum(counts.values())
    rows = sorted((row_of(p) for p in out.glob("*.test.json")), key=lambda r: (r["weights"] != "null", r["seed"]))
    keys = ["f1_macro", "acc", "rare_f1", "rare_recall", "rare_precision"]
    print("# Class weights on an imbalanced tweet training set\n")
    print("Date: 2026-12-02. MiniLM (models/all-MiniLM-L6-v2), 2 epochs, the other settings config.yaml's "
          "defaults; the best epoch is chosen on data/tweets/val.csv (natural balance), then tested on "
          f"data/tweets/test.csv (natural balance).\n\nCommand: `{COMMAND}`\n")
    print(f"Training rows ({train_file}, {total}): "
          + ", ".join(f"{name} {counts[name]} ({counts[name] / total:.1%})" for name in sorted(counts)) + "\n")
    if rows:
        support = json.loads(next(out.glob("*.test.json")).read_text())["per_class"]
        test_total = sum(c["support"] for c in support.values())
        print(f"Test rows (data/tweets/test.csv, {test_total}): " + ", ".join(
            f"{name} {c['support']} ({c['support'] / test_total:.1%})" for name, c in support.items()) + "\n")
    print(f"Balanced weights the trainer logged: {logged_weights(out)}\n")
    print("| class_weights | seed | test macro F1 | test acc | positive F1 | positive recall | positive precision |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['weights']} | {r['seed']} | " + " | ".join(f"{r[k]:.4f}" for k in keys) + " |")
    for weights in ("null", "balanced"):
        group = [r for r in rows if r["weights"] == weights]
        if group:
            print(f"| **{weights}, mean** | {len(group)} seeds | "
                  + " | ".join(f"{statistics.mean(r[k] for r in group):.4f}" for k in keys) + " |")


if __name__ == "__main__":
    main(*sys.argv[1:])
