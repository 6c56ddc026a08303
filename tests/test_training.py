"""Training end to end on tiny models: schedule, optimizer groups, the loop against a plain one
written with torch and transformers alone (with and without gradient accumulation), reproducibility,
and a full train -> checkpoint -> evaluate -> predict run."""
import contextlib
import csv
import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import evaluation
import processes
import trainer
from config import load_config
from conftest import base_args, last_json_line, save_tiny_encoder, sentiment_rows, write_csv
from model import build_model, load_tokenizer
from splits import load_split
from trainer import build_optimizer, lr_multiplier


def run_main(argv):
    """trainer.main in this process, on one thread: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = trainer.main(argv + ["--trainer.num_threads", "1"])
    return rc, out.getvalue(), err.getvalue()


def weights(checkpoint_dir):
    return load_file(str(Path(checkpoint_dir) / "model.safetensors"))


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# -- the learning-rate schedule and the optimizer --------------------------------------------------


def test_lr_multiplier_warms_up_from_a_non_zero_first_update_then_decays():
    values = [lr_multiplier(step, warmup_steps=4, total_steps=12) for step in range(12)]
    assert values[0] == pytest.approx(1 / 4)      # the first update already learns
    assert values[:4] == pytest.approx([1 / 4, 2 / 4, 3 / 4, 1])
    assert max(values) == 1 and values[3] == 1     # the peak at the end of the warmup
    assert values[4:] == pytest.approx([8 / 8, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8])
    assert values[-1] > 0                          # the last update still learns
    assert lr_multiplier(12, 4, 12) == 0           # ... and the schedule ends at zero


def test_lr_multiplier_without_warmup_starts_at_the_peak():
    assert [lr_multiplier(s, 0, 4) for s in range(4)] == pytest.approx([1, 3 / 4, 2 / 4, 1 / 4])
    assert lr_multiplier(0, 0, 1) == 1
    assert lr_multiplier(0, 1, 1) == 1  # all warmup: one step at the peak


MODULE = {"max_lr": 1e-3, "weight_decay": 0.01, "head_lr": None, "layer_lr_decay": 1.0}


def test_adamw_decays_weight_matrices_only(tiny_bert):
    model = build_model({"hf_model": tiny_bert, "model_path": None, "model_file": None},
                        ["negative", "positive"])
    optimizer = build_optimizer(model, MODULE)
    assert len(optimizer.param_groups) == 2  # one rate: a group with weight decay, one without
    name_of = {id(p): name for name, p in model.named_parameters()}
    decayed = {name_of[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    exempt = {name_of[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decayed | exempt == set(name_of.values()) and not decayed & exempt
    assert "classifier.weight" in decayed and "bert.embeddings.word_embeddings.weight" in decayed
    assert "bert.encoder.layer.0.attention.self.query.weight" in decayed
    assert "classifier.bias" in exempt
    assert "bert.embeddings.LayerNorm.weight" in exempt
    assert "bert.encoder.layer.1.output.LayerNorm.bias" in exempt
    assert not any("bias" in name or "LayerNorm" in name for name in decayed)


def rates_of(model, module_cfg):
    """{parameter name: peak learning rate} of build_optimizer's groups for module_cfg."""
    optimizer = build_optimizer(model, {**MODULE, **module_cfg})
    name_of = {id(p): name for name, p in model.named_parameters()}
    return {name_of[id(p)]: g["peak_lr"] for g in optimizer.param_groups for p in g["params"]}


def test_head_lr_and_layer_lr_decay_give_each_part_its_rate(tiny_bert):
    model = build_model({"hf_model": tiny_bert, "model_path": None, "model_file": None}, ["negative", "positive"])
    rates = rates_of(model, {"head_lr": 1e-2, "layer_lr_decay": 0.5})  # 2 layers
    assert rates["classifier.weight"] == rates["classifier.bias"] == pytest.approx(1e-2)
    assert rates["bert.encoder.layer.1.attention.self.query.weight"] == pytest.approx(1e-3)  # the top: max_lr
    assert rates["bert.pooler.dense.weight"] == pytest.approx(1e-3)  # above the layers: with the top one
    assert rates["bert.encoder.layer.0.output.LayerNorm.bias"] == pytest.approx(5e-4)
    assert rates["bert.embeddings.word_embeddings.weight"] == pytest.approx(2.5e-4)  # one factor below layer 0
    assert len(rates) == len(list(model.parameters()))
    assert set(rates_of(model, {}).values()) == {1e-3}
    head_only = rates_of(model, {"head_lr": 1e-2})
    assert {name: rate for name, rate in head_only.items() if rate != 1e-3} == {
        "classifier.weight": pytest.approx(1e-2), "classifier.bias": pytest.approx(1e-2)}


