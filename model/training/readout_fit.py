"""The closed-form fit of the readout head on the cached features of a run's training rows."""
from __future__ import annotations

import time

import numpy as np

from .common import TrainError
from .config import Config
from .pool import Pool, RunSpec


def fit_readout_head(model, pool: Pool, spec: RunSpec, cfg: Config, device, log=print) -> dict:
    """Fit the readout head's outputs in closed form (model/training/readout.py) on the cached
    features of the training rows, every augmentation a row: output 0 on the labelled images (or
    on every row, teacher rows weighted, without a teacher output), output 1 on the teacher rows,
    output 2 (model.domain_gate) on both: 1 for labelled, 0 for teacher photos, each class
    weighted to half the total (a ridge classifier of "looks like the labelled set").
    With readout.labelled_prior = "teacher", output 0 is fitted as a correction of output 1."""
    import torch

    from .readout import TapKernel, fit_ridge, output_tap_weights

    if pool.features is None:
        raise TrainError("model.head = 'readout' is fitted on cached features: the trunk must stay frozen")
    augs = pool.features.augmentations
    train = spec.train_idx
    is_teacher = train >= pool.n_labelled
    # (output, name, images); the teacher output first: the labelled one may use it as its prior.
    if model.cfg.teacher_output:
        jobs = [(1, "teacher", train[is_teacher]), (0, "labelled", train[~is_teacher])]
        if model.cfg.domain_gate:
            jobs.append((2, "domain", train))
    else:
        jobs = [(0, "labelled", train)]
    shares = {"labelled": cfg.readout.branch_share_labelled, "teacher": cfg.readout.branch_share_teacher,
              "domain": 0.0}
    head = model.head
    fitted, coef = {}, {}
    for out, name, idx in jobs:
        if len(idx) < max(cfg.readout.inner_folds, 3):
            raise TrainError(f"{spec.name}: {len(idx)} {name} training images are too few for the readout fit")
        start = time.perf_counter()
        job_augs = pool.features.augmentations_of(idx)  # teacher photos may be cached unmirrored
        plain = job_augs.index("none") if "none" in job_augs else 0
        x = np.concatenate([pool.features.rows(idx, augs.index(a)) for a in job_augs])
        y = np.tile(spec.targets[idx], len(job_augs))
        row_weight = spec.weights[idx]
        if name == "domain":
            lab = idx < pool.n_labelled
            y = np.tile(lab.astype(np.float64), len(job_augs))
            # each class carries half the weight, whatever the sizes of the two sets
            row_weight = np.where(lab, 0.5 / max(lab.sum(), 1), 0.5 / max((~lab).sum(), 1)) * len(idx)
        prior = None
        if name == "labelled" and cfg.readout.labelled_prior == "teacher":
            w_t, b_t = coef[1]
            teacher_pred = x.astype(np.float64) @ w_t + b_t
            scale, shift = np.polyfit(teacher_pred, y, 1)  # the teacher output on the labelled scale
            prior = scale * teacher_pred + shift
        weights = output_tap_weights(model.cfg, cfg.readout.tap_weighting, shares[name])
        kernel = TapKernel(x, model.cfg.tap_channels, weights)
        del x
        alphas = cfg.readout.teacher_alphas if name == "teacher" and cfg.readout.teacher_alphas else cfg.readout.alphas
        fit = fit_ridge(kernel, y, np.tile(idx, len(job_augs)), alphas=alphas,
                        folds=cfg.readout.inner_folds, seed=cfg.train.seed,
                        sample_weight=np.tile(row_weight, len(job_augs)),
                        eval_rows=np.repeat(np.arange(len(job_augs)) == plain, len(idx)), offset=prior)
        del kernel
        weight, bias = fit.weight, fit.bias
        if prior is not None:
            weight, bias = weight + scale * w_t, bias + scale * b_t + shift
        coef[out] = (weight, bias)
        with torch.no_grad():
            head.out.weight[out] = torch.from_numpy(weight).to(head.out.weight)
            head.out.bias[out] = float(bias)
        fitted[name] = {"rows": int(len(idx) * len(job_augs)), "alpha": fit.alpha, "branch_share": shares[name],
                        "inner_cv_spearman": {str(a): r for a, r in fit.inner_rho.items()},
                        "seconds": time.perf_counter() - start}
        if prior is not None:
            fitted[name]["teacher_prior"] = {"scale": float(scale), "shift": float(shift)}
        inner = ", ".join(f"{a:g}: {r:.4f}" for a, r in fit.inner_rho.items())
        log(f"{spec.name}: readout output {out} ({name}, {fitted[name]['rows']} rows"
            + (f", shrunk towards {scale:.3f} x teacher output + {shift:.3f}" if prior is not None else "")
            + f") alpha {fit.alpha:g}" + (f" (inner-CV rho {inner})" if inner else "")
            + f", {fitted[name]['seconds']:.0f} s")
    return fitted

