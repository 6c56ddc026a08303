"""Data: files -> checked examples -> token ids -> length-grouped, dynamically padded batches.

Usage:
    examples = read_examples(path, data_cfg, need_labels=True)       # labels: data_cfg["labels_list"]
    encoded = encode(tokenizer, examples, max_seq_len)
    for rank_indices, global_size in train_batches(encoded.lengths, 32, seed, epoch, rank, world_size):
        batch = collate(encoded, rank_indices, tokenizer.pad_token_id)
    for chunk in example_chunks(path, data_cfg, 10_000):   # a predict file, streamed
        ...

Files are read line by line, never held whole; the token ids of a split are flat numpy arrays
(Encoded), which cache.py keeps on disk for later runs and for the other ranks of a machine.
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

Long documents (data.long_texts windows) become overlapping windows of max_seq_len tokens, cut by
the fast tokenizer's own overflow; Encoded.documents says which row each window came from, so
evaluation can pool a document's windows and training can cap them (cap_windows).

Batching is a pure function of (seed, epoch, rank, world_size), so every DDP rank computes the same
global order and takes its own share of each global batch, and a resumed run finds its place again.
"""
import csv
import itertools
import json
from dataclasses import dataclass

import numpy as np
import torch

from progress import progress_bar

# long texts are legitimate: lift the csv module's 131,072-character field limit to the largest
# value every platform takes (sys.maxsize overflows a 32-bit C long, as on Windows)
csv.field_size_limit(2**31 - 1)

# a quoted field may hold newlines, a long document thousands of them (200,000 characters at 50
# a line is 4,000 lines); a field over this many lines is a quote left open that swallowed the rows
# below it
MAX_FIELD_LINES = 10_000

# rows per call of the tokenizer: enough for its threads to share; its outputs are held as Python
# lists until copied, so a larger chunk raises the peak memory without tokenizing faster
ENCODE_CHUNK = 2048


class DataError(Exception):
    """A problem with an input file, reported to the user as one line."""


@dataclass
class Examples:
    """The rows of one file, checked, with the text and label columns pulled out."""
    path: str
    columns: list          # column names (header) or positions (header null)
    rows: list | None      # one dict per row: column -> raw value, kept for prediction output only
    texts_a: list
    texts_b: list | None
    labels: np.ndarray | None   # class ids (int64), regression targets (float32) or multi-label 0/1 rows (float32)


