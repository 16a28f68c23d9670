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
from typing import Iterable

import torch

from .heatmaps import (FLAT_INPUT_RANGE, RELATIVE_EMPTY, STAGES, HeatmapResult, combine,  # noqa: F401  (re-exported)
                       parse_layers, stage_stride)
from .network import global_pool, profile_score, run_block_fp32


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
            if getattr(model, "branch", None) is not None:  # its taps read the last pooled one (the ImageNet logits)
                pooled = pooled + model.branch(x, pooled[-1])
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


def grad_ram_maps(model, images: torch.Tensor, *, layers=("layer4",), size: tuple[int, int] | None = None,
                  autocast_dtype: torch.dtype | None = None, profile: str = "default"):
    """Like grad_ram, but the maps are upsampled to `size` (H, W) instead of the input size.

    The network input covers the whole image, so the same feature map serves any output size.
    """
    layers = parse_layers(layers)
    size = tuple(images.shape[-2:]) if size is None else (int(size[0]), int(size[1]))
    cams, scores = stage_cams(model, images, layers, autocast_dtype=autocast_dtype, profile=profile)
    raw = {name: cam.detach().float().cpu().numpy() for name, cam in cams.items()}
    maps = combine(raw, layers, images.detach().float().cpu().numpy(), size)
    return torch.from_numpy(maps), scores.cpu()


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
