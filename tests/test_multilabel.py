"""Multi-label classification end to end: label sets in files, BCE in float32, per-label thresholds
(fixed or tuned on validation, saved with the checkpoint and used again by evaluation and prediction),
the prediction CSV, plain transformers' pipeline on our checkpoint, resume, DDP and distillation.

The task: a text gets "good" when it has a positive word, "bad" when it has a negative one, "film"
when it names a film or a movie; any, several or none of them.
"""
import contextlib
import csv
import io
import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, pipeline

import distill
import evaluation
import splits
import trainer
from config import GOLDEN_CONFIG, ConfigError, load_config, read_yaml
from conftest import (
    NEGATIVE,
    NEUTRAL,
    POSITIVE,
    base_args,
    last_json_line,
    one_and_two_processes,
    save_tiny_encoder,
    without_timings,
    write_csv,
    write_jsonl,
)
from data import DataError, read_examples
from metrics import best_thresholds, multilabel_metrics

LABELS = ["good", "bad", "film"]
FILLER = [w for w in NEUTRAL if w not in ("movie", "film")]


def tagged_rows(n, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        tags = [label for label in LABELS if rng.random() < 0.4]
        words = [rng.choice(FILLER) for _ in range(rng.randint(1, 5))]
        for tag in tags:
            cue = {"good": POSITIVE, "bad": NEGATIVE, "film": ["film", "movie"]}[tag]
            words.insert(rng.randint(0, len(words)), rng.choice(cue))
        rows.append({"text": " ".join(words), "label": "|".join(tags)})
    return rows


def multilabel_args(tmp_path, model, train, val, **more):
    return base_args(tmp_path, model, train, val, **{
        "data.labels_list": "[good, bad, film]", "data.multi_label": "true", "module.metric": "f1_micro",
        # BCE learns more slowly than softmax: more epochs, at a lower rate, than the single-label tests
        "trainer.epochs": 20, "module.max_lr": "1e-3", **more})


def data_cfg(**overrides):
    return {**read_yaml(GOLDEN_CONFIG)["data"], "text_a_col": "text", "label_col": "label", "multi_label": True,
            **overrides}


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multilabel")
    return {"tmp": tmp, "model": save_tiny_encoder(tmp / "bert"),
            "train": write_csv(tmp / "train.csv", tagged_rows(240, seed=1)),
            "val": write_csv(tmp / "val.csv", tagged_rows(61, seed=2))}


@pytest.fixture(scope="module")
def tuned(job):
    """A run with module.threshold tune: (its folder, its final metrics)."""
    tmp = job["tmp"] / "tuned"
    args = multilabel_args(tmp, job["model"], job["train"], job["val"], **{"module.threshold": "tune"})
    out = run_main(args)
    return tmp, last_json_line(out)


def run_main(args, expect=0):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = trainer.main(args)
    assert rc == expect, err.getvalue()[-2000:]
    return out.getvalue()


# -- files -> label sets ---------------------------------------------------------------------------


def test_a_cell_of_joined_labels_and_an_empty_cell_are_label_sets(tmp_path):
    path = write_csv(tmp_path / "a.csv", [{"text": "x", "label": "good|film"}, {"text": "y", "label": ""},
                                          {"text": "z", "label": " bad | | good "}])
    labels = read_examples(path, data_cfg(labels_list=LABELS), need_labels=True).labels
    assert labels.dtype == np.float32
    np.testing.assert_array_equal(labels, [[1, 0, 1], [0, 0, 0], [1, 1, 0]])


def test_jsonl_takes_a_list_or_joined_names_and_another_separator_works(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "x", "label": ["film", "bad"]}, {"text": "y", "label": []},
                                              {"text": "z", "label": "good;bad"}])
    labels = read_examples(path, data_cfg(file_format="jsonl", label_sep=";", labels_list=LABELS), True).labels
    np.testing.assert_array_equal(labels, [[0, 1, 1], [0, 0, 0], [1, 1, 0]])


