"""Calibration and abstention (issue 37): ECE, Brier and NLL against hand-worked numbers; a fitted
temperature that lowers the NLL of an over-confident model without changing a prediction; the
temperature kept with the checkpoint and applied by evaluation, the predictions CSV and export;
abstained rows exactly those below data.abstain_below; single-label and multi-label."""
import contextlib
import csv
import io
import json
import random
import shutil
from math import log

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import evaluation
import export
import processes
import runlog
import serve
import trainer
from config import ConfigError, load_config
from conftest import NEGATIVE, NEUTRAL, POSITIVE, base_args, last_json_line, save_tiny_encoder, sentiment_rows, write_csv
from data import encode, read_examples
from metrics import (
    best_thresholds,
    calibration_metrics,
    expected_calibration_error,
    multilabel_calibration_metrics,
    reliability,
    risk_coverage,
    selective_accuracy,
)

MAIN = processes.Process(0, 0, 1, torch.device("cpu"), True, False)


def run_main(main, argv, expect=0):
    """main(argv) in this process: its stdout, the exit status checked."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    assert rc == expect, err.getvalue()[-3000:] + out.getvalue()[-2000:]
    return out.getvalue() + err.getvalue() * (expect != 0)


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# -- the metrics, by hand ------------------------------------------------------------------------


def test_ece_brier_and_nll_of_single_label_probabilities_by_hand():
    probs = np.array([[0.9, 0.1], [0.65, 0.35], [0.3, 0.7], [0.15, 0.85]])
    labels = np.array([0, 1, 1, 0])  # right, wrong, right, wrong
    # 5 bins: 0.65 and 0.7 share [0.6, 0.8): confidence 0.675, accuracy 0.5; 0.9 and 0.85 share
    # [0.8, 1]: confidence 0.875, accuracy 0.5; ECE = (2 * 0.175 + 2 * 0.375) / 4
    scores = calibration_metrics(probs, labels, bins=5)
    assert scores["ece"] == pytest.approx(0.275)
    # 15 bins: each in a bin of its own, so ECE is the mean of |right - confidence|
    assert calibration_metrics(probs, labels)["ece"] == pytest.approx((0.1 + 0.65 + 0.3 + 0.85) / 4)
    # Brier, summed over classes: 0.01 + 0.01, 0.65^2 * 2, 0.3^2 * 2, 0.85^2 * 2
    assert scores["brier"] == pytest.approx((0.02 + 0.845 + 0.18 + 1.445) / 4)
    assert scores["nll"] == pytest.approx(-(log(0.9) + log(0.35) + log(0.7) + log(0.15)) / 4)


def test_ece_brier_and_nll_of_multi_label_probabilities_by_hand_per_label_and_averaged():
    probs = np.array([[0.8, 0.3], [0.4, 0.9]])
    labels = np.array([[1, 0], [1, 1]])
    means, per_label = multilabel_calibration_metrics(probs, labels, ["a", "b"], bins=5)
    # a: 0.8 and 0.4 of a present label, each in its bin: (0.2 + 0.6) / 2; b: 0.3 absent, 0.9 present
    assert per_label["a"]["ece"] == pytest.approx(0.4) and per_label["b"]["ece"] == pytest.approx(0.2)
    assert per_label["a"]["brier"] == pytest.approx((0.04 + 0.36) / 2)
    assert per_label["b"]["brier"] == pytest.approx((0.09 + 0.01) / 2)
    assert per_label["a"]["nll"] == pytest.approx(-(log(0.8) + log(0.4)) / 2)
    assert per_label["b"]["nll"] == pytest.approx(-(log(0.7) + log(0.9)) / 2)
    assert means == pytest.approx({"ece": 0.3, "brier": 0.125, "nll": (per_label["a"]["nll"] + per_label["b"]["nll"]) / 2})


def test_reliability_bins_are_equal_width_with_the_last_one_closed():
    counts, confidence, accuracy = reliability([0.0, 0.05, 0.5, 0.99, 1.0], [0, 1, 1, 1, 0], bins=10)
    assert counts.tolist() == [2, 0, 0, 0, 0, 1, 0, 0, 0, 2]
    assert confidence[0] == pytest.approx(0.025) and accuracy[0] == 0.5 and accuracy[9] == 0.5
    assert confidence[1] == 0 and accuracy[1] == 0  # an empty bin is 0, not NaN
    assert expected_calibration_error([1.0, 1.0], [1, 1]) == 0.0  # sure and right: perfect


def test_abstention_and_the_risk_coverage_curve_by_hand():
    confidences, correct = [0.9, 0.6, 0.8, 0.3], [True, False, True, False]
    assert selective_accuracy(confidences, correct, 0.7) == (0.5, 1.0)  # answers 0.9 and 0.8, both right
    assert selective_accuracy(confidences, correct, 0.95) == (0.0, 0.0)  # answers nothing: 0, not NaN
    coverage, risk = risk_coverage(confidences, correct)  # answering 0.9, 0.8, 0.6, 0.3 in turn
    assert coverage.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert risk.tolist() == pytest.approx([0, 0, 1 / 3, 0.5])


# -- temperature scaling -------------------------------------------------------------------------


def nll(logits, labels, temperature):
    probs = evaluation.probabilities(logits, False, temperature)
    return -np.log(probs[np.arange(len(labels)), labels]).mean()


def test_a_temperature_lowers_the_nll_of_an_over_confident_model_and_changes_no_prediction(single):
    """The trained tiny classifier with its head's weights made 20 times larger: the same argmax, logits
    20 times too sure. Its fitted temperature undoes that: 20 times the run's, at the minimum of the NLL."""
    model = AutoModelForSequenceClassification.from_pretrained(single["best"]).eval()
    with torch.no_grad():
        model.classifier.weight *= 20
        model.classifier.bias *= 20
    tokenizer = AutoTokenizer.from_pretrained(single["best"])
    cfg = load_config(["--data.text_a_col", "text", "--data.label_col", "label", "--data.labels_list", "[negative, positive]"])
    examples = read_examples(single["val"], cfg["data"], need_labels=True)
    encoded = encode(tokenizer, examples, 16)
    logits = evaluation.predict_logits(model, encoded, 32, tokenizer.pad_token_id, MAIN)
    labels = encoded.labels
    temperature = evaluation.fit_temperature(logits, labels)
    assert temperature > 1 and temperature == pytest.approx(20 * single["result"]["temperature"], rel=1e-3)
    assert nll(logits, labels, temperature) < nll(logits, labels, 1.0)
    grid = np.geomspace(0.05, 20, 4001)
    best = grid[np.argmin([nll(logits, labels, t) for t in grid])]
    assert temperature == pytest.approx(best, rel=2e-3)
    calibrated = evaluation.probabilities(logits, False, temperature)
    assert (calibrated.argmax(axis=1) == logits.argmax(axis=1)).all()
    uncalibrated = evaluation.probabilities(logits, False)
    assert calibration_metrics(calibrated, labels)["ece"] < calibration_metrics(uncalibrated, labels)["ece"]


