"""One training run (fit, head outputs once, profiles, the files every run writes) and the final
model with its checkpoint. Cross-validation's protocols are in cv.py."""
from __future__ import annotations

import csv
import json
import subprocess
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .common import TrainError, to_plain
from .context import RunContext
from .loop import fit
from .pool import RunSpec, make_run_spec
from .predict import RunOutputs, fit_run_profiles, outputs_from_cache, scores_of

REPO = Path(__file__).resolve().parents[2]


def train_run(ctx: RunContext, spec: RunSpec) -> tuple[dict, RunOutputs] | None:
    """Train `spec` from the initial model, compute the head outputs it needs once, fit its
    profiles. None when --stop-after stopped it. Every rank trains; the outputs and profiles are
    the same on every rank (they only read the model)."""
    ctx.reset_model()
    summary = fit(ctx, spec)
    if summary is None:
        return None
    outputs = RunOutputs.of_run(ctx, spec, trunk_changed=summary["trunk_changed"], readout=summary.get("readout"))
    fit_run_profiles(ctx, spec, outputs)
    return summary, outputs


def write_predictions(path: Path, ctx: RunContext, idx, pred) -> None:
    keys, truth = ctx.pool.keys, ctx.pool.truth
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "true", "predicted"])
        for i, p in zip(idx, pred):
            w.writerow([keys[i], f"{truth[i]:.6f}", f"{p:.6f}"])


def write_head_outputs(path: Path, ctx: RunContext, spec: RunSpec, outputs: RunOutputs) -> None:
    """Every head output of the run's test, training (studies'), validation and teacher-holdout
    photos, with their study, human or teacher score (`truth`) and common-scale training target:
    every profile setting (blends, calibrations, gates) can be re-scored from them without a refit
    (`research/gate_sweep.py`)."""
    pool = ctx.pool
    keys, truth, names = pool.keys, pool.truth, ctx.model.cfg.output_names
    study = [s.name for s in pool.studies] + ["teacher"]
    lab = spec.train_idx[spec.train_idx < pool.n_labelled]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "study", "set", "truth", "target", *(f"output_{n}" for n in names)])
        for name, idx in (("test", spec.test_idx), ("train", lab), ("val", spec.val_idx),
                          ("teacher_holdout", spec.holdout_idx)):
            which = pool.study_of(idx)
            for i, k, row in zip(idx, which, outputs[idx]):
                # exact: float32 outputs round-trip with 9 digits, float64 scores with 17
                target = f"{spec.targets[i]:.17g}" if name == "train" else ""
                w.writerow([keys[int(i)], study[k], name, f"{truth[i]:.17g}", target, *(f"{v:.9g}" for v in row)])


def run_final(ctx: RunContext) -> bool:
    """Train the final model on every study's final split and the teacher's training photos; rank 0
    writes metrics.json, head_outputs.csv and the checkpoint."""
    from .metrics import mse, spearman

    plan = ctx.pool.plan["studies"]
    spec = make_run_spec(ctx.cfg, ctx.pool, "final", ctx.run_dir, {s: p["final"]["train"] for s, p in plan.items()},
                         {s: p["final"]["val"] for s, p in plan.items()}, None)
    ctx.log(f"final: {json.dumps(spec.counts(ctx.pool))}")
    done = train_run(ctx, spec)
    if done is None:
        return False
    if not ctx.dist.is_main:
        return True
    summary, outputs = done
    truth, model_cfg = ctx.pool.truth, ctx.model.cfg
    final_metrics: dict = {"epoch": summary["epoch"]}
    if len(spec.val_idx) > 1:
        pred = scores_of(outputs[spec.val_idx], model_cfg)
        final_metrics["inner_val"] = {"n": len(spec.val_idx), "spearman": spearman(pred, truth[spec.val_idx]),
                                      "mse": mse(pred, truth[spec.val_idx])}
    if len(spec.holdout_idx) > 1:
        hold = outputs[spec.holdout_idx]
        final_metrics["teacher_holdout"] = {
            "n": len(spec.holdout_idx), "spearman": spearman(scores_of(hold, model_cfg), truth[spec.holdout_idx]),
            "profiles": {p: spearman(scores_of(hold, model_cfg, p), truth[spec.holdout_idx])
                         for p in _profile_names(model_cfg)},
            "note": "agreement with the teacher on photos never trained on"}
    (ctx.run_dir / "metrics.json").write_text(json.dumps(to_plain(final_metrics), indent=2) + "\n")
    write_head_outputs(ctx.run_dir / "head_outputs.csv", ctx, spec, outputs)
    path = write_checkpoint(ctx, spec, summary, final_metrics)
    ctx.log(f"checkpoint written: {path}")
    return True


def _profile_names(model_cfg) -> tuple[str, ...]:
    from ..profiles import profile_names

    return profile_names(model_cfg)


