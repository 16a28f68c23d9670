"""What decode_image (model.preprocess) adds to Pillow: one more format, and bounds on hostile files.

* HEIF/HEIC (iPhone photos) through the pillow-heif plug-in, registered on first use
  (`register_plugins`), not when the package is imported. AVIF and JPEG 2000 are Pillow's own.
* Pillow's PNG text limits lowered for a service (`tighten_pillow_limits`): Pillow keeps up to
  64 MiB of decompressed tEXt/zTXt/iTXt per image, which a 60 KB upload can fill.
* Structure a file may repeat at no cost to its author but at a cost in Python to Pillow
  (`structure_problem`): PNG chunks, JPEG marker segments and fill bytes before the first scan,
  GIF blocks before the first frame, TIFF directories with more entries than classic TIFF allows.
  Measured with Pillow 13 on a 2-core machine: 1.5 million empty PNG chunks (18 MB) took 8 s to
  open, 6 MB of JPEG fill bytes 5.6 s; over the limits below the file is refused at once.
* Frames and pages counted without decoding them, up to MAX_FRAMES_COUNTED (`count_frames`):
  Pillow counts TIFF pages in quadratic time (150,000 tiny directories, 17 MB: 135 s) and GIF
  frames by parsing each one.
* JPEGs whose every scan is complete but whose end-of-image marker is missing (`complete_jpeg`).

Each limit is far above what a camera, editor or encoder writes; see docs/robustness.md.
"""
from __future__ import annotations

import io
import re
import struct
import threading

# PNG: Pillow's own per-chunk limit (1 MiB, also the iCCP profile limit) is kept; the total of
# decompressed text per image goes from Pillow's 64 MiB to 4 MiB (real photos carry < 100 KB).
MAX_TEXT_CHUNK = 1 << 20
MAX_TEXT_MEMORY = 4 << 20
# Pillow spends about 10 us on each PNG chunk (50,000 took 0.5 s). libpng writes 8 KiB IDAT
# chunks, so a 20 MB PNG has about 2,500; allowed: this many, plus one per PNG_BYTES_PER_CHUNK of file.
MAX_PNG_CHUNKS = 16_384
PNG_BYTES_PER_CHUNK = 4_096
# A JPEG has tens of segments before its first scan (ICC profiles split over up to 255 APP2).
MAX_JPEG_SEGMENTS = 4_096
MAX_JPEG_GAP_BYTES = 65_536  # fill bytes (0xFF) and stray bytes between segments, in all
# GIF extension sub-blocks before the first frame (comments, application data: a few at most).
MAX_GIF_HEADER_BLOCKS = 65_536
MAX_TIFF_ENTRIES = 65_535  # per directory: the most classic TIFF can hold; BigTIFF could claim 2**64
# Frames/pages are counted up to this many; a file with more reports this many.
MAX_FRAMES_COUNTED = 1_000
MAX_GIF_COUNT_BLOCKS = 200_000  # blocks walked to count GIF frames: a 20 MB GIF has 80,000; 0.1-0.2 s at most

_REGISTER_LOCK = threading.Lock()
_registered = False


def register_plugins() -> None:
    """Register pillow-heif's HEIF/HEIC opener with Pillow, once per process (thread-safe).
    Embedded thumbnails, depth and auxiliary images are not read: only the primary image is scored.
    Without pillow-heif installed HEIC stays unreadable (415 not_an_image), as before."""
    global _registered
    if _registered:
        return
    with _REGISTER_LOCK:
        if _registered:
            return
        try:
            from pillow_heif import register_heif_opener
        except ImportError:
            pass
        else:
            register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)
        _registered = True


def heif_refusal(buf) -> str | None:
    """libheif's reason for refusing a file that is HEIF by its signature, or None. (Pillow only
    says it cannot identify the file; libheif's own limits, such as at most 1,000 images in one
    file, deserve their message.)"""
    try:
        import pillow_heif
    except ImportError:
        return None
    if not pillow_heif.is_supported(bytes(buf[:64])):
        return None
    try:
        pillow_heif.open_heif(io.BytesIO(bytes(buf)))
    except Exception as exc:  # libheif's message names the box and the limit
        return f"the HEIF file cannot be read: {exc}"
    return None


def tighten_pillow_limits() -> None:
    """Lower Pillow's process-wide PNG text limits to this module's (never raises them)."""
    from PIL import PngImagePlugin

    PngImagePlugin.MAX_TEXT_CHUNK = min(PngImagePlugin.MAX_TEXT_CHUNK, MAX_TEXT_CHUNK)
    PngImagePlugin.MAX_TEXT_MEMORY = min(PngImagePlugin.MAX_TEXT_MEMORY, MAX_TEXT_MEMORY)


