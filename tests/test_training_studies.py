"""Several labelled studies in one training run (tiny synthetic data, random ResNet-50 trunk):
config format and errors, rank mapping of a study's scores, the protocols of --cv (within-study
folds, leave-one-study-out, teacher agreement) with no test photo or its mirror in training, the
multi-class domain output, and the final checkpoint's profiles."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.training.config import ConfigError, load_config
from model.training.train import main as train_main
from test_training_datasets import _picture, write_lnsim, write_rows, write_teacher
from test_training_pipeline import write_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_csv_study(root: Path, n: int = 24, cast: int = 1, seed: int = 7) -> Path:
    """A path,score study of n photos with its own colour cast and a score scale unlike LNSIM's."""
    root.mkdir(parents=True)
    scores = np.random.default_rng(seed).uniform(0.05, 0.45, n)  # another paradigm, another scale
    rows = []
    for k in range(n):
        img = np.asarray(_picture(0.2 + scores[k], (44, 36), seed=200 + k)).astype(np.float64)
        img[..., cast] = 255 - img[..., cast]
        name = f"img_{k:02d}.png"
        Image.fromarray(img.astype(np.uint8)).save(root / name)
        rows.append((name, f"{scores[k]:.6f}"))
    return write_rows(root / "scores.csv", ["path", "score"], rows)


def two_study_config(path: Path, ws: dict, *, extra_model: str = "", extra: str = "") -> Path:
    """LNSIM-like study + a CSV study + teacher photos, readout head with teacher and domain outputs."""
    cfg = write_config(path, ws["lnsim"], ws["root"] / "cache", [], teacher=ws["teacher"])
    text = cfg.read_text().replace('[data.labelled]\nkind = "lnsim"', '[[data.studies]]\nname = "lnsim"\nkind = "lnsim"')
    text = text.replace("[data.teacher]", f'[[data.studies]]\nname = "cdm"\nkind = "csv"\ncsv = "{ws["cdm"]}"\n'
                                          f'mapping = "quantile"\n\n[data.teacher]')
    text = text.replace('backbone = "resnet50"', 'backbone = "resnet50"\nhead = "readout"\nteacher_output = true\n'
                        'score_blend = 0.7\ndomain_gate = true\ngate_center = 0.5\ngate_width = 0.1\n' + extra_model)
    path.write_text("phases = []\n" + text + '\n[readout]\nalphas = [0.1, 10.0]\ninner_folds = 3\n' + extra)
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("studies")
    write_lnsim(root / "lnsim", n=40, sizes=((40, 40), (48, 40)))
    teacher = write_teacher(root / "pool", n=18)
    for f in (root / "pool").glob("*.jpg"):  # the teacher's photos of a third kind
        arr = np.asarray(Image.open(f).convert("RGB")).astype(np.float64)
        arr[..., 2] = 255 - arr[..., 2]
        Image.fromarray(arr.astype(np.uint8)).save(f)
    return {"root": root, "lnsim": root / "lnsim", "teacher": teacher, "cdm": write_csv_study(root / "cdm")}


# -- config ---------------------------------------------------------------------------------------

def test_the_older_single_labelled_table_is_the_first_study(tmp_path):
    cfg = load_config("paper", ["data.labelled.root=/data/lamem", "data.labelled.kind=lamem"])
    assert [(s.name, s.kind, s.root) for s in cfg.data.studies] == [("lamem", "lamem", "/data/lamem")]
    old = tmp_path / "old.toml"
    old.write_text('[data]\nlabelled_cache = "x.npy"\n[data.labelled]\nkind = "csv"\ncsv = "/d/cdm_dev/scores.csv"\n')
    cfg = load_config(str(old))
    assert cfg.data.studies[0].name == "cdm_dev" and cfg.data.studies[0].cache == "x.npy"  # named by its folder
    both = tmp_path / "both.toml"
    both.write_text('[data.labelled]\nroot = "a"\n[[data.studies]]\nroot = "b"\n')
    with pytest.raises(ConfigError, match="not both"):
        load_config(str(both))


