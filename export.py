r"""Export a fine-tuned checkpoint to ONNX, fp32 and dynamic int8, each checked against PyTorch.

    python export.py --model.model_path checkpoints/best
    python export.py --model.model_path checkpoints/student-3l/best --data.val_filepath data/tweets/test.csv
    python export.py --model.model_path checkpoints/best --export.int8 false --export.output_dir served/sentiment
Predict through the export folder (ONNX Runtime, no PyTorch model), as with a checkpoint:
    python trainer.py --data.train_filepath null --data.val_filepath null \
        --data.predict_filepath new.csv --model.model_path checkpoints/checkpoint-epoch1-step125-onnx

The checkpoint is read as evaluation reads it (its labels, task, max_seq_len, windows and
multi-label thresholds), traced by torch.export into model.onnx (batch and sequence length
dynamic) and quantized by ONNX Runtime into model.int8.onnx (int8 weights, activations quantized
on the fly). Each artifact then predicts data.val_filepath beside the PyTorch model, and is kept
only if it passes its gate (export.*): the share of predictions it makes as PyTorch does, and for
int8 the module.metric it may lose. Predictions are the class (single-label), the set of labels at
their thresholds (multi-label), or a score within 1% of the spread of PyTorch's scores
(regression); long documents are compared after pooling their windows. A table of metric, share
of identical predictions, largest probability difference and examples per second is printed and
written as export_report.json.

The export folder, written under a temporary name beside it and renamed when complete, holds
model.onnx and / or model.int8.onnx, the tokenizer, the checkpoint's config.json (labels, task) and
thresholds.json, its calibration.json (the temperature: the graph gives logits, and prediction
through the folder divides them as the checkpoint's prediction does; the gate compares calibrated
probabilities), export.json (the checkpoint it came from, max_seq_len and windows, the artifacts
kept), export_report.json and a model card, README.md. Exit status 0 if an artifact was kept, 1 if
none passed (nothing is written then), 2 for bad input.
"""
import sys

# --help needs only config.yaml: answer it before torch is imported, which takes seconds
if __name__ == "__main__" and ("-h" in sys.argv[1:] or "--help" in sys.argv[1:]):
    from config import print_help
    print_help(__doc__)
    sys.exit(0)

import errno
import json
import logging
import os
import re
import shutil
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.transformers.optimizer import optimize_model

import speedups
from card import export_facts, write_card
from checkpoint import CheckpointError, read_manifest
from config import ConfigError, answer_help, label_names, load_config, task_of
from data import DataError, collate
from evaluation import (
    document_logits,
    fixed_thresholds,
    predict_logits,
    probabilities,
    split_metrics,
    temperature_of,
    thresholds_of,
)
from files import OutputError, check_writable_dir, first_line, publish_folder, remove_abandoned, temporary_folder
from model import (
    CALIBRATION_FILE,
    EXPORT_ARTIFACTS,
    EXPORT_MANIFEST,
    EXPORTED_BY,
    THRESHOLDS_FILE,
    ModelError,
    build_model,
    check_export_folder,
    head_labels,
    is_export_dir,
    is_pretrained_dir,
    load_tokenizer,
    read_export_manifest,
    save_temperature,
    save_thresholds,
    use_checkpoint_settings,
)
from processes import single_process
from splits import load_split

ARTIFACTS = EXPORT_ARTIFACTS
REPORT = "export_report.json"
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
# regression: a score "the same" as PyTorch's when within this share of the spread of PyTorch's scores
SCORE_TOLERANCE = 0.01


# ---------------------------------------------------------------------------------------------
# ONNX Runtime, called like the Hugging Face classifier


