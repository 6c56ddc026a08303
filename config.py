"""Configuration: the golden config.yaml, then the user's file, then --section.key value overrides.

Usage:
    cfg = load_config(sys.argv[1:])      # a dict of sections: cfg["trainer"]["epochs"], ...

config.yaml beside this file is the one source of defaults and of the keys that exist: a key it does
not have is an error, and every value must have the type of its default (TYPES lists the keys that
also take null or another type). check_config then refuses values that are well typed but cannot
work, so that a bad value stops the run before anything is loaded or written.
"""
import json
import math
import os
import re
from pathlib import Path

import yaml

GOLDEN_CONFIG = Path(__file__).resolve().with_name("config.yaml")


class ConfigError(Exception):
    """A bad config key or value, reported to the user as one line."""


class YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads 2e-5 as a float (YAML 1.1 only knows 2.0e-5)."""


# only true / false are booleans (as in YAML 1.2): YAML 1.1 also reads yes / no / on / off as
# booleans, which turned labels_list [no, yes] into [False, True] that no label in a file matches
YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d[\d_]*\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+.0123456789"))

CHOICES = {
    "data.file_format": ["csv", "tsv", "jsonl"],
    "data.quoting": ["auto", "csv", "none"],
    "data.long_texts": ["truncate", "windows"],
    "data.window_pool": ["mean", "max"],
    "module.metric": ["acc", "acc_and_f1", "mcc", "pcc_and_scc", "f1_macro", "f1_micro", "f1_samples", "subset_acc"],
    "trainer.backend": ["auto", "sp", "sp-amp", "ddp", "ddp-amp"],
    "trainer.amp_dtype": ["auto", "bf16", "fp16"],
    "trainer.device": ["auto", "cpu", "cuda"],
    "model.attn_implementation": [None, "eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3"],
    "model.artifact": ["auto", "onnx_fp32", "onnx_int8"],
}
# keys of earlier versions, by their names now
RENAMED = {"serve.artifact": "model.artifact"}
# keys that take null or several types; every other key takes the type of its golden value
TYPES = {
    "data.train_filepath": (str, None), "data.val_filepath": (str, None),
    "data.predict_filepath": (str, None), "data.predict_output": (str, None),
    "data.header": (int, None), "data.text_a_col": (str, int), "data.text_b_col": (str, int, None),
    "data.label_col": (str, int), "data.cache_dir": (str, None), "data.max_windows": (int, None),
    "data.max_rows": (int, None),
    "model.tokenizer_path": (str, None), "model.encoder_key": (str, None),
    "model.model_path": (str, None), "model.model_file": (str, None), "model.attn_implementation": (str, None),
    "model.lora_alpha": (float,), "model.lora_targets": (list, None), "module.head_lr": (float, None),
    "ckpt.keep_last": (int, None), "ckpt.resume": (str, None), "trainer.log_steps": (int, str),
    "trainer.stop_after_epochs": (int, None), "trainer.early_stopping_patience": (int, None),
    "module.class_weights": (str, list, None), "module.threshold": (float, str, list),
    "module.calibrate": (bool, float, list), "data.abstain_below": (float, None),
    "distill.student_layers": (list, None), "distill.student_model": (str, None), "distill.student_tokenizer": (str, None),
    "distill.hidden_state_map": (list, None), "distill.attention_map": (list, None),
    "sweep.samples": (int, None), "sweep.rungs": (list, None),
    "export.output_dir": (str, None), "check.output": (str, None),
    "serve.max_wait_ms": (float,),
}


def read_yaml(path):
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory; --config_path takes a YAML file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not valid UTF-8; save the config file as UTF-8") from None
    try:
        content = yaml.load(text, Loader=YamlLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(content, dict) or not all(isinstance(v, dict) for v in content.values()):
        raise ConfigError(f"{path}: expected sections (data:, model:, ...) holding key: value pairs")
    check_tree(content, path)
    return content


# the most items a value read from YAML may hold (config.yaml's largest holds a few dozen)
MAX_VALUE_ITEMS = 100_000


def check_tree(value, source):
    """A value read from YAML must be a finite tree: an alias inside its own anchor (&a [*a]) makes a
    value without end, and aliases of aliases one of billions of items; both are one error line."""
    count, stack = 0, [(value, frozenset())]
    while stack:
        item, above = stack.pop()
        count += 1
        if count > MAX_VALUE_ITEMS:
            raise ConfigError(f"{source}: a value of more than {MAX_VALUE_ITEMS} items (YAML aliases of "
                              f"aliases?); write the value out")
        if isinstance(item, (list, dict)):
            if id(item) in above:
                raise ConfigError(f"{source}: a YAML alias inside its own anchor (such as &a [*a]) makes a "
                                  f"value without end; write the value out")
            stack.extend((child, above | {id(item)}) for child in (item.values() if isinstance(item, dict) else item))


def type_ok(value, types):
    for t in types:
        if t is None and value is None:
            return True
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if t not in (None, float, int) and isinstance(value, t):
            return True
    return False


def set_key(cfg, key, value, source):
    """Set section.key after checking the key exists and the value has the right type."""
    section, _, name = key.partition(".")
    if key in RENAMED:
        raise ConfigError(f"{source}: {key} is now {RENAMED[key]}; use that name")
    if section not in cfg:
        raise ConfigError(f"{source}: unknown section {section!r}; sections are {list(cfg)}")
    if name not in cfg[section]:
        raise ConfigError(f"{source}: unknown key {key!r}; keys of {section} are {list(cfg[section])}")
    if key in CHOICES and value not in CHOICES[key]:
        choices = ", ".join("null" if c is None else c for c in CHOICES[key])
        raise ConfigError(f"{source}: {key} is {value!r}; choose one of {choices}")
    golden = cfg[section][name]
    types = TYPES.get(key, (type(golden),))
    if not type_ok(value, types):
        names = ", ".join("null" if t is None else t.__name__ for t in types)
        raise ConfigError(f"{source}: {key} is {value!r}; expected {names}")
    cfg[section][name] = value


def parse_args(argv, text_keys=()):
    """(config path, [(key, value), ...]) from --config_path and --section.key value pairs.

    Values are read as YAML (2e-5, null, [a, b]), except those of text_keys, keys that take a
    string only: their text is taken as typed, since YAML reads what a user types for a separator
    or a name as syntax (| and > open a block, # a comment, * and & name an alias, ! a tag, % and
    @ are reserved). Quoted ('' or "a\\tb"), it is still read as a YAML string.
    """
    config_path, overrides, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; options are --section.key value")
        key, has_value, value = arg[2:].partition("=")
        if not has_value:
            # "--a --b=1" left out a's value rather than setting a to "--b=1" (which would write a
            # file of that name); -1 and -1e-3 are values. "--a=--b" still sets a to "--b"
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"--{key} needs a value")
            value, i = argv[i + 1], i + 1
        i += 1
        if key == "config_path":
            config_path = value
            continue
        try:
            quoted = len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""
            value = value if key in text_keys and not quoted else yaml.load(value, Loader=YamlLoader)
        except yaml.YAMLError:
            raise ConfigError(f"--{key}: cannot read {value!r} as a YAML value") from None
        check_tree(value, f"--{key}")
        overrides.append((key, value))
    return config_path, overrides


def config_options(cfg, leave_out=()):
    """The --section.key value options that make cfg out of config.yaml's defaults (parse_args read
    backwards): one pair per key whose value differs, except the sections and keys of leave_out.
    A key config.yaml no longer has is left out: it steers nothing now."""
    golden, options = read_yaml(GOLDEN_CONFIG), []
    for section, values in cfg.items():
        for name, value in values.items():
            key = f"{section}.{name}"
            if section in leave_out or key in leave_out or name not in golden.get(section, {}) \
                    or value == golden[section][name]:
                continue
            text = option_text(value, TYPES.get(key, (type(golden[section][name]),)) == (str,))
            # a value that starts like an option is given as --key=value, as parse_args reads it
            options += [f"--{key}={text}"] if text.startswith("--") else [f"--{key}", text]
    return options


def option_text(value, text_key):
    """A value as the command line gives it: a text key's text as typed (unless it looks quoted),
    else YAML that reads back as the value (lists and mappings in flow style)."""
    if isinstance(value, str) and (text_key or yaml.load(value, Loader=YamlLoader) == value):
        quoted = len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""
        return json.dumps(value) if quoted else value
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
    return json.dumps(value)  # numbers, true / false, null, and strings YAML would read otherwise


def golden_keys(path=GOLDEN_CONFIG):
    """[(section, its comment, [(key, default, comment), ...]), ...] of config.yaml, from its text:
    the defaults as written there and the comment at the end of each key's line."""
    text = Path(path).read_text(encoding="utf-8")
    lines = text.splitlines()

    def comment_after(mark):
        rest = lines[mark.line][mark.column:].lstrip(": ")
        return rest[1:].strip() if rest.startswith("#") else ""

    return [(section.value, comment_after(section.end_mark),
             [(key.value, text[value.start_mark.index:value.end_mark.index], comment_after(value.end_mark))
              for key, value in values.value])
            for section, values in yaml.compose(text, Loader=YamlLoader).value]


