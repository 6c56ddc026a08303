"""Loading models from bad or unusual files: a cut-short safetensors file or a head of another size
is one clear line (error: ... and exit status 2), and a pretrained classifier with another number
of labels is fine-tuned with a new head after a one-line warning."""
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertForSequenceClassification

import trainer
from conftest import base_args, make_tokenizer, save_tiny_encoder, tiny_config, write_csv
from model import build_model, save_pretrained

GOOD = [{"text": "good movie", "label": "positive"}, {"text": "bad plot", "label": "negative"},
        {"text": "great film", "label": "positive"}, {"text": "awful", "label": "negative"}]
THREE_LABELS = ["negative", "neutral", "positive"]


def model_section(hf_model, model_path=None):
    return {"hf_model": hf_model, "model_path": model_path, "model_file": None}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_bert):
    """A 2-label checkpoint directory as this project writes it."""
    path = tmp_path_factory.mktemp("checkpoint")
    save_pretrained(build_model(model_section(tiny_bert), ["negative", "positive"]), make_tokenizer(), path)
    return path


@pytest.fixture(scope="module")
def two_label_classifier(tmp_path_factory):
    """A pretrained sequence classifier with a 2-label head, as on the hub."""
    path = tmp_path_factory.mktemp("classifier")
    torch.manual_seed(0)
    BertForSequenceClassification(tiny_config(num_labels=2)).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def cut_short(path, length):
    data = path.read_bytes()
    path.write_bytes(data[:length(len(data))])


def run_error_line(tmp_path, hf_model, capfd, **overrides):
    """trainer.main on good data files: exit status 2 and its one line on stderr."""
    train = write_csv(tmp_path / "train.csv", GOOD)
    val = write_csv(tmp_path / "val.csv", GOOD)
    capfd.readouterr()
    rc = trainer.main(base_args(tmp_path, hf_model, train, val, **overrides))
    out, err = capfd.readouterr()
    assert rc == 2
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


# -- a truncated or empty model.safetensors --------------------------------------------------------


