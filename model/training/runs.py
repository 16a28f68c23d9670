"""Whole runs: cross-validation over the split plan's folds, and the final model with its checkpoint."""
from __future__ import annotations

import csv
import json
import subprocess
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from .common import TrainError, to_plain
from .config import Config
from .distributed import SINGLE, Dist
from .loop import fit
from .model_setup import amp_dtype
from .pool import Pool, RunSpec, make_run_spec
from .predict import blend_curve, metrics_on, predict, teacher_truth

REPO = Path(__file__).resolve().parents[2]


def run_cv(cfg: Config, run_dir: Path, pool: Pool, model, loader, device, budget, log=print, *,
           dist: Dist = SINGLE) -> bool:
    """Train and test every fold (resuming finished folds from their result.json); write cv.json/.csv.
    Under torchrun all ranks train each fold; rank 0 alone tests it and writes the files."""
    from .evaluate import build_report, format_report, split_result, summarize_blend_curves, write_report

    init_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    results = []
    for fold in pool.plan["folds"]:
        fold_dir = run_dir / fold["name"]
        done_file = fold_dir / "result.json"
        if done_file.is_file():
            results.append(json.loads(done_file.read_text()))
            continue
        fold_dir.mkdir(parents=True, exist_ok=True)
        model.load_state_dict(init_state)
        spec = make_run_spec(cfg, pool, fold["name"], fold_dir, fold["train"], fold["val"], fold["test"])
        log(f"{fold['name']}: {json.dumps(spec.counts(pool))}")
        summary = fit(cfg, model, pool, spec, loader, device, budget, log=log, dist=dist)
        if summary is None:
            return False
        if not dist.is_main:
            continue
        amp = amp_dtype(cfg, device)
        pred = predict(model, pool, spec.test_idx, cfg, loader, device, trunk_changed=summary["trunk_changed"],
                       amp=amp)
        extra = {"epoch": summary["epoch"], **spec.counts(pool)}
        extra.pop("test")
        if len(spec.holdout_idx) > 1:
            hold = metrics_on(model, pool, spec.holdout_idx, teacher_truth(pool, spec.holdout_idx), cfg, loader,
                               device, summary["trunk_changed"], amp)
            extra["teacher_holdout_spearman"] = hold["spearman"]
        result = split_result(fold["name"], pred, pool.labelled.scores[spec.test_idx], halves=pool.labelled.halves,
                              idx=spec.test_idx, extra=extra)
        if model.cfg.teacher_output and outputs_from_cache(pool, summary):
            result["blend_curve"] = blend_curve(model, pool, spec, cfg, device)
            write_head_outputs(fold_dir / "head_outputs.csv", model, pool, spec, cfg, device)
        write_predictions(fold_dir / "predictions.csv", pool, spec.test_idx, pred)
        done_file.write_text(json.dumps(to_plain(result), indent=1) + "\n")
        results.append(result)
        log(f"{fold['name']}: test rho {result['row']['spearman']:.4f} (n={result['row']['n']})")
    if not dist.is_main:
        return True
    info = {"splits_file": pool.plan.get("source", ""), "run_dir": str(run_dir), "config": cfg.to_dict()}
    if results and all(r.get("blend_curve") for r in results):
        info["blend_curve"] = summarize_blend_curves([r["blend_curve"] for r in results])
    report = build_report(results, dataset=pool.labelled.name, model=cfg.output.name, info=info)
    write_report(report, run_dir, "cv")
    log(format_report(report))
    log(f"cross-validation written to {run_dir / 'cv.json'} and {run_dir / 'cv.csv'}")
    return True


def outputs_from_cache(pool: Pool, summary: dict) -> bool:
    """Whether the trained head's outputs can be read off the feature cache: it exists, holds the
    unaugmented rows, and the trunk it was made with was not trained since."""
    return pool.features is not None and not summary["trunk_changed"] and "none" in pool.features.augmentations


def write_predictions(path: Path, pool: Pool, idx, pred) -> None:
    keys = pool.labelled.keys
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "true", "predicted"])
        for i, p in zip(idx, pred):
            w.writerow([keys[i], f"{pool.labelled.scores[i]:.6f}", f"{p:.6f}"])


def write_head_outputs(path: Path, model, pool: Pool, spec: RunSpec, cfg: Config, device) -> None:
    """Every head output of the fold's test, labelled-training and teacher-holdout photos (from the
    cache): any score_blend, calibration or gate setting can be scored from them without a refit
    (`bench/gate_sweep.py`)."""
    from .predict import head_outputs

    lab_train = spec.train_idx[spec.train_idx < pool.n_labelled]
    keys = pool.labelled.keys + (pool.teacher.keys if pool.teacher is not None else [])
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "set", "truth", *(f"output_{k}" for k in range(model.cfg.n_outputs))])
        for name, idx in (("test", spec.test_idx), ("train", lab_train), ("teacher_holdout", spec.holdout_idx)):
            if len(idx) == 0:
                continue
            out = head_outputs(model, pool, idx, cfg, device)
            truth = pool.labelled.scores[idx] if name != "teacher_holdout" else teacher_truth(pool, idx)
            for i, t, row in zip(idx, truth, out):
                w.writerow([keys[int(i)], name, f"{t:.6f}", *(f"{v:.6f}" for v in row)])


