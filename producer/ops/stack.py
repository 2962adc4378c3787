"""A local stack for the main job, benchmarks and tests: Redis (a private
redis-server when no URL is configured) plus a worker pool started through
the ``tensorq worker`` CLI as a subprocess (which needs the ``[worker]``
extra). The producer never imports the worker package; the two meet only
through Redis.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from common.backoff import Poll
from common.devices import parse_devices
from common.embedded_redis import redis_url_or_embedded
from common.errors import ConfigError
from common.keys import Keys
from common.records import WorkerHeartbeat, live_workers
from common.redis_conn import sync_client
from common.settings import Settings


def tensorq_command(*args: str) -> list[str]:
    """Run the CLI with this interpreter, so a venv without its scripts on PATH works."""
    return [sys.executable, "-m", "common.cli", *args]


def ensure_example_models(settings: Settings) -> None:
    """Build the example models where the config expects them and they are missing."""
    missing = sorted({m.path.parent for m in settings.models if not m.path.exists()})
    for directory in missing:
        subprocess.run(
            tensorq_command("models", "build-examples", str(directory)),
            check=True,
            stdout=subprocess.DEVNULL,
        )


def expected_workers(devices: str) -> int | None:
    """How many processes a --devices spec starts (None for auto)."""
    if devices.strip().lower() == "auto":
        return None
    return len(parse_devices(devices))


def stop_process(process: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM (the process drains), then SIGKILL after ``grace_s``."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass
class RunningStack:
    redis_url: str
    pool: subprocess.Popen[bytes]
    settings: Settings

    def live_workers(self) -> list[WorkerHeartbeat]:
        client = sync_client(self.settings.redis)
        try:
            raw: Any = client.hgetall(Keys.of(self.settings.redis).workers)
        finally:
            client.close()
        return live_workers(raw)

    def wait_ready(self, workers: int | None, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        poll = Poll(first=0.05, cap=0.5, factor=1.5)
        want = workers or 1
        while len(self.live_workers()) < want:
            if self.pool.poll() is not None:
                raise ConfigError(f"the worker pool exited with code {self.pool.returncode}")
            if time.monotonic() > deadline:
                raise ConfigError(f"the worker pool was not ready within {timeout_s}s")
            time.sleep(poll.next())  # polling a condition, at growing intervals


@contextmanager
def local_stack(
    settings: Settings,
    *,
    devices: str | None = None,
    log_level: str = "warning",
    extra_env: dict[str, str] | None = None,
    pool_args: Sequence[str] = (),
) -> Iterator[RunningStack]:
    """Redis + a worker pool, both stopped on exit."""
    devices = devices or settings.worker.devices
    with ExitStack() as stack:
        url = stack.enter_context(redis_url_or_embedded(settings.redis.url))
        args = ["--log-level", log_level, "worker", "--redis", url, "--devices", devices]
        if settings.config_path is not None:
            args += ["--config", str(settings.config_path)]
        pool = subprocess.Popen(
            tensorq_command(*args, *pool_args), env={**os.environ, **(extra_env or {})}
        )
        running = RunningStack(url, pool, settings.replace(redis=settings.redis.with_url(url)))
        try:
            running.wait_ready(expected_workers(devices))
            yield running
        finally:
            stop_process(pool, settings.worker.drain_grace_s + 10)
