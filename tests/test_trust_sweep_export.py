"""Trust, fourth sweep (issue 41, part 1): a sweep that never touches what is not its own, and the
outputs around prediction. Each test plants the hostile or careless case (an edited sweep.json, a
link, a user's folder, a killed sweep, a full disk) and checks the one line that refuses it, or the
run that goes on, with nothing of the user's touched.

The sweep tests run sweep.py in this process with a stand-in for trainer.py (FAKE_TRAINER: a script
that makes a checkpoint folder and prints the result line trainer.py prints), so the sweep's own
logic runs in seconds; the slow tests at the end run the real trainer.py.
"""
import csv
import errno
import fcntl
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import evaluation
import files
import sweep
import trainer
from checkpoint import SaveDir, resume_conflicts
from config import ConfigError, load_config
from conftest import ROOT, base_args, last_json_line, save_tiny_encoder, sentiment_rows, stderr_tail, write_csv

# trainer.py as the sweep sees it: the best checkpoint's folder, the metric of the rung, a pause
# line before the last epoch. Its acc grows with module.max_lr; FAKE_FAIL (a max_lr) fails that
# trial, FAKE_FAIL_AT (an epoch) fails every trial there, FAKE_WAIT (a file) makes the trial wait
# for SIGTERM, writing its pid into the file first and how many signals it got after.
FAKE_TRAINER = r'''
import json, os, signal, sys, time
from pathlib import Path
args = sys.argv[1:]
def value(key):
    return args[len(args) - 1 - args[::-1].index("--" + key) + 1]
save, lr = Path(value("ckpt.model_state_save_dir")), float(value("module.max_lr"))
stop, epochs = value("trainer.stop_after_epochs"), int(value("trainer.epochs"))
epoch = epochs if stop == "null" else int(stop)
if os.environ.get("FAKE_WAIT"):
    wait, signals = Path(os.environ["FAKE_WAIT"]), []
    signal.signal(signal.SIGTERM, lambda signum, frame: signals.append(signum))
    wait.write_text(str(os.getpid()))
    for _ in range(1200):
        if signals:
            break
        time.sleep(0.1)
    time.sleep(1)  # a second signal would come by now
    wait.write_text(f"terminated by {len(signals)} signals")
    sys.exit(1)
if os.environ.get("FAKE_FAIL") == str(lr) or os.environ.get("FAKE_FAIL_AT") == str(epoch):
    sys.stderr.write("error: cannot write checkpoint: No space left on device (the disk is full)\n")
    sys.exit(2)
checkpoint = save / f"checkpoint-epoch{epoch}-step{4 * epoch}"
checkpoint.mkdir(parents=True, exist_ok=True)
(checkpoint / "model.safetensors").write_text(f"{lr} {epoch}")
result = {"acc": round(lr * 100 + epoch / 100, 6), "best_step": 4 * epoch, "best_checkpoint": str(checkpoint)}
print(json.dumps({**result, **({"paused_after_epoch": epoch} if epoch < epochs else {})}))
'''


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """sweep.py launching the stand-in trainer; the arguments of a 2-trial, 2-epoch sweep in tmp_path/sweeps."""
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    monkeypatch.setattr(sweep, "TRAINER", script)
    for name in ("FAKE_FAIL", "FAKE_FAIL_AT", "FAKE_WAIT"):
        monkeypatch.delenv(name, raising=False)
    args = base_args(tmp_path, "no-model-needed", "train.csv", "val.csv", **{
        "trainer.epochs": 2, "sweep.dir": str(tmp_path / "sweeps"), "sweep.keep": 0.5})
    return SimpleNamespace(args=args + ["--sweep.grid", "{module.max_lr: [1e-3, 3e-3]}"], dir=tmp_path / "sweeps",
                           script=script)


def run(args, capsys, expect):
    status = sweep.main(args)
    out, err = capsys.readouterr()
    assert status == expect, err + out
    return out, err


def one_error(err):
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def state_of(folder):
    return json.loads((folder / "sweep.json").read_text())


