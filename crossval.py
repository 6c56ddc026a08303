r"""Cross-validation: k folds of the training file, each an ordinary trainer.py run validated on the
rows it holds out; the out-of-fold probabilities of every training row, the metric's mean and spread
over the folds, and every row ranked by how likely its given label is wrong.

    python crossval.py --crossval.folds 5
    python crossval.py --crossval.folds 5 --trainer.epochs 2 --crossval.retrain true
    python crossval.py --config_path my.yaml --crossval.dir crossval/bbc --crossval.nproc_per_node 2

Folds: stratified by label, in numpy. Single-label: the rows of each class dealt round the folds in
a shuffled order (crossval.seed), so each fold holds each class's share to within one row. Multi-label:
iterative stratification (Sechidis et al., 2011): the rarest label's rows are placed first, each in
the fold that most lacks that label. Regression: the targets sorted into blocks of k, one of each
block per fold. Rows whose texts are the same once case, whitespace and punctuation are ignored
(a sentence pair: both texts) go to one fold together, or a model would be validated on texts it
trained on.

Each fold is a folder crossval.dir/fold-N holding train.jsonl and heldout.jsonl (written
atomically by crossval.py, the rows in file order with their row number from 1), and a run of
trainer.py (of torchrun trainer.py when crossval.nproc_per_node is more than 1) with the config given
here: it trains on train.jsonl, validates on heldout.jsonl and predicts it with its best checkpoint
into heldout_predictions.csv; its checkpoints/ and runs/ are in the fold folder, its output in
trainer.stdout / trainer.stderr. Its command (results.json) trains the same model when run alone.
Each fold's best checkpoint is chosen on the rows it holds out: with several epochs (or
trainer.eval_steps) the mean is a little optimistic; with one validation there is no choice.
The checkpoints go once the fold is predicted, unless crossval.keep_weights.

Written in crossval.dir at the end, each atomically:
- oof_probabilities.csv: every training row in file order: row, fold, its given label, and each
  class's (label's) out-of-fold probability, from the fold's model that never saw the row (the
  prediction, for regression). They are the fold's calibrated probabilities (module.calibrate):
  its temperature, one number, is fitted on the rows it holds out, as on any validation file.
- label_issues.csv: every row, ranked: rank, row, fold, given_label, suggested_label, score,
  issue, text. score = 1 - the out-of-fold probability of the given label (self-confidence, the
  score cleanlab ranks by): one number that orders every row. issue = confident learning flags the
  row (Northcutt et al., 2021): another class reaches its per-class threshold, the mean probability
  of that class over the rows labelled with it, so a class the model is less sure of is not all
  flagged. Flagged rows come first, each part by score. Multi-label: each label a yes / no question
  of its own, the row's score its most doubted label's. Regression: the absolute error, issues
  beyond three standard deviations of the errors. Written in numpy (datacheck.py), not cleanlab:
  these few lines are the method, and a dependency would bring scikit-learn for them.
- results.json: each fold's rows, module.metric and command, and the metric's mean and sample
  standard deviation (n - 1) over the folds; the last line of stdout is the same summary as JSON.
crossval.retrain true then trains the final model on every training row (validated on
data.val_filepath, if set) in crossval.dir/final, as trainer.py would.

crossval.dir/crossval.json is the state, replaced atomically after every fold: after Ctrl-C (the
running fold writes a checkpoint) or a kill, the same command goes on: finished folds are kept and
the running one resumes (ckpt.resume auto). Another cross-validation there (other folds, seed,
training data or config) is refused; a folder with other content and no state too.
Exit status: 0 done, 1 stopped by a signal or a fold failed (its error line is printed, the same
command retries it), 2 bad input (one `error:` line, before any fold starts).
"""
import sys

# --help needs only config.yaml: answer it before torch is imported, which takes seconds
if __name__ == "__main__" and ("-h" in sys.argv[1:] or "--help" in sys.argv[1:]):
    from config import print_help
    print_help(__doc__)
    sys.exit(0)

import csv
import json
import secrets
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from checkpoint import RESUME_MAY_CHANGE
from config import ConfigError, answer_help, label_names, load_config, parse_args, task_of
from data import DataError, read_examples
from datacheck import issue_order, label_issues, multilabel_issues, regression_issues, text_keys
from files import FolderLock, OutputError, atomic_write, check_writable_dir, csv_cells, file_digest, write_json, writing_to
from sweep import Launcher, as_arg, command_of, failure_line, plain_command, plan_differences, trial_result

