"""An ONNX export found and checked without torch: the file `resmemnet export --format onnx`
wrote (RESMEMNET_ONNX, `--onnx`; the slim image's, built in), or one in the cache folder. What the
torch-free runtime (the onnxruntime backend, `pip install resmemnet`) scores with."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .export import FORMAT, ExportError, OnnxExport, onnx_cache_dir, sidecar_path
from .filecache import sha256_file, verified_sha256


def prebuilt_onnx(onnx_path: str | os.PathLike, weights: str | os.PathLike) -> OnnxExport:
    """An export that `resmemnet export --format onnx` wrote, checked against the checkpoint
    `weights` without torch: its sidecar (beside it) is of this FORMAT, the file's sha256 is the
    sidecar's, and the checkpoint's JSON and tensor files hash to what the export was made from.
    ExportError (one line) otherwise."""
    from .checkpoint import _json_path, read_meta

    path = Path(onnx_path)
    try:
        info = json.loads(sidecar_path(path).read_text())
        recorded = info["onnx"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ExportError(f"{path}: no readable export sidecar {sidecar_path(path).name} beside it (resmemnet export "
                          "--format onnx writes both)") from None
    if info.get("format") != FORMAT:
        raise ExportError(f"{path} is an export of format {info.get('format')!r}, not {FORMAT!r}: export it again")
    if not path.is_file():
        raise ExportError(f"{path} does not exist")
    if verified_sha256(path) != recorded:
        raise ExportError(f"{path} does not have the sha256 its sidecar records: modified or truncated")
    json_path = _json_path(weights)
    tensors = json_path.parent / read_meta(json_path).tensors_file
    made_from = info.get("checkpoint") or {}
    if (made_from.get("json_sha256") != sha256_file(json_path)
            or not tensors.is_file() or made_from.get("tensors_sha256") != sha256_file(tensors)):
        raise ExportError(f"{path} was exported from another checkpoint than {json_path} "
                          f"({made_from.get('name', '?')} {made_from.get('version', '')}): export it again")
    return OnnxExport(path, info)


def find_cached_export(weights: str | os.PathLike, *, folder: str | os.PathLike | None = None) -> OnnxExport | None:
    """The newest export of the checkpoint `weights` in the cache folder, found without torch (by
    the hashes of the checkpoint's files its sidecar records), or None."""
    folder = Path(folder) if folder is not None else onnx_cache_dir()
    candidates = sorted(folder.glob("*.onnx"), key=lambda p: p.stat().st_mtime, reverse=True) if folder.is_dir() else []
    for path in candidates:
        if ".ort-" in path.name:  # ONNX Runtime's optimised graphs beside the exports
            continue
        try:
            return prebuilt_onnx(path, weights)
        except ExportError:
            continue
    return None
