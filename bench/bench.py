"""Benchmark: the same fine-tuning job with trainer.py and with the Hugging Face Trainer.

    pip install -r requirements.txt -r bench/requirements.txt && python prepare.py
    python bench/bench.py                                    # the README table (the longest run)
    python bench/bench.py --train-examples 512 --eval-examples 256 --repeats 1    # a quick look
    python bench/bench.py --compile                          # also trainer.py with torch.compile
    python bench/bench.py --roberta-bf16                     # CUDA only: roberta-base size, bf16 on both
    python bench/bench.py --device cpu                       # the CPU job on a machine with a GPU

Both systems train the same model (the MiniLM of `python prepare.py`) on the same tweets with the
same hyperparameters (epochs, global batch, learning rate, warmup, weight decay, max length, seed),
then predict the same evaluation split. The Hugging Face side is its usual recipe: a `datasets`
dataset tokenized with `map`, DataCollatorWithPadding, Trainer + TrainingArguments with their
defaults (fused AdamW, random sampling, linear schedule). Our side calls trainer.py's own functions.

Every run is a fresh subprocess (so peak memory and time to first step are its own), the runs are
interleaved (ours, peer, then peer, ours, ...) and repeated, and each figure is the median over the
repeats, because our machines are shared and noisy. The job runs where trainer.py would put it
(--device auto: the GPU when there is one, else the CPU; --device cpu or cuda to choose), both
systems on that device. A matmul rate is measured in the same run, between the runs, on the job's
device and in its precision (bf16 for --roberta-bf16; else float32, which on CUDA runs as TF32, as
trainer.py's default trainer.tf32 true makes it), and our training FLOP/s (counted on real tokens
only, padding excluded) is reported as a fraction of it.
"""
import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = {"train": 2.0, "eval": 1.5, "acc_points": 1.0, "matmul_fraction": 0.60}
LABELS = ["negative", "neutral", "positive"]


# ---------------------------------------------------------------------------------------------
# FLOPs of an encoder classifier, counted on real tokens


def encoder_flops(config, lengths, training=True, cls_only_last_layer=False):
    """Matmul FLOPs of a BERT-style classifier over sequences of the given (unpadded) lengths.

    Per token and layer: Q, K, V, output projections (4 d^2 multiply-adds) and the feed-forward
    (2 d f); per sequence and layer: scores and weighted values (2 n^2 d); per sequence: the
    pooler / classifier head on the first token (d^2 + d c). With cls_only_last_layer (what
    trainer.py runs with trainer.speedups on, speedups.first_position_last_layer) the last layer
    computes K and V at every token (2 d^2) but the rest for the first token only (2 d^2 + 2 d f,
    and 2 n d of attention): only the work done is counted. Training costs 3x the forward (the
    backward computes gradients of inputs and of weights). Embedding lookups, norms and
    activations are not matmuls and are left out, as is usual for model FLOP utilisation.
    """
    d, f, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    c = config.num_labels
    tokens = sum(int(n) for n in lengths)
    squares = sum(int(n) ** 2 for n in lengths)
    full_layers = layers - 1 if cls_only_last_layer else layers
    macs = full_layers * (tokens * (4 * d * d + 2 * d * f) + squares * 2 * d) + len(lengths) * (d * d + d * c)
    if cls_only_last_layer:
        macs += tokens * 2 * d * d + len(lengths) * (2 * d * d + 2 * d * f) + tokens * 2 * d
    return 2 * macs * (3 if training else 1)


# the reference matmul's side per device (2048 is over in microseconds on a GPU), and the
# products timed together in one repeat, so that a GPU repeat lasts milliseconds, not a launch
MATMUL_SIZE = {"cpu": (2048, 1), "cuda": (8192, 10)}


def matmul_rate(device, dtype, size=None, repeats=5):
    """FLOP/s of a large square matmul on device in dtype (median of repeats): the job's reference.

    On CPU with the current thread setting; on CUDA with float32 as TF32 (trainer.tf32 true, the
    trainer's default, sets allow_tf32), the GPU's queue drained around each timed repeat.
    """
    import torch
    device = torch.device(device)
    size, count = (size, 1) if size else MATMUL_SIZE[device.type]
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # as trainer.setup_distributed does by default
    try:
        seconds_per_matmul(a, b, count)  # warm-up: allocations, the BLAS threads or cuBLAS handle
        seconds = statistics.median(seconds_per_matmul(a, b, count) for _ in range(repeats))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    del a, b
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the driver keeps no GPU memory while the next run trains
    return 2 * size ** 3 / seconds


