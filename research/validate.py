"""Score labelled validation sets with a ResMem-Net checkpoint (and, with --resmem, the `resmem`
pip package on the same photos) and report rank and linear agreement with the human scores.

    python -m research.validate [--weights W] [--sets cdm_dev,lnsim] [--resmem | --resmem-only]
                                       [--out DIR] [--limit N] [--data DIR]

Sets (under --data, default ../shared/data; a set whose data is absent is skipped with a message):
  cdm_dev  cdm_dev/scores.csv (path,score; paths relative to that folder), 512 photos.
  lnsim    every LNSIM photo on disk (2,100) with its mean hit rate. The shipped checkpoints are
           trained on all of these, so this row is a TRAINING-SET number, not a validation one.

ResMem-Net scores come from the project's batch scorer (torch backend, CPU, fp32); resmem scores
from the package's own preprocessing (`resmem.transformer`: 256x256 resize, centre crop 227) and
`ResMem(pretrained=True)` in eval mode, after checking its weight file against the pinned sha256.
Writes DIR/<set>_scores.csv (path, truth, resmemnet, resmem) and DIR/summary.csv, and prints a
table. A photo that a model cannot decode keeps its row with an empty score and is left out of
that model's correlations (the count is printed). --limit N scores the first N photos of each set.
Exit status: 0, or 2 for bad arguments / nothing to score.
"""
from __future__ import annotations

import argparse
import csv
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

SET_NAMES = ("cdm_dev", "lnsim")


@dataclass
class LabelledSet:
    name: str
    root: Path
    rel_paths: list[str]  # as written in the CSVs, relative to root
    truth: np.ndarray  # float64 human scores, one per path
    note: str = ""

    @property
    def paths(self) -> list[str]:
        return [str(self.root / p) for p in self.rel_paths]


def load_cdm_dev(data: Path) -> LabelledSet | None:
    root = data / "cdm_dev"
    table = root / "scores.csv"
    if not table.is_file():
        return None
    with table.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"path", "score"} <= set(rows[0]):
        raise SystemExit(f"error: {table} needs the columns path,score")
    return LabelledSet("cdm_dev", root, [r["path"] for r in rows],
                       np.array([float(r["score"]) for r in rows]), note="validation")


def load_lnsim_set(data: Path) -> LabelledSet | None:
    from model.training.data import DatasetError, load_lnsim

    root = data / "lnsim"
    if not root.is_dir():
        return None
    try:
        ds = load_lnsim(str(root))
    except DatasetError as exc:
        print(f"lnsim: skipped ({exc})", file=sys.stderr)
        return None
    base = Path(ds.root or root)
    rel = [str(Path(p).resolve().relative_to(base.resolve())) if Path(p).is_absolute() else p for p in ds.paths]
    return LabelledSet("lnsim", base, rel, np.asarray(ds.scores, dtype=np.float64),
                       note="TRAINING SET (shipped model trained on all LNSIM photos)")


LOADERS = {"cdm_dev": load_cdm_dev, "lnsim": load_lnsim_set}


def score_resmemnet(weights: str, paths: list[str], batch_size: int) -> list[float | None]:
    from model.scoring import Scorer

    scorer = Scorer.from_checkpoint(weights, backend="torch", device="cpu", mixed_precision=False)
    out = []
    for res in scorer.score_paths(paths, batch_size=batch_size):
        if not res.ok:
            print(f"  resmemnet: {res.path}: {res.error}", file=sys.stderr)
        out.append(res.score if res.ok else None)
    return out


def load_resmem_model():
    """ResMem(pretrained=True) in eval mode, its weight file checked against the pinned sha256 first."""
    import resmem
    from model.trunks import resolve_weight_file, resmem_source

    pinned = resolve_weight_file(resmem_source())  # TrunkLoadError if the file differs from the pin
    if Path(resmem.path).resolve() != pinned.resolve():
        raise RuntimeError(f"resmem loads {resmem.path}, but the checked file is {pinned}")
    # The package builds an untrained torchvision ResNet-152 through the deprecated `pretrained`
    # argument, then loads model.pt (a flat state dict: torch.load's default weights_only=True reads it).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        return resmem.ResMem(pretrained=True).eval()


def score_resmem(paths: list[str], batch_size: int) -> list[float | None]:
    import torch
    from PIL import Image, UnidentifiedImageError
    from resmem import transformer

    model = load_resmem_model()
    out: list[float | None] = [None] * len(paths)
    with torch.inference_mode():
        for start in range(0, len(paths), batch_size):
            idx, tensors = [], []
            for i in range(start, min(start + batch_size, len(paths))):
                try:
                    with Image.open(paths[i]) as img:
                        tensors.append(transformer(img.convert("RGB")))
                    idx.append(i)
                except (OSError, UnidentifiedImageError) as exc:
                    print(f"  resmem: {paths[i]}: {exc}", file=sys.stderr)
            if tensors:
                scores = model(torch.stack(tensors)).view(-1).tolist()
                for i, s in zip(idx, scores):
                    out[i] = float(s)
    return out