def test_layer_decay_finds_the_layers_of_other_encoders():
    """ModernBERT's layers are model.layers.i, its final norm sits above them; DeBERTa-v2's
    relative position embeddings belong to its encoder, not to the embeddings below layer 0."""
    from test_lora import tiny_classifier
    modernbert = rates_of(tiny_classifier("modernbert"), {"layer_lr_decay": 0.5})
    assert modernbert["model.embeddings.tok_embeddings.weight"] == pytest.approx(2.5e-4)
    assert modernbert["model.layers.0.attn.Wqkv.weight"] == pytest.approx(5e-4)
    assert modernbert["model.layers.1.mlp.Wo.weight"] == modernbert["model.final_norm.weight"] == pytest.approx(1e-3)
    assert modernbert["head.dense.weight"] == modernbert["classifier.weight"] == pytest.approx(1e-3)
    deberta = rates_of(tiny_classifier("deberta-v2"), {"layer_lr_decay": 0.5, "head_lr": 2e-3})
    assert deberta["deberta.encoder.rel_embeddings.weight"] == pytest.approx(1e-3)
    assert deberta["deberta.embeddings.word_embeddings.weight"] == pytest.approx(2.5e-4)
    assert deberta["pooler.dense.weight"] == deberta["classifier.bias"] == pytest.approx(2e-3)


def test_the_start_up_line_says_the_groups_and_their_rates(tiny_bert):
    model = build_model({"hf_model": tiny_bert, "model_path": None, "model_file": None}, ["negative", "positive"])
    optimizer = build_optimizer(model, {**MODULE, "head_lr": 1e-2, "layer_lr_decay": 0.5})
    total = sum(p.numel() for p in model.parameters()) / 1e6
    assert trainer.describe_optimizer(optimizer, model) == (
        "optimizer: AdamW, 8 parameter groups, peak learning rates embeddings 2.50e-04, layer 0 5.00e-04, "
        f"layer 1 1.00e-03, head 1.00e-02; {total:.2f}M of {total:.2f}M parameters train")
    optimizer = build_optimizer(model, MODULE)
    assert trainer.describe_optimizer(optimizer, model).startswith(
        "optimizer: AdamW, 2 parameter groups, peak learning rates all 1.00e-03;")


def test_weight_decay_groups_are_unchanged_by_the_rates(tiny_bert):
    model = build_model({"hf_model": tiny_bert, "model_path": None, "model_file": None}, ["negative", "positive"])
    optimizer = build_optimizer(model, {**MODULE, "head_lr": 1e-2, "layer_lr_decay": 0.8})
    # 2 layers: embeddings, layer 0, layer 1 (with the pooler), head; each with and without weight decay
    assert len(optimizer.param_groups) == 8
    for group in optimizer.param_groups:
        assert all((p.ndim >= 2) == (group["weight_decay"] == 0.01) for p in group["params"])
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_each_group_follows_the_schedule_at_its_own_rate(tmp_path, tiny_bert):
    """The groups' rates at a given update are their peak rate x the schedule's multiplier."""
    train = write_csv(tmp_path / "train.csv", sentiment_rows(64))
    cfg = load_config(base_args(tmp_path, tiny_bert, train, "null", **{
        "trainer.epochs": 1, "module.warmup_prop": 0.5, "module.head_lr": 1e-2, "module.layer_lr_decay": 0.5}))
    tokenizer = load_tokenizer(cfg["model"])
    cpu = torch.device("cpu")
    proc = processes.Process(0, 0, 1, cpu, True, False, amp_dtype=None)
    model = build_model(cfg["model"], cfg["data"]["labels_list"])
    run = trainer.Trainer(cfg, proc, model, tokenizer, load_split(cfg, tokenizer, train, True), None)
    batches = run.epoch_batches(0)
    name_of = {id(p): name for name, p in model.named_parameters()}

    def peak(name):  # max_lr 3e-3 (base_args) at the top layer, halved a layer below; the head's own
        if name.startswith("classifier."):
            return 1e-2
        return 3e-3 * (0.25 if ".embeddings." in name else 0.5 if ".layer.0." in name else 1)
    for update in range(3):
        run.train_step(*batches[update])
        multiplier = float(lr_multiplier(update, run.warmup_steps, run.total_steps))
        for group in run.optimizer.param_groups:
            (expected,) = {peak(name_of[id(p)]) for p in group["params"]}
            assert float(group["lr"]) == pytest.approx(expected * multiplier, rel=1e-6)
    assert float(run.lr) == pytest.approx(3e-3 * multiplier, rel=1e-6)  # train/lr: module.max_lr's


