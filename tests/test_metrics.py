"""Metrics on examples small enough to work out by hand (the numbers are derived in comments)."""
import math
import warnings

import numpy as np
import pytest

from metrics import (
    average_ranks,
    best_thresholds,
    compute_metrics,
    confusion_matrix,
    format_report,
    matthews_corrcoef,
    multilabel_metrics,
    pearson,
    spearman,
)

NAMES = ["a", "b", "c"]
# true:  a a a a b b c c     (support 4, 2, 2)
# pred:  a a a b b b c a
LABELS = [0, 0, 0, 0, 1, 1, 2, 2]
PREDS = [0, 0, 0, 1, 1, 1, 2, 0]


@pytest.fixture(autouse=True)
def numpy_warnings_are_errors():
    """A metric that divides by zero or takes the sqrt of a negative number fails the test."""
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        yield


def test_confusion_matrix_rows_are_true_columns_predicted():
    assert confusion_matrix(PREDS, LABELS, 3).tolist() == [[3, 1, 0],
                                                           [0, 2, 0],
                                                           [1, 0, 1]]


def test_accuracy_macro_and_weighted_f1_by_hand():
    m = compute_metrics(np.array(PREDS), np.array(LABELS), NAMES)
    assert m["acc"] == pytest.approx(6 / 8)
    # precision = diagonal / column sums (4, 3, 1); recall = diagonal / row sums (4, 2, 2)
    # a: P 3/4 R 3/4 F1 3/4;  b: P 2/3 R 1 F1 4/5;  c: P 1 R 1/2 F1 2/3
    f1 = [3 / 4, 4 / 5, 2 / 3]
    assert m["f1_macro"] == pytest.approx(sum(f1) / 3)                     # 0.7389
    assert m["f1_weighted"] == pytest.approx((4 * f1[0] + 2 * f1[1] + 2 * f1[2]) / 8)  # 0.7417
    assert m["f1_macro"] != pytest.approx(m["f1_weighted"])
    assert m["acc_and_f1"] == pytest.approx((6 / 8 + sum(f1) / 3) / 2)


def test_per_class_precision_recall_f1_support_by_hand():
    per_class = compute_metrics(np.array(PREDS), np.array(LABELS), NAMES)["per_class"]
    assert list(per_class) == NAMES
    assert per_class["a"] == pytest.approx({"precision": 0.75, "recall": 0.75, "f1": 0.75, "support": 4})
    assert per_class["b"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert per_class["c"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert all(isinstance(row["support"], int) for row in per_class.values())


def test_multiclass_mcc_by_hand():
    # Gorodkin: (correct * n - sum_k pred_k * true_k) / sqrt(n^2 - sum pred_k^2) / sqrt(n^2 - sum true_k^2)
    # correct 6, n 8, pred (4, 3, 1), true (4, 2, 2): (48 - 24) / sqrt(64 - 26) / sqrt(64 - 24)
    expected = 24 / math.sqrt(38) / math.sqrt(40)
    assert compute_metrics(np.array(PREDS), np.array(LABELS), NAMES)["mcc"] == pytest.approx(expected)


def test_binary_mcc_by_hand():
    labels = [1, 1, 1, 0, 0, 0, 0, 1]
    preds = [1, 1, 0, 0, 0, 1, 0, 1]
    tp, tn, fp, fn = 3, 3, 1, 1
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert expected == 0.5
    assert compute_metrics(np.array(preds), np.array(labels), ["no", "yes"])["mcc"] == pytest.approx(0.5)
    # perfectly wrong is -1, perfect is +1
    assert matthews_corrcoef(confusion_matrix([1, 0, 1, 0], [0, 1, 0, 1], 2)) == pytest.approx(-1.0)
    assert matthews_corrcoef(confusion_matrix([1, 0, 1, 0], [1, 0, 1, 0], 2)) == pytest.approx(1.0)


def test_agrees_with_scikit_learn_on_random_predictions():
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    labels, preds = rng.integers(0, 4, 300), rng.integers(0, 4, 300)
    preds[:100] = labels[:100]  # better than chance, so the numbers are not all near 0
    m = compute_metrics(preds, labels, list("wxyz"))
    assert m["acc"] == pytest.approx(sklearn.accuracy_score(labels, preds))
    assert m["f1_macro"] == pytest.approx(sklearn.f1_score(labels, preds, average="macro"))
    assert m["f1_weighted"] == pytest.approx(sklearn.f1_score(labels, preds, average="weighted"))
    assert m["mcc"] == pytest.approx(sklearn.matthews_corrcoef(labels, preds))
    assert m["confusion_matrix"] == sklearn.confusion_matrix(labels, preds).tolist()


# -- regression ----------------------------------------------------------------------------------


def test_pearson_by_hand():
    # deviations from the means (2.5, 5): x (-1.5, -.5, .5, 1.5), y (-3, -1, 0, 4)
    # sum dx*dy = 11, sum dx^2 = 5, sum dy^2 = 26
    assert pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(5 * 26))


def test_spearman_with_ties_by_hand():
    # tied values share the mean of their ranks: x ranks (1, 2.5, 2.5, 4), y ranks (1, 3, 2, 4)
    assert average_ranks([1, 2, 2, 3]).tolist() == [1, 2.5, 2.5, 4]
    assert average_ranks([3.0, 1.0, 3.0, 3.0, 0.5]).tolist() == [4, 2, 4, 4, 1]
    # rank deviations: x (-1.5, 0, 0, 1.5), y (-1.5, .5, -.5, 1.5): 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))


def test_spearman_is_one_for_any_increasing_relation():
    x = [1, 2, 3, 4, 5]
    y = [1, 8, 27, 64, 125]
    assert spearman(x, y) == pytest.approx(1.0)
    assert pearson(x, y) < 0.99
    assert spearman(x, y[::-1]) == pytest.approx(-1.0)


def test_regression_metrics():
    m = compute_metrics(np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 4.0, 5.0, 9.0]), None)
    assert m["pearson"] == pytest.approx(11 / math.sqrt(130))
    assert m["spearman"] == pytest.approx(1.0)
    assert m["pcc_and_scc"] == pytest.approx((11 / math.sqrt(130) + 1) / 2)
    assert m["mse"] == pytest.approx((1 + 4 + 4 + 25) / 4)


