"""One optimizer step of the Trainer: a non-finite loss never reaches the weights, the schedule
counts only the updates made, and the step never reads a value back to the host (on a GPU such a
read would stall the queue every step).

The model is a bag-of-words classifier in plain torch, so the step's own code is what is tested.
Also here, as they concern the device too: a distillation step, the padding of compiled batches,
and evaluation's one copy of the logits to the host.
"""
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import config
import distill
import evaluation
import processes
import splits
import trainer
from conftest import base_args, make_tokenizer, sentiment_rows, write_csv
from data import micro_batches


class BagOfWords(torch.nn.Module):
    """Summed word vectors -> logits: enough of a classifier for the loop, with no transformers code."""

    def __init__(self, vocab_size, classes=2):
        super().__init__()
        self.words = torch.nn.EmbeddingBag(vocab_size, 8, mode="sum")
        self.out = torch.nn.Linear(8, classes)

    def forward(self, input_ids, attention_mask, **unused):
        return SimpleNamespace(logits=self.out(self.words(input_ids, per_sample_weights=attention_mask.float())))


def make_trainer(tmp_path, **overrides):
    tokenizer = make_tokenizer()
    data = write_csv(tmp_path / "train.csv", sentiment_rows(64))
    cfg = config.load_config(base_args(tmp_path, "unused", data, "null", **{
        "trainer.epochs": 1, "module.warmup_prop": 0.25, **overrides}))
    train = splits.load_split(cfg, tokenizer, data, True)
    cpu = torch.device("cpu")  # with its precision decided as setup_distributed does (fp16 forced here)
    proc = processes.Process(0, 0, 1, cpu, True, False, amp_dtype=processes.decide_amp_dtype(
        config.uses_amp(cfg["trainer"]), cfg["trainer"]["amp_dtype"], cpu, say=lambda message: None))
    torch.manual_seed(0)
    return trainer.Trainer(cfg, proc, BagOfWords(len(tokenizer)), tokenizer, train, None)


def poisoned(loss_fn):
    """A loss function whose loss is infinite: what a too-high learning rate or a bad row gives."""
    def loss_fn_inf(model, batch, indices):
        loss, terms = loss_fn(model, batch, indices)
        return loss * float("inf"), terms
    return loss_fn_inf


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("backend", [{}, {"trainer.backend": "sp-amp", "trainer.amp_dtype": "fp16"}],
                         ids=["float32", "float16 with GradScaler"])
def test_a_non_finite_loss_never_reaches_the_weights_and_does_not_advance_the_schedule(tmp_path, backend):
    run = make_trainer(tmp_path, **backend)
    (indices, size), (indices2, size2) = run.epoch_batches(0)[:2]
    before, real_loss = weights(run.model), run.loss_fn
    run.loss_fn = poisoned(real_loss)
    run.train_step(indices, size)
    assert all(torch.equal(v, run.model.state_dict()[k]) for k, v in before.items())
    assert int(run.updates) == 0 and int(run.skipped) == 1
    assert all(int(s["step"]) == 0 for s in run.optimizer.state.values())  # Adam's own count stays too
    first_lr = float(run.lr)
    run.loss_fn = real_loss
    run.train_step(indices2, size2)
    assert not all(torch.equal(v, run.model.state_dict()[k]) for k, v in before.items())
    assert int(run.updates) == 1 and int(run.skipped) == 1
    # the update that was made used the first learning rate of the schedule, not the second
    assert float(run.lr) == first_lr == pytest.approx(3e-3 * float(trainer.lr_multiplier(0, run.warmup_steps, run.total_steps)))


def test_float32_stops_at_the_next_host_sync_naming_the_skipped_updates(tmp_path):
    run = make_trainer(tmp_path)
    run.loss_fn = poisoned(run.loss_fn)
    run.train_step(*run.epoch_batches(0)[0])
    with pytest.raises(processes.TrainingError, match="1 updates were skipped: the loss or its gradients were not finite"):
        run.raise_if_skipped(int(run.skipped))
    (tmp_path / "fp16").mkdir()
    fp16 = make_trainer(tmp_path / "fp16", **{"trainer.backend": "sp-amp", "trainer.amp_dtype": "fp16"})
    fp16.raise_if_skipped(3)  # GradScaler's skips while it finds its scale are normal


def test_a_training_step_never_reads_a_tensor_back_to_the_host(tmp_path, monkeypatch):
    run = make_trainer(tmp_path, **{"trainer.gpu_batch_size_limit": 4})  # with accumulation
    assert run.grad_accum_steps == 4
    batches = run.epoch_batches(0)

    def host_read(*args):
        raise AssertionError("a device value was read on the host inside train_step")
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    for indices, size in batches[:3]:
        run.train_step(indices, size)
    monkeypatch.undo()
    assert int(run.updates) == 3 and int(run.skipped) == 0


