"""The resmem package's memorability branch as readout taps (model/memory_branch.py): shapes,
the package-key mapping, its place in ResMemNet, checkpoints without it, config checks, and (slow,
with the real package) agreement with the package's own layers."""
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from model.memory_branch import BRANCH_INPUT, BRANCH_TAPS, MemoryBranch, branch_state_from_package
from model.network import ResMemNet, ResMemNetConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WIDTHS = [256, 4096, 4096, 2048, 1024, 512, 256, 1]


@pytest.fixture(scope="module")
def branch():
    torch.manual_seed(0)
    return MemoryBranch().eval()


def _package_names(state: dict) -> dict:
    """MemoryBranch keys -> the resmem package's (imagenet_fc is the ResNet's own `features.fc`)."""
    return {k.replace("imagenet_fc.", "features.fc."): v for k, v in state.items()}


@pytest.mark.parametrize("size", [(64, 48), (227, 227), (300, 200)])
def test_branch_taps_have_their_widths_at_any_input_size(branch, size):
    torch.manual_seed(1)
    images = torch.rand(2, 3, *size)
    with torch.no_grad():
        taps = branch(images, torch.randn(2, 2048))
    assert [t.shape for t in taps] == [(2, c) for c in WIDTHS]
    assert branch.tap_channels == WIDTHS == [c for _, c in BRANCH_TAPS]
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in taps)
    score = taps[-1]
    assert ((score > 0) & (score < 1)).all()
    assert all((t >= 0).all() for t in taps[:-1])  # pooled ReLU map and ReLU outputs


def test_branch_resizes_its_input_to_227_bilinearly(branch):
    torch.manual_seed(2)
    images, last = torch.rand(1, 3, 96, 128), torch.randn(1, 2048)
    resized = F.interpolate(images, size=(BRANCH_INPUT, BRANCH_INPUT), mode="bilinear", align_corners=False)
    with torch.no_grad():
        a, b = branch(images, last), branch(resized, last)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    with torch.no_grad():  # the logits matter: another last pooled tap, another score
        other = branch(images, last + 1.0)
    assert not torch.equal(other[1], a[1]) and torch.equal(other[0], a[0])  # conv5 does not see the logits


def test_branch_state_maps_package_keys_and_names_a_missing_one(branch):
    own = branch.state_dict()
    package = _package_names(own)
    package["features.conv1.weight"] = torch.zeros(64, 3, 7, 7)  # the trunk's tensors are ignored
    package["features.layer1.0.bn1.running_mean"] = torch.zeros(64)
    mapped = branch_state_from_package(package)
    assert set(mapped) == set(own)
    assert all(mapped[k] is own[k] for k in own)
    fresh = MemoryBranch()
    fresh.load_state_dict(mapped)  # strict: every key fits
    for name in ("fc9.bias", "features.fc.weight", "conv3.weight"):
        broken = dict(package)
        del broken[name]
        with pytest.raises(KeyError, match=name.replace(".", r"\.")):
            branch_state_from_package(broken)


@pytest.fixture(scope="module")
def branched_net():
    torch.manual_seed(0)
    return ResMemNet(ResMemNetConfig(backbone="resnet152", head="readout", branch="resmem")).eval()


def test_resmemnet_with_branch_reads_58_taps(branched_net):
    cfg = branched_net.cfg
    assert len(cfg.trunk_tap_channels) == 50 and len(cfg.tap_channels) == 58
    assert cfg.tap_channels[50:] == WIDTHS
    info = branched_net.feature_info
    assert len(info) == 58
    assert [(i["module"], i["num_chs"]) for i in info[50:]] == [(f"branch.{n}", c) for n, c in BRANCH_TAPS]
    assert all(not i["module"].startswith("branch.") for i in info[:50])
    assert ResMemNetConfig(backbone="resnet152", taps="last", branch="resmem").tap_channels == [2048] + WIDTHS
    with torch.no_grad():
        pooled = branched_net.forward_features(torch.rand(1, 3, 64, 64))
        score = branched_net(torch.rand(1, 3, 64, 64))
    assert [p.shape[1] for p in pooled] == cfg.tap_channels
    assert score.shape == (1,) and torch.isfinite(score).all()
    # The branch reads the trunk's last pooled tap through the ResNet's ImageNet classifier.
    with torch.no_grad():
        again = branched_net.branch(torch.rand(1, 3, 64, 64), pooled[49])
    assert len(again) == 8


