"""Backends: ONNX Runtime scores equal torch's fp32 scores, through the Scorer, the CLI and the
environment variable the service reads."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA, make_image
from model.engines import BackendError, check_backend
from model.scoring import Scorer

pytestmark = pytest.mark.usefixtures("one_torch_thread", "private_cache", "no_backend_setting")
TOLERANCE = 1e-3  # ONNX Runtime fp32 vs torch fp32


@pytest.fixture
def no_backend_setting(monkeypatch):
    monkeypatch.delenv("RESMEMNET_BACKEND", raising=False)


def test_backend_names_and_environment(monkeypatch):
    assert check_backend(None) == "torch"
    assert check_backend("ONNXRuntime") == "onnxruntime"
    monkeypatch.setenv("RESMEMNET_BACKEND", "onnxruntime")
    assert check_backend(None) == "onnxruntime"
    assert check_backend("torch") == "torch"  # an explicit choice wins over the variable
    monkeypatch.setenv("RESMEMNET_BACKEND", "tensorrt")
    with pytest.raises(BackendError, match="unknown backend 'tensorrt'"):
        check_backend(None)


def test_missing_engine_is_a_clear_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(BackendError, match="pip install"):
        check_backend("onnxruntime")


@pytest.fixture(scope="module")
def torch_scorer(tiny_checkpoint):
    return Scorer.from_checkpoint(tiny_checkpoint, device="cpu", mixed_precision=False, backend="torch")


def test_onnxruntime_scores_equal_torch_fp32(tiny_checkpoint, torch_scorer):
    pytest.importorskip("onnxruntime")
    scorer = Scorer.from_checkpoint(tiny_checkpoint, device="auto", backend="onnxruntime")
    assert scorer.backend == "onnxruntime" and scorer.device.type == "cpu"
    assert scorer._model is None  # the torch model is not loaded to score
    rng = np.random.default_rng(0)
    tensors = [torch.from_numpy(rng.random((3, h, w), dtype=np.float32)) for h, w in
               [(64, 64), (64, 128), (64, 64), (96, 64), (64, 128)]]
    got = scorer.score_tensors(tensors, max_batch=2)
    expected = torch_scorer.score_tensors(tensors, max_batch=2)
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)


def test_onnxruntime_scorer_loads_the_torch_model_for_heatmaps(tiny_checkpoint):
    pytest.importorskip("onnxruntime")
    from model.gradram import heatmap_for_image
    from model.preprocess import decode_image

    scorer = Scorer.from_checkpoint(tiny_checkpoint, backend="onnxruntime")
    img = decode_image(make_image(size=(80, 64)))
    result = heatmap_for_image(scorer.model, scorer.preprocessing, img)
    assert scorer._model is not None
    assert abs(result.score - scorer.score_tensors([scorer.prepare(make_image(size=(80, 64)))[0]])[0]) < 1e-2


def test_onnxruntime_refuses_a_gpu():
    with pytest.raises(ValueError):
        Scorer(None, None, device="cuda", runner=object(), weights="x.json")


def read_scores(path: Path) -> dict[str, float]:
    with open(path) as fh:
        return {row["path"]: float(row["score"]) for row in csv.DictReader(fh) if row["score"]}


def test_cli_backends_agree(tmp_path, tiny_checkpoint):
    pytest.importorskip("onnxruntime")
    from app.cli import main

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, size in enumerate([(120, 90), (90, 120), (64, 64), (300, 100)]):
        make_image(folder / f"{i}.jpg", size=size, seed=i)
    (folder / "bad.jpg").write_bytes(b"not an image")
    outs = {}
    for backend in ("torch", "onnxruntime"):
        outs[backend] = tmp_path / f"{backend}.csv"
        code = main(["score", str(folder), "--weights", str(tiny_checkpoint), "--backend", backend, "--fp32",
                     "--no-progress", "--out", str(outs[backend])])
        assert code == 1  # the bad file fails with either backend
    torch_scores, ort_scores = read_scores(outs["torch"]), read_scores(outs["onnxruntime"])
    assert torch_scores.keys() == ort_scores.keys() and len(torch_scores) == 4
    for key in torch_scores:
        assert abs(torch_scores[key] - ort_scores[key]) <= TOLERANCE


def test_library_backend_from_environment(tiny_checkpoint, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("RESMEMNET_BACKEND", "onnxruntime")
    assert Scorer.from_checkpoint(tiny_checkpoint).backend == "onnxruntime"
    monkeypatch.setenv("RESMEMNET_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown backend"):
        Scorer.from_checkpoint(tiny_checkpoint)


def test_service_scores_with_the_backend_its_settings_name(tiny_checkpoint, torch_scorer):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("httpx")
    import time

    from fastapi.testclient import TestClient

    from app.service import create_app
    from app.settings import ServiceSettings, SettingsError

    settings = ServiceSettings.from_env({"RESMEMNET_BACKEND": "onnxruntime"}, weights=str(tiny_checkpoint),
                                        device="cpu", warmup=False)
    assert settings.backend == "onnxruntime"
    with pytest.raises(SettingsError, match="backend"):
        ServiceSettings.from_env({"RESMEMNET_BACKEND": "tensorrt"})
    data = make_image(size=(100, 80), seed=3)
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 120
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline and client.get("/healthz").status_code == 200
            time.sleep(0.05)
        answer = client.post("/score", files={"file": ("a.jpg", data, "image/jpeg")})
        assert answer.status_code == 200, answer.text
    expected = torch_scorer.score_tensors([torch_scorer.prepare(data)[0]])[0]
    assert abs(answer.json()["score"] - expected) <= TOLERANCE


POOL = SHARED_DATA / "pool"


@pytest.mark.slow
@pytest.mark.skipif(not POOL.is_dir(), reason="needs ../shared/data/pool")
def test_shipped_checkpoint_onnxruntime_equals_torch_on_real_photos():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("resmem")
    photos = sorted(str(p) for p in POOL.glob("*.jpg"))[::100][:24]  # spread over the three sources
    ref = Scorer.from_checkpoint(device="cpu", mixed_precision=False, backend="torch")
    ort_scorer = Scorer.from_checkpoint(device="cpu", backend="onnxruntime")
    expected = [r.score for r in ref.score_paths(photos, batch_size=8)]
    got = [r.score for r in ort_scorer.score_paths(photos, batch_size=8)]
    assert np.ptp(expected) > 0.05  # real, varied photos
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)


def test_auto_prefers_onnxruntime_on_a_cpu(monkeypatch):
    import model.engines as backends

    monkeypatch.setattr(backends, "engine_installed", lambda: True)
    assert backends.pick_backend("auto", "cpu") == "onnxruntime"
    assert backends.pick_backend("auto", "cuda") == "torch"
    assert backends.pick_backend("torch", "cpu") == "torch"
    assert backends.pick_backend("auto", "cpu", native_bf16=True) == "torch"  # bf16 torch is faster there
    assert backends.pick_backend("onnxruntime", "cpu", native_bf16=True) == "onnxruntime"
    monkeypatch.setattr(backends, "engine_installed", lambda: False)
    assert backends.pick_backend("auto", "cpu") == "torch"


def test_auto_falls_back_to_torch_when_the_export_fails(tiny_checkpoint, monkeypatch):
    import model.engines as backends

    def broken(*_a, **_k):
        raise BackendError("the onnxruntime backend cannot run this checkpoint: test")

    monkeypatch.setattr(backends, "engine_installed", lambda: True)
    monkeypatch.setattr(backends, "onnxruntime_runner", broken)
    assert Scorer.from_checkpoint(tiny_checkpoint, device="cpu", backend="auto", mixed_precision=False).backend \
        == "torch"
    with pytest.raises(BackendError, match="cannot run"):
        Scorer.from_checkpoint(tiny_checkpoint, device="cpu", backend="onnxruntime")


def test_optimized_graph_is_cached_and_checked(tiny_checkpoint):
    pytest.importorskip("onnxruntime")
    from model.engines import onnxruntime_runner

    x = np.random.default_rng(5).random((2, 3, 64, 96), dtype=np.float32)
    first = onnxruntime_runner(tiny_checkpoint)
    assert ".ort-" not in Path(first.path).name  # optimised now, saved for next time
    second = onnxruntime_runner(tiny_checkpoint)
    assert ".ort-" in Path(second.path).name
    np.testing.assert_array_equal(first(x), second(x))
    saved = Path(second.path)
    data = bytearray(saved.read_bytes())
    data[len(data) // 2] ^= 0xFF
    saved.write_bytes(bytes(data))
    third = onnxruntime_runner(tiny_checkpoint)  # the damaged file is not loaded, but rebuilt
    assert ".ort-" not in Path(third.path).name
    np.testing.assert_array_equal(first(x), third(x))
    assert ".ort-" in Path(onnxruntime_runner(tiny_checkpoint).path).name


def test_onnxruntime_scores_every_profile_without_the_torch_model(profile_checkpoint):
    """Every profile from the export's profile_scores output: equal to the torch Scorer's fp32
    scores within TOLERANCE, percentiles from each profile's own quantiles, no torch model loaded."""
    pytest.importorskip("onnxruntime")
    ref = Scorer.from_checkpoint(profile_checkpoint, device="cpu", mixed_precision=False, backend="torch")
    scorer = Scorer.from_checkpoint(profile_checkpoint, backend="onnxruntime")
    assert scorer.profiles == ("default", "general", "outdoor")
    photos = [make_image(size=size, seed=i) for i, size in enumerate([(120, 90), (90, 120), (64, 64), (300, 100)])]
    tensors = [ref.prepare(p).tensor for p in photos]
    for profile in scorer.profiles:
        got = scorer.score_tensors(tensors, max_batch=3, profile=profile)
        expected = ref.score_tensors(tensors, max_batch=3, profile=profile)
        np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)
        for score in got:
            assert scorer.percentile(score, profile) == ref.meta.percentile(score, profile) is not None
    batch = torch.stack(tensors[2:3] * 2)
    table = scorer.profile_score_batch(batch, ["outdoor", "default"])
    np.testing.assert_allclose(table, ref.profile_score_batch(batch, ["outdoor", "default"]), atol=TOLERANCE, rtol=0)
    assert scorer._model is None  # no profile needed the torch model


