"""Trust off the happy path: a checkpoint never runs code, nothing we did not write is deleted or
replaced, a resume checks what changed and keeps its books, and what a crash leaves is repaired.

Runs are in-process (trainer.main) on a tiny model: 2 epochs x 13 steps of 16 examples.
"""
import functools
import json
import os
import pickle
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import files
import processes
import trainer
from config import ConfigError, load_config
from conftest import ROOT, base_args, last_json_line, save_tiny_encoder, sentiment_rows, write_csv


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trust")
    model = save_tiny_encoder(tmp / "bert")
    train = write_csv(tmp / "train.csv", sentiment_rows(200, seed=3))
    val = write_csv(tmp / "val.csv", sentiment_rows(40, seed=4))

    def args(name, **more):
        return base_args(tmp / name, model, train, val,
                         **{"trainer.epochs": 2, "ckpt.save_steps": 3, "ckpt.keep_last": "null", **more})
    return {"tmp": tmp, "args": args, "train": train, "val": val, "model": model}


@pytest.fixture(scope="module")
def reference(job):
    """The job's uninterrupted run, in job's folder "reference": what resumed runs must end as."""
    assert trainer.main(job["args"]("reference")) == 0
    return ckpt_dir(job, "reference")


def ckpt_dir(job, name):
    return job["tmp"] / name / "ckpt"


def steps(folder):
    return sorted(int(p.name.rsplit("step", 1)[1]) for p in folder.glob("checkpoint-epoch*-step*"))


def weights(folder):
    return load_file(folder / "model.safetensors")


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


def run_copy(job, name):
    """A finished run of the reference job in its own folder (checkpoints every 3 steps)."""
    assert trainer.main(job["args"](name)) == 0
    return ckpt_dir(job, name)


