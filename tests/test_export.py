"""ONNX export (whole model, through its forward), its cache, and the Triton model repository."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from app.cli import main  # noqa: E402
from model.export import (INPUT_NAME, OUTPUT_NAME, ExportError, TritonOptions, cached_onnx,  # noqa: E402
                          export_onnx, parse_triton_config, triton_config, write_triton_repository)

pytestmark = pytest.mark.usefixtures("one_torch_thread", "private_cache")


def run_onnx(path, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: images.astype(np.float32)})[0]


def torch_scores(model, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(torch.from_numpy(images)).numpy()


def tiny_model(**overrides):
    """A ResNet-50 ResMem-Net with random weights and the given head settings."""
    from model.network import build_resmemnet

    torch.manual_seed(1)
    model = build_resmemnet(backbone="resnet50", **overrides)
    with torch.no_grad():  # move the readout off its flat start, so scores differ between images
        for p in model.head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def square(size: int):
    from model.preprocess import Preprocessing, ResizePolicy

    return Preprocessing(resize=ResizePolicy(mode="square", size=size), input_scaling="imagenet")


def images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, h, w), dtype=np.float32)


@pytest.mark.parametrize("head", [
    {"head": "readout", "teacher_output": True, "score_blend": 0.7, "score_scale": 1.3, "score_shift": -0.1},
    {"head": "lstm"},
])
def test_export_equals_torch_any_batch(tmp_path, head):
    model = tiny_model(**head)
    export = export_onnx(model, square(64), tmp_path / "m.onnx")
    for n in (1, 3, 5):  # the batch axis is dynamic
        x = images(n, 64, 64, seed=n)
        np.testing.assert_allclose(run_onnx(export.path, x), torch_scores(model, x), atol=1e-4, rtol=0)
    assert export.info["onnx"]["input"]["shape"] == ["batch", 3, 64, 64]
    assert json.loads(export.sidecar.read_text())["onnx"]["sha256"] == export.info["onnx"]["sha256"]


def test_export_outputs_every_profile_one_column_each(tmp_path):
    """A model with named outputs and profiles (several studies, a gated default): `score` is the
    default profile, `profile_scores` every profile, named in the sidecar, as the torch model."""
    from test_profile_specs import OUTPUTS, specs

    from model.export import PROFILES_OUTPUT
    from model.profiles import profile_names, profile_scores

    model = tiny_model(head="readout", teacher_output=True, outputs=OUTPUTS, profiles=specs("softmax"))
    export = export_onnx(model, square(64), tmp_path / "m.onnx")
    x = images(3, 64, 64, seed=4)
    session = ort.InferenceSession(str(export.path), providers=["CPUExecutionProvider"])
    score, table = session.run([OUTPUT_NAME, PROFILES_OUTPUT], {INPUT_NAME: x})
    with torch.no_grad():
        expected = profile_scores(model.head.outputs(model.forward_features(torch.from_numpy(x))), model.cfg).numpy()
    np.testing.assert_allclose(table, expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(score, torch_scores(model, x), atol=1e-4, rtol=0)
    described = export.info["onnx"]["profile_output"]
    assert described["profiles"] == list(profile_names(model.cfg)) == ["default", "lnsim", "cdm", "general", "outdoor"]
    assert described["shape"] == ["batch", 5]
    if importlib.util.find_spec("tritonclient") is not None:
        cfg = parse_triton_config(triton_config(export.info))
        assert [(o.name, list(o.dims)) for o in cfg.output] == [(OUTPUT_NAME, [1]), (PROFILES_OUTPUT, [5])]


def test_aspect_keeping_policy_exports_dynamic_height_and_width(tmp_path, tiny_checkpoint):
    from model.checkpoint import load_checkpoint

    model, meta = load_checkpoint(tiny_checkpoint)
    assert meta.preprocessing.resize.mode == "shorter_side"
    export = export_onnx(model, meta.preprocessing, tmp_path / "m.onnx")
    assert export.info["onnx"]["input"]["shape"] == ["batch", 3, "height", "width"]
    for h, w in ((64, 64), (64, 128), (96, 64)):
        x = images(2, h, w)
        np.testing.assert_allclose(run_onnx(export.path, x), torch_scores(model, x), atol=1e-4, rtol=0)


class ExtraBranchNet(nn.Module):
    """Stands in for an architecture that gains modules (e.g. a second feature branch feeding the
    head): the export must follow forward(), not a copy of today's layout."""

    def __init__(self, base):
        super().__init__()
        self.base = base
        self.branch = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                    nn.Linear(4, 1))

    def forward(self, x):
        return self.base(x) + 0.1 * torch.tanh(self.branch(x)[:, 0])


