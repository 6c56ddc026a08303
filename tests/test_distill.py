"""Distillation: depth-cut students, the four losses on hand-worked numbers, a frozen teacher,
unlabelled rows, and whole runs (one process and two under torchrun) on tiny models."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, DistilBertConfig, DistilBertForSequenceClassification

import config
import data
import distill
import evaluation
import processes
import speedups
import splits
import trainer
from conftest import ROOT, base_args, last_json_line, save_tiny_encoder, sentiment_rows, stderr_tail, write_csv
from data import DataError
from model import ModelError, build_model, load_tokenizer
from speedups import CPUDropout

LABELS = ["negative", "positive"]


def distill_cfg(**overrides):
    """The golden config with a tiny job's distill keys, as load_config would return it."""
    argv = []
    for key, value in overrides.items():
        argv += [f"--{key}", str(value)]
    return config.load_config(argv)


def tiny_classifier(path, layers=4, hidden=32, kind="bert", seed=0):
    save_tiny_encoder(path, kind, seed=seed, layers=layers, hidden=hidden)
    return build_model({"hf_model": str(path), "model_path": None, "model_file": None}, LABELS)


# ---------------------------------------------------------------------------------------------
# students


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_depth_cut_student_holds_the_chosen_teacher_layers(tmp_path, kind):
    teacher = tiny_classifier(tmp_path / "t", layers=4, kind=kind)
    student = distill.depth_cut(teacher, [0, 3], None, {})
    assert student.config.num_hidden_layers == 2
    base = teacher.base_model_prefix
    t, s = teacher.state_dict(), student.state_dict()
    for new, old in enumerate([0, 3]):
        prefix_t, prefix_s = f"{base}.encoder.layer.{old}.", f"{base}.encoder.layer.{new}."
        names = [k for k in t if k.startswith(prefix_t)]
        assert names
        for name in names:
            assert torch.equal(s[prefix_s + name[len(prefix_t):]], t[name])
    assert not any(k.startswith(f"{base}.encoder.layer.2.") for k in s)
    for name in s:  # embeddings, pooler and classifier are the teacher's
        if ".layer." not in name:
            assert torch.equal(s[name], t[name]), name
    # the copy is independent: training the student leaves the teacher alone
    next(student.classifier.parameters()).data += 1
    assert not torch.equal(next(student.classifier.parameters()), next(teacher.classifier.parameters()))


def test_depth_cut_finds_distilbert_layers_and_saves_the_new_depth(tmp_path):
    config = DistilBertConfig(vocab_size=40, dim=32, n_layers=3, n_heads=2, hidden_dim=64,
                              max_position_embeddings=32, num_labels=2)
    teacher = DistilBertForSequenceClassification(config)
    student = distill.depth_cut(teacher, [1], None, {})
    assert torch.equal(student.distilbert.transformer.layer[0].ffn.lin1.weight,
                       teacher.distilbert.transformer.layer[1].ffn.lin1.weight)
    student.save_pretrained(tmp_path / "s")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "s")
    assert loaded.config.n_layers == 1 and len(loaded.distilbert.transformer.layer) == 1


def test_layer_list_by_encoder_key_and_clear_errors(tmp_path):
    teacher = tiny_classifier(tmp_path / "t", layers=2)
    key, layers = distill.find_layer_list(teacher, "bert.encoder.layer")
    assert key == "bert.encoder.layer" and len(layers) == 2
    with pytest.raises(ModelError, match="model.encoder_key 'bert.encoder' is not a layer list"):
        distill.find_layer_list(teacher, "bert.encoder")
    teacher.bert.encoder.layer = torch.nn.ModuleList(list(teacher.bert.encoder.layer)[:1])
    with pytest.raises(ModelError, match="cannot find the encoder layer list.*model.encoder_key"):
        distill.find_layer_list(teacher, None)
    with pytest.raises(config.ConfigError, match="the teacher has 2 layers"):
        distill.depth_cut(tiny_classifier(tmp_path / "t2", layers=2), [0, 2], None, {})


