"""The split plan: every study's folds (train / val / test keys), its final run's train / val, and
the teacher's fixed holdout, in one JSON file that every run of a config reuses.

Keys are a study's image paths relative to its root (data.ScoredImages.keys), so a fold always
holds the same photos. A study with official splits (LaMem, Isola) uses them as its folds when
`cv.use_official_splits`; the others get seeded random folds. The file records, per study, the
sha256 of its key list, and the parameters it was made with; reusing a file made for other
photos or settings is an error, never a silent mismatch. Files of the single-study format
(resmemnet-splits/1) are read as a plan for their one study.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from .data import DatasetError, ScoredImages, _log

SPLITS_FORMAT = "resmemnet-splits/2"
SPLITS_FORMAT_V1 = "resmemnet-splits/1"


def _seeded_rng(seed: int, *tags) -> np.random.Generator:
    words = [seed] + [int(hashlib.sha256(str(t).encode()).hexdigest()[:8], 16) for t in tags]
    return np.random.default_rng(words)


def kfold_test_sets(keys: list[str], folds: int, seed: int) -> list[list[str]]:
    """Random partition of keys into `folds` test sets of near-equal size."""
    if folds > len(keys):
        raise DatasetError(f"cannot make {folds} folds from {len(keys)} images")
    order = _seeded_rng(seed, "kfold").permutation(len(keys))
    return [sorted(keys[i] for i in order[f::folds]) for f in range(folds)]


def carve(keys: list[str], fraction: float, seed: int, tag: str) -> tuple[list[str], list[str]]:
    """(kept, carved): a seeded `fraction` of keys set aside (at least one when fraction > 0)."""
    if fraction <= 0 or not keys:
        return sorted(keys), []
    n = min(len(keys) - 1, max(1, int(round(fraction * len(keys)))))
    order = _seeded_rng(seed, tag).permutation(len(keys))
    out = {keys[i] for i in order[:n]}
    return sorted(k for k in keys if k not in out), sorted(out)


def keys_digest(keys) -> str:
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()


def study_plan(data: ScoredImages, *, folds: int, seed: int, val_fraction: float, use_official: bool = True) -> dict:
    """One study's folds (official or seeded k-fold) and its final run's train / val keys. The
    seeds' tags are the same for every study (their photos differ), as in single-study plans."""
    keys = data.keys
    plan = {"n": len(keys), "sha256": keys_digest(keys), "official": False, "folds": []}
    if use_official and data.splits:
        plan["official"] = True
        for name in list(data.splits)[:folds]:
            parts = data.splits[name]
            train = [keys[i] for i in parts.get("train", [])]
            test = [keys[i] for i in parts.get("test", [])]
            if "val" in parts:
                val = [keys[i] for i in parts["val"]]
            else:
                train, val = carve(train, val_fraction, seed, f"val-{name}")
            plan["folds"].append({"name": name, "train": sorted(train), "val": sorted(val), "test": sorted(test)})
    else:
        for f, test in enumerate(kfold_test_sets(keys, folds, seed)):
            held = set(test)
            train, val = carve([k for k in keys if k not in held], val_fraction, seed, f"val-fold{f + 1}")
            plan["folds"].append({"name": f"fold_{f + 1}", "train": train, "val": val, "test": test})
    train, val = carve(list(keys), val_fraction, seed, "val-final")
    plan["final"] = {"train": train, "val": val}
    return plan


def build_splits(studies: dict[str, ScoredImages], teacher: ScoredImages | None, *, folds: dict[str, int],
                 seed: int, val_fraction: float, holdout_fraction: float, use_official: bool = True) -> dict:
    """The plan of every study (name -> its images; folds: name -> k) and the teacher holdout."""
    plan = {"format": SPLITS_FORMAT,
            "params": {"folds": dict(folds), "seed": seed, "val_fraction": val_fraction,
                       "holdout_fraction": holdout_fraction, "use_official": use_official},
            "studies": {name: study_plan(data, folds=folds[name], seed=seed, val_fraction=val_fraction,
                                         use_official=use_official) for name, data in studies.items()}}
    if teacher is not None:
        tkeys = teacher.keys
        _, t_hold = carve(tkeys, holdout_fraction, seed, "teacher-holdout")
        plan["teacher"] = {"n": len(tkeys), "sha256": keys_digest(tkeys), "holdout": t_hold}
    return plan


def default_split_file(runs_dir: str | Path, studies: dict[str, ScoredImages], teacher: ScoredImages | None,
                       params: dict) -> Path:
    """<runs_dir>/splits/<studies>-k<folds>-seed<seed>-val<f>-hold<f>-<hash of every key>.json."""
    keys = [k for data in studies.values() for k in data.keys]
    tag = keys_digest(keys + (["--teacher--"] + teacher.keys if teacher is not None else []))[:10]
    p = params
    ks = sorted(set(p["folds"].values()))
    name = (f"{'+'.join(studies)}-k{'-'.join(map(str, ks))}-seed{p['seed']}-val{p['val_fraction']:g}"
            f"-hold{p['holdout_fraction']:g}-{tag}.json")
    return Path(runs_dir) / "splits" / name


