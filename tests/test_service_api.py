"""The service app in-process (TestClient): endpoints, error shapes, limits, readiness, metrics, OpenAPI."""
from __future__ import annotations

import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest

# serving is also imported from here by other test modules
from conftest import SlowScorer, assert_error, make_image, serving, wait_until_ready  # noqa: F401

from app.settings import ServiceSettings, SettingsError

TOL = 1e-4
CLIENT_SETTINGS = dict(max_upload_bytes=200_000, max_pixels=2_000_000, max_files_per_request=4)  # the `client` fixture


def alone(scorer, data: bytes) -> float:
    return scorer.score_tensors([scorer.prepare(data)[0]])[0]


def png_header_only(width, height) -> bytes:
    """A PNG that claims width x height but holds no pixel data: a decompression-bomb stand-in."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def solid_png(width, height) -> bytes:
    """A real, fully decodable image of many pixels but few bytes."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (40, 90, 200)).save(buf, format="PNG")
    return buf.getvalue()


# -- /score ----------------------------------------------------------------------------------
def test_score_answers_score_model_size_and_timing(client, scorer):
    data = make_image(size=(120, 90), seed=3)
    r = client.post("/score", files={"file": ("beach.jpg", data, "image/jpeg")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert 0.0 <= body["score"] <= 1.0
    assert abs(body["score"] - alone(scorer, data)) < TOL
    assert (body["width"], body["height"], body["filename"]) == (120, 90, "beach.jpg")
    assert body["model"] == {"name": "test-random", "version": scorer.meta.version, "device": "cpu"}
    t = body["timing"]
    assert t["batch_size"] >= 1 and t["total_ms"] >= t["model_ms"] > 0 and body["elapsed_ms"] == t["total_ms"]


@pytest.mark.parametrize("mode,fmt,size", [("RGBA", "PNG", (64, 200)), ("L", "PNG", (300, 40)), ("P", "GIF", (70, 70)),
                                           ("RGB", "WEBP", (90, 90)), ("I;16", "PNG", (50, 80))])
def test_score_takes_any_mode_and_format(client, scorer, mode, fmt, size):
    data = make_image(size=size, mode=mode, fmt=fmt, seed=5)
    r = client.post("/score", files={"file": (f"x.{fmt.lower()}", data, "application/octet-stream")})
    assert r.status_code == 200, r.text
    assert abs(r.json()["score"] - alone(scorer, data)) < TOL
    assert (r.json()["width"], r.json()["height"]) == size


BAD_INPUTS = {
    "empty": (lambda: {"file": ("a.jpg", b"", "image/jpeg")}, 422, "empty"),
    "text": (lambda: {"file": ("a.jpg", b"hello, I am not a picture", "image/jpeg")}, 415, "not_an_image"),
    "pdf": (lambda: {"file": ("a.pdf", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", "application/pdf")},
            415, "not_an_image"),
    "truncated_jpeg": (lambda: {"file": ("a.jpg", make_image(size=(200, 150))[:400], "image/jpeg")}, 422, "corrupt"),
    "truncated_png": (lambda: {"file": ("a.png", make_image(size=(200, 150), fmt="PNG")[:300], "image/png")},
                      422, "corrupt"),
    "wrong_field_name": (lambda: {"image": ("a.jpg", make_image(), "image/jpeg")}, 422, "invalid_request"),
    "file_as_text_field": (lambda: {"file": (None, "just text")}, 422, "invalid_request"),
    "too_many_pixels": (lambda: {"file": ("bomb.png", png_header_only(30000, 30000), "image/png")},
                        413, "too_many_pixels"),
    "over_pixel_limit_real_image": (lambda: {"file": ("big.png", solid_png(2000, 1001), "image/png")},
                                    413, "too_many_pixels"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_get_clear_4xx_errors(client, case):
    files, status, reason = BAD_INPUTS[case]
    files = files()
    before = error_count(client, reason)
    assert_error(client.post("/score", files=files), status, reason)
    assert error_count(client, reason) == before + 1


def test_non_multipart_bodies_are_422(client):
    assert_error(client.post("/score", content=make_image(), headers={"content-type": "image/jpeg"}),
                 422, "invalid_request")
    assert_error(client.post("/score", json={"file": "x"}), 422, "invalid_request")
    assert_error(client.post("/score"), 422, "invalid_request")


def test_oversized_upload_is_413(client):
    big = make_image(size=(400, 400), fmt="PNG", compress_level=0)  # ~480 kB, limit 200 kB
    assert_error(client.post("/score", files={"file": ("big.png", big, "image/png")}), 413, "upload_too_large")
    # just over the per-file limit but within the request's framing allowance: still refused
    near = make_image(size=(300, 230), fmt="BMP")
    assert 200_000 < len(near) < 200_000 + 60_000
    assert_error(client.post("/score", files={"file": ("near.bmp", near, "image/bmp")}), 413, "upload_too_large")


def test_unknown_paths_and_methods_answer_json(client):
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.get("/score"), 405, "method_not_allowed")


# -- /score/batch ----------------------------------------------------------------------------
def test_batch_endpoint_scores_each_file_and_reports_bad_ones(client, scorer):
    good = [make_image(size=(120, 90), seed=1), make_image(size=(50, 140), fmt="PNG", seed=2),
            make_image(size=(120, 90), seed=3)]
    files = [("files", ("a.jpg", good[0], "image/jpeg")), ("files", ("notes.txt", b"not an image", "text/plain")),
             ("files", ("b.png", good[1], "image/png")), ("files", ("c.jpg", good[2], "image/jpeg"))]
    r = client.post("/score/batch", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["scored"], body["failed"]) == (3, 1)
    results = body["results"]
    assert [x["index"] for x in results] == [0, 1, 2, 3]
    assert [x["filename"] for x in results] == ["a.jpg", "notes.txt", "b.png", "c.jpg"]
    assert [x["ok"] for x in results] == [True, False, True, True]
    assert results[1]["error"]["reason"] == "not_an_image" and results[1]["score"] is None
    for item, data in zip([results[0], results[2], results[3]], good):
        assert abs(item["score"] - alone(scorer, data)) < TOL
    assert results[0]["timing"]["batch_size"] == 2  # the two same-shape images shared a forward pass


def test_batch_endpoint_limits_and_field_name(client):
    files = [("files", (f"{i}.jpg", make_image(seed=i), "image/jpeg")) for i in range(5)]
    assert_error(client.post("/score/batch", files=files), 413, "too_many_files")
    assert_error(client.post("/score/batch", files={"file": ("a.jpg", make_image(), "image/jpeg")}),
                 422, "invalid_request")
    big = make_image(size=(400, 400), fmt="PNG", compress_level=0)
    r = client.post("/score/batch", files=[("files", ("big.png", big, "image/png")),
                                           ("files", ("ok.jpg", make_image(), "image/jpeg"))])
    assert r.status_code == 200
    assert [x["ok"] for x in r.json()["results"]] == [False, True]
    assert r.json()["results"][0]["error"]["reason"] == "upload_too_large"


# -- /heatmap --------------------------------------------------------------------------------
def test_heatmap_png_and_score_match_score_endpoint(client):
    pytest.importorskip("model.overlay", reason="model.overlay (heatmap rendering) is not there yet")
    from PIL import Image
    import io

    data = make_image(size=(130, 90), seed=11)
    score = client.post("/score", files={"file": ("a.jpg", data, "image/jpeg")}).json()["score"]
    for params in ({}, {"format": "map"}, {"format": "overlay", "alpha": 0.8, "colormap": "viridis"},
                   {"format": "map", "colormap": "turbo", "layer": "layer3,layer4"}):
        r = client.post("/heatmap", params=params, files={"file": ("a.jpg", data, "image/jpeg")})
        assert r.status_code == 200, (params, r.text)
        assert r.headers["content-type"] == "image/png"
        assert abs(float(r.headers["X-Memorability-Score"]) - score) < TOL
        assert Image.open(io.BytesIO(r.content)).size == (130, 90)
    metrics = client.get("/metrics").text
    assert 'resmemnet_http_request_duration_seconds_count{endpoint="/heatmap",method="POST",status="200"}' in metrics


def test_heatmap_validates_like_score(client):
    pytest.importorskip("model.overlay", reason="model.overlay (heatmap rendering) is not there yet")
    img = {"file": ("a.jpg", make_image(), "image/jpeg")}
    assert_error(client.post("/heatmap", files={"file": ("a.jpg", b"nope", "image/jpeg")}), 415, "not_an_image")
    assert_error(client.post("/heatmap", files={"image": ("a.jpg", make_image(), "image/jpeg")}), 422, "invalid_request")
    assert_error(client.post("/heatmap", params={"alpha": 1.5}, files=img), 422, "invalid_request")
    assert_error(client.post("/heatmap", params={"format": "svg"}, files=img), 422, "invalid_request")
    assert_error(client.post("/heatmap", params={"colormap": "rainbow"}, files=img), 422, "invalid_request")
    assert_error(client.post("/heatmap", params={"layer": "layer9"}, files=img), 422, "invalid_request")


def test_heatmap_is_refused_when_all_slots_are_busy(client):
    state = client.app.state.service
    state.heatmaps_running += 1  # as if one heatmap were being computed (heatmap_concurrency=1)
    try:
        r = client.post("/heatmap", files={"file": ("a.jpg", make_image(), "image/jpeg")})
        assert_error(r, 503, "heatmap_busy")
        assert r.headers["Retry-After"] == "1"
        assert client.post("/score", files={"file": ("a.jpg", make_image(), "image/jpeg")}).status_code == 200
    finally:
        state.heatmaps_running -= 1


# -- operations ------------------------------------------------------------------------------
def error_count(client, reason) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(client.get("/metrics").text):
        if family.name == "resmemnet_errors":
            for sample in family.samples:
                if sample.name == "resmemnet_errors_total" and sample.labels["reason"] == reason:
                    return sample.value
    return 0.0


def test_metrics_parse_and_cover_the_service(client):
    from prometheus_client.parser import text_string_to_metric_families

    client.post("/score", files={"file": ("a.jpg", make_image(), "image/jpeg")})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    expected = {
        "resmemnet_http_request_duration_seconds": "histogram", "resmemnet_batch_size": "histogram",
        "resmemnet_queue_wait_seconds": "histogram", "resmemnet_model_inference_seconds": "histogram",
        "resmemnet_preprocess_seconds": "histogram", "resmemnet_heatmap_seconds": "histogram",
        "resmemnet_queue_depth": "gauge", "resmemnet_http_requests_in_flight": "gauge",
        "resmemnet_images_in_model": "gauge", "resmemnet_errors": "counter", "resmemnet_images_scored": "counter",
        "resmemnet_model_info": "gauge", "resmemnet_ready": "gauge",
    }
    for name, kind in expected.items():
        assert name in families and families[name].type == kind, name
    info = families["resmemnet_model_info"].samples[0].labels
    assert info["name"] == "test-random" and info["device"] == "cpu" and info["backbone"] == "resnet50"
    score_samples = [s for s in families["resmemnet_http_request_duration_seconds"].samples
                     if s.name.endswith("_count") and s.labels["endpoint"] == "/score" and s.labels["status"] == "200"]
    assert score_samples and score_samples[0].value >= 1
    assert [s.value for s in families["resmemnet_ready"].samples] == [1.0]


def test_openapi_documents_endpoints_with_examples(client):
    spec = client.get("/openapi.json").json()
    for path in ("/score", "/score/batch", "/heatmap", "/healthz", "/readyz", "/metrics"):
        assert path in spec["paths"], path
    score = spec["paths"]["/score"]["post"]
    assert "multipart/form-data" in score["requestBody"]["content"]
    assert {"413", "415", "422", "503", "504"} <= set(score["responses"])
    assert spec["components"]["schemas"]["ScoreResponse"]["examples"][0]["score"] == 0.7312
    assert "image/png" in spec["paths"]["/heatmap"]["post"]["responses"]["200"]["content"]
    assert client.get("/docs").status_code == 200


def test_not_ready_while_warming_up_then_ready(scorer):
    slow = SlowScorer(scorer, delay=0.5)
    with serving(slow, wait=False, warmup=True) as c:
        health = c.get("/healthz")
        assert health.status_code == 200 and health.json()["phase"] in ("starting", "warming_up")
        r = c.get("/readyz")
        assert_error(r, 503, "not_ready")
        assert "Retry-After" in r.headers
        assert_error(c.post("/score", files={"file": ("a.jpg", make_image(), "image/jpeg")}), 503, "not_ready")
        assert wait_until_ready(c).json()["status"] == "ready"
        assert c.get("/healthz").json()["phase"] == "ready"


def test_failed_model_load_is_reported_not_hidden(tmp_path):
    with serving(None, wait=False, weights=str(tmp_path / "missing.json")) as c:
        deadline = time.monotonic() + 60
        while c.get("/healthz").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        err = assert_error(c.get("/healthz"), 503, "not_ready")
        assert "missing.json" in err["message"]
        assert "missing.json" in assert_error(c.get("/readyz"), 503, "not_ready")["message"]
        assert_error(c.post("/score", files={"file": ("a.jpg", make_image(), "image/jpeg")}), 503, "not_ready")


def test_deadline_gives_504(scorer):
    with serving(SlowScorer(scorer, delay=1.5), request_timeout_s=0.3) as c:
        started = time.monotonic()
        r = c.post("/score", files={"file": ("a.jpg", make_image(), "image/jpeg")})
        assert_error(r, 504, "deadline_exceeded")
        assert time.monotonic() - started < 1.4


def test_full_queue_answers_503_at_once(scorer):
    with serving(SlowScorer(scorer, delay=0.4), queue_size=2, max_batch_size=1, max_wait_ms=0) as c:
        def post(i):
            t = time.monotonic()
            r = c.post("/score", files={"file": ("a.jpg", make_image(seed=i), "image/jpeg")})
            return r, time.monotonic() - t

        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(post, range(8)))
        codes = sorted(r.status_code for r, _ in outcomes)
        assert set(codes) <= {200, 503} and 503 in codes and 200 in codes, codes
        for r, elapsed in outcomes:
            if r.status_code == 503:
                assert_error(r, 503, "queue_full")
                assert r.headers["Retry-After"] == "1"
                assert elapsed < 0.4  # refused before any forward pass could have finished


def test_unexpected_errors_are_json_500(scorer):
    with serving(SlowScorer(scorer, fail=RuntimeError("boom")), raise_server_exceptions=False) as c:
        assert_error(c.post("/score", files={"file": ("a.jpg", make_image(), "image/jpeg")}), 500, "internal")


def test_batched_and_alone_scores_agree_in_process(scorer):
    """Many same-shape images in flight at once: each answer is that image's score alone."""
    with serving(scorer, max_wait_ms=200, max_batch_size=8) as c:
        images = [make_image(size=(120, 90), seed=100 + i) for i in range(8)]
        barrier = threading.Barrier(8)

        def post(data):
            barrier.wait(timeout=30)
            return c.post("/score", files={"file": ("a.jpg", data, "image/jpeg")}).json()

        with ThreadPoolExecutor(8) as pool:
            bodies = list(pool.map(post, images))
    assert max(b["timing"]["batch_size"] for b in bodies) > 1
    for body, data in zip(bodies, images):
        assert abs(body["score"] - alone(scorer, data)) < TOL


# -- settings --------------------------------------------------------------------------------
def test_settings_from_environment():
    env = {"RESMEMNET_MAX_BATCH_SIZE": "8", "RESMEMNET_DEVICE": "cpu", "RESMEMNET_WARMUP": "false",
           "RESMEMNET_MAX_WAIT_MS": "2.5", "RESMEMNET_PORT": "9000", "RESMEMNET_UNRELATED": "x"}
    s = ServiceSettings.from_env(env, port=9100)
    assert (s.max_batch_size, s.device, s.warmup, s.max_wait_ms, s.port) == (8, "cpu", False, 2.5, 9100)
    with pytest.raises(SettingsError, match="RESMEMNET_MAX_BATCH_SIZE"):
        ServiceSettings.from_env({"RESMEMNET_MAX_BATCH_SIZE": "lots"})
    with pytest.raises(SettingsError, match="max_batch_size"):
        ServiceSettings.from_env({"RESMEMNET_MAX_BATCH_SIZE": "0"})
    with pytest.raises(SettingsError, match="device"):
        ServiceSettings(device="tpu")
    table = ServiceSettings.table()
    assert table.count("| `RESMEMNET_") == len(ServiceSettings.__dataclass_fields__)


# -- percentile and warnings (the lead's contract) -------------------------------------------
class RankedScorer(SlowScorer):
    """A real scorer whose checkpoint has a reference set: percentile = 100 x score."""

    def percentile(self, score, profile="default"):
        return round(100.0 * score, 2)


def test_score_batch_and_heatmap_carry_percentile_and_warnings(scorer):
    import io

    from PIL import Image

    from model.quality import input_warnings
    from model.preprocess import decode_image

    flat = io.BytesIO()
    Image.new("RGB", (120, 90), (128, 128, 128)).save(flat, format="PNG")
    flat = flat.getvalue()
    photo = make_image(size=(120, 90), seed=7)
    assert input_warnings(decode_image(flat)) == ["flat"]
    expected_warnings = input_warnings(decode_image(photo))
    with serving(RankedScorer(scorer)) as c:
        body = c.post("/score", files={"file": ("flat.png", flat, "image/png")}).json()
        assert body["warnings"] == ["flat"] and body["percentile"] == round(100 * body["score"], 2)
        body = c.post("/score", files={"file": ("p.jpg", photo, "image/jpeg")}).json()
        assert body["warnings"] == expected_warnings
        batch = c.post("/score/batch", files=[("files", ("flat.png", flat, "image/png")),
                                              ("files", ("bad.txt", b"nope", "text/plain"))]).json()
        good, bad = batch["results"]
        assert good["warnings"] == ["flat"] and good["percentile"] == round(100 * good["score"], 2)
        assert bad["percentile"] is None and bad["warnings"] == []
        r = c.post("/heatmap", files={"file": ("flat.png", flat, "image/png")})
        assert r.status_code == 200, r.text
        score = float(r.headers["X-Memorability-Score"])
        assert r.headers["X-Warnings"] == "flat"
        assert abs(float(r.headers["X-Percentile"]) - 100 * score) < 0.01
    with serving(scorer) as c:  # the test checkpoint has no reference set
        assert c.post("/score", files={"file": ("p.jpg", photo, "image/jpeg")}).json()["percentile"] is None
        r = c.post("/heatmap", files={"file": ("p.jpg", photo, "image/jpeg")})
        assert r.headers["X-Percentile"] == "" and r.headers["X-Warnings"] == ",".join(expected_warnings)


# -- HEAD on /, /healthz and /readyz ------------------------------------------------------------
def test_head_is_allowed_on_index_and_probes(scorer, one_torch_thread):
    with serving(scorer) as client:
        for path in ("/", "/healthz", "/readyz"):
            get, head = client.get(path), client.head(path)
            assert head.status_code == get.status_code == 200, (path, head.status_code)
            assert head.content == b""
        assert client.head("/", headers={"accept": "text/html"}).status_code == 200
        assert client.head("/score").status_code == 405  # POST-only endpoints still refuse HEAD
