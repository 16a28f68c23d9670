"""Grad-RAM: correctness against a hook-based Grad-CAM, localisation, geometry, side effects,
thread safety, the overlay of an EXIF-rotated input and the `resmemnet heatmap` CLI (colour
tables and encodings: test_overlay.py)."""
from __future__ import annotations

import copy
import io
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from model.gradram import STAGES, grad_ram, heatmap_for_image, parse_layers, stage_cams
from model.network import ResMemNet, ResMemNetConfig, build_resmemnet
from model.overlay import overlay_png
from model.preprocess import Preprocessing, ResizePolicy, decode_image
from conftest import make_image


# -- models with known evidence ----------------------------------------------------------------
def small_trunk_model(*, input_scaling="imagenet", seed=0, sign=1.0, cls=ResMemNet, **kwargs):
    """ResMem-Net with a one-block-per-stage ResNet trunk (small receptive fields, fast) and a head
    whose score rises (sign=+1) or falls (sign=-1) with every pooled layer4 channel."""
    from torchvision.models.resnet import Bottleneck, ResNet

    torch.manual_seed(seed)
    model = cls(ResMemNetConfig(backbone="resnet50", head="linear", taps="last", input_scaling=input_scaling),
                **kwargs)
    model.trunk = ResNet(Bottleneck, [1, 1, 1, 1])
    model.trunk.fc = torch.nn.Identity()
    return make_monotone(model, sign).eval()


def make_monotone(model, sign=1.0):
    with torch.no_grad():
        for proj in model.head.projections:
            proj.weight.abs_()
            proj.bias.zero_()
        # small weights keep the sigmoid away from saturation (where every gradient is 0)
        model.head.out.weight.copy_(sign * model.head.out.weight.abs() * 1e-4)
        model.head.out.bias.zero_()
    return model


class RegionOnly(ResMemNet):
    """The trunk sees the image only inside `box` (top, bottom, left, right); zeros elsewhere."""

    def __init__(self, cfg, box):
        super().__init__(cfg)
        self.box = box

    def normalize(self, images):
        top, bottom, left, right = self.box
        mask = torch.zeros_like(images[:, :1])
        mask[..., top:bottom, left:right] = 1.0
        return super().normalize(images) * mask


def box_mask(shape, box):
    mask = torch.zeros(shape)
    top, bottom, left, right = box
    mask[top:bottom, left:right] = 1.0
    return mask


def mass_in(heatmap, box) -> float:
    heatmap = torch.as_tensor(heatmap)
    total = float(heatmap.sum())
    assert total > 0, "the map is empty"
    return float((heatmap * box_mask(heatmap.shape, box)).sum()) / total


def centroid(heatmap):
    heatmap = torch.as_tensor(heatmap, dtype=torch.float64)
    ys = torch.arange(heatmap.shape[0], dtype=torch.float64)
    xs = torch.arange(heatmap.shape[1], dtype=torch.float64)
    total = heatmap.sum()
    return float((heatmap.sum(1) * ys).sum() / total), float((heatmap.sum(0) * xs).sum() / total)


def reference_grad_cam(model, images):
    """Textbook Grad-CAM on a private copy: forward hooks keep each stage's output, .backward()."""
    clone = copy.deepcopy(model)
    kept = {}
    for stage in STAGES:
        def keep(_module, _inputs, output, stage=stage):
            output.retain_grad()
            kept[stage] = output

        getattr(clone.trunk, stage)[-1].register_forward_hook(keep)  # the stage's last block
    scores = clone(images)
    scores.sum().backward()
    cams = {stage: (act.grad.mean(dim=(2, 3), keepdim=True) * act).sum(dim=1).detach() for stage, act in kept.items()}
    return cams, scores.detach()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(1234)  # every test sees the same random inputs whatever ran before


@pytest.fixture(scope="module")
def resnet50_model():
    torch.manual_seed(0)
    return build_resmemnet(backbone="resnet50").eval()


