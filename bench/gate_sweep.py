"""The trade-off curves behind the shipped score's scalars: LNSIM 5-fold CV rho, teacher agreement and
cdm_dev rho for every score_blend, with and without the domain gate over a grid of gate centres
and widths, all from saved head outputs (no refit).

    .venv/bin/python bench/gate_sweep.py --cv RUN_DIR --final FINAL_RUN_DIR [--data DIR] [--out DIR]

RUN_DIR is a `resmemnet train --cv` run of a model with a teacher output and a domain gate; each
fold folder holds head_outputs.csv (test, labelled-training and teacher-holdout photos). The
LNSIM and agreement columns re-score the folds exactly as the CV did (calibration refitted per
blend on each fold's labelled training photos). The cdm_dev column scores the final run's
checkpoint (FINAL_RUN_DIR/<name>.json) on the 512 cdm_dev photos: its head outputs are computed once
through the checkpoint's own preprocessing and trunk in fp32 (cached in OUT/cdm_dev_outputs.csv),
and its calibration is refitted per blend on the final run's labelled training photos
(FINAL_RUN_DIR/head_outputs.csv). cdm_dev is a validation set: it chooses these few scalars,
never a weight.
The grids default to 11 blends x (no gate + 6 centres x 4 widths); --blends, --centres and
--widths take comma-separated values instead, and the checkpoint's own setting is always added.
Writes OUT/gate_sweep.csv and prints the rows that keep LNSIM CV rho >= --floor, best cdm_dev first.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BLENDS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0)
CENTRES = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
WIDTHS = (0.02, 0.05, 0.1, 0.2)


def read_outputs(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """head_outputs.csv -> {set: (truth (n,), outputs (n, k))}."""
    by_set: dict[str, list] = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            outs = [float(v) for k, v in row.items() if k.startswith("output_")]
            by_set.setdefault(row["set"], []).append((float(row["truth"]), outs))
    return {k: (np.array([t for t, _ in v]), np.array([o for _, o in v])) for k, v in by_set.items()}


def scorer(cfg, blend: float, centre: float | None, width: float | None, train_out, train_y):
    """outputs -> scores for one setting; the calibration is refitted to the labelled training photos."""
    import torch

    from model.network import blend_outputs
    from model.training.predict import calibrated_for_blend

    mcfg = calibrated_for_blend(cfg, blend, train_out, train_y, domain_gate=centre is not None,
                                gate_center=centre if centre is not None else cfg.gate_center,
                                gate_width=width if width is not None else cfg.gate_width)
    return lambda out: blend_outputs(torch.from_numpy(np.ascontiguousarray(out)), mcfg).numpy()


def checkpoint_outputs(weights: str, paths: list[str], cache: Path) -> np.ndarray:
    """(n, k) head outputs of the checkpoint on `paths` (fp32, CPU), cached in a CSV."""
    if cache.is_file():
        with open(cache, newline="") as fh:
            rows = list(csv.reader(fh))[1:]
        if [r[0] for r in rows] == paths:
            return np.array([[float(v) for v in r[1:]] for r in rows])
    import torch

    from model.checkpoint import load_checkpoint
    from model.preprocess import decode_image

    model, meta = load_checkpoint(weights)
    model.eval()
    out = []
    with torch.inference_mode():
        for lo in range(0, len(paths), 16):
            x = torch.stack([meta.preprocessing.image_to_tensor(decode_image(p)) for p in paths[lo:lo + 16]])
            out.append(model.head.outputs(model.forward_features(x)).float().numpy())
    out = np.concatenate(out)
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", *(f"output_{k}" for k in range(out.shape[1]))])
        for p, row in zip(paths, out):
            w.writerow([p, *(f"{v:.6f}" for v in row)])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cv", required=True, help="a `resmemnet train --cv` run folder")
    ap.add_argument("--final", required=True, help="the `resmemnet train --cv-results` run folder of the checkpoint")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="data root")
    ap.add_argument("--out", default=str(REPO / "runs" / "gate_sweep"))
    ap.add_argument("--floor", type=float, default=0.572, help="LNSIM CV rho a printed row must keep")
    grid = lambda text: tuple(float(v) for v in text.split(","))  # noqa: E731
    ap.add_argument("--blends", type=grid, default=BLENDS, help="comma-separated score_blend values")
    ap.add_argument("--centres", type=grid, default=CENTRES, help="comma-separated gate centres")
    ap.add_argument("--widths", type=grid, default=WIDTHS, help="comma-separated gate widths")
    args = ap.parse_args(argv)

    from model.checkpoint import read_meta
    from model.training.metrics import spearman

    sys.path.insert(0, str(REPO / "bench"))
    from validate import load_cdm_dev

    folds = sorted(Path(args.cv).glob("*/head_outputs.csv"))
    if not folds:
        print(f"error: no */head_outputs.csv under {args.cv}", file=sys.stderr)
        return 2
    final = Path(args.final)
    ckpts = sorted(p for p in final.glob("*.json") if p.with_suffix(".safetensors").is_file())
    if not ckpts or not (final / "head_outputs.csv").is_file():
        print(f"error: {final} holds no checkpoint with head_outputs.csv", file=sys.stderr)
        return 2
    weights = str(ckpts[0])
    cfg = read_meta(weights).architecture
    if not cfg.teacher_output or cfg.n_outputs < 3:
        print("error: the checkpoint needs a teacher output and a domain output", file=sys.stderr)
        return 2
    fold_data = [read_outputs(f) for f in folds]
    out_dir = Path(args.out)
    cdm = load_cdm_dev(Path(args.data))
    lnsim_y, lnsim_out = read_outputs(final / "head_outputs.csv")["train"]
    cdm_out = checkpoint_outputs(weights, cdm.paths, out_dir / "cdm_dev_outputs.csv") if cdm is not None else None
    settings = [(b, None, None) for b in args.blends] + [(b, c, w) for b in args.blends for c in args.centres
                                                         for w in args.widths]
    own = (cfg.score_blend, cfg.gate_center if cfg.domain_gate else None, cfg.gate_width if cfg.domain_gate else None)
    if own not in settings:  # the checkpoint's own setting always has its row
        settings.append(own)
    rows = []
    for blend, centre, width in settings:
        rho, agree = [], []
        for d in fold_data:
            f = scorer(cfg, blend, centre, width, d["train"][1], d["train"][0])
            rho.append(spearman(f(d["test"][1]), d["test"][0]))
            if "teacher_holdout" in d:
                agree.append(spearman(f(d["teacher_holdout"][1]), d["teacher_holdout"][0]))
        row = {"blend": blend, "gate_center": "" if centre is None else centre, "gate_width": "" if width is None else width,
               "lnsim_cv_spearman_mean": float(np.mean(rho)), "lnsim_cv_spearman_sd": float(np.std(rho, ddof=1)),
               "teacher_agreement": float(np.mean(agree)) if agree else float("nan")}
        if cdm_out is not None:
            f = scorer(cfg, blend, centre, width, lnsim_out, lnsim_y)
            row["cdm_dev_spearman"] = spearman(f(cdm_out), cdm.truth)
        rows.append(row)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "gate_sweep.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    keep = [r for r in rows if r["lnsim_cv_spearman_mean"] >= args.floor]
    keep.sort(key=lambda r: -r.get("cdm_dev_spearman", r["teacher_agreement"]))
    print(f"{'blend':>6} {'centre':>7} {'width':>6} {'LNSIM CV':>9} {'sd':>6} {'agree':>6} {'cdm_dev':>8}")
    for r in keep[:25]:
        print(f"{r['blend']:>6} {str(r['gate_center']):>7} {str(r['gate_width']):>6} {r['lnsim_cv_spearman_mean']:>9.4f} "
              f"{r['lnsim_cv_spearman_sd']:>6.3f} {r['teacher_agreement']:>6.3f} {r.get('cdm_dev_spearman', float('nan')):>8.4f}")
    print(f"{len(keep)} of {len(rows)} settings keep LNSIM CV rho >= {args.floor}; all in {out_dir / 'gate_sweep.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
