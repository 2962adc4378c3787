"""Enqueueing: ``ENQUEUE``, the Lua script that XADDs entries to a stream
while it holds fewer than the model's ``max_queue_len`` requests (one atomic
call per stream, never trimming) and marks them as accepted, and
``Enqueuer``, the group commit that sends the submits of concurrent tasks
together: M concurrent producers cost one script call per model per round
trip, and their requests travel as bundles (common/bundle.py: up to the
model's max_batch_size rows per stream entry), so a worker reads, checks
and answers many of them as one. A flush of much input sends its head
first (``early_first``), so workers compute while the rest travels.

The queue limit counts requests, not entries: ``tq:qn:<model>`` counts what
the stream holds (raised here, lowered by the workers' acks; the stream's
length is a lower bound, and the count starts again when the stream is
empty). A bundle that does not fit whole is refused with the number of its
requests that would: those are sent again as an entry of their own.

The accepted marks let anyone waiting by id tell a request in flight from an
unknown id, at no extra round trip, for the result TTL: an id the client
generated (``<client_id>-<n>``) is covered by one key per client and call,
``tq:sub:<client_id>`` = the highest ``n`` enqueued (ids are generated in
increasing order); an id the caller chose gets its own ``tq:acc:<id>``, the
marker the gateway also writes for its async requests. On Redis Cluster
neither is written: they would lie in other slots than the stream.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Sequence
from itertools import accumulate
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from common.bundle import pack_bundle
from common.envelope import pack_request
from common.keys import REQUEST_FIELD, Keys
from common.records import AcceptedMarker
from common.scripts import LuaScript
from producer.client.submission import Prepared

# KEYS[1] the stream, KEYS[2] its request count; on a single node also
# KEYS[3] = tq:sub:<client_id> and KEYS[4..] = tq:acc:<id> of each request
# whose id the caller chose, in order. ARGV: [1] max_queue_len, [2] the stream
# field, [3] the marks' TTL, [4] the tq:acc value, [5] the highest generated n
# ('' for none), [6] one flag per request, '1' where the caller chose the id,
# [7] the entry count, then per entry: its requests, its payload.
# XADD each entry while the stream has room for all its requests; for the
# first that does not fit, the number that would (its caller sends those
# again alone), false for each entry after it. The high-water mark only grows
# (two clients might share a client_id); a tq:acc key that exists (the
# gateway claims it first, with the outputs its answer must show) keeps its
# value, its TTL renewed. Refused generated ids may look known (a waiter
# polls them until its timeout); refused chosen ids do not.
ENQUEUE = LuaScript("""
local length = redis.call('XLEN', KEYS[1])
local queued = tonumber(redis.call('GET', KEYS[2]) or '0')
if length == 0 and queued ~= 0 then
  queued = 0
  redis.call('DEL', KEYS[2])
end
local room = tonumber(ARGV[1]) - math.max(queued, length)
local marked, ttl, flags = #KEYS > 2, ARGV[3], ARGV[6]
if marked and ARGV[5] ~= '' then
  if tonumber(ARGV[5]) > tonumber(redis.call('GET', KEYS[3]) or '-1') then
    redis.call('SET', KEYS[3], ARGV[5], 'EX', ttl)
  else
    redis.call('EXPIRE', KEYS[3], ttl)
  end
end
local replies, key, member, added, closed, a = {}, 3, 0, 0, false, 8
for i = 1, tonumber(ARGV[7]) do
  local count = tonumber(ARGV[a])
  if closed or count > room then
    if closed then replies[i] = false else replies[i] = math.max(room, 0) end
    closed = true
    if marked then
      for m = member + 1, member + count do
        if string.byte(flags, m) == 49 then key = key + 1 end
      end
    end
  else
    replies[i] = redis.call('XADD', KEYS[1], '*', ARGV[2], ARGV[a + 1])
    room = room - count
    added = added + count
    if marked then
      for m = member + 1, member + count do
        if string.byte(flags, m) == 49 then
          key = key + 1
          if not redis.call('SET', KEYS[key], ARGV[4], 'EX', ttl, 'NX') then
            redis.call('EXPIRE', KEYS[key], ttl)
          end
        end
      end
    end
  end
  member = member + count
  a = a + 2
