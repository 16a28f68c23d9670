"""Fuzzing the upload/decode path with Hypothesis (issue 11): random mutations of valid PNG, JPEG,
GIF, TIFF, WebP, BMP, PGM, HEIC, AVIF and JPEG 2000 bytes (16-bit, float, ICC, EXIF, alpha,
frames and pages, a JPEG without its end marker among them), through
decode_image() and through the app in-process with random part headers. Property: every outcome
is an RGB image / a score in [0, 1], or a clean refusal (ImageDecodeError / 4xx JSON error);
never a 500, another exception, a non-finite value or a hang (the pixel limit bounds the work).
A bounded run here; `python bench/fuzz.py` runs the long one (counts and findings in
docs/robustness.md)."""
from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pytest
from PIL import Image, ImageCms

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from model.preprocess import ImageDecodeError, Preprocessing, ResizePolicy, decode_image  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient  # noqa: E402

# Pillow warns about the damaged files it still reads; that is expected here
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

MAX_PIXELS = 2_000_000  # bounds the work of any one input
REASONS = {"empty", "corrupt", "not_an_image", "too_many_pixels", "non_finite"}


def seed_corpus() -> list[bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8), "RGB")
    out = []

    def save(img, fmt, **kw):
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        out.append(buf.getvalue())

    exif = Image.Exif()
    exif[0x0112] = 6
    save(rgb, "PNG")
    save(rgb.convert("RGBA"), "PNG", icc_profile=ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    save(rgb, "JPEG", quality=80, exif=exif)
    save(rgb.convert("CMYK"), "JPEG")
    save(rgb.convert("P"), "GIF")
    save(rgb, "TIFF")
    save(Image.fromarray((rng.random((24, 32)) * 65535).astype(np.uint16)), "PNG")
    save(Image.fromarray(rng.random((24, 32)).astype(np.float32), "F"), "TIFF")
    save(rgb, "WEBP", quality=70)
    save(rgb.convert("LA"), "PNG")
    save(rgb.convert("1"), "BMP")
    out.append(b"P5\n8 6\n65535\n" + (rng.integers(0, 65536, 48, dtype=np.uint16)).astype(">u2").tobytes())
    # issue 21: HEIC, AVIF, JPEG 2000, a progressive JPEG without its end marker, several frames/pages
    from model.formats import register_plugins

    register_plugins()
    save(rgb, "HEIF", quality=60)
    save(rgb.convert("RGBA"), "AVIF", quality=60)
    save(rgb, "JPEG2000")
    save(rgb, "JPEG", quality=80, progressive=True)
    out[-1] = out[-1][:-2]
    frames = [rgb, rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT), rgb.convert("L").convert("RGB")]
    save(frames[0], "PNG", save_all=True, append_images=frames[1:])
    save(frames[0].convert("P"), "GIF", save_all=True, append_images=[f.convert("P") for f in frames[1:]])
    save(frames[0], "TIFF", save_all=True, append_images=frames[1:])
    return out


SEEDS = seed_corpus()


@st.composite
def mutated_image(draw) -> bytes:
    data = bytearray(SEEDS[draw(st.integers(0, len(SEEDS) - 1))])
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "repeat", "header"]))
        n = len(data)
        if n == 0:
            break
        pos = draw(st.integers(0, n - 1))
        if kind == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[pos] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[pos:pos + draw(st.integers(1, 64))]
        elif kind == "truncate":
            del data[pos:]
        elif kind == "repeat":
            data[pos:pos] = data[pos:pos + draw(st.integers(1, 64))]
        else:  # the header region: sizes, depths, chunk lengths
            pos = draw(st.integers(0, min(n, 64) - 1))
            data[pos] = draw(st.integers(0, 255))
    return bytes(data)


def check_decode(data: bytes) -> str:
    """The property for one input; returns the outcome ("ok" or the refusal's reason)."""
    try:
        img = decode_image(data, max_pixels=MAX_PIXELS)
    except ImageDecodeError as exc:
        assert exc.reason in REASONS and exc.message
        return exc.reason
    assert img.mode == "RGB" and img.width >= 1 and img.height >= 1
    tensor = Preprocessing(resize=ResizePolicy(size=64)).image_to_tensor(img)
    assert bool(tensor.isfinite().all()) and 0.0 <= float(tensor.min()) and float(tensor.max()) <= 1.0
    return "ok"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(mutated_image())
def test_decode_image_never_fails_uncleanly(data):
    check_decode(data)


def test_the_seeds_themselves_decode():
    assert [check_decode(s) for s in SEEDS] == ["ok"] * len(SEEDS)


CLIENT_SETTINGS = dict(max_pixels=MAX_PIXELS, max_upload_bytes=200_000)  # the `client` fixture (conftest.py)


header_text = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF, exclude_characters='"\\\r\n'),
                      max_size=40)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture], database=None)
@given(data=mutated_image(), filename=header_text,
       content_type=st.sampled_from(["image/png", "image/jpeg", "application/octet-stream", "text/plain", "",
                                     "image/x-unknown; charset=utf-8"]),
       path=st.sampled_from(["/score", "/score/batch", "/heatmap"]))
def test_the_app_answers_every_mutated_upload_with_a_score_or_a_4xx(client, data, filename, content_type, path):
    field = "files" if path == "/score/batch" else "file"
    r = client.post(path, files={field: (filename or "x", data, content_type or None)})
    assert r.status_code < 500, r.text
    if path == "/heatmap" and r.status_code == 200:
        score = float(r.headers["X-Memorability-Score"])
        assert r.headers["content-type"] == "image/png"
    elif r.status_code == 200:
        body = r.json()
        item = body["results"][0] if path == "/score/batch" else body
        if path == "/score/batch" and not item["ok"]:
            assert item["error"]["status"] in (413, 415, 422) and item["error"]["reason"] in REASONS | {"upload_too_large"}
            return
        score = item["score"]
    else:
        error = r.json()["error"]
        assert 400 <= r.status_code < 500 and error["status"] == r.status_code and error["reason"]
        return
    assert math.isfinite(score) and 0.0 <= score <= 1.0
