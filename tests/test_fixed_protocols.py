"""research/fixed_protocols.py: a fixed model scored by a CV run's protocols (tiny synthetic studies
of test_training_studies.py, random ResNet-50 trunk)."""
from __future__ import annotations

import csv
import json

from pathlib import Path

import numpy as np
import pytest

from model.training.train import main as train_main
from research.fixed_protocols import main as fixed_main
from test_training_studies import cv_run, two_study_config, ws  # noqa: F401  (the module-scoped photos and run)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def final_checkpoint(ws, tmp_path_factory):  # noqa: F811
    run = tmp_path_factory.mktemp("final") / "final"
    assert train_main(["--config", str(two_study_config(ws["root"] / "final.toml", ws)), "--out", str(run)]) == 0
    return run / "tiny.json"


def test_a_checkpoint_scored_from_the_cache_ranks_as_the_scorer_does(cv_run, final_checkpoint, ws, tmp_path):  # noqa: F811
    from model.scoring import Scorer

    out = tmp_path / "fixed.json"
    assert fixed_main(["--cv", str(cv_run), "--weights", str(final_checkpoint), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    default = report[f"{final_checkpoint}:default"]
    assert set(report) >= {f"{final_checkpoint}:{p}" for p in ("default", "lnsim", "cdm", "general")}
    plan = json.loads((cv_run / "splits.json").read_text())
    assert len(default["cdm"]["folds"]) == len(plan["studies"]["cdm"]["folds"]) == 3
    assert default["lnsim"]["trained_on"] and default["cdm"]["trained_on"]  # the final model saw both
    assert default["teacher_holdout"]["n"] == len(plan["teacher"]["holdout"])
    # the whole-study rho equals the batch scorer's (fp32) on the same photos, up to float16 features
    from model.training.metrics import spearman

    rows = list(csv.DictReader(open(ws["cdm"], newline="")))
    paths = [str(ws["cdm"].parent / r["path"]) for r in rows]
    scorer = Scorer.from_checkpoint(final_checkpoint, backend="torch", device="cpu", mixed_precision=False)
    pred = np.array([r.score for r in scorer.score_paths(paths, batch_size=8)])
    truth = np.array([float(r["score"]) for r in rows])
    assert default["cdm"]["whole"] == pytest.approx(spearman(pred, truth), abs=0.02)


def test_per_photo_scores_of_another_model(cv_run, ws, tmp_path):  # noqa: F811
    """A CSV of the human scores themselves (one photo left out) ranks every fold perfectly."""
    rows = list(csv.DictReader(open(ws["cdm"], newline="")))
    scores = tmp_path / "cdm_scores.csv"
    with scores.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "truth", "other"])
        for r in rows[1:]:
            w.writerow([r["path"], "", r["score"]])
    out = tmp_path / "r.json"
    assert fixed_main(["--cv", str(cv_run), "--scores", f"other={scores}", "--json", str(out)]) == 0
    r = json.loads(out.read_text())["other"]
    assert r["cdm"]["n"] == len(rows) - 1 and r["cdm"]["whole"] == pytest.approx(1.0)
    assert r["cdm"]["folds"] == pytest.approx([1.0, 1.0, 1.0]) and not r["cdm"]["trained_on"]
    assert r["lnsim"]["n"] == 0 and r["lnsim"]["whole"] is None and r["teacher_holdout"]["spearman"] is None


def test_bad_arguments_exit_2(tmp_path, capsys):
    assert fixed_main(["--cv", str(tmp_path)]) == 2
    assert "not a CV run folder" in capsys.readouterr().err


