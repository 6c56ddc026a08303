"""serve.py: the routes in-process (fastapi's TestClient), the same answers as trainer.py's prediction
CSV, every bad request, dynamic batching; then one real server on a loopback port driven by a real HTTP
client (concurrent requests, SIGTERM's drain) and the page in a real headless browser (slow).

Each task's checkpoint is trained for one epoch in this process by trainer.main; the answers are
compared with the prediction CSV that trainer.py writes for the same texts.
"""
import asyncio
import contextlib
import csv
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

import serve
import trainer
from config import load_config
from conftest import (
    NEGATIVE,
    NEUTRAL,
    POSITIVE,
    ROOT,
    base_args,
    run_main,
    save_tiny_encoder,
    sentiment_rows,
    stderr_tail,
    write_csv,
)

LABELS = ["good", "bad", "film"]


def tagged_long_rows(n, seed):
    """Multi-label texts long enough for windows of 16 tokens: filler words, and a cue per label."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        tags = [label for label in LABELS if rng.random() < 0.4]
        words = [rng.choice([w for w in NEUTRAL if w not in ("movie", "film")]) for _ in range(rng.randint(3, 30))]
        for tag in tags:
            words.insert(rng.randint(0, len(words)), rng.choice({"good": POSITIVE, "bad": NEGATIVE, "film": ["film"]}[tag]))
        rows.append({"text": " ".join(words), "label": "|".join(tags)})
    return rows


def scored_pair_rows(n, seed):
    """Regression on sentence pairs: the share of positive words among the second text's sentiment words."""
    rng = random.Random(seed)
    rows = []
    for row in sentiment_rows(n, seed=seed):
        words = row["text"].split()
        score = sum(w in POSITIVE for w in words) / max(1, sum(w in POSITIVE + NEGATIVE for w in words))
        rows.append({"title": rng.choice(NEUTRAL), "text": row["text"], "label": score})
    return rows


TASKS = {
    "single_label": (lambda n, seed: sentiment_rows(n, seed=seed), {}),
    "multi_label_windows": (tagged_long_rows, {
        "data.labels_list": "[good, bad, film]", "data.multi_label": "true", "module.metric": "f1_micro",
        "module.threshold": "tune", "data.long_texts": "windows", "data.window_stride": 2, "data.window_pool": "max"}),
    "regression_pairs": (scored_pair_rows, {"data.labels_list": "[score]", "module.metric": "pcc_and_scc",
                                            "data.text_a_col": "title", "data.text_b_col": "text"}),
}


def train_checkpoint(tmp, task):
    """A checkpoint of one epoch of the task: (its folder, its validation file, its training overrides)."""
    rows_of, overrides = TASKS[task]
    model = save_tiny_encoder(tmp / "bert")
    train = write_csv(tmp / "train.csv", rows_of(64, 1))
    val = write_csv(tmp / "val.csv", rows_of(24, 2))
    run_main(trainer.main, base_args(tmp, model, train, val, **{"trainer.epochs": 1, **overrides}))
    return tmp / "ckpt" / "best", val


def serve_args(model_path, **keys):
    args = {"model.model_path": str(model_path), "trainer.device": "cpu", "trainer.num_threads": 1, **keys}
    return [item for key, value in args.items() for item in (f"--{key}", str(value))]


@contextlib.contextmanager
def client_of(model_path, **keys):
    """A TestClient of serve.py's app for model_path (its lifespan, the batcher's worker, running)."""
    cfg = load_config(serve_args(model_path, **keys))
    with contextlib.redirect_stdout(io.StringIO()):
        served = serve.load_served(cfg)
    with TestClient(serve.create_app(served, cfg["serve"])) as client:
        yield client


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    checkpoint, val = train_checkpoint(tmp_path_factory.mktemp("serve-single"), "single_label")
    return {"checkpoint": checkpoint, "val": val}


@pytest.fixture(scope="module")
def client(single):
    with client_of(single["checkpoint"]) as client:
        yield client


