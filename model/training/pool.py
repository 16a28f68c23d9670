"""A run's photos: every labelled study, then the teacher's photos, indexed as one pool; and the
runs over it (a study's CV fold, a leave-one-study-out fit, the final model) with their training
rows, common-scale targets and weights.

Pool indices: study 0's photos first, then study 1's, ..., then the teacher's. A photo that is
also in another part (the same file) is one photo: a run never trains on a photo, in any part,
whose file is among its test or teacher-holdout photos. Mirror images are augmentations of a
photo (rows of the same pool index), so they travel with it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .common import TrainError
from .config import Config, StudySpec
from .data import DatasetError, ScoredImages, load_dataset, load_teacher, map_scores
from .splits import default_split_file, indices_for, load_or_create_splits, read_splits, write_splits


@dataclass
class Study:
    spec: StudySpec
    data: ScoredImages
    offset: int  # pool index of its first photo

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def idx(self) -> np.ndarray:
        return np.arange(self.offset, self.offset + len(self.data))


@dataclass
class Pool:
    """Every photo a run can touch: the studies' in order, then the teacher's."""

    studies: list[Study]
    teacher: ScoredImages | None
    plan: dict
    scale: str  # the study whose score distribution is the common scale
    features: "object | None" = None  # features.FeatureTable, when a cache is used
    photo_id: np.ndarray = field(default=None)  # per pool photo: the first pool index with the same file

    def __post_init__(self):
        if self.photo_id is None:
            first: dict[str, int] = {}
            self.photo_id = np.array([first.setdefault(os.path.realpath(p), i) for i, p in enumerate(self.paths)])

    @property
    def paths(self) -> list[str]:
        return [p for s in self.studies for p in s.data.paths] + (self.teacher.paths if self.teacher else [])

    @property
    def n_labelled(self) -> int:
        """Photos of the studies (pool indices below this); the teacher's follow."""
        return sum(len(s.data) for s in self.studies)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.studies]

    def study(self, name: str) -> Study:
        return next(s for s in self.studies if s.name == name)

    def study_of(self, idx) -> np.ndarray:
        """Per pool index: its study's position in `studies`, len(studies) for teacher photos."""
        bounds = np.array([s.offset for s in self.studies[1:]] + [self.n_labelled])
        return np.searchsorted(bounds, np.asarray(idx, dtype=int), side="right")

    @property
    def keys(self) -> list[str]:
        return [k for s in self.studies for k in s.data.keys] + (self.teacher.keys if self.teacher else [])

    @property
    def truth(self) -> np.ndarray:
        """Per pool photo: its study's human score, or the teacher's raw score."""
        parts = [s.data.scores for s in self.studies] + ([self.teacher.scores] if self.teacher else [])
        return np.concatenate(parts).astype(np.float64)

    def idx_of(self, study: str, keys) -> np.ndarray:
        s = self.study(study)
        idx, missing = indices_for(keys, s.data)
        if missing:
            raise DatasetError(f"{missing} photos of the split file are not in study {study} now; "
                               "use the split file made for this data")
        return idx + s.offset

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
    """One training run over pool indices: a fold of a study, a leave-one-study-out fit, or the
    final model."""

    name: str  # e.g. "lnsim/fold_1", "loso/cdm", "final"
    dir: Path
    train_idx: np.ndarray  # every training photo (studies' and teacher's)
    targets: np.ndarray  # per pool photo (float64): its score on the common scale (training photos)
    weights: np.ndarray  # per pool photo: loss weight of a gradient-trained head (0: unused)
    val_idx: np.ndarray
    test_idx: np.ndarray
    holdout_idx: np.ndarray  # teacher photos never trained on (agreement)
    test_study: str = ""  # the study the test photos come from
    trained: tuple[str, ...] = ()  # the studies with training photos in this run
    # per pool photo: what its study's profile is calibrated onto (its target unless the study
    # names a `calibration` mapping); None: the targets
    calibration: np.ndarray | None = None

    def counts(self, pool: Pool) -> dict:
        n = pool.n_labelled
        out = {"train_labelled": int((self.train_idx < n).sum()), "train_teacher": int((self.train_idx >= n).sum()),
               "val": len(self.val_idx), "test": len(self.test_idx), "teacher_holdout": len(self.holdout_idx)}
        if len(pool.studies) > 1:
            which = pool.study_of(self.train_idx)
            out["train_by_study"] = {s.name: int((which == k).sum()) for k, s in enumerate(pool.studies)}
        return out


