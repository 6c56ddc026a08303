r"""Hyperparameter sweep: trials of trainer.py over a grid of config keys, the epochs spent by
successive halving on exact resume.

    python sweep.py --trainer.epochs 2 --sweep.grid "{module.max_lr: [2e-5, 5e-5, 1e-4], trainer.seed: [42, 43]}"
    python sweep.py --config_path my.yaml --sweep.dir sweeps/lr --sweep.nproc_per_node 2

Every trial is an ordinary run of trainer.py (of torchrun trainer.py when sweep.nproc_per_node is
more than 1): the sweep's config with the trial's grid values, its checkpoints and logs in its own
folder sweep.dir/trial-NN. Its command is in results.jsonl, and run alone it trains the same model,
bit for bit. Successive halving: every trial trains to the first rung (trainer.stop_after_epochs; the
schedule still spans trainer.epochs), the best sweep.keep of them by module.metric (the best
validation so far, as trainer.py reports it) resume to the next rung with --ckpt.resume auto, and
so on to trainer.epochs. The best trial of the last rung wins: sweep.dir/best links its best
checkpoint. The checkpoints of the trials cut at a rung are deleted unless sweep.keep_weights.

sweep.dir/sweep.json is the sweep's state, replaced atomically after every trial: run the same
command again after Ctrl-C (or a kill) and the sweep goes on where it stopped; another sweep (other
grid, base config or halving) is refused there. results.csv and results.jsonl hold the table printed
at the end; the last line of stdout is a JSON object: the winner, its metric and the epochs spent.
Exit status: 0 done, 2 bad input (one `error:` line, before any trial starts) or no trial finished,
1 stopped by a signal (the state is saved; the running trial wrote a checkpoint).
"""
import csv
import itertools
import json
import math
import os
import random
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from tqdm import tqdm

from config import ConfigError, YamlLoader, answer_help, load_config, parse_args
from files import FolderLock, OutputError, atomic_write, check_writable_dir, write_json

TRAINER = Path(__file__).resolve().with_name("trainer.py")
STATE = "sweep.json"
MARKER = ".sweep-trial"  # in each trial folder: the id of the sweep that made it, so only its own are deleted
WRITTEN_BY = "sweep.py"
# each trial's own folders and its place in the halving: the sweep sets these, a grid may not
SET_BY_SWEEP = ("ckpt.model_state_save_dir", "trainer.log_dir", "trainer.stop_after_epochs", "ckpt.resume")


class SweepError(Exception):
    """Bad sweep input or a folder the sweep cannot use, reported as one line."""


# -- the plan: trials, rungs, how many go on (pure functions) ---------------------------------


def grid_points(grid, samples=None, seed=0):
    """[{key: value}, ...]: every combination of the grid's values (the last key varying fastest),
    or `samples` of them drawn with seed, kept in that order."""
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    if samples is None:
        return points
    if samples > len(points):
        raise SweepError(f"sweep.samples {samples} is more than the {len(points)} points of sweep.grid; "
                         f"lower it, or set it to null for the whole grid")
    return [points[i] for i in sorted(random.Random(seed).sample(range(len(points)), samples))]


def rungs_of(rungs, epochs):
    """The epochs at which the trials are compared: null = 1, 2, 4, ... below epochs; epochs is
    always the last, since only a finished schedule is the run a user would get."""
    if rungs is None:
        rungs = [2**i for i in range(epochs.bit_length()) if 2**i < epochs]
    if rungs and rungs[-1] > epochs:
        raise SweepError(f"sweep.rungs {rungs} go past trainer.epochs {epochs}")
    return [r for r in rungs if r < epochs] + [epochs]


def kept(n, keep):
    """How many of n trials go on to the next rung: the fraction keep, rounded up (at least one)."""
    return max(1, math.ceil(round(n * keep, 9)))  # round: 10 * 0.3 is 3.0000000000000004


def field_sizes(n, rungs, keep):
    """Trials that train to each rung when none fails."""
    sizes = [n]
    for _ in rungs[1:]:
        sizes.append(kept(sizes[-1], keep))
    return sizes


