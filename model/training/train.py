"""Training ResMem-Net: the paper's phased recipe, cross-validation and the final checkpoint.

`main(argv)` is what the CLI's `resmemnet train` calls and tests call in-process. The work is
split into modules with one job each (open_clip style):

- params.py: command-line arguments; config.py (+ validation.py): the TOML config
- context.py: the run context (config, photos, model, device, distributed state, loader) every step reads
- data.py: the datasets' layouts; splits.py: the split plan; pool.py: a run's photos (every study, then
  the teacher's) and runs over them (training rows, common-scale targets, weights)
- features.py: the frozen trunk's feature caches; loader.py: the threaded image loader
- model_setup.py: model, trunk source, preprocessing, device, precision, per-epoch seeds
- state.py: what --resume reads back (model/optimiser tensors, state.json, log.csv), --stop-after
- loop.py: one epoch and all phases of one run (`fit`); readout_fit.py: the closed-form readout head
- profile_fit.py: the head's named outputs and the profiles fitted from its outputs
- predict.py: head outputs (once per run), scores, blend curve
- runs.py: one run, and the final model's checkpoint; cv.py: the cross-validation protocols
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

from .common import TrainError
from .config import ConfigError, config_from_dict, load_config, to_toml
from .data import DatasetError
from .distributed import broadcast_object, init_distributed, shutdown
from .params import parse_args
from .state import EpochBudget

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
        from .runs import read_cv_results

        read_cv_results(run_info["cv_results"])  # fail before training, not after
    # under torchrun: join the job (every rank has read the run folder by now; rank 0 writes it)
    dist, device_name = init_distributed(cfg.train.device)
    try:
        return _train(cfg, args, dist, device_name, run_dir, run_info, mode)
    finally:
        shutdown(dist)


def _train(cfg, args, dist, device_name: str, run_dir: Path, run_info: dict, mode: str) -> int:
    from .context import build_context
    from .cv import run_cv
    from .runs import run_final

    run_dir = Path(broadcast_object(str(run_dir), dist))  # a default folder name holds rank 0's clock
    ctx = build_context(cfg, run_dir, run_info, device_name=device_name, resume=bool(args.resume),
                        budget=EpochBudget(args.stop_after), dist=dist, log=_log if dist.is_main else _quiet)
    finished = run_cv(ctx) if mode == "cv" else run_final(ctx)
    if not finished:
        ctx.log(f"stopped after {args.stop_after} epoch(s); continue with: resmemnet train --resume {run_dir}")
    return EXIT_OK


def _quiet(message: str) -> None:
    """The log of ranks other than 0: rank 0 reports for the whole job."""


if __name__ == "__main__":
    sys.exit(main())