class Evil:
    """A pickle that runs a shell command when it is loaded."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# -- security ----------------------------------------------------------------------------------


def plant(folder, marker):
    with open(folder / "training_state.pt", "wb") as f:
        pickle.dump({"optimizer": Evil(marker)}, f)
    manifest = json.loads((folder / checkpoint.MANIFEST).read_text())
    manifest["files"]["training_state.pt"] = (folder / "training_state.pt").stat().st_size
    (folder / checkpoint.MANIFEST).write_text(json.dumps(manifest))  # a forger can write this too


@pytest.mark.slow  # trains more than one epoch
def test_a_planted_pickle_in_a_checkpoint_is_refused_and_never_runs(job, capsys):
    ckpt = run_copy(job, "evil")
    marker = job["tmp"] / "pwned"
    target = ckpt / "checkpoint-epoch1-step3"
    plant(target, marker)
    capsys.readouterr()
    assert trainer.main(job["args"]("evil", **{"ckpt.resume": str(target)})) == 2
    line = error_line(capsys)
    assert line.startswith(f"error: {target}: training_state.pt does not load as data")
    assert "could run code" in line and "weights_only" not in line  # torch's advice to load it unsafely
    assert not marker.exists()
    # resume auto, planted in the newest: skipped with that reason, the one before is resumed
    plant(ckpt / "checkpoint-epoch2-step26", marker)
    assert trainer.main(job["args"]("evil", **{"ckpt.resume": "auto"})) == 0
    out = capsys.readouterr().out
    assert "skipping checkpoint-epoch2-step26" in out and "could run code" in out
    assert "resumed from" in out and "checkpoint-epoch2-step24" in out
    assert not marker.exists()


@pytest.mark.slow  # trains more than one epoch
def test_resume_auto_skips_a_checkpoint_that_does_not_load_and_takes_the_next(job, reference, capsys):
    ckpt = run_copy(job, "truncated")
    newest = ckpt / "checkpoint-epoch2-step26"
    with open(newest / "model.safetensors", "r+b") as f:
        f.truncate(100)  # a power loss after the rename, say
    capsys.readouterr()
    assert trainer.main(job["args"]("truncated", **{"ckpt.resume": "auto"})) == 0
    out = capsys.readouterr().out
    assert "skipping checkpoint-epoch2-step26" in out and "model.safetensors is 100 bytes" in out
    assert "resumed from" in out and "checkpoint-epoch2-step24" in out
    # the resumed run rewrote step 26 itself, and it equals the uninterrupted run's
    assert same_weights(weights(newest), weights(ckpt_dir(job, "reference") / "last"))
    # an explicit resume of a truncated checkpoint is one line
    with open(newest / "training_state.pt", "r+b") as f:
        f.truncate(10)
    assert trainer.main(job["args"]("truncated", **{"ckpt.resume": str(newest)})) == 2
    assert "incomplete checkpoint: training_state.pt is 10 bytes" in error_line(capsys)


def test_resume_auto_where_no_checkpoint_loads_stops_naming_them_and_keeps_them(job, capsys):
    args = functools.partial(job["args"], "wrong-ext", **{"trainer.epochs": 1})
    assert trainer.main(args()) == 0
    ckpt = ckpt_dir(job, "wrong-ext")
    before = sorted(p.name for p in ckpt.iterdir())
    capsys.readouterr()
    # a careless extension: once a fresh run from step 0 that deleted them all at its first save
    assert trainer.main(args(**{"ckpt.resume": "auto", "ckpt.file_ext": ".bin"})) == 2
    out, err = capsys.readouterr()
    [line] = err.splitlines()
    assert line.startswith(f"error: --ckpt.resume auto: none of the 5 checkpoints in {ckpt} loads "
                           f"(checkpoint-epoch1-step13: holds training_state.pt, not training_state.bin; pass "
                           f"--ckpt.file_ext .pt as the run that wrote it did; checkpoint-epoch1-step12: ")
    assert line.endswith("; ...); fix what stops them, or pass --ckpt.overwrite true to start a new run that replaces them")
    assert "note: skipping" not in out and sorted(p.name for p in ckpt.iterdir()) == before  # nothing moved
    # told to, a new run replaces them
    assert trainer.main(args(**{"ckpt.resume": "auto", "ckpt.file_ext": ".bin", "ckpt.overwrite": "true"})) == 0
    assert "moved 5 checkpoints that do not load" in capsys.readouterr().out
    assert [p.name for p in (ckpt / "last").iterdir() if p.name.startswith("training_state")] == ["training_state.bin"]


@pytest.mark.slow  # trains more than one epoch
def test_resume_auto_ignores_a_foreign_folder_named_like_a_newer_checkpoint(job, capsys):
    ckpt = run_copy(job, "foreign-resume")
    (ckpt / "checkpoint-epoch9-step999").mkdir()  # someone else's, with no manifest
    (ckpt / "checkpoint-epoch9-step999" / "training_state.pt").write_bytes(b"not ours")
    capsys.readouterr()
    assert trainer.main(job["args"]("foreign-resume", **{"ckpt.resume": "auto"})) == 0
    out = capsys.readouterr().out
    assert "ignoring checkpoint-epoch9-step999" in out and "resumed from" in out and "step26" in out
    assert (ckpt / "checkpoint-epoch9-step999" / "training_state.pt").read_bytes() == b"not ours"


# -- never delete or replace what we did not write -----------------------------------------------


@pytest.mark.slow  # trains more than one epoch
def test_overwrite_keeps_folders_and_links_we_did_not_write(job, capsys):
    ckpt = run_copy(job, "foreign")
    users = ckpt / "checkpoint-epoch3-step300"  # named like ours, with a state file of another tool
    users.mkdir()
    (users / "weights.bin").write_bytes(b"user data")
    (users / "training_state.json").write_text("{}")
    elsewhere = job["tmp"] / "my-model"
    elsewhere.mkdir()
    (ckpt / "best").unlink()
    (ckpt / "best").symlink_to(elsewhere)  # the user's own link
    capsys.readouterr()
    assert trainer.main(job["args"]("foreign", **{"ckpt.overwrite": "true"})) == 2
    line = error_line(capsys)
    assert f"{ckpt / 'best'} was not made by this trainer" in line
    assert os.readlink(ckpt / "best") == str(elsewhere) and steps(ckpt)[-2] == 26  # nothing moved

    (ckpt / "best").unlink()
    assert trainer.main(job["args"]("foreign", **{"ckpt.overwrite": "true", "trainer.epochs": 1})) == 0
    out = capsys.readouterr().out
    assert "ignoring checkpoint-epoch3-step300" in out
    assert (users / "weights.bin").read_bytes() == b"user data"
    assert steps(ckpt) == [3, 6, 9, 12, 13, 300]  # the old 2-epoch checkpoints are gone, the user's kept
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".replaced-")]


@pytest.mark.slow  # trains more than one epoch
def test_overwrite_then_a_failure_before_the_first_checkpoint_puts_the_old_ones_back(job, monkeypatch, capsys):
    ckpt = run_copy(job, "failing")
    before = {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir() if p.name != ".lock"}
    links = {name: os.readlink(ckpt / name) for name in checkpoint.LINKS}
    real_step, calls = trainer.Trainer.train_step, []

    def failing_step(self, *a):
        calls.append(1)
        if len(calls) == 2:
            raise processes.TrainingError("step 2 failed")
        return real_step(self, *a)
    monkeypatch.setattr(trainer.Trainer, "train_step", failing_step)
    assert trainer.main(job["args"]("failing", **{"ckpt.overwrite": "true"})) == 2
    assert error_line(capsys) == "error: step 2 failed"
    assert {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir() if p.name != ".lock"} == before
    assert {name: os.readlink(ckpt / name) for name in checkpoint.LINKS} == links


@pytest.mark.slow  # trains more than one epoch
def test_a_kill_after_moving_old_checkpoints_aside_is_repaired_by_the_next_run(job, reference, tmp_path):
    ckpt = run_copy(job, "killed-aside")
    ours = [path for _, path, _ in checkpoint.our_checkpoints(ckpt, "checkpoint")]
    aside = checkpoint.move_aside(ckpt, ours, "dead-session")  # then SIGKILL: no checkpoint written
    (ckpt / ".tmp-checkpoint-epoch1-step3-dead-session").mkdir()  # and a torn write
    assert steps(ckpt) == []
    messages = checkpoint.recover(ckpt, "checkpoint")
    assert len(messages) == 2 and not aside.exists()
    assert steps(ckpt) == steps(ckpt_dir(job, "reference"))
    assert os.readlink(ckpt / "last") == "checkpoint-epoch2-step26"
    assert not [p for p in ckpt.iterdir() if p.name.startswith((".tmp-", ".replaced-"))]


def test_a_second_run_in_the_same_folder_is_refused_while_the_first_holds_it(job, capsys):
    ckpt = ckpt_dir(job, "locked")
    ckpt.mkdir(parents=True)
    holder = files.FolderLock(ckpt)
    try:
        assert trainer.main(job["args"]("locked")) == 2
        line = error_line(capsys)
        assert f"{ckpt} is in use by another run (pid {os.getpid()} on " in line
        assert steps(ckpt) == [] and not (job["tmp"] / "locked" / "runs").exists() or \
            not list((job["tmp"] / "locked" / "runs").iterdir())
    finally:
        holder.release()
    assert trainer.main(job["args"]("locked", **{"trainer.epochs": 1})) == 0  # free again


@pytest.mark.slow  # trains more than one epoch
def test_resuming_an_older_checkpoint_needs_overwrite_and_then_saves_its_own(job, reference, capsys):
    ckpt = run_copy(job, "older")
    older = ckpt / "checkpoint-epoch1-step12"
    capsys.readouterr()
    assert trainer.main(job["args"]("older", **{"ckpt.resume": str(older)})) == 2
    line = error_line(capsys)
    assert "holds checkpoints newer than checkpoint-epoch1-step12" in line and "--ckpt.overwrite true" in line
    assert trainer.main(job["args"]("older", **{"ckpt.resume": str(older), "ckpt.overwrite": "true"})) == 0
    manifests = {step: manifest for step, _, manifest in checkpoint.our_checkpoints(ckpt, "checkpoint")}
    assert sorted(manifests) == steps(ckpt_dir(job, "reference"))
    # every checkpoint past 12 was written by the resumed launch, and the weights are the same
    assert len({manifests[s]["session"] for s in manifests if s > 12}) == 1
    assert manifests[13]["session"] != manifests[12]["session"]
    assert same_weights(weights(ckpt / "last"), weights(ckpt_dir(job, "reference") / "last"))


# -- resume checks what changed -----------------------------------------------------------------


@pytest.mark.parametrize("change, expected", [
    ({"module.max_lr": "1e-3"}, "module.max_lr 0.003 -> 0.001"),
    ({"data.labels_list": "[positive, negative]"},
     "data.labels_list ['negative', 'positive'] -> ['positive', 'negative']"),
    ({"trainer.train_batch_size": 8, "trainer.gpu_batch_size_limit": 8}, "trainer.train_batch_size 16 -> 8"),
    ({"trainer.epochs": 1}, "trainer.epochs 2 -> 1 (may only grow)"),
    ({"data.train_filepath": "EDITED"}, "data.train_filepath: the file's content differs"),
    ({"module.weight_decay": 0.1}, "module.weight_decay 0.01 -> 0.1"),
    ({"data.labels_list": "[negative, neutral, positive]"},
     "data.labels_list ['negative', 'positive'] -> ['negative', 'neutral', 'positive']"),
    ({"model.hf_model": "WIDER"}, "model.hf_model '{tmp}/bert' -> '{tmp}/wider-bert'"),
])
@pytest.mark.slow  # trains more than one epoch
def test_resume_with_a_changed_config_or_data_stops_before_step_one(job, capsys, change, expected):
    name = "changed"
    if not (ckpt_dir(job, name) / "last").exists():
        run_copy(job, name)
    if change.get("data.train_filepath") == "EDITED":
        rows = sentiment_rows(200, seed=3)
        rows[0]["text"] = "edited " + rows[0]["text"]
        change = {"data.train_filepath": write_csv(job["tmp"] / "edited.csv", rows)}
    if change.get("model.hf_model") == "WIDER":  # another model, whose weights the state would not fit
        change = {"model.hf_model": save_tiny_encoder(job["tmp"] / "wider-bert", hidden=64)}
    before = sorted(p.name for p in ckpt_dir(job, name).iterdir())
    capsys.readouterr()
    assert trainer.main(job["args"](name, **{"ckpt.resume": "auto", **change})) == 2
    line = error_line(capsys)
    assert line.startswith("error: cannot resume") and expected.format(tmp=job["tmp"]) in line
    assert "--model.model_path" in line
    assert sorted(p.name for p in ckpt_dir(job, name).iterdir()) == before


def test_a_refused_resume_names_the_file_trained_on_and_the_command_that_resumes_it(job, capsys):
    args = functools.partial(job["args"], "own-command", **{"trainer.epochs": 1})
    assert trainer.main(args()) == 0
    ckpt = ckpt_dir(job, "own-command")
    other = write_csv(job["tmp"] / "other.csv", sentiment_rows(50, seed=9))
    capsys.readouterr()
    # a resume that forgot the run's flags and points at another training file
    forgetful = ["--data.train_filepath", other, "--data.val_filepath", job["val"], "--data.label_col", "label",
                 "--model.hf_model", job["model"], "--ckpt.model_state_save_dir", str(ckpt), "--ckpt.resume", "auto",
                 "--trainer.device", "cpu", "--trainer.num_threads", "1"]
    assert trainer.main(forgetful) == 2
    line = error_line(capsys)
    assert f"data.train_filepath: the file's content differs from the one the checkpoint trained on ({job['train']})" in line
    assert "module.max_lr 0.003 -> 5e-05" in line
    command = line.split("Resume with the checkpoint's settings: ", 1)[1].split("; or start a new run", 1)[0]
    launcher, script, *own = shlex.split(command)
    assert (launcher, script, own[-2:]) == ("python", "trainer.py", ["--ckpt.resume", "auto"])
    # the command it gives resumes the checkpoint: every setting is the checkpoint's own
    assert trainer.main(own) == 0
    assert "the resumed run is already complete (step 13, epoch 1 of 1)" in capsys.readouterr().out


@pytest.mark.slow  # trains several epochs
def test_resume_may_change_logging_cadence_and_data_location(job, capsys, tmp_path):
    ckpt = run_copy(job, "allowed")
    moved = tmp_path / "moved.csv"
    moved.write_bytes(Path(job["train"]).read_bytes())  # the same data, somewhere else
    args = job["args"]("allowed", **{"ckpt.resume": "auto", "trainer.epochs": 3, "trainer.log_steps": 7,
                                     "ckpt.save_steps": 0, "data.train_filepath": str(moved)})
    assert trainer.main(args) == 0
    assert steps(ckpt)[-1] == 39


# -- resume keeps its books straight --------------------------------------------------------------


@pytest.mark.slow  # trains more than one epoch
def test_a_best_checkpoint_records_itself_as_the_best(job, reference):
    ckpt = ckpt_dir(job, "reference")
    best = json.loads((ckpt / "best" / checkpoint.MANIFEST).read_text())
    assert best["best"]["step"] == best["step"]
    assert best["best"]["path"] == str(ckpt / os.readlink(ckpt / "best"))


@pytest.mark.slow  # trains more than one epoch
def test_resuming_a_finished_run_reports_the_same_best(job, capsys):
    ckpt = run_copy(job, "finished")
    capsys.readouterr()
    assert trainer.main(job["args"]("finished")) == 2  # a plain second run is refused
    capsys.readouterr()
    assert trainer.main(job["args"]("finished", **{"ckpt.resume": "auto"})) == 0
    result = last_json_line(capsys.readouterr().out)
    final = json.loads(next((job["tmp"] / "finished" / "runs").glob("*/final_metrics.json")).read_text())
    assert result["best_step"] == final["best_step"] == json.loads(
        (ckpt / "best" / checkpoint.MANIFEST).read_text())["step"]


def scalars_of(run_root):
    """JSONL rows without timing, and TensorBoard's (tag, step, value) events, of the one run folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    (folder,) = list((run_root / "runs").iterdir())
    rows = [{k: v for k, v in json.loads(line).items() if k != "train/examples_per_s"}
            for line in (folder / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(folder))
    events.Reload()
    tb = sorted((tag, e.step, e.value) for tag in events.Tags()["scalars"] if tag != "train/examples_per_s"
                for e in events.Scalars(tag))
    return rows, tb


@pytest.mark.slow  # trains more than one epoch
@pytest.mark.parametrize("stop_at", [10, 12])  # at a log step (its events are kept), mid-window
def test_a_stopped_and_resumed_run_logs_exactly_what_an_uninterrupted_run_logs(job, monkeypatch, capsys, stop_at):
    args = {"trainer.log_steps": 5, "ckpt.save_steps": 0, "trainer.eval_steps": 4}
    name = f"books-{stop_at}"
    if not (job["tmp"] / "books-reference").exists():
        assert trainer.main(job["args"]("books-reference", **args)) == 0
    real_step = trainer.Trainer.train_step

    def stop_after(self, *a):
        real_step(self, *a)
        if self.step + 1 == stop_at:
            self.stop_signal = "SIGTERM"  # as the handler would; agreed at the end of this step
    monkeypatch.setattr(trainer.Trainer, "train_step", stop_after)
    assert trainer.main(job["args"](name, **args)) == 1
    monkeypatch.undo()
    folder = next((job["tmp"] / name / "runs").iterdir())
    with open(folder / "metrics.jsonl", "a") as f:
        f.write('{"step": 99, "train/lo')  # a kill in the middle of a log write
    capsys.readouterr()
    assert trainer.main(job["args"](name, **{**args, "ckpt.resume": "auto"})) == 0
    out = capsys.readouterr().out
    assert "dropped a torn log line" in out
    assert f"resumed from {ckpt_dir(job, name) / f'checkpoint-epoch1-step{stop_at}'}" in out
    rows, tb = scalars_of(job["tmp"] / name)
    ref_rows, ref_tb = scalars_of(job["tmp"] / "books-reference")
    assert rows == ref_rows and tb == ref_tb
    # one epoch convention everywhere: step 13 ends epoch 1 in the train and the validation lines
    assert {row["epoch"] for row in rows if row["step"] == 13} == {1}
    assert {row["epoch"] for row in rows if row["step"] in (15, 16)} == {2}


@pytest.mark.slow  # trains more than one epoch
def test_a_run_killed_after_logging_past_its_checkpoint_resumes_to_the_same_logs(job, monkeypatch, capsys):
    """The kill comes after step 17: step 15's train line and TensorBoard event were written after
    the last checkpoint (step 13), so the resume must drop them (purge_step) and log them again."""
    args = {"trainer.log_steps": 5, "ckpt.save_steps": 0}
    assert trainer.main(job["args"]("killed-reference", **args)) == 0
    real_step = trainer.Trainer.train_step

    def killed_at_18(self, *a):
        if self.step == 17:
            raise processes.TrainingError("killed")
        return real_step(self, *a)
    monkeypatch.setattr(trainer.Trainer, "train_step", killed_at_18)
    assert trainer.main(job["args"]("killed", **{**args, "ckpt.save_steps": 6})) == 2
    monkeypatch.undo()
    rows, _ = scalars_of(job["tmp"] / "killed")
    assert max(row["step"] for row in rows) == 15 and steps(ckpt_dir(job, "killed"))[-1] == 13
    capsys.readouterr()
    assert trainer.main(job["args"]("killed", **{**args, "ckpt.save_steps": 6, "ckpt.resume": "auto"})) == 0
    assert "at step 13 (epoch 1, batch 13 of 13)" in capsys.readouterr().out
    assert scalars_of(job["tmp"] / "killed") == scalars_of(job["tmp"] / "killed-reference")


@pytest.mark.slow  # trains several epochs
def test_a_run_paused_after_each_epoch_and_resumed_is_the_uninterrupted_run(job, reference, capsys):
    """trainer.stop_after_epochs ends a launch after that epoch with a checkpoint; the schedule
    spans trainer.epochs all along, so resuming gives bitwise the run never paused (a sweep's rungs)."""
    capsys.readouterr()
    assert trainer.main(job["args"]("paused", **{"trainer.stop_after_epochs": 1})) == 0
    result = last_json_line(capsys.readouterr().out)
    assert result["paused_after_epoch"] == 1 and result["best_step"] == 13
    assert steps(ckpt_dir(job, "paused"))[-1] == 13
    assert trainer.main(job["args"]("paused", **{"trainer.stop_after_epochs": 1, "ckpt.resume": "auto"})) == 0
    assert "paused_after_epoch" in last_json_line(capsys.readouterr().out)  # nothing left for this launch
    assert steps(ckpt_dir(job, "paused"))[-1] == 13
    assert trainer.main(job["args"]("paused", **{"ckpt.resume": "auto"})) == 0
    assert "paused_after_epoch" not in last_json_line(capsys.readouterr().out)
    assert same_weights(weights(ckpt_dir(job, "paused") / "last"), weights(ckpt_dir(job, "reference") / "last"))


def test_an_old_seed_backend_resumes_under_auto_and_precision_must_match():
    """A checkpoint saved with the seed's backend sp resumes under auto (the world size is checked
    on its own); switching mixed precision on or off is a conflict, however it is said."""
    digests = {key: [None] for key in checkpoint.DATA_FILE_KEYS}
    def conflicts(old, new):
        return checkpoint.resume_conflicts({"trainer": old}, digests, {"trainer": new}, digests)
    assert conflicts({"backend": "sp"}, {"backend": "auto", "amp": False}) == []
    assert conflicts({"backend": "sp-amp"}, {"backend": "auto", "amp": True}) == []
    assert conflicts({"backend": "sp"}, {"backend": "auto", "amp": True}) == [
        "mixed precision off -> on (trainer.amp / trainer.backend)"]
    assert conflicts({"backend": "ddp-amp"}, {"backend": "ddp", "amp": False}) == [
        "mixed precision on -> off (trainer.amp / trainer.backend)"]


@pytest.mark.slow  # trains more than one epoch
def test_resume_message_names_the_epoch_of_the_checkpoint(job, capsys):
    ckpt = run_copy(job, "epochs")
    capsys.readouterr()
    assert trainer.main(job["args"]("epochs", **{"ckpt.resume": str(ckpt / "checkpoint-epoch2-step21"),
                                                  "ckpt.overwrite": "true"})) == 0
    assert "at step 21 (epoch 2, batch 8 of 13)" in capsys.readouterr().out


@pytest.mark.slow  # trains more than one epoch
def test_a_step_checkpoint_on_the_last_step_of_an_epoch_holds_that_epochs_validation(job, capsys):
    """ckpt.save_steps 13 saves each epoch's last step before the epoch's validation: the folder is
    written again after it, so it records its own best, and a resume has nothing left to redo."""
    ckpt, args = ckpt_dir(job, "epoch-end"), {"ckpt.save_steps": 13}
    assert trainer.main(job["args"]("epoch-end", **args)) == 0
    best = json.loads((ckpt / "best" / checkpoint.MANIFEST).read_text())
    last = json.loads((ckpt / "last" / checkpoint.MANIFEST).read_text())
    assert best["best"]["step"] == best["step"] and last["best"]["step"] == best["step"]
    assert (last["step"], last["epoch"], last["batch_in_epoch"]) == (26, 2, 0)  # after epoch 2's validation
    log = next((job["tmp"] / "epoch-end" / "runs").glob("*/metrics.jsonl"))
    logged = log.read_text()
    capsys.readouterr()
    assert trainer.main(job["args"]("epoch-end", **{**args, "ckpt.resume": "auto"})) == 0
    assert "validation at step" not in capsys.readouterr().out
    assert log.read_text() == logged  # no second validation line at step 26


# -- what a crash leaves, and every output location before step 1 -----------------------------------


def test_checkpoint_files_and_folders_are_fsynced(tmp_path, monkeypatch):
    synced, real_fsync = [], os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", recording_fsync)

    def write_files(folder):
        (folder / "a.bin").write_bytes(b"x" * 10)
    path = checkpoint.write_checkpoint(tmp_path, "checkpoint-epoch1-step1", "s1", write_files, {"step": 1})
    tmp = str(tmp_path / ".tmp-checkpoint-epoch1-step1-s1")
    assert synced == [f"{tmp}/a.bin", f"{tmp}/{checkpoint.MANIFEST}", tmp, str(tmp_path)]
    assert checkpoint.incomplete_reason(path, checkpoint.read_manifest(path)) is None


@pytest.mark.parametrize("writer", ["torch.save", "save_pretrained"])
def test_a_full_disk_in_torch_save_or_safetensors_removes_the_partial_checkpoint(job, monkeypatch, capsys, writer):
    """On a full disk torch.save raises RuntimeError and safetensors SafetensorError, not OSError."""
    from safetensors import SafetensorError
    name, calls = f"full-{writer}", []
    real = {"torch.save": torch.save, "save_pretrained": trainer.save_pretrained}[writer]

    def fails_third(*a, **k):  # torch.save(state, path) or save_pretrained(model, tokenizer, folder)
        calls.append(1)
        if len(calls) < 3:
            return real(*a, **k)
        if writer == "torch.save":  # what torch says when the disk fills under it
            Path(a[1]).write_bytes(b"PK half a zip")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        (Path(a[2]) / "model.safetensors").write_bytes(b"half")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(*((trainer.torch, "save") if writer == "torch.save" else (trainer, "save_pretrained")),
                        fails_third)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=2**30, used=2**30, free=0))
    assert trainer.main(job["args"](name)) == 2
    line = error_line(capsys)
    assert line.startswith(f"error: cannot write checkpoint {ckpt_dir(job, name) / 'checkpoint-epoch1-step9'}: ")
    assert "(the disk is full)" in line
    assert steps(ckpt_dir(job, name)) == [3, 6]
    assert not [p for p in ckpt_dir(job, name).iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("setup, key, expected", [
    (lambda t: (t / "ckpt").write_text("a file"), None, "ckpt.model_state_save_dir: {t}/ckpt is a file"),
    (lambda t: (t / "runs").write_text("a file"), None, "trainer.log_dir: {t}/runs is a file"),
    (lambda t: (t / "ckpt" / "best").mkdir(parents=True), None, "{t}/ckpt/best was not made by this trainer"),
    (lambda t: None, {"data.predict_filepath": "VAL", "data.predict_output": "{t}"}, "data.predict_output: {t} is a folder"),
])
def test_bad_output_locations_stop_the_run_before_step_one(job, tmp_path, capsys, setup, key, expected):
    setup(tmp_path)
    overrides = {k: v.replace("VAL", job["val"]).replace("{t}", str(tmp_path)) for k, v in (key or {}).items()}
    args = base_args(tmp_path, job["model"], job["train"], job["val"], **overrides)
    assert trainer.main(args) == 2
    assert expected.format(t=tmp_path) in error_line(capsys)
    assert not (tmp_path / "runs").is_dir() or not list((tmp_path / "runs").iterdir())
    if "best" not in expected:  # a folder that cannot be written stops the run before tokenization too
        assert not [p for p in tmp_path.glob(".token_cache/**/*") if p.is_file()]
    assert not (tmp_path / "ckpt").is_dir() or steps(tmp_path / "ckpt") == []


@pytest.mark.slow  # trains several epochs
def test_predictions_go_to_a_missing_folder_which_is_created(job, reference, tmp_path):
    out = tmp_path / "new" / "folder" / "preds.csv"
    args = base_args(tmp_path, job["model"], "null", "null", **{
        "model.model_path": str(ckpt_dir(job, "reference") / "best"), "data.predict_filepath": job["val"],
        "data.predict_output": str(out)})
    assert trainer.main(args) == 0
    assert len(out.read_text().splitlines()) == 41
    assert [p.name for p in out.parent.iterdir()] == ["preds.csv"]  # no temporary file left


def test_a_second_ctrl_c_stops_at_once(job, monkeypatch, capsys):
    real_step = trainer.Trainer.train_step

    def impatient(self, *a):
        real_step(self, *a)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(trainer.Trainer, "train_step", impatient)
    assert trainer.main(job["args"]("impatient")) == 130
    assert "stopped at once by a second signal" in error_line(capsys)
    assert steps(ckpt_dir(job, "impatient")) == []  # no checkpoint was waited for


@pytest.mark.slow
def test_a_failure_on_rank_zero_alone_ends_every_rank_promptly(job):
    """Rank 0 cannot replace the `last` link (it became a folder): rank 1 must not wait for it."""
    tmp, name = job["tmp"], "rank0-fails"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "trainer.py"), *job["args"](name, **{"trainer.backend": "ddp", "ckpt.save_steps": 1,
                                                        "trainer.epochs": 4})],
        cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    last = ckpt_dir(job, name) / "last"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if last.is_symlink():
            try:
                last.unlink()
                last.mkdir()
                (last / "blocker").write_text("")
                break
            except OSError:
                continue
        time.sleep(0.01)
    started = time.time()
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    assert time.time() - started < 60
    # rank 0 says why, once (rank 1 hears it through on_main and says nothing more; whether it exits
    # before torchrun stops it, once rank 0 is gone, is a race not worth asserting)
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot point {last} at checkpoint-")
    assert f'File "{ROOT / "trainer.py"}"' not in stderr  # torchrun's own traceback only


