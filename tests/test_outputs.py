"""What the run writes besides checkpoints: the log folder and the predictions file.

A full disk at any writer is one error line; a resumed run writes logs only in a run folder of
trainer.log_dir, whatever its checkpoint.json says; a killed prediction's leftover is swept when
it is proved ours, and left alone when it is not. Runs are in-process on a tiny model.
"""
import errno
import json

import pytest

import evaluation
import runlog
import trainer
from checkpoint import MANIFEST
from conftest import base_args, last_json_line, save_tiny_encoder, sentiment_rows, write_csv
from files import WRITING, WRITING_TEXT


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("outputs")
    model = save_tiny_encoder(tmp / "bert")
    train = write_csv(tmp / "train.csv", sentiment_rows(64, seed=3))
    val = write_csv(tmp / "val.csv", sentiment_rows(20, seed=4))
    predict = write_csv(tmp / "new.csv", [{"text": r["text"]} for r in sentiment_rows(12, seed=5)], columns=["text"])

    def args(name, **more):
        return base_args(tmp / name, model, train, val, **{"trainer.epochs": 2, **more})
    return {"tmp": tmp, "args": args, "predict": predict}


def error_lines(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error: ")]


def no_space(real_open, suffix):
    """open() that finds the disk full when a file ending in suffix is opened to write."""
    def fake_open(path, mode="r", *args, **kwargs):
        if str(path).endswith(suffix) and any(m in mode for m in "awx"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *args, **kwargs)
    return fake_open


def test_a_full_disk_under_the_log_folder_is_one_line(job, monkeypatch, capsys):
    monkeypatch.setattr(runlog, "open", no_space(open, "metrics.jsonl"), raising=False)
    assert trainer.main(job["args"]("full-logs", **{"trainer.log_steps": 1})) == 2
    [line] = error_lines(capsys)
    assert line.startswith("error: cannot write ") and line.endswith(
        "metrics.jsonl: No space left on device (the disk is full); free space or choose another trainer.log_dir")


@pytest.mark.slow  # trains more than one epoch
def test_a_full_disk_under_the_predictions_is_one_line_and_keeps_the_old_file(job, monkeypatch, capsys):
    tmp = job["tmp"]
    output = tmp / "predictions.csv"
    output.write_text("the old predictions\n")
    args = job["args"]("full-predict", **{"data.predict_filepath": job["predict"], "data.predict_output": str(output)})

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(evaluation, "write_prediction_rows", full)
    assert trainer.main(args) == 2
    assert error_lines(capsys) == [f"error: cannot write {output}: No space left on device (the disk is full); "
                                   f"free space or choose another data.predict_output"]
    assert output.read_text() == "the old predictions\n"
    assert not list(tmp.glob(".writing-*"))  # nothing half-written left beside it


def test_a_killed_predictions_leftover_is_swept_only_when_proved_ours(job, capsys):
    tmp = job["tmp"] / "sweep"
    tmp.mkdir()
    output = tmp / "out.csv"
    ours, theirs = tmp / ".writing-out.csv-dead0001", tmp / ".writing-out.csv-user0001"
    for folder in (ours, theirs):
        folder.mkdir()
        (folder / "out.csv").write_text("text,predicted_label\nhalf a fi")
    (ours / WRITING).write_text(f"{WRITING_TEXT} 999999\n")  # its writer is gone: nobody holds the lock
    args = job["args"]("sweep-run", **{"data.predict_filepath": job["predict"], "data.predict_output": str(output),
                                       "trainer.epochs": 1})
    assert trainer.main(args) == 0
    assert f"note: removed {ours}, which a killed run left while writing {output}" in capsys.readouterr().out
    assert not ours.exists() and (theirs / "out.csv").exists()  # no mark of ours: not ours to delete
    assert len(output.read_text().splitlines()) == 13


def paused_run(job, name):
    """A run stopped after its first epoch (trainer.stop_after_epochs), to be resumed."""
    assert trainer.main(job["args"](name, **{"trainer.stop_after_epochs": 1})) == 0
    folder = job["tmp"] / name
    [run_dir] = (folder / "runs").iterdir()
    return folder, run_dir


def test_a_run_dir_edited_in_checkpoint_json_is_never_written(job, capsys):
    folder, _ = paused_run(job, "edited")
    elsewhere = job["tmp"] / "not-a-log-folder"
    elsewhere.mkdir()
    manifest = folder / "ckpt" / "last" / MANIFEST
    saved = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**saved, "run_dir": str(elsewhere)}, indent=1))
    capsys.readouterr()
    assert trainer.main(job["args"]("edited", **{"ckpt.resume": "auto"})) == 0
    assert "which is not a run folder of trainer.log_dir" in capsys.readouterr().out
    assert list(elsewhere.iterdir()) == []


