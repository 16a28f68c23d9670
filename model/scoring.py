"""The Scorer: the one door into a loaded model, for the service, the command line and scripts.

It prepares an input (file path or bytes -> decoded image, tensor, warnings), scores batches
for any of the model's score profiles, and makes Grad-RAM heatmaps. Nothing outside model/
touches the network, its preprocessing or its precision directly.

Without torch (the onnxruntime backend) inputs are float32 numpy arrays, scores numpy arrays;
with it, torch tensors wrapping the same arrays (model.preprocess.Preprocessing.image_to_array).

Images are grouped by the tensor shape the resize policy gives them, so a batch never needs
padding and an image's score does not depend on what it is batched with.
"""
from __future__ import annotations

import os
import sys
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from .checkpoint import CheckpointMeta
from .config import ResMemNetConfig
from .environment import require_torch, torch_available
from .heatmaps import HeatmapResult, parse_layers
from .preprocess import DEFAULT_MAX_PIXELS, ImageDecodeError, Preprocessing, decode_image, stack_inputs
from .profiles import check_profile, profile_names
from .quality import input_warnings

if TYPE_CHECKING:  # the onnxruntime backend never imports torch: it prepares and scores numpy arrays
    import torch

    from .network import ResMemNet

# The stages a heatmap averages unless told otherwise: layer3's map (12x12 cells on the shipped
# 192 px input) beside layer4's (6x6) is twice as fine as layer4 alone and keeps its regions;
# chosen on overlays of real photos, cost in docs/benchmarks.md.
DEFAULT_HEATMAP_LAYERS = ("layer3", "layer4")


class PreparedInput(NamedTuple):
    """One decoded, preprocessed input (Scorer.prepare)."""

    tensor: object  # (3, H, W) float32 RGB in [0, 1] at the checkpoint's input size: a torch tensor, or
    # with the onnxruntime backend a numpy array (model.preprocess.Preprocessing.image_to_array)
    width: int  # the decoded (upright) image's size, pixels
    height: int
    warnings: list[str]  # model.quality codes of what the model cannot judge (flat, text, multi_frame, ...)
    image: object = None  # the decoded upright RGB PIL image with keep_image=True (to draw an overlay on), else None


@dataclass
class ScoreResult:
    path: str
    score: float | None = None
    width: int | None = None
    height: int | None = None
    error: str | None = None
    reason: str | None = None
    percentile: float | None = None  # 0-100 among the checkpoint's reference photos (None: no reference)
    warnings: list[str] = field(default_factory=list)  # model.quality codes: inputs it cannot judge
    profile: str = "default"  # the score profile (model.network.PROFILES) score and percentile are of

    @property
    def ok(self) -> bool:
        return self.error is None


