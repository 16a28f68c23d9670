"""The torch-free runtime (`pip install resmemnet` without torch, the slim image): the onnxruntime
backend on a prebuilt ONNX export scores every profile, serves every endpoint and draws /heatmap
from the export's layer-4 maps (model/slim_heatmap.py); what needs torch says so in one line.

The subprocess tests make torch unimportable (None in sys.modules['torch'] and
['torchvision'] before anything is imported), so an import of torch anywhere on these paths fails
them. Precision: both sides fp32 (ONNX Runtime runs the export in fp32, the torch Scorer and
Grad-RAM here with mixed_precision=False); scores within model.export.EXPORT_TOLERANCE (1e-3, the
export's own check), maps within model.slim_heatmap.HEATMAP_TOLERANCE on their [0, 1] scale.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, free_port, make_image

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
SCORE_TOL = 1e-3
NO_TORCH = "import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None\n"
PHOTOS = [((120, 90), 11), ((90, 120), 12), ((64, 64), 13), ((200, 100), 14)]


@pytest.fixture(scope="module")
def export(profile_checkpoint, tmp_path_factory):
    """`resmemnet export --format onnx` of the gated readout checkpoint: (onnx file, checkpoint)."""
    from model.export import export_to

    out = tmp_path_factory.mktemp("slim") / "slim.onnx"
    export_to(profile_checkpoint, out)
    return out, profile_checkpoint


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for i, (size, seed) in enumerate(PHOTOS):
        path = folder / f"p{i}.jpg"
        make_image(path, size=size, seed=seed)
        paths.append(path)
    return paths


def torch_layer4(scorer, path, profile):
    """The torch Grad-RAM of layer4 at fp32 for one photo: (map, score)."""
    from model.gradram import heatmap_for_tensor

    prepared = scorer.prepare(str(path))
    result = heatmap_for_tensor(scorer.model, prepared.tensor, (prepared.width, prepared.height), layer="layer4",
                                autocast_dtype=None, profile=profile)
    return result.heatmap, result.score


def test_export_carries_layer4_maps_equal_to_torch_grad_ram(export, photos):
    """In-process, torch installed: the export's maps vs the torch Grad-RAM of layer4, every profile."""
    from model.engines import onnxruntime_runner
    from model.scoring import Scorer
    from model.slim_heatmap import HEATMAP_TOLERANCE, slim_heatmap

    onnx, ckpt = export
    scorer = Scorer.from_checkpoint(ckpt, backend="torch", device="cpu", mixed_precision=False)
    runner = onnxruntime_runner(ckpt, onnx=onnx)
    assert runner.heatmap_outputs["layers"] == ["layer4"]
    worst = 0.0
    for path in photos:
        prepared = scorer.prepare(str(path))
        for profile in scorer.profiles:
            want, want_score = torch_layer4(scorer, path, profile)
            got = slim_heatmap(runner, prepared.tensor.numpy(), (prepared.width, prepared.height), profile=profile)
            assert got.layers == ("layer4",) and got.heatmap.shape == want.shape
            assert want.max() == pytest.approx(1.0)  # a real map, not an empty one
            worst = max(worst, float(np.abs(got.heatmap - want).max()))
            assert abs(got.score - want_score) <= SCORE_TOL
    print(f"largest |slim - torch| layer4 map difference: {worst:.2e}")
    assert worst <= HEATMAP_TOLERANCE


