"""Training building blocks: one-cycle schedule, the paper's Adam variant, metrics against scipy,
config overrides and errors (studies and profiles too), score mapping, split files."""
import json
import tomllib

import numpy as np
import pytest
import torch

from model.training import metrics as M
from model.training.config import ConfigError, load_config, to_toml
from model.training.data import DatasetError, ScoredImages, map_scores
from model.training.splits import build_splits, carve, kfold_test_sets, load_or_create_splits, read_splits
from model.training.optim import CostAugmentedAdam, build_optimizer
from model.training.schedule import epoch_lrs, one_cycle_lr


# -- schedule ------------------------------------------------------------------------------

def test_one_cycle_hits_bounds_at_the_right_batches():
    lrs = epoch_lrs(100, 1e-3, 1e-2)
    assert lrs[0] == pytest.approx(1e-3)  # every epoch starts at the lower bound
    assert lrs[50] == pytest.approx(1e-2)  # the first batch of the second half runs at the upper bound
    assert int(np.argmax(lrs)) == 50 and max(lrs) == pytest.approx(1e-2)
    assert min(lrs) == pytest.approx(1e-3) and int(np.argmin(lrs)) == 0
    assert all(a < b for a, b in zip(lrs[:50], lrs[1:51]))  # rises over the first half
    assert all(a > b for a, b in zip(lrs[50:], lrs[51:]))  # falls over the second half
    assert lrs[99] == pytest.approx(1e-3 + 9e-3 / 50)  # one step above the bound the next epoch starts at
    assert lrs[25] == pytest.approx(1e-3 + 9e-3 * 0.5)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 24])
def test_one_cycle_small_epochs(n):
    lrs = epoch_lrs(n, 1e-5, 1e-4)
    assert lrs[0] == pytest.approx(1e-5)
    if n >= 2:
        assert max(lrs) == pytest.approx(1e-4) and int(np.argmax(lrs)) == (n + 1) // 2
    assert all(1e-5 - 1e-12 <= v <= 1e-4 + 1e-12 for v in lrs)
    with pytest.raises(ValueError):
        one_cycle_lr(n, n, 1e-5, 1e-4)


# -- optimizer -----------------------------------------------------------------------------

def _trajectory(make_opt, steps=15, use_loss=True):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = make_opt(net.parameters())
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((net(x) - y) ** 2).mean()
        loss.backward()
        opt.step(loss=loss) if use_loss else opt.step()
        losses.append(float(loss.detach()))
    return [p.detach().clone() for p in net.parameters()], losses


def test_cost_augmented_adam_equals_adam_when_lambda_is_zero():
    ours, _ = _trajectory(lambda p: CostAugmentedAdam(p, lr=1e-2, eps=1e-6, weight_decay=1e-4, cost_scale=0.0))
    ref, _ = _trajectory(lambda p: torch.optim.Adam(p, lr=1e-2, eps=1e-6, weight_decay=1e-4), use_loss=False)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_cost_term_changes_the_update_and_still_learns():
    plain, _ = _trajectory(lambda p: CostAugmentedAdam(p, lr=1e-2, cost_scale=0.0))
    cost, losses = _trajectory(lambda p: CostAugmentedAdam(p, lr=1e-2, cost_scale=0.01, weight_decay=1e-4))
    assert any(not torch.allclose(a, b) for a, b in zip(plain, cost))
    assert losses[-1] < losses[0]


def test_cost_term_is_lambda_times_cost_added_to_every_gradient_component():
    # one step from zero moments: m = (1-b1) H, v = (1-b2) H^2 -> update = -lr * H/(|H| + eps') per component
    p = torch.nn.Parameter(torch.tensor([0.0, 0.0]))
    opt = CostAugmentedAdam([p], lr=0.1, eps=1e-12, cost_scale=2.0)
    p.grad = torch.tensor([0.5, -3.0])
    opt.step(loss=torch.tensor(1.0))  # H = 2 * 1 + grad = [2.5, -1.0]
    torch.testing.assert_close(p.detach(), torch.tensor([-0.1, 0.1]))


def test_cost_includes_the_l2_term():
    # with a huge eps the first update is -lr * H / (|H| + eps) ~ linear in H, which exposes H itself
    theta = torch.tensor([1.0, -2.0])
    p = torch.nn.Parameter(theta.clone())
    lam, wd, eps, lr, J = 0.5, 0.1, 1e6, 1.0, 0.3
    opt = CostAugmentedAdam([p], lr=lr, eps=eps, weight_decay=wd, cost_scale=lam)
    grad = torch.tensor([0.2, 0.4])
    p.grad = grad.clone()
    opt.step(loss=torch.tensor(J))
    H = lam * (J + 0.5 * wd * float((theta ** 2).sum())) + grad + wd * theta
    expected = theta - lr * H / (H.abs() + eps)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-9)