def distillation_trainer(tmp_path, device):
    """A Trainer of a bag-of-words student on distillation's logits + labels losses, the teacher's
    logits looked up by example; a third of the rows unlabelled (transfer data)."""
    run = make_trainer(tmp_path, **{"trainer.gpu_batch_size_limit": 4})
    run.train_split.encoded.labels[::3] = -1
    proc = processes.Process(0, 0, 1, device, True, False)
    vocab, layers = len(run.tokenizer), SimpleNamespace(num_hidden_layers=1, hidden_size=8)
    teacher, student = BagOfWords(vocab).to(device).eval(), BagOfWords(vocab)
    teacher.config, student.config = layers, layers
    cfg = {**run.cfg, "distill": {**run.cfg["distill"], "loss_types": ["logits", "labels"], "loss_weights": [0.5, 0.5]}}
    table = distill.teacher_logits_of(cfg, proc, teacher, run.tokenizer, run.train_split)
    module = distill.DistillModule(student, 8, False, False)
    return trainer.Trainer(cfg, proc, module, run.tokenizer, run.train_split, None,
                           loss_fn=distill.DistillLoss(cfg, teacher, student, teacher_logits=table))


def test_a_distillation_step_never_waits_for_the_device(tmp_path, monkeypatch):
    """The teacher-logit lookup and the labels loss add no host sync: nothing read back, no boolean
    mask (its size is read back), no blocking copy towards the device (a GPU one drains the queue)."""
    run = distillation_trainer(tmp_path, torch.device("cpu"))
    batches = run.epoch_batches(0)
    assert any((run.train_split.encoded.labels[indices] == -1).any() for indices, _ in batches[:3])

    def host_read(*args):
        raise AssertionError("a device value was read on the host inside train_step")
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    getitem, to = torch.Tensor.__getitem__, torch.Tensor.to

    def no_mask(tensor, index):
        assert not (isinstance(index, torch.Tensor) and index.dtype == torch.bool), "a boolean mask inside train_step"
        return getitem(tensor, index)

    def no_blocking_copy(tensor, *args, **kwargs):  # ours: torch's own calls move within the device
        ours = sys._getframe(1).f_code.co_filename.endswith(("trainer.py", "distill.py"))
        assert kwargs.get("non_blocking") or not ours, "a blocking .to() inside train_step"
        return to(tensor, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "__getitem__", no_mask)
    monkeypatch.setattr(torch.Tensor, "to", no_blocking_copy)
    for indices, size in batches[:3]:
        run.train_step(indices, size)
    monkeypatch.undo()
    assert int(run.updates) == 3 and int(run.skipped) == 0
    assert set(run.interval["terms"]) == {"logits", "labels"} and float(run.interval["terms"]["labels"]) > 0


def updates_without_a_sync(run):
    """Three steps on a GPU, the last two with any synchronization an error: the updates made."""
    batches = run.epoch_batches(0)
    run.train_step(*batches[0])  # warm-up: lazy initialisation may synchronize once
    torch.cuda.set_sync_debug_mode("error")
    try:
        for indices, size in batches[1:3]:
            run.train_step(indices, size)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return int(run.updates)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_distillation_step_on_a_gpu_does_not_synchronize(tmp_path):
    run = distillation_trainer(tmp_path, torch.device("cuda", 0))
    assert updates_without_a_sync(run) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_training_step_on_a_gpu_does_not_synchronize(tmp_path):
    run = make_trainer(tmp_path)
    run.proc = processes.Process(0, 0, 1, torch.device("cuda", 0), True, False)
    run = trainer.Trainer(run.cfg, run.proc, run.model, run.tokenizer, run.train_split, None)
    assert updates_without_a_sync(run) == 3


def zero_loss(seen):
    """A loss function that records each micro-batch's width and never runs the model."""
    def loss_fn(model, batch, indices):
        seen.append(batch["input_ids"].shape[1])
        return sum(p.sum() for p in model.parameters()) * 0.0, {}
    return loss_fn


@pytest.mark.parametrize("compiled", [False, True])
def test_a_compiled_model_gets_batches_padded_to_multiples_of_8(tmp_path, compiled):
    seen = []  # free lengths would make torch.compile(dynamic=True) recompile as new shapes arrive
    run = make_trainer(tmp_path, **{"trainer.compile": str(compiled).lower()})
    run.loss_fn = zero_loss(seen)
    expected, lengths = [], run.train_split.encoded.lengths
    for indices, size in run.epoch_batches(0):
        run.train_step(indices, size)
        for micro in micro_batches(indices, run.grad_accum_steps):  # dynamic padding: the longest row
            longest = int(lengths[micro].max())
            expected.append(-(-longest // 8) * 8 if compiled else longest)
    assert seen == expected and len(set(seen)) > 1


def test_evaluation_copies_the_logits_to_the_host_once_per_split(tmp_path, monkeypatch):
    run = make_trainer(tmp_path)
    copies, cpu = [], torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda tensor, *args: copies.append(tuple(tensor.shape)) or cpu(tensor, *args))
    logits = evaluation.predict_logits(run.model, run.train_split.encoded, 8, 0, run.proc)
    assert copies == [(64, 2)] and logits.shape == (64, 2)  # 8 batches, one copy at the end


def test_predictions_are_gathered_on_the_main_process_only(tmp_path, monkeypatch):
    run, gathers = make_trainer(tmp_path), []

    def gather_object(shards, gathered, dst, group):  # rank 1's call: it receives nothing
        gathers.append((dst, gathered, group, len(np.concatenate([s[0] for s in shards]))))
    monkeypatch.setattr(torch.distributed, "gather_object", gather_object)
    rank1 = processes.Process(1, 1, 2, torch.device("cpu"), False, True, cpu_group="gloo group")
    assert evaluation.predict_logits(run.model, run.train_split.encoded, 8, 0, rank1) is None
    assert gathers == [(0, None, "gloo group", 32)]  # its half of 64 examples, to rank 0 over gloo
