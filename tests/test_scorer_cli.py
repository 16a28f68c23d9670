"""The batch scorer and `resmemnet score` / `resmemnet info` on real files."""
import csv
import json

import pytest

from app.cli import main
from model.scoring import Scorer, collect_inputs
from tests.conftest import make_image


@pytest.fixture
def mixed_folder(tmp_path):
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    make_image(folder / "a.jpg", size=(120, 90), seed=1)
    make_image(folder / "nested" / "b.png", size=(90, 120), fmt="PNG", seed=2)
    make_image(folder / "c.webp", size=(200, 50), fmt="WEBP", seed=3)
    (folder / "corrupt.jpg").write_bytes(make_image(size=(120, 90), seed=4)[:200])
    (folder / "notes.txt").write_text("not an image")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / ".hidden").write_text("skipped: hidden")
    return folder


def test_collect_walks_folders_and_reports_missing(mixed_folder, tmp_path):
    files, missing = collect_inputs([mixed_folder, tmp_path / "nope.jpg"])
    assert len(files) == 6 and not any(".hidden" in f for f in files)
    assert missing == [str(tmp_path / "nope.jpg")]


def test_score_folder_mixing_good_corrupt_and_non_images(mixed_folder, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "scores.csv"
    code = main(["score", str(mixed_folder), "--weights", str(tiny_checkpoint), "--out", str(out), "--batch-size", "2"])
    assert code == 1  # some inputs failed, the others were still scored
    rows = {r["path"].split("photos/")[1]: r for r in csv.DictReader(out.open())}
    assert set(rows) == {"a.jpg", "nested/b.png", "c.webp", "corrupt.jpg", "notes.txt", "empty.jpg"}
    for good in ("a.jpg", "nested/b.png", "c.webp"):
        assert 0.0 <= float(rows[good]["score"]) <= 1.0 and not rows[good]["error"]
    assert rows["a.jpg"]["width"] == "120" and rows["a.jpg"]["height"] == "90"
    assert rows["corrupt.jpg"]["reason"] == "corrupt" and rows["notes.txt"]["reason"] == "not_an_image"
    assert rows["empty.jpg"]["reason"] == "empty"
    assert "3 failed" in capsys.readouterr().err


def test_json_output_and_success_exit(tmp_path, tiny_checkpoint):
    img = tmp_path / "one.jpg"
    make_image(img)
    out = tmp_path / "s.json"
    assert main(["score", str(img), "--weights", str(tiny_checkpoint), "--out", str(out)]) == 0
    records = json.loads(out.read_text())
    assert len(records) == 1 and records[0]["error"] is None and 0 <= records[0]["score"] <= 1


def test_scores_do_not_depend_on_batch_or_company(tmp_path, tiny_checkpoint):
    paths = []
    for i, size in enumerate([(120, 90), (90, 120), (64, 64), (300, 100), (120, 90), (121, 91)]):
        paths.append(str(tmp_path / f"{i}.png"))
        make_image(paths[-1], size=size, fmt="PNG", seed=i)
    scorer = Scorer.from_checkpoint(tiny_checkpoint, device="cpu")
    together = [r.score for r in scorer.score_paths(paths, batch_size=8)]
    alone = [next(scorer.score_paths([p], batch_size=1)).score for p in paths]
    assert together == pytest.approx(alone, abs=1e-4)


def test_precision_follows_the_cpu_and_fp32_is_a_choice(tmp_path, tiny_checkpoint, monkeypatch):
    import torch

    from model import devices

    monkeypatch.delenv("RESMEMNET_PRECISION", raising=False)  # "auto": what the CPU has decides
    assert Scorer.from_checkpoint(tiny_checkpoint, device="cpu", mixed_precision=False).autocast_dtype is None
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)  # e.g. an AVX2-only CPU: bf16 is emulated
    assert Scorer.from_checkpoint(tiny_checkpoint, device="cpu").autocast_dtype is None
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    mixed = Scorer.from_checkpoint(tiny_checkpoint, device="cpu")
    fp32 = Scorer.from_checkpoint(tiny_checkpoint, device="cpu", mixed_precision=False)
    assert mixed.autocast_dtype == torch.bfloat16 and mixed.mixed_precision
    images = torch.rand(4, 3, 64, 96)
    assert torch.allclose(mixed.score_tensor_batch(images), fp32.score_tensor_batch(images), atol=1e-2)
    img = tmp_path / "one.jpg"
    make_image(img)
    for flags in ([], ["--fp32"]):
        out = tmp_path / "s.json"
        assert main(["score", str(img), "--weights", str(tiny_checkpoint), "--out", str(out), *flags]) == 0
        assert 0 <= json.loads(out.read_text())[0]["score"] <= 1


@pytest.mark.parametrize("argv,message", [
    (["score", "x.jpg", "--out", "scores.xlsx"], "--out must end in .csv or .json"),
    (["score", "{tmp}", "--weights", "{tmp}/missing.json"], "not found"),
])
def test_usage_errors_exit_2_with_a_message(argv, message, tmp_path, capsys):
    make_image(tmp_path / "x.jpg")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        code = main(argv)
        raise SystemExit(code)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_batch_size_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "x.jpg", "--batch-size", "0"])
    assert exit_info.value.code == 2


def test_info_prints_parameters_and_metadata(tiny_checkpoint, capsys):
    assert main(["info", "--weights", str(tiny_checkpoint), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"]["total"] == 25_606_081 and info["architecture"]["backbone"] == "resnet50"
    assert main(["info", "--weights", str(tiny_checkpoint)]) == 0
    assert "parameters  25,606,081 (trunk " in capsys.readouterr().out


# -- symlinked sub-folders are followed, loops walked once --------------------------------------
def test_collect_inputs_follows_symlinked_folders_without_looping(tmp_path):
    import os

    from model.scoring import collect_inputs

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    make_image(elsewhere / "linked.jpg")
    top = tmp_path / "top"
    (top / "sub").mkdir(parents=True)
    make_image(top / "a.jpg")
    make_image(top / "sub" / "b.jpg")
    os.symlink(elsewhere, top / "link")
    os.symlink(top, top / "sub" / "loop")  # a loop back to the top
    files, problems = collect_inputs([top])
    assert problems == []
    assert files == [str(top / "a.jpg"), str(top / "link" / "linked.jpg"), str(top / "sub" / "b.jpg")]


def test_score_cli_scores_files_in_symlinked_folders(tiny_checkpoint, tmp_path, one_torch_thread):
    import csv
    import os

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    make_image(elsewhere / "linked.jpg")
    top = tmp_path / "top"
    top.mkdir()
    os.symlink(elsewhere, top / "link")
    out = tmp_path / "scores.csv"
    assert main(["score", str(top), "--weights", str(tiny_checkpoint), "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["path"] for r in rows] == [str(top / "link" / "linked.jpg")] and rows[0]["score"]