def print_help(doc, path=GOLDEN_CONFIG):
    """--help: the usage (a module docstring), then every key with its default and meaning. It needs
    config.yaml and PyYAML only, so trainer.py and distill.py answer it before importing torch."""
    sections = golden_keys(path)
    width = max(len(f"--{section}.{key} {default}")
                for section, _, keys in sections for key, default, _ in keys) + 2
    print(doc.strip())
    print(f"\nOptions: --config_path FILE (keys over the defaults below) and --section.key VALUE (read as "
          f"YAML: 2e-5, null, [a, b]; a key that takes only text takes it as typed).\n"
          f"Every key, with its default (from {path}) and meaning:")
    for section, comment, keys in sections:
        print(f"\n{section}:" + (f"  # {comment}" if comment else ""))
        for key, default, meaning in keys:
            print(f"  {f'--{section}.{key} {default}':<{width}}{meaning}".rstrip())


class Config(dict):
    """A run's config, {section: {key: value}}, that knows which keys the user set: user_keys holds
    the "section.key" names of the --config_path file and the command line. The others hold
    config.yaml's defaults, which the task (module.metric) or a checkpoint may fill in instead."""
    user_keys = frozenset()


def answer_help(argv, doc):
    """True, once the usage and every key are printed, when the command line asks for -h / --help."""
    if "-h" in argv or "--help" in argv:
        print_help(doc)
        return True
    return False