@pytest.mark.slow
def test_a_save_folder_that_cannot_be_written_under_torchrun_is_one_line(job, tmp_path):
    """Rank 0 finds the folder unusable (a file here; a read-only one takes the same path, and
    root may write anywhere): every rank ends with exit 2, rank 0 says why in one line, rank 1
    (which only hears that rank 0 failed) says nothing more, and no rank prints a traceback."""
    (tmp_path / "ckpt").write_text("a file")
    args = base_args(tmp_path, job["model"], job["train"], job["val"])
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "trainer.py"), *args], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    reason = f"ckpt.model_state_save_dir: {tmp_path / 'ckpt'} is a file, not a folder"
    assert lines == [f"error: {reason}; choose a folder"]
    assert "exitcode: 2" in out.stderr and f'File "{ROOT / "trainer.py"}"' not in out.stderr  # torchrun's own only
    assert not (tmp_path / "runs").exists()


def test_a_rank_sees_the_save_folder_only_if_it_holds_the_main_process_lock(tmp_path):
    lock = files.FolderLock(tmp_path, "s-main")
    try:
        assert checkpoint.sees_lock_of(tmp_path, "s-main")
        assert not checkpoint.sees_lock_of(tmp_path, "s-other")  # another machine's folder of that name
        assert not checkpoint.sees_lock_of(tmp_path / "missing", "s-main")
    finally:
        lock.release()


