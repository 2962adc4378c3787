"""The ``tensorq`` console script: gathers verbs from the ``tensorq.commands``
entry-point group, so producer and worker each own their verbs and neither
imports the other. Each entry point is ``register(subparsers) -> None`` and
sets ``func(args, settings) -> int`` on its parser.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from common.errors import TensorQError
from common.logs import FORMATS, configure_logging
from common.settings import DEFAULT_CONFIG, Settings, load_settings

ENTRY_POINT_GROUP = "tensorq.commands"

Handler = Callable[[argparse.Namespace, Settings], int]


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """--config and --redis, shared by every verb that talks to Redis."""
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"TOML config (default: $TQ_CONFIG, else {DEFAULT_CONFIG} if present)",
    )
    parser.add_argument(
        "--redis", default=None, help="Redis URL (default: config; empty = private redis-server)"
    )


def settings_from_args(args: argparse.Namespace, **overrides: object) -> Settings:
    config = getattr(args, "config", None)
    if config is None and DEFAULT_CONFIG.exists():
        import os

        if not os.environ.get("TQ_CONFIG"):
            config = DEFAULT_CONFIG
    return load_settings(config, overrides={"redis.url": getattr(args, "redis", None), **overrides})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tensorq", description="Redis-backed batched TorchScript inference pool"
    )
    parser.add_argument("--log-level", default="info", help="debug|info|warning|error")
    parser.add_argument("--log-format", default="text", choices=FORMATS, help="text|json")
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB")
    for entry in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            register: Callable[[Any], None] = entry.load()
            register(subparsers)
        except ImportError as exc:  # a verb whose package is not installed
            print(f"tensorq: verb {entry.name!r} unavailable: {exc}", file=sys.stderr)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    configure_logging(args.log_level, args.log_format)
    handler: Handler = args.func
    try:
        settings = settings_from_args(args)
        return handler(args, settings)
    except TensorQError as exc:
        print(f"tensorq {args.verb}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
