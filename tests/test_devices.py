"""Device specs and pinning: pure parsing, and real spawned processes that
report what they see once torch is imported."""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

import pytest

from common.errors import ConfigError
from worker.devices import DeviceSlot, parse_devices
from worker.pool import spawn_pinned


def test_cuda_list_pins_one_gpu_per_process() -> None:
    slots = parse_devices("cuda:0,cuda:3")
    assert [s.label for s in slots] == ["cuda:0", "cuda:3"]
    assert [s.environment()["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0", "3"]
    # each process sees only its own GPU, so inside it the device is cuda:0
    assert {s.torch_device for s in slots} == {"cuda:0"}


def test_cpu_slots_share_the_cores_and_hide_gpus() -> None:
    slots = parse_devices("cpu*2", cpu_count=8)
    assert [s.label for s in slots] == ["cpu:0", "cpu:1"]
    assert [s.threads for s in slots] == [4, 4]
    assert all(s.environment()["CUDA_VISIBLE_DEVICES"] == "" for s in slots)
    assert parse_devices("cpu", cpu_count=8)[0].threads == 8
    assert parse_devices("cpu*2", cpu_count=8, threads=1)[0].threads == 1


def test_auto_without_gpus_is_one_cpu_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("worker.devices.visible_gpu_count", lambda: 0)
    assert [s.label for s in parse_devices("auto")] == ["cpu:0"]
    monkeypatch.setattr("worker.devices.visible_gpu_count", lambda: 2)
    assert [s.label for s in parse_devices("auto")] == ["cuda:0", "cuda:1"]


@pytest.mark.parametrize("spec", ["gpu:0", "cuda:0,cuda:0", "", "cpu*0", "cuda:x"])
def test_bad_device_specs_are_config_errors(spec: str) -> None:
    with pytest.raises(ConfigError):
        parse_devices(spec)


def _report(slot: DeviceSlot, queue: Any) -> None:
    """Runs in the spawned child: what does this process see?"""
    import os

    from worker.process import device_report

    report = device_report(slot)
    report["malloc_threshold"] = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    report["omp_threads"] = os.environ.get("OMP_NUM_THREADS")
    queue.put(report)


def test_each_spawned_worker_sees_exactly_its_own_device() -> None:
    slots = [DeviceSlot("cuda", 0), DeviceSlot("cuda", 1), DeviceSlot("cpu", 0, threads=1)]
    queue = multiprocessing.get_context("spawn").Queue()
    processes = [spawn_pinned(s, _report, (s, queue), f"probe-{s.label}") for s in slots]
    reports = {}
    for _ in slots:
        report = queue.get(timeout=120)
        reports[report["device"]] = report
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    # The variable was set before torch was imported in each child.
    assert reports["cuda:0"]["cuda_visible_devices"] == "0"
    assert reports["cuda:1"]["cuda_visible_devices"] == "1"
    assert reports["cuda:0"]["torch_device"] == reports["cuda:1"]["torch_device"] == "cuda:0"
    assert reports["cpu:0"]["cuda_visible_devices"] == ""
    assert reports["cpu:0"]["torch_device"] == "cpu"
    assert reports["cpu:0"]["threads"] == 1
    assert reports["cpu:0"]["omp_threads"] == "1"
    # No GPU on this machine: a pinned process must not invent one.
    assert all(r["cuda_device_count"] == 0 for r in reports.values())
    assert all(r["malloc_threshold"] == "1073741824" for r in reports.values())


def test_cuda_staging_sets_rotate_so_a_queued_batch_is_never_overwritten(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, models_dir: Path
) -> None:
    """The event loop assembles the next batch while one computes and one
    waits behind it: three pinned staging sets in turn, so assembling never
    writes into a batch still in flight. (Pinned memory needs a GPU: on this
    CPU-only build the buffers are plain, the rotation is the same.)"""
    import numpy as np
    import torch

    from common.settings import load_settings
    from tests.conftest import write_config
    from worker.execution import STAGING_SETS, DeviceExecutor
    from worker.registry import LoadedModel

    real_empty = torch.empty

    def unpinned_empty(*args: Any, pin_memory: bool = False, **kwargs: Any) -> torch.Tensor:
        assert pin_memory, "staging buffers must be pinned"
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", unpinned_empty)
    executor = DeviceExecutor("cpu")
    executor.cuda = True  # the staging logic only: forward is not called
    config = load_settings(write_config(tmp_path / "t.toml", models_dir)).model("mlp")
    model = LoadedModel(config, config.spec("v"), None)
    batches = [
        executor.assemble(model, [{"x": np.full((2, 256), float(i), np.float32)}])
        for i in range(STAGING_SETS + 1)
    ]
    addresses = [b.inputs[0].ctypes.data for b in batches]
    assert len(set(addresses[:STAGING_SETS])) == STAGING_SETS  # batches in flight: apart
    assert addresses[STAGING_SETS] == addresses[0]  # the set comes round again, reused
    assert all(float(b.inputs[0][0, 0]) == i for i, b in enumerate(batches[1:], 1))