class Scorer:
    """A loaded model plus its preprocessing, on one device.

    backend "torch" runs the model; "onnxruntime" runs its ONNX export on the CPU (runner: a
    model.engines.OnnxRuntimeRunner), every score profile included, and loads the torch model
    only when something asks for `model` (heatmaps), from `weights`. That backend never
    imports torch to prepare or score (it runs in an install without torch), and reports
    device "cpu", precision "fp32".
    """

    def __init__(self, model: ResMemNet | None, preprocessing: Preprocessing, *, device="auto",
                 meta: CheckpointMeta | None = None, mixed_precision: bool = True, precision: str | None = None,
                 max_batch: int = 32, runner=None, weights: str | os.PathLike | None = None):
        if model is None and (runner is None or weights is None):
            raise ValueError("a Scorer needs a model, or a runner and the checkpoint to load the model from")
        self.runner = runner
        self.backend = getattr(runner, "name", "torch") if runner is not None else "torch"
        self._weights = weights
        self._model_lock = threading.Lock()
        self.preprocessing = preprocessing
        self.meta = meta
        self.max_batch = max(1, int(max_batch))
        self._precision_args = (mixed_precision, precision)
        if runner is not None:
            if str(device) not in ("auto", "cpu"):
                raise ValueError("the onnxruntime backend runs on the CPU: use --device cpu (or auto)")
            self.device = CPU
            # ONNX Runtime runs the export in fp32; the torch model (heatmaps) gets its own
            # precision when it is loaded (autocast_dtype)
            self._autocast_dtype, self.mixed_precision, self.precision = None, False, "fp32"
            self._model = None if model is None else self._place(model)
            return
        torch = require_torch("the torch backend")
        from . import devices

        self.device = devices.resolve_device(device)
        # Reduced precision for the trunk only (model.devices.autocast_dtype: by default fp16 on
        # CUDA, bf16 on CPUs that have it); the head always runs in fp32. mixed_precision=False
        # is fp32 whatever `precision` says; precision None: $RESMEMNET_PRECISION, else "auto".
        self._autocast_dtype = _autocast_for(self.device, mixed_precision, precision)
        self.mixed_precision = self._autocast_dtype is not None
        self.precision = devices.precision_name(self._autocast_dtype)  # what runs: "fp32", "bf16" or "fp16"
        if self.device.type == "cuda" and not self.mixed_precision:
            # fp32 on request means fp32: cuDNN's default TF32 convolutions moved scores by 1.2e-3
            # from the CPU's. This is process-wide, as is any torch.backends setting.
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        self._model = self._place(model)

    @property
    def autocast_dtype(self):
        """The trunk's reduced-precision dtype for the torch model (None: fp32). With the
        onnxruntime backend: the precision the lazily loaded torch model runs heatmaps in."""
        if self.runner is not None:
            return _autocast_for(self._torch_device(), *self._precision_args) if self._model is not None else None
        return self._autocast_dtype

    def _torch_device(self):
        torch = require_torch("the torch model")
        return torch.device("cpu") if self.device is CPU else self.device

    def _place(self, model: ResMemNet) -> ResMemNet:
        import torch

        return model.eval().to(self._torch_device()).to(memory_format=torch.channels_last)

    @property
    def model(self) -> ResMemNet:
        """The torch model (loaded on first use when another backend scores); TorchMissingError
        where torch is not installed."""
        if self._model is None:
            torch = require_torch("the torch model (Grad-RAM of these layers, or profiles this export lacks)")
            from .checkpoint import load_checkpoint

            # Loaded outside inference mode even when first asked for inside it (a profile score on
            # another backend): inference tensors as parameters would break every later heatmap.
            with self._model_lock, torch.inference_mode(False):
                if self._model is None:
                    self._model = self._place(load_checkpoint(self._weights)[0])
        return self._model

    @model.setter
    def model(self, value: ResMemNet) -> None:
        self._model = value

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike | None = None, *, backend: str | None = None,
                        threads: int | None = None, onnx: str | os.PathLike | None = None, **kwargs) -> "Scorer":
        """path: the checkpoint's .json (default: model.environment.default_weights()).
        backend: "torch" | "onnxruntime" | "auto" (model.engines.pick_backend; torch if ONNX Runtime
        cannot run the checkpoint; onnxruntime where torch is not installed) | None
        ($RESMEMNET_BACKEND, else model.engines.default_backend(): torch, onnxruntime without it). threads: ONNX Runtime's intra-op
        threads (None: torch's setting where torch is loaded, else ONNX Runtime's default). onnx: the
        export the onnxruntime backend runs (default $RESMEMNET_ONNX, else the cache:
        model.engines.onnxruntime_runner).
        model.engines.BackendError (a ValueError) when unknown or not installed; TorchMissingError
        for the torch backend without torch."""
        from .engines import BackendError, OrtOptions, check_backend, onnxruntime_runner, pick_backend
        from .environment import default_weights

        path = default_weights() if path is None else path
        choice = wanted = check_backend(backend)
        if choice == "auto" and not torch_available():
            choice = "onnxruntime"
        if choice == "auto":
            from .devices import resolve_device

            device = resolve_device(kwargs.get("device", "auto"))
            # torch where it would run the trunk in reduced precision: ONNX Runtime runs the export in fp32
            reduced = _autocast_for(device, kwargs.get("mixed_precision", True), kwargs.get("precision")) is not None
            choice = pick_backend(choice, device.type, native_bf16=reduced)
        if choice == "onnxruntime":
            if threads is None:
                threads = sys.modules["torch"].get_num_threads() if sys.modules.get("torch") is not None else 0
            try:
                runner = onnxruntime_runner(path, OrtOptions(threads=threads), onnx=onnx)
            except BackendError:
                if wanted != "auto" or not torch_available():
                    raise
            else:
                from .checkpoint import read_meta

                meta = read_meta(path)
                return cls(None, meta.preprocessing, meta=meta, runner=runner, weights=path, **kwargs)
        require_torch("the torch backend")
        from .checkpoint import load_checkpoint

        model, meta = load_checkpoint(path)
        return cls(model, meta.preprocessing, meta=meta, **kwargs)

    @property
    def config(self) -> ResMemNetConfig:
        """The model's architecture; from the checkpoint's metadata while the torch model is not loaded."""
        if self._model is None and self.meta is not None:
            return self.meta.architecture
        return self.model.cfg

    @property
    def profiles(self) -> tuple[str, ...]:
        """The score profiles this model has (model.profiles.profile_names), "default" first."""
        return profile_names(self.config)

    def check_profile(self, profile: str) -> str:
        """`profile`, or model.errors.InputError (a ValueError) naming the profiles this model has.
        Callers check a profile here once, where it enters (a request, a flag); the scoring
        methods below take it as checked (an unknown one still fails, in model.network.profile_score)."""
        return check_profile(self.config, profile)

    @property
    def input_size(self) -> int:
        """The resize policy's size in pixels (the square side, or the shorter side)."""
        return self.preprocessing.resize.size

    def typical_input_shapes(self) -> list[tuple[int, int, int]]:
        """(3, H, W) tensor shapes of a square and of a 4:3 photo: what warm-up passes run."""
        policy = self.preprocessing.resize
        shapes = {policy.output_size(policy.size, policy.size), policy.output_size(4 * policy.size, 3 * policy.size)}
        return [(3, h, w) for w, h in sorted(shapes)]

    @property
    def model_name(self) -> str:
        return f"{self.meta.name}@{self.meta.version}" if self.meta else "resmemnet"

    def _autocast(self):
        import torch

        if self.autocast_dtype is not None:
            return torch.autocast(device_type=self._torch_device().type, dtype=self.autocast_dtype)
        return nullcontext()

    def filled_input(self, shape: tuple[int, ...], value: float = 0.5):
        """A constant preprocessed input of `shape` (3, H, W), in this backend's kind (warm-up)."""
        return self.wrap_input(np.full(shape, value, dtype=np.float32))

    def wrap_input(self, array: np.ndarray):
        """A float32 (3, H, W) array as this backend takes it: itself with the onnxruntime
        backend, else a torch tensor sharing its memory."""
        if self.runner is not None:
            return array
        import torch

        return torch.from_numpy(array)

    def score_tensor_batch(self, batch, profile: str = "default"):
        """(B, 3, H, W) in [0,1], all one shape -> (B,) float32 scores of `profile` on the CPU.

        ValueError for a profile this model has not got; see profile_score_batch for the engines."""
        return self.profile_score_batch(batch, (profile,))[:, 0]

    def profile_score_batch(self, batch, profiles: Sequence[str] | None = None):
        """(B, 3, H, W) in [0,1], all one shape -> (B, P) float32 scores on the CPU, one column per
        name in `profiles` (default: all of `self.profiles`, in that order). batch: a torch tensor
        (the result is one), or with the onnxruntime backend a numpy array (the result is one).

        The trunk runs once: profiles differ only in how the head's outputs are combined. The
        onnxruntime backend reads every profile from the export's `profile_scores` output (an
        export without it, or a runner that gives the default score only: the default column
        from the runner, the others from the torch model, loaded on first use). ValueError for
        a profile this model has not got.
        """
        names = tuple(self.profiles if profiles is None else profiles)
        for name in names:
            self.check_profile(name)
        in_export = bool(names) and set(names) <= set(getattr(self.runner, "profile_names", ()))
        if self.runner is not None and isinstance(batch, np.ndarray):
            if in_export:
                return self.runner.profile_table(batch, names)
            if names == ("default",):
                return self.runner(batch)[:, None]
            batch = require_torch("profiles this export lacks").from_numpy(batch)
        import torch

        with torch.inference_mode():
            if self.runner is not None and in_export:
                return torch.from_numpy(self.runner.profile_table(batch.float().contiguous().numpy(), names))
            columns = {}
            if self.runner is not None and "default" in names:
                columns["default"] = torch.from_numpy(self.runner(batch.float().contiguous().numpy()))
            rest = [name for name in names if name not in columns]
            if rest:
                from .profiles import profile_score

                outputs = self._head_outputs(batch)
                columns.update({name: profile_score(outputs, self.model.cfg, name).float().cpu() for name in rest})
            return torch.stack([columns[name] for name in names], dim=1)

    def score_batch(self, batch: torch.Tensor, profiles: Sequence[str]) -> list[float]:
        """(B, 3, H, W) in [0,1], all one shape, and one profile name per image -> B scores, each
        image's in its own profile, from one pass of the trunk (the service's batcher calls this)."""
        wanted = list(dict.fromkeys(profiles))
        table = self.profile_score_batch(batch, wanted)  # (B, len(wanted))
        column = {name: i for i, name in enumerate(wanted)}
        return [row[column[name]] for row, name in zip(table.tolist(), profiles)]

    def _head_outputs(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, n_outputs) head outputs of the torch model: the trunk in reduced
        precision (its last stage in fp32), the head always in fp32."""
        import torch

        model = self.model  # first: with the onnxruntime backend its precision is known once it is loaded
        x = batch.to(self._torch_device(), non_blocking=True).contiguous(memory_format=torch.channels_last)
        with self._autocast():
            pooled = model.forward_features(x, fp32_last_stage=self.autocast_dtype is not None)
        pooled = [p.float() for p in pooled]
        return model.head.outputs(pooled)

    def score_tensors(self, tensors: Sequence, *, max_batch: int | None = None,
                      profile: str = "default") -> list[float]:
        """Score (3, H, W) tensors of any mix of shapes with one profile; order is preserved."""
        max_batch = max(1, int(max_batch or self.max_batch))
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, t in enumerate(tensors):
            groups[tuple(t.shape)].append(i)
        scores = [0.0] * len(tensors)
        for idxs in groups.values():
            for start in range(0, len(idxs), max_batch):
                chunk = idxs[start:start + max_batch]
                out = self.score_tensor_batch(stack_inputs([tensors[i] for i in chunk]), profile)
                for i, s in zip(chunk, out.tolist()):
                    scores[i] = float(s)
        return scores

    def prepare(self, source, *, max_pixels: int = DEFAULT_MAX_PIXELS, keep_image: bool = False) -> PreparedInput:
        """Decode one input (a path, bytes or a file object; model.preprocess.decode_image), judge
        what the model cannot (model.quality), and preprocess it -> PreparedInput. keep_image: also
        keep the decoded image (a heatmap overlay is drawn on it; it can be large, so only then).

        model.preprocess.ImageDecodeError (with a machine-readable reason) for what is not a usable image."""
        img = decode_image(source, max_pixels=max_pixels)
        return PreparedInput(self.wrap_input(self.preprocessing.image_to_array(img)), img.width, img.height,
                             input_warnings(img), img if keep_image else None)

    def heatmap(self, source, *, layers: str | Sequence[str] | None = None, profile: str = "default",
                max_pixels: int = DEFAULT_MAX_PIXELS) -> HeatmapResult:
        """The Grad-RAM heatmap of one input at its own width x height, and its score.

        source: a PreparedInput (prepare()), or what prepare() takes. layers: trunk stages
        ("layer1".."layer4", a comma list or "all"; default DEFAULT_HEATMAP_LAYERS, their maps'
        mean). profile: the (checked) profile whose score the map explains and is returned; that
        score equals score_tensor_batch's for the same input and precision. Runs the torch model
        (it needs gradients) where torch is installed, whatever the backend; without torch, the
        export's layer-4 maps (model/slim_heatmap.py: layer4 only, `layers` in the result says so).
        ValueError for unknown layers (or, without torch, other layers than layer4);
        ImageDecodeError for an unusable input."""
        prepared = source if isinstance(source, PreparedInput) else self.prepare(source, max_pixels=max_pixels)
        if layers is not None:
            parse_layers(layers)  # a bad name is the caller's ValueError before any model is loaded
        if self._slim_heatmaps():
            from .slim_heatmap import slim_heatmap

            return slim_heatmap(self.runner, np.asarray(prepared.tensor), (prepared.width, prepared.height),
                                layers=layers, profile=profile)
        model = self.model
        from .gradram import heatmap_for_tensor

        tensor = prepared.tensor
        if isinstance(tensor, np.ndarray):
            tensor = require_torch("Grad-RAM").from_numpy(tensor)
        return heatmap_for_tensor(model, tensor, (prepared.width, prepared.height),
                                  layer=DEFAULT_HEATMAP_LAYERS if layers is None else layers,
                                  autocast_dtype=self.autocast_dtype, profile=profile)

    def heatmap_layers(self, layers: str | Sequence[str] | None = None) -> tuple[str, ...]:
        """The stages heatmap(layers=...) draws: ValueError for unknown names, and without torch
        for any but layer4 (model.slim_heatmap.check_layers)."""
        if self._slim_heatmaps():
            from .slim_heatmap import check_layers

            return check_layers(layers)
        return parse_layers(DEFAULT_HEATMAP_LAYERS if layers is None else layers)

    def _slim_heatmaps(self) -> bool:
        """Heatmaps from the export's layer-4 maps: the onnxruntime backend without torch."""
        return self.runner is not None and self._model is None and not torch_available()

    def percentile(self, score: float, profile: str = "default") -> float | None:
        """The score's rank (0-100) among the checkpoint's reference photos, by the quantiles of
        `profile`; None without a reference (or without quantiles for that profile)."""
        return self.meta.percentile(score, profile) if self.meta is not None else None

    def score_paths(self, paths: Sequence[str], *, batch_size: int = 16, workers: int = 2,
                    progress=None, profile: str = "default") -> Iterator[ScoreResult]:
        """Score files in order, decoding in threads ahead of the model. Bad files become error rows.

        Scores and percentiles are of `profile`; ValueError (on the first row) for one this model has not got."""
        self.check_profile(profile)
        batch_size = max(1, int(batch_size))

        def load(path):
            try:
                tensor, w, h, warns, _ = self.prepare(path)
                return path, tensor, w, h, warns, None
            except ImageDecodeError as exc:
                return path, None, None, None, [], exc

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            window = batch_size * 4  # decode ahead, keep memory bounded
            for start in range(0, len(paths), window):
                loaded = list(pool.map(load, paths[start:start + window]))
                good = [item for item in loaded if item[1] is not None]
                scores = self.score_tensors([item[1] for item in good], max_batch=batch_size, profile=profile)
                by_path = {id(item): s for item, s in zip(good, scores)}
                for item in loaded:
                    path, tensor, w, h, warns, exc = item
                    if exc is not None:
                        yield ScoreResult(path=str(path), error=exc.message, reason=exc.reason, profile=profile)
                    else:
                        score = by_path[id(item)]
                        yield ScoreResult(path=str(path), score=score, width=w, height=h, profile=profile,
                                          percentile=self.percentile(score, profile), warnings=warns)
                    if progress is not None:
                        progress(1)


