"""progress.py: tqdm's bars on a terminal; off one (a log file), plain lines at the log interval and
every few seconds of a long task, never carriage-return frames."""
import io
import sys

import pytest
from tqdm import tqdm

import progress
import trainer
from conftest import base_args, sentiment_rows, write_csv


class Clock:
    """time.monotonic of the progress module, moved by hand."""
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    return clock


def lines_of(monkeypatch, **options):
    """A bar as progress_bar makes it where stderr is a file, and what it wrote."""
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    return progress.progress_bar(**options), out


def test_off_a_terminal_training_prints_one_plain_line_per_log_interval(monkeypatch, clock):
    bar, out = lines_of(monkeypatch, desc="train", unit="step", total=10, initial=2, every=None)
    assert isinstance(bar, progress.Lines)
    for step in range(3, 11):
        clock.now += 2
        bar.update(1)
        if step % 4 == 0:
            bar.set_postfix(loss="0.6931", lr="4.00e-05")
    bar.close()
    assert out.getvalue() == ("train: step 4/10 (40%), 00:04, 00:12 left, loss=0.6931 lr=4.00e-05\n"
                              "train: step 8/10 (80%), 00:12, 00:04 left, loss=0.6931 lr=4.00e-05\n"
                              "train: step 10/10 (100%), 00:16, loss=0.6931 lr=4.00e-05\n")


def test_a_long_task_prints_a_line_every_so_often_and_a_short_one_nothing(monkeypatch, clock):
    bar, out = lines_of(monkeypatch, desc="evaluate on cpu", unit="batch", total=None, every=30)
    for item in progress.progress_bar(range(4), desc="x", unit="batch"):  # quick: nothing to say
        pass
    assert out.getvalue() == ""
    for _ in range(5):
        clock.now += 20
        bar.update(1)
    bar.close()
    assert out.getvalue().splitlines() == ["evaluate on cpu: batch 2, 00:40", "evaluate on cpu: batch 4, 01:20",
                                           "evaluate on cpu: batch 5, 01:40"]


def test_iterating_yields_every_item_and_counts_them(monkeypatch, clock):
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    items = []
    for item in progress.progress_bar(["a", "b", "c"], desc="tokenize x.csv", unit="row", every=0):
        clock.now += 1
        items.append(item)
    assert items == ["a", "b", "c"]
    assert out.getvalue().splitlines()[-1] == "tokenize x.csv: row 3/3 (100%), 00:03, 00:00 left"  # every=0: at each row


def test_on_a_terminal_it_is_tqdms_bar(monkeypatch):
    out = io.StringIO()
    out.isatty = lambda: True
    monkeypatch.setattr(sys, "stderr", out)
    bar = progress.progress_bar(desc="train", unit="step", total=3, leave=False)
    assert isinstance(bar, tqdm)
    bar.close()
    assert isinstance(progress.progress_bar(desc="train", unit="step", disable=True), tqdm)  # a rank that shows none


def test_a_run_logged_to_a_file_has_no_carriage_returns(tmp_path, tiny_bert, capsys):
    train = write_csv(tmp_path / "train.csv", sentiment_rows(64, seed=1))
    val = write_csv(tmp_path / "val.csv", sentiment_rows(24, seed=2))
    capsys.readouterr()
    # stderr captured, as in `python trainer.py > run.log 2>&1`: not a terminal
    assert trainer.main(base_args(tmp_path, tiny_bert, train, val, **{
        "trainer.epochs": 1, "trainer.log_steps": 2, "data.predict_filepath": val})) == 0
    out, err = capsys.readouterr()
    assert "\r" not in out + err
    assert [line.split(",")[0] for line in err.splitlines()] == ["train: step 2/4 (50%)", "train: step 4/4 (100%)"]