def test_an_unknown_label_names_its_line_and_the_separator(tmp_path):
    path = write_csv(tmp_path / "a.csv", [{"text": "x", "label": "good"}, {"text": "y", "label": "good,bad"}])
    with pytest.raises(DataError) as error:
        read_examples(path, data_cfg(labels_list=LABELS), need_labels=True)
    assert str(error.value) == (f"{path}:3: label 'good,bad' is not in data.labels_list {LABELS} "
                                f"(labels are split at '|', data.label_sep)")


def test_a_single_label_file_with_joined_labels_hints_at_multi_label(tmp_path):
    path = write_csv(tmp_path / "a.csv", [{"text": "x", "label": "good|bad"}])
    with pytest.raises(DataError, match=r"a\.csv:2: .*set data\.multi_label true"):
        read_examples(path, data_cfg(multi_label=False, labels_list=LABELS), need_labels=True)


def test_config_fits_the_metric_and_checks_thresholds(job):
    cfg = load_config(["--data.labels_list", "[a, b]", "--data.multi_label", "true"])
    assert cfg["module"]["metric"] == "f1_micro"
    bad = [(["--module.metric", "acc"], "does not fit multi-label classification; use f1_micro, f1_macro, "
                                        "f1_samples or subset_acc"),
           (["--module.metric", "hamming_loss"], "module.metric is 'hamming_loss'"),
           (["--module.threshold", "1.5"], "thresholds are probabilities between 0 and 1"),
           (["--module.threshold", "[0.5]"], "must have 2 entries"),
           (["--module.threshold", "best"], "use a probability such as 0.5"),
           (["--module.threshold", "tune", "--data.val_filepath", "null"], "module.threshold tune chooses"),
           (["--data.label_sep", " | "], "data.label_sep is ' | '")]
    for extra, fragment in bad:
        with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
            load_config(["--data.labels_list", "[a, b]", "--data.multi_label", "true", *extra])
    with pytest.raises(ConfigError, match="module.threshold is for multi-label"):
        load_config(["--module.threshold", "0.3"])


# -- loss, weights, thresholds ---------------------------------------------------------------------


def test_the_loss_is_bce_averaged_over_labels_summed_over_examples_in_float32():
    torch.manual_seed(0)
    logits, labels = torch.randn(5, 3), torch.randint(0, 2, (5, 3)).float()
    pos_weight = torch.tensor([1.0, 3.0, 0.5])
    assert torch.allclose(trainer.task_loss(logits, labels), 5 * torch.nn.BCEWithLogitsLoss()(logits, labels))
    weighted = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)(logits, labels)
    assert torch.allclose(trainer.task_loss(logits, labels, pos_weight), 5 * weighted)

    class Model(torch.nn.Module):  # bfloat16 logits, as under autocast: the loss is still float32
        def forward(self, **inputs):
            return type("Out", (), {"logits": logits.bfloat16()})
    loss, _ = trainer.supervised_loss(Model(), {"input_ids": None, "labels": labels})
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, 5 * torch.nn.BCEWithLogitsLoss()(logits.bfloat16().float(), labels))


def test_balanced_positive_weights_are_negatives_over_positives_capped(job):
    labels = np.zeros((300, 3), dtype=np.float32)
    labels[:100, 0] = 1   # 200 / 100 = 2
    labels[:1, 1] = 1     # 299 / 1, capped
    labels[:150, 2] = 1   # 1
    labels = np.concatenate([labels, np.full((7, 3), np.nan, dtype=np.float32)])  # unlabelled: not counted
    split = splits.Split(None, type("Encoded", (), {"labels": labels}))
    cfg = load_config(["--data.labels_list", "[a, b, c]", "--data.multi_label", "true",
                       "--module.class_weights", "balanced"])
    weights = splits.class_weights(cfg, split, torch.device("cpu"))
    assert weights.tolist() == [2.0, splits.MAX_POS_WEIGHT, 1.0]


