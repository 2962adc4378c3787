"""The CUDA path on a real GPU (marked ``cuda``; skipped without one): each
spawned worker sees exactly its own GPU, staging buffers are pinned and
never overwritten while a batch is in flight, outputs of every dtype come
back right, and a worker killed with SIGKILL loses nothing.

``./dev gpu-check`` runs this file on a lent GPU machine. Setting
``TQ_CUDA_TEST_DEVICE=cpu`` runs the device-independent parts on CPU, to
check the tests' own logic where there is no GPU.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import torch
from torch import Tensor

from common.devices import DeviceSlot
from common.keys import CONSUMER_GROUP, Keys
from producer import AsyncClient, Submission
from tests.conftest import PoolHandle, async_wait_until, write_config

DEVICE = os.environ.get("TQ_CUDA_TEST_DEVICE") or ("cuda:0" if torch.cuda.is_available() else "")
ON_GPU = DEVICE.startswith("cuda")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not DEVICE, reason="needs a CUDA GPU (or TQ_CUDA_TEST_DEVICE=cpu)"),
]
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="a GPU-only property")

KEYS = Keys()
DTYPES = ["float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8"]


class AllDtypes(torch.nn.Module):
    """x (float32 [4]) cast to every wire dtype, and x > 0 as bool."""

    def forward(
        self, x: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        return (
            x.float(), x.half(), x.to(torch.bfloat16), x.double(), x.long(), x.int(),
            x.short(), x.to(torch.int8), x.to(torch.uint8), x > 0,
        )  # fmt: skip


def all_dtypes_config(tmp_path: Path, models_dir: Path) -> Path:
    path = tmp_path / "dtypes.pt"
    torch.jit.script(AllDtypes()).save(str(path))  # type: ignore[no-untyped-call]
    outputs = "".join(
        f'\n  [[models.outputs]]\n  name = "{d}"\n  dtype = "{d}"\n  shape = [4]\n'
        for d in [*DTYPES, "bool"]
    )
    extra = (
        f'[[models]]\nname = "dtypes"\npath = "{path}"\nmax_batch_size = 64\n'
        f'  [[models.inputs]]\n  name = "x"\n  dtype = "float32"\n  shape = [4]\n{outputs}'
    )
    return write_config(tmp_path / "tensorq.toml", models_dir, extra=extra)


def _gpu_report(slot: DeviceSlot, queue: Any) -> None:
    import torch

    props = torch.cuda.get_device_properties(0)
    queue.put(
        {
            "slot": slot.label,
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "count": torch.cuda.device_count(),
            "uuid": str(getattr(props, "uuid", "")),
        }
    )


@needs_gpu
def test_each_gpu_worker_sees_exactly_its_own_gpu() -> None:
    from worker.pool import spawn_pinned

    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True)
    gpus = [line for line in listed.stdout.splitlines() if line.startswith("GPU ")]
    slots = [DeviceSlot("cuda", i) for i in range(len(gpus))]
    queue = multiprocessing.get_context("spawn").Queue()
    processes = [spawn_pinned(s, _gpu_report, (s, queue), f"probe-{s.label}") for s in slots]
    reports = {r["slot"]: r for r in (queue.get(timeout=120) for _ in slots)}
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    for index, line in enumerate(gpus):
        report = reports[f"cuda:{index}"]
        assert report["visible"] == str(index)
        assert report["count"] == 1  # its own GPU, and no other
        if report["uuid"]:
            assert report["uuid"].removeprefix("GPU-") in line  # that very GPU


@needs_gpu
def test_staging_buffers_are_pinned_and_rotate(tmp_path: Path, models_dir: Path) -> None:
    from common.settings import load_settings
    from worker.executor import STAGING_SETS, Executor
    from worker.registry import load_model

    settings = load_settings(write_config(tmp_path / "t.toml", models_dir))
    executor = Executor("cuda:0")
    model = load_model(settings.model("cnn"), "cuda:0", executor.warm_up)
    batches = [
        executor.assemble(model, [{"x": np.full((4, 3, 32, 32), i, np.float32)}])
        for i in range(STAGING_SETS)
    ]
    staged = executor._staging  # the buffers assembled into (private: what is checked here)
    assert staged and all(buf.is_pinned() for buf in staged.values())
    assert len({b.inputs[0].ctypes.data for b in batches}) == STAGING_SETS
    assert [float(b.inputs[0][0, 0, 0, 0]) for b in batches] == list(range(STAGING_SETS))


async def test_many_concurrent_batches_equal_the_model_alone(
    tmp_path: Path, models_dir: Path, redis_url: str, start_pool: Callable[..., PoolHandle]
) -> None:
    """Bursts keep batches queued behind the computing one, so the staging
    sets are all in use; every request's own distinct input must come back
    as the model computes it alone (a buffer overwritten in flight would
    answer with another request's rows)."""
    config = write_config(tmp_path / "t.toml", models_dir)
    start_pool(config, redis_url, devices=DEVICE, workers=1)
    module = torch.jit.load(str(models_dir / "cnn.pt"), map_location=DEVICE)  # type: ignore[no-untyped-call]
    module.eval()
    rng = np.random.default_rng(0)
    count = 1200
    inputs = [
        (rng.standard_normal((1, 3, 32, 32)) + (i % 50)).astype(np.float32) for i in range(count)
    ]
    async with AsyncClient(redis_url) as client:
        ids: list[str] = []
        for start in range(0, count, 300):  # bursts of 300
            ids += await client.submit_many(
                [Submission("cnn", {"x": x}, timeout=120) for x in inputs[start : start + 300]]
            )
        results = await asyncio.gather(*(client.wait(i, timeout=120) for i in ids))
    assert {r.status for r in results} == {"ok"}
    assert max(r.batch_size for r in results) > 1
    with torch.inference_mode():
        for x, result in zip(inputs, results, strict=True):
            alone = module(torch.from_numpy(x).to(DEVICE)).cpu().numpy()
            # TF32 and batch-dependent kernels differ in the last digits; a
            # mix-up differs by the inputs' offsets (whole units).
            np.testing.assert_allclose(result.outputs["logits"], alone, rtol=2e-2, atol=2e-2)


async def test_outputs_of_every_dtype_come_back_right(
    tmp_path: Path, models_dir: Path, redis_url: str, start_pool: Callable[..., PoolHandle]
) -> None:
    config = all_dtypes_config(tmp_path, models_dir)
    start_pool(config, redis_url, devices=DEVICE, workers=1)
    x = np.array([[-2.0, 0.0, 1.5, 100.0], [3.0, -0.5, 7.25, 0.125]], np.float32)
    async with AsyncClient(redis_url) as client:
        out = await client.infer("dtypes", {"x": x}, timeout=120)
    expected = AllDtypes()(torch.from_numpy(x))
    for name, want in zip([*DTYPES, "bool"], expected, strict=True):
        got = out[name]
        if name == "bfloat16":  # the client widens bfloat16 to float32
            np.testing.assert_array_equal(got, want.float().numpy())
        else:
            assert got.dtype == want.numpy().dtype, name
            np.testing.assert_array_equal(got, want.numpy(), err_msg=name)


async def test_a_killed_gpu_worker_loses_nothing(
    tmp_path: Path,
    models_dir: Path,
    redis_url: str,
    sync_redis: redis.Redis,
    start_pool: Callable[..., PoolHandle],
) -> None:
    config = write_config(tmp_path / "t.toml", models_dir)
    pool = start_pool(config, redis_url, devices=DEVICE, workers=1)
    [victim] = [int(str(w["pid"])) for w in pool.live_workers()]
    x = np.ones((1, 3, 32, 32), np.float32)
    async with AsyncClient(redis_url) as client:
        ids = await client.submit_many(
            [Submission("cnn", {"x": x}, timeout=300) for _ in range(20_000)]
        )
        await async_wait_until(lambda: sync_redis.exists(KEYS.result(ids[0])), 120, "work begun")
        os.kill(victim, signal.SIGKILL)
        unanswered = sync_redis.xlen(KEYS.queue("cnn"))  # answered entries are deleted
        results = await asyncio.gather(*(client.wait(i, timeout=300) for i in ids))
    assert unanswered > 0, "the kill came after the last answer: it proved nothing"
    assert [r.status for r in results] == ["ok"] * len(ids)
    assert sync_redis.xlen(KEYS.queue("cnn")) == 0
    assert sync_redis.xpending(KEYS.queue("cnn"), CONSUMER_GROUP)["pending"] == 0
    assert victim not in {int(str(w["pid"])) for w in pool.live_workers()}