class OnnxClassifier:
    """An ONNX Runtime session that is called like the classifier it was exported from:
    model(input_ids=..., attention_mask=..., token_type_ids=...).logits, a float32 CPU tensor, so
    trainer.predict_logits runs it unchanged. It runs on the CPU whatever the device of its inputs.
    width: the number of labels its logits must have (config.json's), checked as it loads and runs."""

    training = False

    def __init__(self, path, width, threads=0):
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads  # 0: ONNX Runtime's default, every physical core
        options.log_severity_level = 3  # its warnings are about graph rewrites, not about the results
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 (its errors are pybind classes: a damaged or truncated file)
            raise ModelError(f"{path}: not a readable ONNX model ({first_line(e)[:200]}); export the "
                             f"checkpoint again with export.py") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.path, self.width = str(path), width
        shape = self.session.get_outputs()[0].shape
        self.check_width(shape[-1] if shape else None)

    def check_width(self, width):
        """A model whose logits do not have one value per label would write ragged predictions."""
        if isinstance(width, int) and width != self.width:
            raise ModelError(f"{self.path}: its logits have {width} values per text, but its folder's config.json "
                             f"has {self.width} labels; export the checkpoint again")

    def __call__(self, input_ids, attention_mask, token_type_ids=None):
        feed = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "token_type_ids" in self.input_names:  # single texts: all segment 0, which data.py does not store
            feed["token_type_ids"] = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        logits, = self.session.run(["logits"], {name: feed[name].cpu().numpy() for name in self.input_names})
        self.check_width(logits.shape[-1] if logits.ndim == 2 else None)
        if logits.ndim != 2:
            raise ModelError(f"{self.path}: its logits have shape {list(logits.shape)}, not (texts, labels); export "
                             f"the checkpoint again")
        return SimpleNamespace(logits=torch.from_numpy(logits))

    def eval(self):
        return self

    def train(self, mode=True):
        if mode:
            raise ModelError(f"{self.path} is an exported model: it predicts, it cannot be trained; train the "
                             f"checkpoint it came from")
        return self

    def to(self, device):
        return self


def load_exported(path, threads=0, artifact=None):
    """(OnnxClassifier, tokenizer) of an export folder: its fp32 model if it was kept, else its
    int8 one; artifact ("onnx_fp32" / "onnx_int8") asks for one. A damaged folder is a ModelError."""
    if not is_export_dir(path):
        raise ModelError(f"{path}: not an export folder of export.py (no valid {EXPORT_MANIFEST})")
    kept = check_export_folder(path)["artifacts"]
    artifact = artifact or next((name for name in ARTIFACTS if name in kept), None)
    if artifact not in kept:
        raise ModelError(f"{path}: holds no {artifact or 'ONNX model'} (kept: {', '.join(kept) or 'none'}); "
                         f"export the checkpoint again")
    return OnnxClassifier(Path(path) / kept[artifact], head_labels(path), threads), load_tokenizer(
        {"tokenizer_path": str(path), "model_path": None, "hf_model": None})


# ---------------------------------------------------------------------------------------------
# the artifacts


