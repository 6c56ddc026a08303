r"""Know your data before you trust a metric: duplicates, conflicting labels, leaks between files, lengths.

    python check_data.py                                          # the files of config.yaml's job
    python check_data.py --check.extra_filepaths [data/tweets/test.csv]   # a test set too
    python check_data.py --config_path my.yaml --check.output report.json

It reads data.train_filepath, data.val_filepath, check.extra_filepaths (labelled, as the validation
file is), data.predict_filepath and distill.unlabeled_filepaths exactly as trainer.py would (same
columns, labels, encoding, and the same one-line errors), and reports per file: rows, texts left
blank once punctuation is ignored, the count of each class and the imbalance ratio (largest class
/ smallest), labels absent from the training file, duplicate texts and texts whose rows disagree on
the label (conflicts), each exactly and once case, whitespace and punctuation are ignored
(normalised, datacheck.normalise), and token lengths (percentiles with the model's tokenizer)
against module.max_seq_len: the share of texts truncation cuts and whether windows
(data.long_texts windows) would help. Between every two files: the texts both hold (leaks), exact
and normalised, and how many of those carry a different label in each. A sentence pair is one
text: both sides must match. Rows are counted from 1, the header not counted.

It prints a short table and writes everything, with every row number, to a JSON report
(check.output, or data_check.json in a new <trainer.log_dir>/<date>-<time>-check folder), written
atomically. Exit status: 0 when it ran (findings are not errors), 2 on bad input (one `error:` line).
trainer.py runs the cheap part of this (leaks and conflicts) on every run that reads its files.
"""
import sys

# --help needs only config.yaml: answer it before torch is imported, which takes seconds
if __name__ == "__main__" and ("-h" in sys.argv[1:] or "--help" in sys.argv[1:]):
    from config import print_help
    print_help(__doc__)
    sys.exit(0)

from itertools import combinations
from pathlib import Path

import numpy as np

from config import ConfigError, answer_help, label_names, load_config
from data import ENCODE_CHUNK, DataError, read_examples
from datacheck import conflict_groups, conflicting_keys, duplicate_groups, normalise_all, shared, text_keys
from files import OutputError, write_json, writing_to
from model import ModelError, load_tokenizer
from runlog import new_run_dir

# truncation that cuts at least this share of a file's texts is worth trying windows for
WINDOWS_WORTH = 0.05
PERCENTILES = (50, 90, 95, 99)
SHOWN = 3  # examples of each finding printed (the report has them all)


def files_of(cfg):
    """[(name, config key, path, labelled)] of every file to check, in report order."""
    data = cfg["data"]
    files = [(name, f"data.{key}", data[key], True) for name, key in [("train", "train_filepath"), ("val", "val_filepath")]]
    files += [(f"extra{i + 1}", f"check.extra_filepaths[{i}]", path, True)
              for i, path in enumerate(cfg["check"]["extra_filepaths"])]
    files += [("predict", "data.predict_filepath", data["predict_filepath"], False)]
    files += [(f"unlabeled{i + 1}", f"distill.unlabeled_filepaths[{i}]", str(path), False)
              for i, path in enumerate(cfg["distill"]["unlabeled_filepaths"])]
    return [file for file in files if file[2]]


def token_lengths(tokenizer, examples):
    """Every row's length in tokens, special tokens included, without truncation."""
    lengths = []
    for start in range(0, len(examples.texts_a), ENCODE_CHUNK):
        texts_a = examples.texts_a[start:start + ENCODE_CHUNK]
        texts_b = None if examples.texts_b is None else examples.texts_b[start:start + ENCODE_CHUNK]
        if tokenizer.is_fast:  # the Rust tokenizer itself: no Python dicts, no warning about long texts
            backend = tokenizer.backend_tokenizer
            backend.no_truncation()
            backend.no_padding()
            encodings = backend.encode_batch_fast(texts_a if texts_b is None else list(zip(texts_a, texts_b)))
            lengths += [len(e.ids) for e in encodings]
        else:
            lengths += map(len, tokenizer(texts_a, texts_b, truncation=False, verbose=False)["input_ids"])
    return np.asarray(lengths, dtype=np.int64)


def length_report(cfg, tokenizer, examples):
    """Token-length percentiles against module.max_seq_len, and whether windows would help."""
    lengths, max_len = token_lengths(tokenizer, examples), cfg["module"]["max_seq_len"]
    specials = tokenizer.num_special_tokens_to_add(pair=examples.texts_b is not None)
    truncated = float(np.mean(lengths > max_len))
    text_tokens = np.maximum(lengths - specials, 0).sum()
    dropped = float(np.maximum(lengths - max_len, 0).sum() / text_tokens) if text_tokens else 0.0
    return {**{f"p{p}": int(v) for p, v in zip(PERCENTILES, np.percentile(lengths, PERCENTILES, method="higher"))},
            "max": int(lengths.max()), "max_seq_len": max_len, "truncated_share": truncated,
            "dropped_token_share": dropped, "windows": cfg["data"]["long_texts"] == "windows",
            "windows_would_help": cfg["data"]["long_texts"] != "windows" and truncated >= WINDOWS_WORTH}


