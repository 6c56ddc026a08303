"""speedups.py: the same logits and gradients as the plain model, models that still pickle and
save as plain transformers, and nothing of it in a model or a run with trainer.speedups off."""
import contextlib
import copy
import io
import json
import pickle
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification
from transformers.models.bert.modeling_bert import BertLayer

import speedups
import trainer
from conftest import ROOT, base_args, save_tiny_encoder, sentiment_rows, stderr_tail, tiny_config, write_csv
from model import build_model
from speedups import (
    CPU_DROPOUT_ATTENTION,
    CPUDropout,
    FirstPositionBertLayer,
    FirstPositionRobertaLayer,
    first_position_last_layer,
    sdpa_cpu_dropout_attention,
    use_cpu_dropout,
)

CPU = torch.device("cpu")


# -- dropout on a CPU ------------------------------------------------------------------------------


def test_cpu_dropout_keeps_1_minus_p_scales_survivors_and_backpropagates_its_mask():
    torch.manual_seed(0)
    p, n = 0.1, 200_000
    dropout = CPUDropout(p).train()
    x = torch.full((n,), 2.0, requires_grad=True)
    y = dropout(x)
    kept = y != 0
    # a binomial count: 5 standard deviations of n * p is about 670 examples
    assert abs((~kept).sum().item() - n * p) < 5 * (n * p * (1 - p)) ** 0.5
    assert torch.allclose(y[kept], torch.tensor(2.0 / (1 - p)))
    y.sum().backward()
    assert torch.equal(x.grad, kept.float() / (1 - p))
    assert torch.equal(dropout.eval()(x), x)  # evaluation: the identity
    assert torch.equal(CPUDropout(1.0).train()(x), torch.zeros(n))


def test_cpu_dropout_masks_follow_the_seed():
    x = torch.ones(1000)
    torch.manual_seed(7)
    first = CPUDropout(0.5).train()(x)
    torch.manual_seed(7)
    assert torch.equal(CPUDropout(0.5).train()(x), first)
    assert not torch.equal(CPUDropout(0.5).train()(x), first)


def test_use_cpu_dropout_replaces_every_dropout_and_keeps_the_weights(tmp_path, tiny_bert):
    model = build_model({"hf_model": tiny_bert, "model_path": None, "model_file": None},
                        ["negative", "positive"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rates = sorted(m.p for m in model.modules() if isinstance(m, torch.nn.Dropout))
    use_cpu_dropout(model)
    assert not [m for m in model.modules() if type(m) is torch.nn.Dropout]
    assert sorted(m.p for m in model.modules() if isinstance(m, CPUDropout)) == rates
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def attention_probabilities(q, k, allowed):
    """sdpa's own attention weights: attending over identity-matrix values returns them."""
    eye = torch.eye(k.shape[2]).expand(*k.shape[:2], -1, -1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, eye, attn_mask=allowed)


def test_attention_dropout_is_sdpa_attention_with_a_cpu_dropout_mask_on_its_probabilities():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4) for _ in range(3))  # batch, heads, positions, head size
    allowed = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    allowed[1, ..., 3:] = False  # the second example's last two tokens are padding
    p = 0.3
    torch.manual_seed(1)
    out, _ = sdpa_cpu_dropout_attention(SimpleNamespace(is_causal=False), q, k, v, allowed, dropout=p)
    torch.manual_seed(1)  # the same integers again, as cpu_dropout draws them
    keep = torch.empty(2, 3, 5, 5, dtype=torch.int32).random_() >= round(p * 2 ** 31)
    reference = (attention_probabilities(q, k, allowed) * keep / (1 - p)) @ v
    assert torch.allclose(out, reference.transpose(1, 2), atol=1e-6)
    assert 0 < (~keep).sum() < keep.sum()  # some weights were dropped, most were kept


def test_causal_attention_with_dropout_is_left_to_sdpa_and_stays_causal():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    changed_v = v.clone()
    changed_v[:, :, -1] += 10  # only the last position's value changes
    outputs = []
    for values in (v, changed_v):
        torch.manual_seed(1)
        outputs.append(sdpa_cpu_dropout_attention(SimpleNamespace(is_causal=True), q, k, values, None,
                                                  dropout=0.5)[0])
    assert torch.equal(outputs[0][:, :-1], outputs[1][:, :-1])  # earlier positions never see it
    assert not torch.equal(outputs[0][:, -1], outputs[1][:, -1])


