"""Token cache: a data file's token ids and labels kept on disk, for later runs and for the other ranks of a machine.

Usage:
    encoded = mapped(cache_folder(cfg), tokenizer, path, cfg["data"], max_seq_len, labelled, proc)  # a hit, or None
    encoded = cached_encode(cache_folder(cfg), tokenizer, examples, cfg["data"], max_seq_len, proc, say)

An entry is a folder <data.cache_dir>/<key>. The key is the sha256 of everything the arrays follow
from: the file's bytes, the tokenizer (its serialized state), max_seq_len, the data options that pick
and split the texts (columns, format, header, encoding, quoting, windows, max_rows) and, for a labelled file,
those that read its labels (label column, labels_list, multi_label, label_sep). It holds ids.npy,
offsets.npy, labels.npy (token_type_ids.npy and documents.npy where there are any) and
manifest.json, naming each array's dtype, shape and size. Later runs open the arrays with
np.load(mmap_mode="r"): pages are read as batches touch them, and every process that maps them
shares one copy.

A hit is not read again: the file's checks (labels, empty texts, ragged rows, each naming its file
and line) passed when the entry was built, and they follow from the same bytes and options as the
key. So a second run on a file only hashes it. A file without an entry is read, checked and
tokenized, and its entry written.

An entry is written into a temporary folder beside it, every file fsynced, the manifest last, and
renamed onto its name only when complete: a crash never leaves half an entry. An entry that does
not match its manifest (a torn or truncated file, a missing manifest, another layout version), or
whose values no tokenizing gives (ids past the vocabulary, labels out of range, offsets that go
back: checked on every hit, vectorised), is rebuilt with a one-line note. The cache deletes only
the files it writes itself, and follows no link: an entry that is a link is refused. A temporary
folder whose builder was killed is removed at the next start: its .building file, written first
and locked while the builder lives, proves it ours and its builder gone.

Under DDP every rank looks for the entry and the run uses it only if all of them find it (else they
would part ways at the build's barrier). The process of local rank 0 builds an entry while the
others of its machine wait for it (up to WAIT_SECONDS, or until local rank 0 leaves a note that it
failed), then every rank maps it.
"""
import hashlib
import json
import os
import time
import uuid
from pathlib import Path

import numpy as np
import torch.distributed as dist

from data import DataError, Encoded, encode, window_stride
from files import abandoned, file_digest, fsync_path, sync_folder, writing_mark
from processes import agree

VERSION = 2  # of the layout below: an entry of another version is rebuilt
ARRAYS = ["ids", "offsets", "token_type_ids", "documents", "labels"]
ENTRY_FILES = [f"{name}.npy" for name in ARRAYS] + ["manifest.json"]
BUILDING, BUILDING_TEXT = ".building", "token cache entry being written by pid"  # in a temporary folder only
# data options that change which texts a row gives, and so its ids
KEY_OPTIONS = ["text_a_col", "text_b_col", "file_format", "header", "encoding", "quoting", "long_texts", "window_stride"]
# and those that change a labelled file's labels
LABEL_OPTIONS = ["label_col", "labels_list", "multi_label", "label_sep"]
# a big file takes long to tokenize on one process; the other ranks wait this long for it
WAIT_SECONDS = 2 * 60 * 60
POLL_SECONDS = 0.5


def cache_folder(cfg):
    """data.cache_dir as a path: auto = .token_cache beside trainer.log_dir (runs -> .token_cache:
    not inside it, whose folders are runs); None = no cache."""
    folder = cfg["data"]["cache_dir"]
    if folder == "auto":
        return Path(cfg["trainer"]["log_dir"]).parent / ".token_cache"
    return None if folder is None else Path(folder)


