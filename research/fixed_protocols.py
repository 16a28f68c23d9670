"""Score a fixed model by a CV run's protocols, so it can stand in the same table as the run's
candidate: a shipped checkpoint (from the run's feature cache, no trunk pass) and any other
model's per-photo scores (e.g. the `resmem` package's, from `research.validate --out DIR`).

    python -m research.fixed_protocols --cv CV_RUN [--weights W] [--scores LABEL=CSV[:COLUMN] ...]
                                       [--json FILE]

For every model and profile it reports, on the CV run's own split plan (RUN/splits.json):
  - per study: the rho on each of that study's CV test folds, their mean and sd, and the rho on
    the whole study (what leave-one-study-out measures for a model that never saw the study);
  - teacher agreement: the rho with the teacher's scores on the run's held-out teacher photos.
A model that was trained on a study (a checkpoint's metadata says so) scores its own training
photos there: those rows are marked "trained on" and are no CV numbers.

The checkpoint's readout is applied to the cached pooled taps (float16, the `none` augmentation)
of the run's photos, so its tap set must be the start of the cache's (e.g. a checkpoint of the
trunk's 50 taps on a cache of those plus the memory branch's 8). --scores CSVs need a path column
(relative to the study's folder, as `research.validate` writes them) and the score COLUMN
(default: the last column); a LABEL given twice (one CSV per study) is one model. Exit status 0, or 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np


def _fold_keys(plan: dict, study: str) -> list[list[str]]:
    return [f["test"] for f in plan["studies"][study]["folds"]]


def _trained_studies(meta_training: dict) -> set[str]:
    """The labelled studies a checkpoint was fitted to: `data.studies` names, or the one labelled set's kind."""
    data = meta_training.get("data", {})
    if isinstance(data, str):  # older metadata stored the data table as text
        return {"lnsim"} if "'kind': 'lnsim'" in data else set()
    if "studies" in data:
        return {s.get("name") or s.get("kind") for s in data["studies"]}
    labelled = data.get("labelled") or {}
    return {labelled["kind"]} if labelled.get("kind") else set()


