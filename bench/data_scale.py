"""Data at scale: the memory a tokenized training file holds, and the time a run takes to its first step.

    python bench/data_scale.py                       # 100,000 and 300,000 rows, then the first step at 300,000
    python bench/data_scale.py --rows 1000 100000 --first-step-rows 0
    python bench/data_scale.py --rows --first-step-rows 0 --ready-rows 1000000      # data ready, cold and warm
    python bench/data_scale.py --rows --first-step-rows 0 --ddp-rows 10000000       # 2-process torchrun start

Synthetic files: data/tweets/train.csv replicated to N rows (the header once), in a scratch folder.
Every measurement is its own subprocess, so its peak RSS (resource.getrusage) is its own:
- encode: data.read_examples + data.encode with the tokenizer of --model at max length 64; reports
  the peak RSS, the RSS still held after loading (above the process after its imports and the
  tokenizer), per row, and the rows/s of reading + tokenizing.
- first step: trainer.py training on the file (validation off, no checkpoints, one log line per step)
  with data.cache_dir a fresh folder (cold: it tokenizes and writes the cache), then again with the
  same folder (warm: it maps the cache); the time from the process start to the first logged step,
  then the process is killed.
- ready: splits.read_split + tokenize (the run's read, check, tokenize and cache) on the file, timed inside
  the process, with a fresh cache folder (cold), then again with it (warm: the entry is mapped).
- ddp: the first step as above under `torchrun --nproc_per_node 2` (gloo), with each rank's peak
  RSS (VmHWM) read from /proc when the first step is logged.
Prints one JSON line with every figure.
"""
import argparse
import csv
import ctypes
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def replicate(src, dst, rows):
    """src's data rows repeated (in order) to `rows` rows, under src's header."""
    with open(src, encoding="utf-8", newline="") as f:
        header, *data = list(csv.reader(f))
    with open(dst, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for i in range(rows):
            writer.writerow(data[i % len(data)])
    return str(dst)


def rss_mib():
    """This process's resident set now (not the peak), from /proc."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def release_free_memory():
    """Hand freed heap pages back to the OS (glibc malloc_trim), so the RSS after loading counts
    what is held, not what the allocator keeps for later."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def encode_worker(path, model, max_seq_len):
    sys.path.insert(0, str(ROOT))
    from transformers import AutoTokenizer

    from config import load_config
    from data import encode, read_examples
    cfg = load_config([])
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer("warm up the tokenizer", truncation=True, max_length=max_seq_len)
    base = rss_mib()
    start = time.perf_counter()
    examples = read_examples(path, cfg["data"], need_labels=True)
    encoded = encode(tokenizer, examples, max_seq_len)
    seconds = time.perf_counter() - start
    del examples  # what a training run holds is the encoded split (and the labels inside it)
    release_free_memory()
    held = rss_mib() - base
    arrays = sum(getattr(encoded, name).nbytes for name in ("ids", "offsets", "labels")
                 if getattr(encoded, name, None) is not None and hasattr(getattr(encoded, name), "nbytes"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rows": len(encoded), "seconds": seconds, "rows_per_s": len(encoded) / seconds,
                      "peak_rss_mib": peak, "base_rss_mib": base, "held_mib": held,
                      "held_bytes_per_row": held * 2**20 / len(encoded),
                      "array_bytes_per_row": arrays / len(encoded) if arrays else None}))


def ready_worker(path, model, max_seq_len, cache_dir):
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from config import load_config
    from processes import Process
    from splits import read_split, tokenize
    cfg = load_config(["--data.train_filepath", path, "--data.val_filepath", "null", "--data.cache_dir", cache_dir,
                       "--module.max_seq_len", str(max_seq_len), "--model.hf_model", model])
    tokenizer = AutoTokenizer.from_pretrained(model)
    start = time.perf_counter()
    proc = Process(0, 0, 1, torch.device("cpu"), True, False)
    train = tokenize(cfg, proc, tokenizer, path, read_split(cfg, proc, tokenizer, path, need_labels=True))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rows": len(train.encoded), "seconds": seconds, "peak_rss_mib": peak,
                      "mapped": isinstance(train.encoded.ids, np.memmap)}))


