r"""Knowledge distillation: train a smaller, faster student from a fine-tuned teacher.

The teacher is the model of the `model` section (normally a trainer.py checkpoint, model.model_path);
the student and the loss come from the `distill` section. Data, optimizer, schedule, DDP / AMP,
logging and checkpoints are trainer.py's: this file adds a student, a frozen teacher and a loss, and
hands them to trainer.Trainer.

    python trainer.py --trainer.epochs 4 --ckpt.model_state_save_dir checkpoints/teacher      # 1. teacher
    python distill.py --config_path configs/distill.yaml \
        --model.model_path checkpoints/teacher/best --distill.student_layers [0,2,5] \
        --ckpt.model_state_save_dir checkpoints/student-3l                                     # 2. student
    torchrun --nproc_per_node 2 distill.py --config_path configs/distill.yaml ...
    python trainer.py --data.train_filepath null --data.val_filepath data/tweets/test.csv \
        --model.model_path checkpoints/student-3l/best                                         # 3. evaluate

Students: a depth cut of the teacher (distill.student_layers: the teacher's encoder layers to keep,
0-based, in order, with its embeddings, pooler and classifier; per-layer config lists such as
ModernBERT's layer_types follow the kept layers, and the student is what plain transformers builds
from its config.json), or another architecture or size (distill.student_model and / or
distill.student_config overrides, pretrained or random init).
With model.lora_rank set, the student trains LoRA adapters (lora.py) and its head, its encoder
frozen; the teacher is used as it is (a LoRA checkpoint is a plain folder, its adapters merged).

Tokenizers: the student reads the teacher's tokens unless it brings its own tokenizer
(distill.student_tokenizer, else distill.student_model's folder's, where its vocabulary differs from
the teacher's: a RoBERTa teacher and a MiniLM student). Then every training row is tokenized twice,
through the token cache: by the teacher's tokenizer, once, for the teacher's logits before step 1,
and by the student's for training, evaluation and the student's checkpoint. The targets are per
example, so the logits and labels losses need nothing more; hidden_states and attentions compare
token by token and are refused. With data.long_texts windows, which cut a document differently in
each tokenizer, the teacher's windows are pooled to one logit per document (data.window_pool) and
every student window of that document learns it.

Losses (distill.loss_types, weighted by distill.loss_weights; each summed over examples, as
Trainer expects, and logged on its own as train/<type>, unweighted):
  logits         T^2 * KL(p_teacher || p_student), p = softmax(logits / T), batch mean, float32
  labels         cross-entropy with the gold labels (rows without a label are skipped)
  hidden_states  MSE over non-padding tokens, per example, averaged over the mapped layers;
                 a learned linear projection maps the student's width to the teacher's if they differ
  attentions     MSE between attention probabilities over non-padding (query, key) pairs;
                 eager attention, the student's attention dropout off; heads averaged if counts differ
Layer maps: hidden_states has L+1 entries (0 = the embeddings, i = the output of layer i), attentions
has L (i = layer i, 0-based, no embedding slot). distill.hidden_state_map lists, for each student
hidden state, the teacher hidden state it learns; distill.attention_map, for each student layer, the
teacher layer. The default is uniform: hidden state i <- teacher i * Lt / Ls (3 of 12: 0, 4, 8, 12),
attention layer i <- teacher (i + 1) * Lt / Ls - 1 (3 of 12: 3, 7, 11).

Unlabelled transfer data (distill.unlabeled_filepaths, text column data.text_a_col): their rows get
label -1 (NaN for regression) and learn from the teacher only; the labels loss skips them, and since
Trainer averages over all examples of a step, the labels term is diluted by the unlabelled share.
"""
import sys

# --help needs only config.yaml: answer it before torch is imported, which takes seconds
if __name__ == "__main__" and ("-h" in sys.argv[1:] or "--help" in sys.argv[1:]):
    from config import print_help
    print_help(__doc__)
    sys.exit(0)

import copy
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification

import lora
import speedups
from config import ConfigError, task_of
from data import Encoded
from evaluation import document_logits, predict_logits
from files import first_line
from model import (
    ModelError,
    build_model,
    check_attention_device,
    check_custom_code,
    check_positions,
    from_pretrained,
    is_pretrained_dir,
    label_config,
    load_tokenizer,
    read_tokenizer,
)
from processes import on_main, per_rank_batch
from splits import Split, check_max_seq_len, class_weights, prepare_run, read_split, tokenize, training_split
from trainer import Trainer, fit, task_loss
from trainer import main as trainer_main

LOSS_TYPES = ("logits", "labels", "hidden_states", "attentions")
ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout")


def check_distill_config(cfg):
    """Distillation values that are well typed but cannot work, caught before anything is built."""
    d = cfg["distill"]
    unknown = [t for t in d["loss_types"] if t not in LOSS_TYPES]
    if not d["loss_types"] or unknown or len(set(d["loss_types"])) != len(d["loss_types"]):
        raise ConfigError(f"distill.loss_types {d['loss_types']}: list each of {list(LOSS_TYPES)} at most once")
    if len(d["loss_weights"]) != len(d["loss_types"]):
        raise ConfigError(f"distill.loss_weights {d['loss_weights']} needs one weight per loss type "
                          f"{d['loss_types']}")
    if d["temperature"] <= 0:
        raise ConfigError(f"distill.temperature is {d['temperature']}; it must be positive")
    layers = d["student_layers"]
    if layers is not None:
        if not layers or any(not isinstance(i, int) or i < 0 for i in layers) or sorted(set(layers)) != layers:
            raise ConfigError(f"distill.student_layers {layers}: teacher layer indices (from 0), "
                              f"increasing, without repeats")
        if d["student_model"] is not None or d["student_config"] or d["student_tokenizer"] is not None:
            raise ConfigError("distill.student_layers (a depth cut of the teacher, which reads its tokens) excludes "
                              "distill.student_model, distill.student_config and distill.student_tokenizer; "
                              "set one or the other")
    elif d["student_model"] is None and not d["student_config"]:
        raise ConfigError("no student: set distill.student_layers (a depth cut of the teacher, e.g. "
                          "[0,2,4]), distill.student_model, or distill.student_config overrides")
    elif d["student_model"] is None and d["student_pretrained"]:
        raise ConfigError("distill.student_config without distill.student_model builds a resized "
                          "teacher with random weights: set --distill.student_pretrained false")
    if cfg["data"]["train_filepath"] is None:
        raise ConfigError("distill.py trains a student: set data.train_filepath (evaluate students "
                          "with trainer.py)")
    if "attentions" in d["loss_types"] and cfg["model"]["attn_implementation"] not in (None, "eager"):
        raise ConfigError(f"distill.loss_types attentions compares attention probabilities, which only eager attention "
                          f"returns, but model.attn_implementation is {cfg['model']['attn_implementation']}; leave it "
                          f"null or set eager")


# ---------------------------------------------------------------------------------------------
# teacher and student


def build_teacher(cfg, eager, device):
    """The frozen teacher: eval mode, no gradients, on this process's device, never DDP-wrapped."""
    if cfg["model"]["model_path"] is None:
        print("note: model.model_path is null, so the teacher is model.hf_model as it is; "
              "distil from a fine-tuned checkpoint (python trainer.py first)")
    kwargs = {"attn_implementation": "eager"} if eager else {}
    teacher = build_model(cfg["model"], cfg["data"]["labels_list"], multi_label=cfg["data"]["multi_label"], **kwargs)
    teacher.eval().requires_grad_(False)
    return teacher.to(device)


def find_layer_list(model, encoder_key):
    """(attribute path, nn.ModuleList) of the encoder's layers: model.encoder_key, else found."""
    if encoder_key is not None:
        try:
            layers = model.get_submodule(encoder_key)
        except AttributeError:
            layers = None
        if not isinstance(layers, nn.ModuleList):
            raise ModelError(f"model.encoder_key {encoder_key!r} is not a layer list of "
                             f"{type(model).__name__}")
        return encoder_key, layers
    depth = model.config.num_hidden_layers
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) == depth]
    if len(found) != 1:
        lists = [name for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
        raise ModelError(f"cannot find the encoder layer list of {type(model).__name__} "
                         f"({depth} layers; layer lists: {lists or 'none'}); name it with "
                         f"model.encoder_key, e.g. bert.encoder.layer")
    return found[0]


# config lists that are not one entry per layer, even where as long as the encoder is deep
NOT_PER_LAYER = ("architectures", "pos_att_type")


def cut_config(teacher_config, keep, student_kwargs):
    """The teacher's config at depth len(keep): every per-layer list (ModernBERT's layer_types of
    global and sliding attention, any list as long as the encoder is deep) keeps the kept layers'
    entries, so student layer j is built as teacher layer keep[j] was. Checked as transformers
    checks a config it loads, so a cut it could not save is refused before training."""
    config = copy.deepcopy(teacher_config)
    depth = config.num_hidden_layers
    for name in config.to_dict():
        value = getattr(config, name, None)
        if isinstance(value, list) and len(value) == depth and name not in NOT_PER_LAYER:
            setattr(config, name, [value[i] for i in keep])
    config.num_hidden_layers = len(keep)
    for name, value in student_kwargs.items():
        setattr(config, name, value)
    try:
        if hasattr(config, "validate"):
            config.validate()
    except Exception as e:  # transformers' strict dataclass checks raise errors of their own classes
        raise ModelError(f"distill.student_layers {keep}: a {len(keep)}-layer {config.model_type} config is not "
                         f"valid ({first_line(e).strip()}); distil into distill.student_model instead") from None
    return config


def depth_cut(teacher, keep, encoder_key, student_kwargs, say=print):
    """A new model of the teacher's class at depth len(keep) (cut_config), holding copies of the
    teacher's embeddings, pooler and classifier and of its kept layers: teacher layer keep[j]'s
    weights become layer j's, module by module. Where layers differ (ModernBERT's first layer has no
    attention norm), a weight the student's layer has no place for is dropped with a note, and one
    it needs that the teacher's layer lacks is refused: the student is what plain transformers
    builds from its config.json, so it saves, loads and predicts alike anywhere."""
    key, layers = find_layer_list(teacher, encoder_key)
    if keep[-1] >= len(layers):
        raise ConfigError(f"distill.student_layers {keep}: the teacher has {len(layers)} layers (0-{len(layers) - 1})")
    student = type(teacher)(cut_config(teacher.config, keep, student_kwargs))
    rest = {name: tensor for name, tensor in teacher.state_dict().items() if not name.startswith(key + ".")}
    missing, unexpected = student.load_state_dict(rest, strict=False)
    missing = [name for name in missing if not name.startswith(key + ".")]
    if missing or unexpected:
        raise ModelError(f"distill.student_layers {keep}: {type(teacher).__name__} outside its layers differs at "
                         f"{len(keep)} layers ({(missing + unexpected)[0]}); distil into distill.student_model instead")
    dropped = []
    for new, old in enumerate(keep):
        missing, unexpected = student.get_submodule(key)[new].load_state_dict(layers[old].state_dict(), strict=False)
        if missing:
            raise ModelError(f"distill.student_layers {keep}: layer {new} of the student needs {missing[0]}, which teacher "
                             f"layer {old} lacks; keep teacher layer {new} there, or distil into distill.student_model")
        dropped += [f"{key}.{old}.{name}" for name in unexpected]
    if dropped:
        say(f"note: the depth cut drops {', '.join(dropped)}: the student's layer in that place has no such weight "
            f"in {type(teacher).__name__}")
    return student


def other_student(cfg, teacher, student_kwargs, say=print):
    """distill.student_model (pretrained or a random init from its config) with distill.student_config
    overrides; without student_model, the teacher's config resized by those overrides, random init.
    say: where the note of its new head goes (run: the main process's log)."""
    d, labels, trust = cfg["distill"], cfg["data"]["labels_list"], cfg["model"]["trust_remote_code"]
    overrides = {**label_config(labels, cfg["data"]["multi_label"]), **d["student_config"], **student_kwargs}
    attn_kwargs = {"attn_implementation": "eager"} if "attentions" in d["loss_types"] else {}
    if d["student_model"] is not None and d["student_pretrained"]:
        return from_pretrained(d["student_model"], "distill.student_model", say=say, trust=trust, **overrides, **attn_kwargs)
    if d["student_model"] is None:
        config = copy.deepcopy(teacher.config)
        for name, value in overrides.items():
            setattr(config, name, value)
    else:
        check_custom_code(d["student_model"], "distill.student_model", trust)
        try:
            config = AutoConfig.from_pretrained(d["student_model"], trust_remote_code=trust, **overrides)
        except (OSError, ValueError) as e:
            raise ModelError(f"distill.student_model {d['student_model']!r}: no config there ({first_line(e)})") from None
    return AutoModelForSequenceClassification.from_config(config, trust_remote_code=trust, **attn_kwargs)


def build_student(cfg, teacher, tokenizer, say=print):
    """The student: a depth cut of the teacher or another model; attention dropout off for the
    attentions loss (the saved config keeps the original value, for later fine-tuning).
    tokenizer: the one the student reads (its own, or the teacher's)."""
    d = cfg["distill"]
    student_kwargs = {}
    if "attentions" in d["loss_types"]:
        student_kwargs = {k: 0.0 for k in ATTENTION_DROPOUT_KEYS if hasattr(teacher.config, k)}
    if d["student_layers"] is not None:
        student = depth_cut(teacher, d["student_layers"], cfg["model"]["encoder_key"], student_kwargs, say)
        original = teacher.config
    else:
        student = other_student(cfg, teacher, student_kwargs, say)
        original = None
        check_vocabulary(student, tokenizer)
    for name in student_kwargs:  # the modules are built with dropout 0; the saved config keeps its value
        if original is not None and hasattr(original, name):
            setattr(student.config, name, getattr(original, name))
    return student


def check_vocabulary(student, tokenizer):
    """Every token id the student's tokenizer gives must have a row in the student's embeddings."""
    if student.config.vocab_size < len(tokenizer):
        raise ModelError(f"the student's vocabulary ({student.config.vocab_size}) is smaller than its "
                         f"tokenizer's ({len(tokenizer)}); give the student its own tokenizer "
                         f"(distill.student_tokenizer) or a vocab_size of {len(tokenizer)} (distill.student_config)")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


def student_tokenizer(cfg, teacher_tokenizer):
    """(the student's own tokenizer, the key naming it), or (None, None) when the student reads the
    teacher's tokens: distill.student_tokenizer, else the tokenizer in distill.student_model's
    folder, unless its vocabulary is the teacher's."""
    d = cfg["distill"]
    path, key = d["student_tokenizer"], "distill.student_tokenizer"
    folder = d["student_model"]
    if path is None and is_pretrained_dir(folder) and any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES):
        path, key = folder, "distill.student_model"
    if path is None:
        return None, None
    own = read_tokenizer(path, key, cfg.get("model", {}).get("trust_remote_code", False))  # a partial cfg (tools): false
    if own.get_vocab() == teacher_tokenizer.get_vocab():
        return None, None  # one vocabulary: the student reads the teacher's tokens, as a depth cut does
    return own, f"{key} {path!r}"