class _Cpu:
    """The onnxruntime backend's device, without torch: prints like torch.device("cpu")."""

    type = "cpu"
    index = None

    def __str__(self) -> str:
        return "cpu"

    def __repr__(self) -> str:
        return "device(type='cpu')"


CPU = _Cpu()


def _autocast_for(device, mixed_precision: bool, precision: str | None):
    from . import devices
    from .environment import precision_setting

    return devices.autocast_dtype(device, mixed_precision, precision_setting(precision))


def collect_inputs(paths: Iterable[str | os.PathLike]) -> tuple[list[str], list[str]]:
    """Expand folders (recursively, sorted; hidden files skipped) -> (files, problems).

    Symlinked sub-folders are followed; a folder reached again (a link loop, or two links to one
    folder) is walked once, under the first path that reaches it.
    Files named explicitly are always kept, even if they are not images: the scorer reports them.
    A path that does not exist is returned as a problem so the caller can report it as a row.
    """
    files: list[str] = []
    problems: list[str] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            seen = {os.path.realpath(p)}
            for root, dirs, names in os.walk(p, followlinks=True):
                kept = []
                for d in sorted(d for d in dirs if not d.startswith(".")):
                    real = os.path.realpath(os.path.join(root, d))
                    if real not in seen:
                        seen.add(real)
                        kept.append(d)
                dirs[:] = kept
                for name in sorted(names):
                    if not name.startswith("."):
                        files.append(str(Path(root) / name))
        elif p.exists():
            files.append(str(p))
        else:
            problems.append(str(p))
    return files, problems