def seconds_per_matmul(a, b, count):
    """Seconds per a @ b over count products, the device's queue drained at both ends."""
    synchronize(a.device)
    start = time.perf_counter()
    for _ in range(count):
        a @ b
    synchronize(a.device)
    return (time.perf_counter() - start) / count


def synchronize(device):
    """Wait for the work queued on device: a CUDA call returns before the GPU has done it."""
    import torch
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def job_dtype(job):
    """The dtype the job's matmuls run in (autocast's for a bf16 job)."""
    import torch
    return torch.bfloat16 if job["bf16"] else torch.float32


# ---------------------------------------------------------------------------------------------
# one run of one system, in its own process


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def since_process_start():
    import psutil
    return time.time() - psutil.Process().create_time()


def ours_argv(job):
    """trainer.py's command line for the job (also used by step_profile.py)."""
    argv = ["--data.train_filepath", job["train_file"], "--data.val_filepath", job["eval_file"],
            "--model.hf_model", job["model"], "--trainer.epochs", str(job["epochs"]),
            "--trainer.train_batch_size", str(job["batch_size"]),
            "--trainer.gpu_batch_size_limit", str(job["batch_size"]),
            "--trainer.val_batch_size", str(job["eval_batch_size"]),
            "--module.max_lr", str(job["lr"]), "--module.warmup_prop", str(job["warmup"]),
            "--module.weight_decay", str(job["weight_decay"]),
            "--module.max_seq_len", str(job["max_seq_len"]), "--trainer.seed", str(job["seed"]),
            "--trainer.log_dir", job["log_dir"], "--ckpt.checkpoint", "false",
            "--trainer.compile", str(job["compile"]).lower(), "--data.labels_list", json.dumps(LABELS),
            "--trainer.device", job["device"]]
    if job["bf16"]:
        argv += ["--trainer.backend", "sp-amp", "--trainer.amp_dtype", "bf16"]
    return argv


def run_ours(job):
    """trainer.py's own functions: load, tokenize, train (no validation inside), then predict."""
    import torch

    import config
    import evaluation
    import model
    import processes
    import speedups
    import splits
    import trainer
    from metrics import compute_metrics
    first_step = {}

    class TimedTrainer(trainer.Trainer):
        def train_step(self, *args):
            super().train_step(*args)
            if "s" not in first_step:  # once: the first step done on the device, not just queued
                synchronize(self.proc.device)
                first_step["s"] = since_process_start()

    cfg = config.load_config(ours_argv(job))
    proc = trainer.setup_distributed(cfg["trainer"])
    processes.seed_everything(cfg["trainer"]["seed"])
    tokenizer = model.load_tokenizer(cfg["model"])
    train, val = [splits.load_split(cfg, tokenizer, cfg["data"][key]) for key in ("train_filepath", "val_filepath")]
    if job["random_roberta"]:
        model = build_random_roberta(job)
    else:
        model = model.build_model(cfg["model"], LABELS)
    if cfg["trainer"]["speedups"]:  # as trainer.run does
        speedups.apply(model, proc.device)
    run = TimedTrainer(cfg, proc, model, tokenizer, train, None)  # no validation inside train()
    _, train_s = timed(run.train, proc.device)
    logits, eval_s = timed(lambda: evaluation.predict_logits(
        model, val.encoded, cfg["trainer"]["val_batch_size"], tokenizer.pad_token_id,
        proc), proc.device)
    metrics = compute_metrics(logits.argmax(axis=1), val.encoded.labels, LABELS)
    return {"train_s": train_s, "eval_s": eval_s, "first_step_s": first_step["s"],
            "acc": metrics["acc"], "f1_macro": metrics["f1_macro"],
            "train_lengths": train.encoded.lengths.tolist(), "eval_lengths": val.encoded.lengths.tolist(),
            "config": model.config.to_dict(), "threads": torch.get_num_threads()}


