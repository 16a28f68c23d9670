"""The whole model as ONNX (trunk, head, blend, calibration, soft_clamp), cached per checkpoint,
and as an NVIDIA Triton model repository.

The graph is traced through ResMemNet.forward, so whatever the checkpoint's architecture holds
is exported with it. Input `image`: float32 (batch, 3, H, W) RGB in [0, 1], H and W the
checkpoint's input size (dynamic when its resize policy keeps the aspect ratio); output `score`:
float32 (batch,) in [0, 1], the default profile; for a ResMem-Net also `profile_scores`: float32
(batch, P), every score profile (model/profiles.py) one column each, their names in the sidecar
(`onnx.profile_output.profiles`, default first); for a readout head also `layer4_cams`, the raw
layer-4 Grad-RAM map of every profile (model/slim_heatmap.py: the torch-free /heatmap). A JSON sidecar names the checkpoint and the
sha256 of every file the export came from. Exported files are big (the trunk's weights) and never shipped: they are
built from the installed trunk on first use and kept in cache_dir()/onnx.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelFileError
from .filecache import cache_dir, sha256_file, verified_sha256

FORMAT = "resmemnet-onnx/3"  # /2: the profile_scores output; /3: layer4_cams (model/slim_heatmap.py)
INPUT_NAME, OUTPUT_NAME = "image", "score"
PROFILES_OUTPUT = "profile_scores"
OPSET = 17
TRITON_PLATFORM = "onnxruntime_onnx"
# Largest difference allowed between the exported graph and torch on the same fp32 input.
EXPORT_TOLERANCE = 1e-3


class ExportError(ModelFileError):
    """An export that could not be written or does not reproduce the torch model."""


@dataclass(frozen=True)
class OnnxExport:
    """An exported model file and its sidecar's contents."""

    path: Path
    info: dict

    @property
    def sidecar(self) -> Path:
        return sidecar_path(self.path)


def sidecar_path(onnx_path: str | os.PathLike) -> Path:
    return Path(onnx_path).with_suffix(".json")


def input_hw(preprocessing) -> tuple[int | None, int | None]:
    """(H, W) of the network input, None for a dimension that varies per image."""
    resize = preprocessing.resize
    return (resize.size, resize.size) if resize.mode == "square" else (None, None)


def checkpoint_identity(weights: str | os.PathLike) -> dict:
    """What an export is built from: the checkpoint's files (hashed as they are on disk now),
    its trunk's pinned hash, and the exporter's versions. Any change gives another cache key."""
    import torch

    from .checkpoint import _json_path, read_meta

    json_path = _json_path(weights).resolve()
    meta = read_meta(json_path)
    tensors = json_path.parent / meta.tensors_file
    if not tensors.is_file():
        raise ExportError(f"tensor file {tensors} named by {json_path.name} is missing")
    trunk = None
    if not meta.trunk_embedded:
        trunk = {k: getattr(meta.trunk, k) for k in ("kind", "package", "package_version", "package_file", "path",
                                                     "url", "sha256")}
    return {
        "name": meta.name,
        "version": meta.version,
        "json": str(json_path),
        "json_sha256": sha256_file(json_path),
        "tensors_sha256": sha256_file(tensors),
        "trunk": trunk,
        "exporter": {"format": FORMAT, "opset": OPSET, "torch": torch.__version__.split("+")[0]},
    }


