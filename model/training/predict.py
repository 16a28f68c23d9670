"""Scores of pool images (from the feature cache or the whole network), the score
calibration, and the blend curve of a CV fold."""
from __future__ import annotations

from contextlib import nullcontext

import numpy as np

from .config import Config
from .model_setup import amp_dtype
from .pool import ImageLoader, Pool, RunSpec


def predict(model, pool: Pool, idx, cfg: Config, loader: ImageLoader, device, *, trunk_changed: bool,
            amp=(None, False)) -> np.ndarray:
    """Scores of pool images `idx` (no augmentation): from the feature cache while the trunk is
    unchanged, else through the whole network."""
    import torch

    idx = np.asarray(idx, dtype=int)
    out = np.zeros(len(idx), dtype=np.float64)
    if len(idx) == 0:
        return out
    was_training = model.training
    model.eval()
    bs = cfg.train.eval_batch_size
    try:
        with torch.no_grad():
            if pool.features is not None and not trunk_changed and "none" in pool.features.augmentations:
                from ..network import blend_outputs

                return blend_outputs(torch.from_numpy(head_outputs(model, pool, idx, cfg, device)),
                                     model.cfg).numpy().astype(np.float64)
            position = {int(i): k for k, i in enumerate(idx)}
            dtype, _ = amp
            autocast = (lambda: torch.autocast("cuda", dtype=dtype)) if dtype is not None else nullcontext
            for x, b in loader.iterate(loader.batches(idx, bs), pin=device.type == "cuda"):
                x = x.to(device, non_blocking=True)
                if device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast():
                    pooled = model.forward_features(x)
                scores = model.head([p.float() for p in pooled]).float().cpu().numpy()
                for i, s in zip(b, scores):
                    out[position[int(i)]] = s
        return out
    finally:
        model.train(was_training)


def calibrate_score(model, pool: Pool, spec: RunSpec, cfg: Config, loader, device, trunk_changed: bool,
                    log=print) -> None:
    """Fit score = scale * blended output + shift to the labelled training scores (least squares).
    The teacher output is fitted to teacher scores on other photos, so on labelled photos the blend
    is off the labelled scale (CV MSE 0.034 against 0.014); the map keeps the ranking (scale > 0).
    With a domain gate the map is fitted to the blend before the gate (what the gate weighs)."""
    model.set_score_calibration(1.0, 0.0)
    lab = spec.train_idx[spec.train_idx < pool.n_labelled]
    if len(lab) < 2:
        return
    if model.cfg.domain_gate:
        out = head_outputs(model, pool, lab, cfg, device)
        pred = model.cfg.score_blend * out[:, 0] + (1.0 - model.cfg.score_blend) * out[:, 1]
    else:
        pred = predict(model, pool, lab, cfg, loader, device, trunk_changed=trunk_changed,
                       amp=amp_dtype(cfg, device))
    y = pool.labelled.scores[lab].astype(np.float64)
    scale, shift = affine_fit(pred, y)
    if scale <= 0:
        log(f"{spec.name}: score calibration skipped (training scores do not rise with the predictions)")
        return
    model.set_score_calibration(scale, shift)
    log(f"{spec.name}: score calibration {scale:.4f} * score + {shift:.4f}")


def affine_fit(pred, y) -> tuple[float, float]:
    """Least-squares (scale, shift) of y on pred; scale 0 when pred is constant."""
    pred, y = np.asarray(pred, dtype=np.float64), np.asarray(y, dtype=np.float64)
    var = float(np.var(pred))
    scale = float(np.cov(pred, y, bias=True)[0, 1] / var) if var > 1e-12 else 0.0
    return scale, float(y.mean() - scale * pred.mean())


def calibrated_for_blend(model_cfg, blend: float, train_out: np.ndarray, train_y: np.ndarray, **changes):
    """model_cfg with score_blend = blend and its calibration refitted (affine_fit) to the labelled
    training photos' outputs (n, n_outputs) and scores, as calibrate_score fits it for a gated head;
    `changes` replace other fields (e.g. the gate's)."""
    from dataclasses import replace

    scale, shift = affine_fit(blend * train_out[:, 0] + (1 - blend) * train_out[:, 1], train_y)
    return replace(model_cfg, score_blend=blend, score_scale=max(scale, 1e-6), score_shift=shift, **changes)


BLEND_GRID = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0)


def head_outputs(model, pool: Pool, idx, cfg: Config, device) -> np.ndarray:
    """(n, n_outputs) outputs of the head for pool images `idx`, from the feature cache."""
    import torch

    idx = np.asarray(idx, dtype=int)
    a = pool.features.augmentations.index("none")
    bs = cfg.train.eval_batch_size
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            parts = [model.head.outputs(model.head.split_flat(torch.from_numpy(pool.features.rows(idx[lo:lo + bs], a))
                                                              .to(device))).float().cpu().numpy()
                     for lo in range(0, len(idx), bs)]
    finally:
        model.train(was_training)
    return np.concatenate(parts) if parts else np.zeros((0, model.cfg.n_outputs))


def blend_curve(model, pool: Pool, spec: RunSpec, cfg: Config, device) -> list[dict]:
    """Test rho and teacher-holdout agreement of every score_blend in BLEND_GRID, for a model with
    a teacher output: one CV run shows the whole trade-off the blend is chosen from. With a
    domain gate, each row also gives the gated score's rho and agreement ("gated_" keys), its
    calibration refitted for that blend on the fold's labelled training photos."""
    import torch

    from ..network import blend_outputs
    from .metrics import spearman

    test = head_outputs(model, pool, spec.test_idx, cfg, device)
    truth = pool.labelled.scores[spec.test_idx]
    hold = head_outputs(model, pool, spec.holdout_idx, cfg, device) if len(spec.holdout_idx) > 1 else None
    gated = model.cfg.domain_gate
    if gated:
        lab = spec.train_idx[spec.train_idx < pool.n_labelled]
        train_out, train_y = head_outputs(model, pool, lab, cfg, device), pool.labelled.scores[lab]
    rows = []
    for b in BLEND_GRID:
        row = {"blend": b, "spearman": spearman(b * test[:, 0] + (1 - b) * test[:, 1], truth)}
        if hold is not None:
            row["teacher_holdout_spearman"] = spearman(b * hold[:, 0] + (1 - b) * hold[:, 1],
                                                       teacher_truth(pool, spec.holdout_idx))
        if gated:
            mcfg = calibrated_for_blend(model.cfg, b, train_out, train_y)
            score = lambda out: blend_outputs(torch.from_numpy(out), mcfg).numpy()  # noqa: E731
            row["gated_spearman"] = spearman(score(test), truth)
            if hold is not None:
                row["gated_teacher_holdout_spearman"] = spearman(score(hold), teacher_truth(pool, spec.holdout_idx))
        rows.append(row)
    return rows


def metrics_on(model, pool, spec_idx, truth, cfg, loader, device, trunk_changed, amp) -> dict:
    from .metrics import mse, spearman

    if len(spec_idx) < 2:
        return {}
    pred = predict(model, pool, spec_idx, cfg, loader, device, trunk_changed=trunk_changed, amp=amp)
    return {"spearman": spearman(pred, truth), "mse": mse(pred, truth), "pred": pred}


def teacher_truth(pool: Pool, idx) -> np.ndarray:
    return pool.teacher.scores[np.asarray(idx) - pool.n_labelled]