def predicted_csv(tmp, model_path, rows, **more):
    """trainer.py's prediction CSV of rows for model_path, as a list of dicts."""
    new = write_csv(tmp / "new.csv", rows)
    args = serve_args(model_path, **{"data.train_filepath": "null", "data.val_filepath": "null",
                                     "data.predict_filepath": new, "data.predict_output": str(tmp / "predicted.csv"),
                                     "trainer.log_dir": str(tmp / "runs"), **more})
    run_main(trainer.main, args)
    with open(tmp / "predicted.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def assert_answers_equal_csv(answers, predicted, names):
    """Each answer makes the CSV row's decision with its probabilities (within 1e-4)."""
    assert len(answers) == len(predicted)
    for answer, row in zip(answers, predicted):
        scores = {entry["label"]: entry["score"] for entry in answer}
        if names is None:  # regression: one score
            assert scores == pytest.approx({"score": float(row["prediction"])}, abs=1e-4)
            continue
        assert [entry["score"] for entry in answer] == sorted(scores.values(), reverse=True)  # highest first
        assert scores == pytest.approx({name: float(row[f"prob_{name}"]) for name in names}, abs=1e-4)
        if "predicted_labels" in row:  # multi-label: the thresholds' decision
            assert {e["label"] for e in answer if e["predicted"]} == set(filter(None, row["predicted_labels"].split("|")))
        else:
            assert answer[0]["label"] == row["predicted_label"]


# -- the same answers as trainer.py's prediction ------------------------------------------------------


def test_answers_equal_the_prediction_csv_one_text_or_many(single, client, tmp_path):
    rows = [{"text": row["text"]} for row in sentiment_rows(30, seed=5)]
    predicted = predicted_csv(tmp_path, single["checkpoint"], rows)
    names = ["negative", "positive"]
    many = client.post("/predict", json={"inputs": [row["text"] for row in rows]})
    assert many.status_code == 200, many.text
    assert_answers_equal_csv(many.json(), predicted, names)
    one = client.post("/predict", json={"inputs": rows[3]["text"]})  # a lone text: one list, not a list of lists
    assert_answers_equal_csv([one.json()], predicted[3:4], names)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_answers_equal_the_prediction_csv_written_on_the_gpu(single, tmp_path):
    rows = [{"text": row["text"]} for row in sentiment_rows(30, seed=6)]
    predicted = predicted_csv(tmp_path, single["checkpoint"], rows, **{"trainer.device": "cuda"})
    with client_of(single["checkpoint"], **{"trainer.device": "cuda"}) as client:
        assert client.get("/info").json()["device"].startswith("cuda")
        answers = client.post("/predict", json={"inputs": [row["text"] for row in rows]}).json()
    assert_answers_equal_csv(answers, predicted, ["negative", "positive"])


@pytest.mark.parametrize("task", ["multi_label_windows", "regression_pairs"])
def test_answers_of_each_task_equal_the_prediction_csv(task, tmp_path):
    checkpoint, _ = train_checkpoint(tmp_path, task)
    rows_of, overrides = TASKS[task]
    rows = rows_of(20, 7)
    more = {"data.text_a_col": "title", "data.text_b_col": "text"} if "pairs" in task else {}
    predicted = predicted_csv(tmp_path, checkpoint, [{k: v for k, v in row.items() if k != "label"} for row in rows], **more)
    inputs = [[row["title"], row["text"]] for row in rows] if "pairs" in task else [row["text"] for row in rows]
    with client_of(checkpoint) as client:
        info = client.get("/info").json()
        answers = client.post("/predict", json={"inputs": inputs}).json()
    names = None if "regression" in task else LABELS
    assert_answers_equal_csv(answers, predicted, names)
    if task == "multi_label_windows":  # the tuned thresholds travel with each label, as /info says them
        saved = json.loads((checkpoint / "thresholds.json").read_text())["thresholds"]
        assert info["thresholds"] == pytest.approx(saved)
        assert all(entry["threshold"] == pytest.approx(saved[entry["label"]]) for entry in answers[0])
        assert info["long_texts"]["long_texts"] == "windows" and info["task"] == "multi_label"
        assert any(len(row["text"].split()) > 14 for row in rows)  # some texts were read in several windows


def test_truncate_true_reads_a_windowed_model_as_if_it_truncated(tmp_path):
    """truncate true cuts at module.max_seq_len: as trainer.py predicts with --data.long_texts truncate."""
    checkpoint, _ = train_checkpoint(tmp_path, "multi_label_windows")
    rows = [{"text": row["text"]} for row in tagged_long_rows(12, 9)]
    truncated = predicted_csv(tmp_path, checkpoint, rows, **{"data.long_texts": "truncate"})
    with client_of(checkpoint) as client:
        answers = client.post("/predict", json={"inputs": [r["text"] for r in rows], "truncate": True}).json()
        pooled = client.post("/predict", json={"inputs": [r["text"] for r in rows]}).json()
    assert_answers_equal_csv(answers, truncated, LABELS)
    assert answers != pooled  # the long ones differ: windows were pooled without truncate


def test_raw_scores_are_the_logits_whose_softmax_is_the_answer(client):
    text = "the film was good and so happy"
    probs = client.post("/predict", json={"inputs": text}).json()
    raw = client.post("/predict", json={"inputs": text, "raw_scores": True}).json()
    assert [e["label"] for e in raw] == [e["label"] for e in probs]
    # the softmax at the checkpoint's temperature (its calibration.json), as prediction's
    logits = np.array([e["score"] for e in raw]) / client.get("/info").json()["temperature"]
    np.testing.assert_allclose(np.exp(logits) / np.exp(logits).sum(), [e["score"] for e in probs], atol=1e-6)


# -- routes ---------------------------------------------------------------------------------------


def test_health_info_and_the_page(single, client):
    assert client.get("/health").json() == {"status": "ok"}
    info = client.get("/info").json()
    assert info["model_id"] == str(single["checkpoint"])
    assert info["model_type"]["classifier"]["id2label"] == {"0": "negative", "1": "positive"}
    assert (info["task"], info["model"], info["max_input_length"], info["device"]) == ("single_label", "pytorch", 16, "cpu")
    assert info["version"].startswith("serve.py ")
    page = client.get("/")
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert 'id="text"' in page.text and "fetch(\"/predict\"" in page.text


def test_an_export_folder_is_served_by_onnx_runtime_with_its_gate_table(single, tmp_path):
    """The export folder answers as its checkpoint does (fp32), and the int8 model when asked for."""
    import export
    run_main(export.main, ["--model.model_path", str(single["checkpoint"]), "--data.val_filepath", single["val"],
                           "--data.text_a_col", "text", "--data.label_col", "label", "--export.threads", "1",
                           "--trainer.val_batch_size", "8", "--export.output_dir", str(tmp_path / "onnx")])
    texts = [row["text"] for row in sentiment_rows(10, seed=11)]
    answers = {}
    for name, path, keys in (("torch", single["checkpoint"], {}), ("fp32", tmp_path / "onnx", {}),
                             ("int8", tmp_path / "onnx", {"model.artifact": "onnx_int8"})):
        with client_of(path, **keys) as client:
            answers[name] = client.post("/predict", json={"inputs": texts}).json()
            info = client.get("/info").json()
    assert info["model"] == "onnx_int8" and info["source"] == str(single["checkpoint"].resolve())
    assert info["gate"]["onnx_fp32"]["kept"] and "graph" in info["gate"]
    for ours, theirs in zip(answers["fp32"], answers["torch"]):
        assert {e["label"]: e["score"] for e in ours} == pytest.approx({e["label"]: e["score"] for e in theirs}, abs=1e-5)
    assert answers["int8"] != answers["fp32"]  # another model


# -- bad requests: 4xx with one line of JSON, and the server goes on --------------------------------


BAD = [
    (b"{", 400, "the body is not JSON"),
    (b"\xff\xfe", 400, "the body is not JSON"),
    (b"[]", 422, "the body must be a JSON object"),
    (b'{"text": "a"}', 422, "unknown field 'text'; /predict takes inputs, raw_scores, truncate, truncation_direction"),
    (b'{"raw_scores": true}', 422, "no inputs"),
    (b'{"inputs": 3}', 422, "inputs must be a text, a non-empty list"),
    (b'{"inputs": []}', 422, "inputs must be a text, a non-empty list"),
    (b'{"inputs": {"a": "b"}}', 422, "inputs must be a text, a non-empty list"),
    (b'{"inputs": ["good", null]}', 422, "inputs[1] is null, not a text"),
    (b'{"inputs": ["good", ["a", "b"]]}', 422, "inputs[1] is a list, not a text"),
    (b'{"inputs": [["good"]]}', 422, "inputs[0] is not a pair of two texts"),
    (b'{"inputs": [["good", "bad"], "sad"]}', 422, "inputs[1] is not a pair of two texts"),
    (b'{"inputs": [["good", 1]]}', 422, "inputs[0] is not a pair of two texts"),
    (b'{"inputs": "   "}', 422, "inputs[0] is empty"),
    (b'{"inputs": [["good", ""]]}', 422, "inputs[0][1] is empty"),
    (b'{"inputs": "good", "raw_scores": "yes"}', 422, 'raw_scores is "yes"; it must be true or false'),
    (b'{"inputs": "good", "truncate": 1}', 422, "truncate is 1; it must be true, false or left out"),
    (b'{"inputs": "good", "truncation_direction": "left"}', 422, 'truncation_direction "left" is not served'),
    (b'{"inputs": "good", "truncation_direction": 5}', 422, "truncation_direction 5 is not served"),
    (json.dumps({"inputs": ["good"] * 33}).encode(), 413, "33 inputs in one request, more than serve.max_inputs 32"),
    (json.dumps({"inputs": "good " * 10_001}).encode(), 413, "inputs[0] has 50005 characters, more than serve.max_chars 50000"),
    (json.dumps({"inputs": "good " * 20, "truncate": False}).encode(), 413,
     "inputs[0] is 22 tokens, more than module.max_seq_len 16; send truncate true"),
]


@pytest.mark.parametrize("body, status, message", BAD, ids=[f"{status}-{i}" for i, (_, status, _) in enumerate(BAD)])
def test_a_bad_request_is_one_line_of_json_and_the_next_is_answered(client, body, status, message):
    response = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    answer = response.json()
    assert set(answer) == {"error", "error_type"} and "\n" not in answer["error"]
    assert answer["error"].startswith(message), answer["error"]
    assert client.post("/predict", json={"inputs": "good film"}).status_code == 200


def test_a_body_over_the_limit_is_refused_before_it_is_read_whole(single):
    with client_of(single["checkpoint"], **{"serve.max_body_bytes": 100}) as client:
        body = json.dumps({"inputs": "good " * 30})
        declared = client.post("/predict", content=body)
        assert declared.status_code == 413
        assert declared.json()["error"] == f"the body is {len(body)} bytes, more than serve.max_body_bytes 100"
        # sent in chunks, without a length: refused once it passes the limit
        streamed = client.post("/predict", content=(b'{"inputs": "' + b"good " * 10 + b'"}' for _ in range(5)))
        assert streamed.status_code == 413
        assert streamed.json()["error"] == "the body is more than serve.max_body_bytes 100 bytes"
        assert client.post("/predict", json={"inputs": "good"}).status_code == 200


def test_unknown_routes_and_methods_get_json_errors_naming_the_routes(client):
    for response in (client.get("/nothing"), client.get("/predict"), client.post("/health")):
        assert response.status_code in (404, 405)
        assert response.json()["error"].endswith("routes: POST /predict, GET /health, GET /info, GET /")
    assert client.get("/docs").status_code == 404  # no page that would load scripts from a CDN


def test_nothing_in_a_request_names_a_file(client, tmp_path):
    """A text that is a path is a text: classified, never opened."""
    secret = tmp_path / "secret.txt"
    secret.write_text("good good good")
    answer = client.post("/predict", json={"inputs": str(secret)})
    assert answer.status_code == 200 and {e["label"] for e in answer.json()} == {"negative", "positive"}


# -- dynamic batching -------------------------------------------------------------------------------


def test_forward_passes_are_length_sorted_within_rows_and_a_token_budget():
    lengths = np.array([3, 10, 5, 8, 2])
    batches = serve.token_batches(lengths, max_rows=2, max_tokens=16)
    assert [b.tolist() for b in batches] == [[1], [3, 2], [0, 4]]  # 10 alone (2 x 10 > 16), then pairs
    assert all(len(b) * lengths[b].max() <= 16 for b in batches)
    assert [b.tolist() for b in serve.token_batches(lengths, max_rows=8, max_tokens=1000)] == [[1, 3, 2, 0, 4]]


def test_requests_that_arrive_together_run_as_one_batch(single):
    texts = [row["text"] for row in sentiment_rows(8, seed=3)]
    with client_of(single["checkpoint"], **{"serve.max_wait_ms": 1000}) as client:
        alone = [client.post("/predict", json={"inputs": text}).json() for text in texts[:2]]
        before = client.get("/info").json()["served"]
        answers, start = [None] * len(texts), threading.Barrier(len(texts))

        def send(i):
            start.wait()
            answers[i] = client.post("/predict", json={"inputs": texts[i]}).json()
        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(texts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        after = client.get("/info").json()["served"]
    assert before["batches"] == 2  # one request alone waits the whole max_wait_ms, then runs alone
    assert after["texts"] - before["texts"] == 8 and after["batches"] - before["batches"] <= 2
    for ours, theirs in zip(answers[:2], alone):  # another batch, other padding: the same answer
        assert [e["score"] for e in ours] == pytest.approx([e["score"] for e in theirs], abs=1e-5)


def test_a_request_over_max_batch_size_runs_in_several_forward_passes(single):
    texts = [row["text"] for row in sentiment_rows(20, seed=4)]
    with client_of(single["checkpoint"], **{"serve.max_batch_size": 4, "serve.max_wait_ms": 0}) as client:
        answers = client.post("/predict", json={"inputs": texts}).json()
        served = client.get("/info").json()["served"]
        one_by_one = [client.post("/predict", json={"inputs": text}).json() for text in texts]
    assert served["batches"] == 1 and served["forward_passes"] == 5
    for ours, theirs in zip(answers, one_by_one):
        assert [e["score"] for e in ours] == pytest.approx([e["score"] for e in theirs], abs=1e-5)


def test_a_full_queue_answers_429_and_the_waiting_request_is_still_answered(single):
    keys = {"serve.max_queue": 4, "serve.max_inputs": 4, "serve.max_wait_ms": 1500, "serve.max_batch_size": 64}
    with client_of(single["checkpoint"], **keys) as client:
        first = {}
        waiting = threading.Thread(target=lambda: first.update(r=client.post("/predict", json={"inputs": ["good"] * 3})))
        waiting.start()
        deadline = time.monotonic() + 5
        while client.app.state.batcher.queued < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        refused = client.post("/predict", json={"inputs": ["bad", "sad"]})
        waiting.join()
    assert refused.status_code == 429
    assert refused.json() == {"error": "3 texts are waiting (serve.max_queue 4); retry later", "error_type": "Overloaded"}
    assert first["r"].status_code == 200 and len(first["r"].json()) == 3


# -- the command's own errors: one line, exit status 2 ------------------------------------------------


def test_bad_config_or_model_is_one_line_and_exit_status_2(single, tmp_path):
    cases = [
        ([], "error: model.model_path is null: pass the checkpoint or export folder to serve"),
        (serve_args(tmp_path / "missing"), f"error: model.model_path {tmp_path / 'missing'}: no such file or folder"),
        (serve_args(single["checkpoint"], **{"serve.port": 70000}), "error: serve.port is 70000; it must be a TCP port"),
        (serve_args(single["checkpoint"], **{"serve.max_wait_ms": -1}),
         "error: serve.max_wait_ms is -1; it must not be negative"),
        (serve_args(single["checkpoint"], **{"model.artifact": "onnx_int8", "serve.port": free_port()}),
         "error: model.artifact onnx_int8 picks a model of an export folder"),
        (serve_args(single["checkpoint"], **{"serve.max_batch_tokens": 8, "serve.port": free_port()}),
         "error: serve.max_batch_tokens 8 cannot hold one text of module.max_seq_len 16 tokens"),
        (serve_args(single["checkpoint"], **{"serve.nope": 1}), "error: --serve.nope: unknown key 'serve.nope'"),
    ]
    for args, message in cases:
        _, err = run_main(serve.main, args, expect=2)
        assert err.startswith(message) and err.count("\n") == 1, err


def test_a_port_in_use_is_one_line_before_the_model_loads(single):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        _, err = run_main(serve.main, serve_args(single["checkpoint"], **{"serve.port": port}), expect=2)
    assert err.startswith(f"error: serve.host 127.0.0.1 serve.port {port}: cannot listen there (")


class Accepted(asyncio.Protocol):
    """A server protocol that hands over the transport of the connection it accepts."""

    def __init__(self, accepted):
        self.accepted = accepted

    def connection_made(self, transport):
        self.accepted.set_result(transport)


def test_the_servers_connections_send_small_answers_at_once():
    """asyncio sets TCP_NODELAY only on connections of a listening socket that says IPPROTO_TCP; without
    it a small answer waits for the client's delayed ACK."""
    async def accepted_nodelay():
        sock = serve.listening_socket("127.0.0.1", 0)
        accepted = asyncio.get_running_loop().create_future()
        server = await asyncio.get_running_loop().create_server(lambda: Accepted(accepted), sock=sock)
        _, writer = await asyncio.open_connection(*sock.getsockname())
        transport = await asyncio.wait_for(accepted, 10)
        value = transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        writer.close()
        server.close()
        return value

    assert asyncio.run(accepted_nodelay()) != 0


@pytest.mark.slow  # two subprocesses that import torch
def test_the_models_idle_threads_wait_passively_unless_the_user_says_otherwise():
    """serve.py sets OMP_WAIT_POLICY before torch loads OpenMP: spinning threads would take the event loop's cores."""
    code = "import serve, os, torch; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    default = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    chosen = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                            capture_output=True, text=True, timeout=120)
    assert (default.stdout.strip(), chosen.stdout.strip()) == ("PASSIVE", "ACTIVE"), default.stderr + chosen.stderr


def test_serve_keys_never_block_a_resume():
    import checkpoint
    cfg = load_config(["--serve.port", "9000"])
    older = {section: dict(values) for section, values in cfg.items() if section != "serve"}  # before serve.py
    digests = {key: [None] for key in checkpoint.DATA_FILE_KEYS}
    assert checkpoint.resume_conflicts(older, digests, cfg, digests) == []


# -- a real server on a loopback port ------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def real_server(model_path, **keys):
    """serve.py in its own process on a free loopback port: (process, base URL), once /health answers."""
    port = free_port()
    process = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), *serve_args(model_path, **{"serve.port": port, **keys})],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, stderr_tail(process.communicate()[1])
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not answer /health within 60 s"
            time.sleep(0.2)
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()