# -- the maths -----------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [dict(), dict(head="linear", taps="last")], ids=["lstm-all-taps", "linear-last"])
def test_stage_maps_equal_hook_based_grad_cam(cfg):
    torch.manual_seed(3)
    model = build_resmemnet(backbone="resnet50", **cfg).eval()
    images = torch.rand(2, 3, 64, 96)
    expected, expected_scores = reference_grad_cam(model, images)
    together, scores = stage_cams(model, images, "all")  # one pass, four stage outputs
    assert torch.allclose(scores, expected_scores, atol=1e-6)
    for stage in STAGES:
        scale = float(expected[stage].abs().max())
        assert scale > 0
        assert torch.allclose(together[stage], expected[stage], atol=1e-5 * scale, rtol=1e-4), stage
    for stage in ("layer1", "layer3"):  # a stage alone: the leaf is that stage's own output
        alone, _ = stage_cams(model, images, (stage,))
        scale = float(expected[stage].abs().max())
        assert torch.allclose(alone[stage], expected[stage], atol=1e-5 * scale, rtol=1e-4), stage


def test_parse_layers():
    assert parse_layers("layer4") == ("layer4",)
    assert parse_layers("all") == STAGES
    assert parse_layers("layer4, layer3") == ("layer3", "layer4")
    assert parse_layers(["layer2"]) == ("layer2",)
    for bad in ("layer5", "", "fc", "layer4,conv1"):
        with pytest.raises(ValueError):
            parse_layers(bad)


# -- localisation --------------------------------------------------------------------------------
# A wide image and off-diagonal quadrants: a flipped or transposed map cannot pass.
QUADRANTS = {"top-right": (0, 96, 128, 256), "bottom-left": (96, 192, 0, 128)}


@pytest.mark.parametrize("where", list(QUADRANTS))
def test_map_points_at_the_only_region_the_score_depends_on(where):
    box = QUADRANTS[where]
    model = small_trunk_model(cls=RegionOnly, box=box)
    images = torch.rand(1, 3, 192, 256, generator=torch.Generator().manual_seed(1))  # texture everywhere

    # The setup: the score's gradient with respect to the pixels vanishes outside the box.
    pixels = images.clone().requires_grad_(True)
    (pixel_grad,) = torch.autograd.grad(model(pixels).sum(), pixels)
    outside = 1 - box_mask((192, 256), box)
    assert float((pixel_grad.abs().sum(1)[0] * outside).max()) == 0.0

    for layers, least in ((("layer4",), 0.7), ("all", 0.8)):
        maps, _ = grad_ram(model, images, layers=layers)
        assert mass_in(maps[0], box) > least, (layers, mass_in(maps[0], box))
        cy, cx = centroid(maps[0])
        assert box[0] <= cy < box[1] and box[2] <= cx < box[3], (layers, cy, cx)


def test_map_points_at_the_region_in_the_full_resnet50():
    box = (0, 256, 0, 256)  # top-left quadrant of a 512x512 input; layer4 is 16x16 cells
    torch.manual_seed(0)
    model = make_monotone(RegionOnly(ResMemNetConfig(backbone="resnet50", head="linear", taps="last"), box)).eval()
    images = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    maps, _ = grad_ram(model, images)
    assert mass_in(maps[0], box) > 0.7, mass_in(maps[0], box)


@pytest.mark.parametrize("centre", [(40, 40), (100, 220), (200, 130)])
def test_map_is_aligned_with_the_evidence_to_a_few_pixels(centre):
    """A textured 32x32 patch on black (zero activations) with a unit-scaling trunk: the map's
    centroid sits on the patch, not half a feature cell (16 px) to the bottom right."""
    model = small_trunk_model(input_scaling="unit")
    cy, cx = centre
    images = torch.zeros(1, 3, 256, 288)
    images[..., cy - 16:cy + 16, cx - 16:cx + 16] = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for stage, tolerance in (("layer4", 6.0), ("layer3", 4.0), ("layer2", 3.0)):
        maps, _ = grad_ram(model, images, layers=(stage,))
        my, mx = centroid(maps[0])
        assert abs(my - (cy - 0.5)) < tolerance and abs(mx - (cx - 0.5)) < tolerance, (stage, my, mx)


