"""Committing a batch, the writer's one path for results: the results kept by
id (SET with TTL), the inbox pushes, and the XACK + XDEL of the entries
they complete (with their requests taken off the stream's request counter),
in one Lua script: atomic (a kill never leaves a result without its
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
the script cannot run; there a batch is pipelined round trips instead
(redis-py sends each node its share): the results kept by id, then the
inbox pushes, then per stream XACK + XDEL (a stream's keys share a slot).
The results go before the pushes, one round trip more where a batch has
both: a node's share of one pipeline can land after another node's, and a
client woken by its push must find its result kept (it shortens the key's
TTL once collected, and a reader by id must not see it pending), as the
single-node script guarantees. A kill between the two
leaves answered entries pending; their redelivery finds the stored results
and only acks; a request that asked not to be stored (``infer``) is computed
and pushed again, and its waiting client keeps the first answer.

Script arguments:
    KEYS = result keys (n), inbox keys (m), stream keys (q), their request
           counters (q, ``Keys.queued``)
    ARGV = ttl, n, m, q, group, payloads (n), then per inbox: element count,
           elements..., then per stream: requests acked, id count, ids...
An inbox element is one packed result or a result bundle (many members'
results in one element); one LPUSH per inbox carries every element of the
commit for it.
XACK/XDEL run under pcall: after Redis restarted empty the group is gone
(NOGROUP) and the results must still count as written. They go in chunks
of 1,000 ids (Lua's unpack stops near 8,000). An inbox push runs under pcall
too: a key of another type under an inbox name costs that push, not the
batch. Only ``<prefix>:inbox:*`` keys are pushed to (``Keys.is_inbox``): a
request cannot make a worker write into, or expire, any other key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from common.keys import CONSUMER_GROUP, Keys
from common.scripts import LuaScript

COMMIT = LuaScript("""
local ttl, group = ARGV[1], ARGV[5]
local n, m, q = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
for i = 1, n do
  redis.call('SET', KEYS[i], ARGV[5 + i], 'EX', ttl)
end
local a = 5 + n
for j = 1, m do
  local inbox, count, pushed = KEYS[n + j], tonumber(ARGV[a + 1]), false
  for first = 1, count, 1000 do
    local items = {}
    for k = first, math.min(count, first + 999) do items[#items + 1] = ARGV[a + 1 + k] end
    if type(redis.pcall('LPUSH', inbox, unpack(items))) == 'number' then pushed = true end
  end
  if pushed then redis.call('EXPIRE', inbox, ttl) end
  a = a + 1 + count
end
local failures = 0
for j = 1, q do
  local stream, counter = KEYS[n + m + j], KEYS[n + m + q + j]
  local requests, count, refused = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), false
  for first = 1, count, 1000 do
    local ids = {}
    for k = first, math.min(count, first + 999) do ids[#ids + 1] = ARGV[a + 2 + k] end
    local acked = redis.pcall('XACK', stream, group, unpack(ids))
    if type(acked) == 'table' and acked.err then refused = true end
    redis.pcall('XDEL', stream, unpack(ids))
  end
  if requests > 0 then redis.pcall('DECRBY', counter, requests) end
  if refused then failures = failures + 1 end
  a = a + 2 + count
end
return failures
""")


@dataclass
class CommitPlan:
    """What one commit writes: results to keep by id, inbox elements, and
    the entries to ack per stream with how many requests they held."""

    stored: list[tuple[str, bytes]] = field(default_factory=list)  # (request id, result)
    pushes: dict[str, list[bytes]] = field(default_factory=dict)  # inbox -> elements
    acks: dict[str, tuple[int, list[bytes]]] = field(default_factory=dict)

    def ack(self, queue: str, entry_id: bytes, requests: int) -> None:
        held, ids = self.acks.get(queue, (0, []))
        ids.append(entry_id)
        self.acks[queue] = (held + requests, ids)


class Committer:
    def __init__(self, redis: aioredis.Redis, keys: Keys, result_ttl_s: int) -> None:
        self._redis = redis
        self._keys = keys
        self._ttl = result_ttl_s

    async def commit(self, plan: CommitPlan) -> int:
        """Write a plan; returns how many streams refused the ack (their
        group is gone; the results are written all the same)."""
        if self._keys.cluster:
            return await self._commit_by_slot(plan)
        keys: list[Any] = [self._keys.result(i) for i, _ in plan.stored]
        keys += list(plan.pushes) + list(plan.acks)
        keys += [self._keys.queued(queue) for queue in plan.acks]
        args: list[Any] = [self._ttl, len(plan.stored), len(plan.pushes), len(plan.acks)]
        args.append(CONSUMER_GROUP)
        args += [payload for _, payload in plan.stored]
        for elements in plan.pushes.values():
            args += [len(elements), *elements]
        for requests, ids in plan.acks.values():
            args += [requests, len(ids), *ids]
        failures: int = await COMMIT.run(self._redis, keys, args)
        return failures

    async def _commit_by_slot(self, plan: CommitPlan) -> int:
        if plan.stored:  # a failed SET raises: the commit is retried
            async with self._redis.pipeline(transaction=False) as pipe:
                for request_id, payload in plan.stored:
                    pipe.set(self._keys.result(request_id), payload, ex=self._ttl)
                await pipe.execute()
        if plan.pushes:  # only once the results are kept: see the module docstring
            async with self._redis.pipeline(transaction=False) as pipe:
                for inbox, elements in plan.pushes.items():
                    pipe.lpush(inbox, *elements)
                    pipe.expire(inbox, self._ttl)
                await pipe.execute(raise_on_error=False)  # a failed push costs that push
        async with self._redis.pipeline(transaction=False) as pipe:
            for queue, (requests, ids) in plan.acks.items():
                pipe.xack(queue, CONSUMER_GROUP, *ids)
                pipe.xdel(queue, *ids)
                pipe.decrby(self._keys.queued(queue), requests)
            replies = await pipe.execute(raise_on_error=False)
        return sum(isinstance(reply, Exception) for reply in replies[::3])