STATE = "crossval.json"
WRITTEN_BY = "crossval.py"
MARKER = ".crossval-fold"  # in each fold folder: the id of the cross-validation that made it
# what crossval.py sets for each fold itself: a user's value would be lost, so it is refused
SET_BY_CROSSVAL = ("ckpt.resume", "trainer.stop_after_epochs", "data.predict_filepath", "data.predict_output")


class CrossValError(Exception):
    """Bad cross-validation input or a folder it cannot use, reported as one line."""


# -- folds (pure functions) ---------------------------------------------------------------------


def dealt_folds(classes, k, rng):
    """Fold of each unit: the units of each class, shuffled, dealt round the k folds in turn, the
    turn going on from one class to the next, so fold sizes and each class's share differ by at most one."""
    order = rng.permutation(len(classes))
    order = order[np.argsort(classes[order], kind="stable")]
    folds = np.empty(len(classes), dtype=np.int64)
    folds[order] = np.arange(len(classes)) % k
    return folds


def neediest(wanted, room, rng):
    """The fold that most wants a row: the largest want, ties by room left, then at random."""
    best = np.flatnonzero(wanted == wanted.max())
    best = best[room[best] == room[best].max()]
    return int(rng.choice(best))


def iterative_folds(labels, sizes, k, rng):
    """Multi-label folds by iterative stratification (Sechidis et al., 2011): units (rows of 0 / 1
    labels, each weighing its size in rows) are placed label by label, the label with the fewest
    units left first, each unit in the fold that still wants the most of that label; units with
    no label last, where there is most room."""
    labels = labels.astype(bool)
    folds = np.full(len(labels), -1, dtype=np.int64)
    wanted = np.tile((labels * sizes[:, None]).sum(axis=0) / k, (k, 1)).astype(np.float64)
    room = np.full(k, sizes.sum() / k, dtype=np.float64)
    left = labels.copy()
    while left.any():
        counts = left.sum(axis=0).astype(np.float64)
        label = int(np.where(counts > 0, counts, np.inf).argmin())
        for unit in rng.permutation(np.flatnonzero(left[:, label])):
            fold = neediest(wanted[:, label], room, rng)
            folds[unit] = fold
            wanted[fold] -= labels[unit] * sizes[unit]
            room[fold] -= sizes[unit]
            left[unit] = False
    for unit in rng.permutation(np.flatnonzero(folds < 0)):
        fold = neediest(room, room, rng)
        folds[unit], room[fold] = fold, room[fold] - sizes[unit]
    return folds


def units_of(keys):
    """(unit of each row, first row of each unit, rows in each unit): rows with one key are one
    unit, the units numbered by their first row. Never by the key's value: Python's hashes differ
    from process to process, and a rerun must deal the same folds."""
    _, first, inverse, sizes = np.unique(keys, return_index=True, return_inverse=True, return_counts=True)
    order = np.argsort(first)
    number = np.empty_like(order)
    number[order] = np.arange(len(order))
    return number[inverse.reshape(-1)], first[order], sizes[order]


def assign_folds(examples, task, k, seed):
    """The fold (0 to k - 1) of every row: stratified by label, the rows of one normalised text together."""
    rng = np.random.default_rng(seed)
    unit_of_row, first, sizes = units_of(text_keys(examples.texts_a, examples.texts_b, normalised=True))
    unit_labels = examples.labels[first]  # a unit's label is its first row's
    if len(first) < k:
        raise CrossValError(f"crossval.folds {k} is more than the {len(first)} distinct texts of the training file; "
                            f"lower it")
    if task == "multi_label":
        return iterative_folds(unit_labels, sizes, k, rng)[unit_of_row]
    if task == "regression":  # blocks of k neighbouring targets, one unit of each per fold
        unit_labels = np.argsort(np.argsort(unit_labels, kind="stable"), kind="stable") // k
    return dealt_folds(unit_labels, k, rng)[unit_of_row]


# -- the plan: fold files and commands, each checked as trainer.py would --------------------------


