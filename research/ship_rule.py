"""The rule that decides whether a two-study candidate replaces today's default (docs/model-card.md,
"How the default was chosen"): its `default` profile must beat today's default, measured by the
same protocols, on all four of LNSIM 5-fold CV rho (and reach the floor), cdm_dev 5-fold CV rho,
leave-out-LNSIM rho and leave-out-cdm_dev rho.

    python -m research.ship_rule --cv CV_RUN --old FIXED.json [--old-weights W] [--floor 0.572]

CV_RUN: the candidate's `resmemnet train --cv` folder (its cv.json). FIXED.json: today's default
by `python -m research.fixed_protocols --cv CV_RUN --weights W --json FIXED.json`; its LNSIM CV
(it trained on LNSIM) comes from W's own metadata: the served setting's CV
(`metrics.cross_validation.shipped_setting`), else its CV mean. Today's default's leave-out-LNSIM
number is its `general` profile on all of LNSIM (its recipe without LNSIM: the teacher output).
Prints both rows and the verdict; exit status 0 when the candidate passes, 1 when it does not,
2 for bad arguments.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

COLUMNS = ("lnsim_cv", "cdm_cv", "loso_lnsim", "loso_cdm")


def candidate_row(cv: dict) -> dict:
    s = cv["summary"]
    return {"lnsim_cv": s["within"]["lnsim"]["default"]["spearman"]["mean"],
            "cdm_cv": s["within"]["cdm"]["default"]["spearman"]["mean"],
            "loso_lnsim": s["loso"]["lnsim"]["default"]["spearman"],
            "loso_cdm": s["loso"]["cdm"]["default"]["spearman"]}


def old_row(fixed: dict, weights: str) -> dict:
    meta = json.loads(Path(weights).read_text())
    cv = meta["metrics"]["cross_validation"]
    lnsim_cv = (cv.get("shipped_setting") or {}).get("spearman_mean", cv["mean"]["spearman"])
    return {"lnsim_cv": lnsim_cv,
            "cdm_cv": fixed[f"{weights}:default"]["cdm"]["cv_mean"],
            "loso_lnsim": fixed[f"{weights}:general"]["lnsim"]["whole"],
            "loso_cdm": fixed[f"{weights}:default"]["cdm"]["whole"]}


def verdict(new: dict, old: dict, floor: float) -> tuple[bool, list[str]]:
    reasons = [f"{c}: {new[c]:.4f} is not above {old[c]:.4f}" for c in COLUMNS if not new[c] > old[c]]
    if not new["lnsim_cv"] >= floor:
        reasons.append(f"lnsim_cv: {new['lnsim_cv']:.4f} is below the floor {floor}")
    return not reasons, reasons


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cv", required=True, help="the candidate's CV run folder")
    ap.add_argument("--old", required=True, help="research.fixed_protocols --json of today's default on that run")
    ap.add_argument("--old-weights", default="weights/resmemnet-default.json",
                    help="today's default, as named in --old (default: %(default)s)")
    ap.add_argument("--floor", type=float, default=0.572, help="LNSIM CV rho the candidate must reach")
    args = ap.parse_args(argv)
    try:
        new = candidate_row(json.loads((Path(args.cv) / "cv.json").read_text()))
        old = old_row(json.loads(Path(args.old).read_text()), args.old_weights)
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        print(f"error: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return 2
    print(f"{'':<16}" + "".join(f"{c:>12}" for c in COLUMNS))
    for label, row in (("today's default", old), ("candidate", new)):
        print(f"{label:<16}" + "".join(f"{row[c]:>12.4f}" for c in COLUMNS))
    ok, reasons = verdict(new, old, args.floor)
    print("verdict: ship the candidate" if ok else "verdict: keep today's default (" + "; ".join(reasons) + ")")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
