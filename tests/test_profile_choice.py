"""The two-study recipe's fitted profile numbers (model/training/profile_choice.py, configs/lnsim-cdm.toml):
a study's blend by inner CV, the Platt-fitted sigmoid gate on the domain output's leave-one-out
outputs, level offsets of the default mixture, an output on raw scores calibrated by rank; tiny
in-process runs on synthetic photos (the fixtures of test_training_studies.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model.profiles import ProfileSpec, check_specs, profile_score, raw_score, soft_clamp
from model.training.config import ConfigError, load_config
from model.training.profile_choice import blend_grid, choose_blend, loo_outputs, platt
from model.training.train import main as train_main
from test_training_studies import two_study_config, ws  # noqa: F401  (the module-scoped photos)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

A4B = ('\n[profiles]\ngate = "platt"\nalign = "teacher"\n', "domain_alphas = [0.3]\n")


def a4b_config(path, ws):  # noqa: F811
    path = two_study_config(path, ws, extra=A4B[1] + A4B[0])
    text = path.read_text().replace('mapping = "quantile"\n\n[data.teacher]',
                                    'mapping = "none"\ncalibration = "quantile"\nblend_cv = true\n\n[data.teacher]')
    path.write_text(text)
    return path


# -- the numbers, on their own ---------------------------------------------------------------------

def test_choose_blend_finds_the_mix_that_ranks_best_within_the_inner_folds():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=400), rng.normal(size=400)
    y = 0.3 * a + 0.7 * b  # the target is exactly 0.3 x "oof" + 0.7 x "teacher"
    chosen, rho = choose_blend(a, b, y, np.arange(400) % 5)
    assert chosen == pytest.approx(0.3) and rho[0.3] == pytest.approx(1.0)
    assert list(rho) == pytest.approx(list(blend_grid()))  # 0, 0.05, ..., 1
    assert choose_blend(a, b, a, np.arange(400) % 5)[0] == 1.0


def test_loo_outputs_equal_refitting_without_each_row():
    """The weighted ridge of readout._solve refitted without row i (its weighted target mean kept:
    the closed form holds for a fixed intercept), evaluated on row i."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 6))
    gram = x @ x.T / 6
    y = np.stack([(x[:, 0] > 0).astype(float), (x[:, 0] <= 0).astype(float)], 1)
    w = rng.uniform(0.5, 2.0, 30)
    loo = loo_outputs(gram, y, w, 0.3)
    y_mean = (y * w[:, None]).sum(0) / w.sum()
    s = np.sqrt(w)
    for i in (0, 7, 29):
        k = np.arange(30) != i
        a = gram[np.ix_(k, k)] * s[k, None] * s[None, k] + 0.3 * np.eye(29)
        dual = np.linalg.solve(a, s[k, None] * (y[k] - y_mean)) * s[k, None]
        assert np.allclose(loo[i], gram[i, k] @ dual + y_mean, atol=1e-10)


def test_platt_recovers_a_logistic_centre_and_width():
    rng = np.random.default_rng(2)
    d = rng.uniform(0, 1, 20000)
    y = rng.uniform(size=d.size) < 1 / (1 + np.exp(-(d - 0.6) / 0.07))
    c, w = platt(d, y)
    # class balancing weighs both sides equally: the logit moves by log(n_class / n_other)
    prior = np.log(y.mean() / (1 - y.mean()))
    assert w == pytest.approx(0.07, rel=0.05) and c == pytest.approx(0.6 + 0.07 * prior, abs=0.01)
    with pytest.raises(ValueError, match="photos of the class and photos of other classes"):
        platt(d, np.ones(d.size, bool))


