"""The scoring service: `create_app()` builds a FastAPI app around one model.

No model is loaded at import time. The lifespan starts the process answering /healthz at once,
loads the checkpoint in a background thread, warms it up, and only then does /readyz say
ready and do the scoring endpoints take work. On shutdown, new work is refused (503) and
everything already accepted is finished before the model thread stops.
"""
from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI

from .auth import keys_from_settings
from .auth_middleware import ApiKeyMiddleware, install_access_log_filter
from .body_limit import BodyLimitMiddleware
from .errors import install_error_handlers
from .metrics import MetricsMiddleware, ServiceMetrics
from .settings import ServiceSettings
from .shutdown import ShutdownGuardMiddleware
from .state import ServiceState

if TYPE_CHECKING:
    from model.scoring import Scorer

DESCRIPTION = """
Scores how memorable an image is (0 = forgettable, 1 = memorable) with ResMem-Net.

* `POST /score` - one image in multipart field `file`.
* `POST /score/batch` - several images in repeated multipart field `files`; one result per file.
* `POST /heatmap` - a PNG showing which regions raise the score (Grad-RAM), score in `X-Memorability-Score`.

Each takes `?profile=` (default `default`): which score profile to give, where the checkpoint has
several (shipped: `lnsim`/`outdoor` for outdoor scenes, `cdm` for photos like the second study's,
`general` for photos unlike both).
* `GET /healthz`, `GET /readyz`, `GET /metrics` (Prometheus).

With API keys configured (RESMEMNET_API_KEYS, RESMEMNET_API_KEYS_FILE), the scoring endpoints need
`Authorization: Bearer KEY` (else 401 `unauthorized`); /healthz and /readyz never do.

Concurrent requests are batched into shared forward passes. Every error is JSON:
`{"error": {"status": 415, "reason": "not_an_image", "message": "..."}}`.

    curl -F file=@photo.jpg http://localhost:8000/score
"""


def create_app(settings: ServiceSettings | None = None, scorer: Scorer | None = None) -> FastAPI:
    """The service app. `scorer` (a loaded model.scoring.Scorer) skips loading from `settings.weights`.

    /docs (Swagger UI) and /redoc load their scripts from /docs-assets, shipped by the
    fastapi-offline package: they work on a host without internet access."""
    from fastapi_offline import FastAPIOffline

    from model.environment import installed_version

    from . import page, routes

    settings = settings or ServiceSettings.from_env()
    keys = keys_from_settings(settings)  # SettingsError for a bad key entry or an unreadable key file
    metrics = ServiceMetrics(key_names=keys.names)
    state = ServiceState(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        reloads_on_sighup = watch_sighup(keys.reload) if keys.file is not None else None
        await state.start(scorer)
        try:
            yield
        finally:
            if reloads_on_sighup is not None:
                reloads_on_sighup()
            await state.stop()

    app = FastAPIOffline(
        static_url="/docs-assets",
        title="ResMem-Net scoring service",
        version=installed_version() or "0.0.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_tags=[
            {"name": "scoring", "description": "memorability scores and heatmaps"},
            {"name": "operations", "description": "health, readiness and Prometheus metrics"},
        ],
    )
    app.state.service = state
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.api_keys = keys
    install_access_log_filter()
    install_error_handlers(app)
    app.include_router(page.router)  # the web page at / (first: it answers / for browsers)
    # Starlette's multipart parser stops at the first file, field or text past these (its own defaults: 1000
    # files, 1000 fields of 1 MiB each, all kept in memory); python-multipart bounds each part's headers.
    app.include_router(routes.router, form_limits={"max_files": settings.max_files_per_request,
                                                   "max_fields": settings.max_form_fields,
                                                   "max_part_size": settings.max_field_bytes})

    def body_limit_for(path: str) -> int | None:
        if path == "/score/batch":
            return settings.max_request_bytes
        if path in ("/score", "/heatmap"):
            return settings.max_upload_bytes + 64 * 1024  # one file plus multipart framing
        return None

    protected = {"/score", "/score/batch", "/heatmap", *(("/metrics",) if settings.metrics_auth else ())}
    # add_middleware puts the newest outermost: metrics see everything (413s, shutdown 503s included);
    # the key check runs inside the body limit, so a refused body it reads is under the same guards.
    app.add_middleware(ApiKeyMiddleware, keys=keys, mode=settings.auth, protected=protected.__contains__,
                       metrics=metrics, drain_limit=settings.max_upload_bytes + 64 * 1024)
    app.add_middleware(BodyLimitMiddleware, limit_for=body_limit_for)
    app.add_middleware(ShutdownGuardMiddleware, retry_after_s=settings.retry_after_s)
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=lambda: app.routes)
    return app


def watch_sighup(callback):
    """Run `callback` on the event loop at every SIGHUP; returns the function that stops it, or
    None where signals cannot be watched (not the main thread, e.g. in a test client; Windows)."""
    import asyncio
    import signal

    if not hasattr(signal, "SIGHUP"):
        return None
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGHUP, callback, "SIGHUP")
    except (RuntimeError, ValueError, NotImplementedError):
        return None
    return lambda: loop.remove_signal_handler(signal.SIGHUP)
