"""A run's data: the image pool (labelled + teacher), per-run targets and weights, the
feature cache and the threaded image loader."""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from .common import TrainError
from .config import Config, ConfigError
from .data import (DatasetError, ScoredImages, default_split_file, indices_for, load_dataset,
                   load_or_create_splits, load_teacher, map_teacher_scores, read_splits, write_splits)
from .distributed import SINGLE, Dist, barrier
from .model_setup import trunk_identity


@dataclass
class Pool:
    """Every image a run can touch: the labelled set, then the teacher's photos."""

    labelled: ScoredImages
    teacher: ScoredImages | None
    plan: dict
    features: "FeatureTable | None" = None

    @property
    def paths(self) -> list[str]:
        return self.labelled.paths + (self.teacher.paths if self.teacher is not None else [])

    @property
    def n_labelled(self) -> int:
        return len(self.labelled)

    def labelled_idx(self, keys) -> np.ndarray:
        idx, missing = indices_for(keys, self.labelled)
        if missing:
            raise DatasetError(f"{missing} images of the split file are not in {self.labelled.name} now; "
                               "use the split file made for this data")
        return idx

    def teacher_split(self) -> tuple[np.ndarray, np.ndarray]:
        """(train, holdout) pool indices of the teacher images."""
        if self.teacher is None:
            return np.zeros(0, int), np.zeros(0, int)
        hold, _ = indices_for(self.plan.get("teacher", {}).get("holdout", []), self.teacher)
        mask = np.ones(len(self.teacher), bool)
        mask[hold] = False
        return np.flatnonzero(mask) + self.n_labelled, np.sort(hold) + self.n_labelled


@dataclass
class RunSpec:
    """One training run (a fold, or the final model) over pool indices."""

    name: str
    dir: Path
    train_idx: np.ndarray
    targets: np.ndarray  # per pool image (float32)
    weights: np.ndarray  # per pool image: 1 labelled, teacher.weight teacher, 0 unused
    val_idx: np.ndarray
    test_idx: np.ndarray
    holdout_idx: np.ndarray

    def counts(self, pool: Pool) -> dict:
        n = pool.n_labelled
        return {"train_labelled": int((self.train_idx < n).sum()), "train_teacher": int((self.train_idx >= n).sum()),
                "val": len(self.val_idx), "test": len(self.test_idx), "teacher_holdout": len(self.holdout_idx)}


def make_run_spec(cfg: Config, pool: Pool, name: str, run_dir: Path, train_keys, val_keys, test_keys) -> RunSpec:
    lab_train = pool.labelled_idx(train_keys)
    if len(lab_train) < 2:
        raise TrainError(f"{name}: only {len(lab_train)} labelled training images")
    n_pool = len(pool.paths)
    targets = np.zeros(n_pool, np.float32)
    weights = np.zeros(n_pool, np.float32)
    targets[:pool.n_labelled] = pool.labelled.scores
    weights[lab_train] = 1.0
    train = [lab_train]
    t_train, t_hold = pool.teacher_split()
    if pool.teacher is not None and len(t_train) and cfg.data.teacher.weight > 0:
        raw = pool.teacher.scores[t_train - pool.n_labelled]
        # mapped onto this run's labelled training scores only: the test fold never leaks in
        targets[t_train] = map_teacher_scores(raw, pool.labelled.scores[lab_train], cfg.data.teacher.mapping)
        weights[t_train] = cfg.data.teacher.weight
        train.append(t_train)
    return RunSpec(name, run_dir, np.concatenate(train), targets, weights, pool.labelled_idx(val_keys),
                   pool.labelled_idx(test_keys), t_hold)


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


class ImageLoader:
    """Decodes and preprocesses pool images in threads; batches group images of one input shape
    (the shorter-side policy gives a few shapes), so no batch needs padding."""

    def __init__(self, paths: list[str], preprocessing, workers: int = 2):
        self.paths = paths
        self.preprocessing = preprocessing
        self.workers = max(1, workers)
        self._shapes: dict[int, tuple] = {}

    def shape(self, i: int) -> tuple:
        if self.preprocessing.resize.mode == "square":
            return (self.preprocessing.resize.size,) * 2
        if i not in self._shapes:
            from PIL import Image

            try:
                with Image.open(self.paths[i]) as im:
                    w, h = im.size
                    if im.getexif().get(274, 1) in (5, 6, 7, 8):  # EXIF rotation by 90 degrees
                        w, h = h, w
            except Exception as exc:
                raise DatasetError(f"cannot read image {self.paths[i]} ({type(exc).__name__}: {exc})") from None
            self._shapes[i] = self.preprocessing.resize.output_size(w, h)
        return self._shapes[i]

    def batches(self, idx, batch_size: int, rng: np.random.Generator | None = None) -> list[np.ndarray]:
        """Batches of pool indices in `idx` order, one shape per batch; shuffled when rng is given.
        A training batch of one image is dropped (BatchNorm needs two)."""
        groups: dict[tuple, list[int]] = {}
        for i in idx:
            groups.setdefault(self.shape(int(i)), []).append(int(i))
        out = []
        for members in groups.values():
            for lo in range(0, len(members), batch_size):
                out.append(np.asarray(members[lo:lo + batch_size]))
        if rng is not None:
            out = [b for b in out if len(b) > 1]
            out = [out[i] for i in rng.permutation(len(out))]
        return out

    def load(self, i: int, aug: str = "none"):
        from ..preprocess import decode_image
        from .features import apply_augmentation

        return apply_augmentation(self.preprocessing.image_to_tensor(decode_image(self.paths[i])), aug)

    def iterate(self, batches, augs=None, *, pin: bool = False, prefetch: int = 3):
        """Yield (images (B,3,H,W), batch indices), decoding the next batches in the background."""
        import torch

        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            pending = []

            def submit(b):
                names = [augs[int(i)] if augs is not None else "none" for i in b]
                return b, [pool.submit(self.load, int(i), a) for i, a in zip(b, names)]

            it = iter(batches)
            for b in it:
                pending.append(submit(b))
                if len(pending) >= prefetch:
                    break
            while pending:
                b, futures = pending.pop(0)
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(submit(nxt))
                x = torch.stack([f.result() for f in futures])
                yield (x.pin_memory() if pin else x), b


