"""`tokenfuse serve` under a refusal storm, driven by wrk (an efficient C load generator; Debian's
`wrk`), beside scripts/serve_load.py's Python generator:

    python scripts/serve_wrk.py out/minilm.onnx --out docs/serving-wrk-minilm-ort-cpu.json

It starts `tokenfuse serve MODEL` on a free loopback port (--max-batch 32 --queue-size 256
--max-queue-delay-ms 2000 unless given after `--`), then runs wrk (one thread, scripts/serve_wrk.lua:
POST /v1/embeddings with 1 to 3 texts of 3 to 60 words; clients that ignore Retry-After) for
--seconds at each connection count in --connections (8 saturates the service; 80 and 400 are
10x and 50x that), and a last phase at the largest count with SIGTERM half-way. Per phase:
- goodput: requests answered 200 per second, and against the first phase's;
- answered latency p50/p99: the service's own histogram of 200 answers (tokenfuse_request_seconds
  from /metrics, before and after the phase; interpolated within its buckets);
- refusals by status (wrk's Lua tally), and wrk's socket errors (a read error is a connection
  dropped mid-response);
- /health, probed from this process every 0.05 s on the service's --health-port (a thread of its own)
  and on the main port (behind the event loop): p50/p99/max each.
SIGTERM phase: the service must exit 0; connect errors after it stopped listening are expected,
read errors are dropped connections.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from tokenfuse.engines.bench import machine

ROOT = Path(__file__).resolve().parents[1]
LUA = ROOT / "scripts" / "serve_wrk.lua"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def answered_histogram(port: int) -> dict[float, float]:
    """Cumulative counts of 200 answers by bucket bound, over every route, from /metrics."""
    counts: dict[float, float] = {}
    for line in get(port, "/metrics")[1].decode().splitlines():
        match = re.match(r'tokenfuse_request_seconds_bucket\{endpoint="([^"]+)",le="([^"]+)",status="200"\} (\S+)', line)
        if match and match.group(1) != "metrics":
            bound = float("inf") if match.group(2) == "+Inf" else float(match.group(2))
            counts[bound] = counts.get(bound, 0.0) + float(match.group(3))
    return counts


def batch_seconds(port: int) -> tuple[float, float]:
    """(sum, count) of the service's model calls so far (tokenfuse_batch_seconds)."""
    text = get(port, "/metrics")[1].decode()
    total = sum(float(v) for v in re.findall(r"^tokenfuse_batch_seconds_sum\{[^}]*\} (\S+)", text, re.M))
    count = sum(float(v) for v in re.findall(r"^tokenfuse_batch_seconds_count\{[^}]*\} (\S+)", text, re.M))
    return total, count


def quantile(before: dict, after: dict, q: float) -> float | None:
    """The q-quantile of the answers between two histogram readings, linear within a bucket."""
    bounds = sorted(after)
    cumulative = [after[b] - before.get(b, 0.0) for b in bounds]
    if not cumulative or cumulative[-1] <= 0:
        return None
    target, previous_bound, previous = q * cumulative[-1], 0.0, 0.0
    for bound, count in zip(bounds, cumulative):
        if count >= target:
            if bound == float("inf"):
                return previous_bound
            return previous_bound + (bound - previous_bound) * (target - previous) / max(count - previous, 1e-12)
        previous_bound, previous = bound, count
    return previous_bound


class HealthProbe(threading.Thread):
    def __init__(self, port: int, period: float = 0.05):
        super().__init__(daemon=True)
        self.port, self.period, self.samples, self.failures = port, period, [], 0
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.is_set():
            started = time.perf_counter()
            try:
                get(self.port, "/health", timeout=5)
                self.samples.append(time.perf_counter() - started)
            except OSError:
                self.failures += 1
            self.stopped.wait(self.period)

    def summary(self) -> dict:
        ordered = sorted(self.samples)
        pick = (lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3) if ordered else (lambda q: None)
        return {"probes": len(ordered), "failed": self.failures, "p50_ms": pick(0.5), "p99_ms": pick(0.99),
                "max_ms": ordered[-1] * 1e3 if ordered else None}