def load_or_create_splits(path: str | Path, studies: dict[str, ScoredImages], teacher: ScoredImages | None, *,
                          folds: dict[str, int], seed: int, val_fraction: float, holdout_fraction: float,
                          use_official: bool = True, verbose: bool = True) -> dict:
    """Reuse the split file at `path` if it exists (checked against the data and parameters),
    else build and write it."""
    path = Path(path)
    if path.is_file():
        plan = read_splits(path, study_names=list(studies))
        made = plan.get("params", {})
        wanted = {"seed": seed, "val_fraction": val_fraction, "holdout_fraction": holdout_fraction}
        differing = {k: (made.get(k), v) for k, v in wanted.items() if made.get(k) != v
                     and not (k == "holdout_fraction" and teacher is None)}
        for name in studies:
            have = made.get("folds", {}).get(name)
            if have is not None and have != folds[name] and not plan["studies"].get(name, {}).get("official"):
                differing[f"folds of {name}"] = (have, folds[name])
        if differing:
            raise DatasetError(f"split file {path} was made with other settings "
                               f"({', '.join(f'{k}: file {a}, now {b}' for k, (a, b) in differing.items())}); "
                               "point data.split_file elsewhere or delete it")
        for name, data in studies.items():
            made_for = plan["studies"].get(name)
            if made_for is None:
                raise DatasetError(f"split file {path} has no plan for study {name!r} (it has "
                                   f"{', '.join(plan['studies'])}); point data.split_file elsewhere")
            if made_for.get("sha256") != keys_digest(data.keys):
                raise DatasetError(f"split file {path} lists other photos for {name} than it has now "
                                   f"({made_for.get('n')} vs {len(data)}); point data.split_file elsewhere")
        if teacher is not None and plan.get("teacher", {}).get("sha256") != keys_digest(teacher.keys):
            raise DatasetError(f"split file {path} was made for another teacher image set; "
                               "point data.split_file elsewhere")
        _log(verbose, f"splits: reusing {path}")
        return plan
    plan = build_splits(studies, teacher, folds=folds, seed=seed, val_fraction=val_fraction,
                        holdout_fraction=holdout_fraction, use_official=use_official)
    write_splits(plan, path)
    _log(verbose, f"splits: wrote {path}")
    return plan


def write_splits(plan: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(plan, indent=1) + "\n")
    tmp.replace(path)


def read_splits(path: str | Path, *, study_names: list[str] | None = None) -> dict:
    """A split file as a plan of the current format. A single-study file (resmemnet-splits/1) is
    the plan of the one study in `study_names` (or of its dataset's name)."""
    path = Path(path)
    try:
        plan = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"split file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"split file {path} is not valid JSON ({exc})") from None
    if isinstance(plan, dict) and plan.get("format") == SPLITS_FORMAT_V1 and isinstance(plan.get("folds"), list):
        return _from_v1(plan, study_names)
    if not isinstance(plan, dict) or plan.get("format") != SPLITS_FORMAT or not isinstance(plan.get("studies"), dict):
        raise DatasetError(f"{path} is not a split file ({SPLITS_FORMAT})")
    return plan


def _from_v1(plan: dict, study_names: list[str] | None) -> dict:
    name = study_names[0] if study_names and len(study_names) == 1 else plan.get("dataset", "labelled")
    p = plan.get("params", {})
    study = {"n": plan.get("n_labelled"), "sha256": plan.get("labelled_sha256"), "official": p.get("official", False),
             "folds": plan["folds"], "final": plan.get("final", {"train": [], "val": []})}
    out = {"format": SPLITS_FORMAT, "params": {**p, "folds": {name: p.get("folds")}}, "studies": {name: study}}
    if "teacher" in plan:
        out["teacher"] = plan["teacher"]
    return out


def study_plan_for(plan: dict, data: ScoredImages) -> tuple[str, dict]:
    """(name, plan) of the study in `plan` whose photos are `data`'s (`resmemnet evaluate --splits`)."""
    digest = keys_digest(data.keys)
    for name, study in plan["studies"].items():
        if study.get("sha256") == digest:
            return name, study
    if data.name in plan["studies"]:
        return data.name, plan["studies"][data.name]
    if len(plan["studies"]) == 1:
        return next(iter(plan["studies"].items()))
    raise DatasetError(f"the split file has no study with these {len(data)} photos "
                       f"(it has {', '.join(plan['studies'])})")


def indices_for(keys_wanted, data: ScoredImages) -> tuple[np.ndarray, int]:
    """Indices into `data` of the wanted keys, and how many of them are absent from `data`."""
    index = {k: i for i, k in enumerate(data.keys)}
    idx = [index[k] for k in keys_wanted if k in index]
    return np.asarray(idx, dtype=int), len(keys_wanted) - len(idx)
