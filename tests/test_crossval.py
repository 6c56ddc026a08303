"""crossval.py: folds stratified, disjoint and covering every row once (single-label, multi-label,
regression, pairs, near-duplicate texts kept together); the label-issue scores on hand-worked
numbers; bad input refused in one line before any fold starts; and end to end: out-of-fold
probabilities from the model that did not train on the row, flipped labels ranked above chance,
Ctrl-C and the same command going on."""
import csv
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from config import load_config
from conftest import (
    NEGATIVE,
    NEUTRAL,
    POSITIVE,
    ROOT,
    base_args,
    last_json_line,
    sentiment_rows,
    stderr_tail,
    write_csv,
    write_jsonl,
)
from crossval import assign_folds, dealt_folds, iterative_folds, main, units_of
from data import Examples
from datacheck import confident_thresholds, issue_order, label_issues, multilabel_issues, regression_issues

# -- folds (pure functions) ----------------------------------------------------------------------


def examples(texts, labels, texts_b=None):
    return Examples("train.csv", ["text", "label"], None, list(texts), texts_b, np.asarray(labels))


def check_partition(folds, k, n):
    """Every row in exactly one of k folds, every fold used."""
    assert folds.shape == (n,) and set(folds.tolist()) == set(range(k))


def test_single_label_folds_hold_each_class_to_within_one_row():
    rng = np.random.default_rng(0)
    labels = rng.choice(3, size=103, p=[0.6, 0.3, 0.1])
    folds = assign_folds(examples([f"text {i}" for i in range(103)], labels), "single_label", 5, seed=1)
    check_partition(folds, 5, 103)
    sizes = np.bincount(folds, minlength=5)
    assert sizes.max() - sizes.min() <= 1
    for c in range(3):
        per_fold = np.bincount(folds[labels == c], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1, (c, per_fold)
    # the seed decides, and decides alike every time
    again = assign_folds(examples([f"text {i}" for i in range(103)], labels), "single_label", 5, seed=1)
    other = assign_folds(examples([f"text {i}" for i in range(103)], labels), "single_label", 5, seed=2)
    assert (again == folds).all() and (other != folds).any()


def test_rows_of_one_normalised_text_share_a_fold():
    texts = [f"text {i}" for i in range(40)]
    texts[7], texts[30], texts[12] = "Good movie!", "good  movie", "GOOD MOVIE"
    folds = assign_folds(examples(texts, [i % 2 for i in range(40)]), "single_label", 4, seed=0)
    check_partition(folds, 4, 40)
    assert folds[7] == folds[30] == folds[12]


def test_units_follow_the_rows_not_the_hash_values_which_differ_between_processes():
    keys = np.array([50, -3, 50, 7, -3, 2**62])
    unit_of_row, first, sizes = units_of(keys)
    assert unit_of_row.tolist() == [0, 1, 0, 2, 1, 3] and first.tolist() == [0, 1, 3, 5] and sizes.tolist() == [2, 2, 1, 1]
    for remapped in (-keys, keys * 3 + 1, np.array([9, 100, 9, -8, 100, 0])):  # other values, the same equalities
        assert all((a == b).all() for a, b in zip(units_of(remapped), (unit_of_row, first, sizes)))


def test_a_pair_is_one_text_for_the_folds():
    texts_a = ["q"] * 20
    texts_b = [f"answer {i % 10}" for i in range(20)]  # each pair twice: rows i and i + 10
    folds = assign_folds(examples(texts_a, [i % 2 for i in range(20)], texts_b), "single_label", 5, seed=0)
    assert (folds[:10] == folds[10:]).all()
    check_partition(folds, 5, 20)


def test_dealt_folds_continue_the_turn_from_one_class_to_the_next():
    folds = dealt_folds(np.array([0, 0, 0, 1, 1, 1, 1]), 3, np.random.default_rng(0))
    assert sorted(np.bincount(folds).tolist()) == [2, 2, 3]
    assert sorted(folds[:3].tolist()) == [0, 1, 2]


def test_multilabel_folds_by_iterative_stratification_spread_every_label():
    rng = np.random.default_rng(3)
    labels = (rng.random((200, 5)) < [0.5, 0.3, 0.1, 0.05, 0.02]).astype(np.float32)
    folds = iterative_folds(labels, np.ones(200, dtype=np.int64), 4, np.random.default_rng(0))
    check_partition(folds, 4, 200)
    for label in range(5):
        per_fold = np.bincount(folds[labels[:, label] == 1], minlength=4)
        assert per_fold.max() - per_fold.min() <= 1, (label, per_fold)
    sizes = np.bincount(folds, minlength=4)
    assert sizes.max() - sizes.min() <= 2
    # a unit of several rows (one normalised text) weighs its rows
    folds = iterative_folds(np.array([[1], [1], [1], [1]]), np.array([3, 1, 1, 1]), 2, np.random.default_rng(0))
    assert sorted(np.bincount(folds).tolist()) == [1, 3]


def test_regression_folds_each_take_one_of_every_k_neighbouring_targets():
    targets = np.arange(30, dtype=np.float32)[::-1].copy()
    folds = assign_folds(examples([f"t{i}" for i in range(30)], targets), "regression", 3, seed=0)
    for block in range(10):  # targets 3b, 3b + 1, 3b + 2 fall in three different folds
        rows = np.flatnonzero((targets // 3) == block)
        assert sorted(folds[rows].tolist()) == [0, 1, 2]


# -- label issues (pure functions, hand-worked) -----------------------------------------------------


def test_confident_learning_thresholds_flag_and_self_confidence_ranks():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.6, 0.4], [0.3, 0.7]])
    labels = np.array([0, 0, 1, 1, 1])
    # class 0: mean of 0.9 and 0.2; class 1: mean of 0.3, 0.4 and 0.7
    assert confident_thresholds(probs, labels) == pytest.approx([0.55, 1.4 / 3])
    scores, suggested, issues = label_issues(probs, labels)
    assert scores == pytest.approx([0.1, 0.8, 0.7, 0.6, 0.3])
    assert suggested.tolist() == [0, 1, 0, 0, 1]
    assert issues.tolist() == [False, True, True, True, False]
    # flagged rows first, by score; then the rest by score
    assert issue_order(scores, issues).tolist() == [1, 2, 3, 4, 0]


