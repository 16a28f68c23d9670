"""Teacher photos from several score files (data.teacher.extra), teacher feature caches with
their own augmentations (data.teacher_augmentations, FeatureTable), the per-output branch kernel
share (readout.output_tap_weights), and a tiny readout run that uses them all."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.training.config import ConfigError, TeacherSpec, load_config
from model.training.data import load_lnsim, load_teacher
from model.training.features import FeatureTable

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write_scores(folder: Path, n: int, seed: int) -> Path:
    """n tiny PNGs named img_000.png ... (the same names in every folder) and a CSV of scores."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    scores = rng.uniform(0, 1, n)
    for k in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "RGB").save(folder / f"img_{k:03d}.png")
    path = folder.parent / f"{folder.name}.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["name", "resmem_score"])
        w.writerows((f"img_{k:03d}.png", s) for k, s in enumerate(scores))
    return path


# -- data.teacher.extra --------------------------------------------------------------------------

def test_extra_teacher_files_are_appended_in_order_with_unique_keys(tmp_path):
    first = _write_scores(tmp_path / "pool", 4, seed=0)
    second = _write_scores(tmp_path / "pool2", 3, seed=1)
    third = _write_scores(tmp_path / "more" / "pool3", 2, seed=2)
    alone = load_teacher(TeacherSpec(csv=str(first), image_root=str(tmp_path / "pool")), verbose=False)
    assert alone.keys == [f"img_{k:03d}.png" for k in range(4)]  # one file: as before

    spec = TeacherSpec(csv=str(first), image_root=str(tmp_path / "pool"),
                       extra=[f"{second}={tmp_path / 'pool2'}", f"{third}={tmp_path / 'more' / 'pool3'}"])
    data = load_teacher(spec, verbose=False)
    assert len(data) == 9 and data.skipped == 0
    assert data.keys == ([f"pool/img_{k:03d}.png" for k in range(4)] + [f"pool2/img_{k:03d}.png" for k in range(3)]
                         + [f"more/pool3/img_{k:03d}.png" for k in range(2)])
    assert len(set(data.keys)) == 9
    expected = np.concatenate([np.random.default_rng(s).uniform(0, 1, n) for s, n in ((0, 4), (1, 3), (2, 2))])
    np.testing.assert_allclose(data.scores, expected)
    assert all(Path(p).is_file() for p in data.paths)

    limited = load_teacher(TeacherSpec(csv=str(first), image_root=str(tmp_path / "pool"),
                                       extra=[f"{second}={tmp_path / 'pool2'}"], limit=5), verbose=False)
    assert len(limited) == 5 and len(set(limited.keys)) == 5


def test_teacher_source_config_errors():
    with pytest.raises(ConfigError, match="CSV=IMAGE_FOLDER"):
        load_config("lnsim", ['data.teacher.extra=["scores.csv"]'])
    ok = load_config("lnsim", ['data.teacher.extra=["a.csv=imgs", "b.csv=more"]'])
    assert ok.data.teacher.extra == ["a.csv=imgs", "b.csv=more"]
    with pytest.raises(ConfigError, match="'vflip' is not in data.augmentations"):
        load_config("lnsim", ['data.augmentations=["none", "hflip"]', 'data.teacher_augmentations=["vflip"]'])
    with pytest.raises(ConfigError, match="needs model.head = 'readout'"):
        load_config("paper", ['data.augmentations=["none", "hflip"]', 'data.teacher_augmentations=["none"]'])
    same = load_config("paper", ['data.augmentations=["none", "hflip"]', 'data.teacher_augmentations=["none", "hflip"]'])
    assert same.model.head == "lstm" and same.data.teacher_augmentations == ["none", "hflip"]
    assert load_config("paper").data.teacher_augmentations == []


# -- FeatureTable with per-part augmentations ---------------------------------------------------

def _table():
    """Labelled part: 3 images x (none, hflip); teacher part: 2 images x (none); value = 10*image + aug."""
    labelled = np.array([[[10 * i + a] * 2 for a in range(2)] for i in range(3)], dtype=np.float16)
    teacher = np.array([[[10 * (3 + i)] * 2] for i in range(2)], dtype=np.float16)
    return FeatureTable([labelled, teacher], ["none", "hflip"], [["none", "hflip"], ["none"]])


def test_feature_table_rows_pick_each_parts_own_augmentation():
    table = _table()
    np.testing.assert_array_equal(table.rows([0, 3, 2, 4], 0)[:, 0], [0, 30, 20, 40])
    np.testing.assert_array_equal(table.rows([2, 0, 1], 1)[:, 0], [21, 1, 11])
    np.testing.assert_array_equal(table.rows([1, 4, 1], [1, 0, 0])[:, 0], [11, 40, 10])
    with pytest.raises(ValueError, match="hflip"):
        table.rows([0, 3], 1)
    with pytest.raises(ValueError, match="no cached rows"):
        table.rows([4], [1])
    # A part holding only the second augmentation: aug_idx still counts in the table's names.
    only_hflip = FeatureTable([np.array([[[7.0]], [[8.0]]], dtype=np.float16)], ["none", "hflip"], [["hflip"]])
    np.testing.assert_array_equal(only_hflip.rows([1, 0], 1)[:, 0], [8, 7])
    with pytest.raises(ValueError):
        only_hflip.rows([0], 0)


def test_feature_table_augmentations_of_and_default():
    table = _table()
    assert table.augmentations_of([0, 2]) == ["none", "hflip"]
    assert table.augmentations_of([3, 4]) == ["none"]
    assert table.augmentations_of([1, 4]) == ["none"]  # only what every image has
    plain = FeatureTable([np.zeros((2, 2, 1), np.float16)], ["none", "hflip"])
    assert plain.part_augmentations == [["none", "hflip"]] and plain.augmentations_of([0, 1]) == ["none", "hflip"]


