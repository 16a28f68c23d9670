"""`resmemnet adapt`: a new score profile fitted to a user's own labelled photos, on the CPU,
reusing a checkpoint's frozen trunk and readout head.

The fit (the recipe the project's measurements chose, docs/training.md "Bring your own labels"):
- a new output column U of the readout head: ridge regression of the user's scores on the
  trunk's pooled taps of every photo and its mirror image (readout.TapKernel / fit_ridge, the
  training module's own), the penalty chosen by inner 5-fold CV (a photo's rows in one fold);
- the profile NAME = scale * (b * U / sd(U) + (1 - b) * T / sd(T)) + shift, with T the head's
  teacher output (the `general` profile): a z-scored blend, b = 0.5 by default (`--blend`; with
  a grid, chosen by inner CV on out-of-fold predictions of U: on cdm_dev's 512 photos that
  choice was too noisy, 5-fold CV rho 0.200 against 0.234 at 0.5), sd(U) that of the
  out-of-fold predictions, scale and shift the least-squares map of the out-of-fold blend onto
  the user's scores;
- its percentile quantiles: NAME's scores of the user's own photos (the reference photos of the
  shipped profiles are not shipped, so they cannot be scored here).

`cross_validate` measures it: k-fold CV (seeded; a photo and its mirror always in one fold), the
whole fit repeated inside each training fold, beside the checkpoint's own profiles (and the
`resmem` package's scores when given) on the same test folds.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np

from .metrics import spearman

ALPHAS = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0)  # wider than training's: 10-30 chosen at 512 photos, unstable below 200
BLEND_GRID = tuple(round(0.05 * i, 2) for i in range(21))
AUGMENTATIONS = ("none", "hflip")


@dataclass(frozen=True)
class AdaptSettings:
    """How `resmemnet adapt` fits and measures a profile."""

    name: str
    folds: int = 5  # outer k-fold CV of the report
    inner_folds: int = 5  # penalty and blend choice inside the training photos
    seed: int = 0
    alphas: tuple[float, ...] = ALPHAS
    blend_grid: tuple[float, ...] = BLEND_GRID  # b chosen by inner CV; one value: b fixed (the command's default 0.5)
    tap_weighting: str = "stage"  # readout.TAP_WEIGHTINGS; the shipped readout's


@dataclass
class ProfileFit:
    """The fitted output column and blend of one set of training photos."""

    weight: np.ndarray  # (D,) on raw pooled taps
    bias: float
    alpha: float
    blend: float  # b
    weights: tuple[float, float]  # of (U, T) in the profile
    scale: float
    shift: float
    inner_rho: dict = field(default_factory=dict)  # alpha -> inner-CV rho of U alone

    def raw(self, u: np.ndarray, t: np.ndarray) -> np.ndarray:
        return self.scale * (self.weights[0] * u + self.weights[1] * t) + self.shift


def teacher_column(cfg) -> int:
    from ..errors import InputError

    names = cfg.output_names
    if cfg.head != "readout" or "teacher" not in names:
        raise InputError(f"adapt needs a checkpoint with a readout head and a teacher output (this one has head "
                         f"{cfg.head!r}, outputs {', '.join(names)})")
    return names.index("teacher")


def head_outputs(model, feats: np.ndarray) -> np.ndarray:
    """(N, D) pooled taps -> (N, n_outputs) outputs of the model's readout head (fp32, as served)."""
    w = model.head.out.weight.detach().double().numpy()
    b = model.head.out.bias.detach().double().numpy()
    return np.asarray(feats, dtype=np.float64) @ w.T + b


def profile_columns(outputs: np.ndarray, cfg, names) -> dict[str, np.ndarray]:
    """Each profile's (N,) score of (N, n_outputs) head outputs."""
    import torch

    from ..profiles import profile_score

    t = torch.from_numpy(outputs)
    return {p: profile_score(t, cfg, p).double().numpy() for p in names}


