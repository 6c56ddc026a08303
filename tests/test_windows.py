"""Long documents as sliding windows (data.long_texts windows): windows from the fast tokenizer's
overflow, a cap on a training document's windows, per-document pooling in evaluation and prediction."""
import contextlib
import csv
import io
import json
import random

import numpy as np
import pytest
import torch

import distill
import evaluation
import processes
import trainer
from cache import cached_encode
from config import GOLDEN_CONFIG, read_yaml
from conftest import (
    NEGATIVE,
    NEUTRAL,
    POSITIVE,
    base_args,
    last_json_line,
    make_tokenizer,
    one_and_two_processes,
    save_tiny_encoder,
    write_csv,
)
from data import DataError, Examples, cap_windows, dropped_by_truncation, encode, eval_batches, read_examples


def test_pooling_takes_the_mean_or_the_max_of_each_documents_windows():
    logits = np.array([[1.0, 0.0], [3.0, -2.0], [0.5, 0.5], [-1.0, 4.0], [2.0, 2.0]], dtype=np.float32)
    documents = np.array([0, 0, 1, 2, 2])
    np.testing.assert_allclose(evaluation.pool_windows(logits, documents, 3),
                               [[2.0, -1.0], [0.5, 0.5], [0.5, 3.0]])
    np.testing.assert_allclose(evaluation.pool_windows(logits, documents, 3, "max"),
                               [[3.0, 0.0], [0.5, 0.5], [2.0, 4.0]])
    # a document of one window is that window, whatever the pooling
    for how in ("mean", "max"):
        np.testing.assert_array_equal(evaluation.pool_windows(logits, np.arange(5), 5, how), logits)


# -- windows from the tokenizer's overflow ---------------------------------------------------------


WORDS = (NEUTRAL * 3)[:30]


def examples(texts_a, texts_b=None, labels=None):
    return Examples("docs.csv", ["text"], None, texts_a, texts_b, labels)


def test_windows_cover_the_text_sharing_stride_tokens_and_map_to_their_document():
    tokenizer = make_tokenizer()
    long, short = " ".join(WORDS[:20]), "good film"
    encoded = encode(tokenizer, examples([long, short], labels=np.array([1, 0])), max_seq_len=8, stride=2)
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    windows = [encoded.tokens(i) for i in range(len(encoded))]
    assert all(len(w) <= 8 and w[0] == cls and w[-1] == sep for w in windows)
    long_windows = [w[1:-1] for w, d in zip(windows, encoded.documents) if d == 0]
    for before, after in zip(long_windows, long_windows[1:]):
        assert after[:2] == before[-2:]  # the stride: tokens shared with the window before
    rebuilt = long_windows[0] + [t for w in long_windows[1:] for t in w[2:]]
    assert rebuilt == tokenizer(long, add_special_tokens=False)["input_ids"]  # nothing lost, nothing doubled
    assert encoded.documents.tolist() == [0] * len(long_windows) + [1] and encoded.num_documents == 2
    assert encoded.labels.tolist() == [1] * len(long_windows) + [0]  # each window has its document's label
    assert encoded.document_labels().tolist() == [1, 0]
    # truncation would have kept the first window's 6 text tokens of the 20 + 2
    assert dropped_by_truncation(encoded, 2, 2) == pytest.approx(1 - (6 + 2) / (20 + 2))


def test_a_pair_keeps_its_first_text_whole_in_every_window():
    tokenizer = make_tokenizer()
    first, second = "good plot", " ".join(WORDS[:15])
    encoded = encode(tokenizer, examples([first], [second]), max_seq_len=10, stride=1)
    head = tokenizer(first)["input_ids"]  # [CLS] good plot [SEP]
    assert len(encoded) > 2 and all(encoded.tokens(i)[:len(head)] == head for i in range(len(encoded)))
    assert set(encoded.token_type_ids[encoded.offsets[1]:encoded.offsets[1] + len(head)].tolist()) == {0}