def rows_of(folder):
    return {row["trial"]: row for row in map(json.loads, (folder / "results.jsonl").read_text().splitlines())}


def test_the_stand_in_sweep_runs_to_a_winner(fake, capsys):
    out, _ = run(fake.args, capsys, 0)
    assert last_json_line(out)["winner"] == "trial-01"
    assert os.readlink(fake.dir / "best") == "trial-01/checkpoints/checkpoint-epoch2-step8"
    assert state_of(fake.dir)["trials"][1]["best_checkpoint"] == "checkpoint-epoch2-step8"  # a name, no path
    assert not (fake.dir / "trial-00" / "checkpoints").exists()  # cut at epoch 1


# -- 1, 16: sweep.json is checked like a checkpoint's record; folders are derived, never read ------


def test_a_trial_name_edited_to_leave_the_sweep_folder_is_refused_and_nothing_there_is_touched(fake, capsys, tmp_path):
    run(fake.args, capsys, 0)
    outside = tmp_path / "x"
    (outside / "checkpoints").mkdir(parents=True)
    (outside / "epoch2.stdout").write_text("the user's file\n")
    state = state_of(fake.dir)
    state["trials"][1].update(name="../x", trained_to=0, finished=False)
    (fake.dir / "sweep.json").write_text(json.dumps(state))
    _, err = run(fake.args, capsys, 2)
    assert one_error(err).startswith(f"error: {fake.dir / 'sweep.json'}: trials[1] name is '../x', not as sweep.py "
                                     f"writes it (damaged or edited?)")
    assert sorted(p.name for p in outside.iterdir()) == ["checkpoints", "epoch2.stdout"]
    assert (outside / "epoch2.stdout").read_text() == "the user's file\n"


def edit(state, change):
    if change == "shortened":
        del state["trials"][1]
    elif change == "trained_to text":
        state["trials"][0]["trained_to"] = "x"
    elif change == "trained_to past the epochs":
        state["trials"][0]["trained_to"] = 9
    elif change == "value inf":
        state["trials"][0]["value"] = float("inf")
    elif change == "cuts_done":
        state["cuts_done"] = 7
    elif change == "best_checkpoint a path":
        state["trials"][1]["best_checkpoint"] = "../../etc"
    elif change == "settings":
        state["trials"][0]["settings"] = {"module.max_lr": 1}
    elif change == "trials not a list":
        state["trials"] = "x"
    elif change == "id":
        state["id"] = "../zz"
    elif change == "a record not a dict":
        state["trials"][0] = None
    elif change == "error a number":
        state["trials"][0]["error"] = 5


@pytest.mark.parametrize("change, fragment", [
    ("shortened", "trials lists 1 trials, this sweep has 2"),
    ("trained_to text", "trials[0] trained_to is 'x'"),
    ("trained_to past the epochs", "trials[0] trained_to is 9"),
    ("value inf", "trials[0] value is inf"),
    ("cuts_done", "cuts_done is 7 (there are 2 rungs)"),
    ("best_checkpoint a path", "trials[1] best_checkpoint is '../../etc'"),
    ("settings", "trials[0] settings is {'module.max_lr': 1}"),
    ("trials not a list", "trials is 'x'"),
    ("id", "id is '../zz'"),
    ("a record not a dict", "trials[0] is None"),
    ("error a number", "trials[0] error is 5"),
])
def test_a_hand_edited_sweep_json_is_one_line_and_left_as_it_is(fake, capsys, change, fragment):
    run(fake.args, capsys, 0)
    state = state_of(fake.dir)
    edit(state, change)
    (fake.dir / "sweep.json").write_text(json.dumps(state))
    before = (fake.dir / "sweep.json").read_bytes()
    _, err = run(fake.args, capsys, 2)
    assert one_error(err) == (f"error: {fake.dir / 'sweep.json'}: {fragment}, not as sweep.py writes it (damaged or "
                              f"edited?); put the sweep's own file back, or start the sweep again in another --sweep.dir")
    assert (fake.dir / "sweep.json").read_bytes() == before