@dataclass
class Encoded:
    """Token ids of every example, ready for batching, stored flat: example i's tokens are
    ids[offsets[i]:offsets[i + 1]]. A few bytes a token instead of a Python int each, and arrays
    the token cache (cache.py) can memory-map, so the ranks of a machine share one copy.

    token_type_ids lie beside ids, only where the tokenizer gives them and some are not 0 (sentence
    pairs); labels are any array whose first axis is the examples (class ids, targets, one row of
    label columns), or None.
    """
    ids: np.ndarray                     # uint16 where the vocabulary fits (id_dtype), else int32
    offsets: np.ndarray                 # int64, one more than there are examples
    token_type_ids: np.ndarray | None   # uint8
    labels: np.ndarray | None
    # data.long_texts windows: the document (file row) of each window, ascending; None = one row each
    documents: np.ndarray | None = None

    def __len__(self):
        return len(self.offsets) - 1

    @property
    def num_documents(self):
        if self.documents is None:
            return len(self)
        return int(self.documents[-1]) + 1 if len(self.documents) else 0

    def with_document_labels(self, labels):
        """Itself, labelled: one label per document, repeated for each of its windows."""
        self.labels = labels if labels is None or self.documents is None else labels[self.documents]
        return self

    def document_labels(self):
        """One label per document (its first window's)."""
        if self.documents is None:
            return self.labels
        return self.labels[np.searchsorted(self.documents, np.arange(self.num_documents))]

    @property
    def lengths(self):
        """Tokens per example: they drive the length grouping."""
        return np.diff(self.offsets)

    def tokens(self, i):
        """Example i's token ids as a list."""
        return self.ids[self.offsets[i]:self.offsets[i + 1]].tolist()

    @classmethod
    def from_lists(cls, input_ids, token_type_ids=None, labels=None):
        """From one list of token ids per example (and of token types, if given)."""
        offsets = np.zeros(len(input_ids) + 1, dtype=np.int64)
        np.cumsum([len(ids) for ids in input_ids], out=offsets[1:])
        def flat(lists, dtype):
            return np.fromiter(itertools.chain.from_iterable(lists), dtype, offsets[-1])
        return cls(flat(input_ids, np.int32), offsets,
                   None if token_type_ids is None else flat(token_type_ids, np.uint8), labels)

    def subset(self, indices):
        """The examples at indices, in that order, as a new Encoded in memory."""
        indices = np.asarray(indices, dtype=np.int64)
        starts, lengths = self.offsets[indices], self.lengths[indices]
        offsets = np.zeros(len(indices) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        take = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        return Encoded(self.ids[take], offsets,
                       None if self.token_type_ids is None else self.token_type_ids[take],
                       None if self.labels is None else self.labels[indices],
                       None if self.documents is None else self.documents[indices])

    @staticmethod
    def concat(parts):
        """The examples of every part, in order. Token types if any part has them: a part without
        them is all segment 0 (encode stores none then)."""
        bases = np.cumsum([0] + [len(p.ids) for p in parts[:-1]])
        offsets = np.concatenate([parts[0].offsets[:1]] + [p.offsets[1:] + b for p, b in zip(parts, bases)])
        types = None
        if any(p.token_type_ids is not None for p in parts):
            types = np.concatenate([np.zeros(len(p.ids), np.uint8) if p.token_type_ids is None else p.token_type_ids
                                    for p in parts])
        with_labels = all(p.labels is not None for p in parts)
        documents = None
        if any(p.documents is not None for p in parts):  # numbered on from the parts before
            starts = np.cumsum([0] + [p.num_documents for p in parts[:-1]])
            documents = np.concatenate([(np.arange(len(p)) if p.documents is None else p.documents) + start
                                        for p, start in zip(parts, starts)])
        return Encoded(np.concatenate([p.ids for p in parts]), offsets, types,
                       np.concatenate([p.labels for p in parts]) if with_labels else None, documents)


# ---------------------------------------------------------------------------------------------
# reading files: line by line, so that a file of any size is never held whole


def undecodable(path, encoding):
    """The DataError for a file that does not decode: it names the line of the first bad byte."""
    with open(path, "rb") as f:
        raw = f.read()  # only on this error path: the line number needs the bytes before it
    try:
        raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        return DataError(f"{path}:{line}: bytes that are not valid {encoding}; set data.encoding "
                         f"to the file's encoding (for example --data.encoding latin-1)")
    return DataError(f"{path}: bytes that are not valid {encoding}; set data.encoding to the file's encoding")


def text_lines(path, encoding):
    """The file's lines, decoded as they are read, line endings kept (as csv wants them); a
    DataError names the line of the first undecodable byte or NUL byte."""
    try:
        f = open(path, encoding=encoding, newline="")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a data file") from None
    except LookupError:
        raise DataError(f"data.encoding: unknown encoding {encoding!r}") from None
    with f:
        try:
            for number, line in enumerate(f, start=1):
                if "\0" in line:  # no text holds one: the file is binary, or UTF-16 read as another encoding
                    raise DataError(f"{path}:{number}: a NUL byte, which no text holds; set data.encoding "
                                    f"to the file's encoding (for example --data.encoding utf-16)")
                # a byte-order mark is not part of the first column name
                yield line.removeprefix("\ufeff") if number == 1 else line
        except UnicodeDecodeError:
            raise undecodable(path, encoding) from None
        except UnicodeError as e:  # no byte, the stream: e.g. utf-16 (or utf-32) without a byte-order mark
            raise DataError(f"{path}: cannot be read as {encoding} ({e}); set data.encoding to the file's "
                            f"encoding (utf-16-le or utf-16-be name the byte order of a file without a mark)") from None


def delimited_records(path, lines, delimiter, quoting):
    """The non-empty records of a csv/tsv file as (line number, fields) pairs."""
    # strict: a quote left open to the end, or text after a closing quote, is an error, not text
    # read wrongly; a record is named by its first line, where such a quote opened
    reader = csv.reader(lines, delimiter=delimiter, strict=True,
                        quoting=csv.QUOTE_MINIMAL if quoting == "csv" else csv.QUOTE_NONE)
    start = 1
    try:
        for fields in reader:
            if reader.line_num - start >= MAX_FIELD_LINES:
                raise DataError(f"{path}:{start}: a quoted field runs over more than "
                                f"{MAX_FIELD_LINES} lines; close the quote it opens and write "
                                f"quotes inside it twice (\"\"), or read quotes as text with "
                                f"--data.quoting none")
            if fields:  # blank lines carry no example
                yield start, fields
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"{path}:{start}: a quoted field is not closed properly ({e}); close the "
                        f"quote it opens and write quotes inside it twice (\"\"), or read quotes "
                        f"as text with --data.quoting none") from None


