"""CPU time of this process and its descendants, by role, read from /proc:
how a benchmark tells where each request's CPU goes when client, servers,
workers and Redis share one machine. Linux only; elsewhere it reports nothing.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01

# (role, substring of the command line), first match wins.
ROLES: tuple[tuple[str, str], ...] = (
    ("redis", "redis-server"),
    ("floor", "producer.bench.http floor"),
    ("gateway", " gateway "),
    ("workers", "spawn_main"),
    ("workers", " worker "),
)


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds) of a process, None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) * _TICK_S


def _role(pid: int) -> str:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return "other"
    for role, marker in ROLES:
        if marker in f" {cmdline} ":
            return role
    return "other"


def cpu_by_role() -> dict[str, float]:
    """CPU seconds so far: this process as ``client``, descendants by role."""
    me = os.getpid()
    stats = {}
    for entry in Path("/proc").iterdir() if Path("/proc/self/stat").exists() else ():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            stats[int(entry.name)] = stat
    totals: defaultdict[str, float] = defaultdict(float)
    for pid, (_, seconds) in stats.items():
        ancestor = pid
        while ancestor in stats and ancestor != me:
            ancestor = stats[ancestor][0]
        if pid == me:
            totals["client"] += seconds
        elif ancestor == me:
            totals[_role(pid)] += seconds
    return dict(totals)


def per_request_us(
    before: Mapping[str, float], after: Mapping[str, float], requests: int
) -> dict[str, float]:
    """Microseconds of CPU per request by role, between two ``cpu_by_role`` snapshots."""
    spent = {role: after[role] - before.get(role, 0.0) for role in after}
    return {role: s * 1e6 / requests for role, s in sorted(spent.items()) if s > 0}


def format_cpu(cpu_us: Mapping[str, float]) -> str:
    """``client 41, redis 16, workers 51; total 108 us`` (roles under 1 us left out)."""
    parts = [f"{role} {us:,.0f}" for role, us in sorted(cpu_us.items()) if us >= 1]
    return f"{', '.join(parts)}; total {sum(cpu_us.values()):,.0f} us"
