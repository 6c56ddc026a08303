"""The Hugging Face Trainer on the BBC multi-label task: the reference our own multi-label runs are compared to.

    python experiments/bbc.py                       # data/bbc_multilabel first
    python experiments/hf_multilabel.py --epochs 6 --seed 42 --output experiments/results/hf_multilabel.jsonl

Fine-tunes models/all-MiniLM-L6-v2 with problem_type="multi_label_classification" (BCE on float
multi-hot labels) with the recipe our trainer uses by default: AdamW, linear warmup and decay, weight
decay off for biases and LayerNorm, gradient norm clipped at 1.0. Then scores test.csv twice with
metrics.py: every label at probability >= 0.5, and at per-label thresholds tuned on val.csv with
metrics.best_thresholds. Prints one JSON line (and appends it to --output).
Needs `pip install accelerate` (the Trainer does); it is not one of the project's requirements.
"""
import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from metrics import best_thresholds, multilabel_metrics  # noqa: E402

HEADLINE = ["f1_micro", "f1_macro", "f1_samples", "subset_acc", "hamming_loss"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", default=str(ROOT / "data" / "bbc_multilabel"))
    p.add_argument("--model", default=str(ROOT / "models" / "all-MiniLM-L6-v2"))
    p.add_argument("--epochs", type=float, default=6)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--warmup_ratio", type=float, default=0.1)
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--num_threads", type=int, default=0, help="CPU threads; 0 = torch's default")
    p.add_argument("--limit", type=int, default=0, help="use only the first N rows of each file (smoke test)")
    p.add_argument("--output", default=None, help="append the JSON line to this file")
    return p.parse_args()


def read_split(path, limit):
    """(texts, label sets) of one CSV with columns text, topics ("a|b")."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    rows = rows[:limit] if limit else rows
    return [r["text"] for r in rows], [r["topics"].split("|") for r in rows]


def multi_hot(label_sets, label_names):
    index = {name: i for i, name in enumerate(label_names)}
    out = np.zeros((len(label_sets), len(label_names)), dtype=np.float32)
    for row, labels in enumerate(label_sets):
        out[row, [index[name] for name in labels]] = 1.0
    return out


def encode(tokenizer, texts, labels, max_length):
    """A list of examples the Trainer can batch; unpadded, the collator pads each batch to its longest."""
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    return [{**{k: enc[k][i] for k in enc}, "labels": labels[i]} for i in range(len(texts))]


def collate(tokenizer):
    def fn(features):
        labels = torch.tensor(np.stack([f.pop("labels") for f in features]))  # float32: BCE wants floats
        batch = tokenizer.pad(features, return_tensors="pt")
        batch["labels"] = labels
        return batch
    return fn


def probabilities(trainer, dataset):
    logits = trainer.predict(dataset).predictions
    return 1.0 / (1.0 + np.exp(-logits))


def main():
    args = parse_args()
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    data = {s: read_split(Path(args.data_dir) / f"{s}.csv", args.limit) for s in ("train", "val", "test")}
    label_names = sorted({name for labels in data["train"][1] for name in labels})
    targets = {s: multi_hot(labels, label_names) for s, (_, labels) in data.items()}

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    sets = {s: encode(tokenizer, data[s][0], targets[s], args.max_length) for s in data}
    truncated = np.mean([len(tokenizer(t)["input_ids"]) > args.max_length for t in data["test"][0]])
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, num_labels=len(label_names), problem_type="multi_label_classification",
        id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)})

    with tempfile.TemporaryDirectory() as out_dir:
        training_args = TrainingArguments(
            output_dir=out_dir, num_train_epochs=args.epochs, learning_rate=args.lr,
            per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=128,
            warmup_steps=args.warmup_ratio,  # transformers 5: a float below 1 is a ratio of the steps
            weight_decay=args.weight_decay, lr_scheduler_type="linear", optim="adamw_torch",
            max_grad_norm=1.0, seed=args.seed, eval_strategy="no", save_strategy="no",
            logging_steps=20, report_to="none", disable_tqdm=True)
        trainer = Trainer(model=model, args=training_args, train_dataset=sets["train"],
                          data_collator=collate(tokenizer))
        start = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - start
        val_probs, test_probs = probabilities(trainer, sets["val"]), probabilities(trainer, sets["test"])

    at_half = multilabel_metrics(test_probs >= 0.5, targets["test"], label_names)
    thresholds = best_thresholds(val_probs, targets["val"])
    tuned = multilabel_metrics(test_probs >= thresholds, targets["test"], label_names)
    result = {
        "seed": args.seed, "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
        "max_length": args.max_length, "train_rows": len(sets["train"]), "test_rows": len(sets["test"]),
        "test_truncated": round(float(truncated), 4),
        **{k: round(at_half[k], 4) for k in HEADLINE},
        "per_label_f1": {n: round(v["f1"], 4) for n, v in at_half["per_label"].items()},
        "train_seconds": round(train_seconds, 1),
        "tuned_thresholds": dict(zip(label_names, thresholds.round(2).tolist())),
        "tuned": {k: round(tuned[k], 4) for k in HEADLINE},
    }
    line = json.dumps(result)
    print(line)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        with open(args.output, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