def test_attention_dropout_is_off_in_the_student_but_kept_in_its_config(tmp_path):
    teacher = tiny_classifier(tmp_path / "t", layers=2)
    cfg = distill_cfg(**{"distill.student_layers": "[1]",
                         "distill.loss_types": "[logits, attentions]", "distill.loss_weights": "[1, 1]"})
    student = distill.build_student(cfg, teacher, None)
    assert student.bert.encoder.layer[0].attention.self.dropout.p == 0.0
    assert student.config.attention_probs_dropout_prob == teacher.config.attention_probs_dropout_prob


def test_config_errors_are_one_clear_line():
    with pytest.raises(config.ConfigError, match="one weight per loss type"):
        distill.check_distill_config(distill_cfg(**{"distill.student_layers": "[0]",
                                                    "distill.loss_weights": "[1.0]"}))
    with pytest.raises(config.ConfigError, match="no student"):
        distill.check_distill_config(distill_cfg())
    with pytest.raises(config.ConfigError, match="at most once"):
        distill.check_distill_config(distill_cfg(**{"distill.student_layers": "[0]",
                                                    "distill.loss_types": "[logits, soft]"}))
    with pytest.raises(config.ConfigError, match="increasing"):
        distill.check_distill_config(distill_cfg(**{"distill.student_layers": "[2, 1]"}))


# ---------------------------------------------------------------------------------------------
# losses on hand-worked values


def test_logits_loss_is_t_squared_kl_summed_over_examples():
    s = torch.zeros(2, 2)
    assert distill.logits_loss(s, s, 2.0).item() == 0.0
    # teacher p = (0.75, 0.25) at T=1, student uniform: KL = .75 ln 1.5 + .25 ln .5 per example
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    t1 = torch.tensor([[math.log(3.0), 0.0]] * 2)
    assert distill.logits_loss(s, t1, 1.0).item() == pytest.approx(2 * kl, rel=1e-6)
    # the same probabilities at T=2 (logits doubled) weigh T^2 = 4 times as much
    assert distill.logits_loss(s, 2 * t1, 2.0).item() == pytest.approx(4 * 2 * kl, rel=1e-6)
    # float32 softmaxes also for half-precision logits
    assert distill.logits_loss(s.half(), t1.half(), 1.0).dtype == torch.float32


def test_labels_loss_skips_unlabelled_rows():
    logits = torch.tensor([[2.0, 0.0], [0.0, 5.0], [1.0, 1.0]], requires_grad=True)
    loss = distill.labels_loss(logits, torch.tensor([0, -1, 1]))
    expected = -math.log(math.exp(2) / (math.exp(2) + 1)) + math.log(2)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert torch.all(logits.grad[1] == 0)  # the unlabelled row gets no gradient from gold labels
    targets = torch.tensor([1.0, float("nan")])
    assert distill.labels_loss(torch.tensor([[3.0], [100.0]]), targets).item() == pytest.approx(4.0)


def test_hidden_state_loss_is_mse_over_real_tokens_per_example():
    mask = torch.tensor([[1, 1, 0]])
    t = torch.zeros(1, 3, 2)
    assert distill.hidden_state_loss(t, t, mask).item() == 0.0
    s = t.clone()
    s[0, 1, 0] = 1.0        # one real element off by 1: 1 / (2 tokens x 2 dims)
    s[0, 2, :] = 50.0       # padding: ignored
    assert distill.hidden_state_loss(s, t, mask).item() == pytest.approx(0.25)
    # summed over examples: each example is its own mean, whatever its length
    mask2 = torch.tensor([[1, 1, 0], [1, 1, 1]])
    s2, t2 = torch.cat([s, torch.ones(1, 3, 2)]), torch.zeros(2, 3, 2)
    assert distill.hidden_state_loss(s2, t2, mask2).item() == pytest.approx(0.25 + 1.0)


def test_attention_loss_is_mse_over_real_query_key_pairs():
    mask = torch.tensor([[1, 1, 0]])
    t = torch.full((1, 2, 3, 3), 0.5)
    assert distill.attention_loss(t, t, mask).item() == 0.0
    s = t.clone()
    s[0, 0, 0, 1] = 0.0      # one real (query, key) pair of head 0 off by 0.5: 0.25 / (2 heads x 4 pairs)
    s[0, :, 2, :] = 9.0      # the padding query's row and
    s[0, :, :, 2] = 9.0      # the padding key's column: ignored
    assert distill.attention_loss(s, t, mask).item() == pytest.approx(0.25 / 8)
    # different head counts: heads are averaged first
    assert distill.attention_loss(s, t[:, :1], mask).item() == pytest.approx((0.5 / 2) ** 2 / 4)


