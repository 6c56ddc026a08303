"""Config: the golden config.yaml, a --config_path file over it, --section.key overrides, and the
checks that stop a run with one line before anything starts."""
import os
import re
import subprocess
import sys

import pytest

from config import GOLDEN_CONFIG, ConfigError, config_options, load_config, parse_args, print_help, read_yaml, task_of


def config_error(argv):
    with pytest.raises(ConfigError) as info:
        load_config(argv)
    return str(info.value)


def write_config(tmp_path, text):
    path = tmp_path / "my.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


# -- values are YAML values, in a file and on the command line ---------------------------------


def test_golden_config_reads_exponent_floats_as_floats():
    # plain PyYAML (YAML 1.1) reads "5e-5" as a string; the golden file writes max_lr that way
    golden = read_yaml(GOLDEN_CONFIG)
    assert isinstance(golden["module"]["max_lr"], float)
    assert load_config([])["module"]["max_lr"] == pytest.approx(5e-5)


@pytest.mark.parametrize("text, value", [("2e-5", 2e-5), ("2E-5", 2e-5), ("1e3", 1000.0),
                                         ("+3.5e-4", 3.5e-4), ("0.001", 0.001), ("1", 1)])
def test_command_line_numbers_are_numbers(text, value):
    lr = load_config(["--module.max_lr", text])["module"]["max_lr"]
    assert lr == pytest.approx(value) and not isinstance(lr, str)


def test_exponent_float_in_a_config_file_is_a_float(tmp_path):
    path = write_config(tmp_path, "module:\n  max_lr: 2e-5\n  warmup_prop: 1e-1\n")
    cfg = load_config(["--config_path", path])
    assert cfg["module"]["max_lr"] == pytest.approx(2e-5)
    assert cfg["module"]["warmup_prop"] == pytest.approx(0.1)


def test_null_lists_and_key_equals_value_form():
    cfg = load_config(["--data.val_filepath", "null", "--data.labels_list", "[a, b, 'c d']",
                       "--trainer.epochs=4", "--data.text_b_col", "premise"])
    assert cfg["data"]["val_filepath"] is None
    assert cfg["data"]["labels_list"] == ["a", "b", "c d"]
    assert cfg["trainer"]["epochs"] == 4
    assert cfg["data"]["text_b_col"] == "premise"


def test_labels_with_dashes_stay_whole():
    # the original split CLI lists on "-" and eval'ed the pieces
    cfg = load_config(["--data.labels_list", "[not-entailment, entailment]"])
    assert cfg["data"]["labels_list"] == ["not-entailment", "entailment"]


def test_yes_no_labels_stay_strings(tmp_path):
    # YAML 1.1 reads yes / no / on / off as booleans; labels such as these must match the file
    assert load_config(["--data.labels_list", "[no, yes]"])["data"]["labels_list"] == ["no", "yes"]
    path = write_config(tmp_path, "data:\n  labels_list: [off, on]\n")
    assert load_config(["--config_path", path])["data"]["labels_list"] == ["off", "on"]
    assert load_config(["--trainer.clip_grads", "false"])["trainer"]["clip_grads"] is False


def test_column_positions_are_ints():
    cfg = load_config(["--data.header", "null", "--data.text_a_col", "1", "--data.label_col", "0"])
    assert cfg["data"]["header"] is None
    assert cfg["data"]["text_a_col"] == 1 and cfg["data"]["label_col"] == 0


# -- --config_path: a partial file over the golden config, the command line over both -----------


def test_partial_config_file_overlays_the_golden_config(tmp_path):
    path = write_config(tmp_path, "trainer:\n  epochs: 7\ndata:\n  labels_list: [no, yes]\n"
                                  "  encoding: latin-1\n")
    golden = load_config([])
    cfg = load_config(["--config_path", path])
    assert cfg["trainer"]["epochs"] == 7
    assert cfg["data"]["encoding"] == "latin-1"
    # keys the file leaves out keep their golden values
    assert cfg["trainer"]["train_batch_size"] == golden["trainer"]["train_batch_size"]
    assert cfg["module"] == golden["module"]
    assert cfg["ckpt"] == golden["ckpt"]


