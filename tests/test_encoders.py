"""The encoders people fine-tune today, as tiny random models built here: ModernBERT (a global /
sliding `layer_types` list, rotary positions), DeBERTa-v3 (DeBERTa-v2's class with relative
positions only; eager attention), XLM-R (positions counted after the pad id), EuroBERT and GTE
(rotary BERTs, native in transformers 5).

For each: fine-tuning against a plain torch-and-transformers loop, evaluation and prediction against
plain transformers, an exact resume, a depth cut whose student loads in plain transformers and
predicts as our evaluation does, and the ONNX export gate. Then what a model folder can ask of us:
model.attn_implementation, model.trust_remote_code (a folder with code of its own), a tokenizer
without a padding token, and the model's position limit; each failure is one line and exit status 2.
"""
import copy
import csv
import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer, BertTokenizer

import distill
import export
import speedups
import trainer
from config import ConfigError, load_config
from conftest import ROOT, WORDS, base_args, make_tokenizer, run_main, save_tiny_encoder, sentiment_rows, stderr_tail, write_csv
from model import ModelError, build_model, position_limit
from test_training import batch_order

LABELS = ["negative", "positive"]
DROPOUT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout", "embedding_dropout",
                "mlp_dropout", "classifier_dropout", "pooler_dropout")
# model_type, tokenizer (conftest's bert: [PAD] 0; roberta: <s> 0 <pad> 1 </s> 2), whether the model
# reads token type ids, and the config that makes it the architecture people use
ARCHS = {
    "modernbert": ("modernbert", "bert", False,
                   {"layer_types": ["full_attention", "sliding_attention", "sliding_attention"], "local_attention": 4}),
    "deberta-v3": ("deberta-v2", "bert", True,
                   {"relative_attention": True, "position_biased_input": False, "pos_att_type": ["p2c", "c2p"],
                    "max_relative_positions": -1, "position_buckets": 8, "type_vocab_size": 0}),
    "xlm-roberta": ("xlm-roberta", "roberta", False, {"max_position_embeddings": 66, "type_vocab_size": 1}),
    "eurobert": ("eurobert", "bert", False, {"num_key_value_heads": 1}),
    "gte": ("gte", "bert", True, {}),
}


def arch_tokenizer(arch):
    kind, types = ARCHS[arch][1], ARCHS[arch][2]
    if kind == "roberta" or types:
        return make_tokenizer(kind)
    # as the real ones: no token type ids (a model without them would be traced with them by export.py)
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS)}
    return BertTokenizer(vocab=vocab, model_input_names=["input_ids", "attention_mask"])


def arch_config(arch, dropout=0.1, layers=3, **overrides):
    model_type, _, _, extra = ARCHS[arch]
    tokenizer = arch_tokenizer(arch)
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.cls_token_id, "eos_token_id": tokenizer.sep_token_id,
           "cls_token_id": tokenizer.cls_token_id, "sep_token_id": tokenizer.sep_token_id}
    values = {"vocab_size": len(tokenizer), "hidden_size": 32, "num_hidden_layers": layers, "num_attention_heads": 2,
              "intermediate_size": 64, "max_position_embeddings": 64, **ids, **{k: dropout for k in DROPOUT_KEYS},
              **extra, **overrides}
    if "layer_types" in values:
        values["layer_types"] = values["layer_types"][:layers]
    return AutoConfig.for_model(model_type, **values)


def save_arch(path, arch, dropout=0.1, seed=0, **overrides):
    """A bare encoder of arch with random weights and its tokenizer, saved like a pretrained one."""
    torch.manual_seed(seed)
    AutoModel.from_config(arch_config(arch, dropout, **overrides)).save_pretrained(path)
    arch_tokenizer(arch).save_pretrained(path)
    return str(path)