def test_a_rare_class_gets_a_lower_bar_than_the_likeliest_class():
    # the model is never sure of class 1: 0.45 is high for it, so a row labelled 0 at 0.45 is flagged
    probs = np.array([[0.95, 0.05], [0.9, 0.1], [0.55, 0.45], [0.6, 0.4], [0.65, 0.35]])
    labels = np.array([0, 0, 0, 1, 1])
    _, suggested, issues = label_issues(probs, labels)
    assert issues.tolist() == [False, False, True, False, False] and suggested[2] == 1


def test_multilabel_issues_flip_the_doubted_labels_only():
    # label 0's bars: present 0.6 (mean of 0.9, 0.8, 0.1), absent 0.85 (of 1 - 0.1, 1 - 0.2): row 4's
    # label 0 is absent at 0.9, above its bar; label 1 is sure everywhere
    probs = np.array([[0.9, 0.1], [0.1, 0.9], [0.8, 0.2], [0.2, 0.7], [0.1, 0.95]])
    labels = np.array([[1, 0], [0, 1], [1, 0], [0, 1], [1, 1]], dtype=np.float32)
    scores, suggested, issues = multilabel_issues(probs, labels)
    assert issues.tolist() == [False, False, False, False, True]
    assert suggested[4].tolist() == [0, 1] and suggested[:4].tolist() == labels[:4].tolist()
    assert scores[4] == pytest.approx(0.9)


def test_regression_ranks_by_absolute_error_and_flags_beyond_three_deviations():
    targets = np.zeros(20)
    predictions = np.r_[np.full(19, 0.1), 5.0]
    scores, suggested, issues = regression_issues(predictions, targets)
    assert scores == pytest.approx(np.r_[np.full(19, 0.1), 5.0]) and suggested[19] == 5.0
    assert issues.tolist() == [False] * 19 + [True]  # errors' std is about 1.07: 5.0 is past 3 of them