def test_command_line_wins_over_the_config_file(tmp_path):
    path = write_config(tmp_path, "trainer:\n  epochs: 7\n  seed: 3\n")
    cfg = load_config(["--trainer.epochs", "2", "--config_path", path])
    assert cfg["trainer"]["epochs"] == 2
    assert cfg["trainer"]["seed"] == 3


def test_missing_config_file_is_named(tmp_path):
    message = config_error(["--config_path", str(tmp_path / "nope.yaml")])
    assert "nope.yaml" in message and "not found" in message


def test_config_path_that_is_a_directory_is_named(tmp_path):
    message = config_error(["--config_path", str(tmp_path)])
    assert str(tmp_path) in message and "is a directory" in message


def test_config_file_that_is_not_utf8_names_the_file_and_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("trainer:\n  seed: 3  # café\n".encode("latin-1"))
    message = config_error(["--config_path", str(path)])
    assert "latin1.yaml:2:" in message and "UTF-8" in message


@pytest.mark.parametrize("value", ["&a [*a]", "&a {x: *a}", "[1, &a [2, *a]]"])
def test_a_yaml_alias_inside_its_own_anchor_is_one_line_not_a_recursion(value):
    message = config_error(["--data.labels_list", value])
    assert message.startswith("--data.labels_list: a YAML alias inside its own anchor")


def test_a_recursive_alias_in_a_config_file_names_the_file(tmp_path):
    path = write_config(tmp_path, "sweep:\n  grid: &g {module.max_lr: [1e-5], nested: *g}\n")
    assert config_error(["--config_path", path]).startswith(f"{path}: a YAML alias inside its own anchor")


def test_aliases_of_aliases_that_would_make_a_billion_items_are_refused():
    nested = "[&a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"
    nested += "".join(f", &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)) + "]"
    assert "more than 100000 items" in config_error(["--data.labels_list", nested])


def test_an_alias_used_twice_without_recursion_is_an_ordinary_value():
    cfg = load_config(["--distill.loss_types", "[&t logits, labels]", "--distill.loss_weights", "[0.5, 0.5]"])
    assert cfg["distill"]["loss_types"] == ["logits", "labels"]
    _, overrides = parse_args(["--sweep.grid", "{module.max_lr: &lr [1e-5, 2e-5], module.weight_decay: *lr}"])
    assert overrides == [("sweep.grid", {"module.max_lr": [1e-5, 2e-5], "module.weight_decay": [1e-5, 2e-5]})]


def test_config_file_without_sections_is_refused(tmp_path):
    path = write_config(tmp_path, "max_lr: 2e-5\n")
    assert "sections" in config_error(["--config_path", path])


# -- unknown keys, wrong types and bad choices name the key and what is valid -------------------


def test_unknown_section_lists_the_sections():
    message = config_error(["--optim.lr", "0.1"])
    assert "'optim'" in message
    for section in ["data", "model", "module", "trainer", "ckpt"]:
        assert section in message


def test_unknown_key_lists_the_keys_of_its_section():
    message = config_error(["--module.lr", "0.1"])
    assert "module.lr" in message
    assert "max_lr" in message and "warmup_prop" in message


def test_unknown_key_in_a_config_file_names_the_file(tmp_path):
    path = write_config(tmp_path, "trainer:\n  epoch: 3\n")
    message = config_error(["--config_path", path])
    assert "my.yaml" in message and "trainer.epoch" in message and "epochs" in message


@pytest.mark.parametrize("key, value, expected", [
    ("trainer.epochs", "2.5", "int"),
    ("trainer.epochs", "three", "int"),
    ("trainer.clip_grads", "1", "bool"),
    ("trainer.train_batch_size", "true", "int"),
    ("module.max_lr", "fast", "float"),
    ("data.labels_list", "positive", "list"),
    ("data.header", "first", "int, null"),
])
def test_wrong_type_names_the_key_and_the_type(key, value, expected):
    message = config_error([f"--{key}", value])
    assert key in message and expected in message


