"""What a user of the command line meets: `score` keeps input order and writes plain CSV with
percentile and warnings columns, `info` is a short summary without the build machine's paths,
and the Makefile's everyday targets do what docs/cli.md says."""
from __future__ import annotations

import csv
import io
import json
import subprocess
from pathlib import Path

import pytest

from app.cli import main
from app.cli.info import scrub_paths
from conftest import make_image

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def inputs(tmp_path):
    """good, missing, good, corrupt, good: errors sit between good files on purpose."""
    make_image(tmp_path / "1.jpg", seed=1)
    make_image(tmp_path / "3.png", fmt="PNG", seed=3)
    (tmp_path / "4.jpg").write_bytes(make_image(seed=4)[:150])
    make_image(tmp_path / "5.jpg", seed=5)
    return [str(tmp_path / n) for n in ("1.jpg", "2-missing.jpg", "3.png", "4.jpg", "5.jpg")]


def test_score_rows_follow_input_order_with_errors_in_place(inputs, tiny_checkpoint, tmp_path):
    out = tmp_path / "scores.csv"
    code = main(["score", *inputs, "--weights", str(tiny_checkpoint), "--out", str(out), "--batch-size", "2",
                 "--no-progress"])
    assert code == 1
    rows = list(csv.DictReader(out.open(newline="")))
    assert [r["path"] for r in rows] == inputs
    assert [r["reason"] for r in rows] == ["", "not_found", "", "corrupt", ""]
    assert all(0 <= float(rows[i]["score"]) <= 1 for i in (0, 2, 4))


def test_folders_expand_in_place(tmp_path, tiny_checkpoint):
    folder = tmp_path / "dir"
    folder.mkdir()
    for name in ("b.jpg", "a.jpg"):
        make_image(folder / name)
    make_image(tmp_path / "first.jpg")
    make_image(tmp_path / "last.jpg")
    out = tmp_path / "s.json"
    argv = [str(tmp_path / "first.jpg"), str(folder), str(tmp_path / "last.jpg")]
    assert main(["score", *argv, "--weights", str(tiny_checkpoint), "--out", str(out)]) == 0
    names = [Path(r["path"]).name for r in json.loads(out.read_text())]
    assert names == ["first.jpg", "a.jpg", "b.jpg", "last.jpg"]


