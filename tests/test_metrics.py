"""Metrics that tell the truth (issue 11): warm-up is not scoring, every request and every error answer
is counted exactly once, and every label set is bounded whatever a client sends."""
from __future__ import annotations

import time

from prometheus_client.parser import text_string_to_metric_families

from conftest import SlowScorer, make_image, serving

REQUESTS = "resmemnet_http_request_duration_seconds_count"
CLIENT_SETTINGS = dict(warmup=True, max_upload_bytes=200_000, max_files_per_request=4)  # the `client` fixture


def samples(client, name: str) -> list:
    text = client.get("/metrics").text
    return [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


def value(client, name: str, **labels) -> float:
    return sum(s.value for s in samples(client, name) if all(s.labels.get(k) == v for k, v in labels.items()))


def requests_by_label(client) -> dict:
    return {(s.labels["endpoint"], s.labels["method"], s.labels["status"]): s.value for s in samples(client, REQUESTS)}


def errors_by_reason(client) -> dict:
    return {s.labels["reason"]: s.value for s in samples(client, "resmemnet_errors_total")}


def test_warm_up_passes_are_not_scored_images(scorer):
    with serving(scorer, warmup=True) as c:
        assert value(c, "resmemnet_images_scored_total") == 0
        assert value(c, "resmemnet_batch_size_count") == 0
        assert value(c, "resmemnet_model_inference_seconds_count") == 0
        assert value(c, "resmemnet_queue_depth") == 0
        assert c.post("/score", files={"file": ("a.jpg", make_image(), "image/jpeg")}).status_code == 200
        assert value(c, "resmemnet_images_scored_total") == 1
        assert value(c, "resmemnet_batch_size_count") == 1


def test_docs_pages_and_assets_are_labelled_by_route(client):
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect", "/docs-assets/swagger-ui.css",
                 "/docs-assets/redoc.standalone.js"):
        assert client.get(path).status_code == 200, path
    labels = requests_by_label(client)
    for endpoint in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect", "/docs-assets"):
        assert labels.get((endpoint, "GET", "200"), 0) >= 1, (endpoint, labels)
    client.get("/no/such/page")
    assert requests_by_label(client)[("unmatched", "GET", "404")] >= 1


def test_docs_work_offline():
    """The pages reference only local assets, and the assets are served."""
    import re

    from fastapi.testclient import TestClient

    from app.service import create_app
    from app.settings import ServiceSettings

    with TestClient(create_app(ServiceSettings(warmup=False, weights="/nonexistent.json"))) as c:
        for page in ("/docs", "/redoc"):
            html = c.get(page).text
            urls = re.findall(r"""(?:src|href)=["']([^"']+)["']|url: *['"]([^'"]+)['"]""", html)
            urls = [u for pair in urls for u in pair if u]
            assert urls and not [u for u in urls if "//" in u], (page, urls)  # nothing from another host
            for url in urls:
                assert c.get(url).status_code == 200, url
            assert "cdn" not in html.lower()


def test_invented_methods_share_one_label_and_metrics_stay_small(client):
    for i in range(60):
        r = client.request(f"X-METHOD-{i}", "/score")
        assert r.status_code == 405 and r.json()["error"]["reason"] == "method_not_allowed"
    size_after_60 = len(client.get("/metrics").content)
    for i in range(60, 120):
        client.request(f"Y{i}", "/score")
    methods = {s.labels["method"] for s in samples(client, REQUESTS)}
    assert methods <= {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "other"}, methods
    assert requests_by_label(client)[("/score", "other", "405")] == 120
    assert len(client.get("/metrics").content) - size_after_60 < 200  # only counter values changed


def test_every_request_and_every_error_answer_is_counted_exactly_once(client):
    big = make_image(size=(400, 400), fmt="PNG", compress_level=0)  # over the 200 kB limit

    def chunks():  # no Content-Length: refused mid-stream by the body limit
        for i in range(0, len(big) + 100_000, 50_000):
            yield (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.png\"\r\n\r\n"
                   if i == 0 else b"") + big[i:i + 50_000]

    before_requests = sum(requests_by_label(client).values())  # this scrape is counted after it rendered
    before_errors = errors_by_reason(client)
    good = make_image(seed=1)
    answers = [
        client.post("/score", files={"file": ("a.jpg", good, "image/jpeg")}),  # 200
        client.post("/score", files={"file": ("a.txt", b"not an image", "text/plain")}),  # 415 not_an_image
        client.post("/score", files={"file": ("big.png", big, "image/png")}),  # 413 upload_too_large (per file)
        client.post("/score", content=b"x" * 400_000,
                    headers={"content-type": "multipart/form-data; boundary=b"}),  # 413 from Content-Length
        client.post("/score", content=chunks(),
                    headers={"content-type": "multipart/form-data; boundary=b"}),  # 413 mid-stream
        client.post("/score", files=[("file", ("a.jpg", good, "image/jpeg"))] * 2),  # 422 multiple_files
        client.post("/score/batch", files=[("files", ("a.jpg", good, "image/jpeg")),
                                           ("files", ("b.txt", b"nope", "text/plain"))]),  # 200, one failed file
        client.get("/readyz"),  # 200
        client.delete("/score"),  # 405
        client.get("/nope"),  # 404
    ]
    assert [r.status_code for r in answers] == [200, 415, 413, 413, 413, 422, 200, 200, 405, 404]
    after_requests = sum(requests_by_label(client).values())
    assert after_requests - before_requests == len(answers) + 2  # + the two scrapes before them
    after = errors_by_reason(client)
    grown = {k: after[k] - before_errors.get(k, 0) for k in after if after[k] != before_errors.get(k, 0)}
    assert grown == {"not_an_image": 2, "upload_too_large": 3, "multiple_files": 1, "method_not_allowed": 1,
                     "not_found": 1}, grown


def test_an_unexpected_error_is_counted_once_as_internal(scorer):
    with serving(SlowScorer(scorer, fail=RuntimeError("boom")), raise_server_exceptions=False) as c:
        r = c.post("/score", files={"file": ("a.jpg", make_image(), "image/jpeg")})
        assert r.status_code == 500 and r.json()["error"]["reason"] == "internal"
        assert errors_by_reason(c) == {"internal": 1}
        assert requests_by_label(c)[("/score", "POST", "500")] == 1


def test_probe_answers_are_not_errors(scorer):
    slow = SlowScorer(scorer, delay=0.3)
    with serving(slow, wait=False, warmup=True) as c:
        r = c.get("/readyz")
        assert r.status_code == 503
        deadline = time.monotonic() + 60
        while c.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert errors_by_reason(c) == {}
        assert value(c, "resmemnet_images_scored_total") == 0