def text_limit_message(exc: Exception) -> str | None:
    """The clear message for Pillow's refusal of oversized PNG text or ICC chunks, else None."""
    text = str(exc)
    if isinstance(exc, ValueError) and ("MAX_TEXT_CHUNK" in text or "MAX_TEXT_MEMORY" in text):
        return (f"the PNG's metadata (text or ICC profile chunks) holds more than "
                f"{MAX_TEXT_CHUNK} bytes in one chunk or {MAX_TEXT_MEMORY} bytes in all, decompressed; refused as a "
                f"decompression bomb")
    return None


# -- structure pre-scan ---------------------------------------------------------------------------
def structure_problem(buf) -> str | None:
    """Why a PNG, JPEG, GIF or TIFF file's structure is refused before Pillow parses it, or None.
    `buf`: the whole file (bytes or a read-only mmap). Other formats and damaged files pass: then
    Pillow decides (a damaged file is its business, a costly one is ours)."""
    head = bytes(buf[:8])
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return _png_problem(buf)
    if head.startswith(b"\xff\xd8"):
        return _jpeg_problem(buf)
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return _gif_problem(buf)
    if head[:4] == b"II+\x00" or head[:4] == b"MM\x00+":
        return _bigtiff_problem(buf)
    return None


def _png_problem(buf) -> str | None:
    """Chunks up to IEND, or for an animated PNG up to its second frame (where Pillow stops reading)."""
    pos, n, size, image_data = 8, 0, len(buf), False
    limit = MAX_PNG_CHUNKS + size // PNG_BYTES_PER_CHUNK
    while pos + 8 <= size:
        (length,) = struct.unpack_from(">I", buf, pos)
        kind = bytes(buf[pos + 4:pos + 8])
        if kind == b"IEND" or (image_data and kind == b"fcTL"):
            break
        image_data = image_data or kind == b"IDAT"
        n += 1
        if n > limit:
            return f"the PNG has more than {limit} chunks (at most {MAX_PNG_CHUNKS} + 1 per {PNG_BYTES_PER_CHUNK} bytes)"
        pos += 12 + length
    return None


_FILL = re.compile(rb"\xff+")
_STANDALONE = frozenset(range(0xD0, 0xDA)) | {0x01}  # RSTn, SOI, EOI, TEM: no length field


def _jpeg_problem(buf) -> str | None:
    pos, segments, gap, size = 2, 0, 0, len(buf)
    while pos < size:
        if buf[pos] != 0xFF:  # stray bytes: Pillow reads them one at a time
            nxt = buf.find(b"\xff", pos)
            nxt = size if nxt < 0 else nxt
            gap += nxt - pos
            pos = nxt
            if gap > MAX_JPEG_GAP_BYTES:
                break
            continue
        run = _FILL.match(buf, pos)
        gap += run.end() - pos - 1  # fill bytes before the marker
        pos = run.end()
        if gap > MAX_JPEG_GAP_BYTES or pos >= size:
            break
        marker = buf[pos]
        pos += 1
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            return f"the JPEG has more than {MAX_JPEG_SEGMENTS} marker segments before its image data"
        if marker == 0xDA:  # start of scan: the rest is libjpeg's, in C
            return None
        if marker not in _STANDALONE and pos + 2 <= size:
            pos += struct.unpack_from(">H", buf, pos)[0]
    if gap > MAX_JPEG_GAP_BYTES:
        return f"the JPEG has more than {MAX_JPEG_GAP_BYTES} fill or stray bytes between its marker segments"
    return None


def _gif_blocks(buf, pos: int):
    """Yield (kind, pos) for each top-level GIF block from `pos`: kind 0x21 (extension),
    0x2C (image) or 0x3B (trailer); each block's sub-blocks are skipped and yielded as kind 0."""
    size = len(buf)
    while pos < size:
        kind = buf[pos]
        if kind == 0x3B or kind not in (0x21, 0x2C):
            yield kind, pos
            return
        yield kind, pos
        if kind == 0x21:
            pos += 2
        else:
            if pos + 10 > size:
                return
            flags = buf[pos + 9]
            pos += 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0) + 1  # descriptor, colour table, LZW size
        while pos < size and buf[pos]:  # data sub-blocks up to the 0 terminator
            yield 0, pos
            pos += buf[pos] + 1
        pos += 1


def _gif_start(buf) -> int:
    flags = buf[10] if len(buf) > 10 else 0
    return 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)


