"""The training loop: one epoch (`run_epoch`) and all phases of one run with resume (`fit`)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from .common import TrainError, to_plain
from .context import RunContext
from .distributed import (all_reduce_sum, barrier, broadcast_object, broadcast_tensors, local_part, restore_batchnorm,
                          sync_batchnorm, wrap_ddp)
from .loader import ImageLoader, train_batches
from .model_setup import epoch_seed
from .pool import RunSpec
from .predict import metrics_on
from .readout_fit import fit_readout_head
from .state import load_model_state, read_training_state, save_model_state, save_training_state, write_log


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=not (enabled and sys.stderr.isatty()))


def output_columns(ctx: RunContext) -> np.ndarray:
    """Per pool photo, the head output its loss trains: its study's, or the teacher output for a
    teacher photo (the study's, without a teacher output)."""
    names, pool = ctx.model.cfg.output_names, ctx.pool
    cols = [names.index(s.name) for s in pool.studies]
    cols.append(names.index("teacher") if "teacher" in names else cols[0])
    return np.asarray(cols)[pool.study_of(np.arange(len(pool.paths)))]


def run_epoch(ctx: RunContext, phase, optimizer, scaler, spec: RunSpec, rng: np.random.Generator, amp, desc: str, *,
              step=None) -> dict:
    """One epoch over the global batches of `spec.train_idx`; under torchrun this rank runs its
    share of every batch (`local_part`) and the returned sums are over all ranks.
    `step`: the TrainStep (or its DDP wrapper) to call; built here when None."""
    import torch

    from .optim import CostAugmentedAdam, optimizer_step
    from .schedule import one_cycle_lr, set_lr
    from .step import TrainStep

    model, pool, cfg, loader, device, dist = ctx.model, ctx.pool, ctx.cfg, ctx.loader, ctx.device, ctx.dist
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
    n_batches = len(batches)  # global steps: the same count on every rank
    local = [local_part(b, dist) for b in batches]
    targets = torch.from_numpy(spec.targets.astype(np.float32))
    weights = torch.from_numpy(spec.weights)
    columns = torch.from_numpy(output_columns(ctx))
    model.train()
    if step is None:
        step = TrainStep(model, cached=phase.cached, frozen=phase.frozen, amp_dtype=amp[0],
                         channels_last=device.type == "cuda")
    sums = {"loss": 0.0, "lab": 0.0, "n_lab": 0, "teach": 0.0, "n_teach": 0, "images": 0}
    if phase.cached:
        source = ((torch.from_numpy(pool.features.rows(b, aug_of[b])), b) for b in local)
    else:
        source = _local_images(loader, batches, local, [augs[a] for a in aug_of], pin=device.type == "cuda")
    start = time.perf_counter()
    bar = _progress(n_batches, desc, cfg.train.progress and dist.is_main)
    try:
        for b, (x, idx) in enumerate(source):
            set_lr(optimizer, one_cycle_lr(b, n_batches, phase.lr_min, phase.lr_max))
            x = x.to(device, non_blocking=True)
            tidx = torch.from_numpy(np.asarray(idx, dtype=np.int64))
            outputs = step(x)  # (members, B, outputs)
            col = columns[tidx].to(device)  # teacher rows train their own output (with a teacher output)
            pred = outputs.gather(-1, col.view(1, -1, 1).expand(outputs.shape[0], -1, 1))[..., 0]
            y, w = targets[tidx].to(device), weights[tidx].to(device)
            # Every ensemble member fits the targets on its own (not their mean), so they stay diverse.
            err = (pred - y) ** 2
            weighted = (w * err).sum()
            if dist.enabled:
                # this rank's share of the global batch's mean; DDP averages the gradients over ranks
                loss = weighted * (dist.world / (err.shape[0] * len(batches[b])))
            else:
                loss = (w * err).mean()
            err = err.mean(dim=0)
            optimizer.zero_grad(set_to_none=True)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            batch_loss = loss
            if dist.enabled and isinstance(optimizer, CostAugmentedAdam):  # it steps on the global batch loss
                batch_loss = torch.tensor(all_reduce_sum([float(loss.detach())], dist, device)[0] / dist.world)
            optimizer_step(optimizer, batch_loss, scaler)
            err = err.detach().cpu().numpy()
            is_lab = np.asarray(idx) < pool.n_labelled
            sums["loss"] += float(weighted.detach()) / outputs.shape[0]
            sums["lab"] += float(err[is_lab].sum())
            sums["n_lab"] += int(is_lab.sum())
            sums["teach"] += float(err[~is_lab].sum())
            sums["n_teach"] += int((~is_lab).sum())
            sums["images"] += len(idx)
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss'] / max(sums['images'], 1):.4f}")
    finally:
        bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.enabled:
        keys = list(sums)
        sums = dict(zip(keys, all_reduce_sum([sums[k] for k in keys], dist, device).tolist()))
    seconds = time.perf_counter() - start
    return {
        "batches": n_batches, "images": int(sums["images"]),
        "train_loss": sums["loss"] / max(sums["images"], 1),
        "labelled_mse": sums["lab"] / sums["n_lab"] if sums["n_lab"] else None,
        "teacher_mse": sums["teach"] / sums["n_teach"] if sums["n_teach"] else None,
        "seconds": seconds, "images_per_s": sums["images"] / max(seconds, 1e-9),
    }


def _local_images(loader: ImageLoader, batches, local, augs, *, pin: bool):
    """(images, indices) of this rank's share of every global batch; an empty share (a global
    batch smaller than the world) is a zero-row tensor, so the rank still joins the step."""
    import torch

    it = loader.iterate([p for p in local if len(p)], augs, pin=pin)
    for whole, part in zip(batches, local):
        if len(part):
            yield next(it)
        else:
            h, w = loader.shape(int(whole[0]))
            yield torch.zeros((0, 3, h, w)), part


def fit(ctx: RunContext, spec: RunSpec) -> dict | None:
    """Train through every phase, resuming from spec.dir/state when it holds a state.
    Returns {"epoch": chosen epoch, "trunk_changed": ...}, or None when --stop-after stopped it.
    Under torchrun every rank calls this; rank 0 alone writes the state, log and TensorBoard files.
    The profiles are fitted afterwards, from the run's head outputs (predict.fit_run_profiles)."""
    changed = sync_batchnorm(ctx.model) if ctx.dist.enabled else []
    try:
        return _fit(ctx, spec)
    finally:
        restore_batchnorm(changed)


def _fit(ctx: RunContext, spec: RunSpec) -> dict | None:
    import torch

    from .optim import build_optimizer
    from .step import TrainStep

    cfg, model, pool, device, budget, dist, log = ctx.cfg, ctx.model, ctx.pool, ctx.device, ctx.budget, ctx.dist, ctx.log

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
        # closed form, about a minute on one process: rank 0 fits, the others receive the weights
        readout, rows = fit_readout_head(ctx, spec) if dist.is_main else (None, None)
        broadcast_tensors([model.head.out.weight, model.head.out.bias], dist)
        readout = broadcast_object(readout, dist)
        model.eval()
        return {"epoch": 0, "trunk_changed": False, "history": history, "best": None, "readout": readout,
                "rows": rows}
    schedule = [(p, e) for p, ph in enumerate(cfg.phases) for e in range(ph.epochs)]
    writer = _tensorboard(spec.dir) if dist.is_main else None
    optimizer = scaler = step = None
    current = None
    for epoch, (p, e) in enumerate(schedule):
        if epoch < done:
            continue
        if budget.exhausted:
            return None
        phase = cfg.phases[p]
        amp = ctx.amp if not phase.cached else (None, False)
        if current != p:
            model.set_trunk_frozen(phase.frozen)
            optimizer = build_optimizer(model.parameters(), cfg.optimizer, phase.lr_min)
            scaler = torch.amp.GradScaler("cuda") if (amp[1] and not phase.frozen) else None
            step = TrainStep(model, cached=phase.cached, frozen=phase.frozen, amp_dtype=amp[0],
                             channels_last=device.type == "cuda")
            if dist.enabled:  # rebuilt per phase: the trainable parameters change with phase.frozen
                step = wrap_ddp(step, dist, device)
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
        # batches come from `rng` (the same on every rank); dropout draws differ per rank
        torch.manual_seed((epoch_seed(cfg.train.seed, spec.name, epoch) + dist.rank) % (2 ** 63))
        rng = np.random.default_rng(epoch_seed(cfg.train.seed, spec.name, epoch))
        desc = f"{spec.name} {phase.name} {e + 1}/{phase.epochs}"
        threads = torch.get_num_threads()
        if phase.cached and device.type == "cpu":
            torch.set_num_threads(1)  # the head's ops are tiny: extra threads only add synchronisation stalls
        try:
            row = run_epoch(ctx, phase, optimizer, scaler, spec, rng, amp, desc, step=step)
        finally:
            torch.set_num_threads(threads)
        trunk_changed = trunk_changed or not phase.frozen
        truth = pool.truth
        val = metrics_on(ctx, spec.val_idx, truth[spec.val_idx], trunk_changed)
        hold = {}
        if len(spec.holdout_idx) > 1 and pool.features is not None and not trunk_changed:
            hold = metrics_on(ctx, spec.holdout_idx, truth[spec.holdout_idx], trunk_changed)
        row = {"run": spec.name, "epoch": epoch + 1, "phase": phase.name, "phase_epoch": e + 1,
               "lr_min": phase.lr_min, "lr_max": phase.lr_max, **row,
               "val_spearman": val.get("spearman"), "val_mse": val.get("mse"),
               "teacher_holdout_spearman": hold.get("spearman")}
        row = to_plain(row)  # NaN -> None, as it reads back from state.json
        history.append(row)
        val_score = val.get("spearman", float("nan"))
        val_score = -1.0 if val_score != val_score else val_score  # constant predictions (NaN rho) rank last
        if val and (best is None or val_score > best["val_spearman"]):
            best = {"epoch": epoch + 1, "val_spearman": val_score}
            if cfg.train.select == "best_val" and dist.is_main:
                (state_dir).mkdir(parents=True, exist_ok=True)
                save_model_state(model, state_dir / "best.safetensors", head_only=head_only)
        if dist.is_main:  # every rank holds the same weights and optimiser state
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
        barrier(dist)  # rank 0 wrote it
        load_model_state(model, state_dir / "best.safetensors")
        chosen = best["epoch"]
        log(f"{spec.name}: using epoch {chosen} (best inner-validation rho {best['val_spearman']:.4f})")
    model.eval()
    return {"epoch": chosen, "trunk_changed": trunk_changed, "history": history, "best": best}


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

