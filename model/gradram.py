"""Grad-RAM: Grad-CAM applied to ResMem-Net's scalar memorability score.

For a chosen trunk stage with activations A (B, C, h, w), the channel weights are the spatial
mean of d score / d A, and the map is ReLU(sum_c weight_c * A_c), upsampled to the image and
scaled so its peak is 1. Several stages give the average of their normalised maps.

The shared model is never modified: no hooks, no `requires_grad` or train/eval changes, and
no gradients on parameters. The trunk runs up to the first chosen stage without autograd; that
stage's output becomes a fresh leaf tensor, the rest of the network runs with autograd on, and
`torch.autograd.grad` returns the gradients for the chosen activations only (nothing lands in
`.grad`). Grad mode is thread-local, so this is safe next to concurrent scoring threads.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch

from .network import global_pool, profile_score, run_block_fp32

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


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _check_eval(model) -> None:
    # Train mode would make the map depend on the batch (BatchNorm) and on chance (dropout);
    # switching the shared model's mode is not ours to do.
    if any(m.training for m in model.modules()):
        raise ValueError("Grad-RAM needs the model in eval mode; call model.eval() first")


def stage_cams(model, images: torch.Tensor, layers: Iterable[str] = ("layer4",), *,
               autocast_dtype: torch.dtype | None = None, profile: str = "default"):
    """Raw Grad-RAM maps before ReLU, at each chosen stage's resolution.

    images: (B, 3, H, W) in [0, 1]. Returns ({stage: (B, h, w) float32}, scores (B,) float32),
    on the model's device. autocast_dtype: run the trunk as the Scorer does in mixed precision
    (that dtype up to layer3, layer4 and the head in fp32), so the score equals the Scorer's.
    Only bf16 is honoured: fp16's range underflows small gradients, so CUDA maps stay fp32.
    profile: the score profile (model.network.PROFILES) whose score is the target, and is
    returned; ValueError for one the model has not got.
    """
    if autocast_dtype is not None and autocast_dtype != torch.bfloat16:
        autocast_dtype = None
    chosen = [STAGES.index(s) for s in parse_layers(layers)]
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    _check_eval(model)
    device = _model_device(model)
    stages = [getattr(model.trunk, name) for name in STAGES]
    taps_all = model.cfg.taps == "all"
    first = chosen[0]

    def mixed():
        if autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=autocast_dtype)

    def run(stage_index: int, block, h):
        if autocast_dtype is not None and stage_index == len(stages) - 1:
            return run_block_fp32(block, h)  # the Scorer's fp32_last_stage
        return block(h)

    # inference_mode(False): a caller inside inference mode would otherwise get tensors autograd refuses.
    with torch.inference_mode(False):
        x = images.to(device=device, dtype=torch.float32)
        if x.is_inference():
            x = x.clone()  # an inference tensor from the caller becomes an ordinary one
        # 1. Up to the first chosen stage: constants, no graph kept.
        with torch.no_grad(), mixed():
            h = model.stem(x)
            pooled = []
            for index, stage in enumerate(stages[:first + 1]):
                for block in stage:
                    h = run(index, block, h)
                    if taps_all:
                        pooled.append(global_pool(h))
            if taps_all:
                pooled.pop()  # the first chosen stage's own tap is rebuilt from the leaf below
        # 2. From the first chosen stage on: a graph rooted at a fresh leaf, not at the parameters' users.
        with torch.enable_grad():
            leaf = h.detach().requires_grad_(True)
            acts = {first: leaf}
            h = leaf
            if taps_all:
                pooled.append(global_pool(h))
            with mixed():
                for index in range(first + 1, len(stages)):
                    for block in stages[index]:
                        h = run(index, block, h)
                        if taps_all:
                            pooled.append(global_pool(h))
                    acts[index] = h
            if not taps_all:
                pooled = [global_pool(h)]
            # fp32, as in the Scorer; "default" is exactly model.head(pooled)
            scores = profile_score(model.head.outputs(pooled), model.cfg, profile)
            # Each image's score depends only on its own activations (eval mode), so the gradient
            # of the sum gives every image its own gradient. A deeper chosen stage is part of the
            # graph above a shallower one, so each stage's gradient includes every path through it.
            grads = torch.autograd.grad(scores.sum(), [acts[i] for i in chosen], allow_unused=True)
        with torch.no_grad():
            cams = {}
            for index, grad in zip(chosen, grads):
                act = acts[index].detach()
                if grad is None:  # cannot happen for ResMem-Net, but a map of zeros is the honest answer
                    grad = torch.zeros_like(act)
                weights = grad.float().mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
                cams[STAGES[index]] = (weights * act.float()).sum(dim=1)  # (B, h, w)
        return cams, scores.detach().float()


def stage_stride(name: str) -> int:
    """Input pixels per feature cell of a ResNet stage: 4, 8, 16, 32."""
    return 4 * 2 ** STAGES.index(name)


def _interp_matrix(n_out: int, n_in: int, n_cells: int, stride: int, device) -> torch.Tensor:
    """(n_out, n_cells) bilinear weights taking one feature axis to n_out output pixels.

    ResNet's padded stride-2 convolutions and pooling centre feature cell p on input pixel
    stride * p (not stride * p + stride/2 - 1/2, which a plain align_corners=False upsample
    assumes: that would shift the map half a cell, 16 px at layer4, to the bottom right).
    The output image spans the same scene as the n_in network-input pixels (the preprocessing
    resizes the whole image), so output pixel y sits at input coordinate (y + 1/2) n_in/n_out - 1/2.
    """
    y = torch.arange(n_out, device=device, dtype=torch.float64)
    cell = (((y + 0.5) * (n_in / n_out) - 0.5) / stride).clamp(0, n_cells - 1)
    lo = cell.floor().long().clamp(max=n_cells - 1)
    hi = (lo + 1).clamp(max=n_cells - 1)
    frac = (cell - lo).float()
    weights = torch.zeros(n_out, n_cells, device=device)
    rows = torch.arange(n_out, device=device)
    weights.index_put_((rows, lo), 1.0 - frac, accumulate=True)
    weights.index_put_((rows, hi), frac, accumulate=True)
    return weights


def _unit_map(cam: torch.Tensor, stride: int, in_size: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) raw map -> ReLU, bilinear resample to size (H, W), peak scaled to 1 (or all zero)."""
    positive = cam.clamp(min=0)
    peak = positive.amax(dim=(1, 2))
    magnitude = cam.abs().amax(dim=(1, 2))
    empty = ~(peak > RELATIVE_EMPTY * magnitude) | ~torch.isfinite(magnitude)
    rows = _interp_matrix(size[0], in_size[0], cam.shape[1], stride, cam.device)
    cols = _interp_matrix(size[1], in_size[1], cam.shape[2], stride, cam.device)
    up = rows @ positive @ cols.T  # separable bilinear: (H, h) @ (B, h, w) @ (w, W); weights >= 0
    return _scale_to_peak(up.clamp_(min=0), empty)


