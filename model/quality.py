"""Inputs the model cannot judge: short warning codes attached to every score.

The score of a flat grey picture, a field of noise or a page of text is a number like any other
(a ResNet readout always answers), but it says nothing about memorability: those inputs lie far
from every photo the model was fitted on. Each check below is a cheap statistic of a small grey
thumbnail; thresholds were set so that no more than 1 % of real photos (LNSIM + the diverse pool,
docs/model-card.md) get any warning, while synthetic noise, flat, text and tiny upscaled images
all do (tests/test_quality.py).

Codes:
- ``flat``: (near-)uniform picture. Grey standard deviation on a 128 px thumbnail under
  FLAT_STD (0-255 scale) after ignoring the 1 % most extreme pixels.
- ``noise``: a field of random noise. Neighbouring pixels of a natural photo are strongly
  correlated at thumbnail scale; noise is not. Mean correlation of horizontally and vertically
  adjacent pixels on a 128 px thumbnail under NOISE_CORR.
- ``text``: mostly text (a page, a screenshot of a document). A bright or dark background
  covering most of the picture, little colour, and many separate bands of ink rows (lines of
  text) in the row profile.
- ``low_resolution``: under 64 px of detail on the longer side, natively or upscaled from
  such a picture: a round trip through a 64 px thumbnail changes the picture by less than
  LOWRES_RESIDUAL of its own contrast.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

WARNING_CODES = ("flat", "noise", "text", "low_resolution")

FLAT_STD = 6.0
NOISE_CORR = 0.35
TEXT_MIN_BANDS = 6
TEXT_BACKGROUND = 0.55
TEXT_MAX_SATURATION = 40.0
LOWRES_SIDE = 64
LOWRES_RESIDUAL = 0.06


def _thumb(img: Image.Image, side: int, *, resample=Image.BOX) -> Image.Image:
    scale = side / max(img.width, img.height)
    if scale >= 1:
        return img
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, resample)


def _grey(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("L"), dtype=np.float64)


def is_flat(grey: np.ndarray) -> bool:
    lo, hi = np.percentile(grey, [0.5, 99.5])
    core = grey[(grey >= lo) & (grey <= hi)]
    return float(core.std()) < FLAT_STD if core.size else True


def neighbour_correlation(grey: np.ndarray) -> float:
    """Mean Pearson correlation of horizontally and vertically adjacent pixels (1 for smooth
    pictures, about 0 for white noise)."""
    corrs = []
    for a, b in ((grey[:, :-1], grey[:, 1:]), (grey[:-1, :], grey[1:, :])):
        if a.size < 4:
            continue
        a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
        denom = np.sqrt((a * a).sum() * (b * b).sum())
        if denom > 0:
            corrs.append(float((a * b).sum() / denom))
    return float(np.mean(corrs)) if corrs else 1.0


def looks_like_text(rgb: np.ndarray, grey: np.ndarray) -> bool:
    """A dominant background, little colour, and many bands of ink rows separated by blank rows."""
    saturation = (rgb.max(axis=2) - rgb.min(axis=2)).mean()
    if saturation > TEXT_MAX_SATURATION:
        return False
    background = np.median(grey)
    ink = np.abs(grey - background) > 60
    if 1.0 - ink.mean() < TEXT_BACKGROUND:
        return False
    rows = ink.mean(axis=1) > 0.02
    bands = int(np.count_nonzero(rows[1:] & ~rows[:-1]) + (1 if rows[0] else 0))
    return bands >= TEXT_MIN_BANDS


def lowres_residual(img: Image.Image, grey_full: np.ndarray) -> float:
    """How much a round trip through a LOWRES_SIDE px thumbnail changes the picture, relative to
    its own contrast (0 for a picture upscaled from that size or smaller)."""
    if max(img.width, img.height) <= LOWRES_SIDE:
        return 0.0
    small = _thumb(img, LOWRES_SIDE, resample=Image.LANCZOS)
    back = _grey(small.resize(img.size, Image.BICUBIC))
    contrast = grey_full.std()
    return float(np.abs(back - grey_full).mean() / contrast) if contrast > 0 else 0.0


def input_warnings(img: Image.Image) -> list[str]:
    """Warning codes (a subset of WARNING_CODES, in that order) for a decoded RGB image.

    Costs a few milliseconds: every statistic is taken on thumbnails of at most 256 px.
    """
    img = img.convert("RGB") if img.mode != "RGB" else img
    work = _thumb(img, 256)
    grey_work = _grey(work)
    small = _thumb(work, 128)
    grey = _grey(small)
    found = []
    flat = is_flat(grey)
    if flat:
        found.append("flat")
    else:
        if neighbour_correlation(grey) < NOISE_CORR:
            found.append("noise")
        if looks_like_text(np.asarray(work, dtype=np.float64), grey_work):
            found.append("text")
    if not flat and lowres_residual(work, grey_work) < LOWRES_RESIDUAL:
        found.append("low_resolution")
    return found