class _Stop(Exception):
    pass


def test_an_onnx_file_selects_onnxruntime_unless_a_backend_is_named(tmp_path, monkeypatch):
    """`score --onnx FILE` / `serve --onnx FILE` run that export: without --backend (or
    $RESMEMNET_BACKEND) the default ("auto" for score, torch for serve) would pick torch on a
    bf16 CPU (score) or always (serve) and ignore the file without a word."""
    from app.cli import main
    from app.cli import score as cli_score
    from app.cli import serve as cli_serve

    seen = {}

    def fake_load_scorer(args, **kwargs):
        seen["score"] = kwargs["backend"]
        raise _Stop

    def fake_check_auth(settings):
        seen["serve"] = settings.backend
        return "stop here"

    monkeypatch.setattr(cli_score, "load_scorer", fake_load_scorer)
    monkeypatch.setattr(cli_serve, "check_auth", fake_check_auth)
    image = tmp_path / "a.jpg"
    image.write_bytes(make_image(size=(64, 64), seed=1))
    onnx = str(tmp_path / "m.onnx")
    cases = [([], None, "onnxruntime"), (["--backend", "torch"], None, "torch"), ([], "torch", "torch")]
    for flags, env, expected in cases:
        if env is None:
            monkeypatch.delenv("RESMEMNET_BACKEND", raising=False)
        else:
            monkeypatch.setenv("RESMEMNET_BACKEND", env)
        with pytest.raises(_Stop):
            main(["score", str(image), "--onnx", onnx, "--no-progress", *flags])
        assert seen["score"] == expected, (flags, env)
        assert main(["serve", "--onnx", onnx, *flags]) == 2
        assert seen["serve"] == expected, (flags, env)
    monkeypatch.delenv("RESMEMNET_BACKEND", raising=False)
    with pytest.raises(_Stop):
        main(["score", str(image), "--no-progress"])
    assert seen["score"] == "auto"  # no --onnx: the default is unchanged
    assert main(["serve"]) == 2
    assert seen["serve"] == "torch"
