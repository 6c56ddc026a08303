"""Model cards: the README.md of every checkpoint folder (trainer.py, distill.py) and export folder
(export.py), with the front matter the Hugging Face Hub reads (huggingface_hub.ModelCard parses it:
pipeline tag, library, base model, tags, and a model-index of the validation metrics) and, below it,
in plain words: the labels and how well it does on each, the data it learned from and was checked
on, its key settings, calibration, thresholds, how to load it, where it came from, and what its
validation does not cover.

    facts = checkpoint_facts(trainer, path)   # trainer.py: what the run knows of the checkpoint it writes
    write_card(folder, facts, cfg)        # README.md, in the checkpoint's temporary folder
    facts, cfg = export_facts(cfg, checkpoint, target, metrics, split, report)   # export.py

Every line comes from what the run records (its config, the validation at the checkpoint's step,
the data's row and class counts, the temperature, the thresholds); a fact that is not known is left
out, never written as a blank to fill. The facts are kept in checkpoint.json too ("card"), so that
an export folder's card can say what its checkpoint learned from.
"""
from pathlib import Path

import numpy as np
import yaml

from checkpoint import read_manifest
from config import TASK_NAMES, label_names, task_of
from metrics import ABSTENTION_KEYS, CALIBRATION_KEYS
from model import CALIBRATION_FILE, TEMPERATURE_KEY, THRESHOLDS_FILE, classifier_of, saved_temperature

CARD = "README.md"
# the Hub's names for our metrics (model-index "type"); ours are kept as each metric's "name"
METRIC_TYPES = {"acc": "accuracy", "f1_macro": "f1", "f1_weighted": "f1", "f1_micro": "f1", "f1_samples": "f1",
                "acc_and_f1": "accuracy_and_f1", "mcc": "matthews_correlation", "subset_acc": "exact_match",
                "pearson": "pearsonr", "spearman": "spearmanr", "ece": "expected_calibration_error",
                "ece_uncalibrated": "expected_calibration_error", "brier": "brier_score", "nll": "log_loss"}
# the settings a reader of the card wants to know first
KEY_SETTINGS = ("module.max_lr", "module.warmup_prop", "module.weight_decay", "module.max_seq_len", "module.class_weights",
                "module.metric", "trainer.epochs", "trainer.train_batch_size", "trainer.seed", "trainer.amp", "data.long_texts")

LORA_SETTINGS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "lora_train_embeddings")

# ---------------------------------------------------------------------------------------------
# the facts


def checkpoint_facts(trainer, path):
    """What a Trainer knows of the checkpoint it is about to write at path, as plain data (JSON)."""
    cfg, step, name = trainer.cfg, trainer.step, Path(path).name
    validated = trainer.validation is not None and trainer.validation[0] == step
    data = [data_facts("training", cfg["data"]["train_filepath"], trainer.train_split, cfg)]
    if trainer.val_split is not None:
        data.append(data_facts("validation", cfg["data"]["val_filepath"], trainer.val_split, cfg))
    thresholds = trainer.thresholds.values
    return {"name": name, "path": str(path),
            "made_by": "trainer.py" if classifier_of(trainer.model) is trainer.model else "distill.py",
            "step": step, "epoch": trainer.epoch_number, "data": data,
            "validation": {"file": cfg["data"]["val_filepath"], "metrics": trainer.validation[1]} if validated else None,
            "calibration": None if trainer.calibration.temperature is None else
            {"temperature": trainer.calibration.temperature, "chosen": trainer.calibration.chosen},
            "thresholds": None if thresholds is None else
            {"values": dict(zip(label_names(cfg), map(float, thresholds))), "chosen": trainer.thresholds.chosen}}


def data_facts(role, path, split, cfg):
    """A data file as the card describes it: its rows (documents), each class's (label's) count
    among the labelled ones, the unlabelled rows (distillation), or a regression's range of targets."""
    names, labels = label_names(cfg), np.asarray(split.encoded.document_labels())
    facts = {"role": role, "file": path, "rows": int(split.encoded.num_documents)}
    if names is None:
        return {**facts, "targets": [float(labels.min()), float(labels.max())] if len(labels) else None}
    if cfg["data"]["multi_label"]:
        labelled = labels[~np.isnan(labels).any(axis=1)]  # unlabelled rows are NaN
        counts = labelled.sum(axis=0)
    else:
        labelled = labels[labels >= 0]  # unlabelled rows are -1
        counts = np.bincount(labelled, minlength=len(names))
    facts["counts"] = {name: int(count) for name, count in zip(names, counts)}
    if len(labelled) < len(labels):
        facts["unlabelled"] = int(len(labels) - len(labelled))
    return facts


