"""Crash-safe writing, for every file and folder the project writes: torch-free, importing nothing of ours.

    with atomic_write(path) as f: f.write(text)        # a small file: the old one or the new, never half
    write_json(path, obj)                               # the same, for JSON
    with atomic_output(path) as f: ...                  # a file of any size (predictions), swept if killed
    with temporary_folder(parent, name, text) as tmp:   # a folder written in full, then renamed into place
        ...; publish_folder(tmp, final)
    lock = FolderLock(folder, session, key)             # one run per folder; lock.release()
    with writing_to("trainer.log_dir", path): ...        # a full disk as one error line naming the key
    writer.writerow(csv_cells(row))                     # a CSV row a spreadsheet opens as text, never as formulas

One rule for durability: every file is fsynced before it is renamed into place, and the folder that
holds the new name is fsynced after, so a kill or a power loss at any instruction leaves the old
version or the new one. A temporary folder carries a mark file, held locked while it is written:
its text proves the folder ours and a lock that can be taken proves its writer gone, so what a
killed writer left is removed at the next start, and nothing else ever is (`abandoned`).
"""
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import stat
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

# atomic_output's folder beside an output, and the mark that proves it ours while it is written
WRITING_PREFIX, WRITING, WRITING_TEXT = ".writing-", ".writing", "output being written by pid"
LOCK = ".lock"
LOCK_LINE = r"pid \d+ on .*, run .*\n?"  # what FolderLock writes in it


class OutputError(Exception):
    """An output that cannot be written where the config says (a log folder, predictions, an
    export, a sweep's folder), reported as one line."""


def first_line(error):
    """An exception's first line (a library's message may run to many), for our one-line errors;
    its class name where it has no message."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def new_session():
    """An id for one launch of a run: the temporary names it writes under carry it."""
    return f"{time.strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(4)}"


def file_digest(path):
    """sha256 of a file's bytes: resume compares data files by content, not by name."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def umask():
    """The process's umask (os.umask can only be read by setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path):
    """Give a file we wrote the mode the umask asks for: safetensors and mkstemp write 0600, which
    a team sharing a checkpoint folder cannot read."""
    os.chmod(path, 0o666 & ~umask())


# ---------------------------------------------------------------------------------------------
# the durability rule: fsync the files, rename, fsync the folder


def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_folder(folder):
    """Give every file of a folder we wrote the umask's mode and fsync it, then the folder itself:
    what must hold before the folder is renamed into place."""
    for path in sorted(Path(folder).iterdir()):
        if path.is_file() and not path.is_symlink():
            follow_umask(path)
            fsync_path(path)
    fsync_path(folder)


def publish(tmp, final):
    """Rename a complete, synced file or folder onto final and make the new name durable."""
    os.replace(tmp, final)
    fsync_path(Path(final).parent)


@contextmanager
def atomic_write(path, newline=None):
    """A text file open for writing under a temporary name of its own beside path, published onto
    path only once complete: a kill or a full disk never leaves half a file there."""
    path = Path(path)
    # beside the name, not beside what a link there points at: the link is replaced, never written through
    fd, tmp = tempfile.mkstemp(dir=path.parent.resolve(), prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline=newline) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        follow_umask(tmp)
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path, obj, indent=2):
    with atomic_write(path) as f:
        f.write(json.dumps(obj, indent=indent, default=str) + "\n")


@contextmanager
def writing_to(key, path):
    """An OSError while writing path (a full disk, a folder gone read-only) as one error line
    naming the key that chose it; what atomic_write / atomic_output were writing is gone."""
    try:
        yield
    except OSError as e:
        full = " (the disk is full)" if e.errno == errno.ENOSPC else ""
        raise OutputError(f"cannot write {path}: {e.strerror or e}{full}; free space or choose another "
                          f"{key}") from None


# ---------------------------------------------------------------------------------------------
# temporary folders: marked ours, locked while written


@contextmanager
def writing_mark(mark, text):
    """The file mark, held locked while its folder is written: its text proves the folder ours,
    and a lock that can be taken proves the writer gone (the kernel drops it when a process dies)."""
    with open(mark, "x", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # before its text: a sweeper that can read the text finds it locked
        f.write(f"{text} {os.getpid()}\n")
        f.flush()
        yield


def abandoned(folder, mark, text):
    """True if folder is a temporary folder of ours (its mark file holds text) whose writer is gone."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return False
    try:
        fd = os.open(folder / mark, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    with os.fdopen(fd, encoding="utf-8", errors="replace") as f:
        if not f.read(200).startswith(text):
            return False
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # its writer is still writing
    return True


@contextmanager
def temporary_folder(parent, name, text):
    """A new folder parent/.<name>-<random>.tmp to write a folder's files in, marked (text) and locked
    while the caller writes; publish_folder renames it into place. A folder not published (an
    error, or the caller's choice) is removed; remove_abandoned clears what a killed writer left."""
    tmp = Path(parent) / f".{name}-{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        with writing_mark(tmp / WRITING, text):
            yield tmp
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp)


def publish_folder(tmp, final):
    """Rename a temporary_folder onto final (which must not exist) once its files are synced. Its
    mark goes last: a kill just before leaves a folder proved ours for remove_abandoned, a kill just
    after an unlocked empty mark inside final, which nothing reads."""
    sync_folder(tmp)
    os.rename(tmp, final)
    (Path(final) / WRITING).unlink()
    fsync_path(final)
    fsync_path(Path(final).parent)


