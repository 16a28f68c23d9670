"""Score profiles as data (model/profiles.py): the formulas of each kind, their checks, their
round trip through checkpoint metadata, and checkpoints without named outputs (the shipped one)
scoring exactly as before profiles were data."""
from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from model.network import ResMemNetConfig, soft_clamp
from model.profiles import (ProfileSpec, check_specs, legacy_profiles, mixture_weights, profile_names, profile_score,
                            profile_scores, raw_score)

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "weights" / "resmemnet-default.json"
OUTPUTS = ("lnsim", "cdm", "teacher", "domain.lnsim", "domain.cdm", "domain.teacher")


def legacy_formula(outputs: torch.Tensor, cfg: ResMemNetConfig) -> torch.Tensor:
    """The default score as written out before profiles were data (kept here as the reference)."""
    if outputs.shape[1] == 1:
        score = outputs[:, 0]
    else:
        score = cfg.score_blend * outputs[:, 0] + (1.0 - cfg.score_blend) * outputs[:, 1]
    score = cfg.score_scale * score + cfg.score_shift
    if cfg.domain_gate:
        g = torch.sigmoid((outputs[:, 2] - cfg.gate_center) / cfg.gate_width)
        score = g * score + (1.0 - g) * outputs[:, 1]
    return soft_clamp(score)


@pytest.mark.parametrize("fields", [
    {}, {"teacher_output": True, "score_blend": 0.6, "score_scale": 1.3, "score_shift": -0.1},
    {"head": "readout", "teacher_output": True, "score_blend": 0.7, "domain_gate": True, "gate_center": 0.2,
     "gate_width": 0.3, "score_scale": 1.328, "score_shift": -0.132},
])
def test_a_config_without_named_outputs_scores_as_before(fields):
    cfg = ResMemNetConfig(**fields)
    outputs = torch.rand(64, cfg.n_outputs) * 1.4 - 0.2
    assert torch.equal(profile_score(outputs, cfg), legacy_formula(outputs, cfg))  # bit for bit
    if cfg.teacher_output:
        assert profile_names(cfg) == ("default", "general", "outdoor")
        assert torch.equal(profile_score(outputs, cfg, "general"), soft_clamp(outputs[:, 1]))
        assert torch.equal(profile_score(outputs, cfg, "outdoor"), legacy_formula(outputs, replace(cfg, domain_gate=False)))
    else:
        assert profile_names(cfg) == ("default",)


def specs(gate: str = "sigmoid") -> tuple[ProfileSpec, ...]:
    studies = (ProfileSpec("lnsim", inputs=("lnsim", "teacher"), weights=(0.7, 0.3), scale=1.2, shift=-0.1),
               ProfileSpec("cdm", inputs=("cdm", "teacher"), weights=(0.5, 0.5), scale=2.0, shift=-0.6),
               ProfileSpec("general", inputs=("teacher",), weights=(1.0,)),
               ProfileSpec("outdoor", kind="alias", inputs=("lnsim",)))
    if gate == "sigmoid":
        default = ProfileSpec("default", kind="mixture", gate="sigmoid", inputs=("lnsim", "cdm", "general"),
                              gate_inputs=("domain.lnsim", "domain.cdm", ""), centers=(0.5, 0.4, 0.0),
                              widths=(0.1, 0.2, 1.0))
    else:
        default = ProfileSpec("default", kind="mixture", gate="softmax", inputs=("lnsim", "cdm", "general"),
                              gate_inputs=("domain.lnsim", "domain.cdm", "domain.teacher"), temperature=0.1)
    return (*studies, default)


@pytest.mark.parametrize("gate", ["sigmoid", "softmax"])
def test_mixture_weights_and_scores(gate):
    cfg = ResMemNetConfig(head="readout", teacher_output=True, outputs=OUTPUTS, profiles=specs(gate))
    out = torch.rand(32, len(OUTPUTS))
    names = cfg.output_names
    p = next(s for s in cfg.profiles if s.name == "default")
    w = torch.stack(mixture_weights(out, names, p), dim=1)
    assert (w >= 0).all() and torch.allclose(w.sum(dim=1), torch.ones(32))
    d = out[:, 3:5]
    if gate == "softmax":
        torch.testing.assert_close(w, torch.softmax(out[:, 3:6] / 0.1, dim=1))
    else:
        s = torch.sigmoid((d - torch.tensor([0.5, 0.4])) / torch.tensor([0.1, 0.2]))
        torch.testing.assert_close(w[:, :2], s / s.sum(dim=1, keepdim=True).clamp(min=1.0))
    lnsim = 1.2 * (0.7 * out[:, 0] + 0.3 * out[:, 2]) - 0.1
    cdm = 2.0 * (0.5 * out[:, 1] + 0.5 * out[:, 2]) - 0.6
    expected = soft_clamp(w[:, 0] * lnsim + w[:, 1] * cdm + w[:, 2] * out[:, 2])
    torch.testing.assert_close(profile_score(out, cfg), expected)
    torch.testing.assert_close(raw_score(out, cfg, "cdm"), cdm)
    assert torch.equal(profile_score(out, cfg, "outdoor"), profile_score(out, cfg, "lnsim"))
    table = profile_scores(out, cfg)
    assert profile_names(cfg) == ("default", "lnsim", "cdm", "general", "outdoor") and table.shape == (32, 5)


