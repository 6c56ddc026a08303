"""runlog.py: runs that say what they were and output that tells the truth: every run folder records
its command, checkpoint, files, config and times; `--runs` tables them; a checkpoint carries how its
files were read; a resume says only what is true; TensorBoard shows PR curves, the confusion matrix
and the per-class table; a distilled student's weights are stored once."""
import csv
import errno
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import BertConfig, BertForSequenceClassification

import distill
import processes
import runlog
import trainer
from conftest import ROOT, base_args, last_json_line, save_tiny_encoder, sentiment_rows, stderr_tail, without, write_csv


def main(argv, capsys):
    capsys.readouterr()
    rc = trainer.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def reviews(rows):
    """Columns named unlike config.yaml's (text, sentiment) and base_args' (text, label)."""
    return [{"review": row["text"], "verdict": row["label"]} for row in rows]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """One training run (1 epoch of 6 steps, validated every 2) on files with their own column
    names, then an evaluation and a prediction of its best checkpoint that do not name the columns."""
    tmp = tmp_path_factory.mktemp("runs")
    model = save_tiny_encoder(tmp / "bert")
    train = write_csv(tmp / "train.csv", reviews(sentiment_rows(96, seed=1)))
    val = write_csv(tmp / "val.csv", reviews(sentiment_rows(40, seed=2)))
    argv = base_args(tmp, model, train, val, **{"trainer.epochs": 1, "trainer.eval_steps": 2,
                                                "trainer.log_steps": "auto", "data.text_a_col": "review",
                                                "data.label_col": "verdict"})
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        assert trainer.main(argv) == 0, err.getvalue()[-2000:]
        trained = last_json_line(out.getvalue())
        best = str(tmp / "ckpt" / "best")
        # the checkpoint knows the columns: neither the evaluation nor the prediction names them
        plain = without(argv, "data.text_a_col", "data.label_col", "data.train_filepath")
        eval_argv = plain + ["--data.train_filepath", "null", "--model.model_path", best]
        assert trainer.main(eval_argv) == 0, err.getvalue()[-2000:]
        evaluated = last_json_line(out.getvalue())
        predict_argv = without(eval_argv, "data.val_filepath") + [
            "--data.val_filepath", "null", "--data.predict_filepath", val,
            "--data.predict_output", str(tmp / "predictions.csv")]
        assert trainer.main(predict_argv) == 0, err.getvalue()[-2000:]
        predicted = last_json_line(out.getvalue())
    return {"tmp": tmp, "argv": argv, "model": model, "train": train, "val": val, "out": out.getvalue(),
            "trained": trained, "evaluated": evaluated, "predicted": predicted, "eval_argv": eval_argv,
            "predict_argv": predict_argv}


# ---------------------------------------------------------------------------------------------
# runs that say what they were


def test_every_command_reports_its_wall_time_and_training_its_training_time(job):
    assert {"wall_s", "train_s"} <= set(job["trained"]) and 0 < job["trained"]["train_s"] <= job["trained"]["wall_s"]
    assert "wall_s" in job["evaluated"] and "wall_s" in job["predicted"]
    assert "train_s" not in job["evaluated"]


def test_eval_and_predict_folders_name_their_checkpoint_file_and_config(job):
    best = (job["tmp"] / "ckpt" / "best").resolve()
    step = json.loads((best / "checkpoint.json").read_text())["step"]
    for result, kind in ((job["evaluated"], "eval"), (job["predicted"], "predict")):
        folder = job["tmp"] / "runs" / os.path.basename(result["run_dir"])
        assert folder.name.endswith(f"-{kind}")
        record = json.loads((folder / "run.json").read_text())
        # paths relative to the run's folder (a checkpoint by its real folder): a moved folder still reads
        assert record["kind"] == kind and record["checkpoint"] == f"../../ckpt/{best.name}"
        assert record["checkpoint_step"] == step and record["result"]["wall_s"] == result["wall_s"]
        argv = job["eval_argv"] if kind == "eval" else job["predict_argv"]
        assert shlex.split(record["command"]) == ["python", "trainer.py", *argv]
        assert (folder / record["directory"]).resolve() == Path.cwd().resolve()  # where the command ran
        config = json.loads((folder / "config.json").read_text())
        assert config["model"]["model_path"] == str(job["tmp"] / "ckpt" / "best")
    evaluated = json.loads((job["tmp"] / "runs" / os.path.basename(job["evaluated"]["run_dir"]) / "run.json").read_text())
    assert evaluated["val_file"] == "../../val.csv" and evaluated["result"]["acc"] == job["evaluated"]["acc"]
    predicted = json.loads((job["tmp"] / "runs" / os.path.basename(job["predicted"]["run_dir"]) / "run.json").read_text())
    assert predicted["predict_file"] == "../../val.csv" and predicted["predictions"] == "../../predictions.csv"


