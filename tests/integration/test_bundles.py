"""Bundles against a real pool: members of one stream entry each get their
own rows back, a malformed member its own error, a poison member alone the
dead letter, expired and cancelled members their status while their
bundle-mates are computed, and a bundle whose results were partly written
before its worker vanished gets only the rest. The bundles here are built as
docs/protocol.md describes them (plain msgpack where it matters)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import redis
import torch

from common.bundle import pack_bundle, unpack_results
from common.codec import encode_tensor
from common.envelope import Request, Result, pack_result, unpack_request
from common.keys import CONSUMER_GROUP, Keys
from tests.conftest import PoolHandle, wait_until, write_config

KEYS = Keys()
INBOX = "tq:inbox:bundles"
QUEUE = KEYS.queue("mlp")


def config_for(tmp_path: Path, models_dir: Path) -> Path:
    return write_config(tmp_path / "tensorq.toml", models_dir)


def rows(n: int, seed: int = 0) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).standard_normal((n, 256)).astype(np.float32)


def mlp(models_dir: Path, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    module = torch.jit.load(str(models_dir / "mlp.pt"))
    with torch.inference_mode():
        return np.asarray(module(torch.from_numpy(x)).numpy())


def collect(client: redis.Redis, count: int, timeout: float = 120) -> dict[str, list[Result]]:
    """Results pushed to the test inbox (result bundles split), by id, until
    ``count`` ids have one."""
    seen: dict[str, list[Result]] = {}

    def enough() -> bool:
        reply: Any = client.blmpop(1, 1, INBOX, direction="RIGHT", count=1000)
        for blob in reply[1] if reply else []:
            for result in unpack_results(blob):
                seen.setdefault(result.id, []).append(result)
        return len(seen) >= count

    wait_until(enough, timeout, f"{count} answered")
    return seen


def test_each_member_gets_its_own_rows_and_a_malformed_one_its_error(
    tmp_path: Path, models_dir: Path, redis_url: str, sync_redis: redis.Redis,
    start_pool: Callable[..., PoolHandle],
) -> None:  # fmt: skip
    start_pool(config_for(tmp_path, models_dir), redis_url, devices="cpu", workers=1)
    x = rows(5)
    stacked = {  # written as a producer in another language would, from the protocol doc
        "v": 1, "model": "mlp", "ids": ["a", "b", "c", "d"], "rows": [1, 2, 1, 1],
        "inputs": {"x": {"dtype": "float32", "shape": [5, 256], "data": x.tobytes()}},
        "deadline": [None, None, "soon", None], "reply_to": INBOX, "store": False,
    }  # fmt: skip
    listed = {
        "v": 1, "model": "mlp", "ids": ["e", "f"],
        "inputs": {"x": [encode_tensor(x[:1]), encode_tensor(np.ones((1, 7), np.float32))]},
        "reply_to": INBOX,
    }  # fmt: skip
    for body in (stacked, listed):
        sync_redis.xadd(QUEUE, {"req": msgpack.packb(body, use_bin_type=True)})
    seen = collect(sync_redis, 6)
    assert all(len(answers) == 1 for answers in seen.values())
    got = {i: answers[0] for i, answers in seen.items()}
    assert (got["c"].status, got["c"].error_code) == ("error", "protocol_error")
    assert "deadline" in got["c"].error_message
    assert (got["f"].status, got["f"].error_code) == ("error", "invalid_input")
    expected = mlp(models_dir, x)
    for request_id, (start, end) in {"a": (0, 1), "b": (1, 3), "d": (4, 5), "e": (0, 1)}.items():
        assert got[request_id].status == "ok"
        np.testing.assert_allclose(got[request_id].outputs["y"], expected[start:end], atol=1e-5)
    # kept by id only where asked: the stacked bundle said store false
    assert not sync_redis.exists(KEYS.result("a"), KEYS.result("d"))
    assert sync_redis.exists(KEYS.result("e"))
    wait_until(lambda: sync_redis.xlen(QUEUE) == 0, 30, "both entries acked and deleted")


def test_a_poison_member_alone_is_dead_lettered_and_its_mates_answered(
    tmp_path: Path, models_dir: Path, redis_url: str, sync_redis: redis.Redis,
    start_pool: Callable[..., PoolHandle],
) -> None:  # fmt: skip
    start_pool(config_for(tmp_path, models_dir), redis_url, devices="cpu", workers=1,
               env={"TQ_WORKER_CRASH_ON_REQUEST_PREFIX": "poison-"})  # fmt: skip
    ids = [f"n-{i}" for i in range(40)]
    ids.insert(20, "poison-1")
    x = rows(len(ids))
    members = [Request(i, "mlp", {"x": x[k : k + 1]}, reply_to=INBOX, store=False)
               for k, i in enumerate(ids)]  # fmt: skip
    sync_redis.xadd(QUEUE, {"req": pack_bundle(members)})
    seen = collect(sync_redis, len(ids), timeout=240)
    assert all(len(answers) == 1 for answers in seen.values()), "answered more than once"
    poison = seen.pop("poison-1")[0]
    assert (poison.status, poison.error_code) == ("error", "poison")
    expected = mlp(models_dir, x)
    for k, request_id in enumerate(ids):
        if request_id != "poison-1":
            assert seen[request_id][0].status == "ok"
            np.testing.assert_allclose(seen[request_id][0].outputs["y"], expected[k : k + 1],
                                       atol=1e-5)  # fmt: skip
    letters = sync_redis.xrange(KEYS.dead("mlp"))
    assert len(letters) == 1, [(f[b"reason"], f[b"entry"]) for _, f in letters]
    [(_, letter)] = letters
    alone = unpack_request(letter[b"req"])  # the culprit alone, as a single request
    assert alone.id == "poison-1"
    np.testing.assert_array_equal(alone.inputs["x"], x[20:21])
    assert b"delivered 3 times" in letter[b"reason"]
    wait_until(lambda: sync_redis.xlen(QUEUE) == 0, 30, "the bundle acked and deleted")


def test_expired_and_cancelled_members_spare_their_bundle_mates(
    tmp_path: Path, models_dir: Path, redis_url: str, sync_redis: redis.Redis,
    start_pool: Callable[..., PoolHandle],
) -> None:  # fmt: skip
    past = int(time.time() * 1000) - 10_000
    x = rows(4)
    members = [
        Request("keep-0", "mlp", {"x": x[0:1]}, None, INBOX),
        Request("late", "mlp", {"x": x[1:2]}, past, INBOX),
        Request("gone", "mlp", {"x": x[2:3]}, None, INBOX),
        Request("keep-3", "mlp", {"x": x[3:4]}, None, INBOX),
    ]
    sync_redis.set(KEYS.cancelled("gone"), b"1", ex=600)  # before any worker listens
    sync_redis.xadd(QUEUE, {"req": pack_bundle(members)})
    start_pool(config_for(tmp_path, models_dir), redis_url, devices="cpu", workers=1)
    got = {i: a[0] for i, a in collect(sync_redis, 4).items()}
    assert {i: r.status for i, r in got.items()} == {
        "keep-0": "ok", "late": "expired", "gone": "cancelled", "keep-3": "ok"
    }  # fmt: skip
    assert got["late"].batch_size == 0 and got["gone"].batch_size == 0  # no compute
    assert got["keep-0"].batch_size == 2  # its two mates only
    expected = mlp(models_dir, x)
    np.testing.assert_allclose(got["keep-3"].outputs["y"], expected[3:4], atol=1e-5)


def test_a_bundle_partly_answered_before_its_worker_vanished_gets_only_the_rest(
    tmp_path: Path, models_dir: Path, redis_url: str, sync_redis: redis.Redis,
    start_pool: Callable[..., PoolHandle],
) -> None:  # fmt: skip
    """A consumer read a bundle, wrote the results of two members (a worker
    keeps partial answers by id) and vanished: a live worker takes the entry
    over, finds those two done, and answers only the others, once each."""
    sync_redis.xgroup_create(QUEUE, CONSUMER_GROUP, id="0", mkstream=True)
    x = rows(6)
    ids = [f"part-{i}" for i in range(6)]
    members = [Request(i, "mlp", {"x": x[k : k + 1]}, None, INBOX, store=False)
               for k, i in enumerate(ids)]  # fmt: skip
    sync_redis.xadd(QUEUE, {"req": pack_bundle(members)})
    sync_redis.xreadgroup(CONSUMER_GROUP, "gone-host-0", {QUEUE: ">"}, count=10)
    for done in ("part-1", "part-4"):
        sync_redis.set(KEYS.result(done), pack_result(Result(done, "ok")), ex=600)
    start_pool(config_for(tmp_path, models_dir), redis_url, devices="cpu", workers=1,
               env={"TQ_WORKER_CLAIM_IDLE_MS": "1000"})  # fmt: skip
    seen = collect(sync_redis, 4)
    assert sorted(seen) == ["part-0", "part-2", "part-3", "part-5"]
    assert all(len(answers) == 1 and answers[0].status == "ok" for answers in seen.values())
    wait_until(lambda: sync_redis.xlen(QUEUE) == 0, 30, "the bundle acked and deleted")
    assert sync_redis.xpending(QUEUE, CONSUMER_GROUP)["pending"] == 0
