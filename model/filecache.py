"""Files the model package checks and keeps: their sha256, remembered between runs, and the
per-user cache folder that record (and the ONNX exports, model/export.py) live in.

Used by the checkpoint loader (tensor file hash), the trunk loader (pinned package files),
the ONNX export cache and the engine's optimised-graph cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

from .environment import env_value


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The file's sha256 as 64 hex digits, read in `chunk`-byte blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


HASH_RECORD = "verified-sha256.json"
# A file modified this recently may still change within the file system's timestamp tick
# without its mtime moving ("racy git"): such a hash is used but not recorded.
RACY_WINDOW_NS = 2_000_000_000


def cache_dir() -> Path:
    """Per-user cache folder: $RESMEMNET_CACHE_DIR, else $XDG_CACHE_HOME/resmemnet, else
    ~/.cache/resmemnet. Not created here; every user of it must cope with it being unwritable."""
    folder = env_value("cache_dir")
    if folder:
        return Path(folder).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "resmemnet"


def _file_identity(st: os.stat_result) -> dict:
    # ctime as well as mtime: utime() can set mtime back, nothing but the kernel sets ctime.
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
            "inode": st.st_ino, "device": st.st_dev}


def _read_hash_record(record: Path) -> dict:
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def verified_sha256(path: str | os.PathLike) -> str:
    """The file's sha256, read from a record in cache_dir() when the file is unchanged since it
    was last hashed (same real path, size, mtime_ns, ctime_ns, inode and device), else computed
    and recorded. Any change to the file invalidates its entry. The record is only a cache: an
    unreadable or unwritable one just means hashing every time.

    Trust: the record sits in the user's own cache folder, as trusted as the installed packages.
    """
    real = os.path.realpath(path)
    before = os.stat(real)
    record = cache_dir() / HASH_RECORD
    entries = _read_hash_record(record)
    entry = entries.get(real)
    identity = _file_identity(before)
    if isinstance(entry, dict) and isinstance(entry.get("sha256"), str) \
            and {k: entry.get(k) for k in identity} == identity:
        return entry["sha256"]
    digest = sha256_file(real)
    after = os.stat(real)
    if _file_identity(after) == identity and time.time_ns() - before.st_mtime_ns > RACY_WINDOW_NS:
        entries = _read_hash_record(record)  # another process may have added entries meanwhile
        entries[real] = {**identity, "sha256": digest}
        write_json_atomic(record, entries)
    return digest


def write_json_atomic(path: Path, data: dict) -> None:
    """Write via a temporary file and rename, so readers never see half a file; errors are ignored."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass
