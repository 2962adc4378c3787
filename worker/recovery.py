"""Delivery bookkeeping beyond the happy path: re-reading this consumer's
own pending entries (after a restart, or entries it reclaimed), taking over
entries a dead consumer left idle past the visibility timeout, renewing the
lease on entries it still holds, and burying requests delivered too often.

Counting rules (Redis): XREADGROUP with an id other than ``>`` and XAUTOCLAIM
both increment an entry's delivery count; XCLAIM/XAUTOCLAIM with JUSTID do
not. So reclaiming uses JUSTID (the entries become ours untouched) and
recovery reads them back one at a time, each read counting one delivery.
An entry already delivered ``max_deliveries`` times is not delivered again:
it goes to ``tq:dead:<model>`` and its producer gets an error result.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis

from common.envelope import Result, pack_result, peek_id_and_reply_to
from common.keys import CONSUMER_GROUP, REQUEST_FIELD, Keys
from worker.commit import Committer
from worker.lanes import Lane, Outcome

log = logging.getLogger(__name__)

Entry = tuple[bytes, dict[bytes, bytes] | None]


def _as_sent(response: Any, **kwargs: Any) -> Any:
    return response


def id_before(entry_id: bytes | str) -> str:
    """The stream id just before ``entry_id`` (XREADGROUP returns ids after the one given)."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, seq = (int(part) for part in text.split("-"))
    return f"{ms}-{seq - 1}" if seq else f"{ms - 1}-{2**64 - 1}"


class Recovery:
    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        consumer: str,
        committer: Committer,
        *,
        max_deliveries: int,
    ) -> None:
        self._committer = committer
        self._redis = redis
        # redis-py parses XAUTOCLAIM ... JUSTID down to the claimed ids and
        # drops the cursor and the deleted ids that ``reclaim`` walks by; only
        # this class sends XAUTOCLAIM, so its reply is taken as Redis sends it.
        redis.set_response_callback("XAUTOCLAIM", _as_sent)
        self._keys = keys
        self._consumer = consumer
        self._max_deliveries = max_deliveries

    async def next_own_pending(self, lane: Lane, conn: aioredis.Redis) -> list[tuple[Entry, int]]:
        """Deliver the next own pending entry not already held, with its new
        delivery count. Empty when there is none left (recovery is over)."""
        pending: Any = await self._redis.xpending_range(
            lane.queue, CONSUMER_GROUP, min=lane.recover_after, max="+", count=64,
            consumername=self._consumer,
        )  # fmt: skip
        for record in pending:
            entry_id: bytes = record["message_id"]
            lane.recover_after = "(" + entry_id.decode()
            if entry_id in lane.held:
                continue
            delivered = int(record["times_delivered"])
            if delivered >= self._max_deliveries:
                await self.bury(lane, entry_id, delivered)
                continue
            reply: Any = await conn.xreadgroup(
                CONSUMER_GROUP, self._consumer, {lane.queue: id_before(entry_id)}, count=1
            )
            entries = reply[0][1] if reply else []
            if entries and entries[0][0] == entry_id:
                return [(entries[0], delivered + 1)]
            # acked by someone else meanwhile: nothing to do, look further
        if len(pending) < 64:
            lane.recovering = False
            lane.recover_after = "-"
        return []

    async def bury(self, lane: Lane, entry_id: bytes, delivered: int) -> None:
        """Dead-letter an entry delivered too often; answer its producer if we can."""
        rows: Any = await self._redis.xrange(lane.queue, entry_id, entry_id)
        raw: bytes = rows[0][1].get(REQUEST_FIELD.encode(), b"") if rows and rows[0][1] else b""
        reason = (
            f"delivered {delivered} times (max_deliveries {self._max_deliveries}); "
            "its worker died each time"
        )
        request_id, reply_to = peek_id_and_reply_to(raw)
        # The dead letter first, then the answer and the ack through the batch
        # commit (atomic on one node, grouped by slot on a cluster). A kill in
        # between redelivers the entry and it is buried again: at worst a
        # second dead letter, never a request left without its answer.
        await self._redis.xadd(
            self._keys.dead(lane.model.name), {"req": raw, "reason": reason, "entry": entry_id}
        )
        answer = b""
        if request_id:
            answer = pack_result(Result.failure(request_id, "error", "poison", reason))
        await self._committer.commit(
            [Outcome(lane.queue, entry_id, request_id or "", reply_to, answer)]
        )
        log.warning("dead letter: entry %s of %s: %s", entry_id.decode(), lane.queue, reason)

    async def dead_letter(self, lane: Lane, entries: Sequence[tuple[bytes, bytes, str]]) -> None:
        """Move entries nobody can answer (unreadable, or deleted while pending)
        to ``tq:dead:<model>`` as (entry id, raw request, reason), acked and
        deleted in one transaction (the dead stream shares the queue's slot)."""
        async with self._redis.pipeline(transaction=True) as pipe:
            for entry_id, raw, reason in entries:
                pipe.xadd(
                    self._keys.dead(lane.model.name),
                    {"req": raw, "reason": reason, "entry": entry_id},
                )
                pipe.xack(lane.queue, CONSUMER_GROUP, entry_id)
                pipe.xdel(lane.queue, entry_id)
            await pipe.execute()
        log.warning("dead-lettered %d entries of %s: %s", len(entries), lane.queue, entries[0][2])

    async def reclaim(self, lane: Lane, idle_ms: int) -> int:
        """Take over entries idle past the visibility timeout (their consumer is
        gone); they join our own pending entries for ``next_own_pending``."""
        cursor: Any = "0-0"
        claimed_total = 0
        while True:
            reply: Any = await self._redis.xautoclaim(
                lane.queue, CONSUMER_GROUP, self._consumer, idle_ms,
                start_id=cursor, count=100, justid=True,
            )  # fmt: skip
            cursor, claimed = reply[0], reply[1]
            deleted = reply[2] if len(reply) > 2 else []  # Redis 7 reports deleted entries
            if deleted:  # pending but gone from the stream: nobody can answer them
                await self.dead_letter(
                    lane, [(entry_id, b"", "entry deleted while pending") for entry_id in deleted]
                )
            claimed_total += len([c for c in claimed if c not in lane.held])
            if cursor in (b"0-0", "0-0"):
                break
        if claimed_total:
            log.info("reclaimed %d idle entries of %s", claimed_total, lane.queue)
            lane.recovering = True
            lane.recover_after = "-"
            lane.changed.set()
        return claimed_total

    async def renew_leases(self, lanes: list[Lane]) -> None:
        """Reset the idle time of every entry we hold (XCLAIM JUSTID to ourselves
        does not count a delivery), so a long batch is not reclaimed."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for lane in lanes:
                held: list[Any] = list(lane.held)
                for start in range(0, len(held), 500):
                    pipe.xclaim(
                        lane.queue, CONSUMER_GROUP, self._consumer, 0,
                        held[start : start + 500], justid=True,
                    )  # fmt: skip
            await pipe.execute()