def test_layer_maps_uniform_by_default_and_checked_when_given():
    assert distill.layer_map(None, 3, 12, "hidden_states") == [0, 4, 8, 12]
    assert distill.layer_map(None, 3, 12, "attentions") == [3, 7, 11]
    assert distill.layer_map(None, 3, 6, "hidden_states") == [0, 2, 4, 6]
    assert distill.layer_map(None, 2, 6, "attentions") == [2, 5]
    assert distill.layer_map([0, 1, 3, 5], 3, 6, "hidden_states") == [0, 1, 3, 5]
    with pytest.raises(config.ConfigError, match="distill.attention_map"):
        distill.layer_map([0, 1, 6], 3, 6, "attentions")  # attentions have no embedding slot
    with pytest.raises(config.ConfigError, match="distill.hidden_state_map"):
        distill.layer_map([0, 2, 4], 3, 6, "hidden_states")


# ---------------------------------------------------------------------------------------------
# gradients and the frozen teacher


def four_loss_setup(tmp_path):
    """A 2-layer, 32-wide teacher and a randomly initialised 1-layer, 16-wide student."""
    teacher_dir = save_tiny_encoder(tmp_path / "t", layers=2)
    cfg = distill_cfg(**{"model.hf_model": teacher_dir, "data.labels_list": "[negative, positive]",
                         "distill.student_config": "{num_hidden_layers: 1, hidden_size: 16, "
                                                   "num_attention_heads: 2, intermediate_size: 32}",
                         "distill.student_pretrained": "false",
                         "distill.loss_types": "[logits, labels, hidden_states, attentions]",
                         "distill.loss_weights": "[1, 1, 1, 1]"})
    teacher = distill.build_teacher(cfg, eager=True, device=torch.device("cpu"))
    tokenizer = load_tokenizer(cfg["model"])
    student = distill.build_student(cfg, teacher, tokenizer)
    module = distill.DistillModule(student, teacher.config.hidden_size, True, True)
    batch = dict(tokenizer(["good movie", "the plot was very boring and sad"], padding=True,
                           return_tensors="pt"))
    batch["labels"] = torch.tensor([1, 0])
    return cfg, teacher, module, distill.DistillLoss(cfg, teacher, student), batch


def test_gradients_reach_student_and_projection_never_the_teacher(tmp_path):
    cfg, teacher, module, loss_fn, batch = four_loss_setup(tmp_path)
    assert isinstance(module.projection, torch.nn.Linear)  # 16 -> 32
    assert not any(name.startswith("teacher") for name, _ in module.named_parameters())
    loss, terms = loss_fn(module, batch)
    assert set(terms) == {"logits", "labels", "hidden_states", "attentions"}
    assert all(v.item() > 0 for v in terms.values())
    loss.backward()
    assert module.projection.weight.grad is not None and module.projection.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in module.student.parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training


def test_trainer_loop_trains_student_and_projection_leaves_teacher_unchanged(tmp_path):
    cfg, teacher, module, loss_fn, _ = four_loss_setup(tmp_path)
    train = write_csv(tmp_path / "train.csv", sentiment_rows(40, seed=1))
    cfg["data"].update(train_filepath=train, val_filepath=train, label_col="label")
    cfg["trainer"].update(epochs=1, train_batch_size=8, gpu_batch_size_limit=4, log_steps=1,
                          log_dir=str(tmp_path / "runs"))
    cfg["module"].update(metric="acc", max_lr=1e-2)
    cfg["ckpt"].update(model_state_save_dir=str(tmp_path / "ckpt"))
    before_teacher = {k: v.clone() for k, v in teacher.state_dict().items()}
    before_projection = module.projection.weight.detach().clone()
    tokenizer = load_tokenizer(cfg["model"])
    train_split, val_split = [splits.load_split(cfg, tokenizer, path) for path in (train, train)]
    ctx = processes.Process(0, 0, 1, torch.device("cpu"), True, False)
    speedups.apply(teacher, ctx.device)  # as distill.run does with trainer.speedups on
    speedups.apply(module, ctx.device)
    run = trainer.Trainer(cfg, ctx, module, tokenizer, train_split, val_split, loss_fn=loss_fn)
    result = trainer.fit(run)
    assert result is not None
    # the loop kept speedups' dropout in the student (the four losses above ran through it)
    assert not [m for m in module.modules() if type(m) is torch.nn.Dropout]
    assert any(isinstance(m, CPUDropout) for m in module.student.modules())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before_teacher.items())
    assert not torch.equal(before_projection, module.projection.weight)
    # every term is logged on its own; the projection is saved with the run's training state
    logged = [json.loads(line) for line in open(os.path.join(run.run_dir, "metrics.jsonl"))]
    assert {"train/logits", "train/labels", "train/hidden_states", "train/attentions"} <= set(logged[0])
    state = torch.load(tmp_path / "ckpt" / "last" / "training_state.pt", weights_only=True)
    assert torch.equal(state["module_rest"]["projection.weight"], module.projection.weight)
    assert not any(name.startswith("student.") for name in state["module_rest"])  # model.safetensors has those


