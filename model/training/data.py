"""Datasets in their published layouts, teacher scores and the mapping of scores onto a common
scale (the split plan over them: splits.py).

Each loader returns a ScoredImages: paths, scores and, where the dataset has them, official
splits and human split-half scores. Images listed by a dataset but absent on disk are skipped
and counted. Images are identified across runs by their `key` (path relative to the dataset
root), which is what the split file (splits.py) stores, so a fold always holds the same images.

Layouts:
- LNSIM (Lu et al. 2020) and Isola et al. (2011): `Image_data/NNNN.jpg` (Isola: or the image
  array `target_images.mat`, extracted once to PNG files), `Random_splits/subject_hrs{1,2}.mat`
  (R x N hit rates of the two participant halves); Isola also `image_train_indices.mat` /
  `image_test_indices.mat` (R x N/2, 1-based) as official splits. "Image data" and
  "Random splits" (with spaces, as in Isola's release) are accepted too.
- LaMem (Khosla et al. 2015): `images/`, `splits/{train,val,test}_N.txt`, lines `name score`.
- CSV: any folder with a CSV of path,score.
"""
from __future__ import annotations

import csv
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class DatasetError(ValueError):
    """A dataset that is missing or not in the layout it claims; the message says what is wrong."""


@dataclass
class ScoredImages:
    name: str
    paths: list[str]
    scores: np.ndarray  # float64, one per path
    # LNSIM / Isola: (R, N) hit rates of the two participant halves for R random splits.
    halves: tuple[np.ndarray, np.ndarray] | None = None
    splits: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # official splits, by index
    skipped: int = 0
    root: str = ""  # keys are paths relative to this folder

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def keys(self) -> list[str]:
        """Stable image identifiers (relative paths, '/'-separated) for split files."""
        if not self.root:
            return [Path(p).name for p in self.paths]
        out = []
        for p in self.paths:
            try:
                out.append(Path(os.path.relpath(p, self.root)).as_posix())
            except ValueError:  # another drive on Windows
                out.append(Path(p).name)
        return out

    def subset(self, idx) -> "ScoredImages":
        idx = np.asarray(idx, dtype=int)
        halves = (self.halves[0][:, idx], self.halves[1][:, idx]) if self.halves is not None else None
        return ScoredImages(self.name, [self.paths[i] for i in idx], self.scores[idx], halves, root=self.root)


def _log(verbose: bool, message: str) -> None:
    if verbose:
        print(message, file=sys.stderr)


# -- LNSIM and Isola (same layout) ---------------------------------------------------------------

def _first_existing(root: Path, names) -> Path | None:
    for name in names:
        if (root / name).exists():
            return root / name
    return None


def _mat_array(path: Path, preferred: str | None = None) -> np.ndarray:
    """The named array of a MATLAB file, or its only array."""
    from scipy.io import loadmat

    try:
        mat = loadmat(str(path))
    except Exception as exc:  # scipy raises several kinds for a broken file
        raise DatasetError(f"{path} is not a readable MATLAB file ({type(exc).__name__}: {exc})") from None
    if preferred and preferred in mat:
        return np.asarray(mat[preferred])
    arrays = {k: v for k, v in mat.items() if not k.startswith("__")}
    if len(arrays) != 1:
        raise DatasetError(f"{path}: expected one array{f' named {preferred!r}' if preferred else ''}, "
                           f"found {sorted(arrays)}")
    return np.asarray(next(iter(arrays.values())))


def _read_halves(root: Path, name: str) -> tuple[Path, np.ndarray, np.ndarray]:
    splits_dir = _first_existing(root, ("Random_splits", "Random splits"))
    if splits_dir is None:
        raise DatasetError(f"{name}: {root} has no Random_splits/ folder (is this the dataset root?)")
    hrs = []
    for i in (1, 2):
        mat_path = splits_dir / f"subject_hrs{i}.mat"
        if not mat_path.is_file():
            raise DatasetError(f"{name} split file missing: {mat_path}")
        hrs.append(np.asarray(_mat_array(mat_path, f"subject_hrs{i}"), dtype=np.float64))
    h1, h2 = hrs
    if h1.shape != h2.shape or h1.ndim != 2:
        raise DatasetError(f"{name}: subject_hrs1/2 must be two R x N arrays, got {h1.shape} and {h2.shape}")
    return splits_dir, h1, h2