def check_two_tokenizers(cfg, tokenizer, source):
    """What a student with its own tokenizer cannot do, refused before anything is computed."""
    d = cfg["distill"]
    aligned = [t for t in d["loss_types"] if t in ("hidden_states", "attentions")]
    if aligned:
        raise ConfigError(f"distill.loss_types {d['loss_types']}: the student reads its own tokenizer's tokens "
                          f"({source}), which do not line up with the teacher's, so {' and '.join(aligned)} cannot "
                          f"be compared token by token; drop {' and '.join(aligned)} from distill.loss_types and "
                          f"their weights from distill.loss_weights")
    if "logits" in d["loss_types"] and not d["cache_teacher_logits"]:
        raise ConfigError(f"distill.cache_teacher_logits is false, but a student with its own tokenizer ({source}) "
                          f"learns the teacher's logits computed once, on the teacher's tokens, before step 1; "
                          f"set it true")
    if cfg["module"]["max_seq_len"] > tokenizer.model_max_length:
        raise ConfigError(f"module.max_seq_len is {cfg['module']['max_seq_len']} but the student's tokenizer "
                          f"({source}) takes at most {tokenizer.model_max_length} tokens; lower it, or set "
                          f"distill.student_tokenizer to one that takes more")


class DistillModule(nn.Module):
    """What Trainer trains (and DDP wraps): the student, and the projection of its hidden states
    to the teacher's width when the hidden_states loss needs one. The teacher is not in here."""

    def __init__(self, student, teacher_width, want_hidden, want_attentions):
        super().__init__()
        self.student = student
        self.want_hidden, self.want_attentions = want_hidden, want_attentions
        width = student.config.hidden_size
        self.projection = (nn.Linear(width, teacher_width)
                           if want_hidden and width != teacher_width else nn.Identity())

    def forward(self, **inputs):
        out = self.student(**inputs, output_hidden_states=self.want_hidden,
                           output_attentions=self.want_attentions)
        hidden = [self.projection(h) for h in out.hidden_states] if self.want_hidden else None
        return {"logits": out.logits, "hidden_states": hidden,
                "attentions": out.attentions if self.want_attentions else None}


