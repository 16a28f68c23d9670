"""Where the model runs, and in what precision: the one device resolver (the Scorer, the service,
the command line and training all use it) and the trunk's reduced precision per device."""
from __future__ import annotations

import torch

from .environment import PRECISIONS
from .errors import InputError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" (CUDA when there is a GPU, else the CPU), "cpu", "cuda" or "cuda:N" -> torch.device.

    InputError (a ValueError) for "cuda" without a GPU or for another name."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was asked for, but no CUDA GPU is available (use --device cpu or auto)")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise InputError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


def cpu_has_native_bf16() -> bool:
    """True where the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). Elsewhere oneDNN
    emulates bf16 and it is slower than fp32, so the scorer stays in fp32."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:
        return any(check() for check in checks if check is not None)
    except RuntimeError:
        return False


def check_precision(precision: str) -> str:
    """`precision` lower-cased, or InputError (a ValueError) naming the choices."""
    name = str(precision).strip().lower()
    if name not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    return name


def autocast_dtype(device: torch.device, mixed_precision: bool = True, precision: str = "auto") -> torch.dtype | None:
    """The trunk's reduced precision on this device, or None for fp32.

    precision "auto": fp16 on CUDA, bf16 on a CPU with native bf16 (1.7x faster than fp32 on an
    AVX512-BF16 machine; the shipped checkpoint's scores move by at most 5.3e-3, docs/robustness.md),
    fp32 elsewhere (oneDNN emulates bf16 there and it is slower than fp32). "bf16" / "fp16":
    that dtype on any device, also where it is emulated (slower, but it runs the same code, so a
    test or CI machine without native bf16 covers the mixed-precision path). "fp32", or
    mixed_precision=False: None. InputError for another name."""
    precision = check_precision(precision)
    if not mixed_precision or precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def precision_name(dtype: torch.dtype | None) -> str:
    """torch.bfloat16 -> "bf16", torch.float16 -> "fp16", None -> "fp32"."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
