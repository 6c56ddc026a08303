"""The benchmark's own arithmetic and its trainer.py run, on a tiny model (bench/bench.py)."""
import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoTokenizer, BertForSequenceClassification
from transformers.models.bert.modeling_bert import BertLayer

from conftest import ROOT, save_tiny_encoder, sentiment_rows, tiny_config, write_csv
import trainer
from speedups import first_position_last_layer

sys.path.insert(0, str(ROOT / "bench"))
import bench  # noqa: E402


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("cls_only", [False, True])
def test_encoder_flops_match_torch_flop_counter_on_unpadded_sequences(training, cls_only):
    config = tiny_config("bert", num_labels=3)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    if cls_only:
        first_position_last_layer(model)
    counted = 0
    for length in (3, 11):  # one sequence at a time: no padding, as the benchmark counts
        ids = torch.randint(5, config.vocab_size, (1, length))
        with FlopCounterMode(display=False) as counter:
            logits = model(input_ids=ids).logits
            if training:
                logits.sum().backward()
        counted += counter.get_total_flops()
    assert bench.encoder_flops(config, [3, 11], training=training, cls_only_last_layer=cls_only) == counted


def test_ours_worker_trains_and_reports_on_a_tiny_model(tmp_path, monkeypatch):
    pytest.importorskip("psutil")
    rows = [{"sentiment": r["label"], "text": r["text"]} for r in sentiment_rows(48, labels=bench.LABELS)]
    train = write_csv(tmp_path / "train.csv", rows[:32])
    val = write_csv(tmp_path / "val.csv", rows[32:])
    job = {"train_file": train, "eval_file": val, "model": save_tiny_encoder(tmp_path / "tiny"),
           "epochs": 1, "batch_size": 8, "eval_batch_size": 8, "lr": 1e-3, "warmup": 0.1,
           "weight_decay": 0.01, "max_seq_len": 16, "seed": 0, "compile": False, "bf16": False,
           "random_roberta": False, "device": "cpu", "log_dir": str(tmp_path / "runs")}
    evaluated, predict_logits = [], trainer.predict_logits

    def seen_predict_logits(model, *args):  # the worker's evaluation, seen on its way through
        logits = predict_logits(model, *args)
        evaluated.append((model, logits))
        return logits
    monkeypatch.setattr(trainer, "predict_logits", seen_predict_logits)
    result = bench.run_ours(job)
    assert result["train_s"] > 0 and result["eval_s"] > 0 and result["first_step_s"] > 0
    # the 4 updates moved the encoder, and the metrics are those of its predictions on val.csv
    ((model, logits),) = evaluated
    initial = load_file(tmp_path / "tiny" / "model.safetensors")["embeddings.word_embeddings.weight"]
    assert not torch.equal(model.bert.embeddings.word_embeddings.weight.detach(), initial)
    texts = [row["text"] for row in rows[32:]]
    with torch.no_grad():  # every row's logits, in the file's order
        inputs = AutoTokenizer.from_pretrained(job["model"])(texts, padding=True, truncation=True,
                                                             max_length=16, return_tensors="pt")
        np.testing.assert_allclose(logits, model.eval()(**inputs).logits.numpy(), atol=1e-5)
    predicted = logits.argmax(axis=1)
    truth = np.array([bench.LABELS.index(row["sentiment"]) for row in rows[32:]])
    assert result["acc"] == np.mean(predicted == truth)
    f1 = [2 * np.sum((predicted == c) & (truth == c)) / max(1, np.sum(predicted == c) + np.sum(truth == c))
          for c in range(len(bench.LABELS))]
    assert result["f1_macro"] == pytest.approx(np.mean(f1))
    assert len(result["train_lengths"]) == 32 and len(result["eval_lengths"]) == 16
    assert max(result["train_lengths"]) <= 16
    json.dumps(result)  # the worker hands its result to the driver as JSON


def test_step_profile_switches_one_speedup_off_and_back_on(tiny_bert):
    import speedups
    import step_profile
    from model import build_model
    model = build_model({"hf_model": tiny_bert, "model_path": None, "model_file": None}, bench.LABELS)
    run = SimpleNamespace(model=speedups.apply(model, torch.device("cpu")))  # what a Trainer holds
    layer = model.bert.encoder.layer[-1]
    step_profile.use_cls_only(run, False)
    assert type(layer) is BertLayer
    step_profile.use_cls_only(run, True)
    assert type(layer) is speedups.FirstPositionBertLayer
    step_profile.use_dropout(run, False)
    assert not any(isinstance(m, speedups.CPUDropout) for m in model.modules())
    assert model.config._attn_implementation == "sdpa"
    step_profile.use_dropout(run, True)
    assert not [m for m in model.modules() if type(m) is torch.nn.Dropout]
    assert model.config._attn_implementation == speedups.CPU_DROPOUT_ATTENTION
