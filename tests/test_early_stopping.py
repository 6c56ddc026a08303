"""Early stopping: trainer.early_stopping_patience validations in a row without module.metric
improving by more than early_stopping_min_delta end the run, the best checkpoint is its result, and
the counters are part of the checkpoint, so a resumed run stops at the same step.

The validation metric is scripted as a function of the step (the tiny task would only improve), so
every run below knows where it must stop.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import evaluation
import trainer
from conftest import ROOT, base_args, last_json_line, save_tiny_encoder, sentiment_rows, stderr_tail, write_csv

# validation every 2 steps (13 steps an epoch, 4 epochs): acc rises to 0.7 at step 6, then stalls
SCRIPT = {2: 0.5, 4: 0.6, 6: 0.7, 8: 0.7, 10: 0.705, 12: 0.69, 13: 0.69, 14: 0.8}


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("early")
    model = save_tiny_encoder(tmp / "bert")
    train = write_csv(tmp / "train.csv", sentiment_rows(200, seed=3))
    val = write_csv(tmp / "val.csv", sentiment_rows(40, seed=4))

    def args(name, **more):
        return base_args(tmp / name, model, train, val, **{
            "trainer.epochs": 4, "trainer.eval_steps": 2, "trainer.early_stopping_patience": 3,
            "trainer.early_stopping_min_delta": 0.01, "ckpt.keep_last": "null", **more})
    return {"tmp": tmp, "args": args}


@pytest.fixture
def scripted(monkeypatch):
    """The validation metric of step s is SCRIPT[s] (0.1 past the script)."""
    real = evaluation.split_metrics
    steps = {}

    def scripted_metrics(logits, split, cfg, where):
        metrics = real(logits, split, cfg, where)
        if where.startswith("at step "):
            step = int(where.split()[-1])
            metrics["acc"] = SCRIPT.get(step, 0.1)
            steps[step] = metrics["acc"]
        return metrics
    monkeypatch.setattr(trainer, "split_metrics", scripted_metrics)
    return steps


def test_three_validations_without_an_improvement_over_min_delta_stop_the_run(job, scripted, capsys):
    assert trainer.main(job["args"]("stopped")) == 0
    out = capsys.readouterr().out
    result = last_json_line(out)
    # 8: +0, 10: +0.005 (< min_delta, but a new best), 12: -0.015 -> the third in a row
    assert sorted(scripted) == [2, 4, 6, 8, 10, 12]
    assert result["stopped_early_at_step"] == 12 and result["best_step"] == 10 and result["acc"] == 0.705
    assert ("early stopping at step 12: module.metric acc has not improved by more than 0.01 for 3 "
            "validations; the result is the best checkpoint, of step 10") in out
    ckpt = job["tmp"] / "stopped" / "ckpt"
    assert (ckpt / "best").resolve().name == "checkpoint-epoch1-step10"
    assert (ckpt / "last").resolve().name == "checkpoint-epoch1-step12"
    assert json.loads((ckpt / "last" / "checkpoint.json").read_text())["bad_validations"] == 3


def test_a_run_killed_before_it_stops_early_and_resumed_stops_at_the_same_step(job, scripted, monkeypatch, capsys):
    assert trainer.main(job["args"]("reference")) == 0
    real_step = trainer.Trainer.train_step

    def stop_at_9(self, *a):
        real_step(self, *a)
        if self.step + 1 == 9:
            self.stop_signal = "SIGTERM"  # one validation without improvement (step 8) is in the state
    monkeypatch.setattr(trainer.Trainer, "train_step", stop_at_9)
    assert trainer.main(job["args"]("resumed")) == 1
    monkeypatch.setattr(trainer.Trainer, "train_step", real_step)
    capsys.readouterr()
    assert trainer.main(job["args"]("resumed", **{"ckpt.resume": "auto"})) == 0
    assert last_json_line(capsys.readouterr().out)["stopped_early_at_step"] == 12
    ours = load_file(job["tmp"] / "resumed" / "ckpt" / "last" / "model.safetensors")
    theirs = load_file(job["tmp"] / "reference" / "ckpt" / "last" / "model.safetensors")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    # resuming the finished run again trains nothing more: it had stopped
    assert trainer.main(job["args"]("resumed", **{"ckpt.resume": "auto"})) == 0
    assert last_json_line(capsys.readouterr().out)["stopped_early_at_step"] == 12


@pytest.mark.slow  # trains several epochs
def test_without_patience_the_run_goes_on(job, scripted, capsys):
    assert trainer.main(job["args"]("off", **{"trainer.early_stopping_patience": "null",
                                              "trainer.epochs": 2})) == 0
    result = last_json_line(capsys.readouterr().out)
    assert "stopped_early_at_step" not in result and max(scripted) == 26 and result["best_step"] == 14


@pytest.mark.slow
def test_under_torchrun_every_rank_stops_at_the_same_step(job):
    """min_delta 1.0: no accuracy can improve by that, so validations 2 and 3 (steps 4 and 6) stop."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "trainer.py"), *job["args"]("ddp", **{"trainer.backend": "ddp", "trainer.early_stopping_patience": 2,
                                                         "trainer.early_stopping_min_delta": 1.0})],
        capture_output=True, text=True, cwd=job["tmp"], timeout=300, env=env)
    assert out.returncode == 0, stderr_tail(out.stderr)
    result = last_json_line(out.stdout)
    assert result["stopped_early_at_step"] == 6 and result["best_step"] in (2, 4, 6)


def test_a_small_gain_at_the_stopping_validation_is_the_best_it_names(job, scripted, monkeypatch, capsys):
    import test_early_stopping
    monkeypatch.setattr(test_early_stopping, "SCRIPT", {2: 0.5, 4: 0.6, 6: 0.605})  # +0.005 < min_delta
    assert trainer.main(job["args"]("small-gain", **{"trainer.early_stopping_patience": 1})) == 0
    out = capsys.readouterr().out
    assert "early stopping at step 6" in out and "the result is the best checkpoint, of step 6" in out
    assert last_json_line(out)["best_step"] == 6
