"""Committing a batch, the writer's one path for results: every result (SET
with TTL), the inbox pushes, and the XACK + XDEL of the entries they
answer, in one Lua script: atomic (a kill never leaves a result without its
ack or the reverse) and one command per batch instead of one per result,
which is most of the write cost.

A result overwrites an earlier one under the same id: ids are the
producer's, and a producer that reuses one (re-scoring rows by their own
ids) must get the new answer, not the old. The price: a worker cut off from
Redis past the visibility timeout, whose entries another worker took over
and answered, pushes a second, equal result when it comes back; a client
whose wait has ended ignores it. (Keeping the first result with SET NX was
tried and reverted for that reason.)

Keys of one batch span several slots, so on Redis Cluster (``keys.cluster``)
the script cannot run; there a batch is two pipelined round trips instead:
the results and inbox pushes (redis-py sends each node its share), then per
stream XACK + XDEL (a stream's keys share a slot). A kill between the two
leaves answered entries pending; their redelivery finds the result and only
acks, so each request is still answered once.

Script arguments:
    KEYS = result keys (n, in outcome order), inbox keys (m), stream keys (q)
    ARGV = ttl, n, m, q, payloads (n; empty = ack only), inbox index per
           outcome (n; 0 = none), then per stream: id count, ids...
XACK/XDEL run under pcall: after Redis restarted empty the group is gone
(NOGROUP) and the results must still count as written. They go in chunks
of 1,000 ids (Lua's unpack stops near 8,000). An inbox push runs under pcall
too: a key of another type under an inbox name costs that push, not the
batch. Only ``<prefix>:inbox:*`` keys are pushed to (``Keys.is_inbox``): a
request cannot make a worker write into, or expire, any other key.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis

from common.keys import CONSUMER_GROUP, Keys
from common.scripts import LuaScript
from worker.work import Outcome

COMMIT = LuaScript("""
local ttl, n, m, q = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local pushed = {}
for i = 1, n do
  local payload = ARGV[4 + i]
  if payload ~= '' then
    redis.call('SET', KEYS[i], payload, 'EX', ttl)
    local inbox = tonumber(ARGV[4 + n + i])
    if inbox > 0 then
      local ok = redis.pcall('LPUSH', KEYS[n + inbox], payload)
      if type(ok) == 'number' then pushed[inbox] = true end
    end
  end
end
for j = 1, m do
  if pushed[j] then redis.call('EXPIRE', KEYS[n + j], ttl) end
end
local a, failures, group = 4 + 2 * n, 0, ARGV[#ARGV]
for j = 1, q do
  local stream, count, refused = KEYS[n + m + j], tonumber(ARGV[a + 1]), false
  for first = 1, count, 1000 do
    local ids = {}
    for k = first, math.min(count, first + 999) do ids[#ids + 1] = ARGV[a + 1 + k] end
    local acked = redis.pcall('XACK', stream, group, unpack(ids))
    if type(acked) == 'table' and acked.err then refused = true end
    redis.pcall('XDEL', stream, unpack(ids))
  end
  if refused then failures = failures + 1 end
  a = a + 1 + count
end
return failures
""")


class Committer:
    def __init__(self, redis: aioredis.Redis, keys: Keys, result_ttl_s: int) -> None:
        self._redis = redis
        self._keys = keys
        self._ttl = result_ttl_s

    async def commit(self, outcomes: Sequence[Outcome]) -> int:
        """Write a batch's outcomes; returns how many streams refused the ack
        (their group is gone; the results are written all the same)."""
        if self._keys.cluster:
            return await self._commit_by_slot(outcomes)
        inboxes: dict[str, int] = {}
        streams: dict[str, list[bytes]] = {}
        keys: list[Any] = [self._keys.result(o.request_id) for o in outcomes]
        payloads: list[Any] = []
        inbox_index: list[Any] = []
        for out in outcomes:
            payloads.append(out.payload)
            if out.payload and out.reply_to and self._keys.is_inbox(out.reply_to):
                inbox_index.append(inboxes.setdefault(out.reply_to, len(inboxes) + 1))
            else:
                inbox_index.append(0)
            streams.setdefault(out.queue, []).append(out.entry_id)
        keys += list(inboxes) + list(streams)
        args: list[Any] = [self._ttl, len(outcomes), len(inboxes), len(streams)]
        args += payloads + inbox_index
        for ids in streams.values():
            args += [len(ids), *ids]
        args.append(CONSUMER_GROUP)
        failures: int = await COMMIT.run(self._redis, keys, args)
        return failures

    async def _commit_by_slot(self, outcomes: Sequence[Outcome]) -> int:
        inboxes: set[str] = set()
        streams: dict[str, list[bytes]] = {}
        is_set: list[bool] = []  # per queued command: a result SET (else a push or expiry)
        async with self._redis.pipeline(transaction=False) as pipe:
            for out in outcomes:
                if out.payload:
                    pipe.set(self._keys.result(out.request_id), out.payload, ex=self._ttl)
                    is_set.append(True)
                    if out.reply_to and self._keys.is_inbox(out.reply_to):
                        pipe.lpush(out.reply_to, out.payload)
                        is_set.append(False)
                        inboxes.add(out.reply_to)
                streams.setdefault(out.queue, []).append(out.entry_id)
            for inbox in inboxes:
                pipe.expire(inbox, self._ttl)
                is_set.append(False)
            if is_set:
                # a failed push or expiry costs that push; a failed SET is retried
                replies = await pipe.execute(raise_on_error=False)
                for result_set, reply in zip(is_set, replies, strict=True):
                    if result_set and isinstance(reply, Exception):
                        raise reply
        async with self._redis.pipeline(transaction=False) as pipe:
            for queue, ids in streams.items():
                pipe.xack(queue, CONSUMER_GROUP, *ids)
                pipe.xdel(queue, *ids)
            replies = await pipe.execute(raise_on_error=False)
        return sum(isinstance(reply, Exception) for reply in replies[::2])