@pytest.mark.parametrize("key, value, choices", [
    ("data.file_format", "xlsx", ["csv", "tsv", "jsonl"]),
    ("data.quoting", "double", ["auto", "csv", "none"]),
    ("module.metric", "f1", ["acc", "acc_and_f1", "mcc", "pcc_and_scc"]),
    ("trainer.backend", "dp", ["sp", "sp-amp", "ddp", "ddp-amp"]),
])
def test_bad_choice_lists_the_choices(key, value, choices):
    message = config_error([f"--{key}", value])
    assert key in message and repr(value) in message
    assert all(choice in message for choice in choices)


def test_argument_without_dashes_or_value_is_an_error():
    assert "unexpected argument" in config_error(["trainer.epochs", "3"])
    assert "needs a value" in config_error(["--trainer.epochs"])


@pytest.mark.parametrize("argv, key", [
    (["--data.predict_output", "--trainer.debug=true"], "--data.predict_output"),
    (["--trainer.epochs", "--trainer.seed", "3"], "--trainer.epochs"),
    (["--config_path", "--trainer.epochs=2"], "--config_path"),
])
def test_option_in_place_of_a_value_is_a_missing_value(argv, key):
    # the value was left out: taking the next option as the value wrote a file named "--trainer.debug=true"
    assert config_error(argv) == f"{key} needs a value"


def test_negative_numbers_and_equals_form_are_values():
    _, overrides = parse_args(["--module.weight_decay", "-1e-3", "--trainer.seed", "-1",
                               "--data.predict_output=--odd-name.csv"])
    assert overrides == [("module.weight_decay", -1e-3), ("trainer.seed", -1),
                         ("data.predict_output", "--odd-name.csv")]


# -- check_config: well-typed values that cannot work ------------------------------------------


@pytest.mark.parametrize("argv, fragment", [
    (["--module.max_lr", "0"], "module.max_lr"),
    (["--module.max_lr", "-1e-5"], "module.max_lr"),
    (["--trainer.train_batch_size", "0"], "trainer.train_batch_size"),
    (["--trainer.gpu_batch_size_limit", "-4"], "trainer.gpu_batch_size_limit"),
    (["--module.max_seq_len", "0"], "module.max_seq_len"),
    (["--trainer.epochs", "-1"], "trainer.epochs"),
    (["--module.warmup_prop", "1.5"], "module.warmup_prop"),
    (["--module.warmup_prop", "-0.1"], "module.warmup_prop"),
    (["--data.labels_list", "[a, b, a]"], "without duplicates"),
    (["--data.labels_list", "[1, '1']"], "without duplicates"),  # the same label once read from a file
    (["--data.labels_list", "[]"], "non-empty"),
    (["--data.text_b_col", "text"], "text_b_col equals data.text_a_col"),
    (["--data.labels_list", "[score]", "--module.metric", "acc_and_f1"], "pcc_and_scc"),  # a set metric must fit
    (["--module.metric", "pcc_and_scc"],
     "does not fit single-label classification; use acc_and_f1, acc, f1_macro or mcc"),
    (["--data.train_filepath", "null"], "model.model_path"),
    (["--data.train_filepath", "null", "--data.val_filepath", "null", "--model.model_path", "m"],
     "nothing to do"),
    (["--ckpt.keep_last", "0"], "ckpt.keep_last"),
    # NaN passes every comparison, so no range check stops it; every float key is checked
    (["--module.max_lr", ".nan"], "module.max_lr is nan; it must be a finite number"),
    (["--module.max_lr", ".inf"], "module.max_lr is inf"),
    (["--module.weight_decay", "-.inf"], "module.weight_decay is -inf; it must be a finite number"),
    (["--module.warmup_prop", ".NaN"], "module.warmup_prop is nan; it must be a finite number"),
    (["--trainer.max_grad_norm", ".inf"], "trainer.max_grad_norm is inf"),
    (["--distill.temperature", ".nan"], "distill.temperature is nan"),
    (["--distill.loss_weights", "[0.5, .nan]"], "distill.loss_weights[1] is nan"),
    (["--distill.student_config", "{hidden_dropout_prob: .inf}"],
     "distill.student_config.hidden_dropout_prob is inf"),
    # numpy refuses seeds outside unsigned 32 bits, long after the run started
    (["--trainer.seed", "-1"], "trainer.seed is -1; it must be in [0, 2**32 - 1]"),
    (["--trainer.seed", str(2**32)], "trainer.seed is 4294967296"),
    (["--trainer.epochs", "0"], "trainer.epochs is 0; it must be positive"),
    (["--trainer.max_grad_norm", "0"], "trainer.max_grad_norm is 0 with trainer.clip_grads true"),
    (["--trainer.max_grad_norm", "0.0"], "trainer.max_grad_norm is 0.0 with trainer.clip_grads true"),
    # a text column that is the label column trains on the answer
    (["--data.text_a_col", "sentiment"], "data.text_a_col equals data.label_col ('sentiment')"),
    (["--data.text_b_col", "sentiment"], "data.text_b_col equals data.label_col ('sentiment')"),
    (["--data.header", "null", "--data.text_a_col", "1", "--data.label_col", "1"],
     "data.text_a_col equals data.label_col (1)"),
])
def test_check_config_refuses_values_that_cannot_work(argv, fragment):
    assert fragment in config_error(argv)


