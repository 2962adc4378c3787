"""The client's contract on a real redis-server, with real worker pools where
answers must be real: an id in flight is refused (``DuplicateRequest``),
nothing enqueued, and answers never mix; an unknown id is ``UnknownRequest``
at once while an accepted one is waited for (the enqueue script's
``tq:acc:<id>`` marker); a bad Redis URL is one line from every verb.

Models "no worker serves" are published by the tests themselves, so what
was enqueued can be counted (XLEN) before the test answers it as a worker would.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis
import torch

from common.envelope import Result, pack_result
from common.errors import DuplicateRequest, QueueFull, UnknownRequest
from common.keys import Keys
from common.records import AcceptedMarker
from common.spec import ModelSpec, TensorSpec
from producer import AsyncClient, Submission
from producer.client.enqueue import EARLY_BYTES, Enqueuer
from producer.client.submission import Prepared
from tests.conftest import ROOT, PoolHandle, entry_requests, write_config

KEYS = Keys()
X = np.arange(4, dtype=np.float32).reshape(1, 4)


@pytest.fixture
async def aredis(redis_url: str) -> Any:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def pool(
    tmp_path: Path, models_dir: Path, redis_url: str, start_pool: Callable[..., PoolHandle]
) -> PoolHandle:
    config = write_config(tmp_path / "tensorq.toml", models_dir)
    return start_pool(config, redis_url, devices="cpu", workers=1)


def mlp(models_dir: Path, x: np.ndarray) -> np.ndarray:
    module = torch.jit.load(str(models_dir / "mlp.pt"))
    with torch.inference_mode():
        return np.asarray(module(torch.from_numpy(x)).numpy())


async def idle_model(redis: aioredis.Redis, name: str, max_queue_len: int = 100) -> None:
    """A model spec no worker serves: its requests stay queued until ``answer``."""
    spec = ModelSpec(name, inputs=(TensorSpec("x", "float32", (4,)),),
                     outputs=(TensorSpec("y", "float32", (4,)),), max_batch_size=8,
                     extra={"max_queue_len": max_queue_len})  # fmt: skip
    await redis.hset(KEYS.models, name, spec.to_json())


async def answer(redis: aioredis.Redis, model: str) -> list[str]:
    """Answer the oldest queued entry of an idle model as a worker would
    (y = 2x to tq:r:<id> and its inbox, for each of its requests; the entry
    deleted); their ids."""
    entries = await redis.xrange(KEYS.queue(model), count=1)
    assert entries, f"nothing queued for {model!r}"
    entry_id, fields = entries[0]
    requests = entry_requests(fields[b"req"])
    async with redis.pipeline(transaction=False) as pipe:
        for request in requests:
            payload = pack_result(Result(request.id, "ok", {"y": request.inputs["x"] * 2}))
            pipe.set(KEYS.result(request.id), payload, ex=3600)
            if request.reply_to:
                pipe.lpush(request.reply_to, payload)
        pipe.xdel(KEYS.queue(model), entry_id)
        await pipe.execute()
    return [r.id for r in requests]


async def queued(redis: aioredis.Redis, model: str) -> list[str]:
    """The ids of an idle model's queued requests, bundles' members included."""
    entries = await redis.xrange(KEYS.queue(model))
    return [r.id for _, fields in entries for r in entry_requests(fields[b"req"])]


# -- item 4: ids in flight -----------------------------------------------------------------


async def test_an_id_in_flight_is_refused_and_answers_never_mix(
    pool: PoolHandle, models_dir: Path
) -> None:
    """The user's case: two concurrent submit + wait under one id. One is
    refused at once; the other gets the answer to its own inputs; once that
    answer is in, the id may be used again and answers the new inputs."""
    first, second = np.zeros((1, 256), np.float32), np.ones((1, 256), np.float32)
    async with AsyncClient(pool.redis_url) as client:

        async def submit_and_wait(x: np.ndarray) -> Result:
            rid = await client.submit("mlp", {"x": x}, request_id="dupe")
            return await client.wait(rid, timeout=120)

        outcomes = await asyncio.gather(
            submit_and_wait(first), submit_and_wait(second), return_exceptions=True
        )
        refused = [o for o in outcomes if isinstance(o, DuplicateRequest)]
        answered = [(x, o) for x, o in zip((first, second), outcomes, strict=True)
                    if isinstance(o, Result)]  # fmt: skip
        assert len(refused) == 1 and len(answered) == 1, outcomes
        assert refused[0].request_id == "dupe"
        assert "'dupe' is already in flight in this client" in str(refused[0])
        x, result = answered[0]
        assert result.status == "ok"
        np.testing.assert_allclose(result.outputs["y"], mlp(models_dir, x), atol=1e-5)

        other = second if x is first else first  # the id is free again: it answers anew
        again = await submit_and_wait(other)
        np.testing.assert_allclose(again.outputs["y"], mlp(models_dir, other), atol=1e-5)


async def test_a_duplicate_enqueues_nothing(aredis: aioredis.Redis, redis_url: str) -> None:
    await idle_model(aredis, "idle")
    queue = KEYS.queue("idle")
    async with AsyncClient(redis_url) as client:
        await client.submit("idle", {"x": X}, request_id="dupe")
        assert await aredis.xlen(queue) == 1
        with pytest.raises(DuplicateRequest, match="'dupe' is already in flight"):
            await client.submit("idle", {"x": X + 1}, request_id="dupe")
        with pytest.raises(DuplicateRequest, match="'twin' is named twice"):
            await client.submit_many([Submission("idle", {"x": X}, "twin")] * 2)
        with pytest.raises(DuplicateRequest):  # a batch holding one id in flight: none of it
            await client.submit_many(
                [Submission("idle", {"x": X}, "fresh"), Submission("idle", {"x": X}, "dupe")]
            )
        assert await aredis.xlen(queue) == 1
        assert await answer(aredis, "idle") == ["dupe"]
        result = await client.wait("dupe", timeout=120)  # the first one's answer
        np.testing.assert_array_equal(result.outputs["y"], X * 2)
        await client.submit("idle", {"x": X + 1}, request_id="dupe")  # answered: free again
        assert await aredis.xlen(queue) == 1


async def test_one_id_in_two_clients_gets_each_its_own_answer(
    aredis: aioredis.Redis, redis_url: str
) -> None:
    """No cross-client refusal (a design decision, see the README): results
    travel to the inbox each request names, so two clients reusing one id
    still each get the answer to their own inputs."""
    await idle_model(aredis, "idle")
    async with AsyncClient(redis_url) as a, AsyncClient(redis_url) as b:
        await a.submit("idle", {"x": X}, request_id="shared")
        await b.submit("idle", {"x": X + 10}, request_id="shared")
        assert await aredis.xlen(KEYS.queue("idle")) == 2
        await answer(aredis, "idle")
        await answer(aredis, "idle")
        got_a, got_b = await a.wait("shared", 120), await b.wait("shared", 120)
    np.testing.assert_array_equal(got_a.outputs["y"], X * 2)
    np.testing.assert_array_equal(got_b.outputs["y"], (X + 10) * 2)


# -- item 5: unknown ids -------------------------------------------------------------------


async def test_unknown_ids_are_refused_at_once_and_other_clients_requests_answered(
    pool: PoolHandle, models_dir: Path
) -> None:
    x = np.full((1, 256), 0.5, np.float32)
    async with AsyncClient(pool.redis_url) as a, AsyncClient(pool.redis_url) as b:
        request_id = await a.submit("mlp", {"x": x})
        out = await b.result(request_id, timeout=120)  # b never saw it: read by id
        np.testing.assert_allclose(out["y"], mlp(models_dir, x), atol=1e-5)
        assert (await a.wait(request_id, timeout=120)).status == "ok"
        # a timeout past the test's own: only an answer at once passes
        for client in (a, b):
            with pytest.raises(UnknownRequest, match="no such request") as caught:
                await client.result("never-submitted", timeout=600)
            assert caught.value.request_id == "never-submitted"
            with pytest.raises(UnknownRequest, match="no request can have the id"):
                await client.wait("bad{id}", timeout=600)


async def test_the_enqueue_script_marks_accepted_requests_only(
    aredis: aioredis.Redis, redis_url: str
) -> None:
    """Generated ids are vouched for by the client's high-water mark
    tq:sub:<client_id>, chosen ones by their own tq:acc:<id>; both with the
    result TTL, written in the enqueue script; a refused chosen id has none."""
    await idle_model(aredis, "idle", max_queue_len=3)
    async with AsyncClient(redis_url) as a, AsyncClient(redis_url) as b:
        ttl = a.settings.redis.result_ttl_s
        generated = await a.submit_many([Submission("idle", {"x": X})] * 2)
        assert generated == [f"{a.client_id}-0", f"{a.client_id}-1"]
        assert await aredis.get(KEYS.submitted(a.client_id)) == b"1"
        assert 0 < await aredis.ttl(KEYS.submitted(a.client_id)) <= ttl
        assert not await aredis.exists(KEYS.accepted(generated[0]))
        chosen = await a.submit("idle", {"x": X}, request_id="chosen-1")
        raw = await aredis.get(KEYS.accepted(chosen))
        assert raw is not None and AcceptedMarker.decode(raw).model == "idle"
        assert 0 < await aredis.ttl(KEYS.accepted(chosen)) <= ttl
        with pytest.raises(QueueFull) as refused:
            await a.submit("idle", {"x": X}, request_id="refused-1")
        assert refused.value.request_id == "refused-1"
        assert not await aredis.exists(KEYS.accepted("refused-1"))
        assert await queued(aredis, "idle") == [*generated, chosen]  # in 2 entries: a bundle
        assert await aredis.xlen(KEYS.queue("idle")) == 2
        # a timeout past the test's own: only an answer at once passes
        for unknown in ("refused-1", f"{a.client_id}-2", f"{a.client_id}-99", "x-0"):
            with pytest.raises(UnknownRequest):
                await b.wait(unknown, timeout=600)
        # pending: b waits for a's requests, generated and chosen alike
        waiting = [asyncio.create_task(b.wait(i, timeout=120)) for i in (*generated, chosen)]
        while await aredis.xlen(KEYS.queue("idle")):
            await answer(aredis, "idle")
        results = [await task for task in waiting]
    assert [r.id for r in results] == [*generated, chosen]
    for result in results:
        np.testing.assert_array_equal(result.outputs["y"], X * 2)


async def test_marks_of_one_call_mixing_chosen_and_generated_ids(
    aredis: aioredis.Redis, redis_url: str
) -> None:
    await idle_model(aredis, "idle", max_queue_len=3)
    async with AsyncClient(redis_url) as client:
        batch = [Submission("idle", {"x": X}), Submission("idle", {"x": X}, "mix-a"),
                 Submission("idle", {"x": X}), Submission("idle", {"x": X}, "mix-b")]  # fmt: skip
        with pytest.raises(QueueFull) as refused:  # room for 3: the last is refused
            await client.submit_many(batch)
        assert refused.value.refused == ["mix-b"]
    # one bundle of 4 did not fit: its first 3 were sent again as their own entry
    assert await queued(aredis, "idle") == [f"{client.client_id}-0", "mix-a",
                                             f"{client.client_id}-1"]  # fmt: skip
    assert await aredis.exists(KEYS.accepted("mix-a")) and not await aredis.exists(
        KEYS.accepted("mix-b"), KEYS.accepted(f"{client.client_id}-0")
    )
    assert await aredis.get(KEYS.submitted(client.client_id)) == b"1"


async def test_a_marker_the_gateway_wrote_first_is_kept(
    aredis: aioredis.Redis, redis_url: str
) -> None:
    """The gateway claims tq:acc:<id> (with the outputs its answer must show)
    before it submits: the enqueue script keeps that value and renews its TTL."""
    await idle_model(aredis, "idle")
    claimed = AcceptedMarker("idle", {"names": ["y"], "binary": {"y": True}, "default": False})
    await aredis.set(KEYS.accepted("gw-1"), claimed.encode(), ex=5)
    async with AsyncClient(redis_url) as client:
        await client.submit("idle", {"x": X}, request_id="gw-1")
    assert AcceptedMarker.decode(await aredis.get(KEYS.accepted("gw-1"))) == claimed
    assert await aredis.ttl(KEYS.accepted("gw-1")) > 5


# -- item 8: a bad Redis URL from the command line ---------------------------------------

BAD_URLS = [
    ("http://foo", "unsupported scheme 'http://'"),
    ("redis://:hunter2@h:notaport/0", "redis://:***@h:notaport/0"),
]


@pytest.mark.parametrize("verb", ["status", "worker", "gateway"])
@pytest.mark.parametrize(("url", "fragment"), BAD_URLS, ids=["http", "port"])
def test_a_bad_redis_url_is_one_line_from_every_verb(verb: str, url: str, fragment: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "common.cli", verb, "--redis", url],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"tensorq {verb}: [redis] url: bad Redis URL ")
    assert fragment in lines[0] and "redis+cluster://" in lines[0]
    assert "Traceback" not in done.stderr + done.stdout
    assert "hunter2" not in done.stderr + done.stdout


ROW = 1024  # float32 per row: 4 KiB of input per one-row request


async def sends_seen(
    monkeypatch: pytest.MonkeyPatch, redis: aioredis.Redis, queue: str
) -> list[tuple[int, int]]:
    """(requests sent, entries already in ``queue``) per enqueue round trip."""
    seen: list[tuple[int, int]] = []
    send = Enqueuer._send

    async def spy(self: Enqueuer, prepared: Sequence[Prepared]) -> list[Any]:
        seen.append((len(prepared), await redis.xlen(queue)))
        return await send(self, prepared)

    monkeypatch.setattr(Enqueuer, "_send", spy)
    return seen


@pytest.mark.parametrize("early_shares", [3, 2])
async def test_a_big_submit_many_is_queued_head_first_and_in_order(
    aredis: aioredis.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch, early_shares: int
) -> None:
    """Over twice EARLY_BYTES of input: the head is in the stream before the
    rest is sent (workers start on it); at twice or less: one round trip."""
    spec = ModelSpec("wide", inputs=(TensorSpec("x", "float32", (ROW,)),),
                     outputs=(TensorSpec("y", "float32", (ROW,)),), max_batch_size=8)  # fmt: skip
    await aredis.hset(KEYS.models, "wide", spec.to_json())
    queue = KEYS.queue("wide")
    seen = await sends_seen(monkeypatch, aredis, queue)
    head = EARLY_BYTES // (4 * ROW)
    count = early_shares * head
    x = np.zeros((1, ROW), np.float32)
    async with AsyncClient(redis_url) as client:
        ids = await client.submit_many(
            [Submission("wide", {"x": x}, request_id=f"r{i}") for i in range(count)]
        )
    if early_shares > 2:
        assert seen == [(head, 0), (count - head, head // spec.max_batch_size)]
    else:
        assert seen == [(count, 0)]
    queued = [r.id for _, fields in await aredis.xrange(queue)
              for r in entry_requests(fields[b"req"])]  # fmt: skip
    assert queued == ids == [f"r{i}" for i in range(count)]


async def test_submits_gathered_from_many_tasks_share_one_round_trip(
    redis_url: str, aredis: aioredis.Redis
) -> None:
    """The group commit: submits that start together go out in one enqueue
    call, bundled into one stream entry, and each is answered as its own."""
    await idle_model(aredis, "gathered")
    async with AsyncClient(redis_url) as client:
        await client.spec("gathered")  # known: no submit waits for its spec
        xs = [np.full((1, 4), i, np.float32) for i in range(5)]
        ids = await asyncio.gather(*(client.submit("gathered", {"x": x}) for x in xs))
        assert await aredis.xlen(KEYS.queue("gathered")) == 1
        assert sorted(await queued(aredis, "gathered")) == sorted(ids)
        assert sorted(await answer(aredis, "gathered")) == sorted(ids)
        for request_id, x in zip(ids, xs, strict=True):
            result = await client.wait(request_id, timeout=30)
            np.testing.assert_array_equal(result.outputs["y"], x * 2)
