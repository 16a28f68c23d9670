"""Heatmap rendering: colormaps, overlays on the original photo, and raw-map encodings (PNG / .npy).

Colormaps are 256-entry uint8 lookup tables built in numpy (no matplotlib): the perceptually
uniform viridis family from Matt Zucconi's published degree-6 polynomial fits (CC0), Google's
Turbo from its published polynomial approximation (Apache-2.0), and jet from its piecewise-linear
definition. The viridis-family fits are within ~5 of 255 levels of the reference tables; the
Turbo fit is close in the middle but loosest at the very ends (up to ~0.13 at t = 0 and 1).
"""
from __future__ import annotations

import io
from functools import lru_cache

import numpy as np

DEFAULT_COLORMAP = "inferno"
# Fast zlib level: overlays are photos (compress poorly anyway); level 6 costs ~3x the time for ~5% size.
PNG_COMPRESS_LEVEL = 1

# Polynomial coefficients c0..c6 per channel (rows: R, G, B): colour(t) = sum_k c_k t^k.
_POLYNOMIALS = {
    "inferno": (
        (0.0002189403691192265, 0.1065134194856116, 11.60249308247187, -41.70399613139459,
         77.162935699427, -71.31942824499214, 25.13112622477341),
        (0.001651004631001012, 0.5639564367884091, -3.972853965665698, 17.43639888205313,
         -33.40235894210092, 32.62606426397723, -12.24266895238567),
        (-0.01948089843709184, 3.932712388889277, -15.9423941062914, 44.35414519872813,
         -81.80730925738993, 73.20951985803202, -23.07032500287172),
    ),
    "viridis": (
        (0.2777273272234177, 0.1050930431085774, -0.3308618287255563, -4.634230498983486,
         6.228269936347081, 4.776384997670288, -5.435455855934631),
        (0.005407344544966578, 1.404613529898575, 0.214847559468213, -5.799100973351585,
         14.17993336680509, -13.74514537774601, 4.645852612178535),
        (0.3340998053353061, 1.384590162594685, 0.09509516302823659, -19.33244095627987,
         56.69055260068105, -65.35303263337234, 26.3124352495832),
    ),
    "magma": (
        (-0.002136485053939582, 0.2516605407371642, 8.353717279216625, -27.66873308576866,
         52.17613981234068, -50.76852536473588, 18.65570506591883),
        (-0.000749655052795221, 0.6775232436837668, -3.577719514958484, 14.26473078096533,
         -27.94360607168351, 29.04658282127291, -11.48977351997711),
        (-0.005386127855323933, 2.494026599312351, 0.3144679030132573, -13.64921318813922,
         12.94416944238394, 4.23415299384598, -5.601961508734096),
    ),
    "plasma": (
        (0.05873234392399702, 2.176514634195958, -2.689460476458034, 6.130348345893603,
         -11.10743619062271, 10.02306557647065, -3.658713842777788),
        (0.02333670892565664, 0.2383834171260182, -7.455851135738909, 42.3461881477227,
         -82.66631109428045, 71.41361770095349, -22.93153465461149),
        (0.5433401826748754, 0.7539604599784036, 3.110799939717086, -28.51885465332158,
         60.13984767418263, -54.07218655560067, 18.19190778539828),
    ),
    # Turbo (colormap: A. Mikhailov; approximation: R. Du; Google 2019, Apache-2.0): degree-5 fit.
    "turbo": (
        (0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943),
        (0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604),
        (0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973),
    ),
}

# jet: piecewise-linear (position, value) knots per channel, as in MATLAB/matplotlib.
_JET_KNOTS = (
    ((0.0, 0.35, 0.66, 0.89, 1.0), (0.0, 0.0, 1.0, 1.0, 0.5)),
    ((0.0, 0.125, 0.375, 0.64, 0.91, 1.0), (0.0, 0.0, 1.0, 1.0, 0.0, 0.0)),
    ((0.0, 0.11, 0.34, 0.65, 1.0), (0.5, 1.0, 1.0, 0.0, 0.0)),
)

