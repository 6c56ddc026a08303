"""export.py: a checkpoint to ONNX (fp32, dynamic int8), each artifact gated on its agreement with
PyTorch, and prediction through the export folder with ONNX Runtime.

One tiny single-label checkpoint is exported once for the module; the gate tests reuse its
model.onnx (damaged on purpose) instead of tracing again. Multi-label, regression and windowed
sentence pairs each train and export a checkpoint of their own: slow.
"""
import contextlib
import csv
import errno
import io
import json
import random
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from transformers import AutoModelForSequenceClassification

import checkpoint
import evaluation
import export
import files
import processes
import trainer
from config import load_config
from conftest import NEGATIVE, NEUTRAL, POSITIVE, base_args, run_main, save_tiny_encoder, sentiment_rows, write_csv
from data import encode, read_examples, window_stride
from model import ModelError, build_model, load_tokenizer, use_checkpoint_settings

MAIN = processes.Process(0, 0, 1, torch.device("cpu"), True, False)


def export_args(checkpoint, val, **more):
    args = {"model.model_path": checkpoint, "data.val_filepath": val, "data.text_a_col": "text",
            "data.label_col": "label", "trainer.val_batch_size": 8, "export.threads": 1, **more}
    return [item for key, value in args.items() for item in (f"--{key}", str(value))]


def train_checkpoint(tmp, rows_of, **overrides):
    """A tiny checkpoint trained in this process by trainer.main: (checkpoint folder, validation file)."""
    model = save_tiny_encoder(tmp / "bert")
    train = write_csv(tmp / "train.csv", rows_of(128, 1))
    val = write_csv(tmp / "val.csv", rows_of(40, 2))
    run_main(trainer.main, base_args(tmp, model, train, val, **{"trainer.epochs": 1, **overrides}))
    return tmp / "ckpt" / "best", val


def torch_and_onnx_logits(checkpoint, folder, val, artifact="onnx_fp32", **more):
    """Per-document logits of the checkpoint (plain transformers) and of the export folder's
    model, on the validation file read as the export folder says."""
    cfg = load_config(export_args(str(folder), val, **{"data.train_filepath": "null", **more}))
    use_checkpoint_settings(cfg)
    onnx_model, tokenizer = export.load_exported(folder, threads=1, artifact=artifact)
    data = cfg["data"]
    examples = read_examples(val, data, need_labels=True)
    encoded = encode(tokenizer, examples, cfg["module"]["max_seq_len"], stride=window_stride(data))
    torch_model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    return [evaluation.document_logits(evaluation.predict_logits(m, encoded, 8, tokenizer.pad_token_id, MAIN), encoded, cfg)
            for m in (torch_model, onnx_model)]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """A single-label checkpoint and its export folder."""
    tmp = tmp_path_factory.mktemp("export")
    checkpoint, val = train_checkpoint(tmp, lambda n, seed: sentiment_rows(n, seed=seed))
    out, _ = run_main(export.main, export_args(checkpoint, val))
    folder = checkpoint.resolve().parent / f"{checkpoint.resolve().name}-onnx"
    return {"tmp": tmp, "checkpoint": checkpoint, "val": val, "folder": folder, "out": out}


def test_the_export_folder_holds_both_models_what_reading_needs_and_the_report(single):
    folder = single["folder"]
    names = {p.name for p in folder.iterdir()}
    assert {"model.onnx", "model.int8.onnx", "config.json", "tokenizer_config.json", "export.json",
            "export_report.json"} <= names
    assert not list(folder.parent.glob(f".{folder.name}-*.tmp"))  # written under a temporary name, renamed
    manifest = json.loads((folder / "export.json").read_text())
    assert manifest["source"] == str(single["checkpoint"].resolve())
    assert manifest["config"]["module"]["max_seq_len"] == 16
    assert manifest["artifacts"] == {"onnx_fp32": "model.onnx", "onnx_int8": "model.int8.onnx"}
    report = json.loads((folder / "export_report.json").read_text())
    assert report["torch"]["kept"] is None and report["metric_name"] == "acc_and_f1"
    assert report["onnx_fp32"]["identical"] == 1.0 and report["onnx_fp32"]["max_prob_diff"] < 1e-5
    assert report["onnx_fp32"]["metric"] == report["torch"]["metric"]
    for name in ("torch", "onnx_fp32", "onnx_int8"):
        assert set(report[name]) >= {"metric", "identical", "max_prob_diff", "ex_s", "kept"}
        assert report[name]["ex_s"] > 0
    # the printed table: one row per model, the kept files named
    assert "onnx_fp32" in single["out"] and "yes: model.onnx" in single["out"]