def ranking(trials):
    """The trials that did not fail, best value first (the earlier trial first on a tie)."""
    ok = [t for t in trials if t["error"] is None and t["value"] is not None]
    return sorted(ok, key=lambda t: -t["value"])  # sorted is stable: ties keep the trial order


# -- input: the trials' command lines, each checked as trainer.py would -------------------------


def as_arg(value):
    """A config value as a command-line word that load_config reads back as the same value."""
    if isinstance(value, str) and not value.startswith("-"):
        try:
            if yaml.load(value, Loader=YamlLoader) == value:
                return value
        except yaml.YAMLError:
            pass
    return json.dumps(value)  # JSON is YAML: "null" stays a string, 5e-05 a float


def check_grid(grid, cfg):
    """Every grid key is a key of config.yaml that a trial may set, with a non-empty list of values."""
    if not grid:
        raise SweepError('sweep.grid is empty; give config keys and their values, e.g. --sweep.grid '
                         '"{module.max_lr: [2e-5, 5e-5], trainer.seed: [1, 2]}"')
    for key, values in grid.items():
        section, _, name = str(key).partition(".")
        if section not in cfg or name not in cfg[section]:
            known = f"; keys of {section} are {list(cfg[section])}" if section in cfg else ""
            raise SweepError(f"sweep.grid: {key!r} is not a key of config.yaml (section.key, e.g. module.max_lr){known}")
        if section == "sweep" or key in SET_BY_SWEEP:
            raise SweepError(f"sweep.grid: {key} is set by the sweep itself; leave it out of the grid")
        if not isinstance(values, list) or not values:
            raise SweepError(f"sweep.grid: {key} is {values!r}; give a non-empty list of values, e.g. [1, 2]")
        words = [json.dumps(v) for v in values]
        if len(set(words)) != len(words):
            raise SweepError(f"sweep.grid: {key} lists a value twice ({values}); each point would be trained twice")


def make_trials(argv):
    """(the sweep settings, the base config, [trial, ...]): argv read and checked, then every trial's
    command line checked by load_config as trainer.py will read it. Raises ConfigError / SweepError."""
    cfg = load_config(argv)
    sweep, sweep_dir = cfg["sweep"], Path(cfg["sweep"]["dir"])
    for key in ("trainer.stop_after_epochs", "ckpt.resume"):
        if key in cfg.user_keys:
            raise SweepError(f"{key} is set by the sweep for each trial (its rungs, its resumes); leave it out")
    check_grid(sweep["grid"], cfg)
    config_path, overrides = parse_args(argv)
    base = [] if config_path is None else ["--config_path", config_path]
    for key, value in overrides:
        if not key.startswith("sweep."):
            base += [f"--{key}", as_arg(value)]
    points = grid_points(sweep["grid"], sweep["samples"], sweep["seed"])
    width = max(2, len(str(len(points) - 1)))
    trials = []
    for i, point in enumerate(points):
        name = f"trial-{i:0{width}d}"
        args = base + [word for key, value in point.items() for word in (f"--{key}", as_arg(value))]
        args += ["--ckpt.model_state_save_dir", str(sweep_dir / name / "checkpoints"),
                 "--trainer.log_dir", str(sweep_dir / name / "runs")]
        try:  # as its first launch will read it: to the first rung, resuming what is there
            tcfg = load_config(args + ["--trainer.stop_after_epochs", "1", "--ckpt.resume", "auto"])
        except ConfigError as e:
            raise SweepError(f"{name} ({settings_text(point)}): {e}") from None
        if tcfg["data"]["train_filepath"] is None or tcfg["data"]["val_filepath"] is None:
            raise SweepError(f"{name}: a sweep trains (data.train_filepath) and compares the trials on "
                             f"data.val_filepath; set both")
        trials.append({"name": name, "settings": point, "args": args, "epochs": tcfg["trainer"]["epochs"],
                       "metric": tcfg["module"]["metric"]})
    metrics = sorted({t["metric"] for t in trials})
    if len(metrics) > 1:
        raise SweepError(f"the trials would be compared by different metrics ({', '.join(metrics)}); "
                         f"set module.metric outside the grid")
    base_cfg = {f"{section}.{name}": value for section, values in cfg.items() if section != "sweep"
                for name, value in values.items() if f"{section}.{name}" not in SET_BY_SWEEP}
    return sweep, base_cfg, trials


