"""check_data.py and datacheck.py: planted duplicates, near duplicates, conflicts and leaks found
exactly (and nothing on clean data), in single-label, multi-label and pair files; token lengths
against module.max_seq_len; trainer.py's one warning line; bad input in one line, nothing written."""
import json
import random

import numpy as np
import pytest

import check_data
from conftest import NEGATIVE, NEUTRAL, POSITIVE, base_args, make_tokenizer, write_csv, write_jsonl
from data import Examples
from datacheck import (
    conflict_groups,
    duplicate_groups,
    leak_warning,
    normalise,
    normalise_all,
    shared,
    text_keys,
)
from processes import single_process
from splits import prepare_run

# -- normalising (pure functions) ------------------------------------------------------------------


def test_normalising_ignores_case_whitespace_and_punctuation_but_keeps_symbols():
    assert normalise("Great  movie!!") == normalise("great movie") == "great movie"
    assert normalise("\u201cWOW\u201d \u2014 it\u2019s\tthere\u2026") == "wow it s there"  # curly quotes, dash, ellipsis
    assert normalise("don't") == normalise("don t") != normalise("dont")  # a mark is a space, not nothing
    assert normalise("I \u2764 it") != normalise("I it")  # an emoji is a symbol: it can carry the label
    assert normalise("$5 + tax") == "$5 + tax"
    assert normalise("!!! ...") == ""
    assert normalise("\u00c9T\u00c9 Stra\u00dfe") == "\u00e9t\u00e9 strasse"  # casefolded


def test_the_fast_path_normalises_every_text_as_the_plain_one_does():
    rng = random.Random(0)
    alphabet = "aZ09 \t\n\r\x0b\x0c\x1c\x1f.,!?'\"-_()[]{}@#%&*/\\:;$+<=>^`|~\x00\u00e9\u2019\u00a0\u3000\u2764"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(3000)]
    assert normalise_all(texts) == [normalise(text) for text in texts]


# -- finding (pure functions) ----------------------------------------------------------------------


TEXTS = ["good movie", "bad plot", "Good movie!", "the film", "good movie", "bad  plot", "a nice film"]
LABELS = np.array([1, 0, 0, 1, 1, 0, 1])


def test_duplicates_exact_and_normalised_are_found_exactly():
    assert duplicate_groups(text_keys(TEXTS)) == [[0, 4]]
    assert duplicate_groups(text_keys(TEXTS, normalised=True)) == [[0, 2, 4], [1, 5]]
    assert duplicate_groups(text_keys(["a", "b", "c"])) == []


def test_conflicts_are_texts_whose_rows_disagree_on_the_label():
    # "good movie" rows 0 and 4 agree; "Good movie!" (row 2) says negative: a conflict once normalised
    assert conflict_groups(text_keys(TEXTS), LABELS) == []
    assert conflict_groups(text_keys(TEXTS, normalised=True), LABELS) == [[0, 2, 4]]
    # multi-label rows conflict when their label sets differ; regression targets when they differ
    multi = np.array([[1, 0], [1, 0], [1, 1], [0, 1]], dtype=np.float32)
    assert conflict_groups(text_keys(["x", "x", "y", "y"]), multi) == [[2, 3]]
    assert conflict_groups(text_keys(["x", "x", "y"]), np.array([0.5, 0.25, 1.0], dtype=np.float32)) == [[0, 1]]


def test_a_pair_is_the_same_only_when_both_of_its_texts_are():
    keys = text_keys(["q1", "q1", "q2", "Q1?"], ["a1", "a2", "a1", "a1"])
    assert duplicate_groups(keys) == []
    near = text_keys(["q1", "q1", "q2", "Q1?"], ["a1", "a2", "a1", "a1"], normalised=True)
    assert duplicate_groups(near) == [[0, 3]]


def test_shared_rows_are_marked_on_both_sides():
    in_a, in_b = shared(text_keys(["a", "b", "c", "b"]), text_keys(["x", "b", "a"]))
    assert in_a.tolist() == [True, True, False, True] and in_b.tolist() == [False, True, True]


def examples(texts, labels, texts_b=None, path="f.csv"):
    return Examples(path, ["text", "label"], None, list(texts), texts_b, np.asarray(labels))


