"""``tensorq up``: the local stack in one command for development: Redis (a
private redis-server when no URL is configured), a worker pool on every
device found, and the HTTP gateway. Ctrl-C (or SIGTERM) stops all of it:
the gateway and the pool drain, then the private Redis goes."""

from __future__ import annotations

import argparse
import signal
import subprocess
import threading

from common.settings import Settings
from producer.ops.stack import ensure_example_models, local_stack, stop_process, tensorq_command


def run_up(args: argparse.Namespace, settings: Settings) -> int:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    ensure_example_models(settings)
    with local_stack(settings, devices=args.devices, log_level=args.log_level) as stack:
        gateway_args = ["--log-level", args.log_level, "gateway", "--redis", stack.redis_url]
        if settings.config_path is not None:
            gateway_args += ["--config", str(settings.config_path)]
        host = args.host or settings.gateway.host
        port = args.port if args.port is not None else settings.gateway.port
        gateway_args += ["--host", host, "--port", str(port)]
        gateway = subprocess.Popen(tensorq_command(*gateway_args))
        print(
            f"tensorq up: redis {stack.redis_url}, {len(stack.live_workers())} worker(s), "
            f"gateway http://{host}:{port} (Ctrl-C stops everything)",
            flush=True,
        )
        try:
            while not stop.wait(0.5):  # a signal sets it; the timeout only checks the children
                if gateway.poll() is not None or stack.pool.poll() is not None:
                    print("tensorq up: a component exited; stopping", flush=True)
                    break
        finally:
            stop_process(gateway, settings.worker.drain_grace_s + 10)
    return 0
