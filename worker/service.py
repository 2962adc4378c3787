"""The worker service: builds the parts of one worker process from its
settings, runs them on one event loop, and drains them on stop.

A request's path through the parts (each a module of its own):

    reader (one per stream)  XREADGROUP -> decode, validate, drop answered
      -> scheduler            backlog per stream -> batch (window, priority,
                              deadlines, cancellations)
      -> executor             assemble, forward in the compute thread, bisect,
                              split and pack the results
      -> writer               results + inbox pushes + XACK/XDEL, one script

beside them: upkeep (heartbeat, reclaim, lease renewal) and control (the
control feed: cancels and reloads; the model reloader). ``WorkerParts``
holds them; ``build_parts`` makes the production set, and a test may hand
the service any part of its own.

Stopping is by flag, never by cancelling a blocking read: readers stop after
their current read, the scheduler drains the backlog, the writer flushes,
then ``run`` returns. A part that fails past its own retries makes the
worker drain and exit non-zero (``failure``), so the pool restarts it; a
failed writer ends the process at once (it could not drain).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from common.aio import describe_tasks
from common.keys import HIGH, NORMAL, Keys
from common.settings import Settings
from worker.commit import Committer
from worker.control import ControlFeed, ModelReloader
from worker.executor import Executor
from worker.leases import Leases
from worker.metrics import worker_metrics
from worker.reader import StreamReader, ensure_group
from worker.registry import LoadedModel, load_model
from worker.scheduler import Scheduler
from worker.served import ServedModels
from worker.stats import Stats
from worker.upkeep import Upkeep
from worker.work import Stream
from worker.writer import Writer

log = logging.getLogger(__name__)


@dataclass
class WorkerParts:
    served: ServedModels
    readers: list[StreamReader]
    scheduler: Scheduler
    executor: Executor
    writer: Writer
    upkeep: Upkeep
    feed: ControlFeed
    reloader: ModelReloader


def build_parts(
    *,
    settings: Settings,
    redis: aioredis.Redis,
    models: Sequence[LoadedModel],
    executor: Executor,
    name: str,
    device_info: Mapping[str, Any],
    on_orphaned: Callable[[], None],
    committer: Committer | None = None,
) -> WorkerParts:
    """The production parts of a worker named ``name`` (its consumer name);
    ``committer`` replaces the writer's (tests instrument writes with it)."""
    keys = Keys.of(settings.redis)
    served = ServedModels(models)
    streams = [
        Stream(keys.queue(m.name, priority), m.name, priority)
        for m in models
        for priority in (HIGH, NORMAL)
    ]
    leases = Leases()
    stats = Stats(metrics=worker_metrics())
    committer = committer or Committer(redis, keys, settings.redis.result_ttl_s)
    writer = Writer(redis, keys, committer, leases)
    readers: dict[str, StreamReader] = {}  # by queue, filled below
    upkeep = Upkeep(
        settings=settings.worker, redis=redis, keys=keys, consumer=name, streams=streams,
        served=served, leases=leases, writer=writer, stats=stats, device_info=device_info,
        on_reclaimed=lambda stream: readers[stream.queue].recover(), on_orphaned=on_orphaned,
    )  # fmt: skip
    device = str(executor.device)
    reloader = ModelReloader(
        served,
        lambda old: load_model(old.config, device, executor.warm_up),
        upkeep.heartbeat,  # republishes the models
        watch=settings.worker.watch_models,
    )
    feed = ControlFeed(redis, keys, settings.worker.block_ms / 1000, reloader.on_control)
    scheduler = Scheduler(
        streams, served=served, executor=executor, writer=writer, feed=feed, stats=stats,
        worker=name, batch_policy=settings.worker.batch_policy,
    )  # fmt: skip
    for stream in streams:
        readers[stream.queue] = StreamReader(
            stream, settings=settings, redis=redis, consumer=name, served=served,
            scheduler=scheduler, writer=writer, leases=leases, feed=feed, stats=stats,
        )  # fmt: skip
    return WorkerParts(
        served, list(readers.values()), scheduler, executor, writer, upkeep, feed, reloader
    )


