"""The process pool: one spawned worker per device slot, supervised.

The parent never imports torch. It sets each child's environment (device
pinning, malloc thresholds) around ``Process.start`` so the child's
interpreter starts with it, restarts a child that dies with exponential
backoff, and on SIGTERM/SIGINT sends SIGTERM to every child (they drain)
and kills what is left after the grace period.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import secrets
import signal
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any

from common.devices import DeviceSlot
from common.settings import Settings
from worker.metrics import MULTIPROC_ENV, MetricsServer
from worker.process import EXIT_FATAL, worker_main

log = logging.getLogger(__name__)

_SPAWN = multiprocessing.get_context("spawn")


@contextmanager
def patched_environ(values: Mapping[str, str]) -> Iterator[None]:
    """Set variables for the duration of a spawn (the parent is single-threaded here)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def spawn_pinned(
    slot: DeviceSlot,
    target: Callable[..., None],
    args: tuple[Any, ...],
    name: str,
    extra_env: Mapping[str, str] | None = None,
) -> BaseProcess:
    """Start ``target(*args)`` in a spawned process whose environment pins ``slot``."""
    with patched_environ({**slot.environment(), **(extra_env or {})}):
        process = _SPAWN.Process(target=target, args=args, name=name, daemon=False)
        process.start()
    return process


@dataclass
class _Child:
    slot: DeviceSlot
    name: str
    process: BaseProcess | None = None
    started: float = 0.0
    failures: int = 0
    restart_at: float | None = None
    ready: Any = None  # multiprocessing Event the child sets once serving
    served: bool = False  # some process of this slot has served


class WorkerPool:
    """``WorkerPool(settings, slots).run()`` serves until a signal, then drains."""

    def __init__(
        self,
        settings: Settings,
        slots: list[DeviceSlot],
        *,
        logging_setup: tuple[str, str] = ("info", "text"),
    ) -> None:
        self.settings = settings
        self.logging_setup = logging_setup
        # Stable per parent and slot: a restarted child re-reads its own pending
        # entries. The token keeps two pools apart whose hosts share a name and
        # a pid (containers with a fixed hostname, the pool as pid 1): sharing a
        # consumer name, they would process and bury each other's entries.
        prefix = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
        self.children = [_Child(slot, f"{prefix}-{slot.label}") for slot in slots]
        port = settings.worker.metrics_port
        self.metrics = MetricsServer(port) if port > 0 else None
        self._stop = False
        self._wake_r, self._wake_w = os.pipe()
        self.exit_code = 0

    def request_stop(self, *_: object) -> None:
        self._stop = True
        os.write(self._wake_w, b"x")

    def _spawn(self, child: _Child) -> None:
        child.ready = _SPAWN.Event()
        args = (child.slot, self.settings, child.name, self.logging_setup, child.ready)
        env = {MULTIPROC_ENV: self.metrics.directory} if self.metrics else None
        process = spawn_pinned(child.slot, worker_main, args, child.name, env)
        child.process = process
        child.started = time.monotonic()
        child.restart_at = None
        log.info("started worker %s (pid %s)", child.name, process.pid)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        if self.metrics is not None:
            self.metrics.start()
        for child in self.children:
            self._spawn(child)
        try:
            while not self._stop:
                self._supervise_once()
        finally:
            self._shutdown()
            if self.metrics is not None:
                self.metrics.stop()
            os.close(self._wake_r)
            os.close(self._wake_w)
        return self.exit_code

    def _supervise_once(self) -> None:
        now = time.monotonic()
        due = [c.restart_at for c in self.children if c.restart_at is not None]
        timeout = max(0.0, min(due) - now) if due else None
        sentinels = [c.process.sentinel for c in self.children if c.process is not None]
        multiprocessing.connection.wait([*sentinels, self._wake_r], timeout)
        if self._stop:
            return
        now = time.monotonic()
        for child in self.children:
            process = child.process
            if process is not None and not process.is_alive():
                code = process.exitcode
                if self.metrics is not None and process.pid is not None:
                    self.metrics.child_died(process.pid)
                process.close()
                child.process = None
                served = child.ready is not None and child.ready.is_set()
                child.served = child.served or served
                # A slot that never served cannot start (bad config, Redis
                # unreachable): stop with the error. One that served before
                # and cannot come back (Redis down for a moment, a model file
                # mid-replacement) keeps retrying with backoff.
                if code == EXIT_FATAL and not child.served:
                    log.error("worker %s cannot start (see its log); stopping the pool", child.name)
                    self.exit_code = EXIT_FATAL
                    self._stop = True
                    return
                ran = now - child.started
                # A worker that died while serving restarts at once; one that
                # dies before it is ready is crash-looping and backs off.
                child.failures = 0 if served else child.failures + 1
                delay = min(30.0, 0.25 * 2**child.failures)
                child.restart_at = now + delay
                log.warning(
                    "worker %s died (exit code %s) after %.1fs; restarting in %.2fs",
                    child.name, code, ran, delay,
                )  # fmt: skip
            elif child.process is None and child.restart_at is not None and child.restart_at <= now:
                self._spawn(child)

    def _shutdown(self) -> None:
        live = [c.process for c in self.children if c.process is not None and c.process.is_alive()]
        for process in live:
            if process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.worker.drain_grace_s
        for process in live:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.error("worker pid %s did not drain in time; killing it", process.pid)
                process.kill()
                process.join()
        log.info("pool stopped")
