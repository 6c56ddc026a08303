"""Checkpoint folders on disk: written atomically, found safely, loaded as data and never as code.

Usage (trainer.py does this; rank 0 alone touches the disk):
    save_dir = SaveDir(cfg, session, say=print)   # locks the folder, repairs what a kill left
    resume = save_dir.open(world_size, digests)   # the checkpoint to resume from, or None
    path = write_checkpoint(save_dir.path, name, session, write_files, manifest)
    save_dir.wrote_checkpoint()                    # old checkpoints moved aside can go now
    state, manifest = load_checkpoint(resume, file_ext)
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

Crash safety: files are fsynced, then the folder is renamed into place and the parent fsynced, so a
kill or a power loss at any instruction leaves either the previous checkpoints or the new one. The
names a run writes under carry its session id, so two runs can never share a temporary name (and
the lock refuses the second run anyway).
"""
import errno
import fcntl
import hashlib
import json
import os
import pickle
import re
import secrets
import shutil
import socket
import time
from pathlib import Path

import torch
from safetensors import SafetensorError

from config import uses_amp

MANIFEST = "checkpoint.json"
WRITTEN_BY = "trainer.py checkpoint"  # what marks a folder as ours
LINKS = ("last", "best")
LOCK = ".lock"


def umask():
    """The process's umask (os.umask can only be read by setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path):
    """Give a file we wrote the mode the umask asks for: safetensors and mkstemp write 0600, which
    a team sharing a checkpoint folder cannot read."""
    os.chmod(path, 0o666 & ~umask())


class CheckpointError(Exception):
    """A checkpoint or save folder that cannot be used as asked, reported as one line."""


def new_session():
    """An id for one launch of a run: its temporary and moved-aside names carry it."""
    return f"{time.strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(4)}"


def checkpoint_name(prefix, epoch, step):
    return f"{prefix}-epoch{epoch}-step{step}"


def name_pattern(prefix):
    """The regular expression of checkpoint_name's names, the step as its second group."""
    return rf"{re.escape(prefix)}-epoch(\d+)-step(\d+)"


def first_line(error):
    """An exception's first line (a library's message may run to many), for our one-line errors;
    its class name where it has no message."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def file_digest(path):
    """sha256 of a file's bytes: resume compares data files by content, not by name."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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
    reason = incomplete_reason(path, manifest)
    if reason is not None:
        raise CheckpointError(f"{path}: incomplete checkpoint: {reason}")
    try:
        state = torch.load(path / f"training_state{file_ext}", map_location="cpu", weights_only=True)
    except Exception as e:  # an unpickling refusal, a torn file, a wrong format: all mean "not usable"
        first = first_line(e)[:200]
        if isinstance(e, pickle.UnpicklingError):  # torch's own line would advise weights_only=False
            first = "it is not tensors and plain data alone: damaged, or holding objects that could run code"
        raise CheckpointError(f"{path}: training_state{file_ext} does not load as data ({first})") from None
    return state, manifest


# ---------------------------------------------------------------------------------------------
# writing


def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        for file in files:
            follow_umask(tmp / file)
            fsync_path(tmp / file)
        (tmp / MANIFEST).write_text(json.dumps({**manifest, "written_by": WRITTEN_BY, "session": session,
                                                "files": files}, indent=1, default=str), encoding="utf-8")
        fsync_path(tmp / MANIFEST)
        fsync_path(tmp)
        if final.exists():  # a stale folder of ours with this name: aside, then gone once replaced
            stale = save_dir / f".tmp-stale-{name}-{session}"
            os.rename(final, stale)
            os.rename(tmp, final)
            shutil.rmtree(stale)
        else:
            os.rename(tmp, final)
        fsync_path(save_dir)
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
    os.replace(tmp, Path(save_dir) / name)


def prune(save_dir, prefix, keep_last, protected):
    """Delete our checkpoints beyond the newest keep_last, except the protected paths."""
    protected = {Path(p).resolve() for p in protected if p is not None}
    for _, path, _ in our_checkpoints(save_dir, prefix)[:-keep_last]:
        if path.resolve() not in protected:
            shutil.rmtree(path)


# ---------------------------------------------------------------------------------------------
# one run per folder, and what a killed run leaves behind