# -- the loop against a plain one, written with torch and transformers alone ----------------------


@pytest.fixture(scope="session")
def bert_no_dropout(tmp_path_factory):
    """Without dropout a forward pass is deterministic, so two loops can be compared exactly."""
    return save_tiny_encoder(tmp_path_factory.mktemp("bert-no-dropout"), "bert",
                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.fixture(scope="module")
def thirteen_rows(tmp_path_factory):
    # 13 examples with batch 8: each epoch is a step of 8 and a short step of 5
    return write_csv(tmp_path_factory.mktemp("thirteen") / "train.csv", sentiment_rows(13, seed=5))


# 3 epochs of 2 steps are 6 updates, 3 of them warmup; gradient norms here run from 0.05 to 0.5,
# so clipping to 0.3 cuts some updates and leaves others
PLAIN = {"epochs": 3, "batch_size": 8, "max_lr": 3e-3, "warmup_prop": 0.5, "weight_decay": 0.01,
         "max_grad_norm": 0.3, "seed": 42, "max_seq_len": 16}
LABELS = ["negative", "positive"]


def plain_args(tmp_path, model_dir, train, limit, speedups):
    """trainer.py's command line for the plain loop's job, in micro-batches of <= limit."""
    p = PLAIN
    return base_args(tmp_path, model_dir, train, "null", **{
        "trainer.epochs": p["epochs"], "trainer.train_batch_size": p["batch_size"],
        "trainer.gpu_batch_size_limit": limit, "module.max_lr": p["max_lr"],
        "module.warmup_prop": p["warmup_prop"], "module.weight_decay": p["weight_decay"],
        "trainer.max_grad_norm": p["max_grad_norm"], "trainer.seed": p["seed"],
        "module.max_seq_len": p["max_seq_len"], "trainer.speedups": str(speedups).lower()})


def batch_order(lengths, batch_size, seed, epoch):
    """data.train_batches' rule for one process, written out: shuffle, sort by length (longest
    first) inside mega-batches of 50 batches, cut into batches, shuffle the batch order, drawing
    from numpy's generator seeded with [seed, epoch]."""
    assert len(lengths) <= 50 * batch_size  # one mega-batch, as 13 rows are
    rng = np.random.default_rng([seed, epoch])
    shuffled = rng.permutation(len(lengths))
    by_length = shuffled[np.argsort(-lengths[shuffled], kind="stable")]
    batches = [by_length[i:i + batch_size] for i in range(0, len(by_length), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def plain_training(model_dir, train, epochs, batch_size, max_lr, warmup_prop, weight_decay,
                   max_grad_norm, seed, max_seq_len):
    """The job as the plainest loop, torch and transformers alone: one full batch per update, its
    mean loss. Returns the initial weights, the trained weights and each update's gradient norm."""
    with open(train, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    texts = [row["text"] for row in rows]
    labels = torch.tensor([LABELS.index(row["label"]) for row in rows])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lengths = np.array([len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_seq_len)["input_ids"]])
    torch.manual_seed(seed)  # draws the new classification head
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
        label2id={name: i for i, name in enumerate(LABELS)})
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    # weight decay on weight matrices only: biases and LayerNorm gains are exempt
    exempt = ("bias", "LayerNorm.weight")
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for name, p in named if not name.endswith(exempt)], "weight_decay": weight_decay},
         {"params": [p for name, p in named if name.endswith(exempt)], "weight_decay": 0.0}], lr=max_lr)
    epochs_of_batches = [batch_order(lengths, batch_size, seed, epoch) for epoch in range(epochs)]
    total = sum(len(batches) for batches in epochs_of_batches)
    warmup = round(warmup_prop * total)
    norms = []
    model.train()
    for update, indices in enumerate(indices for batches in epochs_of_batches for indices in batches):
        inputs = tokenizer([texts[i] for i in indices], padding=True, truncation=True,
                           max_length=max_seq_len, return_tensors="pt")
        model(**inputs, labels=labels[indices]).loss.backward()  # the mean over the batch, short or not
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm).item())
        # linear warmup from 1/warmup to 1, then linear decay that reaches 0 after the last update
        multiplier = (update + 1) / warmup if update < warmup else (total - update) / (total - warmup)
        for group in optimizer.param_groups:
            group["lr"] = max_lr * multiplier
        optimizer.step()
        optimizer.zero_grad()
    return initial, model.state_dict(), norms


