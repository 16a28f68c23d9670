"""The numbers of a run's profiles that are chosen from its training photos alone (recipe "A4b",
docs/model-card.md): a study profile's blend by inner CV on its output's out-of-fold predictions,
the sigmoid gate's per-study centre and width by a Platt fit on the domain output's leave-one-out
outputs, and the level offsets that put every component of the default mixture on one level.
"""
from __future__ import annotations

import numpy as np

BLEND_STEP = 0.05  # the blend grid of profiles chosen by inner CV: 0, 0.05, ..., 1


def blend_grid(step: float = BLEND_STEP) -> np.ndarray:
    return np.round(np.arange(0.0, 1.0 + step / 2, step), 6)


def choose_blend(oof, teacher, y, fold, grid=None) -> tuple[float, dict]:
    """The blend b of b x out-of-fold study output + (1 - b) x teacher output with the best mean
    Spearman rho over the inner folds (the lowest b among ties). oof, teacher, y, fold: (n,) over
    a study's training photos (their unaugmented rows); rows with a NaN oof are left out.
    Returns (b, {b: mean inner rho})."""
    from .metrics import spearman

    oof, teacher, y, fold = (np.asarray(a, dtype=np.float64) for a in (oof, teacher, y, fold))
    ok = np.isfinite(oof)
    oof, teacher, y, fold = oof[ok], teacher[ok], y[ok], fold[ok]
    folds = [fold == k for k in np.unique(fold) if (fold == k).sum() >= 3]
    rho, best, chosen = {}, -np.inf, 1.0
    for b in (blend_grid() if grid is None else grid):
        p = b * oof + (1 - b) * teacher
        r = float(np.mean([spearman(p[m], y[m]) for m in folds])) if folds else float("nan")
        rho[float(b)] = r
        if r > best + 1e-12:
            best, chosen = r, float(b)
    return chosen, rho


def loo_outputs(gram: np.ndarray, y: np.ndarray, sample_weight: np.ndarray, alpha: float) -> np.ndarray:
    """Closed-form leave-one-out outputs (n, m) of the weighted kernel ridge readout_fit fits
    (readout._solve): each row's output from the fit without it, LOO = y - (y - fit) / (1 - h_ii),
    h = diag(K S (S K S + alpha I)^-1 S), S = diag(sqrt(weight)); the weighted target mean is kept
    (it moves by O(1/n)). gram: (n, n); y: (n, m); sample_weight: (n,)."""
    s = np.sqrt(np.asarray(sample_weight, dtype=np.float64))
    y = np.asarray(y, dtype=np.float64)
    y_mean = (y * (s ** 2)[:, None]).sum(0) / (s ** 2).sum()
    a = gram * s[:, None] * s[None, :]
    a[np.diag_indices_from(a)] += alpha
    a_inv = np.linalg.inv(a)
    del a
    dual = (a_inv @ (s[:, None] * (y - y_mean))) * s[:, None]
    fit = gram @ dual + y_mean
    h = np.einsum("ij,ji->i", gram * s[None, :], a_inv) * s
    return y - (y - fit) / (1.0 - h)[:, None]


def platt(d, is_class, *, iterations: int = 100) -> tuple[float, float]:
    """(centre, width) of the class-balanced logistic fit P(class | d) = sigmoid((d - centre) / width):
    each side (the class's photos, every other photo) carries half the likelihood's weight. Newton
    steps on (slope, intercept), a convex problem; ValueError when one side is empty or d does not
    separate them at all (slope <= 0)."""
    d = np.asarray(d, dtype=np.float64)
    y = np.asarray(is_class, dtype=bool)
    if y.all() or not y.any():
        raise ValueError("a Platt fit needs photos of the class and photos of other classes")
    w = np.where(y, 0.5 / y.sum(), 0.5 / (~y).sum())
    x = np.stack([d, np.ones_like(d)], 1)
    def nll(b):
        z = x @ b
        return float(np.sum(w * np.where(y, np.logaddexp(0, -z), np.logaddexp(0, z))))

    beta = np.array([10.0, -5.0])  # sigmoid((d - 0.5) / 0.1), the old module default
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(x @ beta)))
        grad = x.T @ (w * (p - y))
        hess = (x * (w * p * (1 - p))[:, None]).T @ x + 1e-12 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        t, before = 1.0, nll(beta)
        while t > 1e-6 and nll(beta - t * step) > before:  # damped: Newton can overshoot far from the optimum
            t /= 2
        beta = beta - t * step
        if np.abs(t * step).max() < 1e-12:
            break
    slope, intercept = beta
    if not slope > 0:
        raise ValueError("the domain output does not rise with the class: no sigmoid gate to fit")
    return float(-intercept / slope), float(1.0 / slope)
