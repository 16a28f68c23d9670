"""False-warning rate of model.quality on real photos, detection rate on generated degenerate inputs.

Real photos (from ../shared/data; a set that is absent is skipped and said so):
- lnsim (LNSIM Image_data) and pool: the photos the thresholds must leave alone (the headline
  false-warning rate is over these two together);
- pool2 and cdm_dev, for information: other kinds of pictures (posters, flags, memes, graphics),
  where some warnings may be deserved.
Degenerate inputs, generated here with a fixed seed: noise fields, flat pictures, text pages
(PIL's default font, also after JPEG q75) and low-resolution pictures (tiny, smooth upscales,
pixel repetition); a case is detected when its expected code is among the warnings.

    nice -n 10 .venv/bin/python bench/warning_rate.py --out /tmp/warning_rate.csv
    .venv/bin/python bench/warning_rate.py --limit 50 --out /tmp/w.csv   # quick look

Prints a Markdown table; --out writes one CSV row per image (set, name, expected, warnings, size, ms).
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parent.parent

from model.preprocess import ImageDecodeError, decode_image  # noqa: E402
from model.quality import input_warnings  # noqa: E402

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
WORDS = ("the quick brown fox jumps over a lazy dog while memorability scores of photos are "
         "measured on images of scenes objects and people invoice total page chapter").split()


def real_sets(data: Path) -> dict[str, tuple[Path, bool]]:
    """name -> (folder, counts toward the headline false-warning rate)."""
    return {
        "lnsim": (data / "lnsim" / "Image_data", True),
        "pool": (data / "pool", True),
        "pool2": (data / "pool2", False),
        "cdm_dev": (data / "cdm_dev" / "images", False),
    }


def list_images(folder: Path, limit: int | None, seed: int = 0) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if limit is not None and limit < len(files):
        idx = np.random.default_rng(seed).choice(len(files), size=limit, replace=False)
        files = [files[i] for i in sorted(idx)]
    return files


# ---- generated degenerate inputs -------------------------------------------------------------

def _img(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8))


def jpeg(img: Image.Image, quality: int = 75) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return decode_image(buf.getvalue())


def text_page(size: tuple[int, int], font_size: int, *, dark_on_light: bool = True, seed: int = 0) -> Image.Image:
    """A page of random words in PIL's default font, lines 1.5 x font size apart."""
    rng = np.random.default_rng(seed)
    bg, fg = ((248, 248, 245), (25, 25, 25)) if dark_on_light else ((18, 18, 22), (235, 235, 235))
    img = Image.new("RGB", size, bg)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=font_size)
    y = font_size // 2
    while y + font_size < size[1] - font_size // 2:
        draw.text((font_size // 2, y), " ".join(rng.choice(WORDS, 24)), fill=fg, font=font)
        y += int(font_size * 1.5)
    return img


def photo_like(side: int = 512, *, seed: int = 0) -> Image.Image:
    """Smooth random sinusoids + filled shapes + fine grain: a stand-in for a photo."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side] / side
    out = np.full((side, side, 3), 128.0)
    for _ in range(12):
        fx, fy, phase = rng.uniform(-8, 8), rng.uniform(-8, 8), rng.uniform(0, 2 * np.pi)
        out += rng.uniform(5, 25, 3) * np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)[..., None]
    img = _img(out)
    draw = ImageDraw.Draw(img)
    for _ in range(40):
        x0, y0 = (int(v) for v in rng.integers(0, side, 2))
        w, h = (int(v) for v in rng.integers(side // 40, side // 4, 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x0 + w, y0 + h), fill=colour)
    return _img(np.asarray(img, dtype=np.float64) + rng.normal(0, 8, (side, side, 3)))


def degenerate_cases(seed: int = 0):
    """Yield (name, expected code, image)."""
    rng = np.random.default_rng(seed)
    for side in (64, 256, 1024):
        for colour in (True, False):
            shape = (side, side, 3) if colour else (side, side)
            tag = f"{side}_{'rgb' if colour else 'grey'}"
            yield f"noise_uniform_{tag}", "noise", _img(rng.integers(0, 256, shape))
            yield f"noise_gaussian_{tag}", "noise", _img(rng.normal(128, 40, shape))
            sp = np.full(shape, 128.0)
            u = rng.random(shape[:2])
            sp[u < 0.1], sp[u > 0.9] = 0, 255
            yield f"noise_saltpepper_{tag}", "noise", _img(sp)
    for colour in ((0, 0, 0), (255, 255, 255), (128, 128, 128), (200, 30, 60), (20, 90, 200)):
        yield f"flat_{'_'.join(map(str, colour))}", "flat", Image.new("RGB", (400, 300), colour)
    for lo, hi in ((100, 110), (0, 8), (240, 250)):
        ramp = np.tile(np.linspace(lo, hi, 400), (300, 1))
        yield f"flat_gradient_{lo}_{hi}", "flat", _img(np.stack([ramp] * 3, -1))
    for i in range(3):
        yield f"flat_faint_noise_{i}", "flat", _img(rng.normal(60 + 60 * i, 1.5, (300, 400, 3)))
    for size in ((400, 300), (640, 480), (800, 600), (1024, 768)):
        for font_size in (10, 14, 18, 22, 28):
            for dark in (True, False):
                page = text_page(size, font_size, dark_on_light=dark, seed=font_size)
                name = f"text_{size[0]}x{size[1]}_f{font_size}_{'dark' if dark else 'light'}"
                yield name, "text", page
                yield name + "_jpeg75", "text", jpeg(page)
    for i in range(4):
        photo = photo_like(512, seed=100 + i)
        yield f"lowres_tiny_48x36_{i}", "low_resolution", photo.resize((48, 36), Image.BICUBIC)
        small = photo.resize((32, 32), Image.BICUBIC)
        yield f"lowres_bicubic_32_to_512_{i}", "low_resolution", small.resize((512, 512), Image.BICUBIC)
        yield f"lowres_bilinear_32_to_512_{i}", "low_resolution", small.resize((512, 512), Image.BILINEAR)
        yield f"lowres_nearest_32_to_512_{i}", "low_resolution", small.resize((512, 512), Image.NEAREST)
        random32 = _img(rng.integers(0, 256, (32, 32, 3)))
        yield f"lowres_nearest_random32_to_512_{i}", "low_resolution", random32.resize((512, 512), Image.NEAREST)
        # not degenerate: the generated photo itself must stay unwarned (counted separately)
        yield f"control_photo_like_{i}", "", photo


# ---- measurement -----------------------------------------------------------------------------

def timed_warnings(img: Image.Image) -> tuple[list[str], float]:
    started = time.perf_counter()
    warns = input_warnings(img)
    return warns, (time.perf_counter() - started) * 1000.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, required=True, help="per-image CSV")
    parser.add_argument("--limit", type=int, default=None, help="at most N photos per real set (fixed random sample)")
    parser.add_argument("--no-generated", action="store_true", help="skip the generated degenerate inputs")
    args = parser.parse_args(argv)

    rows, table = [], []
    headline = [0, 0]
    for name, (folder, counts) in real_sets(args.data).items():
        if not folder.is_dir():
            print(f"{name}: {folder} absent, skipped", file=sys.stderr)
            continue
        files = list_images(folder, args.limit)
        warned, errors, by_code, ms = 0, 0, {}, []
        for path in files:
            try:
                img = decode_image(path)
            except ImageDecodeError as exc:
                errors += 1
                rows.append((name, path.name, "", f"error:{exc.reason}", "", "", ""))
                continue
            warns, t = timed_warnings(img)
            ms.append(t)
            warned += bool(warns)
            for code in warns:
                by_code[code] = by_code.get(code, 0) + 1
            rows.append((name, path.name, "", ";".join(warns), img.width, img.height, f"{t:.2f}"))
        if counts:
            headline[0] += warned
            headline[1] += len(files) - errors
        codes = ", ".join(f"{c} {n}" for c, n in sorted(by_code.items())) or "-"
        table.append((name, len(files) - errors, f"{warned} ({100 * warned / max(1, len(files) - errors):.2f} %)",
                      codes, f"{np.median(ms):.1f}" if ms else "-"))
        print(f"{name}: {len(files)} photos, {warned} warned", file=sys.stderr)

    detect = {}
    if not args.no_generated:
        for case, expected, img in degenerate_cases():
            warns, t = timed_warnings(img)
            kind = expected or "control (photo-like, expect none)"
            hit = (expected in warns) if expected else not warns
            n, ok, exact = detect.get(kind, (0, 0, 0))
            detect[kind] = (n + 1, ok + hit, exact + (warns == [expected] if expected else hit))
            rows.append(("generated", case, expected, ";".join(warns), img.width, img.height, f"{t:.2f}"))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(("set", "name", "expected", "warnings", "width", "height", "ms"))
        writer.writerows(rows)

    print("| set | photos | with any warning | by code | median ms |\n|---|---|---|---|---|")
    for r in table:
        print("| " + " | ".join(map(str, r)) + " |")
    if headline[1]:
        print(f"\nFalse-warning rate, LNSIM + pool: {headline[0]} / {headline[1]} = "
              f"{100 * headline[0] / headline[1]:.2f} %")
    if detect:
        print("\n| generated input | cases | detected | exactly that code |\n|---|---|---|---|")
        for kind, (n, ok, exact) in detect.items():
            print(f"| {kind} | {n} | {ok} | {exact} |")
    print(f"\nper-image CSV: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