@pytest.mark.parametrize("this_rank_sees, other_rank_sees", [(True, True), (True, False), (False, True)])
def test_a_save_folder_not_shared_by_every_machine_is_refused_before_step_1(tmp_path, monkeypatch,
                                                                            this_rank_sees, other_rank_sees):
    """Every rank reads rank 0's checkpoints (to resume, the best at the end): each checks that it
    sees rank 0's lock, and all agree (MIN over the ranks) before step 1, with one line if not."""
    main_dir, own_dir = tmp_path / "main", tmp_path / "machine-2"
    main_dir.mkdir(), own_dir.mkdir()
    lock = files.FolderLock(main_dir, "s-main")

    def all_reduce(tensor, op, group):  # the other rank's answer joins this one's
        assert op == torch.distributed.ReduceOp.MIN and group == "gloo group"
        tensor.copy_(torch.minimum(tensor, torch.tensor([float(other_rank_sees)])))
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    cfg = {"ckpt": {"model_state_save_dir": str(main_dir if this_rank_sees else own_dir)}}
    rank = processes.Process(1, 0, 2, torch.device("cpu"), False, True, cpu_group="gloo group")
    try:
        if this_rank_sees and other_rank_sees:
            checkpoint.check_shared_save_dir(cfg, rank, "s-main")
        else:
            with pytest.raises(ConfigError, match="is not shared by every machine of the run"):
                checkpoint.check_shared_save_dir(cfg, rank, "s-main")
    finally:
        lock.release()


