"""Hot reload under load: every result comes from either the old or the new
model, never a half-loaded one, and every request submitted after all
workers report the new version is answered by it."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from common.settings import load_settings
from producer import AsyncClient, Submission
from tests.conftest import ROOT, PoolHandle, async_wait_until, write_config
from worker.registry import model_version


class Shifted(torch.nn.Module):
    """The same signature as the example MLP, different answers."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * 2.0 + 1.0


async def test_reload_under_load(
    tmp_path: Path, models_dir: Path, redis_url: str, start_pool: Callable[..., PoolHandle]
) -> None:
    directory = tmp_path / "models"
    shutil.copytree(models_dir, directory)
    config = write_config(tmp_path / "t.toml", directory)
    pool = start_pool(config, redis_url)
    old = torch.jit.load(str(directory / "mlp.pt"))
    new = torch.jit.script(Shifted(torch.jit.load(str(directory / "mlp.pt"))))
    inputs = np.random.default_rng(5).standard_normal((64, 1, 256)).astype(np.float32)
    with torch.inference_mode():
        expect_old = [old(torch.from_numpy(x)).numpy() for x in inputs]
        expect_new = [new(torch.from_numpy(x)).numpy() for x in inputs]

    sent: list[tuple[str, int, bool]] = []  # id, input index, sent after the switch
    switched = False
    stop = asyncio.Event()

    async def load(client: AsyncClient) -> None:
        round_ = 0
        while not stop.is_set():
            indices = [(round_ * 16 + k) % len(inputs) for k in range(16)]
            after = switched
            ids = await client.submit_many([Submission("mlp", {"x": inputs[i]}) for i in indices])
            sent.extend((rid, i, after) for rid, i in zip(ids, indices, strict=True))
            await client.wait(ids[-1], timeout=60)
            round_ += 1

    async with AsyncClient(redis_url) as client:
        traffic = asyncio.create_task(load(client))
        await async_wait_until(lambda: len(sent) > 300, 60, "traffic before the reload")
        staged = directory / "mlp.next.pt"
        new.save(str(staged))
        os.replace(staged, directory / "mlp.pt")  # atomic: no worker reads half a file
        version = model_version(load_settings(config).model("mlp"))
        reload = subprocess.run(
            [sys.executable, "-m", "common.cli", "models", "reload", "mlp", "--redis", redis_url],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip
        assert reload.returncode == 0, reload.stderr
        assert reload.stdout.count(": mlp reloaded, version ") == 2, reload.stdout
        assert reload.stdout.count(f" -> {version}") == 2  # each worker's answer
        await async_wait_until(
            lambda: (
                all(w["versions"]["mlp"] == version for w in pool.live_workers())  # type: ignore[index]
                and len(pool.live_workers()) == 2
            ),
            60,
            "every worker on the new version",
        )
        switched = True
        await async_wait_until(
            lambda: sum(after for _, _, after in sent) > 300, 60, "traffic after the reload"
        )
        stop.set()
        await traffic
        results = [await client.wait(rid, timeout=60) for rid, _, _ in sent]
    by_old = by_new = 0
    for (_, index, after), result in zip(sent, results, strict=True):
        assert result.status == "ok"
        y = result.outputs["y"]
        if np.allclose(y, expect_new[index], rtol=1e-4, atol=1e-5):
            by_new += 1
        else:
            assert not after, "a request sent after the switch got the old model"
            np.testing.assert_allclose(y, expect_old[index], rtol=1e-4, atol=1e-5)
            by_old += 1
    print(f"reload: {by_old} answered by the old version, {by_new} by the new")
    assert by_old > 0 and by_new > 300
