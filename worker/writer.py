"""The writer: the only part of a worker that writes results, acks and
dead letters.

Outcomes arrive on a bounded queue (``put``) and are committed in arrival
order, each group with one atomic script (worker/commit.py), retried with
backoff while Redis is away: the entries stay pending meanwhile, so if a
write never succeeds they are redelivered (restart) or reclaimed, and
nothing is lost. Once written, their leases are released.

Dead letters (``dead_letter``, ``bury``) are written at once, awaited by
the reader that found them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from common.backoff import Backoff
from common.envelope import Result, pack_result, peek_id_and_reply_to
from common.keys import CONSUMER_GROUP, REQUEST_FIELD, Keys
from common.records import DeadLetter
from worker.commit import Committer
from worker.leases import Leases
from worker.work import Outcome, Stream

log = logging.getLogger(__name__)

GIVE_UP_WHEN_STOPPING = 20  # attempts; a worker told to stop must end


class Writer:
    def __init__(
        self, redis: aioredis.Redis, keys: Keys, committer: Committer, leases: Leases
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._committer = committer
        self._leases = leases
        self._queue: asyncio.Queue[Sequence[Outcome] | None] = asyncio.Queue(maxsize=4)
        self._stopping = False

    async def put(self, outcomes: Sequence[Outcome]) -> None:
        """Queue outcomes for writing (waits while four groups are queued)."""
        if outcomes:
            await self._queue.put(outcomes)

    async def close(self) -> None:
        """Write what is queued, then end ``run``."""
        self._stopping = True
        await self._queue.put(None)

    async def run(self) -> None:
        backoff = Backoff()
        while True:
            outcomes = await self._queue.get()
            if outcomes is None:
                return
            while True:
                try:
                    await self.commit(outcomes)
                    backoff.reset()
                    break
                except RedisError as exc:
                    if self._stopping and backoff.attempts > GIVE_UP_WHEN_STOPPING:
                        log.error("giving up writing %d results: %s", len(outcomes), exc)
                        break
                    await backoff.wait("write results", exc)
            by_queue: dict[str, list[bytes]] = {}
            for out in outcomes:
                by_queue.setdefault(out.queue, []).append(out.entry_id)
            for queue, ids in by_queue.items():
                self._leases.release(queue, ids)

    async def commit(self, outcomes: Sequence[Outcome]) -> None:
        """Results, inbox pushes, acks and deletes: one atomic script."""
        refused = await self._committer.commit(outcomes)
        if refused:  # NOGROUP after Redis restarted empty: the results are written
            log.warning("%d stream(s) refused the ack of %d results", refused, len(outcomes))

    async def dead_letter(self, stream: Stream, letters: Sequence[DeadLetter]) -> None:
        """Entries nobody can answer (unreadable, or deleted while pending) go
        to ``tq:dead:<model>``, acked and deleted in one transaction (the dead
        stream shares the queue's slot)."""
        async with self._redis.pipeline(transaction=True) as pipe:
            for letter in letters:
                pipe.xadd(self._keys.dead(stream.model), letter.fields())  # type: ignore[arg-type]
                pipe.xack(stream.queue, CONSUMER_GROUP, letter.entry_id)
                pipe.xdel(stream.queue, letter.entry_id)
            await pipe.execute()
        log.warning(
            "dead-lettered %d entries of %s: %s", len(letters), stream.queue, letters[0].reason
        )

    async def bury(self, stream: Stream, entry_id: bytes, reason: str) -> None:
        """Dead-letter an entry delivered too often; answer its producer if we can."""
        rows: Any = await self._redis.xrange(stream.queue, entry_id, entry_id)
        raw: bytes = rows[0][1].get(REQUEST_FIELD.encode(), b"") if rows and rows[0][1] else b""
        request_id, reply_to = peek_id_and_reply_to(raw)
        # The dead letter first, then the answer and the ack through the batch
        # commit (atomic on one node, grouped by slot on a cluster). A kill in
        # between redelivers the entry and it is buried again: at worst a
        # second dead letter, never a request left without its answer.
        letter = DeadLetter(raw, reason, entry_id)
        await self._redis.xadd(self._keys.dead(stream.model), letter.fields())  # type: ignore[arg-type]
        answer = b""
        if request_id:
            answer = pack_result(Result.failure(request_id, "error", "poison", reason))
        await self.commit([Outcome(stream.queue, entry_id, request_id or "", reply_to, answer)])
        log.warning("dead letter: entry %s of %s: %s", entry_id.decode(), stream.queue, reason)
