"""Where a training step of trainer.py spends its time, on the benchmark's job.

    python bench/step_profile.py                 # torch.profiler table over 15 steps, by self CPU time
    python bench/step_profile.py --ab-dropout    # torch's nn.Dropout against model.CPUDropout

Both build the job of bench.py (the MiniLM of `python prepare.py`, the tweets, batch 32, max length
64) with trainer.py's own functions and run its Trainer.train_step after a few warm-up steps.
--ab-dropout alternates blocks of steps between the two dropout implementations in one process
(A B, then B A, ...) and reports the median examples/s of each: in one process, interleaved, the
machine's noise falls on both alike.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

import bench  # noqa: E402
import trainer  # noqa: E402
from model import CPUDropout  # noqa: E402


def bench_trainer():
    """trainer.Trainer on the benchmark's job, in training mode, and its first epoch's batches."""
    args = bench.build_parser().parse_args([])  # bench.py's defaults: its whole job
    scratch = Path(tempfile.mkdtemp(prefix="step-profile-"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    job = {**bench.make_job(args, scratch, device), "log_dir": str(scratch)}
    cfg = trainer.load_config(bench.ours_argv(job) + ["--data.val_filepath", "null"])  # steps only
    dist_ctx = trainer.setup_distributed(cfg["trainer"])
    trainer.seed_everything(cfg["trainer"]["seed"])
    tokenizer = trainer.load_tokenizer(cfg["model"])
    train, _, _ = trainer.load_splits(cfg, tokenizer)
    run = trainer.Trainer(cfg, dist_ctx, trainer.build_model(cfg["model"], bench.LABELS), tokenizer, train,
                          None)
    run.model.train()
    return run, run.epoch_batches(0)


def steps(run, batches):
    """Train on the batches; examples per second."""
    window = trainer.new_window(run.dist.device)
    start = time.perf_counter()
    for rank_indices, global_size in batches:
        run.train_step(rank_indices, global_size, window)
    return sum(len(b[0]) for b in batches) / (time.perf_counter() - start)


def profile_table(run, batches, count):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        steps(run, batches[:count])
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def ab_dropout(run, batches, block, rounds):
    """Median examples/s of each dropout over alternating blocks of `block` steps."""
    dropouts = [m for m in run.model.modules() if isinstance(m, torch.nn.Dropout)]
    rates = {"torch nn.Dropout": [], "model.CPUDropout": []}
    kinds = {"torch nn.Dropout": torch.nn.Dropout, "model.CPUDropout": CPUDropout}
    names = list(rates)
    for i in range(rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            for m in dropouts:
                m.__class__ = kinds[name]  # same module, same p: only the forward differs
            rates[name].append(steps(run, batches[:block]))
            batches = batches[block:]
    for name, values in rates.items():
        print(f"{name:<18} median {statistics.median(values):6.1f} ex/s   {[round(v, 1) for v in values]}")
    print(f"ratio of medians: {statistics.median(rates[names[1]]) / statistics.median(rates[names[0]]):.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=15, help="profiled steps")
    parser.add_argument("--ab-dropout", action="store_true")
    parser.add_argument("--block", type=int, default=8, help="steps per block with --ab-dropout")
    parser.add_argument("--rounds", type=int, default=6, help="blocks of each kind with --ab-dropout")
    args = parser.parse_args()
    run, batches = bench_trainer()
    if len(batches) < 3 + (2 * args.block * args.rounds if args.ab_dropout else args.steps):
        parser.error(f"the epoch has {len(batches)} batches: fewer blocks or steps, please")
    steps(run, batches[:3])  # warm-up: allocations, thread pools
    if args.ab_dropout:
        ab_dropout(run, batches[3:], args.block, args.rounds)
    else:
        profile_table(run, batches[3:], args.steps)


if __name__ == "__main__":
    main()
