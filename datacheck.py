"""Know your data: duplicate texts, texts whose rows disagree on the label, texts shared between files.

    keys = text_keys(examples.texts_a, examples.texts_b)                  # one int64 per row
    near = text_keys(examples.texts_a, examples.texts_b, normalised=True)  # case, spacing, punctuation ignored
    groups = duplicate_groups(keys)                  # [[0, 17], ...]: rows holding the same text
    groups = conflict_groups(keys, examples.labels)  # the same, where their labels differ
    in_a, in_b = shared(keys_a, keys_b)              # rows of each file whose text the other file holds
    line = leak_warning(train_examples, val_examples)   # trainer.py's one line, or None

A text is found by its hash: each row's text (for a sentence pair, both texts together, in order)
becomes one 64-bit number, and numpy sorts and compares those arrays instead of Python strings.
Two different texts share a hash with a chance of about rows^2 / 2^64, which is negligible.
Python's string hashes differ from process to process: keys are compared within one run, never stored.

normalise() is what "the same text" means once case, whitespace and punctuation are ignored:
casefolded, every Unicode punctuation character a space, runs of whitespace one space, no space at
either end ("Great movie!!" and "great  movie" are one text). Symbols (emoji, $, +) are kept:
they can carry the label.

trainer.py runs leak_warning on the rows it reads (splits.prepare_run); check_data.py reports all
of it, file by file, and crossval.py keeps the rows of one normalised text in one fold.
"""
import functools
import sys
import unicodedata

import numpy as np

# bytes.split() splits at [ \t\n\r\v\f]; str.split() also at these four ASCII separators
ASCII_SPACES = "\x1c\x1d\x1e\x1f"


@functools.cache
def punctuation():
    """Every Unicode punctuation character (categories Pc, Pd, Ps, Pe, Pi, Pf, Po): built once, when first needed."""
    return "".join(c for c in map(chr, range(sys.maxunicode + 1)) if unicodedata.category(c).startswith("P"))


@functools.cache
def tables():
    """(str.translate table: punctuation to space; bytes.translate table: the same for ASCII text)."""
    marks = punctuation()
    ascii_marks = "".join(c for c in marks if c.isascii()) + ASCII_SPACES
    return dict.fromkeys(map(ord, marks), " "), bytes.maketrans(ascii_marks.encode(), b" " * len(ascii_marks))


def normalise(text):
    """The text with case, whitespace and punctuation ignored (the module's docstring)."""
    return " ".join(text.translate(tables()[0]).casefold().split())


def normalise_all(texts):
    """[normalise(text) for text in texts], the same strings, faster: an ASCII text (most, in English
    data) goes through bytes.translate with a 256-byte table, not a lookup in a dict per character."""
    ascii_table = tables()[1]
    return [b" ".join(text.encode().translate(ascii_table).lower().split()).decode() if text.isascii()
            else normalise(text) for text in texts]


def text_keys(texts_a, texts_b=None, normalised=False):
    """One int64 per row: the hash of its text, or of its pair of texts (both sides, in order);
    normalised: of the texts after normalise()."""
    if normalised:
        texts_a = normalise_all(texts_a)
        texts_b = None if texts_b is None else normalise_all(texts_b)
    rows = texts_a if texts_b is None else zip(texts_a, texts_b)
    return np.fromiter(map(hash, rows), dtype=np.int64, count=len(texts_a))


def label_ids(labels):
    """One int64 per row that is equal exactly when two rows' labels are: the class id, the
    multi-label row of 0 / 1, or the regression target, numbered."""
    labels = np.asarray(labels)
    return np.unique(labels, axis=0 if labels.ndim == 2 else None, return_inverse=True)[1].reshape(-1)


def groups_of(keys, rows):
    """The rows (indices, ascending) of each key among the given rows, groups ordered by their first row."""
    if not len(rows):
        return []
    rows = rows[np.argsort(keys[rows], kind="stable")]  # stable: each group's rows stay in order
    starts = np.flatnonzero(np.r_[True, keys[rows][1:] != keys[rows][:-1]])
    groups = np.split(rows, starts[1:])
    return sorted((g.tolist() for g in groups), key=lambda g: g[0])


def duplicate_groups(keys):
    """[[row, row, ...], ...]: every set of two or more rows with the same key."""
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    return groups_of(keys, np.flatnonzero(counts[inverse] > 1))