@pytest.mark.parametrize("value", [0.0, 0.5, 1.0])
def test_constant_image_gives_an_empty_map_without_nans(resnet50_model, value):
    maps, scores = grad_ram(resnet50_model, torch.full((1, 3, 97, 131), value), layers="all")
    assert torch.isfinite(maps).all() and torch.isfinite(scores).all()
    assert float(maps.abs().max()) == 0.0


def test_constant_photo_through_the_image_api(scorer):
    img = Image.new("RGB", (150, 101), (120, 80, 200))
    result = heatmap_for_image(scorer.model, scorer.preprocessing, img)
    assert result.heatmap.shape == (101, 150) and np.isfinite(result.heatmap).all()
    assert float(np.abs(result.heatmap).max()) == 0.0
    assert 0.0 <= result.score <= 1.0


def test_only_negative_evidence_gives_an_empty_map():
    model = small_trunk_model(cls=RegionOnly, box=(0, 64, 0, 64), sign=-1.0)  # score falls with activation
    maps, scores = grad_ram(model, torch.rand(2, 3, 128, 128))
    assert torch.isfinite(maps).all() and float(maps.max()) == 0.0
    assert torch.isfinite(scores).all()


# -- shapes, batches, scores ---------------------------------------------------------------------
@pytest.mark.parametrize("size,layers", [((97, 131), ("layer4",)), ((97, 131), "all"), ((33, 45), ("layer3",)),
                                         ((224, 160), "layer2,layer4")], ids=str)
def test_any_input_size(resnet50_model, size, layers):
    h, w = size
    maps, scores = grad_ram(resnet50_model, torch.rand(2, 3, h, w), layers=layers)
    assert maps.shape == (2, h, w) and maps.dtype == torch.float32
    assert scores.shape == (2,) and scores.dtype == torch.float32
    assert torch.isfinite(maps).all() and float(maps.min()) >= 0.0
    for peak in maps.amax(dim=(1, 2)).tolist():
        assert peak == pytest.approx(1.0) or peak == 0.0


@pytest.mark.parametrize("layers", [("layer4",), "all"], ids=str)
def test_batch_matches_single_images(resnet50_model, layers):
    images = torch.rand(2, 3, 64, 96)
    maps, scores = grad_ram(resnet50_model, images, layers=layers)
    for i in range(2):
        single_map, single_score = grad_ram(resnet50_model, images[i:i + 1], layers=layers)
        # fp32 convolutions differ slightly between batch sizes; 2e-3 is half an 8-bit grey level
        assert torch.allclose(maps[i], single_map[0], atol=2e-3), float((maps[i] - single_map[0]).abs().max())
        assert torch.allclose(scores[i], single_score[0], atol=1e-5)


def test_score_equals_the_scorers(scorer):
    images = torch.rand(3, 3, 64, 96)
    expected = scorer.score_tensor_batch(images)
    for layers in (("layer4",), "all"):
        _, scores = grad_ram(scorer.model, images, layers=layers, autocast_dtype=scorer.autocast_dtype)
        assert torch.allclose(scores, expected, atol=1e-4), layers


def test_mixed_precision_maps_and_scores_stay_close_to_fp32(scorer):
    """On a CPU with native bf16 the Scorer (and so /heatmap) runs the trunk in bf16; forced
    (precision="bf16") it does so on any CPU, so this runs everywhere."""
    from model.scoring import Scorer

    bf16 = Scorer(scorer.model, scorer.preprocessing, device="cpu", precision="bf16")
    assert bf16.autocast_dtype == torch.bfloat16
    images = torch.rand(3, 3, 64, 96)
    fp32_maps, fp32_scores = grad_ram(scorer.model, images, layers="all")
    maps, scores = grad_ram(scorer.model, images, layers="all", autocast_dtype=bf16.autocast_dtype)
    assert torch.allclose(scores, fp32_scores, atol=1e-2)
    assert float((maps - fp32_maps).abs().mean()) < 0.05
    # fp16 is never used for gradients (it would underflow them): the fp32 path is taken
    _, fp16_scores = grad_ram(scorer.model, images, layers="all", autocast_dtype=torch.float16)
    assert torch.equal(fp16_scores, fp32_scores)


