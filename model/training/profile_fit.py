"""The head's named output columns for a config, and its score profiles fitted from head outputs
(model/profiles.py has the formulas; this module chooses their numbers).

Outputs: one per study (named after it), "shared" (model.shared_output), "teacher"
(model.teacher_output), then with model.domain_gate the domain columns "domain.<study>" ...
"domain.teacher". Profiles:

- one per study trained in the run: blend x its output + (1 - blend) x the teacher output, then
  the least-squares affine map onto its training photos' common-scale targets (scale > 0 keeps
  the ranking: the teacher output brings the teacher's scale along);
- `general`: the teacher output alone (profiles.general = "teacher"), or the shared output
  blended with the teacher output and calibrated on every trained study's photos ("shared");
- `default`: with a domain output, a gated mixture of the study profiles and `general`
  (profiles.gate sigmoid: model.gate_center / model.gate_width per study column, general taking
  the rest; softmax: over the studies' and the teacher's columns at profiles.temperature); without
  one, the scale study's profile. profiles.route limits the sigmoid gates to the studies it names
  (the others' photos get `general`);
- aliases (profiles.aliases, e.g. outdoor = lnsim) whose target exists.

Every number here is fitted from head outputs alone, so a saved head_outputs.csv re-scores any
blend or gate setting without refitting the head (research/gate_sweep.py).
"""
from __future__ import annotations

import numpy as np

from ..profiles import ProfileSpec
from .config import Config


def output_layout(cfg: Config) -> tuple[str, ...]:
    names = [s.name for s in cfg.data.studies]
    out = list(names)
    if cfg.model.shared_output:
        out.append("shared")
    if cfg.model.teacher_output:
        out.append("teacher")
    if cfg.model.domain_gate:
        out += [f"domain.{n}" for n in names] + ["domain.teacher"]
    return tuple(out)


def affine_fit(pred, y) -> tuple[float, float]:
    """Least-squares (scale, shift) of y on pred; scale 0 when pred is constant."""
    pred, y = np.asarray(pred, dtype=np.float64), np.asarray(y, dtype=np.float64)
    var = float(np.var(pred))
    scale = float(np.cov(pred, y, bias=True)[0, 1] / var) if var > 1e-12 else 0.0
    return scale, float(y.mean() - scale * pred.mean())


def study_blend(cfg: Config, study: str) -> float:
    own = cfg.data.study(study).blend
    return own if own >= 0 else cfg.model.score_blend


def _calibrated(name: str, inputs, weights, layout, train, log, description: str) -> ProfileSpec:
    """A blend profile; its affine calibration fitted on `train` ((outputs, targets) or None)."""
    scale, shift = 1.0, 0.0
    if train is not None and len(train[1]) >= 2:
        out, y = train
        raw = sum(w * out[:, layout.index(c)] for c, w in zip(inputs, weights))
        a, b = affine_fit(raw, y)
        if a > 0:
            scale, shift = a, b
        elif log is not None:
            log(f"profile {name}: calibration skipped (training scores do not rise with the blend)")
    return ProfileSpec(name, inputs=tuple(inputs), weights=tuple(float(w) for w in weights), scale=scale,
                       shift=shift, description=description)


def fit_profiles(cfg: Config, layout: tuple[str, ...], train: dict, *, blends: dict | None = None,
                 gate: dict | None = None, log=None, chosen_blends: dict | None = None, platt: dict | None = None,
                 align_outputs: np.ndarray | None = None) -> tuple[ProfileSpec, ...]:
    """The profiles of a run from its head outputs. `train`: study -> (outputs (n, k) of its
    training photos, their common-scale calibration targets (n,)), or None for no calibration, for
    every study trained in the run (in config order). `blends` (study -> blend) and `gate` (keys of
    [profiles], model.gate_center / gate_width) override the config's, for re-scoring.
    What the readout fit chose from the training photos: `chosen_blends` (study -> blend, studies
    with blend_cv), `platt` (study -> (centre, width), profiles.gate = "platt"); `align_outputs`:
    head outputs (n, k) of the teacher's training photos (profiles.align = "teacher")."""
    blends, gate = {**(chosen_blends or {}), **(blends or {})}, gate or {}
    teacher = "teacher" in layout
    profiles = []
    for study, data in train.items():
        b = blends.get(study, study_blend(cfg, study))
        inputs, weights = ((study, "teacher"), (b, 1.0 - b)) if teacher else ((study,), (1.0,))
        profiles.append(_calibrated(study, inputs, weights, layout, data, log,
                                    f"photos like {study}'s: its output blended with the teacher output"
                                    if teacher else f"photos like {study}'s"))
    general = _general(cfg, layout, train, gate, log)
    if general is not None:
        profiles.append(general)
    default = _default(cfg, layout, list(train), general is not None, gate, platt or {})
    if default.kind == "mixture" and gate.get("align", cfg.profiles.align) == "teacher":
        default = _aligned(cfg, default, profiles + [general], layout, align_outputs, list(train), log)
    profiles.append(default)
    names = {p.name for p in profiles}
    for item in cfg.profiles.aliases:
        alias, _, target = item.partition("=")
        if target in names and alias not in names:
            profiles.append(ProfileSpec(alias, kind="alias", inputs=(target,), description=f"another name of {target}"))
    return tuple(profiles)