def test_the_trainer_warning_counts_leaks_and_conflicts_and_is_quiet_on_clean_data():
    train = examples(["good movie", "bad plot", "nice film", "nice film"], [1, 0, 1, 0])
    val = examples(["Good movie.", "bad plot", "other"], [1, 0, 1])
    line = leak_warning(train, val)
    assert line == ("warning: 1 of the 3 validation texts are also in the training file (2 once case, whitespace "
                    "and punctuation are ignored), so the validation metric may flatter the model, and 1 texts have "
                    "different labels in different rows; python check_data.py lists them")
    conflicts = leak_warning(train, examples(["other"], [1]))
    assert conflicts == "warning: 1 texts have different labels in different rows; python check_data.py lists them"
    clean = examples(["good movie", "bad plot"], [1, 0])
    assert leak_warning(clean, examples(["other text", "more"], [1, 0])) is None
    assert leak_warning(clean, None) is None and leak_warning(None, None) is None
    # a training file mapped from the token cache was not read: said only where a leak could hide
    note = leak_warning(None, examples(["other"], [1], path="val.csv"), cached=["train.csv"])
    assert note.startswith("note: train.csv came from the token cache unread") and "val.csv" in note


# -- check_data.py end to end (in process) -------------------------------------------------------


def tweets(n, seed):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = rng.choice(["negative", "positive"])
        cue = POSITIVE if label == "positive" else NEGATIVE
        words = [rng.choice(NEUTRAL) for _ in range(3)] + [rng.choice(cue), f"w{seed}x{i}"]  # every text unique
        rows.append({"text": " ".join(words), "label": label})
    return rows


def run_check(tmp_path, capsys, model_dir, train, val, *extra, **overrides):
    output = tmp_path / "report.json"
    args = base_args(tmp_path, model_dir, train, val, **{"check.output": str(output), **overrides})
    assert check_data.main(args + list(extra)) == 0
    out = capsys.readouterr().out
    return json.loads(output.read_text()), out


def test_clean_files_have_no_findings(tmp_path, capsys, tiny_bert):
    train = write_csv(tmp_path / "train.csv", tweets(40, 1))
    val = write_csv(tmp_path / "val.csv", tweets(20, 2))
    report, out = run_check(tmp_path, capsys, tiny_bert, train, val)
    assert "no duplicates, conflicts or leaks" in out
    for file in report["files"]:
        assert file["duplicates_exact"]["groups"] == file["duplicates_normalised"]["groups"] == []
        assert file["conflicts_exact"] == file["conflicts_normalised"] == [] and file["blank_once_normalised"] == []
    assert [leak["normalised"]["texts"] for leak in report["leaks"]] == [0]
    assert report["labels_absent_from_training"] == {}


def test_planted_duplicates_conflicts_and_leaks_are_found_exactly(tmp_path, capsys, tiny_bert):
    train_rows, val_rows, test_rows = tweets(30, 1), tweets(12, 2), tweets(12, 3)
    train_rows[7] = dict(train_rows[3])                                      # exact duplicate: rows 4, 8
    train_rows[9] = {**train_rows[5], "text": train_rows[5]["text"].upper() + " !"}  # near duplicate: rows 6, 10
    train_rows[11] = {"text": train_rows[0]["text"], "label": "positive" if train_rows[0]["label"] == "negative"
                      else "negative"}                                       # conflict: rows 1, 12
    train_rows[13] = {"text": "...", "label": "negative"}                    # blank once normalised: row 14
    val_rows[2] = dict(train_rows[20])                                       # exact leak: val 3 = train 21
    val_rows[5] = {**train_rows[22], "text": "  " + train_rows[22]["text"].title() + "."}  # near leak: val 6 = train 23
    test_rows[0] = dict(val_rows[8])                                         # a test text in validation
    train = write_csv(tmp_path / "train.csv", train_rows)
    val = write_csv(tmp_path / "val.csv", val_rows)
    test = write_csv(tmp_path / "test.csv", test_rows)
    report, out = run_check(tmp_path, capsys, tiny_bert, train, val, **{"check.extra_filepaths": f"[{test}]"})
    train_report, val_report, test_report = report["files"]
    # a conflict is a duplicate too: the same text, whatever its labels
    assert train_report["duplicates_exact"] == {"extra_rows": 2, "groups": [[1, 12], [4, 8]]}
    assert train_report["duplicates_normalised"] == {"extra_rows": 3, "groups": [[1, 12], [4, 8], [6, 10]]}
    assert train_report["conflicts_exact"] == train_report["conflicts_normalised"] == [[1, 12]]
    assert train_report["blank_once_normalised"] == [14]
    assert val_report["duplicates_normalised"]["groups"] == [] and test_report["conflicts_normalised"] == []
    train_val, train_test, val_test = report["leaks"]
    assert train_val["files"] == ["train", "val"]
    assert train_val["exact"]["rows"] == {"train": [21], "val": [3]} and train_val["exact"]["label_differs"] == 0
    assert train_val["normalised"]["rows"] == {"train": [21, 23], "val": [3, 6]}
    assert train_test["normalised"]["texts"] == 0
    assert val_test["exact"]["rows"] == {"val": [9], "extra1": [1]}
    # the printed lines name them
    assert "train: 2 rows repeat an earlier text (3 once normalised)" in out
    assert "train and val share 1 texts (2 once normalised, 0 of them with a different label)" in out
    assert "val and extra1 share 1 texts" in out


