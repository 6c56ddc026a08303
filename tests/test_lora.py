"""LoRA (lora.py) and its place in training: the adapted layer's arithmetic, what trains on each
architecture, checkpoints that plain transformers loads (adapters merged) and that resume
bitwise (the adapter file), a small training state, DDP, mixed precision and distillation.

Tiny models built from configs; the runs are trainer.py's and distill.py's in this process, except
the DDP test (torchrun, slow).
"""
import contextlib
import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import (
    AlbertConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DebertaV2Config,
    ModernBertConfig,
)

import distill
import lora
import trainer
from config import ConfigError, load_config
from conftest import ROOT, base_args, last_json_line, save_tiny_encoder, sentiment_rows, stderr_tail, tiny_config, write_csv

LORA = {"lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.1, "lora_targets": None, "lora_train_embeddings": False}
SMALL = {"vocab_size": 40, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
         "intermediate_size": 64, "max_position_embeddings": 64, "num_labels": 2}


def tiny_classifier(kind):
    """A randomly initialised 2-layer, 32-wide sequence classifier of the given architecture."""
    torch.manual_seed(0)
    if kind in ("bert", "roberta"):
        config = tiny_config(kind, num_labels=2)
    elif kind == "modernbert":
        config = ModernBertConfig(**SMALL, local_attention=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                  cls_token_id=1, sep_token_id=2)
    else:
        config = DebertaV2Config(**SMALL, relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=8,
                                 max_relative_positions=16)
    return AutoModelForSequenceClassification.from_config(config).eval()


def inputs_of(model):
    torch.manual_seed(1)
    return {"input_ids": torch.randint(5, model.config.vocab_size, (3, 9)), "attention_mask": torch.ones(3, 9, dtype=torch.long)}


def run_quietly(main, argv):
    """main(argv) in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


# -- the adapted layer -----------------------------------------------------------------------------


def test_a_lora_linear_starts_as_its_base_layer_and_merged_equals_unmerged():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    weight, x = base.weight.detach().clone(), torch.randn(5, 16)
    expected = base(x)
    layer = lora.LoRALinear(base, rank=4, alpha=8, dropout=0.1).train()
    assert torch.equal(layer(x), expected)  # B starts at zero: nothing added, dropout or not
    assert [name for name, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]

    nn.init.normal_(layer.lora_B)  # as if trained
    layer.eval()
    unmerged = layer(x)
    by_hand = x @ (weight + 8 / 4 * layer.lora_B @ layer.lora_A).T + base.bias
    torch.testing.assert_close(unmerged, by_hand)
    assert (unmerged - expected).abs().max() > 0.1
    layer.merge()
    assert layer.merged and not torch.equal(layer.weight, weight)
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind, targets, layers", [
    ("bert", ["query", "key", "value"], 6), ("roberta", ["query", "key", "value"], 6),
    ("modernbert", ["Wqkv"], 2), ("deberta-v2", ["query_proj", "key_proj", "value_proj"], 6)])
def test_adapters_go_on_the_attention_projections_and_only_they_and_the_head_train(kind, targets, layers):
    model = tiny_classifier(kind)
    before = model(**inputs_of(model)).logits
    said = []
    lora.add_adapters(model, LORA, say=said.append)
    adapted = [name for name, m in model.named_modules() if isinstance(m, lora.LoRALinear)]
    assert len(adapted) == layers and all(name.rsplit(".", 1)[1] in targets for name in adapted)
    prefix = model.base_model_prefix + "."
    head = {name for name, _ in model.named_parameters() if not name.startswith(prefix)}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == head | {f"{name}.lora_{m}" for name in adapted for m in "AB"}
    assert torch.equal(model(**inputs_of(model)).logits, before)  # the adapted model starts as the plain one
    assert said and f"on {layers} linear layers" in said[0]


def test_the_head_and_the_parts_asked_for_are_all_that_trains():
    model = tiny_classifier("bert")
    lora.add_adapters(model, {**LORA, "lora_targets": ["attention.self.value"], "lora_train_embeddings": True},
                      say=lambda message: None)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.weight", "classifier.bias"} | {
        name for name, _ in model.named_parameters() if name.startswith("bert.embeddings.")} | {
        f"bert.encoder.layer.{i}.attention.self.value.lora_{m}" for i in range(2) for m in "AB"}


def test_a_target_that_names_no_linear_layer_is_one_line_naming_the_ones_there():
    with pytest.raises(ConfigError) as error:
        lora.add_adapters(tiny_classifier("bert"), {**LORA, "lora_targets": ["query", "valu"]})
    assert str(error.value) == ("model.lora_targets ['valu'] names no linear layer of BertModel; its linear layers "
                                "are named ['dense', 'key', 'query', 'value']")
    albert = AutoModelForSequenceClassification.from_config(AlbertConfig(**SMALL, embedding_size=16))
    with pytest.raises(ConfigError, match="no default attention projections for model type 'albert'; name its"):
        lora.add_adapters(albert, LORA)


def test_the_merged_state_dict_is_the_plain_models_and_leaves_the_training_weights_alone():
    model = tiny_classifier("bert")
    lora.add_adapters(model, LORA, say=lambda message: None)
    for module in model.modules():
        if isinstance(module, lora.LoRALinear):
            nn.init.normal_(module.lora_B, std=0.5)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    merged = lora.merged_state_dict(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    plain = tiny_classifier("bert")
    plain.load_state_dict(merged, strict=True)  # the same names as the plain model's, none more
    expected = model(**inputs_of(model)).logits
    assert not torch.allclose(plain(**inputs_of(plain)).logits, tiny_classifier("bert")(**inputs_of(plain)).logits)
    torch.testing.assert_close(plain(**inputs_of(plain)).logits, expected, atol=1e-5, rtol=1e-5)
    assert lora.merged_state_dict(tiny_classifier("bert")) is None  # no adapters: save_pretrained's own


@pytest.mark.parametrize("key, value, message", [
    ("model.lora_rank", "-1", "model.lora_rank is -1; use 0 (LoRA off) or a rank such as 8"),
    ("model.lora_alpha", "0", "model.lora_alpha is 0; it must be positive (e.g. 16)"),
    ("model.lora_dropout", "1.0", "model.lora_dropout is 1.0; it must be in [0, 1)"),
    ("model.lora_targets", "[]", "model.lora_targets [] must be names of linear layers (e.g. [query, value]), or null"),
    ("module.head_lr", "0", "module.head_lr is 0; it must be positive, or null for module.max_lr"),
    ("module.layer_lr_decay", "1.5", "module.layer_lr_decay is 1.5; it must be in (0, 1] (1.0 = off)"),
    ("module.layer_lr_decay", "0", "module.layer_lr_decay is 0; it must be in (0, 1] (1.0 = off)")])
def test_bad_lora_and_rate_values_are_one_line(key, value, message):
    with pytest.raises(ConfigError) as error:
        load_config([f"--{key}", value])
    assert str(error.value) == message


# -- training, checkpoints and resume ----------------------------------------------------------------


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A tiny job with dropout on (RNG state matters for resume): 100 rows, 7 steps an epoch."""
    tmp = tmp_path_factory.mktemp("lora")
    model = save_tiny_encoder(tmp / "bert")
    train = write_csv(tmp / "train.csv", sentiment_rows(100, seed=1))
    val = write_csv(tmp / "val.csv", sentiment_rows(40, seed=2))

    def args(name, **more):
        return base_args(tmp / name, model, train, val, **{
            "trainer.epochs": 1, "model.lora_rank": 4, "model.lora_alpha": 8, "module.max_lr": "1e-2",
            "ckpt.save_steps": 3, "ckpt.keep_last": "null", **more})
    return {"tmp": tmp, "model": model, "val": val, "args": args}


@pytest.fixture(scope="module")
def lora_run(job):
    rc, out, err = run_quietly(trainer.main, job["args"]("lora"))
    assert rc == 0, err[-3000:]
    return {"dir": job["tmp"] / "lora" / "ckpt", "out": out, "result": last_json_line(out)}


def test_a_lora_checkpoint_is_a_plain_model_that_predicts_as_our_evaluation(job, lora_run, tmp_path):
    checkpoint = lora_run["dir"] / "last"
    model, info = AutoModelForSequenceClassification.from_pretrained(checkpoint, output_loading_info=True)
    assert not any(info.values())  # no missing, unexpected or mismatched weights: a plain BERT
    assert "optimizer: AdamW, 2 parameter groups, peak learning rates all 1.00e-02;" in lora_run["out"]
    card = (checkpoint / "README.md").read_text(encoding="utf-8")
    assert "| model.lora_rank | 4 |" in card and "| model.lora_alpha | 8 |" in card  # the model card says how it trained

    rows = sentiment_rows(40, seed=2)
    predict = write_csv(tmp_path / "texts.csv", rows, columns=["text"])
    rc, out, err = run_quietly(trainer.main, base_args(
        tmp_path, job["model"], "null", job["val"], **{"model.model_path": str(checkpoint),
                                                      "data.predict_filepath": predict,
                                                      "data.predict_output": str(tmp_path / "p.csv")}))
    assert rc == 0, err[-3000:]
    assert last_json_line(out)["acc"] == lora_run["result"]["acc"]  # the training run's own validation
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    with torch.no_grad():
        logits = model.eval()(**tokenizer([r["text"] for r in rows], padding=True, truncation=True,
                                          return_tensors="pt")).logits
    ours = [float(r["prob_positive"]) for r in csv.DictReader(open(tmp_path / "p.csv", encoding="utf-8"))]
    temperature = model.config.calibration_temperature  # as the card's recipe says: config.json's temperature
    torch.testing.assert_close(torch.tensor(ours), (logits / temperature).softmax(-1)[:, 1], atol=1e-5, rtol=0)


def test_the_frozen_weights_stay_pretrained_and_the_adapter_file_holds_what_trained(job, lora_run):
    pretrained = load_file(os.path.join(job["model"], "model.safetensors"))
    saved = load_file(lora_run["dir"] / "last" / "model.safetensors")
    adapter = load_file(lora_run["dir"] / "last" / lora.ADAPTER_FILE)
    layer = "bert.encoder.layer.1.attention.self.query"
    assert set(adapter) == {"classifier.weight", "classifier.bias"} | {
        f"bert.encoder.layer.{i}.attention.self.{t}.lora_{m}" for i in range(2) for t in ("query", "key", "value")
        for m in "AB"}
    assert adapter[f"{layer}.lora_B"].abs().max() > 0  # B learned
    frozen = "encoder.layer.1.intermediate.dense.weight"  # the encoder's file has no bert. prefix
    assert torch.equal(saved["bert." + frozen], pretrained[frozen])
    merged = pretrained[frozen.replace("intermediate.dense", "attention.self.query")] + \
        8 / 4 * adapter[f"{layer}.lora_B"] @ adapter[f"{layer}.lora_A"]
    torch.testing.assert_close(saved[f"{layer}.weight"], merged)


def test_the_training_state_holds_the_trainable_parameters_only(job, lora_run):
    rc, _, err = run_quietly(trainer.main, job["args"]("full", **{"model.lora_rank": 0, "module.max_lr": "3e-3"}))
    assert rc == 0, err[-3000:]
    state = torch.load(lora_run["dir"] / "last" / "training_state.pt", weights_only=True)
    assert len(state["optimizer"]["state"]) == 2 + 2 * 6  # the head's weight and bias, A and B of 6 layers
    sizes = {name: (job["tmp"] / name / "ckpt" / "last" / "training_state.pt").stat().st_size for name in ("lora", "full")}
    assert sizes["lora"] < sizes["full"] / 4


def assert_same_files(a, b, names=("model.safetensors", lora.ADAPTER_FILE)):
    for name in names:
        first, second = load_file(a / name), load_file(b / name)
        assert first.keys() == second.keys()
        for key in first:
            assert torch.equal(first[key], second[key]), f"{name}: {key}"


def resume_at_step_3(main, args, name, **more):
    """Run the job (its checkpoints in a folder of name), then resume it from its checkpoint of
    step 3, replacing the later ones: the folder's checkpoint `last`."""
    assert run_quietly(main, args(name, **more))[0] == 0
    folder = args(name)[args(name).index("--ckpt.model_state_save_dir") + 1]
    rc, out, err = run_quietly(main, args(name, **more, **{
        "ckpt.resume": os.path.join(folder, "checkpoint-epoch1-step3"), "ckpt.overwrite": "true"}))
    assert rc == 0, err[-3000:]
    assert "resumed from" in out and "at step 3" in out
    return Path(folder) / "last", out


def test_resuming_mid_epoch_ends_bitwise_as_the_run_never_interrupted(job, lora_run):
    last, out = resume_at_step_3(trainer.main, job["args"], "resumed")
    assert_same_files(last, lora_run["dir"] / "last")
    assert last_json_line(out)["acc"] == lora_run["result"]["acc"]


def test_a_resume_onto_other_frozen_weights_is_refused_in_one_line(job, tmp_path, capsys):
    """The adapters sit on the weights the run was built from: if model.hf_model's files changed
    since, the resumed run would be another model, so it stops before step 1."""
    model = save_tiny_encoder(tmp_path / "bert")
    args = job["args"]("changed", **{"model.hf_model": model})
    assert run_quietly(trainer.main, args)[0] == 0
    save_tiny_encoder(tmp_path / "bert", seed=1)  # the same architecture, other weights
    capsys.readouterr()
    rc, out, err = run_quietly(trainer.main, args + ["--ckpt.resume", "auto"])
    assert rc == 2
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "model.safetensors: bert." in line and "is not the frozen weight plus its adapter" in line


@pytest.mark.slow  # trains two epochs
def test_stopped_after_epoch_1_and_resumed_is_the_uninterrupted_run(job):
    args = {"trainer.epochs": 2, "ckpt.save_steps": 0, "module.head_lr": "3e-3", "module.layer_lr_decay": 0.8}
    assert run_quietly(trainer.main, job["args"]("two-epochs", **args))[0] == 0
    assert run_quietly(trainer.main, job["args"]("paused", **args, **{"trainer.stop_after_epochs": 1}))[0] == 0
    rc, out, err = run_quietly(trainer.main, job["args"]("paused", **args, **{"ckpt.resume": "auto"}))
    assert rc == 0, err[-3000:]
    assert "at step 7 (epoch 1" in out
    assert_same_files(job["tmp"] / "paused" / "ckpt" / "last", job["tmp"] / "two-epochs" / "ckpt" / "last")


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_lora_under_forced_cpu_autocast_trains_and_saves_a_plain_model(job, dtype):
    rc, out, err = run_quietly(trainer.main, job["args"](f"amp-{dtype}", **{
        "trainer.backend": "sp-amp", "trainer.amp_dtype": dtype, "ckpt.save_steps": 0}))
    assert rc == 0, err[-3000:]
    assert f"mixed precision: autocast {dtype} on the CPU" in out
    checkpoint = job["tmp"] / f"amp-{dtype}" / "ckpt" / "last"
    state = torch.load(checkpoint / "training_state.pt", weights_only=True)
    assert ("scale" in state["scaler"]) == (dtype == "fp16")
    adapter = load_file(checkpoint / lora.ADAPTER_FILE)
    assert adapter["bert.encoder.layer.0.attention.self.value.lora_B"].dtype == torch.float32  # float32 weights
    assert adapter["bert.encoder.layer.0.attention.self.value.lora_B"].abs().max() > 0
    AutoModelForSequenceClassification.from_pretrained(checkpoint)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_lora_on_cuda_with_amp_resumes_and_saves_a_plain_model(job, dtype):
    more = {"trainer.backend": "sp-amp", "trainer.amp_dtype": dtype, "trainer.device": "cuda"}
    rc, out, err = run_quietly(trainer.main, job["args"](f"cuda-{dtype}", **more))
    assert rc == 0, err[-3000:]
    assert f"mixed precision: autocast {dtype}" in out
    last, _ = resume_at_step_3(trainer.main, job["args"], f"cuda-{dtype}-resumed", **more)
    assert_same_files(last, job["tmp"] / f"cuda-{dtype}" / "ckpt" / "last")
    AutoModelForSequenceClassification.from_pretrained(last)


# -- distillation ----------------------------------------------------------------------------------


def test_distillation_from_a_lora_teacher_and_into_a_lora_student(job, lora_run):
    teacher = str(lora_run["dir"] / "best")
    common = {"model.model_path": teacher, "distill.student_layers": "[0]", "model.lora_rank": 0}
    rc, out, err = run_quietly(distill.main, job["args"]("student", **common))
    assert rc == 0, err[-3000:]  # the teacher is a plain folder

    rc, out, err = run_quietly(distill.main, job["args"]("lora-student", **{**common, "model.lora_rank": 4}))
    assert rc == 0, err[-3000:]
    assert "note: LoRA rank 4" in out
    student = job["tmp"] / "lora-student" / "ckpt"
    AutoModelForSequenceClassification.from_pretrained(student / "last")  # merged, plain
    adapter = load_file(student / "last" / lora.ADAPTER_FILE)
    assert set(adapter) == {"student.classifier.weight", "student.classifier.bias"} | {
        f"student.bert.encoder.layer.0.attention.self.{t}.lora_{m}" for t in ("query", "key", "value") for m in "AB"}
    last, _ = resume_at_step_3(distill.main, job["args"], "lora-student-resumed", **{**common, "model.lora_rank": 4})
    assert_same_files(last, student / "last")


# -- DDP -------------------------------------------------------------------------------------------


@pytest.mark.slow  # torchrun
def test_ddp_lora_trains_like_one_process_and_resumes_bitwise(tmp_path):
    model = save_tiny_encoder(tmp_path / "bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    train = write_csv(tmp_path / "train.csv", sentiment_rows(100, seed=1))
    val = write_csv(tmp_path / "val.csv", sentiment_rows(51, seed=2))

    def args(name, **more):
        return base_args(tmp_path / name, model, train, val, **{
            "trainer.epochs": 2, "trainer.gpu_batch_size_limit": 3, "model.lora_rank": 4, "model.lora_dropout": 0,
            "module.max_lr": "1e-2", "module.head_lr": "3e-3", **more})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(argv):
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              str(ROOT / "trainer.py"), *argv], capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0, stderr_tail(out.stderr)
        return out
    assert run_quietly(trainer.main, args("sp"))[0] == 0
    torchrun(args("ddp"))
    torchrun(args("paused", **{"trainer.stop_after_epochs": 1}))
    resumed = torchrun(args("paused", **{"ckpt.resume": "auto"}))
    assert "resumed from" in resumed.stdout
    last = {name: tmp_path / name / "ckpt" / "last" for name in ("sp", "ddp", "paused")}
    assert_same_files(last["paused"], last["ddp"])  # bitwise, under DDP too
    one, two = load_file(last["sp"] / lora.ADAPTER_FILE), load_file(last["ddp"] / lora.ADAPTER_FILE)
    for key in one:  # two ranks of 8 against one process of 16: the same updates, up to rounding
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=1e-4)