def test_tuned_thresholds_are_each_labels_f1_best_and_fixed_ones_are_used_as_given():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (50, 3)).astype(np.float32)
    logits = (labels - 0.5) * 2 + rng.normal(0, 1.5, (50, 3))
    probs = 1 / (1 + np.exp(-logits))
    tuned = evaluation.multilabel_split_metrics(logits, labels, LABELS)
    expected = best_thresholds(probs, labels)
    assert [row["threshold"] for row in tuned["per_label"].values()] == pytest.approx(expected.tolist())
    assert tuned["f1_micro"] == multilabel_metrics(probs >= expected, labels, LABELS)["f1_micro"]
    fixed = evaluation.multilabel_split_metrics(logits, labels, LABELS, np.array([0.2, 0.5, 0.9]))
    assert fixed["f1_macro"] == multilabel_metrics(probs >= [0.2, 0.5, 0.9], labels, LABELS)["f1_macro"]
    # tuning maximises each label's F1 on these examples: no fixed choice does better per label
    for name in LABELS:
        assert tuned["per_label"][name]["f1"] >= fixed["per_label"][name]["f1"]


def test_prediction_cells_join_the_labels_at_or_above_their_thresholds():
    logits = np.log(np.array([[0.7, 0.2, 0.5], [0.1, 0.1, 0.1]]) / (1 - np.array([[0.7, 0.2, 0.5], [0.1, 0.1, 0.1]])))
    cells = evaluation.prediction_cells(logits, LABELS, thresholds=[0.6, 0.1, 0.5], sep="|")
    assert cells == [["good|bad|film", "0.700000", "0.200000", "0.500000"], ["bad", "0.100000", "0.100000", "0.100000"]]
    assert evaluation.prediction_header(LABELS, [0.5] * 3) == ["predicted_labels", "prob_good", "prob_bad", "prob_film"]


# -- a run, its checkpoint, evaluation and prediction ----------------------------------------------


