"""Inputs the model cannot judge: short warning codes attached to every score.

A ResNet readout answers for any picture, but the score of a flat grey image, a field of noise or
a page of text says nothing about memorability: those inputs lie far from every photo the model
was fitted on. Each check is a cheap statistic of the decoded picture (a few milliseconds: at
most a 1024 px thumbnail and a 512 x 512 crop are examined). Thresholds were chosen on synthetic
degenerate inputs against real photos: 11 of the 4,600 LNSIM + pool photos (0.24 %) get a
warning, every generated degenerate input does (docs/warnings.md, bench/warning_rate.py;
tests/test_quality.py holds the synthetic cases).

Codes, in the order they are reported:
- ``noise``: a field of random noise. Neighbouring pixels of a photo are strongly correlated
  (Pearson r >= 0.26 on every LNSIM photo, median 0.94); noise has r near 0. Mean r of
  horizontally and vertically adjacent pixels of a central 256 x 256 crop at up to 1024 px
  below NOISE_CORR, with some contrast left (crop std >= FLAT_STD).
- ``flat``: a uniform or near-uniform picture (one colour, a faint gradient, faint noise):
  standard deviation of the grey 128 px thumbnail, ignoring the 0.5 % most extreme pixels at
  each end, below FLAT_STD grey levels (0-255).
- ``text``: mostly text (a page, a document screenshot): little colour (mean max-min channel
  spread < TEXT_MAX_SATURATION), a uniform background (>= TEXT_BACKGROUND of all pixels within
  +-TEXT_BACKGROUND_TOL grey levels of the median), some ink (>= TEXT_MIN_INK of the thumbnail differs from the
  background by > 60 levels) and at least TEXT_MIN_BANDS separate bands of ink rows (lines).
- ``low_resolution``: under LOWRES_SIDE px of real detail on the longer side: the picture
  itself is that small, or it was upscaled smoothly (bilinear/bicubic: its spectrum above 0.35 x
  Nyquist, at 256 px, carries under 10^LOWRES_SPECTRUM of the power of its 0.05-0.15 band; real
  photos are above 10^-3.6), or by pixel repetition (rows and columns change at one regular
  spacing, leaving under LOWRES_SIDE distinct rows and columns).

Two codes say what decoding the file found, not what the picture shows, and come last:
- ``multi_frame``: the file has several frames or pages; one was scored (decode_image's
  ``info["n_frames"]``).
- ``truncated_end``: a JPEG whose image data is complete but whose end-of-image marker is
  missing (a cut-off write); it was scored as the complete file (``info["truncated_end"]``).
"""
from __future__ import annotations

import numpy as np
from PIL import Image

WARNING_CODES = ("noise", "flat", "text", "low_resolution", "multi_frame", "truncated_end")

NOISE_CORR = 0.15
FLAT_STD = 3.0
TEXT_MAX_SATURATION = 30.0
TEXT_BACKGROUND = 0.6
TEXT_BACKGROUND_TOL = 10
TEXT_MIN_INK = 0.05
TEXT_MIN_BANDS = 6
LOWRES_SIDE = 64
LOWRES_SPECTRUM = -3.6


def _thumb(img: Image.Image, side: int) -> Image.Image:
    scale = side / max(img.width, img.height)
    if scale >= 1:
        return img
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BOX)


def _grey(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("L"), dtype=np.float64)


def neighbour_correlation(grey: np.ndarray) -> float:
    """Mean Pearson r of horizontally and vertically adjacent pixels (1 smooth, ~0 white noise)."""
    corrs = []
    for a, b in ((grey[:, :-1], grey[:, 1:]), (grey[:-1, :], grey[1:, :])):
        if a.size < 4:
            continue
        a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
        denom = np.sqrt((a * a).sum() * (b * b).sum())
        if denom > 0:
            corrs.append(float((a * b).sum() / denom))
    return float(np.mean(corrs)) if corrs else 1.0


def robust_std(grey: np.ndarray) -> float:
    lo, hi = np.percentile(grey, [0.5, 99.5])
    core = grey[(grey >= lo) & (grey <= hi)]
    return float(core.std()) if core.size else 0.0


