"""Tests live in two folders by what they need: ``tests/unit`` (no
processes beyond a quick interpreter; fakeredis or pure logic) and
``tests/integration`` (a real redis-server, real worker pools, real
TorchScript models). Each test is marked ``unit`` or ``integration`` by its
folder, so ``./dev test -m unit`` (or ``./dev test tests/unit``) runs the
fast ones alone.

Fixtures: one real redis-server per session (unix socket, no persistence),
a clean database per test, the example TorchScript models built once, and a
factory for real worker pools (``tensorq worker`` subprocesses)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from common import redis_conn
from common.backoff import Poll
from common.bundle import unpack_entry
from common.embedded_redis import EmbeddedRedis
from common.envelope import Request
from common.keys import Keys
from common.records import live_workers
from common.settings import RedisSettings

ROOT = Path(__file__).resolve().parent.parent


def _poll() -> Poll:
    return Poll(first=0.01, cap=0.2, factor=1.5)


def wait_until(predicate: Callable[[], object], timeout: float = 60.0, what: str = "") -> object:
    """Poll a condition with backoff (waiting on state, never sleeping blind)."""
    deadline = time.monotonic() + timeout
    poll = _poll()
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(poll.next())


async def async_wait_until(
    predicate: Callable[[], object], timeout: float = 60.0, what: str = ""
) -> object:
    """wait_until for tests whose event loop must keep running meanwhile."""
    deadline = time.monotonic() + timeout
    poll = _poll()
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await poll.sleep()


def entry_requests(raw: bytes) -> list[Request]:
    """The requests of one stream entry's ``req`` field, a bundle's members
    each as a single request (inputs sliced from the stacked ones)."""
    entry = unpack_entry(raw)
    if isinstance(entry, Request):
        return [entry]
    requests = []
    for i, request_id in enumerate(entry.ids):
        start, end = entry.offsets[i], entry.offsets[i + 1]
        if entry.inputs is not None:
            inputs = {k: a[start:end] for k, a in entry.inputs.items()}
        else:
            inputs = dict((entry.member_inputs or [])[i] or {})
        requests.append(Request(request_id or "", entry.model, inputs, entry.deadlines[i],
                                entry.reply_to[i], entry.priority[i], entry.store[i]))  # fmt: skip
    return requests


def http_ready(url: str) -> bool:
    """True once ``url`` answers 200 (for wait_until)."""
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def sync_client(url: str) -> redis.Redis:
    """A blocking client for a test's Redis URL (a RedisCluster for
    ``redis+cluster://``), made the way tensorq makes its own."""
    return redis_conn.sync_client(RedisSettings(url=url, socket_timeout_s=60))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        kind = (
            "unit" if "unit" in item.path.relative_to(ROOT / "tests").parts[:1] else "integration"
        )
        item.add_marker(getattr(pytest.mark, kind))


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    with EmbeddedRedis() as url:
        yield url


@pytest.fixture
def redis_url(redis_server: str) -> str:
    redis.Redis.from_url(redis_server).flushall()
    return redis_server


@pytest.fixture
def sync_redis(redis_url: str) -> Iterator[redis.Redis]:
    # blocking reads in tests block for a few seconds: outlast them
    client = redis.Redis.from_url(redis_url, socket_timeout=60)
    yield client
    client.close()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from worker.examples import build_examples

    directory = tmp_path_factory.mktemp("models")
    build_examples(directory)
    return directory


def write_config(path: Path, models_dir: Path, *, extra: str = "") -> Path:
    """The example config, pointed at ``models_dir``; ``extra`` TOML appended."""
    text = (ROOT / "config" / "tensorq.toml").read_text()
    text = text.replace('path = "models/', f'path = "{models_dir}/')
    path.write_text(text + "\n" + extra)
    return path


@dataclass
class PoolHandle:
    process: subprocess.Popen[bytes]
    redis_url: str
    log_path: Path
    workers: int
    stopped: bool = field(default=False)

    def live_workers(self) -> list[dict[str, object]]:
        """The live workers' heartbeats as status reports (device details flattened in)."""
        client = sync_client(self.redis_url)
        try:
            raw: Any = client.hgetall(Keys().workers)
        finally:
            client.close()
        return [record.as_report() for record in live_workers(raw)]

    def wait_ready(self, timeout: float = 90.0) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"pool exited early:\n{self.log()}")
            return len(self.live_workers()) >= self.workers

        wait_until(ready, timeout, f"{self.workers} live workers")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self, timeout: float = 60.0) -> int:
        if not self.stopped:
            self.stopped = True
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(
                    f"pool did not stop within {timeout}s:\n{self.log()}"
                ) from None
        return self.process.returncode


@pytest.fixture
def start_pool(tmp_path: Path) -> Iterator[Callable[..., PoolHandle]]:
    pools: list[PoolHandle] = []

    def start(
        config: Path, redis_url: str, *, devices: str = "cpu*2", workers: int = 2,
        env: dict[str, str] | None = None, wait: bool = True, log_format: str = "text",
    ) -> PoolHandle:  # fmt: skip
        log_path = tmp_path / f"pool-{len(pools)}.log"
        process = subprocess.Popen(
            [
                sys.executable, "-m", "common.cli", "--log-level", "info",
                "--log-format", log_format, "worker",
                "--config", str(config), "--redis", redis_url, "--devices", devices,
            ],
            cwd=ROOT,
            stdout=log_path.open("wb"),
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )  # fmt: skip
        handle = PoolHandle(process, redis_url, log_path, workers)
        pools.append(handle)
        if wait:
            handle.wait_ready()
        return handle

    yield start
    for pool in pools:
        if not pool.stopped:
            pool.stop()
