"""Field inputs (issue 11): bit depths and float pixels, colour management, several images where one
is expected. Pixel checks on decode_image() need no model; service checks compare scores with the
clean equivalent's (within 1e-3) through the app in-process. The inputs in ../shared/field are used
when present (skipped otherwise); every kind is also covered by inputs made here."""
from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from PIL import Image, ImageCms

from conftest import REPO
from model.preprocess import ImageDecodeError, decode_image, to_rgb

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

FIELD = REPO.parent / "shared" / "field"
needs_field = pytest.mark.skipif(not FIELD.is_dir(), reason="../shared/field is not here")
TOL = 1e-3


def photo(size=(96, 64), seed=0) -> Image.Image:
    """A smooth colour picture with texture (so lossy mode round trips stay close)."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    arr = np.stack([x, y, 1 - x * y], -1) * 200 + rng.integers(0, 40, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def pgm16(samples: np.ndarray) -> bytes:
    h, w = samples.shape
    return f"P5\n{w} {h}\n65535\n".encode() + samples.astype(">u2").tobytes()


def px(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(int)


# -- every mode, every bit depth -------------------------------------------------------------
GREY = np.asarray(photo().convert("L"))


@pytest.mark.parametrize("make", [
    pytest.param(lambda: Image.fromarray(GREY, "L"), id="L"),
    pytest.param(lambda: Image.fromarray(GREY, "L").convert("LA"), id="LA"),
    pytest.param(lambda: Image.fromarray(GREY, "L").convert("I"), id="I-pillow"),
    pytest.param(lambda: Image.fromarray(GREY, "L").convert("I;16"), id="I;16-pillow"),
    pytest.param(lambda: Image.fromarray(GREY, "L").convert("F"), id="F-pillow"),
    pytest.param(lambda: Image.fromarray(GREY.astype(np.uint16) * 257), id="I;16-array"),
    pytest.param(lambda: Image.fromarray(GREY.astype(np.int32) * 257, "I"), id="I-16bit"),
    pytest.param(lambda: Image.fromarray(GREY.astype(np.float32) / 255, "F"), id="F-unit"),
    pytest.param(lambda: encode(Image.fromarray(GREY.astype(np.uint16) * 257), "PNG"), id="png16"),
    pytest.param(lambda: pgm16(GREY.astype(np.uint16) * 257), id="pgm-maxval-65535"),
    pytest.param(lambda: encode(Image.fromarray(GREY.astype(np.uint16) * 257), "TIFF"), id="tiff16"),
    pytest.param(lambda: encode(Image.fromarray(GREY.astype(np.float32) / 255, "F"), "TIFF"), id="tiff-float"),
    pytest.param(lambda: encode(Image.fromarray(GREY.astype(np.float32), "F"), "TIFF"), id="tiff-float-0-255"),
    pytest.param(lambda: encode(Image.fromarray(GREY.astype(np.int32) * 257, "I"), "TIFF"), id="tiff-int32"),
])
def test_grey_content_gives_the_same_pixels_in_every_mode_and_depth(make):
    img = make()
    want = np.repeat(GREY[..., None], 3, -1).astype(int)
    got = decode_image(img) if isinstance(img, bytes) else to_rgb(img)  # files: the whole decode path
    assert got.mode == "RGB" and np.abs(px(got) - want).max() == 0


def test_pgm_and_png16_of_the_same_samples_decode_alike_also_when_dark():
    dark = (GREY.astype(np.uint16) * 40 + 1240).astype(np.uint16)  # like the field's dark16: 1240..~11000
    from_pgm = decode_image(pgm16(dark))
    from_png = decode_image(encode(Image.fromarray(dark), "PNG"))
    ref8 = np.rint(dark / 257).astype(int)
    assert Image.open(io.BytesIO(pgm16(dark))).mode == "I"
    assert np.abs(px(from_pgm)[..., 0] - ref8).max() == 0
    assert np.abs(px(from_png)[..., 0] - ref8).max() == 0


@pytest.mark.parametrize("mode,tolerance", [("RGB", 0), ("RGBA", 0), ("RGBX", 0), ("RGBa", 0), ("CMYK", 0),
                                            ("YCbCr", 1.5), ("LAB", 1.5), ("HSV", 1.5)])
def test_colour_content_gives_the_same_pixels_in_every_colour_mode(mode, tolerance):
    """Exact where the mode holds RGB losslessly; within the 8-bit round trip's own error (mean
    difference under 1.5 levels) for YCbCr, LAB and HSV, whose 8-bit channels quantise colour."""
    base = photo()
    converted = base.convert(mode)
    got = to_rgb(converted)
    assert got.mode == "RGB"
    assert np.abs(px(got) - px(base)).mean() <= tolerance
    if tolerance:
        assert np.abs(px(got) - px(converted.convert("RGB"))).max() <= 1


def test_palette_and_bilevel_modes():
    base = photo().quantize(64)
    assert np.array_equal(px(to_rgb(base)), px(base.convert("RGB")))
    assert np.array_equal(px(to_rgb(base.convert("PA"))), px(base.convert("RGB")))
    bilevel = photo().convert("1")
    assert set(np.unique(px(to_rgb(bilevel)))) <= {0, 255}
    assert np.array_equal(px(to_rgb(bilevel))[..., 0], np.asarray(bilevel.convert("L")).astype(int))


def test_alpha_is_composited_over_white_in_every_alpha_mode():
    grey = Image.fromarray(GREY, "L")
    half = Image.new("L", grey.size, 128)
    la = grey.copy()
    la.putalpha(half)
    expected = np.rint((GREY.astype(float) * 128 + 255 * 127) / 255)
    assert np.abs(px(to_rgb(la))[..., 0] - expected).max() <= 1
    rgba = photo().convert("RGBA")
    rgba.putalpha(0)
    assert (px(to_rgb(rgba)) == 255).all()
    assert (px(to_rgb(rgba.convert("RGBa"))) == 255).all()
    la_clear = grey.convert("LA")
    la_clear.putalpha(0)
    assert (px(to_rgb(la_clear.convert("La"))) == 255).all()


# -- non-finite float samples ----------------------------------------------------------------
FLOAT = GREY.astype(np.float32) / 255


def float_tiff(arr: np.ndarray) -> bytes:
    return encode(Image.fromarray(arr.astype(np.float32), "F"), "TIFF")


def test_a_few_nan_samples_are_patched_not_blackened():
    clean = px(decode_image(float_tiff(FLOAT)))
    arr = FLOAT.copy()
    arr[5, 7] = np.nan
    arr[10, 20] = np.inf
    arr[11, 21] = -np.inf
    got = px(decode_image(float_tiff(arr)))
    differs = np.argwhere((got != clean).any(-1))
    assert {tuple(p) for p in differs} <= {(5, 7), (10, 20), (11, 21)}
    assert got[10, 20, 0] == 255 and got[11, 21, 0] == 0
    assert abs(got[5, 7, 0] - FLOAT.mean() * 255) <= 1  # the mean of the finite samples


@pytest.mark.parametrize("fill", ["half-nan", "all-nan", "all-inf"])
def test_mostly_non_finite_floats_are_refused(fill):
    arr = FLOAT.copy()
    if fill == "half-nan":
        arr[: arr.shape[0] // 2] = np.nan
    else:
        arr[:] = np.nan if fill == "all-nan" else np.inf
    with pytest.raises(ImageDecodeError) as info:
        decode_image(float_tiff(arr))
    assert info.value.reason == "non_finite"


# -- colour management -----------------------------------------------------------------------
def srgb_profile_bytes() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def test_an_embedded_srgb_profile_changes_nothing_and_garbage_or_mismatched_ones_are_ignored():
    base = photo()
    plain = px(decode_image(encode(base, "PNG")))
    tagged = px(decode_image(encode(base, "PNG", icc_profile=srgb_profile_bytes())))
    assert np.abs(tagged - plain).max() <= 1
    garbage = px(decode_image(encode(base, "PNG", icc_profile=b"\0" * 200 + b"not a profile")))
    assert np.array_equal(garbage, plain)
    lab_profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    assert np.array_equal(px(decode_image(encode(base, "PNG", icc_profile=lab_profile))), plain)
    assert "icc_profile" not in decode_image(encode(base, "PNG", icc_profile=srgb_profile_bytes())).info


def test_a_lab_profile_on_lab_pixels_is_converted():
    base = photo()
    lab = ImageCms.applyTransform(base, ImageCms.buildTransform(
        ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB"))
    got = to_rgb(lab, icc_profile=ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes())
    assert np.abs(px(got) - px(base)).mean() <= 1.0


@needs_field
@pytest.mark.parametrize("name,ref", [("prophoto.png", "ref_prophoto_png_srgb.png"),
                                      ("adobergb.png", "ref_adobergb_png_srgb.png"),
                                      ("adobergb.jpg", "ref_adobergb_jpg_srgb.png"),
                                      ("broken_icc.png", "srgb.png")])
def test_field_icc_files_decode_to_their_colour_managed_srgb(name, ref):
    got, want = px(decode_image(FIELD / "icc" / name)), px(decode_image(FIELD / "icc" / ref))
    assert np.abs(got - want).max() <= 1


@needs_field
def test_field_bit_depth_files_decode_alike():
    ref = px(decode_image(FIELD / "bit-depth" / "ref_dark8.png"))
    assert np.array_equal(px(decode_image(FIELD / "bit-depth" / "dark16.png")), ref)
    assert np.array_equal(px(decode_image(FIELD / "bit-depth" / "dark16.pgm")), ref)
    nan, clean = (px(decode_image(FIELD / "bit-depth" / f)) for f in ("float01_nan.tif", "float01.tif"))
    assert (nan != clean).any(-1).sum() <= 1
    assert px(decode_image(FIELD / "bit-depth" / "black.png")).max() == 0 and nan.mean() > 20


# -- through the service ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def scorer(tiny_checkpoint):
    from model.scoring import Scorer

    return Scorer.from_checkpoint(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def client(scorer, one_torch_thread):
    from test_service_api import serving

    with serving(scorer, max_files_per_request=4) as c:
        yield c


def score_of(client, data: bytes, name="x") -> float:
    r = client.post("/score", files={"file": (name, data, "application/octet-stream")})
    assert r.status_code == 200, r.text
    return r.json()["score"]


def test_service_scores_16bit_and_float_inputs_like_their_8bit_equivalent(client):
    ref = score_of(client, encode(Image.fromarray(GREY, "L"), "PNG"))
    for data in (pgm16(GREY.astype(np.uint16) * 257), encode(Image.fromarray(GREY.astype(np.uint16) * 257), "PNG"),
                 float_tiff(FLOAT)):
        assert abs(score_of(client, data) - ref) < TOL
    arr = FLOAT.copy()
    arr[3, 3] = np.nan
    assert abs(score_of(client, float_tiff(arr)) - ref) < TOL
    arr[: arr.shape[0] // 2] = np.nan
    r = client.post("/score", files={"file": ("nan.tif", float_tiff(arr), "image/tiff")})
    assert r.status_code == 422 and r.json()["error"]["reason"] == "non_finite", r.text


@needs_field
def test_service_scores_field_files_like_their_clean_equivalents(client):
    def s(*parts):
        return score_of(client, FIELD.joinpath(*parts).read_bytes(), parts[-1])

    assert abs(s("bit-depth", "dark16.png") - s("bit-depth", "ref_dark8.png")) < TOL
    assert abs(s("bit-depth", "dark16.pgm") - s("bit-depth", "ref_dark8.png")) < TOL
    assert abs(s("bit-depth", "float01_nan.tif") - s("bit-depth", "float01.tif")) < TOL
    for name, ref in (("prophoto.png", "ref_prophoto_png_srgb.png"), ("adobergb.png", "ref_adobergb_png_srgb.png"),
                      ("adobergb.jpg", "ref_adobergb_jpg_srgb.png"), ("broken_icc.png", "srgb.png")):
        assert abs(s("icc", name) - s("icc", ref)) < TOL, name


@needs_field
def test_heatmap_overlay_is_drawn_on_the_colour_managed_pixels(client):
    def overlay(name):
        r = client.post("/heatmap", params={"alpha": 0.0},  # alpha 0: the photo alone, as drawn
                        files={"file": (name, (FIELD / "icc" / name).read_bytes(), "image/png")})
        assert r.status_code == 200, r.text
        return px(Image.open(io.BytesIO(r.content)).convert("RGB"))

    managed, ref = overlay("prophoto.png"), overlay("ref_prophoto_png_srgb.png")
    assert np.abs(managed - ref).max() <= 1
    raw = px(Image.open(FIELD / "icc" / "prophoto.png").convert("RGB"))
    assert np.abs(managed - raw).mean() > 2  # not the unmanaged pixels


def test_overlay_of_an_undecoded_image_with_a_profile_is_colour_managed():
    from model.overlay import overlay_image

    base = photo()
    tagged = Image.open(io.BytesIO(encode(base, "PNG", icc_profile=srgb_profile_bytes())))
    heat = np.zeros((8, 8), np.float32)
    assert np.abs(px(overlay_image(tagged, heat, alpha=0.0)) - px(base)).max() <= 1
    assert np.array_equal(px(overlay_image(base.convert("LA"), heat, alpha=0.0)), px(base.convert("L").convert("RGB")))


# -- several images where one is expected, and other multipart edges --------------------------
def errors_total(client, reason: str) -> float:
    from test_service_api import error_count

    return error_count(client, reason)


def png(seed: int) -> bytes:
    return encode(photo(seed=seed), "PNG")


@pytest.mark.parametrize("path", ["/score", "/heatmap"])
def test_two_files_in_a_one_image_endpoint_are_refused_not_dropped(client, path):
    before = errors_total(client, "multiple_files")
    r = client.post(path, files=[("file", ("a.png", png(1), "image/png")), ("file", ("b.png", png(2), "image/png"))])
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["reason"] == "multiple_files"
    assert "/score/batch" in err["message"] and "a.png" in err["message"] and "b.png" in err["message"]
    assert errors_total(client, "multiple_files") == before + 1


@needs_field
def test_field_duplicate_parts_and_their_batch_answer(client):
    a, b = ((FIELD / "duplicate-parts" / n).read_bytes() for n in ("a.png", "b.png"))
    r = client.post("/score", files=[("file", ("a.png", a, "image/png")), ("file", ("b.png", b, "image/png"))])
    assert r.status_code == 422 and r.json()["error"]["reason"] == "multiple_files"
    batch = client.post("/score/batch", files=[("files", ("a.png", a, "image/png")), ("files", ("b.png", b, "image/png"))])
    scores = [item["score"] for item in batch.json()["results"]]
    assert abs(scores[0] - score_of(client, a)) < TOL and abs(scores[1] - score_of(client, b)) < TOL


@pytest.mark.parametrize("path,files,params,status,reason", [
    ("/score", [("file", ("a.png", png(1), "image/png")), ("files", ("b.png", png(2), "image/png"))], {},
     422, "unexpected_field"),
    ("/score", [("file", ("a.png", png(1), "image/png")), ("note", (None, b"hello"))], {}, 422, "unexpected_field"),
    ("/score/batch", [("files", ("a.png", png(1), "image/png")), ("file", ("b.png", png(2), "image/png"))], {},
     422, "unexpected_field"),
    ("/score", [("file", ("a.png", png(1), "image/png"))], {"alpha": "0.3"}, 422, "unexpected_field"),
    ("/heatmap", [("file", ("a.png", png(1), "image/png"))], {"colourmap": "viridis"}, 422, "unexpected_field"),
    ("/heatmap", [("file", ("a.png", png(1), "image/png"))], [("alpha", "0.2"), ("alpha", "0.9")],
     422, "invalid_request"),
    ("/score", [("file", (None, b"\x89PNG not sent as a file"))], {}, 422, "invalid_request"),
])
def test_nothing_sent_is_silently_ignored(client, path, files, params, status, reason):
    before = errors_total(client, reason)
    r = client.post(path, files=files, params=params)
    assert r.status_code == status and r.json()["error"]["reason"] == reason, r.text
    assert errors_total(client, reason) == before + 1


def test_a_truncated_multipart_body_is_refused_not_half_scored(client):
    body = b"".join(
        b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"%d.png\"\r\n"
        b"Content-Type: image/png\r\n\r\n" % i + png(i) + b"\r\n" for i in range(2))
    cut = body[:-200]  # the second file's end and the closing boundary are missing
    r = client.post("/score/batch", content=cut, headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 400 and r.json()["error"]["reason"] == "bad_request", r.text
    assert "cut short" in r.json()["error"]["message"]
    whole = client.post("/score/batch", content=body + b"--b--\r\n",
                        headers={"content-type": "multipart/form-data; boundary=b"})
    assert whole.status_code == 200 and whole.json()["scored"] == 2


def test_more_files_than_the_multipart_parser_takes_is_413_too_many_files(client):
    files = [("files", (f"{i}.png", b"x", "image/png")) for i in range(1001)]
    r = client.post("/score/batch", files=files)
    assert r.status_code == 413 and r.json()["error"]["reason"] == "too_many_files", r.text


@pytest.mark.parametrize("mode,key", [("RGB", (1, 2, 3)), ("L", 7)])
def test_a_png_colour_key_is_transparent_like_an_alpha_channel(mode, key):
    img = Image.new(mode, (6, 4), 50 if mode == "L" else (10, 20, 30))
    img.putpixel((0, 0), key)
    got = decode_image(encode(img, "PNG", transparency=key))
    assert got.getpixel((0, 0)) == (255, 255, 255)
    assert got.getpixel((1, 1)) == ((50, 50, 50) if mode == "L" else (10, 20, 30))


def png16(arr: np.ndarray, color_type: int, trns: bytes | None = None) -> bytes:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit colour): 0 grey, 2 RGB, 4 grey+alpha, 6 RGBA."""
    import struct
    import zlib

    h, w = arr.shape[:2]

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\0" + arr[y].astype(">u2").tobytes() for y in range(h))
    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
    if trns is not None:
        out += chunk(b"tRNS", trns)
    return out + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_16bit_colour_pngs_and_a_16bit_colour_key():
    import struct

    v8 = np.asarray(photo(size=(12, 8))).astype(np.uint16)
    opaque = np.full(v8.shape[:2], 65535, np.uint16)
    assert np.array_equal(px(decode_image(png16(v8 * 257, 2))), v8)
    assert np.array_equal(px(decode_image(png16(np.dstack([v8 * 257, opaque]), 6))), v8)
    grey = v8[..., 0]
    assert np.array_equal(px(decode_image(png16(np.dstack([grey * 257, opaque]), 4)))[..., 0], grey)
    keyed = decode_image(png16(grey * 257, 0, trns=struct.pack(">H", int(grey[0, 0]) * 257)))
    assert keyed.getpixel((0, 0)) == (255, 255, 255)
    assert np.array_equal(px(keyed)[..., 0][grey != grey[0, 0]], grey[grey != grey[0, 0]])
