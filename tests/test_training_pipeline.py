"""Dataset layouts, in-process training runs (final, resume, cross-validation), evaluation and
the CLI's error handling, all on tiny synthetic data (32 px images, random ResNet-50 trunk)."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SHARED_DATA
from model.training.data import (DatasetError, load_csv_dataset, load_dataset, load_isola, load_lamem, load_lnsim)
from model.training.train import main as train_main


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    path = root / "teacher.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["name", "resmem_score"])
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


# -- in-process training --------------------------------------------------------------------------

PHASE = '[[phases]]\nname = "{name}"\nepochs = {epochs}\nlr_min = {lo}\nlr_max = {hi}\nfrozen = {frozen}\ncached = {cached}\n'


def write_config(path: Path, data_root: Path, cache: Path, phases, *, teacher: Path | None = None, extra: str = "",
                 mode="square") -> Path:
    text = f"""
[data]
cache_dir = "{cache}"
workers = 1
{extra}
[data.labelled]
kind = "lnsim"
root = "{data_root}"
"""
    if teacher is not None:
        text += f'\n[data.teacher]\ncsv = "{teacher}"\nweight = 0.5\nholdout_fraction = 0.25\nmapping = "quantile"\n'
    text += f"""
[model]
trunk = "none"
backbone = "resnet50"
[preprocessing]
mode = "{mode}"
size = 32
multiple = 32
[train]
batch_size = 8
eval_batch_size = 32
device = "cpu"
progress = false
[cv]
folds = 3
[output]
name = "tiny"
runs_dir = "{path.parent / 'runs'}"
"""
    for name, epochs, lo, hi, frozen, cached in phases:
        text += "\n" + PHASE.format(name=name, epochs=epochs, lo=lo, hi=hi, frozen=str(frozen).lower(),
                                    cached=str(cached).lower())
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    write_lnsim(root / "lnsim", n=40, sizes=((40, 40), (48, 40), (40, 64)))
    teacher = write_teacher(root / "pool", n=16)
    return {"root": root, "lnsim": root / "lnsim", "teacher": teacher, "cache": root / "cache"}


def _read_log(run: Path) -> list[dict]:
    with open(run / "log.csv") as fh:
        return list(csv.DictReader(fh))


def _mse_of(model, preprocessing, data) -> float:
    from model.scoring import Scorer

    scorer = Scorer(model, preprocessing, device="cpu")
    preds = np.array([r.score for r in scorer.score_paths(data.paths, batch_size=16, workers=1)])
    return float(np.mean((preds - data.scores) ** 2))


def test_training_reduces_the_loss_and_writes_a_loadable_checkpoint(workspace, tmp_path, capsys):
    from model.checkpoint import load_checkpoint
    from model.training.config import load_config
    from model.training.train import build_model, preprocessing_for

    cfg_path = write_config(tmp_path / "cfg.toml", workspace["lnsim"], workspace["cache"],
                            [("frozen", 8, 1e-3, 1e-2, True, True), ("frozen-images", 1, 1e-4, 1e-3, True, False)],
                            teacher=workspace["teacher"])
    run = tmp_path / "run"
    assert train_main(["--config", str(cfg_path), "--out", str(run)]) == 0
    log = _read_log(run)
    assert [r["phase"] for r in log] == ["frozen"] * 8 + ["frozen-images"]
    assert float(log[-2]["train_loss"]) < float(log[0]["train_loss"])
    assert log[0]["teacher_mse"] and log[0]["labelled_mse"] and log[0]["teacher_holdout_spearman"]
    for name in ("config.toml", "config.json", "run.json", "splits.json", "metrics.json", "state/state.json",
                 "state/optimizer.pt", "state/model.safetensors", "tiny.json", "tiny.safetensors"):
        assert (run / name).is_file(), name

    model, meta = load_checkpoint(run / "tiny.json")
    assert meta.trunk.kind == "none" and meta.trunk_embedded  # a random trunk cannot be rebuilt: embedded
    assert meta.training["counts"]["labelled_images"] == 38 and meta.training["counts"]["teacher_holdout"] == 4
    assert meta.training["config"]["phases"][0]["epochs"] == 8
    assert meta.provenance["command"].startswith("resmemnet train") and meta.provenance["date"]
    assert "teacher_holdout" in meta.metrics["final_run"]
    assert meta.preprocessing.resize.size == 32

    data = load_lnsim(workspace["lnsim"], verbose=False)
    cfg = load_config(str(cfg_path))
    initial, _ = build_model(cfg)
    before = _mse_of(initial, preprocessing_for(cfg, initial), data)
    after = _mse_of(model, meta.preprocessing, data)
    assert after < 0.7 * before, (before, after)
    assert "checkpoint written" in capsys.readouterr().err


def test_teacher_output_is_trained_on_teacher_rows_and_blended_into_the_score(workspace, tmp_path, capsys):
    from model.checkpoint import load_checkpoint
    from model.network import soft_clamp

    cfg_path = write_config(tmp_path / "cfg.toml", workspace["lnsim"], workspace["cache"],
                            [("frozen", 4, 1e-3, 1e-2, True, True)], teacher=workspace["teacher"],
                            extra="", )
    text = cfg_path.read_text().replace('backbone = "resnet50"', 'backbone = "resnet50"\nteacher_output = true\nscore_blend = 0.7')
    cfg_path.write_text(text)
    run = tmp_path / "run"
    assert train_main(["--config", str(cfg_path), "--out", str(run)]) == 0
    log = _read_log(run)
    assert float(log[-1]["train_loss"]) < float(log[0]["train_loss"])
    model, meta = load_checkpoint(run / "tiny.json")
    arch = meta.architecture
    assert arch.teacher_output and arch.score_blend == 0.7
    assert model.head.out.out_features == 2
    # The blend was mapped onto the labelled scale after training (least squares, ranking kept).
    assert arch.score_scale > 0 and (arch.score_scale, arch.score_shift) != (1.0, 0.0)
    assert "score calibration" in capsys.readouterr().err
    with torch.no_grad():
        pooled = model.forward_features(torch.rand(3, 3, 32, 32))
        both = model.head.outputs(pooled)
        blended = 0.7 * both[:, 0] + 0.3 * both[:, 1]
        expected = soft_clamp(arch.score_scale * blended + arch.score_shift)
        assert torch.allclose(model.head(pooled), expected, atol=1e-6)


def test_cv_of_a_teacher_output_model_reports_the_whole_blend_curve(workspace, tmp_path, capsys):
    cfg_path = write_config(tmp_path / "cfg.toml", workspace["lnsim"], workspace["cache"],
                            [("frozen", 2, 1e-3, 1e-2, True, True)], teacher=workspace["teacher"])
    cfg_path.write_text(cfg_path.read_text().replace(
        'backbone = "resnet50"', 'backbone = "resnet50"\nteacher_output = true\nscore_blend = 0.7'))
    run = tmp_path / "cv"
    assert train_main(["--config", str(cfg_path), "--cv", "--out", str(run)]) == 0
    report = json.loads((run / "cv.json").read_text())
    curve = report["blend_curve"]
    assert [r["blend"] for r in curve] == [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0]
    assert all("teacher_holdout_spearman_mean" in r and r["spearman_std"] >= 0 for r in curve)
    at_shipped_blend = next(r for r in curve if r["blend"] == 0.7)
    assert at_shipped_blend["spearman_mean"] == pytest.approx(report["mean"]["spearman"], abs=1e-3)
    with open(run / "cv_blend.csv") as fh:
        assert next(csv.reader(fh))[:2] == ["blend", "spearman_mean"]
    assert "score_blend" in capsys.readouterr().err


def test_readout_head_is_fitted_in_closed_form_and_its_checkpoint_scores_images(workspace, tmp_path, capsys):
    from model.checkpoint import load_checkpoint
    from model.training.metrics import spearman

    cfg_path = write_config(tmp_path / "cfg.toml", workspace["lnsim"], workspace["cache"], [],
                            teacher=workspace["teacher"])
    cfg_path.write_text("phases = []\n" + cfg_path.read_text().replace(
        'backbone = "resnet50"', 'backbone = "resnet50"\nhead = "readout"\nteacher_output = true\nscore_blend = 0.5')
        + '\n[readout]\nalphas = [0.1, 10.0]\ninner_folds = 3\nlabelled_prior = "teacher"\n')
    run = tmp_path / "run"
    assert train_main(["--config", str(cfg_path), "--out", str(run)]) == 0
    err = capsys.readouterr().err
    assert "readout output 1 (teacher" in err and "readout output 0 (labelled, 76 rows, shrunk towards" in err
    assert not (run / "log.csv").exists() or not _read_log(run)  # no gradient epochs
    model, meta = load_checkpoint(run / "tiny.json")
    assert meta.architecture.head == "readout" and model.head.out.out_features == 2
    chosen = meta.training["readout"]  # the penalty each output's inner CV chose, and its curve
    assert chosen["labelled"]["alpha"] in (0.1, 10.0) and set(chosen["teacher"]["inner_cv_spearman"]) == {"0.1", "10.0"}
    assert meta.architecture.score_scale > 0
    data = load_lnsim(workspace["lnsim"], verbose=False)
    from model.scoring import Scorer

    scores = np.array([r.score for r in Scorer(model, meta.preprocessing, device="cpu")
                       .score_paths(data.paths, batch_size=16, workers=1)])
    assert spearman(scores, data.scores) > 0.5  # fitted to these images (brightness carries the score)


def test_domain_gated_readout_fits_a_domain_output_and_reports_gated_cv(workspace, tmp_path, capsys):
    """model.domain_gate: a third output separates labelled from teacher photos; CV reports the gated
    blend curve; the final checkpoint's score follows the gate and carries reference quantiles."""
    from model.checkpoint import load_checkpoint
    from model.network import blend_outputs, domain_weight

    # teacher photos of another kind than the labelled ones (a strong colour cast), as in real use
    teacher = write_teacher(tmp_path / "pool", n=24)
    for f in (tmp_path / "pool").glob("*.jpg"):
        arr = np.asarray(Image.open(f).convert("RGB")).astype(np.float64)
        arr[..., 2] = 255 - arr[..., 2]
        Image.fromarray(arr.astype(np.uint8)).save(f)
    cfg_path = write_config(tmp_path / "cfg.toml", workspace["lnsim"], tmp_path / "cache", [], teacher=teacher)
    cfg_path.write_text("phases = []\n" + cfg_path.read_text().replace(
        'backbone = "resnet50"', 'backbone = "resnet50"\nhead = "readout"\nteacher_output = true\nscore_blend = 0.7'
        '\ndomain_gate = true\ngate_center = 0.5\ngate_width = 0.1')
        + '\n[readout]\nalphas = [0.1, 10.0]\nteacher_alphas = [3.0]\ninner_folds = 3\n')
    cv = tmp_path / "cv"
    assert train_main(["--config", str(cfg_path), "--cv", "--out", str(cv)]) == 0
    report = json.loads((cv / "cv.json").read_text())
    row = next(r for r in report["blend_curve"] if r["blend"] == 0.7)
    assert row["gated_spearman_mean"] == pytest.approx(report["mean"]["spearman"], abs=1e-3)
    assert all("gated_teacher_holdout_spearman_mean" in r for r in report["blend_curve"])
    with open(next(cv.glob("*/head_outputs.csv"))) as fh:  # any blend or gate setting can be re-scored
        rows = list(csv.DictReader(fh))
    assert {r["set"] for r in rows} == {"test", "train", "teacher_holdout"} and "output_2" in rows[0]
    assert "gated" in capsys.readouterr().err

    run = tmp_path / "final"
    assert train_main(["--config", str(cfg_path), "--out", str(run)]) == 0
    err = capsys.readouterr().err
    assert "readout output 2 (domain, 112 rows" in err  # 38 labelled + 18 teacher training photos, each mirrored
    model, meta = load_checkpoint(run / "tiny.json")
    assert meta.architecture.domain_gate and model.head.out.out_features == 3
    assert meta.training["readout"]["domain"]["alpha"] in (0.1, 10.0)
    assert meta.training["readout"]["teacher"]["alpha"] == 3.0  # readout.teacher_alphas: its own penalty
    ref = meta.reference
    assert ref["n"] == 24 and len(ref["quantiles"]) == 101 and ref["quantiles"] == sorted(ref["quantiles"])
    assert meta.percentile(ref["quantiles"][50]) == pytest.approx(50, abs=1.5)
    assert set(ref["profiles"]) == {"general", "outdoor"} and all(len(q) == 101 for q in ref["profiles"].values())
    assert (run / "head_outputs.csv").is_file()
    from model.scoring import Scorer
    from model.training.pool import load_data  # noqa: F401  (the same loaders the run used)

    data = load_lnsim(workspace["lnsim"], verbose=False)
    others = sorted(str(p) for p in (tmp_path / "pool").glob("*.jpg"))
    pre = meta.preprocessing
    with torch.no_grad():
        def outputs(paths):
            from model.preprocess import decode_image

            x = torch.stack([pre.image_to_tensor(decode_image(p)) for p in paths])
            return model.head.outputs(model.forward_features(x))
        lab_out, other_out = outputs(data.paths), outputs(others)
        # the domain output tells the two kinds apart, and the gate follows it
        assert lab_out[:, 2].mean() > other_out[:, 2].mean() + 0.5
        assert domain_weight(lab_out, model.cfg).mean() > 0.8 > 0.2 > domain_weight(other_out, model.cfg).mean()
        expected = blend_outputs(lab_out, model.cfg)
    scores = [r.score for r in Scorer(model, pre, device="cpu", mixed_precision=False)  # fp32, as `expected`
              .score_paths(data.paths, batch_size=16, workers=1)]
    assert np.allclose(scores, expected.numpy(), atol=1e-5)