def test_profiles_round_trip_through_metadata():
    cfg = ResMemNetConfig(head="readout", teacher_output=True, outputs=OUTPUTS, profiles=specs("softmax"))
    again = ResMemNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and isinstance(again.profiles[0], ProfileSpec) and again.outputs == OUTPUTS


@pytest.mark.parametrize("change, message", [
    (lambda s: s[:-1], "needs a 'default' profile"),
    (lambda s: (*s, s[0]), "profile names must be unique"),
    (lambda s: (replace(s[0], inputs=("lnsim", "places")),) + s[1:], "no output column 'places'"),
    (lambda s: (replace(s[0], weights=(1.0,)),) + s[1:], "one weight per input column"),
    (lambda s: (replace(s[0], scale=-1.0),) + s[1:], "scale must be positive"),
    (lambda s: s[:3] + (replace(s[3], inputs=("nowhere",)),) + s[4:], "an alias names one blend or mixture"),
    (lambda s: s[:4] + (replace(s[4], inputs=("lnsim", "outdoor2", "general")),), "component 'outdoor2'"),
    (lambda s: s[:4] + (replace(s[4], gate_inputs=("domain.lnsim", "domain.x", "")),), "no domain column 'domain.x'"),
    (lambda s: s[:4] + (replace(s[4], gate_inputs=("domain.lnsim", "", "")),), "exactly one component without"),
    (lambda s: s[:4] + (replace(s[4], widths=(0.1, 0.0, 1.0)),), "gate widths must be positive"),
    (lambda s: s[:4] + (replace(s[4], kind="stack"),), "kind 'stack'"),
])
def test_profile_checks(change, message):
    with pytest.raises(ValueError, match=message):
        check_specs(OUTPUTS, change(specs("sigmoid")))
    with pytest.raises(ValueError, match=message):
        ResMemNetConfig(head="readout", teacher_output=True, outputs=OUTPUTS, profiles=change(specs("sigmoid")))


def test_a_model_scores_its_default_profile_and_exports_all():
    from model.network import ResMemNet, profile_scores as net_scores

    cfg = ResMemNetConfig(head="readout", teacher_output=True, outputs=OUTPUTS, profiles=specs("sigmoid"))
    torch.manual_seed(0)
    model = ResMemNet(cfg).eval()
    with torch.no_grad():
        model.head.out.weight.normal_(0, 1e-3)
        x = torch.rand(2, 3, 64, 64)
        out = model.head.outputs(model.forward_features(x))
        assert torch.equal(model(x), profile_score(out, cfg))
        assert torch.equal(net_scores(out, cfg), profile_scores(out, cfg))
    with pytest.raises(ValueError, match="not the head's shape"):
        model.set_config(ResMemNetConfig(head="readout"))  # one output, not six


# -- the shipped checkpoint: loads and scores as recorded --------------------------------------------

# Its scores of three pool photos in fp32 (default, lnsim, cdm, general, outdoor), recorded when it
# was shipped (2026-12-06); the first two match README's example output (0.928060, 0.919306). The
# general profile (the teacher output) scores them as the previous checkpoint did within 1e-6.
SHIPPED_PHOTOS = ("pool/bsds_100007.jpg", "pool/bsds_100039.jpg", "pool2/ross_painting113.jpg")
SHIPPED_SCORES = ((0.928059995, 0.806238294, 0.579912961, 0.657319665, 0.806238294),
                  (0.919306278, 0.900593817, 0.626063287, 0.640002131, 0.900593817),
                  (0.825042546, 0.687886953, 0.553503573, 0.543299675, 0.687886953))


def test_legacy_metadata_reads_as_the_legacy_layout():
    """The previous default's metadata (2026-12-02, tests/fixtures; its tensors are not kept):
    unnamed outputs and the gate in the architecture fields read as named profiles."""
    from model.checkpoint import read_meta

    arch = read_meta(REPO / "tests" / "fixtures" / "legacy-gated-checkpoint.json").architecture
    assert arch.outputs == () and arch.output_names == ("labelled", "teacher", "domain")
    assert profile_names(arch) == ("default", "general", "outdoor")
    default = legacy_profiles(arch)[0]
    assert default.kind == "mixture" and default.centers[0] == 0.2 and default.widths[0] == 0.3


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("resmem") is None, reason="the resmem trunk package is not installed")
def test_shipped_checkpoint_scores_pool_photos_as_recorded_in_fp32():
    from conftest import SHARED_DATA
    from model.checkpoint import load_checkpoint
    from model.preprocess import decode_image

    paths = [SHARED_DATA / p for p in SHIPPED_PHOTOS]
    if not all(p.is_file() for p in paths):
        pytest.skip("../shared/data pool photos absent")
    model, meta = load_checkpoint(SHIPPED)
    assert profile_names(model.cfg) == ("default", "lnsim", "cdm", "general", "outdoor")
    x = torch.stack([meta.preprocessing.image_to_tensor(decode_image(p)) for p in paths])
    with torch.inference_mode():  # fp32 on the CPU: no autocast
        table = profile_scores(model.head.outputs(model.forward_features(x)), model.cfg)
    torch.testing.assert_close(table, torch.tensor(SHIPPED_SCORES), atol=1e-4, rtol=0)
