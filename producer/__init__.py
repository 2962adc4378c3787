"""tensorq producer: what enqueues requests and waits for results.

    client/    AsyncClient and Client (the whole of a plain ``pip install tensorq``)
    gateway/   the HTTP gateway (``tensorq gateway``; extra ``[gateway]``)
    scoring/   offline scoring: ``tensorq score``, RQ batch jobs (extra ``[batch]``)
    ops/       operator tools: ``tensorq status``, ``demo``, ``up``, the local stack
    bench/     benchmarks: ``tensorq bench [--http | --report]``, ``bench-score``

``from producer import AsyncClient, Client`` imports the client and common
only: no torch, aiohttp, rq or matplotlib. Every typed error of
common/errors.py is exported here beside the clients (README: "Errors").
"""

from common.errors import (
    ConfigError,
    DuplicateRequest,
    InferenceError,
    InvalidInput,
    MissingExtra,
    ProtocolError,
    QueueFull,
    RedisUnavailable,
    RequestTimeout,
    TensorQError,
    UnknownModel,
    UnknownRequest,
)
from producer.client import AsyncClient, Client, Submission, outputs_of

__all__ = [
    "AsyncClient",
    "Client",
    "ConfigError",
    "DuplicateRequest",
    "InferenceError",
    "InvalidInput",
    "MissingExtra",
    "ProtocolError",
    "QueueFull",
    "RedisUnavailable",
    "RequestTimeout",
    "Submission",
    "TensorQError",
    "UnknownModel",
    "UnknownRequest",
    "outputs_of",
]
