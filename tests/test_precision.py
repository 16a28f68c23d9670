"""The trunk's precision: what each setting runs, and the reduced-precision path tested on every CPU.

`precision` (Scorer argument, `--precision`, RESMEMNET_PRECISION; model.devices.autocast_dtype)
is "auto" (fp16 on CUDA, bf16 on a CPU with native bf16, fp32 elsewhere), or a forced "fp32",
"bf16" or "fp16". Forced bf16/fp16 run also where the CPU only emulates them, so the tests below
cover the mixed-precision path on any machine, beside fp32. Each test says which precision it
assumes: fp32 comparisons are exact to 1e-5; a reduced-precision score is compared with fp32 at
a tolerance measured for it (docs/robustness.md, "Precision").
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA, make_image, serving
from model.environment import installed_version

# The tiny random-trunk test checkpoint, 32 random images, this machine: bf16 moved scores by at
# most 6.1e-4, fp16 by 7.0e-5 (max |d| vs fp32). Set at about 15x that: the tests ask whether
# the path runs the reduced dtype and stays near fp32, not how near.
TINY_TOLERANCE = {"bf16": 1e-2, "fp16": 1e-3}
# The shipped checkpoint on 64 pool photos (bench/precision_drift.py): bf16 max |d| 5.3e-3 over its
# three profiles, Spearman >= 0.9987; fp16 (emulated on the CPU) max |d| 6.3e-4. Margin: 2x and 3x.
SHIPPED_TOLERANCE = {"bf16": 1e-2, "fp16": 2e-3}
SHIPPED_MIN_SPEARMAN = 0.995
REDUCED = ("bf16", "fp16")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(autouse=True)
def no_precision_variable(monkeypatch):
    """Each test sets the variable itself when it is what the test is about."""
    monkeypatch.delenv("RESMEMNET_PRECISION", raising=False)


@pytest.fixture(scope="module")
def fp32(tiny_checkpoint, one_torch_thread):
    from model.scoring import Scorer

    return Scorer.from_checkpoint(tiny_checkpoint, device="cpu", precision="fp32", backend="torch")


def forced(fp32, precision: str):
    """A Scorer sharing fp32's model, with the trunk in `precision`."""
    from model.scoring import Scorer

    return Scorer(fp32.model, fp32.preprocessing, device="cpu", meta=fp32.meta, precision=precision)


def images(n: int = 6) -> torch.Tensor:
    """(n, 3, 64, 96) random-texture photos as the tiny checkpoint prepares them."""
    from model.preprocess import Preprocessing, ResizePolicy, decode_image

    pre = Preprocessing(resize=ResizePolicy(size=64, multiple=32), input_scaling="imagenet")
    return torch.stack([pre.image_to_tensor(decode_image(make_image(size=(120, 90), seed=i))) for i in range(n)])


# -- what each setting runs --------------------------------------------------------------------
@pytest.mark.parametrize("native", [True, False], ids=["native-bf16-cpu", "emulating-cpu"])
def test_each_precision_runs_its_dtype_on_the_cpu(monkeypatch, native):
    from model import devices

    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert devices.autocast_dtype(cpu, True, "auto") == (torch.bfloat16 if native else None)
    for name, dtype in DTYPES.items():
        assert devices.autocast_dtype(cpu, True, name) == dtype  # forced: the same on either CPU
        assert devices.autocast_dtype(cpu, False, name) is None  # mixed_precision=False is fp32
    assert devices.autocast_dtype(torch.device("cuda"), True, "auto") == torch.float16
    with pytest.raises(ValueError, match="unknown precision 'fp8'; use one of auto, fp32, bf16, fp16"):
        devices.autocast_dtype(cpu, True, "fp8")


def test_the_scorer_reads_the_variable_and_an_argument_wins(tiny_checkpoint, monkeypatch):
    from model.errors import InputError
    from model.scoring import Scorer

    monkeypatch.setenv("RESMEMNET_PRECISION", "bf16")
    s = Scorer.from_checkpoint(tiny_checkpoint, device="cpu", backend="torch")
    assert (s.precision, s.autocast_dtype, s.mixed_precision) == ("bf16", torch.bfloat16, True)
    assert Scorer(s.model, s.preprocessing, device="cpu", precision="fp16").precision == "fp16"
    assert Scorer(s.model, s.preprocessing, device="cpu", mixed_precision=False).precision == "fp32"
    monkeypatch.setenv("RESMEMNET_PRECISION", "FP32")
    assert Scorer(s.model, s.preprocessing, device="cpu").autocast_dtype is None
    monkeypatch.setenv("RESMEMNET_PRECISION", "double")
    with pytest.raises(InputError, match="unknown precision 'double'"):
        Scorer(s.model, s.preprocessing, device="cpu")


def test_auto_backend_keeps_torch_when_bf16_is_forced(tiny_checkpoint, monkeypatch, private_cache):
    """ONNX Runtime runs fp32 only: a reduced precision asked for keeps the torch engine."""
    from model import devices
    from model.engines import engine_installed
    from model.scoring import Scorer

    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    assert Scorer.from_checkpoint(tiny_checkpoint, device="cpu", backend="auto", precision="bf16").backend == "torch"
    if engine_installed():
        assert Scorer.from_checkpoint(tiny_checkpoint, device="cpu", backend="auto").backend == "onnxruntime"


# -- the reduced-precision path, on any CPU ------------------------------------------------------
@pytest.mark.parametrize("precision", REDUCED)
def test_reduced_precision_scores_stay_near_fp32(fp32, precision):
    x = images()
    reference = fp32.score_tensor_batch(x)
    scorer = forced(fp32, precision)
    assert scorer.autocast_dtype == DTYPES[precision] and scorer.mixed_precision
    got = scorer.score_tensor_batch(x)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()  # the head runs in fp32
    assert float((got - reference).abs().max()) < TINY_TOLERANCE[precision]
    assert not torch.equal(got, reference), "the trunk really ran in reduced precision"