# -- readout.output_tap_weights -------------------------------------------------------------------

@pytest.mark.parametrize("weighting", ["stage", "channel", "stage_ends", "last"])
@pytest.mark.parametrize("share", [0.0, 0.3, 1.0])
def test_output_tap_weights_split_the_kernel_between_trunk_and_branch(weighting, share):
    from model.trunks import BLOCKS_PER_STAGE
    from model.network import ResMemNetConfig
    from model.training.readout import output_tap_weights, tap_weights

    cfg = ResMemNetConfig(backbone="resnet152", head="readout", branch="resmem")
    trunk = tap_weights(BLOCKS_PER_STAGE["resnet152"], cfg.trunk_tap_channels, weighting)
    w = output_tap_weights(cfg, weighting, share)
    assert w.shape == (58,) and w.sum() == pytest.approx(1.0) and (w >= 0).all()
    np.testing.assert_allclose(w[:50], trunk * (1 - share), rtol=1e-12, atol=0)  # proportions kept
    np.testing.assert_allclose(w[50:], share / 8)
    if share == 0.0:
        assert (w[50:] == 0).all()
    if weighting == "stage" and share < 1:
        ends = np.cumsum(BLOCKS_PER_STAGE["resnet152"])
        stages = [w[lo:hi].sum() for lo, hi in zip([0, *ends[:-1]], ends)]
        np.testing.assert_allclose(stages, (1 - share) / 4)
    no_branch = ResMemNetConfig(backbone="resnet152", head="readout")
    np.testing.assert_array_equal(output_tap_weights(no_branch, weighting, 0.0), trunk)


def test_a_zero_branch_share_gives_the_branch_columns_exactly_zero_weight():
    from model.training.readout import TapKernel, fit_ridge

    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 5)).astype(np.float32)
    y = x[:, 3] + 0.1 * rng.normal(size=30)  # the signal sits in the left-out tap
    fit = fit_ridge(TapKernel(x, [3, 2], np.array([1.0, 0.0])), y, np.arange(30), alphas=[0.1])
    assert (fit.weight[3:] == 0).all() and (fit.weight[:3] != 0).any()


# -- a tiny readout run with an extra teacher file and unmirrored teacher features ---------------

def test_readout_run_with_extra_teacher_and_teacher_augmentations(tmp_path, capsys):
    from model.checkpoint import load_checkpoint
    from model.scoring import Scorer
    from model.training.train import main as train_main
    from test_training_datasets import write_lnsim, write_teacher
    from test_training_pipeline import write_config

    write_lnsim(tmp_path / "lnsim", n=40, sizes=((40, 40), (48, 40)))
    first = write_teacher(tmp_path / "pool", n=16)
    second = write_teacher(tmp_path / "pool2", n=12)  # the same file names as pool's
    cfg_path = write_config(tmp_path / "cfg.toml", tmp_path / "lnsim", tmp_path / "cache", [], teacher=first,
                            extra='augmentations = ["none", "hflip"]\nteacher_augmentations = ["none"]')
    text = cfg_path.read_text().replace('mapping = "quantile"\n',
                                        f'mapping = "quantile"\nextra = ["{second}={second.parent}"]\n')
    text = text.replace('backbone = "resnet50"', 'backbone = "resnet50"\nhead = "readout"\nteacher_output = true\n'
                        'score_blend = 0.5')
    cfg_path.write_text("phases = []\n" + text + '\n[readout]\nalphas = [0.1, 10.0]\ninner_folds = 3\n')
    run = tmp_path / "run"
    assert train_main(["--config", str(cfg_path), "--out", str(run)]) == 0
    err = capsys.readouterr().err

    model, meta = load_checkpoint(run / "tiny.json")
    counts = meta.training["counts"]
    assert counts["labelled_images"] == 38 and counts["teacher_images"] == 28
    n_teacher_train = 28 - counts["teacher_holdout"]
    fitted = meta.training["readout"]
    assert fitted["lnsim"]["rows"] == 2 * 38  # mirrored and not
    assert fitted["teacher"]["rows"] == n_teacher_train  # unmirrored only
    assert fitted["lnsim"]["branch_share"] == 0.0 and fitted["teacher"]["branch_share"] == 0.0
    assert f"readout output teacher ({n_teacher_train} rows" in err
    plan = json.loads((run / "splits.json").read_text())["teacher"]  # keys relative to pool/ and pool2/'s parent
    assert plan["n"] == 28 and len(plan["holdout"]) == counts["teacher_holdout"] == len(set(plan["holdout"]))
    assert all(k.split("/")[0] in ("pool", "pool2") and k.endswith(".jpg") for k in plan["holdout"])

    sidecars = {tuple(s["augmentations"]): s for s in
                (json.loads(p.read_text()) for p in (tmp_path / "cache").rglob("*.json"))}
    assert set(sidecars) == {("none", "hflip"), ("none",)}
    assert sidecars[("none",)]["n_images"] == 28 and sidecars[("none",)]["taps"] == "all"

    data = load_lnsim(tmp_path / "lnsim", verbose=False)
    scores = np.array([r.score for r in Scorer(model, meta.preprocessing, device="cpu")
                       .score_paths(data.paths[:8], batch_size=8, workers=1)])
    assert scores.shape == (8,) and np.isfinite(scores).all() and ((scores >= 0) & (scores <= 1)).all()
