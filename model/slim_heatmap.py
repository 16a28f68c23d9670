"""Grad-RAM of layer4 without torch: the ONNX export computes it, numpy finishes it.

For the last stage the map needs no backpropagation through convolutions. Its activations A
(B, C, h, w) (the last bottleneck's output) reach the score only through their spatial mean,
the last pooled tap p = mean_hw A, so d score / d A_c = g_c / (h w) everywhere, with
g = d score / d p, and Grad-RAM's map is sum_c mean_hw(d score / d A_c) A_c = sum_c g_c A_c / (h w).

With the readout head (outputs o = W [p_1 ... p_last] + b, one linear map of the pooled taps) and
no memory branch, g = J W_last: W_last the (K, C) block of W that reads p_last, and J (P, K) the
Jacobian of each score profile with respect to the K head outputs. J is the only nonlinear part
(the blend, domain gate and soft_clamp of model/profiles.py, a handful of element-wise ops): the
graph takes it by central finite differences of the profiles' own traced ops (step FD_STEP, in
fp32; the profiles are smooth, C1 at soft_clamp's knees). The export's `layer4_cams` output is
then (B, P, h, w), one raw map per profile; model/heatmaps.py applies the same ReLU, resampling
and scaling as the torch Grad-RAM (model/gradram.py).

How close: at fp32 the maps equal the torch Grad-RAM of layer4 within HEATMAP_TOLERANCE (max
absolute difference on the [0, 1] map; tests/test_slim_runtime.py, docs/api.md). The finite
differences contribute ~1e-5 relative (truncation step^2 f'''/6 with the gate's width 0.3;
rounding ulp/step), ONNX Runtime's fp32 convolutions about as much. Measured: 8.4e-6 at most on
16 real photos with the shipped checkpoint (bench/slim_heatmap.py), 9.3e-5 on the tests' random
checkpoint; the tolerance, 1e-3, is ten times the latter and a quarter of an 8-bit step, so the
PNGs differ by at most one step where a value rounds the other way.

Other heads (LSTM, linear) or a memory branch (its taps read p_last again) are not linear in
p_last: their exports carry no `layer4_cams`, and without torch /heatmap answers that it needs
torch. Stages before layer4 need real backpropagation through layer4's convolutions, which the
torch-free runtime does not have: it draws layer4 only (DEFAULT_LAYERS) and says so.
"""
from __future__ import annotations

import numpy as np

from .errors import InputError
from .heatmaps import HeatmapResult, combine, parse_layers

CAMS_OUTPUT = "layer4_cams"
DEFAULT_LAYERS = ("layer4",)
FD_STEP = 3e-3  # on the score scale of the head outputs (~[0, 1])
# Largest absolute difference (on the [0, 1] map) from the torch Grad-RAM of layer4, both fp32.
HEATMAP_TOLERANCE = 1e-3


class SlimHeatmapError(InputError):
    """A heatmap the torch-free runtime cannot draw (other layers than layer4, or an export without
    the layer4 maps)."""


def supports(cfg) -> bool:
    """Whether an export of a model with this config can carry `layer4_cams` (see the module)."""
    return cfg.head == "readout" and cfg.branch == "none"


def cam_module(net, names: tuple[str, ...]):
    """A torch module (outputs (B, K), layer4 map (B, C, h, w)) -> raw maps (B, P, h, w) of the
    profiles `names`, traced into the export (model/export.py). None where supports() is False."""
    if not supports(net.cfg):
        return None
    import torch
    from torch import nn

    from .profiles import profile_score

    channels = net.cfg.tap_channels[-1]

    class Layer4Cams(nn.Module):
        def __init__(self):
            super().__init__()
            self.cfg, self.names = net.cfg, names
            self.register_buffer("w_last", net.head.out.weight.detach()[:, -channels:].float().clone(),
                                 persistent=False)

        def forward(self, outputs, fmap):
            k = outputs.shape[1]
            step = torch.eye(k, dtype=outputs.dtype, device=outputs.device) * FD_STEP  # (K, K)
            moved = torch.cat([outputs[None] + step[:, None, :], outputs[None] - step[:, None, :]])  # (2K, B, K)
            flat = moved.reshape(-1, k)
            table = torch.stack([profile_score(flat, self.cfg, p) for p in self.names], dim=1)  # (2K B, P)
            table = table.reshape(2, k, -1, len(self.names))
            jac = (table[0] - table[1]) / (2 * FD_STEP)  # (K, B, P): d score_p / d output_k
            grad = torch.einsum("kbp,kc->bpc", jac, self.w_last)  # (B, P, C): d score_p / d p_last
            area = fmap.shape[2] * fmap.shape[3]
            return torch.einsum("bpc,bchw->bphw", grad, fmap.float()) / area

    return Layer4Cams().eval()


def output_info(names: tuple[str, ...]) -> dict:
    """What the export's sidecar says about `layer4_cams` (model.engines.export_outputs reads it)."""
    return {"name": CAMS_OUTPUT, "layers": list(DEFAULT_LAYERS), "dtype": "float32",
            "shape": ["batch", len(names), "h", "w"], "profiles": list(names), "fd_step": FD_STEP,
            "meaning": "raw Grad-RAM map of layer4 (before ReLU) for every score profile, one channel each"}


def check_layers(layers) -> tuple[str, ...]:
    """The layers the torch-free runtime draws for a request: DEFAULT_LAYERS for None, else
    `layers` if it is exactly layer4; SlimHeatmapError (a 4xx / exit 2) otherwise."""
    if layers is None:
        return DEFAULT_LAYERS
    chosen = parse_layers(layers)
    if chosen != DEFAULT_LAYERS:
        raise SlimHeatmapError(f"without torch, heatmaps are of layer4 only (asked for {','.join(chosen)}): "
                               "leave the layer out, ask for layer4, or use an install with torch "
                               "(pip install 'resmemnet[torch]', the full image)")
    return chosen


def slim_heatmap(runner, array: np.ndarray, image_size: tuple[int, int], *, layers=None,
                 profile: str = "default") -> HeatmapResult:
    """Grad-RAM of layer4 for one preprocessed image (3, H, W) float32 in [0, 1] from the export
    `runner` (a model.engines.OnnxRuntimeRunner), mapped to image_size (width, height)."""
    from .export import PROFILES_OUTPUT

    chosen = check_layers(layers)
    info = getattr(runner, "heatmap_outputs", {}) or {}
    if info.get("name") != CAMS_OUTPUT:
        raise SlimHeatmapError("this ONNX export has no layer4 maps (an LSTM or linear head, a memory branch, or "
                               "an export older than resmemnet-onnx/3): heatmaps need torch here "
                               "(pip install 'resmemnet[torch]')")
    names = tuple(info["profiles"])
    if profile not in names:
        raise SlimHeatmapError(f"this ONNX export has no heatmap of profile {profile!r}")
    column = names.index(profile)
    batch = np.ascontiguousarray(array[None], dtype=np.float32)
    cams, table = runner.run([CAMS_OUTPUT, PROFILES_OUTPUT], batch)
    width, height = image_size
    maps = combine({"layer4": cams[:, column]}, chosen, batch, (height, width))
    score = float(table[0, runner.profile_names.index(profile)])
    return HeatmapResult(score=score, heatmap=maps[0], layers=chosen,
                         input_size=(int(array.shape[2]), int(array.shape[1])), profile=profile)
