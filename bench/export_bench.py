"""Benchmark: prediction throughput of checkpoints in plain transformers, ours, ONNX fp32 and ONNX int8.

    python bench/export_bench.py --model checkpoints/teacher/best --model checkpoints/student-3l/best
    python bench/export_bench.py --model checkpoints/teacher/best --rows 200 --rounds 1    # a quick look

Each checkpoint runs six ways over the same rows (the first --rows of --data, read as evaluation
reads the checkpoint), all through evaluation.predict_logits with length-sorted batches of --batch:
  plain      transformers fp32, as from_pretrained builds the model
  ours       the same with speedups.apply, as trainer.py evaluates: the baseline of the targets
  onnx_fp32  export.py's model.onnx in ONNX Runtime: the TorchScript exporter's graph, fused by
             ONNX Runtime's transformer optimizer (attention, LayerNorm, GELU and bias)
  onnx_int8  export.py's model.int8.onnx: that fused graph in dynamic int8
  onnx_fp32_unfused, onnx_int8_unfused   the same from torch.export's graph, unfused (export.py
             before fusion, and its fallback where the TorchScript exporter fails)
Every runner gets --threads (torch.set_num_threads, ONNX Runtime's intra-op threads). The rounds
interleave every runner of every checkpoint, each figure is the median over the rounds, and the
ratios are to the first checkpoint's plain runner and to the same checkpoint's ours runner, measured
in the same run (our machines are shared and noisy). Macro F1 on the rows' labels and the share of
predictions identical to the same checkpoint's plain runner come from the first round. The ONNX
models are exported into a temporary folder with export.py's own functions; export.py's gate is not
applied here.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification

import config
import evaluation
import export
import processes
import speedups
from config import load_config
from data import encode, read_examples, window_stride
from metrics import compute_metrics
from model import load_tokenizer, use_checkpoint_settings

# not the main process: predict_logits then draws no progress bar, which would cost time here
QUIET = processes.Process(0, 0, 1, torch.device("cpu"), False, False)
RUNNERS = ("plain", "ours", "onnx_fp32", "onnx_int8", "onnx_fp32_unfused", "onnx_int8_unfused")


def load_rows(checkpoint, data_path, rows):
    """(config, tokenizer, the first `rows` examples encoded) as evaluation reads the checkpoint."""
    cfg = load_config(["--model.model_path", checkpoint, "--data.train_filepath", "null",
                       "--data.val_filepath", data_path])
    use_checkpoint_settings(cfg)
    tokenizer = load_tokenizer(cfg["model"])
    examples = read_examples(data_path, cfg["data"], need_labels=True)
    examples = replace(examples, texts_a=examples.texts_a[:rows], labels=examples.labels[:rows],
                       texts_b=None if examples.texts_b is None else examples.texts_b[:rows])
    return cfg, tokenizer, encode(tokenizer, examples, cfg["module"]["max_seq_len"], stride=window_stride(cfg["data"]))


def build_runners(checkpoint, encoded, tokenizer, folder, threads):
    """{runner name: a model predict_logits can call} for one checkpoint; its ONNX files in folder."""
    plain = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    ours = speedups.apply(AutoModelForSequenceClassification.from_pretrained(checkpoint).eval(), "cpu")
    example = export.example_inputs(encoded, tokenizer)
    runners = {"plain": plain, "ours": ours}
    for suffix, export_graph in (("", export.export_fp32), ("_unfused", export.export_dynamo)):
        fp32, int8 = folder / f"model{suffix}.onnx", folder / f"model{suffix}.int8.onnx"
        export_graph(plain, example, fp32, checkpoint)
        if not suffix:
            print(f"{checkpoint}: {export.optimize_fp32(fp32, plain.config)}", file=sys.stderr)
        export.quantize_int8(fp32, int8)
        runners[f"onnx_fp32{suffix}"] = export.OnnxClassifier(fp32, plain.config.num_labels, threads)
        runners[f"onnx_int8{suffix}"] = export.OnnxClassifier(int8, plain.config.num_labels, threads)
    return runners


def commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True,
                        help="a checkpoint folder; repeat for more (the first is the reference of the ratios)")
    parser.add_argument("--data", default="data/tweets/test.csv", help="labelled rows to predict")
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]

    jobs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, checkpoint in enumerate(args.model):
            cfg, tokenizer, encoded = load_rows(checkpoint, args.data, args.rows)
            folder = Path(tmp) / str(i)
            folder.mkdir()
            print(f"exporting {checkpoint} ...", file=sys.stderr)
            jobs.append({"checkpoint": checkpoint, "cfg": cfg, "tokenizer": tokenizer, "encoded": encoded,
                         "runners": build_runners(checkpoint, encoded, tokenizer, folder, args.threads),
                         "ex_s": {name: [] for name in RUNNERS}, "logits": {}})
        for round_ in range(args.rounds):
            print(f"round {round_ + 1} of {args.rounds}", file=sys.stderr)
            for job in jobs:
                for name, model in job["runners"].items():
                    start = time.perf_counter()
                    logits = evaluation.predict_logits(model, job["encoded"], args.batch, job["tokenizer"].pad_token_id,
                                                    QUIET)
                    job["ex_s"][name].append(job["encoded"].num_documents / (time.perf_counter() - start))
                    job["logits"].setdefault(name, evaluation.document_logits(logits, job["encoded"], job["cfg"]))

    reference = statistics.median(jobs[0]["ex_s"]["plain"])
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit(),
               "torch": torch.__version__, "onnxruntime": export.onnxruntime.__version__,
               "data": args.data, "rows": args.rows, "batch": args.batch, "threads": args.threads,
               "rounds": args.rounds, "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
               "models": []}
    print("| model | runner | ex/s (median) | x plain teacher | x ours | macro F1 | identical to plain |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for job in jobs:
        labels, names = job["encoded"].document_labels(), config.label_names(job["cfg"])
        plain_predictions = job["logits"]["plain"].argmax(axis=1)
        for name in RUNNERS:
            predictions = job["logits"][name].argmax(axis=1)
            row = {"model": job["checkpoint"], "runner": name, "ex_s": statistics.median(job["ex_s"][name]),
                   "ex_s_rounds": [round(v, 1) for v in job["ex_s"][name]],
                   "f1_macro": compute_metrics(predictions, labels, names)["f1_macro"],
                   "identical": float(np.mean(predictions == plain_predictions))}
            row["ratio"] = row["ex_s"] / reference
            row["x_ours"] = row["ex_s"] / statistics.median(job["ex_s"]["ours"])
            results["models"].append(row)
            print(f"| {job['checkpoint']} | {name} | {row['ex_s']:.1f} | {row['ratio']:.2f}x | {row['x_ours']:.2f}x "
                  f"| {row['f1_macro']:.4f} | {row['identical']:.1%} |")
    print(f"{results['date']}, commit {results['commit']}, {args.rows} rows of {args.data}, batch {args.batch}, "
          f"{args.threads} threads, {args.rounds} rounds, load average {results['load_average']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
