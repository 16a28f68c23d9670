"""Checkpoint format: `NAME.safetensors` (tensors) + `NAME.json` (everything else).

The JSON carries the architecture config, preprocessing policy, trunk provenance and licence,
training data, metrics, and the sha256 of the tensor file. When the trunk is frozen and comes
from an installed package, only the head is embedded and the JSON names the package file and
its sha256; loading verifies both hashes and every shape, and never unpickles our own files.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .config import ResMemNetConfig
from .environment import default_weights
from .errors import ModelFileError
from .filecache import sha256_file
from .preprocess import Preprocessing
from .trunks import TrunkLoadError, TrunkSource

if TYPE_CHECKING:  # reading the metadata (read_meta) needs no torch; the weights do
    import torch

    from .network import ResMemNet

FORMAT = "resmemnet-checkpoint/1"


class CheckpointError(ModelFileError):
    """A checkpoint that is missing, tampered with, truncated or does not fit its architecture."""


@dataclass
class CheckpointMeta:
    name: str
    architecture: ResMemNetConfig
    preprocessing: Preprocessing
    trunk: TrunkSource
    trunk_embedded: bool
    version: str = "0.1.0"
    description: str = ""
    training: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    license: str = ""
    tensors_file: str = ""
    tensors_sha256: str = ""
    # Score quantiles of a fixed set of diverse reference photos: {"set": str, "n": int,
    # "quantiles": [101 scores, the 0th..100th percentile]}; turns a score into a percentile.
    # "quantiles" are the default profile's; other score profiles (model.network.PROFILES) may
    # have theirs in "profiles": {"general": [101 scores], "outdoor": [101 scores]}.
    reference: dict = field(default_factory=dict)

    def reference_quantiles(self, profile: str = "default") -> list[float] | None:
        """The stored reference quantiles of one score profile, or None where there are none."""
        if not self.reference:
            return None
        if profile == "default":
            return self.reference.get("quantiles")
        return (self.reference.get("profiles") or {}).get(profile)

    def profile_metrics(self) -> dict[str, dict]:
        """Measured Spearman rho per score profile: metadata `metrics.profiles` where the checkpoint
        has it; for checkpoints written before it, what the older fields hold: the default
        profile's `within_cv` (metrics.cross_validation) and `teacher_agreement`
        (metrics.final_run), every profile's numbers on `validation` sets (metrics.validation)."""
        if self.metrics.get("profiles"):
            return self.metrics["profiles"]
        out: dict[str, dict] = {}
        cv = self.metrics.get("cross_validation") or {}
        # the served setting re-scored on the CV run's folds, where the run was made with other scalars
        rho = (cv.get("shipped_setting") or {}).get("spearman_mean", (cv.get("mean") or {}).get("spearman"))
        if rho is not None and cv.get("dataset"):
            out.setdefault("default", {})["within_cv"] = {cv["dataset"]: round(rho, 4)}
        agreement = ((self.metrics.get("final_run") or {}).get("teacher_holdout") or {}).get("spearman")
        if agreement is not None:
            out.setdefault("default", {})["teacher_agreement"] = round(agreement, 4)
        for name, v in (self.metrics.get("validation") or {}).items():
            per_profile = {"default": v.get("spearman"), **(v.get("profiles") or {})}
            for profile, r in per_profile.items():
                if r is not None:
                    out.setdefault(profile, {}).setdefault("validation", {})[name] = round(r, 4)
        return out

    def percentile(self, score: float, profile: str = "default") -> float | None:
        """Rank of `score` (0-100) among the reference photos, interpolated between the stored
        quantiles of `profile`; None when the checkpoint has none for it (no reference set)."""
        quantiles = self.reference_quantiles(profile)
        if not quantiles:
            return None
        import numpy as np

        q = np.asarray(quantiles, dtype=np.float64)
        levels = np.linspace(0.0, 100.0, len(q))
        # Equal quantiles (a flat stretch) would make interp pick one end: take the middle.
        lo = float(np.interp(score, q, levels, left=0.0, right=100.0))
        hi = float(-np.interp(-score, -q[::-1], -levels[::-1], left=-100.0, right=0.0))
        return round((lo + hi) / 2.0, 2)

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "architecture": self.architecture.to_dict(),
            "preprocessing": self.preprocessing.to_dict(),
            "trunk": {**self.trunk.to_dict(), "embedded": self.trunk_embedded},
            "training": self.training,
            "metrics": self.metrics,
            "provenance": self.provenance,
            "license": self.license,
            "tensors": {"file": self.tensors_file, "sha256": self.tensors_sha256},
            "reference": self.reference,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "CheckpointMeta":
        if data.get("format") != FORMAT:
            raise CheckpointError(f"unknown checkpoint format {data.get('format')!r}; expected {FORMAT!r}")
        try:
            trunk = dict(data["trunk"])
            embedded = bool(trunk.pop("embedded"))
            return cls(
                name=data["name"],
                version=data.get("version", ""),
                description=data.get("description", ""),
                architecture=ResMemNetConfig.from_dict(data["architecture"]),
                preprocessing=Preprocessing.from_dict(data["preprocessing"]),
                trunk=TrunkSource.from_dict(trunk),
                trunk_embedded=embedded,
                training=data.get("training", {}),
                metrics=data.get("metrics", {}),
                provenance=data.get("provenance", {}),
                license=data.get("license", ""),
                tensors_file=data["tensors"]["file"],
                tensors_sha256=data["tensors"]["sha256"],
                reference=dict(data.get("reference") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint metadata is incomplete or invalid ({type(exc).__name__}: {exc})") from None


def _json_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix == ".safetensors":
        path = path.with_suffix(".json")
    if path.suffix != ".json":
        raise CheckpointError(f"a checkpoint is given by its .json or .safetensors file, not {path}")
    return path


def save_checkpoint(model: ResMemNet, meta: CheckpointMeta, path: str | os.PathLike, *,
                    embed_trunk: bool | None = None) -> Path:
    """Write NAME.safetensors + NAME.json; returns the JSON path.

    embed_trunk=None embeds the trunk unless it came from a package/file source and was not trained.
    """
    from safetensors.torch import save_file

    json_path = _json_path(path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    if embed_trunk is None:
        embed_trunk = meta.trunk.kind in ("none", "torchvision") or not model.trunk_frozen
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
             if not k.startswith("branch.") and (embed_trunk or not k.startswith("trunk."))}
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    tensors_path = json_path.with_suffix(".safetensors")
    save_file(state, str(tensors_path), metadata={"format": FORMAT, "name": meta.name})
    meta.architecture = model.cfg
    meta.trunk_embedded = embed_trunk
    meta.tensors_file = tensors_path.name
    meta.tensors_sha256 = sha256_file(tensors_path)
    json_path.write_text(json.dumps(meta.to_dict(), indent=2, sort_keys=False) + "\n")
    # safetensors creates its file 0600 whatever the umask; give it the .json's mode (the umask's),
    # so a checkpoint one user writes can be served by another (the container's user 10001).
    shutil.copymode(json_path, tensors_path)
    return json_path


def read_meta(path: str | os.PathLike | None = None) -> CheckpointMeta:
    """The checkpoint's metadata (default: model.environment.default_weights()); CheckpointError."""
    json_path = _json_path(default_weights() if path is None else path)
    if not json_path.is_file():
        raise CheckpointError(f"checkpoint metadata not found: {json_path}")
    try:
        data = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{json_path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{json_path} does not hold a JSON object")
    return CheckpointMeta.from_dict(data)


def load_checkpoint(path: str | os.PathLike | None = None, *, map_location: str | torch.device = "cpu",
                    ) -> tuple[ResMemNet, CheckpointMeta]:
    """Load a checkpoint (default: model.environment.default_weights()), verifying the tensor
    file's sha256, the trunk's and every shape."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .network import ResMemNet, load_source_weights

    json_path = _json_path(default_weights() if path is None else path)
    meta = read_meta(json_path)
    tensors_path = json_path.parent / meta.tensors_file
    if not tensors_path.is_file():
        raise CheckpointError(f"tensor file {tensors_path} named by {json_path.name} is missing")
    actual = sha256_file(tensors_path)
    if actual != meta.tensors_sha256:
        raise CheckpointError(
            f"{tensors_path.name} has sha256 {actual[:16]}..., the metadata says {meta.tensors_sha256[:16]}...: "
            "the file was modified or truncated"
        )
    try:
        state = load_file(str(tensors_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{tensors_path.name} is not a valid safetensors file ({exc})") from None

    model = ResMemNet(meta.architecture)
    try:
        load_source_weights(model, meta.trunk, allow_download=False, trunk=not meta.trunk_embedded)
    except TrunkLoadError as exc:
        raise CheckpointError(f"the checkpoint's trunk could not be loaded: {exc}") from None
    expected = {k: v for k, v in model.state_dict().items()
                if not k.endswith("num_batches_tracked") and not k.startswith("branch.")}
    needed = expected if meta.trunk_embedded else {k: v for k, v in expected.items() if not k.startswith("trunk.")}
    missing = sorted(set(needed) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{tensors_path.name} does not match architecture {meta.architecture.backbone}/{meta.architecture.head}: "
            f"{len(missing)} tensors missing (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(
                f"tensor {key} has shape {tuple(value.shape)}, architecture needs {tuple(expected[key].shape)}"
            )
    model.load_state_dict(state, strict=False)
    model.set_trunk_frozen(True)
    model.eval()
    return model.to(map_location), meta
