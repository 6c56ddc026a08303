"""The benchmark's own arithmetic and its trainer.py run, on a tiny model (bench/bench.py)."""
import json
import sys
from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertForSequenceClassification
from transformers.models.bert.modeling_bert import BertLayer

from conftest import ROOT, save_tiny_encoder, sentiment_rows, tiny_config, write_csv
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


def test_ours_worker_trains_and_reports_on_a_tiny_model(tmp_path):
    pytest.importorskip("psutil")
    rows = [{"sentiment": r["label"], "text": r["text"]} for r in sentiment_rows(48, labels=bench.LABELS)]
    train = write_csv(tmp_path / "train.csv", rows[:32])
    val = write_csv(tmp_path / "val.csv", rows[32:])
    job = {"train_file": train, "eval_file": val, "model": save_tiny_encoder(tmp_path / "tiny"),
           "epochs": 1, "batch_size": 8, "eval_batch_size": 8, "lr": 1e-3, "warmup": 0.1,
           "weight_decay": 0.01, "max_seq_len": 16, "seed": 0, "compile": False, "bf16": False,
           "random_roberta": False, "device": "cpu", "log_dir": str(tmp_path / "runs")}
    result = bench.run_ours(job)
    assert result["train_s"] > 0 and result["eval_s"] > 0 and result["first_step_s"] > 0
    assert 0 <= result["acc"] <= 1 and 0 <= result["f1_macro"] <= 1
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
