"""Requests built to exhaust the service: many parts, many fields, big part headers, big request
heads, slow heads (slowloris), many connections. Each gets a prompt JSON 4xx, and other clients
are still answered meanwhile. The numbers (other clients' latency, memory) are bench/attacks.py's.

In-process (TestClient) for the multipart limits (app/service.py: Starlette's form limits from
the settings); a real uvicorn on loopback (`process`) for the connection guards of
app/http_protocol.py, which live below the app.
"""
from __future__ import annotations

import random
import socket
import threading
import time

import httpx
import pytest

from conftest import (assert_error, make_image, metric_samples, raw_request, read_response, serve_in_thread,
                      serving)

import multipart_bodies  # bench/ (pyproject: pytest's pythonpath)
from multipart_bodies import BOUNDARY, multipart, text_part

IMAGE = make_image(size=(96, 72), seed=2)


def file_part(field: str, i: int = 0, content: bytes = IMAGE) -> tuple[str, bytes]:
    return multipart_bodies.file_part(field, i, content)


def random_multipart(rng: random.Random, image: bytes) -> tuple[str, bytes, str]:
    """(path, body, boundary): a multipart body of random structure: up to 3000 parts, file and
    text parts mixed, odd names, extra or overlong part headers, big text values, a cut-off end."""
    boundary = rng.choice(("b", "x" * 70, "----WebKitFormBoundary7MA4YWxkTrZu0gW"))
    path = rng.choice(("/score", "/score/batch", "/heatmap"))
    n = rng.choice((0, 1, 2, rng.randint(3, 40), rng.randint(40, 3000)))
    out = bytearray()
    for i in range(n):
        name = rng.choice(("file", "files", f"f{i}", "", "x" * rng.randint(1, 5000), 'a"b', "é"))
        head = f'Content-Disposition: form-data; name="{name}"'
        if rng.random() < 0.6:
            head += f'; filename="p{i}.jpg"\r\nContent-Type: ' + rng.choice(("image/jpeg", "text/plain", ""))
        for j in range(rng.choice((0, 0, 0, 3, 12))):
            head += f"\r\nX-{j}: " + "v" * rng.choice((1, 100, 5000))
        content = rng.choice((b"", b"x", image, b"v" * rng.choice((10, 70_000, 1_100_000))))
        out += f"--{boundary}\r\n{head}\r\n\r\n".encode() + content + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    if rng.random() < 0.1:
        del out[rng.randrange(len(out)):]  # cut off
    return path, bytes(out), boundary


def post(client, path: str, body: bytes):
    return client.post(path, content=body, headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})


@pytest.fixture(scope="module")
def client(scorer, one_torch_thread):
    with serving(scorer, max_files_per_request=4, max_form_fields=3, max_field_bytes=1000) as c:
        yield c


# -- multipart: the parser stops at the first part past a limit ---------------------------------
@pytest.mark.parametrize("parts", [5, 40, 5000])
def test_many_tiny_file_parts_are_refused_at_the_limit(client, parts):
    r = post(client, "/score/batch", multipart([file_part("files", i, b"x") for i in range(parts)]))
    assert "Maximum number of files is 4" in assert_error(r, 413, "too_many_files")["message"]


def test_a_batch_of_tiny_parts_within_the_limit_gets_one_answer_per_part(client):
    r = post(client, "/score/batch", multipart([file_part("files", i, b"x") for i in range(4)]))
    assert r.status_code == 200
    assert [item["error"]["reason"] for item in r.json()["results"]] == ["not_an_image"] * 4


@pytest.mark.parametrize("fields", [4, 1000, 20000])
def test_thousands_of_form_fields_are_refused_at_the_limit(client, fields):
    body = multipart([file_part("file")] + [text_part(f"f{i}") for i in range(fields)])
    message = assert_error(post(client, "/score", body), 413, "too_many_fields")["message"]
    assert "more than 3 text fields" in message and "RESMEMNET_MAX_FORM_FIELDS" in message


def test_urlencoded_fields_count_too(client):
    r = client.post("/score", data={f"k{i}": "v" for i in range(10)})
    assert_error(r, 413, "too_many_fields")


def test_fields_within_the_limit_are_named_in_the_422_each_cut_short(client):
    long_name = "n" * 3000
    r = post(client, "/score", multipart([file_part("file"), text_part("a"), text_part(long_name)]))
    message = assert_error(r, 422, "unexpected_field")["message"]
    assert "'a'" in message and f"'{'n' * 40}...'" in message and long_name not in message


