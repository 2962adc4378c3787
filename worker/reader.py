"""The reader of one stream: XREADGROUP on its own blocking connection,
decode and validate each entry, drop what is already answered, and hand
the accepted requests to the scheduler. What is invalid is answered at once
(through the writer); what cannot be answered is dead-lettered.

Own pending entries come first: at start (a restarted worker keeps its
consumer name), after a read whose reply was lost in transit, and after
upkeep reclaimed idle entries of a dead consumer (``recover``). They are
read one at a time, each only once the one before is answered, so only the
entry being computed counts a delivery when the worker dies again.

Counting rules (Redis): XREADGROUP with an id other than ``>`` increments an
entry's delivery count, so re-reading own pending entries one at a time
counts one delivery each. An entry already delivered ``max_deliveries``
times is not delivered again: it is buried (dead letter + error result).

Stopping is by flag, never by cancelling the blocking read (a cancelled
XREADGROUP strands the entries it was delivering): ``run`` returns after
its current read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from common.backoff import Backoff
from common.envelope import Result, pack_result, peek_id_and_reply_to, unpack_request
from common.errors import InvalidInput, ProtocolError
from common.keys import CONSUMER_GROUP, REQUEST_FIELD, Keys
from common.records import DeadLetter
from common.redis_conn import blocking_client
from common.settings import Settings
from worker.control import ControlFeed
from worker.leases import Leases
from worker.scheduler import Scheduler
from worker.served import ServedModels
from worker.stats import Stats
from worker.work import Accepted, Outcome, Stream
from worker.writer import Writer

log = logging.getLogger(__name__)

Entry = tuple[bytes, dict[bytes, bytes] | None]
PENDING_PAGE = 64


def id_before(entry_id: bytes | str) -> str:
    """The stream id just before ``entry_id`` (XREADGROUP returns ids after the one given)."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, seq = (int(part) for part in text.split("-"))
    return f"{ms}-{seq - 1}" if seq else f"{ms - 1}-{2**64 - 1}"


