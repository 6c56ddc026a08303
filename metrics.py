"""Evaluation metrics for sequence classification, multi-label classification and regression, in plain numpy.

Usage:
    metrics = compute_metrics(predictions, labels, label_names)   # classification
    metrics = compute_metrics(scores, targets, None)               # regression (one output)
    metrics = multilabel_metrics(probabilities >= thresholds, labels, label_names)  # (examples, labels) 0/1
    thresholds = best_thresholds(val_probabilities, val_labels)    # per label, the F1-best on validation
    headline = metrics["acc_and_f1"]      # module.metric names a key of the result
    scores = calibration_metrics(probabilities, labels)            # ece, brier, nll of (examples, classes)
    scores, per_label = multilabel_calibration_metrics(probabilities, labels, label_names)
    coverage, covered_acc = selective_accuracy(confidences, correct, 0.6)   # abstaining below 0.6

Names are explicit: `f1_macro` is the unweighted mean of per-class F1, `f1_weighted` weights each
class by its support (the weighted one is not "the" F1: it hides a poor minority class). Every edge case
(a class never predicted, a single class present, constant predictions) gives a defined value
instead of a NaN and a warning: a ratio whose denominator is zero is 0. In multi-label metrics each
label is a yes / no question of its own; `hamming_loss` is the one key where lower is better.
Calibration asks whether a probability means what it says: of the predictions made with confidence
0.8, are 80% right? `ece` (lower is better, as `brier` and `nll`) measures the gap in equal-width bins.
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


def multilabel_counts(predictions, labels, axis):
    """True positives, predicted positives and true positives of 0/1 arrays, summed over axis (None: all)."""
    return (predictions & labels).sum(axis=axis), predictions.sum(axis=axis), labels.sum(axis=axis)


def multilabel_metrics(predictions, labels, label_names):
    """Metrics of multi-label predictions: predictions and labels are (examples, labels) 0/1 arrays.

    f1_micro pools every (example, label) decision; f1_macro and f1_weighted average the per-label F1
    as classification does; f1_samples averages over examples the F1 of each example's predicted label
    set against its true one. An example with no true and no predicted label scores 0 in f1_samples (a
    zero denominator is 0, as scikit-learn's zero_division=0), though subset_acc counts it an exact match.
    hamming_loss is the fraction of wrong (example, label) decisions.
    """
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    shape = (len(predictions), len(label_names))
    if predictions.shape != shape or labels.shape != shape or not np.isin([predictions, labels], (0, 1)).all():
        raise ValueError(f"multi-label predictions {predictions.shape} and labels {labels.shape} must be "
                         f"0/1 arrays of shape (examples, {len(label_names)} labels)")
    predictions, labels = predictions.astype(bool), labels.astype(bool)
    precision, recall, f1 = precision_recall_f1(*multilabel_counts(predictions, labels, axis=0))
    support = labels.sum(axis=0)
    f1_macro, f1_weighted = macro_and_weighted(f1, support)
    f1_per_example = precision_recall_f1(*multilabel_counts(predictions, labels, axis=1))[2]
    exact_matches = (predictions == labels).all(axis=1).sum()
    return {
        "f1_micro": float(precision_recall_f1(*multilabel_counts(predictions, labels, axis=None))[2]),
        "f1_macro": f1_macro,
        "f1_weighted": f1_weighted,
        "f1_samples": float(safe_divide(f1_per_example.sum(), len(labels))),
        "subset_acc": float(safe_divide(exact_matches, len(labels))),
        "hamming_loss": float(safe_divide((predictions != labels).sum(), labels.size)),
        "per_label": score_table(label_names, precision, recall, f1, support),
    }


def best_thresholds(probabilities, labels, candidates=None):
    """Each label's threshold, among candidates, that maximises its F1 on these examples.

    probabilities and labels are (examples, labels); a label is predicted where probability >= threshold.
    The default candidates are 0.05, 0.10, ..., 0.95: a coarse grid, so a threshold is not fitted to the
    exact score of one validation example. Ties go to the candidate nearest 0.5 (the lower of two equally
    near), so a label whose F1 is flat, e.g. one with no positive example, keeps the usual 0.5.
    """
    probabilities, labels = np.asarray(probabilities), np.asarray(labels).astype(bool)
    if probabilities.ndim != 2 or probabilities.shape != labels.shape:
        raise ValueError(f"probabilities {probabilities.shape} and labels {labels.shape} must both be "
                         "(examples, labels)")
    candidates = np.unique(np.arange(1, 20) / 20 if candidates is None else candidates)  # sorted
    # one row of per-label F1 per candidate; a loop over candidates keeps memory at examples x labels
    f1 = np.stack([precision_recall_f1(*multilabel_counts(probabilities >= t, labels, axis=0))[2]
                   for t in candidates])
    distance = np.where(f1 == f1.max(axis=0), np.abs(candidates - 0.5)[:, None], np.inf)
    return candidates[distance.argmin(axis=0)]


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


# ---------------------------------------------------------------------------------------------
# calibration: do the probabilities mean what they say?

# the keys calibration and abstention add to an evaluation's metrics (evaluation.split_metrics)
CALIBRATION_KEYS = ("temperature", "ece", "ece_uncalibrated", "brier", "nll")
ABSTENTION_KEYS = ("coverage", "covered_acc")
# a probability of 0 would make the log-likelihood infinite: it is clipped to this (as scikit-learn did)
SMALLEST_PROBABILITY = 1e-15


def reliability(confidences, outcomes, bins=15):
    """A reliability diagram's bars: confidences in [0, 1] fall into `bins` equal-width bins (each
    [low, high), the last one closed); per bin, the number of examples, their mean confidence and
    their mean outcome (1 for a right prediction, or a label that is present; 0 otherwise)."""
    confidences, outcomes = np.asarray(confidences, dtype=np.float64), np.asarray(outcomes, dtype=np.float64)
    which = np.minimum((confidences * bins).astype(np.int64), bins - 1)
    counts = np.bincount(which, minlength=bins)
    return (counts, safe_divide(np.bincount(which, confidences, bins), counts),
            safe_divide(np.bincount(which, outcomes, bins), counts))


def expected_calibration_error(confidences, outcomes, bins=15):
    """ECE (Naeini et al. 2015, Guo et al. 2017): the gap between mean outcome and mean confidence
    of each bin of reliability(), weighted by the bin's share of the examples. 0: every bin is right."""
    counts, confidence, accuracy = reliability(confidences, outcomes, bins)
    return float(safe_divide(counts @ np.abs(accuracy - confidence), counts.sum()))


