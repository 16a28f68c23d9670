"""In-process training runs (final, resume, cross-validation), evaluation and the CLI's error
handling, all on tiny synthetic data (32 px images, random ResNet-50 trunk). Dataset layouts:
test_training_datasets.py."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.training.data import load_lnsim
from model.training.train import main as train_main
from test_training_datasets import write_lnsim, write_teacher


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    from model.training.model_setup import build_model, preprocessing_for

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
    assert model.head.out.out_features == 2 and arch.output_names == ("lnsim", "teacher")
    # The blend was mapped onto the labelled scale after training (least squares, ranking kept):
    # the study's profile, which the default one names (an LSTM head has no domain output).
    lnsim = next(p for p in arch.profiles if p.name == "lnsim")
    assert lnsim.weights == pytest.approx((0.7, 0.3)) and lnsim.scale > 0 and (lnsim.scale, lnsim.shift) != (1.0, 0.0)
    assert "score calibration" in capsys.readouterr().err
    with torch.no_grad():
        pooled = model.forward_features(torch.rand(3, 3, 32, 32))
        both = model.head.outputs(pooled)
        blended = 0.7 * both[:, 0] + 0.3 * both[:, 1]
        expected = soft_clamp(lnsim.scale * blended + lnsim.shift)
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
    assert (run / "lnsim" / "fold_1" / "head_outputs.csv").is_file()  # an LSTM run's outputs, from the cache


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
    assert "readout output teacher (" in err and "readout output lnsim (76 rows, shrunk towards" in err
    assert not (run / "log.csv").exists() or not _read_log(run)  # no gradient epochs
    model, meta = load_checkpoint(run / "tiny.json")
    assert meta.architecture.head == "readout" and model.head.out.out_features == 2
    chosen = meta.training["readout"]  # the penalty each output's inner CV chose, and its curve
    assert chosen["lnsim"]["alpha"] in (0.1, 10.0) and set(chosen["teacher"]["inner_cv_spearman"]) == {"0.1", "10.0"}
    assert next(p for p in meta.architecture.profiles if p.name == "lnsim").scale > 0
    data = load_lnsim(workspace["lnsim"], verbose=False)
    from model.scoring import Scorer

    scores = np.array([r.score for r in Scorer(model, meta.preprocessing, device="cpu")
                       .score_paths(data.paths, batch_size=16, workers=1)])
    assert spearman(scores, data.scores) > 0.5  # fitted to these images (brightness carries the score)


def test_domain_gated_readout_fits_a_domain_output_and_reports_gated_cv(workspace, tmp_path, capsys):
    """model.domain_gate: a third output separates labelled from teacher photos; CV reports the gated
    blend curve; the final checkpoint's score follows the gate and carries reference quantiles."""
    from model.checkpoint import load_checkpoint
    from model.network import blend_outputs
    from model.profiles import mixture_weights, profile_specs

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
    with open(next(cv.glob("lnsim/*/head_outputs.csv"))) as fh:  # any blend or gate setting can be re-scored
        rows = list(csv.DictReader(fh))
    assert {r["set"] for r in rows} == {"test", "train", "teacher_holdout"} and "output_domain.lnsim" in rows[0]
    assert "gated" in capsys.readouterr().err

    run = tmp_path / "final"
    assert train_main(["--config", str(cfg_path), "--out", str(run)]) == 0
    err = capsys.readouterr().err
    assert "readout output domain (112 rows, 2 columns" in err  # 38 labelled + 18 teacher photos, each mirrored
    model, meta = load_checkpoint(run / "tiny.json")
    assert meta.architecture.domain_gate and model.head.out.out_features == 4  # lnsim, teacher, 2 domain columns
    assert meta.training["readout"]["domain"]["alpha"] in (0.1, 10.0)
    assert meta.training["readout"]["teacher"]["alpha"] == 3.0  # readout.teacher_alphas: its own penalty
    ref = meta.reference
    assert ref["n"] == 24 and len(ref["quantiles"]) == 101 and ref["quantiles"] == sorted(ref["quantiles"])
    assert meta.percentile(ref["quantiles"][50]) == pytest.approx(50, abs=1.5)
    assert set(ref["profiles"]) == {"lnsim", "general", "outdoor"} and all(len(q) == 101 for q in ref["profiles"].values())
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
        torch.testing.assert_close(lab_out[:, 2] + lab_out[:, 3], torch.ones(len(lab_out)), atol=1e-4, rtol=0)
        default = profile_specs(model.cfg)[0]
        names = model.cfg.output_names

        def gate(out):
            return mixture_weights(out, names, default)[0]
        assert gate(lab_out).mean() > 0.8 > 0.2 > gate(other_out).mean()
        expected = blend_outputs(lab_out, model.cfg)
    scorer = Scorer(model, pre, device="cpu", mixed_precision=False)  # fp32, as `expected`
    scores = [r.score for r in scorer.score_paths(data.paths, batch_size=16, workers=1)]
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
    assert (cv_run / "lnsim" / "fold_2" / "predictions.csv").is_file() and (cv_run / "cv_top_bottom.csv").is_file()
    plan = json.loads((cv_run / "splits.json").read_text())["studies"]["lnsim"]
    capsys.readouterr()

    final = tmp_path / "final"
    assert train_main(["--config", str(cfg_path), "--out", str(final), "--cv-results", str(cv_run / "cv.json")]) == 0
    assert "splits: reusing" in capsys.readouterr().err  # the same split file as the CV run
    assert json.loads((final / "splits.json").read_text())["studies"]["lnsim"]["folds"] == plan["folds"]
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
    (["train", "--config", "lnsim", "--set", "model.teacher_output=false", "--set", "model.score_blend=1.0",
      "--set", "model.domain_gate=false", "--set", "readout.labelled_prior=teacher"],
     "readout.labelled_prior = 'teacher' needs model.teacher_output = true"),
    (["train", "--set", "model.teacher_output=false", "--set", "model.score_blend=1.0"],
     "model.domain_gate = true needs model.teacher_output = true"),
    (["train", "--set", "data.studies.0.kind=mat"], "data.studies.0.kind = 'mat' is not one of"),
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
