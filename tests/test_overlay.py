"""Heatmap colouring and encoding: the colormap tables, colorize, the overlay PNG and the raw
heatmap encodings (model/overlay.py). Grad-RAM itself: test_gradram.py."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from model.overlay import (COLORMAPS, colorize, colormap_table, heatmap_npy, heatmap_png, overlay_image,
                           overlay_png)

def test_colormaps_are_256_entry_tables_and_perceptual_ones_brighten():
    for name in COLORMAPS:
        table = colormap_table(name)
        assert table.shape == (256, 3) and table.dtype == np.uint8
    for name in ("inferno", "viridis", "magma", "plasma"):
        luminance = colormap_table(name).astype(float) @ [0.2126, 0.7152, 0.0722]
        assert np.all(np.diff(luminance) >= -1.0), name  # monotone up to 8-bit rounding
        assert luminance[-1] - luminance[0] > 150
    # well-known anchor colours (matplotlib's tables), within the fits' accuracy
    assert np.abs(colormap_table("viridis")[0].astype(int) - (68, 1, 84)).max() <= 5
    assert np.abs(colormap_table("inferno")[255].astype(int) - (252, 255, 164)).max() <= 5
    assert tuple(colormap_table("jet")[0]) == (0, 0, 128)
    with pytest.raises(ValueError):
        colormap_table("rainbow-ish")


def test_colorize_maps_levels_through_the_table():
    heat = np.array([[0.0, 1.0], [0.5, np.nan]], dtype=np.float32)
    rgb = colorize(heat, "viridis")
    table = colormap_table("viridis")
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert (rgb[0, 0] == table[0]).all() and (rgb[0, 1] == table[255]).all()
    assert (rgb[1, 0] == table[128]).all() and (rgb[1, 1] == table[0]).all()


def test_overlay_png_has_the_original_size_and_blends():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (91, 137, 3), dtype=np.uint8))
    heat = np.random.default_rng(1).random((91, 137)).astype(np.float32)
    out = Image.open(io.BytesIO(overlay_png(img, heat, alpha=0.4, colormap="turbo")))
    out.load()
    assert out.format == "PNG" and out.size == (137, 91) and out.mode == "RGB"
    assert np.array_equal(np.asarray(overlay_image(img, heat, alpha=0.0)), np.asarray(img))
    assert np.array_equal(np.asarray(overlay_image(img, heat, alpha=1.0, colormap="magma")), colorize(heat, "magma"))
    # a map at the network's resolution is resized to the photo
    assert overlay_image(img, heat[:40, :60], alpha=0.5).size == (137, 91)
    with pytest.raises(ValueError):
        overlay_png(img, heat, alpha=1.5)
    with pytest.raises(ValueError):
        overlay_png(img, heat, colormap="nope")


def test_raw_heatmap_encodings_round_trip():
    heat = np.linspace(0, 1, 40 * 30, dtype=np.float32).reshape(30, 40)
    gray = Image.open(io.BytesIO(heatmap_png(heat)))
    assert gray.mode == "L" and gray.size == (40, 30)
    levels = np.asarray(gray)
    assert levels[0, 0] == 0 and levels[-1, -1] == 255
    assert np.abs(levels.astype(float) / 255 - heat).max() <= 0.5 / 255 + 1e-6
    coloured = Image.open(io.BytesIO(heatmap_png(heat, colormap="inferno")))
    assert coloured.mode == "RGB" and coloured.size == (40, 30)
    assert np.array_equal(np.load(io.BytesIO(heatmap_npy(heat))), heat)
