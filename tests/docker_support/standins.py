"""Stand-ins for the public base images, built from Debian's packages.

The test machines reach Debian's and PyPI's package servers but no image registry, so the
container tests cannot pull python:3.11-slim-bookworm, prom/prometheus or haproxy. Instead:
`debootstrap` makes a minimal Debian bookworm root file system, imported as the stand-in
for debian:bookworm-slim, and standins/*.Dockerfile add Debian's python3 (3.11), prometheus and
haproxy to it. The images are handed to the Dockerfile (build argument PYTHON_IMAGE) and to
docker-compose.yml (RESMEMNET_PROMETHEUS_IMAGE, RESMEMNET_HAPROXY_IMAGE), whose defaults are
the public images.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from .engine import Engine, EngineUnavailable

RECIPES = Path(__file__).resolve().parent / "standins"
DEBIAN = "resmemnet-standin/debian:bookworm-slim"
IMAGES = {
    "python": "resmemnet-standin/python:3.11-slim-bookworm",
    "prometheus": "resmemnet-standin/prometheus:bookworm",
    "haproxy": "resmemnet-standin/haproxy:bookworm",
}
# as in Debian's own slim images: no documentation, manual pages or translations
DPKG_EXCLUDES = """path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
"""


def _slim(rootfs: Path) -> None:
    """Drop the downloaded packages, package lists, manual pages and translations."""
    for folder in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for entry in (rootfs / folder).iterdir():
            if entry.is_file() and entry.name != "lock":
                entry.unlink()
    for folder in ("usr/share/man", "usr/share/info", "usr/share/locale"):
        for entry in (rootfs / folder).iterdir():
            if entry.name != "locale.alias":
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def _debootstrap(engine: Engine, workdir: Path) -> None:
    debootstrap = shutil.which("debootstrap") or ("/usr/sbin/debootstrap" if Path("/usr/sbin/debootstrap").exists()
                                                  else None)
    if debootstrap is None:
        raise EngineUnavailable("debootstrap is not installed (apt-get install debootstrap); it builds the "
                                "stand-in base images")
    rootfs = Path(tempfile.mkdtemp(prefix="rootfs-", dir=workdir))
    try:
        r = subprocess.run([debootstrap, "--variant=minbase", "bookworm", str(rootfs)], capture_output=True,
                           text=True, timeout=900)
        if r.returncode != 0:
            raise AssertionError(f"debootstrap failed:\n{(r.stdout + r.stderr)[-3000:]}")
        _slim(rootfs)
        (rootfs / "etc/dpkg/dpkg.cfg.d/excludes").write_text(DPKG_EXCLUDES)
        (rootfs / "etc/apt/apt.conf.d/90no-recommends").write_text(
            'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n')
        # no service starts inside an image build (as in Debian's images)
        policy = rootfs / "usr/sbin/policy-rc.d"
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
        r = subprocess.run([engine.docker, "import", "--change", 'CMD ["bash"]', "-", DEBIAN], stdin=tar.stdout,
                           env=engine.env, capture_output=True, text=True, timeout=600)
        tar.stdout.close()
        tar.wait(timeout=60)
        if r.returncode != 0:
            raise AssertionError(f"docker import failed: {r.stdout}{r.stderr}")
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)


def build_standins(engine: Engine, workdir: Path) -> dict[str, str]:
    """Build the stand-ins that are missing; {"python"|"prometheus"|"haproxy": image tag}."""
    if not engine.image_exists(DEBIAN):
        _debootstrap(engine, workdir)
    for name, tag in IMAGES.items():
        if not engine.image_exists(tag):
            # --network host: apt inside the build reaches Debian's servers without a bridge
            engine.run("build", "--network", "host", "--build-arg", f"DEBIAN_IMAGE={DEBIAN}",
                       "-f", str(RECIPES / f"{name}.Dockerfile"), "-t", tag, str(RECIPES), timeout=900)
    return dict(IMAGES)
