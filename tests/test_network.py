"""The network over every registered variant: shapes, finiteness, gradients, batching, freezing."""
import pytest
import torch

from model.network import BACKBONES, ResMemNetConfig, build_resmemnet, count_parameters, soft_clamp

VARIANTS = [dict(backbone=b) for b in BACKBONES] + [dict(head="linear"), dict(taps="last"),
                                                    dict(teacher_output=True, score_blend=0.8),
                                                    dict(ensemble=2, teacher_output=True, score_blend=0.8),
                                                    dict(head="readout", teacher_output=True, score_blend=0.5),
                                                    dict(head="readout", teacher_output=True, score_blend=0.7,
                                                         domain_gate=True, gate_center=0.4, gate_width=0.05)]


def test_default_parameter_count_matches_paper():
    n = count_parameters(build_resmemnet())
    # The paper reports "about 26 million"; ours is 25.6M (ResNet-50 trunk 23.5M + head 2.1M).
    assert 25_000_000 < n < 27_000_000, n


@pytest.mark.parametrize("kwargs", VARIANTS, ids=lambda k: "-".join(f"{v}" for v in k.values()))
def test_every_variant_builds_and_every_parameter_gets_a_gradient(kwargs):
    torch.manual_seed(0)
    model = build_resmemnet(**kwargs).train()
    x = torch.rand(2, 3, 64, 80)
    out = model(x)
    assert out.shape == (2,)
    assert torch.isfinite(out).all() and ((out >= 0) & (out <= 1)).all()
    out.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing[:5]
    assert len(model.feature_info) == len(model.cfg.tap_channels)


def test_ensemble_scores_are_the_mean_of_its_members():
    model = build_resmemnet(ensemble=3, teacher_output=True, score_blend=0.6).eval()
    with torch.no_grad():
        pooled = model.forward_features(torch.rand(2, 3, 64, 64))
        members = torch.stack([m(pooled) for m in model.head.members])
        assert model.head.member_outputs(pooled).shape == (3, 2, 2)
        assert torch.allclose(model.head(pooled), members.mean(dim=0), atol=1e-6)
        assert not torch.allclose(members[0], members[1])  # members start from different weights
    with pytest.raises(ValueError, match="ensemble"):
        ResMemNetConfig(ensemble=0)


def test_score_calibration_is_affine_clamped_and_keeps_the_ranking():
    model = build_resmemnet(teacher_output=True, score_blend=0.5).eval()
    with torch.no_grad():
        pooled = model.forward_features(torch.rand(4, 3, 64, 64))
        raw = model.head(pooled)
        model.set_score_calibration(2.0, -0.4)
        assert model.cfg.score_scale == 2.0 and model.head.cfg is model.cfg
        assert torch.allclose(model.head(pooled), soft_clamp(2.0 * raw - 0.4))
        assert torch.equal(torch.argsort(model.head(pooled)), torch.argsort(raw))  # raw scores sit near 0.5: no clamping
        model.set_score_calibration()
        assert torch.equal(model.head(pooled), raw)
    with pytest.raises(ValueError, match="positive"):
        ResMemNetConfig(score_scale=0.0)


