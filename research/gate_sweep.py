"""Re-score a `resmemnet train --cv` run for other profile settings, from its saved head outputs
(no refit): every study's blend with the teacher output, the default profile's gate (sigmoid
centre and width, or softmax temperature) and what `general` is.

    python -m research.gate_sweep --cv RUN_DIR [--blends 0.5,0.7] [--gates sigmoid,softmax,none]
                                  [--centres 0.2,0.5] [--widths 0.1,0.3] [--temperatures 0.05,0.1]
                                  [--generals teacher,shared] [--general-blends 0.5] [--out DIR]

RUN_DIR's runs (<study>/fold_k/ and loso/<study>/) each hold head_outputs.csv: every output of the
run's test, training and teacher-holdout photos, with each training photo's common-scale target.
For each setting the profiles are refitted from a run's training rows exactly as training fits
them (model/training/profile_fit.py: calibration per study, then the gate), and scored on its
test and teacher-holdout photos. The run's own setting is always one of the rows.

Columns of OUT/gate_sweep.csv: the setting, then per study the within-study CV rho of the default
profile and of the study's own profile (mean over folds), the leave-one-study-out rho of the
default profile, and the mean teacher agreement of the default profile over the within-study
folds. Prints the rows best first by --sort (a column name; default: the mean of the
leave-one-study-out columns, else the first study's within-study column), keeping those whose
columns meet every --floor COLUMN=VALUE.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import sys
from pathlib import Path

import numpy as np


def read_head_outputs(path: Path) -> dict:
    """head_outputs.csv -> {"image", "study", "set" (arrays of str), "truth", "target" (float, NaN
    where empty), "outputs" (n, k), "names" (the output names)}."""
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        cols = [c for c in reader.fieldnames if c.startswith("output_")]
        rows = list(reader)
    num = lambda v: float(v) if v != "" else np.nan  # noqa: E731
    return {"image": np.array([r["image"] for r in rows]), "study": np.array([r["study"] for r in rows]),
            "set": np.array([r["set"] for r in rows]), "truth": np.array([num(r["truth"]) for r in rows]),
            "target": np.array([num(r["target"]) for r in rows]),
            "outputs": np.array([[float(r[c]) for c in cols] for r in rows], dtype=np.float32),
            "names": tuple(c[len("output_"):] for c in cols)}


def fold_scores(cfg, fold: dict, changes: dict) -> dict[str, np.ndarray]:
    """Every profile's scores of every row of one run's head outputs, the profiles refitted from
    its training rows with `changes` (profile_fit.fit_profiles's blends= and gate= keys)."""
    from dataclasses import replace

    from model.profiles import profile_names
    from model.training.predict import scores_of
    from model.training.profile_fit import fit_profiles

    names = fold["names"]
    train = {}
    for s in cfg.data.studies:
        rows = (fold["set"] == "train") & (fold["study"] == s.name)
        if rows.any():
            train[s.name] = (fold["outputs"][rows], fold["target"][rows])
    profiles = fit_profiles(cfg, names, train, blends=changes.get("blends"), gate=changes.get("gate"))
    mcfg = replace(cfg.model.network(), outputs=names, profiles=profiles)
    return {p: scores_of(fold["outputs"], mcfg, p) for p in profile_names(mcfg)}


def score_setting(cfg, runs: dict[str, dict], changes: dict) -> dict:
    from model.training.metrics import spearman

    out, agree = {}, []
    studies = [s.name for s in cfg.data.studies]
    for study in studies:
        default, own = [], []
        for name, fold in runs.items():
            if not name.startswith(f"{study}/"):
                continue
            scores, test = fold_scores(cfg, fold, changes), fold["set"] == "test"
            default.append(spearman(scores["default"][test], fold["truth"][test]))
            own.append(spearman(scores[study][test], fold["truth"][test]))
            hold = fold["set"] == "teacher_holdout"
            if hold.sum() > 1:
                agree.append(spearman(scores["default"][hold], fold["truth"][hold]))
        if default:
            out[f"within_{study}_default"] = float(np.mean(default))
            out[f"within_{study}_default_sd"] = float(np.std(default, ddof=1)) if len(default) > 1 else 0.0
            out[f"within_{study}_own"] = float(np.mean(own))
        loso = runs.get(f"loso/{study}")
        if loso is not None:
            scores, test = fold_scores(cfg, loso, changes), loso["set"] == "test"
            out[f"loso_{study}_default"] = spearman(scores["default"][test], loso["truth"][test])
    out["teacher_agreement"] = float(np.mean(agree)) if agree else float("nan")
    return out


def settings(cfg, args) -> list[dict]:
    """Every combination asked for, plus the run's own setting (first)."""
    m, p = cfg.model, cfg.profiles
    own = {"blend": m.score_blend, "gate": p.gate, "gate_center": m.gate_center, "gate_width": m.gate_width,
           "temperature": p.temperature, "general": p.general, "general_blend": p.general_blend}
    grid = [own]
    for blend, gate, general, gb in itertools.product(args.blends or [own["blend"]], args.gates or [own["gate"]],
                                                      args.generals or [own["general"]],
                                                      args.general_blends or [own["general_blend"]]):
        base = {**own, "blend": blend, "gate": gate, "general": general, "general_blend": gb}
        if gate == "sigmoid":
            grid += [{**base, "gate_center": c, "gate_width": w} for c in args.centres or [own["gate_center"]]
                     for w in args.widths or [own["gate_width"]]]
        elif gate == "softmax":
            grid += [{**base, "temperature": t} for t in args.temperatures or [own["temperature"]]]
        else:
            grid.append(base)
    unique = {json.dumps(g, sort_keys=True): g for g in grid}
    return list(unique.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cv", required=True, type=Path, help="a `resmemnet train --cv` run folder")
    ap.add_argument("--out", type=Path, help="folder for gate_sweep.csv (default: CV_RUN/gate_sweep)")
    values = lambda kind: (lambda text: [kind(v) for v in text.split(",")])  # noqa: E731
    ap.add_argument("--blends", type=values(float), help="study blends (every study the same)")
    ap.add_argument("--gates", type=values(str), help="sigmoid, softmax, none")
    ap.add_argument("--centres", type=values(float), help="sigmoid gate centres")
    ap.add_argument("--widths", type=values(float), help="sigmoid gate widths")
    ap.add_argument("--temperatures", type=values(float), help="softmax gate temperatures")
    ap.add_argument("--generals", type=values(str), help="teacher, shared")
    ap.add_argument("--general-blends", type=values(float), help="general = shared: its blend with the teacher")
    ap.add_argument("--sort", help="column to sort by, best first")
    ap.add_argument("--floor", action="append", default=[], metavar="COLUMN=VALUE", help="keep rows with COLUMN >= VALUE")
    args = ap.parse_args(argv)

    from model.training.config import ConfigError, config_from_dict

    files = sorted(args.cv.glob("*/*/head_outputs.csv"))
    if not files or not (args.cv / "config.json").is_file():
        print(f"error: {args.cv} is not a --cv run folder with */*/head_outputs.csv", file=sys.stderr)
        return 2
    try:
        cfg = config_from_dict(json.loads((args.cv / "config.json").read_text()))
        floors = {k: float(v) for k, v in (f.split("=", 1) for f in args.floor)}
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    runs = {f"{f.parent.parent.name}/{f.parent.name}": read_head_outputs(f) for f in files}
    rows = []
    for setting in settings(cfg, args):
        changes = {"blends": {s.name: setting["blend"] for s in cfg.data.studies},
                   "gate": {k: v for k, v in setting.items() if k != "blend"}}
        rows.append({**setting, **score_setting(cfg, runs, changes)})
    out = args.out or args.cv / "gate_sweep"
    out.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "gate_sweep.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    loso = [k for k in keys if k.startswith("loso_")]
    sort = args.sort or ("loso_mean" if loso else next(k for k in keys if k.startswith("within_")))
    for r in rows:
        r["loso_mean"] = float(np.mean([r[k] for k in loso])) if loso else float("nan")
    keep = [r for r in rows if all(r.get(k, -np.inf) >= v for k, v in floors.items())]
    keep.sort(key=lambda r: -r.get(sort, -np.inf))
    shown = [k for k in keys if k.startswith(("within_", "loso_", "teacher")) and not k.endswith("_sd")]
    print(" ".join(f"{h:>10}" for h in ["blend", "gate", "centre", "width", "temp", "general", *shown]))
    for r in keep[:25]:
        print(" ".join(f"{v:>10}" for v in [r["blend"], r["gate"], r["gate_center"], r["gate_width"], r["temperature"],
                                             r["general"], *(f"{r[k]:.4f}" for k in shown)]))
    print(f"{len(keep)} of {len(rows)} settings kept (sorted by {sort}); all in {out / 'gate_sweep.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