# ---------------------------------------------------------------------------------------------
# losses: each returns the sum over the batch's examples (Trainer divides by the step's count)


def logits_loss(student_logits, teacher_logits, temperature, multi_label=False):
    """T^2 * KL(p_teacher || p_student) summed over examples (= batchmean x batch size); the T^2
    keeps the gradient scale independent of T. Regression (one output): squared error.
    Multi-label: each label is a yes / no question, p = sigmoid(logit / T), and the KL of the two
    Bernoulli distributions is averaged over the labels (as the labels loss averages its BCE)."""
    s, t = student_logits.float(), teacher_logits.float()
    if multi_label:
        p_teacher = torch.sigmoid(t / temperature)
        # KL(p || q) = BCE(q; p) - BCE(p; p): cross-entropy minus the teacher's own entropy
        kl = (F.binary_cross_entropy_with_logits(s / temperature, p_teacher, reduction="none")
              - F.binary_cross_entropy_with_logits(t / temperature, p_teacher, reduction="none"))
        return temperature ** 2 * kl.mean(dim=1).sum()
    if s.shape[-1] == 1:
        return F.mse_loss(s, t, reduction="sum")
    log_p_student = F.log_softmax(s / temperature, dim=-1)
    log_p_teacher = F.log_softmax(t / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="sum", log_target=True)
    return temperature ** 2 * kl


def labels_loss(student_logits, labels, class_weights=None):
    """The supervised loss with the gold labels (trainer.task_loss: cross-entropy, BCE for
    multi-label, squared error for regression), weighted as module.class_weights says; rows without a
    label (-1, or NaN for regression and multi-label) contribute nothing."""
    logits = student_logits.float()
    if labels.dtype == torch.int64:  # single-label: cross-entropy skips the -1 rows itself
        return task_loss(logits, labels, class_weights)
    known = ~torch.isnan(labels)
    if labels.dim() == 2:
        known = known.all(dim=1)
    return task_loss(logits, torch.nan_to_num(labels), class_weights, known=known)  # any label: the row weighs 0


