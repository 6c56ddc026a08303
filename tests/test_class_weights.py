"""Class weights for imbalanced data (module.class_weights): null, balanced = n / (k * count) from
the training labels, or a list; the weighted loss is still divided by the number of examples, so
accumulation and DDP split it alike; validation prints the per-class table."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import config
import distill
import splits
import trainer
from conftest import base_args, save_tiny_encoder, sentiment_rows, write_csv
from model import load_tokenizer


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("weights")
    rows = sentiment_rows(120, seed=5)
    # imbalance: keep one positive row in five
    rows = [r for i, r in enumerate(rows) if r["label"] == "negative" or i % 5 == 0]
    model = save_tiny_encoder(tmp / "bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

    def args(name, **more):
        return base_args(tmp / name, model, write_csv(tmp / "train.csv", rows), write_csv(tmp / "val.csv", rows),
                         **{"trainer.epochs": 1, "trainer.speedups": "false", **more})
    return {"tmp": tmp, "args": args, "rows": rows}


def split_of(job, spec):
    cfg = config.load_config(job["args"]("x", **{"module.class_weights": spec}))
    tokenizer = load_tokenizer(cfg["model"])
    return cfg, splits.load_split(cfg, tokenizer, str(job["tmp"] / "train.csv"), True)


def test_balanced_weights_are_n_over_k_times_count(job):
    cfg, train = split_of(job, "balanced")
    counts = np.bincount(train.encoded.labels, minlength=2)
    weights = splits.class_weights(cfg, train, torch.device("cpu"))
    assert torch.allclose(weights, torch.tensor(counts.sum() / (2 * counts), dtype=torch.float32))
    assert weights[1] > 2 * weights[0]  # the rare class weighs more
    cfg, train = split_of(job, "[1, 3]")
    assert splits.class_weights(cfg, train, torch.device("cpu")).tolist() == [1, 3]


def test_weighted_loss_is_summed_weighted_cross_entropy_over_examples():
    logits, labels, weights = torch.randn(5, 3), torch.tensor([0, 2, 1, 2, -1]), torch.tensor([1.0, 2.0, 0.5])
    known = labels >= 0
    expected = sum(weights[y] * F.cross_entropy(logits[i:i + 1], y.view(1)) for i, y in enumerate(labels) if y >= 0)
    assert torch.allclose(distill.labels_loss(logits, labels, weights), expected)
    model = lambda **inputs: type("Out", (), {"logits": logits[known]})()  # noqa: E731
    loss, _ = trainer.supervised_loss(model, {"input_ids": None, "labels": labels[known]}, None, weights)
    assert torch.allclose(loss, expected)


def test_weighted_training_is_the_same_however_a_step_is_split_and_differs_from_unweighted(job):
    final = {}
    for name, limit, spec in [("one", 16, "[1, 3]"), ("micro", 4, "[1, 3]"), ("plain", 16, "null")]:
        assert trainer.main(job["args"](name, **{"trainer.gpu_batch_size_limit": limit,
                                                 "module.class_weights": spec})) == 0
        final[name] = load_file(job["tmp"] / name / "ckpt" / "last" / "model.safetensors")
    assert all(torch.allclose(final["one"][k], final["micro"][k], atol=2e-6) for k in final["one"])
    assert not all(torch.allclose(final["one"][k], final["plain"][k], atol=1e-4) for k in final["one"])


def test_validation_prints_the_per_class_table_and_the_weights(job, capsys):
    assert trainer.main(job["args"]("table", **{"module.class_weights": "balanced"})) == 0
    out = capsys.readouterr().out
    assert "class weights: negative " in out and ", positive " in out
    assert "class      precision  recall      f1  support" in out and "\npositive " in out


@pytest.mark.parametrize("spec, fragment", [
    ("[1]", "must be 2 positive numbers"), ("[1, -2]", "must be 2 positive numbers"),
    ("equal", "use null, balanced, or a list of 2 weights")])
def test_bad_class_weights_are_one_line(job, spec, fragment):
    with pytest.raises(config.ConfigError, match=fragment):
        config.load_config(job["args"]("bad", **{"module.class_weights": spec}))
    with pytest.raises(config.ConfigError, match="regression"):
        config.load_config(job["args"]("bad", **{"module.class_weights": "balanced", "data.labels_list": "[score]",
                                                 "module.metric": "pcc_and_scc"}))
