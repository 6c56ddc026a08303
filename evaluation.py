"""Evaluation and prediction: a model's logits over a split, its metrics, and the predictions CSV.

    logits = predict_logits(model, split.encoded, batch_size, pad_token_id, proc)   # rank 0: every row
    metrics = split_metrics(logits, split, cfg, "at step 100")                     # windows pooled first
    probs = probabilities(logits, multi_label, temperature)                        # the one place
    path = predict_file(cfg, proc, model, tokenizer, run_dir, decisions=...)       # streamed, in order
    metrics, run_dir = evaluate_only(cfg, proc, model, tokenizer, val)             # a -eval run folder
    result = evaluate_and_predict(cfg, proc)            # a run without training: evaluate, predict

Every rank evaluates its shard of the examples (each on exactly one rank) and the main process
gathers them, so the metrics are those of one process. A long document's windows are pooled into
one prediction (data.window_pool); multi-label decisions are per-label thresholds (module.threshold,
fixed or tuned on the validation file), saved with each checkpoint.

Probabilities are calibrated (module.calibrate, temperature scaling): training fits a temperature on
the validation logits at each validation (fit_temperature), keeps it with each checkpoint and applies
it from then on; evaluation and prediction apply the checkpoint's. probabilities() is the one place
where logits become probabilities: the metrics', the predictions CSV's, export's check's. With
data.abstain_below, a prediction less sure than that is abstained (decision_confidence).
"""
import csv
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from checkpoint import read_manifest
from config import label_names
from data import collate, eval_batches, example_chunks
from files import atomic_output, csv_cells, sweep_outputs, write_json, writing_to
from metrics import (
    best_thresholds,
    calibration_metrics,
    compute_metrics,
    format_report,
    multilabel_calibration_metrics,
    multilabel_metrics,
    selective_accuracy,
)
from model import (
    build_classifier,
    check_artifact,
    is_export_dir,
    save_temperature,
    save_thresholds,
    saved_temperature,
    saved_thresholds,
    use_checkpoint_settings,
)
from processes import autocast, on_main
from progress import progress_bar
from runlog import RunLog, new_run_dir
from splits import first_rows, prepare_run, tokenize

# rows of a predict file read, tokenized, run and written at a time: what prediction holds
PREDICT_CHUNK = 10_000
# the temperatures fit_temperature searches: a validation set the model gets all right would drive the
# temperature to 0 (ever surer), one it gets all wrong to infinity
TEMPERATURE_RANGE = (0.05, 20.0)


def fixed_thresholds(cfg):
    """Multi-label: module.threshold as one threshold per label; None for tune (or another task)."""
    threshold, names = cfg["module"]["threshold"], label_names(cfg)
    if not cfg["data"]["multi_label"] or threshold == "tune":
        return None
    return np.asarray(threshold if isinstance(threshold, list) else [threshold] * len(names), dtype=np.float64)


def thresholds_of(metrics):
    """The per-label thresholds that multi-label metrics were computed with."""
    return np.array([row["threshold"] for row in metrics["per_label"].values()])


class Thresholds:
    """A training run's multi-label decisions: module.threshold's, or those tuned at the latest
    validation; saved with each checkpoint. values is None for other tasks (and for tune before
    the first validation)."""

    def __init__(self, cfg):
        self.cfg, self.multi_label = cfg, cfg["data"]["multi_label"]
        self.values, self.chosen = fixed_thresholds(cfg), "module.threshold"

    def validated(self, metrics, step):
        """The thresholds this validation decided with, and how they were chosen."""
        if not self.multi_label:
            return
        self.values = thresholds_of(metrics)
        if self.cfg["module"]["threshold"] == "tune":
            self.chosen = (f"tuned on {self.cfg['data']['val_filepath']} (each label's F1-best) "
                           f"at the validation of step {step}")

    def of_best(self, metrics):
        if self.multi_label:  # predictions after training decide as the best model did
            self.values = thresholds_of(metrics)

    def resumed(self, path):
        """With tune: those of the checkpoint's latest validation, and how they were chosen."""
        if self.multi_label and self.cfg["module"]["threshold"] == "tune":
            self.values, self.chosen = saved_thresholds(path, label_names(self.cfg), chosen=True)

    def write(self, folder):
        """thresholds.json of a multi-label checkpoint: the decisions that go with its weights."""
        if not self.multi_label:
            return
        names, values, chosen = label_names(self.cfg), self.values, self.chosen
        if values is None:  # tune, before the first validation: the usual 0.5 for now
            values, chosen = [0.5] * len(names), "0.5, not yet tuned (no validation yet)"
        save_thresholds(folder, names, values, chosen)


