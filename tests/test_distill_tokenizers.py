"""Distillation into a student with another tokenizer: a tiny RoBERTa-vocabulary teacher taught to a
tiny BERT-vocabulary student whose word list is cut into other pieces, so the same text is other ids
and another number of tokens on each side. The student learns the teacher's predictions, its
checkpoint carries its own tokenizer, the token-by-token losses are refused, windows pool the
teacher's, and resume and DDP behave as with one tokenizer."""
import contextlib
import io
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertModel, BertTokenizer, pipeline

import distill
import processes
import trainer
from conftest import (
    ROOT,
    WORDS,
    base_args,
    last_json_line,
    save_tiny_encoder,
    sentiment_rows,
    stderr_tail,
    tiny_config,
    write_csv,
)
from data import Encoded
from model import ModelError

LABELS = ["negative", "positive"]


def other_tokenizer():
    """A WordPiece tokenizer over another word list: BERT's special tokens, the words in another
    order, and every word longer than four letters only as two pieces (wonderful = won ##derful)."""
    pieces = []
    for word in WORDS:
        pieces += [word] if len(word) <= 4 else [word[:3], "##" + word[3:]]
    random.Random(1).shuffle(pieces)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    return BertTokenizer(vocab={token: i for i, token in enumerate(specials + sorted(set(pieces), key=pieces.index))})


