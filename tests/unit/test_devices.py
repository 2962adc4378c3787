"""Device specs and pinning, pure parsing; and the CUDA staging buffers'
rotation (tests/integration/test_device_pinning.py spawns real processes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from common.devices import parse_devices
from common.errors import ConfigError


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
    monkeypatch.setattr("common.devices.visible_gpu_count", lambda: 0)
    assert [s.label for s in parse_devices("auto")] == ["cpu:0"]
    monkeypatch.setattr("common.devices.visible_gpu_count", lambda: 2)
    assert [s.label for s in parse_devices("auto")] == ["cuda:0", "cuda:1"]


@pytest.mark.parametrize("spec", ["gpu:0", "cuda:0,cuda:0", "", "cpu*0", "cuda:x"])
def test_bad_device_specs_are_config_errors(spec: str) -> None:
    with pytest.raises(ConfigError):
        parse_devices(spec)


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
    from worker.executor import STAGING_SETS, Executor
    from worker.registry import LoadedModel

    real_empty = torch.empty

    def unpinned_empty(*args: Any, pin_memory: bool = False, **kwargs: Any) -> torch.Tensor:
        assert pin_memory, "staging buffers must be pinned"
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", unpinned_empty)
    executor = Executor("cpu")
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
