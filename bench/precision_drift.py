"""How far the reduced-precision trunk moves a checkpoint's scores from fp32, on real photos.

    .venv/bin/python bench/precision_drift.py --images ../shared/data/pool --n 64
    .venv/bin/python bench/precision_drift.py --images ../shared/data/pool --n 64 --precisions bf16 fp16
    .venv/bin/python bench/precision_drift.py --images ../shared/data/pool --n 96 --precisions --mirror

Every photo is prepared once (Scorer.prepare); each precision's Scorer (model.scoring.Scorer with
`precision=`; the head always runs in fp32) scores the same tensors, and the fp32 Scorer's scores
are the reference. Reported per precision and profile: max, 99th percentile and median of
|score - fp32 score|, Spearman's rank correlation with fp32, and whether the trunk ran in that
dtype natively (bf16 on AVX512-BF16/AMX CPUs, fp16 on CUDA) or emulated. The photos are the first
--n files of --images, sorted by name (a fixed, repeatable sample). The tolerances the tests
use for the mixed-precision path come from these numbers (docs/robustness.md, "Precision").
--mirror also scores every photo's mirror image (left-right) in fp32 and reports the same
numbers against the photo's own fp32 scores: how much a small edit moves a score
(docs/robustness.md, "Small edits").
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep: fair on a shared CPU


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def drift(reference, other) -> dict:
    import numpy as np

    d = np.abs(np.asarray(other) - np.asarray(reference))
    return {"max_abs": float(d.max()), "p99_abs": float(np.quantile(d, 0.99)), "median_abs": float(np.median(d)),
            "spearman": spearman(reference, other)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default=None, help="checkpoint .json (default: the shipped one)")
    ap.add_argument("--images", required=True, help="folder of photos")
    ap.add_argument("--n", type=int, default=64, help="photos (the first N by name)")
    ap.add_argument("--precisions", nargs="*", default=["bf16"], choices=("bf16", "fp16"))
    ap.add_argument("--mirror", action="store_true", help="also compare each photo's mirror image, in fp32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--json", help="also write the report here")
    args = ap.parse_args(argv)

    import torch

    from model import devices
    from model.scoring import Scorer

    paths = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:args.n]
    if not paths:
        print(f"no photos in {args.images}", file=sys.stderr)
        return 2
    reference = Scorer.from_checkpoint(args.weights, device=args.device, precision="fp32", backend="torch")
    tensors = [reference.prepare(str(p)).tensor for p in paths]
    profiles = reference.profiles

    def table(scorer, tensors=tensors) -> dict[str, list[float]]:
        """Every profile's scores from one trunk pass per batch (the photos share one input shape
        under a square resize policy; other policies are batched by shape)."""
        rows: dict[int, list[float]] = {}
        by_shape: dict[tuple, list[int]] = {}
        for i, t in enumerate(tensors):
            by_shape.setdefault(tuple(t.shape), []).append(i)
        for idxs in by_shape.values():
            for start in range(0, len(idxs), args.batch_size):
                chunk = idxs[start:start + args.batch_size]
                out = scorer.profile_score_batch(torch.stack([tensors[i] for i in chunk]), profiles)
                rows.update(zip(chunk, out.tolist()))
        return {name: [rows[i][j] for i in range(len(tensors))] for j, name in enumerate(profiles)}

    fp32 = table(reference)
    device = reference.device
    native = {"bf16": device.type == "cpu" and devices.cpu_has_native_bf16() or
              (device.type == "cuda" and torch.cuda.is_bf16_supported()),
              "fp16": device.type == "cuda"}
    report = {"weights": str(args.weights or "shipped"), "photos": len(paths), "images": str(args.images),
              "device": str(device), "torch": torch.__version__, "precisions": {}}
    for precision in args.precisions:
        scorer = Scorer(reference.model, reference.preprocessing, device=args.device, meta=reference.meta,
                        precision=precision)
        got = table(scorer)
        report["precisions"][precision] = {"native": native[precision],
                                           "profiles": {name: drift(fp32[name], got[name]) for name in profiles}}
    if args.mirror:
        got = table(reference, [torch.flip(t, dims=[-1]) for t in tensors])
        report["mirror"] = {name: drift(fp32[name], got[name]) for name in profiles}
        for name, d in report["mirror"].items():
            print(f"mirror image vs the photo (fp32), profile {name}, {len(paths)} photos: max |d| {d['max_abs']:.2e}, "
                  f"p99 {d['p99_abs']:.2e}, median {d['median_abs']:.2e}, Spearman {d['spearman']:.5f}")
    for precision, entry in report["precisions"].items():
        kind = "native" if entry["native"] else "emulated"
        for name, d in entry["profiles"].items():
            print(f"{precision} ({kind}) vs fp32, profile {name}, {len(paths)} photos: max |d| {d['max_abs']:.2e}, "
                  f"p99 {d['p99_abs']:.2e}, median {d['median_abs']:.2e}, Spearman {d['spearman']:.5f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
