"""Defects a fresh-user trial found: each test asserts the right behaviour (status, reason, exit code)."""
from __future__ import annotations

import pytest

from app.cli import main
from tests.conftest import make_image


def test_heatmap_without_weights_uses_the_default_checkpoint(tiny_checkpoint, tmp_path, monkeypatch,
                                                             one_torch_thread, capsys):
    monkeypatch.setenv("RESMEMNET_WEIGHTS", str(tiny_checkpoint))
    folder = tmp_path / "photos"
    folder.mkdir()
    make_image(folder / "a.jpg")
    out = tmp_path / "out"
    assert main(["heatmap", str(folder), "-o", str(out)]) == 0
    assert (out / "a.overlay.png").is_file()
    assert "test-random" in capsys.readouterr().err


# -- 2: multi-frame files are scored on frame 1 with the "multi_frame" warning -----------------
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


@pytest.fixture(scope="module")
def scorer(tiny_checkpoint):
    from model.scoring import Scorer

    return Scorer.from_checkpoint(tiny_checkpoint, device="cpu")


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
    from test_service_api import serving

    with serving(scorer) as client:
        r = client.post("/score", files={"file": ("anim.gif", multi_frame_file("gif"), "image/gif")})
        assert r.status_code == 200, r.text
        assert r.json()["warnings"][-1] == "multi_frame"
        r = client.post("/score/batch", files=[("files", ("a.tif", multi_frame_file("tiff"), "image/tiff")),
                                               ("files", ("b.png", make_image(fmt="PNG"), "image/png"))])
        results = r.json()["results"]
        assert "multi_frame" in results[0]["warnings"] and "multi_frame" not in results[1]["warnings"]


# -- 3: the pixel limit is ours, above and below Pillow's own bomb limit ----------------------
PILLOW_DEFAULT_LIMIT = int(1024 * 1024 * 1024 // 4 // 3)  # Pillow refuses at twice this (178956970 px)


def test_over_pillows_bomb_limit_quotes_our_limit(monkeypatch):
    from PIL import Image
    from test_service_api import png_header_only

    from model.preprocess import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", PILLOW_DEFAULT_LIMIT)
    with pytest.raises(ImageDecodeError) as info:
        decode_image(png_header_only(20000, 10000))  # 200 MP, refused from the header
    assert info.value.reason == "too_many_pixels"
    assert info.value.message == f"image is 200000000 pixels; the limit is {DEFAULT_MAX_PIXELS}"
    assert "178956970" not in info.value.message


def test_configured_limit_above_pillows_is_honoured(monkeypatch):
    # Pillow's limit scaled down (refuses over 2000 px) so the test needs no 200 MP buffers.
    from PIL import Image

    from model.preprocess import ImageDecodeError, decode_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = make_image(size=(100, 100), fmt="PNG")  # 10,000 px
    assert decode_image(data, max_pixels=20_000).size == (100, 100)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, max_pixels=5_000)
    assert info.value.reason == "too_many_pixels"
    assert info.value.message.endswith("the limit is 5000")


# -- 4: a stalled upload gets 408 request_timeout and the connection is closed -----------------
def _read_all(sock) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def test_stalled_upload_gets_408_and_is_closed(scorer, one_torch_thread):
    import json
    import socket

    from test_service_http import metric_samples, serve_in_thread

    from app.service import create_app
    from app.settings import ServiceSettings

    app = create_app(ServiceSettings(warmup=False, body_timeout_s=0.5), scorer=scorer)
    with serve_in_thread(app) as base:
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            sock.sendall(b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n"
                         b"Content-Type: multipart/form-data; boundary=XyZ\r\n\r\n"
                         b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n\r\n"
                         + b"\xff" * 1000)
            answer = _read_all(sock)  # returns only when the server closes the connection
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split(b"\r\n")[0] == b"HTTP/1.1 408 Request Timeout"
        error = json.loads(body)["error"]
        assert error["status"] == 408 and error["reason"] == "request_timeout" and "0.5 s" in error["message"]
        counted = {s.labels["reason"]: s.value for s in metric_samples(base, "resmemnet_errors_total")}
        assert counted.get("request_timeout") == 1.0
        # a complete upload on the same server still scores
        import httpx

        r = httpx.post(base + "/score", files={"file": ("a.jpg", make_image(), "image/jpeg")}, timeout=60)
        assert r.status_code == 200 and r.json()["warnings"] is not None


def test_body_timeout_setting_is_validated():
    from app.settings import ServiceSettings, SettingsError

    assert ServiceSettings.from_env({"RESMEMNET_BODY_TIMEOUT_S": "2.5"}, warmup=False).body_timeout_s == 2.5
    with pytest.raises(SettingsError, match="body_timeout_s must be positive"):
        ServiceSettings(body_timeout_s=0)


# -- 5: HEAD on /, /healthz and /readyz ---------------------------------------------------------
def test_head_is_allowed_on_index_and_probes(scorer, one_torch_thread):
    from test_service_api import serving

    with serving(scorer) as client:
        for path in ("/", "/healthz", "/readyz"):
            get, head = client.get(path), client.head(path)
            assert head.status_code == get.status_code == 200, (path, head.status_code)
            assert head.content == b""
        assert client.head("/", headers={"accept": "text/html"}).status_code == 200
        assert client.head("/score").status_code == 405  # POST-only endpoints still refuse HEAD


# -- 6: serve on a taken port: one error line, exit 2, before the model loads ------------------
def test_serve_on_a_taken_port_fails_at_once(tiny_checkpoint, monkeypatch, capsys):
    import socket

    import app.service

    def must_not_load(*a, **k):
        raise AssertionError("the app was created although the port is taken")

    monkeypatch.setattr(app.service, "create_app", must_not_load)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["serve", "--host", "127.0.0.1", "--port", str(port), "--weights", str(tiny_checkpoint)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"resmemnet serve: error: cannot listen on 127.0.0.1:{port}: ")


def test_check_port_accepts_a_free_port():
    from app.cli.serve import check_port

    with socket_free_port() as port:
        assert check_port("127.0.0.1", port) is None


def socket_free_port():
    import contextlib
    import socket

    @contextlib.contextmanager
    def free():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        yield port
    return free()


# -- 7: symlinked sub-folders are followed, loops walked once ----------------------------------
def test_collect_inputs_follows_symlinked_folders_without_looping(tmp_path):
    import os

    from model.scoring import collect_inputs

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    make_image(elsewhere / "linked.jpg")
    top = tmp_path / "top"
    (top / "sub").mkdir(parents=True)
    make_image(top / "a.jpg")
    make_image(top / "sub" / "b.jpg")
    os.symlink(elsewhere, top / "link")
    os.symlink(top, top / "sub" / "loop")  # a loop back to the top
    files, problems = collect_inputs([top])
    assert problems == []
    assert files == [str(top / "a.jpg"), str(top / "link" / "linked.jpg"), str(top / "sub" / "b.jpg")]


def test_score_cli_scores_files_in_symlinked_folders(tiny_checkpoint, tmp_path, one_torch_thread):
    import csv
    import os

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    make_image(elsewhere / "linked.jpg")
    top = tmp_path / "top"
    top.mkdir()
    os.symlink(elsewhere, top / "link")
    out = tmp_path / "scores.csv"
    assert main(["score", str(top), "--weights", str(tiny_checkpoint), "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["path"] for r in rows] == [str(top / "link" / "linked.jpg")] and rows[0]["score"]