def run_hf(job):
    """The Hugging Face Trainer, its usual recipe: datasets.map tokenization + DataCollatorWithPadding."""
    import datasets
    import torch
    import transformers

    from metrics import compute_metrics
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    first_step = {}

    class FirstStep(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if "s" not in first_step:  # once: the first step done on the device, not just queued
                synchronize(args.device)
                first_step["s"] = since_process_start()

    tokenizer = transformers.AutoTokenizer.from_pretrained(job["model"])
    label_ids = {name: i for i, name in enumerate(LABELS)}

    def load(path):
        data = datasets.load_dataset("csv", data_files=path, split="train")
        return data.map(lambda rows: {**tokenizer(rows["text"], truncation=True, max_length=job["max_seq_len"]),
                                      "label": [label_ids[s] for s in rows["sentiment"]]},
                        batched=True, remove_columns=data.column_names)

    train, val = load(job["train_file"]), load(job["eval_file"])
    transformers.set_seed(job["seed"])
    if job["random_roberta"]:
        model = build_random_roberta(job)
    else:
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            job["model"], num_labels=len(LABELS), id2label=dict(enumerate(LABELS)), label2id=label_ids)
    if job["device"] == "cuda":  # the matmul precision of trainer.py's default, trainer.tf32 true
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    args = transformers.TrainingArguments(
        output_dir=job["log_dir"], num_train_epochs=job["epochs"], per_device_train_batch_size=job["batch_size"],
        per_device_eval_batch_size=job["eval_batch_size"], learning_rate=job["lr"],
        warmup_steps=job["warmup"], weight_decay=job["weight_decay"], lr_scheduler_type="linear",
        max_grad_norm=1.0, seed=job["seed"], bf16=job["bf16"], save_strategy="no", eval_strategy="no",
        logging_steps=20, report_to="none", disable_tqdm=True, use_cpu=job["device"] == "cpu")
    peer = transformers.Trainer(model=model, args=args, train_dataset=train,
                                data_collator=transformers.DataCollatorWithPadding(tokenizer),
                                callbacks=[FirstStep()])
    _, train_s = timed(peer.train, args.device)
    out, eval_s = timed(lambda: peer.predict(val), args.device)
    metrics = compute_metrics(out.predictions.argmax(axis=1), out.label_ids, LABELS)
    return {"train_s": train_s, "eval_s": eval_s, "first_step_s": first_step["s"],
            "acc": metrics["acc"], "f1_macro": metrics["f1_macro"], "threads": torch.get_num_threads()}


