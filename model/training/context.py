"""One run context: what every step of a training command needs (config, photos, model, device,
distributed state, loader, epoch budget, run folder, log), built once by `build_context`."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .config import Config
from .distributed import SINGLE, Dist, barrier
from .features import CachePart, attach_features
from .loader import ImageLoader
from .model_setup import amp_dtype, build_model, preprocessing_for, resolve_device, trunk_identity
from .pool import Pool, load_data, prepare_pool
from .state import EpochBudget


@dataclass
class RunContext:
    cfg: Config
    pool: Pool
    model: object  # model.network.ResMemNet, its head laid out by profile_fit.output_layout
    source: object  # model.trunks.TrunkSource
    preprocessing: object  # model.preprocess.Preprocessing
    device: object  # torch.device
    loader: ImageLoader
    run_dir: Path
    run_info: dict = field(default_factory=dict)
    budget: EpochBudget = field(default_factory=lambda: EpochBudget(None))
    dist: Dist = SINGLE
    log: Callable[[str], None] = print
    init_state: dict | None = None  # the model's weights and config before any run: every run starts there
    init_cfg: object = None
    memo: dict = field(default_factory=dict)  # readout fits by their inputs (readout_fit: reused, not redone)

    @property
    def amp(self):
        return amp_dtype(self.cfg, self.device)

    def reset_model(self) -> None:
        """Back to the initial weights and profiles (each CV run starts from the same model); the first
        call records them."""
        if self.init_state is None:
            self.init_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.init_cfg = self.model.cfg
        else:
            self.model.load_state_dict(self.init_state)
            self.model.set_config(self.init_cfg)


def build_context(cfg: Config, run_dir: Path, run_info: dict, *, device_name: str, resume: bool,
                  budget: EpochBudget, dist: Dist = SINGLE, log=print, write_run: bool = True) -> RunContext:
    """Photos and trunk first (a missing folder or weight file must not leave a run folder behind);
    rank 0 goes first wherever files may be written (dataset caches, split files)."""
    device = resolve_device(device_name)
    if not dist.is_main:
        barrier(dist)
    studies, teacher = load_data(cfg)
    model, source = build_model(cfg)
    if dist.is_main:
        if write_run:
            from .config import save_config

            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir)
            (run_dir / "run.json").write_text(json.dumps(run_info, indent=1) + "\n")
            workers = f", {dist.world} processes ({dist.backend})" if dist.enabled else ""
            log(f"run folder: {run_dir} ({run_info.get('mode')}, device {device}{workers})")
        pool = prepare_pool(cfg, run_dir, studies, teacher, resume=resume, log=log)
        barrier(dist)
    else:
        pool = prepare_pool(cfg, run_dir, studies, teacher, resume=True, log=log)  # rank 0's splits.json
    preprocessing = preprocessing_for(cfg, model)
    if cfg.model.head == "readout" or any(ph.cached and ph.epochs > 0 for ph in cfg.phases):
        pool.features = attach_features(
            cache_parts(cfg, pool), model=model, source_depth=source.depth,
            trunk_id=cfg.data.cache_trunk_id or trunk_identity(source, cfg), preprocessing=preprocessing,
            augmentations=cfg.data.augmentations, cache_dir=cfg.data.cache_dir,
            batch_size=cfg.train.eval_batch_size, workers=cfg.data.workers, device=device, log=log, dist=dist)
    loader = ImageLoader(pool.paths, preprocessing, cfg.data.workers)
    return RunContext(cfg, pool, model, source, preprocessing, device, loader, run_dir, run_info, budget, dist, log)


def cache_parts(cfg: Config, pool: Pool) -> list[CachePart]:
    """The feature caches of a run: one per study (named after it), then the teacher's."""
    d = cfg.data
    parts = [CachePart(s.name, s.data.paths, list(d.augmentations), s.spec.cache,
                       f"data.studies.{i}.cache") for i, s in enumerate(pool.studies)]
    if pool.teacher is not None:
        parts.append(CachePart("teacher", pool.teacher.paths, list(d.teacher_augmentations or d.augmentations),
                               d.teacher_cache, "data.teacher_cache"))
    return parts

