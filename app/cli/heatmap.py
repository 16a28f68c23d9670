"""`resmemnet heatmap`: Grad-RAM overlays (and optionally the raw maps) for image files and folders."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .kit import (EXIT_OK, EXIT_SOME_FAILED, add_onnx_arg, add_precision_arg, add_profile_arg, add_weights_arg, checked_profile,
                  fail, load_scorer, profile_note)


def register(sub) -> None:
    from model.overlay import COLORMAPS, DEFAULT_COLORMAP

    p = sub.add_parser("heatmap", help="write Grad-RAM heatmap overlays for images",
                       description="For every image, write NAME.overlay.png: the Grad-RAM map (which regions "
                                   "raise the memorability score) blended onto the upright original. Folders are "
                                   "walked recursively. Unreadable files are reported and skipped; the exit "
                                   "status is 1 if any failed.")
    p.add_argument("paths", nargs="+", metavar="IMAGE", help="image files or folders")
    p.add_argument("-o", "--out-dir", required=True, metavar="OUT_DIR", help="folder for the output files")
    add_weights_arg(p)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--layer", default=None, type=layer_spec, metavar="LAYER",
                   help="trunk stage: layer4, layer3, layer2, layer1, a comma list (their maps' mean), or all; "
                        "default layer3,layer4")
    p.add_argument("--alpha", default=0.5, type=unit_float, help="heatmap weight in the blend, 0..1 (default 0.5)")
    p.add_argument("--colormap", default=DEFAULT_COLORMAP, choices=COLORMAPS)
    add_profile_arg(p)  # the map explains that profile's score
    add_precision_arg(p)
    add_onnx_arg(p)
    p.add_argument("--raw", action="store_true",
                   help="also write NAME.heatmap.png (8-bit grayscale map) and NAME.heatmap.npy (float32 map)")
    p.set_defaults(func=run_heatmap)


def layer_spec(text: str) -> str:
    from model.heatmaps import parse_layers

    try:
        parse_layers(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def unit_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return value


def output_stems(files: list[str]) -> dict[str, str]:
    """Input path -> output stem, unique case-insensitively: photo, photo-2, ... for same-named inputs."""
    taken: set[str] = set()
    stems = {}
    for path in files:
        base = Path(path).stem or "image"
        stem, n = base, 1
        while stem.lower() in taken:
            n += 1
            stem = f"{base}-{n}"
        taken.add(stem.lower())
        stems[path] = stem
    return stems


def run_heatmap(args) -> int:
    import numpy as np

    from model.overlay import heatmap_png, overlay_png
    from model.preprocess import ImageDecodeError
    from model.scoring import collect_inputs

    files, missing = collect_inputs(args.paths)
    if not files and not missing:
        return fail("no files found under the given paths")
    scorer = load_scorer(args)
    profile = checked_profile(scorer, args.profile)  # a usage error leaves no output folder behind
    out_dir = Path(args.out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return fail(f"cannot create the output folder {out_dir}: {exc}")
    failed = 0
    for path in missing:
        print(f"{path}: error: no such file or folder (not_found)", file=sys.stderr)
        failed += 1
    stems = output_stems(files)
    for path in files:
        try:
            prepared = scorer.prepare(path, keep_image=True)
            result = scorer.heatmap(prepared, layers=args.layer, profile=profile)
        except ImageDecodeError as exc:
            print(f"{path}: error: {exc.message} ({exc.reason})", file=sys.stderr)
            failed += 1
            continue
        target = out_dir / f"{stems[path]}.overlay.png"
        target.write_bytes(overlay_png(prepared.image, result.heatmap, alpha=args.alpha, colormap=args.colormap))
        if args.raw:
            (out_dir / f"{stems[path]}.heatmap.png").write_bytes(heatmap_png(result.heatmap))
            np.save(out_dir / f"{stems[path]}.heatmap.npy", result.heatmap, allow_pickle=False)
        print(f"{path} -> {target} (score {result.score:.6f})", flush=True)
    total = len(files) + len(missing)
    print(f"wrote {total - failed} of {total} heatmaps to {out_dir} with {scorer.model_name}{profile_note(profile)}"
          + (f"; {failed} failed" if failed else ""), file=sys.stderr)
    return EXIT_SOME_FAILED if failed else EXIT_OK
