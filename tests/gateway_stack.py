"""Helpers for the gateway tests; their fixtures are in tests/gateway_fixtures.py.

One stack per session: a private redis-server (other modules flush the
shared one between tests) and a real two-worker pool serving the example
models, a tiny identity-ish TorchScript model per wire dtype (``dt_<dtype>``:
x -> 2x for floats, x + 1 for ints, not x for bool, shape [2, 3]) and
``boom``, which raises on inputs over 100. Results live 3 s, so expiry can be
observed. Gateways are started per test, in-process (``make_gateway``) or as
a real ``tensorq gateway`` subprocess on uvloop (``gateway_process``).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis.asyncio as aioredis
import torch
from torch import Tensor, nn

from common.aio import wait_any
from common.envelope import Request, Result, pack_result, unpack_request
from common.keys import Keys
from common.records import WorkerHeartbeat, now_ms
from common.settings import Settings, load_settings
from common.spec import ModelSpec, TensorSpec
from tests.conftest import ROOT

KEYS = Keys()
RESULT_TTL_S = 3
DTYPES = ("bool", "uint8", "int8", "int16", "int32", "int64",
          "float16", "bfloat16", "float32", "float64")  # fmt: skip
TORCH_DTYPES = {
    "bool": torch.bool, "uint8": torch.uint8, "int8": torch.int8, "int16": torch.int16,
    "int32": torch.int32, "int64": torch.int64, "float16": torch.float16,
    "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64,
}  # fmt: skip
ROW_SHAPE = (2, 3)


class Twice(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * 2


class PlusOne(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x + 1


class Not(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.logical_not(x)


class Boom(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        if bool((x > 100.0).any()):
            raise ValueError("input over 100")
        return x * 2


def dtype_model(dtype: str) -> nn.Module:
    if dtype == "bool":
        return Not()
    return Twice() if dtype.startswith(("float", "bfloat")) else PlusOne()


def build_test_models(directory: Path) -> str:
    """Write the dtype models and ``boom``; return their [[models]] TOML."""
    toml = []
    models: dict[str, tuple[nn.Module, str, tuple[int, ...]]] = {
        f"dt_{d}": (dtype_model(d), d, ROW_SHAPE) for d in DTYPES
    }
    models["boom"] = (Boom(), "float32", (4,))
    for name, (module, dtype, shape) in models.items():
        path = directory / f"{name}.pt"
        torch.jit.save(torch.jit.script(module.eval()), str(path))
        dims = ", ".join(map(str, shape))
        toml.append(
            f'[[models]]\nname = "{name}"\npath = "{path}"\nmax_batch_size = 16\n'
            f'max_delay_ms = 1\n  [[models.inputs]]\n  name = "x"\n  dtype = "{dtype}"\n'
            f'  shape = [{dims}]\n  [[models.outputs]]\n  name = "y"\n  dtype = "{dtype}"\n'
            f"  shape = [{dims}]\n"
        )
    return "\n".join(toml)


@dataclass
class GatewayStack:
    redis_url: str
    config: Path

    def settings(self, **gateway: object) -> Settings:
        overrides: dict[str, object] = {
            "redis.url": self.redis_url,
            "redis.result_ttl_s": RESULT_TTL_S,
            "gateway.port": 0,
        }
        overrides.update({f"gateway.{k}": v for k, v in gateway.items()})
        return load_settings(self.config, env={}, overrides=overrides)

    def direct(self, model: str, *inputs: Any) -> Any:
        """The model called in this process (the reference answers are compared with)."""
        module = torch.jit.load(str(self.settings().model(model).path))
        with torch.inference_mode():
            return module(*inputs)


@dataclass
class GatewayProcess:
    process: subprocess.Popen[str]
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]


@contextmanager
def gateway_process(
    stack: GatewayStack, log_path: Path, env: dict[str, str] | None = None
) -> Iterator[GatewayProcess]:
    """A real ``tensorq gateway`` (uvloop, SIGTERM handling) on a free port."""
    process = subprocess.Popen(
        [sys.executable, "-m", "common.cli", "--log-level", "warning", "gateway",
         "--config", str(stack.config), "--redis", stack.redis_url, "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=log_path.open("w"),
        text=True,
        env={**os.environ, "TQ_REDIS_RESULT_TTL_S": str(RESULT_TTL_S), **(env or {})},
    )  # fmt: skip
    line = process.stdout.readline() if process.stdout else ""
    if "listening on " not in line:
        process.kill()
        raise AssertionError(f"gateway did not start: {line!r}\n{log_path.read_text()}")
    handle = GatewayProcess(process, line.split("listening on ", 1)[1].strip(), log_path)
    try:
        yield handle
    finally:
        if process.poll() is None:
            process.terminate()
        process.wait(60)


async def until(predicate: Callable[[], object], timeout: float = 30.0, what: str = "") -> Any:
    """Poll a condition (sync or async) with backoff, without blocking the loop."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 0.2)


