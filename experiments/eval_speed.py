"""Evaluation throughput of several checkpoints, measured in one run: interleaved rounds, medians.

    python experiments/eval_speed.py TEACHER_DIR STUDENT_DIR [...] [--data data/tweets/test.csv]
        [--examples 2000] [--repeats 5] [--batch 128] [--max_seq_len 64]

Every round times each model once on the same examples (trainer.py's length-sorted evaluation
batches, and speedups.apply as trainer.run does with trainer.speedups on), in an order that
rotates between rounds, so a noisy neighbour slows all models alike.
Prints one JSON line: examples/s per model (median over rounds) and the speed-up over the first.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import speedups  # noqa: E402
from config import load_config  # noqa: E402
from evaluation import predict_logits  # noqa: E402
from model import build_model, load_tokenizer  # noqa: E402
from processes import Process  # noqa: E402
from splits import load_split  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="+")
    parser.add_argument("--data", default="data/tweets/test.csv")
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--max_seq_len", type=int, default=64)
    args = parser.parse_args()
    cfg = load_config(["--data.val_filepath", args.data, "--module.max_seq_len", str(args.max_seq_len)])
    ctx = Process(0, 0, 1, torch.device("cpu"), True, False)
    models = {}
    for path in args.models:
        model_cfg = {**cfg["model"], "model_path": path}
        models[path] = build_model(model_cfg, cfg["data"]["labels_list"]).eval()
        if cfg["trainer"]["speedups"]:
            speedups.apply(models[path], ctx.device)
    tokenizer = load_tokenizer({**cfg["model"], "model_path": args.models[0]})
    split = load_split(cfg, tokenizer, args.data, True)
    keep = list(range(min(args.examples, len(split.encoded))))
    split.encoded = split.encoded.subset(keep)
    names = list(models)
    for name in names:  # warm-up: first calls allocate and pick kernels
        predict_logits(models[name], split.encoded, args.batch, tokenizer.pad_token_id, ctx)
    seconds = {name: [] for name in names}
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            predict_logits(models[name], split.encoded, args.batch, tokenizer.pad_token_id, ctx)
            seconds[name].append(time.perf_counter() - start)
    rate = {name: len(keep) / statistics.median(s) for name, s in seconds.items()}
    result = {"examples": len(keep), "repeats": args.repeats, "threads": torch.get_num_threads(),
              "examples_per_s": rate,
              "layers": {name: models[name].config.num_hidden_layers for name in names},
              "speedup_over_first": {name: rate[name] / rate[names[0]] for name in names},
              # the same ratio per round (both timed within it), then the median over rounds
              "speedup_median_of_rounds": {name: statistics.median(
                  a / b for a, b in zip(seconds[names[0]], seconds[name])) for name in names},
              "seconds": seconds}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
