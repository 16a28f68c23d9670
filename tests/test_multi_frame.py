"""Multi-frame files (animated GIF and PNG, multi-page TIFF, MPO) are scored on their first frame
and carry the `multi_frame` warning, in the Scorer and over HTTP; single-frame files do not."""
from __future__ import annotations

import pytest

from conftest import make_image, serving

def _frames(n, size=(96, 80)):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB") for _ in range(n)]


def multi_frame_file(kind: str) -> bytes:
    import io

    frames = _frames(3)
    buf = io.BytesIO()
    if kind == "gif":
        frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    elif kind == "tiff":
        frames[0].save(buf, format="TIFF", save_all=True, append_images=frames[1:])
    elif kind == "apng":
        frames[0].save(buf, format="PNG", save_all=True, append_images=frames[1:], duration=100)
    elif kind == "mpo":
        frames[0].save(buf, format="MPO", save_all=True, append_images=frames[1:])
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["gif", "tiff", "apng", "mpo"])
def test_multi_frame_files_warn_multi_frame_and_score_frame_one(kind, scorer, one_torch_thread):
    from model.preprocess import decode_image

    data = multi_frame_file(kind)
    assert decode_image(data).info["n_frames"] == 3
    _, w, h, warns, _ = scorer.prepare(data)
    assert (w, h) == (96, 80) and warns[-1] == "multi_frame" and warns.count("multi_frame") == 1


def test_single_frame_files_carry_no_multi_frame_warning(scorer, one_torch_thread):
    from model.preprocess import decode_image

    for fmt in ("PNG", "GIF", "TIFF", "JPEG"):
        data = make_image(fmt=fmt)
        assert decode_image(data).info["n_frames"] == 1
        assert "multi_frame" not in scorer.prepare(data).warnings


def test_service_answers_multi_frame_warning(scorer, one_torch_thread):
    with serving(scorer) as client:
        r = client.post("/score", files={"file": ("anim.gif", multi_frame_file("gif"), "image/gif")})
        assert r.status_code == 200, r.text
        assert r.json()["warnings"][-1] == "multi_frame"
        r = client.post("/score/batch", files=[("files", ("a.tif", multi_frame_file("tiff"), "image/tiff")),
                                               ("files", ("b.png", make_image(fmt="PNG"), "image/png"))])
        results = r.json()["results"]
        assert "multi_frame" in results[0]["warnings"] and "multi_frame" not in results[1]["warnings"]