class SaveDirLock:
    """An exclusive flock on save_dir/.lock for the life of a run; a second run is refused."""

    def __init__(self, save_dir, session=""):
        self.path = Path(save_dir) / LOCK
        self.file = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise CheckpointError(f"{save_dir} is in use by another run ({holder}); wait for it to end "
                                  f"or choose another ckpt.model_state_save_dir") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}, run {session}\n")
        self.file.flush()

    def release(self):
        if not self.file.closed:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()


def move_aside(save_dir, paths, session):
    """Move our checkpoint folders (and links to them) into .replaced-<session>, to be deleted
    once the new run has written a checkpoint, or put back if it fails first."""
    aside = Path(save_dir) / f".replaced-{session}"
    aside.mkdir()
    for name in LINKS:
        link = Path(save_dir) / name
        if link.is_symlink() and (Path(save_dir) / os.readlink(link)) in set(map(Path, paths)):
            os.rename(link, aside / name)
    for path in paths:
        os.rename(path, aside / Path(path).name)
    fsync_path(save_dir)
    return aside


def restore_aside(save_dir, aside):
    """Put moved-aside checkpoints back (the run that replaced them wrote none)."""
    for path in sorted(Path(aside).iterdir()):
        if not (Path(save_dir) / path.name).exists() and not (Path(save_dir) / path.name).is_symlink():
            os.rename(path, Path(save_dir) / path.name)
    shutil.rmtree(aside, ignore_errors=True)


def recover(save_dir, prefix):
    """Holding the lock, finish what killed runs left: remove their temporary folders, and for
    each .replaced-<session> folder, delete it if that session wrote a checkpoint, else restore it.
    Returns one message per thing done."""
    save_dir, messages = Path(save_dir), []
    sessions = {manifest.get("session") for _, _, manifest in our_checkpoints(save_dir, prefix)}
    tmp_pattern = rf"\.tmp-(stale-)?{name_pattern(prefix)}-[\w-]+"  # write_checkpoint's temporary names
    for path in sorted(save_dir.iterdir()):
        if re.fullmatch(tmp_pattern, path.name) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
            messages.append(f"removed {path.name}, a checkpoint write that an earlier run did not finish")
        elif path.name.startswith(".replaced-") and path.is_dir() and not path.is_symlink():
            if path.name.removeprefix(".replaced-") in sessions:
                shutil.rmtree(path)
            else:
                restore_aside(save_dir, path)
                messages.append(f"restored the checkpoints that an interrupted run had moved aside ({path.name})")
    return messages