def test_optimizer_state_roundtrips_with_weights_only(tmp_path):
    params = [torch.nn.Parameter(torch.randn(3))]
    opt = CostAugmentedAdam(params, lr=1e-3, cost_scale=0.1)
    params[0].grad = torch.randn(3)
    opt.step(loss=torch.tensor(0.3))
    torch.save(opt.state_dict(), tmp_path / "o.pt")
    loaded = torch.load(tmp_path / "o.pt", weights_only=True)
    opt2 = CostAugmentedAdam(params, lr=1e-3, cost_scale=0.1)
    opt2.load_state_dict(loaded)
    assert torch.equal(opt2.state[params[0]]["exp_avg"], opt.state[params[0]]["exp_avg"])


def test_build_optimizer_names():
    from model.training.config import OptimizerConfig

    ps = [torch.nn.Parameter(torch.zeros(2))]
    assert isinstance(build_optimizer(ps, OptimizerConfig(name="cost_adam"), 1e-3), CostAugmentedAdam)
    assert isinstance(build_optimizer(ps, OptimizerConfig(name="adam"), 1e-3), torch.optim.Adam)
    assert isinstance(build_optimizer(ps, OptimizerConfig(name="adamw"), 1e-3), torch.optim.AdamW)


# -- metrics -------------------------------------------------------------------------------

def test_metrics_match_scipy_with_ties():
    from scipy import stats

    rng = np.random.default_rng(0)
    a = rng.integers(0, 6, 200).astype(float)  # many ties
    b = a + rng.integers(0, 4, 200)
    c = rng.normal(size=200)
    for x, y in ((a, b), (a, c), (c, c ** 3), (b, -a)):
        assert M.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
        assert M.pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)
    np.testing.assert_allclose(M.rankdata(a), stats.rankdata(a))
    assert M.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(stats.spearmanr([1, 2, 2, 3], [1, 3, 2, 4]).statistic)
    assert np.isnan(M.spearman([1, 1, 1], [1, 2, 3]))
    assert M.mse([0.1, 0.5], [0.3, 0.5]) == pytest.approx(0.02)


def test_top_bottom_table():
    true = np.linspace(0, 1, 300)
    pred = true[::-1].copy()  # perfectly wrong ranking
    rows = M.top_bottom_table(pred, true)
    labels = [r["set"] for r in rows]
    assert labels == ["top 10", "top 25", "top 50", "top 100", "top 200",
                      "bottom 200", "bottom 100", "bottom 50", "bottom 25", "bottom 10"]
    top10 = rows[0]
    assert top10["mean_pred"] == pytest.approx(pred[np.argsort(-pred)[:10]].mean())
    assert top10["mean_true"] == pytest.approx(true[:10].mean())  # the highest predictions are the lowest truths
    assert top10["mean_true_best"] == pytest.approx(true[-10:].mean())
    assert [r["set"] for r in M.top_bottom_table(pred[:30], true[:30])] == ["top 10", "top 25", "bottom 25", "bottom 10"]


def test_split_half_consistency_and_summary():
    from scipy import stats

    rng = np.random.default_rng(1)
    h1, h2 = rng.random((4, 50)), rng.random((4, 50))
    idx = np.arange(0, 50, 2)
    expect = np.mean([stats.spearmanr(h1[r, idx], h2[r, idx]).statistic for r in range(4)])
    assert M.split_half_consistency(h1, h2, idx) == pytest.approx(expect)
    assert M.mean_std([0.5, 0.7]) == pytest.approx((0.6, np.std([0.5, 0.7], ddof=1)))
    assert M.mean_std([0.5]) == (0.5, 0.0)


# -- config --------------------------------------------------------------------------------