def label_value(labels, names, i):
    """Row i's label as a fold file holds it: its name, its names (multi-label), or its target."""
    if names is None:
        return float(labels[i])
    if labels.ndim == 2:
        return [name for name, on in zip(names, labels[i]) if on]
    return names[int(labels[i])]


def fold_lines(examples, names, rows):
    """The JSON lines of a fold file: the given rows (indices) in file order, numbered from 1."""
    lines = []
    for i in rows:
        row = {"row": int(i) + 1, "text": examples.texts_a[i]}
        if examples.texts_b is not None:
            row["text_b"] = examples.texts_b[i]
        row["label"] = label_value(examples.labels, names, i)
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    return lines


def run_args(base, overrides):
    """trainer.py's arguments: the base (--config_path, then the command line's own keys but for
    crossval's) and a run's overrides, each key once."""
    config_path, given = base
    words = [] if config_path is None else ["--config_path", config_path]
    for key, value in {**dict(given), **overrides}.items():
        words += [f"--{key}", as_arg(str(value) if isinstance(value, Path) else value)]
    return words


def fold_args(base, folder, pair):
    """A fold's trainer.py arguments: the base config, its files and its folders."""
    files = {"data.train_filepath": folder / "train.jsonl", "data.val_filepath": folder / "heldout.jsonl",
             "data.predict_filepath": folder / "heldout.jsonl", "data.predict_output": folder / "heldout_predictions.csv"}
    columns = {"data.file_format": "jsonl", "data.encoding": "utf-8", "data.text_a_col": "text",
               "data.text_b_col": "text_b" if pair else None, "data.label_col": "label"}
    folders = {"ckpt.model_state_save_dir": folder / "checkpoints", "trainer.log_dir": folder / "runs"}
    return run_args(base, {**files, **columns, **folders})


def checked_run(name, args):
    """The config trainer.py will read from a launch's arguments (as its first launch: resuming)."""
    try:
        return load_config(args + ["--ckpt.resume", "auto"])
    except ConfigError as e:
        raise CrossValError(f"{name}: {e}") from None


@dataclass
class Job:
    """One cross-validation: its config, the training rows (data.Examples) and the fold of each,
    its runs (the folds, then the final one: {name, fold, args, epochs}), its folder and state."""
    cfg: dict
    examples: object
    folds: np.ndarray
    runs: list
    top: Path
    state: dict = None


def make_plan(argv):
    """The Job of a command line: argv read and checked, the training file read and checked, every
    fold's command line checked by load_config as trainer.py will read it."""
    cfg = load_config(argv)
    for key in SET_BY_CROSSVAL:
        if key in cfg.user_keys:
            raise CrossValError(f"{key} is set by crossval.py for each fold; leave it out")
    data, crossval = cfg["data"], cfg["crossval"]
    if not data["train_filepath"]:
        raise CrossValError("data.train_filepath is null; cross-validation splits the training file into folds")
    examples = read_examples(data["train_filepath"], data, need_labels=True)
    folds = assign_folds(examples, task_of(data), crossval["folds"], crossval["seed"])
    config_path, overrides = parse_args(argv)
    base = (config_path, [(key, value) for key, value in overrides if not key.startswith("crossval.")])
    top = Path(crossval["dir"])
    runs = [{"name": f"fold-{f + 1}", "fold": f, "args": fold_args(base, top / f"fold-{f + 1}", examples.texts_b is not None)}
            for f in range(crossval["folds"])]
    if crossval["retrain"]:
        runs.append({"name": "final", "fold": None, "args": run_args(base, {
            "ckpt.model_state_save_dir": top / "final" / "checkpoints", "trainer.log_dir": top / "final" / "runs"})})
    for run in runs:
        run["epochs"] = checked_run(run["name"], run["args"])["trainer"]["epochs"]
    return Job(cfg, examples, folds, runs, top)


def plan_of(job):
    """What makes this cross-validation itself: its folds, the training data, and the config of
    its runs but for what a resume may change. Another plan in the same folder is refused."""
    cfg, first = job.cfg, checked_run(job.runs[0]["name"], job.runs[0]["args"])
    tools = ("sweep", "check", "export", "serve", "crossval")
    plan = {f"{section}.{name}": value for section, values in first.items() if section not in tools
            for name, value in values.items() if f"{section}.{name}" not in RESUME_MAY_CHANGE}
    return json.loads(json.dumps({**plan, "crossval.folds": cfg["crossval"]["folds"], "crossval.seed": cfg["crossval"]["seed"],
                                  "crossval.nproc_per_node": cfg["crossval"]["nproc_per_node"],
                                  "training data": file_digest(cfg["data"]["train_filepath"])}))


