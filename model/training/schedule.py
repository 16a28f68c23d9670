"""The paper's one-cycle learning rate, repeated in every epoch (Smith 2018, as ResMem-Net uses it).

Each epoch is split into two halves of batches: the rate starts at the lower bound, rises linearly
to reach the upper bound after the first half (the first batch of the second half runs at the
upper bound), then falls linearly so that it is back at the lower bound when the next epoch
starts. With 100 batches: batch 0 at lr_min, batch 50 at lr_max, batch 99 one step above lr_min.
"""
from __future__ import annotations

import math


def one_cycle_lr(batch: int, batches_per_epoch: int, lr_min: float, lr_max: float) -> float:
    """Learning rate for batch `batch` (0-based, within its epoch) of an epoch of `batches_per_epoch`."""
    if batches_per_epoch < 1:
        raise ValueError("an epoch needs at least one batch")
    if not 0 <= batch < batches_per_epoch:
        raise ValueError(f"batch {batch} is outside an epoch of {batches_per_epoch} batches")
    rise = math.ceil(batches_per_epoch / 2)  # batches 0 .. rise-1 climb; batch `rise` is the peak
    fall = batches_per_epoch - rise
    if batch <= rise:
        frac = batch / rise
    else:
        frac = (batches_per_epoch - batch) / fall
    return lr_min + (lr_max - lr_min) * frac


def epoch_lrs(batches_per_epoch: int, lr_min: float, lr_max: float) -> list[float]:
    return [one_cycle_lr(b, batches_per_epoch, lr_min, lr_max) for b in range(batches_per_epoch)]


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
