"""Data: files -> checked examples -> token ids -> length-grouped, dynamically padded batches.

Usage:
    examples = read_examples(path, data_cfg, labels_list, need_labels=True)
    encoded = encode(tokenizer, examples, max_seq_len)
    for rank_indices, global_size in train_batches(encoded.lengths, 32, seed, epoch, rank, world_size):
        batch = collate(encoded, rank_indices, tokenizer.pad_token_id)

Files are csv, tsv or jsonl. `data.header` is the index of the header row (rows above it are
skipped) or null, in which case columns are named by position (0, 1, ...). `data.quoting` says
whether a `"` opens a quoted field, which may hold delimiters, newlines and any length of text: by
default (auto) it does in csv files and not in tsv files, which (GLUE's among them) are mostly
written unquoted, their quotes part of the text. Every problem a file can have (undecodable bytes,
a NUL byte, a quote never closed or one that swallows the rows below it, missing column, unknown
label, regression label not a finite number, empty text, ragged row, empty file) raises DataError
with one line naming the file and line, before any training starts.

Multi-label data (data.multi_label) gives each text any number of labels: a csv / tsv cell holds
them joined by data.label_sep ("sports|tech", or empty for none); a jsonl value is a list of
labels (or a string joined the same way). Its labels are an (examples, labels) array of 0 / 1.

Batching is a pure function of (seed, epoch, rank, world_size), so every DDP rank computes the same
global order and takes its own share of each global batch, and a resumed run finds its place again.
"""
import csv
import io
import json
from dataclasses import dataclass

import numpy as np
import torch


# long texts are legitimate: lift the csv module's 131,072-character field limit to the largest
# value every platform takes (sys.maxsize overflows a 32-bit C long, as on Windows)
csv.field_size_limit(2**31 - 1)

# a quoted field may hold newlines, a long document thousands of them (200,000 characters at 50
# a line is 4,000 lines); a field over this many lines is a quote left open that swallowed the rows
# below it
MAX_FIELD_LINES = 10_000


class DataError(Exception):
    """A problem with an input file, reported to the user as one line."""


@dataclass
class Examples:
    """The rows of one file, checked, with the text and label columns pulled out."""
    path: str
    columns: list          # column names (header) or positions (header null)
    rows: list             # one dict per row: column -> raw value, for predictions output
    texts_a: list
    texts_b: list | None
    labels: np.ndarray | None   # class ids (int64), regression targets (float32) or multi-label 0/1 rows (float32)


@dataclass
class Encoded:
    """Token ids of every example, ready for batching; lengths drive the length grouping."""
    input_ids: list
    token_type_ids: list | None
    labels: np.ndarray | None
    lengths: np.ndarray

    def __len__(self):
        return len(self.input_ids)


# ---------------------------------------------------------------------------------------------
# reading files


