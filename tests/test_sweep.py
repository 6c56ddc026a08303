"""sweep.py: bad input refused in one line, the halving arithmetic, and a small sweep end to end
whose winner is bit for bit the run it would have been alone, stopped and resumed on the way."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from checkpoint import resume_conflicts
from config import ConfigError, load_config
from conftest import ROOT, base_args, last_json_line, sentiment_rows, stderr_tail, write_csv
from sweep import field_sizes, grid_points, kept, main, ranking, rungs_of


@pytest.fixture
def data(tmp_path):
    train = write_csv(tmp_path / "train.csv", sentiment_rows(64, seed=1))
    val = write_csv(tmp_path / "val.csv", sentiment_rows(32, seed=2))
    return train, val


def sweep_args(tmp_path, model_dir, data, grid, **overrides):
    args = base_args(tmp_path, model_dir, *data, **{"trainer.epochs": 2, "sweep.dir": str(tmp_path / "sweeps"),
                                                    **overrides})
    return args + ["--sweep.grid", grid]


# -- bad input: one line, before any trial starts (in-process) ----------------------------------


@pytest.mark.parametrize("grid, expected", [
    ("{}", "error: sweep.grid is empty; give config keys and their values"),
    ("{module.lr: [1e-3]}", "error: sweep.grid: 'module.lr' is not a key of config.yaml"),
    ("{nosection.max_lr: [1e-3]}", "error: sweep.grid: 'nosection.max_lr' is not a key of config.yaml"),
    ("{module.max_lr: 1e-3}", "error: sweep.grid: module.max_lr is 0.001; give a non-empty list of values"),
    ("{module.max_lr: []}", "error: sweep.grid: module.max_lr is []; give a non-empty list of values"),
    ("{trainer.seed: [1, 1]}", "error: sweep.grid: trainer.seed lists a value twice"),
    ("{ckpt.model_state_save_dir: [a, b]}", "error: sweep.grid: ckpt.model_state_save_dir is set by the sweep"),
    # the wrong type, found by load_config on the trial's own command line
    ("{module.max_lr: [1e-3, fast]}", ("error: trial-01 (module.max_lr=fast): --module.max_lr: module.max_lr is "
                                       "'fast'; expected float")),
    # a value of the right type that cannot work, found by check_config
    ("{module.warmup_prop: [0.1, 2.0]}", ("error: trial-01 (module.warmup_prop=2.0): module.warmup_prop is 2.0; "
                                          "it must be in [0, 1]")),
])
def test_bad_grid_is_one_line_before_any_trial(tmp_path, capsys, data, grid, expected):
    assert main(sweep_args(tmp_path, "no-model-needed", data, grid)) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected) and err.count("\n") == 1, err
    assert not (tmp_path / "sweeps").exists()  # nothing written


@pytest.mark.parametrize("extra, expected", [
    (["--sweep.samples", "5"], "error: sweep.samples 5 is more than the 4 points of sweep.grid"),
    (["--sweep.keep", "0"], "error: sweep.keep is 0; it must be in (0, 1]"),
    (["--sweep.rungs", "[2, 1]"], "error: sweep.rungs [2, 1] must be increasing epochs"),
    (["--sweep.rungs", "[1, 3]"], "error: sweep.rungs [1, 3] go past trainer.epochs 2"),
    (["--trainer.stop_after_epochs", "1"], "error: trainer.stop_after_epochs is set by the sweep"),
    (["--data.val_filepath", "null"], "error: trial-00: a sweep trains (data.train_filepath) and compares"),
    (["--sweep.wrong", "1"], "error: --sweep.wrong: unknown key 'sweep.wrong'"),
])
def test_bad_sweep_settings_are_one_line(tmp_path, capsys, data, extra, expected):
    args = sweep_args(tmp_path, "no-model-needed", data, "{module.max_lr: [1e-3, 3e-3], trainer.seed: [1, 2]}")
    assert main(args + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected) and err.count("\n") == 1, err
    assert not (tmp_path / "sweeps").exists()


def test_the_sweep_section_does_not_stop_an_older_checkpoint_resuming():
    # checkpoints written before config.yaml had a sweep section do not hold one
    cfg = load_config([])
    saved = {section: dict(values) for section, values in cfg.items() if section != "sweep"}
    digests = {"data.train_filepath": ["a"], "data.val_filepath": ["b"], "distill.unlabeled_filepaths": []}
    assert resume_conflicts(saved, digests, cfg, digests) == []
    assert resume_conflicts({**saved, "module": {**saved["module"], "max_lr": 1.0}}, digests, cfg, digests) == [
        "module.max_lr 1.0 -> 5e-05"]


def test_sweep_keys_are_checked_by_the_config():
    with pytest.raises(ConfigError, match="sweep.keep is 1.5"):
        load_config(["--sweep.keep", "1.5"])
    with pytest.raises(ConfigError, match=r"sweep.samples is 'x'; expected int, null"):
        load_config(["--sweep.samples", "x"])


# -- the halving arithmetic (pure functions) -----------------------------------------------------


def test_rungs_double_up_to_the_epochs_which_are_always_the_last():
    assert rungs_of(None, 1) == [1]
    assert rungs_of(None, 2) == [1, 2]
    assert rungs_of(None, 3) == [1, 2, 3]
    assert rungs_of(None, 8) == [1, 2, 4, 8]
    assert rungs_of(None, 10) == [1, 2, 4, 8, 10]
    assert rungs_of([1, 3], 4) == [1, 3, 4]
    assert rungs_of([2, 4], 4) == [2, 4]
    assert rungs_of([], 3) == [3]


def test_kept_is_the_fraction_rounded_up_and_at_least_one():
    assert [kept(n, 0.5) for n in (1, 2, 3, 6, 7)] == [1, 1, 2, 3, 4]
    assert kept(10, 0.3) == 3  # 10 * 0.3 is 3.0000000000000004 in floats
    assert kept(4, 1.0) == 4
    assert kept(5, 0.01) == 1


def test_the_field_halves_at_each_rung():
    # 6 trials, 2 epochs: all 6 to epoch 1, the best 3 on to 2
    assert field_sizes(6, [1, 2], 0.5) == [6, 3]
    # 8 trials, 8 epochs, rungs 1, 2, 4, 8
    assert field_sizes(8, [1, 2, 4, 8], 0.5) == [8, 4, 2, 1]
    assert field_sizes(5, [3], 0.5) == [5]  # one rung: every trial fully


def test_grid_points_are_every_combination_or_a_seeded_sample_in_grid_order():
    grid = {"module.max_lr": [1, 2, 3], "trainer.seed": [7, 8]}
    points = grid_points(grid)
    assert points[:3] == [{"module.max_lr": 1, "trainer.seed": 7}, {"module.max_lr": 1, "trainer.seed": 8},
                          {"module.max_lr": 2, "trainer.seed": 7}]
    assert len(points) == 6
    sample = grid_points(grid, samples=3, seed=5)
    assert sample == grid_points(grid, samples=3, seed=5) and len(sample) == 3
    assert sample == [p for p in points if p in sample]  # in grid order
    assert {json.dumps(grid_points(grid, 3, seed)) for seed in range(10)} != {json.dumps(sample)}


def test_ranking_puts_the_best_value_first_and_leaves_failures_out():
    trials = [{"name": "a", "value": 0.5, "error": None}, {"name": "b", "value": 0.7, "error": None},
              {"name": "c", "value": None, "error": "error: boom"}, {"name": "d", "value": 0.7, "error": None},
              {"name": "e", "value": 0.9, "error": "error: failed at the next rung"}]
    assert [t["name"] for t in ranking(trials)] == ["b", "d", "a"]  # a tie keeps the trial order


# -- end to end (subprocesses) --------------------------------------------------------------------


def run_sweep(args, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "sweep.py"), *args], capture_output=True, text=True,
                          env=env, timeout=600, check=False, **kwargs)


def wait_for(condition, timeout=300):
    start = time.time()
    while not condition():
        assert time.time() - start < timeout
        time.sleep(0.2)


def read_state(sweeps):
    try:
        return json.loads((sweeps / "sweep.json").read_text())
    except (OSError, ValueError):
        return None


@pytest.mark.slow
def test_a_sweep_stopped_and_resumed_keeps_the_best_and_its_winner_is_the_run_alone(tmp_path, tiny_bert, capsys, data):
    grid = "{module.max_lr: [3e-3, 1e-4], trainer.seed: [1, 2]}"
    args = sweep_args(tmp_path, tiny_bert, data, grid, **{"ckpt.keep_last": 1})
    sweeps = tmp_path / "sweeps"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, str(ROOT / "sweep.py"), *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    # Ctrl-C once the first trial has reached the first rung: the second one is running or starting
    wait_for(lambda: (state := read_state(sweeps)) is not None and state["trials"][0]["launches"] == 1)
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 1, stderr_tail(err)
    assert "run the same command again to go on" in err
    stopped = read_state(sweeps)
    assert [t["launches"] for t in stopped["trials"]] == [1, 0, 0, 0]
    first_rung = (sweeps / "trial-00" / "epoch1.stdout").stat().st_mtime_ns

    second = run_sweep(args)
    assert second.returncode == 0, stderr_tail(second.stderr)
    # trial-00 was not trained again; the others were, each once per rung they reached
    assert (sweeps / "trial-00" / "epoch1.stdout").stat().st_mtime_ns == first_rung
    assert "trial-00 epoch 1/2" not in second.stdout and "trial-01 epoch 1/2" in second.stdout
    summary = last_json_line(second.stdout)
    assert summary["epochs_trained"] == 6 and summary["epochs_every_trial_fully"] == 8

    # the table: two trials cut at epoch 1 (their weights deleted), one winner, one finished
    rows = [json.loads(line) for line in (sweeps / "results.jsonl").read_text().splitlines()]
    assert [r["trial"] for r in rows] == ["trial-00", "trial-01", "trial-02", "trial-03"]
    assert sorted(r["status"] for r in rows) == ["cut at epoch 1", "cut at epoch 1", "finished", "winner"]
    csv_lines = (sweeps / "results.csv").read_text().splitlines()
    assert csv_lines[0] == "trial,module.max_lr,trainer.seed,epochs,status,acc,best_step,seconds,error"
    assert len(csv_lines) == 5
    for row in rows:
        cut = row["status"].startswith("cut")
        assert row["epochs"] == (1 if cut else 2)
        assert (sweeps / row["trial"] / "checkpoints").exists() == (not cut)
        assert (sweeps / row["trial"] / "runs").exists()  # the logs stay
    kept = [r for r in rows if not r["status"].startswith("cut")]
    cut = [r for r in rows if r["status"].startswith("cut")]
    # the first rung's values decided: every kept trial was at least as good as every cut one then
    at_first_rung = {r["trial"]: last_json_line((sweeps / r["trial"] / "epoch1.stdout").read_text())["acc"]
                     for r in rows}
    assert min(at_first_rung[r["trial"]] for r in kept) >= max(at_first_rung[r["trial"]] for r in cut)
    assert {r["trial"]: r["acc"] for r in cut} == {r["trial"]: at_first_rung[r["trial"]] for r in cut}
    winner = next(r for r in rows if r["status"] == "winner")
    assert winner["acc"] == max(r["acc"] for r in kept) == summary["acc"]

    # the winner's best checkpoint is what trainer.py gives for its settings alone
    alone = subprocess.run([sys.executable, str(ROOT / "trainer.py"),
                            *base_args(tmp_path / "alone", tiny_bert, *data, **{
                                "trainer.epochs": 2, "ckpt.keep_last": 1,
                                **{f"{k}": str(v) for k, v in winner["settings"].items()}})],
                           capture_output=True, text=True, env=env, timeout=300, check=False)
    assert alone.returncode == 0, stderr_tail(alone.stderr)
    assert last_json_line(alone.stdout)["acc"] == winner["acc"]
    assert (sweeps / "best" / "model.safetensors").read_bytes() == \
        (tmp_path / "alone" / "ckpt" / "best" / "model.safetensors").read_bytes()
    assert winner["command"].startswith("python trainer.py ")

    # another sweep in the same folder is refused, and changes nothing there
    before = (sweeps / "sweep.json").read_bytes()
    other = sweep_args(tmp_path, tiny_bert, data, "{module.max_lr: [3e-3, 1e-3]}", **{"ckpt.keep_last": 1})
    assert main(other) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {sweeps} holds another sweep (sweep.grid ") and err.count("\n") == 1, err
    assert (sweeps / "sweep.json").read_bytes() == before


@pytest.mark.slow
def test_a_failing_trial_is_recorded_and_the_sweep_goes_on(tmp_path, tiny_bert, data):
    args = sweep_args(tmp_path, tiny_bert, data, "{data.text_a_col: [no_such_column, text]}",
                      **{"trainer.epochs": 1})
    result = run_sweep(args)
    assert result.returncode == 0, stderr_tail(result.stderr)
    rows = [json.loads(line) for line in (tmp_path / "sweeps" / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["failed", "winner"]
    assert rows[0]["error"].startswith("error: ") and "no_such_column" in rows[0]["error"]
    assert rows[0]["acc"] is None and rows[1]["acc"] is not None
    assert "trial-00 failed: error: " in result.stdout
    assert (tmp_path / "sweeps" / "best" / "model.safetensors").exists()