def test_branch_is_never_trained_and_never_saved(branched_net, tmp_path):
    from safetensors import safe_open

    from model.trunks import TrunkSource
    from model.checkpoint import CheckpointMeta, save_checkpoint
    from model.preprocess import Preprocessing, ResizePolicy

    branched_net.set_trunk_frozen(False)
    assert not any(p.requires_grad for p in branched_net.branch.parameters())
    assert any(p.requires_grad for p in branched_net.trunk.parameters())
    branched_net.set_trunk_frozen(True).eval()
    meta = CheckpointMeta(name="branched", architecture=branched_net.cfg,
                          preprocessing=Preprocessing(resize=ResizePolicy(size=64, multiple=32), input_scaling="unit"),
                          trunk=TrunkSource(kind="none", depth="resnet152"), trunk_embedded=True,
                          description="test", license="test only")
    path = save_checkpoint(branched_net, meta, tmp_path / "branched.json", embed_trunk=True)
    with safe_open(str(path.with_suffix(".safetensors")), "pt") as fh:
        keys = list(fh.keys())
    assert not [k for k in keys if k.startswith("branch.")]
    assert any(k.startswith("trunk.") for k in keys) and any(k.startswith("head.") for k in keys)


def test_branch_config_checks():
    from model.training.config import ConfigError, load_config

    with pytest.raises(ValueError, match="resnet152"):
        ResMemNetConfig(backbone="resnet50", branch="resmem")
    with pytest.raises(ValueError, match="unknown branch"):
        ResMemNetConfig(backbone="resnet152", branch="alexnet")
    assert load_config("lnsim", ["model.branch=resmem"]).model.branch == "resmem"
    with pytest.raises(ConfigError, match="model.trunk = 'resmem'"):
        load_config("lnsim", ["model.branch=resmem", "model.trunk=torchvision"])
    with pytest.raises(ConfigError, match="model.branch"):
        load_config("lnsim", ["model.branch=vgg"])
    for name in ("branch_share_labelled", "branch_share_teacher"):
        with pytest.raises(ConfigError, match=f"readout.{name} > 0 needs model.branch"):
            load_config("lnsim", [f"readout.{name}=0.2"])
        with pytest.raises(ConfigError, match=r"\[0, 1\]"):
            load_config("lnsim", ["model.branch=resmem", f"readout.{name}=1.5"])
    ok = load_config("lnsim", ["model.branch=resmem", "readout.branch_share_labelled=0.3"])
    assert ok.readout.branch_share_labelled == 0.3 and ok.readout.branch_share_teacher == 0.0


# -- the real package ----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("resmem") is None, reason="the resmem package is not installed")
def test_branch_score_equals_the_package_layers_on_our_trunk(monkeypatch):
    """Our branch's score tap = the package's own modules (its ResMem class, its weights) applied
    by hand: conv1..pool5 on the input resized to 227, `features.fc` on our trunk's last pooled
    tap (the package's ResNet would see 227 px; ours sees 192), then fc6..fc12."""
    import resmem
    import torchvision

    from model.trunks import read_state_dict, resmem_source, resolve_weight_file
    from model.network import build_resmemnet

    source = resmem_source()
    model = build_resmemnet(trunk_source=source, branch="resmem", head="readout", allow_download=False)
    # The package's class downloads ImageNet weights unless pretrained; build it bare and load the
    # same (hash-checked) file the way it does, but without executing pickled code.
    monkeypatch.setattr(resmem, "resnet152", lambda pretrained=False: torchvision.models.resnet152(weights=None))
    ref = resmem.ResMem(pretrained=False).eval()
    ref.load_state_dict(read_state_dict(resolve_weight_file(source, allow_download=False)))

    torch.manual_seed(0)
    images = torch.rand(2, 3, 192, 192)
    with torch.no_grad():
        pooled = model.forward_features(images)
        again = model.forward_features(images)
        x = F.interpolate(images, size=(227, 227), mode="bilinear", align_corners=False)
        c = ref.lrn1(ref.pool1(F.relu(ref.conv1(x))))
        c = ref.lrn2(ref.pool2(F.relu(ref.conv2(c))))
        c = ref.pool5(F.relu(ref.conv5(F.relu(ref.conv4(F.relu(ref.conv3(c)))))))
        h = torch.cat([c.view(-1, 9216), ref.features.fc(pooled[49])], 1)
        for fc in (ref.fc6, ref.fc7, ref.fc8, ref.fc9, ref.fc10, ref.fc11):
            h = F.relu(fc(h))
        expected = torch.sigmoid(ref.fc12(h))
    assert len(pooled) == 58
    torch.testing.assert_close(pooled[-1], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pooled[-2], h, rtol=1e-4, atol=1e-5)  # fc11
    torch.testing.assert_close(pooled[50], c.mean(dim=(2, 3)), rtol=1e-4, atol=1e-5)  # conv5 pooled
    assert ((pooled[-1] > 0) & (pooled[-1] < 1)).all()
    assert all(torch.equal(a, b) for a, b in zip(pooled, again))