def error_line(err):
    """The run's one error line (the only line on stderr that says error:)."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


def plain_predictions(checkpoint, texts):
    """Class probabilities of texts by the checkpoint in plain transformers: its config.json (the
    logits divided by its calibration_temperature, as the model card says), its tokenizer truncating
    where training did (model_max_length), padded batches."""
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    with torch.no_grad():
        logits = model(**tokenizer(texts, padding=True, truncation=True, return_tensors="pt")).logits
    return torch.softmax(logits / getattr(model.config, "calibration_temperature", 1.0), dim=1).numpy()


def read_predictions(path):
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return rows, np.array([[float(row[f"prob_{name}"]) for name in LABELS] for row in rows])


def predicted_by(job, name, model_path, rows, **more):
    """trainer.py's prediction of the rows' texts through model_path, in a run of its own: (its stdout,
    the prediction CSV's rows, their class probabilities)."""
    new = write_csv(job["root"] / f"{name}-new.csv", [{"text": row["text"]} for row in rows])
    output = job["root"] / f"{name}-predictions.csv"
    out, _ = run_main(trainer.main, job["args"](name, **{
        "data.train_filepath": "null", "data.predict_filepath": new, "data.predict_output": output,
        "model.model_path": model_path, **more}))
    return (out, *read_predictions(output))


@pytest.fixture(scope="module", params=list(ARCHS))
def job(request, tmp_path_factory):
    """One training run of each architecture (dropout on), saving every 2 of its 4 steps."""
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    model = save_arch(root / "encoder", arch)
    train = write_csv(root / "train.csv", sentiment_rows(64, seed=1))
    val = write_csv(root / "val.csv", sentiment_rows(32, seed=2))

    def args(name, **more):
        return base_args(root / name, model, train, val, **{"trainer.epochs": 1, "ckpt.save_steps": 2,
                                                           "ckpt.keep_last": "null", **more})
    out, err = run_main(trainer.main, args("run"))
    return {"arch": arch, "root": root, "model": model, "train": train, "val": val, "args": args,
            "ckpt": root / "run" / "ckpt", "out": out, "err": err}


# ---------------------------------------------------------------------------------------------
# fine-tuning against a plain loop


def plain_loop(model_dir, train, recipe):
    """The job as the plainest loop of torch and transformers: one batch per update, its mean loss,
    AdamW with weight decay on weight matrices, linear warmup from 1/warmup then linear decay."""
    batch_size, max_lr, max_seq_len, seed = recipe["batch_size"], recipe["max_lr"], recipe["max_seq_len"], recipe["seed"]
    with open(train, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    texts, labels = [row["text"] for row in rows], torch.tensor([LABELS.index(row["label"]) for row in rows])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lengths = np.array([len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_seq_len)["input_ids"]])
    torch.manual_seed(seed)  # draws the new classification head
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": recipe["weight_decay"]},
                                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=max_lr)
    batches = batch_order(lengths, batch_size, seed, 0)
    warmup = round(recipe["warmup_prop"] * len(batches))
    model.train()
    for update, indices in enumerate(batches):
        inputs = tokenizer([texts[i] for i in indices], padding=True, truncation=True, max_length=max_seq_len,
                           return_tensors="pt")
        model(**inputs, labels=labels[indices]).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe["max_grad_norm"])
        multiplier = (update + 1) / warmup if update < warmup else (len(batches) - update) / (len(batches) - warmup)
        for group in optimizer.param_groups:
            group["lr"] = max_lr * multiplier
        optimizer.step()
        optimizer.zero_grad()
    return model.state_dict()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_fine_tuning_matches_a_plain_loop(tmp_path, arch):
    # without dropout a step is deterministic; 13 rows in batches of 4 are 3 steps of 4 and a short one of 1
    model = save_arch(tmp_path / "encoder", arch, dropout=0.0)
    train = write_csv(tmp_path / "train.csv", sentiment_rows(13, seed=5))
    recipe = {"batch_size": 4, "max_lr": 3e-3, "warmup_prop": 0.5, "weight_decay": 0.01, "max_grad_norm": 0.3,
              "seed": 42, "max_seq_len": 16}
    reference = plain_loop(model, train, recipe)
    run_main(trainer.main, base_args(tmp_path, model, train, "null", **{
        "trainer.epochs": 1, "trainer.train_batch_size": 4, "trainer.gpu_batch_size_limit": 4, "module.max_lr": 3e-3,
        "module.warmup_prop": 0.5, "module.weight_decay": 0.01, "trainer.max_grad_norm": 0.3, "trainer.seed": 42}))
    # GTE's files name its weights otherwise than its modules do: compare the models as loaded
    trained = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ckpt" / "last").state_dict()
    initial = AutoModelForSequenceClassification.from_pretrained(model, num_labels=2).state_dict()
    moved = max((reference[k] - initial[k]).abs().max().item() for k in reference if not k.startswith("classifier"))
    assert moved > 1e-3  # the loop moved the encoder by far more than the tolerance below
    assert trained.keys() == reference.keys()
    for key, tensor in trained.items():  # fused AdamW and a summed loss round floats apart by about 1e-6
        assert torch.allclose(tensor, reference[key], rtol=0, atol=1e-5), key