def test_config_overrides_and_roundtrip():
    cfg = load_config("paper", ["phases.0.epochs=3", "optimizer.name=adamw", 'data.augmentations=["none"]',
                                "train.batch_size=8", "output.name=123", "phases.1.lr_max=2e-3"])
    assert cfg.phases[0].epochs == 3 and cfg.optimizer.name == "adamw" and cfg.data.augmentations == ["none"]
    assert cfg.train.batch_size == 8 and cfg.output.name == "123" and cfg.phases[1].lr_max == 2e-3
    assert tomllib.loads(to_toml(cfg.to_dict())) == cfg.to_dict()
    paper = load_config("paper")
    assert [(p.epochs, p.lr_min, p.lr_max, p.frozen) for p in paper.phases] == [
        (10, 1e-3, 1e-2, True), (15, 1e-4, 1e-3, False), (15, 1e-5, 1e-4, False)]
    assert paper.train.batch_size == 24 and paper.optimizer.weight_decay == 1e-4 and paper.optimizer.eps == 1e-6
    default = load_config("default")
    assert default.model.trunk == "resmem" and default.model.head == "readout" and default.phases == []
    assert default.data.teacher.enabled and default.readout.tap_weighting == "stage"
    assert tomllib.loads(to_toml(default.to_dict())) == default.to_dict()  # `phases = []` round-trips


@pytest.mark.parametrize("override, words", [
    ("phases.0.epoch=3", "did you mean 'epochs'"),
    ("optimizer.name=sgd", "optimizer.name"),
    ("train.batch_size=abc", "must be an integer"),
    ("phases.7.epochs=1", "past the end"),
    ("phases.1.cached=true", "needs frozen"),
    ("train.select=best_val", "val_fraction"),
    ("data.teacher.mapping=rank", "data.teacher.mapping"),
    ("nonsense", "key=value"),
])
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        load_config("paper", [override])


def test_unknown_config_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="no packaged config"):
        load_config("nope")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nbatch_size = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(str(bad))
    unknown = tmp_path / "u.toml"
    unknown.write_text("[train]\nbatchsize = 3\n")
    with pytest.raises(ConfigError, match="train.batchsize"):
        load_config(str(unknown))


# -- teacher mapping and splits -------------------------------------------------------------

def test_quantile_mapping_keeps_teacher_ranking_and_takes_labelled_distribution():
    rng = np.random.default_rng(0)
    teacher = rng.normal(5, 2, 400)  # another scale entirely
    reference = rng.beta(5, 3, 300)
    mapped = map_scores(teacher, reference, "quantile")
    assert M.spearman(mapped, teacher) == pytest.approx(1.0)
    assert mapped.mean() == pytest.approx(reference.mean(), abs=0.01)
    assert np.quantile(mapped, 0.9) == pytest.approx(np.quantile(reference, 0.9), abs=0.01)
    z = map_scores(teacher, reference, "zscore")
    assert z.mean() == pytest.approx(reference.mean(), abs=0.01) and z.std() == pytest.approx(reference.std(), abs=0.01)
    same = map_scores(np.array([0.2, 0.9]), reference, "none")
    np.testing.assert_allclose(same, [0.2, 0.9])


def _images(n, name="set"):
    return ScoredImages(name, [f"/data/{name}/{i:04d}.jpg" for i in range(n)], np.linspace(0, 1, n), root=f"/data/{name}")


def test_kfold_partition_and_carve():
    keys = [f"k{i}" for i in range(23)]
    folds = kfold_test_sets(keys, 5, seed=3)
    assert sorted(k for f in folds for k in f) == sorted(keys)
    assert {len(f) for f in folds} <= {4, 5}
    assert folds == kfold_test_sets(keys, 5, seed=3) and folds != kfold_test_sets(keys, 5, seed=4)
    kept, out = carve(keys, 0.2, 0, "x")
    assert len(out) == 5 and not set(kept) & set(out)


def test_split_file_is_written_once_and_reused(tmp_path):
    lab, teach = _images(30, "lab"), _images(20, "pool")
    path = tmp_path / "splits.json"
    kw = dict(folds={"lab": 3}, seed=0, val_fraction=0.2, holdout_fraction=0.25)
    plan = load_or_create_splits(path, {"lab": lab}, teach, **kw)
    assert path.is_file() and len(plan["studies"]["lab"]["folds"]) == 3 and len(plan["teacher"]["holdout"]) == 5
    for fold in plan["studies"]["lab"]["folds"]:
        assert not set(fold["test"]) & set(fold["train"]) and not set(fold["val"]) & set(fold["train"])
        assert not set(fold["test"]) & set(fold["val"])
        assert len(fold["train"]) + len(fold["val"]) + len(fold["test"]) == 30
    assert sorted(k for f in plan["studies"]["lab"]["folds"] for k in f["test"]) == sorted(lab.keys)
    # a second run reads the file: same folds even if the builder would now choose differently
    doctored = json.loads(path.read_text())
    doctored["studies"]["lab"]["folds"][0]["name"] = "kept-from-file"
    path.write_text(json.dumps(doctored))
    again = load_or_create_splits(path, {"lab": lab}, teach, **kw)
    assert again["studies"]["lab"]["folds"][0]["name"] == "kept-from-file"
    with pytest.raises(DatasetError, match="other settings"):
        load_or_create_splits(path, {"lab": lab}, teach, **{**kw, "folds": {"lab": 4}})
    with pytest.raises(DatasetError, match="other photos for lab"):
        load_or_create_splits(path, {"lab": _images(31, "lab")}, teach, **kw)
    with pytest.raises(DatasetError, match="no plan for study 'cdm'"):
        load_or_create_splits(path, {"lab": lab, "cdm": _images(12, "cdm")}, teach,
                              **{**kw, "folds": {"lab": 3, "cdm": 3}})


