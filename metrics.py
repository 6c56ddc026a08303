"""Evaluation metrics for sequence classification and regression, in plain numpy.

Usage:
    metrics = compute_metrics(predictions, labels, label_names)   # classification
    metrics = compute_metrics(scores, targets, None)               # regression (one output)
    headline = metrics["acc_and_f1"]      # module.metric names a key of the result

Names are explicit: `f1_macro` is the unweighted mean of per-class F1, `f1_weighted` weights each
class by its support (the original system called the weighted one plain "f1"). Every edge case
(a class never predicted, a single class present, constant predictions) gives a defined value
instead of a NaN and a warning: a ratio whose denominator is zero is 0.
"""
import numpy as np

def safe_divide(numerator, denominator):
    """Elementwise numerator / denominator, with 0 where the denominator is 0."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    out = np.zeros(np.broadcast(numerator, denominator).shape)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def confusion_matrix(predictions, labels, num_classes):
    """matrix[i, j] = number of examples of true class i predicted as class j."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels), np.asarray(predictions)), 1)
    return matrix


def precision_recall_f1(true_positives, predicted, support):
    """Precision, recall and F1 from counts (arrays or scalars); predicted and support count the positives."""
    precision = safe_divide(true_positives, predicted)
    recall = safe_divide(true_positives, support)
    # the harmonic mean of precision and recall, from the integer counts so equal scores compare equal
    f1 = safe_divide(2 * np.asarray(true_positives), np.asarray(predicted) + support)
    return precision, recall, f1


def per_class_scores(matrix):
    """Precision, recall, F1 and support of every class, from a confusion matrix."""
    support = matrix.sum(axis=1)
    return (*precision_recall_f1(np.diag(matrix), matrix.sum(axis=0), support), support)


def score_table(names, precision, recall, f1, support):
    """{name: {precision, recall, f1, support}} in plain floats and ints, ready for JSON."""
    return {name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(names, precision, recall, f1, support)}


def macro_and_weighted(f1, support):
    """The unweighted mean of per-class F1, and its mean weighted by support."""
    return float(f1.mean()), float(safe_divide(f1 @ support, support.sum()))


def matthews_corrcoef(matrix):
    """Multiclass Matthews correlation (Gorodkin's R_K); 0 when either side is constant."""
    matrix = matrix.astype(np.float64)
    n = matrix.sum()
    correct = np.trace(matrix)
    predicted = matrix.sum(axis=0)
    true = matrix.sum(axis=1)
    numerator = correct * n - predicted @ true
    denominator = np.sqrt(n * n - predicted @ predicted) * np.sqrt(n * n - true @ true)
    return float(safe_divide(numerator, denominator))


def pearson(x, y):
    x = np.asarray(x, dtype=np.float64) - np.mean(x)
    y = np.asarray(y, dtype=np.float64) - np.mean(y)
    return float(safe_divide(x @ y, np.sqrt((x @ x) * (y @ y))))


def average_ranks(values):
    """Ranks starting at 1, ties sharing the mean of their ranks (as Spearman needs)."""
    values = np.asarray(values)
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # a new group starts wherever the sorted value changes
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values), dtype=np.float64)
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    return ranks


def spearman(x, y):
    return pearson(average_ranks(x), average_ranks(y))


def classification_metrics(predictions, labels, label_names):
    matrix = confusion_matrix(predictions, labels, len(label_names))
    precision, recall, f1, support = per_class_scores(matrix)
    acc = float(safe_divide(np.trace(matrix), matrix.sum()))
    f1_macro, f1_weighted = macro_and_weighted(f1, support)
    return {
        "acc": acc,
        "f1_macro": f1_macro,
        "f1_weighted": f1_weighted,
        "acc_and_f1": (acc + f1_macro) / 2,
        "mcc": matthews_corrcoef(matrix),
        "per_class": score_table(label_names, precision, recall, f1, support),
        "confusion_matrix": matrix.tolist(),
    }


def regression_metrics(scores, targets):
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    pcc, scc = pearson(scores, targets), spearman(scores, targets)
    return {
        "pearson": pcc,
        "spearman": scc,
        "pcc_and_scc": (pcc + scc) / 2,
        "mse": float(np.mean((scores - targets) ** 2)) if len(scores) else 0.0,
    }


def compute_metrics(predictions, labels, label_names):
    """All metrics of one evaluation; label_names None means regression."""
    if label_names is None:
        return regression_metrics(predictions, labels)
    return classification_metrics(predictions, labels, label_names)


def format_report(metrics):
    """A human-readable table: headline numbers, then per-class precision / recall / F1."""
    scalars = {k: v for k, v in metrics.items() if isinstance(v, float)}
    lines = ["  ".join(f"{k} {v:.4f}" for k, v in scalars.items())]
    if "per_class" in metrics:
        width = max(10, *(len(name) for name in metrics["per_class"]))
        lines.append(f"{'class':<{width}} precision  recall      f1  support")
        for name, row in metrics["per_class"].items():
            lines.append(f"{name:<{width}} {row['precision']:9.4f} {row['recall']:7.4f} "
                         f"{row['f1']:7.4f} {row['support']:8d}")
    return "\n".join(lines)
