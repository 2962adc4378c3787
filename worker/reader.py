"""The reader of one stream: XREADGROUP on its own blocking connection,
decode and validate each entry, drop what is already answered, and hand
the accepted requests to the scheduler. What is invalid is answered at once
(through the writer); what cannot be answered is dead-lettered.

An entry holds one request or a bundle (common/bundle.py). A bundle becomes
one parcel (worker/work.py) checked once as a whole when its inputs are
stacked; a member that is malformed on its own is answered (or, without a
readable id, dead-lettered) alone and the others go on. A redelivered
bundle is handed over member by member, each to run alone, in order: its
members answered before are found by their kept results and only counted;
when the entry reaches ``max_deliveries`` the first member still unanswered
(the one its worker died on) is buried, the entry's delivery count starts
again, and the members after it go on.

Own pending entries come first: at start (a restarted worker keeps its
consumer name), after a read whose reply was lost in transit, and after
upkeep reclaimed idle entries of a dead consumer (``recover``). They are
read one at a time, each only once the one before is answered, so only the
entry being computed counts a delivery when the worker dies again.

Counting rules (Redis): XREADGROUP with an id other than ``>`` increments an
entry's delivery count, so re-reading own pending entries one at a time
counts one delivery each. An entry already delivered ``max_deliveries``
times is not delivered again: a single request is buried (dead letter +
error result), a bundle as above.

Stopping is by flag, never by cancelling the blocking read (a cancelled
XREADGROUP strands the entries it was delivering): ``run`` returns after
its current read.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from common.backoff import Backoff
from common.bundle import BundleRequest, is_bundle_payload, unpack_entry
from common.envelope import Arrays, Request, Result, pack_request, peek_id_and_reply_to
from common.errors import InvalidInput, ProtocolError
from common.keys import CONSUMER_GROUP, REQUEST_FIELD, Keys
from common.records import DeadLetter
from common.redis_conn import blocking_client
from common.settings import Settings
from worker.control import ControlFeed
from worker.leases import Leases
from worker.registry import LoadedModel
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
        self._entry_rows = 1.0  # rows per entry lately (bundles hold many)
        self._recovering = True  # own pending entries to re-read first
        self._recover_after = "-"  # XPENDING cursor while recovering

    def _read_count(self) -> int:
        """Entries to read: what fills the backlog's room at the rows per
        entry seen lately, so bundles are not read far ahead of the device
        (other workers may take what this one would only hold)."""
        max_rows = self._served[self.stream.model].spec.max_batch_size
        room = self._scheduler.room(self.stream)
        return max(1, min(max_rows, math.ceil(room / self._entry_rows)))

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
                        for entry, deliveries, bury in await self._next_own_pending(conn):
                            await self.accept([entry], deliveries, bury_first=bury)
                            # Nothing is read past a redelivered entry until it is
                            # answered: each read counts a delivery, and entries read
                            # ahead of a poison one that kills the worker again would
                            # reach max_deliveries and be buried with it.
                            await self._leases.wait_released(self.stream.queue, entry[0], stop)
                        continue
                    count = self._read_count()
                    reply: Any = await conn.xreadgroup(
                        CONSUMER_GROUP, self._consumer, {queue: ">"}, count=count, block=block_ms
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
                self._scheduler.note_more_waiting(self.stream, len(entries) >= count)
                if entries:
                    rows = await self.accept(entries, 1)
                    self._entry_rows = max(1.0, (self._entry_rows + rows / len(entries)) / 2)
                    # The scheduler starts on them before this task sends its next
                    # read: that send is a lone request's wait otherwise.
                    await asyncio.sleep(0)
        finally:
            await conn.aclose()

    async def _next_own_pending(self, conn: aioredis.Redis) -> list[tuple[Entry, int, bool]]:
        """The next own pending entry not already held, with its new delivery
        count and whether it is a bundle past ``max_deliveries`` (its first
        unanswered member is to be buried). Empty when there is none left
        (recovery is over)."""
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
                rows: Any = await self._redis.xrange(queue, entry_id, entry_id)
                fields = rows[0][1] if rows else None
                raw = fields.get(REQUEST_FIELD.encode(), b"") if fields else b""
                if not is_bundle_payload(raw):
                    await self._writer.bury(self.stream, entry_id, raw, reason)
                    continue
                # a bundle: its members start a fresh count once the culprit is buried
                await self._redis.xclaim(queue, CONSUMER_GROUP, self._consumer, 0, [entry_id],
                                         retrycount=1, justid=True)  # fmt: skip
                return [((entry_id, fields), delivered + 1, True)]
            reply: Any = await conn.xreadgroup(
                CONSUMER_GROUP, self._consumer, {queue: id_before(entry_id)}, count=1
            )
            entries = reply[0][1] if reply else []
            if entries and entries[0][0] == entry_id:
                return [(entries[0], delivered + 1, False)]
            # acked by someone else meanwhile: nothing to do, look further
        if len(pending) < PENDING_PAGE:
            self._recovering = False
            self._recover_after = "-"
        return []

    async def accept(
        self, entries: Sequence[Entry], deliveries: int, *, bury_first: bool = False
    ) -> int:
        """Decode and validate delivered entries; answer what is invalid at
        once and dead-letter what cannot be answered. ``bury_first``: the
        entry is a bundle past max_deliveries (see the module docstring).
        Returns the rows handed to the scheduler."""
        good: list[Accepted] = []
        rejected: list[Outcome] = []
        dead: list[DeadLetter] = []  # whole entries
        dead_members: list[DeadLetter] = []  # members of bundles without a readable id
        queue = self.stream.queue
        for entry_id, fields in entries:
            raw = fields.get(REQUEST_FIELD.encode()) if fields else None
            try:
                entry = self._decode(raw)
            except ProtocolError as exc:
                if exc.request_id:
                    reply_to = peek_id_and_reply_to(raw or b"")[1]
                    rejected.append(self._failed(entry_id, exc.request_id, reply_to, exc))
                    self._leases.hold(queue, entry_id)
                else:
                    dead.append(DeadLetter(raw or b"", exc.message, entry_id))
                continue
            if isinstance(entry, Request):
                self._leases.hold(queue, entry_id)
                try:
                    good.append(self._validate(entry_id, entry, deliveries))
                except ProtocolError as exc:
                    rejected.append(self._failed(entry_id, entry.id, entry.reply_to, exc))
                continue
            self._leases.hold(queue, entry_id, len(entry))
            parcels, answers, letters = self._validate_bundle(entry_id, raw or b"", entry,
                                                              deliveries)  # fmt: skip
            good += parcels
            if answers is not None:
                rejected.append(answers)
            if letters:
                dead_members += letters
                rejected.append(Outcome.ack_only(queue, entry_id, [""] * len(letters)))
        if dead:
            await self._writer.dead_letter(self.stream, dead)
        if dead_members:
            await self._writer.dead_letter(self.stream, dead_members, ack=False)
        if rejected:
            self._stats.count_errors(sum(o.answered for o in rejected))
            await self._writer.put(rejected)
        good = await self._drop_answered(good)
        if bury_first and good:
            await self._bury_member(good[0], deliveries - 1)
            good = good[1:]
        if good:
            self._scheduler.add(self.stream, good)
        return sum(p.rows for p in good)

    def _decode(self, raw: bytes | None) -> Request | BundleRequest:
        if raw is None:
            raise ProtocolError(f"stream entry has no {REQUEST_FIELD!r} field")
        return unpack_entry(raw, self._settings.limits.codec())

    def _failed(
        self, entry_id: bytes, request_id: str, reply_to: str | None, exc: ProtocolError
    ) -> Outcome:
        result = Result.failure(request_id, "error", exc.code, exc.message, worker=self._consumer)
        return Outcome.of_results(self.stream.queue, entry_id, [result], [reply_to], [True])

    def _check_reply_to(self, reply_to: str | None, request_id: str | None) -> None:
        if reply_to is not None and not self._keys.is_inbox(reply_to):
            raise InvalidInput(
                f"reply_to {reply_to!r:.80} is not an inbox key ({self._keys.inbox('<client>')})",
                request_id=request_id,
            )

    def _check_model(self, name: str, request_id: str | None) -> LoadedModel:
        model = self._served[self.stream.model]
        if name != model.name:
            raise InvalidInput(
                f"request for model {name!r} on the queue of {model.name!r}", request_id=request_id
            )
        return model

    def _validate(self, entry_id: bytes, request: Request, deliveries: int) -> Accepted:
        self._check_reply_to(request.reply_to, request.id)
        model = self._check_model(request.model, request.id)
        rows = model.spec.check_inputs(request.inputs, request_id=request.id)
        return Accepted.single(self.stream, entry_id, request, rows, deliveries)

    def _validate_bundle(
        self, entry_id: bytes, raw: bytes, bundle: BundleRequest, deliveries: int
    ) -> tuple[list[Accepted], Outcome | None, list[DeadLetter]]:
        """A bundle's good members as parcels (one for all when its inputs
        are stacked and it is not redelivered), the answers to its bad ones,
        and dead letters (holding the whole bundle, ``raw``) for members
        without a readable id."""
        errors: dict[int, ProtocolError] = dict(bundle.errors)
        n = len(bundle)
        if len(errors) < n:
            try:
                model = self._check_model(bundle.model, None)
            except InvalidInput as exc:
                errors = {i: errors.get(i, exc) for i in range(n)}
        if len(errors) < n:
            for inbox in set(bundle.reply_to):  # one check per inbox, usually one for all
                try:
                    self._check_reply_to(inbox, None)
                except InvalidInput as bad:
                    for i, member_inbox in enumerate(bundle.reply_to):
                        if member_inbox == inbox:
                            errors.setdefault(i, bad)
        parcels: list[Accepted] = []
        if len(errors) < n:
            if bundle.inputs is not None:
                try:
                    model.spec.check_bundle(bundle.inputs, bundle.offsets)
                except InvalidInput as exc:
                    errors = {i: errors.get(i, exc) for i in range(n)}
                else:
                    whole = self._parcel(entry_id, bundle, bundle.inputs, bundle.offsets,
                                         range(n), deliveries)  # fmt: skip
                    good = [i for i in range(n) if i not in errors]
                    if good:
                        parcels = [whole if len(good) == n else whole.select(good)]
            else:
                for i, inputs in enumerate(bundle.member_inputs or ()):
                    if i in errors or inputs is None:
                        continue
                    try:
                        rows = model.spec.check_inputs(inputs, request_id=bundle.ids[i])
                    except InvalidInput as exc:
                        errors[i] = exc
                        continue
                    parcels.append(self._parcel(entry_id, bundle, inputs, (0, rows), [i],
                                                deliveries))  # fmt: skip
        if deliveries > 1:  # each alone, in order
            parcels = [member for parcel in parcels for member in parcel.members()]
        letters: list[DeadLetter] = []
        results: list[Result] = []
        inboxes: list[str | None] = []
        for i, problem in sorted(errors.items()):
            request_id = bundle.ids[i]
            if request_id is None:
                letters.append(DeadLetter(raw, problem.message, entry_id))
                continue
            results.append(Result.failure(request_id, "error", problem.code, problem.message,
                                          worker=self._consumer))  # fmt: skip
            inbox = bundle.reply_to[i]
            inboxes.append(inbox if inbox and self._keys.is_inbox(inbox) else None)
        answers = None
        if results:
            answers = Outcome.of_results(self.stream.queue, entry_id, results, inboxes,
                                         [True] * len(results))  # fmt: skip
        return parcels, answers, letters

    def _parcel(
        self,
        entry_id: bytes,
        bundle: BundleRequest,
        inputs: Arrays,
        offsets: Sequence[int],
        members: Sequence[int],
        deliveries: int,
    ) -> Accepted:
        """Members of a bundle as one parcel over ``inputs``."""
        return Accepted(
            self.stream, entry_id, tuple(bundle.ids[i] or "" for i in members), tuple(offsets),
            inputs, tuple(bundle.deadlines[i] for i in members),
            tuple(bundle.reply_to[i] for i in members),
            tuple(bundle.store[i] or bundle.reply_to[i] is None for i in members), deliveries,
        )  # fmt: skip

    async def _bury_member(self, item: Accepted, delivered: int) -> None:
        """The first unanswered member of a bundle past max_deliveries: a dead
        letter holding it as a single request, and its ``poison`` answer."""
        max_deliveries = self._settings.worker.max_deliveries
        request_id = item.ids[0]
        reason = (
            f"bundle member {request_id!r}: its entry was delivered {delivered} times "
            f"(max_deliveries {max_deliveries}); its worker died each time on this request"
        )
        alone = Request(request_id, self.stream.model, dict(item.inputs), item.deadlines[0],
                        item.reply_to[0], self.stream.priority, item.store[0])  # fmt: skip
        letter = DeadLetter(pack_request(alone), reason, item.entry_id)
        await self._writer.dead_letter(self.stream, [letter], ack=False)
        result = Result.failure(request_id, "error", "poison", reason, worker=self._consumer)
        answer = Outcome.of_results(
            self.stream.queue, item.entry_id, [result], [item.reply_to[0]], [True]
        )
        await self._writer.put([answer])
        log.warning("dead letter: %s of entry %s of %s", request_id, item.entry_id.decode(),
                    self.stream.queue)  # fmt: skip

    async def _drop_answered(self, items: list[Accepted]) -> list[Accepted]:
        """Check Redis for requests the control feed cannot vouch for: of
        redelivered entries (already answered? then only count them) and of
        entries enqueued before the feed started (cancelled while nobody
        listened?)."""
        since = self._feed.listening_since_ms
        doubtful = [p for p in items if p.redelivered or p.enqueued_ms < since]
        if not doubtful:
            return items
        async with self._redis.pipeline(transaction=False) as pipe:
            for item in doubtful:
                for request_id in item.ids:
                    pipe.exists(self._keys.cancelled(request_id))
                    pipe.exists(self._keys.result(request_id))
            try:
                flags = iter(await pipe.execute())
            except RedisError as exc:  # compute anyway: a duplicate beats a loss
                log.warning("cancel/result check failed: %s", exc)
                return items
        answered: list[Outcome] = []
        replaced: dict[int, Accepted | None] = {}
        for item in doubtful:
            done: list[int] = []
            for i, request_id in enumerate(item.ids):
                cancelled, stored = next(flags), next(flags)
                if stored:
                    done.append(i)
                elif cancelled:
                    self._feed.add_cancelled(request_id)
            if done:
                answered.append(
                    Outcome.ack_only(item.stream.queue, item.entry_id, [item.ids[i] for i in done])
                )
                answered_now = set(done)
                left = [i for i in range(item.count) if i not in answered_now]
                replaced[id(item)] = item.select(left) if left else None
        if not answered:
            return items
        await self._writer.put(answered)
        kept = [replaced.get(id(p), p) for p in items]
        return [p for p in kept if p is not None]