# ---------------------------------------------------------------------------------------------
# evaluation, prediction, resume: one run per architecture


def test_evaluation_and_prediction_are_plain_transformers(job):
    rows = sentiment_rows(24, seed=9)
    best = job["ckpt"] / "best"
    out, predicted, probs = predicted_by(job, "eval", best, rows)
    assert [row["text"] for row in predicted] == [row["text"] for row in rows]
    np.testing.assert_allclose(probs, plain_predictions(best, [row["text"] for row in rows]), atol=1e-5)
    # the evaluation's accuracy is the one plain transformers' predictions give on the validation file
    with open(job["val"], newline="", encoding="utf-8") as f:
        val = list(csv.DictReader(f))
    plain = plain_predictions(best, [row["text"] for row in val]).argmax(axis=1)
    accuracy = np.mean([LABELS[p] == row["label"] for p, row in zip(plain, val)])
    assert json.loads(out.strip().splitlines()[-1])["acc"] == pytest.approx(accuracy)


def test_resume_from_a_mid_run_checkpoint_ends_bitwise_as_the_uninterrupted_run(job):
    # dropout is on: the checkpoint's RNG state decides the masks of the steps after it
    final = load_file(job["ckpt"] / "last" / "model.safetensors")
    middle = job["ckpt"] / "checkpoint-epoch1-step2"
    assert middle.is_dir() and (job["ckpt"] / "last").resolve().name == "checkpoint-epoch1-step4"
    # in the same folder, replacing the later checkpoints it will write again
    out, _ = run_main(trainer.main, job["args"]("run", **{"ckpt.resume": middle, "ckpt.overwrite": "true"}))
    assert "resumed from" in out and "at step 2" in out
    resumed = load_file(job["ckpt"] / "last" / "model.safetensors")
    assert final.keys() == resumed.keys()
    assert all(torch.equal(final[k], resumed[k]) for k in final)


# ---------------------------------------------------------------------------------------------
# the depth cut