def train_batches(idx: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Cached rows in order, chunked; a last batch of one joins the one before (BatchNorm needs two)."""
    out = [idx[lo:lo + batch_size] for lo in range(0, len(idx), batch_size)]
    if len(out) > 1 and len(out[-1]) == 1:
        out[-2] = np.concatenate([out[-2], out.pop()])
    return out


def load_data(cfg: Config) -> tuple[ScoredImages, ScoredImages | None]:
    labelled = load_dataset(cfg.data.labelled, cache_dir=cfg.data.cache_dir)
    if len(labelled) < 4:
        raise TrainError(f"{labelled.name}: only {len(labelled)} images; training needs at least 4")
    lo, hi = float(labelled.scores.min()), float(labelled.scores.max())
    if lo < 0 or hi > 1:
        raise DatasetError(f"{labelled.name}: scores range over [{lo:.3g}, {hi:.3g}]; the network predicts [0, 1], "
                           "so rescale them")
    teacher = load_teacher(cfg.data.teacher) if cfg.data.teacher.enabled else None
    return labelled, teacher


def prepare_pool(cfg: Config, run_dir: Path, labelled: ScoredImages, teacher: ScoredImages | None, *, resume: bool,
                 log=print) -> Pool:
    """The run's images and its split plan (the run folder's copy when resuming)."""
    copy = run_dir / "splits.json"
    if resume and copy.is_file():
        plan = read_splits(copy)
    else:
        params = {"folds": cfg.cv.folds, "seed": cfg.train.seed, "val_fraction": cfg.data.val_fraction,
                  "holdout_fraction": cfg.data.teacher.holdout_fraction}
        path = Path(cfg.data.split_file) if cfg.data.split_file else default_split_file(
            cfg.output.runs_dir, labelled, teacher, params)
        plan = load_or_create_splits(path, labelled, teacher, use_official=cfg.cv.use_official_splits, **params)
        plan = {**plan, "source": str(path)}
        write_splits(plan, copy)
    log(f"data: {len(labelled)} labelled images ({labelled.name}, {labelled.skipped} skipped)"
        + (f", {len(teacher)} teacher images ({teacher.skipped} skipped)" if teacher is not None else ""))
    return Pool(labelled, teacher, plan)


def attach_features(cfg: Config, pool: Pool, model, source, preprocessing, device, log=print, *,
                    dist: Dist = SINGLE) -> None:
    """Build or load the frozen trunk's feature cache, when a cached phase or a readout head needs it.
    Under torchrun the extraction is split over the ranks (`sharded_cached_features`)."""
    import hashlib

    from .features import cache_key, cached_features, tap_set_id

    if not (cfg.model.head == "readout" or any(ph.cached and ph.epochs > 0 for ph in cfg.phases)):
        return
    trunk_id = cfg.data.cache_trunk_id or trunk_identity(source, cfg)
    parts, part_augs = [], []
    for name, paths, explicit in (("labelled", pool.labelled.paths, cfg.data.labelled_cache),
                                  ("teacher", pool.teacher.paths if pool.teacher is not None else [],
                                   cfg.data.teacher_cache)):
        if not paths:
            continue
        augs = cfg.data.teacher_augmentations if name == "teacher" and cfg.data.teacher_augmentations \
            else cfg.data.augmentations
        key = cache_key(trunk_id, preprocessing, paths, augs, tap_set_id(model.cfg))
        if explicit:
            file = Path(explicit)
            check_explicit_cache(file, key, f"data.{name}_cache")
        else:
            digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
            label = pool.labelled.name if name == "labelled" else "teacher"
            file = Path(cfg.data.cache_dir) / f"{label}-{source.depth}-{digest}.npy"
        start = time.perf_counter()
        build = partial(sharded_cached_features, dist=dist) if dist.enabled else cached_features
        feats = build(file, model, preprocessing, paths, trunk_id=trunk_id, augmentations=augs,
                      batch_size=cfg.train.eval_batch_size, workers=cfg.data.workers, device=device)
        log(f"features: {name} {feats.shape} from {file} ({time.perf_counter() - start:.1f} s)")
        parts.append(feats)
        part_augs.append(list(augs))
    pool.features = FeatureTable(parts, cfg.data.augmentations, part_augs)


def sharded_cached_features(file: Path, model, preprocessing, paths: list[str], *, trunk_id: str, augmentations,
                            dist: Dist, **kwargs) -> np.ndarray:
    """features.cached_features with the extraction split over the ranks: rank r extracts images
    r, r + N, r + 2N, ... into a part cache of its own (kept until merged, so an interrupted job
    resumes), rank 0 interleaves the parts into the cache file, and every rank loads it."""
    from .features import cache_key, cached_features, tap_set_id

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