def _gif_problem(buf) -> str | None:
    for n, (kind, _) in enumerate(_gif_blocks(buf, _gif_start(buf))):
        if kind == 0x2C or kind == 0x3B:
            return None
        if n >= MAX_GIF_HEADER_BLOCKS:
            return f"the GIF has more than {MAX_GIF_HEADER_BLOCKS} extension blocks before its first frame"
    return None


def _bigtiff_problem(buf) -> str | None:
    order = "<" if bytes(buf[:2]) == b"II" else ">"
    if len(buf) < 16:
        return None
    (offset,) = struct.unpack_from(order + "Q", buf, 8)
    if offset + 8 <= len(buf) and struct.unpack_from(order + "Q", buf, offset)[0] > MAX_TIFF_ENTRIES:
        return f"the TIFF's first directory claims more than {MAX_TIFF_ENTRIES} entries"
    return None


# -- frames and pages -----------------------------------------------------------------------------
def count_frames(img, buf) -> int:
    """Frames/pages of an opened Pillow image, at most MAX_FRAMES_COUNTED, without decoding any.
    GIF and TIFF are walked in `buf` (the file's bytes); other formats state their count in a
    header (APNG, WebP, MPO, HEIF, AVIF, ...) and Pillow's n_frames is used. 1 for still images."""
    fmt = getattr(img, "format", None)
    try:
        if fmt == "GIF" and buf is not None:
            n = _gif_frames(buf)
        elif fmt == "TIFF" and buf is not None:
            n = _tiff_pages(buf)
        else:
            n = int(getattr(img, "n_frames", 1))
    except Exception:  # a damaged later frame must not lose the first one
        return 1
    return max(1, min(n, MAX_FRAMES_COUNTED))


def _gif_frames(buf) -> int:
    frames = 0
    for n, (kind, _) in enumerate(_gif_blocks(buf, _gif_start(buf))):
        frames += kind == 0x2C
        if frames >= MAX_FRAMES_COUNTED or n >= MAX_GIF_COUNT_BLOCKS:
            break
    return frames


def _tiff_pages(buf) -> int:
    """Directories in the TIFF's chain (classic and BigTIFF), a loop counted once."""
    head = bytes(buf[:4])
    order = "<" if head[:2] == b"II" else ">"
    big = head[2:4] in (b"+\x00", b"\x00+")
    count_fmt, entry, off_fmt = (order + "Q", 20, order + "Q") if big else (order + "H", 12, order + "I")
    count_size, off_size = struct.calcsize(count_fmt), struct.calcsize(off_fmt)
    (offset,) = struct.unpack_from(off_fmt, buf, 8 if big else 4)
    seen: set[int] = set()
    while offset and offset not in seen and len(seen) < MAX_FRAMES_COUNTED:
        if offset + count_size > len(buf):
            break
        seen.add(offset)
        (entries,) = struct.unpack_from(count_fmt, buf, offset)
        nxt = offset + count_size + entries * entry
        if nxt + off_size > len(buf):
            break
        (offset,) = struct.unpack_from(off_fmt, buf, nxt)
    return len(seen)


# -- JPEGs without their end-of-image marker ------------------------------------------------------
def complete_jpeg(data: bytes) -> bytes | None:
    """`data` with the end-of-image marker (FFD9) restored, when `data` is a JPEG whose every scan
    is complete and only that marker (or its second byte) is missing; None otherwise.

    libjpeg fills a scan that ends early with zeros and only warns, so "decodes once the marker is
    appended" would also accept files cut inside their image data. Here the repaired bytes must
    decode through libjpeg-turbo (simplejpeg) without a single warning: a scan that ends early
    warns "premature end of data segment". None as well when simplejpeg is not installed.
    """
    if not data.startswith(b"\xff\xd8"):
        return None
    body = bytes(data).rstrip(b"\xff")  # an end marker cut after its first byte, or fill bytes
    if body.endswith(b"\xff\xd9"):
        return None  # the marker is there: the data itself is damaged
    candidate = body + b"\xff\xd9"
    try:
        import simplejpeg
    except ImportError:
        return None
    try:
        colourspace = simplejpeg.decode_jpeg_header(candidate)[2]
        # the smallest scale: every coefficient is still entropy-decoded (and checked), little is drawn
        simplejpeg.decode_jpeg(candidate, colorspace="CMYK" if colourspace in ("CMYK", "YCCK") else "GRAY",
                               min_factor=8, strict=True)
    except (ValueError, RuntimeError):
        return None
    return candidate