async def ensure_group(redis: aioredis.Redis, queue: str) -> None:
    try:
        await redis.xgroup_create(queue, CONSUMER_GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


class StreamReader:
    def __init__(
        self,
        stream: Stream,
        *,
        settings: Settings,
        redis: aioredis.Redis,
        consumer: str,
        served: ServedModels,
        scheduler: Scheduler,
        writer: Writer,
        leases: Leases,
        feed: ControlFeed,
        stats: Stats,
    ) -> None:
        self.stream = stream
        self._settings = settings
        self._redis = redis
        self._keys = Keys.of(settings.redis)
        self._consumer = consumer
        self._served = served
        self._scheduler = scheduler
        self._writer = writer
        self._leases = leases
        self._feed = feed
        self._stats = stats
        self._recovering = True  # own pending entries to re-read first
        self._recover_after = "-"  # XPENDING cursor while recovering

    def recover(self) -> None:
        """Re-read own pending entries before new ones (upkeep reclaimed some)."""
        self._recovering = True
        self._recover_after = "-"

    async def run(self, stop: asyncio.Event) -> None:
        block_ms = self._settings.worker.block_ms
        conn = blocking_client(self._settings.redis, block_ms)
        backoff = Backoff()
        queue = self.stream.queue
        try:
            while not stop.is_set():
                if not await self._scheduler.wait_for_room(self.stream, stop):
                    continue
                try:
                    if self._recovering:
                        for entry, deliveries in await self._next_own_pending(conn):
                            await self.accept([entry], deliveries)
                            # Nothing is read past a redelivered entry until it is
                            # answered: each read counts a delivery, and entries read
                            # ahead of a poison one that kills the worker again would
                            # reach max_deliveries and be buried with it.
                            await self._leases.wait_released(self.stream.queue, entry[0], stop)
                        continue
                    max_rows = self._served[self.stream.model].spec.max_batch_size
                    reply: Any = await conn.xreadgroup(
                        CONSUMER_GROUP, self._consumer, {queue: ">"}, count=max_rows, block=block_ms
                    )
                except ResponseError as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    await ensure_group(self._redis, queue)  # Redis restarted empty
                    continue
                except RedisError as exc:
                    # A read whose reply was lost in transit left entries
                    # pending for us that we never saw: re-read them first.
                    self._recovering = True
                    await backoff.wait(f"read {queue}", exc, stop)
                    continue
                backoff.reset()
                entries = reply[0][1] if reply else []
                self._scheduler.note_more_waiting(self.stream, len(entries) >= max_rows)
                if entries:
                    await self.accept(entries, 1)
        finally:
            await conn.aclose()

    async def _next_own_pending(self, conn: aioredis.Redis) -> list[tuple[Entry, int]]:
        """The next own pending entry not already held, with its new delivery
        count. Empty when there is none left (recovery is over)."""
        queue = self.stream.queue
        max_deliveries = self._settings.worker.max_deliveries
        pending: Any = await self._redis.xpending_range(
            queue, CONSUMER_GROUP, min=self._recover_after, max="+", count=PENDING_PAGE,
            consumername=self._consumer,
        )  # fmt: skip
        for record in pending:
            entry_id: bytes = record["message_id"]
            self._recover_after = "(" + entry_id.decode()
            if self._leases.holds(queue, entry_id):
                continue
            delivered = int(record["times_delivered"])
            if delivered >= max_deliveries:
                reason = (
                    f"delivered {delivered} times (max_deliveries {max_deliveries}); "
                    "its worker died each time"
                )
                await self._writer.bury(self.stream, entry_id, reason)
                continue
            reply: Any = await conn.xreadgroup(
                CONSUMER_GROUP, self._consumer, {queue: id_before(entry_id)}, count=1
            )
            entries = reply[0][1] if reply else []
            if entries and entries[0][0] == entry_id:
                return [(entries[0], delivered + 1)]
            # acked by someone else meanwhile: nothing to do, look further
        if len(pending) < PENDING_PAGE:
            self._recovering = False
            self._recover_after = "-"
        return []

    async def accept(self, entries: Sequence[Entry], deliveries: int) -> None:
        """Decode and validate delivered entries; answer what is invalid at
        once and dead-letter what cannot be answered."""
        good: list[Accepted] = []
        rejected: list[Outcome] = []
        dead: list[DeadLetter] = []
        for entry_id, fields in entries:
            raw = fields.get(REQUEST_FIELD.encode()) if fields else None
            try:
                good.append(self._validate(entry_id, raw, deliveries))
            except ProtocolError as exc:
                if exc.request_id:
                    result = Result.failure(exc.request_id, "error", exc.code, exc.message)
                    result.worker = self._consumer
                    reply_to = peek_id_and_reply_to(raw or b"")[1]
                    rejected.append(
                        Outcome(
                            self.stream.queue, entry_id, result.id, reply_to, pack_result(result)
                        )
                    )
                else:
                    dead.append(DeadLetter(raw or b"", exc.message, entry_id))
        self._leases.hold(self.stream.queue, [a.entry_id for a in good])
        self._leases.hold(self.stream.queue, [o.entry_id for o in rejected])
        if dead:
            await self._writer.dead_letter(self.stream, dead)
        if rejected:
            self._stats.count_errors(len(rejected))
            await self._writer.put(rejected)
        good = await self._drop_answered(good)
        if good:
            self._scheduler.add(self.stream, good)

    def _validate(self, entry_id: bytes, raw: bytes | None, deliveries: int) -> Accepted:
        if raw is None:
            raise ProtocolError(f"stream entry has no {REQUEST_FIELD!r} field")
        request = unpack_request(raw, self._settings.limits.codec())
        if request.reply_to is not None and not self._keys.is_inbox(request.reply_to):
            raise InvalidInput(
                f"reply_to {request.reply_to!r:.80} is not an inbox key "
                f"({self._keys.inbox('<client>')})",
                request_id=request.id,
            )
        model = self._served[self.stream.model]
        if request.model != model.name:
            raise InvalidInput(
                f"request for model {request.model!r} on the queue of {model.name!r}",
                request_id=request.id,
            )
        rows = model.spec.check_inputs(request.inputs, request_id=request.id)
        return Accepted(self.stream, entry_id, request, rows, deliveries)

    async def _drop_answered(self, items: list[Accepted]) -> list[Accepted]:
        """Check Redis for entries the control feed cannot vouch for:
        redelivered ones (already answered? then only ack) and ones enqueued
        before the feed started (cancelled while nobody listened?)."""
        since = self._feed.listening_since_ms
        doubtful = [p for p in items if p.redelivered or p.enqueued_ms < since]
        if not doubtful:
            return items
        async with self._redis.pipeline(transaction=False) as pipe:
            for item in doubtful:
                pipe.exists(self._keys.cancelled(item.request.id))
                pipe.exists(self._keys.result(item.request.id))
            try:
                flags = await pipe.execute()
            except RedisError as exc:  # compute anyway: a duplicate beats a loss
                log.warning("cancel/result check failed: %s", exc)
                return items
        answered: list[Outcome] = []
        for i, item in enumerate(doubtful):
            if flags[2 * i + 1]:
                answered.append(
                    Outcome(self.stream.queue, item.entry_id, item.request.id, None, b"")
                )
            elif flags[2 * i]:
                self._feed.add_cancelled(item.request.id)
        if not answered:
            return items
        await self._writer.put(answered)
        done = {o.entry_id for o in answered}
        return [p for p in items if p.entry_id not in done]