def tokenizer_state(tokenizer):
    """What a tokenizer's ids follow from, as text: a fast tokenizer's serialized state, else the
    vocabulary and settings of a Python one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        # each call sets these to its own arguments: they say nothing about the tokenizer
        state.pop("truncation", None)
        state.pop("padding", None)
    else:
        state = {"vocab": sorted(tokenizer.get_vocab().items()), "settings": tokenizer.init_kwargs}
    state["class"], state["truncation_side"] = type(tokenizer).__name__, tokenizer.truncation_side
    return json.dumps(state, sort_keys=True, default=str)


def cache_key(path, tokenizer, data_cfg, max_seq_len, labelled):
    """(key, what it is made of): the sha256 of the file's bytes, the tokenizer, max_seq_len and
    the options that change the ids (and, labelled, the labels)."""
    options = KEY_OPTIONS + (LABEL_OPTIONS if labelled else [])
    source = {"version": VERSION, "file_sha256": file_digest(path), "max_seq_len": max_seq_len,
              "tokenizer_sha256": sha256_text(tokenizer_state(tokenizer)), "labelled": labelled,
              "options": {name: data_cfg[name] for name in options}}
    if data_cfg.get("max_rows") is not None:  # the first rows only; absent otherwise, so older keys still hold
        source["options"]["max_rows"] = data_cfg["max_rows"]
    return sha256_text(json.dumps(source, sort_keys=True)), source


def sha256_text(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------
# reading and writing an entry


def open_entry(folder, key, rows=None, limits=None):
    """(Encoded with its labels, None) from a complete entry, or (None, why it cannot be used).
    rows: the file's row count where it was read (an entry of another count is stale); limits: the
    tokenizer's id_limits, which its ids and token types must be under."""
    if folder.is_symlink() or (folder / "manifest.json").is_symlink():
        return None, "a link, which the cache does not follow"
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, "no manifest" if folder.exists() else "absent"
    except (OSError, ValueError) as e:
        return None, f"unreadable manifest ({e})"
    if not isinstance(manifest, dict) or manifest.get("version") != VERSION or manifest.get("key") != key:
        return None, "written by another version"
    if rows is not None and manifest.get("rows") != rows:
        return None, f"{manifest.get('rows')} rows, the file has {rows}"
    # the key is the hash of the source: a source that hashes to it is the one the ids follow from
    if sha256_text(json.dumps(manifest.get("source"), sort_keys=True)) != key:
        return None, "a manifest whose source is not its key"
    try:
        encoded, why = mapped_arrays(folder, manifest)
    except (KeyError, TypeError, AttributeError) as e:  # a manifest edited or damaged by hand
        return None, f"a manifest without its fields ({type(e).__name__}: {e})"
    why = why or out_of_range(encoded, manifest["source"], limits)
    return (None, why) if why else (encoded, None)


def mapped_arrays(folder, manifest):
    """(Encoded, None) of the arrays a manifest names, each checked against it and mapped; or (None, why)."""
    arrays = {}
    for name, spec in manifest["arrays"].items():
        file = folder / f"{name}.npy"
        if file.is_symlink():
            return None, f"{file.name} is a link, which the cache does not follow"
        try:
            if file.stat().st_size != spec["bytes"]:
                return None, f"{file.name} has {file.stat().st_size} bytes, not {spec['bytes']}"
            arrays[name] = np.load(file, mmap_mode="r")
        except (OSError, ValueError) as e:
            return None, f"{file.name} unreadable ({e})"
        if str(arrays[name].dtype) != spec["dtype"] or list(arrays[name].shape) != spec["shape"]:
            return None, f"{file.name} is not the {spec['dtype']} {spec['shape']} array of the manifest"
    encoded = Encoded(arrays.get("ids"), arrays.get("offsets"), arrays.get("token_type_ids"),
                      arrays.get("labels"), arrays.get("documents"))  # documents: windows of the file's rows
    if not fits_together(encoded, manifest["rows"], manifest["source"]["labelled"]):
        return None, "arrays that do not fit together"
    return encoded, None


def fits_together(encoded, rows, labelled):
    """Whether an entry's arrays describe one split of `rows` file rows (labelled: a label each)."""
    ids, offsets, types, labels, documents = (encoded.ids, encoded.offsets, encoded.token_type_ids,
                                              encoded.labels, encoded.documents)
    if ids is None or offsets is None or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(ids):
        return False
    windows = len(offsets) - 1
    return ((types is None or len(types) == len(ids))
            and (labels is not None) == labelled and (labels is None or len(labels) == windows)
            and (windows == rows if documents is None
                 else len(documents) == windows and (not windows or documents[-1] == rows - 1)))


def id_limits(tokenizer):
    """(ids, token types) a tokenizer gives: one more than the largest of each."""
    types = tokenizer("a", "b").get("token_type_ids") or [0]
    return max(tokenizer.get_vocab().values()) + 1, max(types) + 1


