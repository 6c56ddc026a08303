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
command again after Ctrl-C (or a kill, or a closed terminal: the running trial gets SIGTERM as the
sweep dies, and writes a checkpoint) and the sweep goes on where it stopped; another sweep (other
grid, base config or halving) is refused there, and so is a damaged or edited sweep.json. A trial
that failed is launched once more at each rerun (a full disk since freed): if its rung's cut was
made meanwhile, it goes on only if it is as good as the last trial kept there. The folder is the
sweep's own: a new sweep starts only in a new or empty one, trial-NN folders are made and marked by
the sweep, and nothing is written through a link. results.csv and results.jsonl hold the table
printed at the end; the last line of stdout is a JSON object: the winner, its metric and the epochs
spent. Exit status: 0 done, 2 bad input (one `error:` line, before any trial starts), a folder the
sweep cannot use, or no trial finished, 1 stopped by a signal (the state is saved; the running trial
wrote a checkpoint).
"""
import csv
import ctypes
import fcntl
import itertools
import json
import math
import os
import random
import re
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

from config import ConfigError, YamlLoader, answer_help, load_config, parse_args, type_ok
from files import LOCK, FolderLock, OutputError, atomic_write, check_writable_dir, csv_cells, write_json, writing_to
from progress import progress_bar

TRAINER = Path(__file__).resolve().with_name("trainer.py")
STATE = "sweep.json"
MARKER = ".sweep-trial"  # in each trial folder: the id of the sweep that made it, so only its own are deleted
WRITTEN_BY = "sweep.py"
# what a new sweep may find in its folder: what a sweep killed before its first state left
LEFTOVERS = r"\.lock|\.write-test-[0-9a-f]{8}|\.sweep\.json\..+\.tmp"
BEST_LINK = r"trial-\d+/checkpoints/[^/]+"  # what sweep.dir/best points at when the sweep made it
# sweep.json's record of each trial: its fields and their types (None: null)
RECORD_FIELDS = {"name": (str,), "settings": (dict,), "epochs": (int,), "trained_to": (int,), "finished": (bool,),
                 "value": (float, None), "best_step": (int, None), "best_checkpoint": (str, None), "seconds": (float,),
                 "launches": (int,), "error": (str, None), "out_at": (int, None), "passed": (int,)}
# Linux's prctl: a child told to receive a signal when its parent dies (die_with_parent)
LIBC, PR_SET_PDEATHSIG = (ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None), 1
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


# -- the sweep's folder: its state, checked as a checkpoint's record is ---------------------------


def plan_differences(old, new):
    keys = sorted(set(old) | set(new))
    return [f"{key} {old.get(key)!r} -> {new.get(key)!r}" for key in keys if old.get(key) != new.get(key)]


def check_sweep_dir(sweep_dir):
    """A new sweep starts in a new or empty folder: one that holds files of the user's (a results.csv,
    a `best`) and no sweep.json is refused, so nothing of the user's is overwritten."""
    if (sweep_dir / STATE).exists() or (sweep_dir / STATE).is_symlink():
        return
    others = sorted(p.name for p in sweep_dir.iterdir() if not re.fullmatch(LEFTOVERS, p.name))
    if others:
        raise SweepError(f"sweep.dir {sweep_dir} holds files that are not a sweep's ({', '.join(others[:3])}"
                         f"{', ...' * (len(others) > 3)}) and no {STATE}; choose a new or empty folder")


def open_state(sweep_dir, plan, trials):
    """The state of this sweep in sweep_dir: read back and checked when there is one, else a new one.
    Another sweep's state, a damaged one, and trial folders or a `best` the sweep did not make are refused."""
    path = sweep_dir / STATE
    # compared as they read back from JSON (tuples become lists, keys strings)
    plan = json.loads(json.dumps(plan))
    if path.exists() or path.is_symlink():
        state = read_state(path, plan, trials)
        for trial in trials:
            check_trial_dir(sweep_dir / trial["name"], state["id"])
        check_best_link(sweep_dir)
        return state
    records = [{"name": t["name"], "settings": t["settings"], "epochs": t["epochs"], "trained_to": 0,
                "finished": False, "value": None, "best_step": None, "best_checkpoint": None,
                "seconds": 0.0, "launches": 0, "error": None, "out_at": None, "passed": 0} for t in trials]
    state = {"written_by": WRITTEN_BY, "id": secrets.token_hex(8), "plan": plan, "cuts_done": 0, "bars": [],
             "trials": records}
    write_json(path, state, indent=1)
    return state


