"""The benchmark's CPU accounting: a child's CPU time is charged to the role
its command line names, this process's own to ``client``."""

from __future__ import annotations

import subprocess
import sys
import time

from producer.bench.cpu_account import cpu_by_role, per_request_us

BURN = """
import sys, time
end = time.process_time() + 0.3
while time.process_time() < end:
    pass
print("burnt", flush=True)
sys.stdin.read()
"""


def test_a_busy_child_is_charged_to_its_role() -> None:
    before = cpu_by_role()
    child = subprocess.Popen(
        [sys.executable, "-c", BURN, "gateway", "--port", "0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "burnt\n"
        end = time.process_time() + 0.1
        while time.process_time() < end:  # the client's own share
            pass
        after = cpu_by_role()  # the child is alive: its CPU is still in /proc
    finally:
        child.communicate("")
    spent = per_request_us(before, after, requests=1000)
    # /proc counts whole clock ticks (10 ms): each figure may lose up to two
    assert spent["gateway"] >= 250  # 0.3 s over 1,000 requests
    assert spent["client"] >= 75  # 0.1 s
    assert "floor" not in spent
