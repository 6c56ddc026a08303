"""The run's log folder: TensorBoard events, the same scalars as JSON lines, the run's config.

    runlog = RunLog.open(cfg, step, run_dir=None)   # a new runs/<date>-<time>-train, or a resumed run's own
    runlog.write(step, epoch, {"train/loss": 0.7})   # both files, at once
    runlog.close()

Earlier runs' folders are never deleted. A resumed run continues its own folder, dropping what the
killed run logged after its checkpoint, so its curves hold the values of a run never interrupted.
Only the main process logs.
"""
import json
import time
from pathlib import Path

from checkpoint import atomic_write, write_json, writing_to


class RunLog:
    """A run's TensorBoard writer and metrics.jsonl in run_dir."""

    def __init__(self, run_dir, writer):
        self.run_dir, self.writer = run_dir, writer
        self.jsonl = Path(run_dir) / "metrics.jsonl"

    @classmethod
    def open(cls, cfg, step, run_dir=None, say=print):
        """A new folder in trainer.log_dir, or run_dir (a resumed run's), cut back to step.

        run_dir comes from a checkpoint's checkpoint.json: it is written in only if it is a folder
        of trainer.log_dir, as the run made it. A resume with another trainer.log_dir (or a path
        edited to point elsewhere) logs to a new folder there instead.
        """
        from torch.utils.tensorboard import SummaryWriter  # a slow import: only runs that log pay for it
        log_dir = cfg["trainer"]["log_dir"]
        if run_dir is not None and not is_run_dir_of(run_dir, log_dir):
            say(f"note: the resumed run logged to {run_dir}, which is not a run folder of trainer.log_dir "
                f"{log_dir}; logging from step {step} on to a new folder there")
            run_dir = None
        with writing_to("trainer.log_dir", log_dir):
            run_dir = run_dir or new_run_dir(log_dir, "train")
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            # a resumed run redoes the steps after its checkpoint: drop what the killed run logged there
            runlog = cls(run_dir, SummaryWriter(run_dir, purge_step=step + 1 if step else None))
            truncate_jsonl(runlog.jsonl, step)
            write_json(Path(run_dir) / "config.json", cfg)
        return runlog

    def write(self, step, epoch, scalars):
        with writing_to("trainer.log_dir", self.jsonl):
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)
            self.writer.flush()
            with open(self.jsonl, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "epoch": epoch, **scalars}) + "\n")

    def write_final(self, metrics):
        with writing_to("trainer.log_dir", self.run_dir):
            write_json(Path(self.run_dir) / "final_metrics.json", metrics)

    def close(self):
        self.writer.close()  # ends its writer thread, not left to interpreter exit


def is_run_dir_of(run_dir, log_dir):
    """True if run_dir is a real folder (not a link) directly inside log_dir, as new_run_dir makes them."""
    path = Path(run_dir)
    return (path.is_dir() and not path.is_symlink()
            and path.resolve().parent == Path(log_dir).resolve())


def new_run_dir(log_dir, mode):
    """A new folder <date>-<time>-<mode> in log_dir: train, eval or predict."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = Path(log_dir) / f"{stamp}-{mode}", 1
    while True:
        try:
            path.mkdir(parents=True)
            return str(path)
        except FileExistsError:  # two runs in the same second get their own folders
            n += 1
            path = Path(log_dir) / f"{stamp}-{mode}-{n}"


def truncate_jsonl(path, step):
    """Drop log lines past `step` (the part of a killed run that a resume will redo) and a line
    torn by a kill in the middle of a write."""
    if not path.exists():
        return
    kept = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(keepends=True), start=1):
        try:
            row = json.loads(line)
        except ValueError:
            print(f"note: {path}:{number}: dropped a torn log line (the run was killed while writing it)")
            continue
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            print(f"note: {path}:{number}: dropped a line without a step (not written by this trainer)")
            continue
        if row["step"] <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    with atomic_write(path) as f:
        f.write("".join(kept))