def load_config(argv, golden_path=GOLDEN_CONFIG):
    """The config of this run: golden defaults < the --config_path file < command-line overrides."""
    cfg, user_keys = Config(read_yaml(golden_path)), set()
    text_keys = {f"{section}.{name}" for section, values in cfg.items() for name, value in values.items()
                 if TYPES.get(f"{section}.{name}", (type(value),)) == (str,)}
    config_path, overrides = parse_args(argv, text_keys)
    if config_path is not None and Path(config_path).resolve() != Path(golden_path).resolve():
        for section, values in read_yaml(config_path).items():
            for name, value in values.items():
                set_key(cfg, f"{section}.{name}", value, config_path)
                user_keys.add(f"{section}.{name}")
    for key, value in overrides:
        set_key(cfg, key, value, f"--{key}")
        user_keys.add(key)
    cfg.user_keys = frozenset(user_keys)
    fit_metric_to_task(cfg)
    check_config(cfg)
    return cfg


# the module.metric choices of each task, its default first (hamming_loss is lower-better: not one)
TASK_METRICS = {"single_label": ["acc_and_f1", "acc", "f1_macro", "mcc"],
                "multi_label": ["f1_micro", "f1_macro", "f1_samples", "subset_acc"],
                "regression": ["pcc_and_scc"]}
