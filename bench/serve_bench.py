"""Load test of serve.py on loopback: throughput and p50 / p99 latency of 1, 8 and 32 concurrent clients
that send one text per request, against the same model's offline batch rate and a naive server.

    python bench/serve_bench.py --model checkpoints/best
    python bench/serve_bench.py --model checkpoints/best-onnx --checkpoint checkpoints/best    # an export folder
    python bench/serve_bench.py --model checkpoints/best --requests 30 --seconds 10 --clients 1 4 --rounds 1   # a look

What runs, one after the other, each in the same number of CPU threads (--threads):
  offline  the model serve.py would load, in this process: evaluation.predict_logits over the texts in
           length-sorted batches of serve.max_batch_size, as trainer.py predicts: the rate a server
           cannot pass (median of --rounds)
  serve    serve.py in its own process on a free loopback port, its config's defaults but --threads
  naive    a FastAPI server in its own process whose route calls transformers' pipeline() once per
           request, one request at a time (a lock: pipeline calls from several threads at once share
           one tokenizer, which fails, and oversubscribe the cores)
Each server gets, for each count of clients, a closed loop: that many clients (asyncio tasks of one
httpx client, each on a connection of its own) send the texts in turn, one text a request, and send
the next as soon as the answer comes; after a warm-up of one request per client, --requests answers
or --seconds, whichever comes first. Latency is the client's, request sent to answer read. The
clients run in this process, on the same cores as the server: on a 2-core machine they take their
share, so compare the rows of one run, not runs of different machines.
"""
import argparse
import asyncio
import contextlib
import csv
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx
import numpy as np


def read_texts(path, column, rows):
    with open(path, newline="", encoding="utf-8") as f:
        texts = [row[column] for row, _ in zip(csv.DictReader(f), range(rows))]
    if not texts:
        sys.exit(f"error: {path}: no rows with a {column!r} column")
    return texts


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# offline: the same model, batched as prediction batches


def offline_rate(model, threads, texts, rounds):
    """Texts per second of serve.py's model through evaluation.predict_logits, batches of serve.max_batch_size."""
    import serve
    from config import load_config
    from evaluation import predict_logits
    cfg = load_config(["--model.model_path", model, "--trainer.num_threads", str(threads), "--trainer.device", "cpu"])
    served = serve.load_served(cfg)
    request = serve.PredictRequest(texts, None)
    rates = []
    for _ in range(rounds + 1):  # the first is a warm-up
        start = time.perf_counter()
        encoded = serve.encode_request(served, request)  # tokenizing is part of a server's work too
        predict_logits(served.model, encoded, cfg["serve"]["max_batch_size"], served.tokenizer.pad_token_id, served.proc)
        rates.append(len(texts) / (time.perf_counter() - start))
    return statistics.median(rates[1:]), rates[1:], cfg["serve"]["max_batch_size"]


# ---------------------------------------------------------------------------------------------
# the servers and the load


@contextlib.contextmanager
def server(command, port, log):
    """A server process until the block ends (then SIGTERM): its base URL once /health answers."""
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                sys.exit(f"error: the server stopped (exit status {process.returncode}); see {log}:\n"
                         + Path(log).read_text()[-2000:])
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                sys.exit(f"error: the server did not answer /health in 300 s; see {log}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


async def closed_loop(url, texts, clients, requests, seconds):
    """clients tasks that each send one text, await its answer, send the next: latencies and rate."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        async def one(i):
            start = time.perf_counter()
            response = await http.post("/predict", json={"inputs": texts[i % len(texts)]})
            response.raise_for_status()
            return time.perf_counter() - start

        await asyncio.gather(*(one(i) for i in range(clients)))  # warm-up: every connection opened
        latencies, sent = [], 0
        stop_at = time.perf_counter() + seconds
        started = time.perf_counter()

        async def client():
            nonlocal sent
            while sent < requests and time.perf_counter() < stop_at:
                sent += 1
                latencies.append(await one(sent))
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - started
    return {"clients": clients, "requests": len(latencies), "wall_s": round(wall, 2),
            "req_s": len(latencies) / wall, "p50_ms": 1000 * float(np.percentile(latencies, 50)),
            "p99_ms": 1000 * float(np.percentile(latencies, 99))}


def load_levels(url, texts, args):
    """closed_loop for each --clients, with the server's batches counted (serve.py's /info) where it has them."""
    rows = []
    for clients in args.clients:
        before = served_stats(url)
        row = asyncio.run(closed_loop(url, texts, clients, args.requests, args.seconds))
        after = served_stats(url)
        if before and after:  # texts per batch, warm-up included
            row["texts_per_batch"] = (after["texts"] - before["texts"]) / max(1, after["batches"] - before["batches"])
        rows.append(row)
        print(f"  {clients} clients: {row['req_s']:.1f} req/s, p50 {row['p50_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms",
              file=sys.stderr)
    return rows


def served_stats(url):
    try:
        return httpx.get(f"{url}/info", timeout=10).json().get("served")
    except (httpx.HTTPError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# the naive server: pipeline() once per request


def naive_main(checkpoint, port, threads):
    """A FastAPI route that calls pipeline() for each request's text, one request at a time."""
    import torch
    import uvicorn
    from fastapi import FastAPI
    from transformers import pipeline
    torch.set_num_threads(threads)
    classify = pipeline("text-classification", model=checkpoint, top_k=None, truncation=True, device="cpu")
    lock, app = threading.Lock(), FastAPI()

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.post("/predict")
    def predict(body: dict):
        with lock:
            return classify(body["inputs"])

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# ---------------------------------------------------------------------------------------------
# the command


