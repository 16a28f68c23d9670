"""`resmemnet adapt LABELS --name NAME --out FILE`: a checkpoint with every profile of --weights
plus NAME, fitted to the user's own labelled photos on the CPU (model/training/adapt.py), and the
k-fold CV table that says what the adaptation bought.

Exit codes: 0 written; 2 nothing written (bad labels, name, output path or checkpoint: one
`resmemnet: error:` line)."""
from __future__ import annotations

import sys
from pathlib import Path

from .kit import EXIT_OK, add_weights_arg, positive_int, weights_path


def register(sub) -> None:
    p = sub.add_parser(
        "adapt", help="fit a new score profile to your own labelled photos (a checkpoint with it added)",
        description="Fit a score profile NAME to your labelled photos and write a checkpoint holding every "
                    "profile of --weights plus NAME. LABELS is a CSV with `path` and `score` columns (paths "
                    "relative to the CSV; scores in [0, 1], e.g. hit rates; they are compared by rank) or a folder "
                    "holding scores.csv; at least 50 photos. It runs on the CPU, reusing the checkpoint's trunk "
                    "and head: the trunk's features of every photo and its mirror image are computed once and "
                    "cached. It reports 5-fold CV Spearman rho of NAME beside the checkpoint's own profiles (and "
                    "the resmem package, when installed) on your photos. NAME's percentile ranks a score among "
                    "your labelled photos. Serve it with RESMEMNET_WEIGHTS=FILE and ?profile=NAME.")
    p.add_argument("labels", metavar="LABELS", help="CSV of path,score (paths relative to it), or a folder holding "
                                                    "scores.csv")
    p.add_argument("--name", required=True, metavar="NAME",
                   help="the new profile's name: a-z, 0-9, _ and -, starting with a letter, not one the checkpoint has")
    p.add_argument("--out", required=True, metavar="FILE", help="the new checkpoint's .json (its .safetensors beside)")
    add_weights_arg(p)
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="where the photos' features are cached (default: $RESMEMNET_CACHE_DIR/features, else "
                        "~/.cache/resmemnet/features)")
    p.add_argument("--folds", type=positive_int, default=5, help="k of the k-fold CV report (default 5)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the CV folds: 0 or more (default 0)")
    p.add_argument("--blend", type=_blend, default=0.5, metavar="B|auto",
                   help="weight b of the new output's z-score in NAME, the teacher output's being 1 - b (default 0.5); "
                        "auto: chosen by inner CV from 0, 0.05, ..., 1 (noisy with a few hundred photos)")
    p.add_argument("--no-resmem", action="store_true", help="leave the resmem package out of the CV table")
    p.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--workers", type=positive_int, default=2, help="image decoding threads (default 2)")
    p.set_defaults(func=run_adapt)


