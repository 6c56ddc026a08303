"""The run's log folder: TensorBoard events, the same scalars as JSON lines, the run's config and
record; and the table of every run in trainer.log_dir.

    runlog = RunLog.open(cfg, step, run_dir=None)   # a new runs/<date>-<time>-train, or a resumed run's own
    runlog.write(step, epoch, {"train/loss": 0.7})   # both files, at once
    runlog.write_figures(step, metrics, curves)      # PR curves, confusion matrix, reliability, risk-coverage, table
    runlog.close()
    record_run(run_dir, cfg, argv, result)           # run.json: what ran, on what, how long
    print(runs_table(log_dir))                       # python trainer.py --runs; also runs.csv

Earlier runs' folders are never deleted. A resumed run continues its own folder, dropping what the
killed run logged after its checkpoint, so its curves hold the values of a run never interrupted.
Only the main process logs.
"""
import csv
import json
import os
import re
import shlex
import sys
import threading
import time
from pathlib import Path

import numpy as np

from checkpoint import read_manifest
from files import OutputError, atomic_write, csv_cells, first_line, write_json, writing_to
from metrics import expected_calibration_error, reliability, risk_coverage, selective_accuracy

# what a run folder is named after: <date>-<time>-<kind>[-n] (new_run_dir)
KINDS = ("train", "distil", "eval", "predict")
RUN_NAME = re.compile(r"(\d{8})-(\d{6})-(" + "|".join(KINDS) + r")(?:-(\d+))?")


class RunLog:
    """A run's TensorBoard writer and metrics.jsonl in run_dir."""

    def __init__(self, run_dir, writer):
        self.run_dir, self.writer = run_dir, writer
        self.jsonl = Path(run_dir) / "metrics.jsonl"

    @classmethod
    def open(cls, cfg, step, run_dir=None, say=print, kind="train"):
        """A new folder in trainer.log_dir, or run_dir (a resumed run's), cut back to step.

        run_dir comes from a checkpoint's checkpoint.json: it is written in only if it is a folder
        of trainer.log_dir, as the run made it. A resume with another trainer.log_dir (or a path
        edited to point elsewhere) logs to a new folder there instead.
        """
        from torch.utils.tensorboard import SummaryWriter  # a slow import: only runs that log pay for it
        quiet_writer_threads()
        log_dir = cfg["trainer"]["log_dir"]
        if run_dir is not None and not is_run_dir_of(run_dir, log_dir):
            say(f"note: the resumed run logged to {run_dir}, which is not a run folder of trainer.log_dir "
                f"{log_dir}; logging from step {step} on to a new folder there")
            run_dir = None
        with writing_to("trainer.log_dir", log_dir):
            run_dir = run_dir or new_run_dir(log_dir, kind)
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            # a resumed run redoes the steps after its checkpoint: drop what the killed run logged there
            runlog = cls(run_dir, SummaryWriter(run_dir, purge_step=step + 1 if step else None))
            truncate_jsonl(runlog.jsonl, step)
            write_json(Path(run_dir) / "config.json", cfg)
        return runlog

    def write(self, step, epoch, scalars):
        with writing_to("trainer.log_dir", self.jsonl):
            for name, value in scalars.items():
                if not isinstance(value, list):  # a multi-label run's temperatures: per label in write_figures
                    self.writer.add_scalar(name, value, step)
            self.writer.flush()
            with open(self.jsonl, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "epoch": epoch, **scalars}) + "\n")

    def write_figures(self, step, metrics, curves, prefix="val"):
        """What a validation shows beyond its scalars (curves: evaluation.curves_of): per class (label)
        a precision-recall curve, the confusion matrix, the reliability diagram and the risk-coverage
        curve as images, the per-class table as text; multi-label: each label's threshold and
        temperature too; regression: predictions against labels as an image."""
        with writing_to("trainer.log_dir", self.run_dir):
            self.add_figures(step, metrics, curves, prefix)

    def add_figures(self, step, metrics, curves, prefix):
        w = self.writer
        if curves["task"] == "regression":
            w.add_image(f"{prefix}/predictions_vs_labels", scatter_image(curves["labels"], curves["predictions"]),
                        step, dataformats="HWC")
            w.add_text(f"{prefix}/predictions_vs_labels", "x: the label, y: the prediction (darker: more "
                       "examples); the red diagonal is a perfect prediction", step)
        else:
            multi = curves["task"] == "multi_label"
            for i, name in enumerate(curves["names"]):
                truth = curves["labels"][:, i] if multi else curves["labels"] == i
                w.add_pr_curve(f"{prefix}/pr/{name}", truth.astype(bool), curves["probabilities"][:, i], step)
            if multi:
                for name, row in metrics["per_label"].items():
                    w.add_scalar(f"{prefix}/threshold/{name}", row["threshold"], step)
                    if "temperature" in row:
                        w.add_scalar(f"{prefix}/temperature/{name}", row["temperature"], step)
            else:
                w.add_image(f"{prefix}/confusion_matrix", confusion_image(metrics["confusion_matrix"], curves["names"]),
                            step, dataformats="HWC")
            w.add_image(f"{prefix}/reliability", reliability_image(curves), step, dataformats="HWC")
            w.add_image(f"{prefix}/risk_coverage", risk_coverage_image(curves["confidences"], curves["correct"],
                                                                       curves["abstain_below"]), step, dataformats="HWC")
            w.add_text(f"{prefix}/per_class", markdown_table(metrics), step)
        w.flush()

    def write_final(self, metrics):
        with writing_to("trainer.log_dir", self.run_dir):
            write_json(Path(self.run_dir) / "final_metrics.json", metrics)

    def close(self):
        # ends its writer thread, not left to interpreter exit; a write it could not finish (a full
        # disk) is raised again here: one line, as the write that met it first
        with writing_to("trainer.log_dir", self.run_dir):
            self.writer.close()