def wrk(port: int, connections: int, seconds: float, model: str) -> subprocess.Popen:
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:.0f}s", "--timeout", "15s", "-s", str(LUA), f"http://127.0.0.1:{port}"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "TOKENFUSE_MODEL": model})


def wrk_result(process: subprocess.Popen) -> dict:
    output = process.communicate()[0]
    line = next((line for line in output.splitlines() if line.startswith("WRK_RESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result:\n{output[-2000:]}")
    return json.loads(line[len("WRK_RESULT "):])


def phase(port: int, health_port: int, connections: int, seconds: float, model: str, server: subprocess.Popen | None = None) -> dict:
    """One load phase; with `server`, SIGTERM half-way through."""
    before, calls_before = answered_histogram(port), batch_seconds(port)
    probes = {"health_port": HealthProbe(health_port), "main_port": HealthProbe(port)}
    for probe in probes.values():
        probe.start()
    started = time.perf_counter()
    load = wrk(port, connections, seconds, model)
    exit_code = None
    if server is not None:
        time.sleep(seconds / 2)
        server.send_signal(signal.SIGTERM)
        exit_code = server.wait(timeout=seconds + 60)
    result = wrk_result(load)
    elapsed = time.perf_counter() - started
    for probe in probes.values():
        probe.stopped.set()
        probe.join()
    answered = result["statuses"].get("200", 0)
    row = {"connections": connections, "seconds": round(elapsed, 1), "answered": answered, "goodput_per_s": answered / seconds,
           "statuses": result["statuses"], "socket_errors": result["errors"],
           "health": {where: probe.summary() for where, probe in probes.items()}}
    if server is None:
        after, calls_after = answered_histogram(port), batch_seconds(port)
        calls = calls_after[1] - calls_before[1]
        row["mean_batch_ms"] = (calls_after[0] - calls_before[0]) / calls * 1e3 if calls else None
        row["answered_latency_ms"] = {f"p{int(q * 100)}": (lambda v: v and v * 1e3)(quantile(before, after, q)) for q in (0.5, 0.99)}
    else:
        row["exit_code"] = exit_code
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="an .onnx (or .engine) written by tokenfuse export, text model")
    parser.add_argument("--connections", default="8,80,400")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("serve_options", nargs="*", help="after --: options for tokenfuse serve")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install wrk")
    port, health_port, name = free_port(), free_port(), "model"
    options = args.serve_options or ["--max-batch", "32", "--queue-size", "256", "--max-queue-delay-ms", "2000"]
    command = [sys.executable, "-c", "import sys; from tokenfuse.cli import main; sys.exit(main())", "serve", f"{name}={args.model}",
               "--port", str(port), "--health-port", str(health_port), *options]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        for _ in range(600):
            try:
                if get(port, "/health", timeout=1)[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        else:
            raise SystemExit("the service did not come up")
        counts = [int(c) for c in args.connections.split(",")]
        phases = []
        for connections in counts:
            phases.append(phase(port, health_port, connections, args.seconds, name))
            print(json.dumps(phases[-1]), flush=True)
        phases.append({"sigterm": True, **phase(port, health_port, max(counts), args.seconds, name, server=server)})
        print(json.dumps(phases[-1]), flush=True)
    finally:
        if server.poll() is None:
            server.kill()
    first = phases[0]["goodput_per_s"]
    for row in phases:
        row["goodput_vs_first"] = row["goodput_per_s"] / first if first else None
    env = {**machine(), "wrk": subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.splitlines()[0]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(["python scripts/serve_wrk.py", args.model, "--out", str(args.out)]),
                                    "serve_options": options, "machine": env, "phases": phases}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