@pytest.fixture(scope="module")
def plain_loop(bert_no_dropout, thirteen_rows):
    initial, trained, norms = plain_training(bert_no_dropout, thirteen_rows, **PLAIN)
    return SimpleNamespace(initial=initial, weights=trained, norms=norms)


@pytest.mark.slow  # trains more than one epoch
@pytest.mark.parametrize("limit, speedups", [(8, False), (3, False), (1, False), (3, True)])
def test_trainer_matches_a_plain_loop_whatever_its_micro_batches(
        tmp_path, bert_no_dropout, thirteen_rows, plain_loop, limit, speedups):
    # limit 8: one micro-batch a step; 3: three micro-batches (8 = 3 + 3 + 2); 1: one example each.
    # The short step of 5 must weigh each of its examples like the step of 8 does: a loss divided
    # by the nominal batch size, or a dropped short step, would move the weights elsewhere.
    # speedups false is plain transformers modules; true (the default) only does less work, so it
    # must match the plain loop as closely
    rc, out, err = run_main(plain_args(tmp_path, bert_no_dropout, thirteen_rows, limit, speedups))
    assert rc == 0, err
    assert last_json_line(out)["step"] == 6  # (8 + 5) x 3 epochs: the short steps are applied
    assert f"{-(-8 // limit)} micro-batches of <= {limit}" in out
    trained, reference = weights(tmp_path / "ckpt" / "last"), plain_loop.weights
    assert trained.keys() == reference.keys()
    # the plain loop moved the weights by far more than the tolerance below, and clipped some updates
    assert max_difference(plain_loop.initial, reference) > 1e-3
    assert min(plain_loop.norms) < PLAIN["max_grad_norm"] < max(plain_loop.norms)
    # not bitwise: fused AdamW against torch's default one, a summed loss times 1/n against a mean,
    # and the padding of each micro-batch round floats differently (about 6e-7 here)
    for key in reference:
        assert torch.allclose(trained[key], reference[key], rtol=0, atol=2e-6), key


@pytest.mark.slow  # trains several epochs
def test_same_seed_gives_identical_weights_and_another_seed_does_not(tmp_path, tiny_bert):
    train = write_csv(tmp_path / "train.csv", sentiment_rows(48, seed=3))
    runs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        # dropout is on in tiny_bert: the dropout masks are seeded too
        argv = base_args(tmp_path / name, tiny_bert, train, "null",
                         **{"trainer.seed": seed, "trainer.epochs": 2})
        assert run_main(argv)[0] == 0
        runs[name] = weights(tmp_path / name / "ckpt" / "last")
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert max_difference(runs["a"], runs["c"]) > 1e-3


# -- a full run: train, checkpoint, evaluate, predict ----------------------------------------------


def trained_run(root, tiny_bert, rows, epochs):
    train = write_csv(root / "train.csv", sentiment_rows(rows, seed=1))
    val = write_csv(root / "val.csv", sentiment_rows(64, seed=2))
    argv = base_args(root, tiny_bert, train, val, **{"trainer.epochs": epochs})
    rc, out, err = run_main(argv)
    assert rc == 0, err
    return SimpleNamespace(root=root, train=train, val=val, argv=argv, out=out, err=err,
                           result=last_json_line(out), ckpt=root / "ckpt", runs=root / "runs",
                           model_dir=tiny_bert)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_bert):
    """One training run shared by the tests below: one epoch of 768 examples, about a second."""
    return trained_run(tmp_path_factory.mktemp("trained"), tiny_bert, 768, 1)