@pytest.mark.parametrize("length", [lambda n: n // 2, lambda n: 0], ids=["truncated", "empty"])
@pytest.mark.parametrize("where", ["model_path directory", "model_path file", "hf_model directory"])
def test_cut_short_safetensors_file_is_one_line_naming_it(tmp_path, tiny_bert, checkpoint, capfd, where, length):
    if where == "model_path directory":
        bad = shutil.copytree(checkpoint, tmp_path / "checkpoint")
        weights, overrides, key = bad / "model.safetensors", {"model.model_path": str(bad)}, "model.model_path"
    elif where == "model_path file":
        weights = tmp_path / "weights.safetensors"
        weights.write_bytes((checkpoint / "model.safetensors").read_bytes())
        overrides, key = {"model.model_path": str(weights)}, ""
    else:
        bad = save_tiny_encoder(tmp_path / "encoder")
        weights, overrides, key = tmp_path / "encoder" / "model.safetensors", {"model.hf_model": bad}, "model.hf_model"
    cut_short(weights, length)

    line = run_error_line(tmp_path, tiny_bert, capfd, **overrides)

    assert line.startswith(f"error: {key}")
    assert f"{weights} is truncated or corrupt" in line
    assert "re-export it or pick another checkpoint" in line


# -- a state dict with a head of another size ------------------------------------------------------


@pytest.mark.parametrize("name, tensor, in_file, expected", [
    ("weights.safetensors", "classifier.bias", [2], [3]),  # safetensors sorts the keys
    ("weights.pt", "classifier.weight", [2, 32], [3, 32]),  # torch.save keeps the model's order
])
def test_state_dict_with_a_2_label_head_for_3_labels_names_tensor_and_shapes(
        tmp_path, tiny_bert, checkpoint, capfd, name, tensor, in_file, expected):
    state = BertForSequenceClassification.from_pretrained(checkpoint).state_dict()
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_file(state, str(path))
    else:
        torch.save(state, path)

    line = run_error_line(tmp_path, tiny_bert, capfd, **{"model.model_path": str(path),
                                                          "data.labels_list": "[negative, neutral, positive]"})

    assert line == (f"error: {path}: {tensor} has shape {in_file} in the file, the model expects {expected}; "
                    f"the file's head has 2 labels, data.labels_list 3: use the labels_list of that training run")


def test_state_dict_of_a_wider_model_is_one_line_about_the_architecture(tmp_path, tiny_bert, capfd):
    wide = BertForSequenceClassification(tiny_config(hidden=64, num_labels=2))
    path = tmp_path / "wide.pt"
    torch.save(wide.state_dict(), path)

    line = run_error_line(tmp_path, tiny_bert, capfd, **{"model.model_path": str(path)})

    vocab = len(make_tokenizer())
    assert f"{path}: bert.embeddings.word_embeddings.weight has shape [{vocab}, 64] in the file" in line
    assert f"the model expects [{vocab}, 32]; is it a state dict of this architecture (model.hf_model)?" in line


# -- model.hf_model a classifier already --------------------------------------------------------------


def test_hf_model_classifier_with_2_labels_gets_a_new_3_label_head_and_one_warning(two_label_classifier, capsys):
    saved = load_file(str(two_label_classifier / "model.safetensors"))
    capsys.readouterr()

    model = build_model(model_section(str(two_label_classifier)), THREE_LABELS)

    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line.lower()]
    assert warnings == [f"warning: model.hf_model {str(two_label_classifier)!r} has a 2-label classification "
                        f"head; it is replaced by a new, untrained 3-label head (data.labels_list)"]
    assert model.config.num_labels == 3
    assert model.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    assert model.config.label2id == {"negative": 0, "neutral": 1, "positive": 2}
    weights = model.state_dict()
    assert weights["classifier.weight"].shape == (3, 32) and weights["classifier.bias"].shape == (3,)
    # the encoder is the pretrained one
    encoder = [k for k in saved if not k.startswith("classifier.")]
    assert encoder and all(torch.equal(weights[k], saved[k]) for k in encoder)


def test_hf_model_classifier_with_as_many_labels_keeps_its_head(two_label_classifier, capsys):
    saved = load_file(str(two_label_classifier / "model.safetensors"))
    capsys.readouterr()

    model = build_model(model_section(str(two_label_classifier)), ["bad", "good"])

    assert "warning" not in capsys.readouterr().err.lower()
    assert model.config.id2label == {0: "bad", 1: "good"}
    weights = model.state_dict()
    assert torch.equal(weights["classifier.weight"], saved["classifier.weight"])
    assert torch.equal(weights["classifier.bias"], saved["classifier.bias"])


def test_training_from_a_2_label_classifier_saves_a_3_label_checkpoint(tmp_path, two_label_classifier, capfd):
    rows = GOOD + [{"text": "the film", "label": "neutral"}, {"text": "a plot", "label": "neutral"}]
    train, val = write_csv(tmp_path / "train.csv", rows), write_csv(tmp_path / "val.csv", rows)
    capfd.readouterr()
    rc = trainer.main(base_args(tmp_path, str(two_label_classifier), train, val, **{
        "data.labels_list": "[negative, neutral, positive]", "trainer.epochs": 1}))
    err = capfd.readouterr().err
    assert rc == 0, err
    assert "has a 2-label classification head" in err and "Traceback" not in err
    best = BertForSequenceClassification.from_pretrained(tmp_path / "ckpt" / "best")
    assert best.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    assert best.classifier.weight.shape == (3, 32)


# -- a tokenizer folder that does not load ---------------------------------------------------------


@pytest.mark.parametrize("damage", [
    {"tokenizer.json": "{}"},  # once a KeyError traceback ('added_tokens')
    {"tokenizer.json": "[1, 2]"},
    {"tokenizer.json": '{"version": "1.0", "model": '},  # cut short
    {"tokenizer_config.json": "not json"},
])
def test_a_tokenizer_folder_that_does_not_load_is_one_line_naming_it(tmp_path, tiny_bert, capfd, damage):
    encoder = shutil.copytree(tiny_bert, tmp_path / "encoder")
    (encoder / "vocab.txt").unlink(missing_ok=True)  # the damaged file is all there is to read
    for name, text in damage.items():
        (encoder / name).write_text(text, encoding="utf-8")
    line = run_error_line(tmp_path, tiny_bert, capfd, **{"model.tokenizer_path": str(encoder)})
    assert line.startswith(f"error: model.tokenizer_path '{encoder}': cannot load a tokenizer there (")
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "runs").exists()  # nothing written
