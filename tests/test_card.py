"""Model cards (issue 37): every checkpoint folder and export folder gets a README.md that
huggingface_hub.ModelCard parses, whose numbers are the checkpoint's validation metrics and data
counts, written with the checkpoint (in its file list); its loading recipes run as written."""
import contextlib
import csv
import io
import json
import re
from collections import Counter

import pytest
from huggingface_hub import ModelCard

import card
import distill
import export
import trainer
from config import load_config
from conftest import base_args, last_json_line, save_tiny_encoder, sentiment_rows, write_csv


def run_main(main, argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    assert rc == 0, err.getvalue()[-3000:]
    return out.getvalue()


def counts(path):
    with open(path, newline="", encoding="utf-8") as f:
        return Counter(row["label"] for row in csv.DictReader(f))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A single-label run of 2 epochs (8 steps each), checkpointed at step 4 too (not validated there)."""
    tmp = tmp_path_factory.mktemp("card")
    model = save_tiny_encoder(tmp / "bert")
    train = write_csv(tmp / "train.csv", sentiment_rows(128, seed=1))
    val = write_csv(tmp / "val.csv", [{**row, "label": "positive"} if i % 6 == 0 else row
                                      for i, row in enumerate(sentiment_rows(48, seed=2))])
    argv = base_args(tmp, model, train, val, **{"trainer.epochs": 2, "ckpt.save_steps": 4, "ckpt.keep_last": "null"})
    result = last_json_line(run_main(trainer.main, argv))
    return {"tmp": tmp, "model": model, "train": train, "val": val, "argv": argv, "result": result,
            "best": (tmp / "ckpt" / "best").resolve()}


def test_the_best_checkpoints_card_parses_and_reports_its_own_validation(run):
    best = run["best"]
    manifest = json.loads((best / "checkpoint.json").read_text())
    assert "README.md" in manifest["files"]  # written in the checkpoint's folder before its rename
    loaded = ModelCard.load(best / "README.md")
    data = loaded.data
    assert (data.pipeline_tag, data.library_name, data.base_model) == ("text-classification", "transformers", run["model"])
    assert {"text-classification", "single-label", "trainer.py", "temperature-scaling"} <= set(data.tags)
    metrics = manifest["best"]["metrics"]
    assert manifest["best"]["step"] == manifest["step"]
    reported = {result.metric_name: result.metric_value for result in data.eval_results}
    assert reported == {k: v for k, v in metrics.items() if isinstance(v, float) and k != "temperature"}
    assert {result.dataset_name for result in data.eval_results} == {run["val"]}
    text = loaded.text
    for name, row in metrics["per_class"].items():
        assert f"| {name} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} | {row['support']} |" in text
    train, val = counts(run["train"]), counts(run["val"])
    assert f"| training | `{run['train']}` | 128 | {train['negative']} | {train['positive']} |" in text
    assert f"| validation | `{run['val']}` | 48 | {val['negative']} | {val['positive']} |" in text
    assert f"a temperature of {metrics['temperature']:.4g}" in text and f"ECE {metrics['ece']:.4f}" in text
    assert "| module.max_lr | 0.003 |" in text and "| trainer.epochs | 2 |" in text
    assert f"--model.model_path {run['tmp'] / 'ckpt' / best.name}" in text
    assert f"Validated only on the 48 rows of `{run['val']}` (negative {val['negative']}" in text
    assert "Texts are cut at 16 tokens" in text


def test_a_checkpoint_not_validated_at_its_step_says_so_and_has_no_model_index(run):
    folder = run["tmp"] / "ckpt" / "checkpoint-epoch1-step4"
    loaded = ModelCard.load(folder / "README.md")
    assert loaded.data.eval_results is None and loaded.data.pipeline_tag == "text-classification"
    assert "Not validated at this step (its run validated at other steps)" in loaded.text
    assert "Not calibrated" in loaded.text  # no validation had fitted a temperature yet
    assert not (folder / "calibration.json").exists()


def test_the_cards_pipeline_recipe_gives_the_calibrated_probabilities_of_the_predictions_csv(run, capsys):
    best = run["best"]
    text = (best / "README.md").read_text()
    recipe = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    sample = "a great great happy and"
    new = write_csv(run["tmp"] / "one.csv", [{"text": sample}])
    run_main(trainer.main, ["--data.train_filepath", "null", "--data.val_filepath", "null", "--data.predict_filepath", new,
                            "--model.model_path", str(best), "--data.predict_output", str(run["tmp"] / "one-p.csv"),
                            "--trainer.log_dir", str(run["tmp"] / "runs"), "--trainer.device", "cpu"])
    with open(run["tmp"] / "one-p.csv", newline="", encoding="utf-8") as f:
        ours = next(csv.DictReader(f))
    scope = {}
    exec(recipe.replace('"a text to label"', repr(sample)), scope)  # the card's code, as a reader runs it
    theirs = scope["probabilities"]
    assert theirs == pytest.approx({name: float(ours[f"prob_{name}"]) for name in ("negative", "positive")}, abs=1e-5)


def test_an_export_folders_card_names_its_checkpoint_its_data_and_its_check(run, tmp_path):
    folder = tmp_path / "onnx"
    run_main(export.main, ["--model.model_path", str(run["best"]), "--data.val_filepath", run["val"], "--data.text_a_col",
                           "text", "--data.label_col", "label", "--export.int8", "false", "--export.threads", "1",
                           "--export.output_dir", str(folder)])
    loaded = ModelCard.load(folder / "README.md")
    assert loaded.data.library_name == "onnx" and "onnx" in loaded.data.tags
    report = json.loads((folder / "export_report.json").read_text())
    reported = {result.metric_name: result.metric_value for result in loaded.data.eval_results}
    assert reported["acc_and_f1"] == report["torch"]["metric"]  # PyTorch's, calibrated as exported
    assert reported["ece"] == pytest.approx(run["result"]["ece"])  # the same file, the same temperature
    text = loaded.text
    assert f"exported to ONNX by export.py from its checkpoint `{run['best']}`" in text
    train = counts(run["train"])
    assert f"| training | `{run['train']}` | 128 | {train['negative']} | {train['positive']} |" in text  # from checkpoint.json
    assert f"| onnx_fp32 | {report['onnx_fp32']['metric']:.4f} | 100.00% |" in text
    assert f"at the validation of step {run['result']['best_step']}" in text  # how its temperature was chosen
    # its ONNX Runtime recipe, as written, gives the logits that the calibrated softmax divides
    recipe = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    scope = {}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(recipe, scope)
    assert scope["temperature"] == run["result"]["temperature"] and scope["logits"].shape == (1, 2)


def test_a_students_card_says_how_it_was_distilled(run):
    out = run_main(distill.main, base_args(run["tmp"] / "student", run["model"], run["train"], run["val"], **{
        "model.model_path": str(run["best"]), "distill.student_layers": "[0]", "trainer.epochs": 1}))
    assert last_json_line(out)["best_step"] == 8
    loaded = ModelCard.load(run["tmp"] / "student" / "ckpt" / "best" / "README.md")
    assert "distillation" in loaded.data.tags and loaded.data.base_model == run["model"]
    assert f"distilled by distill.py from the teacher `{run['best']}`" in loaded.text
    assert "layers [0] of the teacher's encoder, trained on the losses ['logits', 'labels'] weighted [0.5, 0.5]" in loaded.text


def test_a_multi_label_card_lists_its_thresholds_and_temperatures_and_parses():
    cfg = load_config(["--data.labels_list", "[sport, tech]", "--data.multi_label", "true"])
    per_label = {name: {"precision": 0.5, "recall": 0.75, "f1": 0.6, "support": 4, "threshold": t, "temperature": k,
                        "ece": 0.1, "brier": 0.2, "nll": 0.3} for name, t, k in (("sport", 0.35, 1.5), ("tech", 0.6, 0.8))}
    metrics = {"f1_micro": 0.61, "f1_macro": 0.6, "per_label": per_label, "temperature": [1.5, 0.8], "ece": 0.1,
               "ece_uncalibrated": 0.2, "brier": 0.2, "nll": 0.3}
    facts = {"name": "checkpoint-epoch3-step30", "path": "ckpt/checkpoint-epoch3-step30", "made_by": "trainer.py",
             "step": 30, "epoch": 3, "validation": {"file": "val.csv", "metrics": metrics},
             "data": [{"role": "training", "file": "train.csv", "rows": 40, "counts": {"sport": 12, "tech": 20}},
                      {"role": "validation", "file": "val.csv", "rows": 10, "counts": {"sport": 4, "tech": 0}}],
             "calibration": {"temperature": [1.5, 0.8], "chosen": "fitted on val.csv at the validation of step 30"},
             "thresholds": {"values": {"sport": 0.35, "tech": 0.6}, "chosen": "tuned on val.csv"}}
    text = card.card_text(facts, cfg)
    loaded = ModelCard(text)
    assert {r.metric_name: r.metric_value for r in loaded.data.eval_results} == {
        "f1_micro": 0.61, "f1_macro": 0.6, "ece": 0.1, "ece_uncalibrated": 0.2, "brier": 0.2, "nll": 0.3}
    assert "| sport | 0.5000 | 0.7500 | 0.6000 | 4 | 0.35 | 1.5 |" in text  # threshold and temperature columns
    assert "one temperature per label (1.5, 0.8)" in text and "sport 0.35, tech 0.60" in text
    assert "No validation row has tech: nothing is known of how it does there." in text
    assert "1 / (1 + np.exp(-s[\"score\"] / temperature[s[\"label\"]]))" in text  # the sigmoid recipe


def test_an_export_of_a_folder_we_did_not_write_claims_no_base_model_or_settings():
    cfg = load_config(["--data.labels_list", "[no, yes]"])
    metrics = {"acc": 0.9, "per_class": {n: {"precision": 0.9, "recall": 0.9, "f1": 0.9, "support": 5} for n in ("no", "yes")}}
    facts = {"name": "plain-onnx", "path": "exports/plain-onnx", "made_by": "export.py", "source_made_by": None,
             "step": None, "epoch": None, "validation": {"file": "val.csv", "metrics": metrics},
             "data": [{"role": "validation", "file": "val.csv", "rows": 10, "counts": {"no": 5, "yes": 5}}],
             "calibration": None, "thresholds": None,
             "export": {"source": "/models/plain", "metric": "acc", "checks": {}}}
    text = card.card_text(facts, cfg)
    loaded = ModelCard(text)
    assert loaded.data.base_model is None and loaded.data.library_name == "onnx"
    assert "## Training settings" not in text and "fine-tuned by" not in text
    assert "exported to ONNX by export.py from its checkpoint `/models/plain`." in text