def decode_file(path, encoding):
    """The file's text, or a DataError naming the line of the first undecodable byte."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a data file") from None
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: bytes that are not valid {encoding}; set data.encoding "
                        f"to the file's encoding (for example --data.encoding latin-1)") from None
    except LookupError:
        raise DataError(f"data.encoding: unknown encoding {encoding!r}") from None
    if "\0" in text:  # no text holds one: the file is binary, or UTF-16 read as another encoding
        line = text.count("\n", 0, text.index("\0")) + 1
        raise DataError(f"{path}:{line}: a NUL byte, which no text holds; set data.encoding to "
                        f"the file's encoding (for example --data.encoding utf-16)")
    return text.removeprefix("\ufeff")  # a byte-order mark is not part of the first column name


def read_delimited(path, text, delimiter, header, quoting):
    """Rows of a csv/tsv file as (line number, dict) pairs, plus the column names."""
    # strict: a quote left open to the end, or text after a closing quote, is an error, not text
    # read wrongly; a row is named by its first line, where such a quote opened
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True,
                        quoting=csv.QUOTE_MINIMAL if quoting == "csv" else csv.QUOTE_NONE)
    records, start = [], 1
    try:
        for fields in reader:
            if reader.line_num - start >= MAX_FIELD_LINES:
                raise DataError(f"{path}:{start}: a quoted field runs over more than "
                                f"{MAX_FIELD_LINES} lines; close the quote it opens and write "
                                f"quotes inside it twice (\"\"), or read quotes as text with "
                                f"--data.quoting none")
            if fields:  # blank lines carry no example
                records.append((start, fields))
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"{path}:{start}: a quoted field is not closed properly ({e}); close the "
                        f"quote it opens and write quotes inside it twice (\"\"), or read quotes "
                        f"as text with --data.quoting none") from None
    if header is not None:
        if len(records) <= header:
            raise DataError(f"{path}: data.header is {header} but the file has only "
                            f"{len(records)} non-empty rows")
        columns = records[header][1]
        records = records[header + 1:]
    else:
        columns = list(range(len(records[0][1]))) if records else []
    rows = []
    for line, fields in records:
        if len(fields) != len(columns):
            raise DataError(f"{path}:{line}: row has {len(fields)} fields, expected {len(columns)} "
                            f"(a stray delimiter or quote?)")
        rows.append((line, dict(zip(columns, fields))))
    return columns, rows


def read_jsonl(path, text):
    rows, columns = [], {}
    # lines end at \n, \r\n or \r only: splitlines() also cuts at U+2028, which JSON text may hold
    for line, raw in enumerate(io.StringIO(text, newline=None), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{line}: expected a JSON object per line")
        columns.update(dict.fromkeys(row))
        rows.append((line, row))
    return list(columns), rows


def read_table(path, file_format, header, encoding, quoting):
    """(columns, [(line, row dict), ...]) of a csv, tsv or jsonl file."""
    text = decode_file(path, encoding)
    if not text.strip():  # said plainly, not as a header row that is missing
        raise DataError(f"{path}: the file is empty; expected examples")
    if file_format == "jsonl":
        columns, rows = read_jsonl(path, text)
    else:
        if quoting == "auto":
            quoting = "csv" if file_format == "csv" else "none"
        columns, rows = read_delimited(path, text, "," if file_format == "csv" else "\t", header,
                                       quoting)
    if not rows:
        raise DataError(f"{path}: no examples in the file")
    return columns, rows


def resolve_column(path, key, spec, columns, header):
    """The column a config key names: a header name, or a position (an int)."""
    if isinstance(spec, int):
        if 0 <= spec < len(columns):
            return columns[spec]
        raise DataError(f"{path}: {key} is column {spec} but the file has {len(columns)} columns")
    if spec in columns:
        return spec
    hint = " (data.header is null, so columns are positions 0, 1, ...)" if header is None else ""
    raise DataError(f"{path}: {key} {spec!r} not found; columns are {columns}{hint}")


def parse_label(path, line, value, label_ids):
    """Class id (classification) or float target (regression: label_ids is None)."""
    if label_ids is None:
        try:
            target = float(value)
        except (TypeError, ValueError):
            raise DataError(f"{path}:{line}: regression label {value!r} is not a number") from None
        # float() takes 'nan' and 'inf', and float32 overflows past 3.4e38: no loss can use either
        if not abs(target) <= float(np.finfo(np.float32).max):
            raise DataError(f"{path}:{line}: regression label {value!r} is not a finite number; "
                            f"give the row a real target or drop it")
        return target
    key = str(value).strip()
    if key not in label_ids:
        raise DataError(f"{path}:{line}: label {key!r} is not in data.labels_list "
                        f"{list(label_ids)}{several_labels_hint(key)}")
    return label_ids[key]


def several_labels_hint(key):
    """A hint for a single-label file whose cell looks like a list of labels."""
    if any(sep in key for sep in "|;,") or key.startswith("["):
        return "; if a text may have several labels, set data.multi_label true (and data.label_sep)"
    return ""


def parse_label_set(path, line, value, label_ids, sep):
    """A multi-label row: 1 at each label of the cell (a list, or names joined by sep), else 0."""
    if isinstance(value, list):
        names = [str(name).strip() for name in value]
    elif value is None or isinstance(value, str):
        names = [name.strip() for name in (value or "").split(sep)]
    else:
        raise DataError(f"{path}:{line}: labels {value!r} are neither a list nor names joined by {sep!r}")
    row = np.zeros(len(label_ids), dtype=np.float32)
    for name in filter(None, names):  # an empty cell, or an empty item, is no label
        if name not in label_ids:
            raise DataError(f"{path}:{line}: label {name!r} is not in data.labels_list {list(label_ids)}"
                            f"{'' if isinstance(value, list) else f' (labels are split at {sep!r}, data.label_sep)'}")
        row[label_ids[name]] = 1
    return row


def text_of(path, line, row, column):
    value = row.get(column)
    text = "" if value is None else str(value)
    if not text.strip():
        raise DataError(f"{path}:{line}: empty text in column {column!r}")
    return text


def read_examples(path, data_cfg, labels_list, need_labels):
    """Read and check one data file; labels are required for training and evaluation only."""
    header = data_cfg["header"] if data_cfg["file_format"] != "jsonl" else 0
    columns, rows = read_table(path, data_cfg["file_format"], data_cfg["header"],
                               data_cfg["encoding"], data_cfg["quoting"])
    col_a = resolve_column(path, "data.text_a_col", data_cfg["text_a_col"], columns, header)
    col_b = None
    if data_cfg["text_b_col"] is not None:
        col_b = resolve_column(path, "data.text_b_col", data_cfg["text_b_col"], columns, header)
    texts_a = [text_of(path, line, row, col_a) for line, row in rows]
    texts_b = [text_of(path, line, row, col_b) for line, row in rows] if col_b is not None else None
    labels = None
    if need_labels:
        col_label = resolve_column(path, "data.label_col", data_cfg["label_col"], columns, header)
        multi_label = data_cfg["multi_label"]
        label_ids = label_to_id(labels_list, multi_label)
        if multi_label:
            labels = np.stack([parse_label_set(path, line, row.get(col_label), label_ids, data_cfg["label_sep"])
                               for line, row in rows])
        else:
            labels = np.array([parse_label(path, line, row.get(col_label), label_ids) for line, row in rows],
                              dtype=np.int64 if label_ids is not None else np.float32)
    return Examples(path, columns, [row for _, row in rows], texts_a, texts_b, labels)


def label_to_id(labels_list, multi_label=False):
    """Label string -> class id in labels_list order; None for regression (one entry, not multi-label)."""
    if len(labels_list) == 1 and not multi_label:
        return None
    return {str(label).strip(): i for i, label in enumerate(labels_list)}


# ---------------------------------------------------------------------------------------------
# tokenizing and batching


def encode(tokenizer, examples, max_seq_len, chunk_size=2048):
    """Tokenize every example once, up front, truncated to max_seq_len (no padding yet)."""
    input_ids, token_type_ids = [], []
    for start in range(0, len(examples.texts_a), chunk_size):
        end = start + chunk_size
        pair = examples.texts_b[start:end] if examples.texts_b is not None else None
        out = tokenizer(examples.texts_a[start:end], pair, truncation=True, max_length=max_seq_len)
        input_ids += out["input_ids"]
        token_type_ids += out.get("token_type_ids") or []
    lengths = np.array([len(ids) for ids in input_ids], dtype=np.int64)
    return Encoded(input_ids, token_type_ids or None, examples.labels, lengths)


def train_batches(lengths, batch_size, seed, epoch, rank=0, world_size=1, group_size=50):
    """One epoch of training batches for this rank: [(rank's indices, global batch size), ...].

    Length grouping: shuffle, sort by length inside mega-batches of `group_size` batches, cut into
    global batches, shuffle the batch order. Similar lengths share a batch, so little compute goes
    to padding, yet the order is still random. Every rank computes the same global batches (same
    seed and epoch) and takes every world_size-th example of each, so all ranks run the same number
    of steps. Only the final global batch can be short; under DDP a final batch with fewer
    examples than ranks is dropped, since a rank with no example cannot join the gradient sync.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    mega = batch_size * group_size
    grouped = [chunk[np.argsort(-lengths[chunk], kind="stable")]
               for chunk in np.split(order, range(mega, len(order), mega))]
    order = np.concatenate(grouped) if grouped else order
    batches = np.split(order, range(batch_size, len(order), batch_size))
    batches = [batches[i] for i in rng.permutation(len(batches))]
    return [(batch[rank::world_size], len(batch)) for batch in batches if len(batch) >= world_size]


def micro_batches(indices, grad_accum_steps):
    """Split a rank's share of a global batch into grad_accum_steps micro-batches of near-equal
    size (fewer when a short last batch has fewer examples than that)."""
    return [micro for micro in np.array_split(indices, grad_accum_steps) if len(micro)]


def eval_batches(lengths, batch_size, rank=0, world_size=1):
    """This rank's evaluation batches, longest first; every example on exactly one rank."""
    order = np.argsort(-lengths, kind="stable")[rank::world_size]
    # a rank can have no example at all (fewer examples than ranks): no empty batch to collate then
    return [batch for batch in np.split(order, range(batch_size, len(order), batch_size)) if len(batch)]


def pad(sequences, value, multiple=1):
    width = -(-max(len(s) for s in sequences) // multiple) * multiple  # rounded up to the multiple
    out = np.full((len(sequences), width), value, dtype=np.int64)
    for i, seq in enumerate(sequences):
        out[i, :len(seq)] = seq
    return torch.from_numpy(out)


def collate(encoded, indices, pad_token_id, pad_to_multiple_of=1):
    """A batch padded to its own longest sequence (rounded up to pad_to_multiple_of: a compiled
    model then sees few distinct shapes); labels included when the data has them."""
    input_ids = [encoded.input_ids[i] for i in indices]
    batch = {"input_ids": pad(input_ids, pad_token_id, pad_to_multiple_of),
             "attention_mask": pad([[1] * len(ids) for ids in input_ids], 0, pad_to_multiple_of)}
    if encoded.token_type_ids is not None:
        batch["token_type_ids"] = pad([encoded.token_type_ids[i] for i in indices], 0, pad_to_multiple_of)
    if encoded.labels is not None:
        batch["labels"] = torch.from_numpy(encoded.labels[indices])
    return batch