def label_report(cfg, labels):
    """{classes: count of each, imbalance_ratio} (multi-label: rows holding each label), or the
    targets' summary for regression."""
    names = label_names(cfg)
    if names is None:
        return {"targets": {"mean": float(labels.mean()), "std": float(labels.std()),
                            "min": float(labels.min()), "max": float(labels.max())}}
    counts = labels.sum(axis=0) if labels.ndim == 2 else np.bincount(labels, minlength=len(names))
    ratio = float(counts.max() / counts.min()) if counts.min() > 0 else None  # None: a class is missing
    return {"classes": dict(zip(names, counts.astype(int).tolist())), "imbalance_ratio": ratio}


def rows_of(groups):
    """Groups of row indices as row numbers from 1."""
    return [[i + 1 for i in group] for group in groups]


def keys_of(examples):
    """(exact keys, normalised keys, rows left blank once normalised: either text of a pair)."""
    near_a = normalise_all(examples.texts_a)
    near_b = None if examples.texts_b is None else normalise_all(examples.texts_b)
    blank = [i for i, text in enumerate(near_a) if not text or (near_b is not None and not near_b[i])]
    return text_keys(examples.texts_a, examples.texts_b), text_keys(near_a, near_b), blank


def file_report(cfg, tokenizer, name, key, examples, keys):
    """Everything about one file on its own."""
    exact, near, blank = keys
    report = {"name": name, "key": key, "path": examples.path, "rows": len(examples.texts_a),
              "blank_once_normalised": [i + 1 for i in blank]}
    if examples.labels is not None:
        report.update(label_report(cfg, examples.labels))
    for kind, k in (("exact", exact), ("normalised", near)):
        groups = duplicate_groups(k)
        report[f"duplicates_{kind}"] = {"extra_rows": sum(len(g) - 1 for g in groups), "groups": rows_of(groups)}
        if examples.labels is not None:
            report[f"conflicts_{kind}"] = rows_of(conflict_groups(k, examples.labels))
    report["token_lengths"] = length_report(cfg, tokenizer, examples)
    return report


def leak_report(a, b, keys_a, keys_b):
    """The texts two files both hold, exact and normalised: the rows of each, and how many of the
    shared texts carry more than one label over both files (when both are labelled)."""
    report = {"files": [a[0], b[0]]}
    for kind, ka, kb in (("exact", keys_a[0], keys_b[0]), ("normalised", keys_a[1], keys_b[1])):
        in_a, in_b = shared(ka, kb)
        found = {"texts": int(len(np.unique(ka[in_a]))), "rows": {a[0]: (np.flatnonzero(in_a) + 1).tolist(),
                                                                  b[0]: (np.flatnonzero(in_b) + 1).tolist()}}
        if a[1].labels is not None and b[1].labels is not None:
            labels = np.concatenate([a[1].labels[in_a], b[1].labels[in_b]])
            found["label_differs"] = int(len(conflicting_keys(np.concatenate([ka[in_a], kb[in_b]]), labels)))
        report[kind] = found
    return report


def unseen_labels(cfg, reports):
    """{file: [labels it holds that the training file never does]}, for the labelled files."""
    train = next((r for r in reports if r["name"] == "train"), None)
    if train is None or "classes" not in train:
        return {}
    missing = {r["name"]: [c for c, n in r["classes"].items() if n and not train["classes"][c]]
               for r in reports if r["name"] != "train" and "classes" in r}
    return {name: labels for name, labels in missing.items() if labels}


def check(cfg):
    """Read every file (a bad one stops here, before anything is written), then the report."""
    examples = [(name, key, read_examples(path, cfg["data"], labelled))
                for name, key, path, labelled in files_of(cfg)]
    tokenizer = load_tokenizer(cfg["model"])
    keys = [keys_of(e) for _, _, e in examples]
    reports = [file_report(cfg, tokenizer, name, key, e, k) for (name, key, e), k in zip(examples, keys)]
    leaks = [leak_report((a[0], a[2]), (b[0], b[2]), ka, kb)
             for (a, ka), (b, kb) in combinations(zip(examples, keys), 2)]
    return {"written_by": "check_data.py", "tokenizer": tokenizer.name_or_path, "files": reports,
            "labels_absent_from_training": unseen_labels(cfg, reports), "leaks": leaks}, [e for _, _, e in examples]


def cut(text, width=60):
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