def _general(cfg: Config, layout, train: dict, gate: dict, log) -> ProfileSpec | None:
    what = "for photos unlike every study"
    if gate.get("general", cfg.profiles.general) == "shared" and "shared" in layout:
        b = gate.get("general_blend", cfg.profiles.general_blend)
        pooled = [d for s, d in train.items() if d is not None and cfg.data.study(s).shared]
        data = (np.concatenate([d[0] for d in pooled]), np.concatenate([d[1] for d in pooled])) if pooled else None
        inputs, weights = (("shared", "teacher"), (b, 1.0 - b)) if "teacher" in layout else (("shared",), (1.0,))
        return _calibrated("general", inputs, weights, layout, data, log, f"{what}: the shared output and the teacher's")
    if "teacher" in layout:
        return ProfileSpec("general", inputs=("teacher",), weights=(1.0,), description=f"{what}: the teacher output")
    return None


def _aligned(cfg: Config, default: ProfileSpec, components: list[ProfileSpec], layout, outputs, studies, log
             ) -> ProfileSpec:
    """`default` with level offsets: component s gets m_scale - m_s, general m_scale, where
    m_s = mean(raw_s - raw_general) over the teacher's training photos (`outputs`) and m_scale is
    the scale study's m (the first trained study's when it is left out). raw_s - m_s + m_scale:
    photos like the scale study's keep its profile's scores; others are compared on one level."""
    from dataclasses import replace

    if outputs is None or len(outputs) == 0:  # e.g. the untrained model's profiles: nothing to align on yet
        return default
    by_name = {p.name: p for p in components}

    def raw(name):
        p = by_name[name]
        return p.scale * sum(w * outputs[:, layout.index(c)].astype(np.float64) for c, w in zip(p.inputs, p.weights)) \
            + p.shift

    general = raw("general")
    m = {s: float(np.mean(raw(s) - general)) for s in default.inputs if s != "general"}
    scale_study = cfg.data.scale_study if cfg.data.scale_study in m else next(s for s in studies if s in m)
    offsets = tuple(m[scale_study] - m[s] if s != "general" else m[scale_study] for s in default.inputs)
    if log is not None:
        log("default profile: level offsets " + ", ".join(f"{s} {o:+.4f}" for s, o in zip(default.inputs, offsets))
            + " (m_s = mean(profile - general) over the teacher's training photos: "
            + ", ".join(f"{s} {v:.4f}" for s, v in m.items()) + ")")
    return replace(default, offsets=offsets)


def _default(cfg: Config, layout, studies: list[str], has_general: bool, gate: dict, platt: dict) -> ProfileSpec:
    kind = gate.get("gate", cfg.profiles.gate)
    if not (has_general and "domain.teacher" in layout and kind != "none"):
        first = cfg.data.scale_study if cfg.data.scale_study in studies else studies[0]
        return ProfileSpec("default", kind="alias", inputs=(first,), description=f"the {first} profile")
    route = gate.get("route", cfg.profiles.route)
    studies = [s for s in studies if not route or s in route]
    if not studies:  # e.g. leave-one-study-out without the only routed study
        return ProfileSpec("default", kind="alias", inputs=("general",), description="the general profile")
    inputs = (*studies, "general")
    if kind == "softmax":
        return ProfileSpec("default", kind="mixture", gate="softmax", inputs=inputs,
                           gate_inputs=(*(f"domain.{s}" for s in studies), "domain.teacher"),
                           temperature=gate.get("temperature", cfg.profiles.temperature),
                           description="each study's profile where the domain output says the photo is like its "
                                       "photos, general elsewhere")
    c, w = gate.get("gate_center", cfg.model.gate_center), gate.get("gate_width", cfg.model.gate_width)
    # platt: each study's own centre and width, fitted by the readout fit (before it, e.g. the
    # untrained model's profiles, the config's centre and width)
    fitted = platt if kind == "platt" else {}
    centers = tuple(fitted[s][0] if s in fitted else c for s in studies)
    widths = tuple(fitted[s][1] if s in fitted else w for s in studies)
    plural = "s" if len(studies) > 1 else ""
    which = f"the {', '.join(studies)} profile{plural}" if route else "each study's profile"
    return ProfileSpec("default", kind="mixture", gate="sigmoid", inputs=inputs,
                       gate_inputs=(*(f"domain.{s}" for s in studies), ""),
                       centers=(*centers, 0.0), widths=(*widths, 1.0),
                       description=f"{which} where the domain output says the photo is like its study's photos, "
                                   "general elsewhere")
