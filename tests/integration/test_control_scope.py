"""Control announcements are scoped to the deployment (prefix and database),
and ``tensorq models reload`` waits for the live workers' answers: exit 0
when every worker serving the model reloaded (or found it unchanged), 1
naming the worker that failed and why, 2 at once when no live worker serves
the model. Real redis-server, real pools."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import redis

from common.keys import Keys
from common.records import RELOAD, ControlMessage
from common.settings import RedisSettings
from producer import Client
from tests.conftest import ROOT, PoolHandle, sync_client, write_config

RELOAD_LINES = ("reload of mlp", "model reloaded: mlp")  # what a worker logs per reload


def reload(model: str, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "common.cli", "models", "reload", model, "--redis", url, *extra],
        capture_output=True, text=True, timeout=180, cwd=ROOT,
    )  # fmt: skip


def reloads_logged(pool: PoolHandle) -> int:
    text = pool.log_path.read_text(errors="replace")
    return sum(text.count(line) for line in RELOAD_LINES)


def test_a_reload_on_another_database_does_not_reach_the_pool(
    tmp_path: Path, models_dir: Path, redis_url: str, start_pool: Callable[..., PoolHandle]
) -> None:
    config = write_config(tmp_path / "t.toml", models_dir)
    pool = start_pool(config, redis_url, devices="cpu", workers=1)  # on database 0
    [worker] = [str(w["name"]) for w in pool.live_workers()]
    other_db = f"{redis_url}?db=1"

    # What `tensorq models reload mlp --redis <url>/1` would announce, and a
    # client's cancel of request "victim", published on database 1: a pool on
    # database 0 must obey neither.
    db1 = Keys.of(RedisSettings(url=other_db))
    stray_reply = db1.reply("stray")
    client: redis.Redis = sync_client(other_db)
    try:
        client.publish(db1.control_channel, ControlMessage(RELOAD, "mlp", stray_reply).encode())
        client.publish(db1.cancel_channel, "victim")
    finally:
        client.close()
    # ... and the CLI on database 1 finds no worker there to wait for.
    elsewhere = reload("mlp", other_db)
    assert elsewhere.returncode == 2, elsewhere.stderr
    assert "no live worker serves model 'mlp' (0 live worker(s))" in elsewhere.stderr

    # A reload on database 0 is answered by the pool's worker. Messages reach a
    # subscriber in the order they were published, so had the stray ones been
    # obeyed, their reload would have been carried out (and logged) first and
    # their cancel noted before this answer.
    here = reload("mlp", redis_url)
    assert here.returncode == 0, here.stdout + here.stderr
    assert f"{worker}: mlp unchanged (version " in here.stdout
    assert reloads_logged(pool) == 1
    db0 = sync_client(redis_url)
    try:
        assert db0.exists(stray_reply) == 0  # no worker answered the stray announcement
    finally:
        db0.close()
    with Client(redis_url) as producer:
        request_id = producer.submit("mlp", {"x": np.ones((1, 256), np.float32)},
                                     request_id="victim")  # fmt: skip
        assert producer.wait(request_id, timeout=60).status == "ok"  # not "cancelled"

    # A model no live worker serves: exit 2 at once, saying so.
    unknown = reload("nope", redis_url)
    assert unknown.returncode == 2
    assert unknown.stderr.startswith(
        "tensorq models reload: no live worker serves model 'nope' (1 live worker(s), serving "
    )
    assert reloads_logged(pool) == 1


def test_a_corrupt_file_fails_the_reload_naming_the_worker(
    tmp_path: Path, models_dir: Path, redis_url: str, start_pool: Callable[..., PoolHandle]
) -> None:
    directory = tmp_path / "models"
    shutil.copytree(models_dir, directory)
    config = write_config(tmp_path / "t.toml", directory)
    pool = start_pool(config, redis_url, devices="cpu", workers=1)
    [before] = pool.live_workers()
    worker, version = str(before["name"]), before["versions"]["mlp"]  # type: ignore[index]

    (directory / "mlp.pt").write_bytes(b"this is not a TorchScript archive")
    failed = reload("mlp", redis_url)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    line = next(x for x in failed.stdout.splitlines() if x.startswith(f"{worker}: "))
    assert line.startswith(f"{worker}: mlp reload FAILED, still serving version {version}: ")
    assert "cannot load" in line and "mlp.pt" in line
    assert "1 of 1 worker(s) did not reload 'mlp'" in failed.stderr
    [after] = pool.live_workers()
    assert after["versions"]["mlp"] == version  # type: ignore[index]  # the old one serves on
