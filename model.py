"""Models: build a sequence classifier, load fine-tuned weights, save Hugging Face checkpoints.

Usage:
    tokenizer = load_tokenizer(cfg["model"])
    model = build_model(cfg["model"], cfg["data"]["labels_list"])
    save_pretrained(model, tokenizer, "checkpoints/run-epoch1")   # loads in plain transformers

`model.hf_model` is a local model directory or a hub id (the hub is only reachable online); a
classifier there with another number of labels than data.labels_list gets a new head.
`model.model_path` loads fine-tuned weights: a checkpoint directory written by this project (or any
save_pretrained directory), or a plain state-dict file (`.safetensors`, `.bin`, `.pt`), or a
directory plus `model.model_file`. Prefixes left by wrappers (`model.`, `module.`, `_orig_mod.`)
are stripped, so nobody has to edit a state dict by hand.
Models come back as plain transformers objects; the speed tricks are speedups.py's (trainer.speedups).
"""
import os
import sys

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

# transformers' own per-file progress bars (loading / writing weights) would interleave with ours
hf_logging.disable_progress_bar()

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")


class ModelError(Exception):
    """A problem with a model, tokenizer or weights path, reported to the user as one line."""


def is_pretrained_dir(path):
    return path is not None and os.path.isfile(os.path.join(path, "config.json"))


def weights_file(model_cfg):
    """The plain state-dict file named by model.model_path (+ model.model_file), or None."""
    path, name = model_cfg["model_path"], model_cfg["model_file"]
    if path is None:
        return None
    if name is not None:
        path = os.path.join(path, name)
    elif is_pretrained_dir(path):
        return None  # a save_pretrained directory: from_pretrained reads it
    if not os.path.isfile(path):
        raise ModelError(f"model.model_path: no weights at {path} (expected a checkpoint directory "
                         f"with config.json, or a state-dict file)")
    return path


def label_config(labels_list):
    """num_labels, id2label and label2id, so saved models name their classes."""
    if len(labels_list) == 1:
        return {"num_labels": 1, "problem_type": "regression"}
    names = [str(label) for label in labels_list]
    return {"num_labels": len(names), "id2label": dict(enumerate(names)),
            "label2id": {name: i for i, name in enumerate(names)},
            "problem_type": "single_label_classification"}


def check_labels(path, labels_list):
    """A fine-tuned checkpoint must have been trained on the same classes, in the same order."""
    config = AutoConfig.from_pretrained(path)
    expected = label_config(labels_list)
    if config.num_labels != expected["num_labels"] or (
            "id2label" in expected
            and [config.id2label[i] for i in range(config.num_labels)] != list(expected["id2label"].values())):
        found = [config.id2label[i] for i in range(config.num_labels)]
        raise ModelError(f"{path} was trained with labels {found}, but data.labels_list is "
                         f"{labels_list}: use the labels_list of that training run")


def first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def corrupt_weights(name, error):
    """A .safetensors file safetensors cannot read: cut short by a full disk or an interrupted copy."""
    return ModelError(f"{name} is truncated or corrupt ({first_line(error)}): re-export it or pick "
                      f"another checkpoint")


def head_labels(source):
    """The number of labels of source's sequence-classification head; None for a bare encoder."""
    config = AutoConfig.from_pretrained(source)
    if any(name.endswith("ForSequenceClassification") for name in config.architectures or ()):
        return config.num_labels
    return None


def from_pretrained(source, key, **kwargs):
    """AutoModelForSequenceClassification.from_pretrained, its errors as one line.

    A classifier fine-tuned on other classes is a common starting point: when kwargs ask for another
    num_labels than source's head has, the head is re-initialised (as the Hugging Face examples do
    with ignore_mismatched_sizes) and the rest of the model loaded.
    """
    try:
        old, new = head_labels(source), kwargs.get("num_labels")
        if old is not None and new is not None and old != new:
            print(f"warning: {key} {source!r} has a {old}-label classification head; it is replaced "
                  f"by a new, untrained {new}-label head (data.labels_list)", file=sys.stderr)
            kwargs["ignore_mismatched_sizes"] = True
        return AutoModelForSequenceClassification.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(f"{key} {source!r}: cannot load a model there ({first_line(e)})") from None
    except SafetensorError as e:
        path = os.path.join(source, "model.safetensors")
        name = path if os.path.isfile(path) else f"a .safetensors file of {source}"
        raise corrupt_weights(f"{key}: {name}", e) from None