def test_the_graph_is_fused_by_onnx_runtimes_optimizer_before_the_gate(single):
    """The TorchScript exporter's graph, fused: one Attention per layer, LayerNorms with their residuals,
    GELU with its bias; int8 quantizes the fused attention whole (QAttention)."""
    report = json.loads((single["folder"] / "export_report.json").read_text())
    assert report["graph"] == {"exporter": "torchscript", "fused": {
        "EmbedLayerNormalization": 1, "Attention": 2, "BiasGelu": 2, "SkipLayerNormalization": 4}}
    assert "graph: torchscript exporter; fused EmbedLayerNormalization x1, Attention x2" in single["out"]
    ops = {node.op_type for node in onnx.load(str(single["folder"] / "model.int8.onnx")).graph.node}
    assert "QAttention" in ops and "Softmax" not in ops


def test_a_graph_the_torchscript_exporter_or_the_optimizer_fails_on_is_kept_as_torch_export_wrote_it(
        single, monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise RuntimeError("cannot trace this model\nlong traceback")
    monkeypatch.setattr(export, "export_torchscript", refuse)
    monkeypatch.setattr(export, "optimize_model", refuse)
    out, _ = run_main(export.main, export_args(single["checkpoint"], single["val"], **{
        "export.output_dir": tmp_path / "served", "export.int8": "false"}))
    report = json.loads((tmp_path / "served" / "export_report.json").read_text())
    assert report["graph"] == {"exporter": "torch.export", "fused": {
        "note": "kept as exported: ONNX Runtime's optimizer failed on it (cannot trace this model)"}}
    assert report["onnx_fp32"]["kept"] and report["onnx_fp32"]["identical"] == 1.0
    assert "graph: torch.export exporter; kept as exported" in out


def test_exported_logits_equal_the_pytorch_logits(single):
    reference, fp32 = torch_and_onnx_logits(single["checkpoint"], single["folder"], single["val"])
    np.testing.assert_allclose(fp32, reference, atol=1e-5)
    _, int8 = torch_and_onnx_logits(single["checkpoint"], single["folder"], single["val"], artifact="onnx_int8")
    assert np.abs(int8 - reference).max() < 0.1  # int8 weights: close, not equal
    assert not np.array_equal(int8, fp32)  # and it is another model


def test_prediction_through_the_export_folder_equals_prediction_through_pytorch(single, tmp_path, monkeypatch):
    """evaluation.predict_file, unchanged, with the ONNX model in place of the PyTorch one."""
    rows = [{"id": f"r{i}", "text": row["text"]} for i, row in enumerate(sentiment_rows(25, seed=7))]
    new = write_csv(tmp_path / "new.csv", rows)
    written = {}
    for kind in ("torch", "onnx"):
        folder = single["folder"] if kind == "onnx" else single["checkpoint"]
        cfg = load_config(export_args(str(folder), "null", **{
            "data.train_filepath": "null", "data.predict_filepath": new,
            "data.predict_output": str(tmp_path / f"{kind}.csv")}))
        use_checkpoint_settings(cfg)
        if kind == "onnx":
            model, tokenizer = export.load_exported(folder, threads=1)
        else:
            model, tokenizer = build_model(cfg["model"], cfg["data"]["labels_list"]), load_tokenizer(cfg["model"])
        with contextlib.redirect_stdout(io.StringIO()):
            monkeypatch.setattr(evaluation, "PREDICT_CHUNK", 10)
            path = evaluation.predict_file(cfg, MAIN, model, tokenizer, None)
        with open(path, newline="", encoding="utf-8") as f:
            written[kind] = list(csv.DictReader(f))
    assert [r["id"] for r in written["onnx"]] == [r["id"] for r in rows]
    assert [r["predicted_label"] for r in written["onnx"]] == [r["predicted_label"] for r in written["torch"]]
    for ours, theirs in zip(written["onnx"], written["torch"]):
        assert float(ours["prob_positive"]) == pytest.approx(float(theirs["prob_positive"]), abs=1e-5)


def test_trainer_py_evaluates_and_predicts_an_export_folder_as_its_checkpoint(single, tmp_path):
    """The command line: --model.model_path an export folder runs ONNX Runtime in place of PyTorch,
    with the same metrics and predictions; training from it is refused in one line."""
    rows = [{"text": row["text"]} for row in sentiment_rows(25, seed=8)]
    new = write_csv(tmp_path / "new.csv", rows)
    results, written = {}, {}
    for kind, folder in (("torch", single["checkpoint"]), ("onnx", single["folder"])):
        args = export_args(str(folder), single["val"], **{
            "data.train_filepath": "null", "data.predict_filepath": new, "trainer.log_dir": str(tmp_path / "runs"),
            "data.predict_output": str(tmp_path / f"{kind}.csv"), "trainer.device": "cpu"})
        out, _ = run_main(trainer.main, args)
        results[kind] = json.loads(out.strip().splitlines()[-1])
        with open(tmp_path / f"{kind}.csv", newline="", encoding="utf-8") as f:
            written[kind] = list(csv.DictReader(f))
    assert results["onnx"]["acc"] == results["torch"]["acc"]
    assert [r["predicted_label"] for r in written["onnx"]] == [r["predicted_label"] for r in written["torch"]]
    train = write_csv(tmp_path / "train.csv", sentiment_rows(8, seed=9))
    _, err = run_main(trainer.main, export_args(str(single["folder"]), single["val"], **{
        "data.train_filepath": train, "trainer.log_dir": str(tmp_path / "runs2")}), expect=2)
    assert "is an export folder (ONNX): it evaluates and predicts only" in err


# -- the gate -----------------------------------------------------------------------------------


def damaged(path, out):
    """The ONNX model at path with its classifier's weights negated: it predicts the other class."""
    model = onnx.load(str(path))
    weights = [w for w in model.graph.initializer if "classifier" in w.name and "weight" in w.name]
    assert weights, [w.name for w in model.graph.initializer]
    for w in weights:
        w.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(w), w.name))
    onnx.save(model, str(out))