def test_each_label_gets_its_own_temperature_and_keeps_its_decisions_at_one_half():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (400, 3))
    # label 0 over-confident, label 1 under-confident, label 2 about right; 15% of each label wrong
    sign = np.where(rng.random((400, 3)) < 0.15, 1 - 2 * labels, 2 * labels - 1)
    logits = sign * np.abs(rng.normal(1.5, 0.5, (400, 3))) * np.array([8.0, 0.25, 1.0])
    temperatures = evaluation.fit_temperature(logits, labels, multi_label=True)
    assert temperatures[0] > 3 and temperatures[1] < 0.5 and 0.5 < temperatures[2] < 2
    before = multilabel_calibration_metrics(evaluation.probabilities(logits, True), labels, "abc")[1]
    probs = evaluation.probabilities(logits, True, temperatures)
    after = multilabel_calibration_metrics(probs, labels, "abc")[1]
    for name in "ab":
        assert after[name]["nll"] < before[name]["nll"]
    assert ((probs >= 0.5) == (logits >= 0)).all()


def test_probabilities_are_float64_and_stable_for_large_logits():
    logits = np.array([[800.0, -800.0], [0.0, 0.0]], dtype=np.float32)
    assert evaluation.probabilities(logits, False).tolist() == [[1.0, 0.0], [0.5, 0.5]]
    with np.errstate(over="raise"):  # no overflow in the sigmoid
        assert evaluation.probabilities(logits, True, [0.05, 1.0])[0].tolist() == [1.0, 0.0]


