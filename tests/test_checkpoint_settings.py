"""A checkpoint knows how it was trained (issue 14): evaluating or predicting with it takes its labels,
task and max_seq_len where the user did not set them (said in one line; a contradicting user value is
one error line naming both), a regression gets its own metric and keeps its label name, plain
transformers' pipeline truncates a long text where training did, and a new head on a pretrained
encoder is one line of ours instead of transformers' LOAD REPORT."""
import csv
import json
import logging

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertForPreTraining, BertModel, pipeline

import trainer
from conftest import base_args, last_json_line, make_tokenizer, save_tiny_encoder, sentiment_rows, tiny_config, without, write_csv
from model import build_model, save_pretrained

# other labels than config.yaml's [negative, neutral, positive], and another length than its 64
LABELS = {"negative": "bad", "positive": "good"}
MAX_SEQ_LEN = 12
# 4,000 characters: far more tokens than max_seq_len, and than the tiny encoder's 64 positions
LONG_TEXT = " ".join(["good", "bad", "movie", "awful", "the", "plot"] * 140)


def renamed(rows):
    return [{"text": row["text"], "label": LABELS[row["label"]]} for row in rows]


def scored(rows):
    return [{"text": row["text"], "label": 1.0 if row["label"] == "positive" else -1.0} for row in rows]


def main(argv, capsys):
    """trainer.main in this process: (exit status, stdout lines, stderr lines)."""
    capsys.readouterr()
    rc = trainer.main(argv)
    out, err = capsys.readouterr()
    return rc, out.splitlines(), err.splitlines()


def one_error_line(argv, capsys):
    rc, _, err = main(argv, capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert):
    """A checkpoint trained on [bad, good] at max_seq_len 12."""
    root = tmp_path_factory.mktemp("bad-good")
    train = write_csv(root / "train.csv", renamed(sentiment_rows(768, seed=1)))
    val = write_csv(root / "val.csv", renamed(sentiment_rows(64, seed=2)))
    argv = base_args(root, tiny_bert, train, val, **{"data.labels_list": "[bad, good]", "trainer.epochs": 1,
                                                     "module.max_seq_len": MAX_SEQ_LEN})
    assert trainer.main(argv) == 0
    return root


def predict_args(root, tiny_bert, rows, **overrides):
    """Evaluate on val.csv and predict rows with the best checkpoint, leaving out what it knows."""
    path = write_csv(root / "new.csv", rows)
    argv = base_args(root, tiny_bert, "null", str(root / "val.csv"), **{
        "model.model_path": str(root / "ckpt" / "best"), "data.predict_filepath": path,
        "data.predict_output": str(root / "predictions.csv"), **overrides})
    return without(argv, *(key for key in ("data.labels_list", "module.max_seq_len", "module.metric")
                           if key not in overrides))


