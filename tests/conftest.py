"""Shared fixtures: a small random-trunk checkpoint and image files of many kinds."""
from __future__ import annotations

import os

# Idle OpenMP workers spin by default; on a busy 2-core CI machine that made small torch calls
# tens of times slower. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import io  # noqa: E402
from pathlib import Path

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


def make_image(path: Path | None = None, size=(120, 90), mode="RGB", fmt="JPEG", seed=0, **save_kwargs) -> bytes:
    """A random-texture image; written to `path` when given, bytes returned either way."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save_kwargs)
    data = buf.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A ResNet-50 ResMem-Net with a random trunk, embedded, at a small input size (fast on CPU)."""
    from model.backbones import TrunkSource
    from model.checkpoint import CheckpointMeta, save_checkpoint
    from model.network import build_resmemnet
    from model.preprocess import Preprocessing, ResizePolicy

    torch.manual_seed(0)
    model = build_resmemnet(backbone="resnet50")
    preprocessing = Preprocessing(resize=ResizePolicy(size=64, multiple=32), input_scaling="imagenet")
    meta = CheckpointMeta(
        name="test-random", architecture=model.cfg, preprocessing=preprocessing,
        trunk=TrunkSource(kind="none", depth="resnet50"), trunk_embedded=True,
        description="random weights for tests", license="test only",
    )
    path = tmp_path_factory.mktemp("ckpt") / "test-random.json"
    return save_checkpoint(model, meta, path, embed_trunk=True)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a test module: on the shared 2-core CI machine, OpenMP's
    spin-waiting made small multi-threaded ops tens of times slower. Results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
