"""Heatmap latency: Grad-RAM + overlay for a 224x224 and a 1024x768 photo, per model.

    .venv/bin/python bench/bench_heatmap.py                 # stand-ins for the shipped model
    .venv/bin/python bench/bench_heatmap.py --weights W.json  # a real checkpoint

Stand-ins (until a checkpoint ships): ResMem-Net on the resmem package's ResNet-152 trunk with
the shipped preprocessing (shorter side 224, [0,1] input), and a ResNet-50 one for comparison.
Timings do not depend on the weights. Each cell is the best of --repeats runs, as wall-clock ms
and (in brackets) the process's CPU ms over all its threads, which other load inflates less:
  decode    JPEG bytes -> upright RGB image
  score     plain scoring forward pass (what /score costs), for reference
  model     heatmap_for_image: preprocess + Grad-RAM + map resampled to the original size
  overlay   colour + blend at the original size + PNG encode
  total     decode -> model -> overlay PNG, end to end
The network input is set by the resize policy (a 1024x768 photo runs at 288x224); only the
overlay part scales with the photo's own resolution.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
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


def stand_ins():
    from model.trunks import resmem_source
    from model.network import build_resmemnet
    from model.preprocess import Preprocessing, ResizePolicy

    unit = Preprocessing(resize=ResizePolicy(size=224), input_scaling="unit")
    if importlib.util.find_spec("resmem") is not None:
        yield "resnet152", "ResNet-152 (resmem trunk, shipped config)", lambda: (build_resmemnet(trunk_source=resmem_source()), unit)
    else:  # same architecture and cost, random weights
        yield "resnet152", "ResNet-152 (random weights, shipped config)", lambda: (
            build_resmemnet(backbone="resnet152", input_scaling="unit"), unit)
    imagenet = Preprocessing(resize=ResizePolicy(size=224), input_scaling="imagenet")
    yield "resnet50", "ResNet-50 (random weights)", lambda: (build_resmemnet(backbone="resnet50"), imagenet)


def timed(fn, repeats: int):
    """((best wall ms, best CPU ms), last result).

    On a shared CPU the best wall time is the least disturbed run; the process CPU time (all
    threads) is what the work itself costs, whatever else runs on the machine.
    """
    fn()  # warm-up: first-call allocations and kernel selection
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return (min(walls) * 1000.0, min(cpus) * 1000.0), result


def bench_model(label, model, preprocessing, *, layers, repeats, device):
    from model.gradram import heatmap_for_image
    from model.overlay import overlay_png
    from model.preprocess import decode_image
    from model.scoring import Scorer

    scorer = Scorer(model, preprocessing, device=device)
    rows = []
    for width, height in SIZES:
        data = synthetic_photo(width, height)
        img = decode_image(data)
        tensor = preprocessing.image_to_tensor(img)
        t_decode, _ = timed(lambda: decode_image(data), repeats)
        t_score, _ = timed(lambda: scorer.score_tensor_batch(preprocessing.image_to_tensor(img)[None]), repeats)
        for layer in layers:
            t_model, result = timed(lambda: heatmap_for_image(scorer.model, preprocessing, img, layer=layer,
                                                                        autocast_dtype=scorer.autocast_dtype), repeats)
            t_overlay, png = timed(lambda: overlay_png(img, result.heatmap), repeats)

            def end_to_end():
                photo = decode_image(data)
                res = heatmap_for_image(scorer.model, preprocessing, photo, layer=layer)
                return overlay_png(photo, res.heatmap)

            t_total, _ = timed(end_to_end, repeats)
            rows.append((label, f"{width}x{height}", f"{tensor.shape[2]}x{tensor.shape[1]}", layer,
                         t_decode, t_score, t_model, t_overlay, t_total, len(png) // 1024))
            print(f"  {label} {width}x{height} {layer}: model {t_model[0]:.0f} ms, overlay {t_overlay[0]:.0f} ms, "
                  f"total {t_total[0]:.0f} ms (best of {repeats})", file=sys.stderr, flush=True)
    return rows


def ms(value: float) -> str:
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


def main(argv=None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", help="benchmark this checkpoint instead of the stand-ins")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per cell (the best is reported)")
    parser.add_argument("--layers", default="layer4,all", help="comma list of --layer values to time (layer4, all, ...)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--only", choices=("resnet152", "resnet50"), help="just one stand-in")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice). "
                        "On a busy shared CPU, --threads 1 gives the steadiest CPU times")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    layers = [s.strip() for s in args.layers.split(",") if s.strip()]

    if args.weights:
        from model.checkpoint import load_checkpoint

        model, meta = load_checkpoint(args.weights)
        candidates = [(f"{meta.name} ({meta.architecture.backbone})", lambda: (model, meta.preprocessing))]
    else:
        candidates = [(label, build) for key, label, build in stand_ins() if args.only in (None, key)]

    rows = []
    for label, build in candidates:
        model, preprocessing = build()
        rows += bench_model(label, model.eval(), preprocessing, layers=layers, repeats=args.repeats,
                            device=args.device)
        del model

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads on {os.cpu_count()} CPUs, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} "
          f"(load average {load:.1f}), device {args.device}; best of {args.repeats} runs: wall ms (process CPU ms)\n")
    print("| model | photo | net input | layer | decode | score | model | overlay | total | PNG KiB |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    for label, photo, net, layer, *times, kib in rows:
        print(f"| {label} | {photo} | {net} | {layer} | "
              + " | ".join(f"{ms(wall)} ({ms(cpu)})" for wall, cpu in times) + f" | {kib} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
