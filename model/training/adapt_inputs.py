"""What `resmemnet adapt` reads: the labelled photos (a CSV of path,score, paths relative to the
CSV, or a folder holding scores.csv), checked before any work so that bad input stops with one
clear message (model.errors.InputError, exit status 2) and nothing is written; their pooled tap
features (cached, the training module's format); and the `resmem` package's scores of them.

Scores are memorability scores in [0, 1] (hit rates, or any score rescaled to that range): the
adapted profile is calibrated onto them, and they are compared by rank (Spearman rho).
"""
from __future__ import annotations

import csv
import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

MIN_PHOTOS = 50  # below this 5-fold CV tests 10 photos a fold: its rho says nothing
MIN_FOLD = 10  # photos in each test fold of the k-fold CV report, at least
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
SHOWN = 3  # offending rows named in a message


class AdaptError(InputError):
    """Labels, a profile name or an output path `resmemnet adapt` cannot use (exit status 2)."""


@dataclass
class Labels:
    csv_path: Path
    paths: list[str]  # absolute, in file order
    scores: np.ndarray  # (N,) float64 in [0, 1]
    sha256: str  # of the CSV file's bytes


def _listed(items: list[str], total: int) -> str:
    more = f" and {total - len(items)} more" if total > len(items) else ""
    return ", ".join(items) + more


def read_labels(source: str | Path, *, min_photos: int = MIN_PHOTOS) -> Labels:
    """The checked labels of `source` (a CSV with `path` and `score` columns, or a folder with
    scores.csv). AdaptError for: no such file, no path/score columns, empty or duplicate paths,
    non-numeric or non-finite scores, scores outside [0, 1], missing images, all scores equal, or
    fewer than `min_photos` photos."""
    source = Path(source)
    csv_path = source / "scores.csv" if source.is_dir() else source
    if not csv_path.is_file():
        where = f"{source} holds no scores.csv" if source.is_dir() else f"{source} does not exist"
        raise AdaptError(f"labels: {where} (give a CSV of path,score or a folder holding scores.csv)")
    data = csv_path.read_bytes()
    try:
        reader = csv.DictReader(data.decode("utf-8-sig").splitlines())
        rows = list(reader)
        columns = {c.strip().lower(): c for c in (reader.fieldnames or []) if c is not None}
    except (UnicodeDecodeError, csv.Error) as exc:
        raise AdaptError(f"labels: {csv_path} is not a UTF-8 CSV ({exc})") from None
    if "path" not in columns or "score" not in columns:
        raise AdaptError(f"labels: {csv_path} needs a header with `path` and `score` columns "
                         f"(has {', '.join(map(repr, columns)) or 'nothing'})")
    root = csv_path.parent
    paths, scores, bad, outside, empty = [], [], [], [], []
    for line, row in enumerate(rows, start=2):
        raw_path = (row.get(columns["path"]) or "").strip()
        raw_score = (row.get(columns["score"]) or "").strip()
        if not raw_path:
            empty.append(f"line {line}")
            continue
        try:
            value = float(raw_score)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            bad.append(f"line {line} ({raw_score[:20]!r})")
        elif not 0.0 <= value <= 1.0:
            outside.append(f"line {line} ({value:g})")
        paths.append(str((root / raw_path).resolve()))
        scores.append(value)
    if empty:
        raise AdaptError(f"labels: {len(empty)} rows of {csv_path} have no path: {_listed(empty[:SHOWN], len(empty))}")
    if bad:
        raise AdaptError(f"labels: {len(bad)} scores in {csv_path} are not finite numbers: "
                         f"{_listed(bad[:SHOWN], len(bad))}")
    if outside:
        raise AdaptError(f"labels: {len(outside)} scores in {csv_path} are outside [0, 1]: "
                         f"{_listed(outside[:SHOWN], len(outside))} (scores are memorability scores such as hit "
                         "rates; rescale others to [0, 1]: only their ranking is compared)")
    seen, dups = set(), []
    for p in paths:
        if p in seen:
            dups.append(p)
        seen.add(p)
    if dups:
        names = [str(Path(p).relative_to(root)) if Path(p).is_relative_to(root) else p for p in dups]
        raise AdaptError(f"labels: {len(dups)} photos of {csv_path} are listed twice: "
                         f"{_listed(names[:SHOWN], len(names))} (each photo needs one score)")
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise AdaptError(f"labels: {len(missing)} photos listed in {csv_path} do not exist (paths are relative to "
                         f"the CSV's folder): {_listed(missing[:SHOWN], len(missing))}")
    if len(paths) < min_photos:
        raise AdaptError(f"labels: {csv_path} has {len(paths)} photos; adapting needs at least {min_photos} "
                         "(5-fold CV on fewer says nothing about the profile)")
    y = np.asarray(scores, dtype=np.float64)
    if np.ptp(y) == 0:
        raise AdaptError(f"labels: every score in {csv_path} is {y[0]:g}: there is no ranking to learn")
    return Labels(csv_path=csv_path, paths=paths, scores=y, sha256=hashlib.sha256(data).hexdigest())


