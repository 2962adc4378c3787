"""Enqueueing: ``ENQUEUE``, the Lua script that XADDs requests to a stream
while it is under the model's ``max_queue_len`` (one atomic call per stream,
never trimming) and marks them as accepted, and ``Enqueuer``, the group
commit that sends the submits of concurrent tasks together: M concurrent
producers cost one script call per model per round trip.

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
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from common.keys import REQUEST_FIELD, Keys
from common.records import AcceptedMarker
from common.scripts import LuaScript
from producer.client.submission import Prepared

# KEYS[1] the stream; on a single node also KEYS[2] = tq:sub:<client_id> and
# KEYS[3..] = tq:acc:<id> of each payload whose id the caller chose, in order.
# ARGV: [1] max_queue_len, [2] the stream field, [3] the marks' TTL, [4] the
# tq:acc value, [5] the highest generated n among the payloads ('' for none),
# [6] one flag per payload, '1' where the caller chose the id, [7..] payloads.
# XADD each payload while the stream (queued + in flight: acked entries are
# deleted) is below the limit; false for each refused one (the tail). The
# high-water mark only grows (two clients might share a client_id); a tq:acc
# key that exists (the gateway claims it first, with the outputs its answer
# must show) keeps its value, its TTL renewed. Refused generated ids may look
# known (a waiter polls them until its timeout); refused chosen ids do not.
ENQUEUE = LuaScript("""
local room = tonumber(ARGV[1]) - redis.call('XLEN', KEYS[1])
local marked, ttl, flags = #KEYS > 1, ARGV[3], ARGV[6]
if marked and ARGV[5] ~= '' then
  if tonumber(ARGV[5]) > tonumber(redis.call('GET', KEYS[2]) or '-1') then
    redis.call('SET', KEYS[2], ARGV[5], 'EX', ttl)
  else
    redis.call('EXPIRE', KEYS[2], ttl)
  end
end
local ids, key = {}, 2
for i = 7, #ARGV do
  local n = i - 6
  if n > room then
    ids[n] = false
  else
    ids[n] = redis.call('XADD', KEYS[1], '*', ARGV[2], ARGV[i])
    if marked and string.byte(flags, n) == 49 then
      key = key + 1
      if not redis.call('SET', KEYS[key], ARGV[4], 'EX', ttl, 'NX') then
        redis.call('EXPIRE', KEYS[key], ttl)
      end
    end
  end
end
return ids
""")

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
        await asyncio.sleep(0)  # let submitters running in this same tick join
        while self._outbox:
            batch, self._outbox = self._outbox, []
            flat = [item for prepared, _ in batch for item in prepared]
            try:
                replies = await self._send(flat)
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
        calls = [
            self._call_of(queue, [prepared[i] for i in indices])
            for queue, indices in groups.items()
        ]
        redis = self._redis()
        if not self._loaded:
            await self._call(ENQUEUE.load(redis))
            self._loaded = True
        replies: list[Any]
        if self.keys.cluster:  # cluster pipelines refuse EVALSHA: concurrent calls instead;
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
        for indices, reply in zip(groups.values(), replies, strict=True):
            for index, entry_id in zip(indices, reply, strict=True):
                entry_ids[index] = entry_id
        return entry_ids

    def _call_of(self, queue: str, group: list[Prepared]) -> tuple[list[str], list[Any]]:
        """The keys and arguments of one stream's ENQUEUE call."""
        keys = [queue]
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
        return keys, [group[0].limit, REQUEST_FIELD, ttl, marker, high, flags,
                      *(p.payload for p in group)]  # fmt: skip

    async def _pipelined(
        self, redis: aioredis.Redis, calls: list[tuple[list[str], list[Any]]]
    ) -> list[Any]:
        async with redis.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                ENQUEUE.queue(pipe, keys, args)
            replies: list[Any] = await self._call(pipe.execute())
        return replies