def out_of_range(encoded, source, limits):
    """What in an entry's arrays no tokenizing of its file gives (an entry damaged or edited), or
    None: offsets that go back or past max_seq_len, ids or token types past the tokenizer's
    (limits: id_limits, None to leave them unchecked), documents out of order, labels outside
    the task's. Vectorised numpy: one pass over each array."""
    lengths = np.diff(encoded.offsets)
    if len(lengths) and (lengths.min() < 0 or lengths.max() > source["max_seq_len"]):
        return "offsets that go back, or rows longer than max_seq_len"
    for name, array, limit in (("ids", encoded.ids, limits and limits[0]),
                               ("token_type_ids", encoded.token_type_ids, limits and limits[1])):
        if array is not None and len(array) and (array.min() < 0 or (limit is not None and array.max() >= limit)):
            return f"{name} outside the tokenizer's [0, {limit})"
    documents = encoded.documents
    if documents is not None and len(documents) and (documents[0] != 0 or not np.isin(np.diff(documents), (0, 1)).all()):
        return "windows that do not follow their documents in order"
    labels = encoded.labels
    if labels is None or not len(labels):
        return None
    names, multi_label = source["options"]["labels_list"], source["options"]["multi_label"]
    if multi_label:
        ok = labels.ndim == 2 and labels.shape[1] == len(names) and ((labels == 0) | (labels == 1)).all()
    elif len(names) == 1:  # regression
        ok = labels.ndim == 1 and labels.dtype.kind == "f" and np.isfinite(labels).all()
    else:
        ok = labels.ndim == 1 and labels.dtype.kind in "iu" and labels.min() >= 0 and labels.max() < len(names)
    return None if ok else f"labels outside data.labels_list {names}"


