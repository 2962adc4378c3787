"""The gateway's status page in a real headless Chromium: after the page's
script has run, the numbers it shows match `tensorq status --json`."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import redis

from producer import Client
from tests.conftest import ROOT, PoolHandle, http_ready, wait_until, write_config

CHROMIUM = shutil.which("chromium")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--virtual-time-budget=8000",
]  # fmt: skip


class Cells(HTMLParser):
    """Collects <td data-model|data-worker=... data-field=...> texts."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[tuple[str, str], str] = {}
        self._open: tuple[str, str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        owner = found.get("data-model") or found.get("data-worker")
        if tag == "td" and owner and found.get("data-field"):
            self._open = (owner, str(found["data-field"]))
            self.cells[self._open] = ""

    def handle_data(self, data: str) -> None:
        if self._open:
            self.cells[self._open] += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._open = None


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is installed by ./dev test")
def test_status_page_matches_tensorq_status(
    tmp_path: Path, models_dir: Path, redis_url: str, start_pool: Callable[..., PoolHandle]
) -> None:
    config = write_config(tmp_path / "t.toml", models_dir)
    start_pool(config, redis_url)
    with Client(redis_url) as client:
        for _ in range(100):
            client.infer("mlp", {"x": np.ones((2, 256), np.float32)}, timeout=30)
    sync = redis.Redis.from_url(redis_url)
    sync.xadd("tq:dead:seq", {"req": b"", "reason": "test"})

    def heartbeats_caught_up() -> bool:  # from here on the counters stand still
        records = [json.loads(v) for v in sync.hgetall("tq:workers").values()]
        return sum(int(r["requests"]) for r in records) == 100

    wait_until(heartbeats_caught_up, 30, "heartbeats counting all 100 requests")
    sync.close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gateway = subprocess.Popen(
        [sys.executable, "-m", "common.cli", "gateway", "--config", str(config),
         "--redis", redis_url, "--port", str(port)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_until(lambda: http_ready(url), 60, "the gateway")
        status = json.loads(
            subprocess.run(
                [sys.executable, "-m", "common.cli", "status", "--redis", redis_url, "--json"],
                capture_output=True, text=True, check=True, cwd=ROOT,
            ).stdout
        )  # fmt: skip
        profile = tmp_path / "chromium"
        dom = subprocess.run(
            [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
            capture_output=True, text=True, timeout=120,
        ).stdout  # fmt: skip
        shot = tmp_path / "status.png"
        subprocess.run(
            [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", "--window-size=1100,650",
             f"--screenshot={shot}", url],
            capture_output=True, timeout=120,
        )  # fmt: skip
    finally:
        gateway.terminate()
        gateway.wait(60)
    assert 'data-loaded="yes"' in dom, dom[:2000]
    parser = Cells()
    parser.feed(dom)
    cells = parser.cells
    for name, model in status["models"].items():
        for field in ("queued", "pending", "dead_letters"):
            assert cells[(name, field)] == str(model[field]), (name, field)
    assert cells[("seq", "dead_letters")] == "1"
    assert float(cells[("mlp", "rows_per_s_1m")]) > 0  # the traffic of the last minute
    for worker in status["workers"]:
        name = worker["name"]
        assert cells[(name, "device")] == worker["device"]
        assert cells[(name, "alive")] == ("yes" if worker["alive"] else "no")
        assert cells[(name, "batches")] == str(worker["batches"])
    assert sum(int(cells[(w["name"], "batches")]) for w in status["workers"]) > 0
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("TQ_SCREENSHOT_TO"):  # refreshes the README's picture
        shutil.copy(shot, os.environ["TQ_SCREENSHOT_TO"])