def test_the_runs_table_lists_every_run_newest_first_and_as_csv(job, capsys):
    rc, out, _ = main(["--runs", "--trainer.log_dir", str(job["tmp"] / "runs")], capsys)
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["kind", "date", "model", "data"]
    assert [line.split()[0] for line in lines[1:4]] == ["predict", "eval", "train"]
    train_line = lines[3]
    assert f"acc {job['trained']['acc']:.4f}" in train_line and f" {job['trained']['best_step']} " in train_line
    assert "train.csv" in train_line and "bert" in train_line
    assert f"acc {job['evaluated']['acc']:.4f}" in lines[2] and "checkpoint-epoch1-step" in lines[2]
    with open(job["tmp"] / "runs" / "runs.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [row["kind"] for row in rows] == ["predict", "eval", "train"]
    assert float(rows[2]["value"]) == job["trained"]["acc"] and int(rows[2]["best_step"]) == job["trained"]["best_step"]
    # runs.csv's paths are relative to its folder
    assert float(rows[2]["wall_s"]) == job["trained"]["wall_s"] and rows[2]["data"] == "../train.csv"
    assert rows[2]["model"] == "../bert" and rows[1]["data"] == "../val.csv"
    assert rows[1]["model"] == f"../ckpt/{(job['tmp'] / 'ckpt' / 'best').resolve().name}"


def test_a_moved_folder_still_reads_its_runs(job, tmp_path, capsys):
    moved = shutil.copytree(job["tmp"], tmp_path / "moved", symlinks=True)
    rc, out, _ = main(["--runs", "--trainer.log_dir", str(moved / "runs")], capsys)
    assert rc == 0
    with open(moved / "runs" / "runs.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [row["kind"] for row in rows] == ["predict", "eval", "train"]
    for row in rows:  # every path leads to the moved copy's own files
        assert not os.path.isabs(row["data"]) and not os.path.isabs(row["model"])
        assert (moved / "runs" / row["data"]).is_file() and (moved / "runs" / row["model"]).is_dir()
    assert str(job["tmp"]) not in out


@pytest.mark.parametrize("damage", ['{"kind": "train", "resu', '{"result": "x"}', '{"kind": "bogus"}', '{"model": 5}',
                                    '[1, 2]', '{"result": {"best_step": [1]}}', '{"metric": ["acc"]}'])
def test_a_damaged_run_json_is_left_out_with_a_note_and_the_others_are_listed(tmp_path, capsys, damage):
    for name, record in (("20240101-120000-train", damage), ("20240102-120000-eval", '{"kind": "eval"}')):
        (tmp_path / name).mkdir()
        (tmp_path / name / "run.json").write_text(record, encoding="utf-8")
    rc, out, err = main(["--runs", "--trainer.log_dir", str(tmp_path)], capsys)
    assert rc == 0 and err == ""
    note, header, row, written = out.splitlines()
    assert note.startswith(f"note: left {tmp_path / '20240101-120000-train'} out of the table: its ")
    assert header.startswith("kind") and row.startswith("eval") and written.startswith("(also written to")


def test_a_log_folder_that_cannot_take_runs_csv_still_shows_the_table(job, monkeypatch, capsys):
    def full(path, newline=None):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(runlog, "atomic_write", full)
    rc, out, err = main(["--runs", "--trainer.log_dir", str(job["tmp"] / "runs")], capsys)
    assert rc == 0 and "Traceback" not in err
    *table, note = out.splitlines()
    assert [line.split()[0] for line in table] == ["kind", "predict", "eval", "train"]
    assert note == (f"note: {job['tmp'] / 'runs' / 'runs.csv'} not written (No space left on device); the table above "
                    f"has every run")


def test_a_log_folder_that_cannot_be_listed_is_one_line(tmp_path, monkeypatch, capsys):
    def denied(self):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(runlog.Path, "iterdir", denied)
    rc, out, err = main(["--runs", "--trainer.log_dir", str(tmp_path)], capsys)
    assert rc == 2 and err == (f"error: trainer.log_dir {tmp_path}: cannot list its runs (Permission denied); choose a "
                               f"folder you can read\n")


def test_a_run_folder_without_run_json_is_listed_from_its_config_and_metrics(tmp_path):
    folder = tmp_path / "20240101-120000-train"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"data": {"train_filepath": "t.csv"}, "model": {"hf_model": "m"},
                                                    "module": {"metric": "acc"}}))
    (tmp_path / "20240102-120000-eval").mkdir()
    (tmp_path / "not-a-run").mkdir()
    rows = runlog.list_runs(tmp_path)
    assert [(row["kind"], row["state"]) for row in rows] == [("eval", "unfinished"), ("train", "unfinished")]
    assert rows[1]["model"] == "m" and rows[1]["data"] == "t.csv" and rows[1]["date"] == "2024-01-01 12:00:00"