def build_model(model_cfg, labels_list, **kwargs):
    """The classifier to train or evaluate, with fine-tuned weights when model.model_path is set.

    Extra keyword arguments go to from_pretrained (for example attn_implementation="eager").
    """
    checkpoint_dir = model_cfg["model_path"] if weights_file(model_cfg) is None else None
    if is_pretrained_dir(checkpoint_dir):
        check_labels(checkpoint_dir, labels_list)
        model = from_pretrained(checkpoint_dir, "model.model_path", **kwargs)
    else:
        model = from_pretrained(model_cfg["hf_model"], "model.hf_model", **label_config(labels_list),
                                **kwargs)
        path = weights_file(model_cfg)
        if path is not None:
            load_weights(model, path)
    return model


def read_state_dict(path):
    if path.endswith(".safetensors"):
        try:
            return load_file(path)
        except SafetensorError as e:
            raise corrupt_weights(path, e) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(f"{path}: not a readable state-dict file ({type(e).__name__})") from None
    # training frameworks nest the weights one level down
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def strip_prefixes(state, model_keys):
    """Drop wrapper prefixes from keys the model does not know until they match."""
    clean = {}
    for key, tensor in state.items():
        name = key
        while name not in model_keys and name.startswith(WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        clean[name if name in model_keys else key] = tensor
    return clean


def load_weights(model, path):
    """Load a state-dict file into model; every weight of the model must be found."""
    expected = model.state_dict()
    state = strip_prefixes(read_state_dict(path), set(expected))
    check_shapes(path, state, expected, model.config.num_labels)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing:
        raise ModelError(f"{path}: {len(missing)} weights of the model are missing from the file "
                         f"(first: {missing[0]}); is it a state dict of this architecture "
                         f"(model.hf_model)?")
    if unexpected:
        print(f"note: {path}: ignored {len(unexpected)} weights the model does not use "
              f"(first: {unexpected[0]})")


def check_shapes(path, state, expected, num_labels):
    """Every weight of the file the model uses must have the model's shape (load_state_dict raises)."""
    for name, tensor in state.items():
        want = expected.get(name)
        if want is None or tensor.shape == want.shape:
            continue
        # a head trained on other classes differs in its first dimension only
        if want.dim() > 0 and want.shape[0] == num_labels and tensor.shape[1:] == want.shape[1:]:
            hint = (f"the file's head has {tensor.shape[0]} labels, data.labels_list {num_labels}: "
                    f"use the labels_list of that training run")
        else:
            hint = "is it a state dict of this architecture (model.hf_model)?"
        raise ModelError(f"{path}: {name} has shape {list(tensor.shape)} in the file, the model expects "
                         f"{list(want.shape)}; {hint}")


def load_tokenizer(model_cfg):
    """model.tokenizer_path, else the fine-tuned checkpoint's own tokenizer, else model.hf_model."""
    path, key = model_cfg["tokenizer_path"], "model.tokenizer_path"
    if path is None and is_pretrained_dir(model_cfg["model_path"]) and any(
            os.path.isfile(os.path.join(model_cfg["model_path"], f))
            for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        path, key = model_cfg["model_path"], "model.model_path"
    if path is None:
        path, key = model_cfg["hf_model"], "model.hf_model"
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelError(f"{key} {path!r}: cannot load a tokenizer there ({first_line(e)})") from None


def unwrap_model(model):
    """The plain model inside DDP and torch.compile wrappers (what checkpoints must hold)."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_pretrained(model, tokenizer, directory):
    """A directory that AutoModelForSequenceClassification / AutoTokenizer load directly."""
    unwrap_model(model).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
