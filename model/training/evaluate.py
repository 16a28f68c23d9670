"""The evaluation protocol: per-split metrics, mean +- sd over splits, the paper's top/bottom table
and the human split-half ceiling; reports as JSON and CSV (pyiqa style: one row per split, then
a mean row and a std row). Used by `resmemnet evaluate` and by cross-validation in training.
"""
from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from . import metrics as M

ROW_KEYS = ("n", "spearman", "pearson", "mse", "human_ceiling", "teacher_holdout_spearman", "epoch")
# per-profile columns of a training run's rows: spearman_<profile>, teacher_holdout_spearman_<profile>
PROFILE_PREFIXES = ("spearman_", "teacher_holdout_spearman_")


def row_keys(rows: list[dict]) -> list[str]:
    """The columns of a report: ROW_KEYS present in a row, then every per-profile column."""
    keys = [k for k in ROW_KEYS if any(k in r for r in rows)]
    extra = [k for r in rows for k in r if k.startswith(PROFILE_PREFIXES)]
    return keys + list(dict.fromkeys(extra))


def split_result(name: str, pred, true, *, halves=None, idx=None, ns: Sequence[int] = M.TOP_BOTTOM_N,
                 extra: dict | None = None) -> dict:
    """Metrics of one split. `halves` (h1, h2) with `idx` (their columns for these images) adds
    the human ceiling over the same images."""
    row = {"split": name, **M.regression_metrics(pred, true)}
    if halves is not None:
        row["human_ceiling"] = M.split_half_consistency(halves[0], halves[1], idx)
    row.update(extra or {})
    return {"row": row, "top_bottom": M.top_bottom_table(pred, true, ns)}


def build_report(results: list[dict], *, dataset: str, model: str = "", info: dict | None = None) -> dict:
    rows = [r["row"] for r in results]
    keys = row_keys(rows)
    mean, std = M.summarize_rows(rows, keys)
    return {
        "dataset": dataset,
        "model": model,
        "splits": rows,
        "mean": mean,
        "std": std,
        "top_bottom": M.average_tables([r["top_bottom"] for r in results]),
        "top_bottom_per_split": {r["row"]["split"]: r["top_bottom"] for r in results},
        **(info or {}),
    }


def summarize_blend_curves(curves: list[list[dict]]) -> list[dict]:
    """Per-split blend curves -> per blend: mean and sd of test rho, mean teacher agreement."""
    out = []
    for rows in zip(*curves):
        rho = np.array([r["spearman"] for r in rows], dtype=float)
        row = {"blend": rows[0]["blend"], "spearman_mean": float(rho.mean()),
               "spearman_std": float(rho.std(ddof=1)) if len(rho) > 1 else 0.0}
        hold = [r["teacher_holdout_spearman"] for r in rows if r.get("teacher_holdout_spearman") is not None]
        if hold:
            row["teacher_holdout_spearman_mean"] = float(np.mean(hold))
        gated = np.array([r["gated_spearman"] for r in rows if "gated_spearman" in r], dtype=float)
        if len(gated) == len(rows):
            row["gated_spearman_mean"] = float(gated.mean())
            row["gated_spearman_std"] = float(gated.std(ddof=1)) if len(gated) > 1 else 0.0
            ghold = [r["gated_teacher_holdout_spearman"] for r in rows if "gated_teacher_holdout_spearman" in r]
            if ghold:
                row["gated_teacher_holdout_spearman_mean"] = float(np.mean(ghold))
        out.append(row)
    return out


