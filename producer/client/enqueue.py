"""Enqueueing: ``ENQUEUE``, the Lua script that XADDs requests to a stream
while it is under the model's ``max_queue_len`` (one atomic call per stream,
never trimming), and ``Enqueuer``, the group commit that sends the submits of
concurrent tasks together: M concurrent producers cost one script call per
model per round trip."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from common.keys import REQUEST_FIELD, Keys
from common.scripts import LuaScript
from producer.client.submission import Prepared

# XADD each payload (ARGV[3..]) while the stream (queued + in flight: acked
# entries are deleted) is below the limit ARGV[1]; false for each refused one.
# One call per model per submit_many, atomic.
ENQUEUE = LuaScript("""
local room = tonumber(ARGV[1]) - redis.call('XLEN', KEYS[1])
local ids = {}
for i = 3, #ARGV do
  if i - 2 > room then
    ids[#ids + 1] = false
  else
    ids[#ids + 1] = redis.call('XADD', KEYS[1], '*', ARGV[2], ARGV[i])
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

    def __init__(self, keys: Keys, redis: Callable[[], aioredis.Redis], call: Call) -> None:
        self.keys = keys
        self._redis = redis
        self._call = call
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
            (queue, prepared[indices[0]].limit, [prepared[i].payload for i in indices])
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
                *(
                    ENQUEUE.run(redis, [queue], [limit, REQUEST_FIELD, *payloads], call=self._call)
                    for queue, limit, payloads in calls
                )
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

    async def _pipelined(
        self, redis: aioredis.Redis, calls: list[tuple[str, int, list[bytes]]]
    ) -> list[Any]:
        async with redis.pipeline(transaction=False) as pipe:
            for queue, limit, payloads in calls:
                ENQUEUE.queue(pipe, [queue], [limit, REQUEST_FIELD, *payloads])
            replies: list[Any] = await self._call(pipe.execute())
        return replies