def test_two_studies_config(ws, tmp_path):
    cfg = load_config(str(two_study_config(tmp_path / "c.toml", ws)))
    assert [s.name for s in cfg.data.studies] == ["lnsim", "cdm"] and cfg.data.scale_study == "lnsim"
    assert cfg.model.network().teacher_output and cfg.data.study("cdm").mapping == "quantile"
    from model.training.profile_fit import output_layout

    assert output_layout(cfg) == ("lnsim", "cdm", "teacher", "domain.lnsim", "domain.cdm", "domain.teacher")


@pytest.mark.parametrize("overrides, message", [
    (["data.studies.1.kind=mat"], "data.studies.1.kind = 'mat' is not one of"),
    (["data.studies.1.name=lnsim"], "two studies are named 'lnsim'"),
    (["data.studies.1.name=teacher"], "is taken by another output or profile"),
    (["data.studies.1.name=9x"], "use a letter"),
    (['profiles.aliases=["outdoor=lsnim"]'], "no profile 'lsnim'"),
    (["data.scale=cdm_dev"], "data.scale = 'cdm_dev' names no study"),
    (["data.studies.1.mapping=rank"], "data.studies.1.mapping"),
    (["data.studies.1.weight=0"], "data.studies.1.weight must be a positive number"),
    (["model.head=lstm", "model.domain_gate=false", "phases.0.epochs=1"], "need model.head = 'readout'"),
    (["profiles.general=shared"], "needs model.shared_output = true"),
    (["profiles.gate=max"], "profiles.gate"),
    (['model.outputs=["a"]'], "written by training"),
    (["model.score_blend=2"], "model.score_blend must be in [0, 1]"),
])
def test_study_and_profile_config_errors(ws, tmp_path, overrides, message):
    path = two_study_config(tmp_path / "c.toml", ws)
    if "model.head=lstm" in overrides:  # an LSTM needs a phase to train
        path.write_text(path.read_text().replace("phases = []\n", "") + '\n[[phases]]\nname = "frozen"\nepochs = 1\n')
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(str(path), overrides)