@pytest.fixture(scope="module")
def branch_export(tmp_path_factory):
    """A gated readout over a random ResNet-152 *with* the memory branch (random too, read from a
    stand-in for the resmem package's file, as a real checkpoint reads the package's), and its ONNX
    export: (onnx file, checkpoint). About 120M parameters: the one export of its kind here."""
    from safetensors.torch import save_file

    from model.checkpoint import CheckpointMeta, save_checkpoint
    from model.export import cached_onnx
    from model.filecache import sha256_file
    from model.network import build_resmemnet
    from model.preprocess import Preprocessing, ResizePolicy, decode_image
    from model.trunks import file_source

    folder = tmp_path_factory.mktemp("branched")
    torch.manual_seed(11)  # a seed whose maps of PHOTOS are none of them empty (all negative), in any profile
    model = build_resmemnet(backbone="resnet152", head="readout", teacher_output=True, score_blend=0.7,
                            domain_gate=True, branch="resmem")
    package = {("features.fc." + k[len("imagenet_fc."):]) if k.startswith("imagenet_fc.") else k: v.contiguous()
               for k, v in model.branch.state_dict().items()}
    save_file(package, str(folder / "resmem-standin.safetensors"))
    source = file_source(str(folder / "resmem-standin.safetensors"), depth="resnet152",
                         sha256=sha256_file(folder / "resmem-standin.safetensors"))
    preprocessing = Preprocessing(resize=ResizePolicy(size=64, multiple=32), input_scaling="imagenet")
    out = model.head.out
    with torch.no_grad():
        images = torch.stack([preprocessing.image_to_tensor(decode_image(make_image(size=(120, 90), seed=2000 + i)))
                              for i in range(8)])
        # A random ResNet-152's activations grow ~1e6-fold over its 50 blocks (the branch's score
        # saturates): its BatchNorm statistics are taken from these photos, as a trained trunk's
        # are, and its residual branches damped (x 0.2); undamped, the random blocks amplify
        # rounding ~1e3-fold (ONNX Runtime's layer4 then differs from torch's by 1e-3 relative).
        for m in model.trunk.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        model.trunk.train()
        model.forward_features(images)
        model.trunk.eval()
        for block in model.blocks():
            block.bn3.weight.mul_(0.2)
            block.bn3.bias.mul_(0.2)
        # as conftest's profile_checkpoint: outputs around 0.6, 0.4, 0.5
        flat = torch.cat(model.forward_features(images), dim=1)
        spread = (flat - flat.mean(dim=0)).std() * flat.shape[1] ** 0.5
        out.weight.copy_(torch.randn_like(out.weight) * (0.1 / spread))
        out.bias.copy_(torch.tensor([0.6, 0.4, 0.5]) - flat.mean(dim=0) @ out.weight.T)
    meta = CheckpointMeta(name="test-branched", architecture=model.cfg, preprocessing=preprocessing, trunk=source,
                          trunk_embedded=True, description="random trunk and memory branch, for tests",
                          license="test only")
    ckpt = save_checkpoint(model, meta, folder / "test-branched.json", embed_trunk=True)
    return cached_onnx(ckpt, folder=folder / "cache").path, ckpt


def test_export_with_memory_branch_carries_layer4_maps_equal_to_torch_grad_ram(branch_export, photos, monkeypatch):
    """A readout with the memory branch (which reads p_last again through the ImageNet logits): the
    export's maps vs the torch Grad-RAM of layer4, every profile; and the branch's part of them is
    far above the tolerance (maps without it, the branch's input cut from p_last, differ)."""
    from model.engines import onnxruntime_runner
    from model.scoring import Scorer
    from model.slim_heatmap import HEATMAP_TOLERANCE, slim_heatmap

    onnx, ckpt = branch_export
    scorer = Scorer.from_checkpoint(ckpt, backend="torch", device="cpu", mixed_precision=False)
    assert scorer.model.branch is not None
    runner = onnxruntime_runner(ckpt, onnx=onnx)
    assert runner.heatmap_outputs["layers"] == ["layer4"]
    worst, gaps = 0.0, []
    for path in photos:
        prepared = scorer.prepare(str(path))
        for profile in scorer.profiles:
            want, want_score = torch_layer4(scorer, path, profile)
            got = slim_heatmap(runner, prepared.tensor.numpy(), (prepared.width, prepared.height), profile=profile)
            assert got.heatmap.shape == want.shape and want.max() == pytest.approx(1.0)
            worst = max(worst, float(np.abs(got.heatmap - want).max()))
            assert abs(got.score - want_score) <= SCORE_TOL
            with monkeypatch.context() as m:  # the same Grad-RAM with the branch blind to p_last
                branch, forward = scorer.model.branch, scorer.model.branch.forward
                m.setattr(branch, "forward", lambda images, last: forward(images, last.detach()))
                cut, cut_score = torch_layer4(scorer, path, profile)
            assert cut_score == pytest.approx(want_score, abs=1e-6)
            gaps.append(float(np.abs(cut - want).max()))
    print(f"largest |slim - torch| layer4 map difference with the memory branch: {worst:.2e}; "
          f"without the branch's part the maps would differ by {min(gaps):.2e} to {max(gaps):.2e}")
    assert worst <= HEATMAP_TOLERANCE
    assert min(gaps) > 10 * HEATMAP_TOLERANCE