@contextmanager
def quiet_exporter():
    """The exporter and the quantizer log lines that are no news to a user (torchvision absent, a
    renamed axis, a suggestion to pre-process) and warnings of torch internals: kept off the screen."""
    loggers = [logging.getLogger(), logging.getLogger("torch.onnx")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def example_inputs(encoded, tokenizer):
    """Two validation rows as a padded batch, to trace the model with: the longest and the shortest,
    so that padding (and the attention mask) is part of what is traced."""
    order = np.argsort(encoded.lengths, kind="stable")
    batch = collate(encoded, [order[-1], order[0]], tokenizer.pad_token_id)
    batch.pop("labels", None)
    if batch["attention_mask"].all():  # rows of one length: a padded position all the same
        batch["attention_mask"][1, -1] = 0
    if "token_type_ids" in tokenizer.model_input_names and "token_type_ids" not in batch:
        batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
    return batch


def export_fp32(model, example, path, source):
    """model.onnx, batch and sequence length dynamic: the TorchScript exporter's graph of the model with
    eager attention, the one ONNX Runtime's transformer optimizer knows how to fuse (optimize_fp32);
    torch.export's graph where that exporter fails. Returns which exporter wrote it."""
    try:
        export_torchscript(model, example, path)
        return "torchscript"
    except Exception as e:  # noqa: BLE001 (tracing raises many kinds): the newer exporter may still manage
        if write_failed(e, path):
            raise
        return export_dynamo(model, example, path, source)


def export_torchscript(model, example, path):
    """The TorchScript exporter's graph (torch.jit tracing) of the model with eager attention."""
    axes = {name: {0: "batch", 1: "sequence"} for name in example} | {"logits": {0: "batch"}}
    with quiet_exporter(), eager_attention(model):
        torch.onnx.export(model, (), str(path), kwargs=example, dynamo=False, input_names=list(example),
                          output_names=["logits"], dynamic_axes=axes, opset_version=17)


def export_dynamo(model, example, path, source):
    """torch.export's graph: the exporter torch recommends, whose attention the optimizer does not fuse."""
    dims = {name: {0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC} for name in example}
    try:
        with quiet_exporter():
            program = torch.onnx.export(model, (), kwargs=example, dynamo=True, input_names=list(example),
                                        output_names=["logits"], dynamic_shapes=dims, verbose=False)
            program.save(str(path))
    except Exception as e:  # noqa: BLE001 (torch.export and the ONNX translation raise many kinds)
        if write_failed(e, path):
            raise
        raise ModelError(f"model.model_path {source}: its model ({type(model).__name__}) does not export to "
                         f"ONNX: {first_line(e)[:300]}") from None
    return "torch.export"


@contextmanager
def eager_attention(model):
    """The model with transformers' eager attention (matmul, softmax, matmul) while it is traced: SDPA
    traces into a graph whose attention the optimizer does not recognise. The same weights, the same
    arithmetic; the model's own attention again afterwards."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        model.set_attn_implementation(before)


def optimize_fp32(path, config):
    """model.onnx rewritten in place by ONNX Runtime's transformer optimizer (model type bert): attention,
    embedding + LayerNorm, residual + LayerNorm and bias + GELU fused into single operators, the usual CPU
    recipe before dynamic int8. Returns {fused operator: count}, or a note saying why the graph is
    kept as exported (the optimizer failed on it, or fused nothing)."""
    try:
        with quiet_exporter():
            optimized = optimize_model(str(path), model_type="bert", num_heads=getattr(config, "num_attention_heads", 0),
                                       hidden_size=getattr(config, "hidden_size", 0), opt_level=0)
    except Exception as e:  # noqa: BLE001 (a graph of another shape than BERT's can raise anything)
        if write_failed(e, path):
            raise
        return {"note": f"kept as exported: ONNX Runtime's optimizer failed on it ({first_line(e)[:200]})"}
    fused = {name: count for name, count in optimized.get_fused_operator_statistics().items() if count}
    if not fused:
        return {"note": "kept as exported: ONNX Runtime's optimizer found nothing to fuse in it"}
    optimized.save_model_to_file(str(path))
    return fused


def write_failed(error, path):
    """True if error is a write that failed (a full disk, a folder gone read-only), not a model the
    exporter or optimizer cannot handle: an OSError, or, since torch and onnx raise their own kinds
    without saying why, any error while less than 1 MiB is left beside path."""
    if isinstance(error, OSError):
        return True
    try:
        return shutil.disk_usage(Path(path).parent).free < 2**20
    except OSError:
        return False


@contextmanager
def writing_export(target):
    """A write that fails while the export folder is made (tracing, fusing, quantizing, writing
    the folder) as one line naming export.output_dir, not a traceback or "does not export"."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 (torch, onnx and ONNX Runtime each raise their own kinds)
        if not write_failed(e, target):
            raise
        full = isinstance(e, OSError) and e.errno == errno.ENOSPC or shutil.disk_usage(target.parent).free < 2**20
        reason = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)[:200]
        raise OutputError(f"cannot write {target}: {reason}{' (the disk is full)' * full}; free space or choose "
                          f"another export.output_dir") from None