def test_a_first_text_or_a_stride_that_leaves_no_room_is_one_clear_line():
    tokenizer = make_tokenizer()
    with pytest.raises(DataError) as error:
        encode(tokenizer, examples(["good", " ".join(WORDS[:9])], ["film film film", "film"]), max_seq_len=10, stride=2)
    assert str(error.value) == ("docs.csv: example 2: its first text (9 tokens) leaves 0 of module.max_seq_len 10 "
                                "for windows of the second text, which must be more than data.window_stride 2; "
                                "raise module.max_seq_len or lower the stride")
    with pytest.raises(DataError, match="data.window_stride 6 leaves a window of module.max_seq_len 8 no room"):
        encode(tokenizer, examples(["good film"]), max_seq_len=8, stride=6)


def test_a_training_document_keeps_at_most_max_windows_spread_over_it():
    tokenizer = make_tokenizer()
    encoded = encode(tokenizer, examples([" ".join(WORDS[:30]), "good"], labels=np.array([1, 0])), 6, stride=1)
    per_document = np.bincount(encoded.documents)
    assert per_document[0] >= 9
    capped = cap_windows(encoded, 4)
    assert np.bincount(capped.documents).tolist() == [4, 1]
    kept = [capped.tokens(i) for i in range(4)]
    assert kept[0] == encoded.tokens(0) and kept[-1] == encoded.tokens(per_document[0] - 1)  # first and last
    assert cap_windows(encoded, None) is encoded and cap_windows(encoded, 100) is encoded


def test_the_token_cache_keeps_windows_apart_from_truncation(tmp_path):
    tokenizer, path = make_tokenizer(), write_csv(tmp_path / "docs.csv", [{"text": " ".join(WORDS[:20]), "label": "positive"}])
    data = {**read_yaml(GOLDEN_CONFIG)["data"], "text_a_col": "text", "label_col": "label"}
    rows = read_examples(path, {**data, "labels_list": ["negative", "positive"]}, True)
    main = processes.Process(0, 0, 1, torch.device("cpu"), True, False)
    cut = cached_encode(tmp_path / "cache", tokenizer, rows, data, 8, main)
    windowed = {**data, "long_texts": "windows", "window_stride": 2}
    first = cached_encode(tmp_path / "cache", tokenizer, rows, windowed, 8, main)
    again = cached_encode(tmp_path / "cache", tokenizer, rows, windowed, 8, main)  # mapped from the cache
    assert len(cut) == 1 and cut.documents is None and len(first) > 1
    assert again.documents.tolist() == first.documents.tolist() == [0] * len(first)
    assert np.array_equal(again.ids, first.ids) and again.labels.tolist() == [1] * len(first)
    assert len(list((tmp_path / "cache").iterdir())) == 2


# -- runs: the cue at the end of a long document ---------------------------------------------------