def read_delimited(path, lines, delimiter, header, quoting):
    """(columns, iterator of (line number, row dict)) of a csv/tsv file."""
    records = delimited_records(path, lines, delimiter, quoting)
    columns = None
    if header is not None:
        above = list(itertools.islice(records, header + 1))
        if len(above) <= header:
            raise DataError(f"{path}: data.header is {header} but the file has only "
                            f"{len(above)} non-empty rows")
        columns = above[header][1]
    else:
        first = next(records, None)
        if first is not None:
            columns = list(range(len(first[1])))
            records = itertools.chain([first], records)

    def rows():
        for line, fields in records:
            if len(fields) != len(columns):
                raise DataError(f"{path}:{line}: row has {len(fields)} fields, expected {len(columns)} "
                                f"(a stray delimiter or quote?)")
            yield line, dict(zip(columns, fields))
    return columns or [], rows()


def jsonl_rows(path, lines):
    """(line number, row dict) of each non-blank line of a jsonl file."""
    for line, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{line}: expected a JSON object per line")
        yield line, row


def read_table(path, file_format, header, encoding, quoting):
    """(columns, iterator of (line, row dict)) of a csv, tsv or jsonl file, read as it is consumed.

    A jsonl file's columns are the keys of all its rows, so it is read twice: once for them.
    """
    lines = text_lines(path, encoding)
    if file_format == "jsonl":
        columns = {}
        for _, row in jsonl_rows(path, lines):
            columns.update(dict.fromkeys(row))
        columns, rows = list(columns), jsonl_rows(path, text_lines(path, encoding))
    else:
        if quoting == "auto":
            quoting = "csv" if file_format == "csv" else "none"
        try:
            columns, rows = read_delimited(path, lines, "," if file_format == "csv" else "\t", header, quoting)
        except DataError:
            check_not_blank(path, encoding)  # said plainly, not as a header row that is missing
            raise
    first = next(rows, None)
    if first is None:
        check_not_blank(path, encoding)
        raise DataError(f"{path}: no examples in the file")
    return columns, itertools.chain([first], rows)


def check_not_blank(path, encoding):
    if all(not line.strip() for line in text_lines(path, encoding)):
        raise DataError(f"{path}: the file is empty; expected examples")


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