def check_name(name: str, taken: tuple[str, ...]) -> str:
    """`name` if it can name a new profile and output column, else AdaptError."""
    if not NAME_PATTERN.match(name or ""):
        shown = name if len(str(name)) <= 40 else f"{str(name)[:40]}..."
        raise AdaptError(f"--name {shown!r}: a profile name is 1-32 characters of a-z, 0-9, _ and -, starting with "
                         "a letter")
    if name in taken:
        raise AdaptError(f"--name {name!r}: the checkpoint already has a profile or output of that name "
                         f"({', '.join(taken)}); choose another")
    return name


def check_images(scorer, paths: list[str], workers: int = 2) -> None:
    """Decode every photo through the Scorer (the one preprocessing path); AdaptError naming the
    photos that are not usable images, before any feature is computed."""
    from concurrent.futures import ThreadPoolExecutor

    from ..preprocess import ImageDecodeError

    def problem(path):
        try:
            scorer.prepare(path)
        except ImageDecodeError as exc:
            return f"{path} ({exc.reason}: {exc.message})"
        return None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        bad = [p for p in pool.map(problem, paths) if p is not None]
    if bad:
        raise AdaptError(f"labels: {len(bad)} photos are not usable images: {_listed(bad[:SHOWN], len(bad))}")


def trunk_id(meta) -> str:
    """What a feature cache's sidecar names as the trunk: the training module's identity of a
    package or file trunk, else the checkpoint's tensors (an embedded trunk)."""
    t = meta.trunk
    if meta.trunk_embedded or t.kind == "none":
        return f"embedded:{meta.tensors_sha256}"
    return f"{t.kind}:{t.depth}:{t.sha256 or t.url or t.path}"


def photo_features(scorer, paths: list[str], cache_dir: Path, *, batch_size: int = 16, workers: int = 2,
                   log=print) -> np.ndarray:
    """(N, 2, D) float16 pooled taps of every photo and its mirror image, in fp32 (the training
    module's features.cached_features: a second run with the same photos and trunk loads them)."""
    import json
    import time

    from .features import cache_key, cached_features, find_cache, tap_set_id

    key = cache_key(trunk_id(scorer.meta), scorer.preprocessing, paths, ["none", "hflip"], tap_set_id(scorer.config))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    file = find_cache(Path(cache_dir), key) or Path(cache_dir) / f"adapt-{digest}.npy"
    start = time.perf_counter()
    feats = cached_features(file, scorer.model, scorer.preprocessing, paths, trunk_id=key["trunk"],
                            augmentations=["none", "hflip"], batch_size=batch_size, workers=workers,
                            log_every=100)
    log(f"features: {len(paths)} photos x 2 (mirrored) from {file} ({time.perf_counter() - start:.1f} s)")
    return feats


def resmem_scores(paths: list[str], cache_dir: Path, *, batch_size: int = 16, log=print) -> np.ndarray | None:
    """The `resmem` package's scores of `paths` (its own model and preprocessing), cached beside
    the features; None when the package is not installed."""
    import json
    import time
    import warnings

    try:
        import resmem
    except ImportError:
        return None
    listing = hashlib.sha256("\n".join(paths).encode()).hexdigest()
    file = Path(cache_dir) / f"resmem-{getattr(resmem, '__version__', 'x')}-{listing[:12]}.json"
    if file.is_file():
        try:
            return np.asarray(json.loads(file.read_text())["scores"], dtype=np.float64)
        except (OSError, ValueError, KeyError):
            pass
    import torch
    from PIL import Image

    from ..trunks import resmem_source, resolve_weight_file

    resolve_weight_file(resmem_source(), allow_download=False)  # the package's weight file, hash-checked first
    start = time.perf_counter()
    with warnings.catch_warnings():  # the package builds its ResNet through torchvision's deprecated argument
        warnings.filterwarnings("ignore", category=UserWarning)
        model = resmem.ResMem(pretrained=True).eval()
    out = []
    with torch.inference_mode():
        for lo in range(0, len(paths), batch_size):
            batch = []
            for p in paths[lo:lo + batch_size]:
                with Image.open(p) as img:
                    batch.append(resmem.transformer(img.convert("RGB")))
            out += model(torch.stack(batch)).view(-1).double().tolist()
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps({"paths_sha256": listing, "scores": out}))
    log(f"resmem: {len(paths)} photos scored by the resmem package ({time.perf_counter() - start:.1f} s)")
    return np.asarray(out, dtype=np.float64)
