"""Training ResMem-Net: the paper's phased recipe, cross-validation and the final checkpoint.

`main(argv)` is what the CLI's `resmemnet train` calls and tests call in-process. The work is
split into modules with one job each (open_clip style):

- params.py: command-line arguments
- model_setup.py: model, trunk source, preprocessing, device, precision, per-epoch seeds
- pool.py: the run's images (labelled + teacher), targets/weights per run, feature cache, image loader
- state.py: what --resume reads back (model/optimiser tensors, state.json, log.csv), --stop-after
- loop.py: one epoch and all phases of one run (`fit`); readout_fit.py: the closed-form readout head
- predict.py: scores, score calibration, blend curve
- runs.py: cross-validation and the final model's checkpoint
- distributed.py, step.py: torchrun (DistributedDataParallel; see distributed.py for how work is split)

A run folder holds config.toml/.json (resolved), run.json (mode, command), splits.json (the
folds it used), log.csv (one row per epoch) and state/ (what --resume needs: model tensors as
safetensors, the optimiser state as tensors (read back with weights_only=True) and state.json).
Randomness is reseeded from (seed, run, epoch) at every epoch start, so a resumed run
continues exactly where an uninterrupted one would be.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

from .common import TrainError, to_plain
from .config import ConfigError, config_from_dict, load_config, save_config, to_toml
from .data import DatasetError
from .distributed import barrier, broadcast_object, init_distributed, shutdown
from .loop import fit, run_epoch
from .model_setup import (amp_dtype, build_model, epoch_seed, preprocessing_for, resolve_device, trunk_identity,
                          trunk_source_for)
from .params import add_train_arguments, parse_args
from .pool import (FeatureTable, ImageLoader, Pool, RunSpec, attach_features, load_data, make_run_spec,
                   prepare_pool, train_batches)
from .predict import BLEND_GRID, blend_curve, calibrate_score, head_outputs, predict
from .readout_fit import fit_readout_head
from .runs import read_cv_results, run_cv, run_final, write_checkpoint
from .state import (LOG_FIELDS, STATE_FORMAT, EpochBudget, load_model_state, read_training_state,
                    save_model_state, save_training_state)

__all__ = [  # importable from here as before the split
    "BLEND_GRID", "LOG_FIELDS", "STATE_FORMAT", "EpochBudget", "FeatureTable", "ImageLoader", "Pool", "RunSpec",
    "TrainError", "add_train_arguments", "amp_dtype", "attach_features", "blend_curve", "build_model",
    "calibrate_score", "epoch_seed", "fit", "fit_readout_head", "head_outputs", "load_data", "load_model_state",
    "main", "make_run_spec", "parse_args", "predict", "prepare_pool", "preprocessing_for", "read_training_state",
    "resolve_device", "run", "run_cv", "run_epoch", "run_final", "save_model_state", "save_training_state",
    "to_plain", "train_batches", "trunk_identity", "trunk_source_for", "write_checkpoint",
]

EXIT_OK, EXIT_USAGE = 0, 2
# what may change when resuming: nothing that alters the result
RESUME_SAFE_KEYS = ("train.device", "train.progress", "train.eval_batch_size", "data.workers", "data.cache_dir")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run(args, argv if argv is not None else sys.argv[1:])


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Entry for `resmemnet train` (args from its subparser) and for main(argv)."""
    from ..trunks import TrunkLoadError
    from ..checkpoint import CheckpointError

    try:
        return _run(args, argv)
    except (ConfigError, DatasetError, TrainError, TrunkLoadError, CheckpointError) as exc:
        print(f"resmemnet train: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _run(args, argv) -> int:
    overrides = list(args.overrides or [])
    if args.device:
        overrides.append(f"train.device={args.device}")
    if args.no_progress:
        overrides.append("train.progress=false")
    if args.stop_after is not None and args.stop_after < 1:
        raise TrainError("--stop-after must be at least 1")
    command = "resmemnet train " + " ".join(shlex.quote(a) for a in (argv or []))
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "run.json").is_file() or not (run_dir / "config.json").is_file():
            raise TrainError(f"--resume: {run_dir} is not a run folder (no run.json/config.json)")
        if args.config:
            raise TrainError("--config cannot be combined with --resume: the run's own config is used")
        for text in overrides:
            if text.split("=", 1)[0].strip() not in RESUME_SAFE_KEYS:
                raise TrainError(f"--set {text!r} would change a resumed run; only {', '.join(RESUME_SAFE_KEYS)} "
                                 "may be changed")
        cfg = config_from_dict(json.loads((run_dir / "config.json").read_text()), overrides)
        run_info = json.loads((run_dir / "run.json").read_text())
        if args.cv and run_info.get("mode") != "cv":
            raise TrainError(f"{run_dir} is a {run_info.get('mode')} run, not a --cv run")
        if args.cv_results:
            run_info["cv_results"] = args.cv_results
        run_info.setdefault("resumed", []).append(command)
        mode = run_info["mode"]
    else:
        cfg = load_config(args.config or "default", overrides)
        if args.print_config:
            print(to_toml(cfg.to_dict()))
            return EXIT_OK
        mode = "cv" if args.cv else "final"
        if args.cv and args.cv_results:
            raise TrainError("--cv-results goes with a final (non --cv) run")
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path(args.out) if args.out else Path(cfg.output.runs_dir) / f"{cfg.output.name}-{mode}-{stamp}"
        if (run_dir / "run.json").exists():
            raise TrainError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or pick another --out")
        run_info = {"mode": mode, "command": command, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "cv_results": args.cv_results}
    if run_info.get("cv_results"):
        read_cv_results(run_info["cv_results"])  # fail before training, not after
    # under torchrun: join the job (every rank has read the run folder by now; rank 0 writes it)
    dist, device_name = init_distributed(cfg.train.device)
    try:
        return _train(cfg, args, dist, device_name, run_dir, run_info, mode)
    finally:
        shutdown(dist)