def test_mixture_offsets_shift_each_component_before_mixing():
    outputs = torch.tensor([[0.2, 0.6, 0.9], [0.7, 0.1, 0.0]])
    names = ("a", "b", "domain.a")
    mix = dict(kind="mixture", gate="sigmoid", inputs=("pa", "pb"), gate_inputs=("domain.a", ""),
               centers=(0.5, 0.0), widths=(0.1, 1.0))
    specs = (ProfileSpec("pa", inputs=("a",), weights=(1.0,)), ProfileSpec("pb", inputs=("b",), weights=(1.0,)),
             ProfileSpec("default", **mix, offsets=(0.0, 0.25)))
    check_specs(names, specs)

    class Cfg:
        outputs, profiles = names, specs

    g = torch.sigmoid((outputs[:, 2] - 0.5) / 0.1)
    want = g * outputs[:, 0] + (1 - g) * (outputs[:, 1] + 0.25)
    assert torch.allclose(raw_score(outputs, Cfg, "default"), want)
    assert torch.allclose(profile_score(outputs, Cfg, "default"), soft_clamp(want))
    assert ProfileSpec.from_dict(json.loads(json.dumps(specs[2].to_dict()))) == specs[2]
    assert "offsets" not in specs[0].to_dict()  # profiles without offsets serialise as before
    with pytest.raises(ValueError, match="one finite number per component"):
        check_specs(names, specs[:2] + (ProfileSpec("default", **mix, offsets=(0.1,)),))


@pytest.mark.parametrize("overrides, message", [
    (["data.studies.1.blend_cv=true", "data.studies.1.blend=0.5"], "give blend or blend_cv, not both"),
    (["data.studies.1.blend_cv=true", "readout.alphas=[1.0]"], "readout.alphas needs two or more"),
    (["data.studies.1.branch_share=0.25"], "needs model.branch = 'resmem'"),
    (["data.studies.1.calibration=rank"], "data.studies.1.calibration"),
    (["profiles.align=study"], "profiles.align"),
    (["profiles.align=teacher", "profiles.gate=none"], "aligns the gated default"),
    (["readout.domain_alphas=[0]"], "readout.domain_alphas must be positive"),
    (['profiles.route=["lnsim", "lamem"]'], "profiles.route: 'lamem' names no study"),
    (['profiles.route=["lnsim"]', "profiles.gate=softmax"], "needs profiles.gate = 'sigmoid' or 'platt'"),
])
def test_recipe_option_errors(ws, tmp_path, overrides, message):  # noqa: F811
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(str(two_study_config(tmp_path / "c.toml", ws)), overrides)


def test_the_packaged_two_study_recipe_is_the_measured_candidate():
    cfg = load_config("lnsim-cdm")
    cdm, lnsim = cfg.data.study("cdm"), cfg.data.study("lnsim")
    assert (cdm.mapping, cdm.calibration, cdm.blend_cv, cdm.branch_share) == ("none", "quantile", True, 0.0)
    assert (lnsim.branch_share, cfg.model.score_blend, cfg.model.branch) == (0.25, 0.7, "resmem")
    assert (cfg.profiles.gate, cfg.profiles.align, cfg.readout.domain_alphas) == ("platt", "teacher", [0.3])
    assert cfg.output.name == "resmemnet-lnsim-cdm"  # a candidate, not the shipped default (model card)
    shipped = load_config("default")  # the same recipe, its default routed to LNSIM only ("A4c")
    assert shipped.profiles.route == ["lnsim"] and shipped.output.name == "resmemnet-default"
    assert shipped.to_dict()["data"] == cfg.to_dict()["data"] and shipped.model == cfg.model
    assert shipped.readout == cfg.readout and shipped.preprocessing == cfg.preprocessing


# -- a final run with the recipe -------------------------------------------------------------------

