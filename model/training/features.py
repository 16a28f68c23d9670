"""Pooled tap features of a frozen trunk, computed once per image and augmentation.

While the trunk is frozen its pooled tap vectors never change, so phase 1 trains the head on a
cache instead of running the trunk every epoch. A cache is one float16 .npy array
(N images, A augmentations, D = sum of tap channels) plus a JSON sidecar naming the images, the
trunk, the preprocessing and the augmentations; a cache whose sidecar does not match is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..network import ResMemNet
from ..preprocess import Preprocessing, decode_image

AUGMENTATIONS = ("none", "hflip")


def apply_augmentation(tensor: torch.Tensor, name: str) -> torch.Tensor:
    if name == "none":
        return tensor
    if name == "hflip":
        return torch.flip(tensor, dims=[-1])
    raise ValueError(f"unknown augmentation {name!r}; choose from {AUGMENTATIONS}")


def tap_set_id(cfg) -> str:
    """What a cache row holds, for its sidecar: the trunk taps and any memory branch."""
    return cfg.taps if getattr(cfg, "branch", "none") == "none" else f"{cfg.taps}+{cfg.branch}-branch"


def cache_key(trunk_id: str, preprocessing: Preprocessing, paths: Sequence[str], augmentations: Sequence[str],
              taps: str) -> dict:
    listing = hashlib.sha256("\n".join(map(str, paths)).encode()).hexdigest()
    return {"trunk": trunk_id, "preprocessing": preprocessing.to_dict(), "images_sha256": listing,
            "n_images": len(paths), "augmentations": list(augmentations), "taps": taps}


@torch.inference_mode()
def extract_pooled(model: ResMemNet, preprocessing: Preprocessing, paths: Sequence[str], *,
                   augmentations: Sequence[str] = ("none",), batch_size: int = 16, workers: int = 2,
                   device: str | torch.device = "cpu", log_every: int = 200) -> np.ndarray:
    """(N, A, D) float16 pooled tap features; images that fail to decode raise (datasets pre-check)."""
    model = model.eval().to(device).to(memory_format=torch.channels_last)
    dim = sum(model.cfg.tap_channels)
    out = np.zeros((len(paths), len(augmentations), dim), dtype=np.float16)
    load = lambda p: preprocessing.image_to_tensor(decode_image(p))  # noqa: E731
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        chunk = batch_size * 4
        for lo in range(0, len(paths), chunk):
            tensors = list(pool.map(load, paths[lo:lo + chunk]))
            by_shape: dict[tuple, list[int]] = {}
            for i, t in enumerate(tensors):
                by_shape.setdefault(tuple(t.shape), []).append(i)
            for idxs in by_shape.values():
                for b in range(0, len(idxs), batch_size):
                    sel = idxs[b:b + batch_size]
                    for a, aug in enumerate(augmentations):
                        x = torch.stack([apply_augmentation(tensors[i], aug) for i in sel]).to(device)
                        pooled = model.forward_features(x.contiguous(memory_format=torch.channels_last))
                        flat = torch.cat([p.float() for p in pooled], dim=1).cpu().numpy()
                        out[[lo + i for i in sel], a] = flat.astype(np.float16)
            done = min(lo + chunk, len(paths))
            if log_every and (done // log_every != (done - len(tensors)) // log_every or done == len(paths)):
                rate = done / max(time.perf_counter() - start, 1e-9)
                print(f"  features: {done}/{len(paths)} images ({rate:.1f} img/s)", file=sys.stderr, flush=True)
    return out


def cached_features(cache_file: str | Path, model: ResMemNet, preprocessing: Preprocessing, paths: Sequence[str], *,
                    trunk_id: str, augmentations: Sequence[str] = ("none",), **kwargs) -> np.ndarray:
    """Load the cache if its sidecar matches, else compute and write it."""
    cache_file = Path(cache_file)
    sidecar = cache_file.with_suffix(".json")
    key = cache_key(trunk_id, preprocessing, paths, augmentations, tap_set_id(model.cfg))
    if cache_file.is_file() and sidecar.is_file():
        try:
            if json.loads(sidecar.read_text()) == key:
                return np.load(cache_file, mmap_mode="r")
        except (json.JSONDecodeError, ValueError, OSError):
            pass
    feats = extract_pooled(model, preprocessing, paths, augmentations=augmentations, **kwargs)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(".tmp.npy")
    np.save(tmp, feats)
    tmp.replace(cache_file)
    sidecar.write_text(json.dumps(key, indent=1))
    return feats