def make_run_spec(cfg: Config, pool: Pool, name: str, run_dir: Path, train: dict[str, list[str]],
                  val: dict[str, list[str]], test: tuple[str, list[str]] | None) -> RunSpec:
    """A run training on `train` (study -> keys) and the teacher's training photos, tested on
    `test` (study, keys). Every study's scores are mapped onto the scale study's training scores
    of this run (or the first trained study's when it is left out), as the teacher's are."""
    lab = {s: pool.idx_of(s, keys) for s, keys in train.items() if len(keys)}
    test_study, test_keys = test if test is not None else ("", [])
    test_idx = pool.idx_of(test_study, test_keys) if test_study else np.zeros(0, int)
    if sum(len(v) for v in lab.values()) < 2:
        raise TrainError(f"{name}: only {sum(len(v) for v in lab.values())} labelled training photos")
    t_train, t_hold = pool.teacher_split()
    banned = np.concatenate([pool.photo_id[test_idx], pool.photo_id[t_hold]])
    keep = lambda idx: idx[~np.isin(pool.photo_id[idx], banned)]  # noqa: E731  (no test photo, in any part)
    lab = {s: keep(v) for s, v in lab.items()}
    truth = pool.truth
    reference_study = pool.scale if pool.scale in lab else next(iter(lab))
    reference = truth[lab[reference_study]]
    targets = np.zeros(len(pool.paths), np.float64)
    weights = np.zeros(len(pool.paths), np.float32)
    for s, idx in lab.items():  # each study's training photos only: ranks never see a test photo
        mapping = "none" if s == reference_study else cfg.data.study(s).mapping
        targets[idx] = map_scores(truth[idx], reference, mapping) if mapping != "none" else truth[idx]
        weights[idx] = 1.0
    calibration = None
    for s, idx in lab.items():  # e.g. an output fitted on raw hit rates, its profile on the common scale
        cal = cfg.data.study(s).calibration
        if cal and s != reference_study:
            calibration = targets.copy() if calibration is None else calibration
            calibration[idx] = map_scores(truth[idx], reference, cal)
    parts = list(lab.values())
    t_train = keep(t_train)
    if pool.teacher is not None and len(t_train) and cfg.data.teacher.weight > 0:
        # mapped onto this run's reference training scores only: the test photos never leak in
        targets[t_train] = map_scores(truth[t_train], reference, cfg.data.teacher.mapping)
        weights[t_train] = cfg.data.teacher.weight
        parts.append(t_train)
    val_idx = np.concatenate([pool.idx_of(s, keys) for s, keys in val.items()] or [np.zeros(0, int)])
    return RunSpec(name, run_dir, np.concatenate(parts), targets, weights, val_idx.astype(int), test_idx,
                   t_hold, test_study, tuple(lab), calibration)


def load_data(cfg: Config) -> tuple[dict[str, ScoredImages], ScoredImages | None]:
    """Every study's photos and scores (by name, in config order) and the teacher's."""
    studies = {}
    for spec in cfg.data.studies:
        data = load_dataset(spec, cache_dir=cfg.data.cache_dir)
        data.name = spec.name
        if len(data) < 4:
            raise TrainError(f"{spec.name}: only {len(data)} images; training needs at least 4")
        lo, hi = float(data.scores.min()), float(data.scores.max())
        if lo < 0 or hi > 1:
            raise DatasetError(f"{spec.name}: scores range over [{lo:.3g}, {hi:.3g}]; the network predicts [0, 1], "
                               "so rescale them")
        studies[spec.name] = data
    teacher = load_teacher(cfg.data.teacher) if cfg.data.teacher.enabled else None
    return studies, teacher


def prepare_pool(cfg: Config, run_dir: Path, studies: dict[str, ScoredImages], teacher: ScoredImages | None, *,
                 resume: bool, log=print) -> Pool:
    """The run's photos and its split plan (the run folder's copy when resuming)."""
    copy = run_dir / "splits.json"
    if resume and copy.is_file():
        plan = read_splits(copy, study_names=list(studies))
    else:
        params = {"folds": {s.name: s.folds or cfg.cv.folds for s in cfg.data.studies}, "seed": cfg.train.seed,
                  "val_fraction": cfg.data.val_fraction, "holdout_fraction": cfg.data.teacher.holdout_fraction}
        path = Path(cfg.data.split_file) if cfg.data.split_file else default_split_file(
            cfg.output.runs_dir, studies, teacher, params)
        plan = load_or_create_splits(path, studies, teacher, use_official=cfg.cv.use_official_splits, **params)
        plan = {**plan, "source": str(path)}
        write_splits(plan, copy)
    described = ", ".join(f"{len(d)} {name} ({d.skipped} skipped)" for name, d in studies.items())
    log(f"data: {described}" + (f", {len(teacher)} teacher images ({teacher.skipped} skipped)"
                                if teacher is not None else ""))
    offsets = np.cumsum([0] + [len(d) for d in studies.values()])
    parts = [Study(cfg.data.study(name), data, int(off)) for (name, data), off in zip(studies.items(), offsets)]
    return Pool(parts, teacher, plan, cfg.data.scale_study)
