"""The slim image (Dockerfile target `slim`): built, run and compared with the host, as
tests/test_container_run.py does for the full image (whose engine, stand-ins, pip secret and
helpers it uses).

What this proves: the slim image is under 1.5 GB, holds no torch, runs as user 10001 and turns
healthy; its /score answers (default and `general` profile) equal the host's onnxruntime Scorer
within 1e-4 (both ONNX Runtime fp32 on exports of the same checkpoint) and the host's torch fp32
Scorer within 1e-3 (the export's own tolerance); its /heatmap (layer4, the torch-free maps of
model/slim_heatmap.py) equals the host's torch Grad-RAM of layer4 within one 8-bit step in the
map and overlay PNGs, and other layers get a 422 saying why. It also records the cold start of
both images, one after the other on the same machine (RESMEMNET_CONTAINER_REPORT, docs/deploy.md);
times are recorded, never asserted.
"""
from __future__ import annotations

import time
import uuid

import httpx
import numpy as np
import pytest

from conftest import REPO, free_port
from docker_support.engine import EngineUnavailable
from docker_support.pip_index import pip_secret
from docker_support.project import ComposeProject, wait_healthy, wait_ready
from docker_support.standins import build_standins
from test_container_run import (PHOTOS, REPORT, WEIGHTS, engine, host_score, host_scorer, png_array,  # noqa: F401
                                post, unavailable)

pytestmark = pytest.mark.process

SLIM_MAX_BYTES = 1.5e9  # the goal: under 1.5 GB uncompressed (the full image is ~6.6 GB)
ORT_TOL = 1e-4  # the container's ONNX Runtime vs the host's on the same export recipe, both fp32


def _largest_colormap_step(name: str = "inferno") -> int:
    from model.overlay import colormap_table

    return int(np.abs(np.diff(colormap_table(name).astype(int), axis=0)).max())


INFERNO_STEP = _largest_colormap_step()  # 6 levels


@pytest.fixture(scope="module")
def slim_images(engine, tmp_path_factory):
    """{"slim": the slim image, "full": the default target, same build}: the full one reuses every
    stage the slim one's export needed (torch, torch-app), so it costs seconds more."""
    work = tmp_path_factory.mktemp("docker-slim")
    try:
        standins = build_standins(engine, work)
    except EngineUnavailable as exc:
        unavailable(str(exc))
    suffix = "" if engine.private else f"-{uuid.uuid4().hex[:8]}"
    tags = {"slim": f"resmemnet-test:slim{suffix}", "full": f"resmemnet-test:full{suffix}"}
    with pip_secret(work) as (secret_args, _):
        for kind, target in (("slim", "slim"), ("full", "runtime")):
            started = time.monotonic()
            engine.run("build", "--network", "host", *secret_args, "--build-arg", f"PYTHON_IMAGE={standins['python']}",
                       "--target", target, "-t", tags[kind], str(REPO), timeout=2400)
            REPORT[f"{kind}_build_s"] = round(time.monotonic() - started, 1)
            REPORT[f"{kind}_image_bytes"] = int(engine.inspect(tags[kind], "{{.Size}}"))
    REPORT["python_base_bytes"] = int(engine.inspect(standins["python"], "{{.Size}}"))
    yield tags
    if not engine.private:
        engine.run("rmi", "--force", *tags.values(), check=False)


@pytest.fixture(scope="module")
def host_ort_scorer():
    pytest.importorskip("resmem", reason="the shipped checkpoint's trunk package (pip install '.[trunks]')")
    from model.scoring import Scorer

    return Scorer.from_checkpoint(WEIGHTS, backend="onnxruntime", device="cpu")


def start_container(engine, image: str, **env) -> tuple[str, str, float]:
    """`docker run` on a free loopback port; (name, base URL, seconds until /readyz answered 200)."""
    port, name = free_port(), f"resmemnet-test-{uuid.uuid4().hex[:8]}"
    env = {"RESMEMNET_HOST": "127.0.0.1", "RESMEMNET_PORT": str(port), **env}
    started = time.monotonic()
    engine.run("run", "--detach", "--name", name, "--network", "host",
               *[a for k, v in env.items() for a in ("--env", f"{k}={v}")], image)
    wait_ready(engine, name, f"http://127.0.0.1:{port}")
    return name, f"http://127.0.0.1:{port}", round(time.monotonic() - started, 1)