# -- bad input: one line, before any fold starts (in process) ---------------------------------------


@pytest.fixture
def data(tmp_path):
    rng = random.Random(5)
    rows = []
    for i in range(48):
        label = ["negative", "positive"][i % 2]
        cue = POSITIVE if label == "positive" else NEGATIVE
        rows.append({"text": " ".join(rng.choice(NEUTRAL) for _ in range(3)) + f" {rng.choice(cue)} n{i}", "label": label})
    return write_csv(tmp_path / "train.csv", rows), write_csv(tmp_path / "val.csv", rows[:8])


def cv_args(tmp_path, model_dir, data, **overrides):
    return base_args(tmp_path, model_dir, *data, **{"crossval.dir": str(tmp_path / "cv"), "crossval.folds": 3,
                                                    "trainer.epochs": 2, **overrides})


@pytest.mark.parametrize("change, expected", [
    ({"crossval.folds": 1}, "crossval.folds is 1; it must be at least 2"),
    ({"crossval.folds": 60}, "crossval.folds 60 is more than the 48 distinct texts"),
    ({"crossval.nope": 1}, "unknown key 'crossval.nope'"),
    ({"ckpt.resume": "auto"}, "ckpt.resume is set by crossval.py for each fold"),
    ({"data.predict_filepath": "x.csv"}, "data.predict_filepath is set by crossval.py"),
    ({"data.train_filepath": "null", "model.model_path": "m"}, "data.train_filepath is null"),
    ({"data.train_filepath": "nope.csv"}, "nope.csv: file not found"),
    ({"data.labels_list": "[negative, neutral]"}, "label 'positive' is not in data.labels_list"),
    ({"trainer.train_batch_size": 0}, "trainer.train_batch_size is 0; it must be positive"),
])
def test_bad_input_is_one_line_before_any_fold(tmp_path, capsys, data, change, expected):
    assert main(cv_args(tmp_path, "no-model-needed", data, **change)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1, err
    assert not (tmp_path / "cv").exists()


def test_a_folder_that_is_not_ours_is_refused(tmp_path, capsys, data):
    (tmp_path / "cv" / "fold-2").mkdir(parents=True)
    assert main(cv_args(tmp_path, "no-model-needed", data)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'cv' / 'fold-2'} exists, but") and err.count("\n") == 1
    assert sorted(p.name for p in (tmp_path / "cv").iterdir()) == [".lock", "fold-2"]


def test_the_crossval_keys_do_not_reach_a_run_or_its_resume():
    from checkpoint import resume_conflicts
    cfg = load_config(["--crossval.folds", "3", "--check.output", "r.json"])
    saved = {section: dict(values) for section, values in cfg.items() if section not in ("crossval", "check")}
    digests = {"data.train_filepath": ["a"], "data.val_filepath": ["b"], "distill.unlabeled_filepaths": []}
    assert resume_conflicts(saved, digests, cfg, digests) == []


# -- end to end (subprocesses) ------------------------------------------------------------------------


def run_crossval(args, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "crossval.py"), *args], capture_output=True, text=True,
                          env=env, timeout=900, check=False, **kwargs)


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def flipped_data(tmp_path, n=240, flip_every=12):
    """A learnable task with every flip_every-th label flipped: the rows a ranking should find."""
    rows, flipped = sentiment_rows(n, seed=4), []
    for i in range(5, n, flip_every):
        rows[i]["label"] = "positive" if rows[i]["label"] == "negative" else "negative"
        flipped.append(i + 1)
    return write_csv(tmp_path / "train.csv", rows), write_csv(tmp_path / "val.csv", rows[:10]), flipped