TASK_NAMES = {"single_label": "single-label classification", "multi_label": "multi-label classification",
              "regression": "regression"}


def uses_amp(trainer_cfg):
    """Mixed precision is on: trainer.amp, or a seed backend that says so (sp-amp, ddp-amp)."""
    return bool(trainer_cfg.get("amp")) or trainer_cfg["backend"].endswith("-amp")


def label_names(cfg):
    """The class (or label) names; None for regression."""
    if task_of(cfg["data"]) == "regression":
        return None
    return [str(label) for label in cfg["data"]["labels_list"]]


def task_of(data_cfg):
    """multi_label when data.multi_label says so, else regression for one label, else single_label."""
    if data_cfg["multi_label"]:
        return "multi_label"
    return "regression" if len(data_cfg["labels_list"]) == 1 else "single_label"


def fit_metric_to_task(cfg):
    """module.metric, where the user did not set it, follows the task (TASK_METRICS' first choice:
    pcc_and_scc for regression, f1_micro for multi-label, config.yaml's acc_and_f1 for single-label).
    Returns what to say, or None when it is config.yaml's choice; a metric the user set is
    check_config's to refuse if it does not fit."""
    task = task_of(cfg["data"])
    if "module.metric" in cfg.user_keys:
        return None
    if cfg["module"]["metric"] not in TASK_METRICS[task]:
        cfg["module"]["metric"] = TASK_METRICS[task][0]
    if task == "single_label":
        return None
    return f"module.metric {cfg['module']['metric']} (the metric of {TASK_NAMES[task]}{': one label' * (task == 'regression')})"


def check_config(cfg):
    """Values that are well typed but cannot work, caught before anything runs."""
    check_numbers(cfg)
    check_optimizer(cfg)
    check_steps(cfg)
    check_task(cfg)
    check_what_runs(cfg)
    check_sweep(cfg["sweep"])
    check_crossval(cfg["crossval"])
    check_predict_output(cfg)
    check_data_check(cfg)
    check_checkpoint_names(cfg["ckpt"])
    check_export(cfg["export"])
    check_serve(cfg["serve"])


def check_numbers(cfg):
    """Every number finite, and each in the range its key allows."""
    for section, values in cfg.items():
        for name, value in values.items():
            check_finite(f"{section}.{name}", value)
    module, tcfg = cfg["module"], cfg["trainer"]
    if tcfg["log_steps"] != "auto" and not isinstance(tcfg["log_steps"], int):
        raise ConfigError(f"trainer.log_steps is {tcfg['log_steps']!r}; use a number of steps, or auto")
    positive = ["module.max_lr", "module.max_seq_len", "trainer.epochs", "trainer.train_batch_size",
                "trainer.val_batch_size", "trainer.gpu_batch_size_limit"] + ["trainer.log_steps"] * (tcfg["log_steps"] != "auto")
    for key in positive:
        section, name = key.split(".")
        if cfg[section][name] <= 0:
            raise ConfigError(f"{key} is {cfg[section][name]}; it must be positive")
    for key in ["trainer.eval_steps", "trainer.num_threads", "module.weight_decay", "data.window_stride",
                "trainer.max_grad_norm", "ckpt.period", "ckpt.save_steps",
                "trainer.early_stopping_patience", "trainer.early_stopping_min_delta"]:
        section, name = key.split(".")
        if cfg[section][name] is not None and cfg[section][name] < 0:  # early_stopping_patience may be null
            raise ConfigError(f"{key} is {cfg[section][name]}; it must not be negative")
    at_least_one = {"trainer.stop_after_epochs": "null", "data.max_windows": "null for all", "data.max_rows": "null for all",
                    "ckpt.keep_last": "null to keep all"}
    for key, null in at_least_one.items():
        section, name = key.split(".")
        if cfg[section][name] is not None and cfg[section][name] < 1:
            raise ConfigError(f"{key} is {cfg[section][name]}; it must be at least 1, or {null}")
    # numpy seeds are unsigned 32-bit integers
    if not 0 <= tcfg["seed"] <= 2**32 - 1:
        raise ConfigError(f"trainer.seed is {tcfg['seed']}; it must be in [0, 2**32 - 1]")
    if not 0 <= module["warmup_prop"] <= 1:
        raise ConfigError(f"module.warmup_prop is {module['warmup_prop']}; it must be in [0, 1]")