def cache_key(identity: dict) -> str:
    blob = json.dumps({k: v for k, v in identity.items() if k != "json"}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _profile_graph(model):
    """A ResMem-Net as (score, every profile's score[, their layer-4 Grad-RAM maps]): the head's
    outputs once, each profile one column (the same element-wise ops as the torch model), and for
    a readout head the maps of model/slim_heatmap.py. None for any other module."""
    import torch
    from torch import nn

    from .profiles import profile_names, profile_score
    from .slim_heatmap import cam_module

    if not (hasattr(model, "cfg") and hasattr(model, "forward_features") and hasattr(model.cfg, "output_names")):
        return None

    class ProfileGraph(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net
            self.names = profile_names(net.cfg)
            self.cams = cam_module(net, self.names)

        def forward(self, images):
            pooled, fmap = self.net.forward_features(images, keep_maps=True)
            outputs = self.net.head.outputs(pooled)
            table = torch.stack([profile_score(outputs, self.net.cfg, p) for p in self.names], dim=1)
            if self.cams is None:
                return table[:, 0], table
            return table[:, 0], table, self.cams(outputs, fmap, pooled)

    return ProfileGraph(model).eval()  # eval: the exporter restores the wrapper's mode on everything inside it


def export_onnx(model, preprocessing, out: str | os.PathLike, *, checkpoint: dict | None = None,
                verify: bool = True) -> OnnxExport:
    """Trace `model` (a ResMemNet, any head) through its forward and write `out` + sidecar.

    The file is written under a temporary name and renamed, so a reader never sees half of it.
    verify: run a random batch through ONNX Runtime (when installed) and torch, and refuse
    (ExportError) if they differ by more than EXPORT_TOLERANCE.
    """
    import torch

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    height, width = input_hw(preprocessing)
    example_hw = (height or preprocessing.resize.size, width or preprocessing.resize.size)
    model = model.eval().float().to("cpu")
    graph = _profile_graph(model)
    example = torch.rand(2, 3, *example_hw, generator=torch.Generator().manual_seed(0))
    axes = {0: "batch"} if height else {0: "batch", 2: "height", 3: "width"}
    names = _output_names(graph)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # The TorchScript exporter: exact for these ops, seconds not minutes, and no onnxscript.
            warnings.simplefilter("ignore")
            torch.onnx.export(graph if graph is not None else model, (example,), str(tmp), input_names=[INPUT_NAME],
                              output_names=names, dynamic_axes={INPUT_NAME: axes, **_output_axes(names, height)},
                              opset_version=OPSET, dynamo=False, do_constant_folding=True)
        if verify:
            _verify(model, tmp, example, graph)
        digest = sha256_file(tmp)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    shape = ["batch", 3, height or "height", width or "width"]
    info = {
        "format": FORMAT,
        "checkpoint": checkpoint or {},
        "onnx": {"file": out.name, "sha256": digest, "opset": OPSET,
                 "input": {"name": INPUT_NAME, "dtype": "float32", "shape": shape,
                           "meaning": "RGB in [0, 1], resized as `preprocessing` says (no mean/std: the graph "
                                      "normalises)"},
                 "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch"],
                            "meaning": "memorability score in [0, 1] (the default profile)"}},
        "preprocessing": preprocessing.to_dict(),
        "exporter": {"torch": torch.__version__},
    }
    if graph is not None:
        info["onnx"]["profile_output"] = {"name": PROFILES_OUTPUT, "dtype": "float32",
                                          "shape": ["batch", len(graph.names)], "profiles": list(graph.names),
                                          "meaning": "every score profile's score in [0, 1], one column each"}
        if graph.cams is not None:
            from .slim_heatmap import output_info

            info["onnx"]["heatmap_outputs"] = output_info(graph.names)
    _write_json(sidecar_path(out), info)
    return OnnxExport(out, info)


def _verify(model, onnx_path: Path, example, graph=None) -> None:
    try:
        import onnxruntime as ort
    except ImportError:
        return
    import numpy as np
    import torch

    with torch.no_grad():
        expected = [model(example).numpy()] + ([t.numpy() for t in graph(example)[1:]] if graph is not None else [])
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = _output_names(graph)
    for got, want in zip(session.run(names, {INPUT_NAME: example.numpy()}), expected):
        # the raw maps are unbounded: their tolerance is relative to their largest magnitude
        atol = EXPORT_TOLERANCE * max(1.0, float(np.abs(want).max()) if want.size else 1.0)
        if got.shape != want.shape or not np.allclose(got, want, atol=atol, rtol=0):
            diff = float(np.abs(got - want).max()) if got.shape == want.shape else float("nan")
            raise ExportError(f"the exported graph does not reproduce the model (shapes {got.shape} vs "
                              f"{want.shape}, largest difference {diff:.2e}); this architecture does not "
                              "trace to ONNX")


def _output_axes(names: list[str], height) -> dict:
    """Every output's dynamic batch axis, and the maps' height and width where the input's vary."""
    from .slim_heatmap import CAMS_OUTPUT

    axes = {n: {0: "batch"} for n in names}
    if CAMS_OUTPUT in axes and not height:
        axes[CAMS_OUTPUT].update({2: "map_height", 3: "map_width"})
    return axes