end
if added > 0 then redis.call('INCRBY', KEYS[2], added) end
return replies
""")

# The most bytes of input one bundle carries (a worker decodes an entry at once).
BUNDLE_BYTES = 4 * 1024 * 1024

# A flush holding more than twice this much input goes out in two round
# trips, its first EARLY_BYTES first: workers start computing while the rest
# is packed and sent. (2,000 one-row encoder requests, 4 MB: the first
# forward began 45-125 ms after submit_many was called, all of it spent
# packing and sending before any worker could read an entry.)
EARLY_BYTES = 256 * 1024

Call = Callable[[Awaitable[Any]], Awaitable[Any]]


class Enqueuer:
    """``await enqueuer.enqueue(prepared)``: the stream entry id of each
    request, or None for each one its queue refused.

    ``redis`` gives the client's current connection pool; ``call`` wraps
    each round trip (the client's RedisError -> RedisUnavailable, letting
    NoScriptError through to the script's reload)."""

    def __init__(
        self,
        keys: Keys,
        redis: Callable[[], aioredis.Redis],
        call: Call,
        client_id: str = "",
        marker_ttl_s: int = 0,
    ) -> None:
        """``marker_ttl_s`` > 0 (the result TTL): the accepted marks (see
        above) live that long; 0, or a cluster: none are written."""
        self.keys = keys
        self._client_id = client_id
        self._redis = redis
        self._call = call
        self._marker_ttl = 0 if keys.cluster else max(0, marker_ttl_s)
        self._markers: dict[str, str] = {}  # model -> its marker's value
        self._loaded = False  # the script is loaded once up front, then again on NOSCRIPT
        self._outbox: list[tuple[list[Prepared], asyncio.Future[list[Any]]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def enqueue(self, prepared: list[Prepared]) -> list[Any]:
        """Group commit: submits from concurrent tasks that arrive while an
        enqueue round trip is in flight go out together in the next one."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        self._outbox.append((prepared, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        # No yield before the first send: submitters already scheduled in
        # this loop turn (a gather of submits) run before this task's first
        # step and join it; a lone submit goes out one turn sooner.
        while self._outbox:
            batch, self._outbox = self._outbox, []
            flat = [item for prepared, _ in batch for item in prepared]
            try:
                replies = []
                for part in early_first(flat):
                    replies += await self._send(part)
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            offset = 0
            for prepared, future in batch:
                if not future.done():
                    future.set_result(replies[offset : offset + len(prepared)])
                offset += len(prepared)

    async def _send(self, prepared: Sequence[Prepared]) -> list[Any]:
        """One script call per stream; the entry id (or None) of each request, in order."""
        groups: dict[str, list[int]] = {}
        for index, p in enumerate(prepared):
            queue = self.keys.queue(p.request.model, p.request.priority)
            groups.setdefault(queue, []).append(index)
        bundles = {
            queue: bundled([prepared[i] for i in indices]) for queue, indices in groups.items()
        }
        calls = [self._call_of(queue, entries) for queue, entries in bundles.items()]
        redis = self._redis()
        if not self._loaded:
            await self._call(ENQUEUE.load(redis))
            self._loaded = True
        replies: list[Any]
        if len(calls) == 1:  # one stream: a plain EVALSHA costs less than a pipeline of one
            keys, args = calls[0]
            replies = [await ENQUEUE.run(redis, keys, args, call=self._call)]
        elif self.keys.cluster:  # cluster pipelines refuse EVALSHA: concurrent calls instead;
            # a node that lost its script cache gets it again without the other streams' calls
            replies = await asyncio.gather(
                *(ENQUEUE.run(redis, keys, args, call=self._call) for keys, args in calls)
            )
        else:
            try:
                replies = await self._pipelined(redis, calls)
            except NoScriptError:  # Redis restarted and lost its script cache
                await self._call(ENQUEUE.load(redis))
                replies = await self._pipelined(redis, calls)
        entry_ids: list[Any] = [None] * len(prepared)
        again: list[int] = []  # indices of requests to send once more, in a smaller entry
        for indices, entries, reply in zip(groups.values(), bundles.values(), replies, strict=True):
            position = iter(indices)
            for entry, answer in zip(entries, reply, strict=True):
                members = [next(position) for _ in entry]
                if isinstance(answer, bytes):
                    for index in members:
                        entry_ids[index] = answer
                elif isinstance(answer, int) and 0 < answer < len(entry):
                    again += members[:answer]
        if again:
            for index, entry_id in zip(again, await self._send([prepared[i] for i in again]),
                                       strict=True):  # fmt: skip
                entry_ids[index] = entry_id
        return entry_ids

    def _call_of(self, queue: str, entries: list[list[Prepared]]) -> tuple[list[str], list[Any]]:
        """The keys and arguments of one stream's ENQUEUE call."""
        keys = [queue, self.keys.queued(queue)]
        group = [p for entry in entries for p in entry]
        ttl, marker, high, flags = self._marker_ttl, "", "", ""
        if ttl:
            model = group[0].request.model
            marker = self._markers.get(model) or self._markers.setdefault(
                model, AcceptedMarker(model).encode()
            )
            keys.append(self.keys.submitted(self._client_id))
            seqs = [p.seq for p in group if p.seq is not None]
            high = str(max(seqs)) if seqs else ""
            if len(seqs) < len(group):
                keys += [self.keys.accepted(p.request.id) for p in group if p.seq is None]
                flags = "".join("0" if p.seq is not None else "1" for p in group)
        args: list[Any] = [group[0].limit, REQUEST_FIELD, ttl, marker, high, flags, len(entries)]
        for entry in entries:
            args += [len(entry), packed(entry)]
        return keys, args

    async def _pipelined(
        self, redis: aioredis.Redis, calls: list[tuple[list[str], list[Any]]]
    ) -> list[Any]:
        async with redis.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                ENQUEUE.queue(pipe, keys, args)
            replies: list[Any] = await self._call(pipe.execute())
        return replies


def early_first(prepared: Sequence[Prepared]) -> list[Sequence[Prepared]]:
    """``prepared`` as the parts to send one after the other: its first
    EARLY_BYTES of input, then the rest, when it holds over twice that;
    else all of it at once."""
    upto = list(accumulate(p.input_bytes for p in prepared))
    if not upto or upto[-1] <= 2 * EARLY_BYTES:
        return [prepared]
    head = bisect_left(upto, EARLY_BYTES) + 1  # the shortest prefix reaching it
    return [prepared] if head == len(prepared) else [prepared[:head], prepared[head:]]


def bundled(group: Sequence[Prepared]) -> list[list[Prepared]]:
    """One stream's requests in entries of up to max_batch_size rows and
    BUNDLE_BYTES of input each, in order."""
    entries: list[list[Prepared]] = []
    rows = size = 0
    for p in group:
        nbytes = p.input_bytes
        if entries and rows + p.rows <= p.bundle_rows and size + nbytes <= BUNDLE_BYTES:
            entries[-1].append(p)
            rows += p.rows
            size += nbytes
        else:
            entries.append([p])
            rows, size = p.rows, nbytes
    return entries


def packed(entry: Sequence[Prepared]) -> bytes:
    """The stream payload of an entry: a single request, or a bundle."""
    if len(entry) == 1:
        return pack_request(entry[0].request)
    return pack_bundle([p.request for p in entry])