def test_rank_zero_releases_the_save_folder_when_another_rank_does_not_see_it(tmp_path, monkeypatch):
    # open_save_dir locks the folder on rank 0, then all ranks check they see it: a refusal there
    # must not leave the lock held (the folder would refuse the next run in this process)
    monkeypatch.setattr(torch.distributed, "broadcast_object_list", lambda shared, src, group: None)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor, op, group: tensor.zero_())  # one rank does not
    monkeypatch.setattr(checkpoint, "data_digests", lambda cfg: {})
    cfg = load_config(["--ckpt.model_state_save_dir", str(tmp_path / "ckpt")])
    main = processes.Process(0, 0, 2, torch.device("cpu"), True, True, cpu_group="gloo group")
    with pytest.raises(ConfigError, match="is not shared by every machine of the run") as refused:
        checkpoint.open_save_dir(checkpoint.SaveDir(cfg, "s-main", print), main)
    # refused holds the traceback, and with it the SaveDir: released all the same, not by the GC
    files.FolderLock(tmp_path / "ckpt", "s-next").release()
    assert refused.traceback


@pytest.mark.slow  # trains more than one epoch
def test_a_checkpoint_written_before_the_redesign_resumes_to_the_same_weights(tmp_path, monkeypatch, capsys):
    """tests/data/checkpoint-f09059b: step 5 of 14 of a tiny run (2 micro-batches a step) written by
    commit f09059b, before the backend default, the new keys and the move of the loop's code, with
    the weights its uninterrupted run ended with. Resumed by today's code it must end bitwise there:
    the on-disk keys (the logging interval's "window" among them) still load."""
    import shutil
    saved = ROOT / "tests" / "data" / "checkpoint-f09059b"
    monkeypatch.chdir(tmp_path)  # the run used relative paths, which its checkpoint.json holds
    save_tiny_encoder("bert")
    write_csv("train.csv", sentiment_rows(100, seed=1))
    write_csv("val.csv", sentiment_rows(30, seed=2))
    shutil.copytree(saved / "checkpoint-epoch1-step5", tmp_path / "ckpt" / "checkpoint-epoch1-step5")
    args = (saved / "args.txt").read_text().split()
    assert trainer.main(args + ["--ckpt.resume", "auto"]) == 0
    out = capsys.readouterr().out
    assert "resumed from ckpt/checkpoint-epoch1-step5 at step 5" in out
    assert "logging from step 5 on to a new folder" in out  # its log folder is not here
    assert same_weights(weights(tmp_path / "ckpt" / "last"), load_file(saved / "final-model.safetensors"))