def quiet_writer_threads():
    """TensorBoard's writer thread ends with a traceback of its own when a write fails (a full
    disk); the writer raises the same error in the main thread at its next write, flush or close,
    where writing_to says it in one line: the thread's traceback is left unprinted."""
    if getattr(threading.excepthook, "quiet_writer_threads", False):
        return
    previous = threading.excepthook

    def hook(args):
        if not (isinstance(args.exc_value, OSError) and type(args.thread).__module__.startswith("tensorboard")):
            previous(args)
    hook.quiet_writer_threads = True
    threading.excepthook = hook


def is_run_dir_of(run_dir, log_dir):
    """True if run_dir is a real folder (not a link) directly inside log_dir, as new_run_dir makes them."""
    path = Path(run_dir)
    return (path.is_dir() and not path.is_symlink()
            and path.resolve().parent == Path(log_dir).resolve())


def log_interval(log_steps, total_steps):
    """The steps between two logs: trainer.log_steps, or for auto about 100 points a run (a curve,
    not a handful of dots) while a log, one host read of the loss sums, comes at most every other step."""
    return log_steps if log_steps != "auto" else max(2, round(total_steps / 100))


def new_run_dir(log_dir, mode):
    """A new folder <date>-<time>-<mode> in log_dir: one of KINDS."""
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


# ---------------------------------------------------------------------------------------------
# pictures for TensorBoard, drawn here: matplotlib is not a dependency, Pillow is tensorboard's


def markdown_table(metrics):
    """The per-class (per-label) table of metrics.format_report as Markdown, which TensorBoard's
    text tab renders as a table; multi-label rows carry their thresholds."""
    kind = "label" if "per_label" in metrics else "class"
    table = metrics[f"per_{kind}"]
    thresholds = all("threshold" in row for row in table.values())
    lines = [f"| {kind} | precision | recall | f1 | support |" + " threshold |" * thresholds,
             "|---|---:|---:|---:|---:|" + "---:|" * thresholds]
    for name, row in table.items():
        lines.append(f"| {name} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} | {row['support']} |"
                     + (f" {row['threshold']:.2f} |" if thresholds else ""))
    return "\n".join(lines)