def read_state(path, plan, trials):
    """sweep.json of this sweep, every field checked (state_error says what is wrong)."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        state = None
    if not isinstance(state, dict) or state.get("written_by") != WRITTEN_BY or not isinstance(state.get("plan"), dict):
        raise SweepError(f"{path} is not the state of a sweep; move it away or choose another --sweep.dir")
    differences = plan_differences(state["plan"], plan)
    if differences:
        raise SweepError(f"{path.parent} holds another sweep ({'; '.join(differences[:3])}"
                         f"{'; ...' * (len(differences) > 3)}); rerun it with its own settings to resume it, "
                         f"or choose another --sweep.dir")
    what = state_error(state, len(plan["rungs"]), trials)
    if what is not None:
        raise SweepError(f"{path}: {what}"[:400] + ", not as sweep.py writes it (damaged or edited?); put the "
                         "sweep's own file back, or start the sweep again in another --sweep.dir")
    return state


def state_error(state, rungs, trials):
    """What is wrong with a state's fields, or None. Its trials must be this sweep's, in order: their
    names are checked, never used as folders (those are trial-NN under sweep.dir, made here)."""
    if not (isinstance(state.get("id"), str) and re.fullmatch(r"[0-9a-f]{16}", state["id"])):
        return f"id is {state.get('id')!r}"
    cuts = state.get("cuts_done")
    if not (type_ok(cuts, (int,)) and 0 <= cuts < rungs):
        return f"cuts_done is {cuts!r} (there are {rungs} rungs)"
    bars = state.setdefault("bars", [None] * cuts)  # a sweep.json from before retries
    if not (isinstance(bars, list) and len(bars) == cuts and all(b is None or finite(b) for b in bars)):
        return f"bars is {bars!r}"
    records = state.get("trials")
    if not isinstance(records, list):
        return f"trials is {records!r}"
    if len(records) != len(trials):  # never a trial silently dropped
        return f"trials lists {len(records)} trials, this sweep has {len(trials)}"
    for i, (record, trial) in enumerate(zip(records, trials)):
        what = record_error(record, trial, rungs, cuts)
        if what is not None:
            return f"trials[{i}] {what}"
    return None


def record_error(record, trial, rungs, cuts):
    """What is wrong with one trial's record, or None."""
    if not isinstance(record, dict):
        return f"is {record!r}"
    record.setdefault("passed", cuts if record.get("out_at") is None else record["out_at"])  # from before retries
    for name, types in RECORD_FIELDS.items():
        if name not in record or not type_ok(record[name], types):
            return f"{name} is {record.get(name, 'missing')!r}"
    ok = {"name": record["name"] == trial["name"],
          "settings": json.dumps(record["settings"], sort_keys=True) == json.dumps(trial["settings"], sort_keys=True),
          "epochs": record["epochs"] == trial["epochs"],
          "trained_to": 0 <= record["trained_to"] <= record["epochs"],
          "value": record["value"] is None or finite(record["value"]),
          "best_step": record["best_step"] is None or record["best_step"] >= 0,
          "best_checkpoint": record["best_checkpoint"] is None or plain_name(record["best_checkpoint"]),
          "seconds": finite(record["seconds"]) and record["seconds"] >= 0,
          "launches": record["launches"] >= 0,
          "out_at": record["out_at"] is None or 0 <= record["out_at"] < rungs,
          "passed": 0 <= record["passed"] < rungs}
    bad = [name for name, good in ok.items() if not good]
    return f"{bad[0]} is {record[bad[0]]!r}" if bad else None


def finite(value):
    return type_ok(value, (float,)) and math.isfinite(value)


def plain_name(name):
    """A name of one folder inside another: no path that leads elsewhere."""
    return isinstance(name, str) and re.fullmatch(r"[^/\\\0]+", name) is not None and name not in (".", "..")


# -- the trial folders and `best`: the sweep's own, never through a link ---------------------------