def test_a_text_field_over_the_size_limit_is_refused(client):
    r = post(client, "/score", multipart([text_part("file", b"v" * 1001)]))
    assert "Part exceeded maximum size" in assert_error(r, 422, "invalid_request")["message"]


@pytest.mark.parametrize("extra", ["".join(f"\r\nX-H{i}: v" for i in range(20)), "\r\nX-Long: " + "a" * 8000],
                         ids=["20-header-lines", "8-KiB-header"])
def test_a_part_with_too_many_or_too_long_headers_is_refused(client, extra):
    head, content = file_part("file")
    r = post(client, "/score", multipart([(head + extra, content)]))
    assert "python-multipart's limits" in assert_error(r, 400, "bad_request")["message"]


def test_repeated_query_values_are_cut_short_in_the_message(client):
    r = client.post("/score?profile=" + "p" * 500 + "&profile=x", files={"file": ("a.jpg", IMAGE)})
    message = assert_error(r, 422, "invalid_request")["message"]
    assert "given 2 times" in message and "p" * 41 not in message


def test_random_multipart_structures_get_json_answers(client):
    """A bounded run of bench/fuzz.py's multipart kind: parts, fields and headers of random number
    and size; every answer is 200 or a JSON 4xx."""
    from test_fuzz import SEEDS

    rng = random.Random(7)
    seen = set()
    for _ in range(40):
        path, body, boundary = random_multipart(rng, SEEDS[0])
        r = client.post(path, content=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert r.status_code < 500, r.text
        if r.status_code != 200:
            seen.add(assert_error(r, r.status_code, r.json()["error"]["reason"])["status"])
    assert {400, 413, 422} <= seen


def test_limit_settings_are_checked():
    from app.settings import ServiceSettings, SettingsError

    for bad in ({"header_timeout_s": 0}, {"keep_alive_s": -1}, {"max_header_bytes": 0}, {"max_form_fields": -1},
                {"max_field_bytes": 0}, {"max_connections_per_client": -2}):
        with pytest.raises(SettingsError, match=next(iter(bad))):
            ServiceSettings(**bad)
    assert ServiceSettings(max_form_fields=0, max_connections_per_client=0)  # 0 fields: none at all


# -- the connection guards (a real uvicorn) ---------------------------------------------------
@pytest.fixture(scope="module")
def guarded(scorer, one_torch_thread):
    from app.service import create_app
    from app.settings import ServiceSettings

    settings = ServiceSettings(warmup=False, header_timeout_s=1.0, max_header_bytes=8192, keep_alive_s=5,
                               max_connections_per_client=0)
    app = create_app(settings, scorer=scorer)
    with serve_in_thread(app, guarded=True) as base:
        yield base, int(base.rsplit(":", 1)[1])


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=15)


def error_of(head: str, body: bytes) -> dict:
    import json

    assert "content-type: application/json" in head.lower() and "connection: close" in head.lower(), head
    return json.loads(body)["error"]


@pytest.mark.process
def test_a_head_that_dribbles_in_gets_408_and_the_connection_closes(guarded):
    base, port = guarded
    with connect(port) as sock:
        started = time.monotonic()
        sock.sendall(b"POST /score HTTP/1.1\r\nHost: t\r\n")
        for _ in range(3):  # a byte now and then: never the whole head
            time.sleep(0.3)
            sock.sendall(b"X")
        head, body = read_response(sock)
        waited = time.monotonic() - started
        assert head.startswith("HTTP/1.1 408") and error_of(head, body)["reason"] == "request_timeout"
        assert 0.9 < waited < 10
        assert sock.recv(1) == b"", "the server closed the connection"


@pytest.mark.process
def test_a_connection_that_sends_nothing_gets_408(guarded):
    _, port = guarded
    with connect(port) as sock:
        head, body = read_response(sock)
        assert head.startswith("HTTP/1.1 408") and "did not arrive within 1 s" in error_of(head, body)["message"]