# -- a run: its checkpoint, evaluation, predictions, export --------------------------------------


def noisy(rows, every=5):
    """Every n-th label flipped: a validation set no model gets all right, so its temperature is
    fitted at a finite value rather than driven to the end of its range."""
    flip = {"negative": "positive", "positive": "negative"}
    return [{**row, "label": flip[row["label"]]} if i % every == 0 else row for i, row in enumerate(rows)]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """A single-label run validated on noisy labels, predicting 40 texts with data.abstain_below 0.8."""
    tmp = tmp_path_factory.mktemp("calibration")
    model = save_tiny_encoder(tmp / "bert")
    train = write_csv(tmp / "train.csv", sentiment_rows(256, seed=1))
    val = write_csv(tmp / "val.csv", noisy(sentiment_rows(80, seed=2)))
    new = write_csv(tmp / "new.csv", [{"id": i, "text": row["text"]} for i, row in enumerate(sentiment_rows(40, seed=3))])
    argv = base_args(tmp, model, train, val, **{"data.predict_filepath": new, "data.abstain_below": 0.8,
                                                "data.predict_output": str(tmp / "predictions.csv")})
    out = run_main(trainer.main, argv)
    best = (tmp / "ckpt" / "best").resolve()
    return {"tmp": tmp, "argv": argv, "val": val, "new": new, "out": out, "result": last_json_line(out), "best": best}


def checkpoint_logits(folder, path, columns=("text", "label")):
    """Plain transformers' logits of a file's texts (no code of ours but the batching)."""
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = [row[columns[0]] for row in read_csv(path)]
    with torch.no_grad():
        return model(**tokenizer(texts, truncation=True, padding=True, return_tensors="pt")).logits.double().numpy()


def test_the_final_json_the_checkpoint_and_config_json_carry_the_fitted_temperature(single):
    result, best = single["result"], single["best"]
    assert {"temperature", "ece", "ece_uncalibrated", "brier", "nll", "coverage", "covered_acc"} <= set(result)
    temperature = result["temperature"]
    assert 0.05 < temperature < 20  # fitted, not at the end of its range
    saved = json.loads((best / "calibration.json").read_text())
    assert saved["temperature"] == temperature and f"at the validation of step {result['best_step']}" in saved["chosen"]
    assert json.loads((best / "config.json").read_text())["calibration_temperature"] == temperature
    # the reported figures are those of softmax(logits / temperature) on the validation file
    logits, labels = checkpoint_logits(best, single["val"]), np.array(
        [row["label"] == "positive" for row in read_csv(single["val"])], dtype=int)
    calibrated = calibration_metrics(evaluation.probabilities(logits, False, temperature), labels)
    assert calibrated == pytest.approx({k: result[k] for k in ("ece", "brier", "nll")}, abs=1e-6)
    assert calibration_metrics(evaluation.probabilities(logits, False), labels)["ece"] == \
        pytest.approx(result["ece_uncalibrated"], abs=1e-6)
    assert nll(logits, labels, temperature) <= nll(logits, labels, 1.0)
    assert "calibration: temperature" in single["out"] and "abstention: coverage" in single["out"]


