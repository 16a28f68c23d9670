"""Ridge baselines on the frozen trunk's pooled stage outputs, on exactly the folds, images and
feature cache of a training-module CV run, so the learned head is compared like for like.

    python -m research.ridge_baseline --run RUN_DIR [--json FILE]

RUN_DIR is a `resmemnet train --cv` run folder (its config.toml and splits.json are read; the
feature cache its config names is reused, or built if missing). Features: the pooled output of
the last block of each stage (4 vectors; 3,840 values for ResNet-50/152), standardised on each
fold's training images. For every alpha it reports the mean test rho over the folds (picking the
best alpha this way looks at the test folds and so favours the baseline) and a nested choice
(alpha picked by 5-fold CV inside each training fold). A second ridge fitted to the teacher's
scores on the training part of the pool gives agreement on the held-out pool photos, and blends
b * LNSIM ridge + (1 - b) * teacher ridge mirror the network's `score_blend`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

ALPHAS = (1e2, 1e3, 3e3, 1e4, 3e4, 1e5)
BLENDS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0)


def stage_end_columns(backbone: str, tap_channels: list[int]) -> np.ndarray:
    """Columns of the flat tap vector that hold each stage's last block."""
    from model.trunks import BLOCKS_PER_STAGE

    ends = np.cumsum(BLOCKS_PER_STAGE[backbone]) - 1
    offsets = np.concatenate([[0], np.cumsum(tap_channels)])
    return np.concatenate([np.arange(offsets[t], offsets[t + 1]) for t in ends])


def ridge_fit_predict(x_train, y_train, x_tests, alpha: float):
    """Closed-form ridge (dual form: fewer images than features) on standardised inputs."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    xt = (x_train - mean) / std
    gram = xt @ xt.T
    coef = xt.T @ np.linalg.solve(gram + alpha * np.eye(len(xt)), y_train - y_train.mean())
    return [((x - mean) / std) @ coef + y_train.mean() for x in x_tests]


def nested_alpha(x, y, folds: int = 5, seed: int = 0) -> float:
    from model.training.metrics import spearman

    order = np.random.default_rng(seed).permutation(len(x))
    parts = np.array_split(order, folds)
    scores = []
    for alpha in ALPHAS:
        rho = []
        for k in range(folds):
            test = parts[k]
            train = np.concatenate([parts[j] for j in range(folds) if j != k])
            rho.append(spearman(ridge_fit_predict(x[train], y[train], [x[test]], alpha)[0], y[test]))
        scores.append(np.mean(rho))
    return ALPHAS[int(np.argmax(scores))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, type=Path, help="a `resmemnet train --cv` run folder")
    ap.add_argument("--json", type=Path, help="write the numbers here")
    args = ap.parse_args(argv)

    from model.training.config import load_config
    from model.training.context import build_context
    from model.training.data import map_scores
    from model.training.metrics import spearman
    from model.training.state import EpochBudget

    cfg = load_config(str(args.run / "config.toml"))
    # the run's own photos, split plan (resume=True: its splits.json) and feature caches
    ctx = build_context(cfg, args.run, {}, device_name="cpu", resume=True, budget=EpochBudget(None),
                        log=lambda m: print(m, file=sys.stderr), write_run=False)
    pool, model, teacher = ctx.pool, ctx.model, ctx.pool.teacher
    study = pool.study(cfg.data.scale_study)  # the scale study's folds, as the readout's CV
    cols = stage_end_columns(model.cfg.backbone, model.cfg.tap_channels)
    aug = pool.features.augmentations.index("none")
    truth = pool.truth

    def features(idx):
        return pool.features.rows(np.asarray(idx), aug)[:, cols].astype(np.float64)

    t_train, t_hold = pool.teacher_split()
    per_alpha = {a: [] for a in ALPHAS}
    nested, blends = [], {b: {"rho": [], "teacher": []} for b in BLENDS}
    for fold in pool.plan["studies"][study.name]["folds"]:
        train, test = pool.idx_of(study.name, fold["train"]), pool.idx_of(study.name, fold["test"])
        x_train, y_train, x_test, y_test = features(train), truth[train], features(test), truth[test]
        for a in ALPHAS:
            per_alpha[a].append(spearman(ridge_fit_predict(x_train, y_train, [x_test], a)[0], y_test))
        alpha = nested_alpha(x_train, y_train)
        x_hold = features(t_hold) if teacher is not None and len(t_hold) else None
        outs = [x_test] + ([x_hold] if x_hold is not None else [])
        lab_pred = ridge_fit_predict(x_train, y_train, outs, alpha)
        nested.append({"fold": fold["name"], "alpha": alpha, "spearman": spearman(lab_pred[0], y_test)})
        if x_hold is None:
            continue
        y_teacher = map_scores(truth[t_train], y_train, cfg.data.teacher.mapping)
        x_teacher = features(t_train)
        teach_pred = ridge_fit_predict(x_teacher, y_teacher, [x_test, x_hold], nested_alpha(x_teacher, y_teacher))
        hold_truth = truth[t_hold]
        for b in BLENDS:
            blends[b]["rho"].append(spearman(b * lab_pred[0] + (1 - b) * teach_pred[0], y_test))
            blends[b]["teacher"].append(spearman(b * lab_pred[1] + (1 - b) * teach_pred[1], hold_truth))

    report = {
        "run": str(args.run), "backbone": model.cfg.backbone, "features": int(len(cols)),
        "per_alpha": {str(a): {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)), "folds": v}
                      for a, v in per_alpha.items()},
        "nested": {"mean": float(np.mean([n["spearman"] for n in nested])),
                   "sd": float(np.std([n["spearman"] for n in nested], ddof=1)), "folds": nested},
        "blends": [{"blend": b, "spearman": float(np.mean(v["rho"])), "teacher_holdout_spearman": float(np.mean(v["teacher"]))}
                   for b, v in blends.items() if v["rho"]],
    }
    print(f"ridge on pooled stage outputs ({report['backbone']}, {report['features']} features), {len(nested)} folds of {args.run}")
    print("| alpha | rho mean | sd |\n|---|---|---|")
    for a, r in report["per_alpha"].items():
        print(f"| {float(a):g} | {r['mean']:.4f} | {r['sd']:.4f} |")
    print(f"| nested choice | {report['nested']['mean']:.4f} | {report['nested']['sd']:.4f} |")
    if report["blends"]:
        print("\n| blend | LNSIM rho | teacher agreement (held-out pool) |\n|---|---|---|")
        for r in report["blends"]:
            print(f"| {r['blend']:.1f} | {r['spearman']:.4f} | {r['teacher_holdout_spearman']:.4f} |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