def test_a_config_error_is_one_line_and_exit_2(ws, tmp_path, capsys, monkeypatch):
    from app.cli import main as cli_main

    monkeypatch.chdir(tmp_path)
    path = two_study_config(tmp_path / "c.toml", ws)
    assert cli_main(["train", "--config", str(path), "--set", "data.studies.1.name=lnsim"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("resmemnet train: error: data.studies: two studies are named")
    assert not (tmp_path / "runs").exists()


# -- protocols ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cv_run(ws, tmp_path_factory):
    run = tmp_path_factory.mktemp("cv") / "cv"
    cfg = two_study_config(ws["root"] / "cv.toml", ws)
    assert train_main(["--config", str(cfg), "--cv", "--out", str(run)]) == 0
    return run


def test_cv_reports_within_study_folds_loso_and_teacher_agreement(cv_run):
    report = json.loads((cv_run / "cv.json").read_text())
    assert report["studies"] == ["lnsim", "cdm"] and report["dataset"] == "lnsim"  # top level: the scale study
    within = report["protocols"]["within"]
    assert [r["split"] for r in within["lnsim"]["splits"]] == ["fold_1", "fold_2", "fold_3"]
    assert sum(r["n"] for r in within["lnsim"]["splits"]) == 38 and sum(r["n"] for r in within["cdm"]["splits"]) == 24
    for study in ("lnsim", "cdm"):
        row = within[study]["splits"][0]
        assert {"spearman", "spearman_lnsim", "spearman_cdm", "spearman_general", "teacher_holdout_spearman"} <= set(row)
    loso = report["protocols"]["loso"]["splits"]
    assert [(r["split"], r["n"]) for r in loso] == [("lnsim", 38), ("cdm", 24)]
    assert "spearman_cdm" not in loso[1] and "spearman_lnsim" in loso[1]  # no profile of the study it never saw
    summary = report["summary"]
    assert set(summary["within"]["cdm"]) >= {"default", "cdm", "lnsim", "general"}
    assert set(summary["loso"]["lnsim"]) == {"default", "cdm", "general"}
    assert summary["within"]["lnsim"]["default"]["teacher_agreement"]["n"] == 3
    for name in ("cv_within_lnsim.csv", "cv_within_cdm.csv", "cv_loso.csv", "cv_teacher.csv", "cv_summary.csv",
                 "cv.csv", "cv_within_cdm_blend.csv", "lnsim/fold_2/head_outputs.csv", "loso/cdm/predictions.csv"):
        assert (cv_run / name).is_file(), name
    with open(cv_run / "cv_within_cdm.csv") as fh:
        assert [r[0] for r in csv.reader(fh)] == ["split", "fold_1", "fold_2", "fold_3", "mean", "std"]
    with open(cv_run / "cv_teacher.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 8 and {r["protocol"] for r in rows} == {"within", "loso"} and rows[0]["default"]


def test_head_outputs_re_score_every_profile_exactly(cv_run):
    """head_outputs.csv holds what the profiles are fitted from: refitting them from the file gives
    the fold's reported rho (what research/gate_sweep.py relies on)."""
    from research.gate_sweep import fold_scores, read_head_outputs

    from model.training.config import config_from_dict
    from model.training.metrics import spearman

    cfg = config_from_dict(json.loads((cv_run / "config.json").read_text()))
    for run in ("cdm/fold_2", "lnsim/fold_1", "loso/cdm"):
        fold = read_head_outputs(cv_run / run / "head_outputs.csv")
        result = json.loads((cv_run / run / "result.json").read_text())
        scores = fold_scores(cfg, fold, {})
        test = fold["set"] == "test"
        for name, entry in result["profiles"].items():
            assert spearman(scores[name][test], fold["truth"][test]) == pytest.approx(entry["spearman"], abs=1e-9), \
                (run, name)


def test_no_test_photo_or_its_mirror_is_a_training_row(ws, tmp_path):
    """Every fit's rows (a photo and its mirror image are rows of one pool index) come from photos
    outside the run's test and teacher-holdout photos, in every protocol; a file that is both a
    cdm test photo and a teacher photo stays out of that run's teacher rows too."""
    import shutil

    from model.training.context import build_context
    from model.training.cv import cv_runs
    from model.training.loop import fit
    from model.training.state import EpochBudget

    pool_dir = tmp_path / "pool"
    shutil.copytree(ws["teacher"].parent, pool_dir)
    twin = ws["cdm"].parent / "img_03.png"  # the same file in the teacher's list
    with open(pool_dir / "teacher.csv", "a") as fh:
        fh.write(f"{twin},2.5\n")
    cfg = load_config(str(two_study_config(tmp_path / "c.toml", ws)),
                      [f"data.teacher.csv={pool_dir / 'teacher.csv'}", "data.teacher.holdout_fraction=0.2",
                       f"output.runs_dir={tmp_path / 'runs'}"])
    ctx = build_context(cfg, tmp_path / "run", {"mode": "cv"}, device_name="cpu", resume=False,
                        budget=EpochBudget(None), log=lambda m: None)
    pool = ctx.pool
    twin_idx = [i for i, p in enumerate(pool.paths) if Path(p).resolve() == twin.resolve()]
    assert len(twin_idx) == 2  # once in cdm, once among the teacher's photos
    augs = ctx.pool.features.augmentations
    assert augs == ["none", "hflip"]
    seen_twin_test = False
    for protocol, spec in cv_runs(ctx):
        ctx.reset_model()
        rows = fit(ctx, spec)["rows"]
        banned = set(pool.photo_id[np.concatenate([spec.test_idx, spec.holdout_idx])].tolist())
        for label, idx in rows.items():
            assert not banned & set(pool.photo_id[idx].tolist()), (spec.name, label)
            assert len(np.intersect1d(idx, spec.test_idx)) == 0
        if twin_idx[0] in spec.test_idx:
            seen_twin_test = True
            assert twin_idx[1] not in rows["teacher"] and twin_idx[1] not in rows["domain"]
        if protocol == "loso":
            assert not set(spec.test_idx) & set(np.concatenate(list(rows.values())).tolist())
    assert seen_twin_test


def test_a_studys_scores_are_mapped_by_rank_onto_the_scale_studys_training_scores(ws, tmp_path):
    from model.training.context import build_context
    from model.training.cv import cv_runs
    from model.training.metrics import spearman
    from model.training.state import EpochBudget

    cfg = load_config(str(two_study_config(tmp_path / "c.toml", ws)), [f"output.runs_dir={tmp_path / 'runs'}"])
    ctx = build_context(cfg, tmp_path / "run", {"mode": "cv"}, device_name="cpu", resume=False,
                        budget=EpochBudget(None), log=lambda m: None)
    pool = ctx.pool
    _, spec = next((p, s) for p, s in cv_runs(ctx) if s.name == "cdm/fold_1")
    which = pool.study_of(spec.train_idx)
    lnsim_train, cdm_train = spec.train_idx[which == 0], spec.train_idx[which == 1]
    truth = pool.truth
    assert len(cdm_train) == 16 and len(lnsim_train) == 38  # cdm's other folds, LNSIM whole
    np.testing.assert_allclose(spec.targets[lnsim_train], truth[lnsim_train])  # the scale study as it is
    mapped = spec.targets[cdm_train]
    assert spearman(mapped, truth[cdm_train]) == pytest.approx(1.0)  # ranks kept ...
    expected = np.quantile(truth[lnsim_train], (np.argsort(np.argsort(truth[cdm_train])) + 0.5) / 16)
    np.testing.assert_allclose(np.sort(mapped), np.sort(expected))  # ... on LNSIM's distribution
    assert not np.allclose(mapped, truth[cdm_train])
    assert np.all(spec.targets[spec.test_idx] == 0)  # the test photos' scores are never mapped or used


def test_the_domain_output_tells_each_study_and_the_teacher_apart(ws, cv_run, tmp_path, capsys):
    """Final run: the multi-class ridge classifier (one column per study + the teacher's) puts each
    kind of photo in its own column; the profiles are stored in the checkpoint and reload."""
    from model.checkpoint import load_checkpoint, read_meta
    from model.preprocess import decode_image
    from model.profiles import profile_names, profile_score
    from model.scoring import Scorer

    run = tmp_path / "final"
    cfg = two_study_config(ws["root"] / "cv.toml", ws)
    assert train_main(["--config", str(cfg), "--out", str(run), "--cv-results", str(cv_run / "cv.json")]) == 0
    model, meta = load_checkpoint(run / "tiny.json")
    arch = meta.architecture
    assert arch.output_names == ("lnsim", "cdm", "teacher", "domain.lnsim", "domain.cdm", "domain.teacher")
    assert profile_names(arch) == ("default", "lnsim", "cdm", "general", "outdoor")
    raw = json.loads((run / "tiny.json").read_text())["architecture"]
    assert raw["outputs"] == list(arch.output_names) and raw["profiles"][0]["name"] == "lnsim"
    assert read_meta(run / "tiny.json").architecture == arch  # serialised and read back unchanged
    assert meta.metrics["cross_validation"]["summary"]["loso"]["cdm"]["default"]["spearman"] is not None
    measured = meta.metrics["profiles"]  # what `resmemnet info` and /readyz show per profile
    summary = meta.metrics["cross_validation"]["summary"]
    assert set(measured) == {"default", "lnsim", "cdm", "general", "outdoor"}
    assert measured["default"]["within_cv"]["cdm"] == summary["within"]["cdm"]["default"]["spearman"]["mean"]
    assert measured["default"]["loso"] == {s: summary["loso"][s]["default"]["spearman"] for s in ("lnsim", "cdm")}
    assert "lnsim" not in measured["lnsim"]["loso"]  # no lnsim profile without LNSIM's labels
    assert measured["general"]["teacher_agreement"] == summary["within"]["lnsim"]["general"]["teacher_agreement"]["mean"]
    assert set(meta.reference["profiles"]) == {"lnsim", "cdm", "general", "outdoor"}
    assert meta.training["readout"]["domain"]["rows"] == 2 * (38 + 24 + 14)  # every training photo and its mirror
    pre = meta.preprocessing
    kinds = {"lnsim": sorted(str(p) for p in ws["lnsim"].glob("Image_data/*.jpg"))[:12],
             "cdm": sorted(str(p) for p in ws["cdm"].parent.glob("*.png"))[:12],
             "teacher": sorted(str(p) for p in ws["teacher"].parent.glob("*.jpg"))[:12]}
    with torch.no_grad():
        for k, (kind, paths) in enumerate(kinds.items()):
            x = torch.stack([pre.image_to_tensor(decode_image(p)) for p in paths])
            out = model.head.outputs(model.forward_features(x))
            domain = out[:, 3:6]  # held-out teacher photos among them: most, not all, land in their column
            assert (domain.argmax(dim=1) == k).float().mean() >= 0.75 and domain.mean(dim=0).argmax() == k, kind
            scorer = Scorer(model, pre, device="cpu", mixed_precision=False)
            table = scorer.profile_score_batch(x, ["default", "cdm", "outdoor"])
            assert torch.allclose(table[:, 0], profile_score(out, arch, "default"), atol=1e-6)
            assert torch.allclose(table[:, 2], profile_score(out, arch, "lnsim"), atol=1e-6)  # outdoor = lnsim
    from app.cli import main as cli_main

    capsys.readouterr()
    assert cli_main(["info", "--weights", str(run / "tiny.json")]) == 0
    out = capsys.readouterr().out
    assert "default, lnsim, cdm, general, outdoor" in out
    line = next(t for t in out.splitlines() if t.startswith("profile cdm "))
    assert f"Spearman lnsim CV {measured['cdm']['within_cv']['lnsim']:.3f}, cdm CV" in line


def test_a_shared_output_and_a_softmax_gate(ws, tmp_path):
    """model.shared_output fits one output to both studies' rows on the common scale (each study
    the same total weight); profiles.general = "shared" blends it with the teacher output; the
    softmax gate mixes the studies' profiles and general by the domain columns."""
    from model.checkpoint import load_checkpoint
    from model.training.context import build_context
    from model.training.pool import make_run_spec
    from model.training.readout_fit import _shared_rows
    from model.training.state import EpochBudget

    cfg_path = two_study_config(tmp_path / "c.toml", ws, extra_model="shared_output = true\n",
                                extra='\n[profiles]\ngeneral = "shared"\ngeneral_blend = 0.6\ngate = "softmax"\n'
                                      "temperature = 0.2\n")
    run = tmp_path / "final"
    assert train_main(["--config", str(cfg_path), "--out", str(run)]) == 0
    _, meta = load_checkpoint(run / "tiny.json")
    arch = meta.architecture
    assert arch.output_names[:4] == ("lnsim", "cdm", "shared", "teacher")
    specs = {p.name: p for p in arch.profiles}
    assert specs["general"].inputs == ("shared", "teacher") and specs["general"].weights == pytest.approx((0.6, 0.4))
    assert specs["default"].gate == "softmax" and specs["default"].temperature == 0.2
    assert specs["default"].gate_inputs == ("domain.lnsim", "domain.cdm", "domain.teacher")
    assert meta.training["readout"]["shared"]["rows"] == 2 * (38 + 24)
    ctx = build_context(load_config(str(cfg_path)), tmp_path / "x", {}, device_name="cpu", resume=False,
                        budget=EpochBudget(None), log=lambda m: None, write_run=False)
    plan = ctx.pool.plan["studies"]
    spec = make_run_spec(ctx.cfg, ctx.pool, "final", tmp_path, {s: p["final"]["train"] for s, p in plan.items()}, {}, None)
    idx, w = _shared_rows(ctx, spec, ctx.pool.studies, ctx.pool.study_of(spec.train_idx))
    which = ctx.pool.study_of(idx)
    assert w[which == 0].sum() == pytest.approx(w[which == 1].sum())  # 38 and 24 photos, the same total