class Calibration:
    """A training run's temperature (module.calibrate): true fits one at each validation (split_metrics),
    written with each checkpoint; the best checkpoint's is applied to the predictions after training.
    None until the first validation (a checkpoint written before has none: evaluated, it is uncalibrated)."""

    def __init__(self, cfg, say):
        self.cfg, self.names, self.say, self.temperature, self.chosen = cfg, label_names(cfg), say, None, ""
        self.bound_said = False  # a temperature at the end of TEMPERATURE_RANGE is said once a run
        if self.names is None and cfg["module"]["calibrate"] is True:
            say("note: module.calibrate: a regression's scores are no probabilities; nothing is calibrated")
        elif not isinstance(cfg["module"]["calibrate"], bool):
            self.temperature, self.chosen = temperature_of(cfg), "module.calibrate"

    def validated(self, metrics, step):
        """The temperature this validation fitted, and how."""
        if self.cfg["module"]["calibrate"] is True and "temperature" in metrics:
            self.temperature = metrics["temperature"]
            self.chosen = f"fitted on {self.cfg['data']['val_filepath']} at the validation of step {step} (the NLL-best)"
            bounds = [t for t in np.atleast_1d(self.temperature) if not TEMPERATURE_RANGE[0] < t < TEMPERATURE_RANGE[1]]
            if bounds and not self.bound_said:
                self.bound_said = True
                self.say(f"note: the fitted temperature reached the end of its range {TEMPERATURE_RANGE} at step {step}: "
                         f"{self.cfg['data']['val_filepath']} is too easy (every prediction right: {TEMPERATURE_RANGE[0]}) or "
                         f"too hard (no better than chance: {TEMPERATURE_RANGE[1]}) to fit one; a larger validation file "
                         f"gives a temperature that carries over to new texts")

    def of_best(self, metrics):
        if self.names is not None:  # predictions after training: the best model's; an older one's is 1.0
            self.temperature = metrics.get("temperature", 1.0)

    def resumed(self, path):
        """With true: that of the checkpoint's latest validation (None for one written before calibration)."""
        if self.names is not None and self.cfg["module"]["calibrate"] is True:
            self.temperature, self.chosen = saved_temperature(path, self.names, self.cfg["data"]["multi_label"], chosen=True)
            if self.temperature is None:
                self.say(f"note: {path} holds no temperature (written before calibration, or before its run's first "
                         f"validation): its probabilities are uncalibrated (1.0) until the next validation fits one")

    def write(self, folder):
        """calibration.json and config.json's calibration_temperature of a checkpoint (none before a fit)."""
        if self.names is not None:
            save_temperature(folder, self.names, self.temperature, self.chosen)


