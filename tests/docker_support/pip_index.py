"""The host's pip configuration, handed to `docker build` as the `pip.conf` build secret.

pip on a developer's or CI machine may read packages from local folders (a `file://` index, a
`find-links` folder, a constraints file). A build container cannot see them, so while the image
builds they are served over HTTP on 127.0.0.1 (the build runs with `--network host`), and the
secret names them by those URLs. Nothing of it is written into the image: the Dockerfile mounts
the secret for the `pip install` commands only.
"""
from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import threading
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

# pip options whose values are locations; several may be given, separated by white space
LOCATION_KEYS = ("index-url", "extra-index-url", "find-links", "constraint")
# other options passed through as they are
PLAIN_KEYS = ("timeout", "default-timeout", "retries", "trusted-host", "disable-pip-version-check", "prefer-binary")
# where the Dockerfile mounts the `pip-cert` secret: the CA bundle the host's pip trusts (a
# TLS-inspecting proxy's CA is in it, and not in the image's own bundle)
CERT_SECRET = "/run/secrets/pip-cert"


def host_pip_config() -> dict[str, str]:
    """`pip config list` of this interpreter: {option: value}, environment (PIP_*) included;
    a later scope wins, and location options from every scope are joined."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    config: dict[str, str] = {}
    for line in out.splitlines():
        m = re.fullmatch(r"([^.=]*)\.([\w-]+)='(.*)'", line.strip())
        if not m:
            continue
        _, key, value = m.groups()
        if key in LOCATION_KEYS and key != "index-url" and key in config:
            value = " ".join(dict.fromkeys(config[key].split() + value.split()))
        config[key] = value
    return config


def local_path(location: str) -> Path | None:
    """The local file or folder a pip location names (`file://` URL or absolute path), or None."""
    if location.startswith("file:"):
        path = Path(unquote(urlparse(location).path))
    elif location.startswith("/"):
        path = Path(location)
    else:
        return None
    return path if path.exists() else None


def served_root(path: Path, key: str) -> Path:
    """What must be served for `path`: an index's parent too (PEP 503 pages link to ../../files)."""
    return path.parent if key.endswith("index-url") and path.is_dir() else path


def build_pip_conf(config: dict[str, str], base_url: str | None) -> tuple[str, list[Path]]:
    """(pip.conf text for the build, local paths it needs served at base_url + path).
    Local locations are dropped when base_url is None; http(s) ones are kept as they are."""
    lines, roots = ["[global]"], []
    for key in LOCATION_KEYS:
        if key not in config:
            continue
        values = []
        for location in config[key].split():
            path = local_path(location)
            if path is None:
                if re.match(r"https?://", location):
                    values.append(location)
                continue
            if base_url is not None:
                roots.append(served_root(path, key))
                values.append(base_url + str(path) + ("/" if path.is_dir() else ""))
        if values:
            lines.append(f"{key} = {' '.join(values)}")
    lines += [f"{key} = {config[key]}" for key in PLAIN_KEYS if key in config]
    if config.get("cert"):
        lines.append(f"cert = {CERT_SECRET}")
    return "\n".join(lines) + "\n", roots


class _Handler(SimpleHTTPRequestHandler):
    """Serves URL path P as file P, only under the allowed roots."""
    roots: tuple[Path, ...] = ()

    def translate_path(self, path: str) -> str:
        target = Path(os.path.normpath(unquote(urlparse(path).path)))
        if any(target == root or root in target.parents for root in self.roots):
            return str(target)
        return "/nonexistent-outside-served-roots"

    def log_message(self, *args) -> None:  # quiet: pip's own output says what it fetched
        pass


@contextmanager
def pip_secret(folder: Path):
    """Write the build's pip.conf into `folder` and serve its local locations on 127.0.0.1 while
    the context is open; yields (the `docker build` arguments that hand in the secrets, the base
    URL of the local locations or None)."""
    config = host_pip_config()
    _, roots = build_pip_conf(config, "http://127.0.0.1:0")
    server = None
    if roots:
        handler = type("Handler", (_Handler,), {"roots": tuple(sorted({Path(os.path.normpath(r)) for r in roots}))})
        server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory="/"))
        threading.Thread(target=server.serve_forever, name="pip-index", daemon=True).start()
    base_url = f"http://127.0.0.1:{server.server_address[1]}" if server else None
    text, _ = build_pip_conf(config, base_url)
    path = folder / "pip.conf"
    path.write_text(text)
    args = ["--secret", f"id=pip.conf,src={path}"]
    if config.get("cert"):
        args += ["--secret", f"id=pip-cert,src={config['cert']}"]
    try:
        yield args, base_url
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