def check_optimizer(cfg):
    """The LoRA adapters (model.lora_*) and the rates of the parameter groups (module.head_lr, layer_lr_decay)."""
    model, module = cfg["model"], cfg["module"]
    if model["lora_rank"] < 0:
        raise ConfigError(f"model.lora_rank is {model['lora_rank']}; use 0 (LoRA off) or a rank such as 8")
    if model["lora_alpha"] <= 0:
        raise ConfigError(f"model.lora_alpha is {model['lora_alpha']}; it must be positive (e.g. 16)")
    if not 0 <= model["lora_dropout"] < 1:
        raise ConfigError(f"model.lora_dropout is {model['lora_dropout']}; it must be in [0, 1)")
    targets = model["lora_targets"]
    if targets is not None and not (targets and all(isinstance(t, str) and t.strip() == t and t for t in targets)):
        raise ConfigError(f"model.lora_targets {targets} must be names of linear layers (e.g. [query, value]), or null")
    if module["head_lr"] is not None and module["head_lr"] <= 0:
        raise ConfigError(f"module.head_lr is {module['head_lr']}; it must be positive, or null for module.max_lr")
    if not 0 < module["layer_lr_decay"] <= 1:
        raise ConfigError(f"module.layer_lr_decay is {module['layer_lr_decay']}; it must be in (0, 1] (1.0 = off)")


def check_steps(cfg):
    """Settings of the steps that contradict each other: pausing without checkpoints, windows that
    would repeat more than they move, clipping to nothing."""
    data, module, tcfg = cfg["data"], cfg["module"], cfg["trainer"]
    if tcfg["stop_after_epochs"] is not None and not cfg["ckpt"]["checkpoint"]:
        raise ConfigError("trainer.stop_after_epochs needs ckpt.checkpoint true: the launch that goes on resumes "
                          "from the checkpoint written when it stops")
    if data["long_texts"] == "windows" and data["window_stride"] >= module["max_seq_len"] // 2:
        # each window moves on by max_seq_len - stride - special tokens: a stride near the window
        # would make as many windows as tokens
        raise ConfigError(f"data.window_stride {data['window_stride']} must be less than half of module.max_seq_len "
                          f"{module['max_seq_len']}, so each window moves on by more than it repeats")
    if tcfg["clip_grads"] and tcfg["max_grad_norm"] <= 0:
        # clipping to norm 0 scales every gradient to zero: the model would never change
        raise ConfigError(f"trainer.max_grad_norm is {tcfg['max_grad_norm']} with trainer.clip_grads "
                          f"true; set a positive norm, or clip_grads false")


def check_task(cfg):
    """The labels, columns, metric, thresholds, calibration and class weights fit the task they describe."""
    data, module = cfg["data"], cfg["module"]
    labels = [str(label).strip() for label in data["labels_list"]]
    if not labels or len(set(labels)) != len(labels):
        raise ConfigError(f"data.labels_list {data['labels_list']} must be non-empty without duplicates")
    check_columns(data)
    task = task_of(data)
    if module["metric"] not in TASK_METRICS[task]:
        *others, last = TASK_METRICS[task]
        raise ConfigError(f"module.metric {module['metric']} does not fit {TASK_NAMES[task]}"
                          f"{' (one label)' * (task == 'regression')}; use "
                          f"{', '.join(others) + ' or ' if others else ''}{last}")
    check_threshold(module["threshold"], labels)
    check_calibration(module["calibrate"], data["abstain_below"], labels, task)
    if data["train_filepath"] is not None:  # evaluation may learn its task from the checkpoint first
        check_threshold_fits(cfg)
    if data["multi_label"] and (not data["label_sep"] or data["label_sep"].strip() != data["label_sep"]):
        raise ConfigError(f"data.label_sep is {data['label_sep']!r}; it must be a non-empty separator "
                          f"without surrounding spaces, e.g. \"|\"")
    check_class_weights(module["class_weights"], labels, task)