def save_other_student(path, seed=1):
    """A random tiny BERT over other_tokenizer's vocabulary, saved like a pretrained model with it."""
    torch.manual_seed(seed)
    tokenizer = other_tokenizer()
    BertModel(tiny_config("bert", vocab_size=len(tokenizer))).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A tiny RoBERTa fine-tuned by trainer.py on the sentiment-word task (the teacher), unlabelled
    transfer rows, held-out rows, and a student folder with its own tokenizer."""
    tmp = tmp_path_factory.mktemp("two-tokenizers")
    rows = sentiment_rows(720, seed=4)
    train, val = write_csv(tmp / "train.csv", rows[:160]), write_csv(tmp / "val.csv", rows[640:])
    teacher_train = write_csv(tmp / "teacher_train.csv", rows[:640])
    base = save_tiny_encoder(tmp / "roberta", "roberta", layers=2)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert trainer.main(base_args(tmp / "teacher", base, teacher_train, val, **{"trainer.epochs": 1})) == 0
    unlabeled = write_csv(tmp / "unlabeled.csv", [{"text": r["text"]} for r in sentiment_rows(160, seed=5)])
    held_out = sentiment_rows(100, seed=6)
    return {"tmp": tmp, "base": base, "teacher": str(tmp / "teacher" / "ckpt" / "best"), "train": train,
            "val": val, "unlabeled": unlabeled, "held_out": held_out,
            "held_out_csv": write_csv(tmp / "held_out.csv", held_out),
            "student": save_other_student(tmp / "student")}


def distill_args(job, tmp_path, **more):
    """A distillation from the teacher with the soft labels alone: what the student knows of the
    task it can only have from the teacher."""
    return base_args(tmp_path, job["base"], job["train"], job["val"], **{
        "model.model_path": job["teacher"], "distill.student_model": job["student"],
        "distill.loss_types": "[logits]", "distill.loss_weights": "[1.0]",
        "distill.unlabeled_filepaths": f"[{job['unlabeled']}]", "data.cache_dir": str(tmp_path / "cache"),
        "module.max_lr": "1e-2", "trainer.epochs": 4, **more})


def run_quietly(fn, argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = fn(argv)
    return code, out.getvalue(), err.getvalue()


def test_the_tokenizers_differ_in_ids_and_lengths(job):
    teacher, student = AutoTokenizer.from_pretrained(job["teacher"]), AutoTokenizer.from_pretrained(job["student"])
    text = "this wonderful movie was terrible"
    assert teacher(text)["input_ids"] != student(text)["input_ids"]
    assert len(student(text)["input_ids"]) == len(teacher(text)["input_ids"]) + 3  # three words in two pieces
    own, source = distill.student_tokenizer(
        {"distill": {"student_tokenizer": None, "student_model": job["student"]}}, teacher)
    assert own.get_vocab() == student.get_vocab() and source.startswith("distill.student_model")
    # a student folder with the teacher's vocabulary reads the teacher's tokens, as before
    assert distill.student_tokenizer({"distill": {"student_tokenizer": None, "student_model": job["base"]}},
                                     teacher) == (None, None)


def test_a_student_tokenizer_that_does_not_load_is_one_line_naming_its_key(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}", encoding="utf-8")  # once a KeyError traceback
    with pytest.raises(ModelError, match=rf"^distill.student_tokenizer '{tmp_path}': cannot load a tokenizer there"):
        distill.student_tokenizer({"distill": {"student_tokenizer": str(tmp_path), "student_model": None}}, None)


@pytest.mark.slow  # trains more than one epoch
def test_student_learns_the_teachers_predictions_and_its_checkpoint_reads_its_own_tokens(job, tmp_path):
    code, out, err = run_quietly(distill.main, distill_args(job, tmp_path))
    assert code == 0, err[-2000:]
    assert f"the student's own tokenizer ({len(other_tokenizer())} tokens, the teacher's {5 + len(WORDS)})" in out
    student_dir = tmp_path / "ckpt" / "best"
    # the checkpoint carries the student's tokenizer, so plain transformers reads it right
    assert AutoTokenizer.from_pretrained(student_dir).get_vocab() == other_tokenizer().get_vocab()
    texts = [r["text"] for r in job["held_out"]]

    def predictions(model_dir):
        classify = pipeline("text-classification", model=str(model_dir), device="cpu")
        return [p["label"] for p in classify(texts, truncation=True)]
    teacher, student = predictions(job["teacher"]), predictions(student_dir)
    agreement = np.mean([t == s for t, s in zip(teacher, student)])
    assert agreement > 0.85, agreement  # chance is about a half
    assert 0.2 < np.mean([t == "positive" for t in teacher]) < 0.8  # the teacher says both
    # trainer.py evaluates the checkpoint as any other: the same accuracy as the pipeline's
    code, out, err = run_quietly(trainer.main, base_args(
        tmp_path, str(student_dir), "null", job["held_out_csv"],
        **{"model.model_path": str(student_dir), "trainer.log_dir": str(tmp_path / "eval")}))
    assert code == 0, err[-2000:]
    gold = [r["label"] for r in job["held_out"]]
    assert last_json_line(out)["acc"] == pytest.approx(np.mean([g == s for g, s in zip(gold, student)]))


def test_the_teacher_reads_its_own_tokens_and_each_row_is_looked_up_by_index(job, tmp_path, monkeypatch):
    """The table the loss looks up holds, for training example i (labelled rows, then unlabelled),
    the teacher's logits of that row tokenized by the teacher's tokenizer."""
    tables, real = [], distill.teacher_logits_of

    def spy(*args, **kwargs):
        tables.append(real(*args, **kwargs))
        return tables[-1]
    monkeypatch.setattr(distill, "teacher_logits_of", spy)
    code, _, err = run_quietly(distill.main, distill_args(job, tmp_path, **{"trainer.epochs": 1}))
    assert code == 0, err[-2000:]
    (table,) = tables
    teacher = AutoModelForSequenceClassification.from_pretrained(job["teacher"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(job["teacher"])
    rows = [r["text"] for r in sentiment_rows(240, seed=4)[:160] + sentiment_rows(160, seed=5)]
    with torch.no_grad():
        expected = teacher(**tokenizer(rows, padding=True, truncation=True, max_length=16,
                                       return_tensors="pt")).logits
    assert table.shape == (320, 2) and torch.allclose(table, expected, atol=1e-5)


@pytest.mark.parametrize("losses", ["[logits, hidden_states]", "[labels, attentions, logits]"])
def test_token_by_token_losses_are_refused_before_anything_is_built_or_written(job, tmp_path, monkeypatch, losses):
    monkeypatch.setattr(distill, "build_teacher", lambda *a, **k: pytest.fail("the teacher was built"))
    weights = "[1.0, 1.0]" if losses.count(",") == 1 else "[1.0, 1.0, 1.0]"
    code, _, err = run_quietly(distill.main, distill_args(job, tmp_path, **{
        "distill.loss_types": losses, "distill.loss_weights": weights}))
    assert code == 2
    (line,) = err.strip().splitlines()
    aligned = [t for t in ("hidden_states", "attentions") if t in losses]
    assert line.startswith("error: distill.loss_types") and f"drop {aligned[0]}" in line
    assert f"distill.student_model '{job['student']}'" in line
    assert not os.listdir(tmp_path)  # no cache, no checkpoint folder, no run log


def test_caching_the_teachers_logits_cannot_be_turned_off(job, tmp_path):
    code, _, err = run_quietly(distill.main, distill_args(job, tmp_path, **{"distill.cache_teacher_logits": "false"}))
    (line,) = err.strip().splitlines()
    assert code == 2 and line.startswith("error: distill.cache_teacher_logits is false") and "set it true" in line


def test_max_seq_len_is_checked_against_both_tokenizers(job, tmp_path):
    # the teacher's checkpoint was trained at 16 tokens
    code, _, err = run_quietly(distill.main, distill_args(job, tmp_path / "a", **{"module.max_seq_len": 24}))
    (line,) = err.strip().splitlines()
    assert code == 2 and "the checkpoint was trained at 16 tokens" in line
    short = other_tokenizer()
    short.model_max_length = 12
    short.save_pretrained(tmp_path / "short")
    code, _, err = run_quietly(distill.main, distill_args(job, tmp_path / "b", **{
        "distill.student_tokenizer": str(tmp_path / "short")}))
    (line,) = err.strip().splitlines()
    assert code == 2 and line.startswith("error: module.max_seq_len is 16 but the student's tokenizer")
    assert f"distill.student_tokenizer '{tmp_path / 'short'}'" in line and "takes at most 12 tokens" in line


def test_a_depth_cut_has_no_tokenizer_of_its_own(job, tmp_path):
    code, _, err = run_quietly(distill.main, base_args(tmp_path, job["base"], job["train"], job["val"], **{
        "model.model_path": job["teacher"], "distill.student_layers": "[0]",
        "distill.student_tokenizer": job["student"]}))
    assert code == 2 and "distill.student_tokenizer" in err.strip().splitlines()[-1]


def test_windows_learn_their_documents_pooled_teacher_logits(monkeypatch):
    """Hand-worked: the teacher cut 3 documents into 2, 1 and 3 windows, the student into 1, 2, 2;
    each student window gets the mean (data.window_pool) of its document's teacher windows."""
    teacher_windows = Encoded.from_lists([[0, 5, 2]] * 6)
    teacher_windows.documents = np.array([0, 0, 1, 2, 2, 2])
    student_windows = Encoded.from_lists([[2, 7, 3]] * 5)
    student_windows.documents = np.array([0, 1, 1, 2, 2])
    logits = np.array([[1, 3], [3, 1], [5, 0], [0, 0], [3, 3], [0, 6]], dtype=np.float32)
    cfg = {"trainer": {"val_batch_size": 4}, "data": {"window_pool": "mean"}}
    proc = processes.single_process()
    monkeypatch.setattr(distill, "predict_logits", lambda *a, **k: logits)  # the teacher's, per window
    table = distill.teacher_logits_of(cfg, proc, None, BertTokenizer(vocab={"[PAD]": 0}),
                                      distill.Split("t", teacher_windows), student=student_windows)
    assert table.tolist() == [[2, 2], [5, 0], [5, 0], [1, 3], [1, 3]]


