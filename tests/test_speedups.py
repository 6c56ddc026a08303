"""The speed tricks of speedups.py: the same logits and gradients as the plain model, less work."""
import copy
from types import SimpleNamespace

import pytest
import torch
from conftest import save_tiny_encoder, tiny_config
from transformers import AutoModelForSequenceClassification

import model as model_module
from model import (CPU_DROPOUT_ATTENTION, CPUDropout, build_model, cls_only_last_layer,
                   sdpa_cpu_dropout_attention, use_cpu_dropout)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread; two threads on a busy 2-core machine spin-wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    sdpa = model_module.sdpa_attention_forward
    monkeypatch.setattr(model_module, "sdpa_attention_forward",
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


def padded_batch(vocab_size, seed=0):
    torch.manual_seed(seed)
    ids = torch.randint(5, vocab_size, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize("attention", ["eager", "sdpa", CPU_DROPOUT_ATTENTION])
def test_cls_only_last_layer_gives_the_same_logits_and_gradients_from_one_position(kind, attention, monkeypatch):
    # attention dropout of 1e-12 keeps every weight but sends training through the dropout paths
    config = tiny_config(kind, layers=3, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=1e-12)
    torch.manual_seed(0)
    reference = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa").train()
    fast = copy.deepcopy(reference)
    cls_only_last_layer(fast)
    for m in (reference, fast):
        m.set_attn_implementation("eager" if attention == "eager" else "sdpa")
    if attention == CPU_DROPOUT_ATTENTION:
        use_cpu_dropout(fast)
        monkeypatch.setattr(model_module, "sdpa_attention_forward", None)  # its cpu_dropout path only
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


def test_cls_only_last_layer_computes_every_position_when_hidden_states_or_attentions_are_asked_for():
    config = tiny_config("bert", num_labels=2)
    torch.manual_seed(0)
    reference = AutoModelForSequenceClassification.from_config(config, attn_implementation="eager").eval()
    fast = cls_only_last_layer(copy.deepcopy(reference))
    inputs = padded_batch(config.vocab_size)
    with torch.no_grad():
        want = reference(**inputs, output_hidden_states=True, output_attentions=True)
        hidden = fast(**inputs, output_hidden_states=True)
        attentions = fast(**inputs, output_attentions=True)
    assert hidden.hidden_states[-1].shape == (3, 7, config.hidden_size)
    assert torch.allclose(hidden.hidden_states[-1], want.hidden_states[-1], atol=1e-6)
    assert torch.allclose(attentions.attentions[-1], want.attentions[-1], atol=1e-6)


def test_build_model_computes_the_last_layer_at_the_first_position_and_saves_a_plain_model(tmp_path, tiny_bert):
    model = build_model({"hf_model": tiny_bert, "model_path": None, "model_file": None}, ["a", "b"]).eval()
    positions = []
    model.bert.encoder.layer[-1].output.register_forward_hook(lambda m, args, out: positions.append(out.shape[1]))
    inputs = padded_batch(model.config.vocab_size)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert positions == [1]
    copied = copy.deepcopy(model)  # its last layer's forward is bound to the copy's own layer
    assert copied.bert.encoder.layer[-1].forward.__self__ is copied.bert.encoder.layer[-1]
    model.save_pretrained(tmp_path / "saved")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved").eval()
    assert "forward" not in vars(plain.bert.encoder.layer[-1])  # plain transformers: every position
    with torch.no_grad():
        assert torch.allclose(plain(**inputs).logits, logits, atol=1e-6)
