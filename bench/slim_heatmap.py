"""How close the torch-free heatmaps are to the torch ones, on real photos with the shipped
checkpoint (docs/api.md, "Heatmaps without torch").

For each photo: the export's layer-4 map (model/slim_heatmap.py, ONNX Runtime fp32) against the
torch Grad-RAM of layer4 (fp32), and, for what a user of the slim runtime gives up, against the
torch default (layer3 + layer4). Differences are on the [0, 1] map at the photo's size.

    .venv/bin/python bench/slim_heatmap.py [FOLDER] [N]      (default ../shared/data/pool, 16 photos)
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(folder: str = str(REPO.parent / "shared" / "data" / "pool"), n: int = 16) -> None:
    from model.engines import onnxruntime_runner
    from model.environment import SHIPPED_WEIGHTS
    from model.gradram import heatmap_for_tensor
    from model.scoring import Scorer
    from model.slim_heatmap import slim_heatmap

    photos = sorted(Path(folder).glob("*.jpg"))[: int(n)]
    if not photos:
        sys.exit(f"no photos in {folder}")
    scorer = Scorer.from_checkpoint(SHIPPED_WEIGHTS, backend="torch", device="cpu", mixed_precision=False)
    runner = onnxruntime_runner(SHIPPED_WEIGHTS)
    same, default, scores = [], [], []
    for path in photos:
        p = scorer.prepare(str(path))
        size = (p.width, p.height)
        slim = slim_heatmap(runner, p.tensor.numpy(), size)
        layer4 = heatmap_for_tensor(scorer.model, p.tensor, size, layer="layer4")
        both = heatmap_for_tensor(scorer.model, p.tensor, size, layer="layer3,layer4")
        same.append(float(np.abs(slim.heatmap - layer4.heatmap).max()))
        default.append(float(np.abs(slim.heatmap - both.heatmap).mean()))
        scores.append(abs(slim.score - layer4.score))
    print(f"{len(photos)} photos from {folder}, shipped checkpoint, fp32")
    print(f"slim layer4 vs torch layer4: max |diff| per photo: largest {max(same):.2e}, median {np.median(same):.2e}")
    print(f"slim score vs torch score: largest |diff| {max(scores):.2e}")
    print(f"slim layer4 vs torch layer3+layer4 (the full runtime's default): mean |diff| per photo: "
          f"median {np.median(default):.3f}, largest {max(default):.3f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
