"""Service settings, read from `RESMEMNET_*` environment variables.

Every field maps to one variable: `max_batch_size` <- `RESMEMNET_MAX_BATCH_SIZE`, and so on,
read by model.environment.env_value as everywhere else. `ServiceSettings.table()` renders the
documented table (name, default, meaning) for the README.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Mapping

from model.engines import BACKENDS, DEFAULT_BACKEND
from model.environment import ENV_PREFIX, PRECISIONS, env_name, env_value  # noqa: F401  (ENV_PREFIX: for callers)
from model.errors import InputError

MiB = 1024 * 1024
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's names


class SettingsError(InputError):
    """An environment variable with a value that cannot be used."""


def _default_weights() -> str:
    from model.environment import default_weights

    return str(default_weights())


def _default_max_pixels() -> int:
    from model.preprocess import DEFAULT_MAX_PIXELS

    return DEFAULT_MAX_PIXELS


def _doc(text: str) -> dict:
    return {"doc": text}


@dataclass(frozen=True)
class ServiceSettings:
    # -- model -------------------------------------------------------------------------------
    weights: str = field(default_factory=_default_weights,
                         metadata=_doc("checkpoint .json to serve (default: the shipped checkpoint)"))
    device: str = field(default="auto", metadata=_doc("`auto` (CUDA when present, else CPU), `cpu` or `cuda`"))
    mixed_precision: bool = field(default=True, metadata=_doc("trunk in fp16 on CUDA, in bf16 on CPUs with native bf16 (AVX512-BF16/AMX); false: fp32"))
    precision: str = field(default="auto", metadata=_doc(
        "the trunk's precision: `auto` (as `mixed_precision` says), `fp32`, `bf16` or `fp16` (forced, also where the "
        "CPU only emulates it: slower, for tests). The command line reads the same variable"))
    backend: str = field(default=DEFAULT_BACKEND, metadata=_doc(
        "inference engine: `torch`, `onnxruntime` (the model's ONNX export on the CPU, fp32, scores within 1e-3 of "
        "torch fp32; needs the `engines` extra) or `auto` (onnxruntime on a CPU where installed). Heatmaps use torch"))
    warmup: bool = field(default=True, metadata=_doc("run warm-up forward passes before /readyz says ready"))
    torch_threads: int = field(default=0, metadata=_doc("torch intra-op threads (0: torch's default, one per core). On a small CPU "
                                         "serving a small model, 1 can be much faster (README)"))
    # -- HTTP --------------------------------------------------------------------------------
    host: str = field(default="127.0.0.1", metadata=_doc("address `resmemnet serve` binds (the container uses 0.0.0.0)"))
    port: int = field(default=8000, metadata=_doc("TCP port `resmemnet serve` listens on"))
    log_level: str = field(default="info", metadata=_doc("log level: `critical`, `error`, `warning`, `info`, `debug` or `trace`"))
    graceful_shutdown_s: float = field(
        default=30.0, metadata=_doc("on SIGTERM, how long requests already running may still finish; those "
                                    "still running then get 503 `shutting_down`. 0: no grace, they get it at once"))
    # -- batching and load ---------------------------------------------------------------------
    max_batch_size: int = field(default=32, metadata=_doc("largest batch one forward pass takes (1 turns batching off)"))
    max_wait_ms: float = field(default=5.0, metadata=_doc("how long the oldest queued image may wait for a batch to fill"))
    queue_size: int = field(default=128, metadata=_doc("images waiting for the model; beyond this, 503 + Retry-After"))
    request_timeout_s: float = field(default=30.0, metadata=_doc("per-request deadline; past it the answer is 504"))
    retry_after_s: int = field(default=1, metadata=_doc("the Retry-After value sent with 503 answers"))
    preprocess_workers: int = field(default=2, metadata=_doc("threads decoding and resizing uploads"))
    # -- input limits --------------------------------------------------------------------------
    max_upload_bytes: int = field(default=20 * MiB, metadata=_doc("largest image file accepted (413 beyond)"))
    max_pixels: int = field(default_factory=_default_max_pixels,
                            metadata=_doc("largest width x height decoded (413 beyond; decompression-bomb guard)"))
    max_files_per_request: int = field(default=32, metadata=_doc(
        "most files one POST /score/batch may carry; the parser stops at the next one (413 `too_many_files`)"))
    max_form_fields: int = field(default=16, metadata=_doc(
        "most text (non-file) multipart fields one request may carry (no endpoint takes any: they are parsed only "
        "to name them in the 422); the parser stops at the next one, 413 `too_many_fields`"))
    max_field_bytes: int = field(default=64 * 1024, metadata=_doc(
        "largest text (non-file) multipart field; beyond, 422 `invalid_request` (e.g. an image sent without a file "
        "name)"))
    body_timeout_s: float = field(default=30.0, metadata=_doc(
        "longest wait for the next piece of a request body still being uploaded; past it the answer is 408 "
        "`request_timeout` and the connection is closed (a stalled upload is not held open)"))
    # -- connections (`resmemnet serve`: uvicorn's protocol, app/http_protocol.py) -----------------
    header_timeout_s: float = field(default=10.0, metadata=_doc(
        "longest time from a connection's opening (or the first byte of its next request) to the end of the "
        "request head; past it 408 `request_timeout` and the connection is closed (slowloris guard: uvicorn has "
        "no such deadline of its own)"))
    max_header_bytes: int = field(default=16 * 1024, metadata=_doc(
        "largest request head (request line and headers), bytes; beyond, 431 `headers_too_large`"))
    keep_alive_s: float = field(default=30.0, metadata=_doc("an idle kept-alive connection is closed after this long"))
    max_connections_per_client: int = field(default=0, metadata=_doc(
        "most connections open at once from one client address (0: no limit); beyond, 429 `too_many_connections` "
        "and the connection is closed. Behind a load balancer every connection comes from its address: leave 0 "
        "or set it above the balancer's connection pool"))
    # -- API keys (docs/api.md, "API keys") -----------------------------------------------------
    api_keys: str = field(default="", repr=False, metadata=_doc(
        "API keys, comma-separated, each `KEY` or `NAME:KEY` (a key: 16+ characters of letters, digits and `-._~+/`, "
        "e.g. `openssl rand -hex 32`). Set: /score, /score/batch and /heatmap need `Authorization: Bearer KEY`"))
    api_keys_file: str = field(default="", metadata=_doc(
        "a file of API keys, one `KEY` or `NAME:KEY` a line (`#` comments); re-read on SIGHUP and when it changes "
        "(checked at most once a second), without a restart. Set: keys are needed as above"))
    auth: str = field(default="auto", metadata=_doc(
        "`auto`: keys are needed when any are configured; with none, `resmemnet serve` refuses to bind an address "
        "other than loopback. `off`: no key is ever asked for (e.g. behind a proxy that authenticates). `on`: keys "
        "always (refuse to start without one)"))
    metrics_auth: bool = field(default=False, metadata=_doc("true: GET /metrics needs an API key too"))
    # -- heatmaps ------------------------------------------------------------------------------
    heatmap_concurrency: int = field(default=1, metadata=_doc("heatmaps computed at once; more get 503 + Retry-After"))

    def __post_init__(self):
        problems = []
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            problems.append(f"device must be auto, cpu or cuda, not {self.device!r}")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.auth not in ("auto", "on", "off"):
            problems.append(f"auth must be auto, on or off, not {self.auth!r}")
        object.__setattr__(self, "log_level", self.log_level.lower())  # INFO works too (frozen: set once)
        if self.log_level not in LOG_LEVELS:
            problems.append(f"log_level must be one of {', '.join(LOG_LEVELS)}, not {self.log_level!r}")
        if self.backend not in ("auto", *BACKENDS):
            problems.append(f"backend must be auto, torch or onnxruntime, not {self.backend!r}")
        for name in ("max_batch_size", "queue_size", "preprocess_workers", "max_upload_bytes", "max_pixels",
                     "max_files_per_request", "heatmap_concurrency", "retry_after_s", "max_header_bytes",
                     "max_field_bytes"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        for name in ("max_wait_ms", "torch_threads", "graceful_shutdown_s", "max_form_fields",
                     "max_connections_per_client"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative")
        if self.request_timeout_s <= 0:
            problems.append("request_timeout_s must be positive")
        for name in ("body_timeout_s", "header_timeout_s", "keep_alive_s"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive")
        if not 0 < self.port < 65536:
            problems.append(f"port must be 1..65535, not {self.port}")
        if problems:
            raise SettingsError("invalid service settings: " + "; ".join(problems))

    @property
    def max_request_bytes(self) -> int:
        """Body limit of one request: its files plus multipart framing."""
        return self.max_upload_bytes * self.max_files_per_request + 64 * 1024

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> "ServiceSettings":
        """Defaults, then `RESMEMNET_*` variables, then explicit overrides (e.g. CLI flags)."""
        values = {}
        for f in fields(cls):
            raw = env_value(f.name, environ)
            if raw is not None:
                values[f.name] = _parse(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @classmethod
    def variables(cls) -> frozenset[str]:
        """Every RESMEMNET_* name a field reads."""
        return frozenset(env_name(f.name) for f in fields(cls))

    @classmethod
    def table(cls) -> str:
        """Markdown table of every variable, its default and its meaning."""
        rows = ["| Variable | Default | Meaning |", "|---|---|---|"]
        for f in fields(cls):
            if f.name == "weights":
                default = "`weights/resmemnet-default.json`"
            else:
                value = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
                default = f"`{str(value).lower() if isinstance(value, bool) else value}`"
            rows.append(f"| `{env_name(f.name)}` | {default} | {f.metadata['doc']} |")
        return "\n".join(rows)


def _parse(f, raw: str):
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    try:
        if kind == "bool":
            lowered = raw.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true/false")
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        return raw
    except ValueError as exc:
        raise SettingsError(f"{env_name(f.name)}={raw!r} is not a valid {kind} ({exc})") from None
