"""Dataset layouts (LNSIM, LaMem, Isola, CSV), their loaders and errors, written small, and the
real data sets when ../shared is present. The writers are shared by the training tests."""
import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED_DATA
from model.training.data import (DatasetError, load_csv_dataset, load_dataset, load_isola, load_lamem, load_lnsim)

# -- fixtures: every supported layout, written small ------------------------------------------

def _picture(brightness: float, size=(40, 40), seed=0) -> Image.Image:
    """A mostly flat image whose brightness carries the 'memorability' signal, plus a little texture."""
    rng = np.random.default_rng(seed)
    base = np.full((size[1], size[0], 3), brightness * 255, dtype=np.float64)
    base[..., seed % 3] *= 0.7
    arr = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def _memorability(n: int, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.2, 0.8, n)


def write_lnsim(root: Path, n=40, missing=(3, 17), rows=4, sizes=((40, 40),)) -> np.ndarray:
    """Image_data/NNNN.jpg + Random_splits/subject_hrs{1,2}.mat, some images absent."""
    from scipy.io import savemat

    m = _memorability(n)
    rng = np.random.default_rng(1)
    (root / "Image_data").mkdir(parents=True)
    (root / "Random_splits").mkdir()
    for k in range(n):
        if k not in missing:
            _picture(m[k], sizes[k % len(sizes)], seed=k).save(root / "Image_data" / f"{k + 1:04d}.jpg", quality=95)
    h1 = np.clip(m + rng.normal(0, 0.05, (rows, n)), 0, 1)
    h2 = np.clip(m + rng.normal(0, 0.05, (rows, n)), 0, 1)
    savemat(root / "Random_splits" / "subject_hrs1.mat", {"subject_hrs1": h1})
    savemat(root / "Random_splits" / "subject_hrs2.mat", {"subject_hrs2": h2})
    return (h1 + h2).mean(axis=0) / 2


def write_teacher(root: Path, n=16) -> Path:
    root.mkdir(parents=True)
    t = _memorability(n, seed=5)
    rows = []
    for k in range(n):
        name = f"pool_{k:03d}.jpg"
        _picture(t[k], (48, 36), seed=100 + k).save(root / name)
        rows.append((name, 3 * t[k] + 1))  # another scale: the mapping puts it on the labelled one
    return write_rows(root / "teacher.csv", ["name", "resmem_score"], rows)


def write_rows(path: Path, header: list[str], rows) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def write_lamem(root: Path) -> None:
    (root / "images").mkdir(parents=True)
    (root / "splits").mkdir()
    names = [f"{i:08d}.jpg" for i in range(1, 13)]
    scores = {n: round(0.3 + 0.05 * i, 4) for i, n in enumerate(names)}
    for n in names[:-1]:  # the last one is absent on disk
        _picture(scores[n]).save(root / "images" / n)
    parts = {1: (names[:8], names[8:10], names[10:]), 2: (names[4:], names[:2], names[2:4])}
    for s, (train, val, test) in parts.items():
        for part, lst in (("train", train), ("val", val), ("test", test)):
            (root / "splits" / f"{part}_{s}.txt").write_text("".join(f"{n} {scores[n]}\n" for n in lst))


def write_isola(root: Path, n=10) -> np.ndarray:
    from scipy.io import savemat

    (root / "Image data").mkdir(parents=True)  # Isola's release names folders with spaces
    (root / "Random splits").mkdir()
    imgs = np.stack([np.asarray(_picture(0.1 * k, (16, 16), seed=k)) for k in range(n)], axis=3)  # H, W, 3, N
    savemat(root / "Image data" / "target_images.mat", {"img": imgs})
    m = _memorability(n)
    savemat(root / "Random splits" / "subject_hrs1.mat", {"subject_hrs1": np.tile(m, (2, 1))})
    savemat(root / "Random splits" / "subject_hrs2.mat", {"subject_hrs2": np.tile(m, (2, 1))})
    order = np.random.default_rng(0).permutation(n) + 1
    savemat(root / "Random splits" / "image_train_indices.mat", {"trainidx": np.stack([order[:5], order[5:]])})
    savemat(root / "Random splits" / "image_test_indices.mat", {"testidx": np.stack([order[5:], order[:5]])})
    return imgs


# -- loaders ----------------------------------------------------------------------------------

def test_lnsim_layout_skips_and_counts_missing_images(tmp_path):
    scores = write_lnsim(tmp_path / "lnsim", n=12, missing=(3,))
    data = load_lnsim(tmp_path / "lnsim", verbose=False)
    assert len(data) == 11 and data.skipped == 1
    assert data.keys[:4] == ["Image_data/0001.jpg", "Image_data/0002.jpg", "Image_data/0003.jpg", "Image_data/0005.jpg"]
    np.testing.assert_allclose(data.scores, np.delete(scores, 3))
    assert data.halves[0].shape == (4, 11)