def test_image_api_score_equals_score_paths_for_the_same_file(scorer, tmp_path):
    path = tmp_path / "photo.jpg"
    make_image(path, size=(150, 100), seed=4)
    result = heatmap_for_image(scorer.model, scorer.preprocessing, decode_image(path), layer="all",
                               autocast_dtype=scorer.autocast_dtype)
    [row] = list(scorer.score_paths([str(path)]))
    assert result.score == pytest.approx(row.score, abs=1e-4)
    assert result.heatmap.shape == (100, 150) and result.heatmap.dtype == np.float32
    assert result.layers == STAGES and result.input_size == (96, 64)


# -- no side effects, thread safety ------------------------------------------------------------
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs")


def assert_untouched(model, flags, modes, state):
    for name, p in model.named_parameters():
        assert p.grad is None, name
        assert p.requires_grad == flags[name], name
        assert not getattr(p, "_backward_hooks", None), name
    assert {n: m.training for n, m in model.named_modules()} == modes
    for name, module in model.named_modules():
        for attr in HOOK_DICTS:
            assert not getattr(module, attr, {}), (name, attr)
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state), "weights or BatchNorm statistics changed"
    from torch.nn.modules import module as module_globals

    for attr in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks"):
        assert not getattr(module_globals, attr, {}), attr
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen-trunk", "trainable-trunk"])
def test_model_is_left_untouched(frozen):
    torch.manual_seed(5)
    model = build_resmemnet(backbone="resnet50").set_trunk_frozen(frozen).eval()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for layers in (("layer4",), "all"):
        grad_ram(model, torch.rand(2, 3, 64, 64), layers=layers)
        assert_untouched(model, flags, modes, state)
    with torch.inference_mode():  # a caller inside inference mode still gets a map
        maps, _ = grad_ram(model, torch.rand(1, 3, 64, 64))
    assert torch.isfinite(maps).all()
    assert_untouched(model, flags, modes, state)


def test_train_mode_is_refused_and_left_alone():
    model = build_resmemnet(backbone="resnet50").train()
    with pytest.raises(ValueError, match="eval"):
        grad_ram(model, torch.rand(1, 3, 64, 64))
    assert model.training and all(m.training for m in model.modules())


def test_concurrent_heatmaps_and_scoring_match_sequential(scorer):
    gen = torch.Generator().manual_seed(7)
    heat_inputs = [torch.rand(2, 3, 64, 96, generator=gen) for _ in range(3)]
    score_inputs = [torch.rand(4, 3, 64, 64, generator=gen) for _ in range(3)]
    expected_heat = [grad_ram(scorer.model, x, layers="layer3,layer4") for x in heat_inputs]
    expected_scores = [scorer.score_tensor_batch(x) for x in score_inputs]

    start = threading.Barrier(4)

    def heat_job(i):
        start.wait() if i < 2 else None
        return grad_ram(scorer.model, heat_inputs[i % 3], layers="layer3,layer4")

    def score_job(i):
        start.wait() if i < 2 else None
        return scorer.score_tensor_batch(score_inputs[i % 3])

    with ThreadPoolExecutor(max_workers=4) as pool:
        heat = [pool.submit(heat_job, i) for i in range(6)]
        scores = [pool.submit(score_job, i) for i in range(6)]
        for i, future in enumerate(heat):
            maps, s = future.result(timeout=300)
            assert torch.allclose(maps, expected_heat[i % 3][0], atol=1e-5)
            assert torch.allclose(s, expected_heat[i % 3][1], atol=1e-6)
        for i, future in enumerate(scores):
            assert torch.allclose(future.result(timeout=300), expected_scores[i % 3], atol=1e-6)
    assert all(p.grad is None for p in scorer.model.parameters())


