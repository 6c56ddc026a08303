r"""Serve a fine-tuned checkpoint or an export folder over HTTP, deciding as trainer.py's prediction does.

    python serve.py --model.model_path checkpoints/best                     # PyTorch, on the GPU if there is one
    python serve.py --model.model_path checkpoints/best-onnx --serve.port 8080   # an export folder: ONNX Runtime, CPU
    curl -s localhost:8000/predict -H 'content-type: application/json' -d '{"inputs": ["what a lovely day"]}'

The routes are text-embeddings-inference's classification API, so its clients work unchanged:
  POST /predict  {"inputs": "a text" | ["t1", "t2"] | [["a", "b"]], "raw_scores": false, "truncate": null}
                 -> for each text every label as {"label", "score"}, highest first (a lone text: one list)
  GET /health    200 {"status": "ok"} while the model answers, else 503
  GET /info      labels, task, max length, what is served (an export folder's gate table), limits, version
  GET /          a page to type a text and see its labels as bars
The answers are prediction's (evaluation.py): softmax probabilities at the checkpoint's temperature (its
calibration.json), or a regression's score; multi-label calibrated sigmoids with each label's threshold and
"predicted" (the checkpoint's tuned thresholds); a long document
read in windows (data.long_texts windows) pooled into one answer. raw_scores: logits instead of
probabilities. truncate: left out, texts are read as the checkpoint was trained (cut at module.max_seq_len,
or in windows); true cuts at module.max_seq_len (a windowed model's first window); false refuses a text
longer than that unless the model reads windows. truncation_direction left is refused.

Dynamic batching: one worker thread owns the model. Requests that arrive together wait in one queue; the
worker takes up to serve.max_batch_size texts, waiting at most serve.max_wait_ms for more, tokenizes them
and runs them through evaluation.predict_logits in length-sorted forward passes of at most
serve.max_batch_tokens tokens, then answers each request. Safe by default: it listens on 127.0.0.1
(serve.host), refuses a body, a request or a text over its limit (serve.max_*) with a one-line JSON error
and the status text-embeddings-inference gives (413, 422, 429), answers malformed JSON with 400, and goes
on serving after any bad request; no request names a file. SIGTERM or Ctrl-C: no new connections, the
requests in flight are answered, exit status 0. Bad config or model: one line, exit status 2.
"""
import os
import sys

# Between batches, the model's idle OpenMP threads spin by default, waiting for the next parallel
# region: in a server that takes the cores the event loop needs to read requests and send answers.
# Passive waiting gives them back (set before torch loads OpenMP; a value the user set is kept).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# --help needs only config.yaml: answer it before torch is imported, which takes seconds
if __name__ == "__main__" and ("-h" in sys.argv[1:] or "--help" in sys.argv[1:]):
    from config import print_help
    print_help(__doc__)
    sys.exit(0)

import asyncio
import collections
import json
import signal
import socket
import subprocess
import threading
import time
import traceback
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException

from config import ConfigError, answer_help, label_names, load_config, task_of
from data import DataError, Encoded, Examples, encode, window_stride
from evaluation import document_logits, fixed_thresholds, predict_logits, scores_of, temperature_of
from files import OutputError, first_line
from model import (
    ModelError,
    build_classifier,
    check_artifact,
    is_export_dir,
    load_tokenizer,
    read_export_manifest,
    use_checkpoint_settings,
)
from processes import this_process, torchrun_launch

ROOT = Path(__file__).resolve().parent
FIELDS = ("inputs", "raw_scores", "truncate", "truncation_direction")
ROUTES = "POST /predict, GET /health, GET /info, GET /"


class RequestError(Exception):
    """A request the server refuses or cannot answer: its HTTP status, one line, and the kind of error
    (text-embeddings-inference's error_type: Validation, Overloaded, Unhealthy, Backend)."""

    def __init__(self, status, message, kind="Validation"):
        super().__init__(message)
        self.status, self.kind = status, kind


# ---------------------------------------------------------------------------------------------
# the model being served


@dataclass
class Served:
    """What answers: the model (PyTorch, or ONNX Runtime's session), its tokenizer, the process (device,
    precision), the config as the checkpoint was trained, and how it decides (labels, thresholds)."""
    cfg: dict
    model: object
    tokenizer: object
    proc: object
    kind: str  # pytorch, onnx_fp32 or onnx_int8
    names: list = None  # None: regression
    thresholds: np.ndarray = None  # multi-label only
    temperature: object = 1.0  # the checkpoint's (module.calibrate): a number, or one per label