def test_a_sweep_json_that_is_not_json_is_one_line(fake, capsys):
    run(fake.args, capsys, 0)
    (fake.dir / "sweep.json").write_text("{half a fi")
    _, err = run(fake.args, capsys, 2)
    assert one_error(err) == (f"error: {fake.dir / 'sweep.json'} is not the state of a sweep; move it away or choose "
                              f"another --sweep.dir")


# -- 2: a failed trial is retried once at a rerun; trials die with their sweep ------------------


def test_a_failed_trial_is_retried_at_the_rerun_and_wins_if_it_is_the_best(fake, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL", "0.003")  # the better trial meets a full disk
    out, _ = run(fake.args, capsys, 0)
    assert last_json_line(out)["winner"] == "trial-00"
    assert rows_of(fake.dir)["trial-01"]["status"] == "failed"
    monkeypatch.delenv("FAKE_FAIL")  # the disk freed
    out, _ = run(fake.args, capsys, 0)
    assert ("trial-01 failed at the last run (error: cannot write checkpoint: No space left on device (the disk is "
            "full)); launching it again once") in out
    # the cut of epoch 1 was made without it: it reached the bar (trial-00's value there) and went on
    assert last_json_line(out)["winner"] == "trial-01"
    assert {name: row["status"] for name, row in rows_of(fake.dir).items()} == {"trial-00": "finished",
                                                                                 "trial-01": "winner"}
    assert os.readlink(fake.dir / "best") == "trial-01/checkpoints/checkpoint-epoch2-step8"


def test_a_retried_trial_below_the_bar_of_a_cut_made_without_it_is_cut(fake, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL", "0.001")  # the worse trial fails
    run(fake.args, capsys, 0)
    monkeypatch.delenv("FAKE_FAIL")
    out, _ = run(fake.args, capsys, 0)
    assert "trial-00 epoch 1/2" in out and "trial-00 epoch 2/2" not in out
    assert last_json_line(out)["winner"] == "trial-01"
    assert rows_of(fake.dir)["trial-00"]["status"] == "cut at epoch 1"
    assert not (fake.dir / "trial-00" / "checkpoints").exists()


def test_a_trial_that_fails_again_is_failed_and_the_sweep_still_ends(fake, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL_AT", "1")
    _, err = run(fake.args, capsys, 2)
    assert one_error(err).startswith("error: no trial finished")
    out, err = run(fake.args, capsys, 2)  # the same disk, still full: one more launch each, then the same end
    assert out.count("launching it again once") == 2 and one_error(err).startswith("error: no trial finished")
    assert [t["launches"] for t in state_of(fake.dir)["trials"]] == [2, 2]


def test_a_trial_dies_with_its_sweep(fake, tmp_path):
    """A SIGKILLed sweep (or a closed terminal) no longer leaves its trial training as an orphan."""
    wait = tmp_path / "trial.pid"
    env = {**os.environ, "FAKE_WAIT": str(wait)}
    code = (f"import sys, sweep; from pathlib import Path; sweep.TRAINER = Path({str(fake.script)!r}); "
            f"sys.exit(sweep.main(sys.argv[1:]))")
    launched = subprocess.Popen([sys.executable, "-c", code, *fake.args], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not (wait.exists() and wait.read_text().isdigit()):
            assert time.time() < deadline and launched.poll() is None
            time.sleep(0.1)
        pid = int(wait.read_text())
        launched.kill()
        launched.wait()
        deadline = time.time() + 10
        while not wait.read_text().startswith("terminated") and time.time() < deadline:
            time.sleep(0.1)
        # one SIGTERM: trainer.py writes a checkpoint and stops (a second one would stop it without)
        assert wait.read_text() == "terminated by 1 signals"
    finally:
        launched.kill()
        if wait.exists() and wait.read_text().isdigit():
            try:
                os.kill(int(wait.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert pid > 0


def test_a_launch_waits_for_an_earlier_launch_to_let_go_of_its_folder(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    held = files.FolderLock(tmp_path / "checkpoints", "the killed sweep's trial", key="ckpt.model_state_save_dir")
    said, calls = [], []

    def stopping():
        calls.append(1)
        return len(calls) > 2
    assert sweep.wait_for_lock(tmp_path / "checkpoints" / files.LOCK, stopping, said.append) is False
    assert len(said) == 1 and said[0].endswith("run the killed sweep's trial")
    held.release()
    assert sweep.wait_for_lock(tmp_path / "checkpoints" / files.LOCK, lambda: True, said.append) is True
    assert sweep.wait_for_lock(tmp_path / "nothing" / files.LOCK, lambda: True, said.append) is True


# -- 3: the same sweep, its folder spelled otherwise or moved ----------------------------------


def test_the_same_sweep_goes_on_with_its_folder_spelled_otherwise_or_moved(fake, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("FAKE_FAIL_AT", "2")
    run(fake.args, capsys, 2)
    monkeypatch.delenv("FAKE_FAIL_AT")
    moved = tmp_path / "elsewhere" / "lr"
    moved.parent.mkdir()
    fake.dir.rename(moved)
    monkeypatch.chdir(tmp_path)
    args = fake.args + ["--sweep.dir", "./elsewhere/../elsewhere/lr"]
    out, _ = run(args, capsys, 0)
    assert last_json_line(out)["winner"] == "trial-01"
    assert os.readlink(moved / "best") == "trial-01/checkpoints/checkpoint-epoch2-step8"
    assert rows_of(moved)["trial-01"]["best_checkpoint"] == \
        "elsewhere/../elsewhere/lr/trial-01/checkpoints/checkpoint-epoch2-step8"


def test_a_checkpoint_in_the_save_folder_resumes_however_the_folder_is_spelled(tmp_path):
    (tmp_path / "ck" / "checkpoint-epoch1-step4").mkdir(parents=True)
    saved = load_config(["--ckpt.model_state_save_dir", "ck"])
    digests = {"data.train_filepath": ["a"], "data.val_filepath": ["b"], "distill.unlabeled_filepaths": []}
    for spelling in (f"{tmp_path}/./ck", str(tmp_path / "ck")):
        cfg = load_config(["--ckpt.model_state_save_dir", spelling])
        assert resume_conflicts(saved, digests, cfg, digests) == [f"ckpt.model_state_save_dir 'ck' -> {spelling!r}"]
        here = SaveDir(cfg, "s", print).as_saved_here(Path(spelling) / "checkpoint-epoch1-step4", saved)
        assert resume_conflicts(here, digests, cfg, digests) == []
    # a checkpoint of another folder still differs
    (tmp_path / "other").mkdir()
    cfg = load_config(["--ckpt.model_state_save_dir", str(tmp_path / "other")])
    here = SaveDir(cfg, "s", print).as_saved_here(tmp_path / "ck" / "checkpoint-epoch1-step4", saved)
    assert resume_conflicts(here, digests, cfg, digests) != []


# -- 4, 5, 15: no write through a link; the folder is the sweep's own ------------------------------


def test_no_log_or_table_is_written_through_a_planted_link(fake, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("FAKE_FAIL_AT", "2")
    run(fake.args, capsys, 2)
    user = {name: tmp_path / f"user-{name}" for name in ("stdout", "stderr", "csv")}
    for name, path in user.items():
        path.write_text(f"the user's {name}\n")
    for name in ("stdout", "stderr"):  # in place of the failed launch's
        (fake.dir / "trial-01" / f"epoch2.{name}").unlink()
        (fake.dir / "trial-01" / f"epoch2.{name}").symlink_to(user[name])
    (fake.dir / "results.csv").unlink()
    (fake.dir / "results.csv").symlink_to(user["csv"])
    monkeypatch.delenv("FAKE_FAIL_AT")
    run(fake.args, capsys, 0)
    for name, path in user.items():
        assert path.read_text() == f"the user's {name}\n"
    assert not (fake.dir / "results.csv").is_symlink() and "trial-01" in (fake.dir / "results.csv").read_text()
    assert not (fake.dir / "trial-01" / "epoch2.stdout").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary file beside them


def test_a_trial_folder_that_is_a_link_to_a_user_folder_is_refused(fake, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("FAKE_FAIL_AT", "1")
    run(fake.args, capsys, 2)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine\n")
    os.rename(fake.dir / "trial-01", tmp_path / "aside")
    (fake.dir / "trial-01").symlink_to(tmp_path / "mine", target_is_directory=True)
    _, err = run(fake.args, capsys, 2)
    assert one_error(err).startswith(f"error: {fake.dir / 'trial-01'} is not a trial folder of this sweep (a link")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_a_folder_of_the_users_is_refused_as_a_sweep_folder(fake, capsys, tmp_path):
    fake.dir.mkdir()
    (fake.dir / "results.csv").write_text("my results\n")
    (fake.dir / "best").write_text("my best\n")
    _, err = run(fake.args, capsys, 2)
    assert one_error(err) == (f"error: sweep.dir {fake.dir} holds files that are not a sweep's (best, results.csv) "
                              f"and no sweep.json; choose a new or empty folder")
    assert sorted(p.name for p in fake.dir.iterdir()) == ["best", "results.csv"]  # no lock file either
    assert (fake.dir / "best").read_text() == "my best\n"


def test_an_empty_folder_is_a_sweep_folder(fake, capsys):
    fake.dir.mkdir()
    run(fake.args, capsys, 0)


@pytest.mark.parametrize("best", ["folder", "file", "link elsewhere"])
def test_a_best_the_sweep_did_not_make_is_refused_before_any_trial_runs(fake, capsys, monkeypatch, tmp_path, best):
    monkeypatch.setenv("FAKE_FAIL_AT", "1")
    run(fake.args, capsys, 2)
    monkeypatch.delenv("FAKE_FAIL_AT")
    if best == "folder":
        (fake.dir / "best").mkdir()
        (fake.dir / "best" / "model.safetensors").write_text("the user's")
    elif best == "file":
        (fake.dir / "best").write_text("the user's")
    else:
        (fake.dir / "best").symlink_to(tmp_path)
    launches = [t["launches"] for t in state_of(fake.dir)["trials"]]
    _, err = run(fake.args, capsys, 2)
    assert one_error(err) == (f"error: {fake.dir / 'best'} was not made by this sweep, which links its winner there; "
                              f"move it away, then run the sweep again")
    assert [t["launches"] for t in state_of(fake.dir)["trials"]] == launches  # refused at the start
    assert (fake.dir / "best").exists()


@pytest.mark.parametrize("kind", ["file", "dangling link"])
def test_a_sweep_dir_that_cannot_be_a_folder_is_one_line(fake, capsys, tmp_path, kind):
    if kind == "file":
        fake.dir.write_text("a file\n")
        expected = f"error: sweep.dir: {fake.dir} is a file, not a folder; choose a folder"
    else:
        fake.dir.symlink_to(tmp_path / "gone")
        expected = (f"error: sweep.dir: {fake.dir} is a link to {tmp_path / 'gone'}, which does not exist; remove "
                    f"the link or choose another folder")
    _, err = run(fake.args, capsys, 2)
    assert one_error(err) == expected


def test_a_read_only_sweep_dir_is_one_line(fake, capsys, monkeypatch):
    def refuse(self, data):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(files.Path, "write_bytes", refuse)
    _, err = run(fake.args, capsys, 2)
    assert one_error(err) == (f"error: sweep.dir: cannot write in {fake.dir} (Permission denied); choose a writable "
                              f"folder")


# -- CSV injection: the results table and the predictions ----------------------------------------


def test_a_cell_a_spreadsheet_would_run_is_written_as_text():
    cells = ["=cmd()", "+1+2", "-2+3", "@SUM(A1)", "\tx", "\rx", "-0.5", "+3", "1e-3", "text", "", None, 0.25, -1]
    assert files.csv_cells(cells) == ["'=cmd()", "'+1+2", "'-2+3", "'@SUM(A1)", "'\tx", "'\rx", "-0.5", "+3", "1e-3",
                                      "text", "", "", "0.25", "-1"]


def test_the_sweep_table_neutralises_formulas(fake, capsys):
    args = fake.args[:-1] + ["{module.max_lr: [1e-3, 3e-3], data.text_b_col: ['=HYPERLINK(\"x\")']}"]
    run(args, capsys, 0)
    with open(fake.dir / "results.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert {row["data.text_b_col"] for row in rows} == {"'=HYPERLINK(\"x\")"}


def test_prediction_cells_and_label_names_are_neutralised():
    examples = SimpleNamespace(columns=["id", "text"], rows=[{"id": "-7", "text": "=cmd()"}, {"id": "3", "text": "@x"}])
    out = io.StringIO()
    logits = np.array([[2.0, 0.0], [0.0, 2.0]], dtype=np.float32)
    evaluation.write_prediction_rows(csv.writer(out), examples, evaluation.prediction_cells(logits, ["=bad", "+good"]))
    rows = list(csv.reader(io.StringIO(out.getvalue())))
    assert [row[:3] for row in rows] == [["-7", "'=cmd()", "'=bad"], ["3", "'@x", "'+good"]]
    assert float(rows[0][3]) > 0.5  # probabilities stay numbers


# -- 14: predictions never written over the model they are made with -----------------------------


@pytest.mark.parametrize("name", ["model.onnx", "model.safetensors", "sub/predictions.csv"])
def test_predictions_into_the_models_own_folder_are_refused(tmp_path, name):
    model = tmp_path / "model"
    model.mkdir()
    with pytest.raises(ConfigError) as error:
        load_config(["--model.model_path", str(model), "--data.train_filepath", "null", "--data.val_filepath", "null",
                     "--data.predict_filepath", "new.csv", "--data.predict_output", str(model / name)])
    assert str(error.value) == (f"data.predict_output {model / name} is a file of model.model_path {model}, the model "
                                f"it predicts with; write the predictions outside that folder")


def test_predictions_over_a_state_dict_file_are_refused_and_beside_it_are_not(tmp_path):
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"")
    common = ["--model.model_path", str(weights), "--data.train_filepath", "null", "--data.val_filepath", "null",
              "--data.predict_filepath", "new.csv"]
    with pytest.raises(ConfigError, match="is a file of model.model_path"):
        load_config(common + ["--data.predict_output", f"{tmp_path}/./weights.bin"])
    load_config(common + ["--data.predict_output", str(tmp_path / "predictions.csv")])


# -- 8: a full disk under trainer.log_dir, met by TensorBoard's writer thread ---------------------


# pytest reports a thread's traceback as this warning: an error here
@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("writes_before", [0, 3])
def test_a_full_disk_met_by_the_tensorboard_writer_is_one_line_and_no_thread_traceback(tmp_path, monkeypatch, capsys,
                                                                                        writes_before):
    """The writer's thread meets the full disk (at the first event, or later); the main thread says it
    once, and neither the thread nor the writer's close adds a traceback."""
    from tensorboard.summary.writer import record_writer
    real, calls = record_writer.RecordWriter.write, []

    def full(self, data):
        calls.append(1)
        if len(calls) > writes_before:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)
    monkeypatch.setattr(record_writer.RecordWriter, "write", full)
    model = save_tiny_encoder(tmp_path / "bert")
    train = write_csv(tmp_path / "train.csv", sentiment_rows(32, seed=1))
    val = write_csv(tmp_path / "val.csv", sentiment_rows(16, seed=2))
    assert trainer.main(base_args(tmp_path, model, train, val, **{"trainer.epochs": 1, "trainer.log_steps": 1})) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Exception in thread" not in err, err
    [line] = [line for line in err.splitlines() if line.startswith("error: ")]
    assert line.startswith(f"error: cannot write {tmp_path / 'runs'}") and line.endswith(
        "No space left on device (the disk is full); free space or choose another trainer.log_dir")


# -- slow: the real trainer.py -------------------------------------------------------------------


@pytest.mark.slow
def test_trainer_resumes_its_save_folder_spelled_otherwise_and_moved(tmp_path):
    """A checkpoint.json records the save folder as it was spelled; resuming it as ./ck, or after the
    folder moved, is the same folder. The best checkpoint is found beside the one resumed."""
    model = save_tiny_encoder(tmp_path / "bert")
    train = write_csv(tmp_path / "train.csv", sentiment_rows(64, seed=1))
    val = write_csv(tmp_path / "val.csv", sentiment_rows(32, seed=2))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(save_dir, *more):
        args = base_args(tmp_path, model, train, val, **{"trainer.epochs": 3, "ckpt.keep_last": 1,
                                                         "ckpt.model_state_save_dir": save_dir})
        done = subprocess.run([sys.executable, str(ROOT / "trainer.py"), *args, "--ckpt.resume", "auto", *more],
                              capture_output=True, text=True, env=env, timeout=300, check=False, cwd=tmp_path)
        assert done.returncode == 0, stderr_tail(done.stderr)
        return last_json_line(done.stdout), done.stdout
    launch("ck", "--trainer.stop_after_epochs", "1")
    _, out = launch("./ck", "--trainer.stop_after_epochs", "2")
    assert "resumed from ck/checkpoint-epoch1" in out or "resumed from ./ck/checkpoint-epoch1" in out
    (tmp_path / "ck").rename(tmp_path / "moved")
    result, out = launch(str(tmp_path / "moved"))
    assert "resumed from" in out
    assert result["best_checkpoint"].startswith(str(tmp_path / "moved"))
    assert (Path(result["best_checkpoint"]) / "model.safetensors").exists()  # kept by pruning, as the best


def lock_is_free(path):
    """True if no process holds path (a FolderLock's file) locked."""
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            return False


@pytest.mark.slow
def test_a_killed_sweep_leaves_no_trial_training_and_its_rerun_loses_none(tmp_path):
    """SIGKILL the sweep while a trial trains: the trial gets SIGTERM, writes its checkpoint and lets
    go of its folder at once (an orphan would train on, holding it); the rerun resumes it, and every
    trial finishes."""
    model = save_tiny_encoder(tmp_path / "bert")
    train = write_csv(tmp_path / "train.csv", sentiment_rows(8192, seed=1))  # seconds of training left to kill
    val = write_csv(tmp_path / "val.csv", sentiment_rows(32, seed=2))
    args = base_args(tmp_path, model, train, val, **{"trainer.epochs": 1, "sweep.dir": str(tmp_path / "sweeps"),
                                                     "trainer.train_batch_size": 4, "trainer.gpu_batch_size_limit": 4})
    args += ["--sweep.grid", "{trainer.seed: [1, 2]}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, str(ROOT / "sweep.py"), *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=env)
    trial = tmp_path / "sweeps" / "trial-00"
    deadline = time.time() + 300
    while not any(p.stat().st_size for p in trial.glob("runs/*/metrics.jsonl")):  # trial-00 is training
        assert time.time() < deadline and first.poll() is None
        time.sleep(0.2)
    first.kill()
    first.wait()
    deadline = time.time() + 15
    while not lock_is_free(trial / "checkpoints" / files.LOCK):
        assert time.time() < deadline, "the trial trains on without its sweep"
        time.sleep(0.2)
    second = subprocess.run([sys.executable, str(ROOT / "sweep.py"), *args], capture_output=True, text=True,
                            env=env, timeout=600, check=False)
    assert second.returncode == 0, stderr_tail(second.stderr)
    assert "resumed from" in (trial / "epoch1.stdout").read_text()  # the checkpoint its SIGTERM wrote
    rows = rows_of(tmp_path / "sweeps")
    assert {row["status"] for row in rows.values()} <= {"winner", "finished"}, rows
