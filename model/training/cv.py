"""`resmemnet train --cv`: every protocol of a config's studies, with per-split result files.

- within-study k-fold CV, for every study: fold k of study A trains on A's other folds, every
  other study whole and the teacher's training photos, and tests on A's fold k;
- leave-one-study-out (two or more studies, cv.leave_one_study_out): fit without study S (the
  other studies and the teacher), test on all of S: how the model does on a kind of photo it has
  no labels for;
- teacher agreement: every run's Spearman rho with the teacher on its held-out photos.
Every run reports every profile it has (the default profile's numbers are the headline columns).

Files (pyiqa style, one row per split then mean and std): RUN/cv_within_<study>.csv (+ _blend.csv,
_top_bottom.csv), RUN/cv_loso.csv, RUN/cv_teacher.csv (one row per run), RUN/cv_summary.csv (one
row per protocol, study and profile); RUN/cv.json holds all of them and, at its top level, the
scale study's within-study report (what `--cv-results` stores in a checkpoint); cv.csv is the
scale study's table. Each run's folder (<study>/fold_k, loso/<study>) holds predictions.csv (the
default profile), head_outputs.csv, result.json, log.csv.
"""
from __future__ import annotations

import csv
import json
import math

import numpy as np

from .common import to_plain
from .context import RunContext
from .pool import RunSpec, make_run_spec
from .predict import blend_curve, scores_of
from .runs import train_run, write_head_outputs, write_predictions


def cv_runs(ctx: RunContext) -> list[tuple[str, RunSpec]]:
    """(protocol, run) of every run of --cv, in order: each study's folds, then leave-one-study-out."""
    pool, cfg = ctx.pool, ctx.cfg
    plan = pool.plan["studies"]
    final = {s: p["final"]["train"] for s, p in plan.items()}
    runs = []
    for study in pool.names:
        for fold in plan[study]["folds"]:
            train = {**{s: keys for s, keys in final.items() if s != study}, study: fold["train"]}
            train = {s: train[s] for s in pool.names}  # config order
            spec = make_run_spec(cfg, pool, f"{study}/{fold['name']}", ctx.run_dir / study / fold["name"], train,
                                 {study: fold["val"]}, (study, fold["test"]))
            runs.append(("within", spec))
    if len(pool.names) > 1 and cfg.cv.leave_one_study_out:
        for study in pool.names:
            train = {s: keys for s, keys in final.items() if s != study}
            all_keys = pool.study(study).data.keys
            runs.append(("loso", make_run_spec(cfg, pool, f"loso/{study}", ctx.run_dir / "loso" / study, train, {},
                                               (study, all_keys))))
    return runs


def evaluate_run(ctx: RunContext, spec: RunSpec, outputs, summary: dict) -> dict:
    """Metrics of one run's test photos for every profile (default first: the headline columns),
    teacher agreement per profile, and for a within-study fold the blend curve."""
    from ..profiles import profile_names
    from .evaluate import split_result
    from .metrics import spearman

    pool, model_cfg = ctx.pool, ctx.model.cfg
    study = pool.study(spec.test_study)
    truth = pool.truth
    test = outputs[spec.test_idx]
    names = profile_names(model_cfg)
    pred = scores_of(test, model_cfg)
    extra = {"epoch": summary["epoch"], **{k: v for k, v in spec.counts(pool).items() if k not in ("test",)}}
    hold = outputs[spec.holdout_idx] if len(spec.holdout_idx) > 1 else None
    per_profile = {}
    for p in names:
        entry = {"spearman": spearman(scores_of(test, model_cfg, p), truth[spec.test_idx])}
        if hold is not None:
            entry["teacher_holdout_spearman"] = spearman(scores_of(hold, model_cfg, p), truth[spec.holdout_idx])
        per_profile[p] = entry
    if hold is not None:
        extra["teacher_holdout_spearman"] = per_profile["default"]["teacher_holdout_spearman"]
    extra.update({f"spearman_{p}": e["spearman"] for p, e in per_profile.items() if p != "default"})
    extra.pop("train_by_study", None)
    split = spec.name.split("/")[-1]
    result = split_result(split, pred, truth[spec.test_idx], halves=study.data.halves,
                          idx=spec.test_idx - study.offset, extra=extra)
    result.update(run=spec.name, study=spec.test_study, profiles=per_profile, pred=pred.tolist(),
                  counts=spec.counts(pool))
    return result


def run_cv(ctx: RunContext) -> bool:
    """Train and test every run (resuming finished runs from their result.json); write the reports.
    Under torchrun all ranks train each run; rank 0 alone tests it and writes the files."""
    results: dict[str, list[dict]] = {"within": [], "loso": []}
    for protocol, spec in cv_runs(ctx):
        done_file = spec.dir / "result.json"
        if done_file.is_file():
            results[protocol].append(json.loads(done_file.read_text()))
            continue
        spec.dir.mkdir(parents=True, exist_ok=True)
        ctx.log(f"{spec.name}: {json.dumps(spec.counts(ctx.pool))}")
        done = train_run(ctx, spec)
        if done is None:
            return False
        if not ctx.dist.is_main:
            continue
        summary, outputs = done
        result = evaluate_run(ctx, spec, outputs, summary)
        if protocol == "within" and "teacher" in ctx.model.cfg.output_names:
            result["blend_curve"] = blend_curve(ctx, spec, outputs)
        write_head_outputs(spec.dir / "head_outputs.csv", ctx, spec, outputs)
        write_predictions(spec.dir / "predictions.csv", ctx, spec.test_idx, result.pop("pred"))
        done_file.write_text(json.dumps(to_plain(result), indent=1) + "\n")
        results[protocol].append(result)
        ctx.log(f"{spec.name}: test rho {result['row']['spearman']:.4f} (n={result['row']['n']}; "
                + ", ".join(f"{p} {e['spearman']:.4f}" for p, e in result["profiles"].items()) + ")")
    if ctx.dist.is_main:
        write_cv_reports(ctx, results)
    return True