@pytest.fixture
def reuse_export(single, monkeypatch):
    """export.py's tracing replaced by a copy of the module's model.onnx (the gate is under test)."""
    def copy(model, example, path, source):
        shutil.copyfile(single["folder"] / "model.onnx", path)
        return "a copy"  # what export_fp32 returns: the exporter that wrote the graph
    monkeypatch.setattr(export, "export_fp32", copy)


def test_a_damaged_int8_model_is_refused_and_the_fp32_one_kept(single, reuse_export, monkeypatch, tmp_path):
    monkeypatch.setattr(export, "quantize_int8", damaged)
    out, _ = run_main(export.main, export_args(single["checkpoint"], single["val"],
                                               **{"export.output_dir": tmp_path / "served"}))
    report = json.loads((tmp_path / "served" / "export_report.json").read_text())
    assert report["onnx_fp32"]["kept"] and not report["onnx_int8"]["kept"]
    assert report["onnx_int8"]["identical"] < 0.5  # its figures are reported
    assert "export.int8_min_identical" in report["onnx_int8"]["refused"] or "metric falls" in report["onnx_int8"]["refused"]
    assert not (tmp_path / "served" / "model.int8.onnx").exists()
    assert json.loads((tmp_path / "served" / "export.json").read_text())["artifacts"] == {"onnx_fp32": "model.onnx"}
    assert "no: " in out
    # the predict path then takes the fp32 model
    model, _ = export.load_exported(tmp_path / "served")
    assert model.path.endswith("model.onnx")


