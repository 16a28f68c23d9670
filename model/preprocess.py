"""The one preprocessing path shared by training, batch scoring, heatmaps and the service.

decode_image() turns bytes or a path into an upright RGB PIL image (or raises ImageDecodeError
with a machine-readable reason); Preprocessing turns that image into the float tensor the
network takes, following the resize policy stored in the checkpoint. Normalisation to the
trunk's input scaling happens inside the network, so tensors here are always in [0, 1].
"""
from __future__ import annotations

import hashlib
import io
import math
import mmap
import os
import re
import threading
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from . import formats

if TYPE_CHECKING:  # decoding and preprocessing need no torch; only image_to_tensor gives a tensor
    import torch

# Decompression-bomb guard: 64 MP covers any camera photo; beyond that we refuse.
DEFAULT_MAX_PIXELS = 64_000_000


class ImageDecodeError(ValueError):
    """An input that is not a usable image. `reason` is a stable code for APIs and CSV rows."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


# Above this share of NaN samples a float picture is refused rather than patched up.
MAX_NAN_FRACTION = 0.01


def decode_image(source: bytes | str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode any Pillow-readable image (and HEIF/HEIC) to upright, colour-managed 8-bit sRGB (mode RGB).

    EXIF orientation is applied, an embedded ICC profile is converted to sRGB, and every mode
    is mapped to RGB by `to_rgb` (see there for bit depths, float data and alpha).
    Only one frame/page of a multi-frame file is decoded (the first; for HEIF the primary image);
    the result's `info["n_frames"]` says how many the file has, counted up to
    model.formats.MAX_FRAMES_COUNTED (model.quality.input_warnings warns "multi_frame").
    A JPEG whose scans are complete but whose end-of-image marker is missing is decoded with the
    marker restored and `info["truncated_end"]` set (warning "truncated_end"); one cut inside its
    image data stays corrupt. Files whose structure would cost Pillow seconds to parse (model.formats)
    are refused as corrupt before Pillow sees them.
    Raises ImageDecodeError with reason empty, not_found, not_an_image, corrupt, too_many_pixels
    or non_finite.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageDecodeError("empty", "the upload is empty (0 bytes)")
        data, path = bytes(source), None
    else:
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ImageDecodeError("not_found", f"no such file: {path}")
        if os.path.getsize(path) == 0:
            raise ImageDecodeError("empty", f"the file is empty (0 bytes): {path}")
        data = None
    _let_pillow_open(max_pixels)
    formats.register_plugins()
    formats.tighten_pillow_limits()
    truncated_end = False
    with _file_buffer(data, path) as buf:
        problem = formats.structure_problem(buf)
        if problem:
            raise ImageDecodeError("corrupt", f"{problem}; refused unread (no encoder writes that)")
        try:
            img, n_frames = _open(io.BytesIO(data) if data is not None else path, buf, max_pixels)
        except _Undecodable as failed:
            repaired = formats.complete_jpeg(bytes(buf)) if failed.format == "JPEG" else None
            if repaired is None:
                raise failed.error from None
            img, n_frames = _open(io.BytesIO(repaired), repaired, max_pixels)
            truncated_end = True
    if img.width < 1 or img.height < 1:
        raise ImageDecodeError("corrupt", "the image has no pixels")
    icc_profile = img.info.get("icc_profile")
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a malformed EXIF block must not lose the picture
        pass
    try:
        rgb = to_rgb(img, icc_profile=icc_profile)
    except ImageDecodeError:
        raise
    except Exception as exc:  # a mode or band layout Pillow opened but cannot convert
        raise ImageDecodeError("corrupt", f"the image cannot be converted to RGB ({type(exc).__name__}: {exc})") from None
    rgb.info["n_frames"] = n_frames  # only one frame is decoded; model.quality.input_warnings warns "multi_frame"
    if truncated_end:
        rgb.info["truncated_end"] = True  # model.quality.input_warnings warns "truncated_end"
    return rgb


class _Undecodable(Exception):
    """Pillow could not decode the data; `error` is the ImageDecodeError to raise unless a repair works."""

    def __init__(self, error: ImageDecodeError, fmt: str | None):
        super().__init__(error.message)
        self.error, self.format = error, fmt


def _open(stream, buf, max_pixels: int) -> tuple[Image.Image, int]:
    """Open, check the size, count frames, decode one frame -> (image, frames in the file)."""
    img = None
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check warns at 89 MP and raises at 179 MP; we apply our own limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(stream)
            _check_pixels(img, max_pixels)
            start = img.tell()  # the first frame; for HEIF the primary image
            n_frames = formats.count_frames(img, buf)
            if img.tell() != start:
                img.seek(start)
            img.load()
            _check_pixels(img, max_pixels)  # a plug-in may learn the real size only while decoding
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        refusal = formats.heif_refusal(buf)
        if refusal:
            raise ImageDecodeError("corrupt", refusal) from None
        raise ImageDecodeError("not_an_image", "not an image format that Pillow can read") from None
    except Image.DecompressionBombError as exc:
        # Pillow refused from the header before we saw the size; quote our limit, not Pillow's.
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{found.group(1)} pixels" if found else "over the limit"
        raise ImageDecodeError("too_many_pixels", f"image is {size}; the limit is {max_pixels}") from None
    except Exception as exc:  # any decoder failure on hostile bytes is the file's fault, not ours
        message = formats.text_limit_message(exc) or (
            f"the image data is corrupt or truncated ({type(exc).__name__}: {exc})")
        raise _Undecodable(ImageDecodeError("corrupt", message), getattr(img, "format", None)) from None
    return img, n_frames


def _check_pixels(img: Image.Image, max_pixels: int) -> None:
    width, height = img.size
    if width * height > max_pixels:
        raise ImageDecodeError("too_many_pixels",
                               f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")


@contextmanager
def _file_buffer(data: bytes | None, path: str | None):
    """The whole file as a buffer: the bytes given, or the file mapped read-only (not read)."""
    if data is not None:
        yield data
        return
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        yield mapped


_PILLOW_LIMIT_LOCK = threading.Lock()


def _let_pillow_open(max_pixels: int) -> None:
    """Raise Pillow's process-wide bomb limit (it refuses at 2 x MAX_IMAGE_PIXELS, about 179 MP)
    so that a configured `max_pixels` above it is honoured. Only ever raised, never lowered,
    so concurrent decodes with different limits cannot undo each other; our own check still applies."""
    needed = (int(max_pixels) + 1) // 2
    with _PILLOW_LIMIT_LOCK:
        if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < needed:
            Image.MAX_IMAGE_PIXELS = needed


def to_rgb(img: Image.Image, *, icc_profile: bytes | None = None) -> Image.Image:
    """Any Pillow mode -> 8-bit sRGB (mode RGB); the same content gives the same pixels in every mode.

    * Integer samples (I, I;16*): 0..255 when every sample fits (Pillow's own L->I convention),
      else 0..65535 (16-bit files: PNG, PGM/PPM with any maxval, TIFF); v -> round(v / 257).
      Data outside 0..65535 (32-bit TIFFs) has no convention and is stretched over its range.
    * Float samples (F): 0..1 (float files), or on the integer scales above when the largest
      finite sample is over 1 (Pillow's L->F convention). +-inf clip to the range's ends; a few
      NaN samples (at most MAX_NAN_FRACTION) take the mean of the finite ones; more, or no finite
      sample at all, raise ImageDecodeError("non_finite").
    * Colour: `icc_profile` (default: the image's own `info["icc_profile"]`) is converted to sRGB
      through Pillow's ImageCms; a profile that cannot be read or does not fit the mode is ignored.
      Without a profile, CMYK, YCbCr, LAB and HSV are converted by Pillow's own formulas.
    * Alpha (RGBA, LA, PA, P with transparency, RGBa, La, and a PNG colour key on L, RGB or 16-bit grey):
      composited over white.
    The result carries no icc_profile, so converting it again changes nothing.
    """
    if icc_profile is None:
        icc_profile = img.info.get("icc_profile")
    keyed = "transparency" in img.info  # a tRNS colour key (PNG): that colour is see-through
    if img.mode == "RGB" and not icc_profile and not keyed:
        return img
    if keyed and (img.mode == "I" or img.mode.startswith("I;16")) and isinstance(img.info["transparency"], int):
        # a 16-bit grey PNG's colour key: mask on the original samples, before they become 8-bit
        see_through = np.asarray(img) == img.info["transparency"]
        alpha_band = Image.fromarray(np.where(see_through, 0, 255).astype(np.uint8), mode="L")
        img = Image.merge("LA", (_to_8bit(img), alpha_band))
    img = _to_8bit(img)
    alpha = None
    if keyed and img.mode in ("L", "RGB"):
        img = img.convert("LA" if img.mode == "L" else "RGBA")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("PA", "RGBa", "RGBX"):
        img = img.convert("RGBA")
    elif img.mode == "La":
        img = _unpremultiply_la(img)
    elif img.mode == "1":
        img = img.convert("L")
    if img.mode in ("RGBA", "LA"):
        alpha = img.getchannel("A")
        img = img.convert("RGB" if img.mode == "RGBA" else "L")
    rgb = _icc_to_srgb(img, icc_profile) if icc_profile else None
    if rgb is None:
        rgb = img.convert("RGB")
    if alpha is not None and alpha.getextrema() != (255, 255):
        rgb = Image.composite(rgb, Image.new("RGB", rgb.size, (255, 255, 255)), alpha)
    rgb.info.pop("icc_profile", None)
    return rgb


_INTEGER_SCALES = (255.0, 65535.0)


def _to_8bit(img: Image.Image) -> Image.Image:
    """I, I;16* and F -> L by the rules in to_rgb(); other modes pass through."""
    if not (img.mode in ("I", "F") or img.mode.startswith("I;16")):
        return img
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf are dealt with below
        arr = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        arr = _patch_non_finite(arr)
    finite_min, finite_max = float(arr.min()), float(arr.max())
    if img.mode == "F" and finite_max <= 1.0 + 1e-3:
        lo, hi = 0.0, 1.0
    elif finite_min >= 0 and finite_max <= _INTEGER_SCALES[-1]:
        lo, hi = 0.0, next(s for s in _INTEGER_SCALES if finite_max <= s)
    else:  # beyond every convention (e.g. signed 32-bit data): stretch over the data's own range
        lo, hi = finite_min, max(finite_max, finite_min + 1.0)
    arr8 = np.clip(np.rint((arr - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)
    return Image.fromarray(arr8, mode="L")


def _patch_non_finite(arr: np.ndarray) -> np.ndarray:
    finite = np.isfinite(arr)
    if finite.all():
        return arr
    if not finite.any():
        raise ImageDecodeError("non_finite", "every sample of this float image is NaN or infinite")
    nan = np.isnan(arr)
    if nan.mean() > MAX_NAN_FRACTION:
        raise ImageDecodeError("non_finite", f"{int(nan.sum())} of {arr.size} samples of this float image are NaN "
                                             f"(more than {MAX_NAN_FRACTION:.0%}); it cannot be judged")
    values = arr[finite]
    lo, hi = float(values.min()), float(values.max())
    top = 1.0 if hi <= 1.0 + 1e-3 else next((s for s in _INTEGER_SCALES if hi <= s), hi)
    arr = arr.copy()
    arr[np.isposinf(arr)] = max(top, hi)
    arr[np.isneginf(arr)] = min(0.0, lo)
    arr[nan] = float(values.mean())
    return arr


def _unpremultiply_la(img: Image.Image) -> Image.Image:
    arr = np.asarray(img).astype(np.float64)
    a = arr[..., 1]
    grey = np.where(a > 0, np.clip(arr[..., 0] * 255.0 / np.maximum(a, 1), 0, 255), 0)
    return Image.fromarray(np.stack([np.rint(grey), a], axis=-1).astype(np.uint8), mode="LA")


# Transforms are cached by the profile's SHA-256, not by its bytes: a JPEG may carry a 16 MB
# profile, and 32 such cache keys would hold 512 MB for good.
_TRANSFORMS: dict[tuple[bytes, str], object] = {}
_TRANSFORMS_LOCK = threading.Lock()
MAX_CACHED_TRANSFORMS = 32


def _srgb_transform(profile: bytes, mode: str):
    """A cached ImageCms transform from an embedded profile to sRGB, or None if it is unusable."""
    key = (hashlib.sha256(profile).digest(), mode)
    with _TRANSFORMS_LOCK:
        if key in _TRANSFORMS:
            return _TRANSFORMS[key]
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        # NOCACHE: lcms's one-pixel cache is not thread-safe and decoding runs in a thread pool.
        transform = ImageCms.buildTransform(source, ImageCms.createProfile("sRGB"), mode, "RGB",
                                            renderingIntent=ImageCms.Intent.PERCEPTUAL, flags=ImageCms.Flags.NOCACHE)
    except Exception:  # garbage profile, or one for another colour space than the pixels'
        transform = None
    with _TRANSFORMS_LOCK:
        _TRANSFORMS[key] = transform
        while len(_TRANSFORMS) > MAX_CACHED_TRANSFORMS:  # the oldest goes first
            _TRANSFORMS.pop(next(iter(_TRANSFORMS)))
    return transform


def _icc_to_srgb(img: Image.Image, profile) -> Image.Image | None:
    if img.mode not in ("RGB", "L", "CMYK", "LAB") or not isinstance(profile, (bytes, bytearray)):
        return None
    transform = _srgb_transform(bytes(profile), img.mode)
    if transform is None:
        return None
    try:
        return ImageCms.applyTransform(img, transform)
    except Exception:
        return None


@dataclass(frozen=True)
class ResizePolicy:
    """How a decoded image becomes a network input.

    mode="shorter_side": keep the aspect ratio, shorter side -> `size`, longer side rounded to a
    multiple of `multiple` and capped at `max_aspect` x size. The rounding gives a small set of
    shapes, so the service can batch uploads of arbitrary resolution without padding, and an
    image always maps to the same tensor whatever it is batched with.
    mode="square": the paper's fixed size x size resize (aspect ratio is lost).
    """

    mode: Literal["shorter_side", "square"] = "shorter_side"
    size: int = 224
    multiple: int = 32
    max_aspect: float = 2.0

    def __post_init__(self):
        if self.mode not in ("shorter_side", "square"):
            raise ValueError(f"unknown resize mode {self.mode!r}")
        if self.size < 32:
            raise ValueError("resize size must be at least 32")

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the network input for an image of the given size."""
        if self.mode == "square":
            return self.size, self.size
        short, long_ = (width, height) if width <= height else (height, width)
        aspect = min(long_ / max(short, 1), self.max_aspect)
        cap = int(math.floor(self.size * self.max_aspect / self.multiple)) * self.multiple
        new_long = max(self.size, min(int(round(self.size * aspect / self.multiple)) * self.multiple, cap))
        return (self.size, new_long) if width <= height else (new_long, self.size)


@dataclass(frozen=True)
class Preprocessing:
    """Resize policy plus the trunk's input scaling; stored in every checkpoint."""

    resize: ResizePolicy = field(default_factory=ResizePolicy)
    # "unit": the trunk takes [0,1] RGB; "imagenet": it takes ImageNet mean/std-normalised RGB.
    input_scaling: Literal["unit", "imagenet"] = "imagenet"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocessing":
        return cls(resize=ResizePolicy(**data.get("resize", {})), input_scaling=data.get("input_scaling", "imagenet"))

    def image_to_array(self, img: Image.Image) -> np.ndarray:
        """RGB PIL image -> float32 ndarray (3, H, W) in [0, 1] at the policy's size (C-contiguous).
        The one resize and scaling: image_to_tensor wraps this array, the torch-free runtime
        (the onnxruntime backend) uses it as it is."""
        size = self.resize.output_size(img.width, img.height)
        if img.size != size:
            # reducing_gap keeps large uploads fast (JPEG draft + box reduce) at negligible cost in quality
            img = img.resize(size, Image.BICUBIC, reducing_gap=3.0)
        arr = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
        out = np.empty(arr.shape, dtype=np.float32)
        np.divide(arr, np.float32(255.0), out=out, dtype=np.float32)
        return out

    def image_to_tensor(self, img: Image.Image) -> "torch.Tensor":
        """RGB PIL image -> float32 torch tensor (3, H, W) in [0, 1]: image_to_array's, shared."""
        import torch

        return torch.from_numpy(self.image_to_array(img))


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def stack_inputs(items):
    """Preprocessed inputs of one shape (3, H, W) -> a batch (B, 3, H, W) of the same kind: a numpy
    array from arrays (the torch-free runtime), a torch tensor from tensors."""
    if isinstance(items[0], np.ndarray):
        return np.stack(items)
    import torch

    return torch.stack(list(items))
