"""The run's data files as token ids: every file read and checked first, then tokenized.

    inputs = prepare_run(cfg, proc, build=lambda tokenizer: build_classifier(...))  # what a run starts with
    inputs.train.encoded, inputs.val.encoded                                       # data.Encoded, or None
    split = load_split(cfg, tokenizer, path)                                       # one file, no cache (tools)
    weights = class_weights(cfg, inputs.train, device)                             # module.class_weights

One name per step of a file: read_split (its rows, read and checked, or its ids from the token
cache), tokenize (a Split: its token ids), training_split (windows capped), load_split (the first
two in this process, for tools). prepare_run is the set-up that training and distillation share,
in the order that writes nothing until everything is checked: the files (a bad row stops the run
before a model is loaded), the models, the output folders, and only then tokenization, whose
token cache (cache.py) is the run's first write. Reading and tokenizing themselves are data.py's.
"""
from dataclasses import dataclass

import numpy as np
import torch

from cache import cache_folder, cached_encode, mapped
from checkpoint import read_manifest
from config import ConfigError, label_names
from data import DataError, Encoded, cap_windows, count_examples, dropped_by_truncation, encode, read_examples, window_stride
from datacheck import leak_warning
from files import check_outputs
from model import check_positions, load_tokenizer
from processes import on_main, seed_everything


@dataclass
class Split:
    """One data file as token ids and labels (encoded, a data.Encoded); its texts are not kept."""
    path: str
    encoded: Encoded


@dataclass
class RunInputs:
    """What prepare_run hands a run: Splits (None where the config names no file)."""
    tokenizer: object
    train: Split
    val: Split
    predict_rows: int  # rows of data.predict_filepath (None without one): prediction's progress bar
    extra: list  # Splits of the extra_paths, in order
    built: object  # what build(tokenizer) returned


def prepare_run(cfg, proc, build, extra_paths=(), tokenizer=None):
    """Check, build and tokenize what a run needs, writing nothing until all of it is checked.

    build(tokenizer) makes the run's models; extra_paths are unlabelled files (distillation's
    transfer data); tokenizer, when given, replaces the model section's (a distilled student's own).
    The training split is returned whole: data.max_windows is training_split's. The predict file
    is read and checked too, but not kept (evaluation.predict_file streams it): its row count
    sizes prediction's progress bar. Seeds are set for initialisation first, then apart per rank
    for dropout.
    """
    data = cfg["data"]
    seed_everything(cfg["trainer"]["seed"])
    tokenizer = load_tokenizer(cfg["model"]) if tokenizer is None else tokenizer
    check_max_seq_len(cfg, tokenizer)
    paths = {key: data[key] for key in ("train_filepath", "val_filepath") if data[key]}
    rows = {key: read_split(cfg, proc, tokenizer, path, need_labels=True) for key, path in paths.items()}
    read = {key: r for key, r in rows.items() if not isinstance(r, Encoded)}  # the others came from the token cache
    if proc.is_main and (line := leak_warning(read.get("train_filepath"), read.get("val_filepath"),
                                              cached=[paths[key] for key in rows if key not in read])):
        proc.say(line)  # texts in both files, or labelled twice (datacheck.py): one line at most
    extra = [(path, read_split(cfg, proc, tokenizer, path, need_labels=False)) for path in extra_paths]
    predict_rows = count_examples(data["predict_filepath"], data) if data["predict_filepath"] else None
    built = build(tokenizer)
    on_main(proc, check_outputs, cfg, cache_folder(cfg))
    train, val = [tokenize(cfg, proc, tokenizer, paths[key], rows[key]) if key in paths else None
                  for key in ("train_filepath", "val_filepath")]
    extra = [tokenize(cfg, proc, tokenizer, path, read) for path, read in extra]
    # ranks draw different dropout masks; the initial weights were already the same on all
    seed_everything((cfg["trainer"]["seed"] + proc.rank) % 2**32)
    return RunInputs(tokenizer, train, val, predict_rows, extra, built)


def check_max_seq_len(cfg, tokenizer):
    """module.max_seq_len within what the model section's tokenizer and model (its positions) take."""
    # longer sequences than the model has positions would crash the first forward pass, mid-run
    if cfg["module"]["max_seq_len"] > tokenizer.model_max_length:
        # a checkpoint's tokenizer stops at the length it was trained at (model.save_pretrained)
        ours = (cfg["model"]["tokenizer_path"] is None and cfg["model"]["model_path"] is not None
                and read_manifest(cfg["model"]["model_path"]) is not None)
        hint = ("; to train it further on longer texts, pass --model.tokenizer_path with the encoder's own "
                "tokenizer (model.hf_model)" if ours else "; lower it")
        raise ConfigError(f"module.max_seq_len is {cfg['module']['max_seq_len']} but the "
                          f"{'checkpoint was trained at' if ours else 'model takes at most'} "
                          f"{tokenizer.model_max_length} tokens{hint}")
    check_positions(cfg)