def checked_rows(path, data_cfg, need_labels):
    """(columns, iterator of (row dict, text_a, text_b, label)) of one data file, each row checked
    as it is read; labels are required for training and evaluation only (None otherwise)."""
    header = data_cfg["header"] if data_cfg["file_format"] != "jsonl" else 0
    columns, rows = read_table(path, data_cfg["file_format"], data_cfg["header"],
                               data_cfg["encoding"], data_cfg["quoting"])
    if data_cfg.get("max_rows") is not None:  # a quick run: the rows below are never read
        rows = itertools.islice(rows, data_cfg["max_rows"])
    col_a = resolve_column(path, "data.text_a_col", data_cfg["text_a_col"], columns, header)
    col_b = None
    if data_cfg["text_b_col"] is not None:
        col_b = resolve_column(path, "data.text_b_col", data_cfg["text_b_col"], columns, header)
    col_label, label_ids = None, None
    if need_labels:
        col_label = resolve_column(path, "data.label_col", data_cfg["label_col"], columns, header)
        label_ids = label_to_id(data_cfg["labels_list"], data_cfg["multi_label"])
    # config.py refuses equal values; a name and a position can still be one column
    for key, col, other_key, other in [("data.text_b_col", col_b, "data.text_a_col", col_a),
                                       ("data.text_a_col", col_a, "data.label_col", col_label),
                                       ("data.text_b_col", col_b, "data.label_col", col_label)]:
        if col is not None and col == other:
            raise DataError(f"{path}: {key} and {other_key} are the same column {col!r}; a text column "
                            f"must be neither the other text nor the label")

    def label_of(line, row):
        if data_cfg["multi_label"]:
            return parse_label_set(path, line, row.get(col_label), label_ids, data_cfg["label_sep"])
        return parse_label(path, line, row.get(col_label), label_ids)

    def checked():
        for line, row in rows:
            yield (row, text_of(path, line, row, col_a),
                   text_of(path, line, row, col_b) if col_b is not None else None,
                   label_of(line, row) if need_labels else None)
    return columns, checked()


def as_examples(path, columns, items, data_cfg, need_labels, keep_rows):
    """Examples of (row, text_a, text_b, label) items."""
    rows, texts_a, texts_b, labels = [], [], [], []
    for row, text_a, text_b, label in items:
        if keep_rows:
            rows.append(row)
        texts_a.append(text_a)
        texts_b.append(text_b)
        labels.append(label)
    if need_labels and data_cfg["multi_label"]:  # one 0/1 row per example
        labels = np.stack(labels) if labels else np.zeros((0, len(data_cfg["labels_list"])), dtype=np.float32)
    elif need_labels:
        regression = label_to_id(data_cfg["labels_list"]) is None
        labels = np.array(labels, dtype=np.float32 if regression else np.int64)
    return Examples(path, columns, rows if keep_rows else None, texts_a,
                    texts_b if data_cfg["text_b_col"] is not None else None, labels if need_labels else None)


def read_examples(path, data_cfg, need_labels, keep_rows=False):
    """Read and check one data file, its labels as data_cfg's labels_list names them. The raw rows
    are kept only when asked (keep_rows): only prediction output needs the input columns, and they
    are most of a file's memory."""
    columns, items = checked_rows(path, data_cfg, need_labels)
    return as_examples(path, columns, items, data_cfg, need_labels, keep_rows)


def example_chunks(path, data_cfg, chunk_rows):
    """The rows of a prediction file as Examples of at most chunk_rows rows each (raw rows kept),
    read as they are consumed: memory follows the chunk, not the file."""
    columns, items = checked_rows(path, data_cfg, need_labels=False)
    while chunk := list(itertools.islice(items, chunk_rows)):
        yield as_examples(path, columns, chunk, data_cfg, False, keep_rows=True)


def count_examples(path, data_cfg):
    """Read and check every row of a prediction file (keeping none): the number of examples."""
    _, items = checked_rows(path, data_cfg, need_labels=False)
    return sum(1 for _ in items)


def label_to_id(labels_list, multi_label=False):
    """Label string -> class id in labels_list order; None for regression (one entry, not multi-label)."""
    if len(labels_list) == 1 and not multi_label:
        return None
    return {str(label).strip(): i for i, label in enumerate(labels_list)}


# ---------------------------------------------------------------------------------------------
# tokenizing and batching