def _halves_dataset(name: str, root: Path, paths_by_index: list[Path | None], h1, h2, verbose: bool) -> ScoredImages:
    keep = [k for k, p in enumerate(paths_by_index) if p is not None and p.is_file()]
    skipped = h1.shape[1] - len(keep)
    if not keep:
        raise DatasetError(f"{name}: none of the {h1.shape[1]} listed images is on disk under {root}")
    _log(verbose and skipped > 0, f"{name}: {len(keep)} images found, {skipped} listed but absent on disk (skipped)")
    h1, h2 = h1[:, keep], h2[:, keep]
    scores = ((h1 + h2) / 2).mean(axis=0)  # mean of both halves, averaged over the random splits
    data = ScoredImages(name, [str(paths_by_index[k]) for k in keep], scores, halves=(h1, h2), skipped=skipped,
                        root=str(root))
    data._listed_index = np.asarray(keep)  # position in the published list, for official splits
    return data


def _numbered_images(image_dir: Path, n: int) -> list[Path | None]:
    """Image k (0-based) is NNNN.jpg (k+1, zero-padded to 4 digits), or .png/.jpeg."""
    out = []
    for k in range(n):
        found = None
        for ext in (".jpg", ".png", ".jpeg", ".JPG"):
            p = image_dir / f"{k + 1:04d}{ext}"
            if p.is_file():
                found = p
                break
        out.append(found)
    return out


def load_lnsim(root: str | Path, *, verbose: bool = True) -> ScoredImages:
    """LNSIM: Image_data/NNNN.jpg + Random_splits/subject_hrs{1,2}.mat (25 x 2632 each).

    Score of image k = mean over the 25 rows of the mean of both halves. Images listed in the
    score files but absent on disk are skipped and counted.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"LNSIM folder not found: {root}")
    _, h1, h2 = _read_halves(root, "LNSIM")
    image_dir = _first_existing(root, ("Image_data", "Image data"))
    if image_dir is None:
        raise DatasetError(f"LNSIM: {root} has no Image_data/ folder")
    return _halves_dataset("lnsim", root, _numbered_images(image_dir, h1.shape[1]), h1, h2, verbose)


def extract_mat_images(mat_path: Path, out_dir: Path, *, verbose: bool = True) -> list[Path]:
    """Write the images of an (H, W, 3, N) or (N, H, W, 3) uint8 array to out_dir/NNNN.png, once."""
    from PIL import Image

    out_dir = Path(out_dir)
    marker = out_dir / ".complete"
    stamp = f"{mat_path.stat().st_size}:{int(mat_path.stat().st_mtime)}"
    if marker.is_file() and marker.read_text() == stamp:
        return sorted(out_dir.glob("*.png"))
    arr = _mat_array(mat_path, "img")
    if arr.ndim != 4 or 3 not in (arr.shape[2], arr.shape[3]):
        raise DatasetError(f"{mat_path}: expected an H x W x 3 x N image array, got shape {arr.shape}")
    images = np.moveaxis(arr, 3, 0) if arr.shape[2] == 3 else arr
    if images.dtype != np.uint8:
        images = np.clip(images * (255.0 if images.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    out_dir.mkdir(parents=True, exist_ok=True)
    _log(verbose, f"extracting {len(images)} images from {mat_path.name} to {out_dir}")
    paths = []
    for k, img in enumerate(images):
        p = out_dir / f"{k + 1:04d}.png"
        Image.fromarray(np.ascontiguousarray(img), "RGB").save(p)
        paths.append(p)
    marker.write_text(stamp)
    return paths


def load_isola(root: str | Path, *, extract_dir: str | Path | None = None, verbose: bool = True) -> ScoredImages:
    """Isola et al. (2011): LNSIM's layout, the images either as files or as target_images.mat,
    with official train/test splits from image_{train,test}_indices.mat when present."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"Isola dataset folder not found: {root}")
    splits_dir, h1, h2 = _read_halves(root, "Isola")
    n = h1.shape[1]
    image_dir = _first_existing(root, ("Image_data", "Image data"))
    if image_dir is None:
        raise DatasetError(f"Isola: {root} has no Image_data/ folder")
    paths = _numbered_images(image_dir, n)
    mat = image_dir / "target_images.mat"
    key_root = root
    if not any(paths) and mat.is_file():
        out = Path(extract_dir) if extract_dir else image_dir / "extracted"
        extract_mat_images(mat, out, verbose=verbose)
        paths = _numbered_images(out, n)
        key_root = out
    data = _halves_dataset("isola", key_root, paths, h1, h2, verbose)
    train_mat = splits_dir / "image_train_indices.mat"
    test_mat = splits_dir / "image_test_indices.mat"
    if train_mat.is_file() and test_mat.is_file():
        position = {int(k): i for i, k in enumerate(data._listed_index)}  # listed index -> our index
        train = np.atleast_2d(_mat_array(train_mat)).astype(int)
        test = np.atleast_2d(_mat_array(test_mat)).astype(int)
        for r in range(min(len(train), len(test))):
            data.splits[f"split_{r + 1}"] = {
                "train": [position[i - 1] for i in train[r] if i - 1 in position],
                "test": [position[i - 1] for i in test[r] if i - 1 in position],
            }
    return data