@pytest.mark.slow
def test_out_of_fold_probabilities_come_from_the_model_that_held_the_row_out(tmp_path, tiny_bert):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    train, val, flipped = flipped_data(tmp_path)
    args = cv_args(tmp_path, tiny_bert, (train, val), **{"trainer.epochs": 3, "trainer.train_batch_size": 8,
                                                          "trainer.gpu_batch_size_limit": 8, "crossval.keep_weights": "true"})
    result = run_crossval(args)
    assert result.returncode == 0, stderr_tail(result.stderr)
    summary = last_json_line(result.stdout)
    cv = tmp_path / "cv"
    oof = read_csv(cv / "oof_probabilities.csv")
    assert [int(r["row"]) for r in oof] == list(range(1, 241))
    results = json.loads((cv / "results.json").read_text())
    values = [fold["acc"] for fold in results["folds"]]
    assert summary["mean"] == pytest.approx(np.mean(values)) and summary["std"] == pytest.approx(np.std(values, ddof=1))
    for k, fold in enumerate(results["folds"], 1):
        trained = {json.loads(line)["row"] for line in (cv / f"fold-{k}" / "train.jsonl").read_text().splitlines()}
        held = [r for r in oof if int(r["fold"]) == k]
        assert held and not trained & {int(r["row"]) for r in held}  # the fold never trained on its rows
        assert len(trained) + len(held) == 240
        # the fold's own best model, run here on the held-out texts, gives the probabilities written
        model = AutoModelForSequenceClassification.from_pretrained(fold["best_checkpoint"]).eval()
        tokenizer = AutoTokenizer.from_pretrained(fold["best_checkpoint"])
        texts = [read_csv(train)[int(r["row"]) - 1]["text"] for r in held]
        inputs = tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
        with torch.no_grad():  # at the fold's own temperature (module.calibrate), kept in its config.json
            probs = (model(**inputs).logits / model.config.calibration_temperature).softmax(-1)
        written = np.array([[float(r["prob_negative"]), float(r["prob_positive"])] for r in held])
        assert np.abs(probs.numpy() - written).max() < 1e-4
        assert fold["command"].startswith("python trainer.py ")
    # the deliberately flipped labels rank far above chance: their mean rank is in the top tenth
    issues = read_csv(cv / "label_issues.csv")
    assert [int(r["rank"]) for r in issues] == list(range(1, 241))
    rank_of = {int(r["row"]): int(r["rank"]) for r in issues}
    assert np.mean([rank_of[row] for row in flipped]) < 240 / 10, sorted(rank_of[row] for row in flipped)
    top = issues[:len(flipped)]
    assert {"given_label", "suggested_label", "score", "issue", "text"} <= set(top[0])
    assert all(r["given_label"] != r["suggested_label"] for r in issues if r["issue"] == "true")


def wait_for(condition, timeout=600):
    start = time.time()
    while not condition():
        assert time.time() - start < timeout
        time.sleep(0.2)