def encode(tokenizer, examples, max_seq_len, chunk_size=ENCODE_CHUNK, progress=False, stride=None):
    """Tokenize every example once, up front, truncated to max_seq_len (no padding yet).

    Chunks of rows go to the tokenizer whole: a fast (Rust) tokenizer spreads a batch over the
    cores itself. Each chunk's lists become flat arrays at once, so a file's worth of Python ints
    never exists. progress: a bar for files that take more than a few seconds.

    stride (data.long_texts windows): instead of truncating, cut each text into windows of
    max_seq_len tokens, each sharing `stride` tokens with the one before, by the fast tokenizer's
    own overflow (return_overflowing_tokens). A sentence pair's windows run over the second text,
    the first kept whole in every window. `documents` then maps each window to its row.
    """
    n = len(examples.texts_a)
    ids, types, lengths, documents = [], [], [], []
    dtype = id_dtype(tokenizer)
    if stride is not None:
        check_window_room(tokenizer, examples, max_seq_len, stride)
    windows = {} if stride is None else {"stride": stride, "return_overflowing_tokens": True}
    bar = progress_bar(desc=f"tokenize {examples.path}", unit="row", total=n, disable=not progress, delay=3,
                       leave=False, dynamic_ncols=True)
    for start in range(0, n, chunk_size):
        end = start + chunk_size
        pair = examples.texts_b[start:end] if examples.texts_b is not None else None
        if windows or not tokenizer.is_fast:
            out = tokenizer(examples.texts_a[start:end], pair, max_length=max_seq_len, return_attention_mask=False,
                            truncation="only_second" if pair is not None and windows else True, **windows)
            chunk, chunk_types = out["input_ids"], out.get("token_type_ids")
            if windows:
                documents.append(np.asarray(out["overflow_to_sample_mapping"], dtype=np.int64) + start)
        else:
            chunk, chunk_types = backend_encode(tokenizer, examples.texts_a[start:end], pair, max_seq_len)
        lengths.append(np.fromiter(map(len, chunk), np.int64, len(chunk)))
        ids.append(np.fromiter(itertools.chain.from_iterable(chunk), dtype))
        if chunk_types is not None:
            types.append(np.fromiter(itertools.chain.from_iterable(chunk_types), np.uint8))
        bar.update(len(chunk))
    bar.close()
    if types and not any(t.any() for t in types):
        types = []  # all segment 0 (single texts): what the model assumes without them, so not stored
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    encoded = Encoded(np.concatenate(ids) if ids else np.zeros(0, dtype), offsets,
                      np.concatenate(types) if types else None, None,
                      (np.concatenate(documents) if documents else np.zeros(0, np.int64)) if windows else None)
    return encoded.with_document_labels(examples.labels)


def id_dtype(tokenizer):
    """The narrowest array type that holds every id of the vocabulary: uint16 for vocabularies up to
    65,536 entries (BERT's 30,522 among them), else int32."""
    return np.uint16 if len(tokenizer) <= 2 ** 16 else np.int32


def backend_encode(tokenizer, texts_a, texts_b, max_seq_len):
    """(ids, token types) of a chunk, one list per row, straight from a fast tokenizer's Rust
    backend: what tokenizer(..., truncation=True) gives (the same call underneath, longest_first
    truncation, special tokens added), without building the Python dicts and attention masks, and
    without character offsets (encode_batch_fast)."""
    backend = tokenizer.backend_tokenizer
    backend.enable_truncation(max_seq_len, strategy="longest_first", direction=tokenizer.truncation_side)
    backend.no_padding()
    batch = texts_a if texts_b is None else list(zip(texts_a, texts_b))
    encodings = backend.encode_batch_fast(batch, add_special_tokens=True)
    # as transformers does: token types only for models that take them (DistilBERT does not)
    with_types = "token_type_ids" in tokenizer.model_input_names
    return [e.ids for e in encodings], [e.type_ids for e in encodings] if with_types else None


def window_stride(data_cfg):
    """data.window_stride when data.long_texts is windows, else None (truncate)."""
    return data_cfg["window_stride"] if data_cfg["long_texts"] == "windows" else None