def test_csv_has_plain_newlines_and_the_contract_columns(inputs, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "scores.csv"
    main(["score", *inputs, "--weights", str(tiny_checkpoint), "--out", str(out)])
    data = out.read_bytes()
    assert b"\r" not in data and data.endswith(b"\n")
    header = data.split(b"\n")[0].decode()
    assert header == "path,score,percentile,warnings,width,height,error,reason"
    # stdout gets the same plain CSV
    capsys.readouterr()
    main(["score", inputs[0], "--weights", str(tiny_checkpoint)])
    printed = capsys.readouterr().out
    assert "\r" not in printed and printed.splitlines()[0] == header


def test_percentile_and_warnings_reach_csv_and_json(tmp_path, tiny_checkpoint, monkeypatch):
    """Whatever the scorer reports (percentile, warning codes) is written: ';'-joined in CSV, a list in JSON."""
    from model import scoring

    real = scoring.Scorer.score_paths

    def with_extras(self, paths, **kwargs):
        for row in real(self, paths, **kwargs):
            if row.ok:
                row.percentile, row.warnings = 42.5, ["flat", "low_resolution"]
            yield row

    monkeypatch.setattr(scoring.Scorer, "score_paths", with_extras)
    make_image(tmp_path / "a.jpg")
    csv_out, json_out = tmp_path / "s.csv", tmp_path / "s.json"
    for out in (csv_out, json_out):
        assert main(["score", str(tmp_path / "a.jpg"), str(tmp_path / "gone.jpg"), "--weights", str(tiny_checkpoint),
                     "--out", str(out)]) == 1
    good, missing = list(csv.DictReader(csv_out.open(newline="")))
    assert good["percentile"] == "42.5" and good["warnings"] == "flat;low_resolution"
    assert missing["percentile"] == "" and missing["warnings"] == ""
    good, missing = json.loads(json_out.read_text())
    assert good["percentile"] == 42.5 and good["warnings"] == ["flat", "low_resolution"]
    assert missing["percentile"] is None and missing["warnings"] == []


def test_out_into_a_missing_folder_is_a_usage_error(tmp_path, tiny_checkpoint, capsys):
    make_image(tmp_path / "a.jpg")
    code = main(["score", str(tmp_path / "a.jpg"), "--weights", str(tiny_checkpoint),
                 "--out", str(tmp_path / "no" / "such" / "s.csv")])
    assert code == 2 and "does not exist" in capsys.readouterr().err


@pytest.fixture
def checkpoint_with_machine_paths(tiny_checkpoint, tmp_path):
    """A copy of the test checkpoint whose metadata names folders of the machine that trained it."""
    import shutil

    meta = json.loads(tiny_checkpoint.read_text())
    meta["provenance"] = {"command": "resmemnet train --cv-results /home/alice/exp4/cv/cv.json --out /srv/runs/final",
                          "git_commit": "0123456789abcdef", "git_dirty": False, "date": "2026-11-27T10:59:34+00:00"}
    meta["metrics"] = {"cross_validation": {"run_dir": "/home/alice/exp4/cv", "dataset": "lnsim",
                                            "mean": {"spearman": 0.5, "pearson": 0.4, "mse": 0.01},
                                            "std": {"spearman": 0.02}, "splits": [{}, {}]}}
    meta["intended_use"] = "testing; see https://example.org/a/b for the details"
    folder = tmp_path / "ckpt"
    folder.mkdir()
    shutil.copy(tiny_checkpoint.with_suffix(".safetensors"), folder)
    path = folder / tiny_checkpoint.name
    path.write_text(json.dumps(meta))
    return path


def test_info_is_a_short_summary_without_machine_paths(checkpoint_with_machine_paths, capsys):
    assert main(["info", "--weights", str(checkpoint_with_machine_paths)]) == 0
    text = capsys.readouterr().out
    assert len(text.splitlines()) < 30
    assert "/home/alice" not in text and "/srv/" not in text
    from importlib.metadata import version

    for label in ("parameters  25,606,081", "results", "2-fold CV on lnsim: Spearman 0.500 ± 0.020",
                  f"software    resmemnet {version('resmemnet')}, torch ", "resmemnet info --json"):
        assert label in text


def test_info_json_has_everything_but_machine_paths(checkpoint_with_machine_paths, capsys):
    assert main(["info", "--weights", str(checkpoint_with_machine_paths), "--json"]) == 0
    printed = capsys.readouterr().out
    info = json.loads(printed)
    assert "/home/alice" not in printed and "/srv/" not in printed
    assert info["provenance"]["command"] == "resmemnet train --cv-results .../cv.json --out .../final"
    assert info["metrics"]["cross_validation"]["run_dir"] == ".../cv"
    assert info["intended_use"] == "testing; see https://example.org/a/b for the details"  # kept, URL untouched
    assert info["parameters"]["total"] == 25_606_081
    from importlib.metadata import version

    assert info["software"]["resmemnet"] == version("resmemnet")  # the one version: the package's metadata


def test_parameter_counts_from_the_tensor_file_match_the_built_models(tiny_checkpoint):
    """info counts parameters from the tensor file's header; the models built in torch agree."""
    from app.cli.info import BRANCH_PARAMETERS, TRUNK_PARAMETERS, parameter_counts
    from model.checkpoint import read_meta
    from model.environment import SHIPPED_WEIGHTS
    from model.network import ResMemNet, build_resmemnet, count_parameters

    for backbone, n in TRUNK_PARAMETERS.items():
        assert count_parameters(build_resmemnet(backbone=backbone).trunk) == n
    from model.memory_branch import MemoryBranch

    assert count_parameters(MemoryBranch()) == BRANCH_PARAMETERS["resmem"]
    # an embedded trunk and LSTM head; a package trunk, its memory branch and a readout head
    for path in (tiny_checkpoint, SHIPPED_WEIGHTS):
        meta = read_meta(path)
        model = ResMemNet(meta.architecture)
        branch = {"branch": count_parameters(model.branch)} if model.branch is not None else {}
        assert parameter_counts(meta, Path(path).parent / meta.tensors_file) == {
            "total": count_parameters(model), "head": count_parameters(model.head), "trunk": count_parameters(model.trunk),
            **branch}
    assert "branch" in parameter_counts(read_meta(SHIPPED_WEIGHTS), SHIPPED_WEIGHTS.with_suffix(".safetensors"))


@pytest.mark.parametrize("text,expected", [
    ("/work/exp4/ship_cv2", ".../ship_cv2"),
    ("cp /a/b/c.json ../shared/data/x", "cp .../c.json ../shared/data/x"),
    ("https://example.org/x/y", "https://example.org/x/y"),
    ("relative/path and ~/home", "relative/path and ~/home"),
    ("'C:\\runs\\final'", "'.../final'"),
    ("score = 0.7 x a + 0.3 x b", "score = 0.7 x a + 0.3 x b"),
])
def test_scrub_paths(text, expected):
    assert scrub_paths({"k": [text]}) == {"k": [expected]}


def test_info_on_a_missing_checkpoint_is_one_error_line(tmp_path, capsys):
    assert main(["info", "--weights", str(tmp_path / "none.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("resmemnet: error:") and len(err.splitlines()) == 1


def make_dry_run(*args: str) -> list[str]:
    """The commands `make -n TARGET` would run (setup's steps excluded)."""
    r = subprocess.run(["make", "-n", "-C", str(REPO), *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [line for line in r.stdout.splitlines() if "pip install" not in line and "-m venv" not in line
            and not line.startswith("touch")]


@pytest.mark.process  # make -n
def test_make_serve_binds_loopback_unless_told():
    assert any("resmemnet serve --host 127.0.0.1 --port 8000" in c for c in make_dry_run("serve"))
    assert any("--host 0.0.0.0" in c for c in make_dry_run("serve", "HOST=0.0.0.0"))


@pytest.mark.process
def test_make_score_writes_where_the_user_says(tmp_path):
    commands = make_dry_run("score", "IMAGES=photos/ one.jpg", f"OUT={tmp_path}/s.csv")
    assert any(c.endswith(f"resmemnet score photos/ one.jpg --out {tmp_path}/s.csv") for c in commands)
    (plain,) = [c for c in make_dry_run("score", "IMAGES=one.jpg") if "resmemnet score" in c]
    assert plain.rstrip().endswith("resmemnet score one.jpg")  # CSV on stdout: no file appears in the repository
    profiled = " ".join(make_dry_run("score", "IMAGES=one.jpg", "PROFILE=general"))
    assert "resmemnet score one.jpg --profile general" in profiled


@pytest.mark.process
def test_make_bench_runs_the_quick_benchmarks():
    commands = " ".join(make_dry_run("bench"))
    assert "bench/bench_scorer.py" in commands and "bench/bench_heatmap.py" in commands


def test_dockerignore_keeps_the_build_context_small():
    ignored = {line.strip().rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", ".git", "runs"} <= ignored or "*" in ignored  # "*": only what the image needs goes in


def test_one_python_version():
    import re

    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'requires-python = ">=3.11"' in pyproject
    assert re.search(r"python3?\.?11|PYTHON_VERSION=3\.11", (REPO / "Dockerfile").read_text())
    assert "Python 3.11" in (REPO / "README.md").read_text()