def settings_text(settings):
    return " ".join(f"{key}={as_arg(value)}" for key, value in settings.items())


def command_of(trial, target, nproc):
    """The command of one launch: the trial to epoch `target`, resuming its newest checkpoint."""
    stop = "null" if target >= trial["epochs"] else str(target)
    launcher = [sys.executable, str(TRAINER)] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(TRAINER)]
    return launcher + trial["args"] + ["--ckpt.resume", "auto", "--trainer.stop_after_epochs", stop]


# -- the sweep's folder: state, lock, trial folders --------------------------------------------


def plan_differences(old, new):
    keys = sorted(set(old) | set(new))
    return [f"{key} {old.get(key)!r} -> {new.get(key)!r}" for key in keys if old.get(key) != new.get(key)]


def open_state(sweep_dir, plan, trials):
    """The state of this sweep in sweep_dir: read back when it is this sweep's, else a new one.
    Another sweep's state, or trial folders without one, are refused."""
    path = sweep_dir / STATE
    # compared as they read back from JSON (tuples become lists, keys strings)
    plan = json.loads(json.dumps(plan))
    if path.exists():
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            assert state["written_by"] == WRITTEN_BY
        except (ValueError, KeyError, TypeError, AssertionError):
            raise SweepError(f"{path} is not the state of a sweep; move it away or choose another --sweep.dir") from None
        differences = plan_differences(state["plan"], plan)
        if differences:
            raise SweepError(f"{sweep_dir} holds another sweep ({'; '.join(differences[:3])}"
                             f"{'; ...' * (len(differences) > 3)}); rerun it with its own settings to resume it, "
                             f"or choose another --sweep.dir")
        return state
    for name in [t["name"] for t in trials] + ["best"]:
        if (sweep_dir / name).exists() or (sweep_dir / name).is_symlink():
            raise SweepError(f"{sweep_dir / name} exists, but {path} does not: it is not this sweep's; "
                             f"move it away or choose another --sweep.dir")
    records = [{"name": t["name"], "settings": t["settings"], "epochs": t["epochs"], "trained_to": 0,
                "finished": False, "value": None, "best_step": None, "best_checkpoint": None,
                "seconds": 0.0, "launches": 0, "error": None, "out_at": None} for t in trials]
    state = {"written_by": WRITTEN_BY, "id": secrets.token_hex(8), "plan": plan, "cuts_done": 0, "trials": records}
    write_json(path, state, indent=1)
    return state


def our_trial_dir(sweep_dir, name, sweep_id):
    """True if sweep_dir/name carries this sweep's marker."""
    try:
        return (sweep_dir / name / MARKER).read_text(encoding="utf-8").strip() == sweep_id
    except OSError:
        return False


# -- the sweep ----------------------------------------------------------------------------------


