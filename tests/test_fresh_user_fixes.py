"""Defects a fresh-user trial found: each test asserts the right behaviour (status, reason, exit code)."""
from __future__ import annotations

import pytest

from app.cli import main
from tests.conftest import make_image


def test_heatmap_without_weights_uses_the_default_checkpoint(tiny_checkpoint, tmp_path, monkeypatch,
                                                             one_torch_thread, capsys):
    import model.checkpoint

    monkeypatch.setattr(model.checkpoint, "DEFAULT_WEIGHTS", tiny_checkpoint)
    folder = tmp_path / "photos"
    folder.mkdir()
    make_image(folder / "a.jpg")
    out = tmp_path / "out"
    assert main(["heatmap", str(folder), "-o", str(out)]) == 0
    assert (out / "a.overlay.png").is_file()
    assert "test-random" in capsys.readouterr().err