@pytest.fixture(scope="session")
def trained_3_epochs(tmp_path_factory, tiny_bert):
    """256 examples, 3 epochs: what happens at each epoch's end."""
    return trained_run(tmp_path_factory.mktemp("trained3"), tiny_bert, 256, 3)


def test_training_learns_the_task(trained):
    result = trained.result
    assert result["acc"] > 0.9                 # chance is about 0.5
    assert result["f1_macro"] > 0.9
    for key in ("acc", "f1_macro", "f1_weighted", "acc_and_f1", "mcc", "best_step", "best_checkpoint"):
        assert key in result
    assert result["best_step"] in (16, 32, 48)  # 256 / 16 = 16 steps per epoch, validated each epoch


@pytest.mark.slow  # trains more than one epoch
def test_checkpoints_and_their_links(trained_3_epochs):
    trained = trained_3_epochs
    best, last = trained.ckpt / "best", trained.ckpt / "last"
    assert best.is_dir() and last.is_dir()
    assert best.resolve() == Path(trained.result["best_checkpoint"]).resolve()
    assert last.resolve().name == "checkpoint-epoch3-step48"
    for name in ("model.safetensors", "config.json", "training_state.pt"):
        assert (last / name).is_file()
    assert (last / "tokenizer.json").is_file() or (last / "vocab.txt").is_file()
    # writes are atomic: no temporary folder is left behind, only the run lock
    assert [p.name for p in trained.ckpt.iterdir() if p.name.startswith(".")] == [".lock"]
    # the training state is plain data (weights_only), the rest is JSON beside it
    state = torch.load(last / "training_state.pt", weights_only=True)
    assert "optimizer" in state and "rng" in state["ranks"][0] and "window" in state["ranks"][0]
    manifest = json.loads((last / "checkpoint.json").read_text())
    assert manifest["step"] == 48 and manifest["epoch"] == 3 and manifest["config"]["trainer"]["epochs"] == 3
    assert manifest["files"]["model.safetensors"] == (last / "model.safetensors").stat().st_size


def test_checkpoint_loads_in_plain_transformers_and_predicts_the_same(trained):
    best = trained.ckpt / "best"
    model = AutoModelForSequenceClassification.from_pretrained(best).eval()
    tokenizer = AutoTokenizer.from_pretrained(best)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert model.config.label2id == {"negative": 0, "positive": 1}
    texts = [row["text"] for row in sentiment_rows(20, seed=9)]
    with torch.no_grad():
        plain = model(**tokenizer(texts, padding=True, truncation=True, max_length=16,
                                  return_tensors="pt")).logits.numpy()
    # our evaluation path: its own tokenizer load, length-sorted dynamic batches, original order
    cfg = load_config(trained.argv + ["--data.train_filepath", "null", "--model.model_path", str(best)])
    ours_model = build_model(cfg["model"], cfg["data"]["labels_list"])
    path = write_csv(trained.root / "nine.csv", [{"text": t, "label": "positive"} for t in texts])
    split = load_split(cfg, load_tokenizer(cfg["model"]), path, True)
    ctx = processes.Process(0, 0, 1, torch.device("cpu"), True, False)
    ours = evaluation.predict_logits(ours_model, split.encoded, 3, tokenizer.pad_token_id, ctx)
    np.testing.assert_allclose(ours, plain, atol=1e-5)


