"""The service over real HTTP on 127.0.0.1: `resmemnet serve` as the container runs it (a subprocess
configured by RESMEMNET_* variables), and uvicorn in a thread for tests that need a slowed model."""
from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import (SHARED_DATA, SlowScorer, free_port, make_image, metric_samples, serve_command,
                      serve_in_thread, serve_subprocess)

pytestmark = pytest.mark.process  # every test here talks to a real server

TOL = 1e-4
POOL = SHARED_DATA / "pool"


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    with serve_subprocess(tiny_checkpoint, tmp_path_factory.mktemp("srv"), max_wait_ms=50,
                          max_upload_bytes=300_000) as (base, _):
        yield base


def varied_image(i: int, size) -> bytes:
    """Distinct images whose scores differ: brightness, contrast and noise vary with i."""
    rng = np.random.default_rng(i)
    w, h = size
    ramp = np.linspace(0, 1, w)[None, :, None] * np.linspace(0.2, 1, h)[:, None, None]
    arr = 255 * np.clip((i % 8) / 8 * ramp + (i // 8) / 4 * rng.random((h, w, 3)), 0, 1)
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue()


# -- correctness over HTTP -------------------------------------------------------------------
def test_http_scores_equal_the_cli_scorer(server, tiny_checkpoint, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    make_image(folder / "landscape.jpg", size=(320, 240), seed=1)
    make_image(folder / "portrait.jpg", size=(180, 320), seed=2)
    make_image(folder / "alpha.png", size=(100, 100), mode="RGBA", fmt="PNG", seed=3)
    make_image(folder / "grey.png", size=(256, 64), mode="L", fmt="PNG", seed=4)
    if POOL.is_dir():  # real photos when the shared data is there
        for photo in sorted(POOL.glob("*.jpg"))[:4]:
            shutil.copy(photo, folder / photo.name)
    out = tmp_path / "cli.json"
    cli = [serve_command()[0], "score"] if serve_command()[1] == "serve" else [sys.executable, "-m", "app.cli", "score"]
    # --backend torch: the server runs torch (bf16 where the CPU has it); the CLI default may be ONNX Runtime (fp32)
    subprocess.run(cli + [str(folder), "--weights", str(tiny_checkpoint), "--device", "cpu", "--backend", "torch",
                          "--out", str(out), "--no-progress"], check=True, timeout=300, capture_output=True)
    rows = json.loads(out.read_text())
    assert len(rows) >= 4
    with httpx.Client(base_url=server, timeout=60) as client:
        for row in rows:
            path = Path(row["path"])
            r = client.post("/score", files={"file": (path.name, path.read_bytes(), "application/octet-stream")})
            assert r.status_code == 200, r.text
            body = r.json()
            assert abs(body["score"] - row["score"]) < TOL, (path.name, body["score"], row["score"])
            assert (body["width"], body["height"]) == (row["width"], row["height"])


def test_32_concurrent_requests_are_batched_and_each_gets_its_own_answer(server, scorer):
    sizes = [(120, 90), (90, 120), (100, 100)]  # three input shapes at the 64-px policy
    images = [varied_image(i, sizes[i % 3]) for i in range(32)]
    expected = [scorer.score_tensors([scorer.prepare(data)[0]])[0] for data in images]
    batches_before = sum(s.value for s in metric_samples(server, "resmemnet_batch_size_count"))

    async def fire():
        async with httpx.AsyncClient(base_url=server, timeout=120,
                                     limits=httpx.Limits(max_connections=32)) as client:
            return await asyncio.gather(*(
                client.post("/score", files={"file": (f"{i}.png", data, "image/png")}) for i, data in enumerate(images)))

    responses = asyncio.run(fire())
    assert [r.status_code for r in responses] == [200] * 32
    bodies = [r.json() for r in responses]
    for i, (body, want) in enumerate(zip(bodies, expected)):
        assert abs(body["score"] - want) < TOL, (i, body["score"], want)
        assert (body["width"], body["height"]) == sizes[i % 3]
    assert max(b["timing"]["batch_size"] for b in bodies) > 1
    # visible in /metrics: fewer forward passes than images, some with more than one image
    count = sum(s.value for s in metric_samples(server, "resmemnet_batch_size_count")) - batches_before
    singles = [s for s in metric_samples(server, "resmemnet_batch_size_bucket") if s.labels["le"] == "1.0"]
    assert count < 32
    assert singles and sum(s.value for s in metric_samples(server, "resmemnet_batch_size_count")) > singles[0].value


def test_metrics_endpoint_parses_over_http(server):
    from prometheus_client.parser import text_string_to_metric_families

    httpx.post(server + "/score", files={"file": ("a.txt", b"not an image", "text/plain")}, timeout=30)
    text = httpx.get(server + "/metrics", timeout=10).text
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"resmemnet_http_request_duration_seconds", "resmemnet_batch_size", "resmemnet_queue_wait_seconds",
            "resmemnet_model_inference_seconds", "resmemnet_queue_depth", "resmemnet_http_requests_in_flight",
            "resmemnet_errors", "resmemnet_model_info"} <= names
    errors = metric_samples(server, "resmemnet_errors_total")
    assert any(s.labels["reason"] == "not_an_image" and s.value >= 1 for s in errors)


def test_bad_inputs_over_http(server):
    cases = [
        ({"file": ("a.jpg", b"", "image/jpeg")}, 422, "empty"),
        ({"file": ("a.jpg", make_image(size=(200, 150))[:500], "image/jpeg")}, 422, "corrupt"),
        ({"file": ("a.txt", b"plain text", "text/plain")}, 415, "not_an_image"),
        ({"upload": ("a.jpg", make_image(), "image/jpeg")}, 422, "invalid_request"),
        ({"file": ("big.bmp", make_image(size=(400, 400), fmt="BMP"), "image/bmp")}, 413, "upload_too_large"),
    ]
    with httpx.Client(base_url=server, timeout=60) as client:
        for files, status, reason in cases:
            r = client.post("/score", files=files)
            assert r.status_code == status and r.json()["error"]["reason"] == reason, (reason, r.status_code, r.text)
        # a body far over the limit is refused from its Content-Length, without being read
        r = client.post("/score", files={"file": ("huge.jpg", b"\xff" * 50_000_000, "image/jpeg")})
        assert r.status_code == 413 and r.json()["error"]["reason"] == "upload_too_large"


def test_heatmap_over_http_matches_score(server):
    pytest.importorskip("model.overlay", reason="model.overlay (heatmap rendering) is not there yet")
    data = make_image(size=(160, 120), seed=21)
    with httpx.Client(base_url=server, timeout=120) as client:
        score = client.post("/score", files={"file": ("a.jpg", data, "image/jpeg")}).json()["score"]
        r = client.post("/heatmap", params={"format": "overlay", "alpha": 0.4},
                        files={"file": ("a.jpg", data, "image/jpeg")})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert abs(float(r.headers["x-memorability-score"]) - score) < TOL
    assert Image.open(io.BytesIO(r.content)).size == (160, 120)


# -- load behaviour --------------------------------------------------------------------------
def test_full_queue_gives_503_not_timeouts(scorer):
    from app.service import create_app
    from app.settings import ServiceSettings

    settings = ServiceSettings(queue_size=2, max_batch_size=1, max_wait_ms=0, warmup=False, request_timeout_s=60)
    with serve_in_thread(create_app(settings, scorer=SlowScorer(scorer, delay=0.3))) as base:
        async def fire():
            async with httpx.AsyncClient(base_url=base, timeout=60) as client:
                async def one(i):
                    t = time.monotonic()
                    r = await client.post("/score", files={"file": ("a.jpg", make_image(seed=i), "image/jpeg")})
                    return r, time.monotonic() - t
                return await asyncio.gather(*(one(i) for i in range(12)))

        outcomes = asyncio.run(fire())
    codes = [r.status_code for r, _ in outcomes]
    assert set(codes) <= {200, 503} and codes.count(503) >= 6 and codes.count(200) >= 2, codes
    for r, elapsed in outcomes:
        if r.status_code == 503:
            assert r.json()["error"]["reason"] == "queue_full" and r.headers["retry-after"] == "1"
            assert elapsed < 1.0, elapsed  # refused at once, not after queueing


def test_graceful_shutdown_finishes_accepted_requests(tiny_checkpoint, tmp_path):
    # A long batching window keeps the requests queued while SIGTERM arrives.
    with serve_subprocess(tiny_checkpoint, tmp_path, max_wait_ms=3000, warmup="false") as (base, proc):
        results = {}

        def post(i):
            try:
                r = httpx.post(base + "/score", files={"file": ("a.jpg", make_image(seed=i), "image/jpeg")}, timeout=60)
                results[i] = r.status_code
            except httpx.HTTPError as exc:
                results[i] = repr(exc)

        threads = [threading.Thread(target=post, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            depth = metric_samples(base, "resmemnet_queue_depth")
            if depth and depth[0].value == 4:
                break
            time.sleep(0.05)
        else:
            pytest.fail("requests never reached the queue")
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=60)
        # uvicorn re-raises the SIGTERM once its graceful shutdown is done: exit status -15 (143 in a shell)
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    assert results == {0: 200, 1: 200, 2: 200, 3: 200}


def test_serve_refuses_a_missing_checkpoint_at_once(tmp_path):
    r = subprocess.run(serve_command() + ["--weights", str(tmp_path / "nope.json"), "--port", str(free_port())],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "nope.json" in r.stderr and "Traceback" not in r.stderr


def test_container_healthcheck_command_against_a_live_server(server):
    from test_service_container import healthcheck_command

    cmd = healthcheck_command()
    assert cmd[0] == "python3"
    port = server.rsplit(":", 1)[1]
    ok = subprocess.run([sys.executable] + cmd[1:], env={**os.environ, "RESMEMNET_PORT": port}, timeout=30)
    assert ok.returncode == 0
    down = subprocess.run([sys.executable] + cmd[1:], env={**os.environ, "RESMEMNET_PORT": str(free_port())},
                          timeout=30, capture_output=True)
    assert down.returncode != 0