def late_cue_rows(n, seed):
    """Documents whose sentiment word comes after 20 filler words: past a 16-token truncation."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["negative", "positive"])
        words = [rng.choice(NEUTRAL) for _ in range(20)] + [rng.choice(POSITIVE if label == "positive" else NEGATIVE)]
        rows.append({"text": " ".join(words), "label": label})
    return rows


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("windows")
    return {"tmp": tmp, "model": save_tiny_encoder(tmp / "bert"),
            "train": write_csv(tmp / "train.csv", late_cue_rows(160, 1)),
            "val": write_csv(tmp / "val.csv", late_cue_rows(41, 2))}


def run_main(args, main=None):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = (main or trainer.main)(args)
    assert rc == 0, err.getvalue()[-2000:]
    return out.getvalue()


WINDOWS = {"data.long_texts": "windows", "data.window_stride": 4}


@pytest.fixture(scope="module")
def windowed(job):
    tmp = job["tmp"] / "windowed"
    out = run_main(base_args(tmp, job["model"], job["train"], job["val"], **WINDOWS, **{"trainer.epochs": 8}))
    return tmp, out


@pytest.mark.slow  # trains several epochs
def test_windows_see_a_cue_that_truncation_cuts_off(job, windowed):
    tmp, out = windowed
    cut = last_json_line(run_main(base_args(job["tmp"] / "cut", job["model"], job["train"], job["val"],
                                            **{"trainer.epochs": 8})))
    assert last_json_line(out)["acc"] > 0.9 > 0.75 > cut["acc"]
    assert "windows: " in out and "41 documents in" in out and "truncation would have dropped" in out
    final = json.loads(next((tmp / "runs").glob("*/final_metrics.json")).read_text())
    assert sum(row["support"] for row in final["per_class"].values()) == 41  # documents, not windows


@pytest.mark.slow  # its run trains 8 epochs
def test_predictions_have_one_row_per_document(job, windowed):
    tmp, _ = windowed
    predict = write_csv(job["tmp"] / "predict.csv", [{"text": r["text"]} for r in late_cue_rows(7, 3)])
    output = job["tmp"] / "predictions.csv"
    run_main(["--data.train_filepath", "null", "--data.val_filepath", "null", "--data.predict_filepath", predict,
              "--data.predict_output", str(output), "--model.model_path", str(tmp / "ckpt" / "best"),
              "--trainer.device", "cpu", "--trainer.log_dir", str(job["tmp"] / "predict"), *sum(
                  ([f"--{k}", str(v)] for k, v in WINDOWS.items()), [])])
    with open(output, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    expected = late_cue_rows(7, 3)
    assert [r["text"] for r in rows] == [r["text"] for r in expected]
    assert sum(r["predicted_label"] == e["label"] for r, e in zip(rows, expected)) >= 6


@pytest.mark.slow  # its run trains 8 epochs
def test_distillation_learns_on_the_same_windows(job, windowed):
    tmp = job["tmp"] / "student"
    args = base_args(tmp, job["model"], job["train"], job["val"], **WINDOWS, **{
        "model.model_path": str(windowed[0] / "ckpt" / "best"), "distill.student_layers": "[0, 1]",
        "trainer.epochs": 1, "distill.loss_types": "[logits]", "distill.loss_weights": "[1.0]"})
    out = run_main(args, distill.main)
    assert "41 documents in" in out and last_json_line(out)["acc"] > 0.9


@pytest.mark.slow
def test_two_processes_evaluate_windowed_documents_exactly_as_one(job, windowed, tmp_path):
    """Some document's windows sit on both ranks; the gathered, pooled metrics are one process's."""
    tokenizer = make_tokenizer()
    data = {**read_yaml(GOLDEN_CONFIG)["data"], "text_a_col": "text", "label_col": "label"}
    encoded = encode(tokenizer, read_examples(job["val"], {**data, "labels_list": ["negative", "positive"]}, True), 16, stride=4)
    ranks = np.zeros(len(encoded), dtype=np.int64)
    for batch in eval_batches(encoded.lengths, 8, 1, 2):
        ranks[batch] = 1
    assert any(len(set(ranks[encoded.documents == d])) == 2 for d in range(encoded.num_documents))
    args = ["--data.train_filepath", "null", "--data.val_filepath", job["val"], "--data.label_col", "label",
            "--model.model_path", str(windowed[0] / "ckpt" / "best"), "--trainer.device", "cpu",
            "--trainer.val_batch_size", "8", "--trainer.log_dir", str(tmp_path / "runs"),
            *sum(([f"--{k}", str(v)] for k, v in WINDOWS.items()), [])]
    one, two = one_and_two_processes(args)
    scores = ("ece", "ece_uncalibrated", "brier", "nll")  # sums of float32 probabilities, in another order
    assert {k: v for k, v in one.items() if k not in scores} == {k: v for k, v in two.items() if k not in scores}
    assert [one[k] for k in scores] == pytest.approx([two[k] for k in scores], abs=1e-6)


@pytest.mark.slow  # its run trains 8 epochs
def test_evaluation_from_a_windows_checkpoint_reads_in_windows(job, windowed, capsys):
    best = windowed[0] / "ckpt" / "best"
    args = ["--data.train_filepath", "null", "--data.val_filepath", job["val"], "--data.label_col", "label",
            "--model.model_path", str(best), "--trainer.device", "cpu", "--trainer.log_dir", str(job["tmp"] / "eval")]
    assert trainer.main(args) == 0
    out = capsys.readouterr().out
    assert "data.long_texts windows, data.window_stride 4, data.window_pool mean" in out and "41 documents in" in out
    assert last_json_line(out)["acc"] == last_json_line(windowed[1])["acc"]
    # a user's choice wins: truncated, the cue past the cut is lost
    assert trainer.main(args + ["--data.long_texts", "truncate"]) == 0
    assert last_json_line(capsys.readouterr().out)["acc"] < 0.75