def write_checkpoint(ctx: RunContext, spec: RunSpec, summary, final_metrics: dict) -> Path:
    from ..checkpoint import CheckpointMeta, save_checkpoint

    cfg, pool, model = ctx.cfg, ctx.pool, ctx.model
    if not summary["trunk_changed"]:
        model.set_trunk_frozen(True)  # an untouched package trunk is referenced, not embedded
    metrics = {"final_run": final_metrics}
    cv_path = ctx.run_info.get("cv_results")
    if cv_path:
        metrics["cross_validation"] = cv_summary(read_cv_results(cv_path))
        measured = profile_metrics(metrics["cross_validation"].get("summary"), cfg.data.scale_study)
        if measured:
            metrics["profiles"] = measured
    # "labelled" (the scale study) as before named studies, for readers of older metadata
    data = {"studies": [asdict(s) for s in cfg.data.studies], "scale": cfg.data.scale_study,
            "labelled": asdict(cfg.data.study(cfg.data.scale_study))}
    if pool.teacher is not None:
        data["teacher"] = asdict(cfg.data.teacher)
    counts = {"labelled_images": pool.n_labelled,
              "labelled_skipped": sum(s.data.skipped for s in pool.studies),
              "studies": {s.name: {"images": len(s.data), "skipped": s.data.skipped} for s in pool.studies}}
    if pool.teacher is not None:
        counts.update(teacher_images=len(pool.teacher), teacher_skipped=pool.teacher.skipped)
    training = {"data": data, "counts": {**counts, **spec.counts(pool)}, "epochs": summary["epoch"],
                **({"readout": summary["readout"]} if summary.get("readout") else {}),
                "splits_file": pool.plan.get("source", ""), "config": cfg.to_dict()}
    reference = reference_quantiles(ctx) if outputs_from_cache(ctx, summary["trunk_changed"]) else {}
    names = ", ".join(pool.names)
    meta = CheckpointMeta(
        name=cfg.output.name, architecture=model.cfg, preprocessing=ctx.preprocessing, trunk=ctx.source,
        trunk_embedded=False, version=cfg.output.version,
        description=cfg.output.description or f"ResMem-Net {model.cfg.backbone}/{model.cfg.head} trained on "
                                              f"{names}" + (" + teacher scores" if pool.teacher else ""),
        training=training, metrics=to_plain(metrics), provenance=provenance(ctx.run_info), license=ctx.source.license,
        reference=reference,
    )
    return save_checkpoint(model.cpu(), meta, ctx.run_dir / f"{cfg.output.name}.json")


def reference_quantiles(ctx: RunContext) -> dict:
    """The final model's score quantiles (0th..100th percentile) over every teacher photo, the fixed
    diverse reference set behind each answer's `percentile` (CheckpointMeta.percentile): "quantiles"
    for the default profile, "profiles" for every other profile. {} without teacher photos (the
    caller checks that the cache holds the outputs: outputs_from_cache)."""
    from .predict import head_outputs

    pool, cfg = ctx.pool, ctx.cfg
    if pool.teacher is None:
        return {}
    idx = np.arange(pool.n_labelled, len(pool.paths))
    outputs = head_outputs(ctx, idx)
    levels = np.linspace(0, 1, 101)

    def quantiles(profile: str) -> list[float]:
        return [round(float(q), 6) for q in np.quantile(scores_of(outputs, ctx.model.cfg, profile), levels)]

    sources = [cfg.data.teacher.csv, *(e.split("=", 1)[0] for e in cfg.data.teacher.extra)]
    ref = {"set": f"the {len(idx):,} teacher photos ({', '.join(Path(s).name for s in sources)})",
           "n": int(len(idx)), "quantiles": quantiles("default")}
    others = [p for p in _profile_names(ctx.model.cfg) if p != "default"]
    if others:
        ref["profiles"] = {p: quantiles(p) for p in others}
    return ref


def read_cv_results(path) -> dict:
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise TrainError(f"--cv-results: {path} not found") from None
    except json.JSONDecodeError as exc:
        raise TrainError(f"--cv-results: {path} is not JSON ({exc})") from None
    if not isinstance(report, dict) or "splits" not in report or "mean" not in report:
        raise TrainError(f"--cv-results: {path} is not a cv.json written by `resmemnet train --cv`")
    return report


def cv_summary(report: dict) -> dict:
    """What a checkpoint keeps of a cv.json: the scale study's folds (as before named studies),
    and every protocol's summary."""
    keys = ("dataset", "splits", "mean", "std", "top_bottom", "splits_file", "run_dir", "blend_curve", "summary")
    return {k: report[k] for k in keys if k in report}


def profile_metrics(summary: dict | None, scale_study: str) -> dict:
    """metrics.profiles of a checkpoint (what `resmemnet info` and /readyz show) from a cv.json's
    summary: per profile, Spearman rho of `within_cv` (mean over each study's folds), `loso` (each
    study left out) and `teacher_agreement` (mean over the scale study's folds). {} without one."""
    if not summary or not summary.get("within"):
        return {}
    within, loso = summary["within"], summary.get("loso") or {}
    names = list(dict.fromkeys(p for study in within.values() for p in study))
    out = {}
    for p in names:
        entry = {"within_cv": {s: v[p]["spearman"]["mean"] for s, v in within.items() if p in v}}
        if loso:
            entry["loso"] = {s: v[p]["spearman"] for s, v in loso.items() if p in v}
        agreement = within.get(scale_study, {}).get(p, {}).get("teacher_agreement", {}).get("mean")
        if agreement is not None:
            entry["teacher_agreement"] = agreement
        out[p] = entry
    return out


def provenance(run_info: dict) -> dict:
    import platform

    import torch

    def git(*args):
        try:
            res = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)
            return res.stdout.strip() if res.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": bool(dirty) if dirty is not None else None,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": run_info.get("command", ""), "started": run_info.get("started"),
            "torch": torch.__version__, "python": platform.python_version()}