def test_nothing_is_written_and_the_exit_status_is_1_when_no_model_passes(single, monkeypatch, tmp_path):
    monkeypatch.setattr(export, "export_fp32", lambda model, example, path, source:
                        damaged(single["folder"] / "model.onnx", path) or "a damaged copy")
    out, err = run_main(export.main, export_args(single["checkpoint"], single["val"],
                                                 **{"export.output_dir": tmp_path / "served"}), expect=1)
    assert err.splitlines()[-1] == "error: no model passed its gate (the table above says why); nothing was written"
    assert "export.fp32_min_identical" in out
    assert list(tmp_path.iterdir()) == []  # no folder, no temporary one


def test_tolerances_no_model_can_meet_refuse_int8_alone(single, reuse_export, tmp_path):
    """The int8 gate is its own: a metric that may not fall at all, and every prediction the same."""
    run_main(export.main, export_args(single["checkpoint"], single["val"], **{
        "export.output_dir": tmp_path / "served", "export.int8_max_metric_drop": 0, "export.int8_min_identical": 1.0,
        "export.fp32_min_identical": 1.0}))
    report = json.loads((tmp_path / "served" / "export_report.json").read_text())
    assert report["onnx_fp32"]["kept"]
    # int8 passes only if it really matched PyTorch on every row without losing any of the metric
    assert report["onnx_int8"]["kept"] == (report["onnx_int8"]["identical"] == 1.0
                                           and report["onnx_int8"]["metric"] >= report["torch"]["metric"])


# -- bad input: one line each, nothing written ------------------------------------------------------


def test_a_folder_that_is_not_a_checkpoint_is_one_line(single, tmp_path):
    (tmp_path / "empty").mkdir()
    _, err = run_main(export.main, export_args(tmp_path / "empty", single["val"]), expect=2)
    assert err == (f"error: model.model_path {tmp_path / 'empty'}: not a checkpoint folder (no config.json of a "
                   f"classifier and model weights); pass a folder that trainer.py or distill.py wrote, e.g. "
                   f"checkpoints/best\n")
    encoder = save_tiny_encoder(tmp_path / "encoder")  # a pretrained encoder: no classifier head
    _, err = run_main(export.main, export_args(encoder, single["val"]), expect=2)
    assert "not a checkpoint folder" in err and err.count("\n") == 1
    _, err = run_main(export.main, export_args(single["folder"], single["val"]), expect=2)
    assert err.startswith(f"error: model.model_path {single['folder']} is an export folder already")


def test_an_existing_export_folder_is_refused(single):
    before = sorted(p.name for p in single["folder"].iterdir())
    _, err = run_main(export.main, export_args(single["checkpoint"], single["val"]), expect=2)
    assert err == f"error: {single['folder']} exists; remove it, or choose another --export.output_dir\n"
    assert sorted(p.name for p in single["folder"].iterdir()) == before