def test_a_final_run_fits_the_blend_the_gate_and_the_offsets_from_its_training_photos(ws, tmp_path):  # noqa: F811
    from model.checkpoint import load_checkpoint
    from model.training.data import map_scores
    from model.training.profile_fit import affine_fit

    run = tmp_path / "final"
    assert train_main(["--config", str(a4b_config(tmp_path / "c.toml", ws)), "--out", str(run)]) == 0
    _, meta = load_checkpoint(run / "tiny.json")
    readout = meta.training["readout"]
    specs = {p.name: p for p in meta.architecture.profiles}
    b = readout["cdm"]["blend"]
    assert b in blend_grid() and specs["cdm"].weights == pytest.approx((b, 1 - b))
    assert readout["cdm"]["blend_inner_cv_spearman"][str(b) if str(b) in readout["cdm"]["blend_inner_cv_spearman"]
                                                     else b] == max(readout["cdm"]["blend_inner_cv_spearman"].values())
    assert specs["lnsim"].weights == pytest.approx((0.7, 0.3))  # a fixed blend stays as configured
    assert readout["domain"]["alpha"] == 0.3
    default = specs["default"]
    pl = readout["domain"]["platt"]
    assert set(pl) == {"lnsim", "cdm"} and all(w > 0 for _, w in pl.values())
    assert default.centers[:2] == pytest.approx((pl["lnsim"][0], pl["cdm"][0]))
    assert default.widths[:2] == pytest.approx((pl["lnsim"][1], pl["cdm"][1]))
    # offsets: m_scale - m_s per study (0 for the scale study itself), m_scale for general
    rows = {}
    with open(run / "head_outputs.csv") as fh:
        import csv

        for r in csv.DictReader(fh):
            rows.setdefault((r["study"], r["set"]), []).append(r)
    assert default.offsets[0] == 0.0 and default.offsets[2] > -1
    # the cdm profile is calibrated onto cdm's raw scores mapped by rank onto LNSIM's training scores
    names = meta.architecture.output_names
    cdm_rows, lnsim_rows = rows[("cdm", "train")], rows[("lnsim", "train")]
    out = np.array([[float(r[f"output_{n}"]) for n in names] for r in cdm_rows])
    raw = b * out[:, names.index("cdm")] + (1 - b) * out[:, names.index("teacher")]
    target = map_scores(np.array([float(r["truth"]) for r in cdm_rows]),
                        np.array([float(r["truth"]) for r in lnsim_rows]), "quantile")
    assert (specs["cdm"].scale, specs["cdm"].shift) == pytest.approx(affine_fit(raw, target), rel=1e-4, abs=1e-5)
    assert [float(r["target"]) for r in cdm_rows] == pytest.approx([float(r["truth"]) for r in cdm_rows])  # raw fit


def test_a_routed_default_sends_only_the_named_studies_photos_to_their_profiles(ws, tmp_path):  # noqa: F811
    """profiles.route = ["lnsim"]: the default mixes the lnsim profile (its Platt gate) and general;
    cdm keeps its own profile and domain column; a run without LNSIM (leave-one-study-out) serves
    general as its default."""
    from model.checkpoint import load_checkpoint
    from model.training.config import load_config
    from model.training.profile_fit import fit_profiles, output_layout

    path = a4b_config(tmp_path / "c.toml", ws)
    path.write_text(path.read_text().replace('align = "teacher"\n', 'align = "teacher"\nroute = ["lnsim"]\n'))
    run = tmp_path / "final"
    assert train_main(["--config", str(path), "--out", str(run)]) == 0
    _, meta = load_checkpoint(run / "tiny.json")
    specs = {p.name: p for p in meta.architecture.profiles}
    default, pl = specs["default"], meta.training["readout"]["domain"]["platt"]
    assert default.inputs == ("lnsim", "general") and default.gate_inputs == ("domain.lnsim", "")
    assert default.centers[0] == pytest.approx(pl["lnsim"][0]) and default.widths[0] == pytest.approx(pl["lnsim"][1])
    assert default.offsets[0] == 0.0 and len(default.offsets) == 2
    assert "cdm" in specs and "domain.cdm" in meta.architecture.output_names
    cfg = load_config(str(path))
    layout = output_layout(cfg)
    rows = np.random.default_rng(0).normal(size=(30, len(layout))).astype(np.float32)
    alone = {p.name: p for p in fit_profiles(cfg, layout, {"cdm": (rows, rows[:, 0])})}
    assert alone["default"].kind == "alias" and alone["default"].inputs == ("general",)
