"""Shared by the training modules: the usage-error type and JSON-safe values."""
from __future__ import annotations

import numpy as np


class TrainError(RuntimeError):
    """A usage problem (bad run folder, nothing to train on): reported without a traceback."""


def to_plain(obj):
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and obj != obj:
        return None
    return obj

