"""Shared fixtures: a small random-trunk checkpoint and image files of many kinds."""
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
import time  # noqa: E402
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


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a test module: on the shared 2-core CI machine, OpenMP's
    spin-waiting made small multi-threaded ops tens of times slower. Results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- a real `resmemnet serve` on loopback, for the tests that talk HTTP to it ----------------------
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
