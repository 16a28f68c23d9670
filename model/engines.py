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
# $RESMEMNET_BACKEND, RESMEMNET_BACKEND in app/settings.py) where torch is installed; without torch
# (`pip install resmemnet`, the slim image) it is onnxruntime (default_backend).
# `resmemnet score` defaults to CLI_DEFAULT_BACKEND.
DEFAULT_BACKEND = "torch"
CLI_DEFAULT_BACKEND = "auto"
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


class BackendError(InputError):
    """An unknown backend, or one whose engine is not installed or cannot run here."""


def engine_installed() -> bool:
    """ONNX Runtime is installed (scoring an export needs nothing else; exporting also needs torch and onnx)."""
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def default_backend() -> str:
    """DEFAULT_BACKEND where torch is installed, else onnxruntime (the torch-free runtime)."""
    from .environment import torch_available

    return DEFAULT_BACKEND if torch_available() else "onnxruntime"


def check_backend(name: str | None) -> str:
    """The backend asked for: `name`, else $RESMEMNET_BACKEND, else default_backend() (one of
    CHOICES); BackendError if it is unknown, or onnxruntime without its engine installed."""
    name = backend_setting(name, default=default_backend())
    if name not in CHOICES:
        raise BackendError(f"unknown backend {name!r}; choose from {', '.join(CHOICES)}")
    if name == "onnxruntime" and not engine_installed():
        raise BackendError("the onnxruntime backend needs onnxruntime: pip install onnxruntime (or 'resmemnet[engines]')")
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
                 onnx_sha256: str | None = None, profiles: tuple[str, ...] = (), outputs: dict | None = None):
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
        # the export's Grad-RAM outputs (model/slim_heatmap.py): {} for an export without them
        self.heatmap_outputs = dict(outputs or {})
        optimized = None
        if onnx_sha256 and options.optimization == "all":
            optimized = _optimized_path(Path(onnx_path), f"{Path(onnx_path).stem}.ort-{ort.__version__}-"
                                                         f"{cpu_identity()}.onnx")
        if optimized is not None:
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


def _optimized_path(onnx_path: Path, name: str) -> Path | None:
    """Where the optimised graph is kept: beside the export, else (a read-only folder, e.g. the slim
    image's built-in export) in the cache folder; None where neither can be written (no cache)."""
    from .filecache import cache_dir

    for folder in (onnx_path.parent, cache_dir() / "onnx"):
        if (folder / name).is_file() or os.access(folder, os.W_OK):
            return folder / name
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if os.access(folder, os.W_OK):
                return folder / name
        except OSError:
            continue
    return None


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


def onnxruntime_runner(weights: str | os.PathLike, options: OrtOptions = OrtOptions(), *,
                       onnx: str | os.PathLike | None = None) -> OnnxRuntimeRunner:
    """A runner over the checkpoint's ONNX export (find_export). BackendError (one line) when
    there is none that fits."""
    export = find_export(weights, onnx=onnx)
    return OnnxRuntimeRunner(export.path, options, onnx_sha256=export.info["onnx"]["sha256"],
                             profiles=export_profiles(export.info), outputs=export_outputs(export.info))


def find_export(weights: str | os.PathLike, *, onnx: str | os.PathLike | None = None):
    """The checkpoint's ONNX export (model.export.OnnxExport), the first of: `onnx` (else
    $RESMEMNET_ONNX), a file that `resmemnet export --format onnx` wrote for exactly this checkpoint
    (its sidecar's hashes are checked, model.prebuilt.prebuilt_onnx); with torch installed, the
    cached export, made now if needed (model.export.cached_onnx); without torch, an export of this
    checkpoint in the cache folder (found by the hashes). BackendError (one line) otherwise."""
    from .environment import env_value, torch_available
    from .export import ExportError, cached_onnx
    from .prebuilt import find_cached_export, prebuilt_onnx

    onnx = onnx or env_value("onnx")
    try:
        if onnx:
            return prebuilt_onnx(onnx, weights)
        if torch_available():
            return cached_onnx(weights)
        export = find_cached_export(weights)
    except ExportError as exc:
        raise BackendError(f"the onnxruntime backend cannot run this checkpoint: {exc}") from None
    if export is None:
        raise BackendError(
            "without torch the onnxruntime backend needs the checkpoint's ONNX export: set RESMEMNET_ONNX "
            "(or --onnx) to the file `resmemnet export --format onnx --out FILE.onnx` wrote where torch is "
            "installed (the slim image has one built in)")
    return export


def export_profiles(info: dict) -> tuple[str, ...]:
    """The profile names of an export's `profile_scores` columns (its sidecar), () without them."""
    return tuple((info["onnx"].get("profile_output") or {}).get("profiles", ()))


def export_outputs(info: dict) -> dict:
    """The sidecar's description of the export's extra outputs (model/slim_heatmap.py), {} without."""
    return dict(info["onnx"].get("heatmap_outputs") or {})
