"""Metrics on examples small enough to work out by hand (the numbers are derived in comments)."""
import math
import warnings

import numpy as np
import pytest

from metrics import (average_ranks, compute_metrics, confusion_matrix, format_report,
                     matthews_corrcoef, pearson, spearman)

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