def test_the_predictions_csv_is_calibrated_and_abstains_exactly_below_the_threshold(single):
    rows = read_csv(single["tmp"] / "predictions.csv")
    assert list(rows[0]) == ["id", "text", "predicted_label", "abstained", "prob_negative", "prob_positive"]
    logits = checkpoint_logits(single["best"], single["new"])
    probs = evaluation.probabilities(logits, False, single["result"]["temperature"])
    ours = np.array([[float(row["prob_negative"]), float(row["prob_positive"])] for row in rows])
    np.testing.assert_allclose(ours, probs, atol=2e-6)
    below = probs.max(axis=1) < 0.8
    assert 0 < below.sum() < len(rows)  # both kinds of row are here
    assert [row["abstained"] for row in rows] == ["1" if b else "0" for b in below]
    names = np.array(["negative", "positive"])
    assert [row["predicted_label"] for row in rows] == ["" if b else n for b, n in zip(below, names[logits.argmax(axis=1)])]


def test_evaluation_applies_the_checkpoints_temperature_says_it_once_and_repeats_the_validation(single):
    argv = single["argv"] + ["--data.train_filepath", "null", "--data.predict_filepath", "null",
                             "--model.model_path", str(single["best"])]
    out = run_main(trainer.main, argv)
    temperature = single["result"]["temperature"]
    assert out.count(f"module.calibrate {round(temperature, 4)} (its temperature, calibration.json)") == 1
    evaluated = last_json_line(out)
    for key in ("acc", "temperature", "ece", "ece_uncalibrated", "brier", "nll", "coverage", "covered_acc"):
        assert evaluated[key] == pytest.approx(single["result"][key], abs=1e-9), key
    # false: the model's own probabilities; a number: that temperature
    raw = last_json_line(run_main(trainer.main, argv + ["--module.calibrate", "false"]))
    assert raw["temperature"] == 1.0 and raw["ece"] == pytest.approx(single["result"]["ece_uncalibrated"])
    assert raw["acc"] == evaluated["acc"]  # the same predictions
    given = last_json_line(run_main(trainer.main, argv + ["--module.calibrate", "3.5"]))
    assert given["temperature"] == 3.5 and given["nll"] != pytest.approx(evaluated["nll"])