@pytest.mark.parametrize("key, value", [
    ("ckpt.file_prefix", "../../escape"), ("ckpt.file_prefix", "runs/ckpt"), ("ckpt.file_prefix", "a\\b"),
    ("ckpt.file_prefix", "."), ("ckpt.file_prefix", ".."), ("ckpt.file_prefix", ".hidden"),
    ("ckpt.file_prefix", "''"), ("ckpt.file_prefix", '"a\\0b"'),
    ("ckpt.file_ext", "/../../x"), ("ckpt.file_ext", "pt"), ("ckpt.file_ext", "."),
    ("ckpt.file_ext", ".p/t"), ("ckpt.file_ext", ".tar.gz"), ("ckpt.file_ext", "'.pt '"),
])
def test_checkpoint_names_are_plain_names(key, value):
    # "../../escape" wrote the checkpoints outside ckpt.model_state_save_dir
    message = config_error([f"--{key}", value])
    assert message.startswith(f"{key} is ") and "e.g." in message


def test_predict_output_over_an_input_file_is_refused(tmp_path, monkeypatch):
    # the predictions replaced the file they were made from; ./a.csv, a.csv and a link are one file
    monkeypatch.chdir(tmp_path)
    (tmp_path / "new.csv").write_text("text\ngood\n", encoding="utf-8")
    os.symlink(tmp_path / "new.csv", tmp_path / "link.csv")
    cases = [({"data.predict_filepath": "new.csv"}, "./new.csv", "data.predict_filepath"),
             ({"data.predict_filepath": "new.csv"}, str(tmp_path / "link.csv"), "data.predict_filepath"),
             ({"data.train_filepath": "in/../new.csv"}, "new.csv", "data.train_filepath"),
             ({"data.val_filepath": str(tmp_path / "new.csv")}, "new.csv", "data.val_filepath"),
             ({"distill.unlabeled_filepaths": "[other.csv, new.csv]"}, "new.csv",
              "distill.unlabeled_filepaths[1]")]
    for inputs, output, key in cases:
        argv = [f"--{k}={v}" for k, v in inputs.items()] + ["--data.predict_output", output]
        message = config_error(argv)
        assert f"data.predict_output {output} is the input file {key}" in message
    load_config(["--data.predict_filepath", "new.csv", "--data.predict_output", "new-labels.csv"])


@pytest.mark.parametrize("key, value, expected", [
    ("module.warmup_prop", "0", 0), ("module.warmup_prop", "1.0", 1.0),
    ("trainer.seed", "0", 0), ("trainer.seed", str(2**32 - 1), 2**32 - 1), ("trainer.epochs", "1", 1),
    ("ckpt.file_ext", "''", ""), ("ckpt.file_ext", ".pt_2", ".pt_2"), ("ckpt.file_prefix", "run-2_ckpt.v1", "run-2_ckpt.v1")])
def test_the_edges_of_valid_ranges_are_taken_as_given(key, value, expected):
    section, name = key.split(".")
    assert load_config([f"--{key}", value])[section][name] == expected