@pytest.mark.parametrize("arch", list(ARCHS))
def test_depth_cut_copies_the_kept_layers_and_builds_what_plain_transformers_loads(tmp_path, arch):
    teacher = build_model({"hf_model": save_arch(tmp_path / "t", arch), "model_path": None, "model_file": None}, LABELS)
    notes = []
    student = distill.depth_cut(teacher, [1, 2], None, {}, say=notes.append)
    key, layers = distill.find_layer_list(teacher, None)
    assert student.config.num_hidden_layers == 2 and type(student) is type(teacher)
    for new, old in enumerate([1, 2]):
        mine, theirs = student.get_submodule(key)[new].state_dict(), layers[old].state_dict()
        for name, tensor in mine.items():
            assert torch.equal(tensor, theirs[name]), f"layer {new} {name}"
    if arch == "modernbert":  # the first layer has no attention norm: teacher layer 1's is dropped, said once
        assert student.config.layer_types == ["sliding_attention", "sliding_attention"]
        assert len(notes) == 1 and "model.layers.1.attn_norm.weight" in notes[0]
    else:
        assert notes == []
    # saved and loaded in plain transformers: every weight in its place, the same logits
    student.save_pretrained(tmp_path / "s")
    loaded, info = AutoModelForSequenceClassification.from_pretrained(tmp_path / "s", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    inputs = {"input_ids": torch.tensor([[2, 7, 8, 9, 3], [2, 10, 3, 0, 0]]),
              "attention_mask": torch.tensor([[1] * 5, [1, 1, 1, 0, 0]])}
    if arch == "xlm-roberta":
        inputs["input_ids"] = torch.tensor([[0, 7, 8, 9, 2], [0, 10, 2, 1, 1]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**inputs).logits, student.eval()(**inputs).logits)


def test_modernbert_cut_to_one_layer_keeps_that_layers_attention_type_and_saves(tmp_path):
    # the failure of issue 35: num_hidden_layers (1) must be equal to the number of layer_types, at the first save
    teacher = build_model({"hf_model": save_arch(tmp_path / "t", "modernbert"), "model_path": None, "model_file": None}, LABELS)
    for keep, types in (([0], ["full_attention"]), ([2], ["sliding_attention"])):
        student = distill.depth_cut(teacher, keep, None, {}, say=lambda message: None)
        assert student.config.layer_types == types
        assert student.model.layers[0].attention_type == types[0]
        student.save_pretrained(tmp_path / str(keep[0]))
        assert AutoConfig.from_pretrained(tmp_path / str(keep[0])).layer_types == types


def test_a_layer_that_needs_a_weight_the_teacher_layer_lacks_is_refused(tmp_path):
    teacher = build_model({"hf_model": save_arch(tmp_path / "t", "modernbert"), "model_path": None, "model_file": None}, LABELS)
    teacher.model.layers[2].attn_norm = torch.nn.Identity()  # as if layer 2 were built as a first layer
    with pytest.raises(ModelError, match=r"layer 1 of the student needs .*attn_norm.weight, which teacher layer 2 lacks"):
        distill.depth_cut(teacher, [0, 2], None, {})


def test_a_cut_student_trains_saves_and_predicts_as_plain_transformers(job):
    best = job["ckpt"] / "best"
    out, _ = run_main(distill.main, job["args"]("cut", **{"model.model_path": best, "distill.student_layers": "[1,2]"}))
    assert "student 2 x 32" in out
    student = job["root"] / "cut" / "ckpt" / "best"
    config = AutoConfig.from_pretrained(student)
    assert config.num_hidden_layers == 2
    if job["arch"] == "modernbert":
        assert config.layer_types == ["sliding_attention", "sliding_attention"]
    _, info = AutoModelForSequenceClassification.from_pretrained(student, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    rows = sentiment_rows(20, seed=12)
    _, _, probs = predicted_by(job, "cut-eval", student, rows, **{"data.val_filepath": "null"})
    np.testing.assert_allclose(probs, plain_predictions(student, [row["text"] for row in rows]), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# speedups: exact where they apply, off where they do not


@pytest.mark.parametrize("arch", list(ARCHS))
def test_speedups_leave_logits_and_gradients_exactly_as_they_were(arch):
    torch.manual_seed(0)
    plain = AutoModelForSequenceClassification.from_config(arch_config(arch, dropout=0.0, num_labels=2))
    fast = speedups.apply(copy.deepcopy(plain), "cpu")
    assert all(type(a) is type(b) or isinstance(b, speedups.CPUDropout) for a, b in zip(plain.modules(), fast.modules()))
    inputs = {"input_ids": torch.tensor([[2, 7, 8, 9, 10, 11, 12, 13, 3], [2, 14, 3, 0, 0, 0, 0, 0, 0]]),
              "attention_mask": torch.tensor([[1] * 9, [1, 1, 1] + [0] * 6]), "labels": torch.tensor([0, 1])}
    if arch == "xlm-roberta":
        inputs["input_ids"] = torch.tensor([[0, 7, 8, 9, 10, 11, 12, 13, 2], [0, 14, 2] + [1] * 6])
    outputs = [model.train()(**inputs) for model in (plain, fast)]
    assert torch.equal(outputs[0].logits, outputs[1].logits)
    for out in outputs:
        out.loss.backward()
    for (name, a), b in zip(plain.named_parameters(), fast.parameters()):
        assert (a.grad is None and b.grad is None) or torch.equal(a.grad, b.grad), name


# ---------------------------------------------------------------------------------------------
# export


@pytest.mark.slow  # torch.export traces each architecture for seconds
def test_export_passes_the_onnx_gate_and_predicts_as_pytorch(job):
    best = (job["ckpt"] / "best").resolve()
    folder = job["root"] / "onnx"
    out, _ = run_main(export.main, ["--model.model_path", str(best), "--data.val_filepath", job["val"],
                                    "--data.text_a_col", "text", "--data.label_col", "label", "--export.threads", "1",
                                    "--export.int8", "false", "--export.output_dir", str(folder)])
    report = json.loads((folder / "export_report.json").read_text())
    assert report["onnx_fp32"]["kept"] and report["onnx_fp32"]["identical"] == 1.0
    assert report["onnx_fp32"]["max_prob_diff"] < 1e-4
    rows = sentiment_rows(16, seed=13)
    _, _, probs = predicted_by(job, "onnx-eval", folder, rows, **{"data.val_filepath": "null"})
    np.testing.assert_allclose(probs, plain_predictions(best, [row["text"] for row in rows]), atol=1e-4)


# ---------------------------------------------------------------------------------------------
# model.attn_implementation


def small_job(tmp_path, model, **more):
    train = write_csv(tmp_path / "train.csv", sentiment_rows(16, seed=1))
    return base_args(tmp_path, model, train, "null", **{"trainer.epochs": 1, **more})


def test_an_attention_the_model_lacks_is_one_line_naming_what_it_supports(tmp_path):
    model = save_arch(tmp_path / "deberta", "deberta-v3")
    _, err = run_main(trainer.main, small_job(tmp_path, model, **{"model.attn_implementation": "sdpa"}), expect=2)
    assert error_line(err) == ("error: model.attn_implementation is sdpa, but DebertaV2ForSequenceClassification supports "
                               "eager; choose one of those, or null for transformers' choice")
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "runs").exists()  # nothing written


def test_deberta_says_it_runs_eager_attention_when_left_to_transformers(tmp_path):
    model = save_arch(tmp_path / "deberta", "deberta-v3")
    out, _ = run_main(trainer.main, small_job(tmp_path, model))
    assert "note: DebertaV2ForSequenceClassification has no sdpa attention in transformers; it runs eager" in out


@pytest.mark.parametrize("arch", ["modernbert", "gte"])
def test_eager_and_sdpa_give_the_same_logits_and_the_choice_reaches_the_model(tmp_path, arch):
    path = save_arch(tmp_path / arch, arch)
    models = {}
    for attention in ("eager", "sdpa"):
        torch.manual_seed(0)
        models[attention] = build_model({"hf_model": path, "model_path": None, "model_file": None,
                                         "attn_implementation": attention}, LABELS).eval()
        assert models[attention].config._attn_implementation == attention
    models["sdpa"].load_state_dict(models["eager"].state_dict())
    inputs = {"input_ids": torch.tensor([[2, 7, 8, 9, 10, 11, 3], [2, 12, 3, 0, 0, 0, 0]]),
              "attention_mask": torch.tensor([[1] * 7, [1, 1, 1, 0, 0, 0, 0]])}
    with torch.no_grad():
        torch.testing.assert_close(models["eager"](**inputs).logits, models["sdpa"](**inputs).logits)


@pytest.mark.skipif(transformers.utils.is_flash_attn_2_available(), reason="flash-attn is installed here")
def test_flash_attention_without_its_package_is_one_line(tmp_path, tiny_bert):
    _, err = run_main(trainer.main, small_job(tmp_path, tiny_bert, **{"model.attn_implementation": "flash_attention_2"}),
                      expect=2)
    assert error_line(err).startswith("error: model.attn_implementation flash_attention_2: ")
    assert "choose sdpa or eager" in error_line(err)


def test_flex_attention_does_not_train_on_a_cpu_and_a_bad_value_lists_the_choices(tmp_path, tiny_bert):
    _, err = run_main(trainer.main, small_job(tmp_path, tiny_bert, **{"model.attn_implementation": "flex_attention"}),
                      expect=2)
    assert "torch's FlexAttention has no backward pass on a CPU" in error_line(err)
    with pytest.raises(ConfigError, match="model.attn_implementation is 'fast'; choose one of null, eager, sdpa"):
        load_config(["--model.attn_implementation", "fast"])
    with pytest.raises(ConfigError, match="model.trust_remote_code is 'yes'; expected bool"):
        load_config(["--model.trust_remote_code", "yes"])


# ---------------------------------------------------------------------------------------------
# model.trust_remote_code: a folder with Python code of its own

CONFIG_CODE = '''
import os
from transformers import BertConfig
if os.environ.get("TINY_CODE_MARKER"):  # proves whether this code ran
    open(os.environ["TINY_CODE_MARKER"], "a").write("ran\\n")
class TinyCodeConfig(BertConfig):
    model_type = "tiny-code"
'''
MODEL_CODE = '''
from transformers import BertForSequenceClassification, BertModel
from .configuration_tiny_code import TinyCodeConfig
class TinyCodeModel(BertModel):
    config_class = TinyCodeConfig
class TinyCodeForSequenceClassification(BertForSequenceClassification):
    config_class = TinyCodeConfig
'''


def save_remote_code_model(path, model_type="tiny-code"):
    """A tiny BERT whose config.json names classes in .py files of its own folder (auto_map)."""
    save_tiny_encoder(path)
    (path / "configuration_tiny_code.py").write_text(CONFIG_CODE)
    (path / "modeling_tiny_code.py").write_text(MODEL_CODE)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type=model_type, auto_map={
        "AutoConfig": "configuration_tiny_code.TinyCodeConfig", "AutoModel": "modeling_tiny_code.TinyCodeModel",
        "AutoModelForSequenceClassification": "modeling_tiny_code.TinyCodeForSequenceClassification"})
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


@pytest.fixture
def code_marker(tmp_path, monkeypatch):
    """The file the folder's code writes when it runs; transformers copies such code to a modules
    folder, here one of the test's."""
    monkeypatch.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    marker = tmp_path / "code-ran"
    monkeypatch.setenv("TINY_CODE_MARKER", str(marker))
    return marker


def test_a_folder_with_its_own_code_is_refused_without_the_key_and_no_code_runs(tmp_path, code_marker):
    model = save_remote_code_model(tmp_path / "refused")
    _, err = run_main(trainer.main, small_job(tmp_path, model), expect=2)
    assert error_line(err) == (
        f"error: model.hf_model {model!r} ships Python code of its own (configuration_tiny_code.TinyCodeConfig, "
        f"modeling_tiny_code.TinyCodeForSequenceClassification, modeling_tiny_code.TinyCodeModel, auto_map in its "
        f"config.json) that would run when it loads; read it, and pass --model.trust_remote_code true to run it")
    assert not code_marker.exists() and not (tmp_path / "ckpt").exists()


def test_with_the_key_it_trains_and_its_checkpoint_runs_code_only_when_the_key_is_given_again(tmp_path, code_marker):
    model = save_remote_code_model(tmp_path / "trusted")
    val = write_csv(tmp_path / "val.csv", sentiment_rows(8, seed=2))
    train = small_job(tmp_path, model, **{"ckpt.save_steps": 1})
    run_main(trainer.main, train + ["--model.trust_remote_code", "true"])
    assert code_marker.exists()
    last = tmp_path / "ckpt" / "last"
    # the checkpoint needs the code: config.json names it, the files are beside it, checkpoint.json says the key
    assert json.loads((last / "config.json").read_text())["auto_map"]
    assert (last / "modeling_tiny_code.py").is_file()
    assert json.loads((last / "checkpoint.json").read_text())["config"]["model"]["trust_remote_code"] is True
    code_marker.unlink()
    evaluate = base_args(tmp_path / "eval", model, "null", val, **{"model.model_path": last})
    export_it = ["--model.model_path", str(last), "--data.val_filepath", val, "--data.text_a_col", "text",
                 "--data.label_col", "label", "--export.output_dir", str(tmp_path / "onnx")]
    distil = base_args(tmp_path / "cut", model, train[train.index("--data.train_filepath") + 1], val,
                       **{"model.model_path": last, "distill.student_layers": "[0]"})
    # resume, evaluation, export and distillation of that checkpoint: without the key, one line and no code
    for main, command in ((trainer.main, train + ["--ckpt.resume", "auto"]), (trainer.main, evaluate),
                          (export.main, export_it), (distill.main, distil)):
        _, err = run_main(main, command, expect=2)
        assert "pass --model.trust_remote_code true to run it" in error_line(err), main.__module__
    assert not code_marker.exists() and not (tmp_path / "onnx").exists() and not (tmp_path / "cut").exists()
    out, _ = run_main(trainer.main, evaluate + ["--model.trust_remote_code", "true"])
    assert '"acc"' in out.strip().splitlines()[-1]


def test_a_native_model_type_with_code_of_its_own_loads_transformers_classes_and_runs_none(tmp_path, code_marker):
    model = save_remote_code_model(tmp_path / "native", model_type="bert")
    out, _ = run_main(trainer.main, small_job(tmp_path, model))
    assert "ships code of its own" in out and "which is not run: transformers' own bert classes load it" in out
    assert not code_marker.exists()


@pytest.mark.slow  # starts trainer.py
def test_no_prompt_waits_for_an_answer_even_with_an_open_stdin(tmp_path):
    model = save_remote_code_model(tmp_path / "prompt")
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "TINY_CODE_MARKER": str(tmp_path / "ran"), "PATH": "/usr/bin:/bin"}
    start = time.monotonic()
    with subprocess.Popen([sys.executable, str(ROOT / "trainer.py"), *small_job(tmp_path, model)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as process:
        out, err = process.communicate(timeout=120)  # stdin stays open and unanswered
    assert process.returncode == 2, stderr_tail(err)
    assert "[y/N]" not in out + err and "--model.trust_remote_code true" in err
    assert not (tmp_path / "ran").exists() and time.monotonic() - start < 120


# ---------------------------------------------------------------------------------------------
# a tokenizer without a padding token


def test_a_tokenizer_without_a_pad_token_pads_with_its_sep_token_and_says_so(tmp_path):
    model = save_tiny_encoder(tmp_path / "nopad")
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(model)
    assert AutoTokenizer.from_pretrained(model).pad_token is None
    out, _ = run_main(trainer.main, small_job(tmp_path, model, **{"data.val_filepath": write_csv(
        tmp_path / "val.csv", sentiment_rows(12, seed=2))}))
    assert (f"note: the tokenizer of model.hf_model {model!r} has no padding token; batches are padded with its sep "
            f"token '[SEP]' (id 3), which the attention mask hides") in out
    # the checkpoint pads as trained, in plain transformers too, and predicts as evaluation does
    best = tmp_path / "ckpt" / "best"
    assert AutoTokenizer.from_pretrained(best).pad_token == "[SEP]"
    rows = sentiment_rows(10, seed=3)
    new = write_csv(tmp_path / "new.csv", [{"text": row["text"]} for row in rows])
    run_main(trainer.main, base_args(tmp_path / "p", model, "null", "null", **{
        "model.model_path": best, "data.predict_filepath": new, "data.predict_output": tmp_path / "p.csv"}))
    np.testing.assert_allclose(read_predictions(tmp_path / "p.csv")[1],
                               plain_predictions(best, [row["text"] for row in rows]), atol=1e-5)


@pytest.mark.parametrize("rank, printed", [("0", True), ("1", False), ("abc", True)])
def test_the_padding_note_comes_from_rank_0_alone_and_survives_a_malformed_rank(monkeypatch, capsys, rank, printed):
    """Under torchrun every rank loads the tokenizer; the note is rank 0's. A RANK that is not torchrun's
    (abc) is the launch check's error to report, not a ValueError here."""
    from model import with_pad_token
    tokenizer = make_tokenizer()
    tokenizer.pad_token = None
    for name, value in {"RANK": rank, "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    with_pad_token(tokenizer, "model.hf_model 'x'")
    assert tokenizer.pad_token == "[SEP]"
    assert ("has no padding token" in capsys.readouterr().out) is printed


def test_a_tokenizer_with_nothing_to_pad_with_is_refused_before_tokenizing(tmp_path):
    model = save_tiny_encoder(tmp_path / "nothing")
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[X]"] + WORDS)}, unk_token="[X]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    bare = transformers.PreTrainedTokenizerFast(tokenizer_object=words)
    assert bare.pad_token is None and bare.unk_token is None and bare.sep_token is None and bare.eos_token is None
    bare.save_pretrained(tmp_path / "tok")
    _, err = run_main(trainer.main, small_job(tmp_path, model, **{"model.tokenizer_path": tmp_path / "tok"}), expect=2)
    assert error_line(err).startswith(f"error: model.tokenizer_path '{tmp_path / 'tok'}': its tokenizer has no padding "
                                      f"token, nor an eos, sep or unk token to pad with")
    assert not (tmp_path / "ckpt").exists() and not list(tmp_path.glob("**/.token_cache"))


# ---------------------------------------------------------------------------------------------
# the position limit


def test_position_limits_of_absolute_relative_and_rotary_positions():
    assert position_limit(arch_config("xlm-roberta")) == (64, "max_position_embeddings 66 minus pad_token_id + 1 = 2")
    assert position_limit(AutoConfig.for_model("bert", max_position_embeddings=512)) == (512, "max_position_embeddings 512")
    assert position_limit(arch_config("deberta-v3")) is None  # relative positions only
    assert position_limit(arch_config("deberta-v3", position_biased_input=True))[0] == 64  # DeBERTa (v1 style)
    for arch in ("modernbert", "eurobert", "gte"):
        assert position_limit(arch_config(arch)) is None, arch


def test_max_seq_len_past_xlm_r_positions_is_one_line_before_anything_runs(tmp_path):
    model = save_arch(tmp_path / "xlmr", "xlm-roberta", max_position_embeddings=18)
    _, err = run_main(trainer.main, small_job(tmp_path, model, **{"module.max_seq_len": 17}), expect=2)
    assert error_line(err) == (
        f"error: module.max_seq_len is 17, but model.hf_model {model!r} has positions for 16 tokens "
        f"(max_position_embeddings 18 minus pad_token_id + 1 = 2); pass --module.max_seq_len 16 or less, and for longer "
        f"texts --data.long_texts windows (windows of max_seq_len tokens)")
    assert not (tmp_path / "ckpt").exists()
    run_main(trainer.main, small_job(tmp_path, model, **{"module.max_seq_len": 16}))  # at the limit it trains


def test_a_rotary_model_takes_texts_longer_than_its_max_position_embeddings(tmp_path):
    model = save_arch(tmp_path / "modernbert", "modernbert", max_position_embeddings=8)
    long_rows = [{"text": " ".join([row["text"]] * 3), "label": row["label"]} for row in sentiment_rows(16, seed=1)]
    train = write_csv(tmp_path / "long.csv", long_rows)
    out, _ = run_main(trainer.main, base_args(tmp_path, model, train, train, **{"trainer.epochs": 1, "module.max_seq_len": 32}))
    assert '"acc"' in out.strip().splitlines()[-1]


def test_a_distillation_students_positions_are_checked_too(tmp_path):
    teacher = save_arch(tmp_path / "teacher", "gte")
    student = save_arch(tmp_path / "student", "xlm-roberta", max_position_embeddings=18)
    train = write_csv(tmp_path / "train.csv", sentiment_rows(16, seed=1))
    _, err = run_main(distill.main, base_args(tmp_path, teacher, train, "null", **{
        "distill.student_model": student, "module.max_seq_len": 17, "trainer.epochs": 1}), expect=2)
    assert error_line(err).startswith(f"error: module.max_seq_len is 17, but distill.student_model {student!r} has "
                                      f"positions for 16 tokens")


def test_cut_config_leaves_lists_that_are_not_per_layer(tmp_path):
    # DeBERTa's pos_att_type has two entries, as many as a 2-layer teacher has layers
    config = arch_config("deberta-v3", layers=2)
    cut = distill.cut_config(config, [1], {})
    assert cut.pos_att_type == ["p2c", "c2p"] and cut.num_hidden_layers == 1
    modern = distill.cut_config(arch_config("modernbert"), [0, 2], {})
    assert modern.layer_types == ["full_attention", "sliding_attention"]
    assert copy.deepcopy(modern).to_dict()["layer_types"] == ["full_attention", "sliding_attention"]
