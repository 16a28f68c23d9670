"""Two `resmemnet serve` replicas behind HAProxy (Debian's package) with deploy/haproxy/haproxy.cfg,
all on 127.0.0.1. Under a bounded load, one replica is stopped with SIGTERM (restarted), then the
other is killed with SIGKILL: every request still gets exactly one answer, 200 with the scorer's
score for its own image or a clean 503 with Retry-After; none is lost.

Needs the `haproxy` binary (`apt-get install -y haproxy`; `make test` installs it); skipped without.
Set RESMEMNET_LB_REPORT=FILE to write the run's numbers (docs/deploy.md quotes them)."""
from __future__ import annotations

import csv
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

from conftest import REPO, free_port

HAPROXY = shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy",) if Path(p).exists()), None)
if HAPROXY is None and os.environ.get("RESMEMNET_REQUIRE_HAPROXY") == "1":  # CI (.ci/run): never skip
    raise RuntimeError("haproxy is not installed but RESMEMNET_REQUIRE_HAPROXY=1 (make system-deps installs it)")
pytestmark = [pytest.mark.process,  # HAProxy in front of real servers
              pytest.mark.skipif(HAPROXY is None, reason="haproxy not installed (apt-get install -y haproxy)")]

CONFIG = REPO / "deploy" / "haproxy" / "haproxy.cfg"
CLIENTS = 3
DISTINCT = 24  # distinct images; request i sends image i % DISTINCT
CAP = 120  # hard bound on requests
TOL = 1e-4


