"""Decode-side exhaustion (issue 21): metadata bombs, thousands of frames or pages, structure
repeated at no cost to the sender. Each is refused as corrupt before Pillow spends time on it,
or scored with its frames counted up to model.formats.MAX_FRAMES_COUNTED. Timings and memory
are measured by bench/fuzz.py (docs/robustness.md), not here."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from hostile_inputs import HOSTILE, chunk, deflated, gif_frames, png_with, tiff_pages
from model import formats
from model.preprocess import ImageDecodeError, decode_image


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_each_hostile_kind_is_refused_or_scored_as_documented(name):
    make, expected, frames = HOSTILE[name]
    data = make(1)
    if expected == "ok":
        img = decode_image(data)
        assert img.mode == "RGB" and img.info["n_frames"] == frames
    else:
        with pytest.raises(ImageDecodeError) as info:
            decode_image(data)
        assert info.value.reason == expected and "refused" in info.value.message


def test_pillow_text_limits_are_lowered_not_raised():
    decode_image(png_with())
    assert PngImagePlugin.MAX_TEXT_MEMORY == formats.MAX_TEXT_MEMORY == 4 << 20
    assert PngImagePlugin.MAX_TEXT_CHUNK == formats.MAX_TEXT_CHUNK == 1 << 20


def test_ordinary_metadata_is_still_read():
    """A photo with 200 KB of XMP, a comment and an sRGB profile decodes as before."""
    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    xmp = b"<x:xmpmeta>" + b"<rdf:li>ancestor</rdf:li>" * 8000 + b"</x:xmpmeta>"
    data = png_with([chunk(b"iCCP", b"icc\0\0" + zlib.compress(icc)),
                     chunk(b"iTXt", b"XML:com.adobe.xmp\0\1\0\0\0" + zlib.compress(xmp)),
                     chunk(b"zTXt", b"Comment\0\0" + deflated(300_000))])
    assert len(xmp) > 200_000
    img = decode_image(data)
    assert img.size == (32, 24) and img.getpixel((0, 0)) == (0, 0, 0)


def test_text_just_under_the_total_limit_passes_and_just_over_is_refused():
    each = formats.MAX_TEXT_CHUNK - 16
    under = png_with([chunk(b"zTXt", b"k%d\0\0" % i + deflated(each)) for i in range(3)])
    over = png_with([chunk(b"zTXt", b"k%d\0\0" % i + deflated(each)) for i in range(5)])
    assert decode_image(under).size == (32, 24)
    with pytest.raises(ImageDecodeError) as info:
        decode_image(over)
    assert info.value.reason == "corrupt" and "decompression bomb" in info.value.message


def test_frames_are_counted_exactly_up_to_the_cap():
    for n in (1, 2, 3, 999, 1000, 1001, 5000):
        assert decode_image(gif_frames(n)).info["n_frames"] == min(n, formats.MAX_FRAMES_COUNTED), n
        assert decode_image(tiff_pages(n)).info["n_frames"] == min(n, formats.MAX_FRAMES_COUNTED), n


def test_a_big_tiff_is_counted_by_its_directory_chain(tmp_path):
    """A 3-page TIFF written by Pillow, from bytes and from a path (the file is mapped, not read)."""
    pages = [Image.new("RGB", (20, 10), c) for c in ((200, 0, 0), (0, 200, 0), (0, 0, 200))]
    buf = io.BytesIO()
    pages[0].save(buf, "TIFF", save_all=True, append_images=pages[1:])
    path = tmp_path / "pages.tif"
    path.write_bytes(buf.getvalue())
    for source in (buf.getvalue(), path):
        img = decode_image(source)
        assert img.info["n_frames"] == 3 and img.getpixel((0, 0)) == (200, 0, 0)


def test_a_gif_frame_count_stops_at_the_block_budget(monkeypatch):
    monkeypatch.setattr(formats, "MAX_GIF_COUNT_BLOCKS", 50)
    n = decode_image(gif_frames(500)).info["n_frames"]
    assert 1 < n < 500  # a lower bound: still more than one, so still "multi_frame"


def test_the_structure_limits_leave_real_files_alone():
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))
    for fmt, kwargs in (("PNG", {}), ("JPEG", {"quality": 90, "progressive": True}), ("GIF", {}), ("TIFF", {})):
        buf = io.BytesIO()
        photo.save(buf, fmt, **kwargs)
        assert formats.structure_problem(buf.getvalue()) is None, fmt
        assert decode_image(buf.getvalue()).size == (400, 300)


def test_icc_transforms_are_cached_by_digest_not_by_profile_bytes():
    from model import preprocess

    big_garbage = b"\0" * 200 + bytes(range(256)) * 4096  # a 1 MB "profile" lcms cannot read
    for i in range(preprocess.MAX_CACHED_TRANSFORMS + 5):
        preprocess._srgb_transform(big_garbage + bytes([i]), "RGB")
    assert len(preprocess._TRANSFORMS) == preprocess.MAX_CACHED_TRANSFORMS
    assert all(len(key[0]) == 32 for key in preprocess._TRANSFORMS)  # SHA-256 digests, not 1 MB keys


def test_the_png_chunk_limit_grows_with_the_file(monkeypatch):
    """Small chunks are refused past MAX_PNG_CHUNKS; a PNG written in 8 KiB chunks, like libpng's,
    passes however many it has (here with the fixed part of the limit lowered to 100)."""
    monkeypatch.setattr(formats, "MAX_PNG_CHUNKS", 100)
    w, h = 1024, 1000
    rows = np.random.default_rng(0).integers(0, 256, (h, w * 3 + 1), dtype=np.uint8)
    rows[:, 0] = 0  # each row's filter type: none
    raw = zlib.compress(rows.tobytes(), 1)
    idats = [chunk(b"IDAT", raw[i:i + 8192]) for i in range(0, len(raw), 8192)]
    big = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + b"".join(idats) + chunk(b"IEND", b""))
    assert len(idats) > 300 and formats.structure_problem(big) is None
    assert decode_image(big).size == (w, h)
    tiny = png_with([chunk(b"quUx", b"")] * 200)
    assert "more than 100 chunks" in formats.structure_problem(tiny)