def _z(v: np.ndarray) -> np.ndarray:
    return (v - v.mean()) / (v.std() or 1.0)


def choose_blend(u_oof: np.ndarray, t: np.ndarray, y: np.ndarray, fold_of: np.ndarray, grid) -> float:
    """b of b * z(U) + (1 - b) * z(T) with the best mean per-fold rho; the smallest such b (T alone
    unless U adds something)."""
    if len(grid) == 1:
        return float(grid[0])
    zu, zt = _z(u_oof), _z(t)
    best, chosen = -2.0, 0.0
    for b in grid:
        p = b * zu + (1.0 - b) * zt
        r = float(np.mean([spearman(p[fold_of == k], y[fold_of == k]) for k in np.unique(fold_of)]))
        if r > best + 1e-9:
            best, chosen = r, float(b)
    return chosen


def fit_profile(feats: np.ndarray, y: np.ndarray, t: np.ndarray, idx: np.ndarray, model_cfg,
                s: AdaptSettings) -> ProfileFit:
    """Fit U and the blend on photos `idx`. feats (N, A, D) pooled taps (A: AUGMENTATIONS, "none"
    first), y (N,) scores, t (N,) teacher output of the unaugmented photos."""
    from .profile_fit import affine_fit
    from .readout import TapKernel, cross_predict, fit_ridge, output_tap_weights

    n, a = len(idx), feats.shape[1]
    x = np.concatenate([np.asarray(feats[idx, k], dtype=np.float32) for k in range(a)])
    groups, target = np.tile(idx, a), np.tile(y[idx], a)
    kernel = TapKernel(x, model_cfg.tap_channels, output_tap_weights(model_cfg, s.tap_weighting))
    fit = fit_ridge(kernel, target, groups, alphas=s.alphas, folds=s.inner_folds, seed=s.seed,
                    eval_rows=np.repeat(np.arange(a) == 0, n))
    oof, fold_of = cross_predict(kernel, target, groups, alpha=fit.alpha, folds=s.inner_folds, seed=s.seed)
    del kernel
    u_oof = oof[:n]
    b = choose_blend(u_oof, t[idx], y[idx], fold_of[:n], s.blend_grid)
    # z-scores and calibration from the out-of-fold U: on photos it never saw, U spreads like
    # u_oof, not like its fitted values on its own training photos (wider: the fit follows them).
    weights = (b / (u_oof.std() or 1.0), (1.0 - b) / (t[idx].std() or 1.0))
    scale, shift = affine_fit(weights[0] * u_oof + weights[1] * t[idx], y[idx])
    if not scale > 0:  # the blend does not rise with the scores on its own photos: keep the ranking, centre it
        scale, shift = float(y[idx].std() or 1.0), float(y[idx].mean())
    return ProfileFit(weight=fit.weight, bias=fit.bias, alpha=fit.alpha, blend=b, weights=weights, scale=scale,
                      shift=shift, inner_rho=fit.inner_rho)


