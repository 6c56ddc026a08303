"""Models: build a sequence classifier, load fine-tuned weights, save Hugging Face checkpoints.

Usage:
    note = use_checkpoint_settings(cfg)  # evaluate / predict: labels, task, max_seq_len of model_path
    tokenizer = load_tokenizer(cfg["model"])
    model = build_model(cfg["model"], cfg["data"]["labels_list"], say=print)
    save_pretrained(model, tokenizer, "checkpoints/run-epoch1", max_seq_len=64)  # plain transformers loads it

`model.hf_model` is a local model directory or a hub id (the hub is only reachable online); a
classifier there with another number of labels than data.labels_list gets a new head.
`model.model_path` loads fine-tuned weights: a checkpoint directory written by this project (or any
save_pretrained directory), or a plain state-dict file (`.safetensors`, `.bin`, `.pt`), or a
directory plus `model.model_file`. Prefixes left by wrappers (`model.`, `module.`, `_orig_mod.`)
are stripped, so nobody has to edit a state dict by hand.
A checkpoint names its classes (config.json's id2label, also the one name of a regression) and its
task (problem_type: multi_label_classification gives a sigmoid per label), and its tokenizer
truncates at the training max_seq_len, so pipeline("text-classification", model=CKPT,
truncation=True) scores a text as evaluation here does; evaluating or predicting with it takes
these settings (and checkpoint.json's max_seq_len, thresholds.json's multi-label thresholds) where
the user did not set them.
Models come back as plain transformers objects; the speed tricks are speedups.py's (trainer.speedups).

What a model folder may ask of a run is checked before anything is trained: a folder whose config.json
names Python files of its own (auto_map) loads only with model.trust_remote_code true (every call here
passes it to transformers, so nothing prompts); model.attn_implementation must be one the model's class
has; module.max_seq_len must fit its position embeddings (position_limit: none for rotary models); a
tokenizer without a padding token pads with its eos, sep or unk token, and says so.

A model being trained may carry LoRA adapters (build_classifier(..., adapters=True), lora.py):
save_pretrained writes it as the plain model, its adapters merged, and a resume loads the adapter file.
"""
import json
import os
import pickle
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING, AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.utils import logging as hf_logging

import lora
import speedups
from checkpoint import MANIFEST, check_saved_config, load_failure, read_manifest
from config import (
    GOLDEN_CONFIG,
    TASK_NAMES,
    Config,
    ConfigError,
    check_config,
    check_threshold_fits,
    fit_metric_to_task,
    read_yaml,
    set_key,
    task_of,
)
from files import first_line
from processes import launch_rank

# transformers' own per-file progress bars (loading / writing weights) would interleave with ours
hf_logging.disable_progress_bar()

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
# a multi-label checkpoint's decision thresholds, beside its weights: {"thresholds": {label: t}, ...}
THRESHOLDS_FILE = "thresholds.json"
REWRITE_THRESHOLDS = 'rewrite it as {"thresholds": {"<label>": <probability>, ...}}, or give --module.threshold'
# a classifier's calibration temperature (evaluation.fit_temperature), beside its weights: {"temperature":
# t, or {label: t} for multi-label, "chosen": how}; config.json holds it too, for plain transformers users
CALIBRATION_FILE, TEMPERATURE_KEY = "calibration.json", "calibration_temperature"
REWRITE_TEMPERATURE = ('rewrite it as {"temperature": <positive number>} ({"<label>": <number>, ...} for multi-label), '
                       'or give --module.calibrate')
# the data keys of long documents that a checkpoint trained in windows passes on to its evaluation
WINDOW_KEYS = ("long_texts", "window_stride", "window_pool")
# an export folder's record (export.py): the checkpoint it came from, its settings, its artifacts
EXPORT_MANIFEST, EXPORTED_BY = "export.json", "export.py"
# export.py's models, by their names in export.json, and the one file each is written to
EXPORT_ARTIFACTS = {"onnx_fp32": "model.onnx", "onnx_int8": "model.int8.onnx"}
# the settings export.json records, by section
EXPORT_SETTINGS = {"module": ("max_seq_len",), "data": WINDOW_KEYS}
# the data keys of how the training files were read (columns, format): evaluation reads its file
# alike unless told otherwise; a user's value is a file of another layout, not a contradiction
FILE_KEYS = ("file_format", "quoting", "header", "encoding", "text_a_col", "text_b_col", "label_col", "label_sep")
PROBLEM_TYPES = {"single_label": "single_label_classification", "multi_label": "multi_label_classification",
                 "regression": "regression"}
# model.attn_implementation: the class attribute that says a transformers model has each (eager: all do)
ATTENTION_FLAGS = {"sdpa": "_supports_sdpa", "flex_attention": "_supports_flex_attn",
                   "flash_attention_2": "_supports_flash_attn", "flash_attention_3": "_supports_flash_attn"}
# RoBERTa's family counts positions from pad_token_id + 1, so pad_token_id + 1 of its position embeddings are never a token's
OFFSET_POSITIONS = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "roberta-prelayernorm", "data2vec-text",
                    "mpnet", "ibert", "longformer", "luke", "markuplm", "xmod")


