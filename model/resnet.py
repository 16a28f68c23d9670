"""The bottleneck ResNet trunk, laid out exactly as torchvision's (same module names, shapes and
initialisation), so torchvision, hub and package state dicts load unchanged.

Why not `torchvision.models.resnet50`: importing torchvision pulls in torch._dynamo through
torchvision.ops, 1.3 s of every process's start-up, for a ~60-line module. A test checks this
one against torchvision's for every depth (keys, shapes and outputs).
"""
from __future__ import annotations

from torch import Tensor, nn

from .config import BLOCKS_PER_STAGE, STAGE_CHANNELS  # noqa: F401  (re-exported; torch-free there)
EXPANSION = 4


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (ResNet v1.5: the stride sits on the 3x3 convolution)."""

    def __init__(self, in_channels: int, width: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        out_channels = width * EXPANSION
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Stem + four bottleneck stages; `fc` is an Identity (the classifier is not used)."""

    def __init__(self, blocks_per_stage: tuple[int, ...]):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels = 64
        for index, (n_blocks, out_channels) in enumerate(zip(blocks_per_stage, STAGE_CHANNELS)):
            stride = 1 if index == 0 else 2
            width = out_channels // EXPANSION
            downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(out_channels))
            layers = [Bottleneck(in_channels, width, stride, downsample)]
            layers += [Bottleneck(out_channels, width) for _ in range(n_blocks - 1)]
            setattr(self, f"layer{index + 1}", nn.Sequential(*layers))
            in_channels = out_channels
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Identity()
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def build_resnet(depth: str) -> ResNet:
    """A randomly initialised bottleneck ResNet without its classifier."""
    if depth not in BLOCKS_PER_STAGE:
        raise ValueError(f"unknown backbone {depth!r}; choose from {sorted(BLOCKS_PER_STAGE)}")
    return ResNet(BLOCKS_PER_STAGE[depth])