# ---------------------------------------------------------------------------------------------
# a checkpoint knows how its files were read


def test_evaluation_reads_the_files_with_the_checkpoints_columns_and_says_so(job):
    assert "data.text_a_col review" in job["out"] and "data.label_col verdict" in job["out"]
    assert job["evaluated"]["acc"] == pytest.approx(job["trained"]["acc"])


def test_a_column_the_user_gives_wins_over_the_checkpoints(job, capsys):
    other = write_csv(job["tmp"] / "other.csv", [{"text": r["review"], "gold": r["verdict"]}
                                                 for r in reviews(sentiment_rows(40, seed=2))])
    argv = without(job["eval_argv"], "data.val_filepath") + [
        "--data.val_filepath", other, "--data.text_a_col", "text", "--data.label_col", "gold"]
    rc, out, err = main(argv, capsys)
    assert rc == 0, err
    assert last_json_line(out)["acc"] == pytest.approx(job["trained"]["acc"])  # the same rows, other names
    assert "data.label_col verdict" not in out


# ---------------------------------------------------------------------------------------------
# TensorBoard


def test_validations_write_pr_curves_the_confusion_matrix_and_the_table(job):
    folder = job["tmp"] / "runs" / os.path.basename(job["trained"]["run_dir"])
    events = EventAccumulator(str(folder), size_guidance={"tensors": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    assert {"val/pr/negative", "val/pr/positive", "val/per_class/text_summary"} <= set(tags["tensors"])
    assert [e.step for e in events.Tensors("val/pr/positive")] == [2, 4, 6]  # every validation
    text = events.Tensors("val/per_class/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "| negative |" in text and "| positive |" in text and "precision" in text
    image = events.Images("val/confusion_matrix")[-1]
    pixels = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)))
    assert pixels.shape[2] == 3 and pixels.shape[1] > 150 and (pixels < 200).any()  # drawn, with its names
    # about 100 points a run by default, here one every 2nd of its 6 steps
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6]


def test_an_evaluation_writes_events_at_the_checkpoints_step(job):
    folder = job["tmp"] / "runs" / os.path.basename(job["evaluated"]["run_dir"])
    events = EventAccumulator(str(folder))
    events.Reload()
    step = json.loads(((job["tmp"] / "ckpt" / "best").resolve() / "checkpoint.json").read_text())["step"]
    assert [e.step for e in events.Scalars("eval/acc")] == [step]
    assert events.Scalars("eval/acc")[0].value == pytest.approx(job["evaluated"]["acc"])
    assert "eval/pr/negative" in events.Tags()["tensors"] and "eval/confusion_matrix" in events.Tags()["images"]


