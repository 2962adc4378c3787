"""Reload answers, part by part: the control message carries a reply list,
the reloader answers a reload it carried out (reloaded / unchanged / failed
and why) and stays silent about models it does not serve, the feed refuses
a reply key that is not a reply list, and the heartbeat pushes the answer
signed with the worker's name, after the heartbeat itself."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any, cast

import fakeredis
import pytest

from common.keys import REPLY_TTL_S, Keys
from common.records import (
    FAILED,
    RELOAD,
    RELOADED,
    UNCHANGED,
    ControlMessage,
    ReloadAnswer,
    WorkerHeartbeat,
)
from common.settings import ModelConfig, WorkerSettings
from common.spec import TensorSpec
from worker.control import ControlFeed, ModelReloader, Reply
from worker.leases import Leases
from worker.registry import LoadedModel
from worker.served import ServedModels
from worker.stats import Stats
from worker.upkeep import Upkeep

KEYS = Keys()


def model(name: str = "m", version: str = "v1") -> LoadedModel:
    config = ModelConfig(
        name, Path(f"{name}.pt"),
        inputs=(TensorSpec("x", "float32", (3,)),), outputs=(TensorSpec("y", "float32", (3,)),),
    )  # fmt: skip
    return LoadedModel(config, config.spec(version), module=None)


def test_control_messages_carry_their_reply_list() -> None:
    message = ControlMessage(RELOAD, "mlp", "tq:reply:abc")
    assert json.loads(message.encode()) == {
        "op": "reload",
        "model": "mlp",
        "reply_to": "tq:reply:abc",
    }
    assert ControlMessage.decode(message.encode()) == message
    assert ControlMessage.decode('{"op": "reload", "model": "mlp"}').reply_to == ""  # older CLIs
    with pytest.raises(ValueError):
        ControlMessage.decode('{"op": "reload", "model": "mlp", "reply_to": 5}')


def test_reload_answers_round_trip_and_read_as_one_line() -> None:
    answer = ReloadAnswer("mlp", RELOADED, "v2", "v1", worker="w1")
    assert ReloadAnswer.decode(answer.encode()) == answer
    assert answer.ok and answer.describe() == "w1: mlp reloaded, version v1 -> v2"
    same = ReloadAnswer("mlp", UNCHANGED, "v1", "v1", worker="w1")
    assert same.ok and same.describe() == "w1: mlp unchanged (version v1)"
    failed = ReloadAnswer("mlp", FAILED, "v1", "v1", "cannot load mlp.pt: bad zip", "w2")
    assert not failed.ok
    assert failed.describe() == (
        "w2: mlp reload FAILED, still serving version v1: cannot load mlp.pt: bad zip"
    )
    for bad in (b"[]", b'{"model": "m"}', b'{"model": "m", "outcome": 3}'):
        with pytest.raises(ValueError):
            ReloadAnswer.decode(bad)


class Announcements:
    """Stands in for the heartbeat: records each call and its reply."""

    def __init__(self) -> None:
        self.calls: list[Reply | None] = []
        self.done = asyncio.Event()

    async def __call__(self, *, reply: Reply | None = None) -> None:
        self.calls.append(reply)
        self.done.set()


async def reload_once(load: Any, message: ControlMessage) -> tuple[ServedModels, Announcements]:
    served = ServedModels([model()])
    announce = Announcements()
    reloader = ModelReloader(served, load, announce, watch=False)
    finishing = asyncio.Event()
    running = asyncio.create_task(reloader.run(finishing))
    reloader.on_control(message)
    await asyncio.wait_for(announce.done.wait(), 30)
    finishing.set()
    await running
    return served, announce


async def test_a_reload_is_answered_with_the_new_version() -> None:
    served, announce = await reload_once(
        lambda old: model(version="v2"), ControlMessage(RELOAD, "m", "tq:reply:t1")
    )
    assert served["m"].spec.version == "v2"
    assert announce.calls == [("tq:reply:t1", ReloadAnswer("m", RELOADED, "v2", "v1"))]


async def test_an_unchanged_file_is_answered_unchanged() -> None:
    _, announce = await reload_once(lambda old: old, ControlMessage(RELOAD, "m", "tq:reply:t"))
    assert announce.calls == [("tq:reply:t", ReloadAnswer("m", UNCHANGED, "v1", "v1"))]


async def test_a_failed_load_keeps_the_old_version_and_says_why() -> None:
    def corrupt(old: LoadedModel) -> LoadedModel:
        raise RuntimeError("model 'm': cannot load m.pt: bad zip\n  at frame 1\n  at frame 2")

    served, announce = await reload_once(corrupt, ControlMessage(RELOAD, "m", "tq:reply:t"))
    assert served["m"].spec.version == "v1"
    assert announce.calls == [
        (
            "tq:reply:t",
            ReloadAnswer("m", FAILED, "v1", "v1", "model 'm': cannot load m.pt: bad zip"),
        )
    ]


async def test_a_switch_nobody_asked_about_still_republishes() -> None:
    _, announce = await reload_once(lambda old: model(version="v2"), ControlMessage(RELOAD, "m"))
    assert announce.calls == [None]


def test_models_not_served_are_not_ours_to_answer() -> None:
    reloader = ModelReloader(ServedModels([model()]), lambda old: old, Announcements(), watch=False)
    reloader.on_control(ControlMessage(RELOAD, "other", "tq:reply:t"))
    reloader.on_control(ControlMessage("restart", "m", "tq:reply:t"))
    assert reloader._requests.empty()


def test_the_feed_answers_only_to_reply_lists() -> None:
    seen: list[ControlMessage] = []
    feed = ControlFeed(fakeredis.FakeAsyncRedis(), KEYS, 0.1, seen.append)
    feed._control(ControlMessage(RELOAD, "m", "tq:reply:ok").encode().encode())
    feed._control(ControlMessage(RELOAD, "m", "tq:workers").encode().encode())
    feed._control(b"not json")
    assert seen == [ControlMessage(RELOAD, "m", "tq:reply:ok"), ControlMessage(RELOAD, "m")]


async def test_the_heartbeat_pushes_the_answer_signed_after_itself() -> None:
    redis = fakeredis.FakeAsyncRedis()
    served = ServedModels([model(version="v2")])
    upkeep = Upkeep(
        settings=WorkerSettings(), redis=redis, keys=KEYS, consumer="worker-7", streams=[],
        served=served, leases=Leases(), writer=cast(Any, None), stats=Stats(), device_info={},
        on_reclaimed=lambda stream: None, on_orphaned=lambda: None,
    )  # fmt: skip
    answer = ReloadAnswer("m", RELOADED, "v2", "v1")
    await upkeep.heartbeat(reply=("tq:reply:t", answer))
    pushed = await redis.lrange("tq:reply:t", 0, -1)  # type: ignore[misc]
    assert [ReloadAnswer.decode(raw) for raw in pushed] == [
        dataclasses.replace(answer, worker="worker-7")
    ]
    assert 0 < await redis.ttl("tq:reply:t") <= REPLY_TTL_S
    beat = WorkerHeartbeat.decode(await redis.hget(KEYS.workers, "worker-7"))  # type: ignore[arg-type]
    assert beat.versions == {"m": "v2"}  # what the answer names is already published