@pytest.mark.process
def test_a_slow_body_after_a_prompt_head_is_not_a_head_timeout(guarded):
    """The head deadline stops once the head is in: a body may take longer (RESMEMNET_BODY_TIMEOUT_S guards it)."""
    _, port = guarded
    body = multipart([file_part("file")])
    with connect(port) as sock:
        sock.sendall(f"POST /score HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode())
        for i in range(0, len(body), len(body) // 4 + 1):
            time.sleep(0.5)  # 2 s in all, twice the head deadline
            sock.sendall(body[i:i + len(body) // 4 + 1])
        head, answer = read_response(sock)
        assert head.startswith("HTTP/1.1 200"), head + answer.decode()


@pytest.mark.process
def test_a_kept_alive_connection_gets_the_deadline_for_each_request(guarded):
    _, port = guarded
    with connect(port) as sock:
        for _ in range(2):  # prompt requests on one connection
            head, _ = raw_request(sock, "GET /healthz HTTP/1.1\r\nHost: t")
            assert head.startswith("HTTP/1.1 200")
        time.sleep(1.5)  # idle between requests is keep-alive's business (5 s here), not the head's
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")  # then a head that stops halfway
        head, body = read_response(sock)
        assert head.startswith("HTTP/1.1 408") and error_of(head, body)["reason"] == "request_timeout"


@pytest.mark.process
def test_an_oversized_head_gets_431_and_a_malformed_one_400(guarded):
    _, port = guarded
    with connect(port) as sock:
        head, body = raw_request(sock, "GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: " + "a" * 9000)
        assert head.startswith("HTTP/1.1 431") and error_of(head, body)["reason"] == "headers_too_large"
    with connect(port) as sock:
        head, body = raw_request(sock, "GET /healthz NOT-HTTP\r\nHost: t")
        assert head.startswith("HTTP/1.1 400") and error_of(head, body)["reason"] == "bad_request"


@pytest.mark.process
def test_other_clients_are_answered_while_slow_heads_hold_connections(guarded):
    """60 connections dribbling their heads; a normal client is scored meanwhile, and every slow
    connection ends with its 408."""
    base, port = guarded
    answers: list[str] = []

    def slow():
        with connect(port) as sock:
            try:
                sock.sendall(b"POST /score HTTP/1.1\r\n")
                head, _ = read_response(sock)
                answers.append(head.split(" ")[1] if head else "closed")
            except OSError as exc:
                answers.append(type(exc).__name__)

    threads = [threading.Thread(target=slow) for _ in range(60)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    r = httpx.post(base + "/score", files={"file": ("a.jpg", IMAGE)}, timeout=30)
    assert r.status_code == 200 and 0.0 <= r.json()["score"] <= 1.0
    for t in threads:
        t.join(timeout=30)
    assert answers == ["408"] * 60
    errors = {s.labels["reason"]: s.value for s in metric_samples(base, "resmemnet_errors_total")}
    assert errors["request_timeout"] >= 60


@pytest.mark.process
def test_too_many_connections_from_one_address_get_429(scorer, one_torch_thread):
    from app.service import create_app
    from app.settings import ServiceSettings

    app = create_app(ServiceSettings(warmup=False, max_connections_per_client=3, header_timeout_s=30), scorer=scorer)
    with serve_in_thread(app, guarded=True) as base:
        port = int(base.rsplit(":", 1)[1])
        held = [connect(port) for _ in range(3)]
        try:
            time.sleep(0.2)
            with connect(port) as extra:
                head, body = read_response(extra)
                assert head.startswith("HTTP/1.1 429") and error_of(head, body)["reason"] == "too_many_connections"
            held.pop().close()
            time.sleep(0.2)
            with connect(port) as again:  # a freed place can be taken again
                head, _ = raw_request(again, "GET /healthz HTTP/1.1\r\nHost: t")
                assert head.startswith("HTTP/1.1 200")
        finally:
            for sock in held:
                sock.close()


@pytest.mark.process
def test_the_rest_of_a_body_after_an_early_answer_is_no_request_head(guarded):
    """An answer before the body is read (here a 422 for a text field past the limit) leaves the
    rest of the body to be read and dropped: that is not the next request's head, however long."""
    _, port = guarded
    body = multipart([text_part("file", b"v" * 5_000_000)])  # past max_field_bytes, and far past the head limit
    with connect(port) as sock:
        head, answer = raw_request(sock, f"POST /score HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; "
                                         f"boundary={BOUNDARY}\r\nContent-Length: {len(body)}", body)
        assert head.startswith("HTTP/1.1 422"), head
        head, _ = raw_request(sock, "GET /healthz HTTP/1.1\r\nHost: t")  # the connection still serves
        assert head.startswith("HTTP/1.1 200"), head