def source_checkpoint(model):
    """The checkpoint behind model: itself, or an export folder's source (export.json)."""
    manifest = Path(model) / "export.json"
    if manifest.exists():
        return json.loads(manifest.read_text(encoding="utf-8"))["source"]
    return model


def commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def print_table(results):
    offline = results["offline_ex_s"]
    print(f"offline (predict_logits, batch {results['batch']}): {offline:.1f} texts/s")
    print("| server | clients | requests | req/s | x 1 client | x offline | p50 ms | p99 ms | texts / batch |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in ("serve", "naive"):
        rows = results[name]
        for row in rows:
            per_batch = f"{row['texts_per_batch']:.1f}" if "texts_per_batch" in row else "-"
            print(f"| {name} | {row['clients']} | {row['requests']} | {row['req_s']:.1f} "
                  f"| {row['req_s'] / rows[0]['req_s']:.2f}x | {row['req_s'] / offline:.0%} | {row['p50_ms']:.0f} "
                  f"| {row['p99_ms']:.0f} | {per_batch} |")
    serve_top, naive_top = results["serve"][-1], results["naive"][-1]
    print(f"at {serve_top['clients']} clients: serve.py {serve_top['req_s'] / results['serve'][0]['req_s']:.2f}x its one "
          f"client (target 2.5x), {serve_top['req_s'] / offline:.0%} of offline (target 70%), "
          f"{serve_top['req_s'] / naive_top['req_s']:.2f}x the naive server (target 3x), p99 {serve_top['p99_ms']:.0f} ms")
    print(f"{results['date']}, commit {results['commit']}, {results['texts']} texts of {results['data']}, "
          f"{results['threads']} threads, load average {results['load_average']}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="what serve.py serves: a checkpoint or an export folder")
    parser.add_argument("--checkpoint", help="the naive server's checkpoint (default: --model, or its export's source)")
    parser.add_argument("--data", default="data/tweets/test.csv", help="a CSV whose text column is sent")
    parser.add_argument("--text-col", default="text")
    parser.add_argument("--rows", type=int, default=1000, help="texts to send (in turn) and to predict offline")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=500, help="answers per count of clients, at most")
    parser.add_argument("--seconds", type=float, default=60, help="seconds per count of clients, at most")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of each model (trainer.num_threads)")
    parser.add_argument("--rounds", type=int, default=3, help="offline rounds (median)")
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--serve-option", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                        help="a serve.py option, e.g. --serve-option serve.max_wait_ms 0 (repeatable)")
    parser.add_argument("--naive-server", type=int, metavar="PORT", help=argparse.SUPPRESS)  # the naive server's own process
    args = parser.parse_args()
    if args.naive_server:
        return naive_main(args.checkpoint, args.naive_server, args.threads)
    texts = read_texts(args.data, args.text_col, args.rows)
    load_before = os.getloadavg()[0]
    offline, rounds, batch = offline_rate(args.model, args.threads, texts, args.rounds)
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit(), "model": args.model,
               "data": args.data, "texts": len(texts), "threads": args.threads, "batch": batch,
               "offline_ex_s": offline, "offline_rounds": rounds, "serve_options": args.serve_option}
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        command = [sys.executable, "serve.py", "--model.model_path", args.model, "--serve.port", str(port),
                   "--trainer.num_threads", str(args.threads), "--trainer.device", "cpu",
                   *sum(([f"--{key}", value] for key, value in args.serve_option), [])]
        print("serve.py ...", file=sys.stderr)
        with server(command, port, Path(tmp) / "serve.log") as url:
            results["serve"] = load_levels(url, texts, args)
        port = free_port()
        command = [sys.executable, str(Path(__file__).resolve()), "--model", args.model, "--naive-server", str(port),
                   "--threads", str(args.threads),
                   "--checkpoint", args.checkpoint or source_checkpoint(args.model)]
        print("naive pipeline() server ...", file=sys.stderr)
        with server(command, port, Path(tmp) / "naive.log") as url:
            results["naive"] = load_levels(url, texts, args)
    results["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