def test_slim_image_is_small_torch_free_and_answers_like_the_host(engine, slim_images, host_ort_scorer, host_scorer):
    from model import overlay
    from model.preprocess import decode_image
    from model.slim_heatmap import HEATMAP_TOLERANCE

    tag = slim_images["slim"]
    assert int(engine.inspect(tag, "{{.Size}}")) < SLIM_MAX_BYTES
    assert engine.inspect(tag, "{{.Config.User}}") == "10001:10001"
    no_torch = "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None or u.find_spec('torchvision') is not None)"
    assert engine.run("run", "--rm", "--network", "none", "--entrypoint", "python3", tag, "-c", no_torch,
                      check=False).returncode == 0
    # cold starts, the slim and the full image one after the other (recorded, not asserted: docs/deploy.md)
    for kind in ("full", "slim", "full", "slim"):
        name, _, ready = start_container(engine, slim_images[kind], RESMEMNET_DEVICE="cpu")
        REPORT.setdefault(f"{kind}_ready_s", []).append(ready)
        engine.run("rm", "--force", name, check=False)
    name, base, _ = start_container(engine, tag)
    try:
        wait_healthy(engine, name)
        pid = engine.inspect(name, "{{.State.Pid}}")
        uids = next(line for line in open(f"/proc/{pid}/status") if line.startswith("Uid:")).split()[1:]
        assert set(uids) == {"10001"}, uids
        for photo_name, data in PHOTOS.items():
            for profile in ("default", "general"):
                r = post(base, "/score", photo_name, data, profile=profile)
                assert r.status_code == 200, r.text
                got = r.json()["score"]
                assert abs(got - host_score(host_ort_scorer, data, profile)) <= ORT_TOL, (photo_name, profile)
                assert abs(got - host_score(host_scorer, data, profile)) <= 1e-3, (photo_name, profile)  # torch fp32
        files = [("files", (n, d)) for n, d in PHOTOS.items()]
        r = httpx.post(base + "/score/batch", files=files, timeout=120)
        assert r.status_code == 200 and len(r.json()["results"]) == len(PHOTOS), r.text
        for photo_name in ("a.jpg", "b.png"):
            img = decode_image(PHOTOS[photo_name])
            prepared = host_scorer.prepare(PHOTOS[photo_name])
            from model.gradram import heatmap_for_tensor

            expected = heatmap_for_tensor(host_scorer.model, prepared.tensor, (img.width, img.height), layer="layer4")
            for fmt, png in (("map", overlay.heatmap_png(expected.heatmap)),
                             ("overlay", overlay.overlay_png(img, expected.heatmap, alpha=0.5, colormap="inferno"))):
                r = post(base, "/heatmap", photo_name, PHOTOS[photo_name], format=fmt, alpha=0.5)
                assert r.status_code == 200, r.text
                assert r.headers["X-Heatmap-Layers"] == "layer4"  # the slim image's heatmaps: layer4
                assert abs(float(r.headers["X-Memorability-Score"]) - expected.score) <= 1e-3
                got, want = png_array(r.content), png_array(png)
                assert got.shape == want.shape
                # maps within HEATMAP_TOLERANCE (a quarter of an 8-bit step): one step where a level rounds
                # the other way; in an overlay that step is one colormap entry further, at most the
                # table's largest step between neighbours, times alpha, plus the blend's rounding
                limit = 1 if fmt == "map" else int(np.ceil(0.5 * INFERNO_STEP)) + 1
                assert HEATMAP_TOLERANCE * 255 <= 1 and np.abs(got - want).max() <= limit, (photo_name, fmt)
                assert (np.abs(got - want).max(axis=-1) > 0 if got.ndim == 3 else got != want).mean() < 0.01
        r = post(base, "/heatmap", "a.jpg", PHOTOS["a.jpg"], layer="layer3,layer4")
        assert r.status_code == 422 and "layer4 only" in r.json()["error"]["message"], r.text
        assert httpx.get(base + "/metrics", timeout=10).status_code == 200
    finally:
        engine.run("rm", "--force", name, check=False)


def test_compose_slim_profile_serves_and_a_missing_export_is_one_line(engine, slim_images):
    """`docker compose --profile slim up resmemnet-slim` comes up and scores; the slim image with an
    export that is not there exits 2 with one line before it loads anything."""
    port = free_port()
    project = ComposeProject(engine, {"RESMEMNET_SLIM_IMAGE": slim_images["slim"], "TEST_SERVICE_PORT": str(port),
                                      "RESMEMNET_AUTH": "off"})
    started = time.monotonic()
    project("--profile", "slim", "up", "--detach", "--no-build", "--pull", "never", "resmemnet-slim")
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(engine, project.container("resmemnet-slim"), base)
        REPORT["compose_slim_ready_s"] = round(time.monotonic() - started, 1)
        r = post(base, "/score", "a.jpg", PHOTOS["a.jpg"])
        assert r.status_code == 200 and 0.0 <= r.json()["score"] <= 1.0, r.text
    finally:
        project.down()
    r = engine.run("run", "--rm", "--network", "none", "--env", "RESMEMNET_AUTH=off", "--env",
                   "RESMEMNET_ONNX=/opt/resmemnet/onnx/missing.onnx", slim_images["slim"], check=False, timeout=120)
    lines = [line for line in (r.stdout or "").splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, (r.returncode, lines)
    assert lines[0].startswith("resmemnet serve: error: ") and "missing.onnx" in lines[0], lines
