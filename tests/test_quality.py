"""model.quality's input warnings on synthetic degenerate inputs, real photos and odd images;
the warnings and percentile a Scorer attaches; CheckpointMeta.percentile."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from model.preprocess import decode_image, to_rgb
from model.quality import WARNING_CODES, input_warnings

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"

WORDS = ("the quick brown fox jumps over a lazy dog while memorability scores of photos are "
         "measured on images of scenes objects and people invoice total page chapter").split()


def _img(arr) -> Image.Image:
    return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8))


def _reencode(img: Image.Image, fmt: str = "JPEG", **kwargs) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return decode_image(buf.getvalue())


def text_page(size, font_size, *, dark_on_light=True, seed=0) -> Image.Image:
    """Random words in PIL's default font, lines 1.5 x the font size apart, filling the page."""
    rng = np.random.default_rng(seed)
    bg, fg = ((248, 248, 245), (25, 25, 25)) if dark_on_light else ((18, 18, 22), (235, 235, 235))
    img = Image.new("RGB", size, bg)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=font_size)
    y = font_size // 2
    while y + font_size < size[1] - font_size // 2:
        draw.text((font_size // 2, y), " ".join(rng.choice(WORDS, 24)), fill=fg, font=font)
        y += int(font_size * 1.5)
    return img


def photo_like(side=512, *, seed=0) -> Image.Image:
    """Smooth random sinusoids + filled shapes + fine grain: a stand-in for a photo."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side] / side
    out = np.full((side, side, 3), 128.0)
    for _ in range(12):
        fx, fy, phase = rng.uniform(-8, 8), rng.uniform(-8, 8), rng.uniform(0, 2 * np.pi)
        out += rng.uniform(5, 25, 3) * np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)[..., None]
    img = _img(out)
    draw = ImageDraw.Draw(img)
    for _ in range(40):
        x0, y0 = (int(v) for v in rng.integers(0, side, 2))
        w, h = (int(v) for v in rng.integers(side // 40, side // 4, 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x0 + w, y0 + h), fill=colour)
    return _img(np.asarray(img, dtype=np.float64) + rng.normal(0, 8, (side, side, 3)))


def _pool_photo() -> Image.Image:
    pool = SHARED_DATA / "pool"
    photos = sorted(pool.glob("*.jpg")) if pool.is_dir() else []
    if not photos:
        pytest.skip("../shared/data/pool is absent")
    return decode_image(photos[0])


# ---- noise -----------------------------------------------------------------------------------

@pytest.mark.parametrize("side", [64, 256, 1024])
@pytest.mark.parametrize("colour", [True, False], ids=["rgb", "grey"])
@pytest.mark.parametrize("kind", ["uniform", "gaussian", "salt_and_pepper"])
def test_noise_fields_warn_noise(side, colour, kind):
    rng = np.random.default_rng(side)
    shape = (side, side, 3) if colour else (side, side)
    if kind == "uniform":
        arr = rng.integers(0, 256, shape)
    elif kind == "gaussian":
        arr = rng.normal(128, 40, shape)
    else:
        arr = np.full(shape, 128.0)
        u = rng.random((side, side))
        arr[u < 0.1], arr[u > 0.9] = 0, 255
    assert input_warnings(_img(arr)) == ["noise"]


# ---- flat ------------------------------------------------------------------------------------

@pytest.mark.parametrize("colour", [(0, 0, 0), (255, 255, 255), (128, 128, 128), (200, 30, 60)])
def test_one_colour_is_flat(colour):
    assert input_warnings(Image.new("RGB", (400, 300), colour)) == ["flat"]


@pytest.mark.parametrize("lo,hi", [(100, 110), (0, 8), (245, 255)])
def test_faint_gradient_is_flat(lo, hi):
    ramp = np.tile(np.linspace(lo, hi, 400), (300, 1))
    assert input_warnings(_img(np.stack([ramp] * 3, -1))) == ["flat"]


@pytest.mark.parametrize("seed", range(3))
def test_faint_noise_is_flat_not_noise(seed):
    rng = np.random.default_rng(seed)
    img = _img(rng.normal(60 + 60 * seed, 1.5, (300, 400, 3)))
    assert input_warnings(img) == ["flat"]
    assert input_warnings(_reencode(img, "PNG")) == ["flat"]


# ---- text ------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(400, 300), (640, 480), (1024, 768)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("font_size", [10, 14, 18, 22, 28])
@pytest.mark.parametrize("dark_on_light", [True, False], ids=["dark_on_light", "light_on_dark"])
def test_text_pages_warn_text_also_after_jpeg(size, font_size, dark_on_light):
    page = text_page(size, font_size, dark_on_light=dark_on_light, seed=font_size)
    assert input_warnings(page) == ["text"]
    assert input_warnings(_reencode(page, "JPEG", quality=75)) == ["text"]


# ---- low resolution --------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(48, 36), (63, 63), (20, 60)])
def test_pictures_under_64_px_are_low_resolution(size):
    small = photo_like(256, seed=1).resize(size, Image.BICUBIC)
    assert input_warnings(small) == ["low_resolution"]


@pytest.mark.parametrize("upscale", [Image.BICUBIC, Image.BILINEAR], ids=["bicubic", "bilinear"])
@pytest.mark.parametrize("seed", range(3))
def test_smooth_upscale_from_32_px_is_low_resolution(seed, upscale):
    photo = photo_like(512, seed=seed)
    assert input_warnings(photo) == []
    up = photo.resize((32, 32), Image.BICUBIC).resize((512, 512), upscale)
    assert input_warnings(up) == ["low_resolution"]


def test_upscaled_real_pool_photo_is_low_resolution():
    photo = _pool_photo()
    assert input_warnings(photo) == []
    up = photo.resize((32, 32), Image.BICUBIC).resize((512, 512), Image.BICUBIC)
    assert input_warnings(up) == ["low_resolution"]


@pytest.mark.parametrize("seed", range(3))
def test_nearest_neighbour_upscale_of_random_32_px_is_low_resolution(seed):
    rng = np.random.default_rng(seed)
    up = _img(rng.integers(0, 256, (32, 32, 3))).resize((512, 512), Image.NEAREST)
    assert input_warnings(up) == ["low_resolution"]


# ---- photos get nothing ----------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_photo_like_pictures_get_no_warning(seed):
    photo = photo_like(512, seed=seed)
    assert input_warnings(photo) == []
    assert input_warnings(_reencode(photo, "JPEG", quality=85)) == []
    assert input_warnings(photo.resize((320, 240), Image.BOX)) == []


def test_real_pool_photo_gets_no_warning():
    assert input_warnings(_pool_photo()) == []


@pytest.mark.slow
def test_at_most_one_percent_of_real_photos_are_warned():
    folders = [SHARED_DATA / "lnsim" / "Image_data", SHARED_DATA / "pool"]
    if not all(f.is_dir() for f in folders):
        pytest.skip("../shared/data/lnsim or ../shared/data/pool is absent")
    rng = np.random.default_rng(0)
    sample = []
    for folder in folders:  # 150 from each, a fixed sample
        files = sorted(folder.glob("*.jpg"))
        sample += [files[i] for i in sorted(rng.choice(len(files), size=min(150, len(files)), replace=False))]
    warned = {p.name: w for p in sample if (w := input_warnings(decode_image(p)))}
    assert len(warned) <= len(sample) // 100, warned


# ---- odd sizes and modes never raise ---------------------------------------------------------

def _valid(warns) -> bool:
    return isinstance(warns, list) and set(warns) <= set(WARNING_CODES) and len(set(warns)) == len(warns)


@pytest.mark.parametrize("n_frames,truncated,picture,expected", [
    (1, False, "flat", ["flat"]),
    (3, False, "flat", ["flat", "multi_frame"]),
    (1, True, "flat", ["flat", "truncated_end"]),
    (4, True, "flat", ["flat", "multi_frame", "truncated_end"]),
    (1, True, "photo", ["truncated_end"]),
])
def test_file_level_codes_come_last_in_their_order(n_frames, truncated, picture, expected):
    img = Image.new("RGB", (400, 300), (90, 90, 90)) if picture == "flat" else photo_like(512, seed=0)
    img.info["n_frames"] = n_frames
    if truncated:
        img.info["truncated_end"] = True
    assert input_warnings(img) == expected
    assert WARNING_CODES[-2:] == ("multi_frame", "truncated_end")


@pytest.mark.parametrize("size", [(1, 1), (1, 5000), (5000, 1), (2, 2), (3, 1000), (7, 9), (20000, 2), (1, 60000)])
@pytest.mark.parametrize("content", ["random", "constant"])
def test_extreme_sizes_never_raise(size, content):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (size[1], size[0], 3)) if content == "random" else np.full((size[1], size[0], 3), 90)
    img = _img(arr)
    assert _valid(input_warnings(img))
    decoded = _reencode(img, "PNG")
    warns = input_warnings(decoded)
    assert _valid(warns)
    if content == "constant":
        assert warns == ["flat"]


ALL_MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "LA", "PA",
             "RGBX", "RGBa", "La", "I;16", "I;16B", "I;16L", "I;16N"]


def _in_mode(img: Image.Image, mode: str) -> Image.Image:
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return img.convert("L").convert("I").convert(mode)
    if mode == "La":
        return img.convert("LA").convert("La")
    if mode in ("RGBa", "PA"):
        return img.convert("RGBA").convert(mode)
    return img.convert(mode)


@pytest.mark.parametrize("mode", ALL_MODES)
@pytest.mark.parametrize("picture", ["photo", "flat", "noise", "tiny"])
def test_every_mode_through_decode_image(mode, picture):
    rng = np.random.default_rng(0)
    base = {
        "photo": photo_like(128, seed=3),
        "flat": Image.new("RGB", (120, 90), (70, 140, 210)),
        "noise": _img(rng.integers(0, 256, (90, 120, 3))),
        "tiny": _img(rng.integers(0, 256, (1, 1, 3))),
    }[picture]
    try:
        img = _in_mode(base, mode)
    except (ValueError, OSError) as exc:
        pytest.skip(f"this Pillow cannot convert to {mode}: {exc}")
    data = None
    for fmt in ("PNG", "TIFF"):
        buf = io.BytesIO()
        try:
            img.save(buf, format=fmt)
        except (OSError, ValueError, KeyError):
            continue
        data = buf.getvalue()
        break
    # Modes no format writes (HSV, RGBa, La, I;16N) go through the same conversion decode_image uses.
    decoded = decode_image(data) if data is not None else to_rgb(img)
    assert decoded.mode == "RGB"
    warns = input_warnings(decoded)
    assert _valid(warns)
    # Pillow dithers a colour to mode 1 and to its web palette (P, PA): a flat colour becomes a
    # dot pattern there, so only the modes that keep the samples are held to the exact code.
    if mode not in ("1", "P", "PA"):
        assert warns == {"flat": ["flat"], "noise": ["noise"], "tiny": ["flat"]}.get(picture, warns)


# ---- what the scorer attaches ----------------------------------------------------------------

def _reference_checkpoint(tiny_checkpoint, tmp_path, quantiles):
    for src in (tiny_checkpoint, tiny_checkpoint.with_suffix(".safetensors")):
        shutil.copy(src, tmp_path / src.name)
    path = tmp_path / tiny_checkpoint.name
    data = json.loads(path.read_text())
    data["reference"] = {"set": "test", "n": 101, "quantiles": quantiles}
    path.write_text(json.dumps(data))
    return path


def test_scorer_results_carry_warnings_and_percentile(tiny_checkpoint, tmp_path, one_torch_thread):
    from model.checkpoint import read_meta
    from model.scoring import Scorer

    files = {"flat.png": Image.new("RGB", (96, 96), (128, 128, 128)), "photo.png": photo_like(128, seed=2),
             "page.png": text_page((400, 300), 14)}
    paths = []
    for name, img in files.items():
        img.save(tmp_path / name)
        paths.append(str(tmp_path / name))
    expected = {"flat.png": ["flat"], "photo.png": [], "page.png": ["text"]}

    plain = list(Scorer.from_checkpoint(tiny_checkpoint, device="cpu").score_paths(paths, batch_size=3))
    for result in plain:
        assert result.ok and result.warnings == expected[result.path.rsplit("/", 1)[1]]
        assert result.percentile is None

    quantiles = list(np.linspace(0.2, 0.8, 101))
    (tmp_path / "ref").mkdir()
    ckpt = _reference_checkpoint(tiny_checkpoint, tmp_path / "ref", quantiles)
    meta = read_meta(ckpt)
    ranked = list(Scorer.from_checkpoint(ckpt, device="cpu").score_paths(paths, batch_size=3))
    for before, result in zip(plain, ranked):
        assert result.score == pytest.approx(before.score, abs=1e-6)
        assert result.warnings == before.warnings
        assert result.percentile is not None and 0.0 <= result.percentile <= 100.0
        assert result.percentile == meta.percentile(result.score)


# ---- CheckpointMeta.percentile ---------------------------------------------------------------

def _meta(quantiles):
    from model.trunks import TrunkSource
    from model.checkpoint import CheckpointMeta
    from model.network import ResMemNetConfig
    from model.preprocess import Preprocessing

    reference = {"set": "test", "n": 1000, "quantiles": quantiles} if quantiles is not None else {}
    return CheckpointMeta(name="t", architecture=ResMemNetConfig(), preprocessing=Preprocessing(),
                          trunk=TrunkSource(kind="none", depth="resnet50"), trunk_embedded=True,
                          reference=reference)


def test_percentile_is_none_without_reference():
    assert _meta(None).percentile(0.5) is None
    assert _meta([]).percentile(0.5) is None


def test_percentile_ends_and_linear_interpolation():
    meta = _meta(list(np.linspace(0.2, 0.7, 101)))
    assert meta.percentile(0.0) == 0.0 and meta.percentile(0.19) == 0.0
    assert meta.percentile(1.0) == 100.0 and meta.percentile(0.71) == 100.0
    assert meta.percentile(0.2) == 0.0 and meta.percentile(0.7) == 100.0
    assert meta.percentile(0.45) == pytest.approx(50.0, abs=0.01)
    assert meta.percentile(0.2 + 0.005 * 37) == pytest.approx(37.0, abs=0.01)


def test_percentile_is_monotone():
    rng = np.random.default_rng(0)
    quantiles = np.quantile(rng.beta(2, 5, 5000), np.linspace(0, 1, 101))
    quantiles[40:46] = quantiles[40]  # a flat stretch, as a coarse reference set gives
    quantiles = np.maximum.accumulate(quantiles)
    meta = _meta(quantiles.tolist())
    scores = np.linspace(-0.1, 1.1, 2001)
    ranks = [meta.percentile(float(s)) for s in scores]
    assert all(0.0 <= r <= 100.0 for r in ranks)
    assert all(b >= a for a, b in zip(ranks, ranks[1:]))


def test_flat_stretch_takes_the_middle():
    quantiles = list(np.linspace(0.0, 0.3, 41)) + [0.3] * 20 + list(np.linspace(0.3, 0.7, 41)[1:])
    assert len(quantiles) == 101
    meta = _meta(quantiles)
    # 0.3 is the 40th..60th percentile: the middle is 50
    assert meta.percentile(0.3) == pytest.approx(50.0, abs=0.01)
    assert meta.percentile(0.3 - 1e-9) == pytest.approx(40.0, abs=0.01)
    assert meta.percentile(0.3 + 1e-9) == pytest.approx(60.0, abs=0.01)
    # every quantile equal: any score at that value is the median, anything else an end
    same = _meta([0.5] * 101)
    assert same.percentile(0.5) == 50.0 and same.percentile(0.4) == 0.0 and same.percentile(0.6) == 100.0