def test_settings_valid_only_together_are_taken_together():
    cfg = load_config(["--trainer.clip_grads", "false", "--trainer.max_grad_norm", "0"])
    assert (cfg["trainer"]["clip_grads"], cfg["trainer"]["max_grad_norm"]) == (False, 0)
    cfg = load_config(["--data.labels_list", "[score]", "--module.metric", "pcc_and_scc"])
    assert task_of(cfg["data"]) == "regression" and cfg["module"]["metric"] == "pcc_and_scc"
    cfg = load_config(["--data.train_filepath", "null", "--model.model_path", "some/checkpoint"])
    assert cfg["data"]["train_filepath"] is None and cfg["model"]["model_path"] == "some/checkpoint"


# -- --help: every key with its default and meaning, before torch is imported (issue 14) --------


def golden_key_lines():
    """(section.key, default, meaning) of every key, as config.yaml's lines write them."""
    keys, section = [], None
    for line in GOLDEN_CONFIG.read_text(encoding="utf-8").splitlines():
        if match := re.match(r"(\w+):", line):
            section = match[1]
        elif match := re.match(r"  (\w+): (.*?) +# (.*)$", line):
            keys.append((f"{section}.{match[1]}", match[2], match[3]))
    return keys


def test_every_golden_key_has_a_one_line_meaning():
    golden = read_yaml(GOLDEN_CONFIG)
    assert [key for key, _, _ in golden_key_lines()] == [
        f"{section}.{name}" for section, values in golden.items() for name in values]


def help_lists_every_key(keys):
    for key, default, meaning in golden_key_lines():
        assert re.search(rf"^  --{re.escape(key)} {re.escape(default)} +{re.escape(meaning)}$",
                         keys, re.MULTILINE), key


def test_help_lists_every_key_with_its_default_and_meaning(capsys):
    # in this process, for the quick loop; the test below runs the scripts themselves
    print_help("usage: the docstring")
    usage, _, keys = capsys.readouterr().out.partition("\nOptions: ")
    assert usage == "usage: the docstring\n"
    help_lists_every_key(keys)


@pytest.mark.slow  # a fresh Python process per script
@pytest.mark.parametrize("script", ["trainer.py", "distill.py", "export.py"])
def test_help_prints_usage_and_every_key_without_importing_torch(script):
    repo = GOLDEN_CONFIG.parent
    result = subprocess.run([sys.executable, "-X", "importtime", script, "--help"], cwd=repo,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    # -X importtime writes "import time: self | cumulative | module" to stderr for every import
    imported = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert "yaml" in imported and not imported & {"torch", "transformers", "numpy"}
    usage, _, keys = result.stdout.partition("\nOptions: ")
    assert usage.splitlines()[0] in (repo / script).read_text().splitlines()[0]
    # a backslash at the end of an example line stays there, not a gap inside the command
    assert not re.search(r"\S {3,}--", usage)
    help_lists_every_key(keys)
    if script == "trainer.py":
        assert "--data.val_filepath null \\\n        --data.predict_filepath new.csv" in usage



def test_config_options_give_back_the_config_they_were_made_of():
    argv = ["--data.labels_list", "[business, 'a b', 'yes', '1']", "--module.max_lr", "2e-5", "--data.label_sep", "#",
            "--data.header", "null", "--data.text_a_col", "0", "--data.train_filepath", "data/bbc/train.csv",
            "--distill.student_config", "{num_hidden_layers: 2}", "--module.threshold", "[0.3, 0.4, 0.5, 0.6]",
            "--data.multi_label", "true", "--data.val_filepath", "true.csv", "--model.tokenizer_path", "'12'",
            "--ckpt.file_prefix=--odd", "--trainer.seed", "0", "--trainer.log_steps", "7", "--export.int8", "false"]
    cfg = load_config(argv)
    options = config_options(cfg, leave_out=("export", "trainer.seed"))
    assert "--ckpt.file_prefix=--odd" in options and "--export.int8" not in options and "--trainer.seed" not in options
    again = load_config(options)
    assert again["trainer"]["seed"] == 42 and again["export"]["int8"] is True
    again["trainer"]["seed"], again["export"]["int8"] = 0, False
    assert again == cfg
    assert config_options(load_config([])) == []