def conflicting_keys(keys, labels):
    """The keys (sorted, unique) whose rows hold more than one distinct label."""
    ids = label_ids(labels)
    order = np.lexsort((ids, keys))
    k, ids = keys[order], ids[order]
    differ = (k[1:] == k[:-1]) & (ids[1:] != ids[:-1])
    return np.unique(k[1:][differ])


def conflict_groups(keys, labels):
    """[[row, ...], ...]: the rows of every text that carries more than one label."""
    return groups_of(keys, np.flatnonzero(np.isin(keys, conflicting_keys(keys, labels))))


def shared(keys_a, keys_b):
    """(rows of a whose key b holds, rows of b whose key a holds): boolean masks."""
    return np.isin(keys_a, keys_b), np.isin(keys_b, keys_a)


def leak_warning(train, val, cached=()):
    """trainer.py's check of the rows it read (data.Examples; None where there is no file or it
    was not read): one line, or None when there is nothing to say. It counts the validation texts
    also in training, exactly and normalised, and the texts with two labels among the rows of both
    files. cached: the paths of files mapped from the token cache instead of read, which a line
    names when it could not compare them with a file that was read."""
    read = [e for e in (train, val) if e is not None]
    if not read:
        return None
    exact = [text_keys(e.texts_a, e.texts_b) for e in read]
    conflicts = len(conflicting_keys(np.concatenate(exact), np.concatenate([e.labels for e in read])))
    findings = [f"{conflicts} texts have different labels in different rows"] if conflicts else []
    if train is not None and val is not None:
        near = [text_keys(e.texts_a, e.texts_b, normalised=True) for e in read]
        leaked, near_leaked = shared(*exact)[1].sum(), shared(*near)[1].sum()
        if near_leaked:  # every exact match is a normalised one too
            findings.insert(0, f"{leaked} of the {len(val.texts_a)} validation texts are also in the training file "
                               f"({near_leaked} once case, whitespace and punctuation are ignored), so the "
                               f"validation metric may flatter the model")
    if findings:
        return f"warning: {', and '.join(findings)}; python check_data.py lists them"
    if cached:
        return (f"note: {', '.join(cached)} came from the token cache unread, so no leak between it and "
                f"{read[0].path} was looked for; python check_data.py compares every file")
    return None


# -- label issues: which given labels the out-of-fold probabilities doubt (crossval.py) ------------


def confident_thresholds(probs, labels):
    """Confident learning's per-class thresholds (Northcutt et al., 2021): the mean probability of
    class j over the rows labelled j; infinite for a class no row has. A class the model is less
    sure of (a rare one) gets a lower bar, so its rows are not all taken for errors."""
    k = probs.shape[1]
    counts = np.bincount(labels, minlength=k)
    sums = np.bincount(labels, weights=probs[np.arange(len(labels)), labels], minlength=k)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.inf)


def label_issues(probs, labels):
    """(score, suggested class, issue) of every row of out-of-sample probabilities (rows, classes)
    and given class ids. score = 1 - the probability of the given label (1 - self-confidence):
    it orders every row. suggested: the likeliest class among those at or above their confident
    threshold, else the likeliest. issue: confident learning counts the row off the diagonal of
    its confident joint: a class other than the given one is at or above its threshold and the
    likeliest such."""
    thresholds = confident_thresholds(probs, labels)
    above = probs >= thresholds
    confident = np.where(above, probs, -1.0).argmax(axis=1)
    suggested = np.where(above.any(axis=1), confident, probs.argmax(axis=1))
    issue = above.any(axis=1) & (confident != labels)
    return 1 - probs[np.arange(len(labels)), labels], suggested, issue


def multilabel_issues(probs, labels):
    """label_issues of multi-label rows, each label a two-class question (absent, present): the
    row's score is its most doubted label's, its suggestion the given labels with every flagged
    one flipped, and it is an issue when any label is."""
    per_label = [label_issues(np.stack([1 - p, p], axis=1), y.astype(np.int64)) for p, y in zip(probs.T, labels.T)]
    scores, suggested, issues = (np.stack(parts, axis=1) for parts in zip(*per_label))
    return scores.max(axis=1), np.where(issues, suggested, labels).astype(labels.dtype), issues.any(axis=1)


def regression_issues(predictions, targets):
    """Regression's counterpart: score = the absolute error, the suggestion the prediction, an issue
    beyond three standard deviations of the errors (no class probabilities to be confident in)."""
    errors = predictions - targets
    return np.abs(errors), predictions, np.abs(errors) > 3 * errors.std()


def issue_order(scores, issues):
    """Rows, issues first, each part by score (highest first), ties by row."""
    return np.lexsort((np.arange(len(scores)), -scores, ~issues))