def _scale_to_peak(maps: torch.Tensor, empty: torch.Tensor | None = None) -> torch.Tensor:
    peak = maps.amax(dim=(1, 2))
    empty = ~(peak > 0) if empty is None else empty | ~(peak > 0)
    scaled = maps / torch.where(empty, torch.ones_like(peak), peak)[:, None, None]
    scaled[empty] = 0.0
    return scaled.clamp_(0.0, 1.0)


def _flat_inputs(images: torch.Tensor) -> torch.Tensor:
    """(B,) True where an image has no spatial variation in any channel."""
    spread = images.amax(dim=(2, 3)) - images.amin(dim=(2, 3))  # (B, 3)
    return spread.amax(dim=1) <= FLAT_INPUT_RANGE


def grad_ram_maps(model, images: torch.Tensor, *, layers=("layer4",), size: tuple[int, int] | None = None,
                  autocast_dtype: torch.dtype | None = None, profile: str = "default"):
    """Like grad_ram, but the maps are upsampled to `size` (H, W) instead of the input size.

    The network input covers the whole image, so the same feature map serves any output size.
    """
    layers = parse_layers(layers)
    size = tuple(images.shape[-2:]) if size is None else (int(size[0]), int(size[1]))
    cams, scores = stage_cams(model, images, layers, autocast_dtype=autocast_dtype, profile=profile)
    with torch.no_grad():
        in_size = tuple(images.shape[-2:])
        maps = torch.stack([_unit_map(cams[name], stage_stride(name), in_size, size) for name in layers]).mean(dim=0)
        if len(layers) > 1:
            maps = _scale_to_peak(maps)  # the average of peak-1 maps need not peak at 1
        flat = _flat_inputs(images.to(maps.device))
        maps[flat] = 0.0
    return maps.float().cpu(), scores.cpu()


def grad_ram(model, images: torch.Tensor, *, layers=("layer4",), autocast_dtype: torch.dtype | None = None,
             profile: str = "default") -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-RAM heatmaps for a batch.

    images: (B, 3, H, W) in [0, 1], any H, W >= 32. layers: stage names "layer1".."layer4" (the
    output of that stage's last block), a comma list, or "all"; several stages give the average
    of their normalised maps. profile: whose score the maps explain (model.network.PROFILES).
    Returns (maps (B, H, W) float32 in [0, 1], scores (B,) float32 of that profile), both on the
    CPU. A map is all zeros where no region raises the score (or the image is flat).
    """
    return grad_ram_maps(model, images, layers=layers, autocast_dtype=autocast_dtype, profile=profile)


def heatmap_for_image(model, preprocessing, img, *, layer: str = "layer4", device=None,
                      autocast_dtype: torch.dtype | None = None, profile: str = "default") -> HeatmapResult:
    """Grad-RAM for one decoded (upright RGB) PIL image, mapped back to its original width x height.

    `layer` is a stage name, a comma list or "all". `device` must be None or the model's device
    (the shared model is never moved). Pass a Scorer's `autocast_dtype` to get its exact score.
    `profile`: the score profile the map explains and `score` is of.
    """
    if device is not None:
        wanted, actual = torch.device(device), _model_device(model)
        if wanted.type != actual.type or wanted.index not in (None, actual.index):
            raise ValueError(f"the model is on {actual}, not {wanted}; move it (or pass device=None)")
    return heatmap_for_tensor(model, preprocessing.image_to_tensor(img), (img.width, img.height), layer=layer,
                              autocast_dtype=autocast_dtype, profile=profile)


def heatmap_for_tensor(model, tensor: torch.Tensor, image_size: tuple[int, int], *, layer="layer4",
                       autocast_dtype: torch.dtype | None = None, profile: str = "default") -> HeatmapResult:
    """Grad-RAM for one preprocessed image, (3, H, W) in [0, 1], mapped to image_size (width,
    height): the photo the tensor was made from. As heatmap_for_image, without the preprocessing."""
    layers = parse_layers(layer)
    width, height = image_size
    maps, scores = grad_ram_maps(model, tensor[None], layers=layers, size=(height, width),
                                 autocast_dtype=autocast_dtype, profile=profile)
    return HeatmapResult(
        score=float(scores[0]),
        heatmap=maps[0].numpy(),
        layers=layers,
        input_size=(int(tensor.shape[2]), int(tensor.shape[1])),
        profile=profile,
    )
