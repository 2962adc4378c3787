"""A worker re-reading its own pending entries after a crash reads one at a
time: the next only once the one before is answered. Each read counts a
delivery, so entries read ahead of a poison one that kills the worker again
would reach max_deliveries and be buried with it (seen under load)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import redis

from common.keys import CONSUMER_GROUP, NORMAL, Keys
from common.redis_conn import pooled_client
from common.settings import load_settings
from tests.conftest import async_wait_until
from tests.unit.test_worker_parts import Calls, RecordingWriter, small_model
from worker.control import ControlFeed
from worker.leases import Leases
from worker.reader import StreamReader
from worker.served import ServedModels
from worker.stats import Stats
from worker.work import Accepted, Stream

KEYS = Keys()
STREAM = Stream(KEYS.queue("m", NORMAL), "m", NORMAL)


class Backlog:
    """Stands in for the scheduler: takes what the reader hands on."""

    def __init__(self) -> None:
        self.added: list[Accepted] = []

    def add(self, stream: Stream, items: Sequence[Accepted]) -> None:
        self.added.extend(items)

    async def wait_for_room(self, stream: Stream, stop: asyncio.Event) -> bool:
        return True

    def room(self, stream: Stream) -> int:
        return 8

    def note_more_waiting(self, stream: Stream, more: bool) -> None:
        pass


def deliveries(sync_redis: redis.Redis) -> list[int]:
    pending: Any = sync_redis.xpending_range(STREAM.queue, CONSUMER_GROUP, "-", "+", 10)
    return [int(p["times_delivered"]) for p in pending]


async def test_own_pending_entries_are_read_one_at_a_time(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    import numpy as np

    from common.envelope import Request, pack_request

    sync_redis.xgroup_create(STREAM.queue, CONSUMER_GROUP, id="0", mkstream=True)
    for i in range(3):
        request = Request(f"r{i}", "m", {"x": np.ones((1, 3), np.float32)})
        sync_redis.xadd(STREAM.queue, {"req": pack_request(request)})
    sync_redis.xreadgroup(CONSUMER_GROUP, "w", {STREAM.queue: ">"})  # then "w" died
    assert deliveries(sync_redis) == [1, 1, 1]

    settings = load_settings(env={}, overrides={"redis.url": redis_url})
    connection = pooled_client(settings.redis)
    backlog, leases, stop = Backlog(), Leases(), asyncio.Event()
    reader = StreamReader(
        STREAM, settings=settings, redis=connection, consumer="w",
        served=ServedModels([small_model(Calls())]), scheduler=backlog,  # type: ignore[arg-type]
        writer=RecordingWriter(), leases=leases,  # type: ignore[arg-type]
        feed=ControlFeed(connection, KEYS, 0.1, print), stats=Stats(),
    )  # fmt: skip
    task = asyncio.create_task(reader.run(stop))
    try:
        for answered in range(3):
            await async_wait_until(lambda n=answered: len(backlog.added) > n, 30, "a read")
            # read again (delivery 2) only up to the one being computed
            assert deliveries(sync_redis)[answered:] == [2] + [1] * (2 - answered)
            assert len(backlog.added) == answered + 1
            leases.release(STREAM.queue, [backlog.added[-1].entry_id])  # as the writer would
    finally:
        stop.set()
        await task
        await connection.aclose()
    assert [a.ids for a in backlog.added] == [("r0",), ("r1",), ("r2",)]
    assert all(a.redelivered for a in backlog.added)
