"""`resmemnet adapt` end to end, in-process: a tiny gated readout checkpoint, 60 generated photos
whose scores follow their brightness, a new profile fitted and written; the CV table; every bad
input stops with one message, exit status 2 and nothing written."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from app.cli import main

N = 60


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    """A random ResNet-50 at 64 px with a gated readout head (labelled, teacher, domain) and
    reference quantiles for its profiles, like tests/test_profiles.py's."""
    from model.checkpoint import CheckpointMeta, save_checkpoint
    from model.network import build_resmemnet
    from model.preprocess import Preprocessing, ResizePolicy
    from model.trunks import TrunkSource

    torch.manual_seed(3)
    model = build_resmemnet(backbone="resnet50", head="readout", teacher_output=True, score_blend=0.7,
                            domain_gate=True)
    with torch.no_grad():
        model.head.out.weight.mul_(0.1)
        model.head.out.bias.copy_(torch.tensor([0.6, 0.4, 0.5]))
    reference = {"set": "test", "n": 101, "quantiles": np.linspace(0, 1, 101).round(6).tolist(),
                 "profiles": {"general": np.linspace(0.3, 0.7, 101).round(6).tolist()}}
    meta = CheckpointMeta(name="test-adapt", architecture=model.cfg, trunk=TrunkSource(kind="none", depth="resnet50"),
                          preprocessing=Preprocessing(resize=ResizePolicy(size=64, multiple=32),
                                                      input_scaling="imagenet"),
                          trunk_embedded=True, reference=reference, license="test only")
    return save_checkpoint(model, meta, tmp_path_factory.mktemp("base") / "base.json", embed_trunk=True)


