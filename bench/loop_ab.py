"""The training loop of two commits, alternated: does a change to the code slow the loop?

    python bench/loop_ab.py BEFORE AFTER [--rounds 3] [--rows 512]

Each commit is checked out into a temporary worktree; each round runs the default job's loop on the
first --rows training tweets (1 epoch, logging every 4 steps, no validation, no checkpoints) in a
separate process, before then after. The figure of a run is the median of its logged
train/examples_per_s (the first interval, which holds the warm-up, dropped); printed per round
with the ratio after / before and the median ratio. Run it on quiet cores: other jobs make the
ratios noise (bench/README.md).
"""
import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worktree(commit, folder):
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(folder), commit], check=True)
    for shared in ("data", "models"):  # the default job's inputs, made by prepare.py
        (folder / shared).symlink_to(ROOT / shared)
    return folder


def first_rows(rows, folder):
    """data/tweets/train.csv's header and first rows, as the file the runs train on."""
    with open(ROOT / "data" / "tweets" / "train.csv", newline="", encoding="utf-8") as f:
        lines = list(csv.reader(f))[:rows + 1]
    path = folder / "train.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(lines)
    return path


def loop_speed(tree, train, out):
    """The median logged examples/s of one run of the loop in tree (its first interval dropped)."""
    subprocess.run([sys.executable, "trainer.py", "--data.train_filepath", str(train), "--data.val_filepath", "null",
                    "--trainer.log_steps", "4", "--ckpt.checkpoint", "false", "--data.cache_dir", "null",
                    "--trainer.log_dir", str(out / "runs"), "--ckpt.model_state_save_dir", str(out / "ckpt")],
                   cwd=tree, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (metrics,) = (out / "runs").glob("*/metrics.jsonl")
    speeds = [row["train/examples_per_s"] for row in map(json.loads, metrics.read_text().splitlines())
              if "train/examples_per_s" in row]
    return statistics.median(speeds[1:] or speeds)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=512)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="loop-ab-"))
    trees = {name: worktree(commit, scratch / name) for name, commit in (("before", args.before), ("after", args.after))}
    train = first_rows(args.rows, scratch)
    ratios = []
    try:
        for i in range(args.rounds):
            speed = {name: loop_speed(tree, train, scratch / f"{name}-{i}") for name, tree in trees.items()}
            ratios.append(speed["after"] / speed["before"])
            print(f"round {i + 1}: before {speed['before']:.1f} ex/s, after {speed['after']:.1f} ex/s, "
                  f"ratio {ratios[-1]:.2f}", flush=True)
    finally:
        for tree in trees.values():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    print(f"median ratio after / before: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
