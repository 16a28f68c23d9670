"""One `docker compose` project of docker-compose.yml plus the loopback override, for the tests."""
from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

from .engine import Engine

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
LOOPBACK = Path(__file__).resolve().parent / "compose.loopback.yml"


class ComposeProject:
    """`docker compose -p NAME -f docker-compose.yml -f compose.loopback.yml ...` with `env` as the
    environment it interpolates and passes RESMEMNET_* settings from (none come from the caller's)."""

    def __init__(self, engine: Engine, env: dict[str, str], *extra_files: Path, prefix: str = "resmemnet-test"):
        self.engine = engine
        self.name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.files = [COMPOSE, LOOPBACK, *extra_files]
        inherited = {k: v for k, v in engine.env.items() if not k.startswith("RESMEMNET_")}
        self.env = {**inherited, **env}

    def __call__(self, *args: str, timeout: float = 300, check: bool = True,
                 with_stderr: bool = True) -> subprocess.CompletedProcess:
        files = [a for f in self.files for a in ("-f", str(f))]
        cmd = [*self.engine.compose, "-p", self.name, "--project-directory", str(REPO), *files, *args]
        r = subprocess.run(cmd, env=self.env, timeout=timeout, text=True, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT if with_stderr else subprocess.PIPE)
        if check and r.returncode != 0:
            raise AssertionError(f"docker compose {' '.join(args)} exited with {r.returncode}:\n{r.stdout[-4000:]}")
        return r

    def container(self, service: str) -> str:
        """The id of the service's container, running or not."""
        out = self("ps", "--all", "--quiet", service).stdout.split()
        assert len(out) == 1, f"{service}: expected one container, got {out}"
        return out[0]

    def state(self, service: str) -> dict:
        return json.loads(self.engine.inspect(self.container(service), "{{json .State}}"))

    def logs(self, service: str) -> list[str]:
        out = self("logs", "--no-color", "--no-log-prefix", service, with_stderr=False).stdout
        return [line for line in out.splitlines() if line.strip()]

    def wait_exited(self, service: str, restarts: int, timeout: float = 600) -> dict:
        """Wait until the container has used `restarts` restarts and stays exited; its State."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.state(service)
            count = int(self.engine.inspect(self.container(service), "{{.RestartCount}}"))
            if state["Status"] == "exited" and not state["Restarting"] and count >= restarts:
                return {**state, "RestartCount": count}
            time.sleep(0.5)
        raise AssertionError(f"{service} still running or restarting after {timeout} s: {self.state(service)}")

    def down(self) -> None:
        """Remove the project's containers, those of every profile (a plain `down` skips them)."""
        self("--profile", "cpu", "--profile", "replicas", "--profile", "slim", "down", "--volumes", "--remove-orphans", "--timeout", "10",
             check=False, timeout=180)


def settings_env(**settings) -> dict[str, str]:
    """{"RESMEMNET_MAX_BATCH_SIZE": "4", ...} from max_batch_size=4, ..."""
    return {f"RESMEMNET_{k.upper()}": str(v).lower() if isinstance(v, bool) else str(v) for k, v in settings.items()}



def wait_ready(engine: Engine, container: str, base_url: str, timeout: float = 300) -> float:
    """Poll GET /readyz until 200; seconds waited. AssertionError with the logs if the container stops."""
    import httpx

    start = time.monotonic()
    while time.monotonic() < start + timeout:
        try:
            if httpx.get(base_url + "/readyz", timeout=5).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        if engine.inspect(container, "{{.State.Status}}") not in ("running", "created", "restarting"):
            logs = engine.run("logs", container, check=False).stdout
            raise AssertionError(f"container {container} stopped before it was ready:\n{logs[-3000:]}")
        time.sleep(0.25)
    raise AssertionError(f"{base_url} not ready after {timeout} s")


def wait_healthy(engine: Engine, container: str, timeout: float = 120) -> None:
    """Wait for the image's HEALTHCHECK to report healthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = engine.inspect(container, "{{.State.Health.Status}}")
        if status == "healthy":
            return
        assert status == "starting", f"{container} is {status}: {engine.inspect(container, '{{json .State.Health}}')}"
        time.sleep(0.5)
    raise AssertionError(f"{container} not healthy after {timeout} s: {engine.inspect(container, '{{json .State.Health}}')}")
