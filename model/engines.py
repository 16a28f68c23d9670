"""Inference engines behind the Scorer: torch (the model itself) or ONNX Runtime on the CPU
(the model's ONNX export from model/export.py, cached per checkpoint).

Both take the same preprocessed batch, float32 (B, 3, H, W) RGB in [0, 1], and give (B,)
float32 scores; ONNX Runtime's fp32 scores equal torch's fp32 ones within 1e-3 (tests). The
engine only replaces the forward pass: decoding and batching are the same for both; ONNX Runtime
scores every profile from the export's `profile_scores` output.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from .environment import backend_setting
from .errors import InputError

BACKENDS = ("torch", "onnxruntime")
# "auto": onnxruntime on a CPU where it is installed and torch would run fp32 (faster at the
# same scores: docs/benchmarks.md); torch on CUDA, on CPUs with native bf16 (unless fp32 is
# asked for), or without the engine.
CHOICES = ("auto", *BACKENDS)
# The library's and the service's default (Scorer.from_checkpoint without a backend and without
# $RESMEMNET_BACKEND, RESMEMNET_BACKEND in app/settings.py); `resmemnet score` defaults to CLI_DEFAULT_BACKEND.
DEFAULT_BACKEND = "torch"
CLI_DEFAULT_BACKEND = "auto"
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


class BackendError(InputError):
    """An unknown backend, or one whose engine is not installed or cannot run here."""


def engine_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None


def check_backend(name: str | None) -> str:
    """The backend asked for: `name`, else $RESMEMNET_BACKEND, else DEFAULT_BACKEND (one of
    CHOICES); BackendError if it is unknown, or onnxruntime without its engine installed."""
    name = backend_setting(name, default=DEFAULT_BACKEND)
    if name not in CHOICES:
        raise BackendError(f"unknown backend {name!r}; choose from {', '.join(CHOICES)}")
    if name == "onnxruntime" and not engine_installed():
        raise BackendError("the onnxruntime backend needs onnx and onnxruntime: pip install 'resmemnet[engines]'")
    return name


def pick_backend(choice: str, device_type: str, *, native_bf16: bool = False) -> str:
    """Resolve "auto" for a device ("cpu" or "cuda"); other choices are returned as they are.

    native_bf16: torch will run the trunk in reduced precision (bf16 on this CPU's own bf16 units,
    or a precision asked for). There torch is
    the faster engine (steady 5.60 vs 3.41 images/s on the 2-core AVX512-BF16 machine);
    elsewhere on a CPU ONNX Runtime's fp32 beats torch's fp32 at the same scores (steady 3.41
    vs 3.08, whole process 2.17 vs 1.52 images/s; docs/benchmarks.md).
    """
    if choice != "auto":
        return choice
    if device_type != "cpu" or native_bf16:
        return "torch"
    return "onnxruntime" if engine_installed() else "torch"


@dataclass(frozen=True)
class OrtOptions:
    """ONNX Runtime session settings. threads 0: ONNX Runtime's default (one per physical core)."""

    threads: int = 0
    optimization: str = "all"

    def __post_init__(self):
        if self.threads < 0:
            raise BackendError("threads must not be negative")
        if self.optimization not in OPTIMIZATION_LEVELS:
            raise BackendError(f"unknown graph optimisation level {self.optimization!r}")