class ModelError(Exception):
    """A problem with a model, tokenizer or weights path, reported to the user as one line."""


def warn(message):
    """A warning on stderr; under torchrun from rank 0 alone: every rank loads the same files, so
    every rank would print it alike."""
    if launch_rank() == 0:
        print(message, file=sys.stderr)


def note(message):
    """A note on stdout, from rank 0 alone under torchrun, as warn."""
    if launch_rank() == 0:
        print(message)


def is_pretrained_dir(path):
    return path is not None and os.path.isfile(os.path.join(path, "config.json"))


# ---------------------------------------------------------------------------------------------
# what a model folder asks of us: its own code, its attention, its positions, its padding


def custom_code(path):
    """The classes a model folder ships as Python files of its own (auto_map of its config.json and
    tokenizer_config.json), {auto class: module.Class}; {} for none, a hub id or no folder."""
    found = {}
    for name in ("config.json", "tokenizer_config.json"):
        try:
            content = json.loads((Path(path) / name).read_text(encoding="utf-8"))
        except (OSError, ValueError, TypeError):
            continue
        if isinstance(content, dict) and isinstance(content.get("auto_map"), dict):
            found.update(content["auto_map"])
    return found


def model_type_of(path):
    """config.json's model_type of a folder, or None."""
    try:
        return json.loads((Path(path) / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def check_custom_code(path, key, trust):
    """A folder whose config.json names classes in its own .py files runs that code when it is
    loaded: refused unless model.trust_remote_code is true. Where transformers has classes of its
    own for the folder's model_type (EuroBERT, GTE, NomicBERT today), those load it and the folder's
    code is never run. Returns a note to say when code is left unrun, else None."""
    classes = custom_code(path) if path is not None else {}
    if trust or not classes:
        return None
    # a value is "module.Class", a hub reference "repo--module.Class", or a tokenizer's [slow, fast] pair
    names = ", ".join(sorted({item.split("--")[-1] for value in classes.values()
                              for item in (value if isinstance(value, list) else [value]) if isinstance(item, str)}))
    model_type = model_type_of(path)
    if model_type in CONFIG_MAPPING:
        return (f"note: {key} {path!r} ships code of its own ({names}), which is not run: transformers' own "
                f"{model_type} classes load it (model.trust_remote_code false)")
    raise ModelError(f"{key} {path!r} ships Python code of its own ({names}, auto_map in its config.json) that "
                     f"would run when it loads; read it, and pass --model.trust_remote_code true to run it")


def auto_config(path, key="model.model_path", trust=False):
    """AutoConfig of path, never running a folder's code unless trust (never a [y/N] prompt either)."""
    check_custom_code(path, key, trust)
    return AutoConfig.from_pretrained(path, trust_remote_code=trust)


def attention_choices(model_class):
    """The model.attn_implementation values transformers accepts for model_class."""
    return ["eager"] + [name for name, flag in ATTENTION_FLAGS.items() if getattr(model_class, flag, False)]


def check_attention(config, value):
    """model.attn_implementation against what the model's class supports, before it is loaded."""
    model_class = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING.get(type(config), None)
    if value is None or model_class is None:  # a folder's own class: transformers' own error says it
        return
    choices = attention_choices(model_class)
    if value not in choices:
        raise ModelError(f"model.attn_implementation is {value}, but {model_class.__name__} supports "
                         f"{', '.join(choices)}; choose one of those, or null for transformers' choice")


def check_attention_device(cfg, device):
    """Training with FlexAttention on a CPU: torch has no backward for it there, so it is refused before step 1."""
    if cfg["model"]["attn_implementation"] == "flex_attention" and device.type == "cpu" and cfg["data"]["train_filepath"]:
        raise ConfigError("model.attn_implementation flex_attention: torch's FlexAttention has no backward pass on a "
                          "CPU, so it cannot train here; train with sdpa or eager (flex_attention evaluates on a CPU)")


def position_limit(config):
    """(the longest input in tokens the model's position embeddings take, how it is counted), or None
    where there is no such limit: rotary positions (ModernBERT, EuroBERT, GTE) and relative-only
    positions (DeBERTa-v3: position_biased_input false) take any length."""
    rotary = any(getattr(config, name, None) for name in ("rope_parameters", "rope_theta", "rotary_emb_base"))
    if rotary or getattr(config, "position_embedding_type", None) == "rotary":
        return None
    if getattr(config, "position_biased_input", True) is False:
        return None
    positions = getattr(config, "max_position_embeddings", None)
    if not isinstance(positions, int):
        return None
    if config.model_type in OFFSET_POSITIONS and isinstance(config.pad_token_id, int):
        offset = config.pad_token_id + 1  # positions start after the padding id
        return positions - offset, f"max_position_embeddings {positions} minus pad_token_id + 1 = {offset}"
    return positions, f"max_position_embeddings {positions}"


def model_source(model_cfg):
    """(the folder or hub id whose config.json describes the model, its key): the checkpoint, else hf_model."""
    if is_pretrained_dir(model_cfg["model_path"]):
        return model_cfg["model_path"], "model.model_path"
    return model_cfg["hf_model"], "model.hf_model"


def check_positions(cfg, source=None, key=None):
    """module.max_seq_len within the model's positions (position_limit of its config.json): a longer
    input would index past its position embeddings mid-run (on a GPU, an assert that kills the process)."""
    if source is None:
        source, key = model_source(cfg["model"])
    try:
        limit = position_limit(auto_config(source, key, cfg["model"].get("trust_remote_code", False)))
    except (OSError, ValueError):
        return  # loading the model says what is wrong with it
    if limit is not None and cfg["module"]["max_seq_len"] > limit[0]:
        raise ConfigError(f"module.max_seq_len is {cfg['module']['max_seq_len']}, but {key} {source!r} has positions for "
                          f"{limit[0]} tokens ({limit[1]}); pass --module.max_seq_len {limit[0]} or less, and for "
                          f"longer texts --data.long_texts windows (windows of max_seq_len tokens)")


def with_pad_token(tokenizer, source, say=None):
    """The tokenizer, padding with its own pad token, else (as transformers' documentation advises)
    its eos, sep or unk token, said in a note: batches are padded, and the attention mask hides the
    padding whatever token fills it. A tokenizer with none of them is a ModelError."""
    if tokenizer.pad_token is not None:
        return tokenizer
    for name in ("eos_token", "sep_token", "unk_token"):
        token = getattr(tokenizer, name)
        if token is not None:
            tokenizer.pad_token = token
            (say or note)(f"note: the tokenizer of {source} has no padding token; batches are padded with its "
                          f"{name.removesuffix('_token')} token {token!r} (id {tokenizer.pad_token_id}), which the "
                          f"attention mask hides")
            return tokenizer
    raise ModelError(f"{source}: its tokenizer has no padding token, nor an eos, sep or unk token to pad with; add "
                     f"one (tokenizer.add_special_tokens({{'pad_token': '[PAD]'}}) and save_pretrained) or pass "
                     f"--model.tokenizer_path")


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


def label_config(labels_list, multi_label=False):
    """num_labels, id2label, label2id and problem_type, so saved models name their classes (or their
    one score) and plain transformers applies softmax or, for multi-label, a sigmoid per label."""
    names = [str(label) for label in labels_list]
    task = task_of({"labels_list": names, "multi_label": multi_label})
    return {"num_labels": len(names), "id2label": dict(enumerate(names)),
            "label2id": {name: i for i, name in enumerate(names)}, "problem_type": PROBLEM_TYPES[task]}


def saved_labels(config):
    return [config.id2label[i] for i in range(config.num_labels)]


def saved_multi_label(config):
    return config.problem_type == "multi_label_classification"


def same_labels(found, labels_list):
    """The same classes in the same order; any two regressions match (the name is only a name)."""
    if len(found) == 1 or len(labels_list) == 1:
        return len(found) == len(labels_list)
    return found == [str(label) for label in labels_list]


def check_labels(path, labels_list, multi_label, trust=False):
    """A fine-tuned checkpoint must have been trained on the same classes, in the same order, for
    the same task (a softmax head is no multi-label head)."""
    config = auto_config(path, "model.model_path", trust)
    found = saved_labels(config)
    if not same_labels(found, labels_list):
        raise ModelError(f"{path} was trained with labels {found}, but data.labels_list is "
                         f"{labels_list}: use the labels_list of that training run")
    if saved_multi_label(config) != multi_label:
        raise ModelError(f"{path} was {'' if saved_multi_label(config) else 'not '}trained for multi-label "
                         f"classification, but data.multi_label is {str(multi_label).lower()}: leave "
                         f"data.multi_label out to use the checkpoint's")


def corrupt_weights(name, error):
    """A .safetensors file safetensors cannot read: cut short by a full disk or an interrupted copy."""
    return ModelError(f"{name} is truncated or corrupt ({first_line(error)}): re-export it or pick "
                      f"another checkpoint")


def head_labels(source, key="model.model_path", trust=False):
    """The number of labels of source's sequence-classification head; None for a bare encoder."""
    config = auto_config(source, key, trust)
    if any(name.endswith("ForSequenceClassification") for name in config.architectures or ()):
        return config.num_labels
    return None


def not_a_load_report(record):
    return "LOAD REPORT" not in record.getMessage()


@contextmanager
def quiet_load_report():
    """Drop transformers' LOAD REPORT table (a warning of modeling_utils), which report_loading says
    in our words; a filter, as raising that logger's level makes transformers log other things."""
    logger = hf_logging.get_logger("transformers.modeling_utils")
    logger.addFilter(not_a_load_report)
    try:
        yield
    finally:
        logger.removeFilter(not_a_load_report)


def from_pretrained(source, key, say=print, trust=False, attention=None, **kwargs):
    """AutoModelForSequenceClassification.from_pretrained, its errors as one line, its loading
    report in our words (report_loading).

    A classifier fine-tuned on other classes is a common starting point: when kwargs ask for another
    num_labels than source's head has, the head is re-initialised (as the Hugging Face examples do
    with ignore_mismatched_sizes) and the rest of the model loaded. trust: model.trust_remote_code
    (a folder's own code runs only if true); attention: model.attn_implementation (None: transformers').
    """
    unrun = check_custom_code(source, key, trust)
    if unrun is not None:
        say(unrun)
    if attention is not None:
        kwargs["attn_implementation"] = attention
    try:
        config = auto_config(source, key, trust)
        check_attention(config, kwargs.get("attn_implementation"))
        old, new = head_labels(source, key, trust), kwargs.get("num_labels")
        replaced = old is not None and new is not None and old != new
        if replaced:
            warn(f"warning: {key} {source!r} has a {old}-label classification head; it is replaced "
                 f"by a new, untrained {new}-label head (data.labels_list)")
            kwargs["ignore_mismatched_sizes"] = True
        with quiet_load_report():
            model, info = AutoModelForSequenceClassification.from_pretrained(
                source, output_loading_info=True, trust_remote_code=trust, **kwargs)
    except ImportError as e:  # an attention kernel whose package is missing (flash-attn)
        raise ModelError(f"model.attn_implementation {kwargs.get('attn_implementation')}: {first_line(e)}; choose "
                         f"sdpa or eager, or null for transformers' choice") from None
    except (OSError, ValueError) as e:
        raise load_error(e, key, source, "a model") from None
    except (pickle.UnpicklingError, RuntimeError) as e:  # a pytorch_model.bin torch.load refuses or cannot read
        raise ModelError(f"{key} {source!r}: its weights do not load as data ({load_failure(e)}); re-export "
                         f"them or pick another checkpoint") from None
    except SafetensorError as e:
        path = os.path.join(source, "model.safetensors")
        name = path if os.path.isfile(path) else f"a .safetensors file of {source}"
        raise corrupt_weights(f"{key}: {name}", e) from None
    note = report_loading(model, info, f"{key} {source!r}", new_head=key != "model.model_path")
    if note is not None and not replaced:  # a replaced head has had its warning
        say(note)
    return model


def load_error(error, key, source, what):
    """The one line of a failed from_pretrained: code the folder (or hub repo) needs, or why."""
    if "trust_remote_code" in str(error):
        return ModelError(f"{key} {source!r} needs Python code of its own to load; read it, and pass "
                          f"--model.trust_remote_code true to run it")
    return ModelError(f"{key} {source!r}: cannot load {what} there ({first_line(error)})")


def report_loading(model, info, source, new_head):
    """What from_pretrained did not load: the note to say, or None. A pretrained encoder (new_head)
    gets a new head (weights outside model.base_model_prefix) and drops its pretraining head (cls.*,
    lm_head.*): expected, one note. Anything else missing, unused or of another shape (anything at
    all in a fine-tuned model.model_path) is a warning on stderr listing the weights."""
    encoder = model.base_model_prefix + "."
    missing = set(info["missing_keys"]) | {name for name, *_ in info["mismatched_keys"]}
    unused = set(info["unexpected_keys"])
    head = {name for name in missing if not name.startswith(encoder)}
    if new_head:  # expected: the head is new and a pretraining head goes unused
        missing -= head
        unused = {name for name in unused if name.startswith(encoder)}
    if missing or unused:
        warn(f"warning: {source}: " + "; ".join(
            f"{len(names)} weights {what}: {', '.join(sorted(names)[:8])}{', ...' * (len(names) > 8)}"
            for names, what in ((missing, "of the model are not in it and start from random values"),
                                (unused, "in it are not used")) if names))
        return None
    if not head:
        return None
    groups = sorted({name.split(".")[0] + ".*" for name in head})
    n = model.config.num_labels
    labels = "1 label (regression)" if n == 1 else f"{n} labels"
    return (f"note: a new classification head ({', '.join(groups)}) for {labels}; the encoder is "
            f"pretrained ({source})")


def build_model(model_cfg, labels_list, say=print, multi_label=False, **kwargs):
    """The classifier to train or evaluate, with fine-tuned weights when model.model_path is set.

    say: where the note of a new head goes (trainer.run: the main process's log; print here, so
    once per process). multi_label: one sigmoid output per label (data.multi_label). Extra keyword
    arguments go to from_pretrained (attn_implementation="eager" overrides model.attn_implementation).
    model.trust_remote_code and model.attn_implementation, where model_cfg lacks them, are
    config.yaml's defaults (false, null).
    """
    trust = model_cfg.get("trust_remote_code", False)
    kwargs = {"attention": model_cfg.get("attn_implementation"), **kwargs}
    checkpoint_dir = model_cfg["model_path"] if weights_file(model_cfg) is None else None
    if is_pretrained_dir(checkpoint_dir):
        check_labels(checkpoint_dir, labels_list, multi_label, trust)
        model = from_pretrained(checkpoint_dir, "model.model_path", say=say, trust=trust, **kwargs)
    else:
        model = from_pretrained(model_cfg["hf_model"], "model.hf_model", say=say, trust=trust,
                                **label_config(labels_list, multi_label), **kwargs)
        path = weights_file(model_cfg)
        if path is not None:
            load_weights(model, path)
    if kwargs["attention"] is None and "attn_implementation" not in kwargs and not model._supports_sdpa:
        say(f"note: {type(model).__name__} has no sdpa attention in transformers; it runs "
            f"{model.config._attn_implementation} attention (model.attn_implementation)")
    return model


def build_classifier(cfg, device, say=print, adapters=False):
    """The run's classifier on device: build_model of the config's model section, with speedups.py's
    exact speed-ups applied when trainer.speedups is on. adapters (a model to train): LoRA
    adapters when model.lora_rank is set (lora.py)."""
    model = build_model(cfg["model"], cfg["data"]["labels_list"], say=say, multi_label=cfg["data"]["multi_label"])
    if adapters and cfg["model"]["lora_rank"]:  # before the speed-ups, which then draw its dropout too
        lora.add_adapters(model, cfg["model"], say=say)
    if cfg["trainer"]["speedups"]:
        speedups.apply(model, device)  # the same arithmetic, less of it (speedups.py)
    return model.to(device)


def checkpoint_settings(path, thresholds=True, temperature=True, trust=False):
    """What a fine-tuned classifier directory says of its training, {config key: (value, where)}:
    data.multi_label and data.labels_list from config.json's problem_type and id2label,
    module.max_seq_len (and windows) from the checkpoint.json this project writes beside it (an
    export folder's export.json), module.threshold from its thresholds.json, module.calibrate (its
    temperature) from its calibration.json. Empty for anything else (a state-dict file, a bare encoder)."""
    if is_export_dir(path):  # a damaged export folder is refused, not read with defaults
        check_export_folder(path)
    try:
        if not is_pretrained_dir(path) or head_labels(path, trust=trust) is None:
            return {}
        config = auto_config(path, trust=trust)
    except (OSError, ValueError):
        return {}  # build_model says what is wrong with it
    settings = {"data.multi_label": (saved_multi_label(config), "config.json's problem_type"),
                "data.labels_list": (saved_labels(config), "config.json")}
    manifest, where = read_manifest(path), MANIFEST
    if manifest is not None:  # ours: its config is what the settings below are taken from
        check_saved_config(path, manifest.get("config"))
    else:  # an export folder of a checkpoint (export.py) carries them in its own record
        manifest, where = read_export_manifest(path), EXPORT_MANIFEST
    trained = (manifest or {}).get("config") or {}
    if isinstance(trained.get("module", {}).get("max_seq_len"), int):
        settings["module.max_seq_len"] = (trained["module"]["max_seq_len"], where)
    for name in FILE_KEYS:
        if name in trained.get("data", {}):
            settings[f"data.{name}"] = (trained["data"][name], where)
    if trained.get("data", {}).get("long_texts") == "windows":  # read as it was trained: in windows
        for name in WINDOW_KEYS:
            if name in trained["data"]:
                settings[f"data.{name}"] = (trained["data"][name], where)
    thresholds = saved_thresholds(path, settings["data.labels_list"][0]) if thresholds and saved_multi_label(config) else None
    if thresholds is not None:
        settings["module.threshold"] = (thresholds, THRESHOLDS_FILE)
    classifier = saved_multi_label(config) or config.num_labels > 1
    temperature = saved_temperature(path, settings["data.labels_list"][0], saved_multi_label(config)) \
        if temperature and classifier else None
    if temperature is not None:
        settings["module.calibrate"] = (temperature, CALIBRATION_FILE)
    return settings


def read_export_manifest(path):
    """The record export.py writes in an export folder (EXPORT_MANIFEST), or None for anything else."""
    try:
        manifest = json.loads((Path(path) / EXPORT_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("written_by") == EXPORTED_BY else None


def is_export_dir(path):
    """True for a folder export.py wrote (its export.json): it evaluates and predicts only."""
    return path is not None and read_export_manifest(path) is not None


def check_artifact(cfg):
    """model.artifact picks a model of an export folder: with anything else in model.model_path, it is refused."""
    path, artifact = cfg["model"]["model_path"], cfg["model"]["artifact"]
    if artifact != "auto" and not is_export_dir(path):
        raise ConfigError(f"model.artifact {artifact} picks a model of an export folder (export.py), and model.model_path "
                          f"{path} is not one; leave it out")


def check_export_folder(path):
    """The export.json of an export folder, every field checked, once every file that reading the
    folder needs is there (config.json's labels and task, the tokenizer, the models it lists, a
    multi-label model's thresholds, a calibrated model's temperature). A damaged folder is a
    ModelError, never read with defaults."""
    folder, manifest = Path(path), read_export_manifest(path)
    file = folder / EXPORT_MANIFEST
    if not isinstance(manifest.get("source"), str):
        raise damaged_export(file, f"source is {manifest.get('source')!r}")
    check_export_settings(file, manifest.get("config"))
    artifacts = manifest.get("artifacts")
    # the files export.py writes, by name: no path that leads out of the folder, no link
    if not (isinstance(artifacts, dict) and artifacts
            and all(EXPORT_ARTIFACTS.get(name) == value for name, value in artifacts.items())):
        raise damaged_export(file, f"artifacts is {artifacts!r}"[:300] + f" (export.py writes {EXPORT_ARTIFACTS})")
    missing = [name for name in ("config.json", "tokenizer_config.json") if not (folder / name).is_file()]
    missing += [name for name in artifacts.values() if not (folder / name).is_file() or (folder / name).is_symlink()]
    if not missing:
        try:
            config = AutoConfig.from_pretrained(folder)
        except (OSError, ValueError) as e:
            raise ModelError(f"{folder / 'config.json'}: unreadable ({first_line(e)[:200]}); export the checkpoint "
                             f"again") from None
        if saved_multi_label(config) and not (folder / THRESHOLDS_FILE).is_file():
            missing.append(THRESHOLDS_FILE)
        if getattr(config, TEMPERATURE_KEY, None) is not None and not (folder / CALIBRATION_FILE).is_file():
            missing.append(CALIBRATION_FILE)  # its probabilities would be uncalibrated without a word
    if missing:
        raise ModelError(f"{folder}: an incomplete export folder ({', '.join(missing)} missing); export the "
                         f"checkpoint again")
    return manifest


def damaged_export(file, what):
    return ModelError(f"{file}: {what}, not as export.py writes it (damaged or edited?); export the checkpoint again")


def check_export_settings(file, settings):
    """export.json's config: the max_seq_len and windows the model was exported for, each of the
    type and choices config.yaml gives it, and together as check_config accepts them."""
    if not (isinstance(settings, dict) and set(settings) == set(EXPORT_SETTINGS)
            and all(isinstance(settings[s], dict) and set(settings[s]) == set(n) for s, n in EXPORT_SETTINGS.items())):
        raise damaged_export(file, f"config is {settings!r}"[:300])
    cfg = Config(read_yaml(GOLDEN_CONFIG))
    try:
        for section, names in EXPORT_SETTINGS.items():
            for name in names:
                set_key(cfg, f"{section}.{name}", settings[section][name], f"{file}: config")
        check_config(cfg)
    except ConfigError as e:
        message = str(e) if str(e).startswith(str(file)) else f"{file}: config: {e}"
        raise ModelError(f"{message} (damaged or edited?); export the checkpoint again") from None


def saved_thresholds(path, names, chosen=False):
    """The per-label thresholds of a multi-label checkpoint's thresholds.json in labels_list order;
    with chosen, (thresholds, how they were chosen). Without the file: a warning, and None (every
    label decided at 0.5). A file that is there but not one threshold in (0, 1) per label is a
    ModelError: deciding at 0.5 instead would change every prediction without a word."""
    file = Path(path) / THRESHOLDS_FILE
    if not file.exists() and not file.is_symlink():
        warn(f"warning: {file} is missing; every label of this multi-label checkpoint is decided at "
             f"probability 0.5")
        return (None, "") if chosen else None
    try:
        content = json.loads(file.read_text(encoding="utf-8"))
        values = [content["thresholds"][name] for name in names]
        how = str(content.get("chosen", ""))
    except (OSError, ValueError) as e:
        raise ModelError(f"{file}: unreadable ({first_line(e)[:200]}); {REWRITE_THRESHOLDS}") from None
    except (KeyError, TypeError, AttributeError):
        raise ModelError(f"{file}: not a threshold for every label {list(names)}; {REWRITE_THRESHOLDS}") from None
    if not all(isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t < 1 for t in values):
        raise ModelError(f"{file}: thresholds {values} are not all probabilities between 0 and 1; "
                         f"{REWRITE_THRESHOLDS}")
    values = [float(t) for t in values]
    return (values, how) if chosen else values


def save_thresholds(directory, names, thresholds, how):
    """thresholds.json: each label's threshold, and how it was chosen (a line for the reader)."""
    content = {"thresholds": {name: float(t) for name, t in zip(names, thresholds)}, "chosen": how}
    (Path(directory) / THRESHOLDS_FILE).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def save_temperature(directory, names, temperature, how):
    """calibration.json (the temperature: a number, or a list in names' order for multi-label; how it
    was chosen) and the same value as config.json's calibration_temperature, where a pipeline() user
    finds it. None writes neither, and drops a key config.json inherited from the model it started from."""
    path = Path(directory) / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config.pop(TEMPERATURE_KEY, None)
    if temperature is not None:
        values = [float(t) for t in temperature] if isinstance(temperature, list) else float(temperature)
        config[TEMPERATURE_KEY] = values
        stored = dict(zip(names, values)) if isinstance(values, list) else values
        (Path(directory) / CALIBRATION_FILE).write_text(json.dumps({"temperature": stored, "chosen": how}, indent=2) + "\n",
                                                       encoding="utf-8")
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")  # as transformers writes it


def saved_temperature(path, names, multi_label, chosen=False):
    """The temperature of a classifier's calibration.json: a number, or (multi-label) a list in names'
    order; with chosen, (temperature, how it was chosen). None without the file (a checkpoint from
    before calibration, or trained without a validation file). A file that is there but not a positive
    number (per label) is a ModelError: 1.0 instead would change every probability without a word."""
    file = Path(path) / CALIBRATION_FILE
    if not file.exists() and not file.is_symlink():
        return (None, "") if chosen else None
    try:
        content = json.loads(file.read_text(encoding="utf-8"))
        stored, how = content["temperature"], str(content.get("chosen", ""))
        values = [stored[name] for name in names] if multi_label else [stored]
    except (OSError, ValueError) as e:
        raise ModelError(f"{file}: unreadable ({first_line(e)[:200]}); {REWRITE_TEMPERATURE}") from None
    except (KeyError, TypeError, AttributeError):
        raise ModelError(f"{file}: not a temperature{' for every label ' + str(list(names)) if multi_label else ''}; "
                         f"{REWRITE_TEMPERATURE}") from None
    if not all(isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t < float("inf") for t in values):
        raise ModelError(f"{file}: temperature {stored} is not {'all ' * multi_label}positive; {REWRITE_TEMPERATURE}")
    temperature = [float(t) for t in values] if multi_label else float(values[0])
    return (temperature, how) if chosen else temperature


def tokenizer_limit(path):
    """model_max_length in path's tokenizer_config.json (save_pretrained writes max_seq_len there), or None."""
    try:
        config = json.loads((Path(path) / "tokenizer_config.json").read_text(encoding="utf-8"))
        limit = config.get("model_max_length")
    except (OSError, ValueError, AttributeError):
        return None
    return limit if isinstance(limit, int) and limit < 10**9 else None  # transformers' "no limit" is 1e30


def use_checkpoint_settings(cfg):
    """Evaluate / predict as model.model_path was trained: its labels (and so the task) and
    max_seq_len where the user did not set them, and module.metric then following the task. A
    user value that contradicts the checkpoint is an error naming both. Without a checkpoint.json
    (a save_pretrained directory), max_seq_len is only kept within its tokenizer's model_max_length.
    Its temperature (module.calibrate true: the checkpoint's, or 1.0 if it has none) is applied,
    never fitted here; false or a number the user gave wins.
    Returns what was taken, to say in one line, or None."""
    path, taken = cfg["model"]["model_path"], []
    settings = checkpoint_settings(path, thresholds="module.threshold" not in cfg.user_keys,
                                   temperature=cfg["module"]["calibrate"] is True, trust=cfg["model"]["trust_remote_code"])
    limit = tokenizer_limit(path) if settings and "module.max_seq_len" not in settings else None
    if limit is not None and cfg["module"]["max_seq_len"] > limit:
        settings["module.max_seq_len"] = (limit, "its tokenizer_config.json's model_max_length")
    for key, (value, where) in settings.items():
        section, name = key.split(".")
        given = cfg[section][name]
        if key not in cfg.user_keys or name == "calibrate":  # calibrate true: the checkpoint's temperature
            if name in FILE_KEYS and value == given:
                continue  # config.yaml's own value: nothing to say
            cfg[section][name] = value
            if name == "calibrate":
                taken.append(f"{key} {[round(t, 4) for t in value] if isinstance(value, list) else round(value, 4)} "
                             f"(its temperature, {where})")
            elif name != "multi_label":  # said with the labels, as their task
                taken.append(f"{key} {value}")
        elif name == "threshold" or name in WINDOW_KEYS or name in FILE_KEYS:
            continue  # the user's thresholds, windows or file layout: a choice, not a contradiction
        elif not (same_labels(value, given) if name == "labels_list" else value == given):
            given, value = (str(v).lower() if isinstance(v, bool) else v for v in (given, value))  # as YAML writes them
            raise ConfigError(f"{key} is {given}, but {path} was trained with {value} ({where}); leave "
                              f"{key} out to use the checkpoint's")
    if cfg["module"]["calibrate"] is True and task_of(cfg["data"]) != "regression":
        cfg["module"]["calibrate"] = 1.0  # older, or trained without a validation file: said once, here
        taken.append(f"module.calibrate 1.0 (it holds no temperature, no {CALIBRATION_FILE}: its probabilities "
                     f"are uncalibrated)")
    task = TASK_NAMES[task_of(cfg["data"])]
    taken = [f"{item} ({task})" if item.startswith("data.labels_list") else item for item in taken]
    metric = fit_metric_to_task(cfg)
    try:
        check_config(cfg)  # a metric the user set may not fit the checkpoint's task
        check_threshold_fits(cfg)
    except ConfigError as e:
        raise ConfigError(f"{e} ({path} was trained for {task})") from None
    if metric is not None:
        taken.append(metric)
    return f"from the checkpoint {path}: {', '.join(taken)}" if taken else None


def read_state_dict(path):
    if path.endswith(".safetensors"):
        try:
            return load_file(path)
        except SafetensorError as e:
            raise corrupt_weights(path, e) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle that would run code, a truncated file, another format
        raise ModelError(f"{path}: not a readable state-dict file ({load_failure(e)}); re-export it or "
                         f"pick another file") from None
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


STUDENT = "student."  # the names of a distillation student's weights in the module a Trainer optimizes


def classifier_of(model):
    """The Hugging Face classifier in what a Trainer optimizes: itself, or a distillation student."""
    return getattr(model, "student", model)


def module_rest(model):
    """What a distillation module holds beside its student (e.g. projections), for the training
    state: the student's own weights are in the checkpoint's model.safetensors already."""
    return {name: tensor for name, tensor in model.state_dict().items() if not name.startswith(STUDENT)}


def load_module_weights(model, path, state):
    """The weights of what a Trainer optimizes from checkpoint `path` and its training state."""
    if lora.adapted(model):  # the frozen weights are those it was built from; what trained is in the adapter file
        lora.load_adapter(model, path)
        lora.check_frozen(classifier_of(model), Path(path) / "model.safetensors")
        return
    if "module" in state:  # a checkpoint that held the whole module, student included, in its state
        model.load_state_dict(state["module"])
        return
    classifier = classifier_of(model)
    load_saved(classifier, path)
    if model is not classifier:
        model.load_state_dict({**state.get("module_rest", {}),
                               **{STUDENT + name: tensor for name, tensor in classifier.state_dict().items()}})


def load_saved(model, folder):
    """The weights of a save_pretrained folder into model, as transformers reads them: the files of
    some model types (GTE's) name and fuse weights as their original code did, not as the modules
    do. Through model's own class, so a folder's own code needs no new permission."""
    try:
        with quiet_load_report():
            saved, info = type(model).from_pretrained(folder, output_loading_info=True)
        lacking = sorted(info["missing_keys"]) + sorted(name for name, *_ in info["mismatched_keys"])
        if lacking:
            raise ModelError(f"{folder}: {len(lacking)} weights of the model are missing from its files or of another "
                             f"shape (first: {lacking[0]}); pick another checkpoint")
        model.load_state_dict(saved.state_dict())
    except SafetensorError as e:
        raise corrupt_weights(str(Path(folder) / "model.safetensors"), e) from None
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"{folder}: its weights do not load into the model ({first_line(e)}); pick another "
                         f"checkpoint") from None


def load_trained_weights(model, path):
    """The classifier's trained weights from checkpoint folder path (the best one, at the end of a
    run): its LoRA adapter file for a model with adapters (model.safetensors holds them merged into
    the weights, where they would count twice), else its model.safetensors."""
    if lora.adapted(model):
        lora.load_adapter(model, path)
    else:
        load_weights(classifier_of(model), str(Path(path) / "model.safetensors"))


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


def load_tokenizer(model_cfg, say=None):
    """model.tokenizer_path, else the fine-tuned checkpoint's own tokenizer, else model.hf_model;
    one without a padding token pads with a stand-in (with_pad_token, which says it through say)."""
    path, key = model_cfg["tokenizer_path"], "model.tokenizer_path"
    if path is None and is_pretrained_dir(model_cfg["model_path"]) and any(
            os.path.isfile(os.path.join(model_cfg["model_path"], f))
            for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        path, key = model_cfg["model_path"], "model.model_path"
    if path is None:
        path, key = model_cfg["hf_model"], "model.hf_model"
    return read_tokenizer(path, key, model_cfg.get("trust_remote_code", False), say)


def read_tokenizer(path, key, trust=False, say=None):
    """AutoTokenizer of path (never a folder's code unless trust), with a padding token; a folder that
    does not load is one ModelError naming key."""
    check_custom_code(path, key, trust)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    except Exception as e:  # noqa: BLE001 (a damaged file raises anything: a tokenizer.json of {} a KeyError)
        raise load_error(e, key, path, "a tokenizer") from None
    return with_pad_token(tokenizer, f"{key} {path!r}", say)


def save_pretrained(model, tokenizer, directory, max_seq_len=None):
    """A directory that AutoModelForSequenceClassification / AutoTokenizer load directly (and
    pipeline("text-classification", model=directory), with top_k=None for every label's score).

    With max_seq_len, the saved tokenizer's model_max_length is max_seq_len, so that truncation=True
    in plain transformers (pipeline included) cuts where training did; the run's tokenizer keeps its own.
    A model with LoRA adapters is saved as the plain model, its adapters merged into the weights.
    """
    model.save_pretrained(directory, safe_serialization=True, state_dict=lora.merged_state_dict(model))
    tokenizer.save_pretrained(directory)
    if max_seq_len is not None:
        path = Path(directory) / "tokenizer_config.json"
        config = json.loads(path.read_text(encoding="utf-8"))
        config["model_max_length"] = max_seq_len
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