def looks_like_text(rgb: np.ndarray, grey: np.ndarray) -> bool:
    """rgb (H, W, 3) and grey (H, W) of the picture at up to 1024 px."""
    if (rgb.max(axis=2) - rgb.min(axis=2)).mean() >= TEXT_MAX_SATURATION:
        return False
    background = np.median(grey)
    if (np.abs(grey - background) <= TEXT_BACKGROUND_TOL).mean() < TEXT_BACKGROUND:
        return False
    ink = np.abs(grey - background) > 60
    if ink.mean() < TEXT_MIN_INK:
        return False
    rows = ink.mean(axis=1) > 0.02
    bands = int(np.count_nonzero(rows[1:] & ~rows[:-1])) + int(rows[0])
    return bands >= TEXT_MIN_BANDS


def spectral_detail(grey: np.ndarray) -> float:
    """log10 of the mean power above 0.35 x Nyquist over that of the 0.05-0.15 x Nyquist band
    (Hann-windowed 2-D FFT). About -2 for a typical photo; below -3.6 for a smooth upscale."""
    a = grey - grey.mean()
    h, w = a.shape
    if min(h, w) < 8:
        return 0.0
    power = np.abs(np.fft.fft2(a * np.outer(np.hanning(h), np.hanning(w)))) ** 2
    f = np.maximum(np.abs(np.fft.fftfreq(h))[:, None], np.abs(np.fft.fftfreq(w))[None, :]) * 2
    high, band = power[f > 0.35], power[(f > 0.05) & (f < 0.15)]
    if band.size == 0 or high.size == 0 or band.mean() <= 0:
        return 0.0
    return float(np.log10(high.mean() / band.mean() + 1e-20))


def _distinct_lines(grey: np.ndarray, axis: int) -> int | None:
    """Rows (axis 0) or columns (axis 1) that differ from their predecessor, when they change at
    one regular spacing >= 2 (pixel repetition); None otherwise."""
    diff = np.abs(np.diff(grey, axis=axis)).mean(axis=1 - axis)
    changes = np.flatnonzero(diff > 2.0)
    if len(changes) < 2:
        return None
    gaps = np.diff(changes)
    step = int(np.median(gaps))
    if step < 2 or np.mean(np.abs(gaps - step) <= 1) < 0.9:
        return None
    return len(changes) + 1


def is_low_resolution(img: Image.Image, grey_work: np.ndarray) -> bool:
    side = max(img.width, img.height)
    if side < LOWRES_SIDE:
        return True
    if spectral_detail(grey_work) < LOWRES_SPECTRUM:
        return True
    # Pixel repetition, read on a central crop at full resolution (bounded memory for any size).
    left, top = max(0, (img.width - 512) // 2), max(0, (img.height - 512) // 2)
    crop = _grey(img.crop((left, top, min(img.width, left + 512), min(img.height, top + 512))))
    rows, cols = _distinct_lines(crop, 0), _distinct_lines(crop, 1)
    if rows is None or cols is None:
        return False
    rows_total = rows * img.height / crop.shape[0]
    cols_total = cols * img.width / crop.shape[1]
    return max(rows_total, cols_total) < LOWRES_SIDE


def input_warnings(img: Image.Image) -> list[str]:
    """Warning codes (a subset of WARNING_CODES, in that order) for a decoded image; [] is fine.
    "multi_frame": decode_image kept one of several frames or pages (img.info["n_frames"]);
    "truncated_end": it restored a JPEG's missing end-of-image marker (img.info["truncated_end"])."""
    several_frames = int(img.info.get("n_frames", 1)) > 1
    truncated_end = bool(img.info.get("truncated_end"))
    if img.mode != "RGB":
        from .preprocess import to_rgb  # every mode, alpha and bit depth as the scorer sees it

        img = to_rgb(img)
    detail = _thumb(img, 1024)  # text strokes and noise survive at this size; memory stays bounded
    grey_detail = _grey(detail)
    work = _thumb(detail, 256)
    grey_work = _grey(work)
    h, w = grey_detail.shape
    top, left = max(0, (h - 256) // 2), max(0, (w - 256) // 2)
    crop = grey_detail[top:top + 256, left:left + 256]
    found = []
    if crop.std() >= FLAT_STD and neighbour_correlation(crop) < NOISE_CORR:
        found.append("noise")
    elif robust_std(_grey(_thumb(work, 128))) < FLAT_STD:
        found.append("flat")
    if not found and looks_like_text(np.asarray(detail, dtype=np.float64), grey_detail):
        found.append("text")
    if not found or found == ["text"]:
        if is_low_resolution(img, grey_work):
            found.append("low_resolution")
    if several_frames:
        found.append("multi_frame")
    if truncated_end:
        found.append("truncated_end")
    return found