def check_writable_dir(path, key):
    """Create path if needed and prove it takes a file, so a bad location fails before step 1."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{key}: {path} is a file, not a folder; choose a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"{key}: cannot write in {path} ({e.strerror or e}); choose a writable "
                              f"folder") from None


# ---------------------------------------------------------------------------------------------
# resume: which checkpoint, and what may differ


# keys a resumed run may change: they steer logging, checkpoint cadence, threads, debugging or the
# predictions written at the end, never the arithmetic of training
RESUME_MAY_CHANGE = {"trainer.log_steps", "trainer.log_dir", "trainer.num_threads", "trainer.debug",
                     "ckpt.checkpoint", "ckpt.period", "ckpt.save_steps", "ckpt.keep_last",
                     "ckpt.resume", "ckpt.overwrite", "data.predict_filepath", "data.predict_output",
                     "data.cache_dir", "trainer.stop_after_epochs"}
# how the processes were started may be said another way (auto, or the seed's sp / ddp): the world
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
    conflicts = []
    for section, values in cfg.items():
        for name, value in values.items():
            key, old = f"{section}.{name}", saved_cfg.get(section, {}).get(name)
            # export.py's keys never reach training (and checkpoints older than them have none)
            if key in RESUME_MAY_CHANGE or key in DATA_FILE_KEYS or key in LAUNCH_KEYS or section == "export" or old == value:
                continue
            if key == "trainer.epochs" and value > old:
                continue  # a finished run can be extended
            conflicts.append(f"{key} {old!r} -> {value!r}" + (" (may only grow)" if key == "trainer.epochs" else ""))
    if uses_amp(saved_cfg.get("trainer", {"backend": "sp"})) != uses_amp(cfg["trainer"]):
        conflicts.append(f"mixed precision {'on' if uses_amp(saved_cfg['trainer']) else 'off'} -> "
                         f"{'on' if uses_amp(cfg['trainer']) else 'off'} (trainer.amp / trainer.backend)")
    for key in DATA_FILE_KEYS:
        if saved_digests.get(key) != digests[key]:
            conflicts.append(f"{key}: the file's content differs from the one the checkpoint trained on")
    return conflicts


class SaveDir:
    """ckpt.model_state_save_dir for the life of one run, on the main process: its lock, the
    checkpoint to resume from, and the old checkpoints moved aside until this run has one."""

    def __init__(self, cfg, session, say):
        self.cfg, self.ckpt, self.session, self.say = cfg, cfg["ckpt"], session, say
        self.path, self.prefix = Path(self.ckpt["model_state_save_dir"]), self.ckpt["file_prefix"]
        self.lock, self.aside = None, None

    def open(self, world_size, digests):
        """Check and lock the folder, repair what a killed run left, apply the overwrite and
        resume rules. Returns the checkpoint to resume from, or None for a fresh run."""
        check_writable_dir(self.path, "ckpt.model_state_save_dir")
        self.lock = SaveDirLock(self.path, self.session)
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
        if chosen is None:  # auto, and none of ours loads: a fresh run, not mixed with the broken ones
            self.move_aside([path for _, path, _ in ours], "that do not load")
            return None
        path, manifest = chosen
        if manifest["world_size"] != world_size:
            raise CheckpointError(f"{path} was written by {manifest['world_size']} processes; resume it "
                                  f"with the same number (this run has {world_size})")
        conflicts = resume_conflicts(manifest["config"], manifest["data"], self.cfg, digests)
        if conflicts:
            raise CheckpointError(f"cannot resume {path}: {'; '.join(conflicts)}. Resume with the "
                                  f"checkpoint's settings, or start a new run from its weights with "
                                  f"--model.model_path {path}")
        newer = [p for step, p, _ in ours if step > manifest["step"] and p.resolve() != path.resolve()]
        if newer and self.ckpt["resume"] != "auto" and not self.ckpt["overwrite"]:
            raise CheckpointError(f"{self.path} holds checkpoints newer than {path.name} "
                                  f"({', '.join(p.name for p in newer)}); resume the newest (--ckpt.resume "
                                  f"auto), or pass --ckpt.overwrite true to replace them with this run's")
        self.move_aside(newer, "newer than the one resumed")  # with auto: those that did not load
        return path

    def resume_candidate(self, ours):
        """(path, manifest) of ckpt.resume: the newest of ours that loads for auto."""
        if self.ckpt["resume"] != "auto":
            path = Path(self.ckpt["resume"])
            return path, load_checkpoint(path, self.ckpt["file_ext"])[1]
        for _, path, _ in reversed(ours):
            try:
                return path, load_checkpoint(path, self.ckpt["file_ext"])[1]
            except CheckpointError as e:
                self.say(f"note: skipping {path.name}: {e}")
        return None

    def move_aside(self, paths, why):
        if paths:
            self.aside = move_aside(self.path, paths, self.session)
            self.say(f"note: moved {len(paths)} checkpoints {why} to {self.aside}; they are deleted once "
                     f"this run has written a checkpoint, and put back if it fails first")

    def wrote_checkpoint(self):
        """This run has a checkpoint of its own: what it replaces can go."""
        if self.aside is not None:
            shutil.rmtree(self.aside)
            self.aside = None

    def close(self, failed):
        """A failed run puts back what it moved aside; then the lock is released."""
        if self.aside is not None and failed:
            restore_aside(self.path, self.aside)
            self.aside = None
        self.wrote_checkpoint()  # finished without a checkpoint (ckpt.checkpoint false): replaced all the same
        if self.lock is not None:
            self.lock.release()


def sees_lock_of(save_dir, session):
    """True if this machine sees the lock that the main process wrote for its run (the session):
    the save folder is shared, as runs on several machines need it to be."""
    try:
        return f"run {session}" in (Path(save_dir) / LOCK).read_text(encoding="utf-8")
    except OSError:
        return False