def cross_validate(feats, y, outputs, model, s: AdaptSettings, *, resmem: np.ndarray | None = None,
                   log=print) -> dict:
    """k-fold CV rho (mean, sd, per fold) of NAME beside the checkpoint's own profiles (and resmem's
    scores) on the same test folds. outputs: (N, n_outputs) head outputs of the unaugmented photos."""
    from ..profiles import profile_specs, soft_clamp
    from .splits import kfold_test_sets

    import torch

    cfg = model.cfg
    t = outputs[:, teacher_column(cfg)]
    shipped = [p.name for p in profile_specs(cfg) if p.kind != "alias"]
    theirs = profile_columns(outputs, cfg, shipped)
    if resmem is not None:
        theirs["resmem"] = resmem
    per_fold = {k: [] for k in (s.name, *theirs)}
    chosen = []
    keys = [str(i) for i in range(len(y))]
    for k, test in enumerate(kfold_test_sets(keys, s.folds, s.seed)):
        te = np.array(sorted(int(i) for i in test))
        tr = np.setdiff1d(np.arange(len(y)), te)
        fit = fit_profile(feats, y, t, tr, cfg, s)
        u = np.asarray(feats[te, 0], dtype=np.float64) @ fit.weight + fit.bias
        mine = soft_clamp(torch.from_numpy(fit.raw(u, t[te]))).numpy()
        per_fold[s.name].append(spearman(mine, y[te]))
        for name, scores in theirs.items():
            per_fold[name].append(spearman(scores[te], y[te]))
        chosen.append({"alpha": fit.alpha, "blend": fit.blend})
        log(f"  fold {k + 1}/{s.folds}: rho {s.name} {per_fold[s.name][-1]:.3f}, general "
            f"{per_fold.get('general', [float('nan')])[-1]:.3f} (alpha {fit.alpha:g}, blend {fit.blend:.2f})")
    table = {name: {"mean": float(np.mean(v)), "sd": float(np.std(v)), "folds": [float(r) for r in v]}
             for name, v in per_fold.items()}
    return {"folds": s.folds, "seed": s.seed, "n": int(len(y)), "spearman": table, "chosen": chosen}


def adapted_model(model, fit: ProfileFit, s: AdaptSettings, description: str):
    """A copy of `model` whose head has the new output column s.name and whose config adds the
    blend profile s.name to every profile it had (a checkpoint without named outputs gets its
    legacy ones named, so its own profiles score exactly as before)."""
    import torch

    from ..network import ResMemNet
    from ..profiles import ProfileSpec, profile_specs

    cfg = model.cfg
    spec = ProfileSpec(s.name, inputs=(s.name, "teacher"), weights=fit.weights, scale=fit.scale, shift=fit.shift,
                       description=description)
    new_cfg = replace(cfg, outputs=(*cfg.output_names, s.name), profiles=(*profile_specs(cfg), spec))
    new = ResMemNet(new_cfg)
    state = {k: v for k, v in model.state_dict().items()}
    w = torch.from_numpy(fit.weight).to(state["head.out.weight"])
    state["head.out.weight"] = torch.cat([state["head.out.weight"], w[None]])
    state["head.out.bias"] = torch.cat([state["head.out.bias"], torch.tensor([fit.bias]).to(state["head.out.bias"])])
    new.load_state_dict(state)
    new.set_trunk_frozen(True)
    return new.eval()


def quantiles(scores: np.ndarray) -> list[float]:
    """The 0th..100th percentile of `scores` (what CheckpointMeta.percentile reads)."""
    return [round(float(q), 6) for q in np.quantile(scores, np.linspace(0.0, 1.0, 101))]


@dataclass
class AdaptResult:
    model: object
    fit: ProfileFit
    cv: dict
    quantiles: list[float]
    seconds: dict


def adapt(feats: np.ndarray, y: np.ndarray, model, s: AdaptSettings, *, resmem: np.ndarray | None = None,
          description: str = "", log=print) -> AdaptResult:
    """Measure (cross_validate) and fit (on every photo) the profile s.name. feats (N, A, D)."""
    from ..profiles import profile_score

    import torch

    start = time.perf_counter()
    outputs = head_outputs(model, feats[:, 0])
    t = outputs[:, teacher_column(model.cfg)]
    cv = cross_validate(feats, y, outputs, model, s, resmem=resmem, log=log)
    cv_seconds = time.perf_counter() - start
    fit = fit_profile(feats, y, t, np.arange(len(y)), model.cfg, s)
    new = adapted_model(model, fit, s, description)
    mine = profile_score(torch.from_numpy(head_outputs(new, feats[:, 0])), new.cfg, s.name).double().numpy()
    return AdaptResult(model=new, fit=fit, cv=cv, quantiles=quantiles(mine),
                       seconds={"cv": cv_seconds, "fit": time.perf_counter() - start - cv_seconds})
