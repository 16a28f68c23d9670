"""Prometheus metrics of one service instance, in a registry of its own.

A registry per app (not the global default) keeps several apps in one process, as in the
tests, from clashing. `MetricsMiddleware` times every HTTP request by endpoint template and
status, so label values stay few (unknown paths are labelled "unmatched").
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

NS = "resmemnet"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128)


class ServiceMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, process_metrics: bool = True):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        if process_metrics:
            from prometheus_client import PlatformCollector, ProcessCollector

            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
        self.request_latency = Histogram(
            f"{NS}_http_request_duration_seconds", "HTTP request latency, from first byte in to last byte out",
            ("endpoint", "method", "status"), buckets=LATENCY_BUCKETS, registry=r)
        self.requests_in_flight = Gauge(
            f"{NS}_http_requests_in_flight", "HTTP requests being handled now", ("endpoint",), registry=r)
        self.errors = Counter(f"{NS}_errors_total", "error answers (and failed files in batch requests) by reason",
                              ("reason",), registry=r)
        self.batch_size = Histogram(f"{NS}_batch_size", "images per forward pass", buckets=BATCH_BUCKETS, registry=r)
        self.queue_wait = Histogram(f"{NS}_queue_wait_seconds", "time an image waited in the queue before its batch ran",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.model_time = Histogram(f"{NS}_model_inference_seconds", "wall time of one batched forward pass",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.preprocess_time = Histogram(f"{NS}_preprocess_seconds", "decode + resize time of one upload",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.heatmap_time = Histogram(f"{NS}_heatmap_seconds", "time to compute one heatmap and encode its PNG",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge(f"{NS}_queue_depth", "images waiting for the model", registry=r)
        self.images_in_model = Gauge(f"{NS}_images_in_model", "images in the forward pass running now", registry=r)
        self.heatmaps_in_progress = Gauge(f"{NS}_heatmaps_in_progress", "heatmaps being computed now", registry=r)
        self.images_scored = Counter(f"{NS}_images_scored_total", "images scored", registry=r)
        self.ready = Gauge(f"{NS}_ready", "1 when the model is loaded and warmed up", registry=r)
        self.model_info = Info(f"{NS}_model", "the served checkpoint", registry=r)
        self.config_info = Info(f"{NS}_batching", "batching configuration", registry=r)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def endpoint_label(scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if path else "unmatched"


class MetricsMiddleware:
    """Pure ASGI middleware (no BaseHTTPMiddleware: that would buffer bodies and break streaming)."""

    def __init__(self, app, metrics: ServiceMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = {"code": 500}
        # The route is only known after routing; count in-flight under the raw path's endpoint later.
        in_flight = self.metrics.requests_in_flight.labels(endpoint=_guess_endpoint(scope["path"]))
        in_flight.inc()

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            in_flight.dec()
            self.metrics.request_latency.labels(
                endpoint=endpoint_label(scope), method=scope["method"], status=str(status["code"]),
            ).observe(time.perf_counter() - start)


KNOWN_PATHS = ("/score/batch", "/score", "/heatmap", "/healthz", "/readyz", "/metrics", "/docs", "/openapi.json")


def _guess_endpoint(path: str) -> str:
    return path if path in KNOWN_PATHS else "unmatched"
