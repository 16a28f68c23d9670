"""Small files that try to exhaust a decoder: metadata that decompresses to far more than it
weighs, files claiming (or holding) thousands of frames or pages, structure repeated at no cost
to the sender. Made here, in memory, so nothing binary is committed. Shared by
tests/test_decode_limits.py and bench/fuzz.py (which mutates them too).

`HOSTILE` maps a name to (make, expected): make(scale) returns the bytes (scale 1: the sizes
the tests use; bench/fuzz.py uses up to upload-limit sizes), expected is the decode_image
outcome ("ok" or a refusal reason) and, for "ok", the frame count reported in info["n_frames"].
"""
from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with(chunks_before_idat=(), chunks_after_idat=(), size=(32, 24)) -> bytes:
    """An RGB PNG (black) with extra chunks before and after its image data."""
    w, h = size
    raw = b"".join(b"\0" + bytes(w * 3) for _ in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + b"".join(chunks_before_idat) + chunk(b"IDAT", zlib.compress(raw)) + b"".join(chunks_after_idat)
            + chunk(b"IEND", b""))


def deflated(n_bytes: int) -> bytes:
    """n_bytes of "A", deflated (1 MiB -> about 1 KB)."""
    obj = zlib.compressobj(9)
    block = b"A" * (1 << 20)
    out = [obj.compress(block) for _ in range(n_bytes >> 20)]
    out.append(obj.compress(b"A" * (n_bytes & ((1 << 20) - 1))))
    return b"".join(out) + obj.flush()


def ztxt_bomb(chunks: int = 8, each: int = 1 << 20) -> bytes:
    """Several zTXt chunks of `each` bytes of text apiece (8 MiB of text in a 10 KB file)."""
    return png_with([chunk(b"zTXt", b"k%d\0\0" % i + deflated(each)) for i in range(chunks)])


def itxt_bomb(each: int = 64 << 20) -> bytes:
    """One compressed iTXt chunk that inflates to `each` bytes (64 MiB in about 64 KB)."""
    return png_with([chunk(b"iTXt", b"XML:com.adobe.xmp\0\1\0\0\0" + deflated(each))])


def iccp_bomb(each: int = 64 << 20) -> bytes:
    """An iCCP profile that inflates to `each` bytes."""
    return png_with([chunk(b"iCCP", b"icc\0\0" + deflated(each))])


def many_png_chunks(n: int = 100_000, after_idat: bool = False) -> bytes:
    empty = [chunk(b"quUx", b"")] * n  # a private, ancillary, empty chunk: 12 bytes each
    return png_with((), empty) if after_idat else png_with(empty)