def test_slim_heatmap_refuses_other_layers_and_exports_without_maps(export, tiny_checkpoint, tmp_path):
    from model.engines import onnxruntime_runner
    from model.export import export_to
    from model.slim_heatmap import SlimHeatmapError, slim_heatmap

    onnx, ckpt = export
    runner = onnxruntime_runner(ckpt, onnx=onnx)
    image = np.random.default_rng(0).random((3, 64, 64), dtype=np.float32)
    with pytest.raises(SlimHeatmapError, match="layer4 only"):
        slim_heatmap(runner, image, (64, 64), layers="layer3,layer4")
    lstm = export_to(tiny_checkpoint, tmp_path / "lstm.onnx")  # an LSTM head: no layer4 maps in its export
    assert "heatmap_outputs" not in lstm.info["onnx"]
    with pytest.raises(SlimHeatmapError, match="no layer4 maps"):
        slim_heatmap(onnxruntime_runner(tiny_checkpoint, onnx=lstm.path), image, (64, 64))


def test_prebuilt_export_is_checked_against_the_checkpoint(export, tiny_checkpoint, tmp_path):
    from model.engines import BackendError, onnxruntime_runner

    onnx, ckpt = export
    with pytest.raises(BackendError, match="another checkpoint"):
        onnxruntime_runner(tiny_checkpoint, onnx=onnx)
    copy = tmp_path / "cut.onnx"
    copy.write_bytes(onnx.read_bytes()[:-10])
    (tmp_path / "cut.json").write_text(onnx.with_suffix(".json").read_text())
    with pytest.raises(BackendError, match="sha256"):
        onnxruntime_runner(ckpt, onnx=copy)


SLIM_SCRIPT = NO_TORCH + r"""
import json, os, warnings
import numpy as np
ckpt, onnx, out, *photos = sys.argv[1:]
import model.scoring, app, app.service, app.cli  # the torch-free import path
from model.scoring import Scorer
scorer = Scorer.from_checkpoint(ckpt, onnx=onnx)  # default backend without torch: onnxruntime
report = {"backend": scorer.backend, "device": str(scorer.device), "precision": scorer.precision,
          "profiles": list(scorer.profiles), "scores": {}, "maps": {}}
for profile in scorer.profiles:
    report["scores"][profile] = scorer.score_tensors([scorer.prepare(p).tensor for p in photos], profile=profile)
for i, p in enumerate(photos):
    result = scorer.heatmap(p, profile="general")
    np.save(os.path.join(os.path.dirname(out), f"map{i}.npy"), result.heatmap)
    report["maps"][p] = {"layers": list(result.layers), "score": result.score}
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient
from app.service import create_app
from app.settings import ServiceSettings
settings = ServiceSettings(weights=ckpt, onnx=onnx, warmup=True, device="auto")
report["settings_backend"] = settings.backend
with TestClient(create_app(settings)) as client:
    import time
    deadline = time.monotonic() + 120
    while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    data = open(photos[0], "rb").read()
    r = client.post("/score", files={"file": ("a.jpg", data)}, params={"profile": "outdoor"})
    report["http_score"] = [r.status_code, r.json()]
    r = client.post("/score/batch", files=[("files", ("a.jpg", data)), ("files", ("b.jpg", data))])
    report["http_batch"] = r.status_code
    r = client.post("/heatmap", files={"file": ("a.jpg", data)}, params={"format": "map"})
    report["http_heatmap"] = [r.status_code, r.headers.get("x-heatmap-layers"), r.headers.get("content-type")]
    r = client.post("/heatmap", files={"file": ("a.jpg", data)}, params={"layer": "layer3"})
    report["http_heatmap_layer3"] = [r.status_code, r.json()["error"] if r.status_code != 200 else None]
    report["readyz"] = client.get("/readyz").status_code
report["torch_loaded"] = sys.modules.get("torch") is not None
json.dump(report, open(out, "w"))
"""


