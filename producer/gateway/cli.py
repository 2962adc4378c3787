"""``tensorq gateway``: the HTTP front door (Open Inference Protocol, async
polling, /metrics). Settings come from ``[gateway]`` in the config, then
``TQ_GATEWAY_*``, then ``--host`` / ``--port``. Needs the ``[gateway]`` extra
(checked before it starts); this module imports none of it, so the verb is
listed in a client-only install."""

from __future__ import annotations

import argparse
from typing import Any

from common.cli import add_common_flags
from common.extras import GATEWAY_MODULES, require_extra
from common.settings import Settings, apply_flags


def gateway_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "gateway", help="HTTP gateway: Open Inference Protocol (KServe v2), polling, /metrics"
    )
    add_common_flags(parser)
    parser.add_argument("--host", default=None, help="address to listen on (default: config)")
    parser.add_argument(
        "--port", type=int, default=None, help="port to listen on; 0 = any free (default: config)"
    )
    parser.set_defaults(func=_gateway)


def _gateway(args: argparse.Namespace, settings: Settings) -> int:
    require_extra("gateway", *GATEWAY_MODULES)
    from producer.gateway.server import run

    if not settings.redis.url:
        print("tensorq gateway needs the workers' Redis URL (--redis or TQ_REDIS_URL)")
        return 2
    flags = {"gateway.host": ("--host", args.host), "gateway.port": ("--port", args.port)}
    return run(apply_flags(settings, flags))
