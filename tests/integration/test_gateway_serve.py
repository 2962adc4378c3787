"""``tensorq gateway`` as a real process on uvloop: 2,000 concurrent sync
requests against two workers all answered correctly; SIGTERM stops new
connections but lets a request in flight finish; the CLI's own errors."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import numpy as np
import redis.asyncio as aioredis
import torch
from yarl import URL

from tests.conftest import ROOT
from tests.gateway_stack import (
    KEYS,
    GatewayStack,
    answer_next,
    doubled,
    gateway_process,
    idle_model,
    stand_in_worker,
    until,
)

pytest_plugins = ["tests.gateway_fixtures"]

CONCURRENT = 2000


async def test_2000_concurrent_requests_are_all_answered_correctly(
    gw_stack: GatewayStack, tmp_path: Path
) -> None:
    rng = np.random.default_rng(11)
    inputs = [rng.standard_normal((1 + i % 3, 256)).astype(np.float32) for i in range(CONCURRENT)]
    bodies = [
        json.dumps(
            {"id": f"load-{i}",
             "inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                         "data": x.ravel().tolist()}]}
        )
        for i, x in enumerate(inputs)
    ]  # fmt: skip
    with gateway_process(gw_stack, tmp_path / "gateway.log") as gateway:
        url = f"{gateway.url}/v2/models/mlp/infer"
        connector = aiohttp.TCPConnector(limit=0)  # one connection per request: all at once
        timeout = aiohttp.ClientTimeout(total=300)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

            async def call(body: str) -> tuple[int, dict[str, object]]:
                headers = {"Content-Type": "application/json"}
                async with http.post(url, data=body, headers=headers) as response:
                    return response.status, await response.json()

            answers = await asyncio.gather(*(call(body) for body in bodies))
    statuses = [status for status, _ in answers]
    assert statuses == [200] * CONCURRENT, {s: statuses.count(s) for s in set(statuses)}
    expected = gw_stack.direct("mlp", torch.from_numpy(np.concatenate(inputs))).numpy()
    start = 0
    for i, (x, (_, doc)) in enumerate(zip(inputs, answers, strict=True)):
        assert doc["id"] == f"load-{i}"
        [y] = doc["outputs"]  # type: ignore[misc]
        assert y["shape"] == [x.shape[0], 10]
        got = np.float32(y["data"]).reshape(x.shape[0], 10)
        np.testing.assert_allclose(got, expected[start : start + len(x)], rtol=1e-4, atol=1e-5)
        start += len(x)


async def test_sigterm_refuses_new_connections_and_finishes_requests_in_flight(
    gw_stack: GatewayStack, tmp_path: Path, aredis: aioredis.Redis
) -> None:
    await idle_model(aredis, "draining")
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    async with stand_in_worker(aredis, "draining"):
        await _drain_with_a_request_in_flight(gw_stack, tmp_path, aredis, body)


async def _drain_with_a_request_in_flight(
    gw_stack: GatewayStack, tmp_path: Path, aredis: aioredis.Redis, body: dict[str, object]
) -> None:
    with gateway_process(gw_stack, tmp_path / "gateway.log") as gateway:
        address = URL(gateway.url)
        async with aiohttp.ClientSession() as http:

            async def infer() -> tuple[int, dict[str, object]]:
                async with http.post(f"{gateway.url}/v2/models/draining/infer", json=body) as r:
                    return r.status, await r.json()

            in_flight = asyncio.create_task(infer())
            queue = KEYS.queue("draining")
            await until(lambda: aredis.xlen(queue), what="the request to be enqueued")
            gateway.process.send_signal(signal.SIGTERM)

            async def refused() -> bool:
                try:
                    _, writer = await asyncio.open_connection(address.host, address.port)
                except OSError:
                    return True
                writer.close()
                return False

            await until(refused, what="the listening socket to close")
            assert not in_flight.done()
            await answer_next(aredis, "draining", doubled)  # the worker answers after all
            status, doc = await in_flight
        assert status == 200
        assert doc["outputs"] == [
            {"name": "y", "datatype": "FP32", "shape": [1, 4], "data": [2, 4, 6, 8]}
        ]
        assert gateway.process.wait(60) == 0, gateway.log()


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "common.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TQ_CONFIG": "", **(env or {})},
    )


def test_cli_flags_and_clear_start_up_errors() -> None:
    usage = run_cli("gateway", "--help")
    assert usage.returncode == 0
    assert all(flag in usage.stdout for flag in ("--host", "--port", "--redis", "--config"))
    no_redis = run_cli("gateway", env={"TQ_REDIS_URL": ""})
    assert no_redis.returncode == 2 and "needs the workers' Redis URL" in no_redis.stdout
    down = run_cli("gateway", "--redis", "redis://user:s3cret@127.0.0.1:1/0", "--port", "0")
    assert down.returncode == 2
    assert "127.0.0.1:1" in down.stderr and "s3cret" not in down.stderr
