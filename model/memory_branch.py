"""The memorability-trained branch of the `resmem` package's model, as extra readout taps.

The `resmem` model (Needell & Bainbridge; LaMem + MemCat, about 70k human-labelled photos) is
not a memorability-trained ResNet: its ResNet-152 is a frozen ImageNet classifier whose 1,000
logits enter the head. What it learned about memorability lives in an AlexNet-style branch
(conv1..conv5, 9,216 features at 227 x 227) and the fc6..fc12 stack that reads those features
beside the logits. ResMem-Net's trunk *is* that ResNet-152, so the branch costs only its own
convolutions and matrix products (about 0.5 GMAC per image, ~6 % of the trunk at 192 px): it
takes the trunk's own input, resized to the 227 x 227 the branch was trained at, and the
ImageNet logits of the trunk's last pooled tap.

Taps (BRANCH_TAPS): conv5 pooled over its 6 x 6 map, the ReLU outputs of fc6..fc11, and the
package's own score (sigmoid of fc12), each a (B, C) float32 tensor.

Weights come from the same sha256-pinned package file as the trunk (never embedded in our
checkpoints); `load_branch_state` maps them by name.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BRANCH_TAPS = (("conv5", 256), ("fc6", 4096), ("fc7", 4096), ("fc8", 2048), ("fc9", 1024), ("fc10", 512),
               ("fc11", 256), ("score", 1))
BRANCH_INPUT = 227  # the resmem package's crop size; conv5's 6 x 6 x 256 = 9,216 features need it
FC_WIDTHS = (9216 + 1000, 4096, 4096, 2048, 1024, 512, 256, 1)


class MemoryBranch(nn.Module):
    """resmem's conv1..conv5 + fc6..fc12 and the ResNet-152's ImageNet classifier (`imagenet_fc`)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 48, 11, stride=4)
        self.conv2 = nn.Conv2d(48, 256, 5, padding=2, groups=2)
        self.conv3 = nn.Conv2d(256, 384, 3, padding=1, groups=2)
        self.conv4 = nn.Conv2d(384, 384, 3, padding=1, groups=2)
        self.conv5 = nn.Conv2d(384, 256, 3, padding=1, groups=2)
        for i, (fan_in, fan_out) in enumerate(zip(FC_WIDTHS[:-1], FC_WIDTHS[1:])):
            setattr(self, f"fc{6 + i}", nn.Linear(fan_in, fan_out))
        self.imagenet_fc = nn.Linear(2048, 1000)

    @property
    def tap_channels(self) -> list[int]:
        return [c for _, c in BRANCH_TAPS]

    def forward(self, images: torch.Tensor, last_pooled: torch.Tensor) -> list[torch.Tensor]:
        """images: (B, 3, H, W) in [0, 1] (the trunk's input); last_pooled: (B, 2048) the trunk's
        last pooled tap -> one (B, C) float32 tensor per BRANCH_TAPS entry."""
        with torch.autocast(device_type=images.device.type, enabled=False):
            x = images.float()
            if x.shape[-2:] != (BRANCH_INPUT, BRANCH_INPUT):
                x = F.interpolate(x, size=(BRANCH_INPUT, BRANCH_INPUT), mode="bilinear", align_corners=False)
            c = F.local_response_norm(F.max_pool2d(F.relu(self.conv1(x)), 3, 2), 5)
            c = F.local_response_norm(F.max_pool2d(F.relu(self.conv2(c)), 3, 2), 5)
            c = F.relu(self.conv5(F.relu(self.conv4(F.relu(self.conv3(c))))))
            c = F.max_pool2d(c, 3, 2)  # (B, 256, 6, 6)
            taps = [c.mean(dim=(2, 3))]
            h = torch.cat([c.flatten(1), self.imagenet_fc(last_pooled.float())], dim=1)
            for i in range(6, 12):
                h = F.relu(getattr(self, f"fc{i}")(h))
                taps.append(h)
            taps.append(torch.sigmoid(self.fc12(h)))
        return taps


def branch_state_from_package(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The resmem package's state dict -> MemoryBranch keys (KeyError names what is missing)."""
    out = {}
    for name in ("conv1", "conv2", "conv3", "conv4", "conv5", *(f"fc{i}" for i in range(6, 13))):
        for kind in ("weight", "bias"):
            out[f"{name}.{kind}"] = state[f"{name}.{kind}"]
    out["imagenet_fc.weight"] = state["features.fc.weight"]
    out["imagenet_fc.bias"] = state["features.fc.bias"]
    return out