def test_several_studies_get_their_own_folds_and_the_single_study_folds_are_unchanged():
    """Each study is partitioned on its own (its own k); a study's folds do not depend on the other
    studies, so LNSIM keeps the folds it had when it was the only labelled set."""
    lab, cdm, teach = _images(30, "lab"), _images(13, "cdm"), _images(20, "pool")
    kw = dict(seed=0, val_fraction=0.0, holdout_fraction=0.25)
    both = build_splits({"lab": lab, "cdm": cdm}, teach, folds={"lab": 5, "cdm": 3}, **kw)
    alone = build_splits({"lab": lab}, teach, folds={"lab": 5}, **kw)
    assert both["studies"]["lab"] == alone["studies"]["lab"] and both["teacher"] == alone["teacher"]
    folds = both["studies"]["cdm"]["folds"]
    assert len(folds) == 3 and sorted(k for f in folds for k in f["test"]) == sorted(cdm.keys)
    assert both["studies"]["cdm"]["final"]["train"] == sorted(cdm.keys)


def test_a_single_study_split_file_reads_as_the_plan_of_its_study(tmp_path):
    old = {"format": "resmemnet-splits/1", "dataset": "lnsim", "labelled_sha256": "abc", "n_labelled": 3,
           "params": {"folds": 3, "seed": 0, "val_fraction": 0.0, "holdout_fraction": 0.1, "official": False},
           "folds": [{"name": "fold_1", "train": ["a", "b"], "val": [], "test": ["c"]}],
           "final": {"train": ["a", "b", "c"], "val": []}, "teacher": {"n": 2, "sha256": "t", "holdout": ["x"]}}
    (tmp_path / "old.json").write_text(json.dumps(old))
    plan = read_splits(tmp_path / "old.json", study_names=["mine"])
    assert plan["studies"]["mine"]["folds"] == old["folds"] and plan["teacher"] == old["teacher"]
    assert plan["params"]["folds"] == {"mine": 3}


def test_official_splits_are_used():
    lab = _images(12, "lamem")
    lab.splits = {"split_1": {"train": list(range(8)), "val": [8, 9], "test": [10, 11]},
                  "split_2": {"train": list(range(2, 10)), "val": [0, 1], "test": [10, 11]}}
    plan = build_splits({"lamem": lab}, None, folds={"lamem": 5}, seed=0, val_fraction=0.0, holdout_fraction=0.1)
    folds = plan["studies"]["lamem"]["folds"]
    assert [f["name"] for f in folds] == ["split_1", "split_2"]
    assert folds[0]["val"] == [lab.keys[8], lab.keys[9]]
    plan2 = build_splits({"lamem": lab}, None, folds={"lamem": 3}, seed=0, val_fraction=0.0, holdout_fraction=0.1,
                         use_official=False)
    assert [f["name"] for f in plan2["studies"]["lamem"]["folds"]] == ["fold_1", "fold_2", "fold_3"]


# -- the readout head's closed-form fit ---------------------------------------------------------------