def export_facts(cfg, checkpoint, target, metrics, split, report):
    """(facts, the config the card describes) of an export folder: its checkpoint's training (from
    checkpoint.json, whose card facts hold the training data), export.py's check on its validation
    file (metrics: PyTorch's, calibrated as exported), and the artifacts kept or refused."""
    source = read_manifest(checkpoint) or {}
    source_card = source.get("card") if isinstance(source.get("card"), dict) else {}
    training = [d for d in source_card.get("data", []) if isinstance(d, dict) and d.get("role") == "training"]
    names, calibrate = label_names(cfg), cfg["module"]["calibrate"]
    saved, chosen = saved_temperature(checkpoint, names, cfg["data"]["multi_label"], chosen=True) if names else (None, "")
    chosen = chosen if saved == calibrate else "module.calibrate, given to export.py"
    checks = {key: {k: row[k] for k in ("metric", "identical", "max_prob_diff", "kept", "refused") if k in row}
              for key, row in report.items() if isinstance(row, dict) and "identical" in row}
    facts = {"name": Path(target).name, "path": str(target), "made_by": "export.py",
             "step": source.get("step"), "epoch": source.get("epoch"),
             "source_made_by": source_card.get("made_by"),
             "data": training + [data_facts("validation", cfg["data"]["val_filepath"], split, cfg)],
             "validation": {"file": cfg["data"]["val_filepath"], "metrics": metrics},
             "calibration": None if isinstance(calibrate, bool) else {"temperature": calibrate, "chosen": chosen},
             "thresholds": None if metrics.get("per_label") is None else
             {"values": {n: row["threshold"] for n, row in metrics["per_label"].items()},
              "chosen": f"from {Path(checkpoint) / THRESHOLDS_FILE} or module.threshold"},
             "export": {"source": str(checkpoint), "metric": report["metric_name"], "checks": checks}}
    trained = source.get("config") if isinstance(source.get("config"), dict) else None
    return facts, trained or cfg


# ---------------------------------------------------------------------------------------------
# the card


def write_card(folder, facts, cfg):
    """README.md in folder: the model card of facts (checkpoint_facts, export_facts) and the config
    they come from. The caller writes the folder atomically (a checkpoint's, an export's)."""
    (Path(folder) / CARD).write_text(card_text(facts, cfg), encoding="utf-8")


def card_text(facts, cfg):
    """The card: YAML front matter, then sections in plain words."""
    sections = [summary(facts, cfg), validation_section(facts, cfg), data_section(facts),
                settings_section(cfg) if trained_by(facts) is not None else None,
                calibration_section(facts, cfg), thresholds_section(facts), provenance_section(facts, cfg),
                use_section(facts, cfg), limitations_section(facts, cfg)]
    front = yaml.safe_dump(front_matter(facts, cfg), sort_keys=False, allow_unicode=True, width=1000)
    return f"---\n{front}---\n\n" + "\n\n".join(section for section in sections if section) + "\n"


def front_matter(facts, cfg):
    """What the Hub reads: pipeline tag, library, base model, tags, and the validation metrics."""
    task, exported = task_of(cfg["data"]), facts["made_by"] == "export.py"
    tags = ["text-classification", task.replace("_", "-"), "trainer.py"]
    tags += ["distillation"] * (trained_by(facts) == "distill.py")
    tags += ["temperature-scaling"] * (facts["calibration"] is not None) + ["onnx"] * exported
    meta = {"library_name": "onnx" if exported else "transformers", "pipeline_tag": "text-classification"}
    if trained_by(facts) is not None:  # else not known: an export of a folder this project did not write
        meta["base_model"] = base_model(cfg, facts)
    meta["tags"] = tags
    validation = facts["validation"]
    if validation is not None:
        metrics = [{"type": METRIC_TYPES.get(key, key), "value": value, "name": key}
                   for key, value in validation["metrics"].items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "temperature"]
        meta["model-index"] = [{"name": facts["name"], "results": [{
            "task": {"type": "text-classification", "name": TASK_NAMES[task]},
            "dataset": {"name": validation["file"], "type": Path(validation["file"]).name, "split": "validation"},
            "metrics": metrics}]}]
    return meta


