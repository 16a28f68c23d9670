"""Prometheus metrics of one service instance, in a registry of its own.

A registry per app (not the global default) keeps several apps in one process, as in the
tests, from clashing. `MetricsMiddleware` counts every HTTP request exactly once, and every error
answer exactly once (under the reason recorded by app.errors.mark_error), with bounded labels:
endpoint = the route template the path matches (also for 405s, mounts and the docs pages) or
"unmatched"; method = one of METHODS or "other"; status = the status sent.
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

NS = "resmemnet"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128)


class ServiceMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, process_metrics: bool = True,
                 key_names: list[str] = ()):
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
        # labels: the configured keys' names (never the keys) and "anonymous": a bounded set
        self.key_requests = Counter(f"{NS}_requests_by_key_total", "requests to a protected endpoint let through, by "
                                    "the name of the API key they carried (`anonymous`: none was needed)",
                                    ("key",), registry=r)
        self.auth_rejections = Counter(f"{NS}_auth_rejections_total", "requests refused 401 unauthorized, by why: "
                                       "missing, several, malformed, empty, unknown_key, key_in_url, no_keys",
                                       ("reason",), registry=r)
        for name in key_names:
            self.key_requests.labels(key=name)
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


# Methods get their own label value; anything a client invents is "other" (bounded cardinality).
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


def method_label(method: str) -> str:
    return method if method in METHODS else "other"


def endpoint_label(scope, routes=()) -> str:
    """The template of the route `scope` goes to: a full match, else a path match (405), else "unmatched"."""
    route = scope.get("route")
    if getattr(route, "path", None):
        return route.path
    full, partial = _match(scope, routes, "")
    return full or partial or "unmatched"


def _match(scope, routes, prefix: str) -> tuple[str | None, str | None]:
    from starlette.routing import Match

    partial = None
    for candidate in routes:
        inner = getattr(candidate, "original_router", None)  # FastAPI's include_router() entry
        if inner is not None:
            sub = getattr(getattr(candidate, "include_context", None), "prefix", "") or ""
            if sub and not scope["path"].startswith(sub):
                continue
            child = {**scope, "path": scope["path"][len(sub):]} if sub else scope
            full, part = _match(child, inner.routes, prefix + sub)
            if full:
                return full, None
            partial = partial or part
            continue
        try:
            match, _ = candidate.matches(scope)
        except Exception:  # a route that cannot judge this scope does not match it
            continue
        path = getattr(candidate, "path", None)
        if path is None:
            continue
        if match == Match.FULL:
            return prefix + path, None
        if match == Match.PARTIAL and partial is None:
            partial = prefix + path
    return None, partial


class MetricsMiddleware:
    """Pure ASGI middleware (no BaseHTTPMiddleware: that would buffer bodies and break streaming).

    Outermost of the app's own middleware, so it sees every answer: the body limit's 413s, the
    shutdown guard's 503s and the 500 of an unhandled exception (answered by Starlette outside it).
    """

    def __init__(self, app, metrics: ServiceMetrics, routes=None):
        self.app = app
        self.metrics = metrics
        self.routes = routes or (lambda: ())

    async def __call__(self, scope, receive, send):
        from .errors import SCOPE_REASON, SCOPE_UNCOUNTED, reason_for_status

        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = {"code": None}
        endpoint = endpoint_label(scope, self.routes())
        in_flight = self.metrics.requests_in_flight.labels(endpoint=endpoint)
        in_flight.inc()

        async def send_wrapper(message):
            if message["type"] == "http.response.start" and status["code"] is None:
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            in_flight.dec()
            # nothing sent: an exception is on its way to Starlette's 500 handler (or the task was cut)
            code = status["code"] if status["code"] is not None else 500
            self.metrics.request_latency.labels(
                endpoint=endpoint, method=method_label(scope.get("method", "")), status=str(code),
            ).observe(time.perf_counter() - start)
            if code >= 400 and not scope.get(SCOPE_UNCOUNTED):
                self.metrics.errors.labels(reason=scope.get(SCOPE_REASON) or reason_for_status(code)).inc()