def test_readout_fit_equals_the_primal_ridge_solution_on_raw_features():
    from model.training.readout import TapKernel, fit_ridge, tap_weights

    rng = np.random.default_rng(0)
    chans, n = [3, 5, 4], 30
    x = (rng.normal(size=(n, 12)) * rng.uniform(0.5, 3, 12) + rng.normal(size=12)).astype(np.float32)
    y = x @ rng.normal(size=12) * 0.1 + rng.normal(size=n) * 0.1
    weights = tap_weights((2, 1), chans, "tap")
    kernel = TapKernel(x, chans, weights)
    fit = fit_ridge(kernel, y, np.arange(n), alphas=[0.5])
    # Primal form of the same problem: standardised, tap-weighted columns, penalty alpha * kernel scale.
    x64 = x.astype(np.float64)
    mean, std = x64.mean(0), x64.std(0) + 1e-6
    cols = np.concatenate([np.full(c, np.sqrt(w / c)) for c, w in zip(chans, weights)])
    z = (x64 - mean) / std * cols
    scale = np.trace(z @ z.T) / n
    beta = np.linalg.solve(z.T @ z + 0.5 * scale * np.eye(12), z.T @ (y - y.mean()))
    new = rng.normal(size=(7, 12))
    expected = ((new - mean) / std * cols) @ beta + y.mean()
    np.testing.assert_allclose(new @ fit.weight + fit.bias, expected, rtol=1e-4, atol=1e-6)
    assert fit.alpha == 0.5 and fit.inner_rho == {}


def test_readout_tap_weights_give_every_stage_the_same_share():
    from model.trunks import BLOCKS_PER_STAGE
    from model.network import ResMemNetConfig
    from model.training.readout import tap_weights

    chans = ResMemNetConfig(backbone="resnet152").tap_channels
    w = tap_weights(BLOCKS_PER_STAGE["resnet152"], chans, "stage")
    ends = np.cumsum(BLOCKS_PER_STAGE["resnet152"])
    shares = [w[lo:hi].sum() for lo, hi in zip(np.concatenate([[0], ends[:-1]]), ends)]
    np.testing.assert_allclose(shares, 0.25)
    np.testing.assert_allclose(tap_weights(BLOCKS_PER_STAGE["resnet152"], chans, "channel"), np.array(chans) / sum(chans))
    assert tap_weights(BLOCKS_PER_STAGE["resnet152"], chans[-1:], "stage").tolist() == [1.0]  # last tap only
    ends = tap_weights(BLOCKS_PER_STAGE["resnet152"], chans, "stage_ends")
    assert np.flatnonzero(ends).tolist() == [2, 10, 46, 49]
    np.testing.assert_allclose(ends[[2, 10, 46, 49]], np.array([256, 512, 1024, 2048]) / 3840)
    assert np.flatnonzero(tap_weights(BLOCKS_PER_STAGE["resnet152"], chans, "last")).tolist() == [49]
    with pytest.raises(ValueError, match="tap weighting"):
        tap_weights((1,), [4], "depth")


def test_readout_alpha_is_chosen_by_inner_cv_that_keeps_an_images_rows_together():
    from model.training.metrics import spearman
    from model.training.readout import TapKernel, fit_ridge, inner_folds

    groups = np.tile(np.arange(40), 2)  # 40 images, 2 augmentations each
    fold_of = inner_folds(groups, 5, seed=0)
    assert all(len(set(fold_of[groups == g])) == 1 for g in range(40))
    assert sorted(np.bincount(fold_of).tolist()) == [16] * 5

    rng = np.random.default_rng(1)
    signal = rng.normal(size=(40, 6))
    x = np.concatenate([signal, signal + 0.01 * rng.normal(size=(40, 6))]).astype(np.float32)
    y = np.tile(signal[:, 0] + 0.3 * rng.normal(size=40), 2)
    fit = fit_ridge(TapKernel(x, [6], np.ones(1)), y, groups, alphas=[1e-3, 1.0, 1e4],
                    eval_rows=np.arange(80) < 40)
    assert set(fit.inner_rho) == {1e-3, 1.0, 1e4}
    assert fit.alpha == max(fit.inner_rho, key=fit.inner_rho.get)
    assert spearman(x[:40] @ fit.weight + fit.bias, y[:40]) > 0.8


def test_readout_with_an_offset_shrinks_towards_the_prior_not_towards_a_constant():
    from model.training.readout import TapKernel, fit_ridge

    rng = np.random.default_rng(2)
    x = rng.normal(size=(50, 8)).astype(np.float32)
    prior = x[:, :4].astype(np.float64) @ rng.normal(size=4)
    y = prior + 0.5 * x[:, 5] + 0.05 * rng.normal(size=50)
    kernel = TapKernel(x, [8], np.ones(1))
    heavy = fit_ridge(kernel, y, np.arange(50), alphas=[1e9], offset=prior)
    np.testing.assert_allclose(x @ heavy.weight + heavy.bias + prior, prior + (y - prior).mean(), atol=1e-6)
    light = fit_ridge(kernel, y, np.arange(50), alphas=[1e-3], offset=prior)
    assert np.abs(x @ light.weight + light.bias + prior - y).max() < 0.2  # the correction is learned