# -- LaMem -----------------------------------------------------------------------------------

_LAMEM_SPLIT = re.compile(r"^(train|val|test)_(\d+)\.txt$")


def load_lamem(root: str | Path, *, verbose: bool = True) -> ScoredImages:
    """LaMem: images/ + splits/{train,val,test}_N.txt with lines `00012345.jpg 0.7568`.

    An image's score is the mean of its scores over the split files (they agree in the release).
    """
    root = Path(root)
    split_dir, image_dir = root / "splits", root / "images"
    if not split_dir.is_dir():
        raise DatasetError(f"LaMem: {split_dir} not found (expected splits/train_N.txt, val_N.txt, test_N.txt)")
    if not image_dir.is_dir():
        raise DatasetError(f"LaMem: {image_dir} not found")
    listed: dict[str, list[float]] = {}
    membership: dict[str, dict[str, list[str]]] = {}
    files = sorted(p for p in split_dir.iterdir() if _LAMEM_SPLIT.match(p.name))
    if not files:
        raise DatasetError(f"LaMem: no train_N/val_N/test_N .txt files in {split_dir}")
    for f in files:
        part, num = _LAMEM_SPLIT.match(f.name).groups()
        names = []
        for lineno, line in enumerate(f.read_text().splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            try:
                name, score = fields[0], float(fields[1])
            except (IndexError, ValueError):
                raise DatasetError(f"{f}:{lineno}: expected 'name score', got {line!r}") from None
            listed.setdefault(name, []).append(score)
            names.append(name)
        membership.setdefault(f"split_{int(num)}", {})[part] = names
    names = sorted(listed)
    present = [n for n in names if (image_dir / n).is_file()]
    skipped = len(names) - len(present)
    if not present:
        raise DatasetError(f"LaMem: none of the {len(names)} listed images is in {image_dir}")
    _log(verbose and skipped > 0, f"LaMem: {len(present)} images found, {skipped} listed but absent (skipped)")
    index = {n: i for i, n in enumerate(present)}
    data = ScoredImages("lamem", [str(image_dir / n) for n in present],
                        np.asarray([np.mean(listed[n]) for n in present], dtype=np.float64),
                        skipped=skipped, root=str(root))
    for split in sorted(membership, key=lambda s: int(s.split("_")[1])):
        data.splits[split] = {part: [index[n] for n in lst if n in index] for part, lst in membership[split].items()}
    return data


# -- CSV -------------------------------------------------------------------------------------

def load_csv_dataset(csv_path: str | Path, *, image_root: str | Path | None = None, path_column: str | None = None,
                     score_column: str | None = None, name: str | None = None, verbose: bool = True) -> ScoredImages:
    """Any folder with a CSV of `path,score` (column names auto-detected: path/name/file, score/...).

    Rows whose image is absent are skipped and counted.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DatasetError(f"CSV file not found: {csv_path}")
    root = Path(image_root) if image_root else csv_path.parent
    if not root.is_dir():
        raise DatasetError(f"image folder not found: {root}")
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        pcol = path_column or next((c for c in cols if c.lower() in ("path", "name", "file", "filename", "image")), None)
        scol = score_column or next((c for c in cols if c != pcol and "score" in c.lower()), None)
        if pcol is None or scol is None or pcol not in cols or scol not in cols:
            raise DatasetError(f"{csv_path}: cannot find path and score columns in {cols}")
        paths, scores, skipped = [], [], 0
        for lineno, row in enumerate(reader, 2):
            p = Path(row[pcol])
            p = p if p.is_absolute() else root / p
            if not p.is_file():
                skipped += 1
                continue
            try:
                scores.append(float(row[scol]))
            except (TypeError, ValueError):
                raise DatasetError(f"{csv_path}:{lineno}: score {row[scol]!r} is not a number") from None
            paths.append(str(p))
    if not paths:
        raise DatasetError(f"{csv_path}: no listed image exists under {root}")
    _log(verbose and skipped > 0, f"{csv_path.name}: {skipped} rows skipped (image absent)")
    return ScoredImages(name or csv_path.stem, paths, np.asarray(scores, dtype=np.float64), skipped=skipped,
                        root=str(root))


def load_dataset(spec, *, cache_dir: str | Path | None = None, verbose: bool = True) -> ScoredImages:
    """A DatasetSpec (config.py) -> ScoredImages, `limit` applied."""
    kind = spec.kind
    # absolute paths: the feature cache is keyed by the image paths, whatever folder we run in
    root = os.path.abspath(spec.root) if spec.root else None
    if kind == "lnsim":
        data = load_lnsim(root, verbose=verbose)
    elif kind == "lamem":
        data = load_lamem(root, verbose=verbose)
    elif kind == "isola":
        extract = Path(os.path.abspath(cache_dir)) / "isola_images" if cache_dir else None
        data = load_isola(root, extract_dir=extract, verbose=verbose)
    elif kind == "csv":
        data = load_csv_dataset(os.path.abspath(spec.csv), image_root=root, path_column=spec.path_column or None,
                                score_column=spec.score_column or None, verbose=verbose)
    else:
        raise DatasetError(f"unknown dataset kind {kind!r}")
    if spec.limit and spec.limit < len(data):
        data = limit_images(data, spec.limit)
    return data


def load_teacher(spec, *, verbose: bool = True) -> ScoredImages:
    """A TeacherSpec -> ScoredImages of raw teacher scores (`csv`, then every `extra` file)."""
    sources = [(spec.csv, spec.image_root)] + [tuple(item.split("=", 1)) for item in spec.extra]
    parts = [load_csv_dataset(os.path.abspath(csv_path), image_root=os.path.abspath(root) if root else None,
                              path_column=spec.path_column or None, score_column=spec.score_column or None,
                              name="teacher", verbose=verbose)
             for csv_path, root in sources]
    data = parts[0]
    if len(parts) > 1:  # keys relative to the folders' common parent stay unique across the files
        root = os.path.commonpath([p.root for p in parts])
        data = ScoredImages("teacher", [x for p in parts for x in p.paths],
                            np.concatenate([p.scores for p in parts]), skipped=sum(p.skipped for p in parts),
                            root=root)
    if spec.limit and spec.limit < len(data):
        data = limit_images(data, spec.limit)
    return data


def limit_images(data: ScoredImages, n: int) -> ScoredImages:
    """The first n images, official splits restricted to them."""
    small = data.subset(np.arange(n))
    small.name, small.skipped = data.name, data.skipped
    small.splits = {s: {part: [i for i in idx if i < n] for part, idx in parts.items()}
                    for s, parts in data.splits.items()}
    return small


# -- scores onto a common scale -------------------------------------------------------------------------

def map_scores(teacher, reference, mapping: str = "quantile") -> np.ndarray:
    """Put scores (a teacher's, or another study's) on the reference scores' scale.

    quantile: the teacher score of rank r (of n) becomes the (r - 0.5)/n quantile of the
    reference scores, so both targets share one distribution and only the teacher's ranking is
    used; zscore: match mean and standard deviation; none: unchanged. Results are clipped to [0, 1].
    """
    from .metrics import rankdata

    t = np.asarray(teacher, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    if mapping == "none" or len(t) == 0:
        out = t.copy()
    elif mapping == "quantile":
        q = (rankdata(t) - 0.5) / len(t)
        out = np.quantile(ref, q)
    elif mapping == "zscore":
        sd = t.std()
        out = (t - t.mean()) / (sd if sd > 0 else 1.0) * ref.std() + ref.mean()
    else:
        raise ValueError(f"unknown teacher mapping {mapping!r}")
    return np.clip(out, 0.0, 1.0)
