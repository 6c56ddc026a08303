"""LoRA: low-rank adapters on the linear layers of a frozen encoder, written out by hand.

    lora.add_adapters(model, cfg["model"], say=print)   # model.lora_rank > 0: in place, before DDP
    state = lora.merged_state_dict(model)               # the plain model's weights (model.save_pretrained)
    lora.save_adapter(model, folder)                    # what trains (adapters, head), for resume
    lora.load_adapter(model, folder)

An adapted linear layer keeps its pretrained weight W (out x in) and bias b frozen and learns a
low-rank change of W (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"):
    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T,    A: r x in,  B: out x r
B starts at zero, so training starts from the pretrained model; A starts random, so B's gradient
is not zero. Only A and B learn in the encoder; the head (the classifier, new for the task) learns
fully, and so do the embeddings with model.lora_train_embeddings. AdamW then keeps moments for a
small share of the parameters, which is what makes a LoRA checkpoint's training state small.
Merging W + (alpha / r) B A gives a plain linear layer again: checkpoints hold the merged weights,
so transformers, pipeline() and export.py load them without knowing about LoRA, and the adapter
file beside them (ADAPTER_FILE: A, B and the head) is what a resume loads onto the frozen weights.

model.lora_targets names the linear layers adapted, by name or dotted suffix of a module name
(`query`, `attention.self.query`); null means the attention projections of the architecture
(ATTENTION_PROJECTIONS). A fused projection (ModernBERT's Wqkv, q, k and v in one matrix) is one
linear layer, so it gets one adapter. Only layers inside the encoder (model.base_model) are adapted.
"""
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from checkpoint import CheckpointError
from config import ConfigError
from files import first_line

ADAPTER_FILE = "adapter.safetensors"
# model_type -> the linear layers of its attention that LoRA adapts by default
ATTENTION_PROJECTIONS = {
    "bert": ["query", "key", "value"], "roberta": ["query", "key", "value"],
    "xlm-roberta": ["query", "key", "value"], "electra": ["query", "key", "value"],
    "modernbert": ["Wqkv"], "deberta-v2": ["query_proj", "key_proj", "value_proj"],
    "distilbert": ["q_lin", "k_lin", "v_lin"], "mpnet": ["q", "k", "v"],
}


class LoRALinear(nn.Module):
    """A linear layer with its pretrained weight and bias frozen, plus the low-rank change
    scale * B A that trains. The weight and bias keep their names (query.weight, query.bias), so
    the model's state dict reads as the plain model's, plus lora_A and lora_B."""

    def __init__(self, base, rank, alpha, dropout):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **like))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear draws its weight, and the paper's code A
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.merged:  # the change is in the weight already
            return y
        return y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale

    def delta(self):
        """The change of the weight that the adapter makes: scale * B A (out x in)."""
        return (self.lora_B @ self.lora_A) * self.scale

    def merged_weight(self):
        """W + scale * B A, a new tensor: the training weights are left as they are."""
        with torch.no_grad():
            return self.weight.detach().clone() if self.merged else self.weight + self.delta()

    def merge(self):
        """Fold the change into the weight (faster inference); unmerge takes it out again, up to rounding."""
        if not self.merged:
            with torch.no_grad():
                self.weight += self.delta()
            self.merged = True

    def unmerge(self):
        if self.merged:
            with torch.no_grad():
                self.weight -= self.delta()
            self.merged = False

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, rank={self.lora_A.shape[0]}, scale={self.scale}"