def load_served(cfg):
    """The model of model.model_path, read as prediction reads it (use_checkpoint_settings)."""
    path = cfg["model"]["model_path"]
    if path is None:
        raise ConfigError("model.model_path is null: pass the checkpoint or export folder to serve, e.g. "
                          "--model.model_path checkpoints/best")
    if not Path(path).exists():
        raise ConfigError(f"model.model_path {path}: no such file or folder")
    if torchrun_launch().launched:
        raise ConfigError("serve.py is one process: start it with python, not torchrun")
    exported = is_export_dir(path)
    check_artifact(cfg)
    note = use_checkpoint_settings(cfg)
    if note is not None:
        print(f"note: {note}")
    if cfg["serve"]["max_batch_tokens"] < cfg["module"]["max_seq_len"]:
        raise ConfigError(f"serve.max_batch_tokens {cfg['serve']['max_batch_tokens']} cannot hold one text of "
                          f"module.max_seq_len {cfg['module']['max_seq_len']} tokens; raise it")
    # no progress bars in a server: the worker runs predict_logits as a process that is not the main one
    proc = replace(this_process(cfg["trainer"]), is_main=False)
    if exported:  # ONNX Runtime on the CPU, in this process's threads (imported only for it)
        from export import ARTIFACTS, load_exported
        artifact = None if cfg["model"]["artifact"] == "auto" else cfg["model"]["artifact"]
        model, tokenizer = load_exported(path, threads=torch.get_num_threads(), artifact=artifact)
        proc, kind = replace(proc, device=torch.device("cpu"), amp_dtype=None), \
            next(name for name, file in ARTIFACTS.items() if Path(model.path).name == file)
    else:
        tokenizer = load_tokenizer(cfg["model"])
        model, kind = build_classifier(cfg, proc.device).eval(), "pytorch"  # as trainer.py predicts
    return Served(cfg, model, tokenizer, proc, kind, label_names(cfg), fixed_thresholds(cfg), temperature_of(cfg))


