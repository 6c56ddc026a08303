"""evaluation.py: streaming prediction (predict_file), chunk by chunk the same CSV as the whole file at once."""
import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import config
import evaluation
import export
import processes
import trainer
from config import load_config
from conftest import base_args, sentiment_rows, write_csv
from data import DataError, encode, read_examples
from model import build_model, load_tokenizer

MAIN = processes.Process(0, 0, 1, torch.device("cpu"), True, False)


@pytest.fixture
def job(tmp_path, tiny_bert):
    rows = [{"id": f"r{i}", "text": row["text"]} for i, row in enumerate(sentiment_rows(30, seed=5))]
    path = write_csv(tmp_path / "new.csv", rows)
    train = write_csv(tmp_path / "train.csv", sentiment_rows(4))
    cfg = load_config(base_args(tmp_path, tiny_bert, train, "null", **{"data.predict_filepath": path}))
    torch.manual_seed(0)
    model = build_model(cfg["model"], cfg["data"]["labels_list"]).eval()
    return cfg, model, load_tokenizer(cfg["model"]), rows


def whole_file_csv(cfg, model, tokenizer, out):
    """What prediction wrote before it streamed: every row read, tokenized and run at once."""
    data, names = cfg["data"], config.label_names(cfg)
    examples = read_examples(data["predict_filepath"], data, need_labels=False, keep_rows=True)
    logits = evaluation.predict_logits(model, encode(tokenizer, examples, cfg["module"]["max_seq_len"]),
                                    cfg["trainer"]["val_batch_size"], tokenizer.pad_token_id, MAIN)
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(examples.columns + evaluation.prediction_header(names))
        for row, cells in zip(examples.rows, evaluation.prediction_cells(logits, names)):
            writer.writerow([row[c] for c in examples.columns] + cells)
    return out


@pytest.fixture(autouse=True)
def chunks_of_7(monkeypatch):
    """Prediction reads, runs and writes 7 rows at a time here: several chunks of a small file."""
    monkeypatch.setattr(evaluation, "PREDICT_CHUNK", 7)


def test_chunks_write_the_same_csv_as_the_whole_file(job, tmp_path):
    cfg, model, tokenizer, rows = job
    # batches of one: every example sees the same arithmetic however the file is cut
    cfg["trainer"]["val_batch_size"] = 1
    reference = whole_file_csv(cfg, model, tokenizer, tmp_path / "reference.csv")
    cfg["data"]["predict_output"] = str(tmp_path / "streamed.csv")
    path = evaluation.predict_file(cfg, MAIN, model, tokenizer, None)  # 5 chunks, the last short
    assert path == str(tmp_path / "streamed.csv")
    assert (tmp_path / "streamed.csv").read_bytes() == reference.read_bytes()
    with open(path, newline="", encoding="utf-8") as f:
        assert [r["id"] for r in csv.DictReader(f)] == [r["id"] for r in rows]


def test_chunks_of_length_sorted_batches_give_the_same_predictions(job, tmp_path):
    cfg, model, tokenizer, _ = job
    cfg["trainer"]["val_batch_size"] = 4  # other batches than the whole file's: padding differs
    reference = list(csv.DictReader(open(whole_file_csv(cfg, model, tokenizer, tmp_path / "reference.csv"))))
    cfg["data"]["predict_output"] = str(tmp_path / "streamed.csv")
    streamed = list(csv.DictReader(open(evaluation.predict_file(cfg, MAIN, model, tokenizer, None))))
    assert [r["id"] for r in streamed] == [r["id"] for r in reference]
    assert [r["predicted_label"] for r in streamed] == [r["predicted_label"] for r in reference]
    np.testing.assert_allclose([float(r["prob_positive"]) for r in streamed],
                               [float(r["prob_positive"]) for r in reference], atol=2e-6)