def test_use_cpu_dropout_moves_sdpa_attention_that_still_masks_padding_and_saves_as_sdpa(
        tmp_path, monkeypatch):
    # attention dropout of 1e-12 keeps every weight (its threshold rounds to 0), so in training
    # the model must compute what plain sdpa computes in evaluation: padding masked, same numbers
    path = save_tiny_encoder(tmp_path / "enc", "bert", hidden_dropout_prob=0.0,
                             attention_probs_dropout_prob=1e-12)
    model = build_model({"hf_model": path, "model_path": None, "model_file": None}, ["a", "b"])
    assert model.config._attn_implementation == "sdpa"
    ids = torch.randint(5, 20, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    with torch.no_grad():
        plain_sdpa = model.eval()(input_ids=ids, attention_mask=mask).logits
    use_cpu_dropout(model)
    assert model.config._attn_implementation == CPU_DROPOUT_ATTENTION
    plain_calls = []
    sdpa = speedups.sdpa_attention_forward
    monkeypatch.setattr(speedups, "sdpa_attention_forward",
                        lambda *a, **kw: plain_calls.append(1) or sdpa(*a, **kw))
    trained = model.train()(input_ids=ids, attention_mask=mask).logits
    assert not plain_calls  # training went through the cpu_dropout path
    assert torch.allclose(trained, plain_sdpa, atol=1e-5)
    evaluated = model.eval()(input_ids=ids, attention_mask=mask).logits
    assert plain_calls  # evaluation is plain sdpa
    assert torch.allclose(evaluated, plain_sdpa, atol=1e-5)
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved")
    assert reloaded.config._attn_implementation == "sdpa"  # loads where our function is unknown


# -- the last layer at the first position ---------------------------------------------------------


def padded_batch(vocab_size, seed=0):
    torch.manual_seed(seed)
    ids = torch.randint(5, vocab_size, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize("attention", ["eager", "sdpa", CPU_DROPOUT_ATTENTION])
def test_first_position_last_layer_gives_the_same_logits_and_gradients(kind, attention, monkeypatch):
    # attention dropout of 1e-12 keeps every weight but sends training through the dropout paths
    config = tiny_config(kind, layers=3, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=1e-12)
    torch.manual_seed(0)
    reference = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa").train()
    fast = copy.deepcopy(reference)
    first_position_last_layer(fast)
    for m in (reference, fast):
        m.set_attn_implementation("eager" if attention == "eager" else "sdpa")
    if attention == CPU_DROPOUT_ATTENTION:
        use_cpu_dropout(fast)
        monkeypatch.setattr(speedups, "sdpa_attention_forward", None)  # its cpu_dropout path only
    positions = []
    fast.base_model.encoder.layer[-1].intermediate.register_forward_hook(
        lambda module, args, out: positions.append(args[0].shape[1]))
    inputs = {**padded_batch(config.vocab_size), "labels": torch.tensor([0, 2, 1])}
    out_ref, out_fast = reference(**inputs), fast(**inputs)
    assert positions == [1]  # the feed-forward of the last layer saw the first position only
    assert torch.allclose(out_fast.logits, out_ref.logits, atol=1e-6)
    out_ref.loss.backward()
    out_fast.loss.backward()
    for (name, a), b in zip(reference.named_parameters(), fast.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_first_position_last_layer_computes_every_position_for_hidden_states_or_attentions():
    config = tiny_config("bert", num_labels=2)
    torch.manual_seed(0)
    reference = AutoModelForSequenceClassification.from_config(config, attn_implementation="eager").eval()
    fast = first_position_last_layer(copy.deepcopy(reference))
    inputs = padded_batch(config.vocab_size)
    with torch.no_grad():
        want = reference(**inputs, output_hidden_states=True, output_attentions=True)
        hidden = fast(**inputs, output_hidden_states=True)
        attentions = fast(**inputs, output_attentions=True)
    assert hidden.hidden_states[-1].shape == (3, 7, config.hidden_size)
    assert torch.allclose(hidden.hidden_states[-1], want.hidden_states[-1], atol=1e-6)
    assert torch.allclose(attentions.attentions[-1], want.attentions[-1], atol=1e-6)


@pytest.fixture(params=["bert", "roberta"])
def tiny_encoder(request):
    return request.getfixturevalue(f"tiny_{request.param}")


def plain_classifier(path):
    return build_model({"hf_model": path, "model_path": None, "model_file": None}, ["a", "b"])


def last_layer(model):
    return model.base_model.encoder.layer[-1]


def last_layer_shapes(model, inputs):
    """(what a forward hook on the last encoder layer sees: [(positions, hidden)], the logits) in eval."""
    shapes = []
    handle = last_layer(model).register_forward_hook(lambda m, args, out: shapes.append(out.shape[1:]))
    with torch.no_grad():
        logits = model.eval()(**inputs).logits
    handle.remove()
    return shapes, logits


def round_trips(model):
    """model through pickle and through torch.save / torch.load (a whole model, not weights)."""
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return {"pickle": pickle.loads(pickle.dumps(model)),
            "torch.save": torch.load(buffer, weights_only=False)}


# -- the model with speedups off, and with them on ----------------------------------------------


def test_build_model_gives_a_plain_model_that_pickles_and_whose_last_layer_puts_out_every_position(tiny_encoder):
    model = plain_classifier(tiny_encoder)
    assert not [m for m in model.modules() if type(m).__module__ == "speedups"]
    assert model.config._attn_implementation == "sdpa"
    inputs = padded_batch(model.config.vocab_size)
    shapes, logits = last_layer_shapes(model, inputs)
    assert shapes == [(7, model.config.hidden_size)]  # every position of (batch, 7, hidden)
    for how, copied in round_trips(model).items():
        assert type(last_layer(copied)) is type(last_layer(model)), how
        assert torch.allclose(last_layer_shapes(copied, inputs)[1], logits, atol=1e-6), how


def test_apply_computes_the_last_layer_at_the_first_position_and_saves_a_plain_model(tmp_path, tiny_encoder):
    model = plain_classifier(tiny_encoder)
    names = list(model.state_dict())
    inputs = padded_batch(model.config.vocab_size)
    _, plain_logits = last_layer_shapes(model, inputs)
    assert speedups.apply(model, CPU) is model  # in place
    assert type(last_layer(model)) in (FirstPositionBertLayer, FirstPositionRobertaLayer)
    assert list(model.state_dict()) == names
    shapes, logits = last_layer_shapes(model, inputs)
    assert shapes == [(1, model.config.hidden_size)]
    assert torch.allclose(logits, plain_logits, atol=1e-6)
    copied = copy.deepcopy(model)
    assert type(last_layer(copied)) is type(last_layer(model))
    assert last_layer_shapes(copied, inputs)[0] == shapes
    model.save_pretrained(tmp_path / "saved")
    assert CPU_DROPOUT_ATTENTION not in (tmp_path / "saved" / "config.json").read_text()
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved")
    assert not [m for m in plain.modules() if type(m).__module__ == "speedups"]
    assert plain.config._attn_implementation == "sdpa"
    shapes, reloaded = last_layer_shapes(plain, inputs)
    assert shapes == [(7, model.config.hidden_size)]  # plain transformers: every position
    assert torch.allclose(reloaded, logits, atol=1e-6)


def test_applied_model_pickles_and_torch_saves_with_its_speedups_and_the_same_logits(tiny_encoder):
    model = speedups.apply(plain_classifier(tiny_encoder), CPU)
    inputs = padded_batch(model.config.vocab_size)
    shapes, logits = last_layer_shapes(model, inputs)
    for how, copied in round_trips(model).items():
        assert type(last_layer(copied)) is type(last_layer(model)), how
        assert copied.config._attn_implementation == CPU_DROPOUT_ATTENTION, how
        assert any(isinstance(m, CPUDropout) for m in copied.modules()), how
        copied_shapes, copied_logits = last_layer_shapes(copied, inputs)
        assert copied_shapes == shapes and torch.allclose(copied_logits, logits, atol=1e-6), how
        copied.train()(**inputs).logits.sum().backward()  # training: the cpu_dropout paths


@pytest.mark.slow  # a fresh Python process
def test_nothing_is_registered_at_import_and_a_saved_model_loads_in_a_fresh_process(tmp_path, tiny_bert):
    model = speedups.apply(plain_classifier(tiny_bert), CPU).eval()
    inputs = padded_batch(model.config.vocab_size)
    with torch.no_grad():
        logits = model(**inputs).logits
    torch.save({"model": model, "inputs": inputs, "logits": logits}, tmp_path / "model.pt")
    script = f"""
import torch
from transformers import AttentionInterface
import distill, model, speedups, trainer
assert {CPU_DROPOUT_ATTENTION!r} not in AttentionInterface(), "registered at import"
saved = torch.load({str(tmp_path / "model.pt")!r}, weights_only=False)
with torch.no_grad():
    logits = saved["model"](**saved["inputs"]).logits
assert torch.allclose(logits, saved["logits"], atol=1e-6)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, stderr_tail(done.stderr)


def test_apply_twice_is_apply_once(tiny_bert):
    model = speedups.apply(plain_classifier(tiny_bert), CPU)
    modules = dict(model.named_modules())
    classes = {name: type(m) for name, m in modules.items()}
    inputs = padded_batch(model.config.vocab_size)
    shapes, logits = last_layer_shapes(model, inputs)
    assert speedups.apply(model, CPU) is model
    assert {name: type(m) for name, m in model.named_modules()} == classes
    assert all(m is modules[name] for name, m in model.named_modules())
    assert model.config._attn_implementation == CPU_DROPOUT_ATTENTION
    again_shapes, again = last_layer_shapes(model, inputs)
    assert again_shapes == shapes and torch.equal(again, logits)


def test_apply_on_cuda_leaves_dropout_to_torch(tiny_bert):
    # CUDA's fused dropout kernel is torch's own; only the first-position layer is for every device
    model = speedups.apply(plain_classifier(tiny_bert), torch.device("cuda"))
    assert type(last_layer(model)) is FirstPositionBertLayer
    assert not any(isinstance(m, CPUDropout) for m in model.modules())
    assert model.config._attn_implementation == "sdpa"


def test_decoders_and_other_classifiers_keep_their_layers():
    decoder = BertForSequenceClassification(tiny_config("bert", num_labels=2, is_decoder=True))
    speedups.apply(decoder, CPU)
    assert type(last_layer(decoder)) is type(decoder.bert.encoder.layer[0])

    class MeanPooled(BertForSequenceClassification):  # a subclass may read every position
        pass

    other = speedups.apply(MeanPooled(tiny_config("bert", num_labels=2)), CPU)
    assert type(last_layer(other)) is type(other.bert.encoder.layer[0])


# -- the switch in a real run ----------------------------------------------------------------------


@pytest.mark.parametrize("on", [False, True])
def test_trainer_speedups_switch_decides_every_module_that_runs(tmp_path, tiny_bert, on):
    train = write_csv(tmp_path / "train.csv", sentiment_rows(32, seed=1))
    val = write_csv(tmp_path / "val.csv", sentiment_rows(16, seed=2))
    argv = base_args(tmp_path, tiny_bert, train, val, **{"trainer.epochs": 1, "trainer.speedups": str(on).lower()})
    ran = set()  # every module class that ran a forward, training and validation, with its attention
    positions = set()  # the lengths encoder layers put out

    def record(module, args, out):
        ran.add((type(module), getattr(getattr(module, "config", None), "_attn_implementation", None)))
        if isinstance(module, BertLayer):
            positions.add(out.shape[1])

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert trainer.main(argv) == 0
    finally:
        handle.remove()
    ours = {cls for cls, _ in ran if cls.__module__ == "speedups"}
    attention = {name for _, name in ran if name is not None}
    if on:
        assert ours == {FirstPositionBertLayer, CPUDropout} and attention == {CPU_DROPOUT_ATTENTION}
        assert 1 in positions
    else:
        assert not ours and attention == {"sdpa"}
        assert min(positions) > 1  # [CLS] text [SEP]: every layer put out every position
    saved = json.loads((tmp_path / "ckpt" / "last" / "config.json").read_text())
    assert CPU_DROPOUT_ATTENTION not in json.dumps(saved)