def base_model(cfg, facts):
    """The pretrained model it grew from: model.hf_model, or a distilled student's own model."""
    return (trained_by(facts) == "distill.py" and cfg["distill"].get("student_model")) or cfg["model"]["hf_model"]


def trained_by(facts):
    """trainer.py or distill.py, whichever trained the weights (an export's: its checkpoint's); None
    for an export of a folder this project did not write, whose training is not known."""
    return facts.get("source_made_by") if facts["made_by"] == "export.py" else facts["made_by"]


def summary(facts, cfg):
    names, task, model = label_names(cfg), task_of(cfg["data"]), cfg["model"]
    what = (f"over {len(names)} {'labels' if task == 'multi_label' else 'classes'} ({', '.join(names)})"
            if names else f"of one score ({cfg['data']['labels_list'][0]})")
    how = {"distill.py": f", distilled by distill.py from the teacher `{model['model_path'] or model['hf_model']}`",
           "trainer.py": f", fine-tuned by trainer.py from `{model['hf_model']}`"
           + (f", starting from the weights of `{model['model_path']}`" if model["model_path"] else "")}
    where = f"step {facts['step']}, epoch {facts['epoch']} of {cfg['trainer']['epochs']}" if facts["step"] is not None else ""
    text = f"# {facts['name']}\n\nA {TASK_NAMES[task]} model {what}{how.get(trained_by(facts), '')}"
    if facts["made_by"] == "export.py":
        return text + f"; exported to ONNX by export.py from its checkpoint `{facts['export']['source']}`" + \
            (f" ({where})." if where else ".")
    return text + f". This checkpoint is {where}."


def scores_line(metrics):
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)
                     and k not in CALIBRATION_KEYS + ABSTENTION_KEYS)


def validation_section(facts, cfg):
    """The validation metrics at this step, and each class's (label's) precision, recall, F1 and support."""
    validation = facts["validation"]
    if validation is None:
        why = "there is no validation file" if cfg["data"]["val_filepath"] is None else "its run validated at other steps"
        return f"## Validation\n\nNot validated at this step ({why}): nothing here says how well it does."
    metrics, rows = validation["metrics"], next((d["rows"] for d in facts["data"] if d["role"] == "validation"), None)
    text = (f"## Validation\n\nOn `{validation['file']}`" + (f" ({rows} rows)" if rows is not None else "")
            + f": {scores_line(metrics)} (module.metric: {cfg['module']['metric']}).")
    kind = "label" if "per_label" in metrics else "class"
    table = metrics.get(f"per_{kind}")
    if not table:
        return text
    extra = [key for key in ("threshold", "temperature") if all(key in row for row in table.values())]
    lines = [f"| {kind} | precision | recall | F1 | support |" + "".join(f" {key} |" for key in extra),
             "|---|---:|---:|---:|---:|" + "---:|" * len(extra)]
    for name, row in table.items():
        lines.append(f"| {name} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} | {row['support']} |"
                     + "".join(f" {row[key]:.4g} |" for key in extra))
    return text + "\n\n" + "\n".join(lines)


def data_section(facts):
    """The files it learned from and was checked on: rows, and each class's (label's) count."""
    data = facts["data"]
    names = list(data[0].get("counts") or {})
    lines = ["## Data", "", "| role | file | rows |" + "".join(f" {n} |" for n in names),
             "|---|---|---:|" + "---:|" * len(names)]
    for d in data:
        counts = d.get("counts") or {}
        lines.append(f"| {d['role']} | `{d['file']}` | {d['rows']} |" + "".join(f" {counts.get(n, '')} |" for n in names))
    notes = [f"The {d['role']} rows include {d['unlabelled']} without a label, which learned from the teacher only."
             for d in data if d.get("unlabelled")]
    notes += [f"The {d['role']} targets range from {d['targets'][0]:.4g} to {d['targets'][1]:.4g}."
              for d in data if d.get("targets")]
    return "\n".join(lines + (["", " ".join(notes)] if notes else []))


