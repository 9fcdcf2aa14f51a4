"""`tokenfuse serve` under load, on loopback: saturation throughput against `tokenfuse bench`,
latency of answered requests at 1x, 2x and 10x the saturation rate, refusals, /health latency,
and SIGTERM under load.

    tokenfuse bench out/minilm.onnx --batch 32 --json out/bench-minilm-32.json
    .venv/bin/python scripts/serve_load.py out/minilm.onnx --bench-json out/bench-minilm-32.json \\
        --out docs/serving-minilm-ort-cpu.json

It starts `tokenfuse serve MODEL` itself on a free loopback port and drives it with aiohttp (from
tritonclient[http]), requests of one to three texts on /v1/embeddings:
The service runs with --max-queue-delay-ms 3x bench's p50 call time unless given, so the bound is a
few batches on whatever speed the machine has.
1. saturation: `--clients` closed-loop clients (each waits Retry-After when refused) for
   `--seconds`; examples/s answered is compared with bench's batch-`--max-batch` throughput;
2. open loop at 1x, 2x and 10x that request rate for `--seconds` each (arrivals at fixed
   intervals, at most `--max-requests` per phase); p50/p99 of the answered (200) requests, counts
   of 429 and 503, and /health probed every 100 ms;
3. SIGTERM after half of a 2x phase: every request sent before it must get an HTTP answer (a
   transport error counts as lost), later ones 503 (or a refused connection once it has exited),
   and the process must exit 0.
Bounded: every phase stops after `--seconds` or `--max-requests`, whichever comes first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np

WORDS = ("token merging keeps the transformer accurate while it drops redundant tokens from every layer of the encoder so "
         "that batches of sentences run faster on small machines and the embeddings stay close to the original model").split()


def texts(rng: random.Random) -> list[str]:
    """One to three sentences of 8 to 60 words."""
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 60))) for _ in range(rng.randint(1, 3))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int) -> subprocess.Popen:
    command = [sys.executable, "-c", "import sys; from tokenfuse.cli import main; sys.exit(main())", "serve", f"model={args.model}",
               "--port", str(port), "--max-batch", str(args.max_batch), "--queue-size", str(args.queue_size),
               "--max-queue-delay-ms", str(args.max_queue_delay_ms)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


async def wait_ready(url: str, process: subprocess.Popen):
    async with aiohttp.ClientSession() as session:
        for _ in range(600):
            if process.poll() is not None:
                raise SystemExit(f"the server exited: {process.stderr.read()}")
            try:
                async with session.get(f"{url}/health") as reply:
                    if reply.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
        for _ in range(3):  # warm-up
            async with session.post(f"{url}/v1/embeddings", json={"model": "model", "input": ["warm up"] * 32}) as reply:
                assert reply.status == 200, await reply.text()


async def one_request(session, url: str, body: dict, records: list, sent_at: float) -> float:
    """Send one request and record its answer; returns the Retry-After it got (0 if none)."""
    try:
        async with session.post(f"{url}/v1/embeddings", json=body) as reply:
            await reply.read()
            records.append({"sent": sent_at, "status": reply.status, "seconds": time.perf_counter() - sent_at, "examples": len(body["input"])})
            return float(reply.headers.get("Retry-After", 0))
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        records.append({"sent": sent_at, "status": type(exc).__name__, "seconds": time.perf_counter() - sent_at, "examples": len(body["input"])})
        return 0.0


async def probe_health(session, url: str, stop: asyncio.Event, latencies: list):
    while not stop.is_set():
        started = time.perf_counter()
        try:
            async with session.get(f"{url}/health") as reply:
                await reply.read()
            latencies.append((time.perf_counter() - started) * 1e3)
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)


def session(limit: int = 0) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit), timeout=aiohttp.ClientTimeout(total=120))


async def closed_loop(url: str, clients: int, seconds: float, rng: random.Random) -> dict:
    records: list = []
    deadline = time.perf_counter() + seconds

    async def client():
        while time.perf_counter() < deadline:  # a polite client: it waits as long as Retry-After says
            await asyncio.sleep(await one_request(http, url, {"model": "model", "input": texts(rng)}, records, time.perf_counter()))

    async with session() as http:
        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - started
    ok = [r for r in records if r["status"] == 200]
    return {"clients": clients, "seconds": elapsed, "requests": len(records), "answered_200": len(ok),
            "requests_per_s": len(ok) / elapsed, "examples_per_s": sum(r["examples"] for r in ok) / elapsed,
            "statuses": _counts(records)}


async def open_loop(url: str, rate: float, seconds: float, max_requests: int, rng: random.Random, on_half=None) -> dict:
    """Requests at fixed intervals of 1/rate, whatever the answers; on_half() is called half-way."""
    records, health, tasks = [], [], []
    stop = asyncio.Event()
    count = min(max_requests, int(rate * seconds))
    async with session() as http, session() as probe_session:
        probe = asyncio.create_task(probe_health(probe_session, url, stop, health))
        started = time.perf_counter()
        for i in range(count):
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if on_half and i == count // 2:
                on_half()
            tasks.append(asyncio.create_task(one_request(http, url, {"model": "model", "input": texts(rng)}, records, time.perf_counter())))
        sending = time.perf_counter() - started
        await asyncio.gather(*tasks)
        stop.set()
        await probe
    ok = sorted(r["seconds"] * 1e3 for r in records if r["status"] == 200)
    return {
        "offered_requests_per_s": rate, "sent": len(records), "sending_seconds": sending,
        "statuses": _counts(records),
        "answered_p50_ms": float(np.percentile(ok, 50)) if ok else None,
        "answered_p99_ms": float(np.percentile(ok, 99)) if ok else None,
        # from the first request sent to the last answer received
        "answered_examples_per_s": sum(r["examples"] for r in records if r["status"] == 200)
        / (max(r["sent"] + r["seconds"] for r in records) - started),
        "health_ms": {"probes": len(health), "p50": float(np.percentile(health, 50)) if health else None,
                      "p99": float(np.percentile(health, 99)) if health else None, "max": max(health) if health else None},
        "_records": records,
    }


def _counts(records) -> dict:
    counts: dict = {}
    for r in records:
        counts[str(r["status"])] = counts.get(str(r["status"]), 0) + 1
    return counts


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="an .onnx written by tokenfuse export")
    parser.add_argument("--bench-json", required=True, help="`tokenfuse bench MODEL --batch N --json FILE` for the same model and --max-batch")
    parser.add_argument("--out", required=True, help="where the JSON results go")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--queue-size", type=int, default=256)
    parser.add_argument("--max-queue-delay-ms", type=float, help="default: 3x bench's p50 call at --max-batch (a few batches of waiting)")
    parser.add_argument("--clients", type=int, default=64, help="closed-loop clients for the saturation phase (default 64)")
    parser.add_argument("--seconds", type=float, default=15, help="length of each phase (default 15)")
    parser.add_argument("--max-requests", type=int, default=6000, help="most requests per phase (default 6000)")
    args = parser.parse_args(argv)

    bench = json.loads(Path(args.bench_json).read_text())
    row = next((r for r in bench["results"] if r["batch"] == args.max_batch), None)
    if row is None:
        raise SystemExit(f"{args.bench_json} has no batch {args.max_batch}; run tokenfuse bench --batch {args.max_batch}")
    if args.max_queue_delay_ms is None:
        args.max_queue_delay_ms = round(3 * row["merged"]["p50_ms"])
    rng = random.Random(0)
    report = {"model": Path(args.model).name, "settings": {k: v for k, v in vars(args).items() if k not in ("model", "out")},
              "machine": bench.get("machine"), "load_average_before": load_average(),
              "bench_examples_per_s": row["merged"]["throughput_per_s"]}

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_server(args, port)
    try:
        asyncio.run(wait_ready(url, process))
        saturation = asyncio.run(closed_loop(url, args.clients, args.seconds, rng))
        report["saturation"] = saturation
        report["service_over_bench"] = saturation["examples_per_s"] / report["bench_examples_per_s"]
        print(f"saturation: {saturation['examples_per_s']:.1f} examples/s ({saturation['requests_per_s']:.1f} req/s), "
              f"bench {report['bench_examples_per_s']:.1f}: {report['service_over_bench']:.0%}", flush=True)
        report["open_loop"] = {}
        for multiple in (1, 2, 10):
            phase = asyncio.run(open_loop(url, multiple * saturation["requests_per_s"], args.seconds, args.max_requests, rng))
            phase.pop("_records")
            report["open_loop"][f"{multiple}x"] = phase
            print(f"{multiple}x: {phase['statuses']} p50 {phase['answered_p50_ms']} ms p99 {phase['answered_p99_ms']} ms, "
                  f"/health p99 {phase['health_ms']['p99']:.1f} ms", flush=True)

        signalled = {}

        def terminate():
            signalled["at"] = time.perf_counter()
            process.send_signal(signal.SIGTERM)

        phase = asyncio.run(open_loop(url, 2 * saturation["requests_per_s"], args.seconds / 2, args.max_requests, rng, on_half=terminate))
        code = process.wait(120)
        exited = time.perf_counter()
        records = phase.pop("_records")
        before = [r for r in records if r["sent"] < signalled["at"]]
        after = [r for r in records if r["sent"] >= signalled["at"]]
        report["sigterm"] = {
            "sent_before": len(before), "statuses_before": _counts(before),
            "lost_before": sum(1 for r in before if not isinstance(r["status"], int)),
            "answered_200_after_signal": sum(1 for r in before if r["status"] == 200 and r["sent"] + r["seconds"] > signalled["at"]),
            "sent_after": len(after), "statuses_after": _counts(after),
            "exit_code": code, "seconds_to_exit": exited - signalled["at"],
            "stderr_tail": process.stderr.read()[-500:],
        }
        print(f"SIGTERM: {report['sigterm']}", flush=True)
    finally:
        if process.poll() is None:
            process.kill()
    report["load_average_after"] = load_average()
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
