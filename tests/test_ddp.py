"""DDP through torchrun on CPU (gloo), and the mixed-precision code paths.

Two CPU processes must train exactly like one process with the same global batch (dropout off),
evaluate to exactly the single-process metrics on a set that does not divide among the ranks,
and write checkpoints that load the same way. CUDA-only paths skip without a GPU. Every test runs
trainer.py in other processes (torchrun or a plain one): all are marked slow.
"""
import csv
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from conftest import ROOT, base_args, last_json_line, save_tiny_encoder, sentiment_rows, stderr_tail, without_timings, write_csv

TRAINER = str(ROOT / "trainer.py")
pytestmark = pytest.mark.slow


def run(cmd, cwd, timeout=300):
    # one thread per process: two ranks on two cores, as trainer.py itself would choose
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env)


def torchrun(args, cwd, nproc=2):
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={nproc}", TRAINER, *args], cwd)


def single(args, cwd):
    return run([sys.executable, TRAINER, *args], cwd)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weights(checkpoint):
    return load_file(os.path.join(checkpoint, "model.safetensors"))


def loss_curve(log_dir):
    (path,) = list(log_dir.glob("*/metrics.jsonl"))
    return [row["train/loss"] for row in map(json.loads, path.read_text().splitlines())
            if "train/loss" in row]