def token_batches(lengths, max_rows, max_tokens):
    """Index arrays of the forward passes, longest rows first (evaluation sorts so too): each at most
    max_rows rows and max_tokens tokens once padded (rows x its longest row)."""
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        rows = max(1, min(max_rows, max_tokens // max(1, int(lengths[order[start]]))))
        batches.append(order[start:start + rows])
        start += rows
    return batches


def encode_request(served, request):
    """A request's token ids, read as the checkpoint was trained, unless its truncate says otherwise."""
    cfg, tokenizer = served.cfg, served.tokenizer
    max_len = cfg["module"]["max_seq_len"]
    stride = None if request.truncate else window_stride(cfg["data"])
    examples = Examples("inputs", [], None, request.texts_a, request.texts_b, None)
    if request.truncate is False and stride is None:  # never cut: a text too long for the model is refused
        lengths = [len(ids) for ids in tokenizer(request.texts_a, request.texts_b, verbose=False,
                                                 return_attention_mask=False)["input_ids"]]
        too_long = next((i for i, n in enumerate(lengths) if n > max_len), None)
        if too_long is not None:
            raise RequestError(413, f"inputs[{too_long}] is {lengths[too_long]} tokens, more than module.max_seq_len "
                                    f"{max_len}; send truncate true to cut it as training did, or a shorter text")
    try:
        return encode(tokenizer, examples, max_len, stride=stride)
    except DataError as e:  # a pair whose first text leaves no room for windows of the second
        raise RequestError(422, str(e)) from None


def run_model(served, encoded, serve_cfg):
    """Per-document logits of encoded (windows pooled as prediction pools them), in forward passes cut
    by serve.max_batch_size and serve.max_batch_tokens. Returns (logits, number of forward passes)."""
    batches = token_batches(encoded.lengths, serve_cfg["max_batch_size"], serve_cfg["max_batch_tokens"])
    logits = predict_logits(served.model, encoded, serve_cfg["max_batch_size"], served.tokenizer.pad_token_id,
                            served.proc, desc="serve", batches=batches)
    return document_logits(logits, encoded, served.cfg), len(batches)


def answers(served, logits, request):
    """The JSON answer of a request from its texts' logits: every label, highest first; multi-label
    entries also say their threshold and whether the label is predicted (decided on probabilities)."""
    names, thresholds = served.names, served.thresholds
    if names is None:  # regression: one score, named as data.labels_list names it
        out = [[{"label": str(served.cfg["data"]["labels_list"][0]), "score": float(row[0])}] for row in logits]
        return out[0] if request.single else out
    probabilities = scores_of(logits, names, thresholds, served.temperature)
    scores = logits if request.raw_scores else probabilities
    out = []
    for row, probs in zip(scores, probabilities):
        entries = []
        for i in np.argsort(-probs, kind="stable"):
            entry = {"label": names[i], "score": float(row[i])}
            if thresholds is not None:
                entry.update(threshold=float(thresholds[i]), predicted=bool(probs[i] >= thresholds[i]))
            entries.append(entry)
        out.append(entries)
    return out[0] if request.single else out


# ---------------------------------------------------------------------------------------------
# requests


@dataclass
class PredictRequest:
    texts_a: list
    texts_b: list  # None: single texts
    raw_scores: bool = False
    truncate: bool = None  # None: as the checkpoint was trained
    single: bool = False  # inputs was one text: the answer is one list, not a list of lists


def read_request(body, serve_cfg):
    """A /predict body as a PredictRequest, or a RequestError saying in one line what is wrong."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(400, f"the body is not JSON ({first_line(e)[:100]}); send {{\"inputs\": \"a text\"}}") from None
    if not isinstance(payload, dict):
        raise RequestError(422, "the body must be a JSON object, e.g. {\"inputs\": \"a text\"}")
    unknown = [name for name in payload if name not in FIELDS]
    if unknown:
        raise RequestError(422, f"unknown field {unknown[0]!r}; /predict takes {', '.join(FIELDS)}")
    if "inputs" not in payload:
        raise RequestError(422, "no inputs: send {\"inputs\": \"a text\"}, a list of texts or of [text, text] pairs")
    texts_a, texts_b = read_inputs(payload["inputs"], serve_cfg)
    raw_scores, truncate = payload.get("raw_scores", False), payload.get("truncate")
    if not isinstance(raw_scores, bool):
        raise RequestError(422, f"raw_scores is {json.dumps(raw_scores)[:40]}; it must be true or false")
    if truncate is not None and not isinstance(truncate, bool):
        raise RequestError(422, f"truncate is {json.dumps(truncate)[:40]}; it must be true, false or left out")
    direction = payload.get("truncation_direction", "right")
    if not isinstance(direction, str) or direction.lower() != "right":
        raise RequestError(422, f"truncation_direction {json.dumps(direction)[:40]} is not served: the model was "
                                f"trained on texts cut on the right; send right, or leave it out")
    return PredictRequest(texts_a, texts_b, raw_scores, truncate, single=isinstance(payload["inputs"], str))


def read_inputs(inputs, serve_cfg):
    """(first texts, second texts or None) of inputs: a text, a list of texts, or a list of [text, text]."""
    items = [inputs] if isinstance(inputs, str) else inputs
    if not isinstance(items, list) or not items:
        raise RequestError(422, "inputs must be a text, a non-empty list of texts, or a list of [text, text] pairs")
    if len(items) > serve_cfg["max_inputs"]:
        raise RequestError(413, f"{len(items)} inputs in one request, more than serve.max_inputs "
                                f"{serve_cfg['max_inputs']}; send them in several requests")
    pairs = isinstance(items[0], list)
    for i, item in enumerate(items):
        if pairs and not (isinstance(item, list) and len(item) == 2 and all(isinstance(t, str) for t in item)):
            raise RequestError(422, f"inputs[{i}] is not a pair of two texts; inputs are all texts or all [text, text] pairs")
        if not pairs and not isinstance(item, str):
            raise RequestError(422, f"inputs[{i}] is {json_type(item)}, not a text; inputs are all texts or all "
                                    f"[text, text] pairs")
        for j, text in enumerate(item if pairs else [item]):
            where = f"inputs[{i}][{j}]" if pairs else f"inputs[{i}]"
            if not text.strip():
                raise RequestError(422, f"{where} is empty")
            if len(text) > serve_cfg["max_chars"]:
                raise RequestError(413, f"{where} has {len(text)} characters, more than serve.max_chars "
                                        f"{serve_cfg['max_chars']}")
    if pairs:
        return [a for a, _ in items], [b for _, b in items]
    return list(items), None


def json_type(value):
    """What a JSON value is, in JSON's words."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    return {int: "a number", float: "a number", dict: "an object", list: "a list"}.get(type(value), "a text")


async def read_body(request, limit):
    """The request body, refused with 413 as soon as it passes limit bytes (never held whole)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"the body is {declared} bytes, more than serve.max_body_bytes {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, f"the body is more than serve.max_body_bytes {limit} bytes")
    return bytes(body)


# ---------------------------------------------------------------------------------------------
# dynamic batching: one worker thread owns the model


@dataclass
class Job:
    request: PredictRequest
    future: Future = field(default_factory=Future)

    @property
    def size(self):
        return len(self.request.texts_a)


class Batcher:
    """The queue of requests and the worker thread that answers them, a batch at a time."""

    def __init__(self, served, serve_cfg):
        self.served, self.cfg = served, serve_cfg
        self.waiting, self.queued = collections.deque(), 0  # jobs, and their texts
        self.lock = threading.Condition()
        self.stopping = False
        self.stats = {"requests": 0, "texts": 0, "batches": 0, "forward_passes": 0}
        self.thread = threading.Thread(target=self.work, name="serve-worker", daemon=True)

    def start(self):
        self.thread.start()

    def stop(self):
        """The worker answers what is queued, then ends."""
        with self.lock:
            self.stopping = True
            self.lock.notify()
        self.thread.join()

    def healthy(self):
        return self.thread.is_alive() and not self.stopping

    def submit(self, request):
        """Queue a request: a future of its texts' logits. Refused (429) when the queue is full."""
        job = Job(request)
        with self.lock:
            if self.stopping or not self.thread.is_alive():
                raise RequestError(503, "the server is shutting down, or its model's worker has stopped", "Unhealthy")
            if self.queued + job.size > self.cfg["max_queue"]:
                raise RequestError(429, f"{self.queued} texts are waiting (serve.max_queue {self.cfg['max_queue']}); "
                                        f"retry later", "Overloaded")
            self.waiting.append(job)
            self.queued += job.size
            self.lock.notify()
        return job.future

    def next_jobs(self):
        """The jobs of the next batch: the first to arrive, then those that fit in serve.max_batch_size
        texts, waiting at most serve.max_wait_ms for more. None once stopping and all are answered."""
        limit = self.cfg["max_batch_size"]
        with self.lock:
            while not self.waiting and not self.stopping:
                self.lock.wait()
            if not self.waiting:
                return None
            jobs = [self.waiting.popleft()]
            texts, deadline = jobs[0].size, time.monotonic() + self.cfg["max_wait_ms"] / 1000
            while True:
                while self.waiting and texts + self.waiting[0].size <= limit:
                    jobs.append(self.waiting.popleft())
                    texts += jobs[-1].size
                remaining = deadline - time.monotonic()
                # a full batch, or a request that waits for the next one, or no time left: run it
                if texts >= limit or self.waiting or self.stopping or remaining <= 0:
                    break
                self.lock.wait(remaining)
            self.queued -= texts
        return jobs

    def work(self):
        while (jobs := self.next_jobs()) is not None:
            # a request whose client went away is not run
            self.run([job for job in jobs if job.future.set_running_or_notify_cancel()])

    def run(self, jobs):
        """Tokenize each request (its own errors fail it alone), run them all as one batch, answer each."""
        parts = []
        for job in jobs:
            try:
                parts.append((job, encode_request(self.served, job.request)))
            except RequestError as e:
                job.future.set_exception(e)
        if not parts:
            return
        try:
            encoded = parts[0][1] if len(parts) == 1 else Encoded.concat([part for _, part in parts])
            logits, passes = run_model(self.served, encoded, self.cfg)
        except Exception as e:  # noqa: BLE001 (the model's failure is this batch's, the server goes on)
            traceback.print_exc()
            for job, _ in parts:
                job.future.set_exception(RequestError(500, f"the model failed on this batch: {first_line(e)[:200]}",
                                                      "Backend"))
            return
        # counted before the answers go out: a client that asks /info next sees its batch
        self.stats = {"requests": self.stats["requests"] + len(parts), "texts": self.stats["texts"] + len(logits),
                      "batches": self.stats["batches"] + 1, "forward_passes": self.stats["forward_passes"] + passes}
        start = 0
        for job, part in parts:
            job.future.set_result(logits[start:start + part.num_documents])
            start += part.num_documents


# ---------------------------------------------------------------------------------------------
# the HTTP application


def create_app(served, serve_cfg):
    """The FastAPI application: its routes, its error answers, and the batcher its lifespan runs."""
    batcher = Batcher(served, serve_cfg)
    info = describe(served, serve_cfg)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:  # after the server's own drain: every request in flight was answered
            batcher.stop()

    # no /docs: its page loads scripts from a CDN, and this server answers offline
    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher

    @app.exception_handler(RequestError)
    async def refused(request, error):
        return JSONResponse({"error": str(error), "error_type": error.kind}, status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, error):
        message = (f"no route {request.method} {request.url.path}; routes: {ROUTES}" if error.status_code in (404, 405)
                   else str(error.detail))
        return JSONResponse({"error": message, "error_type": "Validation"}, status_code=error.status_code)

    @app.post("/predict")
    async def predict(request: Request):
        payload = read_request(await read_body(request, serve_cfg["max_body_bytes"]), serve_cfg)
        logits = await asyncio.wrap_future(batcher.submit(payload))
        return JSONResponse(answers(served, logits, payload))

    @app.get("/health")
    async def health():
        if batcher.healthy():
            return {"status": "ok"}
        return JSONResponse({"error": "the model's worker is not running", "error_type": "Unhealthy"}, status_code=503)

    @app.get("/info")
    async def about():
        return {**info, "served": batcher.stats}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE, headers={"Content-Security-Policy": PAGE_POLICY})

    return app


def describe(served, serve_cfg):
    """GET /info: text-embeddings-inference's fields (model_id, model_type, max_input_length, ...) and ours."""
    cfg, names = served.cfg, served.names
    path = cfg["model"]["model_path"]
    labels = names if names is not None else [str(cfg["data"]["labels_list"][0])]
    info = {"model_id": str(path), "model_type": {"classifier": {"id2label": dict(enumerate(labels)),
                                                                 "label2id": {n: i for i, n in enumerate(labels)}}},
            "max_input_length": cfg["module"]["max_seq_len"], "max_batch_tokens": serve_cfg["max_batch_tokens"],
            "max_client_batch_size": serve_cfg["max_inputs"], "version": version(),
            "task": task_of(cfg["data"]), "labels": labels, "model": served.kind,
            "device": str(served.proc.device),
            "long_texts": {key: cfg["data"][key] for key in ("long_texts", "window_stride", "window_pool")},
            "batching": {key: serve_cfg[key] for key in ("max_batch_size", "max_batch_tokens", "max_wait_ms", "max_queue")},
            "limits": {key: serve_cfg[key] for key in ("max_inputs", "max_chars", "max_body_bytes")}}
    if served.thresholds is not None:
        info["thresholds"] = dict(zip(names, map(float, served.thresholds)))
    if names is not None:
        info["temperature"] = served.temperature
    manifest = read_export_manifest(path)
    if manifest is not None:  # an export folder: the checkpoint it came from, and how its models passed the gate
        info["source"] = manifest.get("source")
        try:
            info["gate"] = json.loads((Path(path) / "export_report.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            info["gate"] = None
    return info


def version():
    """serve.py and the commit of this code, when it is a git checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return f"serve.py {commit}"


# ---------------------------------------------------------------------------------------------
# the command


def listening_socket(host, port):
    """The server's socket, bound before the model loads, so a taken port is one line at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP said, not left 0: asyncio sets TCP_NODELAY only on connections of a socket that says it;
    # without it each small answer waits for the client's delayed ACK (bench/README.md, serving)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"serve.host {host} serve.port {port}: cannot listen there ({e.strerror}); choose "
                          f"another --serve.port, or a host of this machine") from None
    return sock


def serve_forever(app, sock, serve_cfg):
    """Run the server until SIGTERM or Ctrl-C, then let the requests in flight finish: exit status 0."""
    # uvicorn raises the signal again once it has drained: handled here, the process then ends with 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=30))
    print(f"serving on http://{serve_cfg['host']}:{serve_cfg['port']} (SIGTERM or Ctrl-C: answer the requests in "
          f"flight, then stop)", flush=True)
    server.run(sockets=[sock])
    print(f"stopped; served {app.state.batcher.stats}", flush=True)
    return 0


def main(argv=None):
    """Command-line entry point: one clear line and exit status 2 on any user error."""
    argv = sys.argv[1:] if argv is None else argv
    if answer_help(argv, __doc__):
        return 0
    cfg, sock = None, None
    try:
        cfg = load_config(argv)
        sock = listening_socket(cfg["serve"]["host"], cfg["serve"]["port"])
        served = load_served(cfg)
        print(f"serving {cfg['model']['model_path']} ({served.kind}, device {served.proc.device})", flush=True)
        app = create_app(served, cfg["serve"])
    except (ConfigError, DataError, ModelError, OutputError) as e:
        if sock is not None:
            sock.close()
        if cfg is not None and cfg["trainer"]["debug"]:
            raise
        sys.stderr.write(f"error: {e}\n")
        return 2
    return serve_forever(app, sock, cfg["serve"])


# ---------------------------------------------------------------------------------------------
# GET /: type a text, see its labels as bars (no script or style from elsewhere)

PAGE_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
               "base-uri 'none'; form-action 'none'")
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>classifier</title>
<style>
body { font: 15px system-ui, sans-serif; max-width: 44rem; margin: 2rem auto; padding: 0 1rem; color: #222 }
textarea { width: 100%; height: 5rem; font: inherit; box-sizing: border-box; margin-bottom: .4rem }
.row { display: grid; grid-template-columns: 11rem 1fr 5rem; gap: .6rem; align-items: center; margin: .3rem 0 }
.track { background: #eee; height: 1.1rem; position: relative }
.bar { background: #4a7fd6; height: 100% }
.row.predicted .name { font-weight: bold }
.tick { position: absolute; top: -.2rem; bottom: -.2rem; width: 2px; background: #c33 }
#error { color: #b00 } small { color: #666 }
</style></head><body>
<h1>classifier</h1><p><small id="about">loading ...</small></p>
<textarea id="text" placeholder="a text to classify"></textarea>
<textarea id="text_b" placeholder="second text, for a model of sentence pairs (else leave empty)"></textarea>
<button id="go">Classify</button> <small>(Ctrl+Enter)</small>
<div id="result"></div><p id="error"></p>
<script>
const $ = (id) => document.getElementById(id);
fetch("/info").then((r) => r.json()).then((info) => {
  $("about").textContent = `${info.model_id}: ${info.task}, ${info.model}, up to ${info.max_input_length} tokens`;
});
function render(entries) {
  $("result").replaceChildren(...entries.map((entry) => {
    const row = document.createElement("div"), name = document.createElement("span");
    const track = document.createElement("div"), bar = document.createElement("div");
    const score = document.createElement("span");
    row.className = "row" + (entry.predicted ? " predicted" : "");
    row.dataset.label = entry.label;
    row.dataset.score = entry.score;
    name.className = "name";
    name.textContent = entry.label;
    track.className = "track";
    bar.className = "bar";
    bar.style.width = (100 * Math.min(1, Math.max(0, entry.score))).toFixed(2) + "%";
    track.append(bar);
    if (entry.threshold !== undefined) {
      const tick = document.createElement("div");
      tick.className = "tick";
      tick.style.left = (100 * entry.threshold).toFixed(2) + "%";
      track.append(tick);
    }
    score.className = "score";
    score.textContent = entry.score.toFixed(4) + (entry.predicted ? " \u2713" : "");
    row.append(name, track, score);
    return row;
  }));
}
async function classify() {
  $("error").textContent = "";
  const a = $("text").value, b = $("text_b").value;
  const response = await fetch("/predict", {method: "POST", headers: {"content-type": "application/json"},
                                            body: JSON.stringify({inputs: b.trim() ? [[a, b]] : a})});
  const answer = await response.json();
  if (!response.ok) { $("result").replaceChildren(); $("error").textContent = answer.error; return; }
  render(Array.isArray(answer[0]) ? answer[0] : answer);
}
$("go").addEventListener("click", classify);
document.addEventListener("keydown", (e) => { if (e.key === "Enter" && e.ctrlKey) classify(); });
</script></body></html>
"""


if __name__ == "__main__":
    sys.exit(main())