def targets_of(encoder, targets):
    """[(module name, parent module, attribute, linear layer)] of encoder's nn.Linear layers named by
    targets (a name or a dotted suffix of the module's name); ConfigError for a target matching none."""
    found, matched = [], set()
    for name, module in encoder.named_modules():
        hits = [t for t in targets if name == t or name.endswith("." + t)]
        if hits and isinstance(module, nn.Linear):
            parent_name, _, attribute = name.rpartition(".")
            found.append((name, encoder.get_submodule(parent_name), attribute, module))
            matched.update(hits)
    missing = [t for t in targets if t not in matched]
    if missing:
        names = sorted({n.rpartition(".")[2] for n, m in encoder.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(f"model.lora_targets {missing} names no linear layer of {type(encoder).__name__}; "
                          f"its linear layers are named {names}")
    return found


def add_adapters(model, model_cfg, say=print):
    """Freeze model's encoder and put a LoRALinear of model.lora_rank in place of each targeted
    linear layer; the head (what is outside model.base_model) stays trainable, and the embeddings
    with model.lora_train_embeddings. In place; returns model."""
    encoder = model.base_model
    targets = model_cfg["lora_targets"]
    if targets is None:
        targets = ATTENTION_PROJECTIONS.get(model.config.model_type)
        if targets is None:
            raise ConfigError(f"model.lora_targets is null, and LoRA knows no default attention projections for "
                              f"model type {model.config.model_type!r}; name its linear layers, e.g. [query, value]")
    encoder.requires_grad_(False)
    layers = targets_of(encoder, targets)
    for _, parent, attribute, linear in layers:
        adapter = LoRALinear(linear, model_cfg["lora_rank"], model_cfg["lora_alpha"], model_cfg["lora_dropout"])
        setattr(parent, attribute, adapter.train(linear.training))  # in the model's mode (its dropout)
    if model_cfg["lora_train_embeddings"]:  # the whole embedding block: tokens, positions, its norm
        embeddings = getattr(encoder, "embeddings", None)
        (encoder.get_input_embeddings() if embeddings is None else embeddings).requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    say(f"note: LoRA rank {model_cfg['lora_rank']} (alpha {model_cfg['lora_alpha']}, dropout "
        f"{model_cfg['lora_dropout']}) on {len(layers)} linear layers ({', '.join(targets)}); "
        f"{trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters train: the adapters, the head"
        + ", the embeddings" * model_cfg["lora_train_embeddings"])
    return model


def adapted(model):
    """True if model holds LoRA adapters."""
    return any(isinstance(m, LoRALinear) for m in model.modules())


def merged_state_dict(model):
    """model's state dict as the plain model has it: each adapted layer's weight merged (W + scale * B A),
    no lora_A / lora_B; None for a model without adapters."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not layers:
        return None
    state = {k: v for k, v in model.state_dict().items() if not k.rpartition(".")[2].startswith("lora_")}
    for name, layer in layers.items():
        state[f"{name}.weight"] = layer.merged_weight()
    return state


def trainable_state(model):
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def save_adapter(model, folder):
    """ADAPTER_FILE in folder: every parameter of model that trains (the adapters, the head, a
    distillation projection), by name; the frozen rest is the model it was built from (model.hf_model
    or model.model_path), which a resume builds again."""
    save_file({name: p.detach().contiguous() for name, p in trainable_state(model).items()},
              str(Path(folder) / ADAPTER_FILE), metadata={"format": "pt"})


def load_adapter(model, folder):
    """The trained parameters of model from folder's ADAPTER_FILE; they must be the ones model trains."""
    path = Path(folder) / ADAPTER_FILE
    try:
        saved = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{path}: cannot read the LoRA adapter ({first_line(e)[:200]}); resume from "
                              f"another checkpoint") from None
    trainable = trainable_state(model)
    differ = sorted(set(saved) ^ set(trainable)) or [n for n in trainable if saved[n].shape != trainable[n].shape]
    if differ:
        raise CheckpointError(f"{path}: not the parameters this model trains (first difference: {differ[0]}); "
                              f"resume with the model.lora_* settings that wrote it")
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(saved[name])


def check_frozen(classifier, weights_file):
    """CheckpointError unless classifier, its adapters loaded, merges to the weights_file its
    checkpoint saved: the frozen weights under the adapters must be the ones it trained on (a
    model.hf_model folder replaced since would resume another model without a word)."""
    try:
        saved = load_file(str(weights_file))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{weights_file}: cannot read it ({first_line(e)[:200]})") from None
    for name, tensor in merged_state_dict(classifier).items():
        if name in saved and not torch.allclose(saved[name], tensor.detach().cpu(), rtol=1e-5, atol=1e-6):
            raise CheckpointError(f"{weights_file}: {name} is not the frozen weight plus its adapter: the model it "
                                  f"was trained from (model.hf_model, model.model_path) has changed since; resume "
                                  f"with those files, or start a new run from this checkpoint's weights")