def test_a_bad_row_in_a_later_chunk_leaves_no_output(job, tmp_path):
    cfg, model, tokenizer, rows = job
    path = write_csv(tmp_path / "bad.csv", rows[:20] + [{"id": "x", "text": ""}] + rows[20:])
    cfg["data"].update(predict_filepath=path, predict_output=str(tmp_path / "out" / "p.csv"))
    (tmp_path / "out").mkdir()
    with pytest.raises(DataError, match=r"bad\.csv:22: empty text"):
        evaluation.predict_file(cfg, MAIN, model, tokenizer, None)
    assert list((tmp_path / "out").iterdir()) == []  # neither the file nor its temporary


def test_a_file_of_several_chunks_shows_one_bar_over_all_its_rows(job, tmp_path, capsys, monkeypatch):
    cfg, model, tokenizer, rows = job
    cfg["data"]["predict_output"] = str(tmp_path / "p.csv")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # tqdm's bars: on a terminal
    evaluation.predict_file(cfg, MAIN, model, tokenizer, None, total_rows=len(rows))
    err = capsys.readouterr().err
    assert f"predict {cfg['data']['predict_filepath']}:" in err and f"/{len(rows)} " in err  # 30 rows, 5 chunks
    monkeypatch.setattr(evaluation, "PREDICT_CHUNK", 50)
    evaluation.predict_file(cfg, MAIN, model, tokenizer, None, total_rows=len(rows))
    assert f"predict {cfg['data']['predict_filepath']}:" not in capsys.readouterr().err  # one chunk: its own bar only


def test_an_export_folder_says_which_onnx_model_ran_records_it_and_model_artifact_picks_int8(tmp_path, tiny_bert, capsys):
    train = write_csv(tmp_path / "train.csv", sentiment_rows(64, seed=1))
    val = write_csv(tmp_path / "val.csv", sentiment_rows(24, seed=2))
    assert trainer.main(base_args(tmp_path, tiny_bert, train, val, **{"trainer.epochs": 1})) == 0
    checkpoint = tmp_path / "ckpt" / "best"
    # both models kept, whatever int8 costs a tiny random model
    assert export.main(["--model.model_path", str(checkpoint), "--data.val_filepath", val, "--data.text_a_col", "text",
                        "--data.label_col", "label", "--export.threads", "1", "--export.output_dir", str(tmp_path / "onnx"),
                        "--export.int8_max_metric_drop", "1", "--export.int8_min_identical", "0"]) == 0
    evaluate = ["--data.train_filepath", "null", "--data.val_filepath", val, "--data.label_col", "label",
                "--model.model_path", str(tmp_path / "onnx"),
                "--trainer.log_dir", str(tmp_path / "runs"), "--trainer.device", "cpu", "--trainer.num_threads", "1"]
    for artifact, file in (("auto", "model.onnx"), ("onnx_int8", "model.int8.onnx")):
        capsys.readouterr()
        assert trainer.main(evaluate + ["--model.artifact", artifact]) == 0
        out = capsys.readouterr().out
        assert f"model: {tmp_path / 'onnx' / file}, run by ONNX Runtime on the CPU (model.artifact {artifact})" in out
        result = json.loads(out.splitlines()[-1])
        record = json.loads((Path(result["run_dir"]) / "run.json").read_text())
        assert result["onnx_model"] == str(tmp_path / "onnx" / file) and record["onnx_model"] == f"../../onnx/{file}"
    # a checkpoint has no ONNX model to pick; and the key's earlier name says its new one
    for more, message in ((["--model.model_path", str(checkpoint), "--model.artifact", "onnx_int8"],
                           f"error: model.artifact onnx_int8 picks a model of an export folder (export.py), and "
                           f"model.model_path {checkpoint} is not one; leave it out"),
                          (["--serve.artifact", "onnx_int8"], "error: --serve.artifact: serve.artifact is now model.artifact")):
        assert trainer.main(evaluate + more) == 2
        assert capsys.readouterr().err.startswith(message)
