"""Evaluation metrics as pure functions of numpy arrays (no torch, no I/O).

Spearman's rho is Pearson's r of average ranks, so ties are handled as scipy.stats.spearmanr
does. The top/bottom table is the paper's Tables 3/4: for the N images with the highest (lowest)
predictions, the mean prediction and the mean true score; `mean_true_best` is the mean of the N
truly highest (lowest) scores, the ideal ("Ground Truth") column.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

TOP_BOTTOM_N = (10, 25, 50, 100, 200)


def rankdata(values) -> np.ndarray:
    """Average ranks (1-based), ties sharing the mean of their ranks (scipy's method='average')."""
    x = np.asarray(values, dtype=np.float64).ravel()
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # start index of each run of equal values
    starts = np.concatenate(([True], sorted_x[1:] != sorted_x[:-1]))
    run_id = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    counts = np.diff(np.append(first, len(x)))
    avg = first + (counts + 1) / 2.0  # mean of 1-based ranks first+1 .. first+count
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = avg[run_id]
    return ranks


def pearson(a, b) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"length mismatch: {a.shape[0]} vs {b.shape[0]}")
    if len(a) < 2:
        return float("nan")
    da, db = a - a.mean(), b - b.mean()
    denom = math.sqrt(float(da @ da) * float(db @ db))
    if denom == 0:
        return float("nan")  # a constant input has no correlation (scipy warns and returns nan)
    return float(np.clip(float(da @ db) / denom, -1.0, 1.0))


def spearman(a, b) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"length mismatch: {a.shape[0]} vs {b.shape[0]}")
    return pearson(rankdata(a), rankdata(b))


def mse(pred, true) -> float:
    pred = np.asarray(pred, dtype=np.float64).ravel()
    true = np.asarray(true, dtype=np.float64).ravel()
    if pred.shape != true.shape:
        raise ValueError(f"length mismatch: {pred.shape[0]} vs {true.shape[0]}")
    return float(np.mean((pred - true) ** 2)) if len(pred) else float("nan")


def top_bottom_table(pred, true, ns: Sequence[int] = TOP_BOTTOM_N) -> list[dict]:
    """Rows 'top N' (descending N order as in the paper: top 10 first) then 'bottom N' (200 first).
    Sizes larger than the number of images are left out."""
    pred = np.asarray(pred, dtype=np.float64).ravel()
    true = np.asarray(true, dtype=np.float64).ravel()
    by_pred = np.argsort(-pred, kind="mergesort")
    by_true = np.argsort(-true, kind="mergesort")
    ns = [n for n in sorted(ns) if 0 < n <= len(pred)]
    rows = []
    for n in ns:
        sel = by_pred[:n]
        rows.append({"set": f"top {n}", "n": n, "mean_pred": float(pred[sel].mean()),
                     "mean_true": float(true[sel].mean()), "mean_true_best": float(true[by_true[:n]].mean())})
    for n in reversed(ns):
        sel = by_pred[-n:]
        rows.append({"set": f"bottom {n}", "n": n, "mean_pred": float(pred[sel].mean()),
                     "mean_true": float(true[sel].mean()), "mean_true_best": float(true[by_true[-n:]].mean())})
    return rows


def split_half_consistency(half1, half2, idx=None) -> float:
    """Human ceiling: Spearman between the two participant halves' hit rates over the images
    `idx` (all when None), per random split row, averaged over rows."""
    h1 = np.asarray(half1, dtype=np.float64)
    h2 = np.asarray(half2, dtype=np.float64)
    if h1.ndim == 1:
        h1, h2 = h1[None], h2[None]
    if idx is not None:
        h1, h2 = h1[:, idx], h2[:, idx]
    rhos = [spearman(a, b) for a, b in zip(h1, h2)]
    return float(np.nanmean(rhos)) if rhos else float("nan")


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value), ignoring NaN."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    v = v[~np.isnan(v)]
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def regression_metrics(pred, true) -> dict:
    return {"n": int(len(np.asarray(pred).ravel())), "spearman": spearman(pred, true),
            "pearson": pearson(pred, true), "mse": mse(pred, true)}


def summarize_rows(rows: list[dict], keys: Sequence[str]) -> tuple[dict, dict]:
    """pyiqa-style summary rows: ({key: mean}, {key: std}) over per-split rows."""
    means, stds = {}, {}
    for key in keys:
        vals = [r.get(key) for r in rows if isinstance(r.get(key), (int, float))]
        m, s = mean_std(vals)
        means[key], stds[key] = m, s
    return means, stds


def average_tables(tables: list[list[dict]]) -> list[dict]:
    """Average top/bottom tables over splits (rows matched by their 'set' label)."""
    if not tables:
        return []
    labels = [r["set"] for r in tables[0]]
    common = [lab for lab in labels if all(any(r["set"] == lab for r in t) for t in tables)]
    out = []
    for lab in common:
        rows = [next(r for r in t if r["set"] == lab) for t in tables]
        out.append({"set": lab, "n": rows[0]["n"],
                    **{k: float(np.mean([r[k] for r in rows])) for k in ("mean_pred", "mean_true", "mean_true_best")}})
    return out