async def idle_model(
    redis: aioredis.Redis, name: str, *, dtype: str = "float32", max_queue_len: int = 100
) -> ModelSpec:
    """Publish a model spec no worker serves: its requests stay queued until a
    test answers them with ``answer_next`` (a sync infer needs a
    ``stand_in_worker`` too, or the gateway refuses it with 503)."""
    spec = ModelSpec(
        name=name,
        inputs=(TensorSpec("x", dtype, (4,)),),
        outputs=(TensorSpec("y", dtype, (4,)),),
        max_batch_size=8,
        version="v1",
        extra={"max_queue_len": max_queue_len},
    )
    await redis.hset(KEYS.models, name, spec.to_json())
    return spec


async def answer_next(
    redis: aioredis.Redis, model: str, make_result: Callable[[Request], Result]
) -> Request:
    """Act as the worker of an idle model: take its oldest queued request and
    write ``make_result(request)`` where a worker would (tq:r:<id> and the
    request's reply_to inbox)."""
    entries = await redis.xrange(KEYS.queue(model), count=1)
    if not entries:
        raise AssertionError(f"nothing queued for {model!r}")
    entry_id, fields = entries[0]
    request = unpack_request(fields[b"req"])
    payload = pack_result(make_result(request))
    async with redis.pipeline(transaction=False) as pipe:
        pipe.set(KEYS.result(request.id), payload, ex=RESULT_TTL_S)
        if request.reply_to:
            pipe.lpush(request.reply_to, payload)
        pipe.xdel(KEYS.queue(model), entry_id)
        await pipe.execute()
    return request


@asynccontextmanager
async def stand_in_worker(redis: aioredis.Redis, *models: str) -> AsyncIterator[None]:
    """A live worker serving ``models`` that answers nothing by itself (the
    test answers with ``answer_next``): its heartbeat, renewed every second
    until the block ends, then removed. The gateway answers a sync infer for
    a model no live worker serves with 503 at once, so a test of a sync
    request that waits needs one."""
    name = f"stand-in-{'-'.join(models)}"
    stop = asyncio.Event()

    async def beat() -> None:
        while not stop.is_set():
            record = WorkerHeartbeat(name, os.getpid(), True, int(now_ms()), models=list(models))
            await redis.hset(KEYS.workers, name, record.encode())
            await wait_any(stop, timeout=1.0)

    task = asyncio.create_task(beat(), name=name)
    try:
        await until(lambda: redis.hexists(KEYS.workers, name), what="the stand-in's heartbeat")
        yield
    finally:
        stop.set()
        await task
        await redis.hdel(KEYS.workers, name)


def doubled(request: Request) -> Result:
    """An ``ok`` result with y = 2x, as a worker of an idle model would write it."""
    return Result(request.id, "ok", outputs={"y": np.asarray(request.inputs["x"]) * 2})