def _fmt(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return "" if value is None else str(value)


def write_report(report: dict, out_dir: str | Path, stem: str = "metrics") -> list[Path]:
    """OUT/STEM.json (everything), OUT/STEM.csv (split rows + mean + std), OUT/STEM_top_bottom.csv."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(_json_safe(report), indent=2) + "\n")
    rows = report["splits"]
    keys = row_keys(rows)
    csv_path = out_dir / f"{stem}.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["split", *keys])
        for r in rows:
            w.writerow([r["split"], *(_fmt(r.get(k)) for k in keys)])
        w.writerow(["mean", *(_fmt(report["mean"].get(k)) for k in keys)])
        w.writerow(["std", *(_fmt(report["std"].get(k)) for k in keys)])
    tb_path = out_dir / f"{stem}_top_bottom.csv"
    with open(tb_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["set", "n", "mean_pred", "mean_true", "mean_true_best"])
        for r in report["top_bottom"]:
            w.writerow([r["set"], r["n"], _fmt(r["mean_pred"]), _fmt(r["mean_true"]), _fmt(r["mean_true_best"])])
    written = [json_path, csv_path, tb_path]
    if report.get("blend_curve"):
        blend_path = out_dir / f"{stem}_blend.csv"
        keys = list(report["blend_curve"][0])
        with open(blend_path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(keys)
            for r in report["blend_curve"]:
                w.writerow([_fmt(r.get(k)) for k in keys])
        written.append(blend_path)
    return written


def _json_safe(obj):
    """NaN -> null so the JSON is valid for every reader."""
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    return obj


def format_report(report: dict) -> str:
    rows = report["splits"]
    keys = [k for k in ("n", "spearman", "pearson", "mse", "human_ceiling", "teacher_holdout_spearman")
            if any(k in r for r in rows)]
    head = ["split", *keys]
    lines = [" ".join(f"{h:>12}" for h in head)]
    for r in rows:
        lines.append(" ".join(f"{_fmt(v):>12}" for v in [r["split"], *(r.get(k) for k in keys)]))
    if len(rows) > 1:
        lines.append(" ".join(f"{_fmt(v):>12}" for v in ["mean", "", *(report["mean"].get(k) for k in keys[1:])]))
        lines.append(" ".join(f"{_fmt(v):>12}" for v in ["std", "", *(report["std"].get(k) for k in keys[1:])]))
    m, s = report["mean"].get("spearman"), report["std"].get("spearman")
    if m is not None and not math.isnan(m):
        lines.append(f"Spearman rho: {m:.4f} +- {s:.4f} over {len(rows)} split(s)"
                     + (f"; human ceiling {report['mean']['human_ceiling']:.4f}"
                        if "human_ceiling" in report["mean"] and not math.isnan(report["mean"]["human_ceiling"])
                        else ""))
    if report.get("top_bottom"):
        lines.append("")
        lines.append(f"{'set':>12} {'mean_pred':>10} {'mean_true':>10} {'best_true':>10}")
        for r in report["top_bottom"]:
            lines.append(f"{r['set']:>12} {r['mean_pred']:>10.4f} {r['mean_true']:>10.4f} {r['mean_true_best']:>10.4f}")
    if report.get("blend_curve"):
        lines.append("")
        gated = "gated_spearman_mean" in report["blend_curve"][0]
        lines.append(f"{'score_blend':>12} {'rho':>8} {'sd':>8} {'teacher':>8}"
                     + (f" {'gated':>8} {'sd':>8} {'teacher':>8}" if gated else "")
                     + "  (teacher: agreement on held-out pool photos)")
        for r in report["blend_curve"]:
            lines.append(f"{r['blend']:>12.1f} {r['spearman_mean']:>8.4f} {r['spearman_std']:>8.4f} "
                         f"{_fmt(r.get('teacher_holdout_spearman_mean')):>8}"
                         + (f" {r['gated_spearman_mean']:>8.4f} {r['gated_spearman_std']:>8.4f} "
                            f"{_fmt(r.get('gated_teacher_holdout_spearman_mean')):>8}" if gated else ""))
    return "\n".join(lines)


# -- `resmemnet evaluate` -------------------------------------------------------------------

def evaluation_splits(data, plan: dict | None) -> list[tuple[str, np.ndarray]]:
    """(name, indices into data) of every split to report: the split file's test folds, else the
    dataset's official test splits, else all images."""
    from .splits import indices_for, study_plan_for

    if plan is not None:
        out = []
        for fold in study_plan_for(plan, data)[1]["folds"]:
            idx, missing = indices_for(fold["test"], data)
            if missing:
                print(f"{fold['name']}: {missing} of {len(fold['test'])} test images are not in the dataset now "
                      "(left out)", file=sys.stderr)
            if len(idx):
                out.append((fold["name"], idx))
        return out
    official = [(name, np.asarray(parts["test"], dtype=int)) for name, parts in data.splits.items()
                if parts.get("test")]
    return official or [("all", np.arange(len(data)))]


def evaluate_scores(data, predictions: np.ndarray, splits: list[tuple[str, np.ndarray]], *, model: str = "",
                    info: dict | None = None, ns: Sequence[int] = M.TOP_BOTTOM_N) -> dict:
    """`predictions`: one per image of `data` (NaN where scoring failed; those are left out)."""
    results = []
    for name, idx in splits:
        idx = np.asarray(idx, dtype=int)
        ok = idx[~np.isnan(predictions[idx])]
        if len(ok) < 2:
            continue
        results.append(split_result(name, predictions[ok], data.scores[ok], halves=data.halves, idx=ok, ns=ns))
    return build_report(results, dataset=data.name, model=model, info=info)