def setting(value):
    """A config value as YAML writes it."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def settings_section(cfg):
    lines = ["## Training settings", "", "| key | value |", "|---|---|"]
    for key in KEY_SETTINGS:
        section, name = key.split(".")
        lines.append(f"| {key} | {setting(cfg[section].get(name))} |")
    if cfg["data"].get("long_texts") == "windows":
        lines += [f"| data.{name} | {setting(cfg['data'].get(name))} |" for name in ("window_stride", "window_pool")]
    if cfg["model"].get("lora_rank"):  # trained as LoRA adapters, merged into these weights
        lines += [f"| model.{name} | {setting(cfg['model'].get(name))} |" for name in LORA_SETTINGS]
    for key, off in (("module.head_lr", None), ("module.layer_lr_decay", 1.0)):
        section, name = key.split(".")
        if cfg[section].get(name, off) != off:
            lines.append(f"| {key} | {setting(cfg[section][name])} |")
    return "\n".join(lines)


def calibration_section(facts, cfg):
    """The temperature, how it was chosen, and what it did to the validation's calibration."""
    if task_of(cfg["data"]) == "regression":
        return None
    calibration = facts["calibration"]
    metrics = (facts["validation"] or {}).get("metrics", {})
    if calibration is None:
        text = ("## Calibration\n\nNot calibrated: its probabilities are the model's own (module.calibrate false, or "
                "no validation had fitted a temperature when it was written).")
    else:
        temperature = calibration["temperature"]
        said = (f"one temperature per label ({', '.join(f'{t:.4g}' for t in temperature)})" if isinstance(temperature, list)
                else f"a temperature of {temperature:.4g}")
        text = (f"## Calibration\n\nIts logits are divided by {said} before the "
                f"{'sigmoid' if cfg['data']['multi_label'] else 'softmax'}: {calibration['chosen']}. It changes no "
                f"prediction, only how sure the probabilities say it is; config.json's `{TEMPERATURE_KEY}` and "
                f"`{CALIBRATION_FILE}` hold it.")
    if "ece" in metrics:
        text += (f" On the validation above: ECE {metrics['ece']:.4f} (uncalibrated {metrics['ece_uncalibrated']:.4f}; "
                 f"15 equal-width bins of the {'label probabilities' if cfg['data']['multi_label'] else 'top probability'}), "
                 f"Brier {metrics['brier']:.4f}, NLL {metrics['nll']:.4f}.")
        if calibration is not None and f"fitted on {facts['validation']['file']} " in calibration["chosen"]:
            text += (" The temperature was fitted on that same file, so its calibrated ECE is optimistic: a held-out "
                     "file gives the unbiased figure.")
    if "coverage" in metrics:
        text += (f" Abstaining below {cfg['data']['abstain_below']} (data.abstain_below), it answered "
                 f"{metrics['coverage']:.1%} of the validation rows, with accuracy {metrics['covered_acc']:.4f} on those.")
    return text


def thresholds_section(facts):
    thresholds = facts["thresholds"]
    if thresholds is None:
        return None
    values = ", ".join(f"{name} {t:.2f}" for name, t in thresholds["values"].items())
    return (f"## Thresholds\n\nA label is predicted when its probability reaches its threshold ({thresholds['chosen']}; "
            f"`{THRESHOLDS_FILE}`): {values}.")


def provenance_section(facts, cfg):
    """How a student was distilled, or how the folder was exported and checked."""
    if facts["made_by"] == "export.py":
        export = facts["export"]
        lines = [f"## Export\n\nExported by export.py from `{export['source']}`; each model was checked against "
                 f"PyTorch on `{facts['validation']['file']}` ({export['metric']}, share of identical predictions, "
                 f"largest difference of a calibrated probability) and kept only if it passed its gate (export.*):",
                 "", f"| model | {export['metric']} | identical | max prob diff | kept |", "|---|---:|---:|---:|---|"]
        for name, row in export["checks"].items():
            kept = "reference" if row["kept"] is None else "yes" if row["kept"] else f"no: {row.get('refused', '')}"
            lines.append(f"| {name} | {row['metric']:.4f} | {row['identical']:.2%} | {row['max_prob_diff']:.2e} | {kept} |")
        return "\n".join(lines)
    if trained_by(facts) != "distill.py":
        return None
    d = cfg["distill"]
    student = (f"layers {d['student_layers']} of the teacher's encoder" if d.get("student_layers") else
               f"`{d['student_model']}`" if d.get("student_model") else
               f"the teacher's architecture with {d.get('student_config')}")
    return (f"## Distillation\n\nA student distilled by distill.py from the teacher `{cfg['model']['model_path']}`: "
            f"{student}, trained on the losses {d['loss_types']} weighted {d['loss_weights']} (distillation "
            f"temperature {d['temperature']}, unrelated to calibration).")