def test_multi_label_curves_carry_thresholds_and_regression_a_scatter(tmp_path):
    from torch.utils.tensorboard import SummaryWriter
    log = runlog.RunLog(str(tmp_path), SummaryWriter(str(tmp_path)))
    names = ["sport", "tech"]
    metrics = {"per_label": {n: {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2, "threshold": t}
                             for n, t in zip(names, [0.3, 0.65])}}
    labels = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    probabilities = np.array([[0.9, 0.2], [0.1, 0.8], [0.7, 0.6], [0.2, 0.1]])
    log.write_figures(3, metrics, {"task": "multi_label", "names": names, "labels": labels,
                                   "probabilities": probabilities, "uncalibrated": probabilities,
                                   "confidences": np.array([0.8, 0.8, 0.6, 0.8]), "correct": np.array([1, 1, 0, 1]),
                                   "abstain_below": None})
    rng = np.random.default_rng(0)
    truth = rng.normal(size=200)
    log.write_figures(4, {}, {"task": "regression", "labels": truth, "predictions": truth + 0.1})
    log.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert {"val/pr/sport", "val/pr/tech", "val/per_class/text_summary"} <= set(events.Tags()["tensors"])
    assert events.Scalars("val/threshold/tech")[0].value == pytest.approx(0.65)
    assert "| tech | 0.5000 | 0.5000 | 0.5000 | 2 | 0.65 |" in \
        events.Tensors("val/per_class/text_summary")[0].tensor_proto.string_val[0].decode()
    scatter = events.Images("val/predictions_vs_labels")[0]
    assert scatter.step == 4 and (scatter.width, scatter.height) == (160, 160)


def test_the_scatter_puts_good_predictions_on_the_diagonal():
    truth = np.linspace(-1, 1, 1000)
    image = runlog.scatter_image(truth, truth)
    dark = image[:, :, 1] < 128  # examples are dark; the red of the diagonal keeps its green low too
    rows, columns = np.nonzero(dark)
    assert np.all(np.abs((159 - rows) - columns) <= 1)  # on the diagonal, high predictions at the top
    assert (image[:, :, 0] > 200).sum() > 0


def test_auto_logging_gives_about_a_hundred_points_and_never_logs_every_step():
    assert runlog.log_interval("auto", 125) == 2  # the default job: 62 points
    assert runlog.log_interval("auto", 10_000) == 100
    assert runlog.log_interval("auto", 3) == 2
    assert runlog.log_interval(7, 125) == 7


# ---------------------------------------------------------------------------------------------
# output that tells the truth


def scripted_validations(monkeypatch, script):
    """Validation metric acc of step s is script[s]."""
    real = trainer.split_metrics

    def scripted(logits, split, cfg, where):
        metrics = real(logits, split, cfg, where)
        if where.startswith("at step "):
            metrics["acc"] = script[int(where.split()[-1])]
        return metrics
    monkeypatch.setattr(trainer, "split_metrics", scripted)


def test_the_per_class_table_is_printed_at_a_new_best_and_at_the_end(job, monkeypatch, capsys):
    # validations at steps 2, 4, 6 (the end): a new best, a worse one, the end
    scripted_validations(monkeypatch, {2: 0.8, 4: 0.6, 6: 0.7})
    rc, out, err = main(base_args(job["tmp"] / "table", job["model"], job["train"], job["val"], **{
        "trainer.epochs": 1, "trainer.eval_steps": 2, "data.text_a_col": "review", "data.label_col": "verdict"}),
        capsys)
    assert rc == 0, err
    tables = [line for line in out.splitlines() if line.startswith("class ") and "precision" in line]
    assert len(tables) == 2
    assert "validation at step 4 (epoch 1): acc 0.6000" in out and "(best 0.8000, at step 2)" in out


def test_a_resume_does_not_announce_a_new_head_and_a_complete_run_trains_nothing(job, capsys):
    tmp = job["tmp"] / "resume"
    argv = base_args(tmp, job["model"], job["train"], job["val"], **{
        "trainer.epochs": 1, "data.text_a_col": "review", "data.label_col": "verdict", "ckpt.resume": "auto"})
    rc, out, err = main(argv, capsys)  # auto with no checkpoint yet: a fresh run, from a pretrained encoder
    assert rc == 0, err
    assert "note: a new classification head" in out
    checkpoints = sorted(p.name for p in (tmp / "ckpt").iterdir())
    rc, out, err = main(argv, capsys)
    assert rc == 0, err
    assert "new classification head" not in out
    assert "the resumed run is already complete (step 6, epoch 1 of 1): nothing to train" in out
    result = last_json_line(out)
    assert result["already_complete"] is True and result["best_step"] == 6 and "training:" not in out
    assert sorted(p.name for p in (tmp / "ckpt").iterdir()) == checkpoints
    rc, out, err = main(argv + ["--trainer.epochs", "2"], capsys)  # extended: it trains, and says no head either
    assert rc == 0, err
    assert "resumed from" in out and "training:" in out and "new classification head" not in out


