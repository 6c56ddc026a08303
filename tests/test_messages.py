"""What a user sees and gets: progress on every long wait, a warning when a run has collapsed to
one class, and files that follow the umask (a team can read a shared checkpoint folder)."""
import os
import stat
import sys

import numpy as np
import pytest

import evaluation
import trainer
from conftest import base_args, save_tiny_encoder, sentiment_rows, write_csv


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("messages")
    model = save_tiny_encoder(tmp / "bert")
    train = write_csv(tmp / "train.csv", sentiment_rows(64, seed=1))
    val = write_csv(tmp / "val.csv", sentiment_rows(40, seed=2))
    old = os.umask(0o022)
    try:
        assert trainer.main(base_args(tmp, model, train, val, **{"trainer.epochs": 1})) == 0
        predictions = tmp / "preds.csv"
        assert trainer.main(base_args(tmp, model, "null", val, **{
            "model.model_path": str(tmp / "ckpt" / "best"), "data.predict_filepath": val,
            "data.predict_output": str(predictions)})) == 0
    finally:
        os.umask(old)
    return tmp


def test_checkpoint_and_log_files_follow_the_umask(trained):
    files = [p for p in (trained / "ckpt").rglob("*") if p.is_file() and p.name != ".lock"]
    files += [p for p in (trained / "runs").rglob("*") if p.is_file()] + [trained / "preds.csv"]
    assert any(p.name == "model.safetensors" for p in files)  # transformers writes it 0600 itself
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in files}
    assert set(modes.values()) == {0o644}, {n: oct(m) for n, m in modes.items() if m != 0o644}


def test_evaluation_and_prediction_show_progress_with_the_device(trained, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # tqdm's bars: on a terminal (progress.py)
    args = base_args(trained, str(trained / "bert"), "null", str(trained / "val.csv"), **{
        "model.model_path": str(trained / "ckpt" / "best"), "trainer.val_batch_size": 4,
        "data.predict_filepath": str(trained / "val.csv"), "data.predict_output": str(trained / "p2.csv")})
    assert trainer.main(args) == 0
    out, err = capsys.readouterr()
    assert "evaluate on cpu" in err and "predict on cpu" in err and "/10 " in err  # 40 rows / 4 a batch
    # the first line of each says the device, before the wait, as training's does (after the note of
    # what the checkpoint supplied: its temperature)
    lines = [line for line in out.splitlines() if not line.startswith("note: ")]
    assert lines[0] == f"evaluation of {trained / 'ckpt' / 'best'} on {trained / 'val.csv'} (40 examples), device cpu"
    assert f"prediction of {trained / 'val.csv'}, device cpu" in lines
    assert lines.index(f"prediction of {trained / 'val.csv'}, device cpu") < lines.index(
        f"predictions for 40 texts written to {trained / 'p2.csv'}")


def test_a_classifier_predicting_one_class_everywhere_is_warned_about():
    names = ["negative", "neutral", "positive"]
    warning = evaluation.one_class_warning(np.array([1, 1, 1, 1]), names)
    assert warning.startswith("every example is predicted as 'neutral'")
    assert evaluation.one_class_warning(np.array([1, 0, 1, 1]), names) is None
    assert evaluation.one_class_warning(np.array([0.3, 0.3]), None) is None  # regression: not a class


def test_validation_of_a_collapsed_run_says_so(trained, capsys, monkeypatch):
    def constant(model, encoded, *args, **kwargs):
        return np.tile(np.array([[2.0, -1.0]], dtype=np.float32), (len(encoded), 1))
    monkeypatch.setattr(trainer, "predict_logits", constant)
    args = base_args(trained / "collapsed", str(trained / "bert"), str(trained / "train.csv"),
                     str(trained / "val.csv"), **{"trainer.epochs": 1})
    assert trainer.main(args) == 0
    out = capsys.readouterr().out
    assert "warning: at step 4, every example is predicted as 'negative'" in out
