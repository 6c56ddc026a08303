"""Evaluation and prediction: a model's logits over a split, its metrics, and the predictions CSV.

    logits = predict_logits(model, split.encoded, batch_size, pad_token_id, proc)   # rank 0: every row
    metrics = split_metrics(logits, split, cfg, "at step 100")                     # windows pooled first
    path = predict_file(cfg, proc, model, tokenizer, run_dir, thresholds=...)      # streamed, in order
    metrics, run_dir = evaluate_only(cfg, proc, model, tokenizer, val)             # a -eval run folder
    result = evaluate_and_predict(cfg, proc)            # a run without training: evaluate, predict

Every rank evaluates its shard of the examples (each on exactly one rank) and the main process
gathers them, so the metrics are those of one process. A long document's windows are pooled into
one prediction (data.window_pool); multi-label decisions are per-label thresholds (module.threshold,
fixed or tuned on the validation file), saved with each checkpoint.
"""
import csv
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from checkpoint import read_manifest
from config import label_names
from data import collate, eval_batches, example_chunks
from files import atomic_output, csv_cells, sweep_outputs, write_json, writing_to
from metrics import best_thresholds, compute_metrics, format_report, multilabel_metrics
from model import build_classifier, is_export_dir, save_thresholds, saved_thresholds, use_checkpoint_settings
from processes import autocast, on_main
from runlog import RunLog, new_run_dir
from splits import prepare_run, tokenize

# rows of a predict file read, tokenized, run and written at a time: what prediction holds
PREDICT_CHUNK = 10_000


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
    for batch_indices in tqdm(batches, desc=f"{desc} on {proc.device}", unit="batch", leave=False,
                              disable=not proc.is_main, dynamic_ncols=True, file=sys.stderr):
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
    documents), and a warning line if the model predicts one class."""
    names, labels = label_names(cfg), split.encoded.document_labels()
    logits = document_logits(logits, split.encoded, cfg)
    if cfg["data"]["multi_label"]:
        return multilabel_split_metrics(logits, labels, names, fixed_thresholds(cfg))
    predictions = logits_to_predictions(logits, names)
    collapse = one_class_warning(predictions, names)
    if collapse:
        tqdm.write(f"warning: {where}, {collapse}", file=sys.stdout)  # the train bar stays intact
    return compute_metrics(predictions, labels, names)


def multilabel_split_metrics(logits, labels, names, thresholds=None):
    """Multi-label metrics at the given per-label thresholds, or (None) at each label's F1-best
    threshold on these very examples (module.threshold tune); the thresholds go in per_label."""
    probabilities = sigmoid(logits)
    if thresholds is None:
        thresholds = best_thresholds(probabilities, labels)
    metrics = multilabel_metrics(probabilities >= thresholds, labels, names)
    for row, threshold in zip(metrics["per_label"].values(), thresholds):
        row["threshold"] = float(threshold)
    return metrics


def one_class_warning(predictions, names):
    """A warning when a classifier predicts the same class for every example (a collapsed run:
    MCC 0, macro F1 near 1 / classes), else None."""
    if names is None or len(predictions) < 2 or len(set(predictions.tolist())) > 1:
        return None
    return (f"every example is predicted as {names[int(predictions[0])]!r}: the model has collapsed to one "
            f"class; lower module.max_lr, train longer, or check the balance of the labels")


def sigmoid(logits):
    return 1 / (1 + np.exp(-logits.astype(np.float64)))


def softmax(logits):
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def scalar_metrics(metrics):
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def curves_of(logits, split, cfg):
    """What TensorBoard draws of an evaluation, per document: every class's (label's) probability
    and the truth, or a regression's predictions and labels (runlog.RunLog.write_figures)."""
    names, labels = label_names(cfg), split.encoded.document_labels()
    logits = document_logits(logits, split.encoded, cfg)
    if names is None:
        return {"task": "regression", "predictions": logits[:, 0], "labels": labels}
    multi = cfg["data"]["multi_label"]
    return {"task": "multi_label" if multi else "single_label", "names": names, "labels": labels,
            "probabilities": sigmoid(logits) if multi else softmax(logits)}


def evaluate_only(cfg, proc, model, tokenizer, val):
    """Metrics of a fine-tuned model on a labelled file, with a per-class table, and the run folder
    they are written to (main process): (metrics, run_dir)."""
    # said before the wait, with the device, as training's first line is
    proc.say(f"evaluation of {cfg['model']['model_path']} on {cfg['data']['val_filepath']} "
             f"({val.encoded.num_documents} examples), device {proc.device}")
    logits = predict_logits(model, val.encoded, cfg["trainer"]["val_batch_size"],
                            tokenizer.pad_token_id, proc)
    metrics = on_main(proc, split_metrics, logits, val, cfg, f"on {cfg['data']['val_filepath']}")
    proc.say(format_report(metrics))
    run_dir = on_main(proc, write_eval_metrics, cfg, metrics, curves_of(logits, val, cfg) if proc.is_main else None)
    return metrics, run_dir


