"""Device specs and pinning: which processes the pool starts and the
environment each gets *before* torch is imported in it.

``cuda:0,cuda:1`` -> one process per GPU, each seeing only its own GPU as
``cuda:0`` (CUDA_VISIBLE_DEVICES); ``cpu`` / ``cpu*N`` -> N CPU slots sharing
the cores; ``cpu:K`` -> one CPU slot labelled K (one pool per slot, as
supervisord's ``numprocs`` starts them); ``auto`` -> every GPU
``nvidia-smi -L`` lists, else one CPU slot.
Pure logic, no torch: the parent never initialises CUDA.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass

from common.errors import ConfigError
from common.runtime_env import MALLOC_ENV


@dataclass(frozen=True)
class DeviceSlot:
    """One worker process's device. ``index`` is the GPU ordinal or CPU slot."""

    kind: str  # "cuda" | "cpu"
    index: int
    threads: int = 1

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.index}"

    @property
    def torch_device(self) -> str:
        # With CUDA_VISIBLE_DEVICES pinned, the process's only GPU is cuda:0.
        return "cuda:0" if self.kind == "cuda" else "cpu"

    def environment(self) -> dict[str, str]:
        """Variables set in the child before its interpreter starts."""
        env = dict(MALLOC_ENV)
        if self.kind == "cuda":
            env["CUDA_VISIBLE_DEVICES"] = str(self.index)
        else:
            env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU slot must not grab a GPU
            env["OMP_NUM_THREADS"] = str(self.threads)
        return env


def parse_devices(spec: str, *, cpu_count: int | None = None, threads: int = 0) -> list[DeviceSlot]:
    """Turn ``--devices`` into slots; ``threads`` 0 shares the cores evenly."""
    cores = cpu_count or os.cpu_count() or 1
    spec = spec.strip().lower()
    if spec == "auto":
        gpus = visible_gpu_count()
        spec = ",".join(f"cuda:{i}" for i in range(gpus)) if gpus else "cpu"
    slots: list[DeviceSlot] = []
    cpu_slots = 0
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if match := re.fullmatch(r"cuda:(\d+)", part):
            slots.append(DeviceSlot("cuda", int(match.group(1))))
        elif match := re.fullmatch(r"cpu:(\d+)", part):  # one CPU slot, named (supervisord)
            slots.append(DeviceSlot("cpu", int(match.group(1))))
            cpu_slots += 1
        elif match := re.fullmatch(r"cpu(?:\*(\d+))?", part):
            count = int(match.group(1) or 1)
            if count < 1:
                raise ConfigError(f"--devices {part!r}: need at least one CPU slot")
            for _ in range(count):
                slots.append(DeviceSlot("cpu", cpu_slots))
                cpu_slots += 1
        else:
            raise ConfigError(
                f"--devices: cannot read {part!r} (use cuda:0,cuda:1 | cpu | cpu*2 | cpu:0 | auto)"
            )
    if not slots:
        raise ConfigError("--devices names no device")
    labels = [s.label for s in slots if s.kind == "cuda"]
    if len(labels) != len(set(labels)):
        raise ConfigError(f"--devices names a GPU twice: {spec}")
    per_slot = threads or max(1, cores // max(1, cpu_slots))
    return [DeviceSlot(s.kind, s.index, per_slot if s.kind == "cpu" else s.threads) for s in slots]


def visible_gpu_count() -> int:
    """GPUs nvidia-smi can see (0 without a driver), without importing torch."""
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
