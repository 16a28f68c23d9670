"""Start-up: the command line answers --help/--version without importing torch, and the trunk's
sha256 is taken from a record while the file is unchanged, and re-read after any change."""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

import pytest

from app.cli import COMMANDS, build_parser, command_of, main
from conftest import REPO

PROBE = """
import sys
from app.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
print("TORCH" if "torch" in sys.modules else "NO-TORCH", file=sys.stderr)
"""


def run_cli_probe(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.process  # a fresh interpreter, to see what it imports
@pytest.mark.parametrize("argv", [["--help"], ["--version"], [], ["no-such-command"]])
def test_top_level_never_imports_torch(argv):
    done = run_cli_probe(argv)
    assert done.stderr.strip().endswith("NO-TORCH"), done.stderr


def test_version_comes_from_package_metadata(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"resmemnet {importlib.metadata.version('resmemnet')}"


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command, (_, text) in COMMANDS.items():
        assert command in out and text.split()[0] in out


def test_command_table_matches_what_the_modules_register():
    """COMMANDS (used to answer --help without imports) must say what the real parsers say."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    registered = {choice.dest: choice.help for choice in sub._choices_actions}
    assert registered == {name: text for name, (_, text) in COMMANDS.items()}
    for name, (module, _) in COMMANDS.items():
        assert sub.choices[name].get_default("func") is not None, f"{name} is only a stub, not registered by {module}"


def test_one_command_imports_only_its_module():
    parser = build_parser(only="export")
    args = parser.parse_args(["export", "--format", "onnx", "--out", "x.onnx"])
    assert args.func.__module__ == "app.cli.export"


def test_command_word_after_an_option_is_a_usage_error(capsys):
    assert command_of(["--version", "score"]) == "score"
    assert command_of(["--", "score"]) is None
    with pytest.raises(SystemExit) as exc:
        main(["-x", "score"])
    assert exc.value.code == 2


# -- the trunk hash record -------------------------------------------------------------------------
@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("RESMEMNET_CACHE_DIR", str(folder))
    return folder


def old_file(path, data: bytes, age_s: float = 3600):
    """Write `data` with an mtime in the past (a freshly written file is never recorded: racy)."""
    path.write_bytes(data)
    past = os.stat(path).st_mtime_ns - int(age_s * 1e9)
    os.utime(path, ns=(past, past))
    return path


def test_hash_record_spares_rereading_an_unchanged_file(cache, tmp_path, monkeypatch):
    from model import filecache

    path = old_file(tmp_path / "trunk.bin", b"a" * 4096)
    digest = filecache.sha256_file(path)
    assert filecache.verified_sha256(path) == digest
    record = json.loads((cache / filecache.HASH_RECORD).read_text())
    assert record[os.path.realpath(path)]["sha256"] == digest

    def no_reading(*_a, **_k):
        raise AssertionError("the file was read again although it did not change")

    monkeypatch.setattr(filecache, "sha256_file", no_reading)
    assert filecache.verified_sha256(path) == digest


def test_modified_trunk_file_is_refused_despite_the_record(cache, tmp_path):
    """Same size, mtime set back to the recorded one: ctime (and the content) still give it away."""
    import torch

    from model.filecache import sha256_file
    from model.trunks import TrunkLoadError, file_source, resolve_weight_file

    path = tmp_path / "trunk.pt"
    torch.save({"w": torch.zeros(256)}, path)
    old_file(path, path.read_bytes())
    source = file_source(str(path), sha256=sha256_file(path))
    assert resolve_weight_file(source) == path  # verified and recorded
    st = os.stat(path)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns
    with pytest.raises(TrunkLoadError, match="sha256"):
        resolve_weight_file(source)
    with pytest.raises(TrunkLoadError, match="sha256"):  # and again: a bad hash is never trusted
        resolve_weight_file(source)


def test_replaced_file_is_rehashed(cache, tmp_path):
    from model.filecache import sha256_file, verified_sha256

    path = old_file(tmp_path / "f.bin", b"x" * 1000)
    first = verified_sha256(path)
    other = old_file(tmp_path / "g.bin", b"y" * 1000)
    st = os.stat(path)
    os.replace(other, path)  # another inode under the same name
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert verified_sha256(path) == sha256_file(path) != first


def test_freshly_written_file_is_not_recorded(cache, tmp_path):
    from model.filecache import HASH_RECORD, verified_sha256

    path = tmp_path / "new.bin"
    path.write_bytes(b"z" * 100)
    verified_sha256(path)
    assert not (cache / HASH_RECORD).exists()


def test_unwritable_or_corrupt_record_only_costs_time(tmp_path, monkeypatch):
    from model.filecache import HASH_RECORD, sha256_file, verified_sha256

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("RESMEMNET_CACHE_DIR", str(blocker))
    path = old_file(tmp_path / "f.bin", b"q" * 100)
    assert verified_sha256(path) == sha256_file(path)

    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / HASH_RECORD).write_text("{not json")
    monkeypatch.setenv("RESMEMNET_CACHE_DIR", str(folder))
    assert verified_sha256(path) == sha256_file(path)
    assert json.loads((folder / HASH_RECORD).read_text())  # rewritten whole


# -- serve on a taken port: one error line, exit 2, before the model loads ----------------------
def test_serve_on_a_taken_port_fails_at_once(tiny_checkpoint, monkeypatch, capsys):
    import socket

    import app.service

    def must_not_load(*a, **k):
        raise AssertionError("the app was created although the port is taken")

    monkeypatch.setattr(app.service, "create_app", must_not_load)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["serve", "--host", "127.0.0.1", "--port", str(port), "--weights", str(tiny_checkpoint)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"resmemnet serve: error: cannot listen on 127.0.0.1:{port}: ")


def test_check_port_accepts_a_free_port():
    from app.cli.serve import check_port

    with socket_free_port() as port:
        assert check_port("127.0.0.1", port) is None


def socket_free_port():
    import contextlib
    import socket

    @contextlib.contextmanager
    def free():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        yield port
    return free()


# -- a model that cannot load: the process stops with the reason, it does not linger unready -----
@pytest.mark.process  # runs uvicorn (in this process) on a loopback port
def test_serve_exits_non_zero_with_the_reason_when_the_model_cannot_load(tiny_checkpoint, tmp_path, capsys):
    import shutil

    from app.cli.kit import EXIT_SOME_FAILED

    for path in tiny_checkpoint.parent.glob(tiny_checkpoint.stem + ".*"):
        shutil.copy(path, tmp_path / path.name)
    tensors = next(tmp_path.glob("*.safetensors"))
    data = bytearray(tensors.read_bytes())
    data[-16:] = bytes(16)  # metadata still reads; the tensor file's sha256 no longer matches
    tensors.write_bytes(bytes(data))
    with socket_free_port() as port:
        pass
    code = main(["serve", "--host", "127.0.0.1", "--port", str(port), "--weights", str(tmp_path / tiny_checkpoint.name)])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == EXIT_SOME_FAILED
    assert last.startswith("resmemnet serve: error: cannot serve ") and "the model did not load" in last
    assert "sha256" in last, last


def test_unknown_resmemnet_variables_are_named_with_the_closest_setting_and_never_their_value():
    from app.settings import ServiceSettings
    from model.environment import unknown_variables

    environ = {"RESMEMNET_LOG_LEVL": "debug", "RESMEMNET_PORT": "8000", "RESMEMNET_CACHE_DIR": "/c",
               "RESMEMNET_FROBNICATE": "s3cret-value", "OTHER": "x"}
    lines = unknown_variables(ServiceSettings.variables(), environ)
    assert lines == ["RESMEMNET_FROBNICATE is not a setting, so it is ignored (docs/api.md lists the settings)",
                     "RESMEMNET_LOG_LEVL is not a setting, so it is ignored; did you mean RESMEMNET_LOG_LEVEL?"]
    assert not any("s3cret" in line or "debug" in line for line in lines)


def test_log_level_is_checked_and_case_insensitive():
    from app.settings import ServiceSettings, SettingsError

    assert ServiceSettings.from_env({"RESMEMNET_LOG_LEVEL": "WARNING"}).log_level == "warning"
    with pytest.raises(SettingsError, match="log_level must be one of critical, error, warning, info, debug, trace, not 'warn'"):
        ServiceSettings.from_env({"RESMEMNET_LOG_LEVEL": "warn"})
