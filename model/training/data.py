"""Datasets in their published layouts. Each loader returns a ScoredImages: paths, scores and,
where the dataset has them, official splits and human split-half scores."""
from __future__ import annotations

import csv
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class ScoredImages:
    name: str
    paths: list[str]
    scores: np.ndarray  # float64, one per path
    # LNSIM: (R, N) hit rates of the two participant halves for R random splits.
    halves: tuple[np.ndarray, np.ndarray] | None = None
    splits: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # official splits, by index
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, idx) -> "ScoredImages":
        idx = np.asarray(idx, dtype=int)
        halves = (self.halves[0][:, idx], self.halves[1][:, idx]) if self.halves is not None else None
        return ScoredImages(self.name, [self.paths[i] for i in idx], self.scores[idx], halves)


def load_lnsim(root: str | Path, *, verbose: bool = True) -> ScoredImages:
    """LNSIM: Image_data/NNNN.jpg + Random_splits/subject_hrs{1,2}.mat (25 x 2632 each).

    Score of image k = mean over the 25 rows of the mean of both halves. Images listed in the
    score files but absent on disk are skipped and counted.
    """
    from scipy.io import loadmat

    root = Path(root)
    hrs = []
    for i in (1, 2):
        mat_path = root / "Random_splits" / f"subject_hrs{i}.mat"
        if not mat_path.is_file():
            raise FileNotFoundError(f"LNSIM split file missing: {mat_path}")
        hrs.append(np.asarray(loadmat(str(mat_path))[f"subject_hrs{i}"], dtype=np.float64))
    h1, h2 = hrs
    if h1.shape != h2.shape:
        raise ValueError(f"LNSIM halves differ in shape: {h1.shape} vs {h2.shape}")
    keep, paths = [], []
    for k in range(h1.shape[1]):
        p = root / "Image_data" / f"{k + 1:04d}.jpg"
        if p.is_file():
            keep.append(k)
            paths.append(str(p))
    skipped = h1.shape[1] - len(keep)
    if verbose and skipped:
        print(f"LNSIM: {len(keep)} images found, {skipped} listed but absent on disk (skipped)", file=sys.stderr)
    h1, h2 = h1[:, keep], h2[:, keep]
    scores = ((h1 + h2) / 2).mean(axis=0)
    return ScoredImages("lnsim", paths, scores, halves=(h1, h2), skipped=skipped)


def load_csv_dataset(csv_path: str | Path, *, image_root: str | Path | None = None, path_column: str | None = None,
                     score_column: str | None = None, name: str | None = None, verbose: bool = True) -> ScoredImages:
    """Any folder with a CSV of `path,score` (column names auto-detected: path/name/file, score/...).

    Rows whose image is absent are skipped and counted.
    """
    csv_path = Path(csv_path)
    root = Path(image_root) if image_root else csv_path.parent
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        pcol = path_column or next((c for c in cols if c.lower() in ("path", "name", "file", "filename", "image")), None)
        scol = score_column or next((c for c in cols if c != pcol and "score" in c.lower()), None)
        if pcol is None or scol is None:
            raise ValueError(f"{csv_path}: cannot find path and score columns in {cols}")
        paths, scores, skipped = [], [], 0
        for row in reader:
            p = Path(row[pcol])
            p = p if p.is_absolute() else root / p
            if not p.is_file():
                skipped += 1
                continue
            paths.append(str(p))
            scores.append(float(row[scol]))
    if verbose and skipped:
        print(f"{csv_path.name}: {skipped} rows skipped (image absent)", file=sys.stderr)
    return ScoredImages(name or csv_path.stem, paths, np.asarray(scores, dtype=np.float64), skipped=skipped)