# -- overlays of a real map (colour tables and encodings: test_overlay.py) ---------------------
def exif_rotated_jpeg(path, stored_size, patch_box):
    """A JPEG stored sideways (EXIF orientation 6: display rotated 90 degrees clockwise):
    black, with random texture in patch_box (top, bottom, left, right) of the stored pixels."""
    w, h = stored_size
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    top, bottom, left, right = patch_box
    arr[top:bottom, left:right] = np.random.default_rng(0).integers(0, 256, (bottom - top, right - left, 3))
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(path, format="JPEG", quality=95, exif=exif.tobytes())


def test_exif_rotated_jpeg_gives_an_upright_overlay_with_the_map_on_the_patch(tmp_path):
    path = tmp_path / "sideways.jpg"
    exif_rotated_jpeg(path, stored_size=(400, 256), patch_box=(64, 192, 0, 128))  # stored: at the left edge
    img = decode_image(path)
    assert img.size == (256, 400)  # upright: the stored left edge is now the top
    model = small_trunk_model(input_scaling="unit")
    preprocessing = Preprocessing(resize=ResizePolicy(size=192), input_scaling="unit")
    result = heatmap_for_image(model, preprocessing, img, layer="layer3")
    assert result.heatmap.shape == (400, 256)
    assert result.input_size == (192, 288)  # the network saw another aspect ratio (1.5, not 1.5625)
    upright_patch = (0, 128, 64, 192)  # rows 0..128, columns 255-191..255-64
    assert mass_in(result.heatmap, upright_patch) > 0.7
    assert mass_in(result.heatmap, (200, 400, 0, 256)) < 0.02  # nothing in the bottom half
    out = Image.open(io.BytesIO(overlay_png(img, result.heatmap)))
    assert out.size == (256, 400)


# -- CLI -------------------------------------------------------------------------------------------
def run_cli(argv, capsys):
    from app.cli import main

    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_writes_one_overlay_per_image_and_keeps_going(tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    make_image(tmp_path / "a" / "photo.jpg", size=(120, 90), seed=1)
    make_image(tmp_path / "b" / "photo.jpg", size=(90, 120), seed=2)  # same name, other folder
    make_image(tmp_path / "b" / "Photo.png", size=(70, 70), fmt="PNG", seed=3)  # differs only in case
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    out_dir = tmp_path / "out"
    code, out, err = run_cli(["heatmap", str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "missing.jpg"),
                              "-o", str(out_dir), "--weights", str(tiny_checkpoint), "--device", "cpu",
                              "--raw", "--layer", "all", "--colormap", "viridis", "--alpha", "0.6"], capsys)
    assert code == 1
    overlays = sorted(p.name for p in out_dir.glob("*.overlay.png"))
    assert len(overlays) == 3 and len({n.lower() for n in overlays}) == 3, overlays
    assert len(list(out_dir.glob("*.heatmap.png"))) == 3 and len(list(out_dir.glob("*.heatmap.npy"))) == 3
    assert "notes.txt" in err and "missing.jpg" in err
    lines = [line for line in out.splitlines() if "->" in line]
    assert len(lines) == 3 and all("score" in line for line in lines)
    for line in lines:  # every output is the size of its input
        source, rest = line.split(" -> ")
        target = rest.split(" (score")[0]
        assert Image.open(target).size == decode_image(source).size
        assert np.load(target.replace(".overlay.png", ".heatmap.npy")).shape == decode_image(source).size[::-1]


