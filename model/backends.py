"""Inference engines behind the Scorer: torch (the model itself) or ONNX Runtime on the CPU
(the model's ONNX export from model/export.py, cached per checkpoint).

Both take the same preprocessed batch, float32 (B, 3, H, W) RGB in [0, 1], and give (B,)
float32 scores; ONNX Runtime's fp32 scores equal torch's fp32 ones within 1e-3 (tests). The
engine only replaces the forward pass: decoding, batching and heatmaps (Grad-RAM needs
gradients, so always torch) are the same for both.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

BACKENDS = ("torch", "onnxruntime")
# "auto": onnxruntime on a CPU where it is installed (2x the images/s of torch on the 2-core
# machine, same scores: docs/benchmarks.md), torch on CUDA or without the engine.
CHOICES = ("auto", *BACKENDS)
# The library's and the service's default (Scorer.from_checkpoint without a backend and without
# $RESMEMNET_BACKEND); `resmemnet score` defaults to "auto".
DEFAULT_BACKEND = "torch"
BACKEND_ENV = "RESMEMNET_BACKEND"
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


class BackendError(ValueError):
    """An unknown backend, or one whose engine is not installed or cannot run here."""


def engine_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None


def check_backend(name: str | None) -> str:
    """The backend asked for: `name`, else $RESMEMNET_BACKEND, else DEFAULT_BACKEND (one of
    CHOICES); BackendError if it is unknown, or onnxruntime without its engine installed."""
    name = (name or os.environ.get(BACKEND_ENV) or DEFAULT_BACKEND).strip().lower()
    if name not in CHOICES:
        raise BackendError(f"unknown backend {name!r}; choose from {', '.join(CHOICES)}")
    if name == "onnxruntime" and not engine_installed():
        raise BackendError("the onnxruntime backend needs onnx and onnxruntime: pip install 'resmemnet[engines]'")
    return name


def pick_backend(choice: str, device_type: str) -> str:
    """Resolve "auto" for a device ("cpu" or "cuda"); other choices are returned as they are."""
    if choice != "auto":
        return choice
    return "onnxruntime" if device_type == "cpu" and engine_installed() else "torch"


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
    float32 ndarray. Safe to call from several threads (ONNX Runtime's run() is)."""

    name = "onnxruntime"

    def __init__(self, onnx_path: str | os.PathLike, options: OrtOptions = OrtOptions()):
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
        self.options = options
        self.path = str(onnx_path)
        self.session = ort.InferenceSession(self.path, so, providers=["CPUExecutionProvider"])
        self.input_name, self.output_name = INPUT_NAME, OUTPUT_NAME

    def __call__(self, batch):
        import numpy as np

        batch = np.ascontiguousarray(batch, dtype=np.float32)
        return self.session.run([self.output_name], {self.input_name: batch})[0].astype(np.float32, copy=False)


def onnxruntime_runner(weights: str | os.PathLike, options: OrtOptions = OrtOptions()) -> OnnxRuntimeRunner:
    """A runner over the checkpoint's cached ONNX export (exported first if needed)."""
    from .export import ExportError, cached_onnx

    try:
        return OnnxRuntimeRunner(cached_onnx(weights).path, options)
    except ExportError as exc:
        raise BackendError(f"the onnxruntime backend cannot run this checkpoint: {exc}") from None
