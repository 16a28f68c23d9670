"""The closed-form fit of the readout head's named outputs on the cached features of a run's
training rows (every cached augmentation of a training photo is a row; a photo's rows stay in
one inner fold).

- "teacher": the teacher's training photos, their scores mapped onto the common scale;
- one output per study trained in the run: its own training photos and targets (with
  readout.labelled_prior = "teacher", fitted as a correction of the teacher output);
- "shared" (model.shared_output): every study's rows with `shared = true`, each study carrying
  `weight` x the mean study's rows (data.balance_studies) or `weight` per row;
- the domain columns (model.domain_gate): a multi-class ridge classifier over every training
  photo, one-hot "which study (or the teacher's photos) is this", each class weighted to the same
  total, one factorisation for all columns.
A study left out of the run (leave-one-study-out) gets zero weights in its output and domain column.
"""
from __future__ import annotations

import time

import numpy as np

from .common import TrainError
from .context import RunContext
from .pool import RunSpec


def fit_readout_head(ctx: RunContext, spec: RunSpec) -> tuple[dict, dict]:
    """Fit every output of ctx.model's readout head for `spec`. Returns (what each fit chose, the
    pool indices of the photos each fit's rows came from)."""
    pool, cfg, model = ctx.pool, ctx.cfg, ctx.model
    if pool.features is None:
        raise TrainError("model.head = 'readout' is fitted on cached features: the trunk must stay frozen")
    names = model.cfg.output_names
    train = spec.train_idx
    which = pool.study_of(train)
    trained = [s for s in pool.studies if s.name in spec.trained]
    jobs = []  # (label, columns, photos, targets (n, m), row weights (n,), kernel share, alphas)
    r = cfg.readout
    if "teacher" in names:
        idx = train[which == len(pool.studies)]
        jobs.append(("teacher", ["teacher"], idx, spec.targets[idx][:, None], spec.weights[idx],
                     r.branch_share_teacher, r.teacher_alphas or r.alphas))
    for s in trained:
        idx = train[which == pool.studies.index(s)]
        share = s.spec.branch_share if s.spec.branch_share >= 0 else r.branch_share_labelled
        jobs.append((s.name, [s.name], idx, spec.targets[idx][:, None], spec.weights[idx], share, r.alphas))
    if "shared" in names:
        idx, w = _shared_rows(ctx, spec, trained, which)
        jobs.append(("shared", ["shared"], idx, spec.targets[idx][:, None], w, r.branch_share_labelled, r.alphas))
    if "domain.teacher" in names:
        cls = np.array([trained.index(pool.studies[k]) if k < len(pool.studies) else len(trained) for k in which])
        y = np.eye(len(trained) + 1)[cls]
        counts = np.bincount(cls, minlength=len(trained) + 1)
        w = 1.0 / (len(trained) + 1) / np.maximum(counts[cls], 1) * len(train)  # each class the same total
        jobs.append(("domain", [f"domain.{s.name}" for s in trained] + ["domain.teacher"], train, y, w, 0.0,
                     r.domain_alphas or r.alphas))
    head = model.head
    import torch

    with torch.no_grad():  # outputs no job fits (a left-out study's) predict nothing
        head.out.weight.zero_()
        head.out.bias.zero_()
    fitted, coef = {}, {}
    for label, columns, idx, y, w, share, alphas in jobs:
        fitted[label] = _fit_job(ctx, spec, label, columns, idx, y, w, share, alphas, coef)
    return fitted, {label: idx for label, _, idx, *_ in jobs}


def _shared_rows(ctx: RunContext, spec: RunSpec, trained, which) -> tuple[np.ndarray, np.ndarray]:
    pool, d = ctx.pool, ctx.cfg.data
    parts = [(s, spec.train_idx[which == pool.studies.index(s)]) for s in trained if s.spec.shared]
    if not parts:
        raise TrainError(f"{spec.name}: model.shared_output has no study with shared = true to fit it on")
    mean_n = np.mean([len(idx) for _, idx in parts])
    weights = [np.full(len(idx), s.spec.weight * (mean_n / len(idx) if d.balance_studies else 1.0))
               for s, idx in parts]
    return np.concatenate([idx for _, idx in parts]), np.concatenate(weights)