def evaluated_model(cfg, proc):
    """model.model_path to evaluate: an export folder through ONNX Runtime on the CPU, in this
    process's threads (export.py, imported only for it), else the checkpoint as training builds it."""
    if is_export_dir(cfg["model"]["model_path"]):
        from export import load_exported
        return load_exported(cfg["model"]["model_path"], threads=torch.get_num_threads())[0]
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
    if inputs.val:
        metrics, run_dir = evaluate_only(cfg, proc, model, tokenizer, inputs.val)
        result = {**scalar_metrics(metrics), "run_dir": run_dir}
        if cfg["data"]["multi_label"]:  # tune: predictions decide at the thresholds tuned on this file
            thresholds = thresholds_of(metrics)
    else:  # prediction alone gets a run folder too, to record what it read and wrote
        result = {"run_dir": on_main(proc, new_run_dir, cfg["trainer"]["log_dir"], "predict")}
    if cfg["data"]["predict_filepath"]:
        result["predictions"] = predict_file(cfg, proc, model, tokenizer, result["run_dir"],
                                             thresholds=thresholds, total_rows=inputs.predict_rows)
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


def prediction_header(names, thresholds=None):
    """The columns predictions add after the input columns (thresholds: multi-label's, per label)."""
    if names is None:
        return ["prediction"]
    return ["predicted_labels" if thresholds is not None else "predicted_label"] + [f"prob_{n}" for n in names]


def prediction_cells(logits, names, thresholds=None, sep="|"):
    """One list of output cells per row of logits (a chunk of examples), matching prediction_header:
    the score (regression), the likeliest class and each class's softmax probability, or (multi-label)
    the labels at or above their thresholds joined by sep, and each label's sigmoid probability."""
    if names is None:
        return [[f"{score:.6g}"] for score in logits[:, 0]]
    probs = scores_of(logits, names, thresholds)
    if thresholds is not None:
        return [[sep.join(n for n, p, t in zip(names, row, thresholds) if p >= t)] + [f"{p:.6f}" for p in row]
                for row in probs]
    return [[names[int(row.argmax())]] + [f"{p:.6f}" for p in row] for row in probs]


def scores_of(logits, names, thresholds=None):
    """What a prediction says of each row of logits: a regression's score (names None), each label's
    sigmoid (multi-label, whose thresholds are given) or each class's softmax."""
    if names is None:
        return logits[:, :1]
    return sigmoid(logits) if thresholds is not None else softmax(logits)


def write_prediction_rows(writer, examples, logits, names, thresholds=None, sep="|"):
    """A chunk's rows: the input columns, then the prediction and every class (label) probability;
    a cell a spreadsheet would run as a formula is written as text (files.csv_cell)."""
    for row, cells in zip(examples.rows, prediction_cells(logits, names, thresholds, sep)):
        writer.writerow(csv_cells([row.get(c) for c in examples.columns] + cells))


def predict_output(cfg, run_dir):
    path = cfg["data"]["predict_output"]
    if path is None:
        run_dir = run_dir or new_run_dir(cfg["trainer"]["log_dir"], "predict")
        path = str(Path(run_dir) / "predictions.csv")
    return path


def predict_file(cfg, proc, model, tokenizer, run_dir, thresholds=None, total_rows=None):
    """Label data.predict_filepath, a file of any size, PREDICT_CHUNK rows at a time:
    read, tokenize, run (sharded over the ranks, gathered on the main process) and write each
    chunk in turn, so memory follows the chunk, not the file. The output is written in a folder
    of its own beside it and renamed when complete (a killed run's is swept at the next);
    prepare_run checked every row before, so no bad row can turn up after the first prediction
    is written. thresholds: multi-label's, per label.
    total_rows (prepare_run counted them): a bar over the whole file, beside each chunk's.
    The output path (main process)."""
    data, names = cfg["data"], label_names(cfg)
    path = on_main(proc, predict_output, cfg, run_dir)
    proc.say(f"prediction of {data['predict_filepath']}, device {proc.device}")
    rows, chunk_rows = 0, PREDICT_CHUNK
    whole = tqdm(total=total_rows, desc=f"predict {data['predict_filepath']}", unit="row", leave=False, position=1,
                 disable=not proc.is_main or (total_rows or 0) <= chunk_rows, dynamic_ncols=True, file=sys.stderr)
    if proc.is_main:
        sweep_outputs(path, say=proc.say)
    with writing_to("data.predict_output", path), \
            atomic_output(path, newline="") if proc.is_main else nullcontext() as f, whole:
        writer = csv.writer(f) if proc.is_main else None

        def write_chunk():  # one row per input row: a document's windows pooled
            if rows == 0:
                writer.writerow(csv_cells(list(examples.columns) + prediction_header(names, thresholds)))
            write_prediction_rows(writer, examples, document_logits(logits, encoded, cfg), names, thresholds,
                                  data["label_sep"])
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


