"""Command-line arguments of `resmemnet train`."""
from __future__ import annotations

import argparse


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="NAME|FILE",
                   help="packaged config (default, paper) or a TOML file; default: default")
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set phases.0.epochs=3 --set optimizer.name=adamw")
    p.add_argument("--cv", action="store_true",
                   help="cross-validate: train and test every fold, write cv.json/cv.csv (no checkpoint)")
    p.add_argument("--out", metavar="RUN_DIR", help="run folder (default: <runs_dir>/<name>-<mode>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run at its next epoch")
    p.add_argument("--cv-results", metavar="CV_JSON", help="cv.json of a CV run, stored as the checkpoint's metrics")
    p.add_argument("--stop-after", type=int, metavar="EPOCHS",
                   help="stop after this many epochs (resumable with --resume)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="shorthand for --set train.device=...")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="resmemnet train", description="Train ResMem-Net (see README: Training)")
    add_train_arguments(parser)
    return parser.parse_args(argv)