def read_predictions(root):
    with open(root / "predictions.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# -- labels, task and max_seq_len from the checkpoint ----------------------------------------------


def test_evaluate_and_predict_take_labels_task_and_max_seq_len_from_the_checkpoint(trained, tiny_bert, capsys):
    rows = [{"text": LONG_TEXT}, {"text": "good great film"}, {"text": "bad awful plot"}]
    rc, out, err = main(predict_args(trained, tiny_bert, rows), capsys)
    assert rc == 0, err
    best = trained / "ckpt" / "best"
    temperature = json.loads((best / "calibration.json").read_text())["temperature"]
    notes = [line for line in out if "checkpoint" in line and line.startswith("note: ")]
    assert notes == [f"note: from the checkpoint {best}: data.labels_list ['bad', 'good'] "
                     f"(single-label classification), module.max_seq_len {MAX_SEQ_LEN}, "
                     f"module.calibrate {round(temperature, 4)} (its temperature, calibration.json)"]
    result = last_json_line("\n".join(out))
    assert result["acc"] > 0.9  # labelled bad / good, which config.yaml's labels would not read
    predicted = read_predictions(trained)
    assert [p["predicted_label"] for p in predicted[1:]] == ["good", "bad"]
    # the long text was cut at the checkpoint's 12 tokens, not at config.yaml's 64
    model = AutoModelForSequenceClassification.from_pretrained(best).eval()
    tokenizer = make_tokenizer()
    with torch.no_grad():
        logits = {n: model(**tokenizer(LONG_TEXT, truncation=True, max_length=n, return_tensors="pt")).logits[0]
                  for n in (MAX_SEQ_LEN, 64)}
    ours = np.array([float(predicted[0]["prob_bad"]), float(predicted[0]["prob_good"])])
    np.testing.assert_allclose(ours, (logits[MAX_SEQ_LEN] / temperature).softmax(-1).numpy(), atol=2e-6)  # calibrated
    # and the two lengths give logits far apart (probabilities may saturate at a small temperature): the match says which
    assert (logits[MAX_SEQ_LEN] - logits[64]).abs().max() > 1e-3

    # the same values given by the user are theirs: nothing to say, the same predictions
    rc, out, err = main(predict_args(trained, tiny_bert, rows, **{
        "data.labels_list": "[bad, good]", "module.max_seq_len": MAX_SEQ_LEN, "module.metric": "acc",
        "module.calibrate": temperature}), capsys)
    assert rc == 0, err
    assert not [line for line in out if "from the checkpoint" in line]
    assert read_predictions(trained) == predicted


@pytest.mark.parametrize("key, value, fragment", [
    ("data.labels_list", "[negative, positive]",
     "data.labels_list is ['negative', 'positive'], but {best} was trained with ['bad', 'good'] (config.json); "
     "leave data.labels_list out to use the checkpoint's"),
    ("module.max_seq_len", "32",
     "module.max_seq_len is 32, but {best} was trained with 12 (checkpoint.json); "
     "leave module.max_seq_len out to use the checkpoint's"),
])
def test_a_user_value_that_contradicts_the_checkpoint_is_one_error_line_naming_both(
        trained, tiny_bert, capsys, key, value, fragment):
    # the labels are given where only max_seq_len is tested, so that old code would run
    overrides = {key: value} if key == "data.labels_list" else {key: value, "data.labels_list": "[bad, good]"}
    line = one_error_line(predict_args(trained, tiny_bert, [{"text": "good"}], **overrides), capsys)
    assert line == "error: " + fragment.format(best=trained / "ckpt" / "best")


# -- regression: its metric and its label name -----------------------------------------------------


@pytest.mark.slow  # trains several epochs
def test_regression_without_a_metric_uses_pcc_and_scc_keeps_its_name_and_is_read_back(tmp_path, tiny_bert, capsys):
    train = write_csv(tmp_path / "train.csv", scored(sentiment_rows(128, seed=1)))
    val = write_csv(tmp_path / "val.csv", scored(sentiment_rows(32, seed=2)))
    argv = without(base_args(tmp_path, tiny_bert, train, val, **{"data.labels_list": "[score]"}), "module.metric")
    rc, out, err = main(argv, capsys)
    assert rc == 0, err
    assert [line for line in out if "module.metric" in line] == [
        "note: module.metric pcc_and_scc (the metric of regression: one label)"]
    result = last_json_line("\n".join(out))
    assert result["pcc_and_scc"] > 0.5 and "acc" not in result
    best = tmp_path / "ckpt" / "best"
    config = json.loads((best / "config.json").read_text())
    assert config["id2label"] == {"0": "score"} and config["label2id"] == {"score": 0}
    assert config["problem_type"] == "regression"

    # evaluated with config.yaml's labels and metric, it is a regression again, said in one line
    argv = without(base_args(tmp_path, tiny_bert, "null", val, **{"model.model_path": str(best)}),
                   "data.labels_list", "module.max_seq_len", "module.metric")
    rc, out, err = main(argv, capsys)
    assert rc == 0, err
    assert [line for line in out if line.startswith("note: ")] == [
        f"note: from the checkpoint {best}: data.labels_list ['score'] (regression), module.max_seq_len 16, "
        f"module.metric pcc_and_scc (the metric of regression: one label)"]
    assert last_json_line("\n".join(out))["pcc_and_scc"] == pytest.approx(result["pcc_and_scc"])

    # a classification metric the user chose is still an error, naming where the task comes from
    line = one_error_line(argv + ["--module.metric", "acc"], capsys)
    assert line == (f"error: module.metric acc does not fit regression (one label); use pcc_and_scc "
                    f"({best} was trained for regression)")
    line = one_error_line(base_args(tmp_path, tiny_bert, train, val, **{"data.labels_list": "[score]",
                                                                         "module.metric": "acc_and_f1"}), capsys)
    assert line == "error: module.metric acc_and_f1 does not fit regression (one label); use pcc_and_scc"


# -- plain transformers truncates where training did ------------------------------------------------


def test_save_pretrained_with_max_seq_len_saves_that_limit_and_leaves_the_runs_tokenizer_alone(tmp_path, tiny_bert):
    tokenizer = make_tokenizer()
    limit = tokenizer.model_max_length
    model = build_model({"hf_model": tiny_bert, "model_path": None, "model_file": None}, ["bad", "good"])
    save_pretrained(model, tokenizer, tmp_path, max_seq_len=MAX_SEQ_LEN)
    assert AutoTokenizer.from_pretrained(tmp_path).model_max_length == MAX_SEQ_LEN
    assert tokenizer.model_max_length == limit


def test_pipeline_on_a_long_text_gives_our_probabilities(trained, tiny_bert, capsys):
    best = trained / "ckpt" / "best"
    rc, _, err = main(predict_args(trained, tiny_bert, [{"text": LONG_TEXT}, {"text": "good film"}]), capsys)
    assert rc == 0, err
    ours = [{name: float(row[f"prob_{name}"]) for name in ("bad", "good")} for row in read_predictions(trained)]
    # the pipeline passes no truncation to the tokenizer unless asked: truncation=True is needed,
    # and then it cuts at the saved tokenizer's model_max_length, which is the training max_seq_len;
    # its logits divided by config.json's temperature give our calibrated probabilities (the model card's recipe)
    classify = pipeline("text-classification", model=str(best), top_k=None, truncation=True, device="cpu",
                        function_to_apply="none")
    assert classify.tokenizer.model_max_length == MAX_SEQ_LEN
    temperature = classify.model.config.calibration_temperature
    for scores, mine in zip(classify([LONG_TEXT, "good film"]), ours):
        logits = {item["label"]: item["score"] / temperature for item in scores}
        theirs = {name: 1 / sum(np.exp(z - logit) for z in logits.values()) for name, logit in logits.items()}
        assert theirs.keys() == mine.keys()
        for name in mine:  # the fourth decimal and beyond: our file holds six
            assert theirs[name] == pytest.approx(mine[name], abs=5e-6)


# -- transformers' loading report, in our words ----------------------------------------------------


@pytest.fixture
def transformers_log():
    """Messages transformers logs (its handler writes to a stream that pytest cannot capture)."""
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    yield messages
    logger.removeHandler(handler)


def small_run(tmp_path, hf_model):
    train = write_csv(tmp_path / "train.csv", sentiment_rows(32, seed=1))
    return base_args(tmp_path, hf_model, train, "null", **{"trainer.epochs": 1})


@pytest.mark.parametrize("encoder", ["bare encoder", "pretraining checkpoint"])
def test_a_new_head_on_a_pretrained_encoder_is_one_line_of_ours(tmp_path, capsys, transformers_log, encoder):
    path = tmp_path / "encoder"
    if encoder == "bare encoder":
        save_tiny_encoder(path)
    else:  # its pretraining head (cls.*) goes unused, as expected when fine-tuning
        torch.manual_seed(0)
        BertForPreTraining(tiny_config()).save_pretrained(path)
        make_tokenizer().save_pretrained(path)
    rc, out, err = main(small_run(tmp_path, str(path)), capsys)
    assert rc == 0, err
    assert [line for line in out + err if line.startswith(("note: ", "warning: "))] == [
        f"note: a new classification head (classifier.*) for 2 labels; the encoder is pretrained "
        f"(model.hf_model {str(path)!r})"]
    assert not [m for m in transformers_log if "LOAD REPORT" in m]


def test_a_missing_encoder_weight_is_a_warning_that_lists_it(tmp_path, capsys, transformers_log):
    path = tmp_path / "no-pooler"
    torch.manual_seed(0)
    BertModel(tiny_config(), add_pooling_layer=False).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    rc, out, err = main(small_run(tmp_path, str(path)), capsys)
    assert rc == 0, err
    assert [line for line in err if line.startswith("warning: ")] == [
        f"warning: model.hf_model {str(path)!r}: 2 weights of the model are not in it and start from "
        f"random values: bert.pooler.dense.bias, bert.pooler.dense.weight"]
    assert not [line for line in out if "classification head" in line]
    assert not [m for m in transformers_log if "LOAD REPORT" in m]


def test_training_a_checkpoint_further_on_longer_texts_names_the_way(trained, tiny_bert, capsys, tmp_path):
    train = str(trained / "train.csv")
    argv = base_args(tmp_path, tiny_bert, train, str(trained / "val.csv"), **{
        "data.labels_list": "[bad, good]", "module.max_seq_len": 32, "trainer.epochs": 1,
        "model.model_path": str(trained / "ckpt" / "best")})
    line = one_error_line(argv, capsys)
    assert line == (f"error: module.max_seq_len is 32 but the checkpoint was trained at {MAX_SEQ_LEN} tokens; to "
                    f"train it further on longer texts, pass --model.tokenizer_path with the encoder's own "
                    f"tokenizer (model.hf_model)")
    assert trainer.main(argv + ["--model.tokenizer_path", tiny_bert]) == 0
