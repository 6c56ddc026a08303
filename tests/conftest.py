"""Shared test fixtures: tiny models built from configs, tokenizers from a word list, small data.

Everything here is offline and fast: a 2-layer, 32-wide BERT or RoBERTa saved to a temporary
directory stands in for a pretrained encoder (`model.hf_model`), and a WordPiece tokenizer is
built from the word list below, so the real code paths run in seconds on a CPU.
"""
import contextlib
import csv
import io
import json
import os
import random
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizer, RobertaConfig, RobertaModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

POSITIVE = ["good", "great", "happy", "love", "excellent", "nice", "wonderful", "best"]
NEGATIVE = ["bad", "awful", "sad", "hate", "terrible", "poor", "worst", "boring"]
NEUTRAL = ["the", "a", "movie", "film", "is", "was", "it", "and", "this", "plot", "very", "so"]
WORDS = POSITIVE + NEGATIVE + NEUTRAL

# a trainer.py subprocess killed by a signal of its own (SIGABRT, SIGSEGV) prints every thread's
# Python stack first, so a rare crash in CI leaves its cause in the test's failure message
os.environ.setdefault("PYTHONFAULTHANDLER", "1")


def stderr_tail(text, limit=4000):
    """The end of a subprocess's stderr for an assertion message, without the progress bars'
    redraws, which would otherwise push a crash's own lines out of the message."""
    # faulthandler's one-line list of extension modules would fill the message instead of the stacks
    lines = [line for line in text.splitlines() if "\r" not in line and "it/s]" not in line
             and "step/s" not in line and "batch/s" not in line and not line.startswith("Extension modules")]
    return "\n".join(lines)[-limit:]


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models run fastest on one thread; two threads on a busy 2-core machine spin-wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_tokenizer(kind="bert"):
    """A WordPiece tokenizer over WORDS; RoBERTa's special tokens (pad id 1) for kind='roberta'."""
    if kind == "bert":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        vocab = {token: i for i, token in enumerate(specials + WORDS)}
        return BertTokenizer(vocab=vocab)
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    vocab = {token: i for i, token in enumerate(specials + WORDS)}
    return BertTokenizer(vocab=vocab, cls_token="<s>", pad_token="<pad>", sep_token="</s>",
                         unk_token="<unk>", mask_token="<mask>",
                         model_input_names=["input_ids", "attention_mask"])


def tiny_config(kind="bert", layers=2, hidden=32, **overrides):
    tokenizer = make_tokenizer(kind)
    common = dict(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                  num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=64)
    common.update(overrides)
    if kind == "bert":
        return BertConfig(**common)
    return RobertaConfig(pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1,
                         **{**common, "max_position_embeddings": 66})


def save_tiny_encoder(path, kind="bert", seed=0, **config_overrides):
    """A randomly initialised tiny encoder + its tokenizer, saved like a pretrained model."""
    torch.manual_seed(seed)
    config = tiny_config(kind, **config_overrides)
    model = (BertModel if kind == "bert" else RobertaModel)(config)
    model.save_pretrained(path)
    make_tokenizer(kind).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    return save_tiny_encoder(tmp_path_factory.mktemp("tiny-bert"), "bert")


@pytest.fixture(scope="session")
def tiny_roberta(tmp_path_factory):
    return save_tiny_encoder(tmp_path_factory.mktemp("tiny-roberta"), "roberta")


def sentiment_rows(n, seed=0, labels=("negative", "positive")):
    """A learnable task: the label follows the sentiment words in the text."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(labels)
        cue = POSITIVE if label == "positive" else NEGATIVE
        words = [rng.choice(NEUTRAL) for _ in range(rng.randint(1, 8))]
        for _ in range(rng.randint(1, 3)):
            words.insert(rng.randint(0, len(words)), rng.choice(cue))
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_csv(path, rows, columns=None, delimiter=",", header=True, encoding="utf-8"):
    columns = columns or list(rows[0])
    with open(path, "w", newline="", encoding=encoding) as f:
        writer = csv.writer(f, delimiter=delimiter)
        if header:
            writer.writerow(columns)
        for row in rows:
            writer.writerow([row[c] for c in columns])
    return str(path)


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def base_args(tmp_path, model_dir, train, val, **overrides):
    """Command-line arguments for a small, fast, deterministic run in tmp_path."""
    args = {
        "data.train_filepath": train, "data.val_filepath": val,
        "data.text_a_col": "text", "data.label_col": "label",
        "data.labels_list": "[negative, positive]",
        "model.hf_model": model_dir, "module.max_lr": "3e-3", "module.max_seq_len": 16,
        "module.metric": "acc", "trainer.epochs": 3, "trainer.train_batch_size": 16,
        "trainer.gpu_batch_size_limit": 16, "trainer.val_batch_size": 32,
        "trainer.log_steps": 5, "trainer.log_dir": str(tmp_path / "runs"),
        # one thread: tiny models gain nothing from two, and a busy machine makes two far slower
        "trainer.num_threads": 1,
        # these runs mean the CPU, also on a machine with GPUs (the GPU tests say cuda themselves)
        "trainer.device": "cpu",
        "ckpt.model_state_save_dir": str(tmp_path / "ckpt"),
    }
    args.update(overrides)
    argv = []
    for key, value in args.items():
        argv += [f"--{key}", str(value)]
    return argv


def without(argv, *keys):
    """argv with the given --section.key options (and their values) left out."""
    kept, i = [], 0
    while i < len(argv):
        if argv[i][2:] in keys:
            i += 2
            continue
        kept.append(argv[i])
        i += 1
    return kept


def last_json_line(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


def one_and_two_processes(args):
    """trainer.py's final JSON line run as one process and as two under torchrun (gloo, CPU)."""
    import subprocess
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(ROOT / "trainer.py"), *args], capture_output=True, text=True, env=env)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "trainer.py"), *args],  # trainer.backend auto follows torchrun
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, stderr_tail(one.stderr)
    assert two.returncode == 0, stderr_tail(two.stderr)
    return [without_timings(last_json_line(run.stdout)) for run in (one, two)]


def without_timings(result):
    """A final JSON line without what differs between two runs of the same job: times, log folder."""
    return {k: v for k, v in result.items() if k not in ("wall_s", "train_s", "run_dir")}


def run_main(main, args, expect=0):
    """main(args) in this process: (stdout, stderr), its exit status checked."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(args)
    assert rc == expect, err.getvalue()[-3000:] + out.getvalue()[-2000:]
    return out.getvalue(), err.getvalue()