def check_what_runs(cfg):
    """The files a run reads make a run: something to do, a model to evaluate, a validation file for
    what needs one."""
    data = cfg["data"]
    if data["multi_label"] and cfg["module"]["threshold"] == "tune" and data["val_filepath"] is None:
        raise ConfigError("module.threshold tune chooses each label's threshold on data.val_filepath, which "
                          "is null; set a validation file, or give the thresholds")
    patience = cfg["trainer"]["early_stopping_patience"]
    if patience and data["train_filepath"] is not None and data["val_filepath"] is None:
        raise ConfigError(f"trainer.early_stopping_patience {patience} counts validations on data.val_filepath, "
                          f"which is null; set a validation file, or early_stopping_patience 0")
    if data["train_filepath"] is None:
        if cfg["model"]["model_path"] is None:
            raise ConfigError("data.train_filepath is null (evaluate / predict only), so "
                              "model.model_path must name the fine-tuned model")
        if data["val_filepath"] is None and data["predict_filepath"] is None:
            raise ConfigError("nothing to do: set data.train_filepath, data.val_filepath or "
                              "data.predict_filepath")


def check_serve(serve):
    """serve.py's address, batching and limits."""
    if not serve["host"] or any(c.isspace() for c in serve["host"]):
        raise ConfigError(f"serve.host is {serve['host']!r}; give an address such as 127.0.0.1 (this machine only)")
    if not 1 <= serve["port"] <= 65535:
        raise ConfigError(f"serve.port is {serve['port']}; it must be a TCP port, 1 to 65535")
    for name in ("max_batch_size", "max_batch_tokens", "max_queue", "max_inputs", "max_chars", "max_body_bytes"):
        if serve[name] < 1:
            raise ConfigError(f"serve.{name} is {serve[name]}; it must be at least 1")
    if serve["max_wait_ms"] < 0:
        raise ConfigError(f"serve.max_wait_ms is {serve['max_wait_ms']}; it must not be negative (0 = no wait)")
    if serve["max_queue"] < serve["max_inputs"]:  # else a request of max_inputs texts could never be taken
        raise ConfigError(f"serve.max_queue {serve['max_queue']} is less than serve.max_inputs {serve['max_inputs']}; "
                          f"raise max_queue")


def check_export(export):
    """export.py's gate: shares and a metric drop in [0, 1], and a thread count."""
    for name in ("fp32_min_identical", "int8_min_identical", "int8_max_metric_drop"):
        if not 0 <= export[name] <= 1:
            raise ConfigError(f"export.{name} is {export[name]}; it must be in [0, 1]")
    if export["threads"] < 0:
        raise ConfigError(f"export.threads is {export['threads']}; it must not be negative (0 = all cores)")


def check_sweep(sweep):
    """sweep.py's numbers; what its grid names is checked by sweep.py against the trials' configs."""
    if not 0 < sweep["keep"] <= 1:
        raise ConfigError(f"sweep.keep is {sweep['keep']}; it must be in (0, 1]: the fraction of trials kept at each rung")
    for key in ["samples", "nproc_per_node"]:
        if sweep[key] is not None and sweep[key] < 1:
            raise ConfigError(f"sweep.{key} is {sweep[key]}; it must be at least 1")
    rungs = sweep["rungs"]
    if rungs is not None and not (all(type_ok(r, (int,)) and r >= 1 for r in rungs) and rungs == sorted(set(rungs))):
        raise ConfigError(f"sweep.rungs {rungs} must be increasing epochs (whole numbers from 1), or null")