@pytest.mark.slow  # trains more than one epoch
def test_logs_are_written_for_tensorboard_and_as_json_lines(trained_3_epochs):
    trained = trained_3_epochs
    train_runs = [p for p in trained.runs.iterdir() if re.search(r"-train(-\d+)?$", p.name)]
    assert len(train_runs) == 1
    run_dir = train_runs[0]
    assert list(run_dir.glob("events.out.tfevents.*"))
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_lines = [line for line in lines if "train/loss" in line]
    val_lines = [line for line in lines if "val/acc" in line]
    assert [line["step"] for line in train_lines] == list(range(5, 49, 5))  # trainer.log_steps 5
    assert [line["step"] for line in val_lines] == [16, 32, 48]              # once per epoch
    # the final metrics are those of the best validation (module.metric acc here)
    assert max(line["val/acc"] for line in val_lines) == pytest.approx(trained.result["acc"])
    assert train_lines[-1]["train/loss"] < train_lines[0]["train/loss"]
    # the logged learning rate is the one of the step's update: 48 steps, 5 of warmup, peak 3e-3
    for line in train_lines:
        assert line["train/lr"] == pytest.approx(3e-3 * float(lr_multiplier(line["step"] - 1, 5, 48)))
    assert json.loads((run_dir / "final_metrics.json").read_text())["acc"] == trained.result["acc"]
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = event_accumulator.EventAccumulator(str(run_dir))
    events.Reload()
    assert {"train/loss", "train/lr", "val/acc", "val/f1_macro"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("val/acc")] == [16, 32, 48]


def test_evaluate_only_reports_the_checkpoint_metrics_in_a_new_run_folder(trained):
    runs_before = {p.name: sorted(q.name for q in p.iterdir()) for p in trained.runs.iterdir()}
    checkpoints_before = sorted(p.name for p in trained.ckpt.iterdir())
    # the checkpoint is all it needs: model.hf_model (the pretrained encoder) is not read
    rc, out, err = run_main(trained.argv + ["--data.train_filepath", "null",
                                            "--model.model_path", str(trained.ckpt / "best"),
                                            "--model.hf_model", str(trained.root / "gone")])
    assert rc == 0, err
    result = last_json_line(out)
    assert result["acc"] == pytest.approx(trained.result["acc"])      # the same model, the same data
    assert result["f1_macro"] == pytest.approx(trained.result["f1_macro"])
    assert "precision" in out and "negative" in out and "positive" in out  # the per-class table
    # earlier run folders are kept, untouched; the evaluation has its own
    runs_after = {p.name: sorted(q.name for q in p.iterdir()) for p in trained.runs.iterdir()}
    assert all(runs_after[name] == files for name, files in runs_before.items())
    new = [name for name in runs_after if name not in runs_before]
    assert len(new) == 1 and re.search(r"-eval(-\d+)?$", new[0])  # -2 for a second run that second
    saved = json.loads((trained.runs / new[0] / "eval_metrics.json").read_text())
    assert saved["acc"] == pytest.approx(result["acc"]) and set(saved["per_class"]) == {"negative", "positive"}
    assert sorted(p.name for p in trained.ckpt.iterdir()) == checkpoints_before


def test_predict_writes_input_columns_labels_and_probabilities_in_input_order(trained):
    rows = sentiment_rows(40, seed=11)
    path = write_csv(trained.root / "new.csv", [{"id": f"r{i}", "text": row["text"]}
                                               for i, row in enumerate(rows)])
    output = trained.root / "predictions.csv"
    rc, out, err = run_main(trained.argv + [
        "--data.train_filepath", "null", "--data.val_filepath", "null",
        "--data.predict_filepath", path, "--data.predict_output", str(output),
        "--model.model_path", str(trained.ckpt / "best")])
    assert rc == 0, err
    with open(output, newline="", encoding="utf-8") as f:
        predicted = list(csv.DictReader(f))
    assert list(predicted[0]) == ["id", "text", "predicted_label", "prob_negative", "prob_positive"]
    assert [p["id"] for p in predicted] == [f"r{i}" for i in range(40)]
    assert [p["text"] for p in predicted] == [row["text"] for row in rows]
    probs = np.array([[float(p["prob_negative"]), float(p["prob_positive"])] for p in predicted])
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert [p["predicted_label"] for p in predicted] == \
        [["negative", "positive"][i] for i in probs.argmax(axis=1)]
    accuracy = np.mean([p["predicted_label"] == row["label"] for p, row in zip(predicted, rows)])
    assert accuracy > 0.9
    # the same probabilities as the checkpoint gives in plain transformers, at its temperature (config.json)
    best = trained.ckpt / "best"
    model = AutoModelForSequenceClassification.from_pretrained(best).eval()
    tokenizer = AutoTokenizer.from_pretrained(best)
    with torch.no_grad():
        logits = model(**tokenizer([row["text"] for row in rows], padding=True, truncation=True,
                                   max_length=16, return_tensors="pt")).logits
    temperature = model.config.calibration_temperature
    np.testing.assert_allclose(probs, torch.softmax(logits / temperature, dim=1).numpy(), atol=2e-6)


