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

With the memory branch (model.branch = "resmem", model/memory_branch.py) the head also reads the
branch's taps, and those depend on p_last, but only through the ImageNet logits imagenet_fc(p_last)
at the end of fc6's input (conv5 reads the image alone). So g = J W_last + the branch's part,
backpropagated exactly in the graph (no finite differences): with u = J W over the branch's taps,
d score / d h11 = u_fc11 + u_score s (1 - s) w_fc12 (s = sigmoid(fc12(h11)), the score tap), then
down fc11..fc6 each time masked by its ReLU (h > 0, autograd's subgradient 0 at 0) and carried
through its weight, adding that tap's own u (d score / d h_{i-1} = u_fc{i-1} + W_fci^T (mask_i
delta_i)); fc6's last 1000 input columns give d score / d logits, and W_imagenet^T of that is added
to g. Every activation it needs is one of the branch's taps (`forward_features` returns them).

Measured on the tests' random ResNet-152 with a random branch: 5.0e-5 at most, where leaving the
branch's part out would move the maps by 1.9e-2 to 4.9e-2.

Other heads (LSTM, linear) are not linear in p_last: their exports carry no `layer4_cams`, and
without torch /heatmap answers that it needs torch. Stages before layer4 need real
backpropagation through layer4's convolutions, which the torch-free runtime does not have: it
draws layer4 only (DEFAULT_LAYERS) and says so.
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
    return cfg.head == "readout" and cfg.branch in ("none", "resmem")


def cam_module(net, names: tuple[str, ...]):
    """A torch module (outputs (B, K), layer4 map (B, C, h, w), pooled taps [(B, C_i)]) -> raw maps
    (B, P, h, w) of the profiles `names`, traced into the export (model/export.py). None where
    supports() is False."""
    if not supports(net.cfg):
        return None
    import torch
    from torch import nn

    from .profiles import profile_score

    trunk = net.cfg.trunk_tap_channels
    first, stop = sum(trunk[:-1]), sum(trunk)  # the columns of the head's weight that read p_last

    class Layer4Cams(nn.Module):
        def __init__(self):
            super().__init__()
            self.cfg, self.names = net.cfg, names
            self.n_trunk = len(trunk)
            weight = net.head.out.weight.detach().float()
            self.register_buffer("w_last", weight[:, first:stop].clone(), persistent=False)
            # The branch's fc layers are read in place (shared with the net: one copy in the export).
            self.branch = net.branch
            if net.branch is not None:
                from .memory_branch import BRANCH_TAPS

                widths = [c for _, c in BRANCH_TAPS]
                bounds = [stop + sum(widths[:i]) for i in range(len(widths) + 1)]
                # (K, C) blocks of the head's weight over the taps fc6..fc11 and score (conv5's is not needed)
                for (name, _), lo, hi in zip(BRANCH_TAPS[1:], bounds[1:-1], bounds[2:]):
                    self.register_buffer(f"w_{name}", weight[:, lo:hi].clone(), persistent=False)

        def forward(self, outputs, fmap, pooled=None):
            k = outputs.shape[1]
            step = torch.eye(k, dtype=outputs.dtype, device=outputs.device) * FD_STEP  # (K, K)
            moved = torch.cat([outputs[None] + step[:, None, :], outputs[None] - step[:, None, :]])  # (2K, B, K)
            flat = moved.reshape(-1, k)
            table = torch.stack([profile_score(flat, self.cfg, p) for p in self.names], dim=1)  # (2K B, P)
            table = table.reshape(2, k, -1, len(self.names))
            jac = (table[0] - table[1]) / (2 * FD_STEP)  # (K, B, P): d score_p / d output_k
            grad = torch.einsum("kbp,kc->bpc", jac, self.w_last)  # (B, P, C): d score_p / d p_last, directly
            if self.branch is not None:
                grad = grad + self._through_branch(jac, pooled[self.n_trunk:])
            area = fmap.shape[2] * fmap.shape[3]
            return torch.einsum("bpc,bchw->bphw", grad, fmap.float()) / area

        def _through_branch(self, jac, taps):
            """d score_p / d p_last through the memory branch, backpropagated exactly: p_last enters
            it only as the ImageNet logits at the end of fc6's input; its taps (conv5, the ReLU
            outputs of fc6..fc11, the score = sigmoid(fc12)) are what the head reads."""
            b = self.branch
            hidden = [t.float() for t in taps[1:7]]  # fc6..fc11 outputs (B, C)
            s = taps[7].float()  # (B, 1)

            def read(name):  # (B, P, C): d score_p / d that tap, through the head
                return torch.einsum("kbp,kc->bpc", jac, getattr(self, f"w_{name}"))

            # the score tap s = sigmoid(fc12(h11)): d s / d h11 = s (1 - s) w_fc12
            delta = read("fc11") + torch.einsum("bpo,oi->bpi", read("score") * (s * (1 - s))[:, None, :],
                                                b.fc12.weight.float())
            for i in range(11, 5, -1):  # delta: d score / d h_i; into fc_i's pre-activation, then its input
                delta = delta * (hidden[i - 6] > 0).to(delta.dtype)[:, None, :]  # ReLU's subgradient 0 at 0
                weight = getattr(b, f"fc{i}").weight.float()
                if i == 6:
                    weight = weight[:, -b.imagenet_fc.out_features:]  # the logits' part of fc6's input
                delta = torch.einsum("bpo,oi->bpi", delta, weight)
                if i > 6:
                    delta = delta + read(f"fc{i - 1}")
            return torch.einsum("bpo,oi->bpi", delta, b.imagenet_fc.weight.float())  # (B, P, 2048)

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
        raise SlimHeatmapError("this ONNX export has no layer4 maps (an LSTM or linear head, or an older export: "
                               "before resmemnet-onnx/3, or of a memory branch before its maps were added): "
                               "heatmaps need torch here (pip install 'resmemnet[torch]')")
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