def read_split(cfg, proc, tokenizer, path, need_labels):
    """One file's rows, read and checked (a data.Examples) for tokenize; or, where every rank of
    the run (proc, when given) finds the file in the token cache, its ids mapped from there (a
    data.Encoded) without reading the file again: its checks passed when the entry was made from
    the same bytes and options."""
    if proc is not None:
        encoded = mapped(cache_folder(cfg), tokenizer, path, cfg["data"], cfg["module"]["max_seq_len"], need_labels, proc)
        if encoded is not None:
            return encoded
    return read_examples(path, cfg["data"], need_labels)


def tokenize(cfg, proc, tokenizer, path, rows):
    """The Split of a file's rows (read_split's): token ids as the config reads them, truncated at
    module.max_seq_len or in overlapping windows (data.long_texts). Through the token cache
    (data.cache_dir), one process per machine tokenizing (cache.py), when proc is given; else in
    this process, without the cache. Rows already mapped from the cache are tokenized already."""
    if isinstance(rows, Encoded):
        encoded = rows
    elif proc is None:
        encoded = encode(tokenizer, rows, cfg["module"]["max_seq_len"], stride=window_stride(cfg["data"]))
    else:
        encoded = cached_encode(cache_folder(cfg), tokenizer, rows, cfg["data"], cfg["module"]["max_seq_len"], proc,
                                say=proc.say)
    if encoded.documents is not None and proc is not None:
        stride = cfg["data"]["window_stride"]
        specials = tokenizer.num_special_tokens_to_add(cfg["data"]["text_b_col"] is not None)
        dropped = dropped_by_truncation(encoded, stride, specials)
        proc.say(f"windows: {path}: {encoded.num_documents} documents in {len(encoded)} windows of <= "
                 f"{cfg['module']['max_seq_len']} tokens (stride {stride}); truncation would have dropped "
                 f"{dropped:.1%} of their text tokens")
    return Split(path, encoded)


def training_split(cfg, proc, split):
    """The training split with at most data.max_windows windows per document (windows only)."""
    capped = cap_windows(split.encoded, cfg["data"]["max_windows"])
    if capped is not split.encoded:
        proc.say(f"windows: {len(capped)} of the {len(split.encoded)} training windows kept, at most "
                 f"{cfg['data']['max_windows']} per document (data.max_windows)")
    return Split(split.path, capped)


def load_split(cfg, tokenizer, path, need_labels=True):
    """One file read, checked and tokenized in this process, without the cache (tools, tests)."""
    return tokenize(cfg, None, tokenizer, path, read_split(cfg, None, tokenizer, path, need_labels))


def first_rows(data_cfg):
    """What the start-up lines add under data.max_rows (a quick run), else ""."""
    n = data_cfg["max_rows"]
    return "" if n is None else f" (data.max_rows {n}: the first {n} rows of each file)"


MAX_POS_WEIGHT = 100.0  # a label seen twice in 10,000 texts would otherwise weigh 5,000 times


def class_weights(cfg, train, device, say=None):
    """module.class_weights as a tensor on device: balanced = n / (k * count of each class) over the
    labelled training rows (multi-label: negatives / positives of each label, at most
    MAX_POS_WEIGHT); None when unset. say(the weights, by name) if given."""
    spec, names = cfg["module"]["class_weights"], label_names(cfg)
    if spec is None:
        return None
    if spec == "balanced" and cfg["data"]["multi_label"]:
        labels = train.encoded.labels[~np.isnan(train.encoded.labels).any(axis=1)]  # unlabelled rows are NaN
        positives = labels.sum(axis=0)
        spec = np.minimum((len(labels) - positives) / np.maximum(positives, 1), MAX_POS_WEIGHT).tolist()
    elif spec == "balanced":
        labels = train.encoded.labels[train.encoded.labels >= 0]  # unlabelled transfer rows are -1
        counts = np.bincount(labels, minlength=len(names))
        if not counts.all():
            missing = [name for name, count in zip(names, counts) if not count]
            raise DataError(f"module.class_weights balanced: no training example of {missing}; give the "
                            f"weights as a list, or check data.labels_list")
        spec = (len(labels) / (len(names) * counts)).tolist()
    weights = torch.tensor(spec, dtype=torch.float32, device=device)
    if say is not None:
        kind = "positive weights per label" if cfg["data"]["multi_label"] else "class weights"
        say(f"{kind}: " + ", ".join(f"{n} {w:.4g}" for n, w in zip(names, weights.tolist())))
    return weights