def test_evaluate_and_predict_in_one_run_write_predictions_to_the_run_folder(trained):
    path = write_csv(trained.root / "unlabelled.csv", [{"text": "good film"}, {"text": "awful plot"}])
    rc, out, err = run_main(trained.argv + ["--data.train_filepath", "null", "--data.predict_filepath", path,
                                            "--model.model_path", str(trained.ckpt / "best")])
    assert rc == 0, err
    result = last_json_line(out)
    assert result["acc"] == pytest.approx(trained.result["acc"])
    predictions = Path(result["predictions"])
    assert predictions.parent.parent == trained.runs and re.search(r"-eval(-\d+)?$", predictions.parent.name)
    assert (predictions.parent / "eval_metrics.json").is_file()
    with open(predictions, newline="", encoding="utf-8") as f:
        assert [row["predicted_label"] for row in csv.DictReader(f)] == ["positive", "negative"]


@pytest.mark.parametrize("prefix, nest", [("module.", None), ("model.", "state_dict"),
                                          ("_orig_mod.", "model_state_dict")])
def test_evaluate_a_plain_state_dict_file_with_wrapper_prefixes(trained, prefix, nest):
    state = {prefix + k: v for k, v in weights(trained.ckpt / "best").items()}
    path = trained.root / f"weights-{prefix.strip('._')}.pt"
    torch.save(state if nest is None else {nest: state, "epoch": 3}, path)
    rc, out, err = run_main(trained.argv + ["--data.train_filepath", "null",
                                            "--model.model_path", str(path)])
    assert rc == 0, err
    assert last_json_line(out)["acc"] == pytest.approx(trained.result["acc"])


# -- other models and tasks ------------------------------------------------------------------------


@pytest.mark.slow  # trains several epochs
def test_roberta_trains_and_its_checkpoint_loads(tmp_path, tiny_roberta):
    train = write_csv(tmp_path / "train.csv", sentiment_rows(256, seed=1))
    val = write_csv(tmp_path / "val.csv", sentiment_rows(64, seed=2))
    rc, out, err = run_main(base_args(tmp_path, tiny_roberta, train, val))
    assert rc == 0, err
    assert last_json_line(out)["acc"] > 0.8
    best = tmp_path / "ckpt" / "best"
    model = AutoModelForSequenceClassification.from_pretrained(best)
    assert model.config.model_type == "roberta"
    assert AutoTokenizer.from_pretrained(best).pad_token_id == 1


@pytest.mark.slow  # trains several epochs
def test_regression_with_one_label_trains(tmp_path, tiny_bert):
    def scored(rows):
        return [{"text": row["text"], "label": 1.0 if row["label"] == "positive" else -1.0} for row in rows]
    train = write_csv(tmp_path / "train.csv", scored(sentiment_rows(256, seed=1)))
    val = write_csv(tmp_path / "val.csv", scored(sentiment_rows(64, seed=2)))
    rc, out, err = run_main(base_args(tmp_path, tiny_bert, train, val, **{
        "data.labels_list": "[score]", "module.metric": "pcc_and_scc"}))
    assert rc == 0, err
    result = last_json_line(out)
    assert result["pearson"] > 0.8 and result["spearman"] > 0.8
    assert result["pcc_and_scc"] == pytest.approx((result["pearson"] + result["spearman"]) / 2)
    config = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ckpt" / "best").config
    assert config.num_labels == 1 and config.problem_type == "regression"
    # predictions of a regression model are its scores
    path = write_csv(tmp_path / "new.csv", [{"text": "good great film"}, {"text": "bad awful plot"}])
    output = tmp_path / "scores.csv"
    rc, _, err = run_main(base_args(tmp_path, tiny_bert, "null", "null", **{
        "data.labels_list": "[score]", "module.metric": "pcc_and_scc", "data.predict_filepath": path,
        "data.predict_output": str(output), "model.model_path": str(tmp_path / "ckpt" / "best")}))
    assert rc == 0, err
    with open(output, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["text", "prediction"]
    assert float(rows[0]["prediction"]) > 0.5 > -0.5 > float(rows[1]["prediction"])