@pytest.mark.slow  # its run trains 20 epochs
def test_a_tuned_run_learns_and_saves_problem_type_and_thresholds(tuned):
    tmp, result = tuned
    assert result["f1_micro"] > 0.75 and "hamming_loss" in result and "subset_acc" in result
    best = tmp / "ckpt" / "best"
    config = json.loads((best / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"
    assert config["id2label"] == {"0": "good", "1": "bad", "2": "film"}
    saved = json.loads((best / "thresholds.json").read_text())
    final = json.loads(next((tmp / "runs").glob("*/final_metrics.json")).read_text())
    assert saved["thresholds"] == {name: final["per_label"][name]["threshold"] for name in LABELS}
    assert saved["chosen"] == (f"tuned on {tmp.parent / 'val.csv'} (each label's F1-best) at the validation of "
                               f"step {result['best_step']}")


@pytest.mark.slow  # its run trains 20 epochs
def test_evaluation_from_the_checkpoint_uses_its_thresholds_and_repeats_the_validation(job, tuned, capsys):
    tmp, result = tuned
    best = tmp / "ckpt" / "best"
    args = ["--data.train_filepath", "null", "--data.val_filepath", job["val"], "--model.model_path", str(best),
            "--trainer.log_dir", str(tmp / "eval"), "--trainer.device", "cpu", "--trainer.num_threads", "1",
            "--data.label_col", "label"]
    assert trainer.main(args) == 0
    out = capsys.readouterr().out
    thresholds = json.loads((best / "thresholds.json").read_text())["thresholds"]
    note = next(line for line in out.splitlines() if line.startswith("note: from the checkpoint"))
    assert "data.labels_list ['good', 'bad', 'film'] (multi-label classification)" in note
    assert f"module.threshold {[thresholds[n] for n in LABELS]}" in note and "module.metric f1_micro" in note
    evaluated = last_json_line(out)
    for key in ["f1_micro", "f1_macro", "f1_samples", "subset_acc", "hamming_loss"]:
        assert evaluated[key] == pytest.approx(result[key], abs=1e-9), key
    # thresholds the user gives win over the checkpoint's
    assert trainer.main(args + ["--module.threshold", "0.99"]) == 0
    assert last_json_line(capsys.readouterr().out)["f1_micro"] < result["f1_micro"]
    # a multi-label checkpoint is not a single-label one
    assert trainer.main(args + ["--data.multi_label", "false"]) == 2
    assert capsys.readouterr().err == (f"error: data.multi_label is false, but {best} was trained with true "
                                       f"(config.json's problem_type); leave data.multi_label out to use the "
                                       f"checkpoint's\n")


@pytest.mark.slow  # its run trains 20 epochs
def test_predictions_are_label_sets_and_pipeline_gives_the_same_sigmoid_scores(job, tuned):
    tmp, _ = tuned
    best = tmp / "ckpt" / "best"
    texts = ["good film", "bad awful", "the plot is so very", "great movie but the worst plot " * 20]
    predict = write_csv(tmp / "predict.csv", [{"id": i, "text": t} for i, t in enumerate(texts)])
    output = tmp / "predictions.csv"
    run_main(["--data.train_filepath", "null", "--data.val_filepath", "null", "--data.predict_filepath", predict,
              "--data.predict_output", str(output), "--model.model_path", str(best), "--trainer.device", "cpu",
              "--trainer.log_dir", str(tmp / "predict")])
    with open(output, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["id", "text", "predicted_labels", "prob_good", "prob_bad", "prob_film"]
    assert [row["text"] for row in rows] == texts
    thresholds = json.loads((best / "thresholds.json").read_text())["thresholds"]
    for row in rows:
        assert row["predicted_labels"].split("|") == [n for n in LABELS if float(row[f"prob_{n}"]) >= thresholds[n]] or (
            row["predicted_labels"] == "" and all(float(row[f"prob_{n}"]) < thresholds[n] for n in LABELS))
    assert "good" in rows[0]["predicted_labels"] and "film" in rows[0]["predicted_labels"]
    # plain transformers: a sigmoid per label of the logits divided by each label's temperature in
    # config.json (the model card's recipe), no code of ours, the long text truncated as we trained
    classify = pipeline("text-classification", model=str(best), top_k=None, truncation=True, device="cpu",
                        function_to_apply="none")
    temperature = dict(zip(LABELS, classify.model.config.calibration_temperature))
    for row, labelled in zip(rows, classify(texts)):
        ours = {n: float(row[f"prob_{n}"]) for n in LABELS}
        # to 4 decimals as a distance: rounding both can part two scores 1e-6 apart (0.59475 vs 0.59474)
        assert {d["label"]: 1 / (1 + np.exp(-d["score"] / temperature[d["label"]])) for d in labelled} == \
            pytest.approx(ours, abs=1e-4)
    assert sum(float(rows[0][f"prob_{n}"]) for n in LABELS) != pytest.approx(1.0, abs=1e-3)  # not a softmax


def test_fixed_thresholds_are_saved_as_given(job):
    tmp = job["tmp"] / "fixed"
    run_main(multilabel_args(tmp, job["model"], job["train"], job["val"],
                             **{"module.threshold": "[0.3, 0.6, 0.5]", "trainer.epochs": 1}))
    saved = json.loads((tmp / "ckpt" / "last" / "thresholds.json").read_text())
    assert saved == {"thresholds": {"good": 0.3, "bad": 0.6, "film": 0.5}, "chosen": "module.threshold"}


def test_positive_weights_train_alike_however_a_step_is_split(job, capsys):
    """Without dropout, one micro-batch of 16 or four of 4 make the same updates; the weights matter."""
    model = save_tiny_encoder(job["tmp"] / "bert-no-dropout", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    final = {}
    for name, limit, spec in [("one", 16, "balanced"), ("micro", 4, "balanced"), ("plain", 16, "null")]:
        tmp = job["tmp"] / f"weighted-{name}"
        run_main(multilabel_args(tmp, model, job["train"], job["val"], **{
            "module.class_weights": spec, "trainer.epochs": 1, "trainer.gpu_batch_size_limit": limit,
            "trainer.speedups": "false"}))
        final[name] = load_file(tmp / "ckpt" / "last" / "model.safetensors")
    assert all(torch.allclose(final["one"][k], final["micro"][k], atol=2e-6) for k in final["one"])
    assert not all(torch.allclose(final["one"][k], final["plain"][k], atol=1e-4) for k in final["one"])


@pytest.mark.slow
def test_a_stopped_and_resumed_tuned_run_ends_as_the_uninterrupted_one(job, tuned, monkeypatch):
    real_step = trainer.Trainer.train_step

    def stop_at_20(self, *a):
        real_step(self, *a)
        if self.step + 1 == 20:  # after the validation of epoch 1 (15 steps), its thresholds in the state
            self.stop_signal = "SIGTERM"
    monkeypatch.setattr(trainer.Trainer, "train_step", stop_at_20)
    tmp = job["tmp"] / "resumed"
    args = multilabel_args(tmp, job["model"], job["train"], job["val"], **{"module.threshold": "tune"})
    run_main(args, expect=1)
    monkeypatch.setattr(trainer.Trainer, "train_step", real_step)
    result = last_json_line(run_main(args + ["--ckpt.resume", "auto"]))
    reference_dir, reference = tuned
    assert without_timings(result) == without_timings({**reference, "best_checkpoint": result["best_checkpoint"]})
    ours = load_file(tmp / "ckpt" / "last" / "model.safetensors")
    theirs = load_file(reference_dir / "ckpt" / "last" / "model.safetensors")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    for link in ("best", "last"):  # thresholds and how they were chosen, also in checkpoints after the resume
        assert (json.loads((tmp / "ckpt" / link / "thresholds.json").read_text())
                == json.loads((reference_dir / "ckpt" / link / "thresholds.json").read_text()))


@pytest.mark.slow
def test_two_processes_evaluate_exactly_as_one(job, tuned, tmp_path):
    """61 validation texts over 2 ranks: every text on exactly one, metrics those of one process."""
    best = tuned[0] / "ckpt" / "best"
    args = ["--data.train_filepath", "null", "--data.val_filepath", job["val"], "--model.model_path", str(best),
            "--data.label_col", "label", "--trainer.device", "cpu", "--trainer.val_batch_size", "8",
            "--trainer.log_dir", str(tmp_path / "runs")]
    one, two = one_and_two_processes(args)
    assert one == two


# -- distillation ----------------------------------------------------------------------------------


def test_multilabel_logits_loss_is_t_squared_bernoulli_kl_averaged_over_labels():
    torch.manual_seed(0)
    student, teacher, T = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3), 2.0
    assert distill.logits_loss(teacher, teacher, T, multi_label=True).abs() < 1e-6
    loss = distill.logits_loss(student, teacher, T, multi_label=True)
    p, q = torch.sigmoid(teacher / T), torch.sigmoid(student / T)
    kl = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
    assert torch.allclose(loss, T ** 2 * kl.mean(dim=1).sum(), atol=1e-5)
    # its gradient is that of the soft-target BCE (the entropy term has none)
    loss.backward()
    bce = student.detach().requires_grad_()
    (T ** 2 * F.binary_cross_entropy_with_logits(bce / T, p, reduction="none").mean(dim=1).sum()).backward()
    assert torch.allclose(student.grad, bce.grad, atol=1e-6)


def test_labels_loss_skips_unlabelled_multilabel_rows():
    logits = torch.randn(3, 3)
    labels = torch.tensor([[1.0, 0, 1], [float("nan")] * 3, [0, 0, 1]])
    expected = trainer.task_loss(logits[[0, 2]], labels[[0, 2]])
    assert torch.allclose(distill.labels_loss(logits, labels), expected)


@pytest.mark.slow  # trains several epochs
def test_distilling_a_multilabel_teacher_gives_a_multilabel_student(job, tuned):
    tmp = job["tmp"] / "student"
    teacher = tuned[0] / "ckpt" / "best"
    unlabeled = write_csv(job["tmp"] / "unlabeled.csv", [{"text": r["text"]} for r in tagged_rows(30, seed=5)])
    args = multilabel_args(tmp, job["model"], job["train"], job["val"], **{
        "model.model_path": str(teacher), "distill.student_layers": "[0]", "trainer.epochs": 2,
        "module.threshold": "tune", "distill.unlabeled_filepaths": f"[{unlabeled}]"})
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert distill.main(args) == 0
    result = last_json_line(out.getvalue())
    assert result["f1_micro"] > 0.5
    student = AutoModelForSequenceClassification.from_pretrained(tmp / "ckpt" / "best")
    assert student.config.problem_type == "multi_label_classification" and student.config.num_hidden_layers == 1
    assert set(json.loads((tmp / "ckpt" / "best" / "thresholds.json").read_text())["thresholds"]) == set(LABELS)
