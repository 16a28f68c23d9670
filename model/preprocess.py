"""The one preprocessing path shared by training, batch scoring, heatmaps and the service.

decode_image() turns bytes or a path into an upright RGB PIL image (or raises ImageDecodeError
with a machine-readable reason); Preprocessing turns that image into the float tensor the
network takes, following the resize policy stored in the checkpoint. Normalisation to the
trunk's input scaling happens inside the network, so tensors here are always in [0, 1].
"""
from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

# Decompression-bomb guard: 64 MP covers any camera photo; beyond that we refuse.
DEFAULT_MAX_PIXELS = 64_000_000


class ImageDecodeError(ValueError):
    """An input that is not a usable image. `reason` is a stable code for APIs and CSV rows."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


def decode_image(source: bytes | str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode any Pillow-readable image to upright 8-bit RGB.

    EXIF orientation is applied; L, LA, P, RGBA, CMYK, I;16 and I/F modes are converted to RGB
    (alpha is composited over white, 16-bit and float data are rescaled, not clipped).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageDecodeError("empty", "the upload is empty (0 bytes)")
        stream = io.BytesIO(source)
    else:
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ImageDecodeError("not_found", f"no such file: {path}")
        if os.path.getsize(path) == 0:
            raise ImageDecodeError("empty", f"the file is empty (0 bytes): {path}")
        stream = path
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check warns at 89 MP and raises at 179 MP; we apply our own limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(stream)
            width, height = img.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    "too_many_pixels",
                    f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
                )
            img.load()
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("not_an_image", "not an image format that Pillow can read") from None
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError("too_many_pixels", str(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError("corrupt", f"the image data is corrupt or truncated ({exc})") from None
    if img.width < 1 or img.height < 1:
        raise ImageDecodeError("corrupt", "the image has no pixels")
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a malformed EXIF block must not lose the picture
        pass
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB without clipping high-bit-depth data."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        if img.mode.startswith("I;16"):
            lo, hi = 0.0, 65535.0
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        arr8 = np.clip((arr - lo) * scale, 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


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

    def image_to_tensor(self, img: Image.Image) -> torch.Tensor:
        """RGB PIL image -> float32 tensor (3, H, W) in [0, 1] at the policy's size."""
        size = self.resize.output_size(img.width, img.height)
        if img.size != size:
            # reducing_gap keeps large uploads fast (JPEG draft + box reduce) at negligible cost in quality
            img = img.resize(size, Image.BICUBIC, reducing_gap=3.0)
        arr = np.asarray(img, dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)

    def load(self, source, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
        return self.image_to_tensor(decode_image(source, max_pixels=max_pixels))


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