def _train(cfg, args, dist, device_name: str, run_dir: Path, run_info: dict, mode: str) -> int:
    device = resolve_device(device_name)
    run_dir = Path(broadcast_object(str(run_dir), dist))  # a default folder name holds rank 0's clock
    log = _log if dist.is_main else _quiet
    # data and trunk first: a missing folder or weight file must not leave a run folder behind.
    # Rank 0 goes first wherever files may be written (dataset caches, split files).
    if not dist.is_main:
        barrier(dist)
    labelled, teacher = load_data(cfg)
    model, source = build_model(cfg)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir)
        (run_dir / "run.json").write_text(json.dumps(run_info, indent=1) + "\n")
        workers = f", {dist.world} processes ({dist.backend})" if dist.enabled else ""
        log(f"run folder: {run_dir} ({mode}, device {device}{workers})")
        pool = prepare_pool(cfg, run_dir, labelled, teacher, resume=bool(args.resume), log=log)
        barrier(dist)
    else:
        pool = prepare_pool(cfg, run_dir, labelled, teacher, resume=True, log=log)  # rank 0's splits.json
    preprocessing = preprocessing_for(cfg, model)
    attach_features(cfg, pool, model, source, preprocessing, device, log=log, dist=dist)
    loader = ImageLoader(pool.paths, preprocessing, cfg.data.workers)
    budget = EpochBudget(args.stop_after)
    if mode == "cv":
        finished = run_cv(cfg, run_dir, pool, model, loader, device, budget, log=log, dist=dist)
    else:
        finished = run_final(cfg, run_dir, pool, model, source, preprocessing, loader, device, budget, run_info,
                             log=log, dist=dist)
    if not finished:
        log(f"stopped after {args.stop_after} epoch(s); continue with: resmemnet train --resume {run_dir}")
    return EXIT_OK


def _quiet(message: str) -> None:
    """The log of ranks other than 0: rank 0 reports for the whole job."""


if __name__ == "__main__":
    sys.exit(main())