def check_crossval(crossval):
    """crossval.py's numbers: at least two folds, a process per fold, a numpy seed, a folder."""
    if crossval["folds"] < 2:
        raise ConfigError(f"crossval.folds is {crossval['folds']}; it must be at least 2 (each fold is held out once)")
    if crossval["nproc_per_node"] < 1:
        raise ConfigError(f"crossval.nproc_per_node is {crossval['nproc_per_node']}; it must be at least 1")
    if not 0 <= crossval["seed"] <= 2**32 - 1:
        raise ConfigError(f"crossval.seed is {crossval['seed']}; it must be in [0, 2**32 - 1]")
    if not crossval["dir"]:
        raise ConfigError("crossval.dir is empty; name a folder, e.g. crossval")


def check_data_check(cfg):
    """check_data.py's files: extra files are paths, and the report is none of the files it reads."""
    extra, output = cfg["check"]["extra_filepaths"], cfg["check"]["output"]
    if not all(isinstance(path, str) and path for path in extra):
        raise ConfigError(f"check.extra_filepaths is {extra!r}; give a list of file paths, e.g. [data/test.csv]")
    if output is None:
        return
    inputs = [cfg["data"][key] for key in ("train_filepath", "val_filepath", "predict_filepath")]
    for path in inputs + extra + [str(p) for p in cfg["distill"]["unlabeled_filepaths"]]:
        if path is not None and os.path.realpath(path) == os.path.realpath(output):
            raise ConfigError(f"check.output {output} is the input file {path}; write the report to another file")


def check_class_weights(weights, labels, task):
    """null, balanced, or one positive weight per class (per label's positives in multi-label); a
    regression has no classes to weigh."""
    if weights is None:
        return
    if task == "regression":
        raise ConfigError("module.class_weights is set, but one label means regression, which has no classes; "
                          "set it to null")
    if isinstance(weights, str):
        if weights != "balanced":
            raise ConfigError(f"module.class_weights is {weights!r}; use null, balanced, or a list of "
                              f"{len(labels)} weights")
        return
    if len(weights) != len(labels) or not all(type_ok(w, (float,)) and w > 0 for w in weights):
        raise ConfigError(f"module.class_weights {weights} must be {len(labels)} positive numbers, one per "
                          f"data.labels_list entry {labels}")


def check_calibration(calibrate, abstain_below, labels, task):
    """module.calibrate: true, false, a positive temperature, or (multi-label) one per label;
    data.abstain_below: a probability. Both are for classification: a regression has no probabilities."""
    if task == "regression" and (abstain_below is not None or not isinstance(calibrate, bool)):
        key = "data.abstain_below" if abstain_below is not None else "module.calibrate"
        raise ConfigError(f"{key} is set, but one label means regression, whose scores are no probabilities; "
                          f"leave it out")
    if isinstance(calibrate, list) and (task != "multi_label" or len(calibrate) != len(labels)):
        raise ConfigError(f"module.calibrate {calibrate}: a list is one temperature per label of a multi-label task "
                          f"({len(labels)} labels); give one number, true or false")
    temperatures = calibrate if isinstance(calibrate, list) else [] if isinstance(calibrate, bool) else [calibrate]
    if not all(type_ok(t, (float,)) and t > 0 for t in temperatures):
        raise ConfigError(f"module.calibrate {calibrate}: a temperature is a positive number (1 changes nothing)")
    if abstain_below is not None and not 0 < abstain_below < 1:
        raise ConfigError(f"data.abstain_below is {abstain_below}; it must be a probability between 0 and 1, or null")


def check_threshold_fits(cfg):
    """A threshold the user set is for multi-label classification only."""
    if task_of(cfg["data"]) != "multi_label" and "module.threshold" in getattr(cfg, "user_keys", ()):
        raise ConfigError("module.threshold is for multi-label classification (data.multi_label true); leave it out")