def test_an_old_checkpoint_without_a_temperature_is_uncalibrated_and_says_so_once(single, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(single["best"], old)
    (old / "calibration.json").unlink()
    config = json.loads((old / "config.json").read_text())
    del config["calibration_temperature"]
    (old / "config.json").write_text(json.dumps(config))
    argv = single["argv"] + ["--data.train_filepath", "null", "--data.predict_output", str(tmp_path / "p.csv"),
                             "--model.model_path", str(old)]
    out = run_main(trainer.main, argv)
    assert out.count("module.calibrate 1.0 (it holds no temperature") == 1
    result = last_json_line(out)
    assert result["temperature"] == 1.0 and result["ece"] == result["ece_uncalibrated"]
    logits = checkpoint_logits(old, single["new"])
    np.testing.assert_allclose([float(row["prob_positive"]) for row in read_csv(tmp_path / "p.csv")],
                               evaluation.probabilities(logits, False)[:, 1], atol=2e-6)


def test_a_damaged_calibration_file_is_one_error_line(single, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(single["best"], damaged)
    argv = single["argv"] + ["--data.train_filepath", "null", "--model.model_path", str(damaged)]
    for content, fragment in [('{"temperature": -1}', "is not positive"), ("{", "unreadable"),
                              ('{"t": 1}', "not a temperature")]:
        (damaged / "calibration.json").write_text(content)
        err = run_main(trainer.main, argv, expect=2)
        assert err.strip().splitlines()[-1].startswith(f"error: {damaged / 'calibration.json'}: ") and fragment in err


def test_validations_draw_a_reliability_diagram_and_a_risk_coverage_curve(single):
    folder = single["tmp"] / "runs" / single["result"]["run_dir"].split("/")[-1]
    events = EventAccumulator(str(folder), size_guidance={"images": 0})
    events.Reload()
    fitted = {e.step: e.value for e in events.Scalars("val/temperature")}
    assert fitted[single["result"]["best_step"]] == pytest.approx(single["result"]["temperature"])
    for tag in ("val/reliability", "val/risk_coverage"):
        image = np.asarray(Image.open(io.BytesIO(events.Images(tag)[-1].encoded_image_string)))
        assert image.shape[2] == 3 and (image[:, :, 2] > image[:, :, 0] + 60).any()  # blue bars / curve drawn


def test_the_reliability_image_puts_its_bars_at_each_bins_accuracy():
    # every confidence 0.95, right half the time: one bar, at height 0.5, far below the diagonal
    probs = np.tile([0.95, 0.05], (10, 1))
    curves = {"task": "single_label", "probabilities": probs, "uncalibrated": probs, "labels": np.array([0, 1] * 5)}
    image = runlog.reliability_image(curves)
    blue = np.argwhere((image[:, :, 2] > 200) & (image[:, :, 0] < 100))
    _, _, at = runlog.chart("", "", "")
    assert blue[:, 0].min() == pytest.approx(at(0, 0.5)[1], abs=2)  # the bar's top: accuracy 0.5
    assert blue[:, 1].min() == pytest.approx(at(14 / 15, 0)[0], abs=2)  # in the last bin


def test_export_carries_the_temperature_into_its_folder_and_its_predictions(single, tmp_path):
    folder = tmp_path / "onnx"
    run_main(export.main, ["--model.model_path", str(single["best"]), "--data.val_filepath", single["val"],
                           "--data.text_a_col", "text", "--data.label_col", "label", "--export.int8", "false",
                           "--export.threads", "1", "--export.output_dir", str(folder)])
    temperature = single["result"]["temperature"]
    assert json.loads((folder / "calibration.json").read_text())["temperature"] == temperature
    assert json.loads((folder / "config.json").read_text())["calibration_temperature"] == temperature
    written = {}
    for name, model_path in (("onnx", folder), ("torch", single["best"])):
        run_main(trainer.main, ["--data.train_filepath", "null", "--data.val_filepath", "null", "--data.predict_filepath",
                                single["new"], "--model.model_path", str(model_path), "--trainer.device", "cpu",
                                "--data.predict_output", str(tmp_path / f"{name}.csv"),
                                "--trainer.log_dir", str(tmp_path / "runs")])
        written[name] = read_csv(tmp_path / f"{name}.csv")
    for ours, theirs in zip(written["onnx"], written["torch"]):
        assert ours["predicted_label"] == theirs["predicted_label"]
        assert float(ours["prob_positive"]) == pytest.approx(float(theirs["prob_positive"]), abs=1e-5)
    logits = checkpoint_logits(single["best"], single["new"])
    np.testing.assert_allclose([float(row["prob_positive"]) for row in written["onnx"]],
                               evaluation.probabilities(logits, False, temperature)[:, 1], atol=1e-5)


def test_the_server_answers_with_the_checkpoints_temperature(single):
    cfg = load_config(["--model.model_path", str(single["best"]), "--trainer.device", "cpu", "--trainer.num_threads", "1"])
    with contextlib.redirect_stdout(io.StringIO()):
        served = serve.load_served(cfg)
    texts = [row["text"] for row in read_csv(single["new"])][:cfg["serve"]["max_inputs"]]
    with TestClient(serve.create_app(served, cfg["serve"])) as client:
        info = client.get("/info").json()
        answers = client.post("/predict", json={"inputs": texts}).json()
    assert info["temperature"] == single["result"]["temperature"]
    for answer, row in zip(answers, read_csv(single["tmp"] / "predictions.csv")[:len(texts)], strict=True):
        assert {e["label"]: e["score"] for e in answer} == \
            pytest.approx({n: float(row[f"prob_{n}"]) for n in ("negative", "positive")}, abs=1e-5)


# -- multi-label ---------------------------------------------------------------------------------

TOPICS = ["good", "bad", "film"]


def tagged_rows(n, seed, noise=0.0):
    """Texts with a cue word per label they carry; noise: the share of label sets changed at random."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        tags = [t for t in TOPICS if rng.random() < 0.4]
        words = [rng.choice([w for w in NEUTRAL if w not in ("movie", "film")]) for _ in range(rng.randint(1, 5))]
        for tag in tags:
            cue = {"good": POSITIVE, "bad": NEGATIVE, "film": ["film", "movie"]}[tag]
            words.insert(rng.randint(0, len(words)), rng.choice(cue))
        if rng.random() < noise:
            tags = [t for t in TOPICS if rng.random() < 0.4]
        rows.append({"text": " ".join(words), "label": "|".join(tags)})
    return rows


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("calibration-multi")
    model = save_tiny_encoder(tmp / "bert")
    train = write_csv(tmp / "train.csv", tagged_rows(240, seed=1))
    val = write_csv(tmp / "val.csv", tagged_rows(80, seed=2, noise=0.1))
    new = write_csv(tmp / "new.csv", [{"text": row["text"]} for row in tagged_rows(40, seed=3)])
    argv = base_args(tmp, model, train, val, **{
        "data.labels_list": "[good, bad, film]", "data.multi_label": "true", "module.metric": "f1_micro",
        "module.threshold": "tune", "trainer.epochs": 20, "module.max_lr": "1e-3", "data.predict_filepath": new,
        "data.predict_output": str(tmp / "predictions.csv"), "data.abstain_below": 0.6})
    out = run_main(trainer.main, argv)
    return {"tmp": tmp, "val": val, "new": new, "result": last_json_line(out), "best": (tmp / "ckpt" / "best").resolve()}


def test_multi_label_fits_a_temperature_per_label_then_tunes_thresholds_on_the_calibrated_probabilities(multi):
    result, best = multi["result"], multi["best"]
    assert result["f1_micro"] > 0.6
    saved = json.loads((best / "calibration.json").read_text())["temperature"]
    assert list(saved) == TOPICS and [saved[t] for t in TOPICS] == result["temperature"]
    assert json.loads((best / "config.json").read_text())["calibration_temperature"] == result["temperature"]
    logits = checkpoint_logits(best, multi["val"])
    labels = np.array([[t in row["label"].split("|") for t in TOPICS] for row in read_csv(multi["val"])], dtype=int)
    assert evaluation.fit_temperature(logits, labels, multi_label=True) == pytest.approx(result["temperature"], rel=1e-4)
    probs = evaluation.probabilities(logits, True, result["temperature"])
    thresholds = json.loads((best / "thresholds.json").read_text())["thresholds"]
    assert [thresholds[t] for t in TOPICS] == best_thresholds(probs, labels).tolist()
    means, per_label = multilabel_calibration_metrics(probs, labels, TOPICS)
    assert means["ece"] == pytest.approx(result["ece"], abs=1e-6)
    final = json.loads(next((multi["tmp"] / "runs").glob("*/final_metrics.json")).read_text())
    assert [final["per_label"][t]["temperature"] for t in TOPICS] == result["temperature"]
    assert final["per_label"]["good"]["ece"] == pytest.approx(per_label["good"]["ece"], abs=1e-6)


def test_multi_label_predictions_abstain_when_any_label_decision_is_unsure(multi):
    rows = read_csv(multi["tmp"] / "predictions.csv")
    assert list(rows[0]) == ["text", "predicted_labels", "abstained"] + [f"prob_{t}" for t in TOPICS]
    thresholds = json.loads((multi["best"] / "thresholds.json").read_text())["thresholds"]
    probs = evaluation.probabilities(checkpoint_logits(multi["best"], multi["new"], ("text",)), True,
                                     multi["result"]["temperature"])
    np.testing.assert_allclose([[float(row[f"prob_{t}"]) for t in TOPICS] for row in rows], probs, atol=2e-6)
    t = np.array([thresholds[name] for name in TOPICS])
    sure = np.where(probs >= t, probs, 1 - probs).min(axis=1)  # the least probable of its decisions
    assert 0 < (sure < 0.6).sum() < len(rows)
    for row, p, s in zip(rows, probs, sure):
        assert row["abstained"] == ("1" if s < 0.6 else "0")
        assert row["predicted_labels"] == ("" if s < 0.6 else "|".join(n for n, q, u in zip(TOPICS, p, t) if q >= u))


# -- config, regression --------------------------------------------------------------------------


@pytest.mark.parametrize("args, fragment", [
    (["--data.abstain_below", "1.5"], "data.abstain_below is 1.5; it must be a probability between 0 and 1"),
    (["--data.abstain_below", "0"], "data.abstain_below is 0; it must be a probability"),
    (["--module.calibrate", "-1"], "module.calibrate -1: a temperature is a positive number"),
    (["--module.calibrate", "0"], "module.calibrate 0: a temperature is a positive number"),
    (["--module.calibrate", "yes"], "module.calibrate is 'yes'; expected bool, float, list"),
    (["--module.calibrate", "[1, 2, 3]"], "a list is one temperature per label of a multi-label task"),
    (["--data.multi_label", "true", "--module.calibrate", "[1, 2]"], "(3 labels)"),
    (["--data.labels_list", "[score]", "--data.abstain_below", "0.5"], "data.abstain_below is set, but one label means"),
    (["--data.labels_list", "[score]", "--module.calibrate", "2"], "module.calibrate is set, but one label means"),
])
def test_bad_calibration_and_abstention_values_are_one_line(args, fragment):
    with pytest.raises(ConfigError) as caught:
        load_config(args)
    assert fragment in str(caught.value)


def test_a_regression_is_not_calibrated_and_says_so(tmp_path, tiny_bert):
    rows = [{"text": row["text"], "label": 1.0 if row["label"] == "positive" else -1.0} for row in sentiment_rows(64, seed=1)]
    train, val = write_csv(tmp_path / "train.csv", rows[:48]), write_csv(tmp_path / "val.csv", rows[48:])
    out = run_main(trainer.main, base_args(tmp_path, tiny_bert, train, val, **{
        "data.labels_list": "[score]", "module.metric": "pcc_and_scc", "trainer.epochs": 1}))
    assert out.count("note: module.calibrate: a regression's scores are no probabilities; nothing is calibrated") == 1
    assert "temperature" not in last_json_line(out) and "ece" not in last_json_line(out)
    assert not (tmp_path / "ckpt" / "best" / "calibration.json").exists()


def test_a_resumed_checkpoint_from_before_calibration_says_so_once_and_the_next_validation_fits(tmp_path, tiny_bert):
    train = write_csv(tmp_path / "train.csv", sentiment_rows(64, seed=1))
    val = write_csv(tmp_path / "val.csv", sentiment_rows(24, seed=2))
    argv = base_args(tmp_path, tiny_bert, train, val, **{"trainer.epochs": 2})
    run_main(trainer.main, argv + ["--trainer.stop_after_epochs", "1"])
    # make its checkpoint one of before calibration: no calibration.json, no key in config.json
    folder = (tmp_path / "ckpt" / "last").resolve()
    (folder / "calibration.json").unlink()
    config = json.loads((folder / "config.json").read_text())
    del config["calibration_temperature"]
    (folder / "config.json").write_text(json.dumps(config))
    manifest = json.loads((folder / "checkpoint.json").read_text())
    del manifest["files"]["calibration.json"]
    manifest["files"]["config.json"] = (folder / "config.json").stat().st_size
    (folder / "checkpoint.json").write_text(json.dumps(manifest))
    out = run_main(trainer.main, argv + ["--ckpt.resume", "auto"])
    assert out.count(f"note: {folder} holds no temperature") == 1
    final = (tmp_path / "ckpt" / "last").resolve()
    assert json.loads((final / "calibration.json").read_text())["chosen"].endswith("at the validation of step 8 (the NLL-best)")
