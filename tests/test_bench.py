"""The benchmark's own arithmetic and its trainer.py run, on a tiny model (bench/bench.py)."""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoTokenizer, BertForSequenceClassification
from transformers.models.bert.modeling_bert import BertLayer

import config
import evaluation
from conftest import ROOT, save_tiny_encoder, sentiment_rows, tiny_config, write_csv
from speedups import first_position_last_layer

sys.path.insert(0, str(ROOT / "bench"))
import bench  # noqa: E402


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("cls_only", [False, True])
def test_encoder_flops_match_torch_flop_counter_on_unpadded_sequences(training, cls_only):
    config = tiny_config("bert", num_labels=3)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    if cls_only:
        first_position_last_layer(model)
    counted = 0
    for length in (3, 11):  # one sequence at a time: no padding, as the benchmark counts
        ids = torch.randint(5, config.vocab_size, (1, length))
        with FlopCounterMode(display=False) as counter:
            logits = model(input_ids=ids).logits
            if training:
                logits.sum().backward()
        counted += counter.get_total_flops()
    assert bench.encoder_flops(config, [3, 11], training=training, cls_only_last_layer=cls_only) == counted


def bench_rows():
    return [{"sentiment": r["label"], "text": r["text"]} for r in sentiment_rows(48, labels=bench.LABELS)]


def bench_job(tmp_path):
    """A CPU job of bench.py on a tiny model: 32 training and 16 evaluation rows of bench_rows()."""
    rows = bench_rows()
    return {"train_file": write_csv(tmp_path / "train.csv", rows[:32]),
            "eval_file": write_csv(tmp_path / "val.csv", rows[32:]), "model": save_tiny_encoder(tmp_path / "tiny"),
            "epochs": 1, "batch_size": 8, "eval_batch_size": 8, "lr": 1e-3, "warmup": 0.1,
            "weight_decay": 0.01, "max_seq_len": 16, "seed": 0, "compile": False, "bf16": False,
            "random_roberta": False, "device": "cpu", "log_dir": str(tmp_path / "runs")}


def acc_and_macro_f1(predicted, truth):
    """Accuracy and macro F1 of class ids, written out: what a worker must report for them."""
    f1 = [2 * np.sum((predicted == c) & (truth == c)) / max(1, np.sum(predicted == c) + np.sum(truth == c))
          for c in range(len(bench.LABELS))]
    return np.mean(predicted == truth), np.mean(f1)


def no_psutil(monkeypatch):
    """The time to step 1 reads the process start from psutil, which requirements.txt leaves out:
    a stand-in clock, so that the worker tests run in CI too."""
    monkeypatch.setattr(bench, "since_process_start", lambda: 1.0)


