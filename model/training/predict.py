"""Head outputs of pool photos (from the feature cache, or through the whole network once its
trunk was trained), computed once per run, and what is read off them: every profile's scores,
metrics, and the blend curve of a CV fold."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np

from .context import RunContext
from .pool import RunSpec

BLEND_GRID = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0)


def outputs_from_cache(ctx: RunContext, trunk_changed: bool) -> bool:
    """Whether the head's outputs can be read off the feature cache: it exists, holds the
    unaugmented rows, and the trunk it was made with was not trained since."""
    f = ctx.pool.features
    return f is not None and not trunk_changed and "none" in f.augmentations


def head_outputs(ctx: RunContext, idx, *, trunk_changed: bool = False) -> np.ndarray:
    """(n, n_outputs) float32 head outputs of pool photos `idx` (unaugmented), in eval mode."""
    import torch

    model, idx = ctx.model, np.asarray(idx, dtype=int)
    out = np.zeros((len(idx), model.cfg.n_outputs), dtype=np.float32)
    if len(idx) == 0:
        return out
    was_training = model.training
    model.eval()
    bs = ctx.cfg.train.eval_batch_size
    try:
        with torch.no_grad():
            if outputs_from_cache(ctx, trunk_changed):
                a = ctx.pool.features.augmentations.index("none")
                for lo in range(0, len(idx), bs):
                    flat = torch.from_numpy(ctx.pool.features.rows(idx[lo:lo + bs], a)).to(ctx.device)
                    out[lo:lo + bs] = model.head.outputs(model.head.split_flat(flat)).float().cpu().numpy()
                return out
            position = {int(i): k for k, i in enumerate(idx)}
            dtype, _ = ctx.amp
            autocast = (lambda: torch.autocast("cuda", dtype=dtype)) if dtype is not None else nullcontext
            loader = ctx.loader
            for x, b in loader.iterate(loader.batches(idx, bs), pin=ctx.device.type == "cuda"):
                x = x.to(ctx.device, non_blocking=True)
                if ctx.device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast():
                    pooled = model.forward_features(x)
                values = model.head.outputs([p.float() for p in pooled]).float().cpu().numpy()
                for i, v in zip(b, values):
                    out[position[int(i)]] = v
        return out
    finally:
        model.train(was_training)


def scores_of(outputs: np.ndarray, model_cfg, profile: str = "default") -> np.ndarray:
    """(n,) float64 scores of one profile from (n, n_outputs) head outputs."""
    import torch

    from ..profiles import profile_score

    return profile_score(torch.from_numpy(np.ascontiguousarray(outputs)), model_cfg, profile).numpy().astype(np.float64)


def predict(ctx: RunContext, idx, *, trunk_changed: bool, profile: str = "default") -> np.ndarray:
    return scores_of(head_outputs(ctx, idx, trunk_changed=trunk_changed), ctx.model.cfg, profile)


def metrics_on(ctx: RunContext, idx, truth, trunk_changed: bool) -> dict:
    from .metrics import mse, spearman

    if len(idx) < 2:
        return {}
    pred = predict(ctx, idx, trunk_changed=trunk_changed)
    return {"spearman": spearman(pred, truth), "mse": mse(pred, truth), "pred": pred}


@dataclass
class RunOutputs:
    """The head outputs of every photo a run reads after training (its test, teacher-holdout and
    validation photos, and each trained study's training photos, for the profiles' calibration),
    computed once."""

    idx: np.ndarray  # sorted unique pool indices
    values: np.ndarray  # (len(idx), n_outputs)
    readout: dict | None = None  # what the readout fit chose (blends by inner CV, the Platt gate), if any
    teacher_train: np.ndarray | None = None  # the teacher's training photos, with profiles.align = "teacher"

    @classmethod
    def of_run(cls, ctx: RunContext, spec: RunSpec, *, trunk_changed: bool, readout: dict | None = None
               ) -> "RunOutputs":
        lab = spec.train_idx[spec.train_idx < ctx.pool.n_labelled]
        parts = [spec.test_idx, spec.holdout_idx, spec.val_idx, lab]
        teacher_train = None
        if ctx.cfg.profiles.align == "teacher":  # the level offsets are means over them
            teacher_train = spec.train_idx[spec.train_idx >= ctx.pool.n_labelled].astype(int)
            parts.append(teacher_train)
        idx = np.unique(np.concatenate(parts).astype(int))
        return cls(idx, head_outputs(ctx, idx, trunk_changed=trunk_changed), readout, teacher_train)

    def __getitem__(self, idx) -> np.ndarray:
        return self.values[np.searchsorted(self.idx, np.asarray(idx, dtype=int))]

    def training_by_study(self, ctx: RunContext, spec: RunSpec) -> dict:
        """study -> (outputs, common-scale targets) of its training photos, for profile_fit."""
        which = ctx.pool.study_of(spec.train_idx)
        out = {}
        for k, s in enumerate(ctx.pool.studies):
            if s.name in spec.trained:
                idx = spec.train_idx[which == k]
                cal = spec.targets if spec.calibration is None else spec.calibration
                out[s.name] = (self[idx], cal[idx])
        return out

    def fitted(self) -> dict:
        """fit_profiles' keyword arguments from what the readout fit chose and the teacher photos' outputs."""
        r = self.readout or {}
        out = {"chosen_blends": {k: v["blend"] for k, v in r.items() if isinstance(v, dict) and "blend" in v},
               "platt": {k: tuple(v) for k, v in r.get("domain", {}).get("platt", {}).items()}}
        if self.teacher_train is not None:
            out["align_outputs"] = self[self.teacher_train]
        return out


def fit_run_profiles(ctx: RunContext, spec: RunSpec, outputs: RunOutputs, **changes):
    """The run's profiles (profile_fit.fit_profiles on its training photos' outputs), set on the model."""
    from .profile_fit import fit_profiles

    profiles = fit_profiles(ctx.cfg, ctx.model.cfg.output_names, outputs.training_by_study(ctx, spec),
                            log=lambda m: ctx.log(f"{spec.name}: {m}"), **outputs.fitted(), **changes)
    ctx.model.set_profiles(profiles)
    for p in profiles:
        if p.kind == "blend" and (p.scale, p.shift) != (1.0, 0.0):
            ctx.log(f"{spec.name}: profile {p.name}: score calibration {p.scale:.4f} * blend + {p.shift:.4f}")
    return profiles


def blend_curve(ctx: RunContext, spec: RunSpec, outputs: RunOutputs) -> list[dict]:
    """Test rho and teacher-holdout agreement of the test study's profile for every blend in
    BLEND_GRID (its calibration refitted per blend; training does not depend on the blend, so one
    CV run shows the whole trade-off), and with a gated default the default profile's ("gated_")."""
    from dataclasses import replace

    from .metrics import spearman
    from .profile_fit import fit_profiles

    truth = ctx.pool.truth
    test, hold = outputs[spec.test_idx], outputs[spec.holdout_idx] if len(spec.holdout_idx) > 1 else None
    train = outputs.training_by_study(ctx, spec)
    layout, rows = ctx.model.cfg.output_names, []
    for b in BLEND_GRID:
        mcfg = replace(ctx.model.cfg, profiles=fit_profiles(ctx.cfg, layout, train, blends={spec.test_study: b},
                                                            **outputs.fitted()))
        row = {"blend": b, "spearman": spearman(scores_of(test, mcfg, spec.test_study), truth[spec.test_idx])}
        if hold is not None:
            row["teacher_holdout_spearman"] = spearman(scores_of(hold, mcfg, spec.test_study), truth[spec.holdout_idx])
        if next(p for p in mcfg.profiles if p.name == "default").kind == "mixture":
            row["gated_spearman"] = spearman(scores_of(test, mcfg), truth[spec.test_idx])
            if hold is not None:
                row["gated_teacher_holdout_spearman"] = spearman(scores_of(hold, mcfg), truth[spec.holdout_idx])
        rows.append(row)
    return rows
