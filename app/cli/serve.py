"""`resmemnet serve`: run the scoring service under uvicorn (the command the container runs).

Settings come from `RESMEMNET_*` environment variables; the flags below override them.
"""
from __future__ import annotations

import logging

from .kit import EXIT_OK, EXIT_SOME_FAILED, fail


def register(sub) -> None:
    p = sub.add_parser(
        "serve", help="run the HTTP scoring service",
        description="Serve POST /score, /score/batch, /heatmap, GET /healthz, /readyz, /metrics. Every setting "
                    "can also be given as a RESMEMNET_* environment variable (see the README); flags win.")
    p.add_argument("--host", help="address to bind (env RESMEMNET_HOST, default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, help="TCP port (env RESMEMNET_PORT, default 8000)")
    p.add_argument("--weights", metavar="FILE", help="checkpoint .json (env RESMEMNET_WEIGHTS, default: the shipped one)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="env RESMEMNET_DEVICE, default auto")
    p.add_argument("--onnx", metavar="FILE", help="the ONNX export the onnxruntime backend serves (env RESMEMNET_ONNX; "
                                                  "default: this checkpoint's export in the cache); "
                                                  "without --backend or RESMEMNET_BACKEND it selects onnxruntime")
    p.add_argument("--backend", choices=("auto", "torch", "onnxruntime"),
                   help="inference engine (env RESMEMNET_BACKEND; default torch where it is installed, "
                        "onnxruntime with --onnx or without torch)")
    p.add_argument("--max-batch-size", type=int, metavar="N", help="1 turns batching off (env RESMEMNET_MAX_BATCH_SIZE)")
    p.add_argument("--max-wait-ms", type=float, metavar="MS", help="batch gathering window (env RESMEMNET_MAX_WAIT_MS)")
    p.add_argument("--queue-size", type=int, metavar="N", help="queued images before 503 (env RESMEMNET_QUEUE_SIZE)")
    p.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"),
                   help="env RESMEMNET_LOG_LEVEL, default info")
    p.set_defaults(func=run_serve)


def run_serve(args) -> int:
    from app.settings import ServiceSettings, SettingsError
    from model.environment import env_value

    backend = getattr(args, "backend", None)
    if backend is None and args.onnx and env_value("backend") is None:
        backend = "onnxruntime"  # --onnx FILE is what to serve; the torch default would ignore it
    try:
        settings = ServiceSettings.from_env(
            host=args.host, port=args.port, weights=args.weights, device=args.device, onnx=args.onnx, backend=backend,
            max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, queue_size=args.queue_size,
            log_level=args.log_level)
    except SettingsError as exc:
        return fail(str(exc), command="serve")
    problem = check_auth(settings) or check_port(settings.host, settings.port) or check_startup(settings)
    if problem:
        return fail(problem, command="serve")
    warn_unknown_variables(ServiceSettings.variables())

    limit_malloc_arenas()

    import uvicorn

    from app.http_protocol import uvicorn_config
    from app.service import create_app

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    server = uvicorn.Server(uvicorn_config(app, settings))
    state = app.state.service
    # A model that cannot load would leave a live process that never gets ready (a container
    # "unhealthy" forever, its reason deep in the logs): stop, and exit non-zero with the reason.
    state.on_failed = lambda: setattr(server, "should_exit", True)
    server.run()
    if state.load_error:  # (the phase is "stopped" by now)
        return fail(f"cannot serve {settings.weights}: the model did not load: {state.load_error}",
                    EXIT_SOME_FAILED, command="serve")
    # uvicorn returns normally after SIGTERM; a failed start (port in use) leaves `started` False.
    return EXIT_OK if server.started else EXIT_SOME_FAILED


def warn_unknown_variables(known) -> None:
    """One stderr line per RESMEMNET_* variable that no setting reads (a typo would otherwise be
    ignored without a word)."""
    import sys

    from model.environment import unknown_variables

    for line in unknown_variables(known):
        print(f"resmemnet serve: warning: {line}", file=sys.stderr)


# glibc's mallopt(M_ARENA_MAX): by default glibc gives each thread that contends for malloc an
# arena of its own (up to 8 per core) and rarely returns their memory. Under a soak at twice the
# capacity (bench/soak.py, docs/robustness.md) that grew the server's RSS by 12.8 % in 6 minutes;
# with 2 arenas, by 2.8 %, at the same throughput.
M_ARENA_MAX = -8
MALLOC_ARENAS = 2


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas before the server's threads start (True if applied). A
    MALLOC_ARENA_MAX environment variable wins; elsewhere than glibc this does nothing."""
    import ctypes
    import ctypes.util
    import os

    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_ARENA_MAX, int(arenas)))
    except (OSError, AttributeError):
        return False


def check_auth(settings) -> str | None:
    """Refuse, before anything binds, an address off loopback with no API key, and key settings
    that cannot be used (app.auth.auth_problem: the one rule; docs/api.md, "API keys")."""
    from app.auth import auth_problem, keys_from_settings
    from app.settings import SettingsError

    try:
        return auth_problem(settings, keys_from_settings(settings))
    except SettingsError as exc:
        return str(exc)


def check_startup(settings) -> str | None:
    """Fail fast, before binding the port, on what would make every request fail."""
    from model.checkpoint import CheckpointError, read_meta
    from model.engines import check_backend
    from model.environment import torch_available

    try:
        read_meta(settings.weights)
    except CheckpointError as exc:
        return f"cannot serve {settings.weights}: {exc}"
    if not torch_available():  # the torch-free runtime: ONNX Runtime on the CPU
        if check_backend(settings.backend) == "torch":
            return ("RESMEMNET_BACKEND=torch needs torch, which is not installed here: set RESMEMNET_BACKEND="
                    "onnxruntime (or pip install 'resmemnet[torch]')")
        if settings.device not in ("auto", "cpu"):
            return f"device {settings.device!r} needs torch, which is not installed here: use auto or cpu"
        from model.engines import BackendError, find_export

        try:  # a missing, modified or mismatched export: one line now, not a service that never gets ready
            find_export(settings.weights, onnx=settings.onnx or None)
        except BackendError as exc:
            return f"cannot serve {settings.weights}: {exc}"
        return None
    from model.devices import resolve_device

    try:
        resolve_device(settings.device)
    except ValueError as exc:
        return str(exc)
    return None


def check_port(host: str, port: int) -> str | None:
    """None if host:port can be bound now (as uvicorn binds it: SO_REUSEADDR, IPv6 for a host with ':'),
    else the reason; checked before the model loads so a taken port costs no start-up."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        return f"cannot listen on {host}:{port}: {exc.strerror or exc} (is another server running there?)"
    return None