def hidden_state_loss(student_hidden, teacher_hidden, attention_mask):
    """Per example, the MSE over its non-padding tokens and the hidden width; summed over examples."""
    mask = attention_mask.unsqueeze(-1).float()                       # (batch, tokens, 1)
    squared = (student_hidden.float() - teacher_hidden.float()) ** 2 * mask
    per_example = squared.sum(dim=(1, 2)) / (mask.sum(dim=(1, 2)) * student_hidden.shape[-1])
    return per_example.sum()


def attention_loss(student_attn, teacher_attn, attention_mask):
    """Per example, the MSE of attention probabilities over heads and non-padding (query, key)
    pairs; summed over examples. Heads are averaged first when the counts differ."""
    s, t = student_attn.float(), teacher_attn.float()                 # (batch, heads, query, key)
    if s.shape[1] != t.shape[1]:
        s, t = s.mean(dim=1, keepdim=True), t.mean(dim=1, keepdim=True)
    m = attention_mask.float()
    pairs = (m[:, :, None] * m[:, None, :]).unsqueeze(1)                 # (batch, 1, query, key)
    squared = (s - t) ** 2 * pairs
    per_example = squared.sum(dim=(1, 2, 3)) / (pairs.sum(dim=(1, 2, 3)) * s.shape[1])
    return per_example.sum()


