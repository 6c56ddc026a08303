"""Reliability: exact resume after SIGKILL, SIGTERM and a crash inside a checkpoint write,
refusal to overwrite earlier checkpoints, extending a finished run, a non-finite loss.

"Exact" means bitwise: on a CPU a resumed run ends with the same weights as a run that was never
interrupted, because the checkpoint carries the optimizer, schedule, scaler, data position and
every RNG state, and the data order is a function of (seed, epoch).

The uninterrupted reference runs in this process; the kill and signal tests launch trainer.py
(marked slow). The SIGKILL step is drawn from RESUME_KILL_SEED (default 0): a failure prints its
seed, and RESUME_KILL_SEED=<seed> repeats that step.
"""
import contextlib
import errno
import io
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

import trainer
from conftest import ROOT, base_args, last_json_line, save_tiny_encoder, sentiment_rows, stderr_tail, write_csv

TRAINER = str(ROOT / "trainer.py")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A tiny job with dropout on (so RNG state matters), 4 x 13 steps, and its uninterrupted result
    (in this process: the resumed runs in other processes must end bitwise the same)."""
    tmp = tmp_path_factory.mktemp("resume")
    model = save_tiny_encoder(tmp / "bert")
    train = write_csv(tmp / "train.csv", sentiment_rows(200, seed=3))
    val = write_csv(tmp / "val.csv", sentiment_rows(40, seed=4))

    def args(name, **more):
        return base_args(tmp / name, model, train, val,
                         **{"trainer.epochs": 4, "ckpt.save_steps": 3, "trainer.log_steps": 1,
                            "ckpt.keep_last": 3, **more})
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = trainer.main(args("reference"))
    assert rc == 0, err.getvalue()[-2000:]
    return {"tmp": tmp, "args": args, "reference": last_json_line(out.getvalue())}


def final_weights(run_dir):
    return load_file(run_dir / "ckpt" / "last" / "model.safetensors")


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def logged(run_dir, key="train/loss"):
    (path,) = list((run_dir / "runs").glob("*/metrics.jsonl"))  # one run folder: continued, not new
    return [(row["step"], row[key]) for row in map(json.loads, path.read_text().splitlines())
            if key in row]


def wait_for(predicate, process, timeout=120):
    end = time.time() + timeout
    while time.time() < end and process.poll() is None:
        if predicate():
            return True
        time.sleep(0.005)
    return False


def checkpoint_steps(ckpt_dir):
    return [int(p.name.rsplit("step", 1)[1]) for p in ckpt_dir.glob("checkpoint-epoch*-step*")]


def resume(job, name, **more):
    out = subprocess.run([sys.executable, TRAINER, *job["args"](name, **{"ckpt.resume": "auto", **more})],
                         capture_output=True, text=True, cwd=job["tmp"], timeout=300)
    assert out.returncode == 0, stderr_tail(out.stderr)
    return out


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_gives_identical_weights_and_curve(job):
    tmp, name = job["tmp"], "killed"
    seed = int(os.environ.get("RESUME_KILL_SEED", "0"))
    kill_after = random.Random(seed).randint(6, 40)  # any moment after a checkpoint at or past this step
    print(f"RESUME_KILL_SEED={seed}: killed once a checkpoint at step >= {kill_after} is written")
    process = subprocess.Popen([sys.executable, TRAINER, *job["args"](name)], cwd=tmp,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    reached = wait_for(lambda: any(s >= kill_after for s in checkpoint_steps(tmp / name / "ckpt")), process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert reached and process.returncode == -signal.SIGKILL, "the run ended before it could be killed"

    out = resume(job, name)
    assert "resumed from" in out.stdout
    assert_bitwise_equal(final_weights(tmp / name), final_weights(tmp / "reference"))
    assert logged(tmp / name) == logged(tmp / "reference")  # same curve, logged once per step
    assert logged(tmp / name, "val/acc") == logged(tmp / "reference", "val/acc")
    assert last_json_line(out.stdout)["acc"] == job["reference"]["acc"]


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_and_says_how_to_resume(job):
    tmp, name = job["tmp"], "terminated"
    process = subprocess.Popen([sys.executable, TRAINER, *job["args"](name, **{"ckpt.save_steps": 0})],
                               cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    runs = tmp / name / "runs"
    assert wait_for(lambda: any(p.stat().st_size > 0 for p in runs.glob("*/metrics.jsonl")), process)
    process.send_signal(signal.SIGTERM)
    stdout, _ = process.communicate(timeout=120)
    assert process.returncode == 1
    assert "stopped by SIGTERM" in stdout and "--ckpt.resume auto" in stdout
    assert 0 < max(checkpoint_steps(tmp / name / "ckpt")) < 52

    resume(job, name, **{"ckpt.save_steps": 0})
    assert_bitwise_equal(final_weights(tmp / name), final_weights(tmp / "reference"))


@pytest.mark.slow  # resumes to the end of 4 epochs
def test_crash_inside_a_checkpoint_write_leaves_the_previous_one_intact(job, monkeypatch, capsys):
    tmp, name = job["tmp"], "crashed"
    real_save, calls = torch.save, []

    def failing_save(obj, path, *a, **k):
        calls.append(path)
        if len(calls) == 3:  # the third checkpoint dies half-written: weights there, state not
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *a, **k)
    monkeypatch.setattr(trainer.torch, "save", failing_save)
    assert trainer.main(job["args"](name)) == 2
    monkeypatch.undo()
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert err.startswith("error: cannot write checkpoint") and "the disk is full" in err

    ckpt = tmp / name / "ckpt"
    assert sorted(checkpoint_steps(ckpt)) == [3, 6]
    assert os.readlink(ckpt / "last") == "checkpoint-epoch1-step6"
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".tmp-")]  # the torn write is gone
    AutoModelForSequenceClassification.from_pretrained(ckpt / "last")  # still loads

    assert trainer.main(job["args"](name, **{"ckpt.resume": "auto"})) == 0
    assert "resumed from" in capsys.readouterr().out
    assert_bitwise_equal(final_weights(tmp / name), final_weights(tmp / "reference"))


def test_a_new_run_refuses_a_folder_with_checkpoints_and_changes_nothing(tmp_path, capsys):
    train = write_csv(tmp_path / "train.csv", sentiment_rows(40, seed=3))
    args = base_args(tmp_path / "first", save_tiny_encoder(tmp_path / "bert"), train, "null", **{"trainer.epochs": 1})
    assert trainer.main(args) == 0
    capsys.readouterr()
    ckpt = tmp_path / "first" / "ckpt"
    # the run lock (.lock) says who holds the folder: the refused run held it a moment
    before = {p: p.stat().st_mtime_ns for p in ckpt.rglob("*") if p.name != ".lock"}
    runs_before = set((tmp_path / "first" / "runs").iterdir())
    assert trainer.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already holds checkpoints" in err and "--ckpt.resume auto" in err
    assert {p: p.stat().st_mtime_ns for p in ckpt.rglob("*") if p.name != ".lock"} == before
    assert set((tmp_path / "first" / "runs").iterdir()) == runs_before


def manifests(ckpt_dir):
    """{folder name: checkpoint.json} of every checkpoint folder."""
    return {p.name: json.loads((p / "checkpoint.json").read_text())
            for p in ckpt_dir.glob("checkpoint-epoch*-step*")}


@pytest.mark.slow  # trains several epochs
def test_overwrite_replaces_the_old_checkpoints(job, capsys):
    ckpt = job["tmp"] / "overwrite" / "ckpt"
    # the old run goes 2 epochs (26 steps), the new one 1 epoch (13): names past step 13 are old
    assert trainer.main(job["args"]("overwrite", **{"trainer.epochs": 2})) == 0
    old = manifests(ckpt)
    assert max(checkpoint_steps(ckpt)) == 26 and {m["config"]["trainer"]["seed"] for m in old.values()} == {42}
    assert trainer.main(job["args"]("overwrite", **{"trainer.epochs": 1, "ckpt.overwrite": "true",
                                                    "trainer.seed": 7})) == 0
    new = manifests(ckpt)
    # only the new run's folders are left, the old ones are not moved aside (.replaced-*) either
    assert max(checkpoint_steps(ckpt)) == 13
    assert {m["config"]["trainer"]["seed"] for m in new.values()} == {7}
    assert len({m["session"] for m in new.values()}) == 1
    assert not {m["session"] for m in new.values()} & {m["session"] for m in old.values()}
    assert [p.name for p in ckpt.iterdir() if p.name.startswith(".")] == [".lock"]
    assert os.readlink(ckpt / "last") == "checkpoint-epoch1-step13"
    assert os.readlink(ckpt / "best") in new


@pytest.mark.slow  # trains several epochs
def test_resuming_a_finished_run_with_more_epochs_extends_it(job, capsys):
    tmp = job["tmp"]
    args = job["args"]("extended", **{"trainer.epochs": 2, "ckpt.save_steps": 0})
    assert trainer.main(args) == 0
    assert trainer.main(args + ["--ckpt.resume", "auto", "--trainer.epochs", "3"]) == 0
    steps = [step for step, _ in logged(tmp / "extended", "train/lr")]
    assert steps == list(range(1, 40))  # 3 epochs x 13 steps, each logged once
    lrs = [lr for _, lr in logged(tmp / "extended", "train/lr")]
    # the first run's last update was one step short of 0 (26 updates, 3 of warmup); the schedule
    # recomputed for 39 updates continues on its own line, down to one step short of 0 again
    assert lrs[25] == pytest.approx(3e-3 * float(trainer.lr_multiplier(25, 3, 26))) == pytest.approx(3e-3 / 23)
    assert lrs[26] == pytest.approx(3e-3 * float(trainer.lr_multiplier(26, 4, 39)))
    assert lrs[-1] == pytest.approx(3e-3 / 35)
    assert all(a > b for a, b in zip(lrs[26:], lrs[27:]))
    assert max(checkpoint_steps(tmp / "extended" / "ckpt")) == 39


def test_non_finite_loss_stops_before_the_update_and_names_the_last_checkpoint(tmp_path, capsys):
    model = save_tiny_encoder(tmp_path / "bert")
    rows = [{"text": r["text"], "label": 1e20} for r in sentiment_rows(32)]  # (1e20)^2 overflows float32
    data = write_csv(tmp_path / "reg.csv", rows)
    args = base_args(tmp_path, model, data, data, **{"data.labels_list": "[score]",
                                                      "module.metric": "pcc_and_scc"})
    assert trainer.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    # both updates of epoch 1 were skipped on the device; the first host sync (the epoch's
    # checkpoint) stops the run before anything is saved
    assert err.startswith("error: by step 2, 2 updates were skipped: the loss or its gradients were not finite")
    assert "Last good checkpoint: none" in err and not checkpoint_steps(tmp_path / "ckpt")


@pytest.mark.slow
def test_sigterm_under_torchrun_stops_every_rank_and_resumes_exactly(job):
    """torchrun forwards SIGTERM to its workers: both ranks agree on a step, save, and exit."""
    tmp = job["tmp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(name, **more):
        return subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", TRAINER,
             *job["args"](name, **{"trainer.backend": "ddp", "ckpt.save_steps": 0, **more})],
            cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    reference = launch("ddp-reference")
    assert reference.wait(timeout=300) == 0, stderr_tail(reference.stderr.read())

    process = launch("ddp-terminated")
    runs = tmp / "ddp-terminated" / "runs"
    assert wait_for(lambda: any(p.stat().st_size > 0 for p in runs.glob("*/metrics.jsonl")), process)
    process.send_signal(signal.SIGTERM)
    stdout, _ = process.communicate(timeout=120)
    assert "stopped by SIGTERM" in stdout
    stop_step = max(checkpoint_steps(tmp / "ddp-terminated" / "ckpt"))
    last = tmp / "ddp-terminated" / "ckpt" / "last"
    state = torch.load(last / "training_state.pt", weights_only=True)
    assert json.loads((last / "checkpoint.json").read_text())["step"] == stop_step
    assert len(state["ranks"]) == 2  # every rank's RNG state and logging window

    resumed = launch("ddp-terminated", **{"ckpt.resume": "auto"})
    assert resumed.wait(timeout=300) == 0, stderr_tail(resumed.stderr.read())
    assert_bitwise_equal(final_weights(tmp / "ddp-terminated"), final_weights(tmp / "ddp-reference"))
