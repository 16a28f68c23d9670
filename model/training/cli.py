"""`resmemnet train` and `resmemnet evaluate`.

Exit codes: 0 done, 2 a usage problem (bad config key or value, missing dataset, unreadable
checkpoint), reported as one `resmemnet ...: error:` line without a traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_OK, EXIT_USAGE = 0, 2


def register(sub) -> None:
    from .params import add_train_arguments

    t = sub.add_parser(
        "train", help="train ResMem-Net (phased recipe, cross-validation, checkpoint)",
        description="Train ResMem-Net from a TOML config (packaged: default, paper) with --set overrides. "
                    "Without --cv the final model is trained on all labelled data and written as a checkpoint; "
                    "with --cv every fold is trained and tested and cv.json/cv.csv are written. Runs unchanged "
                    "under `torchrun --nproc_per_node=N --no-python resmemnet train ...` (one process per GPU; "
                    "see docs/deploy.md).")
    add_train_arguments(t)
    t.set_defaults(func=run_train_command)

    e = sub.add_parser(
        "evaluate", help="score a dataset with a checkpoint and report rho, r, MSE, top/bottom table",
        description="Score a labelled dataset with a checkpoint. Reports per split (the split file's test "
                    "folds, else the dataset's official test splits, else all images) and mean +- sd.")
    from model.environment import default_weights

    e.add_argument("--weights", default=str(default_weights()), metavar="FILE",
                   help="checkpoint .json (or its .safetensors); default: the shipped one")
    e.add_argument("--dataset", required=True, choices=("lnsim", "lamem", "isola", "csv"))
    e.add_argument("--root", help="dataset folder (csv: folder image paths are relative to)")
    e.add_argument("--csv", help="csv dataset: file with path and score columns")
    e.add_argument("--path-column", default="")
    e.add_argument("--score-column", default="")
    e.add_argument("--splits", metavar="FILE", help="split file from training: report per test fold")
    e.add_argument("--out", metavar="DIR", help="write metrics.json/.csv, metrics_top_bottom.csv, predictions.csv")
    e.add_argument("--limit", type=int, default=0, help="first N images only")
    e.add_argument("--top-n", default="10,25,50,100,200", help="sizes of the top/bottom table")
    e.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--workers", type=int, default=2)
    e.add_argument("--cache-dir", default="runs/cache", help="where Isola's image array is extracted")
    e.set_defaults(func=run_evaluate_command)


def fail(message: str, prog: str = "resmemnet") -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def run_train_command(args: argparse.Namespace) -> int:
    from .train import run

    return run(args, sys.argv[2:] if len(sys.argv) > 2 and sys.argv[1] == "train" else None)


def run_evaluate_command(args: argparse.Namespace) -> int:
    from model.trunks import TrunkLoadError
    from model.checkpoint import CheckpointError

    from .data import DatasetError

    try:
        return _evaluate(args)
    except (DatasetError, CheckpointError, TrunkLoadError, ValueError) as exc:
        return fail(str(exc), "resmemnet evaluate")


def _evaluate(args) -> int:
    import csv

    import numpy as np

    from model.scoring import Scorer

    from .config import DatasetSpec
    from .data import load_dataset
    from .splits import read_splits
    from .evaluate import evaluate_scores, evaluation_splits, format_report, write_report

    try:
        ns = [int(x) for x in args.top_n.split(",") if x.strip()]
    except ValueError:
        return fail(f"--top-n {args.top_n!r} is not a comma-separated list of integers", "resmemnet evaluate")
    if args.dataset == "csv" and not args.csv:
        return fail("--dataset csv needs --csv FILE", "resmemnet evaluate")
    if args.dataset != "csv" and not args.root:
        return fail(f"--dataset {args.dataset} needs --root DIR", "resmemnet evaluate")
    if args.batch_size < 1 or args.workers < 1 or args.limit < 0:
        return fail("--batch-size and --workers must be >= 1, --limit >= 0", "resmemnet evaluate")
    spec = DatasetSpec(kind=args.dataset, root=args.root or "", csv=args.csv or "", path_column=args.path_column,
                       score_column=args.score_column, limit=args.limit)
    data = load_dataset(spec, cache_dir=args.cache_dir)
    plan = read_splits(args.splits) if args.splits else None
    splits = evaluation_splits(data, plan)
    needed = sorted({int(i) for _, idx in splits for i in idx})
    scorer = Scorer.from_checkpoint(args.weights, device=args.device)
    predictions = np.full(len(data), np.nan)
    failed = 0
    paths = [data.paths[i] for i in needed]
    for i, result in zip(needed, scorer.score_paths(paths, batch_size=args.batch_size, workers=args.workers)):
        if result.ok:
            predictions[i] = result.score
        else:
            failed += 1
    if failed:
        print(f"{failed} image(s) could not be scored and are left out", file=sys.stderr)
    report = evaluate_scores(data, predictions, splits, model=scorer.model_name, ns=ns,
                             info={"weights": str(args.weights), "splits_file": args.splits or "",
                                   "images": len(needed), "failed": failed, "skipped_on_disk": data.skipped})
    if not report["splits"]:
        return fail("no split has two or more scored images", "resmemnet evaluate")
    print(format_report(report))
    if args.out:
        out = Path(args.out)
        write_report(report, out, "metrics")
        keys = data.keys
        with open(out / "predictions.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["image", "true", "predicted"])
            for i in needed:
                if not np.isnan(predictions[i]):
                    writer.writerow([keys[i], f"{data.scores[i]:.6f}", f"{predictions[i]:.6f}"])
        print(f"written to {out}/metrics.json, metrics.csv, metrics_top_bottom.csv, predictions.csv", file=sys.stderr)
    return EXIT_OK
