"""Closed-form fit of the readout head (`model.head = "readout"`): ridge regression of each output
on the frozen trunk's pooled taps, solved exactly in its dual form (far fewer images than the
47,872 tap values of ResNet-152), with the penalty chosen by cross-validation inside the training
images only.

Each tap is standardised on the training rows and weighted so that every stage of the trunk has
the same share of the kernel (ResNet-152 has 36 blocks in stage 3 and 3 in stage 4; weighting by
block would let stage 3 swamp the rest). Every augmentation of an image is a training row; the
inner folds keep an image's rows together. The standardisation and tap weights are folded into the
head's one linear layer, so serving stays a single matrix product.

With a teacher output, the labelled output can shrink towards the teacher instead of towards a
constant (`readout.labelled_prior = "teacher"`): it is the teacher output, mapped onto the labelled
scale by least squares, plus a ridge fitted to what that leaves of the labelled scores. Where
the labelled photos say nothing (unlike photos), it falls back to the teacher.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TAP_WEIGHTINGS = ("stage", "tap", "channel", "stage_ends", "last")


def tap_weights(blocks_per_stage, tap_channels: list[int], weighting: str) -> np.ndarray:
    """Share of the kernel per tap (sums to 1). `tap_channels` is either every block's taps
    (len == sum(blocks_per_stage)) or only the last one. "stage_ends" (each stage's last block,
    the usual ridge baseline's features) and "last" (the last block) are ablations: the other taps
    get weight 0."""
    chans = np.asarray(tap_channels, dtype=np.float64)
    all_taps = len(chans) == sum(blocks_per_stage)
    if weighting == "channel":  # plain ridge on the concatenation: wide taps weigh more
        w = chans
    elif weighting in ("stage_ends", "last"):
        if all_taps:
            ends = np.cumsum(blocks_per_stage) - 1
            kept = ends if weighting == "stage_ends" else ends[-1:]
            w = np.zeros(len(chans))
            w[kept] = chans[kept]
        else:
            w = np.ones(len(chans))
    elif weighting == "tap":
        w = np.ones(len(chans))
    elif weighting == "stage":
        if all_taps:
            w = np.concatenate([np.full(n, 1.0 / n) for n in blocks_per_stage])
        else:
            w = np.ones(len(chans))
    else:
        raise ValueError(f"unknown tap weighting {weighting!r}; choose from {TAP_WEIGHTINGS}")
    return w / w.sum()


def output_tap_weights(model_cfg, weighting: str, branch_share: float = 0.0) -> np.ndarray:
    """Kernel share per tap the head reads (sums to 1): the trunk's taps by `weighting`, scaled by
    1 - branch_share, then the memory branch's taps (model.branch = "resmem") sharing
    branch_share equally. A share of 0 leaves the branch out of that output's fit."""
    from ..trunks import BLOCKS_PER_STAGE

    trunk = tap_weights(BLOCKS_PER_STAGE[model_cfg.backbone], model_cfg.trunk_tap_channels, weighting)
    n_branch = len(model_cfg.tap_channels) - len(model_cfg.trunk_tap_channels)
    if n_branch == 0:
        return trunk
    share = float(branch_share)
    return np.concatenate([trunk * (1.0 - share), np.full(n_branch, share / n_branch)])


@dataclass
class RidgeFit:
    """f(x) = x @ weight + bias on raw pooled taps, and how the penalty was chosen."""
    weight: np.ndarray  # (D,)
    bias: float
    alpha: float
    inner_rho: dict  # alpha -> mean inner-CV Spearman rho
    # inner-CV predictions of the chosen alpha on the scored (eval) rows, NaN elsewhere, and each
    # row's inner fold (None without an inner CV): what a blend chosen by inner CV reads
    oof: np.ndarray | None = None
    fold: np.ndarray | None = None


class TapKernel:
    """Standardised, tap-weighted features of the training rows and their Gram matrix."""

    def __init__(self, x: np.ndarray, tap_channels: list[int], weights: np.ndarray):
        offsets = np.concatenate([[0], np.cumsum(tap_channels)])
        self.mean = x.mean(axis=0, dtype=np.float64)
        self.std = x.std(axis=0, dtype=np.float64) + 1e-6
        # sqrt(tap share / tap width) per column: each tap's block of the kernel carries its share.
        self.col_scale = np.concatenate([np.full(c, np.sqrt(w / c)) for c, w in zip(tap_channels, weights)])
        n = len(x)
        self.gram = np.zeros((n, n))
        self.z = np.empty_like(x, dtype=np.float32)
        for lo, hi in zip(offsets[:-1], offsets[1:]):  # per tap: bounded float32 temporaries
            zt = ((x[:, lo:hi] - self.mean[lo:hi]) * (self.col_scale[lo:hi] / self.std[lo:hi])).astype(np.float32)
            self.z[:, lo:hi] = zt
            self.gram += (zt @ zt.T).astype(np.float64)
        # Kernel scale 1 per row on average, so alphas mean the same for any trunk or tap set.
        self.scale = float(np.trace(self.gram) / n) or 1.0
        self.gram /= self.scale

    def primal(self, dual: np.ndarray, y_mean) -> tuple[np.ndarray, np.ndarray | float]:
        """Dual coefficients (n,) or (n, m) -> weight (D,) or (D, m) and bias on raw (unstandardised) taps."""
        flat = dual.ndim == 1
        dual = dual[:, None] if flat else dual
        beta = np.empty((self.z.shape[1], dual.shape[1]))
        for lo in range(0, len(beta), 4096):  # float64 products without a float64 copy of z
            beta[lo:lo + 4096] = self.z[:, lo:lo + 4096].T.astype(np.float64) @ dual
        beta /= self.scale
        weight = beta * (self.col_scale / self.std)[:, None]
        bias = np.asarray(y_mean, dtype=np.float64).reshape(-1) - self.mean @ weight
        return (weight[:, 0], float(bias[0])) if flat else (weight, bias)


def _solve(gram: np.ndarray, y: np.ndarray, sw: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray | float]:
    """Weighted kernel ridge: rows scaled by sqrt(weight); y (n,) or (n, m) (one factorisation
    for every column); returns (dual coefficients, y mean per column)."""
    flat = y.ndim == 1
    y2 = y[:, None] if flat else y
    y_mean = np.average(y2, axis=0, weights=sw ** 2)
    a = gram * sw[:, None] * sw[None, :]
    a[np.diag_indices_from(a)] += alpha
    dual = np.linalg.solve(a, sw[:, None] * (y2 - y_mean)) * sw[:, None]
    return (dual[:, 0], float(y_mean[0])) if flat else (dual, y_mean)


def inner_folds(groups: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """Fold id per row; rows of one image (group) share a fold."""
    uniq = np.unique(groups)
    order = np.random.default_rng(seed).permutation(len(uniq))
    fold_of_group = np.empty(len(uniq), dtype=int)
    fold_of_group[order] = np.arange(len(uniq)) % folds
    return fold_of_group[np.searchsorted(uniq, groups)]


def fit_ridge(kernel: TapKernel, y: np.ndarray, groups: np.ndarray, *, alphas, folds: int = 5,
              seed: int = 0, sample_weight: np.ndarray | None = None, eval_rows: np.ndarray | None = None,
              offset: np.ndarray | None = None) -> RidgeFit:
    """Ridge of y on the kernel's rows; alpha by `folds`-fold CV over groups (Spearman rho on
    `eval_rows`, e.g. the unaugmented rows), then refitted on every row.

    offset: a prior prediction per row; the ridge then fits y - offset, shrinking towards the prior
    instead of towards a constant, and the inner CV scores offset + fit against y."""
    y = np.asarray(y, dtype=np.float64)
    offset = np.zeros(len(y)) if offset is None else np.asarray(offset, dtype=np.float64)
    return fit_ridge_columns(kernel, y[:, None], groups, alphas=alphas, folds=folds, seed=seed,
                             sample_weight=sample_weight, eval_rows=eval_rows, offset=offset[:, None])[0]


def fit_ridge_columns(kernel: TapKernel, y: np.ndarray, groups: np.ndarray, *, alphas, folds: int = 5,
                      seed: int = 0, sample_weight: np.ndarray | None = None, eval_rows: np.ndarray | None = None,
                      offset: np.ndarray | None = None) -> list[RidgeFit]:
    """fit_ridge for every column of y (n, m) on the same rows and row weights (e.g. the one-hot
    classes of a multi-class ridge classifier): one factorisation per inner fold and penalty
    serves all columns; each column keeps the penalty its own inner CV prefers."""
    from .metrics import spearman

    y = np.asarray(y, dtype=np.float64)
    offset = np.zeros_like(y) if offset is None else np.asarray(offset, dtype=np.float64)
    target = y - offset
    sw = np.sqrt(np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64))
    eval_rows = np.ones(len(y), bool) if eval_rows is None else np.asarray(eval_rows, bool)
    alphas = [float(a) for a in alphas]
    m = y.shape[1]
    inner: list[dict] = [{} for _ in range(m)]
    chosen = [alphas[0]] * m
    fold_of, oof = None, {}
    if len(alphas) > 1:
        fold_of = inner_folds(groups, folds, seed)
        scores = {a: [[] for _ in range(m)] for a in alphas}
        oof = {a: np.full((len(y), m), np.nan) for a in alphas}
        for k in range(folds):
            tr, te = np.flatnonzero(fold_of != k), np.flatnonzero((fold_of == k) & eval_rows)
            if len(te) < 3:
                continue
            cross = kernel.gram[np.ix_(te, tr)]
            for a in alphas:
                dual, y_mean = _solve(kernel.gram[np.ix_(tr, tr)], target[tr], sw[tr], a)
                pred = offset[te] + cross @ dual + y_mean
                oof[a][te] = pred
                for c in range(m):
                    scores[a][c].append(spearman(pred[:, c], y[te, c]))
        for c in range(m):
            inner[c] = {a: float(np.mean(v[c])) for a, v in scores.items() if v[c]}
            chosen[c] = max(inner[c], key=inner[c].get) if inner[c] else alphas[0]
    fits: list[RidgeFit | None] = [None] * m
    for a in dict.fromkeys(chosen):  # one refit per penalty chosen
        cols = [c for c in range(m) if chosen[c] == a]
        dual, y_mean = _solve(kernel.gram, target[:, cols], sw, a)
        weight, bias = kernel.primal(dual, y_mean)
        for j, c in enumerate(cols):
            fits[c] = RidgeFit(weight=weight[:, j], bias=float(bias[j]), alpha=a, inner_rho=inner[c],
                               oof=oof[a][:, c] if a in oof else None, fold=fold_of)
    return fits


def cross_predict(kernel: TapKernel, y: np.ndarray, groups: np.ndarray, *, alpha: float, folds: int = 5,
                  seed: int = 0, sample_weight: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold predictions (n,) of the ridge at penalty `alpha`, and each row's fold id (n,):
    the same inner folds (an image's rows together) and solver as fit_ridge's penalty search, for
    choosing what follows the fit (e.g. a blend weight) on predictions of unseen images."""
    y = np.asarray(y, dtype=np.float64)
    sw = np.sqrt(np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64))
    fold_of = inner_folds(groups, folds, seed)
    pred = np.empty(len(y))
    for k in range(folds):
        tr, te = np.flatnonzero(fold_of != k), np.flatnonzero(fold_of == k)
        if len(te) == 0:
            continue
        dual, y_mean = _solve(kernel.gram[np.ix_(tr, tr)], y[tr], sw[tr], alpha)
        pred[te] = kernel.gram[np.ix_(te, tr)] @ dual + y_mean
    return pred, fold_of
