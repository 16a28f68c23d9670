"""Pooled tap features of a frozen trunk, computed once per image and augmentation, and the
table that indexes a run's caches as one.

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
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..network import ResMemNet
from ..preprocess import Preprocessing, decode_image
from .config import ConfigError
from .distributed import SINGLE, Dist, barrier

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


class FeatureTable:
    """Cached (N_i, A, D) float16 feature arrays of several image lists, indexed as one."""

    def __init__(self, parts: list[np.ndarray], augmentations: list[str], part_augmentations=None):
        """augmentations: the names aug_idx counts in; part_augmentations: each part's own (a
        subset; default all of them), e.g. teacher photos cached unmirrored."""
        self.parts = parts
        self.augmentations = list(augmentations)
        self.part_augmentations = [list(a) for a in (part_augmentations or [augmentations] * len(parts))]
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        # per part: global augmentation index -> the part's own index (-1: not cached there)
        self._local = [np.array([names.index(a) if a in names else -1 for a in self.augmentations])
                       for names in self.part_augmentations]

    def augmentations_of(self, idx) -> list[str]:
        """The augmentations cached for every image in idx."""
        parts = np.unique(np.searchsorted(self.offsets, np.asarray(idx, dtype=int), side="right") - 1)
        return [a for a in self.augmentations if all(a in self.part_augmentations[p] for p in parts)]

    def rows(self, idx, aug_idx) -> np.ndarray:
        idx = np.asarray(idx, dtype=int)
        aug_idx = np.broadcast_to(np.asarray(aug_idx, dtype=int), idx.shape)
        out = np.empty((len(idx), self.parts[0].shape[2]), dtype=np.float32)
        part = np.searchsorted(self.offsets, idx, side="right") - 1
        for p in np.unique(part):
            sel = part == p
            local = self._local[p][aug_idx[sel]]
            if (local < 0).any():
                raise ValueError(f"feature part {p} has no cached rows for augmentations "
                                 f"{[self.augmentations[a] for a in np.unique(aug_idx[sel])]} "
                                 f"(it holds {self.part_augmentations[p]})")
            out[sel] = self.parts[p][idx[sel] - self.offsets[p], local]
        return out


@dataclass
class CachePart:
    """One image list of a run's feature table: its label (a study's name, or "teacher"), paths,
    augmentations and an explicit cache file ("" = found or named in the cache folder)."""

    label: str
    paths: list[str]
    augmentations: list[str]
    explicit: str = ""
    where: str = ""  # the config key of `explicit`, for errors


def find_cache(folder: Path, key: dict) -> Path | None:
    """A cache in `folder` whose sidecar holds exactly `key`, whatever its file name (caches built
    by another tool or under another label are reused, never rewritten)."""
    if not folder.is_dir():
        return None
    for sidecar in sorted(folder.glob("*.json")):
        npy = sidecar.with_suffix(".npy")
        if npy.is_file() and _cache_matches(npy, key):
            return npy
    return None


def attach_features(parts: list[CachePart], *, model, source_depth: str, trunk_id: str, preprocessing,
                    augmentations: list[str], cache_dir: str, batch_size: int, workers: int, device,
                    log=print, dist: Dist = SINGLE) -> FeatureTable:
    """Load (or build) the frozen trunk's pooled features of every part into one FeatureTable.
    A part's cache is its explicit file (checked, never overwritten), else the cache in `cache_dir`
    made for exactly these inputs (found by its sidecar), else one built there as
    <label>-<depth>-<digest>.npy. Under torchrun the extraction is split over the ranks."""
    tables, part_augs = [], []
    for part in parts:
        key = cache_key(trunk_id, preprocessing, part.paths, part.augmentations, tap_set_id(model.cfg))
        if part.explicit:
            file = Path(part.explicit)
            check_explicit_cache(file, key, part.where)
        else:
            digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
            file = Path(cache_dir) / f"{part.label}-{source_depth}-{digest}.npy"
            if not _cache_matches(file, key):
                file = find_cache(Path(cache_dir), key) or file
        start = time.perf_counter()
        build = partial(sharded_cached_features, dist=dist) if dist.enabled else cached_features
        feats = build(file, model, preprocessing, part.paths, trunk_id=trunk_id, augmentations=part.augmentations,
                      batch_size=batch_size, workers=workers, device=device)
        log(f"features: {part.label} {feats.shape} from {file} ({time.perf_counter() - start:.1f} s)")
        tables.append(feats)
        part_augs.append(list(part.augmentations))
    return FeatureTable(tables, augmentations, part_augs)


def sharded_cached_features(file: Path, model, preprocessing, paths: list[str], *, trunk_id: str, augmentations,
                            dist: Dist, **kwargs) -> np.ndarray:
    """features.cached_features with the extraction split over the ranks: rank r extracts images
    r, r + N, r + 2N, ... into a part cache of its own (kept until merged, so an interrupted job
    resumes), rank 0 interleaves the parts into the cache file, and every rank loads it."""
    file = Path(file)
    key = cache_key(trunk_id, preprocessing, paths, augmentations, tap_set_id(model.cfg))
    if not _cache_matches(file, key):
        def part(r):
            return file.with_name(f"{file.stem}.part{r}of{dist.world}.npy")

        mine = [paths[i] for i in range(dist.rank, len(paths), dist.world)]
        cached_features(part(dist.rank), model, preprocessing, mine, trunk_id=trunk_id,
                        augmentations=augmentations, **kwargs)
        barrier(dist)
        if dist.is_main:
            shards = [np.load(part(r), mmap_mode="r") for r in range(dist.world)]
            full = np.empty((len(paths),) + shards[0].shape[1:], dtype=shards[0].dtype)
            for r, shard in enumerate(shards):
                full[r::dist.world] = shard
            tmp = file.with_suffix(".tmp.npy")
            np.save(tmp, full)  # the layout features.cached_features reads back
            tmp.replace(file)
            file.with_suffix(".json").write_text(json.dumps(key, indent=1))
            del shards
            for r in range(dist.world):
                part(r).unlink(missing_ok=True)
                part(r).with_suffix(".json").unlink(missing_ok=True)
        barrier(dist)
    return cached_features(file, model, preprocessing, paths, trunk_id=trunk_id, augmentations=augmentations,
                           **kwargs)


def _cache_matches(file: Path, key: dict) -> bool:
    sidecar = file.with_suffix(".json")
    try:
        return file.is_file() and json.loads(sidecar.read_text()) == key
    except (OSError, json.JSONDecodeError):
        return False


def check_explicit_cache(file: Path, key: dict, where: str) -> None:
    """A named cache made for other images, trunk or preprocessing is an error, not overwritten."""
    sidecar = file.with_suffix(".json")
    if not file.is_file() or not sidecar.is_file():
        return  # built and written there
    try:
        made = json.loads(sidecar.read_text())
    except json.JSONDecodeError:
        raise ConfigError(f"{where}: {sidecar} is not valid JSON") from None
    differing = [k for k in key if made.get(k) != key[k]]
    if differing:
        detail = "; ".join(f"{k}: cache {made.get(k)!r}, run {key[k]!r}" for k in differing if k != "images_sha256")
        if "images_sha256" in differing:
            detail += ("; " if detail else "") + "other image paths (order or location)"
        raise ConfigError(f"{where}: {file} was made for other inputs ({detail}); "
                          "fix the config (e.g. data.cache_trunk_id) or point it at another file")