def test_a_missing_cache_leaves_its_photos_unscored_and_is_never_built(cv_run, final_checkpoint, tmp_path):  # noqa: F811
    import re
    import shutil

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(cv_run / "splits.json", run / "splits.json")
    text = (cv_run / "config.toml").read_text()
    cache = Path(re.search(r'cache_dir = "([^"]+)"', text).group(1))
    only_cdm = tmp_path / "cache"
    only_cdm.mkdir()
    for f in cache.glob("cdm-*"):
        shutil.copy(f, only_cdm / f.name)
    (run / "config.toml").write_text(text.replace(f'cache_dir = "{cache}"', f'cache_dir = "{only_cdm}"'))
    out = tmp_path / "r.json"
    assert fixed_main(["--cv", str(run), "--weights", str(final_checkpoint), "--json", str(out)]) == 0
    r = json.loads(out.read_text())[f"{final_checkpoint}:default"]
    assert r["cdm"]["n"] == 24 and r["lnsim"]["n"] == 0 and r["teacher_holdout"]["n"] == 0
    assert sorted(p.name.split("-")[0] for p in only_cdm.glob("*.npy")) == ["cdm"]  # nothing built


def test_the_ship_rule_needs_all_four_columns_higher_and_the_floor():
    from research.ship_rule import verdict

    old = {"lnsim_cv": 0.576, "cdm_cv": 0.160, "loso_lnsim": 0.493, "loso_cdm": 0.161}
    assert verdict({"lnsim_cv": 0.58, "cdm_cv": 0.3, "loso_lnsim": 0.5, "loso_cdm": 0.2}, old, 0.572) == (True, [])
    ok, reasons = verdict({"lnsim_cv": 0.58, "cdm_cv": 0.3, "loso_lnsim": 0.493, "loso_cdm": 0.2}, old, 0.572)
    assert not ok and reasons == ["loso_lnsim: 0.4930 is not above 0.4930"]  # equal is not higher
    ok, reasons = verdict({"lnsim_cv": 0.58, "cdm_cv": 0.3, "loso_lnsim": 0.5, "loso_cdm": 0.2}, old, 0.6)
    assert not ok and "below the floor" in reasons[0]


def test_the_ship_rule_reads_a_cv_run_and_todays_default(cv_run, final_checkpoint, tmp_path, capsys):  # noqa: F811
    from research.ship_rule import main as rule_main

    fixed = tmp_path / "fixed.json"
    old = tmp_path / "old.json"  # today's default stand-in: the tiny final model with a CV mean in its metadata
    meta = json.loads(final_checkpoint.read_text())
    meta["metrics"]["cross_validation"] = {"mean": {"spearman": -1.0}}
    old.write_text(json.dumps(meta))
    tensors = final_checkpoint.with_suffix(".safetensors")
    (tmp_path / tensors.name).write_bytes(tensors.read_bytes())  # the file its metadata names
    assert fixed_main(["--cv", str(cv_run), "--weights", str(old), "--json", str(fixed)]) == 0
    capsys.readouterr()
    code = rule_main(["--cv", str(cv_run), "--old", str(fixed), "--old-weights", str(old), "--floor", "-1"])
    out = capsys.readouterr().out
    summary = json.loads((cv_run / "cv.json").read_text())["summary"]
    assert f"{summary['loso']['cdm']['default']['spearman']:.4f}" in out.splitlines()[2]
    assert out.splitlines()[1].split()[2] == "-1.0000"  # today's LNSIM CV from its metadata
    assert (code == 0) == ("verdict: ship the candidate" in out) and code in (0, 1)
    assert rule_main(["--cv", str(tmp_path), "--old", str(fixed)]) == 2


def test_validate_calls_a_set_the_checkpoint_trained_on_a_training_set():
    """research.validate's note: cdm_dev is validation for the LNSIM-only checkpoint of 2026-12-02
    (tests/fixtures) and a training set for the shipped two-study one."""
    from pathlib import Path

    from model.checkpoint import read_meta
    from model.environment import SHIPPED_WEIGHTS
    from research.validate import training_note

    legacy = read_meta(Path(__file__).parent / "fixtures" / "legacy-gated-checkpoint.json")
    assert training_note(legacy, "cdm_dev", "validation") == "validation"
    shipped = read_meta(SHIPPED_WEIGHTS)
    assert training_note(shipped, "cdm_dev", "validation").startswith("TRAINING SET")
    assert training_note(shipped, "isola", "validation") == "validation"
