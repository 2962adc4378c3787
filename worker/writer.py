"""The writer: the only part of a worker that writes results, acks and
dead letters.

Outcomes arrive on a bounded queue (``put``) and are committed in arrival
order, one commit at a time, each group with one atomic script
(worker/commit.py); an idle worker's answer, with nothing queued or being
written, is committed in the caller's task instead, saving the writer
task's wake-up. A commit is retried with backoff while Redis is away: the
entries stay pending meanwhile, so if a write never succeeds they are
redelivered (restart) or reclaimed, and nothing is lost. An entry is acked
with the answer to the last of its requests (a bundle's members may be
answered in several commits: invalid ones at once, the others by their
batches); until then every answer to it is also kept by id, so that a
redelivery of the entry knows which of its requests are done. Once acked,
its lease is released.

Dead letters (``dead_letter``, ``bury``) are written at once, awaited by
the reader that found them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from common.backoff import Backoff
from common.envelope import Result, pack_result, peek_id_and_reply_to
from common.keys import CONSUMER_GROUP, Keys
from common.records import DeadLetter
from worker.commit import CommitPlan, Committer
from worker.leases import Leases
from worker.work import Outcome, Stream, fixed

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
        # groups of outcomes, each with a future set once written (or given up)
        self._queue: asyncio.Queue[tuple[Sequence[Outcome], asyncio.Future[None]] | None] = (
            asyncio.Queue(maxsize=4)
        )
        self._stopping = False
        self._writing = asyncio.Lock()
        self._backoff = Backoff()

    async def put(self, outcomes: Sequence[Outcome], *, idle: bool = False) -> asyncio.Future[None]:
        """Queue outcomes for writing (waits while four groups are queued);
        the future is done once they are written.

        ``idle``: the caller has nothing else to do meanwhile (an idle
        worker's answer). When nothing is queued or being written, the
        outcomes are written here and now, in the caller's task: the writer
        task's wake-up is a loop turn on a lone request's path (README,
        "Variable lengths")."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not outcomes:
            done.set_result(None)
        elif idle and self._queue.empty() and not self._writing.locked():
            await self._write(outcomes)
            done.set_result(None)
        else:
            await self._queue.put((outcomes, done))
        return done

    def stop_soon(self) -> None:
        """The worker is stopping: a write that keeps failing (Redis away)
        gives up after GIVE_UP_WHEN_STOPPING attempts, its entries left
        pending for a redelivery, so that neither the writer task nor a
        scheduler writing an idle answer itself holds the drain up."""
        self._stopping = True

    async def close(self) -> None:
        """Write what is queued, then end ``run``."""
        self.stop_soon()
        await self._queue.put(None)

    async def run(self) -> None:
        while True:
            queued = await self._queue.get()
            if queued is None:
                return
            outcomes, done = queued
            await self._write(outcomes)
            done.set_result(None)

    async def _write(self, outcomes: Sequence[Outcome]) -> None:
        """Commit outcomes, retrying while Redis is away. One commit at a
        time, in the order planned: an entry acked by a later commit must
        never be written before the earlier answers to it."""
        async with self._writing:
            plan = self.plan(outcomes)
            while True:
                try:
                    await self.commit(plan)
                    self._backoff.reset()
                    break
                except RedisError as exc:
                    if self._stopping and self._backoff.attempts > GIVE_UP_WHEN_STOPPING:
                        log.error("giving up writing %d results: %s", len(outcomes), exc)
                        break
                    await self._backoff.wait("write results", exc)
            for queue, (_, ids) in plan.acks.items():
                self._leases.release(queue, ids)

    def plan(self, outcomes: Sequence[Outcome]) -> CommitPlan:
        """What to write for ``outcomes``: each answer counted against its
        entry, which is acked when this answers the last of its requests."""
        plan = CommitPlan()
        for out in outcomes:
            complete = self._leases.answer(out.queue, out.entry_id, out.answered)
            if out.singles is not None:
                keep = [i for i, store in enumerate(out.store) if store or complete is None]
                if keep:
                    singles = out.singles()
                    plan.stored += [(out.ids[i], singles[i]) for i in keep]
                for inbox, element in out.pushes:
                    if self._keys.is_inbox(inbox):
                        plan.pushes.setdefault(inbox, []).append(element)
            if complete is not None:
                plan.ack(out.queue, out.entry_id, complete)
        return plan

    async def commit(self, plan: CommitPlan) -> None:
        """Results, inbox pushes, acks and deletes: one atomic script."""
        refused = await self._committer.commit(plan)
        if refused:  # NOGROUP after Redis restarted empty: the results are written
            log.warning("%d stream(s) refused the ack of %d entries", refused,
                        sum(len(ids) for _, ids in plan.acks.values()))  # fmt: skip

    async def dead_letter(
        self, stream: Stream, letters: Sequence[DeadLetter], *, ack: bool = True
    ) -> None:
        """Entries nobody can answer (unreadable, or deleted while pending) go
        to ``tq:dead:<model>``, acked and deleted in one transaction (the dead
        stream shares the queue's slot). ``ack`` False: letters of single
        members of a bundle, whose entry is acked with its other answers."""
        async with self._redis.pipeline(transaction=True) as pipe:
            for letter in letters:
                pipe.xadd(self._keys.dead(stream.model), letter.fields())  # type: ignore[arg-type]
                if ack:
                    pipe.xack(stream.queue, CONSUMER_GROUP, letter.entry_id)
                    pipe.xdel(stream.queue, letter.entry_id)
                    pipe.decrby(self._keys.queued(stream.queue), 1)
            await pipe.execute()
        log.warning(
            "dead-lettered %d entries of %s: %s", len(letters), stream.queue, letters[0].reason
        )

    async def bury(self, stream: Stream, entry_id: bytes, raw: bytes, reason: str) -> None:
        """Dead-letter an entry (``raw``: its request) delivered too often;
        answer its producer if we can."""
        request_id, reply_to = peek_id_and_reply_to(raw)
        # The dead letter first, then the answer and the ack through the batch
        # commit (atomic on one node, grouped by slot on a cluster). A kill in
        # between redelivers the entry and it is buried again: at worst a
        # second dead letter, never a request left without its answer.
        letter = DeadLetter(raw, reason, entry_id)
        await self._redis.xadd(self._keys.dead(stream.model), letter.fields())  # type: ignore[arg-type]
        out = Outcome.ack_only(stream.queue, entry_id, [request_id or ""])
        if request_id:
            answer = pack_result(Result.failure(request_id, "error", "poison", reason))
            pushes = ((reply_to, answer),) if reply_to else ()
            out = Outcome(stream.queue, entry_id, (request_id,), (True,), pushes, fixed([answer]))
        await self.commit(self.plan([out]))
        log.warning("dead letter: entry %s of %s: %s", entry_id.decode(), stream.queue, reason)