def confusion_image(matrix, names):
    """The confusion matrix as an RGB array (height, width, 3): a row per true class, a column per
    predicted class, each cell shaded by its share of the row (dark diagonal = high recall) and
    labelled with its count; class names on the left and on top."""
    from PIL import Image, ImageDraw, ImageFont  # tensorboard's own dependency; only validations draw
    matrix, font = np.asarray(matrix), ImageFont.load_default()
    names = [name if len(name) <= 16 else name[:15] + "." for name in names]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    name_width = int(max(measure.textlength(name, font=font) for name in [*names, "true \\ predicted"])) + 12
    cell_w, cell_h, top = max(56, name_width - 4), 28, 40
    image = Image.new("RGB", (name_width + cell_w * len(names) + 8, top + cell_h * len(names) + 8), "white")
    draw = ImageDraw.Draw(image)
    draw.text((4, 4), "true \\ predicted", fill="black", font=font)
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    for j, name in enumerate(names):
        draw.text((name_width + j * cell_w + 4, top - 16), name, fill="black", font=font)
    for i, name in enumerate(names):
        y = top + i * cell_h
        draw.text((4, y + 8), name, fill="black", font=font)
        for j in range(len(names)):
            x, share = name_width + j * cell_w, float(shares[i, j])
            draw.rectangle([x, y, x + cell_w - 2, y + cell_h - 2], fill=(int(255 - 215 * share), int(255 - 160 * share), 255))
            draw.text((x + 6, y + 8), str(int(matrix[i, j])), fill="white" if share > 0.5 else "black", font=font)
    return np.asarray(image)