@pytest.mark.parametrize("precision", ["fp32", *REDUCED])
def test_scores_do_not_depend_on_the_batch_in_any_precision(fp32, precision):
    """Same precision on both sides: an image's score is its own whatever it is batched with."""
    scorer = forced(fp32, precision)
    x = images(5)
    together = scorer.score_tensor_batch(x)
    alone = torch.cat([scorer.score_tensor_batch(x[i:i + 1]) for i in range(len(x))])
    assert torch.allclose(together, alone, atol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_heatmap_score_is_the_scorers_in_its_precision(fp32, precision):
    """Grad-RAM runs the trunk as the Scorer does (bf16 too; fp16 never: it underflows gradients)."""
    scorer = forced(fp32, precision)
    prepared = scorer.prepare(make_image(size=(120, 90), seed=3))
    result = scorer.heatmap(prepared, layers="layer4")
    assert result.score == pytest.approx(scorer.score_tensor_batch(prepared.tensor[None])[0].item(), abs=1e-4)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_service_serves_in_the_precision_it_is_given(tiny_checkpoint, monkeypatch, precision):
    """RESMEMNET_PRECISION reaches the service's Scorer; /score gives that Scorer's scores."""
    from app.settings import ServiceSettings
    from model.scoring import Scorer

    monkeypatch.setenv("RESMEMNET_PRECISION", precision)
    settings = ServiceSettings.from_env(weights=str(tiny_checkpoint), device="cpu", backend="torch", warmup=False)
    assert settings.precision == precision
    data = make_image(size=(120, 90), seed=5)
    reference = Scorer.from_checkpoint(tiny_checkpoint, device="cpu", precision=precision, backend="torch")
    expected = reference.score_tensor_batch(reference.prepare(data).tensor[None])[0].item()
    with serving(None, weights=str(tiny_checkpoint), device="cpu", backend="torch", precision=settings.precision) as client:
        r = client.post("/score", files={"file": ("a.jpg", data, "image/jpeg")})
        assert r.status_code == 200, r.text
        assert r.json()["score"] == pytest.approx(expected, abs=1e-5)
        info = [line for line in client.get("/metrics").text.splitlines() if line.startswith("resmemnet_model_info")]
        assert f'precision="{precision}"' in info[0]


def test_a_bad_precision_setting_is_refused(tiny_checkpoint):
    from app.settings import ServiceSettings, SettingsError

    with pytest.raises(SettingsError, match="precision must be one of auto, fp32, bf16, fp16, not 'half'"):
        ServiceSettings.from_env({"RESMEMNET_PRECISION": "half"})


def test_cli_precision_flag(tiny_checkpoint, fp32, tmp_path, capsys):
    from app.cli import main

    img = tmp_path / "one.jpg"
    img.write_bytes(make_image(size=(120, 90), seed=7))
    reference = fp32.score_tensor_batch(fp32.prepare(str(img)).tensor[None])[0].item()
    scores = {}
    for flags in (["--precision", "fp32"], ["--fp32"], ["--precision", "bf16"]):
        out = tmp_path / "s.json"
        assert main(["score", str(img), "--weights", str(tiny_checkpoint), "--device", "cpu", "--backend", "torch",
                     "--out", str(out), *flags]) == 0
        scores[" ".join(flags)] = json.loads(out.read_text())[0]["score"]
    assert scores["--precision fp32"] == pytest.approx(reference, abs=1e-6)
    assert scores["--fp32"] == scores["--precision fp32"]
    assert abs(scores["--precision bf16"] - reference) < TINY_TOLERANCE["bf16"]
    with pytest.raises(SystemExit):
        main(["score", str(img), "--precision", "int8"])
    assert "invalid choice: 'int8'" in capsys.readouterr().err


# -- the shipped checkpoint on real photos ---------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(installed_version("resmem") is None, reason="the trunk package resmem is not installed")
@pytest.mark.skipif(not (SHARED_DATA / "pool").is_dir(), reason="needs the photo pool in ../shared/data/pool")
@pytest.mark.parametrize("precision", REDUCED)
def test_shipped_checkpoint_drift_stays_within_the_measured_tolerance(precision):
    from scipy.stats import spearmanr

    from model.scoring import Scorer

    reference = Scorer.from_checkpoint(device="cpu", precision="fp32", backend="torch")
    scorer = Scorer(reference.model, reference.preprocessing, device="cpu", meta=reference.meta, precision=precision)
    photos = sorted((SHARED_DATA / "pool").glob("*.jpg"))[:16]
    x = torch.stack([reference.prepare(str(p)).tensor for p in photos])
    a, b = reference.profile_score_batch(x), scorer.profile_score_batch(x)
    assert float((a - b).abs().max()) < SHIPPED_TOLERANCE[precision]
    for column in range(a.shape[1]):
        assert spearmanr(a[:, column], b[:, column]).statistic > SHIPPED_MIN_SPEARMAN


def test_unknown_precision_in_the_environment_is_one_clear_cli_error(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    from app.cli import main

    img = tmp_path / "one.jpg"
    img.write_bytes(make_image())
    monkeypatch.setenv("RESMEMNET_PRECISION", "fp64")
    assert main(["score", str(img), "--weights", str(tiny_checkpoint), "--device", "cpu"]) == 2
    assert "resmemnet: error: unknown precision 'fp64'" in capsys.readouterr().err
