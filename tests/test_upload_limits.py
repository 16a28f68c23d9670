"""Limits on what one upload may cost: the pixel limit is the project's own, above and below
Pillow's bomb limit, and an upload that stops arriving gets 408 request_timeout and a closed
connection."""
from __future__ import annotations

import pytest

from conftest import make_image, metric_samples, serve_in_thread
from test_service_api import png_header_only


PILLOW_DEFAULT_LIMIT = int(1024 * 1024 * 1024 // 4 // 3)  # Pillow refuses at twice this (178956970 px)


def test_over_pillows_bomb_limit_quotes_our_limit(monkeypatch):
    from PIL import Image

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


def _read_all(sock) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


@pytest.mark.process  # a server on loopback
def test_stalled_upload_gets_408_and_is_closed(scorer, one_torch_thread):
    import json
    import socket

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
