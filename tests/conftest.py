"""Shared fixtures and helpers: a small random-trunk checkpoint and its Scorer, the service around
it (in-process, in a thread, or as a real `resmemnet serve`), and image files of many kinds.

Markers (pyproject.toml): `process` on every test that starts a process, a server, a browser,
torchrun or HAProxy; `make test-fast` runs the suite without them (README, "Tests").
"""
from __future__ import annotations

import os

# Idle OpenMP workers spin by default; on a busy 2-core CI machine that made small torch calls
# tens of times slower. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import io  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


def make_image(path: Path | None = None, size=(120, 90), mode="RGB", fmt="JPEG", seed=0, **save_kwargs) -> bytes:
    """A random-texture image; written to `path` when given, bytes returned either way."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save_kwargs)
    data = buf.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


# Test modules of other areas whose every test starts a process (torchrun; hadolint and
# docker-compose), marked here rather than in the files themselves.
PROCESS_MODULES = {"test_ddp.py", "test_service_container.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in PROCESS_MODULES:
            item.add_marker(pytest.mark.process)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A ResNet-50 ResMem-Net with a random trunk, embedded, at a small input size (fast on CPU)."""
    from model.trunks import TrunkSource
    from model.checkpoint import CheckpointMeta, save_checkpoint
    from model.network import build_resmemnet
    from model.preprocess import Preprocessing, ResizePolicy

    torch.manual_seed(0)
    model = build_resmemnet(backbone="resnet50")
    preprocessing = Preprocessing(resize=ResizePolicy(size=64, multiple=32), input_scaling="imagenet")
    meta = CheckpointMeta(
        name="test-random", architecture=model.cfg, preprocessing=preprocessing,
        trunk=TrunkSource(kind="none", depth="resnet50"), trunk_embedded=True,
        description="random weights for tests", license="test only",
    )
    path = tmp_path_factory.mktemp("ckpt") / "test-random.json"
    return save_checkpoint(model, meta, path, embed_trunk=True)


# Distinct reference quantiles per profile, so a percentile shows which ones it was read from.
PROFILE_REFERENCE = {"set": "test", "n": 101, "quantiles": np.linspace(0.0, 1.0, 101).round(6).tolist(),
                     "profiles": {"general": np.linspace(0.3, 0.7, 101).round(6).tolist(),
                                  "outdoor": np.linspace(0.45, 0.55, 101).round(6).tolist()}}