def small_jpeg(size=(16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (90, 120, 150)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def many_jpeg_segments(n: int = 10_000) -> bytes:
    j = small_jpeg()
    return j[:2] + b"\xff\xfe\x00\x02" * n + j[2:]  # empty comment segments


def jpeg_fill_bytes(n: int = 200_000) -> bytes:
    j = small_jpeg()
    return j[:2] + b"\xff" * n + j[2:]  # fill bytes before the first marker


def gif_frames(n: int, size=(8, 8)) -> bytes:
    """A GIF holding n 1x1 frames (15 bytes each)."""
    w, h = size
    out = [b"GIF89a", struct.pack("<HH", w, h), bytes([0x80, 0, 0]), b"\0\0\0\xff\xff\xff"]
    frame = b"\x2c" + struct.pack("<HHHH", 0, 0, 1, 1) + b"\0" + b"\x02\x02\x44\x01\x00"
    return b"".join(out) + frame * n + b"\x3b"


def gif_tiny_subblocks(n: int = 250_000) -> bytes:
    """A GIF whose second frame's data comes in n one-byte sub-blocks (2 bytes each)."""
    g = gif_frames(1)
    frame = b"\x2c" + struct.pack("<HHHH", 0, 0, 1, 1) + b"\0" + b"\x02" + b"\x01\x44" * n + b"\x00"
    return g[:-1] + frame + b"\x3b"


def gif_header_blocks(n: int = 100_000) -> bytes:
    """A GIF whose first frame comes after n empty comment extensions."""
    g = gif_frames(1)
    i = g.index(b"\x2c")
    return g[:i] + b"\x21\xfe\x00" * n + g[i:]


def tiff_pages(n: int, loop: bool = False) -> bytes:
    """A little-endian TIFF of n 1x1 grey pages (122 bytes each); loop=True points the last
    directory back at the first."""
    tags = [(256, 3, 1), (257, 3, 1), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 8), (277, 3, 1),
            (278, 3, 1), (279, 4, 1)]
    ifd = 2 + 12 * len(tags) + 4
    base = 9
    out = bytearray(b"II*\0" + struct.pack("<I", base) + b"\x80")  # the one pixel sits at offset 8
    for i in range(n):
        nxt = base + (i + 1) * ifd if i < n - 1 else (base if loop else 0)
        out += struct.pack("<H", len(tags))
        for tag, typ, val in tags:
            out += struct.pack("<HHI", tag, typ, 1) + (struct.pack("<HH", val, 0) if typ == 3 else struct.pack("<I", val))
        out += struct.pack("<I", nxt)
    return bytes(out)


def apng_claiming(frames: int = 0x7FFFFFFF) -> bytes:
    """A one-frame PNG whose acTL chunk claims `frames` frames."""
    actl = chunk(b"acTL", struct.pack(">II", frames, 0))
    fctl = chunk(b"fcTL", struct.pack(">IIIIIHHBB", 0, 32, 24, 0, 0, 1, 10, 0, 0))
    return png_with([actl, fctl])


def webp_frames(n: int = 2_000) -> bytes:
    frames = [Image.new("RGB", (8, 8), (i % 256, 0, 0)) for i in range(n)]
    buf = io.BytesIO()
    frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    return buf.getvalue()


def tiff_fat_directory(entries: int = 2_000_000) -> bytes:
    """A BigTIFF whose first directory claims `entries` entries (BigTIFF counts are 64-bit)."""
    return b"II+\x00\x08\x00\x00\x00" + struct.pack("<Q", 16) + struct.pack("<Q", entries) + bytes(64)


HOSTILE = {
    # name: (make(scale), expected outcome, expected n_frames when scored)
    "png_ztxt_bomb": (lambda s: ztxt_bomb(chunks=8 * s), "corrupt", None),
    "png_itxt_bomb": (lambda s: itxt_bomb((64 << 20) * s), "corrupt", None),
    "png_iccp_bomb": (lambda s: iccp_bomb((64 << 20) * s), "corrupt", None),
    "png_many_chunks": (lambda s: many_png_chunks(100_000 * s), "corrupt", None),
    "png_many_chunks_after_idat": (lambda s: many_png_chunks(100_000 * s, after_idat=True), "corrupt", None),
    "jpeg_many_segments": (lambda s: many_jpeg_segments(10_000 * s), "corrupt", None),
    "jpeg_fill_bytes": (lambda s: jpeg_fill_bytes(200_000 * s), "corrupt", None),
    "gif_header_blocks": (lambda s: gif_header_blocks(100_000 * s), "corrupt", None),
    "gif_many_frames": (lambda s: gif_frames(100_000 * s), "ok", 1000),
    "gif_tiny_subblocks": (lambda s: gif_tiny_subblocks(250_000 * s), "ok", 2),
    "tiff_many_pages": (lambda s: tiff_pages(20_000 * s), "ok", 1000),
    "tiff_page_loop": (lambda s: tiff_pages(3, loop=True), "ok", 3),
    "tiff_fat_directory": (lambda s: tiff_fat_directory(), "corrupt", None),
    "apng_claims_2e31_frames": (lambda s: apng_claiming(), "ok", 1000),
    "webp_many_frames": (lambda s: webp_frames(2_000 * s), "ok", 1000),
}