def test_lamem_layout(tmp_path):
    write_lamem(tmp_path / "lamem")
    data = load_lamem(tmp_path / "lamem", verbose=False)
    assert len(data) == 11 and data.skipped == 1
    assert data.scores[0] == pytest.approx(0.3)
    assert sorted(data.splits) == ["split_1", "split_2"]
    s1 = data.splits["split_1"]
    assert len(s1["train"]) == 8 and len(s1["val"]) == 2 and len(s1["test"]) == 1  # the absent image is dropped
    assert [data.keys[i] for i in s1["val"]] == ["images/00000009.jpg", "images/00000010.jpg"]


def test_official_test_splits_are_the_evaluation_splits(tmp_path):
    from model.training.evaluate import evaluate_scores, evaluation_splits

    write_lamem(tmp_path / "lamem")
    data = load_lamem(tmp_path / "lamem", verbose=False)
    splits = evaluation_splits(data, None)
    assert [name for name, _ in splits] == ["split_1", "split_2"]
    pred = data.scores + np.random.default_rng(0).normal(0, 0.01, len(data))
    report = evaluate_scores(data, pred, splits, ns=(1,))
    # split_1's test set keeps one image (the other is absent on disk): too few for a correlation
    assert [(r["split"], r["n"]) for r in report["splits"]] == [("split_2", 2)]
    assert report["splits"][0]["spearman"] == pytest.approx(1.0)


def test_isola_layout_with_image_array_and_official_splits(tmp_path):
    imgs = write_isola(tmp_path / "isola")
    data = load_isola(tmp_path / "isola", extract_dir=tmp_path / "extracted", verbose=False)
    assert len(data) == 10 and data.skipped == 0 and data.halves is not None
    first = np.asarray(Image.open(data.paths[0]))
    np.testing.assert_array_equal(first, imgs[..., 0])  # extracted losslessly
    assert sorted(data.splits) == ["split_1", "split_2"]
    s1 = data.splits["split_1"]
    assert sorted(s1["train"] + s1["test"]) == list(range(10))
    again = load_isola(tmp_path / "isola", extract_dir=tmp_path / "extracted", verbose=False)  # reuses the PNGs
    assert again.paths == data.paths


def test_csv_layout(tmp_path):
    path = write_teacher(tmp_path / "pool", n=5)
    with open(path, "a") as fh:
        fh.write("not_there.jpg,2.0\n")
    data = load_csv_dataset(path, verbose=False)
    assert len(data) == 5 and data.skipped == 1 and data.keys[0] == "pool_000.jpg"
    bad = tmp_path / "bad.csv"
    bad.write_text("file,value\na.jpg,1\n")
    with pytest.raises(DatasetError, match="path and score columns"):
        load_csv_dataset(bad)
    with pytest.raises(DatasetError, match="not found"):
        load_csv_dataset(tmp_path / "nope.csv")


# -- the real data, when present ------------------------------------------------------------------

@pytest.mark.skipif(not (SHARED_DATA / "lnsim").is_dir(), reason="../shared/data/lnsim absent")
def test_real_lnsim_and_teacher_load(tmp_path):
    from model.training.config import load_config
    from model.training.data import load_teacher
    from model.training.splits import build_splits

    cfg = load_config("lnsim", [f"data.labelled.root={SHARED_DATA / 'lnsim'}",
                                  f"data.teacher.csv={SHARED_DATA / 'pool_resmem_scores.csv'}",
                                  f"data.teacher.image_root={SHARED_DATA / 'pool'}",
                                  f"data.teacher.extra=[\"{SHARED_DATA / 'pool2_resmem_scores.csv'}={SHARED_DATA / 'pool2'}\"]"])
    data = load_dataset(cfg.data.studies[0], verbose=False)
    assert len(data) + data.skipped == 2632 and len(data) >= 2000
    assert 0 <= data.scores.min() and data.scores.max() <= 1
    teacher = load_teacher(cfg.data.teacher, verbose=False)
    assert len(teacher) == 6388
    plan = build_splits({"lnsim": data}, teacher, folds={"lnsim": 5}, seed=0, val_fraction=0.0, holdout_fraction=0.1)
    folds = plan["studies"]["lnsim"]["folds"]
    assert sum(len(f["test"]) for f in folds) == len(data) and len(plan["teacher"]["holdout"]) == 639
