"""`tensorq up`: one command brings up a private Redis, the pool and the
gateway; Ctrl-C (SIGINT) stops every one of them."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.conftest import ROOT, http_ready, wait_until, write_config


def test_up_serves_http_and_ctrl_c_stops_everything(tmp_path: Path, models_dir: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = write_config(tmp_path / "t.toml", models_dir)
    log = tmp_path / "up.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "common.cli", "up", "--config", str(config),
         "--devices", "cpu", "--port", str(port)],
        cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        wait_until(lambda: "tensorq up:" in log.read_text(), 120, "the stack up")
        base = f"http://127.0.0.1:{port}"

        wait_until(lambda: http_ready(f"{base}/v2/health/ready"), 120, "gateway ready")
        tensor = {"name": "x", "shape": [1, 256], "datatype": "FP32", "data": [0.25] * 256}
        request = urllib.request.Request(
            f"{base}/v2/models/mlp/infer",
            data=json.dumps({"inputs": [tensor]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as reply:
            assert json.loads(reply.read())["outputs"][0]["shape"] == [1, 10]
        socket_path = re.search(r"redis unix://(\S+),", log.read_text())
        assert socket_path is not None
        group = os.getpgid(process.pid)
        os.killpg(group, signal.SIGINT)  # what Ctrl-C in a terminal sends
        assert process.wait(120) == 0
        assert not Path(socket_path.group(1)).exists()  # the private Redis is gone

        def group_empty() -> bool:
            found = subprocess.run(["pgrep", "-g", str(group)], capture_output=True, text=True)
            return found.stdout.strip() == ""

        # multiprocessing's resource tracker exits just after its parent
        wait_until(group_empty, 30, "no process of the stack left")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
