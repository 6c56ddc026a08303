"""Speed tricks: the same model and the same arithmetic, less work. Measurements: bench/README.md.

    if cfg["trainer"]["speedups"]:        # trainer.run and distill.run
        speedups.apply(model, device)     # in place, before DDP / torch.compile wrap the model

With trainer.speedups off nothing here runs: the model stays as transformers built it. With it on:
  first position   the last encoder layer of a BERT or RoBERTa classifier computes its query,
                   attention output and feed-forward at the first token only, the one its head
                   reads (keys and values still at every token, as that token attends to all).
                   The encoder called on its own (model.bert(...)) and hooks on that layer see
                   (batch, 1, hidden); a call asking for output_hidden_states or
                   output_attentions gets the whole layer.
  cpu dropout      on a CPU, dropout masks (every nn.Dropout's and the attention's) are drawn
                   from 31-bit random integers, a fraction of the work of torch's bernoulli_.
Other architectures: first position is off for every classifier but those two exact classes
(XLM-R, ModernBERT, DeBERTa, EuroBERT, GTE and subclasses pool or lay out their layers otherwise),
and under flash or flex attention the layer computes as plain. CPU dropout applies to any model; its
sdpa variant falls back to plain sdpa where a layer passes more (ModernBERT's sliding window) or
shares keys between heads (EuroBERT); tests/test_encoders.py checks both exact on those five.
Both change only the classes of existing modules, to subclasses defined here, so weights, their
names, pickling (torch.save(model) / pickle) and save_pretrained checkpoints stay as they were;
config.json never names the attention function below, so checkpoints load in plain transformers.
"""
import functools

import torch
from transformers import (
    AttentionInterface,
    BertForSequenceClassification,
    PreTrainedModel,
    RobertaForSequenceClassification,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bert import modeling_bert
from transformers.models.roberta import modeling_roberta


def apply(model, device):
    """Every speed trick that fits model (a classifier, or a module holding some) on device; in place."""
    first_position_last_layer(model)
    if torch.device(device).type == "cpu":  # CUDA's fused dropout kernel needs no help
        use_cpu_dropout(model)
    return model


# ---------------------------------------------------------------------------------------------
# first position: the last layer of a [CLS]-pooled classifier


class FirstPositionLayer:
    """An encoder layer's forward that returns the first position only: (batch, 1, hidden).

    Mixed into a transformers layer class below; layers change to it by __class__, so the
    weights, their names and pickling are the plain layer's. Falls back to the whole layer
    (super().forward) when a caller asks for every position's output or attention weights, or
    for an attention implementation whose masks this does not slice (flash attention's).
    """

    eager_attention = None  # the model file's own eager attention, for config "eager"

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        attention = self.attention.self
        config = attention.config
        # the model passes output_hidden_states / output_attentions down to its layers
        wants_all = any(kwargs.get(key, getattr(config, key)) for key in ("output_hidden_states", "output_attentions"))
        if (wants_all or config._attn_implementation not in ("eager", "sdpa", CPU_DROPOUT_ATTENTION)
                or (attention_mask is not None and attention_mask.dim() != 4)):
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
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
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, self.eager_attention)
        context, _ = attend(attention, query, key, value, attention_mask, scaling=attention.scaling,
                            dropout=attention.dropout.p if attention.training else 0.0, **kwargs)
        attention_output = self.attention.output(context.reshape(batch, 1, -1), first)
        return self.output(self.intermediate(attention_output), attention_output)


class FirstPositionBertLayer(FirstPositionLayer, modeling_bert.BertLayer):
    eager_attention = staticmethod(modeling_bert.eager_attention_forward)


class FirstPositionRobertaLayer(FirstPositionLayer, modeling_roberta.RobertaLayer):
    eager_attention = staticmethod(modeling_roberta.eager_attention_forward)