def check_threshold(threshold, labels):
    """module.threshold: one probability in (0, 1), one per label, or tune."""
    if isinstance(threshold, str):
        if threshold != "tune":
            raise ConfigError(f"module.threshold is {threshold!r}; use a probability such as 0.5, a list of "
                              f"{len(labels)} (one per label), or tune")
        return
    values = threshold if isinstance(threshold, list) else [threshold]
    if isinstance(threshold, list) and len(threshold) != len(labels):
        raise ConfigError(f"module.threshold {threshold} must have {len(labels)} entries, one per "
                          f"data.labels_list entry {labels}")
    if not all(type_ok(t, (float,)) and 0 < t < 1 for t in values):
        raise ConfigError(f"module.threshold {threshold}: thresholds are probabilities between 0 and 1")


def check_finite(key, value):
    """NaN compares false with everything, so it would pass every range check; inf is no better."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} is {value}; it must be a finite number")
    if isinstance(value, list):
        for i, item in enumerate(value):
            check_finite(f"{key}[{i}]", item)
    if isinstance(value, dict):
        for name, item in value.items():
            check_finite(f"{key}.{name}", item)


def check_columns(data):
    """Each column has one role: a text column that is the label column trains on the answer."""
    if data["text_b_col"] is not None and data["text_b_col"] == data["text_a_col"]:
        raise ConfigError("data.text_b_col equals data.text_a_col; set it to the second text column or null")
    for key in ["text_a_col", "text_b_col"]:
        if data[key] == data["label_col"]:
            raise ConfigError(f"data.{key} equals data.label_col ({data[key]!r}); the text column "
                              f"must not be the label column")


def check_predict_output(cfg):
    """Predictions written over one of the run's input files would replace the data, and into
    model.model_path's folder over the model (model.onnx, model.safetensors)."""
    output = cfg["data"]["predict_output"]
    if output is None:
        return
    inputs = {f"data.{key}": cfg["data"][key]
              for key in ["train_filepath", "val_filepath", "predict_filepath"]}
    for i, path in enumerate(cfg["distill"]["unlabeled_filepaths"]):
        inputs[f"distill.unlabeled_filepaths[{i}]"] = str(path)
    for key, path in inputs.items():
        # realpath: ./a.csv, a.csv and a link to it are the same file
        if path is not None and os.path.realpath(path) == os.path.realpath(output):
            raise ConfigError(f"data.predict_output {output} is the input file {key}; write the "
                              f"predictions to another file")
    model = cfg["model"]["model_path"]
    # the model it predicts with: its weights, model.onnx, or any file of its folder
    if model is not None and (os.path.realpath(output) == os.path.realpath(model) or (
            os.path.isdir(model) and Path(os.path.realpath(output)).is_relative_to(os.path.realpath(model)))):
        raise ConfigError(f"data.predict_output {output} is a file of model.model_path {model}, the model "
                          f"it predicts with; write the predictions outside that folder")


def check_checkpoint_names(ckpt):
    """Checkpoints are <model_state_save_dir>/<file_prefix>-epoch<E>-step<S>/training_state<file_ext>:
    a prefix or extension that holds a path would write them outside model_state_save_dir, and a
    leading dot would hide them among the .tmp- folders they are written in."""
    prefix, ext = ckpt["file_prefix"], ckpt["file_ext"]
    if not prefix or prefix.startswith(".") or any(c in prefix for c in "/\\\0"):
        raise ConfigError(f"ckpt.file_prefix is {prefix!r}; it must be a plain name (no / or \\, "
                          f"not starting with a dot), e.g. checkpoint")
    if not re.fullmatch(r"(\.[A-Za-z0-9_]+)?", ext):
        raise ConfigError(f"ckpt.file_ext is {ext!r}; it must be a dot and letters, digits or _ "
                          f"(e.g. .pt), or empty")