# -- the folder: state, fold folders, fold files ------------------------------------------------


OUTPUTS = ("oof_probabilities.csv", "label_issues.csv", "results.json")


def new_record(name):
    return {"name": name, "finished": False, "value": None, "best_step": None, "best_checkpoint": None,
            "seconds": 0.0, "launches": 0, "error": None}


def open_state(top, plan, runs):
    """The state of this cross-validation in its folder: read back when it is this one's (a run
    added since, the final one, gets a record), else a new one. Another's state, or folds and
    outputs without a state, are refused."""
    path = top / STATE
    if path.exists():
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            assert state["written_by"] == WRITTEN_BY
        except (ValueError, KeyError, TypeError, AssertionError):
            raise CrossValError(f"{path} is not the state of a cross-validation; move it away or choose another "
                                f"--crossval.dir") from None
        differences = plan_differences(state["plan"], plan)
        if differences:
            raise CrossValError(f"{top} holds another cross-validation ({'; '.join(differences[:3])}"
                                f"{'; ...' * (len(differences) > 3)}); rerun it with its own settings to go on, "
                                f"or choose another --crossval.dir")
        known = {record["name"] for record in state["runs"]}
        state["runs"] += [new_record(run["name"]) for run in runs if run["name"] not in known]
        return state
    for name in [run["name"] for run in runs] + list(OUTPUTS):
        if (top / name).exists() or (top / name).is_symlink():
            raise CrossValError(f"{top / name} exists, but {path} does not: it is not this cross-validation's; "
                                f"move it away or choose another --crossval.dir")
    state = {"written_by": WRITTEN_BY, "id": secrets.token_hex(8), "plan": plan,
             "runs": [new_record(run["name"]) for run in runs]}
    write_json(path, state, indent=1)
    return state


def our_folder(top, name, run_id):
    """top/name, made and marked with this cross-validation's id, or found so; another folder there is refused."""
    folder, mark = top / name, top / name / MARKER
    folder.mkdir(exist_ok=True)
    if mark.exists() and not mark.is_symlink() and mark.read_text(encoding="utf-8").strip() == run_id:
        return folder
    # a kill while the mark was written leaves only atomic_write's temporary of it
    if mark.exists() or mark.is_symlink() or any(not p.name.startswith(f".{MARKER}.") for p in folder.iterdir()):
        raise CrossValError(f"{folder} was not made by this cross-validation; move it away or choose another --crossval.dir")
    with atomic_write(mark) as f:
        f.write(run_id + "\n")
    return folder


def write_fold_files(folder, examples, names, folds, fold):
    """train.jsonl (the other folds' rows) and heldout.jsonl (this fold's), each written once,
    atomically: a resumed fold must find the same bytes it trained on."""
    for file, rows in (("train.jsonl", np.flatnonzero(folds != fold)), ("heldout.jsonl", np.flatnonzero(folds == fold))):
        if not (folder / file).exists():
            with writing_to("crossval.dir", folder / file), atomic_write(folder / file) as f:
                f.writelines(fold_lines(examples, names, rows))


# -- running the folds ----------------------------------------------------------------------------


def launch(launcher, command, folder, metric):
    """(exit status, the final metrics trainer.py printed (with metric) or None, its error line or None) of
    one launch of a fold, its output appended to folder/trainer.stdout and trainer.stderr; like a
    sweep's trial it dies with crossval, writing its checkpoint (sweep.Launcher)."""
    with open(folder / "trainer.stdout", "a", encoding="utf-8") as out, \
            open(folder / "trainer.stderr", "a", encoding="utf-8") as err:
        returncode = launcher.run(command, out, err)
    if returncode == 0:
        result = trial_result(folder / "trainer.stdout", metric)
        if result is not None:
            return returncode, result, None
    return returncode, None, failure_line(folder / "trainer.stderr", returncode)


