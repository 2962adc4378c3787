"""``tensorq bench`` (being written)."""

from __future__ import annotations

import argparse

from common.settings import Settings


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="mlp")


def run_bench(args: argparse.Namespace, settings: Settings) -> int:
    raise NotImplementedError