def run_worker(*args):
    """The JSON line a worker of this script prints, run in its own process (its own peak RSS)."""
    out = subprocess.run([sys.executable, __file__, *map(str, args)], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        sys.exit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_ready(path, model, max_seq_len, cache_dir):
    return run_worker("--ready-worker", path, "--model", model, "--max_seq_len", max_seq_len, "--cache", cache_dir)


def measure_encode(path, model, max_seq_len):
    return run_worker("--worker", path, "--model", model, "--max_seq_len", max_seq_len)


def has_cache_key():
    return "cache_dir:" in (ROOT / "config.yaml").read_text()


def time_to_first_step(path, model, max_seq_len, log_dir, cache_dir, nproc=1):
    """Seconds from starting trainer.py (under torchrun for nproc > 1) to its first logged step,
    and each rank's peak RSS in MiB then (the process is killed after)."""
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    args = launcher + [str(ROOT / "trainer.py"), "--data.train_filepath", path, "--data.val_filepath", "null",
            "--model.hf_model", model, "--module.max_seq_len", str(max_seq_len), "--trainer.log_steps", "1",
            "--trainer.log_dir", str(log_dir), "--ckpt.checkpoint", "false",
            "--ckpt.model_state_save_dir", str(Path(log_dir) / "ckpt"), "--trainer.device", "cpu"]
    if nproc > 1:
        args += ["--trainer.backend", "ddp"]
    if has_cache_key():
        args += ["--data.cache_dir", str(cache_dir)]
    # stderr to a file, not a pipe: a pipe nobody reads fills with progress bars and stops the run
    stderr = open(Path(log_dir).with_name(Path(log_dir).name + ".stderr"), "w+")
    start = time.perf_counter()
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr, text=True,
                            start_new_session=True)
    try:
        while proc.poll() is None:
            logs = list(Path(log_dir).glob("*/metrics.jsonl"))
            if logs and logs[0].read_text().strip():
                return time.perf_counter() - start, ranks_peak_rss(proc.pid)
            time.sleep(0.1)
        stderr.seek(0)
        sys.exit(f"trainer.py ended before its first step:\n{stderr.read()[-3000:]}")
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()
        stderr.close()


def ranks_peak_rss(root):
    """{rank: peak RSS in MiB} of the trainer processes at or under pid root (torchrun's workers,
    or the one plain process), from /proc."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    family, grew = {root}, True
    while grew:
        more = {pid for pid, ppid in parent.items() if ppid in family} - family
        family |= more
        grew = bool(more)
    peaks = {}
    for pid in family:
        folder = Path("/proc") / str(pid)
        try:
            cmdline = (folder / "cmdline").read_bytes()
            environ = (folder / "environ").read_bytes().split(b"\0")
            status = (folder / "status").read_text()
        except OSError:
            continue
        if b"trainer.py" not in cmdline or b"torch.distributed.run" in cmdline:
            continue  # not a trainer, or the launcher
        rank = next((e.split(b"=", 1)[1].decode() for e in environ if e.startswith(b"RANK=")), "0")
        peaks[rank] = int(status.split("VmHWM:")[1].split()[0]) / 1024
    return peaks


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="*", default=[100_000, 300_000])
    parser.add_argument("--first-step-rows", type=int, default=300_000, help="0 = skip")
    parser.add_argument("--model", default=str(ROOT / "models" / "all-MiniLM-L6-v2"))
    parser.add_argument("--max_seq_len", type=int, default=64)
    parser.add_argument("--ready-rows", type=int, default=0, help="0 = skip")
    parser.add_argument("--ddp-rows", type=int, default=0, help="0 = skip")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--ready-worker", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return encode_worker(args.worker, args.model, args.max_seq_len)
    if args.ready_worker:
        return ready_worker(args.ready_worker, args.model, args.max_seq_len, args.cache)
    src = ROOT / "data" / "tweets" / "train.csv"
    result = {"encode": {}, "first_step_s": {}, "first_step_peak_rss_mib": {}, "ready": {}, "ddp": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for rows in args.rows:
            path = replicate(src, Path(scratch) / f"tweets-{rows}.csv", rows)
            result["encode"][rows] = measure_encode(path, args.model, args.max_seq_len)
        if args.first_step_rows:
            path = replicate(src, Path(scratch) / f"tweets-{args.first_step_rows}.csv", args.first_step_rows)
            cache = Path(scratch) / "cache"
            for name in ("cold", "warm"):
                result["first_step_s"][name], result["first_step_peak_rss_mib"][name] = time_to_first_step(
                    path, args.model, args.max_seq_len, Path(scratch) / f"logs-{name}", cache)
        if args.ready_rows:
            path = replicate(src, Path(scratch) / f"tweets-{args.ready_rows}.csv", args.ready_rows)
            for name in ("cold", "warm"):
                result["ready"][name] = measure_ready(path, args.model, args.max_seq_len, Path(scratch) / "ready-cache")
        if args.ddp_rows:
            path = replicate(src, Path(scratch) / f"tweets-{args.ddp_rows}.csv", args.ddp_rows)
            for name in ("cold", "warm"):
                seconds, peaks = time_to_first_step(path, args.model, args.max_seq_len, Path(scratch) / f"ddp-{name}",
                                                    Path(scratch) / "ddp-cache", nproc=2)
                result["ddp"][name] = {"first_step_s": seconds, "peak_rss_mib_by_rank": peaks}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