def run_one(launcher, job, run):
    """Launch one fold (or the final run) to its end: its exit status (0 finished), None if a
    signal stopped it (it wrote a checkpoint to resume from)."""
    state, top = job.state, job.top
    record = next(r for r in state["runs"] if r["name"] == run["name"])
    folder = our_folder(top, run["name"], state["id"])
    if run["fold"] is not None:
        write_fold_files(folder, job.examples, label_names(job.cfg), job.folds, run["fold"])
    start = time.perf_counter()
    metric = job.cfg["module"]["metric"]
    returncode, result, error = launch(launcher, command_of(run, run["epochs"], job.cfg["crossval"]["nproc_per_node"]), folder,
                                                metric)
    record["seconds"] += time.perf_counter() - start
    if result is None and launcher.stopping:
        return None
    record.update(launches=record["launches"] + 1, error=error)
    if result is not None:
        record.update(finished=True, value=result[metric], best_step=result["best_step"],
                      best_checkpoint=result["best_checkpoint"])
        if run["fold"] is not None and not job.cfg["crossval"]["keep_weights"] and (folder / "checkpoints").is_dir():
            shutil.rmtree(folder / "checkpoints")  # in our own marked folder, written by its trainer.py
    write_json(top / STATE, state, indent=1)
    print(f"{run['name']}: " + (f"{metric} {record['value']:.4f} (best step {record['best_step']}), "
                                f"{record['seconds']:.0f} s" if error is None else f"failed: {error}"), flush=True)
    return returncode if result is None else 0


# -- the results: out-of-fold probabilities, label issues, the metric over folds -----------------


def out_of_fold(top, num_rows, names, folds):
    """(rows, classes) probabilities (regression: (rows, 1) predictions) read from every fold's
    heldout_predictions.csv, each row from the fold that held it out."""
    columns = ["prediction"] if names is None else [f"prob_{name}" for name in names]
    probs, seen = np.full((num_rows, len(columns)), np.nan), np.zeros(num_rows, dtype=bool)
    for fold in range(folds.max() + 1):
        path = top / f"fold-{fold + 1}" / "heldout_predictions.csv"
        with open(path, newline="", encoding="utf-8") as f:
            for line in csv.DictReader(f):
                i = int(line["row"]) - 1
                if folds[i] != fold or seen[i]:
                    raise CrossValError(f"{path}: row {i + 1} is not one that fold-{fold + 1} holds out, or is there twice")
                probs[i], seen[i] = [float(line[c]) for c in columns], True
    if not seen.all():
        raise CrossValError(f"no out-of-fold prediction of training row {np.flatnonzero(~seen)[0] + 1}")
    return probs


def issues_of(task, probs, labels):
    """(score, suggestion, issue) of every row (datacheck.py): by the task's own rule."""
    if task == "multi_label":
        return multilabel_issues(probs, labels)
    if task == "regression":
        return regression_issues(probs[:, 0], labels)
    return label_issues(probs, labels)


def label_text(labels, names, i, sep):
    value = label_value(labels, names, i)
    return sep.join(value) if isinstance(value, list) else str(value)


def write_outputs(top, cfg, examples, folds, probs):
    """oof_probabilities.csv and label_issues.csv, atomically, a cell a spreadsheet would run as a
    formula written as text (files.csv_cell); the number of rows flagged."""
    data, names = cfg["data"], label_names(cfg)
    sep, labels = data["label_sep"], examples.labels
    columns = ["prediction"] if names is None else [f"prob_{name}" for name in names]
    with writing_to("crossval.dir", top / OUTPUTS[0]), atomic_write(top / OUTPUTS[0], newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "fold", "label"] + columns)
        for i, row in enumerate(probs):
            writer.writerow(csv_cells([i + 1, folds[i] + 1, label_text(labels, names, i, sep)] + [f"{p:.6g}" for p in row]))
    scores, suggested, issues = issues_of(task_of(data), probs, labels)
    pair = ["text_b"] if examples.texts_b is not None else []
    with writing_to("crossval.dir", top / OUTPUTS[1]), atomic_write(top / OUTPUTS[1], newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["rank", "row", "fold", "given_label", "suggested_label", "score", "issue", "text"] + pair)
        for rank, i in enumerate(issue_order(scores, issues), 1):
            writer.writerow(csv_cells([rank, i + 1, folds[i] + 1, label_text(labels, names, i, sep),
                                       label_text(suggested, names, i, sep), f"{scores[i]:.6g}",
                                       str(bool(issues[i])).lower(), examples.texts_a[i]]
                                      + ([examples.texts_b[i]] if pair else [])))
    return int(issues.sum())