def run_without_torch(code: str, *args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)


@pytest.mark.process
def test_torch_free_runtime_scores_serves_and_draws_layer4(export, photos, tmp_path, monkeypatch):
    from model.scoring import Scorer
    from model.slim_heatmap import HEATMAP_TOLERANCE

    onnx, ckpt = export
    out = tmp_path / "report.json"
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("RESMEMNET_")}
    env["RESMEMNET_CACHE_DIR"] = str(tmp_path / "cache")
    r = run_without_torch(SLIM_SCRIPT, ckpt, onnx, out, *photos, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert (report["backend"], report["device"], report["precision"]) == ("onnxruntime", "cpu", "fp32")
    assert report["settings_backend"] == "onnxruntime" and not report["torch_loaded"]
    scorer = Scorer.from_checkpoint(ckpt, backend="torch", device="cpu", mixed_precision=False)
    assert report["profiles"] == list(scorer.profiles)
    for profile in scorer.profiles:
        want = scorer.score_tensors([scorer.prepare(str(p)).tensor for p in photos], profile=profile)
        np.testing.assert_allclose(report["scores"][profile], want, atol=SCORE_TOL, rtol=0)
    for i, p in enumerate(photos):
        want, want_score = torch_layer4(scorer, p, "general")
        got = np.load(tmp_path / f"map{i}.npy")
        assert report["maps"][str(p)]["layers"] == ["layer4"]
        assert float(np.abs(got - want).max()) <= HEATMAP_TOLERANCE
        assert abs(report["maps"][str(p)]["score"] - want_score) <= SCORE_TOL
    status, body = report["http_score"]
    assert status == 200 and body["profile"] == "outdoor"
    assert abs(body["score"] - scorer.score_tensors([scorer.prepare(str(photos[0])).tensor], profile="outdoor")[0]) \
        <= SCORE_TOL
    assert report["http_batch"] == 200 and report["readyz"] == 200
    assert report["http_heatmap"] == [200, "layer4", "image/png"]
    status, error = report["http_heatmap_layer3"]
    assert status == 422 and error["reason"] == "invalid_request" and "layer4 only" in error["message"], error


@pytest.mark.process
def test_commands_that_need_torch_fail_with_one_line(export, photos, tmp_path):
    onnx, ckpt = export
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("RESMEMNET_")}
    env["RESMEMNET_CACHE_DIR"] = str(tmp_path / "empty-cache")
    cli = NO_TORCH + "from app.cli import main; sys.exit(main(sys.argv[1:]))"
    cases = {  # what is run: (argv, what its one line names)
        "train": (["train", "--out", str(tmp_path / "run")], "torch"),
        "export": (["export", "--format", "onnx", "--out", str(tmp_path / "x.onnx"), "--weights", str(ckpt)], "torch"),
        "torch backend": (["score", str(photos[0]), "--weights", str(ckpt), "--backend", "torch"], "torch"),
        "no export": (["score", str(photos[0]), "--weights", str(ckpt)], "RESMEMNET_ONNX"),  # nothing in the cache
        "layer3": (["heatmap", str(photos[0]), "-o", str(tmp_path / "maps"), "--weights", str(ckpt), "--onnx", str(onnx),
                    "--layer", "layer3"], "layer4 only"),
        "serve, missing export": (["serve", "--weights", str(ckpt), "--port", str(free_port()),
                                   "--onnx", str(tmp_path / "missing.onnx")], "sidecar"),
    }
    for what, (argv, named) in cases.items():
        r = run_without_torch(cli, *argv, env=env, timeout=120)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 2 and len(lines) == 1, (what, r.returncode, r.stderr[-2000:])
        assert lines[0].startswith("resmemnet") and "error:" in lines[0] and named in lines[0], (what, lines)
    r = run_without_torch(cli, "score", photos[0], "--weights", ckpt, "--onnx", onnx, "--no-progress", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines()[0].startswith("path,score")
    r = run_without_torch(cli, "info", "--weights", ckpt, env=env, timeout=120)
    assert r.returncode == 0 and "test-profiles" in r.stdout, r.stderr[-2000:]