def chart(title, x_name, y_name, size=200):
    """A blank square chart, x and y from 0 to 1: (image, draw, to_pixel(x, y)), the red diagonal
    drawn, the axes named, the title on top."""
    from PIL import Image, ImageDraw, ImageFont
    font, left, top = ImageFont.load_default(), 44, 30
    image = Image.new("RGB", (left + size + 16, top + size + 36), "white")
    draw = ImageDraw.Draw(image)

    def to_pixel(x, y):
        return left + x * size, top + (1 - y) * size
    draw.rectangle([to_pixel(0, 1), to_pixel(1, 0)], outline=(160, 160, 160))
    for tick in (0, 0.5, 1):
        draw.text((to_pixel(tick, 0)[0] - 8, top + size + 4), f"{tick:g}", fill="black", font=font)
        draw.text((4, to_pixel(0, tick)[1] - 6), f"{tick:g}", fill="black", font=font)
    draw.text((left + size // 2 - 30, top + size + 20), x_name, fill="black", font=font)
    draw.text((4, top - 14), y_name, fill="black", font=font)
    draw.text((left, 4), title, fill="black", font=font)
    return image, draw, to_pixel


def reliability_image(curves, bins=15):
    """The reliability diagram as an RGB array: per bin of confidence (metrics.reliability), the
    accuracy of the calibrated predictions as a blue bar, the uncalibrated ones' as grey dots; the red
    diagonal is a probability that means what it says. Multi-label: every (text, label) probability
    against whether the label is there."""
    multi = curves["task"] == "multi_label"
    points = {}
    for name in ("probabilities", "uncalibrated"):
        probs = curves[name]
        points[name] = ((probs.ravel(), curves["labels"].ravel()) if multi else
                        (probs.max(axis=1), probs.argmax(axis=1) == curves["labels"]))
    eces = {name: expected_calibration_error(*points[name], bins) for name in points}
    image, draw, at = chart(f"ECE {eces['uncalibrated']:.3f} uncalibrated, {eces['probabilities']:.3f} calibrated",
                            "probability" if multi else "confidence", "frequency" if multi else "accuracy")
    draw.line([at(0, 0), at(1, 1)], fill=(220, 40, 40))
    counts, _, accuracy = reliability(*points["probabilities"], bins)
    for b in np.flatnonzero(counts):
        draw.rectangle([at(b / bins, accuracy[b]), at((b + 1) / bins, 0)], fill=(80, 120, 220), outline="white")
    counts, confidence, accuracy = reliability(*points["uncalibrated"], bins)
    for b in np.flatnonzero(counts):
        x, y = at(confidence[b], accuracy[b])
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(110, 110, 110))
    return np.asarray(image)


def risk_coverage_image(confidences, correct, abstain_below=None):
    """The risk-coverage curve (metrics.risk_coverage) as an RGB array: the error rate among the
    texts answered, answering the surest first; with data.abstain_below, a grey line at its coverage."""
    coverage, risk = risk_coverage(confidences, correct)
    image, draw, at = chart("error rate of the texts answered, surest first", "coverage", "risk")
    if len(coverage) > 1:
        draw.line([at(c, r) for c, r in zip(coverage, risk)], fill=(80, 120, 220), width=2)
    if abstain_below is not None:
        covered = selective_accuracy(confidences, correct, abstain_below)[0]
        draw.line([at(covered, 0), at(covered, 1)], fill=(150, 150, 150))
        draw.text((at(covered, 1)[0] + 3, at(0, 1)[1] + 2), f"abstain < {abstain_below:g}", fill="black")
    return np.asarray(image)


def scatter_image(labels, predictions, size=160):
    """Regression: predictions (y, up) against labels (x, right) as an RGB array, each pixel darker
    with the log of the examples in it, on one scale for both axes; the diagonal is red."""
    labels, predictions = np.asarray(labels, dtype=np.float64), np.asarray(predictions, dtype=np.float64)
    low, high = min(labels.min(), predictions.min()), max(labels.max(), predictions.max())
    counts, _, _ = np.histogram2d(labels, predictions, bins=size, range=[[low, high + 1e-9], [low, high + 1e-9]])
    shade = np.log1p(counts.T[::-1]) / max(np.log1p(counts.max()), 1e-9)  # rows from the top: high predictions first
    image = np.repeat((255 * (1 - shade)).astype(np.uint8)[:, :, None], 3, axis=2)
    rows, columns = size - 1 - np.arange(size), np.arange(size)  # label bin j against prediction bin j
    empty = shade[rows, columns] == 0
    image[rows[empty], columns[empty]] = [220, 40, 40]  # only where no example is, so none is hidden
    return image


# ---------------------------------------------------------------------------------------------
# what a run was, and the table of runs


def record_run(run_dir, cfg, argv, result, script="trainer.py"):
    """run.json in a run's folder: its kind, the command and the folder it ran in, the checkpoint
    and files it read, the result and its times; and config.json, where training has not written it
    already. Its paths are relative to the run's folder, so that a folder moved with its checkpoints
    and data still reads (--runs); a checkpoint by its real folder, since `best` and `last` move on."""
    data, model, kind = cfg["data"], cfg["model"], kind_of(run_dir)
    checkpoint = model["model_path"]
    manifest = read_manifest(checkpoint) if checkpoint is not None else None

    def here(path):
        return None if path is None else os.path.relpath(Path(path).resolve(), Path(run_dir).resolve())
    # model.hf_model is a folder, or a hub id: a name, kept as it is
    name = here(checkpoint or model["hf_model"]) if checkpoint or os.path.exists(model["hf_model"]) else model["hf_model"]
    record = {"kind": kind, "command": shlex.join(["python", script, *argv]), "directory": here(os.getcwd()),
              "model": name, "checkpoint": here(checkpoint),
              "checkpoint_step": manifest["step"] if manifest is not None else None,
              "train_file": here(data["train_filepath"]), "val_file": here(data["val_filepath"]),
              "predict_file": here(data["predict_filepath"]), "predictions": here(result.get("predictions")),
              "onnx_model": here(result.get("onnx_model")),  # an export folder's model that ran
              "max_rows": data["max_rows"],  # a quick run read the first rows of each file only
              "metric": cfg["module"]["metric"], "result": {k: v for k, v in result.items() if k != "run_dir"}}
    if kind == "distil":
        record["student"] = str(cfg["distill"]["student_layers"] or cfg["distill"]["student_model"] or "student_config")
    with writing_to("trainer.log_dir", run_dir):
        if not (Path(run_dir) / "config.json").exists():
            write_json(Path(run_dir) / "config.json", cfg)
        write_json(Path(run_dir) / "run.json", record)


def kind_of(run_dir):
    match = RUN_NAME.fullmatch(Path(run_dir).name)
    return match.group(3) if match else "train"


def read_json(path):
    """A record's content: {} where the run did not write it; a ValueError where it is damaged."""
    try:
        content = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ValueError(f"its {Path(path).name} does not read ({first_line(e)[:100]})") from None
    if not isinstance(content, dict):
        raise ValueError(f"its {Path(path).name} is not a JSON object")
    return content


# the fields of a row of the runs table, and the types each may hold ("" where a run has none)
ROW_TYPES = {"run": str, "kind": str, "date": str, "model": str, "data": str, "metric": str, "value": (int, float, str),
             "best_step": (int, str), "wall_s": (int, float, str), "state": str}


def run_row(folder):
    """One row of the runs table from a run folder: run.json, else (a run that was stopped, or from
    before run.json) what its config and metrics files say. Paths are absolute where run.json holds
    them relative to the folder. A ValueError when a field is not as this trainer writes it."""
    try:
        row = read_row(Path(folder).absolute())
    except (AttributeError, KeyError, TypeError) as e:  # a field of a type this trainer never writes
        raise ValueError(f"its run.json or config.json is not as this trainer writes it ({first_line(e)[:100]})") from None
    for name, value in row.items():
        if not isinstance(value, ROW_TYPES[name]) or isinstance(value, bool) or (name == "kind" and value not in KINDS):
            raise ValueError(f"its {name} is {value!r}"[:200] + ", not as this trainer writes it")
    return row


# the record's field, and the config's key, of the file each kind of run reads
DATA_OF = {"train": ("train_file", "train_filepath"), "distil": ("train_file", "train_filepath"),
           "eval": ("val_file", "val_filepath"), "predict": ("predict_file", "predict_filepath")}


def read_row(folder):
    """run_row's fields as the files give them (a field of a type this trainer never writes fails here,
    or in run_row's check)."""
    match = RUN_NAME.fullmatch(folder.name)
    record, cfg = read_json(folder / "run.json"), read_json(folder / "config.json")
    kind = record.get("kind") or match.group(3)
    result = record.get("result") or read_json(folder / "final_metrics.json") or read_json(folder / "eval_metrics.json")
    metric = record.get("metric") or cfg.get("module", {}).get("metric")
    value = result.get(metric) if metric else None
    # a run.json with "directory" holds its paths relative to the folder; older ones as they were typed
    relative = "directory" in record
    name = record.get("model") or cfg.get("model", {}).get("model_path") or cfg.get("model", {}).get("hf_model") or ""
    if relative and (folder / name).exists():  # a hub id is not a path
        name = os.path.normpath(folder / name)
    field, key = DATA_OF[kind]
    data = record.get(field)
    data = os.path.normpath(folder / data) if relative and data else data or cfg.get("data", {}).get(key) or ""
    day, clock = match.group(1), match.group(2)
    return {"run": folder.name, "kind": kind, "date": f"{day[:4]}-{day[4:6]}-{day[6:]} {clock[:2]}:{clock[2:4]}:{clock[4:]}",
            "model": f"student {record['student']} of {name}" if record.get("student") else name, "data": data,
            "metric": metric if isinstance(value, (int, float)) else "",
            "value": value if isinstance(value, (int, float)) else "",
            "best_step": result.get("best_step", ""), "wall_s": result.get("wall_s", ""),
            "state": ("done" if "paused_after_epoch" not in result else "paused") if record else
                     ("done" if result else "unfinished")}


def list_runs(log_dir, say=print):
    """run_row of every run folder in log_dir, newest first; a folder whose record is damaged is
    left out, with a note."""
    try:
        folders = [p for p in Path(log_dir).iterdir() if p.is_dir() and RUN_NAME.fullmatch(p.name)] \
            if Path(log_dir).is_dir() else []
    except OSError as e:
        raise OutputError(f"trainer.log_dir {log_dir}: cannot list its runs ({e.strerror or e}); choose a folder "
                          f"you can read") from None

    def started(folder):  # the date and time in its name, then the -n of a second run that second,
        # then (runs of two kinds in one second) its last change
        match = RUN_NAME.fullmatch(folder.name)
        return match.group(1), match.group(2), int(match.group(4) or 1), folder.stat().st_mtime
    rows = []
    for folder in sorted(folders, key=started, reverse=True):
        try:
            rows.append(run_row(folder))
        except ValueError as e:
            say(f"note: left {folder} out of the table: {e}")
    return rows


def duration(seconds):
    if not isinstance(seconds, (int, float)):
        return "-"
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def shorten(text, width):
    """A path cut from the left, where its most telling part (the file, the checkpoint) is kept."""
    return text if len(text) <= width else "..." + text[-(width - 3):]


def seen_from(row, base):
    """A row with its absolute paths relative to base (a relative one was never resolved: as typed)."""
    def shown(text):
        prefix, _, path = text.rpartition(" of ") if text.startswith("student ") else ("", "", text)
        path = os.path.relpath(path, base) if os.path.isabs(path) else path
        return f"{prefix} of {path}" if prefix else path
    return {**row, "model": shown(row["model"]), "data": shown(row["data"])}


def runs_table(rows):
    """The rows of list_runs as a text table, newest first, paths as seen from here."""
    header = f"{'kind':<8}{'date':<21}{'model':<36}{'data':<28}{'metric':<24}{'best':>6}{'time':>8}  state"
    lines = [header]
    for row in (seen_from(row, os.getcwd()) for row in rows):
        metric = f"{row['metric']} {row['value']:.4f}" if row["metric"] else "-"
        best_step = row["best_step"] if row["best_step"] != "" else "-"
        lines.append(f"{row['kind']:<8}{row['date']:<21}{shorten(row['model'], 34):<36}{shorten(row['data'], 26):<28}"
                     f"{metric:<24}{best_step:>6}{duration(row['wall_s']):>8}  {row['state']}")
    return "\n".join(lines)


def write_runs_csv(rows, log_dir):
    """log_dir/runs.csv: the rows of list_runs, paths relative to log_dir (a moved folder still reads)."""
    path = Path(log_dir) / "runs.csv"
    with atomic_write(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(ROW_TYPES))
        writer.writeheader()
        for row in (seen_from(row, Path(log_dir).absolute()) for row in rows):
            writer.writerow(dict(zip(row, csv_cells(row.values()))))  # a formula-like cell as text
    return path


# ---------------------------------------------------------------------------------------------
# the command line of a run: to resume it, and the table of runs


def script_name(trainer_run):
    """The script as the user started it (trainer.py or distill.py), for the commands we print."""
    typed = sys.argv[0] if os.path.basename(sys.argv[0]) in ("trainer.py", "distill.py") else None
    return typed or ("trainer.py" if trainer_run else "distill.py")


def resume_command(argv, script, proc):
    """The command line that resumes this run: its own options with --ckpt.resume auto, launched
    as it was (torchrun with this machine's number of processes)."""
    kept, i = [], 0
    while i < len(argv):  # an earlier --ckpt.resume, with its value or as --ckpt.resume=value, goes
        if argv[i] == "--ckpt.resume":
            i += 2
            continue
        if not argv[i].startswith("--ckpt.resume="):
            kept.append(argv[i])
        i += 1
    launcher = ["python"]
    if proc.ddp:
        local = os.environ.get("LOCAL_WORLD_SIZE", str(proc.world_size))
        nodes = proc.world_size // int(local)
        launcher = ["torchrun", f"--nproc_per_node={local}"] + [f"--nnodes={nodes}"] * (nodes > 1)
    command = shlex.join([*launcher, script, *kept, "--ckpt.resume", "auto"])
    return command + "  (with the same rendezvous options on every machine)" * (proc.ddp and nodes > 1)


def print_runs(log_dir):
    """--runs: every run folder of trainer.log_dir as a table, newest first, and as runs.csv there;
    a log folder that cannot take runs.csv (read-only, full) still shows the table."""
    rows = list_runs(log_dir)
    if not rows:
        print(f"no runs in {log_dir}")
        return 0
    print(runs_table(rows))
    try:
        print(f"(also written to {write_runs_csv(rows, log_dir)})")
    except OSError as e:
        print(f"note: {Path(log_dir) / 'runs.csv'} not written ({e.strerror or e}); the table above has every run")
    return 0
