"""One training forward pass as a module, so DistributedDataParallel can wrap it.

The loop calls the network through `TrainStep` (directly, or through DDP under torchrun): cached
phases run the head on cached pooled features, image phases the trunk (in autocast, without
gradients while frozen) and then the head in fp32.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn


class TrainStep(nn.Module):
    """(B, D) cached features or (B, 3, H, W) images -> (members, B, outputs) head outputs."""

    def __init__(self, model, *, cached: bool, frozen: bool, amp_dtype=None, channels_last: bool = False):
        super().__init__()
        self.model = model
        self.cached = cached
        self.frozen = frozen
        self.amp_dtype = amp_dtype
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model = self.model
        if self.cached:
            pooled = model.head.split_flat(x)
        else:
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            grad = torch.no_grad() if self.frozen else nullcontext()
            autocast = torch.autocast("cuda", dtype=self.amp_dtype) if self.amp_dtype is not None else nullcontext()
            with grad, autocast:
                pooled = model.forward_features(x)
            pooled = [p.float() for p in pooled]
        return model.head.member_outputs(pooled)  # the head runs in fp32