def test_windows_with_two_tokenizers_train_and_evaluate(job, tmp_path):
    long_rows = [{"text": " ".join(r["text"] for r in sentiment_rows(4, seed=i)), "label": LABELS[i % 2]}
                 for i in range(24)]
    train = write_csv(tmp_path / "long.csv", long_rows)
    code, out, err = run_quietly(distill.main, distill_args(job, tmp_path, **{
        "data.train_filepath": train, "data.long_texts": "windows", "data.window_stride": 4,
        "module.max_seq_len": 12, "trainer.epochs": 1}))
    assert code == 0, err[-2000:]
    # both tokenizations were windowed: the teacher's and the student's, in other numbers of windows
    windows = [line for line in out.splitlines() if line.startswith("windows: ") and "long.csv" in line]
    assert len(windows) == 2 and windows[0] != windows[1]


@pytest.mark.slow  # trains more than one epoch
def test_stopped_and_resumed_distillation_ends_bitwise_as_an_uninterrupted_one(job, tmp_path):
    reference = tmp_path / "reference"
    code, _, err = run_quietly(distill.main, distill_args(job, reference, **{"trainer.epochs": 2}))
    assert code == 0, err[-2000:]
    paused = tmp_path / "paused"
    args = distill_args(job, paused, **{"trainer.epochs": 2})
    assert run_quietly(distill.main, args + ["--trainer.stop_after_epochs", "1"])[0] == 0
    code, out, err = run_quietly(distill.main, args + ["--ckpt.resume", "auto"])
    assert code == 0 and "resumed from" in out, err[-2000:]
    a, b = (load_file(d / "ckpt" / "last" / "model.safetensors") for d in (reference, paused))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_processes_under_torchrun_train_the_same_student_as_one(job, tmp_path):
    pytest.importorskip("torch.distributed.run")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("no gloo backend")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = []
    for name, launcher in [("one", [sys.executable]),
                           ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    "--nproc_per_node=2"])]:
        # no dropout: two ranks draw other masks than one process, and nothing else may differ
        args = distill_args(job, tmp_path / name, **{"trainer.epochs": 2, "distill.student_config":
                                                     "{hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}"})
        out = subprocess.run([*launcher, str(ROOT / "distill.py"), *args], capture_output=True, text=True,
                             env=env, timeout=300, check=False)
        assert out.returncode == 0, stderr_tail(out.stderr)
        results.append((last_json_line(out.stdout), load_file(tmp_path / name / "ckpt" / "last" / "model.safetensors")))
    (one, one_weights), (two, two_weights) = results
    assert two["acc"] == pytest.approx(one["acc"])
    for key in one_weights:  # the same updates, summed in another order
        assert torch.allclose(one_weights[key], two_weights[key], atol=1e-4), key