def test_export_follows_forward_of_a_model_with_new_modules(tmp_path):
    model = ExtraBranchNet(tiny_model(head="readout")).eval()
    export = export_onnx(model, square(64), tmp_path / "m.onnx")
    x = images(3, 64, 64)
    np.testing.assert_allclose(run_onnx(export.path, x), torch_scores(model, x), atol=1e-4, rtol=0)
    assert not np.allclose(torch_scores(model, x), torch_scores(model.base, x), atol=1e-4)


class Noisy(nn.Module):
    """A forward the exported graph cannot reproduce (fresh random numbers on every run)."""

    def forward(self, x):
        return x.mean(dim=(1, 2, 3)) + torch.rand(x.shape[0])


def test_export_that_does_not_reproduce_the_model_is_refused(tmp_path):
    from model.preprocess import Preprocessing, ResizePolicy

    with pytest.raises(ExportError, match="does not reproduce"):
        export_onnx(Noisy(), Preprocessing(resize=ResizePolicy(mode="square", size=32)), tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()


def test_cache_reuses_an_unchanged_export_and_rebuilds_a_changed_one(tiny_checkpoint, private_cache, monkeypatch):
    import model.export as export_module

    first = cached_onnx(tiny_checkpoint)
    assert first.path.parent == private_cache / "onnx"
    assert first.info["checkpoint"]["tensors_sha256"] == json.loads(tiny_checkpoint.read_text())["tensors"]["sha256"]
    real_export = export_module.export_onnx
    monkeypatch.setattr(export_module, "export_onnx", lambda *a, **k: pytest.fail("exported again"))
    assert cached_onnx(tiny_checkpoint).path == first.path
    # a damaged cached file (same size) is not used: it is exported again
    data = bytearray(first.path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    first.path.write_bytes(bytes(data))
    calls = []
    monkeypatch.setattr(export_module, "export_onnx", lambda *a, **k: calls.append(1) or real_export(*a, **k))
    again = cached_onnx(tiny_checkpoint)
    assert calls == [1] and again.path == first.path
    assert again.info["onnx"]["sha256"] == first.info["onnx"]["sha256"]


def test_cli_export_onnx_writes_model_and_sidecar(tmp_path, tiny_checkpoint):
    from model.checkpoint import load_checkpoint

    out = tmp_path / "out" / "model.onnx"
    assert main(["export", "--format", "onnx", "--out", str(out), "--weights", str(tiny_checkpoint)]) == 0
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["checkpoint"]["name"] == "test-random"
    assert info["checkpoint"]["json_sha256"] and info["checkpoint"]["tensors_sha256"]
    assert info["onnx"]["file"] == "model.onnx"
    model, _ = load_checkpoint(tiny_checkpoint)
    x = images(2, 64, 96)
    np.testing.assert_allclose(run_onnx(out, x), torch_scores(model, x), atol=1e-3, rtol=0)


def test_cli_export_errors_are_one_line(tmp_path, tiny_checkpoint, capsys):
    assert main(["export", "--format", "onnx", "--out", str(tmp_path / "m.txt"), "--weights", str(tiny_checkpoint)]) == 2
    assert main(["export", "--format", "onnx", "--out", str(tmp_path / "m.onnx"),
                 "--weights", str(tmp_path / "missing.json")]) == 2
    assert main(["export", "--format", "triton", "--out", str(tmp_path / "repo"), "--weights", str(tiny_checkpoint),
                 "--preferred-batch-sizes", "64"]) == 2
    err = capsys.readouterr().err
    assert err.count("resmemnet: error:") == 3 and "Traceback" not in err


# -- Triton ---------------------------------------------------------------------------------------
def test_triton_config_parses_as_model_config():
    pytest.importorskip("tritonclient")
    info = {"checkpoint": {"name": "x", "version": "1"}, "preprocessing": {},
            "onnx": {"input": {"shape": ["batch", 3, 192, 192]}}}
    cfg = parse_triton_config(triton_config(info, TritonOptions(max_batch_size=16, preferred_batch_sizes=(4, 16),
                                                                max_queue_delay_us=2000, kind="KIND_CPU")))
    assert cfg.name == "resmemnet" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 16
    assert [(i.name, list(i.dims)) for i in cfg.input] == [(INPUT_NAME, [3, 192, 192])]
    assert [(o.name, list(o.dims), list(o.reshape.shape)) for o in cfg.output] == [(OUTPUT_NAME, [1], [])]
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 16]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 2000
    assert cfg.instance_group[0].kind == cfg.instance_group[0].KIND_CPU
    with pytest.raises(ValueError, match="ModelConfig"):
        parse_triton_config('name: "x"\nmax_batch: 3\n')


def test_triton_repository_holds_a_model_equal_to_torch(tmp_path, tiny_checkpoint):
    pytest.importorskip("tritonclient")
    from model.checkpoint import load_checkpoint

    assert main(["export", "--format", "triton", "--out", str(tmp_path / "repo"), "--weights", str(tiny_checkpoint),
                 "--name", "memorability", "--max-batch-size", "8", "--preferred-batch-sizes", "4,8"]) == 0
    model_dir = tmp_path / "repo" / "memorability"
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "config.pbtxt", "resmemnet-export.json"]
    cfg = parse_triton_config((model_dir / "config.pbtxt").read_text())
    assert cfg.name == "memorability" and cfg.max_batch_size == 8
    assert list(cfg.input[0].dims) == [3, -1, -1]  # the tiny checkpoint keeps the aspect ratio
    onnx_path = model_dir / "1" / "model.onnx"
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [i.name for i in cfg.input]
    assert [o.name for o in session.get_outputs()] == [o.name for o in cfg.output]
    model, _ = load_checkpoint(tiny_checkpoint)
    x = images(3, 64, 64)
    np.testing.assert_allclose(run_onnx(onnx_path, x), torch_scores(model, x), atol=1e-3, rtol=0)