def test_cached_teacher_logits_are_looked_up_by_example_and_equal_the_teachers(tmp_path):
    teacher = tiny_classifier(tmp_path / "t", layers=2).eval()
    student = distill.depth_cut(teacher, [0], None, {}).eval()
    cfg = distill_cfg(**{"distill.student_layers": "[0]", "distill.loss_types": "[logits]",
                         "distill.loss_weights": "[1.0]"})
    batch = {"input_ids": torch.tensor([[2, 6, 7, 3], [2, 5, 3, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])}
    with torch.no_grad():
        table = torch.zeros(5, 2)
        table[[3, 1]] = teacher(**batch).logits  # rows 3 and 1 of the training split
    live, _ = distill.DistillLoss(cfg, teacher, student)(student, batch)
    calls = []
    teacher.register_forward_hook(lambda *args: calls.append(1))
    cached, _ = distill.DistillLoss(cfg, teacher, student, teacher_logits=table)(student, batch, np.array([3, 1]))
    assert not calls and torch.allclose(cached, live, atol=1e-6)


@pytest.mark.slow  # trains several epochs
def test_with_logits_losses_the_teacher_runs_once_before_training_and_never_during_it(tmp_path, tiny_teacher,
                                                                                      monkeypatch):
    t, calls, real_build = tiny_teacher, [], distill.build_teacher

    def counted_teacher(*args, **kwargs):
        teacher = real_build(*args, **kwargs)
        teacher.register_forward_hook(lambda *a: calls.append(1))
        return teacher
    monkeypatch.setattr(distill, "build_teacher", counted_teacher)
    args = base_args(tmp_path, t["base"], t["train"], t["val"], **{
        "model.model_path": t["dir"], "distill.student_layers": "[1]", "trainer.epochs": 2,
        "trainer.val_batch_size": 32})
    assert distill.main(args) == 0
    assert len(calls) == 5  # 160 training rows / 32 a batch, before step 1; 2 x 10 steps hit the table


# ---------------------------------------------------------------------------------------------
# unlabelled transfer data


def test_unlabelled_rows_never_reach_the_gold_label_loss(tmp_path, monkeypatch):
    labelled = sentiment_rows(24, seed=2)
    unlabelled = [{"text": r["text"]} for r in sentiment_rows(40, seed=3)]
    teacher_dir = save_tiny_encoder(tmp_path / "t", layers=2)
    args = base_args(tmp_path, teacher_dir, write_csv(tmp_path / "train.csv", labelled),
                     write_csv(tmp_path / "val.csv", labelled),
                     **{"distill.student_layers": "[0]", "trainer.epochs": 1,
                        "distill.unlabeled_filepaths": f"[{write_csv(tmp_path / 'u.csv', unlabelled)}]"})
    seen = []

    def spy(logits, labels, class_weights=None):
        seen.append(labels.clone())
        return distill_labels_loss(logits, labels, class_weights)

    distill_labels_loss = distill.labels_loss
    monkeypatch.setattr(distill, "labels_loss", spy)
    assert distill.main(args) == 0
    labels = torch.cat(seen)
    # one epoch: each labelled row once with its label, each unlabelled row once masked out
    assert len(labels) == 64 and (labels == -1).sum() == 40
    gold = sorted(LABELS.index(r["label"]) for r in labelled)
    assert sorted(labels[labels >= 0].tolist()) == gold


def test_class_weights_are_said_and_reach_the_gold_label_loss(tmp_path, monkeypatch, capsys):
    # as in fine-tuning: balanced weights are computed on the training labels, said at the start
    rows = sentiment_rows(24, seed=2)
    args = base_args(tmp_path, save_tiny_encoder(tmp_path / "t", layers=2), write_csv(tmp_path / "train.csv", rows),
                     write_csv(tmp_path / "val.csv", rows),
                     **{"distill.student_layers": "[0]", "trainer.epochs": 1, "module.class_weights": "balanced"})
    seen = []

    def spy(logits, labels, class_weights=None):
        seen.append(class_weights)
        return distill_labels_loss(logits, labels, class_weights)

    distill_labels_loss = distill.labels_loss
    monkeypatch.setattr(distill, "labels_loss", spy)
    assert distill.main(args) == 0
    counts = [sum(r["label"] == name for r in rows) for name in LABELS]
    expected = [len(rows) / (len(LABELS) * c) for c in counts]
    assert seen and all(torch.allclose(w.cpu(), torch.tensor(expected)) for w in seen)
    said = f"class weights: {', '.join(f'{n} {w:.4g}' for n, w in zip(LABELS, expected))}"
    assert said in capsys.readouterr().out


def test_unlabelled_file_needs_only_a_text_column(tmp_path):
    cfg = distill_cfg(**{"distill.unlabeled_filepaths": f"[{tmp_path / 'missing.csv'}]"})
    tokenizer = load_tokenizer({**cfg["model"], "hf_model": save_tiny_encoder(tmp_path / "t")})
    train = splits.Split(None, data.encode(tokenizer, data.read_examples(
        write_csv(tmp_path / "l.csv", [{"text": "good", "sentiment": "positive"}]), cfg["data"], True), 16))
    with pytest.raises(DataError, match="missing.csv: file not found"):
        splits.load_split(cfg, tokenizer, str(tmp_path / "missing.csv"), need_labels=False)
    unlabeled = splits.load_split(cfg, tokenizer, write_csv(tmp_path / "u.csv", [{"text": "sad"}, {"text": "nice"}]),
                                  need_labels=False)
    merged = distill.with_unlabeled(cfg, train, [unlabeled])
    assert merged.encoded.labels.tolist() == [2, -1, -1] and len(merged.encoded.lengths) == 3


def test_a_cached_unlabelled_file_is_mapped_unread_and_labelled_unknown(tmp_path, monkeypatch):
    unlabeled = write_csv(tmp_path / "u.csv", [{"text": "sad"}, {"text": "nice"}, {"text": "fine"}])
    cfg = distill_cfg(**{"distill.unlabeled_filepaths": f"[{unlabeled}]", "data.cache_dir": str(tmp_path / "cache"),
                         "module.max_seq_len": 16})
    tokenizer = load_tokenizer({**cfg["model"], "hf_model": save_tiny_encoder(tmp_path / "t")})
    labelled = write_csv(tmp_path / "l.csv", [{"text": "good", "sentiment": "positive"}])
    train = splits.Split(None, data.encode(tokenizer, data.read_examples(
        labelled, cfg["data"], True), 16))
    ctx = processes.Process(0, 0, 1, torch.device("cpu"), True, False)

    def through_the_cache():  # as prepare_run reads and tokenizes distill.unlabeled_filepaths
        split = splits.read_split(cfg, ctx, tokenizer, unlabeled, need_labels=False)
        return distill.with_unlabeled(cfg, train, [splits.tokenize(cfg, ctx, tokenizer, unlabeled, split)])
    first = through_the_cache()
    reads = []
    monkeypatch.setattr(splits, "read_examples", lambda path, *a, **k: reads.append(path))
    second = through_the_cache()
    assert reads == []  # the entry, made without labels, is mapped
    assert second.encoded.labels.tolist() == first.encoded.labels.tolist() == [2, -1, -1, -1]
    assert second.encoded.ids.tolist() == first.encoded.ids.tolist()


# ---------------------------------------------------------------------------------------------
# whole runs


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A 2-layer tiny BERT fine-tuned by trainer.py on the sentiment-word task."""
    tmp = tmp_path_factory.mktemp("teacher")
    rows = sentiment_rows(720, seed=4)
    train, val = write_csv(tmp / "train.csv", rows[:160]), write_csv(tmp / "val.csv", rows[640:])
    base = save_tiny_encoder(tmp / "base", layers=2)
    # one epoch of 640 rows: the students below train on its first 160
    teacher_train = write_csv(tmp / "teacher_train.csv", rows[:640])
    assert trainer.main(base_args(tmp, base, teacher_train, val, **{"trainer.epochs": 1})) == 0
    return {"dir": str(tmp / "ckpt" / "best"), "train": train, "val": val, "base": base}


def evaluate(tmp_path, model_dir, val, capsys):
    capsys.readouterr()
    args = base_args(tmp_path, model_dir, "null", val, **{"model.model_path": model_dir,
                                                          "trainer.log_dir": str(tmp_path / "eval")})
    assert trainer.main(args) == 0
    return last_json_line(capsys.readouterr().out)["acc"]


def untrained_accuracy(argv):
    """Validation accuracy of the student as distill.py builds it, before any training."""
    cfg = config.load_config(argv)
    processes.seed_everything(cfg["trainer"]["seed"])
    tokenizer = load_tokenizer(cfg["model"])
    teacher = distill.build_teacher(cfg, eager=False, device=torch.device("cpu"))
    student = distill.build_student(cfg, teacher, tokenizer)
    val = splits.load_split(cfg, tokenizer, cfg["data"]["val_filepath"], True)
    ctx = processes.Process(0, 0, 1, torch.device("cpu"), True, False)
    logits = evaluation.predict_logits(student, val.encoded, 32, tokenizer.pad_token_id, ctx)
    return float((logits.argmax(axis=1) == val.encoded.labels).mean())


@pytest.mark.slow  # trains several epochs
def test_distilled_random_student_beats_the_untrained_one(tmp_path, tiny_teacher, capsys):
    """A different, smaller architecture (1 layer, 16 wide, random init) learns from the teacher
    with soft labels and projected hidden states, and saves as a plain transformers model."""
    t = tiny_teacher
    teacher_acc = evaluate(tmp_path, t["dir"], t["val"], capsys)
    assert teacher_acc > 0.9
    overrides = {"model.model_path": t["dir"], "distill.student_pretrained": "false",
                 "distill.student_config": "{num_hidden_layers: 1, hidden_size: 16, intermediate_size: 32}",
                 "distill.loss_types": "[logits, hidden_states]", "distill.loss_weights": "[1.0, 1.0]",
                 "module.max_lr": "1e-2", "trainer.epochs": 4, "trainer.log_steps": 100}
    args = base_args(tmp_path, t["base"], t["train"], t["val"], **overrides)
    untrained_acc = untrained_accuracy(args)
    assert distill.main(args) == 0
    result = last_json_line(capsys.readouterr().out)
    assert result["acc"] > 0.85 and result["acc"] > untrained_acc + 0.2
    student = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ckpt" / "best")
    assert student.config.num_hidden_layers == 1 and student.config.hidden_size == 16
    assert student.config.id2label == {0: "negative", 1: "positive"}
    assert evaluate(tmp_path, str(tmp_path / "ckpt" / "best"), t["val"], capsys) == result["acc"]


LOOKUP_RECORDING_DISTILL = """
import json, os, sys
sys.path.insert(0, {root!r})
import torch, distill, trainer
rank, forwards, steps, used = os.environ["RANK"], [0], [], []
real_build, real_call, real_step = distill.build_teacher, distill.DistillLoss.__call__, trainer.Trainer.train_step
real_logits_loss = distill.logits_loss

def logits_loss(student_logits, teacher_logits, *args):  # the teacher's logits the loss was given
    used.append(teacher_logits.detach())
    return real_logits_loss(student_logits, teacher_logits, *args)

def build_teacher(*args, **kwargs):  # every forward of the teacher is counted
    teacher = real_build(*args, **kwargs)
    teacher.register_forward_hook(lambda *a: forwards.__setitem__(0, forwards[0] + 1))
    return teacher

def train_step(self, rank_indices, global_size):
    steps.append({{"epoch": self.epoch, "rows": rank_indices.tolist(), "teacher_runs": 0, "table_error": None}})
    return real_step(self, rank_indices, global_size)

def call(self, model, batch, indices=None):  # a lookup hits when the teacher need not run for it
    before = forwards[0]
    out = real_call(self, model, batch, indices)
    steps[-1]["teacher_runs"] += forwards[0] - before
    if self.teacher_logits is not None:  # what the loss looked up is the teacher's logits of those examples
        with torch.no_grad():
            live = self.teacher(**{{k: v for k, v in batch.items() if k != "labels"}}).logits
        steps[-1]["table_error"] = (live - used[-1]).abs().max().item()
    return out

distill.build_teacher, distill.logits_loss = build_teacher, logits_loss
distill.DistillLoss.__call__, trainer.Trainer.train_step = call, train_step
code = distill.main(sys.argv[1:])
with open(os.path.join({out!r}, f"rank{{rank}}.json"), "w") as f:
    json.dump(steps, f)
sys.exit(code)
"""


def test_a_pretrained_students_new_head_is_said_through_the_main_process_log(tmp_path, tiny_teacher, capsys,
                                                                             monkeypatch):
    # under torchrun every rank printed it; Process.say says it on the main process only
    logged = []
    monkeypatch.setattr(processes.Process, "say", lambda proc, message: logged.append(message))
    student = save_tiny_encoder(tmp_path / "student", layers=1)
    args = base_args(tmp_path, tiny_teacher["base"], tiny_teacher["train"], "null", **{
        "model.model_path": tiny_teacher["dir"], "distill.student_model": student, "trainer.epochs": 1})
    assert distill.main(args) == 0
    note = (f"note: a new classification head (classifier.*) for 2 labels; the encoder is pretrained "
            f"(distill.student_model {student!r})")
    assert logged.count(note) == 1
    assert note not in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("losses", [("[logits, labels, attentions]", "[0.5, 0.5, 1.0]"),
                                    ("[logits, labels]", "[0.5, 0.5]")],  # the teacher's logits shared by ranks
                         ids=["teacher at every step", "teacher logits computed once"])
def test_depth_cut_distillation_under_torchrun_with_two_processes(tmp_path, tiny_teacher, capsys, losses):
    pytest.importorskip("torch.distributed.run")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("no gloo backend")
    t = tiny_teacher
    args = base_args(tmp_path, t["base"], t["train"], t["val"],
                     **{"model.model_path": t["dir"], "distill.student_layers": "[1]",
                        "distill.loss_types": losses[0], "distill.loss_weights": losses[1],
                        "trainer.backend": "ddp", "trainer.epochs": 2})
    script = tmp_path / "recording_distill.py"
    script.write_text(LOOKUP_RECORDING_DISTILL.format(root=str(ROOT), out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", str(script), *args],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)
    assert out.returncode == 0, stderr_tail(out.stderr)
    steps = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [len(s) for s in steps] == [20, 20]  # 2 epochs x 160 rows / global batch 16, on each rank
    cached = losses[0] == "[logits, labels]"
    for epoch in (0, 1):
        rows = [row for rank in steps for step in rank if step["epoch"] == epoch for row in step["rows"]]
        assert sorted(rows) == list(range(160))  # every example once an epoch, on one rank or the other
        runs = [step["teacher_runs"] for rank in steps for step in rank if step["epoch"] == epoch]
        # cached: every lookup hits, in the first epoch and the second, on both ranks; else a miss a step
        assert runs == [0] * 20 if cached else all(runs)
    # a rank sees other examples each epoch, which a cache of each rank's own batches never reused
    assert {r for s in steps[0] if s["epoch"] == 0 for r in s["rows"]} != {
        r for s in steps[0] if s["epoch"] == 1 for r in s["rows"]}
    if cached:  # keyed by example index: the row looked up is the teacher's logits of that example
        assert max(step["table_error"] for rank in steps for step in rank) < 1e-4
    result = last_json_line(out.stdout)
    student_dir = tmp_path / "ckpt" / "best"
    student = AutoModelForSequenceClassification.from_pretrained(student_dir)
    assert student.config.num_hidden_layers == 1
    assert evaluate(tmp_path, str(student_dir), t["val"], capsys) == pytest.approx(result["acc"])