@pytest.fixture
def keep_threads():
    """The workers set the thread count as a fresh process would; the rest of the session keeps its own."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_ours_worker_trains_and_reports_on_a_tiny_model(tmp_path, monkeypatch, keep_threads):
    no_psutil(monkeypatch)
    job, rows = bench_job(tmp_path), bench_rows()
    evaluated, predict_logits = [], evaluation.predict_logits

    def seen_predict_logits(model, *args):  # the worker's evaluation, seen on its way through
        logits = predict_logits(model, *args)
        evaluated.append((model, logits))
        return logits
    monkeypatch.setattr(evaluation, "predict_logits", seen_predict_logits)
    result = bench.run_ours(job)
    assert result["train_s"] > 0 and result["eval_s"] > 0 and result["first_step_s"] > 0
    # the 4 updates moved the encoder, and the metrics are those of its predictions on val.csv
    ((model, logits),) = evaluated
    initial = load_file(tmp_path / "tiny" / "model.safetensors")["embeddings.word_embeddings.weight"]
    assert not torch.equal(model.bert.embeddings.word_embeddings.weight.detach(), initial)
    texts = [row["text"] for row in rows[32:]]
    with torch.no_grad():  # every row's logits, in the file's order
        inputs = AutoTokenizer.from_pretrained(job["model"])(texts, padding=True, truncation=True,
                                                             max_length=16, return_tensors="pt")
        np.testing.assert_allclose(logits, model.eval()(**inputs).logits.numpy(), atol=1e-5)
    predicted = logits.argmax(axis=1)
    truth = np.array([bench.LABELS.index(row["sentiment"]) for row in rows[32:]])
    acc, f1_macro = acc_and_macro_f1(predicted, truth)
    assert result["acc"] == acc and result["f1_macro"] == pytest.approx(f1_macro)
    assert len(result["train_lengths"]) == 32 and len(result["eval_lengths"]) == 16
    assert max(result["train_lengths"]) <= 16
    json.dumps(result)  # the worker hands its result to the driver as JSON


def test_step_profile_switches_one_speedup_off_and_back_on(tiny_bert):
    import step_profile

    import speedups
    from model import build_model
    model = build_model({"hf_model": tiny_bert, "model_path": None, "model_file": None}, bench.LABELS)
    run = SimpleNamespace(model=speedups.apply(model, torch.device("cpu")))  # what a Trainer holds
    layer = model.bert.encoder.layer[-1]
    step_profile.use_cls_only(run, False)
    assert type(layer) is BertLayer
    step_profile.use_cls_only(run, True)
    assert type(layer) is speedups.FirstPositionBertLayer
    step_profile.use_dropout(run, False)
    assert not any(isinstance(m, speedups.CPUDropout) for m in model.modules())
    assert model.config._attn_implementation == "sdpa"
    step_profile.use_dropout(run, True)
    assert not [m for m in model.modules() if type(m) is torch.nn.Dropout]
    assert model.config._attn_implementation == speedups.CPU_DROPOUT_ATTENTION


def test_matmul_rate_is_the_flop_rate_of_the_median_repeat_after_an_uncounted_warm_up(monkeypatch):
    # a device of exactly 1e9 FLOP/s, whose warm-up (allocations, BLAS threads) and one repeat are slow
    seen, slowdowns = [], iter([100.0, 1.0, 4.0, 1.0])

    def seconds_per_matmul(a, b, count):
        seen.append((a.device.type, a.dtype, b.dtype, tuple(a.shape), count))
        (n, k), m = a.shape, b.shape[1]
        return next(slowdowns) * count * 2 * n * k * m / 1e9  # a multiply and an add per term
    monkeypatch.setattr(bench, "seconds_per_matmul", seconds_per_matmul)
    assert bench.matmul_rate("cpu", torch.float64, size=64, repeats=3) == pytest.approx(1e9)  # the mean: 5e8
    assert seen == [("cpu", torch.float64, torch.float64, (64, 64), 1)] * 4


def test_ours_argv_trains_on_the_job_device(tmp_path):
    argv = bench.ours_argv(bench_job(tmp_path))
    assert argv[argv.index("--trainer.device") + 1] == "cpu"
    assert config.load_config(argv)["trainer"]["device"] == "cpu"


def run_driver(tmp_path, monkeypatch, capsys, *flags):
    """bench.main over a tiny job with the workers faked: the jobs and reference matmuls it asks for."""
    job = bench_job(tmp_path)
    jobs, rates = [], []

    def run_worker(system, job, scratch, tag):
        jobs.append(job)
        lengths = [5] * 4
        return {"train_s": 1.0, "eval_s": 1.0, "first_step_s": 0.5, "acc": 0.5, "f1_macro": 0.5,
                "peak_rss_mib": 100.0, "train_lengths": lengths, "eval_lengths": lengths, "threads": 1,
                "config": tiny_config("bert", num_labels=3).to_dict(),
                **({"peak_gpu_mib": 42.0} if job["device"] == "cuda" else {})}

    def matmul_rate(device, dtype):
        rates.append((device, dtype))
        return 1e12
    monkeypatch.setattr(bench, "run_worker", run_worker)
    monkeypatch.setattr(bench, "matmul_rate", matmul_rate)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the session keeps its one thread
    bench.main(["--train-examples", "4", "--eval-examples", "4", "--repeats", "1", "--scratch", str(tmp_path / "s"),
                "--train-file", job["train_file"], "--eval-file", job["eval_file"], "--model", job["model"], *flags])
    return jobs, rates, capsys.readouterr().out


def test_a_cpu_job_trains_and_measures_its_matmul_on_the_cpu(tmp_path, monkeypatch, capsys):
    jobs, rates, out = run_driver(tmp_path, monkeypatch, capsys, "--device", "cpu")
    assert [job["device"] for job in jobs] == ["cpu", "cpu"]  # ours, then the peer
    assert rates == [("cpu", torch.float32)] * 3  # before each run and after the last
    assert ("measured fp32 matmul rate: 1000.0 GFLOP/s (median of 3; 2048x2048 on the CPU, "
            f"{torch.get_num_threads()} threads)") in out
    assert "peak GPU MiB" not in out


def test_a_bf16_gpu_job_measures_a_bf16_matmul_on_the_gpu(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU as far as the driver asks
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *device: "Test GPU")
    jobs, rates, out = run_driver(tmp_path, monkeypatch, capsys, "--roberta-bf16")
    assert [(job["device"], job["bf16"]) for job in jobs] == [("cuda", True)] * 2
    argv = bench.ours_argv({**jobs[0], "log_dir": "runs"})
    assert argv[argv.index("--trainer.device") + 1] == "cuda"
    assert rates == [("cuda", torch.bfloat16)] * 3
    assert "measured bf16 matmul rate: 1000.0 GFLOP/s (median of 3; 8192x8192 on Test GPU)" in out
    assert "threads" not in out and "peak GPU MiB" in out


def test_hf_worker_trains_on_the_job_device(tmp_path, monkeypatch, keep_threads):
    pytest.importorskip("datasets")
    no_psutil(monkeypatch)
    import transformers
    trained_on, predicted = [], []

    class SeenTrainer(transformers.Trainer):
        def train(self, *args, **kwargs):
            trained_on.append((self.args.device.type, self.args.use_cpu))
            return super().train(*args, **kwargs)

        def predict(self, *args, **kwargs):  # the peer's evaluation, seen on its way through
            predicted.append(super().predict(*args, **kwargs))
            return predicted[-1]
    monkeypatch.setattr(transformers, "Trainer", SeenTrainer)
    result = bench.run_hf(bench_job(tmp_path))
    assert trained_on == [("cpu", True)]
    assert result["train_s"] > 0 and result["eval_s"] > 0
    # the metrics are those of the peer's own predictions on every row of val.csv, in file order
    (out,) = predicted
    truth = np.array([bench.LABELS.index(row["sentiment"]) for row in bench_rows()[32:]])
    assert out.label_ids.tolist() == truth.tolist()
    acc, f1_macro = acc_and_macro_f1(out.predictions.argmax(axis=1), truth)
    assert result["acc"] == acc and result["f1_macro"] == pytest.approx(f1_macro)


@pytest.mark.parametrize("device, visible", [("cuda", "2"), ("cpu", "2,3")])
def test_a_gpu_job_worker_sees_one_gpu_as_trainer_py_uses_one(tmp_path, monkeypatch, device, visible):
    seen = {}  # HF Trainer would spread over every visible GPU (DataParallel) with batch 32 on each

    def run(cmd, env, **kwargs):
        seen.update(env)
        Path(cmd[cmd.index("--out") + 1]).write_text("{}")
        return SimpleNamespace(returncode=0)
    monkeypatch.setattr(bench.subprocess, "run", run)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    bench.run_worker("hf", {"device": device}, tmp_path, "t")
    assert seen["CUDA_VISIBLE_DEVICES"] == visible