def uniform_map(student_depth, teacher_depth, kind):
    """Default layer map; hidden states have an embedding slot (index 0), attentions do not."""
    if kind == "hidden_states":
        return [i * teacher_depth // student_depth for i in range(student_depth + 1)]
    return [(i + 1) * teacher_depth // student_depth - 1 for i in range(student_depth)]


def layer_map(given, student_depth, teacher_depth, kind):
    """The checked map: entry i = the teacher index that student index i learns."""
    slots = student_depth + 1 if kind == "hidden_states" else student_depth
    top = teacher_depth if kind == "hidden_states" else teacher_depth - 1
    key = "distill.hidden_state_map" if kind == "hidden_states" else "distill.attention_map"
    if given is None:
        return uniform_map(student_depth, teacher_depth, kind)
    if len(given) != slots or any(not isinstance(i, int) or not 0 <= i <= top for i in given):
        raise ConfigError(f"{key} {given}: one teacher index in 0..{top} for each of the student's "
                          f"{slots} {'hidden states (embeddings first)' if kind == 'hidden_states' else 'layers'}")
    return given


class DistillLoss:
    """loss_fn(model, batch, indices) for Trainer: the student's forward through `model`
    (DDP-wrapped or not), the teacher's under no_grad, and the weighted sum of the chosen losses.

    teacher_logits, when given, holds the teacher's logits of every training example (row i for
    example i): with logits / labels losses only, the teacher then never runs during training.
    """

    def __init__(self, cfg, teacher, student, teacher_logits=None, class_weights=None):
        d = cfg["distill"]
        self.teacher, self.temperature = teacher, d["temperature"]
        self.weights = dict(zip(d["loss_types"], d["loss_weights"]))
        s_depth, t_depth = student.config.num_hidden_layers, teacher.config.num_hidden_layers
        self.hidden_map = layer_map(d["hidden_state_map"], s_depth, t_depth, "hidden_states")
        self.attention_map = layer_map(d["attention_map"], s_depth, t_depth, "attentions")
        self.needs_teacher = set(self.weights) != {"labels"}
        self.teacher_logits, self.class_weights = teacher_logits, class_weights
        self.multi_label = cfg["data"]["multi_label"]

    def __call__(self, model, batch, indices=None):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        student = model(**inputs)
        teacher = None
        if self.teacher_logits is not None and indices is not None:  # looked up by example, on the device
            # a non-blocking copy: a blocking one to the GPU waits for its queue to drain
            rows = torch.from_numpy(indices).to(self.teacher_logits.device, non_blocking=True)
            teacher = {"logits": self.teacher_logits[rows]}
        elif self.needs_teacher:
            teacher = self.teacher_outputs(inputs)
        terms, mask = {}, inputs["attention_mask"]
        if "logits" in self.weights:
            terms["logits"] = logits_loss(student["logits"], teacher["logits"], self.temperature, self.multi_label)
        if "labels" in self.weights:
            terms["labels"] = labels_loss(student["logits"], batch["labels"], self.class_weights)
        if "hidden_states" in self.weights:
            terms["hidden_states"] = sum(
                hidden_state_loss(student["hidden_states"][i], teacher["hidden_states"][j], mask)
                for i, j in enumerate(self.hidden_map)) / len(self.hidden_map)
        if "attentions" in self.weights:
            terms["attentions"] = sum(
                attention_loss(student["attentions"][i], teacher["attentions"][j], mask)
                for i, j in enumerate(self.attention_map)) / len(self.attention_map)
        loss = sum(self.weights[name] * value for name, value in terms.items())
        if not {"logits", "labels"} & set(self.weights):
            loss = loss + 0.0 * student["logits"].sum()  # DDP expects a gradient for every parameter
        return loss, terms

    @torch.no_grad()
    def teacher_outputs(self, inputs):
        want_hidden = "hidden_states" in self.weights
        want_attn = "attentions" in self.weights
        out = self.teacher(**inputs, output_hidden_states=want_hidden, output_attentions=want_attn)
        return {"logits": out.logits, "hidden_states": out.hidden_states, "attentions": out.attentions}


def caches_teacher_logits(cfg):
    """The teacher's logits depend only on the tokens: with logits / labels losses alone they can
    be computed once, before training, instead of at every step of every epoch."""
    d = cfg["distill"]
    return d["cache_teacher_logits"] and "logits" in d["loss_types"] and set(d["loss_types"]) <= {"logits", "labels"}


def teacher_logits_of(cfg, proc, teacher, tokenizer, train, student=None):
    """The teacher's logits of every training example, on every rank's device: each rank computes
    its share (as evaluation does), the main process gathers them, and all ranks get the whole.

    student: the student's training examples (data.Encoded) when it has its own tokenizer; train
    then holds the same rows in the teacher's tokens. A text's windows differ between tokenizers,
    so the teacher's windows are pooled per document and each student window gets its document's.
    """
    logits = predict_logits(teacher, train.encoded, cfg["trainer"]["val_batch_size"], tokenizer.pad_token_id,
                            proc, desc="teacher logits")
    logits = on_main(proc, lambda: logits)  # a broadcast of examples x classes floats
    if student is not None:
        logits = document_logits(logits, train.encoded, cfg)
        if len(logits) != student.num_documents:
            raise RuntimeError(f"the teacher's tokens hold {len(logits)} rows, the student's {student.num_documents}")
        if student.documents is not None:
            logits = logits[student.documents]
    return torch.from_numpy(np.ascontiguousarray(logits)).to(proc.device)


def teachers_tokens(cfg, proc, tokenizer):
    """The training rows in the teacher's tokens, in the student's order (the labelled file, then
    distill.unlabeled_filepaths), mapped from or written to the token cache."""
    paths = [(cfg["data"]["train_filepath"], True)] + [(p, False) for p in cfg["distill"]["unlabeled_filepaths"]]
    parts = [tokenize(cfg, proc, tokenizer, path, read_split(cfg, proc, tokenizer, path, need_labels)).encoded
             for path, need_labels in paths]
    return Split(cfg["data"]["train_filepath"], Encoded.concat(parts))


# ---------------------------------------------------------------------------------------------
# unlabelled transfer data


def with_unlabeled(cfg, train, unlabeled):
    """The training split plus the Splits of distill.unlabeled_filepaths, their rows labelled -1
    (single-label) or NaN (regression, and every label of a multi-label row)."""
    if not unlabeled:
        return train
    parts = [split.encoded for split in unlabeled]
    task = task_of(cfg["data"])
    shape = (len(cfg["data"]["labels_list"]),) if task == "multi_label" else ()
    for part in parts:
        part.labels = (np.full((len(part), *shape), -1, dtype=np.int64) if task == "single_label"
                       else np.full((len(part), *shape), np.nan, dtype=np.float32))
    return Split(train.path, Encoded.concat([train.encoded] + parts))


# ---------------------------------------------------------------------------------------------
# the run


def run(cfg, proc):
    """Build teacher and student, then train the student with trainer.py's loop."""
    check_distill_config(cfg)
    check_attention_device(cfg, proc.device)
    per_rank_batch(cfg["trainer"], proc.world_size)  # a config error, before any folder is made
    d = cfg["distill"]
    want_hidden, want_attn = "hidden_states" in d["loss_types"], "attentions" in d["loss_types"]
    teacher_tokenizer = load_tokenizer(cfg["model"])
    own, source = student_tokenizer(cfg, teacher_tokenizer)
    if own is not None:
        check_two_tokenizers(cfg, own, source)
        check_max_seq_len(cfg, teacher_tokenizer)  # prepare_run checks the student's
    if d["student_model"] is not None:  # prepare_run checks the teacher's positions
        check_positions(cfg, d["student_model"], "distill.student_model")

    def build(tokenizer):
        teacher = build_teacher(cfg, eager=want_attn, device=proc.device)
        student = build_student(cfg, teacher, tokenizer, say=proc.say)  # once, not per rank
        if cfg["model"]["lora_rank"]:  # a LoRA student: adapters on its encoder, its head trained fully
            lora.add_adapters(student, cfg["model"], say=proc.say)
        return teacher, student, DistillModule(student, teacher.config.hidden_size, want_hidden, want_attn)
    # the student's tokenizer drives training, evaluation and its checkpoint
    inputs = prepare_run(cfg, proc, build, extra_paths=d["unlabeled_filepaths"],
                         tokenizer=teacher_tokenizer if own is None else own)
    (teacher, student, module), tokenizer, val = inputs.built, inputs.tokenizer, inputs.val
    train = training_split(cfg, proc, with_unlabeled(cfg, inputs.train, inputs.extra))
    cached = None
    if caches_teacher_logits(cfg) and own is None:
        cached = teacher_logits_of(cfg, proc, teacher, tokenizer, train)
    elif caches_teacher_logits(cfg):
        cached = teacher_logits_of(cfg, proc, teacher, teacher_tokenizer, teachers_tokens(cfg, proc, teacher_tokenizer),
                                   student=train.encoded)
    loss_fn = DistillLoss(cfg, teacher, student, teacher_logits=cached,
                          class_weights=class_weights(cfg, train, proc.device, say=proc.say))
    if cfg["trainer"]["speedups"]:  # after the teacher's logits, which the plain modules computed
        speedups.apply(teacher, proc.device)
        speedups.apply(module, proc.device)
    proc.say(f"distillation: teacher {teacher.config.num_hidden_layers} layers x "
             f"{teacher.config.hidden_size} ({count(teacher) / 1e6:.1f}M parameters), student "
             f"{student.config.num_hidden_layers} x {student.config.hidden_size} "
             f"({count(student) / 1e6:.1f}M), losses {loss_fn.weights}, T {d['temperature']}"
                  + (f", hidden map {loss_fn.hidden_map}" if want_hidden else "")
                  + (f", attention map {loss_fn.attention_map}" if want_attn else "")
                  + (f", the student's own tokenizer ({len(own)} tokens, the teacher's {len(teacher_tokenizer)})"
                     if own is not None else "")
                  + (f", {len(train.encoded)} training rows with unlabelled ones" if d["unlabeled_filepaths"] else ""))
    result = fit(Trainer(cfg, proc, module, tokenizer, train, val, loss_fn=loss_fn))
    return result


def count(model):
    return sum(p.numel() for p in model.parameters())


def main(argv=None):
    """The command line: trainer.py's entry point (errors as one line, exit 2) with this run."""
    return trainer_main(argv, run_fn=run, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
