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
"""
import os
import sys
import types

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import (AttentionInterface, AutoConfig, AutoModelForSequenceClassification, AutoTokenizer,
                          PreTrainedModel)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bert.modeling_bert import eager_attention_forward
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


def cpu_dropout(x, p):
    """Training-time dropout of x with masks drawn from 31-bit random integers (see CPUDropout)."""
    if p == 1:
        return torch.zeros_like(x)
    # random_() on int32 is uniform on [0, 2^31): below p * 2^31 with probability p
    keep = torch.empty(x.shape, dtype=torch.int32, device=x.device).random_() >= round(p * 2 ** 31)
    return x * keep.to(x.dtype).mul_(1 / (1 - p))  # autograd keeps this scaled mask for the backward


class CPUDropout(torch.nn.Dropout):
    """nn.Dropout with the same masks in distribution, drawn faster on a CPU.

    Each element is kept with probability 1 - p and scaled by 1 / (1 - p), as in nn.Dropout. torch
    draws CPU dropout masks with bernoulli_, one random float at a time; 31-bit random integers
    compared with a threshold cost a fraction of that. With the attention's dropout (below) a whole
    MiniLM training step is about 6% faster (bench/README.md). On CUDA torch's fused dropout kernel
    is already fast: CPU only.
    The generator is torch's default one, so seeding and checkpointed RNG state cover it.
    """

    def forward(self, x):
        return cpu_dropout(x, self.p) if self.training and self.p > 0 else x


CPU_DROPOUT_ATTENTION = "sdpa_cpu_dropout"


def sdpa_cpu_dropout_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                               **kwargs):
    """transformers' "sdpa" attention, but dropout on the attention probabilities uses cpu_dropout.

    Models call their attention function with dropout = attention_probs_dropout_prob in training
    only. SDPA's CPU kernels have no dropout, so in training torch falls back to its math path and
    draws the mask with bernoulli_; this is that math path with cpu_dropout's mask instead (a
    MiniLM training step about 2.5% faster, bench/README.md). Evaluation, CUDA, causal and
    grouped-query attention, or extra arguments such as a position bias: plain sdpa.
    """
    plain = (dropout == 0 or query.device.type != "cpu" or getattr(module, "is_causal", False)
             or query.shape[1] != key.shape[1] or any(v is not None for v in kwargs.values()))
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    scores = torch.matmul(query, key.transpose(2, 3)) * (scaling or query.shape[-1] ** -0.5)
    if attention_mask is not None and attention_mask.dtype == torch.bool:  # True: may attend
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    elif attention_mask is not None:  # an additive float mask
        scores = scores + attention_mask
    probs = cpu_dropout(scores.softmax(dim=-1), dropout)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


# registered under a name of its own with sdpa's masks (a name without a mask function would get none)
AttentionInterface.register(CPU_DROPOUT_ATTENTION, sdpa_cpu_dropout_attention)
AttentionMaskInterface.register(CPU_DROPOUT_ATTENTION, sdpa_mask)


def use_cpu_dropout(model):
    """Draw model's dropout masks with cpu_dropout (same p, weights untouched).

    Every nn.Dropout becomes a CPUDropout, and every transformers model inside on sdpa attention
    (a distillation student and teacher, say) moves to sdpa_cpu_dropout_attention, which is sdpa
    except for the attention dropout in training.
    """
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Dropout:
                setattr(module, name, CPUDropout(child.p, child.inplace))
        if isinstance(module, PreTrainedModel) and module.config._attn_implementation == "sdpa":
            module.set_attn_implementation(CPU_DROPOUT_ATTENTION)
    return model


# Classifiers whose head reads only the first token ([CLS] / <s>) of the encoder's last layer
CLS_POOLED = ("BertForSequenceClassification", "RobertaForSequenceClassification")


def cls_only_last_layer(model):
    """Let the last encoder layer of every [CLS]-pooled classifier in model compute position 0 only.

    The classification head reads the last layer's output at the first token and nowhere else, so
    of that layer only the keys and values are needed at every position (the first token attends
    to all of them); its query, attention output, feed-forward and LayerNorms are needed at
    position 0 alone. For the 6-layer MiniLM that skips 14% of the encoder's matmul work in
    training and evaluation, with the same logits and gradients. A call that asks for
    output_hidden_states or output_attentions (distillation's hidden-state losses) gets the whole
    layer. Calling the encoder on its own (model.bert(...)) also gets the first position only.
    Weights and saved checkpoints are untouched.
    """
    for module in list(model.modules()):
        if type(module).__name__ in CLS_POOLED and not module.config.is_decoder:
            layer = module.base_model.encoder.layer[-1]
            layer.forward = types.MethodType(cls_only_layer_forward, layer)  # this instance only
    return model


def cls_only_layer_forward(layer, hidden_states, attention_mask=None, *args, **kwargs):
    """A BERT encoder layer's forward for the first position only; output (batch, 1, hidden)."""
    attention = layer.attention.self
    config = attention.config
    # the model passes output_hidden_states / output_attentions down to its layers
    wants_all = any(kwargs.get(key, getattr(config, key)) for key in ("output_hidden_states", "output_attentions"))
    if (wants_all or config._attn_implementation not in ("eager", "sdpa", CPU_DROPOUT_ATTENTION)
            or (attention_mask is not None and attention_mask.dim() != 4)):  # flash's 2-d masks: not here
        return type(layer).forward(layer, hidden_states, attention_mask, *args, **kwargs)
    for unused in ("cache", "encoder_attention_mask"):  # the layer's arguments (None in an encoder)
        kwargs.pop(unused, None)
    batch = hidden_states.shape[0]
    first = hidden_states[:, :1]

    def heads(x):  # (batch, positions, hidden) -> (batch, heads, positions, head size)
        return x.view(batch, x.shape[1], -1, attention.attention_head_size).transpose(1, 2)

    query = heads(attention.query(first))  # one query a sequence: the first token's
    key, value = heads(attention.key(hidden_states)), heads(attention.value(hidden_states))
    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :1]  # the first query's row: which keys it may see
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)
    context, _ = attend(attention, query, key, value, attention_mask, scaling=attention.scaling,
                        dropout=attention.dropout.p if attention.training else 0.0, **kwargs)
    attention_output = layer.attention.output(context.reshape(batch, 1, -1), first)
    return layer.output(layer.intermediate(attention_output), attention_output)


def save_pretrained(model, tokenizer, directory):
    """A directory that AutoModelForSequenceClassification / AutoTokenizer load directly."""
    unwrap_model(model).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