# classifier -> (its plain layer class, the first-position one); exact classes, since a subclass
# may pool otherwise than by the first token
FIRST_POSITION = {
    BertForSequenceClassification: (modeling_bert.BertLayer, FirstPositionBertLayer),
    RobertaForSequenceClassification: (modeling_roberta.RobertaLayer, FirstPositionRobertaLayer),
}


def first_position_last_layer(model):
    """The last encoder layer of every BERT / RoBERTa classifier in model computes position 0 only.

    Its head reads the last layer at the first token and nowhere else, so this gives the same
    logits and gradients as the plain layer. Decoders (causal attention) are left alone.
    """
    for module in model.modules():
        plain, fast = FIRST_POSITION.get(type(module), (None, None))
        if plain is None or module.config.is_decoder:
            continue
        layer = module.base_model.encoder.layer[-1]
        if type(layer) is plain:  # a layer already switched (or another class) is left as it is
            layer.__class__ = fast
    return model


# ---------------------------------------------------------------------------------------------
# cpu dropout


def cpu_dropout(x, p):
    """Training-time dropout of x with masks drawn from 31-bit random integers (see CPUDropout)."""
    if p == 1:
        return torch.zeros_like(x)
    # random_() on int32 is uniform on [0, 2^31): below p * 2^31 with probability p
    keep = torch.empty(x.shape, dtype=torch.int32, device=x.device).random_() >= round(p * 2 ** 31)
    return x * keep.to(x.dtype).mul_(1 / (1 - p))  # autograd keeps this scaled mask for the backward


class CPUDropout(torch.nn.Dropout):
    """nn.Dropout with the same masks in distribution, drawn with cpu_dropout.

    Each element is kept with probability 1 - p and scaled by 1 / (1 - p), as in nn.Dropout. torch
    draws CPU dropout masks with bernoulli_, one random float at a time; 31-bit random integers
    compared with a threshold are cheaper. The generator is torch's default one, so seeding and
    checkpointed RNG state cover it.
    """

    def forward(self, x):
        return cpu_dropout(x, self.p) if self.training and self.p > 0 else x

    def __setstate__(self, state):
        super().__setstate__(state)
        register_attention()  # a model unpickled in a fresh process may name sdpa_cpu_dropout


CPU_DROPOUT_ATTENTION = "sdpa_cpu_dropout"


def sdpa_cpu_dropout_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                               **kwargs):
    """transformers' "sdpa" attention, but dropout on the attention probabilities uses cpu_dropout.

    Models call their attention function with dropout = attention_probs_dropout_prob in training
    only. SDPA's CPU kernels have no dropout, so in training torch falls back to its math path and
    draws the mask with bernoulli_; this is that math path with cpu_dropout's mask instead.
    Evaluation, CUDA, causal and grouped-query attention, or extra arguments such as a position
    bias: plain sdpa.
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


@functools.cache
def register_attention():
    """Register sdpa_cpu_dropout_attention with transformers, once a process, when first needed.

    It gets a name of its own with sdpa's masks (a name without a mask function would get none).
    """
    AttentionInterface.register(CPU_DROPOUT_ATTENTION, sdpa_cpu_dropout_attention)
    AttentionMaskInterface.register(CPU_DROPOUT_ATTENTION, sdpa_mask)


def use_cpu_dropout(model):
    """Draw model's dropout masks with cpu_dropout (same p, same modules, weights untouched).

    Every nn.Dropout becomes a CPUDropout, and every transformers model inside on sdpa attention
    (a distillation student and teacher, say) moves to sdpa_cpu_dropout_attention, which is sdpa
    except for the attention dropout in training.
    """
    register_attention()
    for module in model.modules():
        if type(module) is torch.nn.Dropout:
            module.__class__ = CPUDropout  # no state of its own: only forward differs
        if isinstance(module, PreTrainedModel) and module.config._attn_implementation == "sdpa":
            module.set_attn_implementation(CPU_DROPOUT_ATTENTION)
    return model