def assert_same_weights(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-4, msg=key)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A dropout-free tiny encoder, 100 training rows and 51 validation rows (odd: 51 = 2 x 25 + 1)."""
    tmp = tmp_path_factory.mktemp("ddp")
    model = save_tiny_encoder(tmp / "bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    train = write_csv(tmp / "train.csv", sentiment_rows(100, seed=1))
    val = write_csv(tmp / "val.csv", sentiment_rows(51, seed=2))
    # global batch 16 = 2 ranks x 8, micro-batches of <= 3: accumulation and no_sync both run
    overrides = {"trainer.gpu_batch_size_limit": 3, "trainer.log_steps": 1}
    def args(name, **more):
        return base_args(tmp / name, model, train, val, **{**overrides, **more})
    sp = single(args("sp"), tmp)
    assert sp.returncode == 0, stderr_tail(sp.stderr)
    return {"tmp": tmp, "args": args, "sp": sp, "model": model, "train": train, "val": val}


def test_ddp_trains_like_one_process(setup):
    tmp = setup["tmp"]
    ddp = torchrun(setup["args"]("ddp", **{"trainer.backend": "ddp"}), tmp)
    assert ddp.returncode == 0, stderr_tail(ddp.stderr)
    # same loss curve (mean over all examples of each step, reduced over ranks) and weights
    sp_curve, ddp_curve = loss_curve(tmp / "sp" / "runs"), loss_curve(tmp / "ddp" / "runs")
    assert len(sp_curve) == len(ddp_curve) == 21  # 3 epochs x ceil(100 / 16) steps
    assert ddp_curve == pytest.approx(sp_curve, abs=1e-5)
    assert_same_weights(weights(tmp / "ddp" / "ckpt" / "last"), weights(tmp / "sp" / "ckpt" / "last"))
    # validation over 51 examples sharded on 2 ranks: exactly the single-process metrics
    sp_metrics, ddp_metrics = last_json_line(setup["sp"].stdout), last_json_line(ddp.stdout)
    for key in ("acc", "f1_macro", "f1_weighted", "mcc"):
        assert ddp_metrics[key] == pytest.approx(sp_metrics[key], abs=1e-12)
    # only rank 0 prints the result line and writes checkpoints, saved without a `module.` prefix
    assert sum(line.startswith("{") for line in ddp.stdout.splitlines()) == 1
    model = AutoModelForSequenceClassification.from_pretrained(tmp / "ddp" / "ckpt" / "last")
    assert model.config.id2label == {0: "negative", 1: "positive"}


def test_ddp_evaluation_and_predictions_match_one_process(setup):
    tmp, val = setup["tmp"], setup["val"]
    checkpoint = str(tmp / "sp" / "ckpt" / "last")
    rows = sentiment_rows(51, seed=2)
    predict = write_csv(tmp / "predict.csv", rows, columns=["text"])
    common = ["--data.train_filepath", "null", "--data.val_filepath", val,
              "--data.predict_filepath", predict, "--data.labels_list", "[negative, positive]",
              "--data.text_a_col", "text", "--data.label_col", "label", "--module.metric", "acc",
              "--module.max_seq_len", "16", "--model.model_path", checkpoint,
              "--trainer.val_batch_size", "4", "--trainer.device", "cpu"]
    one = single(common + ["--trainer.log_dir", str(tmp / "ev1"),
                           "--data.predict_output", str(tmp / "p1.csv")], tmp)
    two = torchrun(common + ["--trainer.backend", "ddp", "--trainer.log_dir", str(tmp / "ev2"),
                             "--data.predict_output", str(tmp / "p2.csv")], tmp)
    assert one.returncode == 0 and two.returncode == 0, stderr_tail(two.stderr)
    one_metrics, two_metrics = (without_timings(last_json_line(run.stdout)) for run in (one, two))
    assert {k: v for k, v in two_metrics.items() if k != "predictions"} == pytest.approx(
        {k: v for k, v in one_metrics.items() if k != "predictions"})
    p1 = list(csv.DictReader(open(tmp / "p1.csv")))
    p2 = list(csv.DictReader(open(tmp / "p2.csv")))
    assert [r["text"] for r in p2] == [r["text"] for r in rows]  # complete, in input order
    assert [r["predicted_label"] for r in p2] == [r["predicted_label"] for r in p1]
    for a, b in zip(p1, p2):
        assert float(a["prob_positive"]) == pytest.approx(float(b["prob_positive"]), abs=1e-5)


def test_two_nodes_on_one_machine_train_like_one_process(setup):
    """Two torchrun invocations (--nnodes 2, one process each) meeting at a localhost rendezvous."""
    tmp = setup["tmp"]
    port = free_port()
    args = setup["args"]("nodes", **{"trainer.backend": "ddp"})
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}",
         "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}", TRAINER, *args],
        cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"}) for rank in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert_same_weights(weights(tmp / "nodes" / "ckpt" / "last"), weights(tmp / "sp" / "ckpt" / "last"))
    assert last_json_line(outputs[0][0])["acc"] == last_json_line(setup["sp"].stdout)["acc"]


# trainer.main run with the collector off, so only what main itself collects is freed before exit
MAIN_THEN_COUNT_DDP = """
import gc, json, sys
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
sys.path.insert(0, sys.argv.pop(1))
import trainer
gc.disable()
status = trainer.main(sys.argv[1:])
alive = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
print(json.dumps({"status": status, "ddp_alive": alive, "initialized": dist.is_initialized()}), file=sys.stderr)
"""


def test_a_finished_run_frees_ddp_before_it_leaves_the_process_group(setup):
    """The trainer sits in reference cycles: left to the collector at interpreter exit, its DDP
    reducer (holding the gloo group) was freed after the group was destroyed, and a rank could
    abort there ("terminate called without an active exception"). main frees it first, on every rank."""
    tmp = setup["tmp"]
    driver = tmp / "main_then_count_ddp.py"
    driver.write_text(MAIN_THEN_COUNT_DDP)
    out = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(driver), str(ROOT), *setup["args"]("freed", **{"trainer.backend": "ddp", "trainer.epochs": 1})],
              tmp)
    assert out.returncode == 0, stderr_tail(out.stderr)
    reports = [json.loads(line) for line in out.stderr.splitlines() if line.startswith('{"status"')]
    assert reports == [{"status": 0, "ddp_alive": 0, "initialized": False}] * 2


def test_ddp_without_torchrun_runs_as_a_world_of_one(setup):
    tmp = setup["tmp"]
    out = single(setup["args"]("ddp1", **{"trainer.backend": "ddp", "trainer.epochs": 1}), tmp)
    assert out.returncode == 0, stderr_tail(out.stderr)
    assert "world of one process" in out.stdout


def test_the_golden_config_launches_under_python_and_torchrun_alike(setup):
    """trainer.backend auto (the golden config's) follows the launcher: DDP under torchrun."""
    from config import load_config
    assert load_config([])["trainer"]["backend"] == "auto"
    tmp = setup["tmp"]
    ddp = torchrun(setup["args"]("auto2"), tmp)
    assert ddp.returncode == 0, stderr_tail(ddp.stderr)
    assert "2 processes" in ddp.stdout
    assert loss_curve(tmp / "auto2" / "runs") == pytest.approx(loss_curve(tmp / "sp" / "runs"), abs=1e-5)


def test_sp_backend_under_torchrun_with_two_processes_is_refused_once(setup):
    tmp = setup["tmp"]
    out = torchrun(setup["args"]("sp2", **{"trainer.backend": "sp"}), tmp)
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert lines == ["error: started with 2 processes but trainer.backend is sp; use auto (or ddp) under torchrun"]
    assert not (tmp / "sp2").exists()


def test_a_config_error_under_torchrun_is_printed_once(setup):
    tmp = setup["tmp"]
    out = torchrun(setup["args"]("bad", **{"trainer.epochs": 0}), tmp)
    assert out.returncode != 0
    assert [line for line in out.stderr.splitlines() if line.startswith("error: ")] == [
        "error: trainer.epochs is 0; it must be positive"]


def test_global_batch_that_does_not_divide_is_refused(setup):
    tmp = setup["tmp"]
    out = torchrun(setup["args"]("odd", **{"trainer.backend": "ddp", "trainer.train_batch_size": 15}), tmp)
    assert out.returncode != 0
    assert "trainer.train_batch_size 15 does not divide among 2 processes" in out.stderr
    assert not (tmp / "odd" / "ckpt").exists()


# -- mixed precision -------------------------------------------------------------------------


def test_amp_on_cpu_defaults_to_float32_and_says_so(setup):
    tmp = setup["tmp"]
    out = single(setup["args"]("amp-auto", **{"trainer.backend": "sp-amp"}), tmp)
    assert out.returncode == 0, stderr_tail(out.stderr)
    assert "mixed precision: off on a CPU; training in float32" in out.stdout
    # float32 really: the same weights as the plain sp run
    assert_same_weights(weights(tmp / "amp-auto" / "ckpt" / "last"), weights(tmp / "sp" / "ckpt" / "last"),
                        atol=0)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_forced_cpu_autocast_trains_and_checkpoints_the_scaler(setup, dtype):
    tmp = setup["tmp"]
    out = single(setup["args"](f"amp-{dtype}", **{"trainer.backend": "sp-amp", "trainer.amp_dtype": dtype,
                                                  "trainer.epochs": 1}), tmp)
    assert out.returncode == 0, stderr_tail(out.stderr)
    assert f"mixed precision: autocast {dtype} on the CPU" in out.stdout
    state = torch.load(tmp / f"amp-{dtype}" / "ckpt" / "last" / "training_state.pt", weights_only=True)
    # GradScaler runs (and is checkpointed) for float16 only; bfloat16 needs no loss scaling
    assert ("scale" in state["scaler"]) == (dtype == "fp16")
    curve = loss_curve(tmp / f"amp-{dtype}" / "runs")
    assert all(math.isfinite(x) and abs(x) < 10 for x in curve)  # finite, sane losses
    # autocast changed the arithmetic: not bit-identical to the float32 run
    sp_first = loss_curve(tmp / "sp" / "runs")[0]
    assert curve[0] != sp_first and curve[0] == pytest.approx(sp_first, abs=0.05)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_cuda_amp(setup, dtype):
    tmp = setup["tmp"]
    out = single(setup["args"](f"cuda-{dtype}", **{"trainer.backend": "sp-amp", "trainer.amp_dtype": dtype,
                                                   "trainer.device": "cuda"}), tmp)
    assert out.returncode == 0, stderr_tail(out.stderr)
    assert f"mixed precision: autocast {dtype}" in out.stdout
    sp = last_json_line(setup["sp"].stdout)
    assert last_json_line(out.stdout)["acc"] == pytest.approx(sp["acc"], abs=0.1)


@cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_nccl_ddp_matches_one_process(setup):
    tmp = setup["tmp"]
    out = torchrun(setup["args"]("nccl", **{"trainer.backend": "ddp", "trainer.device": "cuda"}), tmp)
    assert out.returncode == 0, stderr_tail(out.stderr)
    assert_same_weights(weights(tmp / "nccl" / "ckpt" / "last"), weights(tmp / "sp" / "ckpt" / "last"),
                        atol=1e-3)


# -- the token cache and streaming prediction under DDP (issue 17) ---------------------------


COUNTING_TRAINER = """
import os, sys
sys.path.insert(0, {root!r})
import cache, evaluation, splits, trainer
real_encode = cache.encode

def counted(*args, **kwargs):  # the cache tokenizing a file: which rank did it
    with open({log!r}, "a") as f:
        f.write(os.environ.get("RANK", "0") + "\\n")
    return real_encode(*args, **kwargs)

real_read = splits.read_examples

def read(path, *args, **kwargs):  # a file read and checked: which rank, which file
    with open({reads!r}, "a") as f:
        f.write(os.environ.get("RANK", "0") + ":" + os.path.basename(path) + "\\n")
    return real_read(path, *args, **kwargs)

cache.encode = counted
splits.read_examples = read
evaluation.PREDICT_CHUNK = 7  # the predict file spans several chunks
sys.exit(trainer.main(sys.argv[1:]))
"""


def test_ddp_ranks_share_one_token_cache_and_predict_in_input_order(setup):
    tmp = setup["tmp"]
    log = tmp / "tokenized-by.txt"
    script = tmp / "counting_trainer.py"
    reads = tmp / "read-by.txt"
    script.write_text(COUNTING_TRAINER.format(root=str(ROOT), log=str(log), reads=str(reads)))
    rows = sentiment_rows(23, seed=3)
    predict = write_csv(tmp / "predict-cached.csv", [{"id": f"r{i}", "text": r["text"]} for i, r in enumerate(rows)])
    common = {"trainer.backend": "ddp", "data.cache_dir": str(tmp / "cache"), "trainer.val_batch_size": 4,
              "data.predict_filepath": predict}
    def cmd(*args):
        return run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 str(script), *args], tmp)
    first = cmd(*setup["args"]("cached", **common, **{"trainer.epochs": 1, "data.predict_output": str(tmp / "c1.csv")}))
    assert first.returncode == 0, first.stderr[-3000:]
    # the training and validation files were tokenized once each, by local rank 0; rank 1 mapped them
    assert log.read_text().split() == ["0", "0"]
    train_name, val_name = os.path.basename(setup["train"]), os.path.basename(setup["val"])
    assert sorted(reads.read_text().split()) == sorted(f"{rank}:{name}" for rank in "01" for name in (train_name, val_name))
    assert len(list((tmp / "cache").iterdir())) == 2  # two entries, no temporary folder, no failure note
    # a second run (evaluate + predict) maps the validation file's entry: nothing is tokenized again
    second = cmd("--data.train_filepath", "null", "--data.val_filepath", setup["val"], "--data.predict_filepath", predict,
                 "--data.labels_list", "[negative, positive]", "--data.text_a_col", "text", "--data.label_col", "label",
                 "--module.metric", "acc", "--module.max_seq_len", "16", "--trainer.val_batch_size", "4",
                 "--model.model_path", str(tmp / "cached" / "ckpt" / "best"), "--trainer.backend", "ddp",
                 "--data.cache_dir", str(tmp / "cache"), "--trainer.log_dir", str(tmp / "cached-eval"),
                 "--data.predict_output", str(tmp / "c2.csv"), "--trainer.device", "cpu")
    assert second.returncode == 0, second.stderr[-3000:]
    assert log.read_text().split() == ["0", "0"]
    assert len(reads.read_text().split()) == 4  # nor read: both ranks found the entry, ids and labels
    assert last_json_line(second.stdout)["acc"] == pytest.approx(last_json_line(first.stdout)["acc"])
    # predictions: every row once, in input order, over 4 chunks sharded on 2 ranks; both runs agree
    p1, p2 = (list(csv.DictReader(open(tmp / name))) for name in ("c1.csv", "c2.csv"))
    assert [r["id"] for r in p1] == [r["id"] for r in p2] == [f"r{i}" for i in range(23)]
    assert [r["text"] for r in p1] == [r["text"] for r in rows]
    assert [r["predicted_label"] for r in p1] == [r["predicted_label"] for r in p2]
