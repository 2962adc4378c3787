"""``tensorq bench --http``: sync OIP inference through the gateway against
the HTTP floor, measured in one run by the same client.

The gateway (``tensorq gateway``, its own process) serves a local stack of
Redis and workers; the floor is a bare aiohttp server on uvloop (its own
process) that reads the same JSON body and answers a fixed OIP response,
with no Redis and no model. ``wrk`` (Debian package) drives each with
``--concurrency`` connections for ``WRK_SECONDS`` after a warm-up, when it
is installed: a Python load generator on a small machine eats the CPU it
measures (about half the gateway's throughput on two cores). Without wrk,
one aiohttp client on uvloop does, with ``--requests`` in all. It reports
requests/s and latency percentiles; the ratio gateway/floor is the figure
of merit (target >= 0.6).

python -m producer.bench.http floor --port 0   runs the floor server alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from common.aio import run
from common.runtime_env import MALLOC_ENV
from common.settings import Settings
from producer.bench.cpu_account import cpu_by_role, format_cpu, per_request_us
from producer.bench.reference import normal_priority
from producer.ops.stack import ensure_example_models, expected_workers, local_stack, tensorq_command

WARMUP = 2000
LISTENING = "listening on "


@dataclass(frozen=True)
class HttpFigures:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_us: dict[str, float]  # CPU microseconds per request, by process role

    @property
    def per_s(self) -> float:
        return self.requests / self.seconds


def run_http_bench(args: argparse.Namespace, settings: Settings) -> int:
    settings = settings.replace(worker=replace(settings.worker, threads=args.threads))
    ensure_example_models(settings)
    model = settings.model(args.model)
    env = {**MALLOC_ENV, "TQ_WORKER_THREADS": str(args.threads)}
    slots = expected_workers(args.devices) or 1
    print(
        f"tensorq bench --http: model {model.name}, {args.requests} sync OIP requests x "
        f"{args.rows} row(s), concurrency {args.concurrency}, devices {args.devices} "
        f"({slots} worker(s) x {args.threads} thread(s))",
        flush=True,
    )
    bodies = _bodies(model.inputs, args.rows)
    with local_stack(settings, devices=args.devices, extra_env=env) as stack:
        gateway_args = [
            "--log-level",
            "warning",
            "gateway",
            "--redis",
            stack.redis_url,
            "--port",
            "0",
        ]
        if settings.config_path is not None:
            gateway_args += ["--config", str(settings.config_path)]
        with (
            _server(tensorq_command(*gateway_args)) as gateway_url,
            _server(
                [sys.executable, "-m", "producer.bench.http", "floor", "--port", "0"]
            ) as floor_url,
        ):
            # The client stands in for callers on other machines: on a small box
            # it yields the CPU to the servers, workers and Redis.
            os.nice(args.producer_nice)
            path = f"/v2/models/{model.name}/infer"
            if shutil.which("wrk"):
                print("  load generator: wrk, 1 thread", flush=True)
                gateway = _drive_wrk(gateway_url + path, bodies[0], args.concurrency)
                floor = _drive_wrk(floor_url + path, bodies[0], args.concurrency)
            else:
                print("  load generator: aiohttp (install wrk for figures the client does "
                      "not eat into)", flush=True)  # fmt: skip
                gateway = run(_drive(gateway_url + path, bodies, args.requests, args.concurrency))
                floor = run(_drive(floor_url + path, bodies, args.requests, args.concurrency))
    ratio = gateway.per_s / floor.per_s
    print(
        f"  gateway (sync OIP infer)  {gateway.per_s:>8,.0f} req/s   p50 {gateway.p50_ms:.2f} ms"
        f"   p99 {gateway.p99_ms:.2f} ms   errors {gateway.errors}\n"
        f"  HTTP floor (fixed answer) {floor.per_s:>8,.0f} req/s   p50 {floor.p50_ms:.2f} ms"
        f"   p99 {floor.p99_ms:.2f} ms\n"
        f"  gateway/floor = {ratio:.2f}   (target >= 0.6)\n"
        f"  gateway run: CPU per request: {format_cpu(gateway.cpu_us)}\n"
        f"  floor run:   CPU per request: {format_cpu(floor.cpu_us)}",
        flush=True,
    )
    if args.json:
        figures = {
            "gateway_req_per_s": gateway.per_s,
            "gateway_p50_ms": gateway.p50_ms,
            "gateway_p99_ms": gateway.p99_ms,
            "gateway_errors": gateway.errors,
            "floor_req_per_s": floor.per_s,
            "floor_p50_ms": floor.p50_ms,
            "floor_p99_ms": floor.p99_ms,
            "ratio": ratio,
            "gateway_cpu_us_per_request": gateway.cpu_us,
            "floor_cpu_us_per_request": floor.cpu_us,
        }
        print(json.dumps(figures, indent=2))
    return 1 if gateway.errors else 0


def _bodies(inputs: Any, rows: int, count: int = 64) -> list[bytes]:
    """Pre-serialized OIP JSON bodies (built before any clock starts)."""
    from producer.bench.loadgen import random_inputs
    from producer.gateway.oip import WIRE_TO_OIP

    rng = np.random.default_rng(0)
    bodies = []
    for _ in range(count):
        arrays = random_inputs(inputs, rows, rng)
        tensors = [
            {
                "name": spec.name,
                "shape": list(arrays[spec.name].shape),
                "datatype": WIRE_TO_OIP[spec.dtype],
                "data": arrays[spec.name].reshape(-1).tolist(),
            }
            for spec in inputs
        ]
        bodies.append(json.dumps({"inputs": tensors}).encode())
    return bodies


async def _drive(url: str, bodies: list[bytes], requests: int, concurrency: int) -> HttpFigures:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=concurrency)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector) as session:

        async def run(count: int, latencies: list[float]) -> int:
            errors = 0
            issued = 0

            async def one_caller() -> None:
                nonlocal issued, errors
                while issued < count:
                    body = bodies[issued % len(bodies)]
                    issued += 1
                    started = time.perf_counter()
                    async with session.post(url, data=body, headers=headers) as response:
                        await response.read()
                        if response.status != 200:
                            errors += 1
                    latencies.append((time.perf_counter() - started) * 1000)

            await asyncio.gather(*(one_caller() for _ in range(concurrency)))
            return errors

        await run(min(WARMUP, requests), [])
        latencies: list[float] = []
        cpu_before = cpu_by_role()
        started = time.perf_counter()
        errors = await run(requests, latencies)
        seconds = time.perf_counter() - started
        cpu = per_request_us(cpu_before, cpu_by_role(), requests)
    return HttpFigures(
        requests=requests,
        seconds=seconds,
        p50_ms=float(np.percentile(latencies, 50)),
        p99_ms=float(np.percentile(latencies, 99)),
        errors=errors,
        cpu_us=cpu,
    )


WRK_SECONDS = 10
WRK_WARMUP_S = 2
# wrk's report as one line: requests, errors of every kind, latency percentiles in us.
WRK_SCRIPT = """
local f = assert(io.open(os.getenv("TQ_WRK_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRKJSON {\\"requests\\": %d, \\"duration_us\\": %d, \\"errors\\": %d, "
    .. "\\"p50_us\\": %d, \\"p99_us\\": %d}\\n", summary.requests, summary.duration,
    e.status + e.connect + e.read + e.write + e.timeout, latency:percentile(50.0),
    latency:percentile(99.0)))
end
"""


def _drive_wrk(url: str, body: bytes, concurrency: int) -> HttpFigures:
    """``wrk -t1 -c<concurrency>``: a warm-up, then WRK_SECONDS measured."""
    with tempfile.TemporaryDirectory(prefix="tq-wrk-") as folder:
        script, body_file = Path(folder) / "post.lua", Path(folder) / "body.json"
        script.write_text(WRK_SCRIPT)
        body_file.write_bytes(body)
        env = {**os.environ, "TQ_WRK_BODY": str(body_file)}

        def wrk(seconds: int) -> dict[str, Any]:
            command = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "5s",
                       "-s", str(script), url]  # fmt: skip
            out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
            for line in out.stdout.splitlines():
                if line.startswith("WRKJSON "):
                    parsed: dict[str, Any] = json.loads(line.removeprefix("WRKJSON "))
                    return parsed
            raise RuntimeError(f"wrk printed no summary: {out.stdout[-300:]} {out.stderr[-300:]}")

        wrk(WRK_WARMUP_S)
        cpu_before = cpu_by_role()
        figures = wrk(WRK_SECONDS)
        cpu = per_request_us(cpu_before, cpu_by_role(), max(1, figures["requests"]))
    return HttpFigures(
        requests=figures["requests"],
        seconds=figures["duration_us"] / 1e6,
        p50_ms=figures["p50_us"] / 1000,
        p99_ms=figures["p99_us"] / 1000,
        errors=figures["errors"],
        cpu_us=cpu,
    )


class _server:
    """Run a server command that prints ``listening on <url>``; yield the URL; SIGTERM it."""

    def __init__(self, command: list[str]) -> None:
        self._command = command
        self._process: subprocess.Popen[str] | None = None

    def __enter__(self) -> str:
        self._process = subprocess.Popen(
            self._command, stdout=subprocess.PIPE, text=True, preexec_fn=normal_priority
        )
        for line in self._process.stdout or ():
            if LISTENING in line:
                return line.split(LISTENING, 1)[1].strip()
        raise RuntimeError(f"{self._command[:4]} exited with {self._process.wait()}")

    def __exit__(self, *exc: object) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()


# -- the floor server ---------------------------------------------------------

FLOOR_ANSWER = json.dumps(
    {
        "model_name": "mlp",
        "id": "floor",
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 10], "data": [0.5] * 10}],
    }
).encode()


async def _floor(port: int) -> None:
    from aiohttp import web

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=FLOOR_ANSWER, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v2/models/{model}/infer", answer)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    host, bound = runner.addresses[0][:2]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"floor {LISTENING}http://{host}:{bound}", flush=True)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m producer.bench.http")
    verbs = parser.add_subparsers(dest="verb", required=True)
    floor = verbs.add_parser("floor", help="the bare aiohttp server with a fixed answer")
    floor.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    run(_floor(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