def test_a_stopped_run_prints_the_full_command_that_resumes_it(job, monkeypatch, capsys):
    real_step = trainer.Trainer.train_step

    def stop_at_step_2(self, *args):  # as a SIGTERM during step 2 does
        real_step(self, *args)
        if self.step == 1:
            self.stop_signal = "SIGTERM"
    monkeypatch.setattr(trainer.Trainer, "train_step", stop_at_step_2)
    argv = base_args(job["tmp"] / "stopped", job["model"], job["train"], job["val"], **{
        "trainer.epochs": 1, "data.text_a_col": "review", "data.label_col": "verdict",
        "data.labels_list": "[negative, positive]", "ckpt.resume": "/some where/old"})
    rc, out, _ = main(argv, capsys)
    assert rc == 2  # that checkpoint does not exist; now without it
    rc, out, _ = main(argv[:-2], capsys)
    assert rc == 1
    assert "stopped by SIGTERM at step 2" in out
    command = [line for line in out.splitlines() if line.startswith("resume with: ")]
    assert len(command) == 1
    assert shlex.split(command[0].removeprefix("resume with: ")) == ["python", "trainer.py", *argv[:-2],
                                                                     "--ckpt.resume", "auto"]


def test_the_resume_command_drops_an_earlier_resume_and_quotes_what_needs_it():
    proc = processes.single_process()
    command = runlog.resume_command(["--data.labels_list", "[a, b]", "--ckpt.resume=ckpt/x", "--ckpt.resume",
                                     "ckpt/y", "--trainer.epochs", "2"], "trainer.py", proc)
    assert command == "python trainer.py --data.labels_list '[a, b]' --trainer.epochs 2 --ckpt.resume auto"
    ddp = processes.Process(0, 0, 4, torch.device("cpu"), True, True)
    assert runlog.resume_command([], "distill.py", ddp).startswith("torchrun --nproc_per_node=")


def test_distill_help_examples_agree_with_the_readme():
    assert "--model.model_path checkpoints/teacher/best --distill.student_layers [0,2,5]" in distill.__doc__
    assert "ckpt/teacher" not in distill.__doc__
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    if "--distill.student_layers" in readme:  # README is the guide: the same command there
        assert "--model.model_path checkpoints/teacher/best --distill.student_layers [0,2,5]" in readme


# ---------------------------------------------------------------------------------------------
# disk: a distilled student's weights once


@pytest.fixture(scope="module")
def teacher(job):
    return str((job["tmp"] / "ckpt" / "best").resolve())


def distill_argv(job, teacher, name, **more):
    """A student of another width (16, the teacher's 32), so the module holds a projection too."""
    return base_args(job["tmp"] / name, job["model"], job["train"], job["val"], **{
        "model.model_path": teacher, "distill.student_pretrained": "false",
        "distill.student_config": "{num_hidden_layers: 1, hidden_size: 16, intermediate_size: 32}",
        "distill.loss_types": "[logits, hidden_states]", "distill.loss_weights": "[1.0, 1.0]",
        "trainer.epochs": 2, "ckpt.period": 1, "ckpt.keep_last": "null",
        "data.text_a_col": "review", "data.label_col": "verdict", **more})


