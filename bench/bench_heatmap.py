"""Heatmap latency through the Scorer, with several layer choices timed side by side.

    .venv/bin/python bench/bench_heatmap.py                                   # stand-ins, synthetic photos
    .venv/bin/python bench/bench_heatmap.py --weights weights/resmemnet-default.json \\
        --images ../shared/data/pool --n 16 --rounds 3 --layers layer4 layer3,layer4

Every photo is decoded and prepared once (Scorer.prepare), then in every round each --layers
choice makes its heatmap (Scorer.heatmap) and its overlay PNG, the choices in a rotated order so
that load drift on a shared machine hits them alike. Reported per choice: the median and range
(min-max) over photos x rounds, in wall-clock ms, of
  model     Scorer.heatmap: Grad-RAM (forward + backward) and the map resampled to the photo's size
  overlay   colour + blend at the photo's size + PNG encode
and, for reference, a plain score of the same input (what /score costs; one forward pass).
--overlays DIR also writes every photo's overlay for every choice (NAME.LAYERS.png), to compare
what the choices show.

Stand-ins (without --weights): ResMem-Net on the resmem package's ResNet-152 trunk with a 224 px
input, and a random ResNet-50; timings do not depend on the weights. Without --images the photos
are synthetic, 224x224 and 1024x768 (the network input is set by the resize policy; only the
overlay scales with the photo's own size).
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import os
import statistics
import sys
import time
from pathlib import Path

# Before torch loads OpenMP: idle threads sleep instead of spinning. On a CPU shared with other
# work, spinning threads make every small op tens of times slower; on a dedicated CPU it costs ~nothing.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

SIZES = ((224, 224), (1024, 768))


def synthetic_photo(width: int, height: int, seed: int = 0) -> bytes:
    """A smooth, photo-like JPEG (gradients, blobs, mild noise): noise-only images decode slower."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    arr = np.stack([x / width, y / height, 0.5 + 0.5 * np.sin(x / 37.0) * np.cos(y / 53.0)], axis=-1)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.05, 0.2) * width
        arr += rng.uniform(-0.5, 0.5, 3) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))[..., None]
    arr += rng.normal(0, 0.02, arr.shape)
    img = Image.fromarray((np.clip(arr, 0, 1) * 255).astype(np.uint8), "RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def scorers(args):
    """(label, Scorer) for the checkpoint in --weights, else the stand-ins."""
    from model.network import build_resmemnet
    from model.preprocess import Preprocessing, ResizePolicy
    from model.scoring import Scorer
    from model.trunks import resmem_source

    if args.weights:
        scorer = Scorer.from_checkpoint(args.weights, device=args.device, backend="torch")
        yield f"{scorer.meta.name} ({scorer.config.backbone})", scorer
        return
    unit = Preprocessing(resize=ResizePolicy(size=224), input_scaling="unit")
    if args.only in (None, "resnet152"):
        if importlib.util.find_spec("resmem") is not None:
            yield "ResNet-152 (resmem trunk)", Scorer(build_resmemnet(trunk_source=resmem_source()), unit,
                                                      device=args.device)
        else:  # same architecture and cost, random weights
            yield "ResNet-152 (random weights)", Scorer(build_resmemnet(backbone="resnet152", input_scaling="unit"),
                                                        unit, device=args.device)
    if args.only in (None, "resnet50"):
        imagenet = Preprocessing(resize=ResizePolicy(size=224), input_scaling="imagenet")
        yield "ResNet-50 (random weights)", Scorer(build_resmemnet(backbone="resnet50"), imagenet, device=args.device)


def photos(args) -> list[tuple[str, bytes]]:
    if not args.images:
        return [(f"{w}x{h}", synthetic_photo(w, h)) for w, h in SIZES]
    files = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    step = max(1, len(files) // args.n)  # spread over the folder, not its first files
    return [(p.name, p.read_bytes()) for p in files[::step][:args.n]]


def ms(seconds: float) -> float:
    return seconds * 1000.0


def bench(label, scorer, inputs, layer_choices, rounds, overlays: Path | None = None):
    import torch

    from model.overlay import overlay_png

    prepared = [scorer.prepare(data, keep_image=True) for _, data in inputs]
    if overlays is not None:
        overlays.mkdir(parents=True, exist_ok=True)
        for (name, _), p in zip(inputs, prepared):
            for layers in layer_choices:
                png = overlay_png(p.image, scorer.heatmap(p, layers=layers).heatmap)
                (overlays / f"{Path(name).stem}.{layers.replace(',', '+')}.png").write_bytes(png)
    for p in prepared[:1]:  # warm-up: first-call allocations and kernel selection
        for layers in layer_choices:
            scorer.heatmap(p, layers=layers)
    times = {layers: {"model": [], "overlay": []} for layers in layer_choices}
    score_ms = []
    for r in range(rounds):
        for i, p in enumerate(prepared):
            t = time.perf_counter()
            scorer.score_tensor_batch(p.tensor[None])
            score_ms.append(ms(time.perf_counter() - t))
            shift = (r + i) % len(layer_choices)
            for layers in layer_choices[shift:] + layer_choices[:shift]:
                t = time.perf_counter()
                result = scorer.heatmap(p, layers=layers)
                t_model = time.perf_counter()
                overlay_png(p.image, result.heatmap)
                times[layers]["model"].append(ms(t_model - t))
                times[layers]["overlay"].append(ms(time.perf_counter() - t_model))
        print(f"  {label}: round {r + 1} of {rounds} done", file=sys.stderr, flush=True)
    net = {f"{p.tensor.shape[2]}x{p.tensor.shape[1]}" for p in prepared}
    rows = []
    for layers in layer_choices:
        model, overlay = times[layers]["model"], times[layers]["overlay"]
        rows.append((label, layers, ", ".join(sorted(net)), model, overlay))
    return rows, score_ms, torch.get_num_threads()


def cell(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


def main(argv=None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", help="benchmark this checkpoint instead of the stand-ins")
    parser.add_argument("--images", help="a folder of photos (default: two synthetic ones)")
    parser.add_argument("--n", type=int, default=16, help="with --images: how many photos, spread over the folder")
    parser.add_argument("--rounds", "--repeats", type=int, default=3, help="timed rounds over all photos")
    parser.add_argument("--layers", nargs="+", default=["layer4", "layer3,layer4"], metavar="LAYERS",
                        help="layer choices to time side by side (each as Scorer.heatmap's layers: layer4, "
                             "layer3,layer4, all, ...)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--only", choices=("resnet152", "resnet50"), help="just one stand-in")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--overlays", type=Path, metavar="DIR", help="also write every overlay here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    inputs = photos(args)
    rows, threads = [], torch.get_num_threads()
    for label, scorer in scorers(args):
        got, score_ms, threads = bench(label, scorer, inputs, list(args.layers), args.rounds, args.overlays)
        rows += [(*row, score_ms) for row in got]
        del scorer

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\ntorch {torch.__version__}, {threads} threads on {os.cpu_count()} CPUs, device {args.device}, "
          f"load average {load:.1f}; {len(inputs)} photos x {args.rounds} rounds, choices interleaved; "
          "wall ms, median (min-max)\n")
    print("| model | layers | net input | score | heatmap (model) | overlay PNG |")
    print("|---|---|---|---:|---:|---:|")
    for label, layers, net, model, overlay, score_ms in rows:
        print(f"| {label} | {layers} | {net} | {cell(score_ms)} | {cell(model)} | {cell(overlay)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
