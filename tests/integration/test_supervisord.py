"""The production layout: supervisord starts Redis, two worker pools, the
gateway and an RQ worker from supervisord.conf; a request round-trips
through the gateway; `supervisorctl shutdown` leaves no process behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import redis

from tests.conftest import ROOT, http_ready, wait_until, write_config

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purposes
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


@pytest.mark.skipif(not (BIN / "supervisord").exists(), reason="supervisor not installed")
def test_supervisord_runs_the_stack_and_shuts_it_down(tmp_path: Path, models_dir: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    redis_port, gateway_port = free_port(), free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    env = {
        **os.environ,
        "TQ_BIN": str(BIN / "tensorq"),
        "TQ_RQ_BIN": str(BIN / "rq"),
        "TQ_CONFIG": str(write_config(tmp_path / "tensorq.toml", models_dir)),
        "TQ_RUN_DIR": str(run_dir),
        "TQ_LOCAL_REDIS": "true",
        "TQ_REDIS_PORT": str(redis_port),
        "TQ_REDIS_URL": redis_url,
        "TQ_DEVICE_KIND": "cpu",
        "TQ_WORKER_PROCS": "2",
        "TQ_WORKER_THREADS": "1",
        "TQ_RQ_WORKERS": "1",
        "TQ_GATEWAY_HOST": "127.0.0.1",
        "TQ_GATEWAY_PORT": str(gateway_port),
    }
    conf = str(ROOT / "supervisord.conf")
    supervisord = subprocess.Popen(
        [BIN / "supervisord", "-c", conf, "-n"], env=env, cwd=ROOT, start_new_session=True
    )
    ctl = [str(BIN / "supervisorctl"), "-c", conf]
    try:

        def status() -> dict[str, str]:
            out = subprocess.run([*ctl, "status"], env=env, capture_output=True, text=True).stdout
            return {line.split()[0]: line.split()[1] for line in out.splitlines() if line.strip()}

        expected = {"redis", "worker:worker-0", "worker:worker-1", "gateway", "rq-batch:rq-batch-0"}
        wait_until(
            lambda: set(status()) == expected and set(status().values()) == {"RUNNING"},
            120,
            "every program RUNNING",
        )
        base = f"http://127.0.0.1:{gateway_port}"

        wait_until(lambda: http_ready(f"{base}/v2/health/ready"), 120, "gateway ready")
        body = {
            "inputs": [{"name": "x", "shape": [1, 256], "datatype": "FP32", "data": [0.5] * 256}]
        }
        request = urllib.request.Request(
            f"{base}/v2/models/mlp/infer",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as reply:
            answer = json.loads(reply.read())
        assert answer["outputs"][0]["shape"] == [1, 10]
        client = redis.Redis.from_url(redis_url)
        wait_until(lambda: client.hlen("tq:workers") == 2, 120, "both worker pools serving")
        worker_children = [json.loads(v)["pid"] for v in client.hgetall("tq:workers").values()]
        client.close()
        pids_out = subprocess.run([*ctl, "pid", "all"], env=env, capture_output=True, text=True)
        pids = [int(p) for p in pids_out.stdout.split()] + worker_children
        assert len(pids) == 7
        subprocess.run([*ctl, "shutdown"], env=env, check=True, capture_output=True)
        assert supervisord.wait(90) == 0
        assert [p for p in pids if alive(p)] == []
    finally:
        if supervisord.poll() is None:  # a failed assertion: still stop every program
            supervisord.terminate()  # supervisord stops its programs on SIGTERM
            try:
                supervisord.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(supervisord.pid, signal.SIGKILL)
                supervisord.wait()