@pytest.mark.slow
def test_shipped_checkpoint_triton_repository(tmp_path):
    """The shipped checkpoint (trunk from the resmem package) as a Triton repository."""
    pytest.importorskip("tritonclient")
    pytest.importorskip("resmem")
    from model.checkpoint import load_checkpoint
    from model.environment import SHIPPED_WEIGHTS

    model_dir = write_triton_repository(SHIPPED_WEIGHTS, tmp_path / "repo")
    cfg = parse_triton_config((model_dir / "config.pbtxt").read_text())
    model, meta = load_checkpoint(SHIPPED_WEIGHTS)
    size = meta.preprocessing.resize.size
    assert list(cfg.input[0].dims) == [3, size, size]
    x = images(2, size, size)
    np.testing.assert_allclose(run_onnx(model_dir / "1" / "model.onnx", x), torch_scores(model, x), atol=1e-3, rtol=0)


def test_cache_keeps_the_newest_exports(tmp_path):
    import os
    import time

    from model.export import KEEP_EXPORTS, prune_cache

    old = time.time() - 2 * 86400
    for i in range(KEEP_EXPORTS + 3):
        for suffix in (".onnx", ".json", ".ort-1-abc.onnx"):
            f = tmp_path / f"m{i}-key{suffix}"
            f.write_text("x")
            os.utime(f, (old + i, old + i))
    (tmp_path / "fresh-key.onnx").write_text("x")  # written long ago, read just now: kept
    os.utime(tmp_path / "fresh-key.onnx", (time.time(), time.time() - 10 * 86400))
    prune_cache(tmp_path, keep="m0-key")
    stems = {f.name.split(".")[0] for f in tmp_path.iterdir()}
    assert stems == {"fresh-key", "m0-key", *(f"m{i}-key" for i in range(6 - KEEP_EXPORTS + 1, 6))}