def test_score_blend_needs_a_teacher_output_and_lies_in_0_1():
    with pytest.raises(ValueError, match="teacher_output"):
        ResMemNetConfig(score_blend=0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ResMemNetConfig(teacher_output=True, score_blend=1.5)
    assert ResMemNetConfig(teacher_output=True).n_outputs == 2 and ResMemNetConfig().n_outputs == 1


@pytest.mark.parametrize("size", [(64, 64), (224, 224), (333, 517), (1024, 768)])
def test_any_input_size_gives_finite_scores(size):
    model = build_resmemnet()
    with torch.no_grad():
        out = model(torch.rand(1, 3, size[1], size[0]))
    assert out.shape == (1,) and torch.isfinite(out).all()


def test_batched_equals_single():
    torch.manual_seed(1)
    model = build_resmemnet().eval()
    x = torch.rand(5, 3, 96, 128)
    with torch.no_grad():
        batched = model(x)
        single = torch.cat([model(x[i:i + 1]) for i in range(5)])
    assert torch.allclose(batched, single, atol=1e-4)


def test_freezing_keeps_trunk_fixed_and_is_idempotent():
    torch.manual_seed(2)
    model = build_resmemnet()
    model.set_trunk_frozen(True).set_trunk_frozen(True)
    model.train()
    assert not model.trunk.training and model.head.training
    before = {k: v.clone() for k, v in model.trunk.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = ((model(torch.rand(4, 3, 64, 64)) - 0.7) ** 2).mean()
    loss.backward()
    opt.step()
    after = model.trunk.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "trunk weights or BN statistics changed"
    assert all(p.grad is None for p in model.trunk.parameters())
    model.set_trunk_frozen(False)
    model.train()
    assert model.trunk.training and all(p.requires_grad for p in model.trunk.parameters())


def test_config_rejects_unknown_values():
    with pytest.raises(ValueError):
        ResMemNetConfig(backbone="resnet18")
    with pytest.raises(ValueError):
        ResMemNetConfig(head="transformer")


def test_unrolled_lstm_matches_nn_lstm():
    """The cuDNN-free recurrence used for gradients on CUDA computes what nn.LSTM computes."""
    torch.manual_seed(5)
    head = build_resmemnet().head.eval()
    x = torch.randn(3, 16, 128)
    h0 = head.h0.expand(1, 3, -1).contiguous()
    c0 = head.c0.expand(1, 3, -1).contiguous()
    with torch.no_grad():
        _, (h_ref, _) = head.lstm(x, (h0, c0))
        h_unrolled = head._lstm_unrolled(x, h0[0], c0[0])
    assert torch.allclose(h_ref[-1], h_unrolled, atol=1e-5)


def test_feature_dropout_only_acts_in_training():
    model = build_resmemnet(feature_dropout=0.9).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_fp32_last_stage_changes_nothing_without_autocast():
    model = build_resmemnet().eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        a = model.head(model.forward_features(x))
        b = model.head(model.forward_features(x, fp32_last_stage=True))
    assert torch.equal(a, b)


@pytest.mark.parametrize("depth", BACKBONES)
def test_trunk_matches_torchvision_resnet(depth):
    """Our ResNet is torchvision's layout (so its weights load unchanged) and computes the same."""
    torchvision = pytest.importorskip("torchvision")
    from model.resnet import build_resnet

    ours = build_resnet(depth).eval()
    theirs = getattr(torchvision.models, depth)(weights=None)
    theirs.fc = torch.nn.Identity()
    theirs.eval()
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert list(ours_state) == list(theirs_state)
    assert all(ours_state[k].shape == v.shape for k, v in theirs_state.items())
    # same initialisation statistics: fan-out He for convolutions, unit BatchNorm
    assert ours.layer3[0].conv2.weight.std().item() == pytest.approx(theirs.layer3[0].conv2.weight.std().item(), rel=0.05)
    ours.load_state_dict(theirs_state)
    images = torch.rand(2, 3, 64, 80)
    with torch.no_grad():
        assert torch.equal(ours(images), theirs(images))


def test_readout_head_is_one_linear_map_of_the_concatenated_taps_clamped_to_0_1():
    model = build_resmemnet(head="readout", teacher_output=True, score_blend=0.25).eval()
    with torch.no_grad():
        pooled = model.forward_features(torch.rand(3, 3, 64, 64))
        flat = torch.cat(pooled, dim=1)
        assert model.head.out.in_features == flat.shape[1] == sum(model.cfg.tap_channels)
        outputs = model.head.outputs(pooled)
        assert torch.allclose(outputs, flat @ model.head.out.weight.T + model.head.out.bias, atol=1e-5)
        assert torch.allclose(model.head(pooled), soft_clamp(0.25 * outputs[:, 0] + 0.75 * outputs[:, 1]))
        model.head.out.bias.fill_(1.5)  # a linear map can leave [0, 1]; the score never does
        high = model.head(pooled)
        assert ((high > 0.9) & (high < 1)).all()
        raised = model.head.outputs(pooled)
        assert torch.equal(torch.argsort(high), torch.argsort(0.25 * raised[:, 0] + 0.75 * raised[:, 1]))  # no ties
    with pytest.raises(ValueError, match="ensemble must be 1"):
        ResMemNetConfig(head="readout", ensemble=2)


def test_domain_gate_mixes_the_calibrated_blend_with_the_teacher_output_by_the_domain_output():
    from model.network import domain_weight

    model = build_resmemnet(head="readout", teacher_output=True, score_blend=0.7, domain_gate=True,
                            gate_center=0.5, gate_width=0.1).eval()
    model.set_score_calibration(1.2, -0.05)
    assert model.head.out.out_features == 3 and model.cfg.n_outputs == 3
    with torch.no_grad():
        pooled = model.forward_features(torch.rand(4, 3, 64, 64))
        model.head.out.weight.zero_()
        model.head.out.bias.copy_(torch.tensor([0.6, 0.3, 0.5]))
        g = domain_weight(model.head.outputs(pooled), model.cfg)
        assert torch.allclose(g, torch.full((4,), 0.5))
        calibrated = 1.2 * (0.7 * 0.6 + 0.3 * 0.3) - 0.05
        assert torch.allclose(model.head(pooled), torch.full((4,), 0.5 * calibrated + 0.5 * 0.3))
        model.head.out.bias[2] = 3.0  # clearly like the labelled photos: the calibrated blend alone
        assert torch.allclose(model.head(pooled), torch.full((4,), calibrated), atol=1e-6)
        model.head.out.bias[2] = -3.0  # clearly unlike them: the teacher output alone
        assert torch.allclose(model.head(pooled), torch.full((4,), 0.3), atol=1e-6)
    with pytest.raises(ValueError, match="domain_gate needs"):
        ResMemNetConfig(head="readout", domain_gate=True)
    with pytest.raises(ValueError, match="domain_gate needs"):
        ResMemNetConfig(teacher_output=True, domain_gate=True)  # an LSTM head has no closed-form domain output
    with pytest.raises(ValueError, match="gate_width"):
        ResMemNetConfig(head="readout", teacher_output=True, domain_gate=True, gate_width=0.0)


def test_soft_clamp_is_the_identity_inside_its_knees_and_strictly_increasing_into_0_1():
    x = torch.linspace(-30, 40, 70001, dtype=torch.float64, requires_grad=True)
    y = soft_clamp(x)
    inside = (x >= 0.1) & (x <= 0.9)
    assert torch.equal(y[inside], x[inside])
    assert ((y > 0) & (y < 1)).all() and (y.diff() > 0).all()
    y.sum().backward()
    assert (x.grad > 0).all() and x.grad.max() <= 1 + 1e-12  # smooth at the knees, never flat
    knees = torch.tensor([0.1 - 1e-9, 0.1 + 1e-9, 0.9 - 1e-9, 0.9 + 1e-9], dtype=torch.float64)
    assert torch.allclose(soft_clamp(knees), knees, atol=1e-8)
    far = soft_clamp(torch.tensor([1.5, 1.6, 3.0, 10.0, -5.0, -4.0]))  # float32 keeps them apart
    assert far.unique().numel() == 6 and (far[:4].diff() > 0).all() and far[4] < far[5]