def read_state(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@pytest.mark.slow
def test_ctrl_c_stops_a_fold_with_a_checkpoint_and_the_same_command_goes_on(tmp_path, tiny_bert, data):
    # enough epochs that fold-2 is still training when its first checkpoint is seen
    args = cv_args(tmp_path, tiny_bert, data, **{"trainer.epochs": 20, "crossval.retrain": "true"})
    state = tmp_path / "cv" / "crossval.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, str(ROOT / "crossval.py"), *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    # Ctrl-C once fold-1 is done and fold-2 has written a checkpoint
    wait_for(lambda: (s := read_state(state)) is not None and s["runs"][0]["finished"]
             and any((tmp_path / "cv" / "fold-2" / "checkpoints").glob("checkpoint-*")))
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 1, stderr_tail(err)
    assert "run the same command again to go on" in err
    stopped = read_state(state)
    assert [r["finished"] for r in stopped["runs"]] == [True, False, False, False]
    assert not (tmp_path / "cv" / "oof_probabilities.csv").exists()
    fold1 = (tmp_path / "cv" / "fold-1" / "heldout_predictions.csv").stat().st_mtime_ns

    second = run_crossval(args)
    assert second.returncode == 0, stderr_tail(second.stderr)
    done = read_state(state)
    assert [r["launches"] for r in done["runs"]] == [1, 1, 1, 1] and all(r["finished"] for r in done["runs"])
    assert (tmp_path / "cv" / "fold-1" / "heldout_predictions.csv").stat().st_mtime_ns == fold1
    assert "resumed from" in (tmp_path / "cv" / "fold-2" / "trainer.stdout").read_text()
    assert not (tmp_path / "cv" / "fold-1" / "checkpoints").exists()  # crossval.keep_weights false
    assert (tmp_path / "cv" / "final" / "checkpoints" / "best").exists()
    assert len(read_csv(tmp_path / "cv" / "oof_probabilities.csv")) == 48
    # a third run has nothing left to train; another plan in the folder is refused, changing nothing
    third = run_crossval(args)
    assert third.returncode == 0 and last_json_line(third.stdout)["mean"] == last_json_line(second.stdout)["mean"]
    before = state.read_bytes()
    other = run_crossval(cv_args(tmp_path, tiny_bert, data, **{"trainer.epochs": 20, "crossval.seed": 1}))
    assert other.returncode == 2 and other.stderr.startswith(f"error: {tmp_path / 'cv'} holds another cross-validation")
    assert state.read_bytes() == before


@pytest.mark.slow
def test_multilabel_pairs_cross_validate(tmp_path, tiny_bert):
    rng = random.Random(2)
    rows = []
    for i in range(36):
        names = sorted({rng.choice(["negative", "positive"]) for _ in range(rng.randint(0, 2))})
        words = [rng.choice(POSITIVE if name == "positive" else NEGATIVE) for name in names] + [rng.choice(NEUTRAL)]
        rows.append({"text": " ".join(words), "text_b": f"{rng.choice(NEUTRAL)} n{i}", "labels": names})
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    val = write_jsonl(tmp_path / "val.jsonl", rows[:6])
    args = cv_args(tmp_path, tiny_bert, (train, val), **{
        "data.file_format": "jsonl", "data.text_b_col": "text_b", "data.label_col": "labels",
        "data.multi_label": "true", "module.metric": "f1_micro", "trainer.epochs": 1})
    result = run_crossval(args)
    assert result.returncode == 0, stderr_tail(result.stderr)
    oof = read_csv(tmp_path / "cv" / "oof_probabilities.csv")
    assert list(oof[0]) == ["row", "fold", "label", "prob_negative", "prob_positive"] and len(oof) == 36
    assert [r["label"] for r in oof[:3]] == ["|".join(r["labels"]) for r in rows[:3]]
    issues = read_csv(tmp_path / "cv" / "label_issues.csv")
    assert list(issues[0])[-2:] == ["text", "text_b"] and len(issues) == 36
    assert "f1_micro over 3 folds: mean" in result.stdout


def test_label_issues_csv_writes_formula_like_texts_and_labels_as_text(tmp_path):
    from crossval import write_outputs
    cfg = load_config(["--data.labels_list", "[=cmd(), neutral, positive]"])
    rows = examples(["=HYPERLINK(\"http://x\")", "@SUM(A1)", "-0.5 is a number"], [0, 1, 2])
    probs = np.array([[0.1, 0.8, 0.1], [0.7, 0.2, 0.1], [0.2, 0.2, 0.6]])
    write_outputs(tmp_path, cfg, rows, np.array([0, 1, 2]), probs)
    issues = {row["row"]: row for row in read_csv(tmp_path / "label_issues.csv")}
    assert issues["1"]["text"] == "'=HYPERLINK(\"http://x\")" and issues["1"]["given_label"] == "'=cmd()"
    assert issues["2"]["text"] == "'@SUM(A1)" and issues["2"]["suggested_label"] == "'=cmd()"
    assert issues["3"]["text"] == "'-0.5 is a number"
    oof = read_csv(tmp_path / "oof_probabilities.csv")
    assert oof[0]["label"] == "'=cmd()" and oof[0]["prob_=cmd()"] == "0.1"
