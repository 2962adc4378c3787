"""Prometheus metrics of the gateway (every name is documented in docs/metrics.md).

Request counts and latency are recorded by a middleware, labelled by route
template (``/v2/models/{model}/infer``), never by raw path. Queue depth,
pending, oldest pending age, dead letters and live workers are read from
Redis when ``/metrics`` is scraped, by ``producer.ops.status.collect_status``
on the gateway's shared connection pool. A private registry per app keeps
two gateways in one process (tests) apart.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.exceptions import RedisError

from common.errors import TensorQError
from common.settings import Settings
from producer.ops.status import collect_status

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
UNMATCHED = "unmatched"  # the endpoint label of requests no route matched


class _StatusCollector(Collector):
    """Yields the Redis-side gauges from the snapshot taken for this scrape."""

    def __init__(self) -> None:
        self.snapshot: dict[str, Any] | None = None

    def describe(self) -> list[Metric]:
        return []  # the families depend on the snapshot: no up-front description

    def collect(self) -> Iterator[Metric]:
        report = self.snapshot
        up = GaugeMetricFamily("tensorq_redis_up", "1 if the gateway reached Redis at scrape")
        up.add_metric([], 0.0 if report is None else 1.0)
        yield up
        if report is None:
            return
        families = {
            "queued": GaugeMetricFamily(
                "tensorq_queue_depth", "Requests queued, not yet read by a worker", labels=["model"]
            ),
            "pending": GaugeMetricFamily(
                "tensorq_queue_pending",
                "Requests read by a worker and not yet answered",
                labels=["model"],
            ),
            "oldest_pending_ms": GaugeMetricFamily(
                "tensorq_queue_oldest_pending_seconds",
                "Time since the oldest pending request was delivered to a worker",
                labels=["model"],
            ),
            "dead_letters": GaugeMetricFamily(
                "tensorq_dead_letters",
                "Entries in the model's dead-letter stream",
                labels=["model"],
            ),
        }
        for model, stats in report["models"].items():
            for field, family in families.items():
                value = float(stats[field])
                family.add_metric([model], value / 1000 if field.endswith("_ms") else value)
        yield from families.values()
        live = GaugeMetricFamily(
            "tensorq_workers_live", "Workers whose heartbeat is recent and that are not stopping"
        )
        live.add_metric([], float(sum(1 for w in report["workers"] if w["alive"])))
        yield live


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tensorq_gateway_requests",
            "HTTP requests answered, by endpoint (route template), method and status",
            ["endpoint", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "tensorq_gateway_request_duration_seconds",
            "Time from request to response, by endpoint (route template)",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "tensorq_gateway_requests_in_flight",
            "HTTP requests being handled now",
            registry=self.registry,
        )
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._status = _StatusCollector()
        self.registry.register(self._status)

    def middleware(self) -> Middleware:
        in_flight = self.in_flight

        @web.middleware
        async def measure(request: web.Request, handler: Handler) -> web.StreamResponse:
            started = time.perf_counter()
            status = 500
            in_flight.inc()
            try:
                response = await handler(request)
                status = response.status
                return response
            except web.HTTPException as exc:
                status = exc.status
                raise
            finally:
                in_flight.dec()
                resource = request.match_info.route.resource
                endpoint = resource.canonical if resource is not None else UNMATCHED
                self._observe(endpoint, request.method, status, time.perf_counter() - started)

        return measure

    def _observe(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        # Labelled children are cached: .labels() takes a lock and builds a key per call.
        key = (endpoint, method, status)
        children = self._children.get(key)
        if children is None:
            children = (
                self.requests.labels(endpoint, method, str(status)),
                self.latency.labels(endpoint),
            )
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    async def render(
        self, settings: Settings, redis: aioredis.Redis, accept: str | None
    ) -> tuple[bytes, str]:
        """The exposition text (format chosen by ``accept``) and its content type."""
        try:
            snapshot: dict[str, Any] | None = await collect_status(settings, redis=redis)
        except (TensorQError, RedisError) as exc:
            log.warning("metrics: cannot read queue status from Redis: %s", exc)
            snapshot = None
        encoder, content_type = choose_encoder(accept or "")
        # No await between setting the snapshot and encoding: scrapes cannot mix.
        self._status.snapshot = snapshot
        return encoder(self.registry), content_type