def _seed(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer 0 or more, got {text!r}")
    return value


def _blend(text: str):
    import argparse
    import math

    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected auto or a number from 0 to 1, got {text!r}")
    return value


def _check_folds(folds: int, n: int) -> None:
    from model.training.adapt_inputs import MIN_FOLD, AdaptError

    if folds < 2 or n // folds < MIN_FOLD:
        raise AdaptError(f"--folds {folds}: k-fold CV of {n} photos needs 2 to {max(2, n // MIN_FOLD)} folds (at "
                         f"least {MIN_FOLD} photos in each test fold)")


def _out_path(args, base: Path) -> Path:
    from model.training.adapt_inputs import AdaptError

    out = Path(args.out)
    if out.suffix == ".safetensors":
        out = out.with_suffix(".json")
    if out.suffix != ".json":
        raise AdaptError(f"--out must end in .json (the checkpoint's metadata; its .safetensors goes beside), not "
                         f"{out.name!r}")
    if out.resolve() == base.resolve():
        raise AdaptError(f"--out {out} is the checkpoint being adapted: write a new file")
    existing = [f for f in (out, out.with_suffix(".safetensors")) if f.exists()]
    if existing and not args.force:
        raise AdaptError(f"--out: {existing[0]} exists (use --force to overwrite)")
    if not out.parent.is_dir():
        raise AdaptError(f"--out: folder {out.parent} does not exist")
    return out


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_adapt(args) -> int:
    import time

    from model.checkpoint import load_checkpoint, _json_path
    from model.filecache import cache_dir
    from model.profiles import profile_names
    from model.scoring import Scorer
    from model.training.adapt import AdaptSettings, adapt, teacher_column
    from model.training.adapt_inputs import check_images, check_name, photo_features, read_labels, resmem_scores

    start = time.perf_counter()
    base = _json_path(weights_path(args))
    labels = read_labels(args.labels)
    _check_folds(args.folds, len(labels.paths))
    out = _out_path(args, base)
    model, meta = load_checkpoint(base)
    teacher_column(model.cfg)
    name = check_name(args.name, tuple(dict.fromkeys((*profile_names(model.cfg), *model.cfg.output_names))))
    scorer = Scorer(model, meta.preprocessing, meta=meta, device="cpu", mixed_precision=False)
    check_images(scorer, labels.paths, workers=args.workers)
    folder = Path(args.cache_dir) if args.cache_dir else cache_dir() / "features"
    log(f"adapt: {len(labels.paths)} photos of {labels.csv_path}; trunk features (cached in {folder})")
    t0 = time.perf_counter()
    feats = photo_features(scorer, labels.paths, folder, batch_size=args.batch_size, workers=args.workers, log=log)
    features_s = time.perf_counter() - t0
    resmem = None if args.no_resmem else resmem_scores(labels.paths, folder, batch_size=args.batch_size, log=log)
    grid = {} if args.blend == "auto" else {"blend_grid": (float(args.blend),)}
    settings = AdaptSettings(name=name, folds=args.folds, seed=args.seed, **grid,
                             tap_weighting=(meta.training.get("config", {}).get("readout", {})
                                            .get("tap_weighting", "stage")))
    log(f"adapt: {settings.folds}-fold CV of {name} (the fit repeated inside each training fold)")
    description = (f"fitted to {len(labels.paths)} labelled photos ({labels.csv_path.name}): a new output blended "
                   "with the teacher output; its percentile ranks a score among those photos")
    result = adapt(feats, labels.scores, model, settings, resmem=resmem, description=description, log=log)
    table = result.cv["spearman"]
    verdict = _verdict(name, table)
    new_meta = _metadata(meta, base, labels, settings, result, verdict, name, features_s)
    from model.checkpoint import save_checkpoint

    written = save_checkpoint(result.model, new_meta, out)
    _print_table(name, table, result.cv, labels, verdict)
    print(f"wrote {written} (+ {written.with_suffix('.safetensors').name}; {name}: alpha {result.fit.alpha:g}, "
          f"blend {result.fit.blend:.2f}; features {features_s:.0f} s, CV and fit "
          f"{result.seconds['cv'] + result.seconds['fit']:.0f} s, total {time.perf_counter() - start:.0f} s)")
    n_ref = (meta.reference or {}).get("n")
    others = (f"the other profiles' rank among the checkpoint's {n_ref} reference photos" if n_ref else
              "the other profiles have none: the checkpoint has no reference set")
    print(f"percentiles of {name} rank a score among these {len(labels.paths)} labelled photos ({others})")
    print(f"serve it: RESMEMNET_WEIGHTS={written} resmemnet serve, then ?profile={name}; or "
          f"resmemnet score --weights {written} --profile {name} PHOTOS")
    return EXIT_OK


def _verdict(name: str, table: dict) -> dict:
    others = {k: v["mean"] for k, v in table.items() if k not in (name, "resmem")}
    best = max(others, key=others.get)
    mine = table[name]["mean"]
    return {"best_shipped": best, "beats_shipped": bool(mine > others[best]),
            "recommended": name if mine > others[best] else best}


def _print_table(name, table, cv, labels, verdict) -> None:
    print(f"{cv['folds']}-fold CV Spearman rho on {cv['n']} labelled photos ({labels.csv_path.name}; seed "
          f"{cv['seed']}; a photo and its mirror image always in one fold):")
    width = max(len(k) for k in table)
    print(f"  {'profile':<{width}}  mean    sd     folds")
    for k, v in table.items():
        tag = "  (new)" if k == name else ("  (the resmem package)" if k == "resmem" else "")
        folds = " ".join(f"{r:.3f}" for r in v["folds"])
        print(f"  {k:<{width}}  {v['mean']:.3f}  {v['sd']:.3f}  {folds}{tag}")
    best = verdict["best_shipped"]
    if verdict["beats_shipped"]:
        print(f"{name} ranks these photos better than every profile the checkpoint had "
              f"({table[name]['mean']:.3f} vs {best} {table[best]['mean']:.3f}).")
    else:
        print(f"{name} does NOT beat {best} on these photos ({table[name]['mean']:.3f} vs {table[best]['mean']:.3f}): "
              f"the checkpoint is written, but score photos like these with --profile {best}"
              + (" (with a few hundred photos the new output adds little; more labels may change that)."
                 if cv["n"] < 1000 else "."))


def _metadata(meta, base: Path, labels, settings, result, verdict, name: str, features_s: float):
    import copy
    import datetime

    from model.environment import installed_version
    from model.filecache import sha256_file

    new = copy.deepcopy(meta)
    for part in (new.metrics, new.training, new.provenance):  # an adapted checkpoint's earlier adapt records stay
        earlier = part.get("adapt")
        if earlier:
            part.setdefault("adapt_earlier", []).append(earlier)
    new.name = f"{meta.name}-{name}"
    new.description = (f"{meta.description} Adapted: profile {name} fitted to {len(labels.paths)} labelled photos "
                       f"({labels.csv_path.name}).").strip()
    cv = result.cv
    new.metrics.setdefault("profiles", {})
    new.metrics["profiles"][name] = {"within_cv": {labels.csv_path.name: round(cv["spearman"][name]["mean"], 4)}}
    new.metrics["adapt"] = {"profile": name, **cv, "verdict": verdict, "note": "k-fold CV rho on the labelled photos of the adapt "
                            f"run, every profile on the same test folds; {name} refitted inside each training fold"}
    new.reference = copy.deepcopy(meta.reference or {})
    new.reference.setdefault("profiles", {})[name] = result.quantiles
    new.reference.setdefault("sets", {})[name] = {
        "set": f"the {len(labels.paths)} labelled photos {name} was fitted to ({labels.csv_path.name})",
        "n": len(labels.paths)}
    fit = result.fit
    new.training = {**new.training, "adapt": {
        "profile": name, "labels_file": labels.csv_path.name, "labels_sha256": labels.sha256,
        "n_photos": len(labels.paths), "augmentations": ["none", "hflip"],
        "alphas": list(settings.alphas), "alpha": fit.alpha, "inner_cv_spearman": {str(a): r for a, r in
                                                                                    fit.inner_rho.items()},
        "blend": fit.blend, "blend_grid": list(settings.blend_grid), "inner_folds": settings.inner_folds,
        "tap_weighting": settings.tap_weighting, "calibration": {"scale": fit.scale, "shift": fit.shift},
        "seconds": {"features": round(features_s, 1), "cv": round(result.seconds["cv"], 1),
                    "fit": round(result.seconds["fit"], 1)}}}
    new.provenance = {**new.provenance, "adapt": {
        "profile": name, "base_checkpoint": meta.name, "base_json_sha256": sha256_file(base),
        "base_tensors_sha256": meta.tensors_sha256, "labels_sha256": labels.sha256,
        "n_photos": len(labels.paths), "command": "resmemnet " + " ".join(sys.argv[1:]),
        "resmemnet": installed_version() or "", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds")}}
    return new