# -- edge cases: defined values, no warnings (see the autouse fixture) ----------------------------


def test_class_never_predicted_scores_zero_not_nan():
    m = compute_metrics(np.array([0, 0, 1, 1]), np.array([0, 2, 1, 2]), NAMES)
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert m["acc"] == 0.5
    # a: P 1/2 R 1 F1 2/3;  b: P 1/2 R 1 F1 2/3;  c: never predicted, F1 0
    assert m["f1_macro"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    assert all(math.isfinite(v) for v in (m["f1_macro"], m["f1_weighted"], m["mcc"]))


def test_single_class_present():
    m = compute_metrics(np.array([1, 1, 1]), np.array([1, 1, 1]), ["neg", "pos"])
    assert m["acc"] == 1.0
    assert m["per_class"]["pos"]["f1"] == 1.0
    assert m["per_class"]["neg"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["f1_weighted"] == 1.0      # weighted by support: the absent class weighs nothing
    assert m["f1_macro"] == 0.5         # macro: the absent class counts as a class scoring 0
    assert m["mcc"] == 0.0              # both sides constant: no correlation to measure


def test_constant_predictions():
    m = compute_metrics(np.array([0, 0, 0, 0]), np.array([0, 1, 0, 1]), ["neg", "pos"])
    assert m["acc"] == 0.5
    assert m["mcc"] == 0.0
    assert m["per_class"]["pos"]["precision"] == 0.0
    r = compute_metrics(np.array([3.0, 3.0, 3.0]), np.array([1.0, 2.0, 3.0]), None)
    assert r["pearson"] == 0.0 and r["spearman"] == 0.0 and r["pcc_and_scc"] == 0.0
    assert r["mse"] == pytest.approx((4 + 1 + 0) / 3)


def test_a_single_example():
    m = compute_metrics(np.array([1]), np.array([0]), ["neg", "pos"])
    assert m["acc"] == 0.0 and m["mcc"] == 0.0 and m["f1_macro"] == 0.0
    r = compute_metrics(np.array([0.5]), np.array([1.0]), None)
    assert r["pearson"] == 0.0 and r["spearman"] == 0.0 and r["mse"] == 0.25


def test_report_has_a_row_per_class():
    report = format_report(compute_metrics(np.array(PREDS), np.array(LABELS), NAMES))
    lines = report.splitlines()
    assert "acc 0.7500" in lines[0] and "f1_macro 0.7389" in lines[0]
    assert lines[1].split() == ["class", "precision", "recall", "f1", "support"]
    assert lines[3].split() == ["b", "0.6667", "1.0000", "0.8000", "2"]


# -- multi-label: (examples, labels) 0/1 arrays ---------------------------------------------------

TOPICS = ["sport", "politics", "tech"]
#                     true         predicted
ML_LABELS = np.array([[1, 0, 0],  # 1 0 0   exact
                      [1, 1, 0],  # 1 0 0   politics missed
                      [0, 1, 1],  # 1 1 1   sport extra
                      [0, 0, 0],  # 0 0 0   exact, and no label at all
                      [1, 0, 1]])  # 0 0 1  sport missed
ML_PREDS = np.array([[1, 0, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0], [0, 0, 1]])


def test_multilabel_per_label_scores_by_hand():
    per_label = multilabel_metrics(ML_PREDS, ML_LABELS, TOPICS)["per_label"]
    assert list(per_label) == TOPICS
    # columns: sport tp 2 of 3 predicted, 3 true;  politics tp 1 of 1, 2 true;  tech tp 2 of 2, 2 true
    assert per_label["sport"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    assert per_label["politics"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert per_label["tech"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}
    assert all(isinstance(row["support"], int) for row in per_label.values())


def test_multilabel_averages_by_hand():
    m = multilabel_metrics(ML_PREDS, ML_LABELS, TOPICS)
    # micro pools the cells: tp 2 + 1 + 2 = 5, predicted 3 + 1 + 2 = 6, true 3 + 2 + 2 = 7: 2 * 5 / 13
    assert m["f1_micro"] == pytest.approx(10 / 13)
    assert m["f1_macro"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)                  # 7/9 = 0.7778
    assert m["f1_weighted"] == pytest.approx((3 * 2 / 3 + 2 * 2 / 3 + 2 * 1) / 7)   # 16/21 = 0.7619
    # per example, 2 tp / (predicted + true): 2/2, 2/3, 4/5, 0 (nothing true, nothing predicted), 2/3
    assert m["f1_samples"] == pytest.approx((1 + 2 / 3 + 4 / 5 + 0 + 2 / 3) / 5)    # 47/75
    assert m["subset_acc"] == pytest.approx(2 / 5)      # examples 0 and 3, the empty one included
    assert m["hamming_loss"] == pytest.approx(3 / 15)   # 3 wrong cells of 5 x 3
    assert [k for k, v in m.items() if not isinstance(v, float)] == ["per_label"]


def test_multilabel_label_never_predicted_and_label_never_present():
    labels = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0]])
    preds = np.array([[1, 0, 0], [0, 0, 0], [1, 0, 0]])
    m = multilabel_metrics(preds, labels, TOPICS)
    assert m["per_label"]["politics"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["per_label"]["tech"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    # sport: tp 1 of 2 predicted, 2 true: F1 1/2; macro counts tech as a label scoring 0, weighted not
    assert m["f1_macro"] == pytest.approx(0.5 / 3)
    assert m["f1_weighted"] == pytest.approx((2 * 0.5 + 1 * 0) / 3)
    assert m["subset_acc"] == pytest.approx(1 / 3) and m["hamming_loss"] == pytest.approx(3 / 9)


def test_multilabel_examples_with_no_labels():
    nothing = np.zeros((4, 3), dtype=int)
    m = multilabel_metrics(nothing, nothing, TOPICS)
    # every answer right, yet no positive to find: F1 has a zero denominator everywhere, so 0
    assert m["f1_micro"] == m["f1_macro"] == m["f1_weighted"] == m["f1_samples"] == 0.0
    assert m["subset_acc"] == 1.0 and m["hamming_loss"] == 0.0
    # predicting a label on an empty example is wrong in every measure
    preds = nothing.copy()
    preds[0, 1] = 1
    m = multilabel_metrics(preds, nothing, TOPICS)
    assert m["f1_samples"] == 0.0 and m["subset_acc"] == 0.75 and m["hamming_loss"] == pytest.approx(1 / 12)
    assert m["per_label"]["politics"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_multilabel_all_correct_and_no_examples():
    m = multilabel_metrics(ML_LABELS[[0, 1, 2, 4]], ML_LABELS[[0, 1, 2, 4]], TOPICS)  # each with a label
    assert m["f1_micro"] == m["f1_macro"] == m["f1_weighted"] == m["f1_samples"] == m["subset_acc"] == 1.0
    assert m["hamming_loss"] == 0.0
    empty = multilabel_metrics(np.zeros((0, 3)), np.zeros((0, 3)), TOPICS)
    assert all(v == 0.0 for k, v in empty.items() if k != "per_label")


def test_multilabel_refuses_what_is_not_a_0_1_matrix_of_its_labels():
    with pytest.raises(ValueError, match="0/1 arrays of shape"):
        multilabel_metrics(ML_PREDS * 0.7, ML_LABELS, TOPICS)      # probabilities, not decisions
    with pytest.raises(ValueError, match="0/1 arrays of shape"):
        multilabel_metrics(ML_PREDS, ML_LABELS, TOPICS[:2])        # a name short
    with pytest.raises(ValueError, match="0/1 arrays of shape"):
        multilabel_metrics(ML_PREDS[:, 0], ML_LABELS[:, 0], ["sport"])  # one label needs a column


def test_multilabel_agrees_with_scikit_learn_on_random_predictions():
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    labels = (rng.random((300, 5)) < [0.5, 0.3, 0.1, 0.05, 0.4]).astype(int)  # rows with no label too
    preds = (rng.random((300, 5)) < 0.3).astype(int)
    preds[:100] = labels[:100]  # better than chance
    m = multilabel_metrics(preds, labels, list("vwxyz"))
    for average in ("micro", "macro", "weighted", "samples"):
        # zero_division=0 is our rule (and the value of sklearn's default, which warns)
        assert m[f"f1_{average}"] == pytest.approx(
            sklearn.f1_score(labels, preds, average=average, zero_division=0)), average
    assert m["subset_acc"] == pytest.approx(sklearn.accuracy_score(labels, preds))
    assert m["hamming_loss"] == pytest.approx(sklearn.hamming_loss(labels, preds))
    precision, recall, f1, support = sklearn.precision_recall_fscore_support(labels, preds, zero_division=0)
    assert [row["precision"] for row in m["per_label"].values()] == pytest.approx(precision)
    assert [row["recall"] for row in m["per_label"].values()] == pytest.approx(recall)
    assert [row["f1"] for row in m["per_label"].values()] == pytest.approx(f1)
    assert [row["support"] for row in m["per_label"].values()] == support.tolist()


def test_best_thresholds_separate_each_label_where_it_can():
    #              label 0 true    label 1 true
    probs = np.array([[0.10, 0.68],  # 0  0
                      [0.27, 0.50],  # 0  0
                      [0.32, 0.72],  # 1  1
                      [0.60, 0.95],  # 1  1
                      [0.90, 0.10],  # 1  0
                      [0.20, 0.80]])  # 0  1
    labels = np.array([[0, 0], [0, 0], [1, 1], [1, 1], [1, 0], [0, 1]])
    # label 0: negatives up to 0.27, positives from 0.32: of the grid only 0.30 splits them
    # label 1: negatives up to 0.68, positives from 0.72: only 0.70
    thresholds = best_thresholds(probs, labels)
    assert thresholds.tolist() == [0.30, 0.70]
    # at 0.5 label 0 finds 2 of 3 (F1 4/5) and label 1 predicts 5 for 3 (F1 6/8); tuned, both are perfect
    assert multilabel_metrics(probs >= 0.5, labels, ["a", "b"])["f1_macro"] == pytest.approx((4 / 5 + 6 / 8) / 2)
    assert multilabel_metrics(probs >= thresholds, labels, ["a", "b"])["f1_macro"] == 1.0


def test_best_thresholds_ties_go_to_the_candidate_nearest_one_half():
    # label 0 positives 0.80 and 0.30, negatives 0.35 and 0.55: 2 tp / (predicted + 2 true) is
    #   t <= 0.30: 4 / 6;  0.35: 2 / 5;  0.40 - 0.55: 2 / 4;  0.60 - 0.80: 2 / 3;  above: 0
    # the best, 2/3, from 0.05 to 0.30 and from 0.60 to 0.80: 0.60 is nearest 0.5
    # label 1 perfectly separated anywhere in 0.15 - 0.90: 0.5 itself
    # label 2 has no positive example, so F1 is 0 at every threshold: 0.5, the usual one
    probs = np.array([[0.80, 0.9, 0.3], [0.30, 0.9, 0.6], [0.35, 0.1, 0.9], [0.55, 0.1, 0.2]])
    labels = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 0], [0, 0, 0]])
    assert best_thresholds(probs, labels).tolist() == [0.60, 0.50, 0.50]
    # candidates of one's own, in any order; of two equally near 0.5 the lower
    assert best_thresholds(probs, labels, candidates=[0.6, 0.4]).tolist() == [0.6, 0.4, 0.4]
    with pytest.raises(ValueError, match="must both be"):
        best_thresholds(probs[:, 0], labels[:, 0])


def test_report_has_a_row_per_label():
    report = format_report(multilabel_metrics(ML_PREDS, ML_LABELS, TOPICS))
    lines = report.splitlines()
    assert "f1_micro 0.7692" in lines[0] and "hamming_loss 0.2000" in lines[0]
    assert lines[1].split() == ["label", "precision", "recall", "f1", "support"]
    assert lines[3].split() == ["politics", "1.0000", "0.5000", "0.6667", "2"]


def test_report_shows_the_thresholds_the_decisions_were_made_at():
    metrics = multilabel_metrics(ML_PREDS, ML_LABELS, TOPICS)
    for row, threshold in zip(metrics["per_label"].values(), [0.35, 0.5, 0.9]):
        row["threshold"] = threshold
    lines = format_report(metrics).splitlines()
    assert lines[1].split() == ["label", "precision", "recall", "f1", "support", "threshold"]
    assert lines[3].split() == ["politics", "1.0000", "0.5000", "0.6667", "2", "0.50"]