class Sweep:
    """One sweep in its folder: the state, the trial running now, and a stop asked by a signal."""

    def __init__(self, sweep, trials, state, sweep_dir):
        self.sweep, self.trials, self.state, self.dir = sweep, trials, state, sweep_dir
        self.records = state["trials"]
        self.metric = trials[0]["metric"]
        self.rungs = state["plan"]["rungs"]
        self.child, self.stopping = None, False

    def request_stop(self, signum, frame):
        # the trial gets the one signal and writes its checkpoint; a second one stops it at once
        self.stopping = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)

    def run(self):
        """Every rung in turn; returns the exit status."""
        sizes = field_sizes(len(self.records), self.rungs, self.sweep["keep"])
        bar = tqdm(total=sum(sizes), initial=sum(r["launches"] for r in self.records), desc="sweep",
                   unit="trial", dynamic_ncols=True)
        previous = {s: signal.signal(s, self.request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for i, rung in enumerate(self.rungs):
                field = [r for r in self.records if r["out_at"] is None or r["out_at"] >= i]
                for record, trial in zip(self.records, self.trials):
                    if record not in field or record["error"] or record["finished"]:
                        continue
                    if record["trained_to"] >= min(rung, record["epochs"]):
                        continue
                    if self.stopping or not self.launch(record, trial, i):
                        return self.stopped()
                    bar.update(1)
                if i + 1 < len(self.rungs):
                    self.cut(field, i)
        finally:
            bar.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        return self.finish(field)

    def launch(self, record, trial, i):
        """Train one trial to rung i; False if a signal asked the sweep to stop."""
        target = min(self.rungs[i], record["epochs"])
        folder = self.dir / record["name"]
        folder.mkdir(exist_ok=True)
        if not (folder / MARKER).exists():
            (folder / MARKER).write_text(self.state["id"] + "\n", encoding="utf-8")
        out, err = folder / f"epoch{target}.stdout", folder / f"epoch{target}.stderr"
        start = time.perf_counter()
        with open(out, "w", encoding="utf-8") as stdout, open(err, "w", encoding="utf-8") as stderr:
            # a session of its own: a Ctrl-C at the terminal reaches the trial once, through request_stop
            self.child = subprocess.Popen(command_of(trial, target, self.sweep["nproc_per_node"]),
                                          stdout=stdout, stderr=stderr, start_new_session=True)
            returncode = self.child.wait()
            self.child = None
        record["seconds"] += time.perf_counter() - start
        result = last_json(out) if returncode == 0 else None
        if result is None and self.stopping:  # stopped with a checkpoint: the next launch resumes it
            return False
        record["launches"] += 1
        if result is not None:
            record.update(trained_to=target, finished="paused_after_epoch" not in result,
                          value=result[self.metric], best_step=result["best_step"],
                          best_checkpoint=result["best_checkpoint"])
            line = (f"{record['name']} epoch {target}/{record['epochs']}: {self.metric} {record['value']:.4f} "
                    f"(best step {record['best_step']})")
        else:
            lines = err.read_text(encoding="utf-8", errors="replace").splitlines()
            errors = [line for line in lines if line.startswith("error:")]
            record.update(error=(errors or lines or [f"exit status {returncode}, no result line"])[-1], out_at=i)
            line = f"{record['name']} failed: {record['error']}"
        write_json(self.dir / STATE, self.state, indent=1)
        tqdm.write(f"{line}, {record['seconds']:.0f} s  [{settings_text(record['settings'])}]", file=sys.stdout)
        return not self.stopping

    def cut(self, field, i):
        """Keep the best sweep.keep of the field of rung i; the others stop here. Once only: the
        kept trials' values move on at the next rung. A kill before the state is saved repeats it
        alike (the values it reads were not changed yet)."""
        if self.state["cuts_done"] > i:
            return
        best = ranking(field)[:kept(len(field), self.sweep["keep"])]
        for record in field:
            if record["error"] is None and record not in best:
                record["out_at"] = i
        if not self.sweep["keep_weights"]:
            for record in field:
                if record["out_at"] == i and our_trial_dir(self.dir, record["name"], self.state["id"]):
                    checkpoints = self.dir / record["name"] / "checkpoints"
                    if checkpoints.exists():
                        shutil.rmtree(checkpoints)
        self.state["cuts_done"] = i + 1
        write_json(self.dir / STATE, self.state, indent=1)

    def stopped(self):
        write_json(self.dir / STATE, self.state, indent=1)
        write_results(self.dir, self.records, self.rungs, self.metric, self.trials, self.sweep, winner=None)
        sys.stderr.write(f"stopped by a signal; the sweep's state is in {self.dir / STATE}: run the same "
                         f"command again to go on\n")
        return 1

    def finish(self, field):
        """Link the winner as sweep.dir/best, write and print the table; the exit status."""
        order = ranking(field)
        winner = order[0] if order else None
        rows = write_results(self.dir, self.records, self.rungs, self.metric, self.trials, self.sweep, winner)
        print_table(rows, self.metric)
        if winner is None:
            sys.stderr.write(f"error: no trial finished; their errors are in the table and in "
                             f"{self.dir}/<trial>/epoch<N>.stderr\n")
            return 2
        link_best(self.dir, winner["best_checkpoint"])
        spent = sum(r["trained_to"] for r in self.records)
        full = sum(r["epochs"] for r in self.records)
        print(f"winner {winner['name']} ({settings_text(winner['settings'])}): {self.metric} "
              f"{winner['value']:.4f}, best checkpoint linked as {self.dir / 'best'}; {spent} epochs trained, "
              f"{full} to train every trial fully")
        print(json.dumps({"winner": winner["name"], "settings": winner["settings"], self.metric: winner["value"],
                          "best_step": winner["best_step"], "best_checkpoint": str(self.dir / "best"),
                          "epochs_trained": spent, "epochs_every_trial_fully": full}))
        return 0


def last_json(path):
    """The final metrics trainer.py prints as its last line of stdout, or None."""
    lines = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    try:
        result = json.loads(lines[-1])
        return result if isinstance(result, dict) and "best_step" in result else None
    except (IndexError, ValueError):
        return None


def plain_command(trial, nproc):
    """The trial run alone, as a user would type it."""
    launcher = ["python"] if nproc == 1 else ["torchrun", f"--nproc_per_node={nproc}"]
    return shlex.join(launcher + ["trainer.py"] + trial["args"])


def link_best(sweep_dir, checkpoint):
    """Atomically make sweep_dir/best a relative link to the winner's best checkpoint folder."""
    tmp = sweep_dir / ".best.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(os.path.relpath(checkpoint, sweep_dir), target_is_directory=True)
    os.replace(tmp, sweep_dir / "best")


def status_of(record, rungs, winner):
    if record["error"] is not None:
        return "failed"
    if record["out_at"] is not None:
        return f"cut at epoch {rungs[record['out_at']]}"
    if winner is not None and record["name"] == winner["name"]:
        return "winner"
    return "finished" if record["finished"] else "unfinished"


def write_results(sweep_dir, records, rungs, metric, trials, sweep, winner):
    """results.csv and results.jsonl: one row per trial. Returns the rows."""
    rows = []
    for record, trial in zip(records, trials):
        rows.append({"trial": record["name"], **{key: as_arg(v) for key, v in record["settings"].items()},
                     "epochs": record["trained_to"], "status": status_of(record, rungs, winner),
                     metric: record["value"], "best_step": record["best_step"],
                     "seconds": round(record["seconds"], 1), "error": record["error"] or ""})
    with atomic_write(sweep_dir / "results.csv", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with atomic_write(sweep_dir / "results.jsonl") as f:
        for record, trial, row in zip(records, trials, rows):
            f.write(json.dumps({**row, "settings": record["settings"], "best_checkpoint": record["best_checkpoint"],
                                "command": plain_command(trial, sweep["nproc_per_node"])}) + "\n")
    return rows


def print_table(rows, metric):
    def cell(key, value):
        if value is None:
            return "-"
        return f"{value:.4f}" if key == metric else str(value)
    columns = list(rows[0])
    cells = [[cell(key, row[key]) for key in columns] for row in rows]
    widths = [max(len(key), *(len(c[i]) for c in cells)) for i, key in enumerate(columns)]
    for line in [columns] + cells:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if answer_help(argv, __doc__):
        return 0
    lock = None
    try:
        sweep, base_cfg, trials = make_trials(argv)
        sweep_dir = Path(sweep["dir"])
        rungs = rungs_of(sweep["rungs"], max(t["epochs"] for t in trials))
        plan = {"sweep.grid": sweep["grid"], "sweep.samples": sweep["samples"], "sweep.seed": sweep["seed"],
                "sweep.keep": sweep["keep"], "rungs": rungs, "sweep.nproc_per_node": sweep["nproc_per_node"],
                **base_cfg}
        check_writable_dir(sweep_dir, "sweep.dir")
        lock = FolderLock(sweep_dir, key="sweep.dir")  # a second sweep in the folder is refused
        state = open_state(sweep_dir, plan, trials)
    except (ConfigError, SweepError, OutputError) as e:
        if lock is not None:
            lock.release()
        sys.stderr.write(f"error: {e}\n")
        return 2
    try:
        return Sweep(sweep, trials, state, sweep_dir).run()
    finally:
        lock.release()


if __name__ == "__main__":
    sys.exit(main())
