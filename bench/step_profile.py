"""Where a training step of trainer.py spends its time, on the benchmark's job.

    python bench/step_profile.py                 # torch.profiler table over 15 steps, by self CPU time
    python bench/step_profile.py --ab dropout    # torch's dropout against speedups.use_cpu_dropout's
    python bench/step_profile.py --ab cls-only   # every position of the last layer against the first only
    python bench/step_profile.py --ab compile    # the eager loop against torch.compile's

Both build the job of bench.py (the MiniLM of `python prepare.py`, the tweets, batch 32, max length
64) with trainer.py's own functions, speedups.apply included as trainer.run does it, and run its
Trainer.train_step after a few warm-up steps. --ab times each batch twice in one process, with
and without one speed-up (for dropout: torch's nn.Dropout and sdpa attention against
speedups.CPUDropout and its attention function; for cls-only: speedups.first_position_last_layer;
for compile: torch.compile, after its compilation on 3 warm-up batches), the others on for both,
in alternating order, and reports the median of the per-batch speed-ups: the same batch on both
sides, and the machine's noise of that moment on both alike. Results go to bench/README.md.
--device is bench.py's (auto: the GPU when there is one); on CUDA every timing waits for the GPU's
queue, the profile adds CUDA time, and --ab dropout (a CPU speed-up) is refused.
"""
import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

import bench  # noqa: E402
import speedups  # noqa: E402
import trainer  # noqa: E402
from config import load_config  # noqa: E402
from model import build_model, load_tokenizer  # noqa: E402
from processes import seed_everything  # noqa: E402
from splits import load_split  # noqa: E402


def bench_trainer(device="auto"):
    """trainer.Trainer on the benchmark's job, in training mode, and its first epoch's batches."""
    args = bench.build_parser().parse_args(["--device", device])  # bench.py's defaults: its whole job
    scratch = Path(tempfile.mkdtemp(prefix="step-profile-"))
    job = {**bench.make_job(args, scratch), "log_dir": str(scratch)}
    cfg = load_config(bench.ours_argv(job) + ["--data.val_filepath", "null"])  # steps only
    proc = trainer.setup_distributed(cfg["trainer"])
    seed_everything(cfg["trainer"]["seed"])
    tokenizer = load_tokenizer(cfg["model"])
    train = load_split(cfg, tokenizer, cfg["data"]["train_filepath"])
    model = speedups.apply(build_model(cfg["model"], bench.LABELS), proc.device)
    run = trainer.Trainer(cfg, proc, model, tokenizer, train, None)
    run.model.train()
    return run, run.epoch_batches(0)


def steps(run, batches):
    """Train on the batches; examples per second."""
    _, seconds = bench.timed(lambda: [run.train_step(*batch) for batch in batches], run.proc.device)
    return sum(len(b[0]) for b in batches) / seconds


def profile_table(run, batches, count):
    cuda = run.proc.device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        steps(run, batches[:count])
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_by, row_limit=25))


def use_dropout(run, new):
    """Switch the model between torch's dropout (new=False) and use_cpu_dropout's (new=True) in place."""
    if new:
        speedups.use_cpu_dropout(run.model)
        return
    for m in run.model.modules():
        if type(m) is speedups.CPUDropout:
            m.__class__ = torch.nn.Dropout  # same p: only forward differs
    run.model.set_attn_implementation("sdpa")


def use_cls_only(run, new):
    """Switch the last layer between every position (new=False) and the first only (new=True)."""
    plain, fast = speedups.FIRST_POSITION[type(run.model)]
    run.model.base_model.encoder.layer[-1].__class__ = fast if new else plain


def use_compile(run, new):
    """Train through torch.compile(model, dynamic=True), as --trainer.compile does (new=True), or not."""
    if not hasattr(run, "compiled"):
        run.compiled = torch.compile(run.model, dynamic=True)
    run.wrapped = run.compiled if new else run.model


# --ab choice: (switch, what the new side is)
AB = {"dropout": (use_dropout, "speedups.use_cpu_dropout"),
      "cls-only": (use_cls_only, "speedups.first_position_last_layer"), "compile": (use_compile, "torch.compile")}


def ab(run, batches, choice):
    """Median per-batch speed-up of the new side over the old, each batch trained by both."""
    switch, name = AB[choice]
    switch(run, True)
    # the new side's warm-up too (for compile: the compilation)
    _, seconds = bench.timed(lambda: steps(run, batches[:3]), run.proc.device)
    print(f"first 3 steps with {name}: {seconds:.1f} s")
    batches = batches[3:]
    ratios, totals = [], {False: 0.0, True: 0.0}
    for i, (rank_indices, global_size) in enumerate(batches):
        seconds = {}
        for new in (False, True) if i % 2 == 0 else (True, False):
            switch(run, new)
            _, seconds[new] = bench.timed(lambda: run.train_step(rank_indices, global_size), run.proc.device)
            totals[new] += seconds[new]
        ratios.append(seconds[False] / seconds[True])
    quartiles = statistics.quantiles(ratios, n=4)
    print(f"{len(batches)} batches, each trained once with and once without {name}")
    print(f"speed-up of {name}: median {statistics.median(ratios):.3f}x "
          f"(quartiles {quartiles[0]:.3f}x-{quartiles[2]:.3f}x), total time {totals[False] / totals[True]:.3f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=15, help="profiled steps")
    parser.add_argument("--ab", choices=sorted(AB), help="time each batch with and without this")
    parser.add_argument("--batches", type=int, default=100, help="batches timed with --ab")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="as bench.py's")
    args = parser.parse_args()
    run, batches = bench_trainer(args.device)
    if args.ab == "dropout" and run.proc.device.type == "cuda":
        parser.error("--ab dropout compares CPU dropout kernels (speedups.apply uses them on CPU only); "
                     "add --device cpu")
    if len(batches) < 3 + (3 + args.batches if args.ab else args.steps):
        parser.error(f"the epoch has {len(batches)} batches: fewer batches or steps, please")
    steps(run, batches[:3])  # warm-up: allocations, thread pools
    if args.ab:
        ab(run, batches[3:6 + args.batches], args.ab)
    else:
        profile_table(run, batches[3:], args.steps)


if __name__ == "__main__":
    main()