def image_bytes(i: int) -> bytes:
    """Small distinct JPEGs (a few kB: well inside the balancer's retry buffer)."""
    rng = np.random.default_rng(i)
    w, h = 48 + 8 * (i % 5), 40 + 8 * (i % 4)
    ramp = np.linspace(0, 1, w)[None, :, None] * np.linspace(0.2, 1, h)[:, None, None]
    arr = 255 * np.clip((i % 6) / 6 * ramp + (i // 6) / 4 * rng.random((h, w, 3)), 0, 1)
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8), "RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


class Replica:
    """One `resmemnet serve` process on a fixed loopback port (restartable on the same port)."""

    def __init__(self, name: str, port: int, weights: Path, logdir: Path):
        self.name, self.port, self.weights, self.logdir = name, port, weights, logdir
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        script = Path(sys.executable).parent / "resmemnet"
        cmd = [str(script), "serve"] if script.exists() else [sys.executable, "-m", "app.cli", "serve"]
        env = {**os.environ, "RESMEMNET_HOST": "127.0.0.1", "RESMEMNET_PORT": str(self.port),
               "RESMEMNET_WEIGHTS": str(self.weights), "RESMEMNET_DEVICE": "cpu", "RESMEMNET_LOG_LEVEL": "warning",
               "RESMEMNET_TORCH_THREADS": "1", "RESMEMNET_MAX_BATCH_SIZE": "8",
               # a batching window keeps several requests inside a replica when it is stopped
               "RESMEMNET_MAX_WAIT_MS": "100", "RESMEMNET_GRACEFUL_SHUTDOWN_S": "10", "OMP_NUM_THREADS": "1"}
        self.starts += 1
        log = open(self.logdir / f"replica-{self.name}-{self.starts}.log", "wb")
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"replica {self.name} exited with {self.proc.returncode}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"replica {self.name} not ready after {timeout} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


class Balancer:
    def __init__(self, replicas: list[Replica], logdir: Path):
        self.port, self.stats_port = free_port(), free_port()
        env = {**os.environ, "LB_BIND": f"127.0.0.1:{self.port}", "STATS_BIND": f"127.0.0.1:{self.stats_port}",
               "REPLICA_A": f"127.0.0.1:{replicas[0].port}", "REPLICA_B": f"127.0.0.1:{replicas[1].port}"}
        check = subprocess.run([HAPROXY, "-c", "-f", str(CONFIG)], env=env, capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        self.log = logdir / "haproxy.log"
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen([HAPROXY, "-db", "-f", str(CONFIG)], env=env, stdout=fh,
                                         stderr=subprocess.STDOUT)
        self.base = f"http://127.0.0.1:{self.port}"

    def stats(self) -> dict[str, dict]:
        text = httpx.get(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=5).text.lstrip("# ")
        return {f"{r['pxname']}/{r['svname']}": r for r in csv.DictReader(io.StringIO(text))}

    def wait_status(self, server: str, status: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.stats()[f"replicas/{server}"]["status"].startswith(status):
                    return
            except (httpx.HTTPError, KeyError):
                pass
            time.sleep(0.2)
        raise AssertionError(f"haproxy never saw server {server} {status}: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


class Load:
    """CLIENTS threads posting /score through the balancer while `go` is set, at most CAP requests."""

    def __init__(self, base: str):
        self.base = base
        self.go, self.stop = threading.Event(), threading.Event()
        self.cond = threading.Condition()
        self.issued = self.done = 0
        self.records: list[dict] = []
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(CLIENTS)]

    def _client(self) -> None:
        with httpx.Client(timeout=90) as client:
            while True:
                self.go.wait()
                with self.cond:
                    if self.stop.is_set() or self.issued >= CAP:
                        return
                    i = self.issued
                    self.issued += 1
                name = f"img-{i:04d}.jpg"
                start = time.perf_counter()
                try:
                    r = client.post(self.base + "/score", files={"file": (name, image_bytes(i % DISTINCT),
                                                                          "image/jpeg")})
                    rec = {"i": i, "name": name, "status": r.status_code, "retry_after": r.headers.get("retry-after"),
                           "body": r.json() if r.headers.get("content-type", "").startswith("application/json")
                           else r.text}
                except httpx.HTTPError as exc:  # a lost request: the test fails on it
                    rec = {"i": i, "name": name, "status": None, "error": repr(exc)}
                rec["seconds"] = time.perf_counter() - start
                with self.cond:
                    self.records.append(rec)
                    self.done += 1
                    self.cond.notify_all()

    def wait_done(self, n: int, timeout: float = 180) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: self.done >= n or self.issued >= CAP and self.done == self.issued,
                                      timeout), f"only {self.done} of {n} answers after {timeout} s"

    def pause(self) -> None:
        self.go.clear()
        with self.cond:
            assert self.cond.wait_for(lambda: self.done == self.issued, 120)

    def finish(self) -> None:
        self.stop.set()
        self.go.set()
        for t in self.threads:
            t.join(timeout=120)


def test_replicas_behind_haproxy_survive_sigterm_and_sigkill(tiny_checkpoint, tmp_path):
    from model.scoring import Scorer

    import torch

    torch.set_num_threads(1)
    scorer = Scorer.from_checkpoint(tiny_checkpoint, device="cpu")
    expected = [scorer.score_tensors([scorer.prepare(image_bytes(i))[0]])[0] for i in range(DISTINCT)]

    a = Replica("a", free_port(), tiny_checkpoint, tmp_path)
    b = Replica("b", free_port(), tiny_checkpoint, tmp_path)
    lb = None
    load = None
    events = {}
    try:
        a.start()
        b.start()
        a.wait_ready()
        b.wait_ready()
        lb = Balancer([a, b], tmp_path)
        lb.wait_status("a", "UP")
        lb.wait_status("b", "UP")

        load = Load(lb.base)
        for t in load.threads:
            t.start()
        started = time.perf_counter()
        load.go.set()
        load.wait_done(20)
        a.proc.send_signal(signal.SIGTERM)  # graceful: refuses new work, finishes what it accepted
        events["sigterm_a_after"] = load.done
        load.wait_done(40)
        # uvicorn re-raises the SIGTERM once its graceful shutdown is done: exit status -15
        assert a.proc.wait(timeout=60) in (0, -signal.SIGTERM), "replica a did not exit cleanly on SIGTERM"
        load.pause()  # restarting a replica takes seconds: no need to burn requests meanwhile
        a.start()
        a.wait_ready()
        lb.wait_status("a", "UP")
        load.go.set()
        load.wait_done(60)
        b.proc.send_signal(signal.SIGKILL)  # abrupt: in-flight requests die with the process
        events["sigkill_b_after"] = load.done
        load.wait_done(90)
        load.finish()
        elapsed = time.perf_counter() - started
        stats = lb.stats()
    finally:
        if load is not None:
            load.finish()
        for proc in (lb, a, b):
            if proc is not None:
                proc.stop()

    records = sorted(load.records, key=lambda r: r["i"])
    # every request issued got exactly one answer
    assert [r["i"] for r in records] == list(range(load.issued)), "a request got no answer or two"
    assert 90 <= load.issued <= CAP
    lost = [r for r in records if r["status"] is None]
    assert not lost, lost[:3]
    bad = [r for r in records if r["status"] not in (200, 503)]
    assert not bad, bad[:3]
    for r in records:
        if r["status"] == 503:
            assert r["retry_after"] and int(r["retry_after"]) >= 1, r
            assert r["body"]["error"]["status"] == 503, r
        else:
            assert r["body"]["filename"] == r["name"], r  # its own answer, not another request's
            assert abs(r["body"]["score"] - expected[r["i"] % DISTINCT]) < TOL, r
    backend = stats["replicas/BACKEND"]
    report = {
        "requests": load.issued, "clients": CLIENTS, "ok_200": sum(r["status"] == 200 for r in records),
        "clean_503": sum(r["status"] == 503 for r in records), "lost": 0, **events,
        "haproxy_retries": int(backend["wretr"] or 0), "haproxy_redispatches": int(backend["wredis"] or 0),
        "served_by": {s: int(stats[f"replicas/{s}"]["stot"] or 0) for s in ("a", "b")},
        "max_request_s": round(max(r["seconds"] for r in records), 3),
        "seconds_incl_restart": round(elapsed, 1),
    }
    print("load balancer:", json.dumps(report))
    if os.environ.get("RESMEMNET_LB_REPORT"):
        Path(os.environ["RESMEMNET_LB_REPORT"]).write_text(json.dumps(report, indent=1) + "\n")


def test_compose_replicas_profile_runs_the_same_balancer_config():
    """`docker compose --profile replicas up resmemnet-lb`: two replicas and HAProxy with this config."""
    import re

    import yaml

    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    lb = services["resmemnet-lb"]
    assert lb["profiles"] == ["replicas"] and set(lb["depends_on"]) == {"resmemnet-a", "resmemnet-b"}
    assert "./deploy/haproxy/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in lb["volumes"]
    needed = set(re.findall(r'"\$\{(\w+)\}"', CONFIG.read_text()))
    assert needed == {"LB_BIND", "STATS_BIND", "REPLICA_A", "REPLICA_B"} == set(lb["environment"])
    for name in ("resmemnet-a", "resmemnet-b"):
        replica = services[name]
        assert replica["profiles"] == ["replicas"] and "ports" not in replica  # reached through the balancer only
        assert lb["environment"][f"REPLICA_{name[-1].upper()}"] == f"{name}:8000"
