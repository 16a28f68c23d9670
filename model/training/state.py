"""What --resume needs: model tensors (safetensors), optimiser state, state.json, log.csv;
and the --stop-after epoch budget."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from .common import TrainError, to_plain

STATE_FORMAT = "resmemnet-train-state/1"
LOG_FIELDS = ("run", "epoch", "phase", "phase_epoch", "lr_min", "lr_max", "batches", "images", "train_loss",
              "labelled_mse", "teacher_mse", "val_spearman", "val_mse", "teacher_holdout_spearman", "seconds",
              "images_per_s")


def save_model_state(model, path: Path, *, head_only: bool) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
             if not k.startswith("branch.") and not (head_only and k.startswith("trunk."))}
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp))
    tmp.replace(path)


def load_model_state(model, path: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(path))
    result = model.load_state_dict(state, strict=False)
    bad = [k for k in result.missing_keys if not k.startswith(("trunk.", "branch."))] + list(result.unexpected_keys)
    if bad:
        raise TrainError(f"{path} does not fit this model (e.g. {bad[:3]})")


def save_training_state(state_dir: Path, model, optimizer, info: dict, *, head_only: bool) -> None:
    import torch

    state_dir.mkdir(parents=True, exist_ok=True)
    save_model_state(model, state_dir / "model.safetensors", head_only=head_only)
    tmp = state_dir / "optimizer.tmp"
    torch.save(optimizer.state_dict(), tmp)  # tensors, numbers and strings only: loads with weights_only
    tmp.replace(state_dir / "optimizer.pt")
    tmp = state_dir / "state.tmp"
    tmp.write_text(json.dumps(to_plain({"format": STATE_FORMAT, **info}), indent=1) + "\n")
    tmp.replace(state_dir / "state.json")  # written last: the epoch counts as done once this exists


def read_training_state(state_dir: Path) -> dict | None:
    path = state_dir / "state.json"
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TrainError(f"{path} is corrupt ({exc})") from None
    if info.get("format") != STATE_FORMAT:
        raise TrainError(f"{path} is not a training state ({STATE_FORMAT})")
    return info


class EpochBudget:
    """--stop-after: how many more epochs this invocation may run."""

    def __init__(self, limit: int | None):
        self.left = limit

    @property
    def exhausted(self) -> bool:
        return self.left is not None and self.left <= 0

    def spend(self) -> None:
        if self.left is not None:
            self.left -= 1


def write_log(path: Path, history: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=LOG_FIELDS, extrasaction="ignore")
        w.writeheader()
        for row in history:
            w.writerow({k: ("" if row.get(k) is None else (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]))
                        for k in LOG_FIELDS})
    tmp.replace(path)

