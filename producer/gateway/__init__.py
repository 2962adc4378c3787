"""The tensorq HTTP gateway: the Open Inference Protocol (KServe v2) over
tensorq's Redis queues, async submission with polling by id, and /metrics.
Needs the ``[gateway]`` extra (aiohttp, orjson, prometheus-client).

``create_app(settings)`` builds the aiohttp application; ``start`` serves it
on a socket (tests, embedding); ``tensorq gateway`` runs it on uvloop.

    cli          the verb ``gateway`` (imports no aiohttp: listed without the extra)
    server       serving: one listening socket, graceful stop; ``run`` for the verb
    app          the aiohttp application: routes, middlewares, the watcher's lifecycle
    state        what a running gateway holds (Redis pool, client, watcher), typed AppKeys
    routes_v2    Open Inference Protocol endpoints: health, metadata, sync infer
    routes_v1    async submission, result polling by id, cancel
    oip          OIP JSON bodies: parsing, validation, responses (binary extension too)
    wire         msgpack request bodies and answers
    bf16         BF16 inputs handed to the client as torch views
    results      the long-poll watcher for results other gateways submitted
    live         the cached view of live workers (readiness, 503 without a worker)
    metrics      /metrics: gateway counters, queue and worker gauges
    status_page  ``GET /``: the status page, and ``/v1/status``
    auth         bearer-token middleware
    errors       typed errors -> JSON error bodies and HTTP statuses

The names below are imported on first use, so ``producer.gateway.cli``
loads without aiohttp.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from producer.gateway.app import create_app
    from producer.gateway.server import RunningGateway, serve, start

__all__ = ["RunningGateway", "create_app", "serve", "start"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from producer.gateway import app

        return app.create_app
    if name in ("RunningGateway", "serve", "start"):
        from producer.gateway import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
