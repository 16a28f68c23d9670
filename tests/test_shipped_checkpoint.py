"""The shipped checkpoint: complete metadata, size limit, and it loads and scores."""
import json

import pytest
import torch

from model.checkpoint import load_checkpoint, read_meta
from model.environment import SHIPPED_WEIGHTS, installed_version
from tests.conftest import SHARED_DATA, make_image

WEIGHTS = SHIPPED_WEIGHTS


def test_metadata_is_complete_and_tensors_fit_the_limit():
    meta = json.loads(WEIGHTS.read_text())
    for key in ("architecture", "preprocessing", "trunk", "training", "metrics", "provenance", "license", "tensors"):
        assert meta.get(key), key
    cv = meta["metrics"]["cross_validation"]
    assert cv["mean"]["spearman"] > 0.5 and len(cv["splits"]) == 5
    # The model card's claim: the shipped recipe beats the ridge on the same trunk and folds.
    ridge = meta["metrics"]["baselines"]["ridge_stage_pooled_resnet152_square192"]
    assert cv["mean"]["spearman"] > ridge["spearman_mean"]
    assert ridge["folds"] == "same 5 folds as cross_validation"
    assert WEIGHTS.with_suffix(".safetensors").stat().st_size <= 60 * 1024 * 1024
    assert read_meta(WEIGHTS).trunk.sha256  # a package trunk is pinned by hash


@pytest.mark.skipif(installed_version("resmem") is None, reason="the trunk package resmem is not installed")
def test_shipped_checkpoint_scores_images(tmp_path):
    from model.scoring import Scorer

    scorer = Scorer.from_checkpoint(WEIGHTS, device="cpu")
    pool = sorted((SHARED_DATA / "pool").glob("*.jpg"))[:4] if (SHARED_DATA / "pool").is_dir() else []
    paths = [str(p) for p in pool] or [str(tmp_path / f"{i}.jpg") for i in range(3)]
    if not pool:
        for i, p in enumerate(paths):
            make_image(p, size=(320, 240), seed=i)
    results = list(scorer.score_paths(paths, batch_size=4))
    scores = torch.tensor([r.score for r in results])
    assert all(r.ok for r in results) and ((scores > 0) & (scores < 1)).all()
    model, meta = load_checkpoint(WEIGHTS)
    assert meta.preprocessing.resize.mode == "square" and model.cfg.backbone == "resnet152"