def calibration_metrics(probabilities, labels, bins=15):
    """ECE of the top probability (confidence) against whether that class is right, the Brier score
    (squared distance to the one-hot truth, summed over the classes as Brier 1950 did: 0 is perfect, 2
    the worst) and NLL (the mean of -log of the true class's probability) of (examples, classes)
    probabilities and class ids."""
    probabilities, labels = np.asarray(probabilities, dtype=np.float64), np.asarray(labels)
    if not len(labels):
        return {"ece": 0.0, "brier": 0.0, "nll": 0.0}
    rows = np.arange(len(labels))
    truth = np.zeros_like(probabilities)
    truth[rows, labels] = 1
    correct = probabilities.argmax(axis=1) == labels
    return {"ece": expected_calibration_error(probabilities.max(axis=1), correct, bins),
            "brier": float(((probabilities - truth) ** 2).sum(axis=1).mean()),
            "nll": float(-np.log(np.maximum(probabilities[rows, labels], SMALLEST_PROBABILITY)).mean())}


def multilabel_calibration_metrics(probabilities, labels, label_names, bins=15):
    """Each label's ECE (its probability against whether the label is there: the number a user
    acts on), Brier score (mean squared difference) and NLL (binary cross-entropy) of (examples,
    labels) probabilities and 0/1 labels: (their means over the labels, {label: its three})."""
    probabilities, labels = np.asarray(probabilities, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    per_label = {}
    for i, name in enumerate(label_names):
        p, y = probabilities[:, i], labels[:, i]
        clipped = np.clip(p, SMALLEST_PROBABILITY, 1 - SMALLEST_PROBABILITY)
        per_label[name] = {"ece": expected_calibration_error(p, y, bins),
                           "brier": float(np.mean((p - y) ** 2)) if len(y) else 0.0,
                           "nll": float(-np.mean(y * np.log(clipped) + (1 - y) * np.log(1 - clipped))) if len(y) else 0.0}
    means = {key: float(np.mean([row[key] for row in per_label.values()])) for key in ("ece", "brier", "nll")}
    return means, per_label


def selective_accuracy(confidences, correct, threshold):
    """Abstaining below threshold: (coverage, the share of examples answered; accuracy on those)."""
    answered = np.asarray(confidences) >= threshold
    correct = np.asarray(correct, dtype=bool)
    return float(safe_divide(answered.sum(), len(answered))), float(safe_divide((correct & answered).sum(), answered.sum()))


def risk_coverage(confidences, correct):
    """The risk-coverage curve (Geifman and El-Yaniv 2017): answering only the k most confident
    examples, k = 1 .. n, (coverage k / n, risk: the error rate among those k). A model whose
    confidence ranks its errors last has a curve that stays low until high coverage."""
    order = np.argsort(-np.asarray(confidences, dtype=np.float64), kind="stable")
    errors = np.cumsum(~np.asarray(correct, dtype=bool)[order])
    answered = np.arange(1, len(order) + 1)
    return answered / max(len(order), 1), errors / answered


def format_report(metrics):
    """A human-readable table: headline numbers, calibration and abstention (when measured), then
    per-class (or per-label) precision / recall / F1 (multi-label: each label's threshold and temperature)."""
    scalars = {k: v for k, v in metrics.items() if isinstance(v, float) and k not in CALIBRATION_KEYS + ABSTENTION_KEYS}
    lines = ["  ".join(f"{k} {v:.4f}" for k, v in scalars.items())]
    if "ece" in metrics:
        temperature = "per label" if isinstance(metrics["temperature"], list) else f"{metrics['temperature']:.4f}"
        lines.append(f"calibration: temperature {temperature}  ece {metrics['ece']:.4f} (uncalibrated "
                     f"{metrics['ece_uncalibrated']:.4f})  "
                     f"brier {metrics['brier']:.4f}  nll {metrics['nll']:.4f}")
    if "coverage" in metrics:
        lines.append(f"abstention: coverage {metrics['coverage']:.4f}  covered_acc {metrics['covered_acc']:.4f}")
    kind = "label" if "per_label" in metrics else "class"
    table = metrics.get(f"per_{kind}")
    if table:
        width = max(10, *(len(name) for name in table))
        thresholds = all("threshold" in row for row in table.values())  # multi-label decisions
        temperatures = all("temperature" in row for row in table.values())
        lines.append(f"{kind:<{width}} precision  recall      f1  support" + "  threshold" * thresholds
                     + "  temperature" * temperatures)
        for name, row in table.items():
            lines.append(f"{name:<{width}} {row['precision']:9.4f} {row['recall']:7.4f} "
                         f"{row['f1']:7.4f} {row['support']:8d}" + (f"  {row['threshold']:9.2f}" if thresholds else "")
                         + (f"  {row['temperature']:11.4f}" if temperatures else ""))
    return "\n".join(lines)
