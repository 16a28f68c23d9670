"""Score profiles: named ways of turning a head's output columns into one score per photo.

A head has named output columns (`output_names`): a readout trained on several studies has one
per study (e.g. "lnsim", "cdm"), optionally "shared" (fitted to every study's rows on a common
scale), "teacher", and the domain columns "domain.<study>" ... "domain.teacher" (a multi-class
ridge classifier: which study, or the teacher's photos, a photo looks like). A profile is data
(`ProfileSpec`, stored in the checkpoint's architecture metadata), of one of three kinds:

- ``blend``: raw = scale * sum_i weights[i] * outputs[:, inputs[i]] + shift (a study's profile:
  its calibrated blend with the teacher output, on the common score scale; or `general`);
- ``mixture``: raw = sum_j a_j * raw_j over the blend profiles named in `inputs`, the weights a_j
  from the domain columns named in `gate_inputs`:
  - gate ``softmax``: a = softmax(d[:, gate_inputs] / temperature) (every component has a column);
  - gate ``sigmoid``: s_j = sigmoid((d_j - centers[j]) / widths[j]) for the components with a
    column, a_j = s_j / max(1, sum_k s_k); the one component without a column (gate input "")
    takes the rest, 1 - sum_j a_j;
  with `offsets` (one per component), raw = sum_j a_j * (raw_j + offsets[j]): the components' level
  alignment (a study's labels rank photos within that study, not against other kinds of photo);
- ``alias``: the profile named inputs[0] (e.g. `outdoor` for `lnsim`).

The score is soft_clamp(raw): the identity on [0.1, 0.9] with strictly increasing tails into
(0, 1). Every profile is element-wise operations on the (B, n_outputs) outputs, so a head and all
its profiles stay one matrix product plus element-wise operations (what the ONNX export traces).

Checkpoints written before named outputs have none in their metadata: their layout is
"labelled", ["teacher"], ["domain"] and their profiles default / general / outdoor are derived
from the architecture's score_blend, score_scale, score_shift and gate fields (`legacy_profiles`),
so they score exactly as they always did.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the profiles' names and checks need no torch; only scoring with them does
    import torch

PROFILE_KINDS = ("blend", "mixture", "alias")
GATES = ("softmax", "sigmoid")
LEGACY_OUTPUTS = ("labelled", "teacher", "domain")
LEGACY_PROFILES = ("default", "general", "outdoor")
SCORE_KNEES = (0.1, 0.9)


def soft_clamp(score: torch.Tensor, lo: float = SCORE_KNEES[0], hi: float = SCORE_KNEES[1]) -> torch.Tensor:
    """Identity on [lo, hi]; beyond, tails u / (1 + u) that approach 0 and 1 with slope 1 at the
    knees. Strictly increasing and smooth, so it keeps every ranking and gradient: a hard clamp
    tied every photo past a bound (it cost 0.012 of agreement with the teacher on pool photos)
    and gave them empty heatmaps. Rational rather than tanh tails: they decay slowly enough that
    float32 still separates scores far past a knee."""
    import torch

    up = ((score - hi) / (1.0 - hi)).clamp(min=0)  # clamped: the branch torch.where drops stays finite
    down = ((lo - score) / lo).clamp(min=0)
    upper = hi + (1.0 - hi) * up / (1.0 + up)
    lower = lo - lo * down / (1.0 + down)
    return torch.where(score > hi, upper, torch.where(score < lo, lower, score))


@dataclass(frozen=True)
class ProfileSpec:
    """One score profile (see the module docstring for the formulas of each kind)."""

    name: str
    kind: str = "blend"  # blend | mixture | alias
    inputs: tuple[str, ...] = ()  # blend: output columns; mixture: component profiles; alias: (target,)
    weights: tuple[float, ...] = ()  # blend: one per input
    scale: float = 1.0  # blend: the calibration onto the common score scale (scale > 0 keeps the ranking)
    shift: float = 0.0
    gate: str = "softmax"  # mixture: softmax | sigmoid
    gate_inputs: tuple[str, ...] = ()  # mixture: the domain column of each component ("" = takes the rest)
    temperature: float = 1.0  # softmax gate
    centers: tuple[float, ...] = ()  # sigmoid gate: one per component (ignored for the one without a column)
    widths: tuple[float, ...] = ()
    offsets: tuple[float, ...] = ()  # mixture: added to each component's raw score before mixing (() = none)
    description: str = ""  # what it is for, in a sentence (listed by `resmemnet info`)

    def __post_init__(self):
        for name in ("inputs", "weights", "gate_inputs", "centers", "widths", "offsets"):  # lists from JSON -> tuples
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("weights", "offsets"):
            object.__setattr__(self, name, tuple(float(w) for w in getattr(self, name)))

    def to_dict(self) -> dict:
        out = asdict(self)
        if not out["offsets"]:  # what profiles had before offsets, unchanged
            del out["offsets"]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "ProfileSpec":
        if isinstance(data, ProfileSpec):
            return data
        known = {k: v for k, v in dict(data).items() if k in cls.__dataclass_fields__}
        return cls(**known)


def check_specs(outputs: tuple[str, ...], profiles: tuple[ProfileSpec, ...]) -> None:
    """ValueError unless `profiles` are computable from `outputs`: unique names, one `default`,
    blends over existing columns, mixtures over blends with domain columns, aliases of a blend
    or mixture."""
    if len(set(outputs)) != len(outputs):
        raise ValueError(f"output names must be unique, got {list(outputs)}")
    names = [p.name for p in profiles]
    if len(set(names)) != len(names):
        raise ValueError(f"profile names must be unique, got {names}")
    if "default" not in names:
        raise ValueError(f"a model needs a 'default' profile (has {names})")
    by_name = {p.name: p for p in profiles}
    for p in profiles:
        where = f"profile {p.name!r}"
        if not p.name or not isinstance(p.name, str):
            raise ValueError("a profile needs a name")
        if p.kind not in PROFILE_KINDS:
            raise ValueError(f"{where}: kind {p.kind!r} is not one of {', '.join(PROFILE_KINDS)}")
        if p.kind == "blend":
            if not p.inputs or len(p.weights) != len(p.inputs):
                raise ValueError(f"{where}: a blend needs one weight per input column")
            missing = [c for c in p.inputs if c not in outputs]
            if missing:
                raise ValueError(f"{where}: no output column {missing[0]!r} (the head has {', '.join(outputs)})")
            if not p.scale > 0:
                raise ValueError(f"{where}: scale must be positive (it keeps the ranking), got {p.scale}")
        elif p.kind == "alias":
            target = by_name.get(p.inputs[0]) if len(p.inputs) == 1 else None
            if target is None or target.kind == "alias":
                raise ValueError(f"{where}: an alias names one blend or mixture profile, got {list(p.inputs)}")
        else:
            _check_mixture(p, outputs, by_name)


def _check_mixture(p: ProfileSpec, outputs, by_name) -> None:
    where = f"profile {p.name!r}"
    if len(p.inputs) < 2 or len(p.gate_inputs) != len(p.inputs):
        raise ValueError(f"{where}: a mixture names two or more component profiles and one gate column each")
    for c in p.inputs:
        comp = resolve(by_name, c)
        if comp is None or comp.kind != "blend":
            raise ValueError(f"{where}: component {c!r} is not a blend profile of this model")
    gated = [g for g in p.gate_inputs if g]
    missing = [g for g in gated if g not in outputs]
    if missing:
        raise ValueError(f"{where}: no domain column {missing[0]!r} (the head has {', '.join(outputs)})")
    if p.offsets and (len(p.offsets) != len(p.inputs) or not all(math.isfinite(o) for o in p.offsets)):
        raise ValueError(f"{where}: offsets must be one finite number per component, got {list(p.offsets)}")
    if p.gate not in GATES:
        raise ValueError(f"{where}: gate {p.gate!r} is not one of {', '.join(GATES)}")
    if p.gate == "softmax":
        if len(gated) != len(p.inputs):
            raise ValueError(f"{where}: a softmax gate needs a domain column for every component")
        if not p.temperature > 0:
            raise ValueError(f"{where}: temperature must be positive, got {p.temperature}")
    else:
        if len(gated) != len(p.inputs) - 1:
            raise ValueError(f"{where}: a sigmoid gate leaves exactly one component without a column (it takes "
                             "the rest)")
        if len(p.centers) != len(p.inputs) or len(p.widths) != len(p.inputs):
            raise ValueError(f"{where}: a sigmoid gate needs one centre and one width per component")
        if any(not w > 0 for g, w in zip(p.gate_inputs, p.widths) if g):
            raise ValueError(f"{where}: gate widths must be positive, got {list(p.widths)}")


def resolve(by_name: dict, name: str) -> ProfileSpec | None:
    """The profile `name` names, through one alias; None if there is none."""
    p = by_name.get(name)
    if p is not None and p.kind == "alias":
        p = by_name.get(p.inputs[0])
    return p


# -- a model config's outputs and profiles -------------------------------------------------------

def output_names(cfg) -> tuple[str, ...]:
    """The head's output columns, in order (the legacy layout's when the config names none)."""
    if cfg.outputs:
        return tuple(cfg.outputs)
    return LEGACY_OUTPUTS[:1 + int(cfg.teacher_output) + int(cfg.domain_gate)]


def legacy_profiles(cfg) -> tuple[ProfileSpec, ...]:
    """The profiles of a config without named outputs: default (the checkpoint's score), and with a
    teacher output `general` (the teacher output alone) and `outdoor` (the calibrated blend of the
    labelled and teacher outputs, without the domain gate)."""
    if not cfg.teacher_output:
        return (ProfileSpec("default", inputs=("labelled",), weights=(1.0,), scale=cfg.score_scale,
                            shift=cfg.score_shift),)
    b = cfg.score_blend
    outdoor = ProfileSpec("outdoor", inputs=("labelled", "teacher"), weights=(b, 1.0 - b), scale=cfg.score_scale,
                          shift=cfg.score_shift, description="the calibrated blend, for photos like the labelled set")
    general = ProfileSpec("general", inputs=("teacher",), weights=(1.0,),
                          description="the teacher output alone, for photos unlike the labelled set")
    if cfg.domain_gate:
        default = ProfileSpec("default", kind="mixture", gate="sigmoid", inputs=("outdoor", "general"),
                              gate_inputs=("domain", ""), centers=(cfg.gate_center, 0.0),
                              widths=(cfg.gate_width, 1.0),
                              description="outdoor for photos the domain output finds like the labelled set, "
                                          "general for the rest")
    else:
        default = ProfileSpec("default", inputs=outdoor.inputs, weights=outdoor.weights, scale=outdoor.scale,
                              shift=outdoor.shift, description=outdoor.description)
    return default, general, outdoor


def profile_specs(cfg) -> tuple[ProfileSpec, ...]:
    """Every profile of a model config, `default` first."""
    specs = tuple(cfg.profiles) if cfg.profiles else legacy_profiles(cfg)
    return tuple(sorted(specs, key=lambda p: p.name != "default"))


def profile_names(cfg) -> tuple[str, ...]:
    return tuple(p.name for p in profile_specs(cfg))


def check_profile(cfg, profile: str) -> str:
    """`profile`, or model.errors.InputError (a ValueError) naming the profiles a model with this config has."""
    names = profile_names(cfg)
    if profile not in names:
        from .errors import InputError

        shown = profile if len(str(profile)) <= 40 else f"{str(profile)[:40]}..."  # echo no huge values
        raise InputError(f"unknown profile {shown!r}; this model has {', '.join(names)}")
    return profile


# -- scoring ---------------------------------------------------------------------------------------

def _column(outputs: torch.Tensor, names: tuple[str, ...], name: str) -> torch.Tensor:
    return outputs[:, names.index(name)]


def raw_score(outputs: torch.Tensor, cfg, profile: str = "default") -> torch.Tensor:
    """(B, n_outputs) -> (B,) score of `profile` before soft_clamp (what a mixture mixes)."""
    names = output_names(cfg)
    by_name = {p.name: p for p in profile_specs(cfg)}
    check_profile(cfg, profile)
    p = resolve(by_name, profile)
    if p.kind == "blend":
        return _blend(outputs, names, p)
    total = None
    offsets = p.offsets or (0.0,) * len(p.inputs)
    for a, c, o in zip(mixture_weights(outputs, names, p), p.inputs, offsets):
        raw = _blend(outputs, names, resolve(by_name, c))
        term = a * (raw + o if o else raw)
        total = term if total is None else total + term
    return total


def _blend(outputs: torch.Tensor, names: tuple[str, ...], p: ProfileSpec) -> torch.Tensor:
    acc = None
    for column, w in zip(p.inputs, p.weights):
        term = w * _column(outputs, names, column)
        acc = term if acc is None else acc + term
    return p.scale * acc + p.shift


def mixture_weights(outputs: torch.Tensor, names: tuple[str, ...], p: ProfileSpec) -> list[torch.Tensor]:
    """(B,) weight of each component of mixture `p`, in the order of p.inputs; they sum to 1."""
    import torch

    if p.gate == "softmax":
        d = torch.stack([_column(outputs, names, g) for g in p.gate_inputs], dim=1)
        return list(torch.softmax(d / p.temperature, dim=1).unbind(dim=1))
    s = {j: torch.sigmoid((_column(outputs, names, g) - c) / w)
         for j, (g, c, w) in enumerate(zip(p.gate_inputs, p.centers, p.widths)) if g}
    total = None
    for v in s.values():
        total = v if total is None else total + v
    norm = total.clamp(min=1.0)  # above 1 the studies share the photo; below, the rest goes to the fallback
    weights = {j: v / norm for j, v in s.items()}
    rest = None
    for v in weights.values():
        rest = 1.0 - v if rest is None else rest - v
    rest = rest.clamp(min=0.0)  # the studies' shares sum to at most 1; rounding must not make this negative
    return [weights.get(j, rest) for j in range(len(p.inputs))]


def profile_score(outputs: torch.Tensor, cfg, profile: str = "default") -> torch.Tensor:
    """(B, n_outputs) head outputs -> (B,) scores of one profile in (0, 1); ValueError for a
    profile this model has not got."""
    return soft_clamp(raw_score(outputs, cfg, profile))


def profile_scores(outputs: torch.Tensor, cfg) -> torch.Tensor:
    """(B, n_outputs) -> (B, P) scores, one column per profile in profile_names(cfg) order."""
    import torch

    return torch.stack([profile_score(outputs, cfg, p) for p in profile_names(cfg)], dim=1)