def our_trial_dir(folder, sweep_id):
    """True if folder is a real folder (not a link) whose mark holds this sweep's id."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    try:
        fd = os.open(folder / MARKER, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    with os.fdopen(fd, encoding="utf-8", errors="replace") as f:
        return f.read(100).strip() == sweep_id


def check_trial_dir(folder, sweep_id):
    """A trial folder that is there must be this sweep's (its mark), or empty (made by a sweep killed
    before it wrote the mark)."""
    if not (folder.exists() or folder.is_symlink()) or our_trial_dir(folder, sweep_id):
        return
    if folder.is_symlink() or not folder.is_dir() or any(folder.iterdir()):
        raise SweepError(f"{folder} is not a trial folder of this sweep (a link, a file, or a folder without "
                         f"its {MARKER} mark); move it away, then run the sweep again")


def claim_trial_dir(folder, sweep_id):
    """The trial's folder, made here and marked with the sweep's id before anything else is written
    in it: the mark is what lets the cut delete its checkpoints."""
    try:
        folder.mkdir()
    except FileExistsError:
        pass  # an earlier launch's, or not ours: check_trial_dir tells
    check_trial_dir(folder, sweep_id)
    if not our_trial_dir(folder, sweep_id):
        with new_file(folder / MARKER) as f:
            f.write(sweep_id + "\n")
    return folder


def new_file(path):
    """path open to write as a new file: what had the name (a link to a user's file, a hard link) is
    unlinked first, never written through."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
    return os.fdopen(fd, "w", encoding="utf-8")


def check_best_link(sweep_dir):
    """sweep_dir/best is absent or a link the sweep made (to a trial's checkpoint): anything else is
    the user's, refused before any trial runs rather than replaced after the last."""
    best = sweep_dir / "best"
    if best.is_symlink() and re.fullmatch(BEST_LINK, os.readlink(best)):
        return
    if best.exists() or best.is_symlink():
        raise SweepError(f"{best} was not made by this sweep, which links its winner there; move it away, "
                         f"then run the sweep again")


def link_best(sweep_dir, trial, checkpoint):
    """Atomically make sweep_dir/best a relative link to the winner's best checkpoint folder: a new
    link under a name of its own, renamed over the old one (check_best_link proved that ours)."""
    relative = f"{trial['name']}/checkpoints/{checkpoint}"
    if checkpoint is None or not (sweep_dir / relative).is_dir():
        raise SweepError(f"the winner {trial['name']} has no best checkpoint to link ({sweep_dir / relative}); "
                         f"its table row and results.jsonl are written")
    check_best_link(sweep_dir)
    tmp = sweep_dir / f".best-{secrets.token_hex(4)}.tmp"
    tmp.symlink_to(relative, target_is_directory=True)
    try:
        os.replace(tmp, sweep_dir / "best")
    except OSError:
        tmp.unlink()
        raise


# -- the trials: launched, waited for, dying with the sweep ---------------------------------------


def die_with_parent():
    """Popen's preexec_fn on Linux (None elsewhere): the kernel sends the trial SIGTERM when the sweep
    dies (killed, or its terminal closed), so no trial trains on as an orphan holding its folder; like
    a Ctrl-C, it writes a checkpoint and stops, for the rerun to resume."""
    if LIBC is None:
        return None
    parent = os.getpid()

    def preexec():
        LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the sweep died before the line above
            os._exit(1)
    return preexec


class Launcher:
    """Runs one trainer.py at a time (a sweep's trials, crossval's folds), in a session of its own and
    dying with us (die_with_parent), and passes a Ctrl-C or SIGTERM on to it once: it writes its
    checkpoint and stops. stopping: one came."""

    def __init__(self):
        self.child, self.stopping = None, False

    def request_stop(self, signum, frame):
        # the child gets the one signal and writes its checkpoint; a second one stops it at once
        self.stopping = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)

    def run(self, command, stdout, stderr):
        """Its exit status; a Ctrl-C at the terminal reaches it once, through request_stop."""
        self.child = subprocess.Popen(command, stdout=stdout, stderr=stderr, start_new_session=True,
                                      preexec_fn=die_with_parent())
        returncode = self.child.wait()
        self.child = None
        return returncode


def failure_line(err, returncode):
    """Why a launch failed, from its stderr file: its last error: line, else its last line."""
    lines = err.read_text(encoding="utf-8", errors="replace").splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or [f"exit status {returncode}, no result line"])[-1]