def test_ensemble_members_are_trained_and_saved(workspace, tmp_path):
    from model.checkpoint import load_checkpoint

    cfg_path = write_config(tmp_path / "cfg.toml", workspace["lnsim"], workspace["cache"],
                            [("frozen", 4, 1e-3, 1e-2, True, True)])
    cfg_path.write_text(cfg_path.read_text().replace('backbone = "resnet50"', 'backbone = "resnet50"\nensemble = 2'))
    run = tmp_path / "run"
    assert train_main(["--config", str(cfg_path), "--out", str(run)]) == 0
    log = _read_log(run)
    assert float(log[-1]["train_loss"]) < float(log[0]["train_loss"])
    model, meta = load_checkpoint(run / "tiny.json")
    assert meta.architecture.ensemble == 2 and len(model.head.members) == 2
    first, second = (m.out.weight for m in model.head.members)
    assert not torch.allclose(first, second)


def test_resumed_run_equals_an_uninterrupted_one(workspace, tmp_path, capsys):
    from safetensors.torch import load_file

    phases = [("frozen", 2, 1e-3, 1e-2, True, True), ("frozen-images", 1, 1e-3, 1e-2, True, False),
              ("unfrozen", 1, 1e-5, 1e-4, False, False)]
    cfg_path = write_config(tmp_path / "cfg.toml", workspace["lnsim"], workspace["cache"], phases,
                            teacher=workspace["teacher"], mode="shorter_side")
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train_main(["--config", str(cfg_path), "--out", str(whole)]) == 0
    assert train_main(["--config", str(cfg_path), "--out", str(parts), "--stop-after", "1"]) == 0
    assert len(_read_log(parts)) == 1 and not (parts / "tiny.json").exists()
    # the run's own config is used; changing the recipe on resume is refused
    assert train_main(["--resume", str(parts), "--set", "phases.0.epochs=5"]) == 2
    assert train_main(["--resume", str(parts), "--stop-after", "2"]) == 0  # into the image phases
    assert len(_read_log(parts)) == 3
    assert train_main(["--resume", str(parts)]) == 0
    assert "whole network on the CPU" in capsys.readouterr().err
    assert [r["train_loss"] for r in _read_log(parts)] == [r["train_loss"] for r in _read_log(whole)]
    a, b = load_file(str(whole / "tiny.safetensors")), load_file(str(parts / "tiny.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    assert train_main(["--config", str(cfg_path), "--out", str(whole)]) == 2  # would overwrite a run


def test_cross_validation_then_final_checkpoint_then_evaluate(workspace, tmp_path, capsys):
    from app.cli import main as cli_main
    from model.checkpoint import load_checkpoint

    cfg_path = write_config(tmp_path / "cfg.toml", workspace["lnsim"], workspace["cache"],
                            [("frozen", 3, 1e-3, 1e-2, True, True)], teacher=workspace["teacher"],
                            extra="val_fraction = 0.2")
    cv_run = tmp_path / "cv"
    assert train_main(["--config", str(cfg_path), "--cv", "--out", str(cv_run), "--set", "train.select=best_val"]) == 0
    report = json.loads((cv_run / "cv.json").read_text())
    assert [r["split"] for r in report["splits"]] == ["fold_1", "fold_2", "fold_3"]
    assert sum(r["n"] for r in report["splits"]) == 38  # every labelled image is tested exactly once
    for row in report["splits"]:
        assert -1 <= row["spearman"] <= 1 and row["human_ceiling"] > 0.5
        assert "teacher_holdout_spearman" in row and 1 <= row["epoch"] <= 3
    assert set(report["mean"]) >= {"spearman", "pearson", "mse", "human_ceiling"} and "spearman" in report["std"]
    assert report["top_bottom"][0]["set"] == "top 10"
    with open(cv_run / "cv.csv") as fh:
        rows = list(csv.reader(fh))
    assert [r[0] for r in rows] == ["split", "fold_1", "fold_2", "fold_3", "mean", "std"]
    assert (cv_run / "fold_2" / "predictions.csv").is_file() and (cv_run / "cv_top_bottom.csv").is_file()
    plan = json.loads((cv_run / "splits.json").read_text())
    capsys.readouterr()

    final = tmp_path / "final"
    assert train_main(["--config", str(cfg_path), "--out", str(final), "--cv-results", str(cv_run / "cv.json")]) == 0
    assert "splits: reusing" in capsys.readouterr().err  # the same split file as the CV run
    assert json.loads((final / "splits.json").read_text())["folds"] == plan["folds"]
    _, meta = load_checkpoint(final / "tiny.json")
    assert meta.metrics["cross_validation"]["mean"]["spearman"] == pytest.approx(report["mean"]["spearman"])
    assert meta.training["counts"]["val"] == 8 and meta.training["counts"]["train_labelled"] == 30

    out = tmp_path / "eval"
    rc = cli_main(["evaluate", "--weights", str(final / "tiny.json"), "--dataset", "lnsim", "--root",
                   str(workspace["lnsim"]), "--splits", str(cv_run / "splits.json"), "--out", str(out),
                   "--device", "cpu", "--workers", "1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Spearman rho:" in printed and "human ceiling" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["split"] for r in metrics["splits"]] == ["fold_1", "fold_2", "fold_3"]
    with open(out / "metrics.csv") as fh:
        assert [r[0] for r in csv.reader(fh)] == ["split", "fold_1", "fold_2", "fold_3", "mean", "std"]
    with open(out / "predictions.csv") as fh:
        assert len(list(csv.reader(fh))) == 39


def test_evaluate_without_splits_reports_all_images(tiny_checkpoint, workspace, tmp_path, capsys):
    from app.cli import main as cli_main

    csv_path = write_teacher(tmp_path / "set", n=6)
    rc = cli_main(["evaluate", "--weights", str(tiny_checkpoint), "--dataset", "csv", "--csv", str(csv_path),
                   "--device", "cpu", "--top-n", "2,3"])
    # the teacher CSV's scores are not in [0, 1], but evaluation only ranks and measures them
    assert rc == 0
    out = capsys.readouterr().out
    assert "all" in out and "top 2" in out


# -- CLI errors: one clear line, exit code 2 ------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["train", "--set", "phases.0.epoch=3"], "did you mean 'epochs'"),
    (["train", "--set", "optimizer.name=sgd"], "optimizer.name"),
    (["train", "--config", "paper", "--set", "data.labelled.root=/no/such/dir"], "not found"),
    (["train", "--config", "/no/such.toml"], "config file not found"),
    (["train", "--resume", "/no/such/run"], "not a run folder"),
    (["evaluate", "--weights", "/no/such.json", "--dataset", "lnsim", "--root", "/no/such/dir"], "not found"),
    (["evaluate", "--dataset", "csv"], "needs --csv"),
    (["train", "--set", "data.teacher.weight=0", "--set", "model.teacher_output=true"], "needs teacher rows"),
    (["train", "--set", "model.teacher_output=false"], "needs model.teacher_output = true"),
    (["train", "--set", "model.ensemble=0"], "model.ensemble must be a whole number"),
    (["train", "--set", "model.score_blend=1.5"], "model.score_blend must be in [0, 1]"),
    (["train", "--config", "paper", "--set", "model.head=readout"], "set phases = []"),
    (["train", "--set", "readout.alphas=[]"], "readout.alphas"),
    (["train", "--set", "readout.tap_weighting=depth"], "readout.tap_weighting"),
    (["train", "--set", "model.teacher_output=false", "--set", "model.score_blend=1.0",
      "--set", "model.domain_gate=false", "--set", "readout.labelled_prior=teacher"],
     "readout.labelled_prior = 'teacher' needs model.teacher_output = true"),
    (["train", "--set", "model.teacher_output=false", "--set", "model.score_blend=1.0"],
     "model.domain_gate = true needs model.teacher_output = true"),
    (["train", "--set", "model.gate_width=0"], "model.gate_width must be a positive number"),
    (["train", "--set", "readout.teacher_alphas=[-1.0]"], "readout.teacher_alphas"),
])
def test_cli_errors_exit_2_without_traceback(args, message, capsys, tmp_path, monkeypatch):
    from app.cli import main as cli_main

    monkeypatch.chdir(tmp_path)
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # nothing is written before the inputs are checked


def test_a_named_cache_made_for_other_inputs_is_refused_not_overwritten(workspace, tmp_path, capsys):
    cache = tmp_path / "theirs.npy"
    np.save(cache, np.zeros((2, 2, 3), np.float16))
    cache.with_suffix(".json").write_text(json.dumps({"trunk": "r152", "augmentations": ["none"]}))
    cfg_path = write_config(tmp_path / "cfg.toml", workspace["lnsim"], workspace["cache"],
                            [("frozen", 1, 1e-3, 1e-2, True, True)])
    assert train_main(["--config", str(cfg_path), "--out", str(tmp_path / "run"),
                       "--set", f"data.labelled_cache={cache}"]) == 2
    assert "was made for other inputs" in capsys.readouterr().err
    assert np.load(cache).shape == (2, 2, 3)


def test_print_config(capsys):
    assert train_main(["--config", "paper", "--print-config", "--set", "phases.0.epochs=2"]) == 0
    assert "[[phases]]" in capsys.readouterr().out


# -- the real data, when present ------------------------------------------------------------------

@pytest.mark.skipif(not (SHARED_DATA / "lnsim").is_dir(), reason="../shared/data/lnsim absent")
def test_real_lnsim_and_teacher_load(tmp_path):
    from model.training.config import load_config
    from model.training.data import build_splits, load_teacher

    cfg = load_config("default", [f"data.labelled.root={SHARED_DATA / 'lnsim'}",
                                  f"data.teacher.csv={SHARED_DATA / 'pool_resmem_scores.csv'}",
                                  f"data.teacher.image_root={SHARED_DATA / 'pool'}",
                                  f"data.teacher.extra=[\"{SHARED_DATA / 'pool2_resmem_scores.csv'}={SHARED_DATA / 'pool2'}\"]"])
    data = load_dataset(cfg.data.labelled, verbose=False)
    assert len(data) + data.skipped == 2632 and len(data) >= 2000
    assert 0 <= data.scores.min() and data.scores.max() <= 1
    teacher = load_teacher(cfg.data.teacher, verbose=False)
    assert len(teacher) == 6388
    plan = build_splits(data, teacher, folds=5, seed=0, val_fraction=0.0, holdout_fraction=0.1)
    assert sum(len(f["test"]) for f in plan["folds"]) == len(data) and len(plan["teacher"]["holdout"]) == 639