def correlations(truth: np.ndarray, pred: list[float | None]) -> tuple[int, float, float]:
    """-> (n scored, Spearman rho, Pearson r) over the photos this model scored."""
    from model.training.metrics import pearson, spearman

    keep = [i for i, s in enumerate(pred) if s is not None]
    if len(keep) < 3:
        return len(keep), float("nan"), float("nan")
    p = np.array([pred[i] for i in keep])
    t = truth[keep]
    return len(keep), spearman(p, t), pearson(p, t)


def fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.6f}"


def training_note(meta, set_name: str, note: str) -> str:
    """`note`, or a TRAINING SET note where the checkpoint's training data names the set's folder
    (a study's root or CSV under `<data>/<set_name>`): its numbers there are not validation."""
    data = (meta.training or {}).get("data", {})
    studies = data.get("studies", []) if isinstance(data, dict) else []
    for study in studies:
        paths = [str(study.get(k) or "") for k in ("root", "csv")]
        if any(f"/{set_name}/" in p + "/" or p == set_name for p in paths):
            return f"TRAINING SET (this checkpoint trained on study {study.get('name')!r}, these photos)"
    return note


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default=None, help="ResMem-Net checkpoint (.json); default: the shipped one")
    ap.add_argument("--sets", default=",".join(SET_NAMES), help=f"comma-separated, of {', '.join(SET_NAMES)}")
    ap.add_argument("--resmem", action="store_true", help="also score with the resmem package")
    ap.add_argument("--resmem-only", action="store_true", help="score with the resmem package alone (no checkpoint)")
    ap.add_argument("--out", default=str(REPO / "runs" / "validate"), help="folder for the CSVs")
    ap.add_argument("--limit", type=int, default=None, help="score only the first N photos of each set")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="data root")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args(argv)

    from model.checkpoint import CheckpointError, read_meta
    from model.environment import default_weights

    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    unknown = [s for s in sets if s not in LOADERS]
    if unknown or not sets:
        ap.error(f"unknown set(s) {unknown}; choose from {', '.join(SET_NAMES)}")
    if args.limit is not None and args.limit < 1:
        ap.error("--limit must be at least 1")
    weights = args.weights or str(default_weights())
    try:
        meta = read_meta(weights)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"checkpoint {weights}: {meta.name}@{meta.version}, tensors sha256 {meta.tensors_sha256}")

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = []
    for name in sets:
        ds = LOADERS[name](Path(args.data))
        if ds is None:
            print(f"{name}: skipped, its data is not under {args.data}")
            continue
        if args.limit:
            ds.rel_paths, ds.truth = ds.rel_paths[:args.limit], ds.truth[:args.limit]
        if not args.resmem_only:
            ds.note = training_note(meta, name, ds.note)
        print(f"{name}: scoring {len(ds.rel_paths)} photos ({ds.note})", flush=True)
        preds = {} if args.resmem_only else {"resmemnet": score_resmemnet(weights, ds.paths, args.batch_size)}
        if args.resmem or args.resmem_only:
            preds["resmem"] = score_resmem(ds.paths, args.batch_size)
        with (out_dir / f"{name}_scores.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "truth", "resmemnet", "resmem"])
            for i, rel in enumerate(ds.rel_paths):
                w.writerow([rel, fmt(ds.truth[i]), fmt(preds["resmemnet"][i]) if "resmemnet" in preds else "",
                            fmt(preds["resmem"][i]) if "resmem" in preds else ""])
        for model_name, pred in preds.items():
            n, rho, r = correlations(ds.truth, pred)
            if n < len(pred):
                print(f"  {model_name}: {len(pred) - n} of {len(pred)} photos not scored", file=sys.stderr)
            label = f"{meta.name}@{meta.version}" if model_name == "resmemnet" else "resmem (pip package)"
            summary.append({"set": name, "n": n, "model": model_name, "model_detail": label,
                            "spearman_rho": rho, "pearson_r": r, "note": ds.note,
                            "checkpoint_sha256": meta.tensors_sha256 if model_name == "resmemnet" else ""})
    if not summary:
        print("error: nothing to score (no set's data was found)", file=sys.stderr)
        return 2
    with (out_dir / "summary.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(summary[0]))
        w.writeheader()
        w.writerows({**row, "spearman_rho": f"{row['spearman_rho']:.4f}", "pearson_r": f"{row['pearson_r']:.4f}"}
                    for row in summary)
    print(f"\n{'set':<8} {'n':>5}  {'model':<10} {'rho':>7} {'r':>7}  note")
    for row in summary:
        print(f"{row['set']:<8} {row['n']:>5}  {row['model']:<10} {row['spearman_rho']:>7.3f} "
              f"{row['pearson_r']:>7.3f}  {row['note']}")
    print(f"wrote {out_dir}/summary.csv and the per-set score CSVs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