@pytest.mark.slow
def test_a_real_server_answers_concurrent_clients_and_drains_on_sigterm(single, client):
    texts = [row["text"] for row in sentiment_rows(32, seed=12)]
    expected = [client.post("/predict", json={"inputs": text}).json() for text in texts]
    with real_server(single["checkpoint"], **{"serve.max_wait_ms": 1500, "serve.max_batch_size": 32}) as (process, url):
        with httpx.Client(base_url=url, timeout=30) as http:
            assert http.post("/predict", content=b"{not json").status_code == 400  # and it goes on serving
            answers = [None] * len(texts)

            def send(i):
                with httpx.Client(base_url=url, timeout=30) as own:  # a connection per client
                    answers[i] = own.post("/predict", json={"inputs": texts[i]}).json()
            threads = [threading.Thread(target=send, args=(i,)) for i in range(len(texts))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for ours, theirs in zip(answers, expected):
                assert [e["label"] for e in ours] == [e["label"] for e in theirs]
                assert [e["score"] for e in ours] == pytest.approx([e["score"] for e in theirs], abs=1e-5)
            served = http.get("/info").json()["served"]
            assert served["texts"] == 32 and served["batches"] <= 4  # 32 clients, few batches

            # three requests wait for a batch to fill (max_wait_ms 1.5 s) when SIGTERM comes: all answered
            late = [None] * 3
            threads = [threading.Thread(target=lambda i=i: late.__setitem__(
                i, httpx.post(f"{url}/predict", json={"inputs": texts[i]}, timeout=30))) for i in range(3)]
            for t in threads:
                t.start()
            time.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            for t in threads:
                t.join()
        out, err = process.communicate(timeout=60)
    assert process.returncode == 0, stderr_tail(err)
    assert [r.status_code for r in late] == [200, 200, 200]
    for response, theirs in zip(late, expected):
        assert [e["score"] for e in response.json()] == pytest.approx([e["score"] for e in theirs], abs=1e-5)
    assert "stopped; served" in out
    with pytest.raises(httpx.TransportError):  # no longer listening
        httpx.get(f"{url}/health", timeout=2)


# -- the page in a real browser ------------------------------------------------------------------------


def chromium():
    """(browser, driver) paths of Debian's chromium and chromedriver, or a reason to skip."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return None, "selenium is not installed (pip install selenium)"
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        return None, "no chromium / chromedriver (apt-get install chromium chromium-driver)"
    return (browser, driver), None


@pytest.mark.slow
def test_the_page_shows_the_labels_as_bars_in_a_real_browser(single, client, tmp_path):
    found, reason = chromium()
    if found is None:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    text = "the film was awful and so boring"
    expected = client.post("/predict", json={"inputs": text}).json()
    with real_server(single["checkpoint"]) as (_, url):
        try:
            browser = webdriver.Chrome(service=Service(found[1]), options=options)
        except WebDriverException as e:  # installed, but it cannot start here (no shared memory, a sandbox)
            pytest.skip(f"chromium does not start here: {str(e).strip().splitlines()[0][:200]}")
        try:
            browser.get(url + "/")
            WebDriverWait(browser, 20).until(lambda b: "single_label" in b.find_element(By.ID, "about").text)
            browser.find_element(By.ID, "text").send_keys(text)
            browser.find_element(By.ID, "go").click()
            WebDriverWait(browser, 20).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#result .row")) == 2)
            rows = browser.find_elements(By.CSS_SELECTOR, "#result .row")
            shown = [(row.get_attribute("data-label"), float(row.get_attribute("data-score")),
                      row.find_element(By.CLASS_NAME, "bar").size["width"]
                      / row.find_element(By.CLASS_NAME, "track").size["width"]) for row in rows]
            browser.find_element(By.ID, "text").clear()
            browser.find_element(By.ID, "go").click()  # an empty text: the server's one line, shown
            WebDriverWait(browser, 20).until(lambda b: b.find_element(By.ID, "error").text)
            error = browser.find_element(By.ID, "error").text
        finally:
            browser.quit()
    assert [label for label, _, _ in shown] == [e["label"] for e in expected]
    for (_, score, width), entry in zip(shown, expected):
        assert score == pytest.approx(entry["score"], abs=1e-5)
        assert width == pytest.approx(entry["score"], abs=0.02)  # the bar is the probability
    assert error == "inputs[0] is empty"



@pytest.mark.slow
def test_the_load_test_runs_on_a_tiny_model(single, tmp_path):
    """bench/serve_bench.py end to end, tiny: both servers start, answer every request, and the table says so."""
    texts = write_csv(tmp_path / "texts.csv", [{"text": row["text"]} for row in sentiment_rows(12, seed=13)])
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "serve_bench.py"), "--model", str(single["checkpoint"]),
                             "--data", texts, "--requests", "6", "--seconds", "30", "--clients", "1", "3", "--rounds", "1",
                             "--threads", "1", "--json", str(tmp_path / "load.json")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, stderr_tail(result.stderr)
    results = json.loads((tmp_path / "load.json").read_text())
    assert [row["clients"] for row in results["serve"]] == [1, 3] == [row["clients"] for row in results["naive"]]
    assert all(row["requests"] == 6 and row["p99_ms"] >= row["p50_ms"] > 0 for row in results["serve"] + results["naive"])
    assert results["offline_ex_s"] > 0 and "at 3 clients: serve.py" in result.stdout