def kept_checkpoint(path):
    """A fold's best checkpoint if it was kept (crossval.keep_weights), else None."""
    return path if path is not None and Path(path).is_dir() else None


def summary(top, state, runs, metric, flagged):
    """results.json's content: each fold's result and command, the mean and spread of the metric."""
    records, nproc = {r["name"]: r for r in state["runs"]}, state["plan"]["crossval.nproc_per_node"]
    folds = [{"fold": run["name"], metric: records[run["name"]]["value"], "best_step": records[run["name"]]["best_step"],
              "seconds": round(records[run["name"]]["seconds"], 1), "command": plain_command(run, nproc),
              "best_checkpoint": kept_checkpoint(records[run["name"]]["best_checkpoint"])}
             for run in runs if run["fold"] is not None]
    values = np.array([fold[metric] for fold in folds], dtype=np.float64)
    result = {"metric": metric, "mean": float(values.mean()), "std": float(values.std(ddof=1)), "folds": folds,
              "label_issues_flagged": flagged, "oof_probabilities": str(top / OUTPUTS[0]), "label_issues": str(top / OUTPUTS[1])}
    final = records.get("final")
    if final is not None and final["finished"]:
        result["final"] = {metric: final["value"], "best_checkpoint": final["best_checkpoint"]}
    return result


def finish(job, flagged=None):
    """Outputs once every fold is done (flagged None: write them), then results.json and the table."""
    cfg, top, metric = job.cfg, job.top, job.cfg["module"]["metric"]
    if flagged is None:
        probs = out_of_fold(top, len(job.examples.texts_a), label_names(cfg), job.folds)
        flagged = write_outputs(top, cfg, job.examples, job.folds, probs)
    result = summary(top, job.state, job.runs, metric, flagged)
    with writing_to("crossval.dir", top / OUTPUTS[2]):
        write_json(top / OUTPUTS[2], result, indent=1)
    return result


def print_summary(result, rows):
    metric = result["metric"]
    print(f"{metric} over {len(result['folds'])} folds: mean {result['mean']:.4f}, std {result['std']:.4f}; "
          f"{result['label_issues_flagged']} of {rows} training rows flagged as label issues "
          f"({result['label_issues']}, every row ranked); out-of-fold probabilities in {result['oof_probabilities']}")
    if "final" in result:
        print(f"final model on every training row: {result['final']['best_checkpoint']}")
    print(json.dumps({k: v for k, v in result.items() if k != "folds"} | {"fold_values": [f[metric] for f in result["folds"]]}))


def run_all(job, launcher):
    """Every fold not yet finished, the outputs, then the final run; the exit status."""
    records = {r["name"]: r for r in job.state["runs"]}
    flagged = None
    for run in job.runs:
        if run["fold"] is None and flagged is None:  # the folds' outputs before the long final run
            flagged = finish(job)["label_issues_flagged"]
        if records[run["name"]]["finished"]:
            continue
        status = None if launcher.stopping else run_one(launcher, job, run)
        if status is None:
            write_json(job.top / STATE, job.state, indent=1)
            sys.stderr.write(f"stopped by a signal; the state is in {job.top / STATE}: run the same command again to go on\n")
            return 1
        if status != 0:
            sys.stderr.write(f"error: {run['name']} failed: {records[run['name']]['error']} (its output: "
                             f"{job.top / run['name']}/trainer.stderr); the same command runs it again\n")
            return 2 if status == 2 else 1
    print_summary(finish(job, flagged), len(job.examples.texts_a))
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if answer_help(argv, __doc__):
        return 0
    lock = None
    try:
        job = make_plan(argv)
        plan = plan_of(job)
        check_writable_dir(job.top, "crossval.dir")
        lock = FolderLock(job.top, key="crossval.dir")  # a second cross-validation in the folder is refused
        job.state = open_state(job.top, plan, job.runs)
    except (ConfigError, DataError, CrossValError, OutputError) as e:
        if lock is not None:
            lock.release()
        sys.stderr.write(f"error: {e}\n")
        return 2
    launcher = Launcher()
    previous = {s: signal.signal(s, launcher.request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return run_all(job, launcher)
    except (CrossValError, OutputError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        lock.release()


if __name__ == "__main__":
    sys.exit(main())