def remove_abandoned(parent, name, text, say):
    """Remove temporary_folder's folders for name that their mark proves ours and whose writer is gone."""
    for tmp in sorted(Path(parent).glob(f".{glob_escape(name)}-*.tmp")):
        if re.fullmatch(rf"\.{re.escape(name)}-[0-9a-f]{{8}}\.tmp", tmp.name) and abandoned(tmp, WRITING, text):
            shutil.rmtree(tmp)
            say(f"note: removed {tmp}, which a killed run left while writing it")


def glob_escape(name):
    """A name as a glob pattern that matches it alone: a * or [ of a user's name is no wildcard."""
    return re.sub(r"([*?\[])", r"[\1]", name)


# ---------------------------------------------------------------------------------------------
# a file of any size, renamed into place when complete


@contextmanager
def atomic_output(path, newline=None):
    """A text file of any size (predictions) open for writing, renamed onto path once complete.
    It is written in a folder of its own beside path, marked and locked while written, so that
    a run killed mid-way leaves a folder the next one can prove ours and sweep (sweep_outputs)."""
    path = Path(path)
    tmp = path.resolve().parent / f"{WRITING_PREFIX}{path.name}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        with writing_mark(tmp / WRITING, WRITING_TEXT):
            with open(tmp / path.name, "x", encoding="utf-8", newline=newline) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            follow_umask(tmp / path.name)
            publish(tmp / path.name, path)
            (tmp / WRITING).unlink()
        tmp.rmdir()
    except BaseException:
        remove_output_folder(tmp, path.name)
        raise


def sweep_outputs(path, say):
    """Remove what killed runs left beside the output path: atomic_output's folders whose mark
    this trainer wrote and no process holds locked any more."""
    path = Path(path)
    for tmp in sorted(path.resolve().parent.glob(f"{WRITING_PREFIX}{glob_escape(path.name)}-*")):
        if abandoned(tmp, WRITING, WRITING_TEXT):
            remove_output_folder(tmp, path.name)
            say(f"note: removed {tmp}, which a killed run left while writing {path}")


def remove_output_folder(tmp, name):
    """atomic_output's folder: its two files (never through a link), then the folder itself."""
    for file in (tmp / name, tmp / WRITING):
        if not file.is_symlink():
            file.unlink(missing_ok=True)
    try:
        tmp.rmdir()
    except OSError:  # something else was put there: not ours to delete
        pass


# ---------------------------------------------------------------------------------------------
# one run per folder


class FolderLock:
    """An exclusive flock on folder/.lock for the life of a run; a second run is refused. key names
    the setting that chose the folder, for the error lines."""

    def __init__(self, folder, session="", key="the folder"):
        self.path = Path(folder) / LOCK
        not_ours = OutputError(f"{self.path} is not a lock file of this trainer (a link, a folder or a file "
                               f"of other content), which it would overwrite; move it away or choose "
                               f"another {key}")
        try:  # O_NOFOLLOW: through a link planted here we would truncate the file it points at
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        except OSError:
            raise not_ours from None
        self.file = os.fdopen(fd, "r+", encoding="utf-8")
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:  # a hard link shares a user's file too
            self.file.close()
            raise not_ours
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise OutputError(f"{folder} is in use by another run ({holder}); wait for it to end "
                              f"or choose another {key}") from None
        self.file.seek(0)
        content = self.file.read(4096)
        if content and not re.fullmatch(LOCK_LINE, content):
            self.release()
            raise not_ours
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}, run {session}\n")
        self.file.flush()

    def release(self):
        if not self.file.closed:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()


# ---------------------------------------------------------------------------------------------
# CSV cells a spreadsheet reads as text

# what makes a spreadsheet read a cell as a formula (OWASP's CSV injection list)
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value):
    """A cell of a CSV we write (predictions, a sweep's results): one that a spreadsheet would run
    as a formula (=cmd(), @SUM, -2+3) gets a leading ', as the usual guidance says; numbers such as
    -0.5 stay numbers."""
    text = "" if value is None else str(value)
    if not text.startswith(FORMULA_STARTS):
        return text
    if text[0] in "+-":
        try:
            float(text)
            return text
        except ValueError:
            pass
    return "'" + text


def csv_cells(row):
    return [csv_cell(value) for value in row]


# ---------------------------------------------------------------------------------------------
# checked before the first step


def check_writable_dir(path, key):
    """Create path if needed and prove it takes a file, so a bad location fails before step 1."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{key}: {path} is a file, not a folder; choose a folder")
    if path.is_symlink() and not path.exists():
        raise OutputError(f"{key}: {path} is a link to {os.readlink(path)}, which does not exist; remove the "
                          f"link or choose another folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"{key}: cannot write in {path} ({e.strerror or e}); choose a writable "
                          f"folder") from None


def check_outputs(cfg, cache_dir):
    """Every folder the run will write in (cache_dir: the token cache's, or None), checked (and
    created) before the first step."""
    if cfg["data"]["train_filepath"]:  # before the token cache is written (the save folder's other rules come later)
        check_writable_dir(cfg["ckpt"]["model_state_save_dir"], "ckpt.model_state_save_dir")
    check_writable_dir(cfg["trainer"]["log_dir"], "trainer.log_dir")
    if cache_dir is not None:
        check_writable_dir(cache_dir, "data.cache_dir")
    if cfg["data"]["predict_filepath"] and cfg["data"]["predict_output"]:
        output = Path(cfg["data"]["predict_output"])
        if output.is_dir():
            raise OutputError(f"data.predict_output: {output} is a folder; name a file")
        check_writable_dir(output.resolve().parent, "data.predict_output")