def use_section(facts, cfg):
    """How to load it: trainer.py (which applies what the folder holds), and plain transformers or ONNX Runtime."""
    path, task = facts["path"], task_of(cfg["data"])
    text = ("## Use\n\nWith trainer.py, which applies the folder's temperature, thresholds and max_seq_len "
            "(`--data.abstain_below 0.6` leaves the unsure rows unlabelled):\n\n"
            f"```\npython trainer.py --data.train_filepath null --data.val_filepath null "
            f"--data.predict_filepath new.csv --model.model_path {path}\n```\n\n")
    if facts["made_by"] == "export.py":
        return text + "With ONNX Runtime (`model.onnx` gives the logits; divide them by the temperature, as below):\n\n" + \
            "```python\n" + ONNX_RECIPE.format(path=path) + "```"
    if task == "regression":
        return text + "With transformers, the score is the logit:\n\n```python\n" + \
            PIPELINE.format(path=path) + 'print(classify(["a text to score"]))\n```'
    if facts["calibration"] is None:
        return text + "With transformers (the model's own probabilities):\n\n```python\n" + \
            PIPELINE.format(path=path).replace(', function_to_apply="none"', "") + 'print(classify(["a text to label"]))\n```'
    recipe = MULTI_LABEL_RECIPE if task == "multi_label" else SINGLE_LABEL_RECIPE
    return text + ("With transformers: `pipeline()` applies the model's own softmax or sigmoid; for the calibrated "
                   f"probabilities, take the logits and divide them by config.json's `{TEMPERATURE_KEY}`:\n\n"
                   "```python\n" + PIPELINE.format(path=path) + recipe + "```")


PIPELINE = """import numpy as np
from transformers import pipeline

classify = pipeline("text-classification", model="{path}", top_k=None, truncation=True, function_to_apply="none")
"""
SINGLE_LABEL_RECIPE = """scores = classify(["a text to label"])[0]  # one {"label", "score"} per class, the score a logit
logits = np.array([s["score"] for s in scores]) / classify.model.config.calibration_temperature
probabilities = dict(zip([s["label"] for s in scores], np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()))
print(probabilities)
"""
MULTI_LABEL_RECIPE = """config = classify.model.config
temperature = dict(zip([config.id2label[i] for i in range(config.num_labels)], config.calibration_temperature))
scores = classify(["a text to label"])[0]  # one {"label", "score"} per label, the score a logit
probabilities = {s["label"]: 1 / (1 + np.exp(-s["score"] / temperature[s["label"]])) for s in scores}
print(probabilities)  # a label is predicted at or above its threshold in thresholds.json
"""
ONNX_RECIPE = """import json
import numpy as np
import onnxruntime
from transformers import AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{path}")
session = onnxruntime.InferenceSession("{path}/model.onnx")
inputs = tokenizer(["a text to label"], truncation=True, return_tensors="np")
logits, = session.run(["logits"], {{i.name: inputs[i.name].astype(np.int64) for i in session.get_inputs()}})
temperature = json.load(open("{path}/config.json")).get("calibration_temperature", 1.0)
print(logits / np.asarray(temperature))  # then a softmax (a sigmoid per label for multi-label)
"""


def limitations_section(facts, cfg):
    """What the validation covers and what it does not."""
    validation = facts["validation"]
    if validation is None:
        return "## Limitations\n\nNot validated at this step: nothing is known of how well it does beyond its training data."
    val = next((d for d in facts["data"] if d["role"] == "validation"), {"rows": None, "counts": None})
    counts = val.get("counts") or {}
    classes = f" ({', '.join(f'{n} {c}' for n, c in counts.items())})" if counts else ""
    text = (f"## Limitations\n\nValidated only on the {val['rows']} rows of `{validation['file']}`{classes}: its figures "
            f"hold for texts like those, and say nothing of texts from other sources, topics, languages or times.")
    if cfg["data"].get("long_texts") == "windows":
        text += (f" Long texts are read in windows of {cfg['module']['max_seq_len']} tokens, pooled by their "
                 f"{cfg['data']['window_pool']}.")
    else:
        text += f" Texts are cut at {cfg['module']['max_seq_len']} tokens: what follows is not read."
    missing = [name for name, count in counts.items() if count == 0]
    if missing:
        text += f" No validation row has {', '.join(missing)}: nothing is known of how it does there."
    table = validation["metrics"].get("per_label") or validation["metrics"].get("per_class")
    if table and len({row["f1"] for row in table.values()}) > 1:
        name, row = min(table.items(), key=lambda item: item[1]["f1"])
        kind = "label" if "per_label" in validation["metrics"] else "class"
        text += f" Its weakest {kind} on validation is {name} (F1 {row['f1']:.4f})."
    return text