def write_entry(folder, key, source, encoded, path, limits=None):
    """Write an entry: into a temporary folder beside it, marked ours while written (files.writing_mark),
    then renamed onto its name when complete."""
    tmp = folder.with_name(f".tmp-{folder.name[:16]}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        with writing_mark(tmp / BUILDING, BUILDING_TEXT):
            arrays = {}
            for name in ARRAYS:
                array = getattr(encoded, name)
                if array is None:
                    continue
                np.save(tmp / f"{name}.npy", np.ascontiguousarray(array))
                arrays[name] = {"dtype": str(array.dtype), "shape": list(array.shape),
                                "bytes": (tmp / f"{name}.npy").stat().st_size}
            manifest = {"version": VERSION, "key": key, "file": str(path), "rows": encoded.num_documents,
                        "source": source, "arrays": arrays}
            # last: it marks the entry complete
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
            (tmp / BUILDING).unlink()  # an entry holds its arrays and manifest only
            sync_folder(tmp)  # files.py's rule: every file synced before the rename
            publish(tmp, folder, key, encoded.num_documents, limits)
            fsync_path(folder.parent)
    except BaseException:
        remove_entry(tmp)
        raise


def publish(tmp, folder, key, rows, limits=None):
    """Rename a complete entry onto its name. The rename fails where an entry is there: one that
    another builder (another machine's local rank 0, on a shared cache folder) just wrote has
    the same ids, so ours is dropped; a torn one is set aside and deleted first."""
    if renamed_onto(tmp, folder):
        return
    if open_entry(folder, key, rows, limits)[0] is None and not folder.is_symlink():
        aside = folder.with_name(f".torn-{folder.name[:16]}-{uuid.uuid4().hex[:8]}")
        os.rename(folder, aside)
        remove_entry(aside)
        if renamed_onto(tmp, folder):
            return
    remove_entry(tmp)


def renamed_onto(tmp, folder):
    """True once tmp is renamed onto folder; False where a folder of that name is in the way."""
    try:
        os.rename(tmp, folder)
        return True
    except OSError:
        if not folder.exists():
            raise
        return False


def remove_entry(folder):
    """Delete an entry folder's files that the cache writes, then the folder; a folder that also
    holds other files (or links) is renamed aside instead (the cache deletes nothing it did not
    write, and never through a link)."""
    if folder.is_symlink():
        return
    for name in ENTRY_FILES + [BUILDING]:
        if (folder / name).is_file() and not (folder / name).is_symlink():
            (folder / name).unlink(missing_ok=True)  # a sweeper may be removing it too
    try:
        folder.rmdir()
    except FileNotFoundError:
        pass
    except OSError:
        folder.rename(folder.with_name(f".aside-{folder.name[:16]}-{uuid.uuid4().hex[:8]}"))


# ---------------------------------------------------------------------------------------------
# one build per machine


def mapped(cache_dir, tokenizer, path, data_cfg, max_seq_len, labelled, proc):
    """A file's Encoded (ids, and labels where labelled) mapped from its complete entry, without
    reading the file, when every rank of the run finds one; else None (the file is read, checked
    and tokenized through cached_encode). A file that cannot be hashed (missing, unreadable) is
    left for reading, which names the problem."""
    encoded = None
    if cache_dir is not None:
        if proc.local_rank == 0:
            sweep(cache_dir, proc.say)
        try:
            key, _ = cache_key(path, tokenizer, data_cfg, max_seq_len, labelled)
        except OSError:
            key = None
        if key is not None:
            encoded, _ = open_entry(Path(cache_dir) / key, key, limits=id_limits(tokenizer))
    # a rank that maps while another builds would wait alone at the build's barrier
    return encoded if agree(proc, encoded is not None, "min") else None


def cached_encode(cache_dir, tokenizer, examples, data_cfg, max_seq_len, proc, say=print):
    """examples' token ids and labels: mapped from the cache, else tokenized and cached by local
    rank 0 while the other ranks of its machine wait. cache_dir None: tokenized here."""
    if cache_dir is None:
        return encode(tokenizer, examples, max_seq_len, progress=proc.is_main, stride=window_stride(data_cfg))
    labelled = examples.labels is not None
    key, source = cache_key(examples.path, tokenizer, data_cfg, max_seq_len, labelled)
    folder, failed = Path(cache_dir) / key, Path(cache_dir) / f"{key}.failed"
    builder, limits = proc.local_rank == 0, id_limits(tokenizer)
    if builder:
        sweep(cache_dir, say)
        failed.unlink(missing_ok=True)  # an earlier run's; ours is written below if we fail
    if proc.ddp:  # no rank looks for a failure note before an old one is gone
        dist.barrier(group=proc.cpu_group)
    if builder:
        try:
            return build(folder, key, source, tokenizer, examples, proc, say)
        except BaseException as e:
            if proc.ddp:
                failed.write_text(f"{type(e).__name__}: {e}\n", encoding="utf-8")
            raise
    return wait_for(folder, failed, key, len(examples.texts_a), proc, limits)


def build(folder, key, source, tokenizer, examples, proc, say):
    """The entry's arrays, tokenizing and writing them unless a complete entry is there; its key's
    source says how (max_seq_len, windows)."""
    limits = id_limits(tokenizer)
    encoded, why = open_entry(folder, key, len(examples.texts_a), limits)
    if encoded is not None:
        return encoded
    if folder.is_symlink():
        raise DataError(f"{folder} is a link, where the token cache keeps an entry; it follows no link out "
                        f"of data.cache_dir: remove the link, or set data.cache_dir to another folder or null")
    if why != "absent":
        say(f"note: token cache {folder} is incomplete or stale ({why}); tokenizing {examples.path} again")
    fresh = encode(tokenizer, examples, source["max_seq_len"], progress=proc.is_main,
                   stride=window_stride(source["options"]))
    try:
        write_entry(folder, key, source, fresh, examples.path, limits)
    except OSError as e:
        raise DataError(f"data.cache_dir {folder.parent}: cannot write the token cache ({e.strerror or e}); "
                        f"give a writable folder, or null for no cache") from None
    encoded, why = open_entry(folder, key, fresh.num_documents, limits)
    if encoded is None:  # another builder is replacing it this moment: the same ids, held here instead
        say(f"note: token cache {folder} changed while it was read back ({why}); this process keeps its own copy")
        return fresh
    return encoded


def wait_for(folder, failed, key, rows, proc, limits=None):
    """The entry local rank 0 builds, once complete: polled, up to WAIT_SECONDS."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        encoded, _ = open_entry(folder, key, rows, limits)
        if encoded is not None:
            return encoded
        if failed.exists():
            raise DataError(f"rank {proc.rank}: local rank 0 failed to build the token cache {folder} "
                            f"({failed.read_text(encoding='utf-8').strip()})")
        if time.monotonic() > deadline:
            raise DataError(f"rank {proc.rank}: waited {WAIT_SECONDS / 3600:g} hours for local rank 0 to "
                            f"build the token cache {folder}; is it still tokenizing, or did it stop?")
        time.sleep(POLL_SECONDS)


# ---------------------------------------------------------------------------------------------
# what killed builders leave


def sweep(cache_dir, say):
    """Remove the temporary folders of builders that were killed while writing an entry: those
    whose .building file this cache wrote (its text) and no process holds locked any more. A
    builder alive (this machine's or another's, on a shared folder) holds its lock; a folder
    without the file is not proved ours and is left alone."""
    try:
        folders = sorted(Path(cache_dir).glob(".tmp-*"))
    except OSError:
        return
    for tmp in folders:
        if abandoned(tmp, BUILDING, BUILDING_TEXT):
            remove_entry(tmp)
            say(f"note: removed {tmp}, a token cache entry that an earlier run did not finish writing")


