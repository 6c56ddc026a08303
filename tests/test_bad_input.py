"""Every bad input stops the run before it starts: a non-zero exit, one line on stderr that says
what is wrong and where, no traceback, and nothing written (no logs, no checkpoints)."""
import json
import os

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import trainer
from conftest import base_args, make_tokenizer, sentiment_rows, write_csv, write_jsonl
from model import build_model, save_pretrained

GOOD = [{"text": "good movie", "label": "positive"}, {"text": "bad plot", "label": "negative"},
        {"text": "great film", "label": "positive"}, {"text": "awful", "label": "negative"}]


def write_bytes(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def make_dir(tmp_path, name):
    (tmp_path / name).mkdir()
    return str(tmp_path / name)


def symlink(tmp_path, name, target):
    os.symlink(target, tmp_path / name)
    return str(tmp_path / name)


def save_tokenizer(tmp_path, max_length):
    tokenizer = make_tokenizer()
    tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    return str(tmp_path / "tokenizer")


def save_state_dict(tmp_path, name, state):
    path = tmp_path / name
    torch.save(state, path)
    return str(path)


# Each case: a function that writes its files in tmp_path and returns the {config key: value} it
# changes, and the fragments the error line must hold. The good train.csv / val.csv are there in
# every case; a case replaces what it breaks.
CASES = [
    # -- data files --
    pytest.param(lambda t: {"data.train_filepath": str(t / "nope.csv")},
                 ["nope.csv", "file not found"], id="missing file"),
    pytest.param(lambda t: {"data.train_filepath": write_bytes(
                     t, "latin1.csv", "text,label\ngood,positive\ncafé,negative\n".encode("latin-1"))},
                 ["latin1.csv:3:", "not valid utf-8", "data.encoding"], id="undecodable bytes"),
    pytest.param(lambda t: {"data.encoding": "klingon-8"},
                 ["data.encoding", "klingon-8"], id="unknown encoding"),
    pytest.param(lambda t: {"data.header": "null", "data.text_a_col": "text", "data.label_col": 1},
                 ["'text' not found", "columns are [0, 1]", "positions"], id="column name without a header"),
    pytest.param(lambda t: {"data.text_a_col": "sentence"},
                 ["train.csv", "'sentence' not found", "['text', 'label']"], id="missing text column"),
    pytest.param(lambda t: {"data.label_col": "sentiment"},
                 ["train.csv", "'sentiment' not found", "['text', 'label']"], id="missing label column"),
    pytest.param(lambda t: {"data.header": "null", "data.text_a_col": 5, "data.label_col": 1},
                 ["data.text_a_col", "column 5", "2 columns"], id="column position out of range"),
    pytest.param(lambda t: {"data.train_filepath": write_csv(
                     t / "labels.csv", GOOD[:2] + [{"text": "the movie", "label": "neutral"}] + GOOD[2:])},
                 ["labels.csv:4:", "'neutral'", "['negative', 'positive']"], id="label not in labels_list"),
    pytest.param(lambda t: {"data.val_filepath": write_csv(t / "val2.csv", GOOD + [{"text": "ok", "label": "meh"}])},
                 ["val2.csv:6:", "'meh'"], id="unknown label in the validation file"),
    pytest.param(lambda t: {"data.labels_list": "[score]", "module.metric": "pcc_and_scc"},
                 ["train.csv:2:", "'positive'", "not a number"], id="regression label not a number"),
    pytest.param(lambda t: {"data.train_filepath": write_csv(
                     t / "blank.csv", GOOD[:1] + [{"text": "  ", "label": "positive"}])},
                 ["blank.csv:3:", "empty text", "'text'"], id="empty text"),
    pytest.param(lambda t: {"data.text_b_col": "hyp", "data.train_filepath": write_csv(
                     t / "pairs.csv", [{"text": "good", "hyp": "", "label": "positive"}])},
                 ["pairs.csv:2:", "empty text", "'hyp'"], id="empty second text of a pair"),
    pytest.param(lambda t: {"data.train_filepath": write_bytes(t, "empty.csv", b"")},
                 ["empty.csv", "the file is empty"], id="empty file"),
    pytest.param(lambda t: {"data.file_format": "jsonl", "data.val_filepath": write_jsonl(t / "val.jsonl", GOOD),
                            "data.train_filepath": write_bytes(t, "blank.jsonl", b"\n  \n")},
                 ["blank.jsonl", "the file is empty"], id="empty jsonl file"),
    pytest.param(lambda t: {"data.train_filepath": write_bytes(t, "header.csv", b"text,label\n")},
                 ["header.csv", "no examples"], id="header only"),
    pytest.param(lambda t: {"data.train_filepath": write_bytes(
                     t, "ragged.csv", b"text,label\ngood,positive\nbad,plot,negative\n")},
                 ["ragged.csv:3:", "3 fields, expected 2"], id="ragged row"),
    pytest.param(lambda t: {"data.file_format": "tsv", "data.quoting": "csv",
                            "data.val_filepath": write_csv(t / "val.tsv", GOOD, delimiter="\t"),
                            "data.train_filepath": write_bytes(
                                t, "quote.tsv", b'text\tlabel\ngood\tpositive\n"bad\tnegative\nfine\tpositive\n')},
                 ["quote.tsv:3:", "not closed properly", "--data.quoting none"],
                 id="quote never closed in a tsv read with quoting csv"),
    pytest.param(lambda t: {"data.file_format": "jsonl", "data.val_filepath": write_jsonl(t / "val.jsonl", GOOD),
                            "data.train_filepath": write_bytes(
                                t, "bad.jsonl", b'{"text": "good", "label": "positive"}\n{"text": "bad", "label": \n')},
                 ["bad.jsonl:2:", "not valid JSON"], id="bad JSON line"),
    pytest.param(lambda t: {"data.file_format": "jsonl", "data.val_filepath": write_jsonl(t / "val.jsonl", GOOD),
                            "data.train_filepath": write_bytes(t, "list.jsonl", b'["good", 1]\n')},
                 ["list.jsonl:1:", "JSON object"], id="JSON line not an object"),
    pytest.param(lambda t: {"data.predict_filepath": write_csv(t / "new.csv", [{"text": "good"}, {"text": ""}])},
                 ["new.csv:3:", "empty text"], id="bad row in the predict file"),
    # -- config values --
    pytest.param(lambda t: {"trainer.epoch": 3}, ["trainer.epoch", "epochs"], id="unknown key"),
    pytest.param(lambda t: {"optim.lr": 0.1}, ["'optim'", "trainer"], id="unknown section"),
    pytest.param(lambda t: {"trainer.epochs": "many"}, ["trainer.epochs", "int"], id="wrong type"),
    pytest.param(lambda t: {"module.metric": "f1"}, ["module.metric", "acc_and_f1", "mcc"], id="bad choice"),
    pytest.param(lambda t: {"module.max_lr": 0}, ["module.max_lr", "positive"], id="learning rate zero"),
    pytest.param(lambda t: {"module.max_lr": "-2e-5"}, ["module.max_lr", "positive"], id="learning rate negative"),
    pytest.param(lambda t: {"trainer.train_batch_size": 0},
                 ["trainer.train_batch_size", "positive"], id="batch size zero"),
    pytest.param(lambda t: {"trainer.gpu_batch_size_limit": -8},
                 ["trainer.gpu_batch_size_limit", "positive"], id="micro-batch size negative"),
    pytest.param(lambda t: {"module.warmup_prop": 1.5}, ["module.warmup_prop", "[0, 1]"], id="warmup_prop above 1"),
    pytest.param(lambda t: {"module.warmup_prop": -0.1}, ["module.warmup_prop", "[0, 1]"], id="warmup_prop below 0"),
    pytest.param(lambda t: {"data.labels_list": "[negative, positive, negative]"},
                 ["data.labels_list", "duplicates"], id="duplicate labels"),
    pytest.param(lambda t: {"data.text_b_col": "text"},
                 ["text_b_col", "text_a_col"], id="text_b_col equals text_a_col"),
    pytest.param(lambda t: {"data.labels_list": "[score]"}, ["pcc_and_scc"], id="metric does not fit regression"),
    pytest.param(lambda t: {"data.train_filepath": "null"}, ["model.model_path"], id="evaluate without a model"),
    pytest.param(lambda t: {"config_path": make_dir(t, "configs")}, ["configs", "is a directory"],
                 id="config_path a directory"),
    pytest.param(lambda t: {"config_path": write_bytes(t, "latin1.yaml", "seed: 3  # café\n".encode("latin-1"))},
                 ["latin1.yaml:1:", "not valid UTF-8"], id="config file not utf-8"),
    pytest.param(lambda t: {"module.max_lr": ".nan"}, ["module.max_lr is nan", "finite"], id="learning rate NaN"),
    pytest.param(lambda t: {"module.weight_decay": ".inf"}, ["module.weight_decay is inf", "finite"],
                 id="weight decay infinite"),
    pytest.param(lambda t: {"distill.loss_weights": "[.nan, 0.5]"}, ["distill.loss_weights[0] is nan"],
                 id="NaN in a list of floats"),
    pytest.param(lambda t: {"trainer.seed": -1}, ["trainer.seed is -1", "[0, 2**32 - 1]"], id="negative seed"),
    pytest.param(lambda t: {"trainer.epochs": 0}, ["trainer.epochs is 0", "positive"], id="zero epochs"),
    pytest.param(lambda t: {"trainer.max_grad_norm": 0}, ["trainer.max_grad_norm is 0", "trainer.clip_grads"],
                 id="clipping to norm zero"),
    pytest.param(lambda t: {"ckpt.file_prefix": "../escape"}, ["ckpt.file_prefix", "'../escape'", "plain name"],
                 id="file_prefix outside the checkpoint folder"),
    pytest.param(lambda t: {"ckpt.file_ext": "/../../x"}, ["ckpt.file_ext", "'/../../x'", ".pt"],
                 id="file_ext holding a path"),
    pytest.param(lambda t: {"data.predict_output": "--trainer.debug=true"},
                 ["--data.predict_output needs a value"], id="option in place of a value"),
    pytest.param(lambda t: {"data.text_a_col": "label"}, ["data.text_a_col", "data.label_col"],
                 id="text column is the label column"),
    pytest.param(lambda t: {"data.text_b_col": "label"}, ["data.text_b_col", "data.label_col"],
                 id="second text column is the label column"),
    pytest.param(lambda t: {"data.predict_filepath": write_csv(t / "new.csv", [{"text": "good"}]),
                            "data.predict_output": os.path.join(str(t), ".", "train.csv")},
                 ["data.predict_output", "data.train_filepath"], id="predict_output is the training file"),
    pytest.param(lambda t: {"data.predict_filepath": write_csv(t / "new.csv", [{"text": "good"}]),
                            "data.predict_output": symlink(t, "link.csv", t / "new.csv")},
                 ["data.predict_output", "link.csv", "data.predict_filepath"],
                 id="predict_output a link to the predict file"),
    pytest.param(lambda t: {"module.max_seq_len": 32, "model.tokenizer_path": save_tokenizer(t, max_length=16)},
                 ["module.max_seq_len is 32", "at most 16"], id="max_seq_len beyond the model"),
    pytest.param(lambda t: {"trainer.train_batch_size": 15}, ["does not divide"],
                 id="train_batch_size does not divide among processes",
                 marks=pytest.mark.skip(reason="needs several processes under torchrun (the DDP tests)")),
    # -- models --
    pytest.param(lambda t: {"model.model_path": str(t)},
                 ["model.model_path", "no weights"], id="model_path without weights"),
    pytest.param(lambda t: {"model.model_path": str(t / "ckpt-nope")},
                 ["model.model_path", "ckpt-nope"], id="model_path missing"),
    pytest.param(lambda t: {"model.model_path": str(t), "model.model_file": "model.bin"},
                 ["model.bin", "no weights"], id="model_file missing"),
    pytest.param(lambda t: {"model.model_path": write_bytes(t, "weights.pt", b"not a pickle")},
                 ["weights.pt", "not a readable state-dict"], id="model_path not a state dict"),
    pytest.param(lambda t: {"model.model_path": save_state_dict(t, "other.pt", {"other.weight": torch.zeros(2)})},
                 ["other.pt", "missing from the file"], id="state dict of another architecture"),
    pytest.param(lambda t: {"model.hf_model": str(t / "no-model")},
                 ["model.hf_model", "no-model"], id="hf_model missing"),
]


@pytest.mark.parametrize("case, fragments", CASES)
def test_bad_input_fails_with_one_clear_line_and_writes_nothing(tmp_path, tiny_bert, capfd, case, fragments):
    train = write_csv(tmp_path / "train.csv", GOOD)
    val = write_csv(tmp_path / "val.csv", GOOD)
    overrides = case(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    capfd.readouterr()

    rc = trainer.main(base_args(tmp_path, tiny_bert, train, val, **overrides)
                      + ["--trainer.num_threads", "1"])

    out, err = capfd.readouterr()
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err + out
    for fragment in fragments:
        assert fragment in lines[0]
    # nothing written: no log folder, no checkpoint folder, no other file
    assert not (tmp_path / "runs").exists() and not (tmp_path / "ckpt").exists()
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_checkpoint_trained_on_other_labels_is_refused(tmp_path, tiny_bert, capfd):
    other = tmp_path / "other-checkpoint"
    model = build_model({"hf_model": tiny_bert, "model_path": None, "model_file": None}, ["a", "b", "c"])
    save_pretrained(model, make_tokenizer(), other)
    val = write_csv(tmp_path / "val.csv", GOOD)
    before = sorted(tmp_path.rglob("*"))
    capfd.readouterr()
    rc = trainer.main(base_args(tmp_path, tiny_bert, "null", val, **{"model.model_path": str(other)}))
    err = capfd.readouterr().err.strip()
    assert rc != 0 and err.startswith("error: ") and len(err.splitlines()) == 1
    assert "['a', 'b', 'c']" in err and "data.labels_list" in err
    assert sorted(tmp_path.rglob("*")) == before


def test_help_among_other_arguments_prints_every_key_and_runs_nothing(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    rc = trainer.main(["--trainer.epoch", "3", "--help"])
    out, err = capfd.readouterr()
    assert rc == 0 and err == ""
    assert out.startswith(trainer.__doc__.strip().splitlines()[0])
    assert "\n  --data.quoting auto " in out and "\n  --distill.cache_teacher_logits true " in out
    assert list(tmp_path.iterdir()) == []


def test_debug_shows_the_traceback(tmp_path, tiny_bert):
    train = write_csv(tmp_path / "train.csv", GOOD)
    with pytest.raises(Exception, match="file not found"):
        trainer.main(base_args(tmp_path, tiny_bert, train, str(tmp_path / "nope.csv"),
                               **{"trainer.debug": "true"}))


@pytest.mark.slow  # trains several epochs
def test_good_input_of_the_same_shape_runs(tmp_path, tiny_bert, capfd):
    # the baseline every case above changes one thing of: it must run, write what they must not,
    # and learn the four validation rows (256 training rows x 3 epochs are enough)
    train = write_csv(tmp_path / "train.csv", sentiment_rows(256))
    val = write_csv(tmp_path / "val.csv", GOOD)
    rc = trainer.main(base_args(tmp_path, tiny_bert, train, val) + ["--trainer.num_threads", "1"])
    out, err = capfd.readouterr()
    assert rc == 0, err
    assert "error:" not in err
    assert list((tmp_path / "runs").iterdir()) and (tmp_path / "ckpt" / "best").is_dir()
    # the reported accuracy is the best checkpoint's on those rows, as plain transformers scores it
    best = tmp_path / "ckpt" / "best"
    model = AutoModelForSequenceClassification.from_pretrained(best).eval()
    tokenizer = AutoTokenizer.from_pretrained(best)
    with torch.no_grad():
        logits = model(**tokenizer([row["text"] for row in GOOD], padding=True, return_tensors="pt")).logits
    predicted = [model.config.id2label[i] for i in logits.argmax(dim=1).tolist()]
    assert predicted == [row["label"] for row in GOOD]
    assert json.loads(out.strip().splitlines()[-1])["acc"] == 1.0