def test_an_architecture_that_does_not_export_is_one_line_and_leaves_nothing(single, monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise RuntimeError("Cannot export: aten::unsupported_op has no ONNX translation\nlong traceback\nmore")
    monkeypatch.setattr(torch.onnx, "export", refuse)
    _, err = run_main(export.main, export_args(single["checkpoint"], single["val"],
                                               **{"export.output_dir": tmp_path / "served"}), expect=2)
    assert err == (f"error: model.model_path {single['checkpoint'].resolve()}: its model "
                   f"(BertForSequenceClassification) does not export to ONNX: Cannot export: "
                   f"aten::unsupported_op has no ONNX translation\n")
    assert list(tmp_path.iterdir()) == []


def test_a_corrupt_onnx_file_is_one_line_at_load_time(single, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(single["folder"], folder)
    data = (folder / "model.onnx").read_bytes()
    (folder / "model.onnx").write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelError) as error:
        export.load_exported(folder)
    assert str(error.value).startswith(f"{folder / 'model.onnx'}: not a readable ONNX model (")
    assert "\n" not in str(error.value)


def test_gate_keys_are_checked_with_the_config(single):
    _, err = run_main(export.main, export_args(single["checkpoint"], single["val"],
                                               **{"export.int8_min_identical": 97}), expect=2)
    assert err == "error: export.int8_min_identical is 97; it must be in [0, 1]\n"
    _, err = run_main(export.main, export_args(single["checkpoint"], single["val"], **{"export.bogus": 1}), expect=2)
    assert err.startswith("error: --export.bogus: unknown key 'export.bogus'")


# -- every task ---------------------------------------------------------------------------------


LABELS = ["good", "bad", "film"]


def tagged_rows(n, seed):
    """Multi-label: good / bad / film, any of them, by the words of the text."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        tags = [label for label in LABELS if rng.random() < 0.4]
        words = [rng.choice([w for w in NEUTRAL if w not in ("movie", "film")]) for _ in range(rng.randint(1, 5))]
        for tag in tags:
            words.insert(rng.randint(0, len(words)), rng.choice({"good": POSITIVE, "bad": NEGATIVE, "film": ["film"]}[tag]))
        rows.append({"text": " ".join(words), "label": "|".join(tags)})
    return rows


def scored_rows(n, seed):
    """Regression: the share of positive words among the sentiment words."""
    return [{"text": row["text"], "label": sum(w in POSITIVE for w in row["text"].split())
             / max(1, sum(w in POSITIVE + NEGATIVE for w in row["text"].split()))}
            for row in sentiment_rows(n, seed=seed)]


def paired_rows(n, seed):
    """Sentence pairs long enough to need windows: a title, then a long body that carries the label."""
    rng = random.Random(seed)
    return [{"title": rng.choice(NEUTRAL), "text": " ".join(rng.choice(NEUTRAL) for _ in range(rng.randint(10, 30)))
             + " " + row["text"], "label": row["label"]} for row in sentiment_rows(n, seed=seed)]


TASKS = {
    "multi_label": (tagged_rows, {"data.labels_list": "[good, bad, film]", "data.multi_label": "true",
                                  "module.metric": "f1_micro", "module.threshold": "[0.4, 0.5, 0.6]"}),
    "regression": (scored_rows, {"data.labels_list": "[score]", "module.metric": "pcc_and_scc"}),
    "pair_windows": (paired_rows, {"data.text_a_col": "title", "data.text_b_col": "text", "data.long_texts": "windows",
                                   "data.window_stride": 2, "data.window_pool": "max"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("task", list(TASKS))
def test_each_task_exports_with_the_pytorch_logits_and_predictions(task, tmp_path):
    rows_of, overrides = TASKS[task]
    checkpoint, val = train_checkpoint(tmp_path, rows_of, **overrides)
    more = {"data.text_a_col": "title", "data.text_b_col": "text"} if task == "pair_windows" else {}
    run_main(export.main, export_args(checkpoint, val, **{"export.output_dir": tmp_path / "served", **more}))
    report = json.loads((tmp_path / "served" / "export_report.json").read_text())
    assert report["onnx_fp32"]["kept"] and report["onnx_fp32"]["identical"] == 1.0
    # a regression's Spearman correlation may swap near-tied scores: close, not equal
    assert report["onnx_fp32"]["metric"] == pytest.approx(report["torch"]["metric"], abs=1e-3)
    assert report["documents"] == 40  # windows pooled: one prediction per row of the file
    reference, fp32 = torch_and_onnx_logits(checkpoint, tmp_path / "served", val, **more)
    np.testing.assert_allclose(fp32, reference, atol=1e-5)
    manifest = json.loads((tmp_path / "served" / "export.json").read_text())
    if task == "multi_label":  # the checkpoint's thresholds travel with the export
        thresholds = json.loads((tmp_path / "served" / "thresholds.json").read_text())["thresholds"]
        assert thresholds == {"good": 0.4, "bad": 0.5, "film": 0.6}
    if task == "pair_windows":  # the export folder is read in windows, as the checkpoint was trained
        assert manifest["config"]["data"] == {"long_texts": "windows", "window_stride": 2, "window_pool": "max"}
        cfg = load_config(export_args(str(tmp_path / "served"), val, **{"data.train_filepath": "null", **more}))
        assert "data.long_texts windows" in use_checkpoint_settings(cfg)
        assert (cfg["data"]["long_texts"], cfg["data"]["window_stride"], cfg["data"]["window_pool"]) == ("windows", 2, "max")


def test_export_keys_never_block_a_resume():
    cfg = load_config(["--export.int8", "false"])
    older = {section: dict(values) for section, values in cfg.items() if section != "export"}  # before export.py
    digests = {key: [None] for key in checkpoint.DATA_FILE_KEYS}
    assert checkpoint.resume_conflicts(older, digests, cfg, digests) == []
    cfg["module"]["max_lr"] = 1.0  # while a key of training still does
    assert checkpoint.resume_conflicts(older, digests, cfg, digests) == ["module.max_lr 5e-05 -> 1.0"]


# -- a damaged export folder, an edited export.json: one line each (issue 41) --------------------


def copy_of(single, tmp_path):
    folder = tmp_path / "served"
    shutil.copytree(single["folder"], folder)
    return folder


def predict_through(single, folder, tmp_path, expect=2, **more):
    """trainer.py evaluating and predicting through the export folder: (stdout, stderr)."""
    new = write_csv(tmp_path / "new.csv", [{"text": r["text"]} for r in sentiment_rows(6, seed=4)])
    return run_main(trainer.main, export_args(str(folder), single["val"], **{
        "data.train_filepath": "null", "data.predict_filepath": new, "trainer.log_dir": str(tmp_path / "runs"),
        "data.predict_output": str(tmp_path / "predictions.csv"), "trainer.device": "cpu", **more}), expect=expect)


def rewrite_json(path, change):
    content = json.loads(path.read_text())
    change(content)
    path.write_text(json.dumps(content))


@pytest.mark.parametrize("damage, missing", [
    ("no config.json", "config.json"),
    ("no tokenizer", "tokenizer_config.json"),
    ("no model.onnx", "model.onnx"),
    ("multi-label without thresholds", "thresholds.json"),
    ("calibrated without its temperature", "calibration.json"),
])
def test_a_damaged_export_folder_is_refused_in_one_line(single, tmp_path, damage, missing):
    """Complete or refused: never read with the default labels, task or another tokenizer."""
    folder = copy_of(single, tmp_path)
    if damage == "no tokenizer":
        for name in ("tokenizer_config.json", "tokenizer.json", "vocab.txt", "special_tokens_map.json"):
            (folder / name).unlink(missing_ok=True)
    elif damage == "multi-label without thresholds":
        rewrite_json(folder / "config.json", lambda c: c.update(problem_type="multi_label_classification"))
    elif damage == "calibrated without its temperature":
        assert json.loads((folder / "config.json").read_text())["calibration_temperature"] > 0
        (folder / missing).unlink()
    else:
        (folder / missing).unlink()
    _, err = predict_through(single, folder, tmp_path)
    assert err == f"error: {folder}: an incomplete export folder ({missing} missing); export the checkpoint again\n"
    assert not (tmp_path / "predictions.csv").exists()
    with pytest.raises(ModelError, match="an incomplete export folder"):
        export.load_exported(folder)


def export_json_edit(name):
    """An edit of export.json, by name: (change, the part of the error line that names it)."""
    artifacts = {"onnx_fp32": "model.onnx"}
    return {
        "artifact up and out": (lambda m: m.update(artifacts={"onnx_fp32": "../model.onnx"}),
                                "artifacts is {'onnx_fp32': '../model.onnx'}"),
        "artifact absolute": (lambda m: m.update(artifacts={"onnx_fp32": "/tmp/model.onnx"}),
                              "artifacts is {'onnx_fp32': '/tmp/model.onnx'}"),
        "artifacts a list": (lambda m: m.update(artifacts=["model.onnx"]), "artifacts is ['model.onnx']"),
        "no artifacts": (lambda m: m.update(artifacts={}), "artifacts is {}"),
        "an unknown artifact": (lambda m: m.update(artifacts={**artifacts, "onnx_fp16": "model.onnx"}),
                                "artifacts is {'onnx_fp32': 'model.onnx', 'onnx_fp16': 'model.onnx'}"),
        "window_stride text": (lambda m: m["config"]["data"].update(window_stride="abc"),
                               "config: data.window_stride is 'abc'; expected int"),
        "window_pool bogus": (lambda m: m["config"]["data"].update(window_pool="bogus"),
                              "config: data.window_pool is 'bogus'; choose one of mean, max"),
        "long_texts bogus": (lambda m: m["config"]["data"].update(long_texts="bogus"),
                             "config: data.long_texts is 'bogus'; choose one of truncate, windows"),
        "max_seq_len 0": (lambda m: m["config"]["module"].update(max_seq_len=0),
                          "config: module.max_seq_len is 0; it must be positive"),
        "config a string": (lambda m: m.update(config="x"), "config is 'x'"),
        "source a number": (lambda m: m.update(source=5), "source is 5"),
    }[name]


@pytest.mark.parametrize("name", ["artifact up and out", "artifact absolute", "artifacts a list", "no artifacts",
                                  "an unknown artifact", "window_stride text", "window_pool bogus", "long_texts bogus",
                                  "max_seq_len 0", "config a string", "source a number"])
def test_an_edited_export_json_is_refused_in_one_line(single, tmp_path, name):
    folder = copy_of(single, tmp_path)
    change, fragment = export_json_edit(name)
    rewrite_json(folder / "export.json", change)
    _, err = predict_through(single, folder, tmp_path)
    assert err.startswith(f"error: {folder / 'export.json'}: {fragment}") and err.count("\n") == 1, err
    assert err.endswith("export the checkpoint again\n")
    with pytest.raises(ModelError):
        export.load_exported(folder)


def test_an_onnx_model_whose_logits_do_not_fit_the_labels_is_refused(single, tmp_path):
    folder = copy_of(single, tmp_path)
    rewrite_json(folder / "config.json", lambda c: c.update(
        id2label={"0": "negative", "1": "positive", "2": "mixed"}, label2id={"negative": 0, "positive": 1, "mixed": 2}))
    _, err = predict_through(single, folder, tmp_path)
    assert err == (f"error: {folder / 'model.onnx'}: its logits have 2 values per text, but its folder's config.json "
                   f"has 3 labels; export the checkpoint again\n")
    assert not (tmp_path / "predictions.csv").exists()


def test_predictions_over_the_export_folders_own_model_are_refused(single, tmp_path):
    folder = copy_of(single, tmp_path)
    before = (folder / "model.onnx").read_bytes()
    _, err = predict_through(single, folder, tmp_path, **{"data.predict_output": str(folder / "model.onnx")})
    assert err == (f"error: data.predict_output {folder / 'model.onnx'} is a file of model.model_path {folder}, the "
                   f"model it predicts with; write the predictions outside that folder\n")
    assert (folder / "model.onnx").read_bytes() == before


# -- a full disk, two exports at once, where pruning would delete the export ---------------------


def test_a_full_disk_while_quantizing_is_one_line_and_leaves_nothing(single, reuse_export, monkeypatch, tmp_path):
    def full(fp32_path, path):
        path.write_bytes(b"half a model")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(export, "quantize_int8", full)
    _, err = run_main(export.main, export_args(single["checkpoint"], single["val"], **{
        "export.output_dir": tmp_path / "served"}), expect=2)
    assert err == (f"error: cannot write {tmp_path / 'served'}: No space left on device (the disk is full); free space "
                   f"or choose another export.output_dir\n")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_while_tracing_is_not_said_to_be_a_model_that_does_not_export(single, monkeypatch, tmp_path):
    def refuse(*args, **kwargs):  # what torch raises when the protobuf cannot be written
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    monkeypatch.setattr(torch.onnx, "export", refuse)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=4096))
    _, err = run_main(export.main, export_args(single["checkpoint"], single["val"], **{
        "export.output_dir": tmp_path / "served"}), expect=2)
    assert err == (f"error: cannot write {tmp_path / 'served'}: PytorchStreamWriter failed writing file data/0: file "
                   f"write failed (the disk is full); free space or choose another export.output_dir\n")
    assert list(tmp_path.iterdir()) == []


def test_a_live_export_folder_and_a_users_lookalike_are_never_removed(tmp_path):
    """remove_abandoned removes a temporary folder only when its mark proves it an export's and its
    writer is gone: another export's, still being written, and a user's folder of such a name stay."""
    said = []
    user = tmp_path / ".served-0123abcd.tmp"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    starred = tmp_path / ".s-0123abcd.tmp"  # an export to "s*" must not take "s"'s
    with files.temporary_folder(tmp_path, "served", export.EXPORT_WRITING) as live, \
            files.temporary_folder(tmp_path, "s", export.EXPORT_WRITING) as other:
        files.remove_abandoned(tmp_path, "served", export.EXPORT_WRITING, say=said.append)
        assert live.is_dir() and user.is_dir() and said == []
        other.rename(starred)  # its writer ends below without publishing it: a killed export's leftover
    files.remove_abandoned(tmp_path, "s*", export.EXPORT_WRITING, say=said.append)
    assert starred.is_dir() and said == []
    files.remove_abandoned(tmp_path, "s", export.EXPORT_WRITING, say=said.append)
    assert not starred.exists() and len(said) == 1
    assert (user / "notes.txt").read_text() == "mine"


def test_an_export_folder_made_meanwhile_by_another_export_is_one_line_and_kept(single, reuse_export, monkeypatch,
                                                                                 tmp_path):
    target = tmp_path / "served"
    real = export.write_folder

    def and_another_export(folder, *args):  # the other export publishes first
        real(folder, *args)
        target.mkdir()
        (target / "model.onnx").write_text("the other export's")
    monkeypatch.setattr(export, "write_folder", and_another_export)
    _, err = run_main(export.main, export_args(single["checkpoint"], single["val"], **{
        "export.output_dir": target, "export.int8": "false"}), expect=2)
    assert "Traceback" not in err and err.splitlines()[-1] == (
        f"error: {target} was made while this export ran (another export to the same folder?); nothing was written; "
        f"remove it, or choose another --export.output_dir")
    assert (target / "model.onnx").read_text() == "the other export's"
    assert [p.name for p in tmp_path.iterdir()] == ["served"]  # no temporary folder left


@pytest.mark.parametrize("where", ["inside the checkpoint", "named like a save folder's temporary"])
def test_an_export_where_trainer_py_deletes_is_refused(single, tmp_path, where):
    checkpoint = single["checkpoint"].resolve()
    target = checkpoint / "onnx" if where == "inside the checkpoint" else checkpoint.parent / ".tmp-onnx"
    _, err = run_main(export.main, export_args(single["checkpoint"], single["val"], **{
        "export.output_dir": target}), expect=2)
    if where == "inside the checkpoint":
        assert err == (f"error: export.output_dir {target} is inside the checkpoint folder {checkpoint}, which "
                       f"trainer.py deletes when it prunes or replaces it; choose a folder outside it\n")
    else:
        assert err == (f"error: export.output_dir {target}: a name that trainer.py takes for its own in the save "
                       f"folder {checkpoint.parent}; choose another name\n")
    assert not target.exists()


@pytest.mark.slow  # a subprocess that exports four graphs
def test_the_export_benchmark_runs_on_a_tiny_checkpoint(single, tmp_path):
    """bench/export_bench.py end to end, tiny: every runner predicts every row, the fp32 graphs as PyTorch
    does (a near tie of a tiny model's logits may flip one row)."""
    import subprocess
    import sys

    from conftest import ROOT, stderr_tail
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "export_bench.py"), "--model", str(single["checkpoint"]),
                             "--data", single["val"], "--rows", "12", "--rounds", "1", "--batch", "4", "--threads", "1",
                             "--json", str(tmp_path / "bench.json")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, stderr_tail(result.stderr)
    rows = {row["runner"]: row for row in json.loads((tmp_path / "bench.json").read_text())["models"]}
    assert set(rows) == {"plain", "ours", "onnx_fp32", "onnx_int8", "onnx_fp32_unfused", "onnx_int8_unfused"}
    assert all(row["ex_s"] > 0 for row in rows.values()) and rows["ours"]["x_ours"] == 1.0
    assert rows["ours"]["identical"] == 1.0  # the same weights, our path: the same predictions
    assert rows["onnx_fp32"]["identical"] >= 11 / 12 and rows["onnx_fp32_unfused"]["identical"] >= 11 / 12