@pytest.mark.slow  # trains more than one epoch
def test_a_students_checkpoint_stores_its_weights_once_and_resumes(job, teacher, capsys):
    capsys.readouterr()
    reference = distill_argv(job, teacher, "distil")
    assert distill.main(reference) == 0
    whole = last_json_line(capsys.readouterr().out)
    assert os.path.basename(whole["run_dir"]).endswith("-distil")
    ckpt = job["tmp"] / "distil" / "ckpt"
    final = load_file(ckpt / "checkpoint-epoch2-step12" / "model.safetensors")
    first = ckpt / "checkpoint-epoch1-step6"
    state = torch.load(first / "training_state.pt", weights_only=True)
    assert "module" not in state and sorted(state["module_rest"]) == ["projection.bias", "projection.weight"]
    # resumed from epoch 1, it ends bitwise where the uninterrupted run ended
    assert distill.main(reference + ["--ckpt.resume", str(first), "--ckpt.overwrite", "true"]) == 0
    assert last_json_line(capsys.readouterr().out)["acc"] == whole["acc"]
    again = load_file(ckpt / "checkpoint-epoch2-step12" / "model.safetensors")
    assert all(torch.equal(final[k], again[k]) for k in final)


def test_an_old_students_checkpoint_with_the_whole_module_still_resumes(job, teacher, capsys, monkeypatch):
    capsys.readouterr()
    reference = distill_argv(job, teacher, "distil-old", **{"trainer.epochs": 1})
    assert distill.main(reference) == 0
    path = job["tmp"] / "distil-old" / "ckpt" / "last"
    # as checkpoints were written before: the whole module, the student's weights a second time
    file = path / "training_state.pt"
    state = torch.load(file, weights_only=True)
    projection = state.pop("module_rest")
    student = load_file(path / "model.safetensors")
    state["module"] = {**{f"student.{k}": v + 1 for k, v in student.items()}, **projection}  # + 1: it must be read
    torch.save(state, file)
    manifest = json.loads((path / "checkpoint.json").read_text())
    manifest["files"]["training_state.pt"] = file.stat().st_size
    (path / "checkpoint.json").write_text(json.dumps(manifest))
    seen, real = {}, trainer.Trainer.resume_from

    def resume_from(self, resume_path):
        real(self, resume_path)
        seen.update({k: v.clone() for k, v in self.model.state_dict().items()})
    monkeypatch.setattr(trainer.Trainer, "resume_from", resume_from)
    assert distill.main(distill_argv(job, teacher, "distil-old", **{"trainer.epochs": 2, "ckpt.resume": "auto"})) == 0
    assert seen and all(torch.equal(seen[f"student.{k}"], v + 1) for k, v in student.items())
    assert all(torch.equal(seen[k], v) for k, v in projection.items())


# ---------------------------------------------------------------------------------------------
# torchrun: ours once, torch's deprecation not at all


@pytest.mark.slow
def test_under_torchrun_a_warning_is_printed_once_and_ddps_deprecation_not_at_all(tmp_path):
    """A pretrained classifier with a 3-label head trained on 2 labels: the warning that its head is
    replaced is met by both ranks and printed by one."""
    model_dir = save_tiny_encoder(tmp_path / "bert")
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig.from_pretrained(model_dir, num_labels=3)).save_pretrained(model_dir)
    train = write_csv(tmp_path / "train.csv", sentiment_rows(64, seed=1))
    val = write_csv(tmp_path / "val.csv", sentiment_rows(16, seed=2))
    args = base_args(tmp_path, model_dir, train, val, **{"trainer.epochs": 1})
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "trainer.py"), *args], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert out.returncode == 0, stderr_tail(out.stderr)
    assert "broadcast_buffers" not in out.stderr
    replaced = [line for line in out.stderr.splitlines() if "classification head; it is replaced" in line]
    assert len(replaced) == 1, stderr_tail(out.stderr)


def test_runs_csv_writes_a_formula_like_cell_as_text(tmp_path):
    from runlog import write_runs_csv
    row = {"run": "=cmd()", "kind": "train", "date": "2026-12-07 10:00:00", "model": "@evil", "data": "+data.csv",
           "metric": "acc", "value": -0.5, "best_step": 3, "wall_s": 1.5, "state": "done"}
    with open(write_runs_csv([row], tmp_path), newline="", encoding="utf-8") as f:
        (written,) = list(csv.DictReader(f))
    assert written["run"] == "'=cmd()" and written["model"] == "'@evil" and written["data"] == "'+data.csv"
    assert written["value"] == "-0.5" and written["best_step"] == "3" and written["kind"] == "train"