def check_window_room(tokenizer, examples, max_seq_len, stride):
    """Each window must hold more than `stride` tokens of text beside the special tokens (and, in
    a pair, the whole first text), or it could never move on (the tokenizer would panic)."""
    pair = examples.texts_b is not None
    room = max_seq_len - tokenizer.num_special_tokens_to_add(pair=pair)
    if not pair:
        if room <= stride:
            raise DataError(f"data.window_stride {stride} leaves a window of module.max_seq_len {max_seq_len} "
                            f"no room to move on ({room} tokens for text); lower the stride")
        return
    for start in range(0, len(examples.texts_a), ENCODE_CHUNK):
        firsts = tokenizer(examples.texts_a[start:start + ENCODE_CHUNK], add_special_tokens=False)["input_ids"]
        for i, first in enumerate(firsts, start=start):
            if room - len(first) <= stride:
                raise DataError(f"{examples.path}: example {i + 1}: its first text ({len(first)} tokens) leaves "
                                f"{max(0, room - len(first))} of module.max_seq_len {max_seq_len} for windows of "
                                f"the second text, which must be more than data.window_stride {stride}; "
                                f"raise module.max_seq_len or lower the stride")


def dropped_by_truncation(encoded, stride, specials):
    """The share of a windowed split's text tokens that truncation at the same max_seq_len would
    not have kept: a document's first window is what truncation keeps, each later window adds its
    length less the specials and the stride it repeats. (A pair's first text, repeated in every
    window, counts as new text in each: the share is a lower bound there.)"""
    lengths = encoded.lengths.astype(np.float64)
    first = np.r_[True, encoded.documents[1:] != encoded.documents[:-1]]
    kept = (lengths[first] - specials).sum()
    total = kept + (lengths[~first] - specials - stride).sum()
    return float(1 - kept / total) if total > 0 else 0.0


def cap_windows(encoded, max_windows):
    """A training split with at most max_windows windows per document, spread evenly over it
    (its first and last among them), so a huge document cannot fill an epoch."""
    if encoded.documents is None or max_windows is None:
        return encoded
    starts = np.searchsorted(encoded.documents, np.arange(encoded.num_documents))
    counts = np.diff(np.r_[starts, len(encoded)])
    if counts.max(initial=0) <= max_windows:
        return encoded
    keep = [start + np.unique(np.round(np.linspace(0, count - 1, min(count, max_windows))).astype(np.int64))
            for start, count in zip(starts, counts)]
    return encoded.subset(np.concatenate(keep))


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


def padded(flat, offsets, indices, width, value):
    """Rows `indices` of a flat token array as one (rows, width) int64 array, padded with value,
    and the mask of its real tokens; gathered with one index array, not row by row."""
    starts, lengths = offsets[indices], offsets[indices + 1] - offsets[indices]
    real = np.arange(width) < lengths[:, None]
    out = np.full((len(indices), width), value, dtype=np.int64)
    out[real] = flat[(starts[:, None] + np.arange(width))[real]]
    return out, real


def collate(encoded, indices, pad_token_id, pad_to_multiple_of=1):
    """A batch padded to its own longest sequence (rounded up to pad_to_multiple_of: a compiled
    model then sees few distinct shapes); labels included when the data has them."""
    indices = np.asarray(indices, dtype=np.int64)
    longest = int((encoded.offsets[indices + 1] - encoded.offsets[indices]).max())
    width = -(-longest // pad_to_multiple_of) * pad_to_multiple_of  # rounded up to the multiple
    input_ids, real = padded(encoded.ids, encoded.offsets, indices, width, pad_token_id)
    batch = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(real.astype(np.int64))}
    if encoded.token_type_ids is not None:
        batch["token_type_ids"] = torch.from_numpy(padded(encoded.token_type_ids, encoded.offsets, indices, width, 0)[0])
    if encoded.labels is not None:
        batch["labels"] = torch.from_numpy(np.ascontiguousarray(encoded.labels[indices]))
    return batch
