"""Checkpoint folders on disk: the format, the save folder, recovery and the rules of resume.

Usage (trainer.py's Trainer does this; every rank holds the SaveDir, rank 0 alone touches the disk):
    save_dir = SaveDir(cfg, session, say)              # ckpt.model_state_save_dir for this run
    resume = open_save_dir(save_dir, proc)             # lock, repair, the checkpoint to resume, or None
    state, manifest = load_checkpoint(resume, file_ext)
    path = save_dir.save(path, write_files, manifest, reason)  # main process: write, link, prune
    save_dir.close(failed=False)

A checkpoint is a folder <prefix>-epoch<E>-step<S> in ckpt.model_state_save_dir holding
- the model and tokenizer as save_pretrained writes them, so plain transformers loads the folder;
- training_state<file_ext>: tensors and plain numbers only (optimizer, schedule, scaler, RNG and
  logging window of every rank), read back with torch.load(weights_only=True);
- checkpoint.json, written last: the config, the position in the data, the best validation so far,
  a content hash of every data file, and the size of every other file in the folder.
A folder is ours only if its checkpoint.json says this trainer wrote it, and complete only if every
file it lists has the listed size. Nothing else in the save folder is ever deleted or replaced,
and the `last` / `best` links are replaced only when they point at one of our folders.

Crash safety follows files.py's rule (files fsynced, the folder renamed into place, the parent
fsynced): a kill or a power loss at any instruction leaves the previous checkpoints or the new one.
The names a run writes under carry its session id, so two runs can never share a temporary name
(and the folder's lock refuses the second run anyway).
"""
import errno
import json
import math
import os
import pickle
import re
import secrets
import shutil
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import SafetensorError

from config import GOLDEN_CONFIG, Config, ConfigError, check_config, config_options, read_yaml, set_key, uses_amp
from files import LOCK, FolderLock, OutputError, check_writable_dir, file_digest, first_line, fsync_path, publish, sync_folder
from processes import agree, on_main

MANIFEST = "checkpoint.json"
WRITTEN_BY = "trainer.py checkpoint"  # what marks a folder as ours
LINKS = ("last", "best")
# written first into a .replaced-<session> folder: what proves the folder is ours
ASIDE_MARK = ".moved-aside.json"
# checkpoint.json's fields that a resume reads, and their types
MANIFEST_FIELDS = {"step": int, "epoch": int, "batch_in_epoch": int, "bad_validations": int, "world_size": int,
                   "session": str, "run_dir": str, "best": (dict, type(None)), "config": dict, "data": dict,
                   "files": dict}


class CheckpointError(OutputError):
    """A checkpoint or save folder that cannot be used as asked, reported as one line."""


def checkpoint_name(prefix, epoch, step):
    return f"{prefix}-epoch{epoch}-step{step}"


def checkpoint_path(ckpt_cfg, epoch, step):
    """The folder of the checkpoint of a step (epoch: the one the step belongs to, from 1)."""
    return Path(ckpt_cfg["model_state_save_dir"]) / checkpoint_name(ckpt_cfg["file_prefix"], epoch, step)


def name_pattern(prefix):
    """The regular expression of checkpoint_name's names, the step as its second group."""
    return rf"{re.escape(prefix)}-epoch(\d+)-step(\d+)"


def load_failure(error):
    """Why torch.load(weights_only=True) refused a file, in one line: torch's own text for a pickle
    that would build other objects advises weights_only=False, which would run its code."""
    if isinstance(error, pickle.UnpicklingError) or "weights_only" in str(error):
        return "it is not tensors and plain data alone: damaged, or holding objects that could run code"
    return f"truncated or not a torch file: {first_line(error)[:200]}"


# ---------------------------------------------------------------------------------------------
# what is ours, and what is complete