class WorkerService:
    """Serve with ``parts`` until ``request_stop``."""

    def __init__(self, settings: Settings, redis: aioredis.Redis, name: str) -> None:
        self.settings = settings
        self.redis = redis
        self.name = name
        self._stopping = asyncio.Event()
        self._finishing = asyncio.Event()  # drained: the side loops end
        self.failure: BaseException | None = None  # a part failed: drain, then exit non-zero

    def request_stop(self) -> None:
        if not self._stopping.is_set():
            log.info("worker %s: stop requested, draining", self.name)
            grace = self.settings.worker.drain_grace_s
            asyncio.get_running_loop().call_later(grace / 2, self._report_slow_drain, grace / 2)
        self._stopping.set()

    async def run(self, parts: WorkerParts) -> None:
        await parts.upkeep.publish_models()
        for reader in parts.readers:
            await ensure_group(self.redis, reader.stream.queue)
        writer = asyncio.create_task(parts.writer.run(), name="writer")
        writer.add_done_callback(self._writer_ended)
        scheduler = self._start("scheduler", parts.scheduler.run())
        readers = [
            self._start(f"reader of {r.stream.queue}", r.run(self._stopping)) for r in parts.readers
        ]
        upkeep, stopping, finishing = parts.upkeep, self._stopping, self._finishing
        side = [
            self._start("heartbeat", upkeep.heartbeat_loop(stopping, finishing)),
            self._start("reclaim", upkeep.reclaim_loop(stopping, finishing)),
            self._start("lease renewal", upkeep.lease_loop(finishing)),
            self._start("control feed", parts.feed.run(stopping)),
            self._start("reloader", parts.reloader.run(finishing)),
        ]
        try:
            await wait_for_stop_or(self._stopping, scheduler)
        finally:
            parts.scheduler.stop_filling()
            parts.writer.stop_soon()
            await asyncio.gather(*readers, return_exceptions=True)
            parts.scheduler.close()
            await asyncio.gather(scheduler, return_exceptions=True)
            await parts.writer.close()
            await writer
            # Side loops end by flag (common/aio.py says why).
            self._finishing.set()
            _, stuck = await asyncio.wait(side, timeout=self.settings.redis.socket_timeout_s + 1)
            for task in stuck:
                log.warning("%s did not stop; cancelling it", task.get_name())
                task.cancel()
            await upkeep.heartbeat(alive=False)
            parts.executor.close()
        log.info("worker %s: drained and stopped", self.name)

    def _start(self, name: str, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._part_ended)
        return task

    def _part_ended(self, task: asyncio.Task[Any]) -> None:
        """A part that raises has met a fault its own retries do not cover (or
        a bug): rather than serve on without it (a stream nobody reads,
        entries nobody reclaims, a backlog nobody computes), drain and exit
        non-zero so the pool restarts this worker."""
        if task.cancelled() or task.exception() is None:
            return
        error = task.exception()
        log.error("%s failed", task.get_name(), exc_info=error)
        if self.failure is None:
            self.failure = error
            log.error("worker %s: draining so the pool restarts it", self.name)
            self.request_stop()

    def _writer_ended(self, task: asyncio.Task[Any]) -> None:
        """Without its writer a worker cannot drain: exit at once. Its entries
        stay pending and its restart (same consumer name) re-reads them."""
        if task.cancelled() or task.exception() is None:
            return
        log.critical("result writer failed; exiting", exc_info=task.exception())
        logging.shutdown()
        os._exit(70)

    def _report_slow_drain(self, after_s: float) -> None:
        """Name what a drain is still waiting for, before the pool's grace
        runs out and it kills the worker."""
        log.error(
            "worker %s still draining after %.0fs; waiting in:\n%s",
            self.name, after_s, describe_tasks(),
        )  # fmt: skip


async def wait_for_stop_or(stop: asyncio.Event, task: asyncio.Task[None]) -> None:
    """Until a stop is requested or ``task`` ends (it only ends by failing)."""
    waiter = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([waiter, task], return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