def test_a_new_log_dir_on_resume_gets_the_rest_of_the_logs(job, capsys):
    folder, first = paused_run(job, "moved")
    before = (first / "metrics.jsonl").read_text()
    new_logs = job["tmp"] / "moved" / "new-runs"
    assert trainer.main(job["args"]("moved", **{"ckpt.resume": "auto", "trainer.log_dir": str(new_logs)})) == 0
    assert (first / "metrics.jsonl").read_text() == before  # the old folder is left as it was
    [second] = new_logs.iterdir()
    steps = [json.loads(line)["step"] for line in (second / "metrics.jsonl").read_text().splitlines()]
    assert steps and min(steps) > 4  # what the resumed launch logged, after its checkpoint (step 4)


def test_a_log_line_without_a_step_does_not_stop_a_resume(job, capsys):
    folder, run_dir = paused_run(job, "stepless")
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"note": "a line someone added"}) + "\n")
    capsys.readouterr()
    assert trainer.main(job["args"]("stepless", **{"ckpt.resume": "auto"})) == 0
    out = capsys.readouterr().out
    assert "dropped a line without a step" in out and "best_step" in last_json_line(out)
    assert "a line someone added" not in (run_dir / "metrics.jsonl").read_text()


def test_a_rank_hears_that_rank_zero_failed_and_leaves_the_saying_to_it(monkeypatch, capsys):
    """on_main on another rank: rank 0's failure arrives by broadcast and ends this rank too, as
    MainProcessFailed; main() prints rank 0's own line there, and nothing more on the other ranks."""
    import torch

    import processes

    def broadcast(objects, src, group):  # what rank 0 sends when its fn failed
        objects[0] = ("error", "cannot write checkpoints/last")
    monkeypatch.setattr(torch.distributed, "broadcast_object_list", broadcast)
    rank1 = processes.Process(1, 1, 2, torch.device("cpu"), False, True, cpu_group="gloo group")
    with pytest.raises(processes.MainProcessFailed, match=r"^the main process \(rank 0\) failed: cannot write"):
        processes.on_main(rank1, lambda: "never run here")

    def failing_run(cfg, proc):
        processes.on_main(rank1, lambda: None)
    for rank, printed in (("1", []), ("0", ["error: the main process (rank 0) failed: cannot write checkpoints/last"])):
        for key, value in {"RANK": rank, "WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"}.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setattr(trainer, "setup_distributed", lambda tcfg: rank1)
        assert trainer.main(["--trainer.device", "cpu"], run_fn=failing_run) == 2
        assert capsys.readouterr().err.splitlines() == printed


def test_a_full_disk_when_the_run_is_recorded_is_one_line(job, monkeypatch, capsys):
    real = runlog.write_json

    def write_json(path, obj):  # run.json, written last, once the run's result is known
        if path.name == "run.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, obj)
    monkeypatch.setattr(runlog, "write_json", write_json)
    assert trainer.main(job["args"]("full-record", **{"trainer.epochs": 1})) == 2
    [line] = error_lines(capsys)
    assert line.startswith("error: cannot write ") and line.endswith(
        "No space left on device (the disk is full); free space or choose another trainer.log_dir")