def build_random_roberta(job):
    """roberta-base's shape, randomly initialised (the hub is unreachable); same seed on both sides."""
    import torch
    from transformers import RobertaConfig, RobertaForSequenceClassification
    torch.manual_seed(job["seed"])
    config = RobertaConfig(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                           intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1,
                           # the data is tokenized by the MiniLM tokenizer: its pad / [CLS] / [SEP] ids
                           pad_token_id=0, bos_token_id=101, eos_token_id=102, num_labels=len(LABELS),
                           id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    return RobertaForSequenceClassification(config)


def timed(fn, device):
    """(fn(), seconds), with work queued on device finished at both ends so the time is the real one."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def worker(system, job_path, out_path):
    job = json.loads(Path(job_path).read_text())
    result = (run_ours if system == "ours" else run_hf)(job)
    result["peak_rss_mib"] = peak_rss_mib()
    if job["device"] == "cuda":  # tensors at their peak, and what the caching allocator held for them
        import torch
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
        result["peak_gpu_reserved_mib"] = torch.cuda.max_memory_reserved() / 2 ** 20
    Path(out_path).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# the driver: data subsets, interleaved repeats, medians, the table


def write_subset(src, dst, n):
    with open(src, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    with open(dst, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(rows[:n + 1])  # the header and the first n rows
    return str(dst)


def run_worker(system, job, scratch, tag):
    job_path, out_path = Path(scratch) / f"job-{tag}.json", Path(scratch) / f"result-{tag}.json"
    job = {**job, "log_dir": str(Path(scratch) / f"logs-{tag}")}
    job_path.write_text(json.dumps(job))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(Path(scratch) / "hf-home")}
    if job["device"] == "cuda":  # one GPU: HF Trainer takes every visible one (DataParallel, batch 32 on each)
        env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    cmd = [sys.executable, __file__, "--worker", system, "--job", str(job_path), "--out", str(out_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{system} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(out_path.read_text())


def median_of(results, key):
    return statistics.median(r[key] for r in results)


def summarise(name, results, n_train, n_eval):
    gpu = {"peak_gpu_mib": median_of(results, "peak_gpu_mib")} if "peak_gpu_mib" in results[0] else {}
    return {"name": name,
            "train_ex_s": statistics.median(n_train / r["train_s"] for r in results),
            "eval_ex_s": statistics.median(n_eval / r["eval_s"] for r in results),
            "acc": median_of(results, "acc"), "f1_macro": median_of(results, "f1_macro"),
            "first_step_s": median_of(results, "first_step_s"),
            "peak_rss_mib": median_of(results, "peak_rss_mib"), **gpu,
            "train_s": [round(r["train_s"], 1) for r in results]}


def print_report(rows, flops, args, rates):
    ours, peer = rows[0], rows[-1]
    gpu = "peak_gpu_mib" in ours
    print(f"\n{args.train_examples} training / {args.eval_examples} evaluation examples, "
          f"{args.epochs} epoch(s), batch {args.batch_size}, lr {args.lr}, max length {args.max_seq_len}, "
          f"{args.repeats} interleaved repeat(s), medians")
    header = (f"{'system':<22}{'train ex/s':>11}{'eval ex/s':>11}{'acc':>8}{'macro F1':>10}"
              f"{'1st step s':>12}{'peak RSS MiB':>14}" + (f"{'peak GPU MiB':>14}" if gpu else ""))
    print(header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['name']:<22}{r['train_ex_s']:>11.1f}{r['eval_ex_s']:>11.1f}{r['acc']:>8.4f}"
              f"{r['f1_macro']:>10.4f}{r['first_step_s']:>12.1f}{r['peak_rss_mib']:>14.0f}"
              + (f"{r['peak_gpu_mib']:>14.0f}" if gpu else ""))
    print(f"\nmeasured {flops['matmul']} matmul rate: {statistics.median(rates) / 1e9:.1f} GFLOP/s "
          f"(median of {len(rates)}; {flops['matmul_where']})")
    print(f"our training: {flops['train_rate'] / 1e9:.1f} GFLOP/s on real tokens "
          f"({flops['train_tokens']} tokens, {flops['train_flops'] / 1e12:.2f} TFLOP per epoch); "
          f"evaluation: {flops['eval_rate'] / 1e9:.1f} GFLOP/s")
    checks = [("training throughput", ours["train_ex_s"] / peer["train_ex_s"], TARGETS["train"], "x"),
              ("evaluation throughput", ours["eval_ex_s"] / peer["eval_ex_s"], TARGETS["eval"], "x"),
              ("matmul rate fraction", flops["train_rate"] / statistics.median(rates),
               TARGETS["matmul_fraction"], "")]
    print("\ntarget                      measured    target   verdict")
    for name, value, target, unit in checks:
        verdict = "met" if value >= target else f"MISSED by {target - value:.2f}{unit} ({value / target:.0%} of target)"
        print(f"{name:<26}{value:>9.2f}{unit:1}{target:>9.2f}{unit:1}   {verdict}")
    gap = (peer["acc"] - ours["acc"]) * 100
    verdict = "met" if gap <= TARGETS["acc_points"] else f"MISSED by {gap - TARGETS['acc_points']:.2f} points"
    print(f"{'accuracy (ours - peer)':<26}{-gap:>8.2f}pt{'>= -1.00':>10}pt  {verdict}")


def job_device(args):
    """The device both systems train on: --device, where auto is trainer.py's (the GPU when there is one)."""
    import torch
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but no CUDA GPU is visible")
    if args.roberta_bf16 and device != "cuda":
        sys.exit("--roberta-bf16 needs a CUDA GPU (bf16 on a CPU without native bf16 is far too slow)")
    return device


def make_job(args, scratch):
    """The job both systems run: the data subsets written to scratch, the hyperparameters, the device."""
    return {"train_file": write_subset(args.train_file, scratch / "train.csv", args.train_examples),
            "eval_file": write_subset(args.eval_file, scratch / "eval.csv", args.eval_examples),
            "model": args.model, "epochs": args.epochs, "batch_size": args.batch_size,
            "eval_batch_size": args.eval_batch_size, "lr": args.lr, "warmup": args.warmup,
            "weight_decay": args.weight_decay, "max_seq_len": args.max_seq_len, "seed": args.seed,
            "compile": False, "bf16": args.roberta_bf16, "random_roberta": args.roberta_bf16,
            "device": job_device(args)}


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-examples", type=int, default=4000)
    parser.add_argument("--eval-examples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--warmup", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--max-seq-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--train-file", default=str(ROOT / "data/tweets/train.csv"))
    parser.add_argument("--eval-file", default=str(ROOT / "data/tweets/val.csv"))
    parser.add_argument("--model", default=str(ROOT / "models/all-MiniLM-L6-v2"))
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where both systems train; auto: the GPU when there is one, as trainer.py")
    parser.add_argument("--compile", action="store_true", help="also run trainer.py with torch.compile")
    parser.add_argument("--roberta-bf16", action="store_true",
                        help="CUDA only: a random roberta-base-size model, bf16 autocast on both sides")
    parser.add_argument("--scratch", default=None, help="folder for subsets, logs and results")
    parser.add_argument("--json", default=None, help="also write every run and the summary here")
    parser.add_argument("--worker", choices=["ours", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.job, args.out)

    import torch
    import transformers
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="bench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    job = make_job(args, scratch)
    device, dtype = job["device"], job_dtype(job)
    if device == "cpu":  # the reference matmul on the cores trainer.setup_distributed gives one process
        torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    systems = [("trainer.py", "ours", job)]
    if args.compile:
        systems.append(("trainer.py + compile", "ours", {**job, "compile": True}))
    systems.append(("HF Trainer", "hf", job))
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if device == 'cuda' else ''}, "
          f"{os.cpu_count()} CPUs; scratch {scratch}", flush=True)
    runs = {name: [] for name, _, _ in systems}
    rates = []
    for repeat in range(args.repeats):
        order = systems if repeat % 2 == 0 else systems[::-1]
        for name, system, system_job in order:
            rates.append(matmul_rate(device, dtype))
            result = run_worker(system, system_job, scratch, f"{system}{len(runs[name])}-{repeat}"
                                + ("-compile" if system_job["compile"] else ""))
            runs[name].append(result)
            print(f"repeat {repeat + 1}/{args.repeats} {name:<22} train {result['train_s']:7.1f} s  "
                  f"eval {result['eval_s']:6.1f} s  acc {result['acc']:.4f}  "
                  f"first step {result['first_step_s']:5.1f} s", flush=True)
    rates.append(matmul_rate(device, dtype))
    n_train, n_eval = args.train_examples * args.epochs, args.eval_examples
    rows = [summarise(name, runs[name], n_train, n_eval) for name, _, _ in systems]
    first = runs["trainer.py"][0]
    config = transformers.PretrainedConfig.from_dict(first["config"])
    train_flops = encoder_flops(config, first["train_lengths"], cls_only_last_layer=True) * args.epochs
    eval_flops = encoder_flops(config, first["eval_lengths"], training=False, cls_only_last_layer=True)
    flops = {"train_flops": train_flops, "train_tokens": sum(first["train_lengths"]) * args.epochs,
             "train_rate": statistics.median(train_flops / r["train_s"] for r in runs["trainer.py"]),
             "eval_rate": statistics.median(eval_flops / r["eval_s"] for r in runs["trainer.py"]),
             "matmul": "bf16" if job["bf16"] else "fp32 (allow_tf32)" if device == "cuda" else "fp32"}
    size = MATMUL_SIZE[device][0]
    if device == "cuda":  # thread counts say nothing about a GPU's rate
        flops["matmul_where"] = f"{size}x{size} on {torch.cuda.get_device_name()}"
    else:
        flops["threads"] = first["threads"]
        flops["matmul_where"] = f"{size}x{size} on the CPU, {torch.get_num_threads()} threads"
    print_report(rows, flops, args, rates)
    if args.json:
        slim = {name: [{k: v for k, v in r.items() if k not in ("train_lengths", "eval_lengths", "config")}
                       for r in results] for name, results in runs.items()}
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": slim, "summary": rows,
                                               "flops": flops, "matmul_rates": rates}, indent=2))


if __name__ == "__main__":
    main()