def write_photos(folder, n=N, seed=0):
    """n small photos (textures of varied brightness) and scores.csv: score = brightness + noise."""
    rng = np.random.default_rng(seed)
    (folder / "img").mkdir(parents=True)
    rows = []
    for i in range(n):
        level = rng.uniform(0.1, 0.9)
        arr = np.clip(rng.normal(level * 255, 40, size=(48, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / "img" / f"{i:02d}.jpg", quality=90)
        rows.append((f"img/{i:02d}.jpg", f"{np.clip(level + rng.normal(0, 0.05), 0, 1):.4f}"))
    write_csv(folder / "scores.csv", rows)
    return rows


def write_csv(path, rows, header=("path", "score")):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    folder = tmp_path_factory.mktemp("labelled")
    return folder, write_photos(folder)


def adapt(*args):
    return main(["adapt", *map(str, args), "--no-resmem"])


@pytest.fixture(scope="module")
def adapted(base_checkpoint, labelled, tmp_path_factory, one_torch_thread):
    out = tmp_path_factory.mktemp("out") / "mine.json"
    cache = tmp_path_factory.mktemp("cache")
    import io
    from contextlib import redirect_stderr, redirect_stdout

    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        code = adapt(labelled[0], "--name", "mine", "--out", out, "--weights", base_checkpoint,
                     "--cache-dir", cache)
    assert code == 0, stderr.getvalue()
    return out, cache, stdout.getvalue(), stderr.getvalue()


def test_adapt_writes_a_checkpoint_that_scores_the_new_profile(adapted, base_checkpoint, labelled):
    from model.checkpoint import read_meta
    from model.scoring import Scorer

    out, *_ = adapted
    base = Scorer.from_checkpoint(base_checkpoint, device="cpu", mixed_precision=False, backend="torch")
    new = Scorer.from_checkpoint(out, device="cpu", mixed_precision=False, backend="torch")
    assert new.profiles == (*base.profiles, "mine")
    photos = [str(labelled[0] / p) for p, _ in labelled[1][:8]]
    for profile in base.profiles:  # every shipped profile scores exactly as before
        old = [r.score for r in base.score_paths(photos, profile=profile)]
        assert [r.score for r in new.score_paths(photos, profile=profile)] == pytest.approx(old, abs=1e-5)
    rows = list(new.score_paths(photos, profile="mine"))
    assert all(r.ok and 0 < r.score < 1 and r.percentile is not None for r in rows)
    meta = read_meta(out)
    assert len(meta.reference["profiles"]["mine"]) == 101
    assert meta.reference["sets"]["mine"]["n"] == N
    adapt_info = meta.provenance["adapt"]
    assert adapt_info["n_photos"] == N and len(adapt_info["labels_sha256"]) == 64
    assert set(meta.metrics["adapt"]["spearman"]) >= {"mine", "default", "general"}


def test_adapt_learns_the_labels_ranking(adapted, labelled):
    """Scores that follow brightness are learnable from the trunk's taps: the new profile ranks the
    photos it was fitted on in their labels' order far better than chance."""
    from model.scoring import Scorer
    from model.training.metrics import spearman

    out, *_ = adapted
    new = Scorer.from_checkpoint(out, device="cpu", mixed_precision=False, backend="torch")
    photos = [str(labelled[0] / p) for p, _ in labelled[1]]
    scores = [r.score for r in new.score_paths(photos, profile="mine")]
    assert spearman(np.array(scores), np.array([float(s) for _, s in labelled[1]])) > 0.5


def test_adapt_prints_the_cv_table_and_a_verdict(adapted):
    _, _, stdout, _ = adapted
    assert "5-fold CV Spearman rho on 60 labelled photos" in stdout
    for profile in ("mine", "default", "general", "outdoor"):
        assert any(line.split()[:1] == [profile] for line in stdout.splitlines()), stdout
    assert "ranks these photos better" in stdout or "does NOT beat" in stdout


def test_a_second_run_reuses_the_cached_features(adapted, base_checkpoint, labelled, tmp_path, capsys):
    out, cache, *_ = adapted
    files = sorted(cache.glob("*.npy"))
    assert len(files) == 1
    code = adapt(labelled[0] / "scores.csv", "--name", "again", "--out", tmp_path / "again.json",
                 "--weights", base_checkpoint, "--cache-dir", cache)
    assert code == 0
    assert sorted(cache.glob("*.npy")) == files
    assert "img/s" not in capsys.readouterr().err  # no extraction ran (it reports its rate)


def test_adapting_an_adapted_checkpoint_adds_another_profile(adapted, labelled, tmp_path, capsys):
    from model.checkpoint import read_meta
    from model.network import available_profiles

    out, cache, *_ = adapted
    assert adapt(labelled[0], "--name", "second", "--out", tmp_path / "two.json", "--weights", out,
                 "--cache-dir", cache) == 0
    meta = read_meta(tmp_path / "two.json")
    assert available_profiles(meta.architecture)[-2:] == ("mine", "second")
    assert meta.metrics["adapt"]["profile"] == "second"  # the first adaptation's records are kept beside
    assert [m["profile"] for m in meta.metrics["adapt_earlier"]] == ["mine"]
    assert meta.training["adapt_earlier"][0]["profile"] == "mine"
    assert meta.provenance["adapt_earlier"][0]["labels_sha256"] == meta.provenance["adapt"]["labels_sha256"]
    capsys.readouterr()
    assert main(["info", "--weights", str(tmp_path / "two.json")]) == 0
    adapted_rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("adapted ")]
    assert len(adapted_rows) == 2 and "mine:" in adapted_rows[0] and "second:" in adapted_rows[1]


def test_info_and_score_see_the_new_profile(adapted, labelled, tmp_path, capsys):
    out, *_ = adapted
    assert main(["info", "--weights", str(out)]) == 0
    assert "mine" in capsys.readouterr().out
    photo = str(labelled[0] / labelled[1][0][0])
    assert main(["score", "--weights", str(out), "--profile", "mine", "--device", "cpu", "--out",
                 str(tmp_path / "s.json"), photo]) == 0
    rows = json.loads((tmp_path / "s.json").read_text())
    assert rows[0]["profile"] == "mine" and 0 < rows[0]["score"] < 1 and rows[0]["percentile"] is not None


def test_service_serves_the_new_profile(adapted, labelled, monkeypatch):
    from conftest import serving

    out, *_ = adapted
    monkeypatch.setenv("RESMEMNET_WEIGHTS", str(out))
    photo = (labelled[0] / labelled[1][0][0]).read_bytes()
    with serving(device="cpu") as client:
        r = client.post("/score?profile=mine", files={"file": ("a.jpg", photo, "image/jpeg")})
        assert r.status_code == 200, r.text
        assert r.json()["profile"] == "mine"
        assert "mine" in [p["name"] for p in client.get("/readyz").json()["profiles"]]


# -- bad input: one message, exit status 2, nothing written --------------------------------------
def bad_labels(tmp_path, labelled, rows=None, text=None, data=None):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "img").symlink_to(labelled[0] / "img")
    if data is not None:
        (folder / "scores.csv").write_bytes(data)
    elif text is not None:
        (folder / "scores.csv").write_text(text)
    else:
        write_csv(folder / "scores.csv", rows)
    return folder / "scores.csv"