class CachedRows:
    """The run's cached feature arrays, one per part (None where no cache was found: never built here)."""

    def __init__(self, parts: list, offsets: list[int]):
        self.parts, self.offsets = parts, np.asarray(offsets)

    @property
    def width(self) -> int:
        return next(p.shape[2] for p in self.parts if p is not None)

    def rows(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(float32 rows of the `none` augmentation, mask of the photos that have one)."""
        out = np.zeros((len(idx), self.width), dtype=np.float32)
        have = np.zeros(len(idx), bool)
        part = np.searchsorted(self.offsets, idx, side="right") - 1
        for k in np.unique(part):
            if self.parts[k] is None:
                continue
            sel = part == k
            out[sel] = self.parts[k][idx[sel] - self.offsets[k], 0]
            have[sel] = True
        return out, have


def load_run(cfg, run: Path):
    """The CV run's photos and split plan (RUN/splits.json) and its feature caches as found in
    data.cache_dir (a missing cache is reported and its photos left unscored, never built)."""
    from model.training.context import cache_parts
    from model.training.features import cache_key, find_cache, tap_set_id
    from model.training.model_setup import build_model, preprocessing_for, trunk_identity
    from model.training.pool import load_data, prepare_pool

    studies, teacher = load_data(cfg)
    pool = prepare_pool(cfg, run, studies, teacher, resume=True, log=lambda m: print(m, file=sys.stderr))
    model, source = build_model(cfg)
    preprocessing = preprocessing_for(cfg, model)
    trunk_id = cfg.data.cache_trunk_id or trunk_identity(source, cfg)
    arrays, offsets, start = [], [], 0
    for part in cache_parts(cfg, pool):
        key = cache_key(trunk_id, preprocessing, part.paths, part.augmentations, tap_set_id(model.cfg))
        file = Path(part.explicit) if part.explicit else find_cache(Path(cfg.data.cache_dir), key)
        if file is None or not file.is_file() or part.augmentations[0] != "none":
            print(f"{part.label}: no feature cache in {cfg.data.cache_dir}: its photos stay unscored", file=sys.stderr)
            arrays.append(None)
        else:
            arrays.append(np.load(file, mmap_mode="r"))
        offsets.append(start)
        start += len(part.paths)
    if all(a is None for a in arrays):
        raise SystemExit(f"error: no feature cache of {run} found in {cfg.data.cache_dir} (run the CV first)")
    pool.features = CachedRows(arrays, offsets)
    return pool


def report(scores: np.ndarray, pool, trained: set[str]) -> dict:
    """scores: per pool photo (NaN where unscored) -> per study and teacher holdout rhos."""
    from model.training.metrics import mean_std, spearman

    truth = pool.truth
    out = {}
    for s in pool.studies:
        folds = []
        for keys in _fold_keys(pool.plan, s.name):
            idx = pool.idx_of(s.name, keys)
            ok = idx[~np.isnan(scores[idx])]
            folds.append(spearman(scores[ok], truth[ok]) if len(ok) > 2 else float("nan"))
        ok = s.idx[~np.isnan(scores[s.idx])]
        mean, sd = mean_std(folds)
        out[s.name] = {"folds": [round(f, 4) for f in folds], "cv_mean": round(mean, 4), "cv_sd": round(sd, 4),
                       "whole": round(spearman(scores[ok], truth[ok]), 4) if len(ok) > 2 else None,
                       "n": int(len(ok)), "trained_on": s.name in trained}
    _, hold = pool.teacher_split()
    ok = hold[~np.isnan(scores[hold])]
    out["teacher_holdout"] = {"n": int(len(ok)),
                              "spearman": round(spearman(scores[ok], truth[ok]), 4) if len(ok) > 2 else None}
    return out


def checkpoint_scores(weights: str, pool) -> tuple[dict[str, np.ndarray], set[str]]:
    """Every profile's score of every pool photo, from the cached taps; and the studies it trained on."""
    import torch

    from model.checkpoint import load_checkpoint
    from model.network import available_profiles, profile_scores

    model, meta = load_checkpoint(weights)
    head = model.head
    cfg = model.cfg
    n_cols = sum(cfg.tap_channels)
    table = pool.features
    if table.width < n_cols:
        raise SystemExit(f"error: the cache has {table.width} tap values, the checkpoint reads {n_cols}")
    names = available_profiles(cfg)
    out = np.full((len(pool.paths), len(names)), np.nan)
    with torch.inference_mode():
        for lo in range(0, len(pool.paths), 256):
            idx = np.arange(lo, min(lo + 256, len(pool.paths)))
            rows, have = table.rows(idx)
            if not have.any():
                continue
            x = torch.from_numpy(np.ascontiguousarray(rows[have, :n_cols]))
            out[idx[have]] = profile_scores(head.outputs(head.split_flat(x)), cfg).double().numpy()
    metadata = json.loads(Path(weights).with_suffix(".json").read_text())
    return {n: out[:, k] for k, n in enumerate(names)}, _trained_studies(metadata.get("training", {}))


def csv_scores(spec: str, pool) -> tuple[str, np.ndarray]:
    """LABEL=CSV[:COLUMN] -> (label, per pool photo score, NaN where the CSV has none)."""
    if "=" not in spec:
        raise SystemExit(f"error: --scores wants LABEL=CSV[:COLUMN], got {spec!r}")
    label, rest = spec.split("=", 1)
    path, _, column = rest.partition(":") if not Path(rest).is_file() else (rest, "", "")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise SystemExit(f"error: {path} has no rows")
    column = column or list(rows[0])[-1]
    by_key = {r["path"]: float(r[column]) for r in rows if r.get(column) not in (None, "")}
    out = np.full(len(pool.paths), np.nan)
    for s in pool.studies:
        for i, key in zip(s.idx, s.data.keys):
            out[i] = by_key.get(key, np.nan)
    return label, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cv", required=True, help="a CV run folder (config.toml, splits.json, its feature cache)")
    ap.add_argument("--weights", action="append", default=[], help="checkpoint(s) (.json) to score from the cache")
    ap.add_argument("--scores", action="append", default=[], help="LABEL=CSV[:COLUMN] per-photo scores of a model")
    ap.add_argument("--json", default=None, help="write the report here too")
    args = ap.parse_args(argv)
    run = Path(args.cv)
    if not (run / "config.toml").is_file() or not (run / "splits.json").is_file():
        print(f"error: {run} is not a CV run folder (config.toml, splits.json)", file=sys.stderr)
        return 2

    from model.training.config import load_config

    pool = load_run(load_config(str(run / "config.toml")), run)
    result = {}
    for w in args.weights:
        profiles, trained = checkpoint_scores(w, pool)
        for name, s in profiles.items():
            result[f"{w}:{name}"] = report(s, pool, trained)
    merged: dict[str, np.ndarray] = {}
    for spec in args.scores:  # a label given twice (one CSV per study) is one model
        label, s = csv_scores(spec, pool)
        merged[label] = np.where(np.isnan(s), merged[label], s) if label in merged else s
    for label, s in merged.items():
        result[label] = report(s, pool, set())
    studies = [s.name for s in pool.studies]
    print(f"{'model':<48} " + " ".join(f"{n + ' CV':>16} {n + ' whole':>11}" for n in studies) + "  agreement")
    for label, r in result.items():
        cols = []
        for n in studies:
            mark = "*" if r[n]["trained_on"] else " "
            cols.append(f"{r[n]['cv_mean']:>9.4f}±{r[n]['cv_sd']:.4f}{mark} {r[n]['whole']!s:>11}")
        print(f"{label[-48:]:<48} " + " ".join(cols) + f"  {r['teacher_holdout']['spearman']}")
    print("* trained on that study: its folds are training photos, not CV numbers", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