def _output_names(graph) -> list[str]:
    """The export's outputs: `score`, then for a ResMem-Net `profile_scores` and maybe `layer4_cams`."""
    if graph is None:
        return [OUTPUT_NAME]
    from .slim_heatmap import CAMS_OUTPUT

    return [OUTPUT_NAME, PROFILES_OUTPUT] + ([CAMS_OUTPUT] if graph.cams is not None else [])


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def onnx_cache_dir() -> Path:
    return cache_dir() / "onnx"


def cached_onnx(weights: str | os.PathLike, *, folder: str | os.PathLike | None = None) -> OnnxExport:
    """The checkpoint's ONNX export from the cache, exported (from the installed trunk, which
    load_checkpoint verifies) when missing or when any input to it changed.

    A cached file is used only if its sha256 is still the one its sidecar recorded (through
    verified_sha256's record, so an unchanged file is not re-read). An unwritable cache folder
    gets a private temporary folder instead, removed at exit.
    Raises CheckpointError / TrunkLoadError for a bad checkpoint, ExportError for a bad export.
    """
    identity = checkpoint_identity(weights)
    folder = Path(folder) if folder is not None else onnx_cache_dir()
    path = folder / f"{identity['name']}-{cache_key(identity)}.onnx"
    found = _valid_cached(path)
    if found is not None:
        return found
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".probe")
        probe.close()
    except OSError:
        path = _private_dir() / path.name
    from .checkpoint import load_checkpoint

    model, meta = load_checkpoint(identity["json"])
    export = export_onnx(model, meta.preprocessing, path, checkpoint=identity)
    prune_cache(path.parent, keep=path.name.split(".")[0])
    return export


# Exports kept in the cache folder (each ~100-250 MB with its optimised graph): the newest few,
# and none is removed within an hour of its last use, so a process that just picked one keeps it.
KEEP_EXPORTS = 3
KEEP_RECENT_S = 3600


def prune_cache(folder: Path, *, keep: str) -> None:
    """Remove the oldest exports beyond KEEP_EXPORTS (all files of one export share the name up to
    its first dot); errors are ignored: pruning only saves disk."""
    import time

    groups: dict[str, list[Path]] = {}
    for f in folder.iterdir():
        if f.is_file() and not f.name.startswith("."):
            groups.setdefault(f.name.split(".")[0], []).append(f)

    def last_used(files):
        return max(max(f.stat().st_mtime, f.stat().st_atime) for f in files)

    try:
        ranked = sorted(groups.items(), key=lambda kv: last_used(kv[1]), reverse=True)
        for stem, files in ranked[KEEP_EXPORTS:]:
            if stem != keep and time.time() - last_used(files) > KEEP_RECENT_S:
                for f in files:
                    f.unlink(missing_ok=True)
    except OSError:
        pass


def _valid_cached(path: Path) -> OnnxExport | None:
    try:
        info = json.loads(sidecar_path(path).read_text())
        if info.get("format") == FORMAT and path.is_file() and verified_sha256(path) == info["onnx"]["sha256"]:
            return OnnxExport(path, info)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


_PRIVATE: list[Path] = []


def _private_dir() -> Path:
    if not _PRIVATE:
        import atexit

        _PRIVATE.append(Path(tempfile.mkdtemp(prefix="resmemnet-onnx-")))
        atexit.register(shutil.rmtree, _PRIVATE[0], True)
    return _PRIVATE[0]


def export_to(weights: str | os.PathLike, out: str | os.PathLike, *, cached: OnnxExport | None = None) -> OnnxExport:
    """Write the checkpoint's ONNX model to `out` (+ `out` with .json: the sidecar), from the cache."""
    cached = cached or cached_onnx(weights)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.copyfile(cached.path, tmp)
    os.replace(tmp, out)
    info = json.loads(json.dumps(cached.info))
    info["onnx"]["file"] = out.name
    _write_json(sidecar_path(out), info)
    return OnnxExport(out, info)


# -- Triton --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TritonOptions:
    """Scheduling settings written into config.pbtxt (Triton's names and units)."""

    name: str = "resmemnet"
    max_batch_size: int = 32
    preferred_batch_sizes: tuple[int, ...] = (8, 16, 32)
    max_queue_delay_us: int = 5000
    instances: int = 1
    kind: str = "KIND_AUTO"  # KIND_AUTO (a GPU when there is one), KIND_CPU or KIND_GPU

    def __post_init__(self):
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise ValueError(f"model name {self.name!r}: use letters, digits, '-', '_', '.'")
        if self.max_batch_size < 1 or self.instances < 1 or self.max_queue_delay_us < 0:
            raise ValueError("max_batch_size and instances must be >= 1, max_queue_delay_us >= 0")
        if any(not 1 <= b <= self.max_batch_size for b in self.preferred_batch_sizes):
            raise ValueError(f"preferred batch sizes must lie in 1..{self.max_batch_size}")
        if self.kind not in ("KIND_AUTO", "KIND_CPU", "KIND_GPU"):
            raise ValueError(f"unknown instance kind {self.kind!r}")