def run_final(cfg: Config, run_dir: Path, pool: Pool, model, source, preprocessing, loader, device, budget,
              run_info: dict, log=print, *, dist: Dist = SINGLE) -> bool:
    """Train the final model on the plan's final split; rank 0 writes metrics.json and the checkpoint."""
    spec = make_run_spec(cfg, pool, "final", run_dir, pool.plan["final"]["train"], pool.plan["final"]["val"], [])
    log(f"final: {json.dumps(spec.counts(pool))}")
    summary = fit(cfg, model, pool, spec, loader, device, budget, log=log, dist=dist)
    if summary is None:
        return False
    if not dist.is_main:
        return True
    amp = amp_dtype(cfg, device)
    final_metrics: dict = {"epoch": summary["epoch"]}
    val = metrics_on(model, pool, spec.val_idx, pool.labelled.scores[spec.val_idx], cfg, loader, device,
                      summary["trunk_changed"], amp)
    if val:
        final_metrics["inner_val"] = {"n": len(spec.val_idx), "spearman": val["spearman"], "mse": val["mse"]}
    if len(spec.holdout_idx) > 1:
        hold = metrics_on(model, pool, spec.holdout_idx, teacher_truth(pool, spec.holdout_idx), cfg, loader, device,
                           summary["trunk_changed"], amp)
        final_metrics["teacher_holdout"] = {"n": len(spec.holdout_idx), "spearman": hold["spearman"],
                                            "note": "agreement with the teacher on photos never trained on"}
    (run_dir / "metrics.json").write_text(json.dumps(to_plain(final_metrics), indent=2) + "\n")
    if model.cfg.teacher_output and outputs_from_cache(pool, summary):
        write_head_outputs(run_dir / "head_outputs.csv", model, pool, spec, cfg, device)
    path = write_checkpoint(cfg, run_dir, pool, spec, model, source, preprocessing, summary, final_metrics, run_info)
    log(f"checkpoint written: {path}")
    return True


def write_checkpoint(cfg: Config, run_dir: Path, pool: Pool, spec: RunSpec, model, source, preprocessing, summary,
                     final_metrics: dict, run_info: dict) -> Path:
    from ..checkpoint import CheckpointMeta, save_checkpoint

    if not summary["trunk_changed"]:
        model.set_trunk_frozen(True)  # an untouched package trunk is referenced, not embedded
    metrics = {"final_run": final_metrics}
    cv_path = run_info.get("cv_results")
    if cv_path:
        metrics["cross_validation"] = cv_summary(read_cv_results(cv_path))
    data = {"labelled": asdict(cfg.data.labelled)}
    if pool.teacher is not None:
        data["teacher"] = asdict(cfg.data.teacher)
    training = {
        "data": data,
        "counts": {"labelled_images": len(pool.labelled), "labelled_skipped": pool.labelled.skipped,
                   **({"teacher_images": len(pool.teacher), "teacher_skipped": pool.teacher.skipped}
                      if pool.teacher is not None else {}),
                   **spec.counts(pool)},
        "epochs": summary["epoch"],
        **({"readout": summary["readout"]} if summary.get("readout") else {}),
        "splits_file": pool.plan.get("source", ""),
        "config": cfg.to_dict(),
    }
    reference = reference_quantiles(model, pool, cfg, device=next(model.parameters()).device) \
        if outputs_from_cache(pool, summary) else {}
    meta = CheckpointMeta(
        name=cfg.output.name, architecture=model.cfg, preprocessing=preprocessing, trunk=source,
        trunk_embedded=False, version=cfg.output.version,
        description=cfg.output.description or f"ResMem-Net {model.cfg.backbone}/{model.cfg.head} trained on "
                                              f"{pool.labelled.name}" + (" + teacher scores" if pool.teacher else ""),
        training=training, metrics=to_plain(metrics), provenance=provenance(run_info), license=source.license,
        reference=reference,
    )
    return save_checkpoint(model.cpu(), meta, run_dir / f"{cfg.output.name}.json")


def reference_quantiles(model, pool: Pool, cfg: Config, *, device) -> dict:
    """The final model's score quantiles (0th..100th percentile) over every teacher photo, the fixed
    diverse reference set behind each answer's `percentile` (CheckpointMeta.percentile): "quantiles"
    for the default score, "profiles" for the model's other profiles (network.available_profiles).
    {} when the run has no teacher photos (the caller checks that the cache holds the outputs:
    outputs_from_cache)."""
    import numpy as np
    import torch

    from ..network import available_profiles, profile_score
    from .predict import head_outputs

    if pool.teacher is None:
        return {}
    idx = np.arange(pool.n_labelled, len(pool.paths))
    outputs = torch.from_numpy(head_outputs(model, pool, idx, cfg, device))
    levels = np.linspace(0, 1, 101)

    def quantiles(profile: str) -> list[float]:
        scores = profile_score(outputs, model.cfg, profile).numpy().astype(np.float64)
        return [round(float(q), 6) for q in np.quantile(scores, levels)]

    sources = [cfg.data.teacher.csv, *(e.split("=", 1)[0] for e in cfg.data.teacher.extra)]
    ref = {"set": f"the {len(idx):,} teacher photos ({', '.join(Path(s).name for s in sources)})",
           "n": int(len(idx)), "quantiles": quantiles("default")}
    others = [p for p in available_profiles(model.cfg) if p != "default"]
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
    keys = ("dataset", "splits", "mean", "std", "top_bottom", "splits_file", "run_dir", "blend_curve")
    return {k: report[k] for k in keys if k in report}


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

