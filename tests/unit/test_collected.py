"""The client's collected results on fakeredis: once ``wait``/``result``
hands a kept result of its own request to the caller, ``tq:r:<id>`` is
shortened to ``collected_result_ttl_s`` (deleted for 0) by the background
flush; results not collected, not kept, or waited with ``keep=True`` are
left alone. And the client's maps stay empty after many cycles, whatever
the rate.

The worker is played by the test: it stores the result as a worker does
(``SET ... EX result_ttl_s``) and hands the inbox element to the inbox
(``Inbox.deliver``), as the reader would after its pop."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable

import fakeredis
import numpy as np
import pytest

from common.backoff import Poll
from common.envelope import Result, pack_result
from common.keys import Keys
from common.settings import RedisSettings, Settings
from common.spec import ModelSpec, TensorSpec
from producer import AsyncClient

KEYS = Keys()
SPEC = ModelSpec(  # read by the fake fixture (tests/unit/conftest.py)
    "toy", inputs=(TensorSpec("x", "float32", (4,)),), outputs=(TensorSpec("y", "float32", (4,)),)
)
LONG = 3600


async def client_with(fake: fakeredis.FakeAsyncRedis, collected_s: int) -> AsyncClient:
    settings = Settings(redis=RedisSettings(result_ttl_s=LONG, collected_result_ttl_s=collected_s))
    return await AsyncClient("redis://fake", settings=settings, redis=fake).connect()


async def answer(client: AsyncClient, fake: fakeredis.FakeAsyncRedis, ids: list[str]) -> None:
    """What a worker does for kept requests: store each result, push it to the inbox."""
    blobs = [pack_result(Result(i, "ok", {"y": np.ones((1, 4), np.float32)})) for i in ids]
    async with fake.pipeline(transaction=False) as pipe:
        for request_id, blob in zip(ids, blobs, strict=True):
            pipe.set(KEYS.result(request_id), blob, ex=LONG)
        await pipe.execute()
    client._inbox.deliver(blobs)


@pytest.fixture
async def collecting(fake: fakeredis.FakeAsyncRedis) -> AsyncIterator[AsyncClient]:
    client = await client_with(fake, 60)
    yield client
    await client.close()


async def ttls(fake: fakeredis.FakeAsyncRedis, ids: list[str]) -> list[int]:
    async with fake.pipeline(transaction=False) as pipe:
        for request_id in ids:
            pipe.ttl(KEYS.result(request_id))
        return list(await pipe.execute())


async def test_a_collected_result_gets_the_short_ttl_and_others_keep_the_long_one(
    collecting: AsyncClient, fake: fakeredis.FakeAsyncRedis
) -> None:
    collected, uncollected, kept_on = ["c1", "c2", "c3"], ["u1", "u2"], ["k1"]
    everything = collected + uncollected + kept_on
    collecting._inbox.expect(everything, [True] * len(everything))
    await answer(collecting, fake, everything)
    for request_id in collected:
        assert (await collecting.wait(request_id, timeout=1)).status == "ok"
    out = await collecting.result("k1", timeout=1, keep=True)  # as the gateway's follower
    assert out["y"].shape == (1, 4)

    async def shortened() -> bool:
        return all(0 < t <= 60 for t in await ttls(fake, collected))

    await until(shortened, "collected results shortened to 60 s")
    assert all(t > 60 for t in await ttls(fake, uncollected + kept_on))


async def test_a_result_not_stored_is_not_touched(
    collecting: AsyncClient, fake: fakeredis.FakeAsyncRedis
) -> None:
    collecting._inbox.expect(["n1"], [False])  # store=False, as infer sends
    collecting._inbox.deliver([pack_result(Result("n1", "ok", {}))])
    await collecting.wait("n1", timeout=1)
    assert collecting._collected.queued == 0
    assert collecting._inbox.kept == set()


async def test_zero_deletes_a_collected_result(fake: fakeredis.FakeAsyncRedis) -> None:
    client = await client_with(fake, 0)
    try:
        client._inbox.expect(["d1"], [True])
        await answer(client, fake, ["d1"])
        await client.wait("d1", timeout=1)

        async def deleted() -> bool:
            return not await fake.exists(KEYS.result("d1"))

        await until(deleted, "collected result deleted")
    finally:
        await client.close()


async def test_close_sends_what_is_queued(fake: fakeredis.FakeAsyncRedis) -> None:
    client = await client_with(fake, 30)
    ids = [f"q{i}" for i in range(50)]
    client._inbox.expect(ids, [True] * len(ids))
    await answer(client, fake, ids)
    for request_id in ids:
        await client.wait(request_id, timeout=1)
    await client.close()  # before the flush period is over
    assert all(0 < t <= 30 for t in await ttls(fake, ids))


async def test_not_shorter_than_the_result_ttl_sends_nothing(
    fake: fakeredis.FakeAsyncRedis,
) -> None:
    client = await client_with(fake, LONG)
    try:
        client._inbox.expect(["s1"], [True])
        await answer(client, fake, ["s1"])
        await client.wait("s1", timeout=1)
        assert client._collected.queued == 0
    finally:
        await client.close()


async def test_the_client_holds_nothing_per_request_after_many_cycles(
    collecting: AsyncClient, fake: fakeredis.FakeAsyncRedis
) -> None:
    """Sizes, not RSS: after each round of submit -> delivery -> wait every
    map is empty again, so memory follows what is in flight, not the rate."""
    inbox = collecting._inbox
    for cycle in range(20):
        ids = [f"m{cycle}-{i}" for i in range(500)]
        inbox.expect(ids, [i % 2 == 0 for i in range(len(ids))])
        await answer(collecting, fake, ids)
        for request_id in ids:
            await collecting.wait(request_id, timeout=1)
        assert (len(inbox.waiters), len(inbox.kept), len(inbox.unclaimed)) == (0, 0, 0)

    async def sent() -> bool:
        return collecting._collected.queued == 0

    await until(sent, "collected ids sent")


async def test_delivered_results_nobody_waits_for_are_let_go(collecting: AsyncClient) -> None:
    inbox = collecting._inbox
    inbox.expect(["f1", "f2"], [True, False])
    inbox.deliver([pack_result(Result(i, "ok", {})) for i in ("f1", "f2")])
    assert len(inbox.unclaimed) == 2
    inbox.forget_unclaimed(0)  # what deliver() does with the 60 s horizon
    assert (len(inbox.waiters), len(inbox.kept), len(inbox.unclaimed)) == (0, 0, 0)


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 10) -> None:
    """Poll an awaitable condition with backoff until it holds (never a blind sleep)."""
    deadline = time.monotonic() + timeout
    poll = Poll(first=0.01, cap=0.2, factor=1.5)
    while not await check():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        await poll.sleep()