def read_manifest(path):
    """The manifest of a checkpoint folder we wrote, or None for anything else."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("written_by") == WRITTEN_BY else None


def incomplete_reason(path, manifest):
    """Why a folder of ours cannot be resumed from (a missing or truncated file), or None."""
    for name, size in manifest.get("files", {}).items():
        file = Path(path) / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} is {file.stat().st_size} bytes, {size} were written (truncated?)"
    return None


def our_checkpoints(save_dir, prefix):
    """[(step, path, manifest)] of the checkpoint folders we wrote in save_dir, oldest first."""
    found = []
    if Path(save_dir).is_dir():
        for path in Path(save_dir).iterdir():
            match = re.fullmatch(name_pattern(prefix), path.name)
            manifest = read_manifest(path) if match and path.is_dir() and not path.is_symlink() else None
            if manifest is not None:
                found.append((int(match.group(2)), path, manifest))
    return sorted(found, key=lambda item: item[0])


def foreign_lookalikes(save_dir, prefix, ours):
    """Folders named like our checkpoints (ours: our_checkpoints' list) that we did not write:
    never candidates, never touched."""
    names = {path.name for _, path, _ in ours}
    return sorted(p.name for p in Path(save_dir).iterdir()
                  if re.fullmatch(name_pattern(prefix), p.name) and p.name not in names)


def our_link(save_dir, name, prefix):
    """True if save_dir/name is absent or a link we made (to a checkpoint name of ours)."""
    link = Path(save_dir) / name
    if not link.is_symlink():
        return not link.exists()
    return re.fullmatch(name_pattern(prefix), os.readlink(link)) is not None


# ---------------------------------------------------------------------------------------------
# reading


def load_checkpoint(path, file_ext):
    """(training state, manifest) of a complete checkpoint of ours; CheckpointError otherwise.

    weights_only=True: the unpickler builds tensors and plain containers only, so a planted file
    whose pickle would call a function is refused instead of run.
    """
    path = Path(path)
    manifest = read_manifest(path)
    if manifest is None:
        raise CheckpointError(f"{path}: not a checkpoint written by this trainer (no valid {MANIFEST})")
    check_manifest(path, manifest)
    reason = incomplete_reason(path, manifest)
    if reason is not None:
        raise CheckpointError(f"{path}: incomplete checkpoint: {reason}")
    state_file = path / f"training_state{file_ext}"
    written = [name for name in manifest["files"] if name.startswith("training_state")]
    if state_file.name not in manifest["files"] and written:  # a ckpt.file_ext other than the run's
        ext = written[0].removeprefix("training_state")
        raise CheckpointError(f"{path}: holds {written[0]}, not {state_file.name}; pass --ckpt.file_ext "
                              f"{ext or repr('')} as the run that wrote it did")
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as e:  # an unpickling refusal, a torn file, a wrong format: all mean "not usable"
        raise CheckpointError(f"{path}: training_state{file_ext} does not load as data ({load_failure(e)})") from None
    return state, manifest


def check_manifest(path, manifest):
    """CheckpointError unless every field of a checkpoint.json of ours that a resume reads has the
    type and range this trainer writes (a damaged or edited file), its config included."""
    file = Path(path) / MANIFEST

    def bad(what):
        return CheckpointError(f"{file}: {what}, not as this trainer writes it (damaged or edited?); "
                               f"resume from another checkpoint, or start a new run from its weights "
                               f"with --model.model_path {path}")
    for name, types in MANIFEST_FIELDS.items():
        value = manifest.get(name)
        if name not in manifest:
            raise bad(f"no {name}")
        least = 1 if name == "world_size" else 0
        if not isinstance(value, types) or isinstance(value, bool) or (types is int and value < least):
            raise bad(f"{name} is {value!r}"[:300])
    if not all(isinstance(name, str) and "/" not in name and name not in (".", "..") and type(size) is int
               and size >= 0 for name, size in manifest["files"].items()):
        raise bad("its list of files is not names and sizes")
    if not all(isinstance(digests, list) and all(d is None or isinstance(d, str) for d in digests)
               for digests in manifest["data"].values()):
        raise bad("its data hashes are not lists of hashes")
    best = manifest["best"]
    if best is not None and not (isinstance(best.get("value"), (int, float)) and math.isfinite(best["value"])
                                 and type(best.get("step")) is int and isinstance(best.get("metrics"), dict)
                                 and isinstance(best.get("path"), (str, type(None)))):
        raise bad(f"best is {best!r}"[:300])
    check_saved_config(path, manifest["config"])


def check_saved_config(path, saved):
    """The config in a checkpoint.json, validated as load_config validates a config file: every
    key config.yaml knows must have its type, a choice among its choices, and the whole must pass
    check_config. Keys config.yaml no longer has are left out (they steer nothing now)."""
    file, cfg = Path(path) / MANIFEST, Config(read_yaml(GOLDEN_CONFIG))
    if not isinstance(saved, dict) or not all(isinstance(values, dict) for values in saved.values()):
        raise CheckpointError(f"{file}: config is not sections of keys (damaged or edited?); use another checkpoint")
    try:
        for section, values in saved.items():
            for name, value in values.items():
                if name in cfg.get(section, {}):
                    set_key(cfg, f"{section}.{name}", value, f"{file}: config")
        check_config(cfg)
    except ConfigError as e:
        message = str(e) if str(e).startswith(str(file)) else f"{file}: config: {e}"
        raise CheckpointError(f"{message} (damaged or edited?); use another checkpoint") from None


# ---------------------------------------------------------------------------------------------
# writing


def write_checkpoint(save_dir, name, session, write_files, manifest):
    """Write save_dir/name atomically: files into a temporary folder, fsync, manifest, rename.

    write_files(folder) writes the model and the training state. An existing folder of that name is
    replaced only if it is ours (a stale checkpoint of an earlier launch, or this launch's from
    before the validation of its step); a full disk or any other write error removes the temporary
    folder and raises CheckpointError.
    """
    save_dir = Path(save_dir)
    final, tmp = save_dir / name, save_dir / f".tmp-{name}-{session}"
    if final.exists() and read_manifest(final) is None:
        raise CheckpointError(f"{final} exists and was not written by this trainer; move it away "
                              f"or choose another ckpt.model_state_save_dir")
    try:
        tmp.mkdir()
        write_files(tmp)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({**manifest, "written_by": WRITTEN_BY, "session": session,
                                                "files": files}, indent=1, default=str), encoding="utf-8")
        sync_folder(tmp)
        if final.exists():  # a stale folder of ours with this name: aside, then gone once replaced
            stale = save_dir / f".tmp-stale-{name}-{session}"
            os.rename(final, stale)
            publish(tmp, final)
            shutil.rmtree(stale)
        else:
            publish(tmp, final)
    except (OSError, RuntimeError, SafetensorError) as e:  # what torch.save and safetensors raise on a full disk
        # neither says why: under 1 MiB left, before the partial files go, is a full disk
        full = e.errno == errno.ENOSPC if isinstance(e, OSError) else shutil.disk_usage(save_dir).free < 2**20
        shutil.rmtree(tmp, ignore_errors=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)[:200]
        raise CheckpointError(f"cannot write checkpoint {final}: {reason}{' (the disk is full)' * full}; "
                              f"free space or choose another ckpt.model_state_save_dir") from e
    return final


def point_link(save_dir, name, target):
    """Atomically make save_dir/name a relative link to the checkpoint folder target."""
    tmp = Path(save_dir) / f".{name}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(Path(target).name, target_is_directory=True)
    try:
        os.replace(tmp, Path(save_dir) / name)
    except OSError as e:  # a folder made in its place while the run went on: never replaced
        tmp.unlink()
        raise CheckpointError(f"cannot point {Path(save_dir) / name} at {Path(target).name} ({e.strerror}); "
                              f"move {Path(save_dir) / name} away, then resume with --ckpt.resume auto") from None


def prune(save_dir, prefix, keep_last, protected):
    """Delete our checkpoints beyond the newest keep_last, except the protected paths."""
    protected = {Path(p).resolve() for p in protected if p is not None}
    for _, path, _ in our_checkpoints(save_dir, prefix)[:-keep_last]:
        if path.resolve() not in protected:
            delete_checkpoint(path)


def delete_checkpoint(path):
    """Rename a checkpoint of ours to .pruning-<name>-<random>, then delete it, its checkpoint.json
    last: a kill midway frees its name at once and leaves a folder that still proves it ours, for
    recover to finish (a half-deleted folder under its own name would be "not ours" for ever)."""
    aside = path.with_name(f".pruning-{path.name}-{secrets.token_hex(4)}")
    os.rename(path, aside)
    remove_tree(aside, last=MANIFEST)


def remove_tree(path, last):
    """shutil.rmtree of a folder of ours whose file `last` proves it ours: that file goes last."""
    for item in Path(path).iterdir():
        if item.name == last:
            continue
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item)
        else:
            item.unlink()
    (Path(path) / last).unlink(missing_ok=True)
    Path(path).rmdir()


# ---------------------------------------------------------------------------------------------
# one run per folder, and what a killed run leaves behind


def move_aside(save_dir, paths, session):
    """Move our checkpoint folders (and links to them) into .replaced-<session>, to be deleted
    once the new run has written a checkpoint, or put back if it fails first."""
    aside = Path(save_dir) / f".replaced-{session}"
    aside.mkdir()
    with open(aside / ASIDE_MARK, "x", encoding="utf-8") as f:  # first: what proves the folder ours
        f.write(json.dumps({"written_by": WRITTEN_BY, "session": session}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    for name in LINKS:
        link = Path(save_dir) / name
        if link.is_symlink() and (Path(save_dir) / os.readlink(link)) in set(map(Path, paths)):
            os.rename(link, aside / name)
    for path in paths:
        os.rename(path, aside / Path(path).name)
    fsync_path(save_dir)
    return aside


def restore_aside(save_dir, aside):
    """Put moved-aside checkpoints back (the run that replaced them wrote none). One whose name is
    taken again stays in the aside folder, which is then kept; returns those names."""
    kept = []
    for path in sorted(Path(aside).iterdir()):
        if path.name == ASIDE_MARK:
            continue
        if not (Path(save_dir) / path.name).exists() and not (Path(save_dir) / path.name).is_symlink():
            os.rename(path, Path(save_dir) / path.name)
        else:
            kept.append(path.name)
    if not kept:
        remove_tree(aside, last=ASIDE_MARK)
    return kept


def moved_aside_by_us(path):
    """True if path is a .replaced-<session> folder that move_aside made (its mark says so)."""
    mark = Path(path) / ASIDE_MARK
    try:
        content = json.loads(mark.read_text(encoding="utf-8")) if not mark.is_symlink() else None
    except (OSError, ValueError):
        return False
    return isinstance(content, dict) and content.get("written_by") == WRITTEN_BY and \
        f".replaced-{content.get('session')}" == Path(path).name


def recover(save_dir, prefix):
    """Holding the lock, finish what killed runs left: remove their temporary folders, finish
    deleting the checkpoints they were pruning, and for each .replaced-<session> folder of ours,
    delete it if that session wrote a checkpoint, else restore it. A folder named like ours that
    does not prove it is ours (its mark, its checkpoint.json) is left alone.
    Returns one message per thing done."""
    save_dir, messages = Path(save_dir), []
    sessions = {manifest.get("session") for _, _, manifest in our_checkpoints(save_dir, prefix)}
    tmp_pattern = rf"\.tmp-(stale-)?{name_pattern(prefix)}-[\w-]+"  # write_checkpoint's temporary names
    for path in sorted(save_dir.iterdir()):
        if not path.is_dir() or path.is_symlink():
            continue
        if re.fullmatch(tmp_pattern, path.name):
            shutil.rmtree(path)
            messages.append(f"removed {path.name}, a checkpoint write that an earlier run did not finish")
        elif re.fullmatch(rf"\.pruning-{name_pattern(prefix)}-[0-9a-f]+", path.name):
            if read_manifest(path) is not None:
                remove_tree(path, last=MANIFEST)
            elif not any(path.iterdir()):  # killed after its checkpoint.json went: nothing left to prove
                path.rmdir()
            else:
                messages.append(f"left {path.name} alone: named like a checkpoint being deleted, but not one of ours")
                continue
            messages.append(f"finished deleting {path.name}, a checkpoint an earlier run was pruning")
        elif path.name.startswith(".replaced-"):
            if not moved_aside_by_us(path):
                messages.append(f"left {path.name} alone: named like checkpoints moved aside, but without "
                                f"this trainer's mark ({ASIDE_MARK})")
            elif path.name.removeprefix(".replaced-") in sessions:
                remove_tree(path, last=ASIDE_MARK)
            else:
                kept = restore_aside(save_dir, path)
                messages.append(f"restored the checkpoints that an interrupted run had moved aside ({path.name})"
                                + f"; {', '.join(kept)} stay there: those names are taken again" * bool(kept))
    return messages


# ---------------------------------------------------------------------------------------------
# resume: which checkpoint, and what may differ


# keys a resumed run may change: they steer logging, checkpoint cadence, threads, debugging or the
# predictions written at the end, never the arithmetic of training
RESUME_MAY_CHANGE = {"trainer.log_steps", "trainer.log_dir", "trainer.num_threads", "trainer.debug",
                     "ckpt.checkpoint", "ckpt.period", "ckpt.save_steps", "ckpt.keep_last",
                     "ckpt.resume", "ckpt.overwrite", "data.predict_filepath", "data.predict_output",
                     "data.cache_dir", "trainer.stop_after_epochs", "data.abstain_below", "model.artifact"}
# how the processes were started may be said another way (auto, or sp / ddp): the world
# size is compared on its own, and the precision through uses_amp
LAUNCH_KEYS = {"trainer.backend", "trainer.amp"}
# data files are compared by content (a moved file is the same data; an edited one is not)
DATA_FILE_KEYS = ("data.train_filepath", "data.val_filepath", "distill.unlabeled_filepaths")


def data_digests(cfg):
    """{key: [content hash of each file]} of every data file that training reads."""
    digests = {}
    for key in DATA_FILE_KEYS:
        section, name = key.split(".")
        paths = cfg[section][name] if isinstance(cfg[section][name], list) else [cfg[section][name]]
        digests[key] = [None if p is None else file_digest(p) for p in paths]
    return digests


def resume_conflicts(saved_cfg, saved_digests, cfg, digests):
    """'key old -> new' for every difference between a checkpoint's run and this one that would
    make the resumed run silently different from continuing the original."""
    conflicts, golden = [], read_yaml(GOLDEN_CONFIG)
    for section, values in cfg.items():
        if section in ("sweep", "check", "crossval"):  # the tools' settings do not change a run; older checkpoints lack them
            continue
        for name, value in values.items():
            # a key newer than the checkpoint: its run behaved as the key's default says
            key, old = f"{section}.{name}", saved_cfg.get(section, {}).get(name, golden.get(section, {}).get(name))
            # export.py's and serve.py's keys never reach training
            if key in RESUME_MAY_CHANGE or key in DATA_FILE_KEYS or key in LAUNCH_KEYS or section in ("export", "serve") \
                    or old == value:
                continue
            if key == "trainer.epochs" and value > old:
                continue  # a finished run can be extended
            conflicts.append(f"{key} {old!r} -> {value!r}" + (" (may only grow)" if key == "trainer.epochs" else ""))
    if uses_amp(saved_cfg.get("trainer", {"backend": "sp"})) != uses_amp(cfg["trainer"]):
        conflicts.append(f"mixed precision {'on' if uses_amp(saved_cfg['trainer']) else 'off'} -> "
                         f"{'on' if uses_amp(cfg['trainer']) else 'off'} (trainer.amp / trainer.backend)")
    for key in DATA_FILE_KEYS:
        if saved_digests.get(key) != digests[key]:
            section, name = key.split(".")
            trained_on = saved_cfg.get(section, {}).get(name)
            conflicts.append(f"{key}: the file's content differs from the one the checkpoint trained on "
                             f"({'none' if trained_on in (None, []) else trained_on})")
    return conflicts


def own_command(manifest, world_size):
    """The command that resumes a checkpoint with its own settings: its config as options over
    config.yaml's, launched as this run is (a checkpoint's run.json exists only once its run ended)."""
    from runlog import kind_of, resume_command, script_name  # runlog reads checkpoints: not at the top
    options = config_options(manifest["config"], leave_out=("export", "serve", "sweep", "ckpt.resume", "ckpt.overwrite"))
    launch = SimpleNamespace(ddp=world_size > 1, world_size=world_size)  # what resume_command reads of a Process
    return resume_command(options, script_name(kind_of(manifest["run_dir"]) != "distil"), launch)


class SaveDir:
    """ckpt.model_state_save_dir for the life of one run. Every rank holds one; the main process
    alone opens it (its lock, the data files' hashes, the checkpoint to resume from), saves into
    it, and keeps the old checkpoints moved aside until this run has one of its own."""

    def __init__(self, cfg, session, say):
        self.cfg, self.ckpt, self.session, self.say = cfg, cfg["ckpt"], session, say
        self.path, self.prefix = Path(self.ckpt["model_state_save_dir"]), self.ckpt["file_prefix"]
        self.lock, self.aside, self.digests = None, None, None

    def open(self, world_size):
        """Check and lock the folder, repair what a killed run left, apply the overwrite and
        resume rules. Returns the checkpoint to resume from, or None for a fresh run."""
        self.digests = data_digests(self.cfg)
        check_writable_dir(self.path, "ckpt.model_state_save_dir")
        self.lock = FolderLock(self.path, self.session, "ckpt.model_state_save_dir")
        for message in recover(self.path, self.prefix):
            self.say(f"note: {message}")
        for name in LINKS:
            if not our_link(self.path, name, self.prefix):
                raise CheckpointError(f"{self.path / name} was not made by this trainer, which keeps its "
                                      f"`{name}` link there; move it away or choose another "
                                      f"ckpt.model_state_save_dir")
        ours = our_checkpoints(self.path, self.prefix)
        foreign = foreign_lookalikes(self.path, self.prefix, ours)
        if foreign:
            self.say(f"note: ignoring {', '.join(foreign)} in {self.path}: not written by this trainer")
        if self.ckpt["resume"] is None:
            if ours and not self.ckpt["overwrite"]:
                raise CheckpointError(f"{self.path} already holds checkpoints ({ours[-1][1].name}); resume "
                                      f"with --ckpt.resume auto, choose another --ckpt.model_state_save_dir, "
                                      f"or pass --ckpt.overwrite true to replace them")
            self.move_aside([path for _, path, _ in ours], "replaced by this run")
            return None
        chosen = self.resume_candidate(ours)
        if chosen is None:  # auto, and none of ours loads: a fresh run only if told to replace them
            self.move_aside([path for _, path, _ in ours], "that do not load")
            return None
        path, manifest = chosen
        if manifest["world_size"] != world_size:
            raise CheckpointError(f"{path} was written by {manifest['world_size']} processes; resume it "
                                  f"with the same number (this run has {world_size})")
        conflicts = resume_conflicts(self.as_saved_here(path, manifest["config"]), manifest["data"], self.cfg,
                                     self.digests)
        if conflicts:
            raise CheckpointError(f"cannot resume {path}: {'; '.join(conflicts)}. Resume with the "
                                  f"checkpoint's settings: {own_command(manifest, world_size)}; or start a "
                                  f"new run from its weights with --model.model_path {path}")
        newer = [p for step, p, _ in ours if step > manifest["step"] and p.resolve() != path.resolve()]
        if newer and self.ckpt["resume"] != "auto" and not self.ckpt["overwrite"]:
            raise CheckpointError(f"{self.path} holds checkpoints newer than {path.name} "
                                  f"({', '.join(p.name for p in newer)}); resume the newest (--ckpt.resume "
                                  f"auto), or pass --ckpt.overwrite true to replace them with this run's")
        self.move_aside(newer, "newer than the one resumed")  # with auto: those that did not load
        return path

    def save(self, path, write_files, manifest, reason):
        """Main process: the checkpoint folder path (checkpoint_path of manifest's step), written by
        write_files(folder) (the model and training state) and the manifest; `last` (and, for reason
        "best", `best`) pointed at it; our old ones pruned to ckpt.keep_last, the best kept.

        A step this launch saved already at the same position (validation saved it) is not written
        again; one saved just before the epoch's closing validation (ckpt.save_steps) is, so that it
        holds that validation's best. reason (period, best, stop) is said beside the path.
        """
        path = Path(path)
        existing = read_manifest(path)
        position = (manifest["epoch"], manifest["batch_in_epoch"])
        if existing is None or existing.get("session") != self.session or \
                (existing["epoch"], existing["batch_in_epoch"]) != position:
            write_checkpoint(self.path, path.name, self.session, write_files,
                             {**manifest, "config": self.cfg, "data": self.digests})
            self.say(f"checkpoint: {path}" + (f" ({reason})" if reason != "period" else ""))
        point_link(self.path, "last", path)
        if reason == "best":
            point_link(self.path, "best", path)
        if self.ckpt["keep_last"] is not None:
            prune(self.path, self.prefix, self.ckpt["keep_last"], [manifest["best"] and manifest["best"]["path"], path])
        self.wrote_checkpoint()  # this run has a checkpoint of its own: what it replaces can go
        return path

    def as_saved_here(self, path, saved_cfg):
        """The checkpoint's config, its save folder this run's when the checkpoint is in it: the
        folder is compared by what it is, not by how it is spelled (./ck, an absolute path) or
        where it was when the checkpoint was written (a folder moved since)."""
        if not path.parent.is_dir() or not os.path.samefile(path.parent, self.path):
            return saved_cfg
        return {**saved_cfg, "ckpt": {**saved_cfg.get("ckpt", {}), "model_state_save_dir": self.ckpt["model_state_save_dir"]}}

    def resume_candidate(self, ours):
        """(path, manifest) of ckpt.resume: the newest of ours that loads for auto. None when there
        is none (a fresh run); when none of them loads, a CheckpointError naming them, unless
        ckpt.overwrite lets a fresh run replace them."""
        if self.ckpt["resume"] != "auto":
            path = Path(self.ckpt["resume"])
            return path, load_checkpoint(path, self.ckpt["file_ext"])[1]
        failures = []
        for _, path, _ in reversed(ours):
            try:
                manifest = load_checkpoint(path, self.ckpt["file_ext"])[1]
            except CheckpointError as e:
                failures.append((path, str(e).removeprefix(f"{path}: ")))
                continue
            for skipped, why in failures:
                self.say(f"note: skipping {skipped.name}: {why}")
            return path, manifest
        if failures and not self.ckpt["overwrite"]:
            # starting afresh would delete them at the first save: a wrong ckpt.file_ext must not cost them
            reasons = "; ".join(f"{path.name}: {why[:200]}" for path, why in failures[:3])
            raise CheckpointError(f"--ckpt.resume auto: none of the {len(failures)} checkpoints in {self.path} loads "
                                  f"({reasons}{'; ...' * (len(failures) > 3)}); fix what stops them, or pass "
                                  f"--ckpt.overwrite true to start a new run that replaces them")
        return None

    def move_aside(self, paths, why):
        if paths:
            self.aside = move_aside(self.path, paths, self.session)
            self.say(f"note: moved {len(paths)} checkpoints {why} to {self.aside}; they are deleted once "
                     f"this run has written a checkpoint, and put back if it fails first")

    def wrote_checkpoint(self):
        """This run has a checkpoint of its own: what it replaces can go."""
        if self.aside is not None:
            remove_tree(self.aside, last=ASIDE_MARK)
            self.aside = None

    def close(self, failed):
        """A failed run puts back what it moved aside; then the lock is released."""
        if self.aside is not None and failed:
            kept = restore_aside(self.path, self.aside)
            if kept:
                self.say(f"note: {', '.join(kept)} stay in {self.aside}: those names are taken again")
            self.aside = None
        self.wrote_checkpoint()  # finished without a checkpoint (ckpt.checkpoint false): replaced all the same
        if self.lock is not None:
            self.lock.release()


def open_save_dir(save_dir, proc):
    """Before step 1, on every rank: rank 0 opens the SaveDir (lock, repairs, the checkpoint to
    resume from) and every rank checks that it sees rank 0's folder. The checkpoint, or None."""
    try:
        resume, main_session = on_main(proc, lambda: (save_dir.open(proc.world_size), save_dir.session))
        if proc.ddp:
            check_shared_save_dir(save_dir.cfg, proc, main_session)
    except BaseException:
        save_dir.close(failed=True)  # rank 0 releases the lock it took
        raise
    return None if resume is None else str(resume)


def check_shared_save_dir(cfg, proc, main_session):
    """Every rank reads the checkpoints rank 0 writes (to resume, and the best at the end): on
    several machines the save folder must be one they share. Refuse before step 1 if not."""
    if not agree(proc, sees_lock_of(cfg["ckpt"]["model_state_save_dir"], main_session), "min"):
        raise ConfigError(f"ckpt.model_state_save_dir {cfg['ckpt']['model_state_save_dir']} is not "
                          f"shared by every machine of the run (some rank does not see rank 0's files); "
                          f"put it on a filesystem all machines share")


def sees_lock_of(save_dir, session):
    """True if this machine sees the lock that the main process wrote for its run (the session):
    the save folder is shared, as runs on several machines need it to be."""
    try:
        return f"run {session}" in (Path(save_dir) / LOCK).read_text(encoding="utf-8")
    except OSError:
        return False