def quantize_int8(fp32_path, path):
    """model.int8.onnx: ONNX Runtime's dynamic quantization (int8 weights per output channel, each
    batch's activations quantized as it runs); a fused Attention becomes QAttention."""
    with quiet_exporter():
        # the optimizer's operators (com.microsoft) carry no types that shape inference can read: float32
        quantize_dynamic(str(fp32_path), str(path), weight_type=QuantType.QInt8, per_channel=True,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


# ---------------------------------------------------------------------------------------------
# the check: each artifact beside PyTorch on the validation file


def run_on_split(model, split, cfg, proc, pad_token_id, desc):
    """(document logits, metrics, documents per second) of model on the validation split."""
    start = time.perf_counter()
    logits = predict_logits(model, split.encoded, cfg["trainer"]["val_batch_size"], pad_token_id, proc, desc=desc)
    seconds = time.perf_counter() - start
    metrics = split_metrics(logits, split, cfg, f"{desc} on {split.path}")
    return document_logits(logits, split.encoded, cfg), metrics, split.encoded.num_documents / seconds


def predictions_of(logits, task, thresholds, temperature=1.0):
    """(predictions, probabilities) of document logits: the class and softmax, the labels at their
    thresholds and sigmoids (probabilities at the temperature), or a regression's score (twice)."""
    if task == "regression":
        return logits[:, 0], logits[:, 0]
    probs = probabilities(logits, task == "multi_label", temperature)
    return (probs >= thresholds if task == "multi_label" else logits.argmax(axis=1)), probs


def agreement(logits, reference, task, thresholds, temperature=1.0):
    """(share of documents predicted as the reference predicts them, largest absolute difference
    of probabilities, calibrated as predictions are (module.calibrate), or of scores in a regression)."""
    ours, our_probs = predictions_of(logits, task, thresholds, temperature)
    theirs, their_probs = predictions_of(reference, task, thresholds, temperature)
    if task == "regression":
        same = np.abs(ours - theirs) <= SCORE_TOLERANCE * (theirs.std() or 1.0)
    elif task == "multi_label":
        same = (ours == theirs).all(axis=1)
    else:
        same = ours == theirs
    return float(same.mean()), float(np.abs(our_probs - their_probs).max())


def gate(name, row, reference, export_cfg):
    """Why the artifact is not kept, or None if it passes."""
    if name == "onnx_fp32" and row["identical"] < export_cfg["fp32_min_identical"]:
        return f"{row['identical']:.2%} identical predictions < export.fp32_min_identical {export_cfg['fp32_min_identical']:.2%}"
    if name == "onnx_int8":
        drop = reference["metric"] - row["metric"]
        if drop > export_cfg["int8_max_metric_drop"]:
            return f"the metric falls by {drop:.4f} > export.int8_max_metric_drop {export_cfg['int8_max_metric_drop']}"
        if row["identical"] < export_cfg["int8_min_identical"]:
            return (f"{row['identical']:.2%} identical predictions < export.int8_min_identical "
                    f"{export_cfg['int8_min_identical']:.2%}")
    return None


def graph_line(graph):
    """What the ONNX graph is: which exporter traced it and what ONNX Runtime's optimizer fused in it."""
    if graph is None:
        return "graph: as exported"
    fused = graph["fused"]
    what = fused["note"] if "note" in fused else "fused " + ", ".join(f"{name} x{count}" for name, count in fused.items())
    return f"graph: {graph['exporter']} exporter; {what}"


def format_table(report):
    metric = report["metric_name"]
    lines = [(f"export check of {report['checkpoint']} on {report['val_filepath']} ({report['documents']} "
              f"examples, batch {report['batch_size']}, {report['threads']} threads)"),
             graph_line(report.get("graph")),
             f"{'model':<10} {metric:>11} {'identical':>9} {'max prob diff':>13} {'ex/s':>8} {'speed':>6}  kept"]
    torch_speed = report["torch"]["ex_s"]
    for name in ("torch", *ARTIFACTS):
        row = report.get(name)
        if row is None:
            continue
        kept = "-" if row["kept"] is None else f"yes: {row['file']}" if row["kept"] else f"no: {row['refused']}"
        lines.append(f"{name:<10} {row['metric']:>11.4f} {row['identical']:>9.2%} {row['max_prob_diff']:>13.2e} "
                     f"{row['ex_s']:>8.1f} {row['ex_s'] / torch_speed:>5.2f}x  {kept}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the command


def checkpoint_folder(cfg):
    """model.model_path as a checkpoint folder to export, or a one-line error."""
    path = cfg["model"]["model_path"]
    if path is None:
        raise ConfigError("model.model_path is null: pass the checkpoint to export, e.g. --model.model_path "
                          "checkpoints/best")
    if is_export_dir(path):
        raise CheckpointError(f"model.model_path {path} is an export folder already; export the checkpoint "
                              f"it came from ({read_export_manifest(path).get('source')})")
    try:
        classifier = head_labels(path, trust=cfg["model"]["trust_remote_code"]) is not None if is_pretrained_dir(path) else False
    except (OSError, ValueError):
        classifier = False
    if not (classifier and any(os.path.isfile(os.path.join(path, name)) for name in WEIGHTS)):
        raise CheckpointError(f"model.model_path {path}: not a checkpoint folder (no config.json of a classifier "
                              f"and model weights); pass a folder that trainer.py or distill.py wrote, e.g. "
                              f"checkpoints/best")
    return Path(path).resolve()


def export_folder(cfg, checkpoint):
    """The folder to write: export.output_dir, or <checkpoint folder name>-onnx beside it."""
    target = Path(cfg["export"]["output_dir"] or checkpoint.parent / f"{checkpoint.name}-onnx")
    if target.exists() or target.is_symlink():
        raise CheckpointError(f"{target} exists; remove it, or choose another --export.output_dir")
    check_out_of_save_folders(target)
    check_writable_dir(target.parent, "export.output_dir")
    return target


def check_out_of_save_folders(target):
    """An export folder where trainer.py deletes: inside a checkpoint folder (pruned, replaced), or
    in a save folder under a name its repair removes (.tmp-...) or a checkpoint will take."""
    parent = target.parent.resolve()
    for folder in (parent, *parent.parents):
        if read_manifest(folder) is not None:
            raise CheckpointError(f"export.output_dir {target} is inside the checkpoint folder {folder}, which "
                                  f"trainer.py deletes when it prunes or replaces it; choose a folder outside it")
    in_save_folder = parent.is_dir() and any(read_manifest(p) is not None for p in parent.iterdir() if p.is_dir())
    if in_save_folder and re.fullmatch(r"\.tmp-.*|.*-epoch\d+-step\d+", target.name):
        raise CheckpointError(f"export.output_dir {target}: a name that trainer.py takes for its own in the save "
                              f"folder {parent}; choose another name")


EXPORT_WRITING = "export being written by pid"  # the mark of an export's temporary folder


def run(cfg):
    """Export model.model_path, check every artifact, write the export folder: the exit status."""
    checkpoint = checkpoint_folder(cfg)
    if cfg["data"]["val_filepath"] is None:
        raise ConfigError("data.val_filepath is null: export.py checks each artifact against PyTorch on a "
                          "labelled file; set one, e.g. --data.val_filepath data/tweets/val.csv")
    target = export_folder(cfg, checkpoint)
    cfg["data"]["train_filepath"] = cfg["data"]["predict_filepath"] = None  # the files export.py reads: one
    note = use_checkpoint_settings(cfg)
    if note is not None:
        print(f"note: {note}")
    threads = cfg["export"]["threads"] or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    tokenizer = load_tokenizer(cfg["model"])
    split = load_split(cfg, tokenizer, cfg["data"]["val_filepath"])
    model = build_model(cfg["model"], cfg["data"]["labels_list"], multi_label=cfg["data"]["multi_label"]).eval()
    remove_abandoned(target.parent, target.name, EXPORT_WRITING, say=print)
    with writing_export(target), temporary_folder(target.parent, target.name, EXPORT_WRITING) as tmp:
        print(f"exporting {checkpoint} to ONNX ...")
        exporter = export_fp32(model, example_inputs(split.encoded, tokenizer), tmp / ARTIFACTS["onnx_fp32"], checkpoint)
        graph = {"exporter": exporter, "fused": optimize_fp32(tmp / ARTIFACTS["onnx_fp32"], model.config)}
        if cfg["export"]["int8"]:  # quantized after fusion: a fused attention quantizes as one operator
            quantize_int8(tmp / ARTIFACTS["onnx_fp32"], tmp / ARTIFACTS["onnx_int8"])
        if cfg["trainer"]["speedups"]:  # PyTorch as trainer.py evaluates it; model.onnx has its own graph
            speedups.apply(model, torch.device("cpu"))
        report, thresholds, metrics = check_artifacts(cfg, model, split, tokenizer, tmp)
        report = {"checkpoint": str(checkpoint), "threads": threads, "graph": graph, **report}
        print(format_table(report))
        kept = {name: ARTIFACTS[name] for name in ARTIFACTS if report.get(name, {}).get("kept")}
        if not kept:
            sys.stderr.write("error: no model passed its gate (the table above says why); nothing was written\n")
            return 1
        write_folder(tmp, cfg, checkpoint, tokenizer, thresholds, kept, report)
        write_card(tmp, *export_facts(cfg, checkpoint, target, metrics, split, report))
        publish(tmp, target)
    print(f"export folder: {target}")
    return 0


def publish(tmp, target):
    """The written folder renamed onto target, unless another export (or a user) made target meanwhile."""
    try:
        publish_folder(tmp, target)
    except OSError as e:  # the rename found a folder (or a file) in its way
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise
        raise CheckpointError(f"{target} was made while this export ran (another export to the same folder?); "
                              f"nothing was written; remove it, or choose another --export.output_dir") from None


def check_artifacts(cfg, model, split, tokenizer, folder):
    """Every ONNX model in folder run on the validation split beside PyTorch's model, and those that
    fail their gate deleted: (the report's rows and settings, the multi-label thresholds the
    decisions were compared at, or None; PyTorch's metrics, the model card's). Probabilities are
    compared calibrated, at the checkpoint's temperature (module.calibrate), as prediction gives them."""
    proc, task, metric_name = single_process(), task_of(cfg["data"]), cfg["module"]["metric"]
    reference, metrics, ex_s = run_on_split(model, split, cfg, proc, tokenizer.pad_token_id, "torch")
    torch_metrics = metrics
    thresholds = fixed_thresholds(cfg)
    if task == "multi_label" and thresholds is None:  # tuned on this file: every artifact decides at PyTorch's
        thresholds = thresholds_of(metrics)
        cfg["module"]["threshold"] = thresholds.tolist()
    report = {"val_filepath": cfg["data"]["val_filepath"], "metric_name": metric_name,
              "documents": split.encoded.num_documents, "batch_size": cfg["trainer"]["val_batch_size"],
              "torch": {"metric": metrics[metric_name], "identical": 1.0, "max_prob_diff": 0.0, "ex_s": ex_s, "kept": None}}
    for name, file in ARTIFACTS.items():
        if not (folder / file).exists():
            continue
        onnx_model = OnnxClassifier(folder / file, model.config.num_labels, torch.get_num_threads())
        logits, metrics, ex_s = run_on_split(onnx_model, split, cfg, proc, tokenizer.pad_token_id, name)
        identical, max_diff = agreement(logits, reference, task, thresholds, temperature_of(cfg))
        row = {"metric": metrics[metric_name], "identical": identical, "max_prob_diff": max_diff, "ex_s": ex_s}
        refused = gate(name, row, report["torch"], cfg["export"])
        report[name] = {**row, "kept": refused is None, "file": file, **({"refused": refused} if refused else {})}
        if refused:
            (folder / file).unlink()
    return report, thresholds, torch_metrics


def write_folder(folder, cfg, checkpoint, tokenizer, thresholds, kept, report):
    """Everything but the models: what reading the data as the checkpoint did needs, and the report."""
    tokenizer.save_pretrained(folder)
    shutil.copyfile(checkpoint / "config.json", folder / "config.json")  # labels, id2label, problem_type
    if thresholds is not None:
        save_thresholds(folder, label_names(cfg), thresholds,
                        f"those export.py checked the models with (from {checkpoint / THRESHOLDS_FILE} or module.threshold)")
    if label_names(cfg) is not None:  # the temperature the models were checked with; config.json's key follows it
        calibrate = cfg["module"]["calibrate"]
        save_temperature(folder, label_names(cfg), None if isinstance(calibrate, bool) else temperature_of(cfg),
                         f"the one export.py checked the models with (from {checkpoint / CALIBRATION_FILE} or module.calibrate)")
    settings = {"module": {"max_seq_len": cfg["module"]["max_seq_len"]},
                "data": {key: cfg["data"][key] for key in ("long_texts", "window_stride", "window_pool")}}
    manifest = {"written_by": EXPORTED_BY, "source": str(checkpoint), "config": settings, "artifacts": kept}
    (folder / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    (folder / REPORT).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def main(argv=None):
    """Command-line entry point: one clear line and exit status 2 on any user error."""
    argv = sys.argv[1:] if argv is None else argv
    if answer_help(argv, __doc__):
        return 0
    cfg = None
    try:
        cfg = load_config(argv)
        return run(cfg)
    except (ConfigError, DataError, ModelError, OutputError) as e:
        if cfg is not None and cfg["trainer"]["debug"]:
            raise
        sys.stderr.write(f"error: {e}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
