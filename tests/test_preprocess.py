"""One preprocessing path: decoding of every mode, EXIF orientation, resize policy, errors."""
import io

import numpy as np
import pytest
from PIL import Image

from model.preprocess import ImageDecodeError, Preprocessing, ResizePolicy, decode_image
from tests.conftest import make_image


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "RGB", "1"])
@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_every_mode_becomes_rgb(mode, fmt):
    if mode == "CMYK" and fmt == "PNG":
        pytest.skip("PNG cannot hold CMYK")
    img = decode_image(make_image(size=(40, 30), mode=mode, fmt=fmt))
    assert img.mode == "RGB" and img.size == (40, 30)


def test_sixteen_bit_grey_is_rescaled_not_clipped():
    arr = (np.linspace(0, 65535, 64 * 32).reshape(32, 64)).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    img = decode_image(buf.getvalue())
    px = np.asarray(img)
    assert img.mode == "RGB" and px.max() >= 250 and px.min() <= 5 and len(np.unique(px[..., 0])) > 100


def test_transparent_pixels_become_white():
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    assert decode_image(buf.getvalue()).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (60, 20), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert decode_image(buf.getvalue()).size == (20, 60)


@pytest.mark.parametrize("data,reason", [
    (b"", "empty"),
    (b"this is plainly not an image", "not_an_image"),
    (make_image(size=(64, 64))[:300], "corrupt"),
])
def test_bad_inputs_raise_with_reason(data, reason):
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data)
    assert info.value.reason == reason and info.value.message


def test_pixel_limit_guards_against_bombs():
    with pytest.raises(ImageDecodeError) as info:
        decode_image(make_image(size=(200, 200), fmt="PNG"), max_pixels=10_000)
    assert info.value.reason == "too_many_pixels"


@pytest.mark.parametrize("w,h,expected", [
    (500, 375, (288, 224)), (375, 500, (224, 288)), (256, 256, (224, 224)),
    (4000, 100, (448, 224)), (64, 64, (224, 224)), (1024, 768, (288, 224)),
])
def test_shorter_side_policy_keeps_aspect_on_a_small_grid(w, h, expected):
    assert ResizePolicy(size=224).output_size(w, h) == expected


def test_square_policy_and_tensor_range():
    pre = Preprocessing(resize=ResizePolicy(mode="square", size=96))
    t = pre.image_to_tensor(decode_image(make_image(size=(300, 120))))
    assert t.shape == (3, 96, 96) and 0.0 <= float(t.min()) and float(t.max()) <= 1.0


def test_preprocessing_round_trips_through_dict():
    pre = Preprocessing(resize=ResizePolicy(mode="square", size=160), input_scaling="unit")
    assert Preprocessing.from_dict(pre.to_dict()) == pre