# Perceptually uniform maps first; turbo and jet are there for people used to them.
COLORMAPS = ("inferno", "viridis", "magma", "plasma", "turbo", "jet")


@lru_cache(maxsize=None)
def colormap_table(name: str) -> np.ndarray:
    """The (256, 3) uint8 lookup table of a colormap (read-only)."""
    t = np.linspace(0.0, 1.0, 256)
    if name == "jet":
        rgb = np.stack([np.interp(t, xs, ys) for xs, ys in _JET_KNOTS], axis=1)
    elif name in _POLYNOMIALS:
        # np.polyval wants the highest power first.
        rgb = np.stack([np.polyval(coeffs[::-1], t) for coeffs in _POLYNOMIALS[name]], axis=1)
    else:
        raise ValueError(f"unknown colormap {name!r}; choose from {', '.join(COLORMAPS)}")
    table = np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)
    table.setflags(write=False)
    return table


def heatmap_to_uint8(heatmap: np.ndarray) -> np.ndarray:
    """float map in [0, 1] -> uint8 levels 0..255 (NaN counts as 0, values are clipped)."""
    arr = np.nan_to_num(np.asarray(heatmap, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    if arr.ndim != 2:
        raise ValueError(f"a heatmap is 2-D (height, width), got shape {arr.shape}")
    return np.rint(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)


def colorize(heatmap: np.ndarray, colormap: str = DEFAULT_COLORMAP) -> np.ndarray:
    """(H, W) float map in [0, 1] -> (H, W, 3) uint8 RGB through the colormap."""
    return colormap_table(colormap)[heatmap_to_uint8(heatmap)]


def resize_heatmap(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float map to size (width, height)."""
    from PIL import Image

    arr = np.asarray(heatmap, dtype=np.float32)
    if (arr.shape[1], arr.shape[0]) == tuple(size):
        return arr
    return np.asarray(Image.fromarray(arr, mode="F").resize(tuple(size), Image.BILINEAR), dtype=np.float32)


def overlay_image(img, heatmap: np.ndarray, *, alpha: float = 0.5, colormap: str = DEFAULT_COLORMAP):
    """The coloured heatmap alpha-blended onto `img` (PIL, upright) at the image's own size.

    alpha is the heatmap's weight: 0 gives the photo, 1 the colour map alone. A heatmap of
    another size (e.g. the network input's) is resized to the image first. The photo is drawn
    as the model saw it: a decode_image() result as it is; any other image (another mode, an
    embedded ICC profile) through the same to_rgb() conversion to sRGB.
    """
    from PIL import Image

    from .preprocess import to_rgb

    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}")
    colormap_table(colormap)  # fail on a bad name before any work
    photo = to_rgb(img)
    colours = Image.fromarray(colorize(resize_heatmap(heatmap, photo.size), colormap), mode="RGB")
    return Image.blend(photo, colours, alpha)


def encode_png(image, *, compress_level: int = PNG_COMPRESS_LEVEL) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def overlay_png(img, heatmap: np.ndarray, *, alpha: float = 0.5, colormap: str = DEFAULT_COLORMAP) -> bytes:
    """overlay_image() encoded as PNG bytes (RGB, the image's original width x height)."""
    return encode_png(overlay_image(img, heatmap, alpha=alpha, colormap=colormap))


def heatmap_png(heatmap: np.ndarray, *, colormap: str | None = None) -> bytes:
    """The map alone as PNG: 8-bit grayscale (0 = no evidence, 255 = peak), or RGB via a colormap."""
    from PIL import Image

    if colormap is None:
        return encode_png(Image.fromarray(heatmap_to_uint8(heatmap), mode="L"))
    return encode_png(Image.fromarray(colorize(heatmap, colormap), mode="RGB"))


def heatmap_npy(heatmap: np.ndarray) -> bytes:
    """The float32 map as a .npy file's bytes (np.load reads it back exactly)."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(heatmap, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()