def table(rows):
    """Rows of cells as left-aligned columns."""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def file_table(report):
    rows = [["file", "path", "rows", "blank", "dup rows", "conflicts", "imbalance", "tokens p50/p95/max", "truncated"]]
    for r in report["files"]:
        lengths = r["token_lengths"]
        rows.append([r["name"], r["path"], r["rows"], len(r["blank_once_normalised"]),
                     f"{r['duplicates_exact']['extra_rows']} ({r['duplicates_normalised']['extra_rows']})",
                     f"{len(r['conflicts_exact'])} ({len(r['conflicts_normalised'])})" if "conflicts_exact" in r else "-",
                     f"{r['imbalance_ratio']:.2f}" if r.get("imbalance_ratio") else "-",
                     f"{lengths['p50']}/{lengths['p95']}/{lengths['max']}", f"{lengths['truncated_share']:.1%}"])
    return table(rows)


def class_table(report):
    labelled = [r for r in report["files"] if "classes" in r]
    if not labelled:
        return None
    names = list(labelled[0]["classes"])
    return table([["class"] + [r["name"] for r in labelled]] +
                 [[name] + [r["classes"][name] for r in labelled] for name in names])


def file_findings(r, texts):
    """Lines about one file's own rows, each with an example or two."""
    lines, name = [], r["name"]
    if r["blank_once_normalised"]:
        row = r["blank_once_normalised"][0]
        lines.append(f"{name}: {len(r['blank_once_normalised'])} texts are only punctuation, e.g. row {row}: "
                     f"{cut(texts[row - 1])!r}")
    exact, near = r["duplicates_exact"], r["duplicates_normalised"]
    if near["extra_rows"]:
        shown = "; ".join(f"rows {', '.join(map(str, g[:4]))}: {cut(texts[g[0] - 1])!r}" for g in near["groups"][:SHOWN])
        lines.append(f"{name}: {exact['extra_rows']} rows repeat an earlier text ({near['extra_rows']} once "
                     f"normalised), e.g. {shown}")
    if r.get("conflicts_normalised"):
        groups = r["conflicts_normalised"]
        shown = "; ".join(f"rows {', '.join(map(str, g[:4]))}: {cut(texts[g[0] - 1])!r}" for g in groups[:SHOWN])
        lines.append(f"{name}: {len(r['conflicts_exact'])} texts carry different labels in different rows "
                     f"({len(groups)} once normalised), e.g. {shown}")
    lengths = r["token_lengths"]
    if lengths["windows_would_help"]:
        lines.append(f"{name}: {lengths['truncated_share']:.1%} of the texts are longer than module.max_seq_len "
                     f"{lengths['max_seq_len']} tokens (truncation drops {lengths['dropped_token_share']:.1%} of the "
                     f"text tokens): windows would help, --data.long_texts windows")
    return lines


def leak_findings(leak, texts):
    """Lines about the texts two files share."""
    a, b = leak["files"]
    exact, near = leak["exact"], leak["normalised"]
    if not near["texts"]:
        return []
    differ = f", {near['label_differs']} of them with a different label" if "label_differs" in near else ""
    row = near["rows"][b][0]
    return [f"{a} and {b} share {exact['texts']} texts ({near['texts']} once normalised{differ}): "
            f"{len(near['rows'][b])} rows of {b}, e.g. row {row}: {cut(texts[b][row - 1])!r}"]


def findings(report, examples):
    """What the report found, as lines for a person (the report holds every row)."""
    texts = {r["name"]: e.texts_a for r, e in zip(report["files"], examples)}
    lines = []
    for r in report["files"]:
        lines += file_findings(r, texts[r["name"]])
    for name, labels in report["labels_absent_from_training"].items():
        lines.append(f"{name} holds labels the training file never does: {labels}")
    for leak in report["leaks"]:
        lines += leak_findings(leak, texts)
    return lines


def report_path(cfg):
    """check.output, else data_check.json in a new check folder of trainer.log_dir."""
    if cfg["check"]["output"] is not None:
        return Path(cfg["check"]["output"])
    with writing_to("trainer.log_dir", cfg["trainer"]["log_dir"]):
        return Path(new_run_dir(cfg["trainer"]["log_dir"], "check")) / "data_check.json"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if answer_help(argv, __doc__):
        return 0
    try:
        cfg = load_config(argv)
        report, examples = check(cfg)
        path = report_path(cfg)
        with writing_to("check.output", path):
            write_json(path, report)
    except (ConfigError, DataError, ModelError, OutputError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    print(file_table(report))
    classes = class_table(report)
    if classes is not None:
        print(f"\n{classes}")
    lines = findings(report, examples)
    print("\n" + "\n".join(lines) if lines else "\nno duplicates, conflicts or leaks; no file needs windows")
    print(f"\nreport: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
