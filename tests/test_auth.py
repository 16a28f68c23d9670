"""API keys (app/auth.py, app/auth_middleware.py): who may score, and what a refused client is told.

In-process through the app (TestClient), except the tests marked `process`, which run a real
`resmemnet serve` on loopback: SIGHUP reloading the key file, the access log, and a refused
upload's connection.
"""
from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import time
import warnings
from contextlib import contextmanager

import httpx
import pytest

from conftest import (assert_error, free_port, make_image, metric_samples, raw_request, serve_subprocess,
                      wait_until_ready)

ALICE = secrets.token_hex(16)  # 32 characters: what `openssl rand -hex 16` gives
BOB = secrets.token_urlsafe(24)
CAROL = secrets.token_hex(20)
KEYS = f"alice:{ALICE},bob:{BOB}"
IMAGE = make_image(size=(96, 72), seed=1)


def upload():
    return {"file": ("a.jpg", IMAGE, "image/jpeg")}


def bearer(key: str, scheme: str = "Bearer") -> dict:
    return {"Authorization": f"{scheme} {key}"}


@contextmanager
def app_client(scorer, base_url: str = "http://testserver", **settings):
    """The app around `scorer` with these settings, through a TestClient whose requests arrive
    on `base_url`'s host (scope["server"]), ready."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

    from app.service import create_app
    from app.settings import ServiceSettings

    settings.setdefault("warmup", False)
    with TestClient(create_app(ServiceSettings(**settings), scorer=scorer), base_url=base_url) as client:
        wait_until_ready(client)
        yield client


@pytest.fixture(scope="module")
def keyed(scorer, one_torch_thread):
    with app_client(scorer, api_keys=KEYS) as client:
        yield client


def refused(response, *, invalid_token: bool = False) -> str:
    """A 401 in the standard shape with the Bearer challenge; returns its message."""
    error = assert_error(response, 401, "unauthorized")
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="resmemnet"')
    assert ('error="invalid_token"' in challenge) == invalid_token
    for key in (ALICE, BOB, CAROL):
        assert key not in response.text and key not in str(response.headers)
    return error["message"]


# -- the header ----------------------------------------------------------------------------------
@pytest.mark.parametrize("headers", [
    {"Authorization": f"Bearer {ALICE}"},
    {"authorization": f"Bearer {ALICE}"},  # header names are case-insensitive
    {"AUTHORIZATION": f"bearer {BOB}"},  # and so is the scheme (RFC 7235)
    {"Authorization": f"BEARER   {ALICE}  "},  # blanks around the key
], ids=["canonical", "lower-case-name", "upper-case-name-lower-scheme", "extra-blanks"])
def test_a_configured_key_is_accepted_in_any_letter_case_of_the_header(keyed, headers):
    r = keyed.post("/score", files=upload(), headers=headers)
    assert r.status_code == 200, r.text
    assert 0.0 <= r.json()["score"] <= 1.0


@pytest.mark.parametrize("headers, words", [
    ({}, "needs an API key"),
    ({"Authorization": "Bearer"}, "carries no key"),
    ({"Authorization": "Bearer    "}, "carries no key"),
    ({"Authorization": ""}, "must be `Bearer KEY`"),
    ({"Authorization": ALICE}, "must be `Bearer KEY`"),  # a bare key: no scheme
    ({"Authorization": f"Basic {ALICE}"}, "must be `Bearer KEY`"),
    ({"Authorization": f"Token {ALICE}"}, "must be `Bearer KEY`"),
    ({"X-API-Key": ALICE}, "needs an API key"),  # not a header the service reads
], ids=["none", "empty-bearer", "blank-bearer", "empty-header", "no-scheme", "basic", "token-scheme", "x-api-key"])
def test_a_missing_empty_or_malformed_header_is_refused(keyed, headers, words):
    for path in ("/score", "/heatmap", "/score/batch"):
        files = {"files": ("a.jpg", IMAGE)} if path == "/score/batch" else upload()
        assert words in refused(keyed.post(path, files=files, headers=headers))


def test_a_wrong_key_is_refused_and_not_echoed(keyed):
    for key in (CAROL, ALICE[:-1], ALICE + "0", ALICE.upper(), "x"):
        assert "not accepted" in refused(keyed.post("/score", files=upload(), headers=bearer(key)), invalid_token=True)


def test_two_authorization_headers_are_refused(keyed):
    r = keyed.post("/score", files=upload(), headers=[("Authorization", f"Bearer {ALICE}"),
                                                     ("Authorization", f"Bearer {BOB}")])
    assert "more than one Authorization header" in refused(r)


@pytest.mark.parametrize("param", ["api_key", "key", "token", "access_token", "API_KEY"])
def test_a_key_in_the_query_string_is_refused_and_not_echoed(keyed, param):
    for headers in ({}, bearer(ALICE)):  # refused even beside a good header: it was exposed
        r = keyed.post(f"/score?{param}={ALICE}", files=upload(), headers=headers)
        message = refused(r)
        assert f"query parameter {param.lower()!r}" in message and "Authorization: Bearer KEY" in message


def test_probes_docs_and_the_page_stay_open(keyed):
    assert keyed.get("/healthz").status_code == 200
    assert keyed.get("/readyz").status_code == 200
    assert keyed.get("/metrics").status_code == 200  # RESMEMNET_METRICS_AUTH is off by default
    assert keyed.get("/", headers={"Accept": "text/html"}).status_code == 200
    assert keyed.get("/static/page.js").status_code == 200
    assert keyed.get("/openapi.json").status_code == 200
    assert keyed.get("/nothing").status_code == 404


def test_openapi_documents_the_bearer_scheme(keyed):
    spec = keyed.get("/openapi.json").json()
    scheme = spec["components"]["securitySchemes"]["api_key"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer") and "RESMEMNET_API_KEYS" in scheme["description"]
    for path in ("/score", "/score/batch", "/heatmap"):
        operation = spec["paths"][path]["post"]
        assert operation["security"] == [{"api_key": []}] and "401" in operation["responses"]
    assert "security" not in spec["paths"]["/healthz"]["get"]


def test_metrics_take_a_key_when_asked(scorer, one_torch_thread):
    with app_client(scorer, api_keys=KEYS, metrics_auth=True) as client:
        refused(client.get("/metrics"))
        r = client.get("/metrics", headers=bearer(BOB))
        assert r.status_code == 200 and "resmemnet_requests_by_key_total" in r.text
        assert client.get("/readyz").status_code == 200


# -- counting by name ----------------------------------------------------------------------------
def samples(client, name: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    text = client.get("/metrics", headers=bearer(ALICE)).text
    for key in (ALICE, BOB, CAROL):
        assert key not in text
    return {tuple(sorted(s.labels.items())): s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == name}


def test_requests_are_counted_by_key_name_and_rejections_by_reason(scorer, one_torch_thread):
    with app_client(scorer, api_keys=KEYS) as client:
        by_key = samples(client, "resmemnet_requests_by_key_total")
        assert by_key == {(("key", "alice"),): 0.0, (("key", "bob"),): 0.0}  # the label set is the names
        for _ in range(2):
            client.post("/score", files=upload(), headers=bearer(ALICE))
        client.post("/heatmap", files=upload(), headers=bearer(BOB))
        client.post("/score", files=upload())
        client.post("/score", files=upload(), headers=bearer(CAROL))
        client.post("/score", files=upload(), headers=bearer(CAROL))
        client.post(f"/score?token={ALICE}", files=upload())
        assert samples(client, "resmemnet_requests_by_key_total") == {(("key", "alice"),): 2.0,
                                                                    (("key", "bob"),): 1.0}
        assert samples(client, "resmemnet_auth_rejections_total") == {
            (("reason", "missing"),): 1.0, (("reason", "unknown_key"),): 2.0, (("reason", "key_in_url"),): 1.0}
        assert samples(client, "resmemnet_errors_total")[(("reason", "unauthorized"),)] == 4.0


def test_requests_needing_no_key_count_as_anonymous(scorer, one_torch_thread):
    with app_client(scorer) as client:  # no keys, loopback: open
        assert client.post("/score", files=upload()).status_code == 200
        assert samples(client, "resmemnet_requests_by_key_total") == {(("key", "anonymous"),): 1.0}


# -- no keys: loopback only ----------------------------------------------------------------------
@pytest.mark.parametrize("base_url, open_", [("http://127.0.0.1:8000", True), ("http://[::1]:8000", True),
                                             ("http://10.20.30.40:8000", False), ("http://192.168.1.7", False)])
def test_without_keys_only_requests_on_loopback_are_scored(scorer, one_torch_thread, base_url, open_):
    """The app's own guard (an app mounted without `resmemnet serve`'s start-up check): with no
    key configured, a request that came in on a non-loopback address is never scored."""
    with app_client(scorer, base_url=base_url) as client:
        r = client.post("/score", files=upload())
        if open_:
            assert r.status_code == 200, r.text
        else:
            assert "no API keys configured" in refused(r)
        assert client.get("/readyz").status_code == 200


def test_auth_off_serves_everyone_without_a_key(scorer, one_torch_thread):
    with app_client(scorer, base_url="http://10.20.30.40", auth="off") as client:
        assert client.post("/score", files=upload()).status_code == 200


@pytest.mark.parametrize("host, env, problem", [
    ("127.0.0.1", {}, None),
    ("localhost", {}, None),
    ("::1", {}, None),
    ("0.0.0.0", {}, "refusing to serve on 0.0.0.0:8000 without API keys"),
    ("::", {}, "refusing to serve on :::8000 without API keys"),
    ("192.168.1.5", {}, "refusing to serve"),
    ("myhost.example", {}, "refusing to serve"),
    ("0.0.0.0", {"api_keys": KEYS}, None),
    ("0.0.0.0", {"auth": "off"}, None),
    ("127.0.0.1", {"auth": "on"}, "RESMEMNET_AUTH=on, but no API key is configured"),
    ("0.0.0.0", {"auth": "off", "api_keys": KEYS}, "RESMEMNET_AUTH=off, but API keys are configured"),
])
def test_the_rule_off_loopback_keys_are_the_default(host, env, problem):
    from app.auth import auth_problem, keys_from_settings
    from app.settings import ServiceSettings

    settings = ServiceSettings(host=host, **env)
    found = auth_problem(settings, keys_from_settings(settings))
    if problem is None:
        assert found is None
    else:
        assert problem in found
        if "refusing" in problem:  # names both ways out
            assert "RESMEMNET_API_KEYS" in found and "RESMEMNET_AUTH=off" in found


def test_serve_refuses_to_start_off_loopback_without_a_key(monkeypatch, capsys):
    """One clear line, exit status 2 (model.errors.EXIT_USAGE), and nothing bound or loaded."""
    from app.cli import main
    from model.errors import EXIT_USAGE

    for name in ("RESMEMNET_API_KEYS", "RESMEMNET_API_KEYS_FILE", "RESMEMNET_AUTH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RESMEMNET_WEIGHTS", "/nonexistent/never-read.json")  # refused before the checkpoint
    assert main(["serve", "--host", "0.0.0.0", "--port", str(free_port())]) == EXIT_USAGE
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("resmemnet serve: error: refusing to serve on 0.0.0.0:")
    assert "RESMEMNET_API_KEYS" in lines[0] and "RESMEMNET_AUTH=off" in lines[0]


# -- the keys themselves -----------------------------------------------------------------------------
def test_key_entries_are_named_and_checked_without_echoing_them():
    from app.auth import ApiKeys
    from app.settings import SettingsError

    keys = ApiKeys(f"{ALICE}, ci:{BOB} ,{CAROL}")
    assert keys.names == ["env-1", "ci", "env-3"]
    assert keys.match(BOB) == "ci" and keys.match(ALICE) == "env-1" and keys.match("nope" * 5) is None
    assert ALICE not in repr(keys.__dict__) and BOB not in repr(keys.__dict__)  # digests only
    short = "abc123"
    for text, words in [(f"a:{short}", "entry 1 (a): the key is 6 characters; a key needs at least 16"),
                        (f"{ALICE},bad name:{BOB}", "entry 2: the name before ':' may use only"),
                        (f"x:{ALICE}!", "entry 1 (x): the key may use only letters"),
                        (f"x:{ALICE},x:{BOB}", "name 'x' is given twice"),
                        (f"x:{ALICE},y:{ALICE}", "named 'x' and 'y' are the same key")]:
        with pytest.raises(SettingsError) as err:
            ApiKeys(text)
        assert words in str(err.value)
        for secret in (ALICE, BOB, short, "bad name"):
            assert secret not in str(err.value)


def test_settings_never_show_the_keys():
    from app.settings import ServiceSettings

    settings = ServiceSettings.from_env({"RESMEMNET_API_KEYS": KEYS})
    assert settings.api_keys == KEYS and ALICE not in repr(settings) and ALICE not in str(settings)


def test_key_file_is_re_read_when_it_changes(scorer, one_torch_thread, tmp_path, monkeypatch, caplog):
    from app import auth

    monkeypatch.setattr(auth, "RECHECK_S", 0.0)  # look at the file on every request
    key_file = tmp_path / "keys"
    key_file.write_text(f"# the team's keys\nalice:{ALICE}\n\n")
    caplog.set_level(logging.DEBUG)
    with app_client(scorer, api_keys_file=str(key_file)) as client:
        assert client.post("/score", files=upload(), headers=bearer(ALICE)).status_code == 200
        refused(client.post("/score", files=upload(), headers=bearer(CAROL)), invalid_token=True)
        key_file.write_text(f"carol:{CAROL}\n")  # alice revoked, carol added
        assert client.post("/score", files=upload(), headers=bearer(CAROL)).status_code == 200
        refused(client.post("/score", files=upload(), headers=bearer(ALICE)), invalid_token=True)
        key_file.write_text("broken:short\n")  # a bad edit keeps the keys that work
        assert client.post("/score", files=upload(), headers=bearer(CAROL)).status_code == 200
        key_file.unlink()  # a file gone for a moment (an editor's save) keeps them too
        assert client.post("/score", files=upload(), headers=bearer(CAROL)).status_code == 200
        key_file.write_text(f"bob:{BOB}\n")
        assert client.post("/score", files=upload(), headers=bearer(BOB)).status_code == 200
        key_file.write_text("")  # no key at all: everyone is refused
        refused(client.post("/score", files=upload(), headers=bearer(BOB)), invalid_token=True)
    assert "API keys reloaded (the file changed): 1 key(s), named carol" in caplog.text
    assert "API keys not reloaded" in caplog.text and "the key is 5 characters" in caplog.text
    server_side = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith(("httpx", "httpcore")))
    for secret in (ALICE, BOB, CAROL, "short"):
        assert secret not in server_side


def test_the_key_file_is_looked_at_once_a_second_at_most(tmp_path):
    from app.auth import ApiKeys

    now = [100.0]
    key_file = tmp_path / "keys"
    key_file.write_text(f"a:{ALICE}\n")
    keys = ApiKeys(key_file=key_file, clock=lambda: now[0])
    key_file.write_text(f"bob:{BOB}\n")  # another size: a change whatever the clock's resolution
    now[0] += 0.5
    assert keys.match(BOB) is None and keys.match(ALICE) == "a"  # not looked at yet
    now[0] += 0.6
    assert keys.match(BOB) == "bob" and keys.match(ALICE) is None


def test_an_unreadable_key_file_stops_the_start(tmp_path):
    from app.service import create_app
    from app.settings import ServiceSettings, SettingsError

    with pytest.raises(SettingsError, match="RESMEMNET_API_KEYS_FILE .* cannot be read"):
        create_app(ServiceSettings(api_keys_file=str(tmp_path / "missing")))


def test_keys_never_reach_the_logs_of_refused_and_accepted_requests(scorer, one_torch_thread, caplog):
    caplog.set_level(logging.DEBUG)
    with app_client(scorer, api_keys=KEYS, log_level="debug") as client:
        client.post("/score", files=upload(), headers=bearer(ALICE))
        client.post("/score", files=upload(), headers=bearer(CAROL))
        client.post(f"/score?api_key={BOB}", files=upload())
    server_side = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith(("httpx", "httpcore")))
    assert "model test-random ready" in server_side  # the service's own log was captured
    for secret in (ALICE, BOB):
        assert secret not in server_side


def test_access_log_lines_lose_key_values():
    from app.auth_middleware import RedactKeysFilter

    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5000", "POST", f"/score?profile=outdoor&api_key={ALICE}&Token={BOB}",
                                "1.1", 401), None)
    assert RedactKeysFilter().filter(record)
    line = record.getMessage()
    assert ALICE not in line and BOB not in line
    assert "profile=outdoor&api_key=REDACTED&Token=REDACTED" in line


# -- a real server ---------------------------------------------------------------------------------
@pytest.mark.process
def test_sighup_reloads_the_key_file_in_a_served_process(tiny_checkpoint, tmp_path):
    """Also: the access log (level info) holds no key, a refused upload leaves its connection
    usable, and one sent with `Expect: 100-continue` is answered before its body is sent."""
    key_file = tmp_path / "keys"
    key_file.write_text(f"alice:{ALICE}\n")
    before = os.stat(key_file)
    with serve_subprocess(tiny_checkpoint, tmp_path, api_keys_file=key_file, log_level="info",
                          torch_threads=1) as (base, proc):
        def status(key: str) -> int:
            return httpx.post(base + "/score", files=upload(), headers=bearer(key), timeout=30).status_code

        assert status(ALICE) == 200 and status(CAROL) == 401
        assert httpx.post(f"{base}/score?api_key={ALICE}", files=upload(), timeout=30).status_code == 401
        # carol replaces alice with the same length, size and mtime: only SIGHUP can tell
        key_file.write_text(f"carol:{CAROL[:len(ALICE)]}\n")
        os.utime(key_file, ns=(before.st_atime_ns, before.st_mtime_ns))
        carol = CAROL[:len(ALICE)]
        time.sleep(1.2)
        assert status(ALICE) == 200 and status(carol) == 401, "the change is not visible without SIGHUP"
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while status(carol) != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert status(carol) == 200 and status(ALICE) == 401
        assert proc.poll() is None, "SIGHUP must not stop the server"

        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            body = b"x" * 50_000
            head, answer = raw_request(sock, f"POST /score HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; "
                                             f"boundary=b\r\nContent-Length: {len(body)}", body)
            assert head.startswith("HTTP/1.1 401") and b'"unauthorized"' in answer
            assert "connection: close" not in head.lower()
            head, _ = raw_request(sock, "GET /healthz HTTP/1.1\r\nHost: t")  # the same connection
            assert head.startswith("HTTP/1.1 200")
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            head, answer = raw_request(sock, "POST /score HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n"
                                             "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 5000000")
            assert head.startswith("HTTP/1.1 401") and "connection: close" in head.lower()
        assert metric_samples(base, "resmemnet_requests_by_key_total")
    log = next(tmp_path.glob("server-*.log")).read_text()
    assert "API keys reloaded (SIGHUP): 1 key(s), named carol" in log
    assert "api_key=REDACTED" in log and '"POST /score HTTP/1.1" 200' in log  # the access log is on
    for secret in (ALICE, carol):
        assert secret not in log


# -- containers ------------------------------------------------------------------------------------
def test_compose_carries_a_key_into_every_scoring_container():
    """The containers bind 0.0.0.0: each resmemnet service gets RESMEMNET_API_KEYS (from the shell
    or a .env file) and RESMEMNET_AUTH, so `docker compose up` needs a key or refuses to start."""
    import yaml

    from conftest import REPO

    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    scoring = {n: s for n, s in compose["services"].items() if n.startswith("resmemnet") and n != "resmemnet-lb"}
    assert set(scoring) == {"resmemnet", "resmemnet-cpu", "resmemnet-slim", "resmemnet-a", "resmemnet-b"}
    for name, service in scoring.items():
        env = service["environment"]
        # no value: taken from the shell (or .env) when set there, left out (the service's default) when not
        for variable in ("RESMEMNET_API_KEYS", "RESMEMNET_AUTH", "RESMEMNET_METRICS_AUTH"):
            assert variable in env and env[variable] is None, (name, variable, env.get(variable))
    assert ".env" in (REPO / ".gitignore").read_text().split(), ".gitignore keeps a compose .env file of keys out"
    # .dockerignore is an allowlist: everything out ("*"), then the few paths the image needs back in
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*" and not [line for line in lines if line.startswith("!") and ".env" in line], lines