def write_cv_reports(ctx: RunContext, results: dict[str, list[dict]]) -> dict:
    from .evaluate import build_report, format_report, summarize_blend_curves, write_report

    cfg, run_dir = ctx.cfg, ctx.run_dir
    info = {"splits_file": ctx.pool.plan.get("source", ""), "run_dir": str(run_dir)}
    within = {}
    for study in ctx.pool.names:
        rs = [r for r in results["within"] if r["study"] == study]
        extra = {**info}
        if rs and all(r.get("blend_curve") for r in rs):
            extra["blend_curve"] = summarize_blend_curves([r["blend_curve"] for r in rs])
        within[study] = build_report(rs, dataset=study, model=cfg.output.name, info=extra)
        write_report(within[study], run_dir, f"cv_within_{study}")
    loso = None
    if results["loso"]:
        for r in results["loso"]:
            r["row"]["split"] = r["study"]
        loso = build_report(results["loso"], dataset="leave-one-study-out", model=cfg.output.name, info=info)
        write_report(loso, run_dir, "cv_loso")
    scale = within[cfg.data.scale_study]
    write_report(scale, run_dir, "cv")  # the scale study's table, as before named studies
    summary = summarize(within, results)
    report = {**scale, "format": "resmemnet-cv/2", "studies": ctx.pool.names, "summary": summary,
              "protocols": {"within": within, "loso": loso, "teacher": teacher_rows(results)},
              "config": cfg.to_dict()}
    from .evaluate import _json_safe

    (run_dir / "cv.json").write_text(json.dumps(_json_safe(to_plain(report)), indent=2) + "\n")
    _write_rows(run_dir / "cv_teacher.csv", teacher_rows(results))
    _write_rows(run_dir / "cv_summary.csv", summary_rows(summary))
    for study, rep in within.items():
        ctx.log(f"-- within-study CV: {study}\n{format_report(rep)}")
    if loso is not None:
        ctx.log(f"-- leave-one-study-out\n{format_report(loso)}")
    ctx.log(format_summary(summary))
    ctx.log(f"cross-validation written to {run_dir / 'cv.json'}, cv_summary.csv and the per-split cv_*.csv")
    return report


def summarize(within: dict, results: dict) -> dict:
    """Per protocol and study: every profile's rho (mean and sd over folds) and teacher agreement."""
    def stats(values):
        v = np.array([x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))], float)
        return {"mean": float(v.mean()) if len(v) else None,
                "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v))}

    out = {"within": {}, "loso": {}}
    for study in within:
        rs = [r for r in results["within"] if r["study"] == study]
        profiles = list(rs[0]["profiles"]) if rs else []
        out["within"][study] = {p: {"spearman": stats([r["profiles"][p]["spearman"] for r in rs]),
                                    "teacher_agreement": stats([r["profiles"][p].get("teacher_holdout_spearman")
                                                                for r in rs])} for p in profiles}
    for r in results["loso"]:
        out["loso"][r["study"]] = {p: {"spearman": e["spearman"],
                                       "teacher_agreement": e.get("teacher_holdout_spearman")}
                                   for p, e in r["profiles"].items()}
    return out


def teacher_rows(results: dict) -> list[dict]:
    rows = []
    for protocol, rs in results.items():
        for r in rs:
            row = {"run": r["run"], "protocol": protocol, "n": r.get("counts", {}).get("teacher_holdout")}
            row.update({p: e.get("teacher_holdout_spearman") for p, e in r["profiles"].items()})
            rows.append(row)
    return rows


def summary_rows(summary: dict) -> list[dict]:
    rows = []
    for study, profiles in summary["within"].items():
        for p, e in profiles.items():
            rows.append({"protocol": "within", "study": study, "profile": p, "splits": e["spearman"]["n"],
                         "spearman_mean": e["spearman"]["mean"], "spearman_std": e["spearman"]["std"],
                         "teacher_agreement_mean": e["teacher_agreement"]["mean"]})
    for study, profiles in summary["loso"].items():
        for p, e in profiles.items():
            rows.append({"protocol": "loso", "study": study, "profile": p, "splits": 1, "spearman_mean": e["spearman"],
                         "spearman_std": "", "teacher_agreement_mean": e["teacher_agreement"]})
    return rows


def _write_rows(path, rows: list[dict]) -> None:
    from .evaluate import _fmt

    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(keys)
        for r in rows:
            w.writerow([_fmt(r.get(k)) for k in keys])


def format_summary(summary: dict) -> str:
    lines = ["-- summary (Spearman rho; teacher agreement on its held-out photos)"]
    for study, profiles in summary["within"].items():
        parts = [f"{p} {e['spearman']['mean']:.4f} +- {e['spearman']['std']:.4f}" for p, e in profiles.items()
                 if e["spearman"]["mean"] is not None]
        lines.append(f"within {study}: " + ", ".join(parts))
        agree = profiles.get("default", {}).get("teacher_agreement", {}).get("mean")
        if agree is not None:
            lines.append(f"  teacher agreement (default): {agree:.4f}")
    for study, profiles in summary["loso"].items():
        lines.append(f"leave out {study}: " + ", ".join(f"{p} {e['spearman']:.4f}" for p, e in profiles.items()))
    return "\n".join(lines)