@pytest.fixture(scope="module")
def profile_checkpoint(tmp_path_factory):
    """A random ResNet-50 with a gated readout head (labelled, teacher and domain outputs) and
    reference quantiles for every profile. The readout is set so that the three outputs vary
    around 0.6, 0.4 and 0.5 from photo to photo, and the profiles' scores differ."""
    from model.trunks import TrunkSource
    from model.checkpoint import CheckpointMeta, save_checkpoint
    from model.network import build_resmemnet
    from model.preprocess import Preprocessing, ResizePolicy, decode_image

    torch.manual_seed(1)
    model = build_resmemnet(backbone="resnet50", head="readout", teacher_output=True, score_blend=0.7,
                            domain_gate=True)
    preprocessing = Preprocessing(resize=ResizePolicy(size=64, multiple=32), input_scaling="imagenet")
    out = model.head.out
    with torch.no_grad():  # fitted on photos like the tests' own
        photos = [make_image(size=(120, 90), seed=1000 + i) for i in range(8)]
        images = torch.stack([preprocessing.image_to_tensor(decode_image(d)) for d in photos])
        flat = torch.cat(model.forward_features(images), dim=1)
        spread = (flat - flat.mean(dim=0)).std() * flat.shape[1] ** 0.5
        out.weight.copy_(torch.randn_like(out.weight) * (0.1 / spread))
        out.bias.copy_(torch.tensor([0.6, 0.4, 0.5]) - flat.mean(dim=0) @ out.weight.T)
    meta = CheckpointMeta(
        name="test-profiles", architecture=model.cfg, preprocessing=preprocessing,
        trunk=TrunkSource(kind="none", depth="resnet50"), trunk_embedded=True, reference=PROFILE_REFERENCE,
        description="random weights with a teacher output and a domain gate, for tests", license="test only",
    )
    return save_checkpoint(model, meta, tmp_path_factory.mktemp("profiles") / "test-profiles.json", embed_trunk=True)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a test module: on the shared 2-core CI machine, OpenMP's
    spin-waiting made small multi-threaded ops tens of times slower. Results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def scorer(tiny_checkpoint):
    """The tiny checkpoint's Scorer on the CPU, as the service builds it, in the precision
    RESMEMNET_PRECISION names, else "auto": the trunk runs in bf16 on a CPU with native bf16. Compare
    its scores with its own (same precision) at 1e-5, with fp32 ones at about 1e-2; a test that
    needs fp32 builds its Scorer with precision="fp32" (tests/test_precision.py)."""
    from model.scoring import Scorer

    return Scorer.from_checkpoint(tiny_checkpoint, device="cpu")


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """A cache folder of the test's own (ONNX exports, hash record): nothing is shared or left behind."""
    monkeypatch.setenv("RESMEMNET_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


# -- the service in-process (TestClient) -------------------------------------------------------
@contextmanager
def serving(scorer=None, *, wait=True, raise_server_exceptions=True, **settings):
    """A TestClient of create_app(ServiceSettings(**settings), scorer), ready (unless wait=False);
    warm-up is off unless asked for."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # starlette's note about httpx vs httpx2
        from fastapi.testclient import TestClient

    from app.service import create_app
    from app.settings import ServiceSettings

    settings.setdefault("warmup", False)
    app = create_app(ServiceSettings(**settings), scorer=scorer)
    with TestClient(app, raise_server_exceptions=raise_server_exceptions) as client:
        if wait:
            wait_until_ready(client)
        yield client


def wait_until_ready(client, timeout=180):
    """Poll a TestClient's /readyz until 200 (AssertionError if /healthz fails or time runs out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get("/readyz")
        if r.status_code == 200:
            return r
        assert client.get("/healthz").status_code == 200, client.get("/healthz").json()
        time.sleep(0.05)
    raise AssertionError("the service did not get ready")


@pytest.fixture(scope="module")
def client(request, scorer, one_torch_thread):
    """The service in-process around the module's `scorer`, with the settings in the module's
    CLIENT_SETTINGS dict (none: the defaults)."""
    with serving(scorer, **getattr(request.module, "CLIENT_SETTINGS", {})) as c:
        yield c


class SlowScorer:
    """A real scorer whose forward passes take at least `delay` seconds (or raise `fail`)."""

    def __init__(self, inner, delay=0.0, fail=None):
        self._inner, self.delay, self.fail = inner, delay, fail

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def score_batch(self, batch, profiles):
        time.sleep(self.delay)
        if self.fail:
            raise self.fail
        return self._inner.score_batch(batch, profiles)


def assert_error(response, status, reason):
    """The service's error shape with this status and reason; returns its "error" object."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"status", "reason", "message"}, body
    assert body["error"]["status"] == status and body["error"]["reason"] == reason, body
    assert len(body["error"]["message"]) > 5
    return body["error"]


# -- a real server on loopback, for the tests that talk HTTP to it --------------------------------
def serve_command() -> list[str]:
    script = Path(sys.executable).parent / "resmemnet"
    return [str(script), "serve"] if script.exists() else [sys.executable, "-m", "app.cli", "serve"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base: str, timeout: float = 180, proc: subprocess.Popen | None = None, log: Path | None = None):
    """Poll /readyz until 200; AssertionError with the server's log if it exits or times out."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {log.read_text() if log else ''}")
        try:
            r = httpx.get(base + "/readyz", timeout=5)
            if r.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"server at {base} not ready: {log.read_text() if log else ''}")


@contextmanager
def serve_subprocess(weights, tmp_path, **env_settings):
    """`resmemnet serve` with settings from the environment, exactly as in the container."""
    port = free_port()
    env = {**os.environ, "RESMEMNET_HOST": "127.0.0.1", "RESMEMNET_PORT": str(port),
           "RESMEMNET_WEIGHTS": str(weights), "RESMEMNET_DEVICE": "cpu", "RESMEMNET_LOG_LEVEL": "warning"}
    env.update({f"RESMEMNET_{k.upper()}": str(v) for k, v in env_settings.items()})
    log = tmp_path / f"server-{port}.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(serve_command(), env=env, stdout=fh, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc=proc, log=log)
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


@contextmanager
def serve_in_thread(app, *, guarded: bool = False):
    """uvicorn serving `app` in a thread on a free loopback port; yields the base URL once ready.
    guarded: with the connection guards and limits `resmemnet serve` runs it with
    (app.http_protocol.uvicorn_config, from the app's settings)."""
    import uvicorn

    from app.http_protocol import uvicorn_config

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = (uvicorn_config(app, app.state.settings, log_level="warning") if guarded
              else uvicorn.Config(app, log_level="warning", lifespan="on"))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()


def metric_samples(base: str, name: str) -> list:
    """The samples of one metric family from a live server's /metrics."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(base + "/metrics", timeout=10).text
    return [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


def raw_request(sock: socket.socket, head: str, body: bytes = b"") -> tuple[str, bytes]:
    """Send one HTTP/1.1 request (head without its closing blank line, then body) on a socket
    and read one response: (status line and headers, body; "" and b"" if the server closed)."""
    sock.sendall(head.encode() + b"\r\n\r\n" + body)
    return read_response(sock)


def read_response(sock: socket.socket) -> tuple[str, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data.decode("latin-1"), b""
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    text = head.decode("latin-1")
    length = int(next((line.split(":", 1)[1] for line in text.split("\r\n")
                       if line.lower().startswith("content-length:")), "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return text, rest