def test_class_counts_imbalance_and_labels_missing_from_training(tmp_path, capsys, tiny_bert):
    train = write_csv(tmp_path / "train.csv", [{"text": f"good w{i}", "label": "positive"} for i in range(6)]
                      + [{"text": f"bad w{i}", "label": "negative"} for i in range(2)])
    val = write_csv(tmp_path / "val.csv", [{"text": "so so", "label": "neutral"}, {"text": "good", "label": "positive"}])
    report, out = run_check(tmp_path, capsys, tiny_bert, train, val,
                            **{"data.labels_list": "[negative, neutral, positive]"})
    assert report["files"][0]["classes"] == {"negative": 2, "neutral": 0, "positive": 6}
    assert report["files"][0]["imbalance_ratio"] is None  # a class with no row: no finite ratio
    assert report["labels_absent_from_training"] == {"val": ["neutral"]}
    assert "val holds labels the training file never does: ['neutral']" in out


def test_regression_files_get_a_summary_of_their_targets(tmp_path, capsys, tiny_bert):
    train = write_csv(tmp_path / "train.csv", [{"text": "good film", "label": 4.5}, {"text": "bad film", "label": 1.0},
                                               {"text": "Good film", "label": 2.5}, {"text": "so so", "label": 3.0}])
    val = write_csv(tmp_path / "val.csv", [{"text": "fine", "label": 3.0}])
    report, _ = run_check(tmp_path, capsys, tiny_bert, train, val, **{"data.labels_list": "[score]",
                                                                      "module.metric": "pcc_and_scc"})
    train_report = report["files"][0]
    assert train_report["targets"] == {"mean": 2.75, "std": pytest.approx(1.25), "min": 1.0, "max": 4.5}
    assert train_report["conflicts_normalised"] == [[1, 3]] and train_report["conflicts_exact"] == []


def test_multilabel_pairs_are_read_as_training_reads_them(tmp_path, capsys, tiny_bert):
    rows = [{"text": "good film", "text_b": "the plot", "label": ["positive"]},
            {"text": "good film", "text_b": "the plot", "label": ["positive", "negative"]},  # conflict
            {"text": "good film", "text_b": "a movie", "label": []},                       # another pair
            {"text": "bad film", "text_b": "the plot", "label": ["negative"]}]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "Good film!", "text_b": "The plot", "label": ["positive"]}])
    report, _ = run_check(tmp_path, capsys, tiny_bert, train, val, **{
        "data.file_format": "jsonl", "data.text_b_col": "text_b", "data.multi_label": "true", "module.metric": "f1_micro"})
    train_report = report["files"][0]
    assert train_report["classes"] == {"negative": 2, "positive": 2}
    assert train_report["duplicates_exact"]["groups"] == [[1, 2]] and train_report["conflicts_exact"] == [[1, 2]]
    leak = report["leaks"][0]
    assert leak["exact"]["texts"] == 0 and leak["normalised"]["rows"] == {"train": [1, 2], "val": [1]}