class OnnxRuntimeRunner:
    """One ONNX Runtime CPU session over an exported model: (B, 3, H, W) float32 ndarray -> (B,)
    float32 ndarray. Safe to call from several threads (ONNX Runtime's run() is).

    onnx_sha256 (the export's, from its sidecar) turns on the optimised-graph cache: the graph
    ONNX Runtime builds at level "all" is saved beside the export, keyed by that hash, the ONNX
    Runtime version and this CPU (the saved graph holds CPU-specific layouts), and later sessions
    load it without optimising again (about a second less start-up on the 2-core machine).
    """

    name = "onnxruntime"

    def __init__(self, onnx_path: str | os.PathLike, options: OrtOptions = OrtOptions(), *,
                 onnx_sha256: str | None = None, profiles: tuple[str, ...] = ()):
        import onnxruntime as ort

        from .export import INPUT_NAME, OUTPUT_NAME

        levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
        so = ort.SessionOptions()
        so.graph_optimization_level = levels[options.optimization]
        so.intra_op_num_threads = options.threads
        so.inter_op_num_threads = 1  # one chain of convolutions: nothing to run side by side
        # Idle workers sleep instead of spinning: on a shared 2-core machine spinning burnt the
        # time slices the busy thread needed (8% more images/s and 13% less CPU time without).
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.options = options
        self.path = str(onnx_path)
        self.input_name, self.output_name = INPUT_NAME, OUTPUT_NAME
        # the columns of the export's `profile_scores` output (its sidecar's profile_output.profiles)
        self.profile_names = tuple(profiles)
        optimized = None
        if onnx_sha256 and options.optimization == "all":
            optimized = Path(onnx_path).with_name(
                f"{Path(onnx_path).stem}.ort-{ort.__version__}-{cpu_identity()}.onnx")
            if _valid_optimized(optimized, onnx_sha256):
                so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
                self.path = str(optimized)
                self.session = ort.InferenceSession(self.path, so, providers=["CPUExecutionProvider"])
                return
        tmp = None
        if optimized is not None:
            tmp = optimized.with_name(f".{optimized.name}.{os.getpid()}.tmp")
            so.optimized_model_filepath = str(tmp)
            so.log_severity_level = 3  # not the warning that the saved graph is CPU-specific: the key says so
        try:
            self.session = ort.InferenceSession(self.path, so, providers=["CPUExecutionProvider"])
            if tmp is not None and tmp.is_file():
                _keep_optimized(tmp, optimized, onnx_sha256)
        finally:
            if tmp is not None and tmp.exists():
                tmp.unlink()

    def __call__(self, batch):
        import numpy as np

        return self.run([self.output_name], batch)[0]

    def run(self, names, batch) -> list:
        """The named graph outputs for one (B, 3, H, W) batch, float32 ndarrays."""
        import numpy as np

        batch = np.ascontiguousarray(batch, dtype=np.float32)
        return [out.astype(np.float32, copy=False) for out in self.session.run(list(names), {self.input_name: batch})]

    def profile_table(self, batch, names) -> "np.ndarray":
        """(B, 3, H, W) -> (B, len(names)) float32 scores of the named profiles, from the export's
        `profile_scores` output (one pass; KeyError for a profile it has no column of)."""
        from .export import PROFILES_OUTPUT

        table = self.run([PROFILES_OUTPUT], batch)[0]
        return table[:, [self.profile_names.index(n) for n in names]]


def cpu_identity() -> str:
    """A short hash of what makes an optimised graph CPU-specific: model, flags, architecture."""
    lines = []
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    lines.append(line.strip())
                if len(lines) >= 2:
                    break
    except OSError:
        pass
    lines += [platform.machine(), platform.processor()]
    return hashlib.sha256("|".join(lines).encode()).hexdigest()[:12]


def _valid_optimized(path: Path, source_sha256: str) -> bool:
    from .filecache import verified_sha256

    try:
        info = json.loads(path.with_suffix(".json").read_text())
        return info.get("source_sha256") == source_sha256 and verified_sha256(path) == info.get("sha256")
    except (OSError, ValueError, AttributeError):
        return False


def _keep_optimized(tmp: Path, final: Path, source_sha256: str) -> None:
    """Move a freshly saved optimised graph into place with its sidecar; a failure only costs time."""
    from .filecache import sha256_file

    try:
        digest = sha256_file(tmp)
        os.replace(tmp, final)
        sidecar = final.with_suffix(".json")
        sidecar_tmp = sidecar.with_name(f".{sidecar.name}.{os.getpid()}.tmp")
        sidecar_tmp.write_text(json.dumps({"source_sha256": source_sha256, "sha256": digest}) + "\n")
        os.replace(sidecar_tmp, sidecar)
    except OSError:
        pass


def onnxruntime_runner(weights: str | os.PathLike, options: OrtOptions = OrtOptions()) -> OnnxRuntimeRunner:
    """A runner over the checkpoint's cached ONNX export (exported first if needed)."""
    from .export import ExportError, cached_onnx

    try:
        export = cached_onnx(weights)
        profiles = (export.info["onnx"].get("profile_output") or {}).get("profiles", ())
        return OnnxRuntimeRunner(export.path, options, onnx_sha256=export.info["onnx"]["sha256"], profiles=profiles)
    except ExportError as exc:
        raise BackendError(f"the onnxruntime backend cannot run this checkpoint: {exc}") from None