def test_cli_all_good_exits_zero_and_score_matches_scorer(tiny_checkpoint, tmp_path, capsys, scorer):
    path = tmp_path / "one.jpg"
    make_image(path, size=(100, 80), seed=9)
    code, out, _ = run_cli(["heatmap", str(path), "-o", str(tmp_path / "o"), "--weights", str(tiny_checkpoint),
                            "--device", "cpu"], capsys)
    assert code == 0 and (tmp_path / "o" / "one.overlay.png").is_file()
    printed = float(out.split("(score ")[1].split(")")[0])
    [row] = list(scorer.score_paths([str(path)]))
    assert printed == pytest.approx(row.score, abs=1e-4)


def test_cli_rejects_bad_options(tiny_checkpoint, tmp_path, capsys):
    from app.cli import main

    for extra in (["--alpha", "2"], ["--layer", "layer9"], ["--colormap", "nope"]):
        with pytest.raises(SystemExit) as exc:
            main(["heatmap", str(tmp_path), "-o", str(tmp_path / "o"), *extra])
        assert exc.value.code == 2


# -- CUDA (skipped on machines without a GPU) --------------------------------------------------
def test_heatmap_without_weights_uses_the_default_checkpoint(tiny_checkpoint, tmp_path, monkeypatch,
                                                             one_torch_thread, capsys):
    from app.cli import main

    monkeypatch.setenv("RESMEMNET_WEIGHTS", str(tiny_checkpoint))
    folder = tmp_path / "photos"
    folder.mkdir()
    make_image(folder / "a.jpg")
    out = tmp_path / "out"
    assert main(["heatmap", str(folder), "-o", str(out)]) == 0
    assert (out / "a.overlay.png").is_file()
    assert "test-random" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_maps_and_scores_match_cpu_and_leave_the_model_alone(tiny_checkpoint):
    from model.scoring import Scorer

    cpu = Scorer.from_checkpoint(tiny_checkpoint, device="cpu", precision="fp32")
    # The random trunk's activations grow with depth; give it BatchNorm statistics of real scale
    # so fp16/TF32 rounding on the GPU is compared on realistic numbers.
    with torch.no_grad():
        for m in cpu.model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None
        cpu.model.train()
        cpu.model(torch.rand(16, 3, 64, 96))
        cpu.model.eval()
    gpu_model = copy.deepcopy(cpu.model)
    gpu = Scorer(gpu_model, cpu.preprocessing, device="cuda", precision="fp16")  # channels_last, as /score runs
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # exact fp32 convolutions for the CPU comparison
    flags = {n: p.requires_grad for n, p in gpu.model.named_parameters()}
    modes = {n: m.training for n, m in gpu.model.named_modules()}
    state = {k: v.clone() for k, v in gpu.model.state_dict().items()}
    images = torch.rand(3, 3, 64, 96)
    for layers in (("layer4",), "all"):
        cpu_maps, cpu_scores = grad_ram(cpu.model, images, layers=layers)
        gpu_maps, gpu_scores = grad_ram(gpu.model, images.cuda(), layers=layers)
        assert gpu_maps.device.type == "cpu" and torch.isfinite(gpu_maps).all()
        # TF32 convolutions on the GPU: a few grey levels at most
        assert float((gpu_maps - cpu_maps).abs().max()) < 0.05, layers
        assert torch.allclose(gpu_scores, cpu_scores, atol=1e-3)
    torch.backends.cudnn.allow_tf32 = tf32
    # /score on CUDA runs the trunk in fp16; the fp32 heatmap score agrees to about 1e-3
    assert torch.allclose(gpu_scores, gpu.score_tensor_batch(images), atol=5e-3)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    result = heatmap_for_image(gpu.model, gpu.preprocessing, img, device="cuda")
    assert result.heatmap.shape == (90, 120)
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = [pool.submit(grad_ram, gpu.model, images.cuda()) for _ in range(3)]
        futures += [pool.submit(gpu.score_tensor_batch, images) for _ in range(3)]
        results = [f.result(timeout=120) for f in futures]
    for maps, _ in results[:3]:
        assert torch.allclose(maps, results[0][0], atol=1e-4)
    assert_untouched(gpu.model, flags, modes, state)