def _fit_job(ctx, spec, label, columns, idx, y, row_weight, share, alphas, coef) -> dict:
    from .readout import TapKernel, fit_ridge_columns, output_tap_weights

    cfg, pool, model = ctx.cfg, ctx.pool, ctx.model
    if len(idx) < max(cfg.readout.inner_folds, 3):
        raise TrainError(f"{spec.name}: {len(idx)} {label} training images are too few for the readout fit")
    with_prior = label not in ("teacher", "shared", "domain") and cfg.readout.labelled_prior == "teacher"
    # the same rows, targets and settings as an earlier run of this command (e.g. the teacher output
    # of every fold of a study whose scale reference is the same): the same fit, reused
    key = None if with_prior else _job_key(cfg, columns, idx, y, row_weight, share, alphas)
    if key is not None and key in ctx.memo:
        weights, info = ctx.memo[key]
        _set_columns(model, columns, weights, coef)
        ctx.log(f"{spec.name}: readout output {label} ({info['rows']} rows) alpha {info['alpha']:g}: "
                "the same rows and targets as an earlier run, its fit reused")
        return {**info, "seconds": 0.0, "reused": True}
    start = time.perf_counter()
    augs = pool.features.augmentations
    job_augs = pool.features.augmentations_of(idx)  # teacher photos may be cached unmirrored
    plain = job_augs.index("none") if "none" in job_augs else 0
    x = np.concatenate([pool.features.rows(idx, augs.index(a)) for a in job_augs])
    y = np.tile(y, (len(job_augs), 1))
    prior = None
    if with_prior:
        w_t, b_t = coef["teacher"]
        teacher_pred = x.astype(np.float64) @ w_t + b_t
        scale, shift = np.polyfit(teacher_pred, y[:, 0], 1)  # the teacher output on the common scale
        prior = (scale * teacher_pred + shift)[:, None]
    kernel = TapKernel(x, model.cfg.tap_channels, output_tap_weights(model.cfg, cfg.readout.tap_weighting, share))
    del x
    fits = fit_ridge_columns(kernel, y, np.tile(idx, len(job_augs)), alphas=alphas, folds=cfg.readout.inner_folds,
                             seed=cfg.train.seed, sample_weight=np.tile(row_weight, len(job_augs)),
                             eval_rows=np.repeat(np.arange(len(job_augs)) == plain, len(idx)), offset=prior)
    platt = _platt_gate(ctx, label, columns, kernel, y, row_weight, job_augs, fits)
    del kernel
    weights = []
    for fit in fits:
        weight, bias = fit.weight, fit.bias
        if prior is not None:
            weight, bias = weight + scale * w_t, bias + scale * b_t + shift
        weights.append((weight, bias))
    _set_columns(model, columns, weights, coef)
    info = {"rows": int(len(idx) * len(job_augs)), "alpha": fits[0].alpha, "branch_share": share,
            "inner_cv_spearman": {str(a): r for a, r in fits[0].inner_rho.items()}}
    if platt:
        info["platt"] = platt
    if label in pool.names and pool.study(label).spec.blend_cv:
        info.update(_blend_by_inner_cv(ctx, idx, y[:, 0], fits[0], len(job_augs), plain, coef))
        ctx.log(f"{spec.name}: profile {label}: blend {info['blend']:g} by inner CV "
                f"(rho {info['blend_inner_cv_spearman'][info['blend']]:.4f})")
    info["seconds"] = time.perf_counter() - start
    if len(columns) > 1:
        info["columns"] = {c: {"alpha": f.alpha, "inner_cv_spearman": {str(a): r for a, r in f.inner_rho.items()}}
                           for c, f in zip(columns, fits)}
    if prior is not None:
        info["teacher_prior"] = {"scale": float(scale), "shift": float(shift)}
    if key is not None:
        ctx.memo[key] = (weights, info)
    inner = ", ".join(f"{a:g}: {r:.4f}" for a, r in fits[0].inner_rho.items())
    ctx.log(f"{spec.name}: readout output {label} ({info['rows']} rows"
            + (f", {len(columns)} columns" if len(columns) > 1 else "")
            + (f", shrunk towards {scale:.3f} x teacher output + {shift:.3f}" if prior is not None else "")
            + f") alpha {fits[0].alpha:g}" + (f" (inner-CV rho {inner})" if inner else "")
            + f", {info['seconds']:.0f} s")
    return info


def _blend_by_inner_cv(ctx, idx, y, fit, n_augs, plain, coef) -> dict:
    """The study profile's blend (profile_choice.choose_blend) from the out-of-fold predictions of
    its output's chosen penalty on the unaugmented rows, against the teacher output on them."""
    from .profile_choice import choose_blend

    if fit.oof is None or "teacher" not in coef:
        raise TrainError("blend_cv needs an inner CV (two or more readout.alphas) and the teacher output")
    rows = slice(plain * len(idx), (plain + 1) * len(idx))
    features = ctx.pool.features
    w_t, b_t = coef["teacher"]
    teacher = features.rows(idx, features.augmentations.index("none")).astype(np.float64) @ w_t + b_t
    b, rho = choose_blend(fit.oof[rows], teacher, y[rows], fit.fold[rows])
    return {"blend": b, "blend_inner_cv_spearman": rho}


def _platt_gate(ctx, label, columns, kernel, y, row_weight, job_augs, fits) -> dict:
    """profiles.gate = "platt": per study column, the (centre, width) of a Platt fit on the domain
    output's leave-one-out outputs over its own training rows (that study's photos against all the
    others). {} for other outputs and gates."""
    from .profile_choice import loo_outputs, platt

    if label != "domain" or ctx.cfg.profiles.gate != "platt":
        return {}
    if len({f.alpha for f in fits}) > 1:
        raise TrainError("profiles.gate = 'platt' needs one penalty for every domain column: "
                         "give readout.domain_alphas one value")
    loo = loo_outputs(kernel.gram, y, np.tile(row_weight, len(job_augs)), fits[0].alpha)
    out = {}
    for j, column in enumerate(columns[:-1]):  # the teacher's column: general takes the rest
        out[column.split(".", 1)[1]] = list(platt(loo[:, j], y[:, j] > 0.5))
    return out


def _set_columns(model, columns, weights, coef) -> None:
    import torch

    head, names = model.head, model.cfg.output_names
    for column, (weight, bias) in zip(columns, weights):
        coef[column] = (weight, bias)
        with torch.no_grad():
            head.out.weight[names.index(column)] = torch.from_numpy(weight).to(head.out.weight)
            head.out.bias[names.index(column)] = float(bias)


def _job_key(cfg, columns, idx, y, row_weight, share, alphas) -> str:
    import hashlib
    import json

    h = hashlib.sha256(json.dumps([list(columns), float(share), [float(a) for a in alphas], cfg.readout.tap_weighting,
                                   cfg.readout.inner_folds, cfg.train.seed]).encode())
    for arr in (idx, y, row_weight):
        h.update(np.ascontiguousarray(arr, dtype=np.float64).tobytes())
    return h.hexdigest()