def probabilities(logits, multi_label, temperature=1.0):
    """The one place where logits become probabilities (float64): a sigmoid per label (multi-label)
    or a softmax over the classes, of logits / temperature (module.calibrate: one number, or a list
    with one per label). Dividing by a positive number changes no argmax and no label's ranking of
    texts: only how sure the probabilities are."""
    scaled = np.asarray(logits, dtype=np.float64) / np.asarray(temperature, dtype=np.float64)
    if multi_label:
        return np.exp(-np.logaddexp(0, -scaled))  # 1 / (1 + e^-z), without overflow
    shifted = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def fit_temperature(logits, labels, multi_label=False):
    """Temperature scaling (Guo et al. 2017): the temperature that minimises the negative log-likelihood
    of the labels under probabilities(logits, multi_label, temperature), within TEMPERATURE_RANGE;
    multi-label: one per label (a list), each label a two-class softmax of logits 0 and z.

    The NLL is convex in 1 / temperature, so its slope there only grows: a bisection on the sign of
    the slope (the mean over examples of the expected logit minus the true one) finds the minimum.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if multi_label:
        return [fit_temperature(np.stack([np.zeros(len(logits)), logits[:, i]], axis=1), np.asarray(labels)[:, i])
                for i in range(logits.shape[1])]
    labels = np.asarray(labels).astype(np.int64)
    if not len(labels):
        return 1.0
    true = logits[np.arange(len(labels)), labels]

    def slope(inverse):  # d NLL / d (1 / temperature)
        return ((probabilities(logits, False, 1 / inverse) * logits).sum(axis=1) - true).mean()
    low, high = -np.log(TEMPERATURE_RANGE[1]), -np.log(TEMPERATURE_RANGE[0])  # log(1 / temperature)
    for _ in range(50):  # the interval shrinks 2^50-fold: far below any digit a probability shows
        middle = (low + high) / 2
        low, high = (low, middle) if slope(np.exp(middle)) > 0 else (middle, high)
    return float(f"{np.exp(-(low + high) / 2):.6g}")  # 6 digits: more would only be the bisection's noise


def temperature_of(cfg):
    """The temperature module.calibrate holds: a number or a list (one per label) given, or a
    checkpoint's (model.use_checkpoint_settings puts it there); 1.0 for false, and for true before
    a fit (split_metrics fits on the validation logits of a training run)."""
    value = cfg["module"]["calibrate"]
    return 1.0 if isinstance(value, bool) else [float(t) for t in value] if isinstance(value, list) else float(value)


def decision_confidence(probs, thresholds=None):
    """How sure each row's prediction is, to abstain below data.abstain_below: its top class's
    probability; multi-label (thresholds given): the least probable of its label decisions (p for a
    label it predicts, 1 - p for one it does not)."""
    if thresholds is None:
        return probs.max(axis=1)
    return np.where(probs >= thresholds, probs, 1 - probs).min(axis=1)


@torch.inference_mode()
def predict_logits(model, encoded, batch_size, pad_token_id, proc, desc="evaluate", batches=None):
    """Float32 logits of every example in input order, on the main process (None on the others);
    batches sorted by length, sharded by rank, or the index arrays `batches` if given (serve.py's).

    Rank 0 shows a progress bar named desc, with the device, for it may take minutes.
    """
    was_training = model.training
    model.eval()
    indices, outputs = [], []
    batches = eval_batches(encoded.lengths, batch_size, proc.rank, proc.world_size) if batches is None else batches
    for batch_indices in progress_bar(batches, desc=f"{desc} on {proc.device}", unit="batch", leave=False,
                                      disable=not proc.is_main, dynamic_ncols=True):
        batch = {k: v.to(proc.device, non_blocking=True)
                 for k, v in collate(encoded, batch_indices, pad_token_id).items() if k != "labels"}
        with autocast(proc):
            outputs.append(model(**batch).logits.float())  # kept on the device: one copy at the end
        indices.append(batch_indices)
    model.train(was_training)
    shards = [(np.concatenate(indices), torch.cat(outputs).cpu().numpy())] if outputs else []
    if proc.ddp:  # every example was on exactly one rank: gather them on the main one, no duplicates
        gathered = [None] * proc.world_size if proc.is_main else None
        dist.gather_object(shards, gathered, dst=0, group=proc.cpu_group)
        if not proc.is_main:
            return None
        shards = [shard for rank_shards in gathered for shard in rank_shards]
    num_outputs = shards[0][1].shape[1] if shards else 1
    logits = np.zeros((len(encoded), num_outputs), dtype=np.float32)
    for shard_indices, values in shards:
        logits[shard_indices] = values
    return logits


def pool_windows(logits, documents, num_documents, how="mean"):
    """Per-document logits from per-window ones (data.long_texts windows): documents[i] is the
    document of window i; a document's logits are the mean or the max of its windows'."""
    pooled = np.zeros((num_documents, logits.shape[1]), dtype=np.float32)
    if how == "max":
        pooled[:] = -np.inf
        np.maximum.at(pooled, documents, logits)
    else:
        np.add.at(pooled, documents, logits)
        pooled /= np.bincount(documents, minlength=num_documents)[:, None]
    return pooled


def document_logits(logits, encoded, cfg):
    """One row of logits per document: its windows' pooled by data.window_pool (windows only)."""
    if encoded.documents is None:
        return logits
    return pool_windows(logits, encoded.documents, encoded.num_documents, cfg["data"]["window_pool"])


def logits_to_predictions(logits, names):
    return logits[:, 0] if names is None else logits.argmax(axis=1)


def split_metrics(logits, split, cfg, where):
    """Metrics of a labelled split's logits (windows: pooled per document, so metrics count
    documents), and a warning line if the model predicts one class. Classification: with the
    temperature fitted on these logits (module.calibrate true: a training run's validation) or
    the one module.calibrate holds, and the calibration and abstention they give (calibration_report)."""
    names, labels = label_names(cfg), split.encoded.document_labels()
    logits = document_logits(logits, split.encoded, cfg)
    multi = cfg["data"]["multi_label"]
    if names is None:
        return compute_metrics(logits_to_predictions(logits, names), labels, names)
    temperature = fit_temperature(logits, labels, multi) if cfg["module"]["calibrate"] is True else temperature_of(cfg)
    if multi:  # thresholds are tuned on the calibrated probabilities
        metrics = multilabel_split_metrics(logits, labels, names, fixed_thresholds(cfg), temperature)
    else:
        predictions = logits_to_predictions(logits, names)
        collapse = one_class_warning(predictions, names)
        if collapse:
            tqdm.write(f"warning: {where}, {collapse}", file=sys.stdout)  # the train bar stays intact
        metrics = compute_metrics(predictions, labels, names)
    return calibration_report(metrics, logits, labels, temperature, cfg)


def multilabel_split_metrics(logits, labels, names, thresholds=None, temperature=1.0):
    """Multi-label metrics at the given per-label thresholds, or (None) at each label's F1-best
    threshold on these very examples (module.threshold tune); the thresholds go in per_label."""
    probs = probabilities(logits, True, temperature)
    if thresholds is None:
        thresholds = best_thresholds(probs, labels)
    metrics = multilabel_metrics(probs >= thresholds, labels, names)
    for row, threshold in zip(metrics["per_label"].values(), thresholds):
        row["threshold"] = float(threshold)
    return metrics


def calibration_report(metrics, logits, labels, temperature, cfg):
    """metrics with temperature, ece (of the calibrated probabilities), ece_uncalibrated, brier and
    nll (multi-label: means over the labels, each label's in per_label) and, with data.abstain_below,
    coverage and covered_acc: the accuracy (multi-label: exact-match) of the rows not abstained."""
    multi, names = cfg["data"]["multi_label"], label_names(cfg)
    probs, raw = probabilities(logits, multi, temperature), probabilities(logits, multi)
    if multi:
        scores, per_label = multilabel_calibration_metrics(probs, labels, names)
        ece_uncalibrated = multilabel_calibration_metrics(raw, labels, names)[0]["ece"]
        for name, t in zip(names, temperature if isinstance(temperature, list) else [temperature] * len(names)):
            metrics["per_label"][name].update(per_label[name], temperature=float(t))
    else:
        scores, ece_uncalibrated = calibration_metrics(probs, labels), calibration_metrics(raw, labels)["ece"]
    metrics.update(temperature=temperature, ece=scores["ece"], ece_uncalibrated=ece_uncalibrated, brier=scores["brier"],
                   nll=scores["nll"])
    if cfg["data"]["abstain_below"] is not None:
        confidences, correct = graded_decisions(probs, labels, metrics)
        metrics["coverage"], metrics["covered_acc"] = selective_accuracy(confidences, correct, cfg["data"]["abstain_below"])
    return metrics


def graded_decisions(probs, labels, metrics):
    """Per row: how sure its prediction is (decision_confidence) and whether it is right (multi-label:
    every label decided right, at the thresholds in metrics' per_label)."""
    if "per_label" in metrics:
        thresholds = thresholds_of(metrics)
        return decision_confidence(probs, thresholds), ((probs >= thresholds) == labels.astype(bool)).all(axis=1)
    return decision_confidence(probs), probs.argmax(axis=1) == labels


def one_class_warning(predictions, names):
    """A warning when a classifier predicts the same class for every example (a collapsed run:
    MCC 0, macro F1 near 1 / classes), else None."""
    if names is None or len(predictions) < 2 or len(set(predictions.tolist())) > 1:
        return None
    return (f"every example is predicted as {names[int(predictions[0])]!r}: the model has collapsed to one "
            f"class; lower module.max_lr, train longer, or check the balance of the labels")


def scalar_metrics(metrics):
    """The numbers of metrics, for logs and the final JSON; a multi-label run's temperatures (a list) too."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) or k == "temperature"}


def curves_of(logits, split, cfg, metrics):
    """What TensorBoard draws of an evaluation (metrics: split_metrics' of the same logits), per
    document: every class's (label's) probability, calibrated and not, the truth, each prediction's
    confidence and whether it is right; or a regression's predictions and labels (runlog.RunLog.write_figures)."""
    names, labels = label_names(cfg), split.encoded.document_labels()
    logits = document_logits(logits, split.encoded, cfg)
    if names is None:
        return {"task": "regression", "predictions": logits[:, 0], "labels": labels}
    multi = cfg["data"]["multi_label"]
    probs = probabilities(logits, multi, metrics["temperature"])
    confidences, correct = graded_decisions(probs, labels, metrics)
    return {"task": "multi_label" if multi else "single_label", "names": names, "labels": labels,
            "probabilities": probs, "uncalibrated": probabilities(logits, multi), "confidences": confidences,
            "correct": correct, "abstain_below": cfg["data"]["abstain_below"]}


def evaluate_only(cfg, proc, model, tokenizer, val):
    """Metrics of a fine-tuned model on a labelled file, with a per-class table, and the run folder
    they are written to (main process): (metrics, run_dir)."""
    # said before the wait, with the device, as training's first line is
    proc.say(f"evaluation of {cfg['model']['model_path']} on {cfg['data']['val_filepath']} "
             f"({val.encoded.num_documents} examples{first_rows(cfg['data'])}), device {proc.device}")
    logits = predict_logits(model, val.encoded, cfg["trainer"]["val_batch_size"],
                            tokenizer.pad_token_id, proc)
    metrics = on_main(proc, split_metrics, logits, val, cfg, f"on {cfg['data']['val_filepath']}")
    proc.say(format_report(metrics))
    run_dir = on_main(proc, write_eval_metrics, cfg, metrics, curves_of(logits, val, cfg, metrics) if proc.is_main else None)
    return metrics, run_dir


def evaluated_model(cfg, proc):
    """model.model_path to evaluate: an export folder through ONNX Runtime on the CPU, in this
    process's threads (export.py, imported only for it), its model as model.artifact picks it and
    said; else the checkpoint as training builds it."""
    check_artifact(cfg)
    if is_export_dir(cfg["model"]["model_path"]):
        from export import load_exported
        artifact = cfg["model"]["artifact"]
        model = load_exported(cfg["model"]["model_path"], threads=torch.get_num_threads(),
                              artifact=None if artifact == "auto" else artifact)[0]
        proc.say(f"model: {model.path}, run by ONNX Runtime on the CPU (model.artifact {artifact})")
        return model
    return build_classifier(cfg, proc.device, say=proc.say)


def evaluate_and_predict(cfg, proc):
    """A run without training: model.model_path, read as it was trained (its labels, task and
    max_seq_len: model.use_checkpoint_settings), evaluated on data.val_filepath and predicting
    data.predict_filepath, each if set. The final result (main process)."""
    note = use_checkpoint_settings(cfg)
    if note is not None:
        proc.say(f"note: {note}")
    inputs = prepare_run(cfg, proc, lambda tokenizer: evaluated_model(cfg, proc))
    model, tokenizer, thresholds = inputs.built, inputs.tokenizer, fixed_thresholds(cfg)
    onnx_model = {"onnx_model": model.path} if is_export_dir(cfg["model"]["model_path"]) else {}  # for run.json
    if inputs.val:
        metrics, run_dir = evaluate_only(cfg, proc, model, tokenizer, inputs.val)
        result = {**scalar_metrics(metrics), **onnx_model, "run_dir": run_dir}
        if cfg["data"]["multi_label"]:  # tune: predictions decide at the thresholds tuned on this file
            thresholds = thresholds_of(metrics)
    else:  # prediction alone gets a run folder too, to record what it read and wrote
        result = {**onnx_model, "run_dir": on_main(proc, new_run_dir, cfg["trainer"]["log_dir"], "predict")}
    if cfg["data"]["predict_filepath"]:
        result["predictions"] = predict_file(cfg, proc, model, tokenizer, result["run_dir"], total_rows=inputs.predict_rows,
                                             decisions=Decisions(thresholds, temperature_of(cfg)))
    return result


def write_eval_metrics(cfg, metrics, curves):
    """eval_metrics.json and TensorBoard events (at the checkpoint's step) in a new -eval folder."""
    runlog = RunLog.open(cfg, 0, kind="eval")  # a new folder, with the run's config.json
    run_dir = runlog.run_dir
    manifest = read_manifest(cfg["model"]["model_path"])
    step = manifest["step"] if manifest is not None else 0
    try:
        with writing_to("trainer.log_dir", run_dir):
            write_json(Path(run_dir) / "eval_metrics.json", metrics)
        runlog.write(step, None, {f"eval/{k}": v for k, v in scalar_metrics(metrics).items()})
        runlog.write_figures(step, metrics, curves, prefix="eval")
    finally:
        runlog.close()
    print(f"metrics written to {Path(run_dir) / 'eval_metrics.json'}")
    return run_dir


class Decisions(NamedTuple):
    """How logits become predictions: multi-label thresholds (None for another task) and the temperature."""
    thresholds: object = None
    temperature: object = 1.0


def prediction_header(names, thresholds=None, abstain=False):
    """The columns predictions add after the input columns (thresholds: multi-label's, per label;
    abstain: data.abstain_below is set)."""
    if names is None:
        return ["prediction"]
    return (["predicted_labels" if thresholds is not None else "predicted_label"] + ["abstained"] * abstain
            + [f"prob_{n}" for n in names])


def prediction_cells(logits, names, thresholds=None, sep="|", temperature=1.0, abstain_below=None):
    """One list of output cells per row of logits (a chunk of examples), matching prediction_header:
    the score (regression), the likeliest class and each class's probability, or (multi-label) the
    labels at or above their thresholds joined by sep and each label's probability; probabilities
    at the temperature. With abstain_below, a row whose prediction is less sure (decision_confidence)
    gets no label and abstained 1; the others abstained 0."""
    if names is None:
        return [[f"{score:.6g}"] for score in logits[:, 0]]
    probs = scores_of(logits, names, thresholds, temperature)
    if thresholds is not None:
        labels = [sep.join(n for n, p, t in zip(names, row, thresholds) if p >= t) for row in probs]
    else:
        labels = [names[int(i)] for i in probs.argmax(axis=1)]
    cells = [[label] for label in labels]
    if abstain_below is not None:
        abstained = decision_confidence(probs, thresholds) < abstain_below
        cells = [["", "1"] if no else [label, "0"] for label, no in zip(labels, abstained)]
    return [cell + [f"{p:.6f}" for p in row] for cell, row in zip(cells, probs)]


def scores_of(logits, names, thresholds=None, temperature=1.0):
    """What a prediction says of each row of logits: a regression's score (names None), or each
    label's (multi-label, whose thresholds are given) or class's probability at the temperature
    (module.calibrate: temperature_of(cfg) once use_checkpoint_settings took a checkpoint's)."""
    if names is None:
        return logits[:, :1]
    return probabilities(logits, thresholds is not None, temperature)


def write_prediction_rows(writer, examples, cells):
    """A chunk's rows: the input columns, then its prediction_cells; a cell a spreadsheet would run as
    a formula is written as text (files.csv_cell)."""
    for row, more in zip(examples.rows, cells):
        writer.writerow(csv_cells([row.get(c) for c in examples.columns] + more))


def predict_output(cfg, run_dir):
    path = cfg["data"]["predict_output"]
    if path is None:
        run_dir = run_dir or new_run_dir(cfg["trainer"]["log_dir"], "predict")
        path = str(Path(run_dir) / "predictions.csv")
    return path


def predict_file(cfg, proc, model, tokenizer, run_dir, total_rows=None, decisions=None):
    """Label data.predict_filepath, a file of any size, PREDICT_CHUNK rows at a time:
    read, tokenize, run (sharded over the ranks, gathered on the main process) and write each
    chunk in turn, so memory follows the chunk, not the file. The output is written in a folder
    of its own beside it and renamed when complete (a killed run's is swept at the next);
    prepare_run checked every row before, so no bad row can turn up after the first prediction
    is written. decisions: the thresholds and temperature to predict with (a Decisions), or those
    cfg holds (module.threshold, module.calibrate: a checkpoint's, once use_checkpoint_settings took them).
    total_rows (prepare_run counted them): a bar over the whole file, beside each chunk's.
    The output path (main process)."""
    data, names = cfg["data"], label_names(cfg)
    decisions = decisions or Decisions(fixed_thresholds(cfg), temperature_of(cfg))
    thresholds, abstain_below = decisions.thresholds, data["abstain_below"]
    path = on_main(proc, predict_output, cfg, run_dir)
    proc.say(f"prediction of {data['predict_filepath']}{first_rows(data)}, device {proc.device}")
    rows, chunk_rows = 0, PREDICT_CHUNK
    whole = progress_bar(desc=f"predict {data['predict_filepath']}", unit="row", total=total_rows, leave=False, position=1,
                         disable=not proc.is_main or (total_rows or 0) <= chunk_rows, dynamic_ncols=True)
    if proc.is_main:
        sweep_outputs(path, say=proc.say)
    with writing_to("data.predict_output", path), \
            atomic_output(path, newline="") if proc.is_main else nullcontext() as f, whole:
        writer = csv.writer(f) if proc.is_main else None

        def write_chunk():  # one row per input row: a document's windows pooled
            if rows == 0:
                writer.writerow(csv_cells(list(examples.columns) + prediction_header(names, thresholds,
                                                                                     abstain_below is not None)))
            write_prediction_rows(writer, examples, prediction_cells(document_logits(logits, encoded, cfg), names, thresholds,
                                                                     data["label_sep"], decisions.temperature, abstain_below))
        for examples in example_chunks(data["predict_filepath"], data, chunk_rows):
            # a predict file is read once: tokenized chunk by chunk in this process, not cached
            encoded = tokenize(cfg, None, tokenizer, data["predict_filepath"], examples).encoded
            logits = predict_logits(model, encoded, cfg["trainer"]["val_batch_size"], tokenizer.pad_token_id,
                                    proc, desc="predict")
            with writing_to("data.predict_output", path):
                on_main(proc, write_chunk)  # a write that fails (a full disk) ends every rank
            rows += encoded.num_documents
            whole.update(encoded.num_documents)
    proc.say(f"predictions for {rows} texts written to {path}")
    return path if proc.is_main else None


