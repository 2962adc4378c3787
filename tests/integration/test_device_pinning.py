"""Device pinning in real spawned processes: each reports what it sees
once torch is imported (the environment is set before)."""

from __future__ import annotations

import multiprocessing
import os
from typing import Any

from common.devices import DeviceSlot
from worker.pool import spawn_pinned


def _report(slot: DeviceSlot, queue: Any) -> None:
    """Runs in the spawned child: what does this process see?"""

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
