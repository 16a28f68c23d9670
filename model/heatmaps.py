"""Grad-RAM maps from raw class-activation maps to an image-sized heatmap, in numpy: the one
post-processing for the torch Grad-RAM (model/gradram.py) and the torch-free one from the ONNX
export's layer-4 outputs (model/slim_heatmap.py).

A raw map is sum_c weight_c * A_c at a stage's resolution (B, h, w); unit_maps applies ReLU,
resamples it bilinearly to the output size (ResNet's cell centres, see interp_matrix) and scales
its peak to 1. Several stages give the average of their normalised maps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

STAGES = ("layer1", "layer2", "layer3", "layer4")

# A map whose positive part is this small relative to its largest magnitude is rounding noise
# (all evidence negative); it is returned as an empty (all-zero) map instead of amplified noise.
RELATIVE_EMPTY = 1e-5
# An input whose every channel varies by less than this has no spatial content; the network's
# only spatial response to it is zero-padding at the borders, so its map is defined as empty.
FLAT_INPUT_RANGE = 0.5 / 255


@dataclass
class HeatmapResult:
    """One image's heatmap at its original (upright) size, and the model's score for it."""

    score: float
    heatmap: np.ndarray  # float32 (height, width) in [0, 1]
    layers: tuple[str, ...] = STAGES[-1:]
    input_size: tuple[int, int] = (0, 0)  # (width, height) of the network input
    profile: str = "default"  # the score profile the map explains and `score` is of


def parse_layers(spec: str | Iterable[str]) -> tuple[str, ...]:
    """'layer4' | 'all' | 'layer3,layer4' | ['layer3', 'layer4'] -> stage names, shallow to deep."""
    if isinstance(spec, str):
        if spec.strip().lower() == "all":
            return STAGES
        items = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        items = [str(s).strip() for s in spec]
    unknown = [s for s in items if s not in STAGES]
    if unknown or not items:
        raise ValueError(f"unknown layer {', '.join(unknown) or repr(spec)}; "
                         f"use one of {', '.join(STAGES)}, a comma list of them, or 'all'")
    return tuple(s for s in STAGES if s in items)


def stage_stride(name: str) -> int:
    """Input pixels per feature cell of a ResNet stage: 4, 8, 16, 32."""
    return 4 * 2 ** STAGES.index(name)


def interp_matrix(n_out: int, n_in: int, n_cells: int, stride: int) -> np.ndarray:
    """(n_out, n_cells) float32 bilinear weights taking one feature axis to n_out output pixels.

    ResNet's padded stride-2 convolutions and pooling centre feature cell p on input pixel
    stride * p (not stride * p + stride/2 - 1/2, which a plain align_corners=False upsample
    assumes: that would shift the map half a cell, 16 px at layer4, to the bottom right).
    The output image spans the same scene as the n_in network-input pixels (the preprocessing
    resizes the whole image), so output pixel y sits at input coordinate (y + 1/2) n_in/n_out - 1/2.
    """
    y = np.arange(n_out, dtype=np.float64)
    cell = np.clip(((y + 0.5) * (n_in / n_out) - 0.5) / stride, 0, n_cells - 1)
    lo = np.minimum(np.floor(cell).astype(np.int64), n_cells - 1)
    hi = np.minimum(lo + 1, n_cells - 1)
    frac = (cell - lo).astype(np.float32)
    weights = np.zeros((n_out, n_cells), dtype=np.float32)
    rows = np.arange(n_out)
    np.add.at(weights, (rows, lo), 1.0 - frac)
    np.add.at(weights, (rows, hi), frac)
    return weights


def unit_map(cam: np.ndarray, stride: int, in_size: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """(B, h, w) raw map -> ReLU, bilinear resample to size (H, W), peak scaled to 1 (or all zero)."""
    cam = np.asarray(cam, dtype=np.float32)
    positive = np.maximum(cam, 0)
    peak = positive.max(axis=(1, 2))
    magnitude = np.abs(cam).max(axis=(1, 2))
    with np.errstate(invalid="ignore"):
        empty = ~(peak > RELATIVE_EMPTY * magnitude) | ~np.isfinite(magnitude)
    rows = interp_matrix(size[0], in_size[0], cam.shape[1], stride)
    cols = interp_matrix(size[1], in_size[1], cam.shape[2], stride)
    up = rows @ positive @ cols.T  # separable bilinear: (H, h) @ (B, h, w) @ (w, W); weights >= 0
    return scale_to_peak(np.maximum(up, 0), empty)


def scale_to_peak(maps: np.ndarray, empty: np.ndarray | None = None) -> np.ndarray:
    peak = maps.max(axis=(1, 2))
    empty = ~(peak > 0) if empty is None else empty | ~(peak > 0)
    scaled = maps / np.where(empty, 1.0, peak).astype(np.float32)[:, None, None]
    scaled[empty] = 0.0
    return np.clip(scaled, 0.0, 1.0).astype(np.float32, copy=False)


def flat_inputs(images: np.ndarray) -> np.ndarray:
    """(B,) True where an image (B, 3, H, W) has no spatial variation in any channel."""
    spread = images.max(axis=(2, 3)) - images.min(axis=(2, 3))  # (B, 3)
    return spread.max(axis=1) <= FLAT_INPUT_RANGE


def combine(cams: dict[str, np.ndarray], layers: tuple[str, ...], images: np.ndarray,
            size: tuple[int, int]) -> np.ndarray:
    """Raw maps {stage: (B, h, w)} of the (B, 3, H, W) images -> (B, *size) float32 heatmaps in
    [0, 1]: each stage's unit map, their mean (rescaled to peak 1), zero for flat images."""
    in_size = tuple(images.shape[-2:])
    maps = np.mean([unit_map(cams[name], stage_stride(name), in_size, size) for name in layers], axis=0)
    maps = maps.astype(np.float32, copy=False)
    if len(layers) > 1:
        maps = scale_to_peak(maps)  # the average of peak-1 maps need not peak at 1
    maps[flat_inputs(images)] = 0.0
    return maps