def test_token_lengths_say_what_truncation_cuts_and_when_windows_would_help(tmp_path, capsys, tiny_bert):
    long_text = " ".join(["good"] * 30)  # 32 tokens with [CLS] and [SEP]
    train = write_csv(tmp_path / "train.csv", [{"text": long_text, "label": "positive"}] +
                      [{"text": f"bad {word}", "label": "negative"} for word in NEUTRAL[:9]])
    val = write_csv(tmp_path / "val.csv", [{"text": "good film", "label": "positive"}])
    report, out = run_check(tmp_path, capsys, tiny_bert, train, val)
    lengths = report["files"][0]["token_lengths"]
    assert lengths["max"] == 32 and lengths["p50"] == 4 and lengths["max_seq_len"] == 16
    assert lengths["truncated_share"] == pytest.approx(0.1)
    # of 30 + 9 * 2 text tokens, truncation at 16 drops 16 of the long text's
    assert lengths["dropped_token_share"] == pytest.approx(16 / 48)
    assert lengths["windows_would_help"] and "train: 10.0% of the texts are longer" in out
    assert not report["files"][1]["token_lengths"]["windows_would_help"]


def test_the_default_report_goes_to_a_new_folder_of_the_log_dir(tmp_path, capsys, tiny_bert):
    train = write_csv(tmp_path / "train.csv", tweets(8, 1))
    args = base_args(tmp_path, tiny_bert, train, "null")
    assert check_data.main(args) == 0 and check_data.main(args) == 0
    reports = sorted((tmp_path / "runs").glob("*-check*/data_check.json"))
    assert len(reports) == 2  # a second check never replaces the first's report
    assert f"report: {reports[0]}" in capsys.readouterr().out


@pytest.mark.parametrize("change, expected", [
    (lambda t: {"data.train_filepath": str(t / "nope.csv")}, "nope.csv: file not found"),
    (lambda t: {"data.label_col": "sentiment"}, "data.label_col 'sentiment' not found"),
    (lambda t: {"check.extra_filepaths": f"[{write_csv(t / 'bad.csv', [{'text': 'x', 'label': 'maybe'}])}]"},
     "bad.csv:2: label 'maybe' is not in data.labels_list"),
    (lambda t: {"check.output": str(t / "train.csv")}, "check.output"),
    (lambda t: {"check.extra_filepaths": "[1]"}, "check.extra_filepaths is [1]; give a list of file paths"),
    (lambda t: {"check.nope": "1"}, "unknown key 'check.nope'"),
    (lambda t: {"model.hf_model": str(t / "no-model")}, "model.hf_model"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, tiny_bert, change, expected):
    train = write_csv(tmp_path / "train.csv", tweets(8, 1))
    val = write_csv(tmp_path / "val.csv", tweets(4, 2))
    args = base_args(tmp_path, tiny_bert, train, val, **change(tmp_path))
    assert check_data.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()


# -- trainer.py's cheap part: the rows it reads ----------------------------------------------------


def test_training_says_one_warning_line_for_leaks_and_a_note_when_the_cache_hid_a_file(tmp_path, capsys, tiny_bert):
    from config import load_config
    rows = tweets(20, 1)
    train = write_csv(tmp_path / "train.csv", rows)
    val = write_csv(tmp_path / "val.csv", [rows[3], {"text": rows[5]["text"].upper() + "!", "label": rows[5]["label"]}]
                    + tweets(4, 2))
    cfg = load_config(base_args(tmp_path, tiny_bert, train, val))
    prepare_run(cfg, single_process(), build=lambda tokenizer: None, tokenizer=make_tokenizer())
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("warning:", "note:"))]
    assert lines == ["warning: 1 of the 6 validation texts are also in the training file (2 once case, whitespace "
                     "and punctuation are ignored), so the validation metric may flatter the model; python "
                     "check_data.py lists them"]
    # both files now come from the token cache: nothing to say; a new validation file beside the
    # cached training file is read alone, and the line says the training file was not compared
    prepare_run(cfg, single_process(), build=lambda tokenizer: None, tokenizer=make_tokenizer())
    assert not [line for line in capsys.readouterr().out.splitlines() if line.startswith(("warning:", "note:"))]
    cfg["data"]["val_filepath"] = write_csv(tmp_path / "val2.csv", tweets(4, 3))
    prepare_run(cfg, single_process(), build=lambda tokenizer: None, tokenizer=make_tokenizer())
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("warning:", "note:"))]
    assert notes == [f"note: {train} came from the token cache unread, so no leak between it and "
                     f"{tmp_path / 'val2.csv'} was looked for; python check_data.py compares every file"]
