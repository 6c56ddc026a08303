"""README.md's commands still run: every command of SCRIPTS (trainer.py, distill.py, ...) in its fenced
code blocks parses and validates against config.yaml, as the script itself would check it before
loading anything. A renamed key, a value that is no longer accepted or a `...` left in an
example fails here instead of in a user's shell. In process and fast: nothing is trained."""
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from config import GOLDEN_CONFIG, ConfigError, load_config, read_yaml

ROOT = GOLDEN_CONFIG.parent
README = ROOT / "README.md"
# the scripts that take config.yaml's keys; a script not in the repository yet is skipped until it lands
SCRIPTS = ("trainer.py", "distill.py", "export.py", "sweep.py", "serve.py", "check_data.py", "crossval.py")
LAUNCHERS = ("python", "python3", "torchrun")
SHELL_OPERATORS = {"&&", "||", ";", "|", "&"}


def code_lines(text):
    """(line number, line) of every fenced code block's logical lines, `\\` continuations joined;
    blocks fenced as python are Python, not commands."""
    lines, fence, start, pending = [], None, 0, ""
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fence = line.strip()[3:].strip() if fence is None else None
            continue
        if fence is None or fence == "python":
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        lines.append((start, pending + line))
        pending = ""
    return lines


def split_words(line):
    """A shell line's words, comments dropped and &&, ;, | as words of their own."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def script_commands(text):
    """[(line number, launcher, script, its arguments)] of every command in the text's code blocks
    that runs one of SCRIPTS with python or torchrun (also inside a && chain)."""
    found = []
    for number, line in code_lines(text):
        words, command = split_words(line), []
        for word in words + [";"]:
            if word not in SHELL_OPERATORS:
                command.append(word)
                continue
            launcher = Path(command[0]).name if command else ""
            scripts = [i for i, w in enumerate(command) if Path(w).name in SCRIPTS]
            if launcher in LAUNCHERS and scripts:
                i = scripts[0]
                found.append((number, launcher, Path(command[i]).name, command[i + 1:]))
            command = []
    return found


def check_command(script, argv):
    """What the script checks before it loads anything: config.load_config (keys, types, choices,
    values that cannot work), and distill.py's own distillation checks. Raises ConfigError."""
    if "..." in argv:
        raise ConfigError("a literal ... in the command: write the whole command")
    if argv in (["--help"], ["-h"]):
        return
    if script == "trainer.py" and "--runs" in argv:  # the table of runs: the rest is read as a config
        argv = [a for a in argv if a != "--runs"]
    cfg = load_config(argv)
    if script == "distill.py":
        from distill import check_distill_config
        check_distill_config(cfg)


COMMANDS = script_commands(README.read_text(encoding="utf-8"))


def test_the_readme_commands_are_found():
    # a parser that found nothing would pass every test below: the quick start's run and torchrun
    # launch, distillation and a long continued command must be among what it finds
    found = [(launcher, script, argv) for _, launcher, script, argv in COMMANDS]
    assert ("python", "trainer.py", []) in found
    assert any(launcher == "torchrun" and script == "trainer.py" for launcher, script, _ in found)
    assert any(script == "distill.py" for _, script, _ in found)
    assert any(len(argv) > 10 for _, _, argv in found)


@pytest.mark.parametrize("number, launcher, script, argv", COMMANDS,
                         ids=[f"line{n}-{launcher}-{script}" for n, launcher, script, _ in COMMANDS])
def test_readme_command_parses_and_validates(number, launcher, script, argv, monkeypatch):
    if not (ROOT / script).exists():
        pytest.skip(f"{script} is not in the repository yet")
    monkeypatch.chdir(ROOT)     # paths such as configs/distill.yaml are relative to the repository
    try:
        check_command(script, argv)
    except ConfigError as error:
        pytest.fail(f"README.md line {number}: {launcher} {script} {shlex.join(argv)}\n  error: {error}")


@pytest.mark.parametrize("line, fragment", [
    ("python trainer.py --trainer.epoch 3", "unknown key 'trainer.epoch'"),
    ("python trainer.py --trainer.backend ddp2", "trainer.backend is 'ddp2'"),
    ("python trainer.py --module.max_lr -1", "module.max_lr"),
    ("torchrun --nproc_per_node 2 distill.py --config_path configs/distill.yaml ...", "literal ..."),
    ("python distill.py --distill.loss_types [logits]", "one weight per loss type"),
])
def test_a_rotten_command_is_refused(line, fragment, monkeypatch):
    monkeypatch.chdir(ROOT)
    [(_, _, script, argv)] = script_commands(f"text\n```\n{line}\n```\n")
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        check_command(script, argv)


def test_continuations_and_chains_are_one_command_each():
    text = ("```\npython3 -m venv .venv && python trainer.py --trainer.epochs 2 \\\n"
            "    --ckpt.model_state_save_dir c   # a comment\n"
            "torchrun --nproc_per_node 2 distill.py --trainer.seed 1\n```\n"
            "```python\nprint('python trainer.py --no.such key')\n```\n")
    assert script_commands(text) == [
        (2, "python", "trainer.py", ["--trainer.epochs", "2", "--ckpt.model_state_save_dir", "c"]),
        (4, "torchrun", "distill.py", ["--trainer.seed", "1"])]


def test_every_key_the_readme_names_exists():
    # config.yaml and --help are the key reference; the README names keys in its prose and commands,
    # and a renamed key must not survive there (module names such as trainer.py are not keys)
    golden = read_yaml(GOLDEN_CONFIG)
    prose = re.sub(r"```python\n.*?```", "", README.read_text(encoding="utf-8"), flags=re.DOTALL)
    not_files = r"(?!(?:py|json|jsonl|onnx|csv|yaml|sh|md|safetensors)\b)"  # export.json, model.onnx are files
    named = set(re.findall(rf"(?<![\w/.])((?:{'|'.join(golden)})\.{not_files}[a-z_0-9]+)(?![.\w])", prose))
    unknown = sorted(key for key in named if key.partition(".")[2] not in golden[key.partition(".")[0]])
    assert len(named) > 40 and not unknown


@pytest.mark.parametrize("path", ["exports/minilm/model.onnx", "sweeps/results.csv", "predictions.csv", "new.csv",
                                  "checkpoints/best", "runs/runs.csv", "data/tweets/train.csv", "models/x/config.json",
                                  ".token_cache/x/ids.npy"])
def test_what_the_readme_flows_write_is_not_for_git(path):
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", path], check=False)
    assert ignored.returncode == 0, f"{path} would show up in git status; add it to .gitignore"