def triton_config(export_info: dict, options: TritonOptions = TritonOptions()) -> str:
    """config.pbtxt (protobuf text format of Triton's ModelConfig) for an exported model."""
    shape = export_info["onnx"]["input"]["shape"][1:]
    dims = ", ".join(str(d) if isinstance(d, int) else "-1" for d in shape)
    preferred = ", ".join(str(b) for b in options.preferred_batch_sizes)
    profiles = export_info["onnx"].get("profile_output")
    profile_output = "" if not profiles else f""",
  {{
    name: "{PROFILES_OUTPUT}"
    data_type: TYPE_FP32
    dims: [ {len(profiles['profiles'])} ]  # columns: {', '.join(profiles['profiles'])}
  }}"""
    return f"""# ResMem-Net {export_info['checkpoint'].get('name', '')} {export_info['checkpoint'].get('version', '')}: \
memorability of RGB images.
# Input: float32 RGB in [0, 1], resized as the checkpoint's preprocessing says:
# {json.dumps(export_info['preprocessing'])}
name: "{options.name}"
platform: "{TRITON_PLATFORM}"
max_batch_size: {options.max_batch_size}
input [
  {{
    name: "{INPUT_NAME}"
    data_type: TYPE_FP32
    format: FORMAT_NCHW
    dims: [ {dims} ]
  }}
]
output [
  {{
    name: "{OUTPUT_NAME}"
    data_type: TYPE_FP32
    dims: [ 1 ]
    reshape: {{ shape: [ ] }}  # the model's output is (batch,): one score per image (the default profile)
  }}{profile_output}
]
dynamic_batching {{
  preferred_batch_size: [ {preferred} ]
  max_queue_delay_microseconds: {options.max_queue_delay_us}
}}
instance_group [
  {{
    count: {options.instances}
    kind: {options.kind}
  }}
]
"""


def model_config_module():
    """Triton's generated ModelConfig protobuf module, from the installed `tritonclient` wheel.

    Loaded from its file: tritonclient.grpc's package __init__ insists on grpcio, which parsing a
    config does not need. Raises ImportError when tritonclient is not installed.
    """
    import importlib.util

    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("validating a Triton config needs tritonclient (pip install 'resmemnet[engines]')")
    path = Path(list(spec.submodule_search_locations)[0]) / "grpc" / "model_config_pb2.py"
    loaded = importlib.util.spec_from_file_location("resmemnet_triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    return module


def parse_triton_config(text: str):
    """Parse config.pbtxt text into Triton's ModelConfig message; ValueError if it does not fit."""
    from google.protobuf import text_format

    pb2 = model_config_module()
    try:
        return text_format.Parse(text, pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise ValueError(f"config.pbtxt does not parse as Triton's ModelConfig: {exc}") from None


def write_triton_repository(weights: str | os.PathLike, out: str | os.PathLike,
                            options: TritonOptions = TritonOptions(), *, validate: bool | None = None) -> Path:
    """OUT/<name>/config.pbtxt + OUT/<name>/1/model.onnx (+ its sidecar beside config.pbtxt).
    Returns the model folder. validate: parse the config against Triton's ModelConfig first
    (None: when tritonclient is installed; True without it raises ImportError)."""
    cached = cached_onnx(weights)
    config = triton_config(cached.info, options)
    if validate is None:
        import importlib.util

        validate = importlib.util.find_spec("tritonclient") is not None
    if validate:
        parse_triton_config(config)
    model_dir = Path(out) / options.name
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    export = export_to(weights, version_dir / "model.onnx", cached=cached)
    # The sidecar sits beside config.pbtxt: Triton reads only model.onnx from the version folder.
    shutil.move(str(export.sidecar), model_dir / "resmemnet-export.json")
    (model_dir / "config.pbtxt").write_text(config)
    return model_dir