def wait_for_lock(path, stopping, say):
    """Wait until no process holds path (a FolderLock's file) locked; False if stopping() first."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return True
    with os.fdopen(fd, encoding="utf-8", errors="replace") as f:
        for tries in itertools.count():
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released as the file closes
                return True
            except OSError:
                if stopping():
                    return False
                if tries == 0:
                    say(f.read(200).strip() or "another process")
                time.sleep(0.5)


def trial_result(out, metric):
    """The final metrics trainer.py prints as its last line of stdout, or None if it has none."""
    lines = out.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, ValueError):
        return None
    if not (isinstance(result, dict) and finite(result.get(metric)) and type_ok(result.get("best_step"), (int,))):
        return None
    return result


def checkpoint_name(path):
    """The name of a trial's best checkpoint folder in its checkpoints/: where the sweep and its
    folder are is never stored, so a folder spelled otherwise or moved still reads."""
    return Path(path).name if isinstance(path, str) and plain_name(Path(path).name) else None


# -- the sweep ----------------------------------------------------------------------------------


class Sweep:
    """One sweep in its folder: the state, the trial running now, and a stop asked by a signal."""

    def __init__(self, sweep, trials, state, sweep_dir):
        self.sweep, self.trials, self.state, self.dir = sweep, trials, state, sweep_dir
        self.records = state["trials"]
        self.metric = trials[0]["metric"]
        self.rungs = state["plan"]["rungs"]
        self.launcher = Launcher()

    def run(self):
        """Every rung in turn; returns the exit status."""
        self.retry_failed()
        # one thread: the kernel sends a trial its death signal again for each thread of a killed sweep
        # (die_with_parent), and a second signal stops a trial without its checkpoint
        tqdm.monitor_interval = 0
        sizes = field_sizes(len(self.records), self.rungs, self.sweep["keep"])
        bar = progress_bar(total=sum(sizes), initial=sum(r["launches"] for r in self.records), desc="sweep",
                           unit="trial", dynamic_ncols=True)
        previous = {s: signal.signal(s, self.launcher.request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for i, rung in enumerate(self.rungs):
                field = [r for r in self.records if r["out_at"] is None or r["out_at"] >= i]
                for record, trial in zip(self.records, self.trials):
                    if record not in field or record["error"] or record["finished"]:
                        continue
                    if record["trained_to"] >= min(rung, record["epochs"]):
                        continue
                    if self.launcher.stopping or not self.launch(record, trial, i):
                        return self.stopped()
                    bar.update(1)
                if i + 1 < len(self.rungs):
                    self.cut(field, i)
        finally:
            bar.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        return self.finish(field)

    def retry_failed(self):
        """Each failed trial gets one more launch at every rerun: its failure may have passed (a full
        disk since freed, a folder in use). It rejoins at the rung where it failed."""
        for record in self.records:
            if record["error"] is not None:
                print(f"{record['name']} failed at the last run ({record['error']}); launching it again once")
                record.update(error=None, out_at=None)

    def launch(self, record, trial, i):
        """Train one trial to rung i; False if a signal asked the sweep to stop."""
        target, folder = min(self.rungs[i], record["epochs"]), self.dir / trial["name"]
        with writing_to("sweep.dir", folder):
            claim_trial_dir(folder, self.state["id"])
        if not wait_for_lock(folder / "checkpoints" / LOCK, lambda: self.launcher.stopping, lambda holder: self.say(
                f"{trial['name']}: waiting for its launch by an earlier sweep to end ({holder})")):
            return False
        start = time.perf_counter()
        returncode, out, err = self.run_trial(folder, trial, target)
        record["seconds"] += time.perf_counter() - start
        result = trial_result(out, self.metric) if returncode == 0 else None
        if result is None and self.launcher.stopping:  # stopped with a checkpoint: the next launch resumes it
            return False
        record["launches"] += 1
        line = self.record_outcome(record, result, target, i, err, returncode)
        self.save()
        self.say(f"{line}, {record['seconds']:.0f} s  [{settings_text(record['settings'])}]")
        return not self.launcher.stopping

    def run_trial(self, folder, trial, target):
        """One launch of trainer.py, its output in epoch<target>.stdout / .stderr: (exit status, the two files)."""
        out, err = folder / f"epoch{target}.stdout", folder / f"epoch{target}.stderr"
        with writing_to("sweep.dir", folder), new_file(out) as stdout, new_file(err) as stderr:
            returncode = self.launcher.run(command_of(trial, target, self.sweep["nproc_per_node"]), stdout, stderr)
        return returncode, out, err

    def record_outcome(self, record, result, target, i, err, returncode):
        """The launch's result (or its failure) in the trial's record: the line that says it."""
        if result is not None:
            record.update(trained_to=target, finished="paused_after_epoch" not in result, value=result[self.metric],
                          best_step=result["best_step"], best_checkpoint=checkpoint_name(result.get("best_checkpoint")))
            return (f"{record['name']} epoch {target}/{record['epochs']}: {self.metric} {record['value']:.4f} "
                    f"(best step {record['best_step']})")
        record.update(error=failure_line(err, returncode), out_at=i)
        return f"{record['name']} failed: {record['error']}"

    def cut(self, field, i):
        """Keep the best sweep.keep of the field of rung i; the others stop here. Once only: the
        kept trials' values move on at the next rung. A kill before the state is saved repeats it
        alike (the values it reads were not changed yet). The value of the last one kept is the
        bar that a trial retried after the cut must reach (judge_late)."""
        if self.state["cuts_done"] > i:
            return self.judge_late(field, i)
        best = ranking(field)[:kept(len(field), self.sweep["keep"])]
        for record in field:
            if record["error"] is None and record not in best:
                self.drop(record, i)
        for record in best:
            record["passed"] = i + 1
        self.state["bars"].append(best[-1]["value"] if best else None)
        self.state["cuts_done"] = i + 1
        self.save()

    def judge_late(self, field, i):
        """Trials retried after the cut of rung i was made go on if they reach its bar."""
        bar = self.state["bars"][i]
        for record in field:
            if record["error"] is None and record["out_at"] is None and record["passed"] <= i:
                if bar is None or record["value"] >= bar:
                    record["passed"] = i + 1
                else:
                    self.drop(record, i)
        self.save()

    def drop(self, record, i):
        """A trial cut at rung i: its checkpoints are deleted unless sweep.keep_weights (its logs stay)."""
        record["out_at"] = i
        trial = self.trials[self.records.index(record)]
        checkpoints = self.dir / trial["name"] / "checkpoints"
        if not self.sweep["keep_weights"] and our_trial_dir(self.dir / trial["name"], self.state["id"]) \
                and checkpoints.is_dir() and not checkpoints.is_symlink():
            shutil.rmtree(checkpoints)

    def save(self):
        write_json(self.dir / STATE, self.state, indent=1)

    def say(self, line):
        tqdm.write(line, file=sys.stdout)

    def stopped(self):
        self.save()
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
        link_best(self.dir, self.trials[self.records.index(winner)], winner["best_checkpoint"])
        spent = sum(r["trained_to"] for r in self.records)
        full = sum(r["epochs"] for r in self.records)
        print(f"winner {winner['name']} ({settings_text(winner['settings'])}): {self.metric} "
              f"{winner['value']:.4f}, best checkpoint linked as {self.dir / 'best'}; {spent} epochs trained, "
              f"{full} to train every trial fully")
        print(json.dumps({"winner": winner["name"], "settings": winner["settings"], self.metric: winner["value"],
                          "best_step": winner["best_step"], "best_checkpoint": str(self.dir / "best"),
                          "epochs_trained": spent, "epochs_every_trial_fully": full}))
        return 0


def plain_command(trial, nproc):
    """The trial run alone, as a user would type it."""
    launcher = ["python"] if nproc == 1 else ["torchrun", f"--nproc_per_node={nproc}"]
    return shlex.join(launcher + ["trainer.py"] + trial["args"])


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
        rows.append({"trial": trial["name"], **{key: as_arg(v) for key, v in record["settings"].items()},
                     "epochs": record["trained_to"], "status": status_of(record, rungs, winner),
                     metric: record["value"], "best_step": record["best_step"],
                     "seconds": round(record["seconds"], 1), "error": record["error"] or ""})
    with atomic_write(sweep_dir / "results.csv", newline="") as f:
        writer = csv.writer(f)  # a cell a spreadsheet would run as a formula is written as text
        writer.writerows(csv_cells(row) for row in [list(rows[0])] + [list(row.values()) for row in rows])
    with atomic_write(sweep_dir / "results.jsonl") as f:
        for record, trial, row in zip(records, trials, rows):
            best = record["best_checkpoint"] and str(sweep_dir / trial["name"] / "checkpoints" / record["best_checkpoint"])
            f.write(json.dumps({**row, "settings": record["settings"], "best_checkpoint": best,
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
        check_sweep_dir(sweep_dir)  # before the lock file is made in a folder that is not ours
        lock = FolderLock(sweep_dir, key="sweep.dir")  # a second sweep in the folder is refused
        with writing_to("sweep.dir", sweep_dir):
            state = open_state(sweep_dir, plan, trials)
            return Sweep(sweep, trials, state, sweep_dir).run()
    except (ConfigError, SweepError, OutputError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    finally:
        if lock is not None:
            lock.release()


if __name__ == "__main__":
    sys.exit(main())