CASES = {
    "missing_csv": (lambda t, l: t / "nowhere.csv", "does not exist"),
    "folder_without_csv": (lambda t, l: t, "holds no scores.csv"),
    "no_columns": (lambda t, l: bad_labels(t, l, text="file,value\nimg/00.jpg,0.5\n"), "`path` and `score` columns"),
    "missing_photo": (lambda t, l: bad_labels(t, l, rows=l[1] + [("img/nope.jpg", "0.5")]), "do not exist"),
    "non_numeric": (lambda t, l: bad_labels(t, l, rows=l[1][:-1] + [(l[1][-1][0], "high")]), "not finite numbers"),
    "not_finite": (lambda t, l: bad_labels(t, l, rows=l[1][:-1] + [(l[1][-1][0], "nan")]), "not finite numbers"),
    "out_of_range": (lambda t, l: bad_labels(t, l, rows=l[1][:-1] + [(l[1][-1][0], "7")]), "outside [0, 1]"),
    "too_few": (lambda t, l: bad_labels(t, l, rows=l[1][:30]), "at least 50"),
    "duplicate": (lambda t, l: bad_labels(t, l, rows=l[1] + [l[1][0]]), "listed twice"),
    "constant": (lambda t, l: bad_labels(t, l, rows=[(p, "0.5") for p, _ in l[1]]), "no ranking to learn"),
    "empty_score": (lambda t, l: bad_labels(t, l, rows=l[1][:-1] + [(l[1][-1][0], "")]), "not finite numbers"),
    "negative": (lambda t, l: bad_labels(t, l, rows=l[1][:-1] + [(l[1][-1][0], "-0.1")]), "outside [0, 1]"),
    "percent": (lambda t, l: bad_labels(t, l, rows=[(p, f"{float(v) * 100:.1f}") for p, v in l[1]]),
                "outside [0, 1]"),
    "no_path": (lambda t, l: bad_labels(t, l, rows=l[1] + [("", "0.5")]), "have no path"),
    "duplicate_spelled_differently": (lambda t, l: bad_labels(t, l, rows=l[1] + [("img/../img/" + l[1][0][0][4:],
                                                                                   "0.5")]), "listed twice"),
    "header_only": (lambda t, l: bad_labels(t, l, text="path,score\n"), "has 0 photos"),
    "empty_file": (lambda t, l: bad_labels(t, l, text=""), "`path` and `score` columns"),
    "not_utf8": (lambda t, l: bad_labels(t, l, data="path,score\nimg/\xe9t\xe9.jpg,0.5\n".encode("latin-1")),
                 "not a UTF-8 CSV"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_labels_exit_2_with_one_message_and_write_nothing(case, base_checkpoint, labelled, tmp_path, capsys):
    make, message = CASES[case]
    labels = make(tmp_path, labelled)
    out = tmp_path / "out" / "x.json"
    out.parent.mkdir()
    assert adapt(labels, "--name", "mine", "--out", out, "--weights", base_checkpoint,
                 "--cache-dir", tmp_path / "cache") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("resmemnet: error:") and message in err[0], err
    assert list(out.parent.iterdir()) == [] and not (tmp_path / "cache").exists()


def test_an_unreadable_photo_exits_2_naming_it(base_checkpoint, labelled, tmp_path, capsys):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "img").symlink_to(labelled[0] / "img")
    (folder / "junk.jpg").write_bytes(b"not an image at all")
    write_csv(folder / "scores.csv", labelled[1] + [("junk.jpg", "0.5")])
    out = tmp_path / "x.json"
    assert adapt(folder, "--name", "mine", "--out", out, "--weights", base_checkpoint,
                 "--cache-dir", tmp_path / "cache") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not usable images" in err[0] and "junk.jpg" in err[0]
    assert not out.exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("name, message", [("default", "already has"), ("general", "already has"),
                                           ("teacher", "already has"), ("Bad Name", "a profile name is"),
                                           ("", "a profile name is")])
def test_a_name_that_clashes_or_is_invalid_exits_2(name, message, base_checkpoint, labelled, tmp_path, capsys):
    out = tmp_path / "x.json"
    assert adapt(labelled[0], "--name", name, "--out", out, "--weights", base_checkpoint,
                 "--cache-dir", tmp_path / "cache") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_an_existing_out_file_is_not_overwritten_without_force(base_checkpoint, labelled, tmp_path, capsys):
    out = tmp_path / "x.json"
    out.write_text("{}")
    assert adapt(labelled[0], "--name", "mine", "--out", out, "--weights", base_checkpoint) == 2
    assert "exists" in capsys.readouterr().err and out.read_text() == "{}"


def test_a_checkpoint_without_a_teacher_output_cannot_be_adapted(tiny_checkpoint, labelled, tmp_path, capsys):
    assert adapt(labelled[0], "--name", "mine", "--out", tmp_path / "x.json", "--weights", tiny_checkpoint) == 2
    assert "teacher output" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_metadata_records_the_labels_hash(adapted, labelled):
    import hashlib

    out, *_ = adapted
    meta = json.loads(out.read_text())
    assert meta["provenance"]["adapt"]["labels_sha256"] == hashlib.sha256(
        (labelled[0] / "scores.csv").read_bytes()).hexdigest()


def test_export_of_an_adapted_checkpoint_outputs_the_new_profile(adapted, labelled, tmp_path, private_cache):
    """The ONNX export of an adapted checkpoint has a `profile_scores` column for NAME that equals
    the torch model's score (fp32)."""
    import onnxruntime as ort

    from model.scoring import Scorer

    out, *_ = adapted
    onnx_file = tmp_path / "m.onnx"
    assert main(["export", "--format", "onnx", "--out", str(onnx_file), "--weights", str(out)]) == 0
    names = json.loads(onnx_file.with_suffix(".json").read_text())["onnx"]["profile_output"]["profiles"]
    assert names[-1] == "mine"
    scorer = Scorer.from_checkpoint(out, device="cpu", mixed_precision=False, backend="torch")
    photos = [str(labelled[0] / p) for p, _ in labelled[1][:4]]
    batch = torch.stack([scorer.prepare(p).tensor for p in photos])
    got = ort.InferenceSession(str(onnx_file)).run(["profile_scores"], {"image": batch.numpy()})[0]
    assert got[:, names.index("mine")] == pytest.approx(scorer.score_tensors(list(batch), profile="mine"), abs=1e-4)


@pytest.mark.parametrize("out, message", [("x.txt", "must end in .json"), ("missing/x.json", "does not exist"),
                                          ("BASE", "the checkpoint being adapted")])
def test_a_bad_out_path_exits_2_and_writes_nothing(out, message, base_checkpoint, labelled, tmp_path, capsys):
    target = base_checkpoint if out == "BASE" else tmp_path / out
    before = sorted(tmp_path.rglob("*")), base_checkpoint.read_bytes()
    assert adapt(labelled[0], "--name", "mine", "--out", target, "--weights", base_checkpoint,
                 "--cache-dir", tmp_path / "cache") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("resmemnet: error:") and message in err[0], err
    assert (sorted(tmp_path.rglob("*")), base_checkpoint.read_bytes()) == before


@pytest.mark.parametrize("folds", ["1", "7"])
def test_folds_that_leave_too_few_test_photos_exit_2(folds, base_checkpoint, labelled, tmp_path, capsys):
    """60 photos: 2 to 6 folds (at least 10 test photos in each)."""
    assert adapt(labelled[0], "--name", "mine", "--out", tmp_path / "x.json", "--weights", base_checkpoint,
                 "--cache-dir", tmp_path / "cache", "--folds", folds) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2 to 6 folds" in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_a_negative_seed_is_a_usage_error(base_checkpoint, labelled, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        adapt(labelled[0], "--name", "mine", "--out", tmp_path / "x.json", "--weights", base_checkpoint,
              "--seed", "-1")
    assert exc.value.code == 2 and "--seed" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["1.5", "-0.1", "half"])
def test_a_blend_outside_0_to_1_is_a_usage_error(value, base_checkpoint, labelled, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        adapt(labelled[0], "--name", "mine", "--out", tmp_path / "x.json", "--weights", base_checkpoint,
              "--blend", value)
    assert exc.value.code == 2 and "--blend" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_blend_is_half_by_default_or_chosen_by_inner_cv(adapted, labelled, base_checkpoint, tmp_path):
    out, cache, *_ = adapted
    assert json.loads(out.read_text())["training"]["adapt"]["blend"] == 0.5
    auto = tmp_path / "auto.json"
    assert adapt(labelled[0], "--name", "mine", "--out", auto, "--weights", base_checkpoint, "--cache-dir", cache,
                 "--blend", "auto") == 0
    info = json.loads(auto.read_text())["training"]["adapt"]
    assert len(info["blend_grid"]) == 21 and info["blend"] in info["blend_grid"]
