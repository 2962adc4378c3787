"""The benchmark verbs: ``bench`` (the pool end to end, ``--http`` the
gateway, ``--report`` a sweep of offered load) and ``bench-score``. Each
entry point is ``register(subparsers)``; a verb checks the extra it needs
(``[bench]``) before it starts anything, and imports the rest when it runs."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from common.cli import add_common_flags
from common.extras import GATEWAY_MODULES, POOL_MODULES, require_extra
from common.settings import Settings
from producer.scoring.runner import DEFAULT_WINDOW

DEFAULT_REQUESTS = 20000


def bench_command(subparsers: Any) -> None:
    parser = subparsers.add_parser("bench", help="throughput/latency against two references")
    add_common_flags(parser)
    parser.add_argument("--model", default="mlp", help="model to load (default mlp)")
    parser.add_argument(
        "--requests",
        type=int,
        default=None,
        help="requests for throughput (default 20000; 2000 for a variable-length model)",
    )
    parser.add_argument(
        "--lengths",
        type=_length_range,
        default=(8, 256),
        metavar="LOW,HIGH",
        help="a variable-length model's request lengths, uniform (default 8,256)",
    )
    parser.add_argument(
        "--rounds",
        type=_at_least_one,
        default=5,
        help="a variable-length model: pool and in-process runs, taken in turns (default 5)",
    )
    parser.add_argument("--rows", type=int, default=1, help="rows per request")
    parser.add_argument("--concurrency", type=int, default=64, help="producers for latency")
    parser.add_argument("--devices", default="cpu", help="worker devices (default cpu)")
    parser.add_argument(
        "--threads", type=int, default=1, help="intra-op threads per worker and reference"
    )
    parser.add_argument(
        "--producer-nice", type=int, default=10, help="niceness of the load generator (0: off)"
    )
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    parser.add_argument(
        "--report", default=None, help="instead: sweep offered load, write DIR/bench.{csv,png}"
    )
    parser.add_argument(
        "--rates", default="500,2000,5000,9000", help="offered loads (requests/s) for --report"
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each --report load")
    parser.add_argument(
        "--http",
        action="store_true",
        help="instead: sync OIP inference through the gateway against a bare aiohttp floor",
    )
    parser.add_argument(
        "--soak",
        type=int,
        default=None,
        metavar="N",
        help="instead: N one-row requests; worker, client and Redis memory at intervals",
    )
    parser.add_argument(
        "--soak-ttl",
        type=int,
        default=20,
        metavar="S",
        help="result_ttl_s of the --soak run (default 20; collected results: S/4)",
    )
    parser.set_defaults(func=_bench)


def bench_score_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench-score", help="tensorq score rows/s against in-process and bare-Redis references"
    )
    add_common_flags(parser)
    parser.add_argument("--rows", type=int, default=6000, help="CNN rows to score (default 6000)")
    parser.add_argument(
        "--mlp-rows", type=int, default=200_000, help="MLP rows to score (default 200000)"
    )
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="requests in flight")
    parser.add_argument("--devices", default="cpu", help="worker devices (default cpu)")
    parser.add_argument(
        "--threads", type=int, default=1, help="intra-op threads per worker and reference"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="where the files go (temp)")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    parser.set_defaults(func=_bench_score)


def _length_range(text: str) -> tuple[int, int]:
    try:
        low, high = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LOW,HIGH (integers)") from None
    if not 1 <= low <= high:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 1 <= LOW <= HIGH")
    return low, high


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 1")
    return value


def _bench(args: argparse.Namespace, settings: Settings) -> int:
    # The pool and the in-process reference need torch; --http a gateway and an
    # aiohttp client; --report matplotlib, checked before the sweep, not after it.
    if args.soak is not None:
        require_extra("bench", *POOL_MODULES)
        from producer.bench.soak import run_soak

        return run_soak(args, settings)
    variable = any(t.variable_axes for t in settings.model(args.model).inputs)
    if not variable or args.http or args.report:
        args.requests = args.requests or DEFAULT_REQUESTS
    if args.report:
        require_extra("bench", *POOL_MODULES, "matplotlib")
        from producer.bench.report import run_report

        return run_report(args, settings)
    if args.http:
        require_extra("bench", *POOL_MODULES, *GATEWAY_MODULES)
        from producer.bench.http import run_http_bench

        return run_http_bench(args, settings)
    require_extra("bench", *POOL_MODULES)
    if variable:
        from producer.bench.lengths import run_length_bench

        return run_length_bench(args, settings)
    from producer.bench.pool import run_bench

    return run_bench(args, settings)


def _bench_score(args: argparse.Namespace, settings: Settings) -> int:
    require_extra("bench", *POOL_MODULES)
    from producer.bench.scoring import run_bench_score

    return run_bench_score(args, settings)
