"""`resmemnet score --shard K/N` / `--resume` and `resmemnet merge`: N shards cover every input
once, a stopped shard resumes without rescoring, and the merged parts equal one plain run."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from app.cli import main as cli
from app.cli.score import shard_of
from conftest import make_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    (root / "sub").mkdir()
    for i in range(9):
        make_image(root / f"p{i:02d}.jpg", size=(40 + 4 * i, 36), seed=i)
    for i in range(3):
        make_image(root / "sub" / f"q{i}.png", size=(48, 40), fmt="PNG", seed=20 + i)
    (root / "broken.jpg").write_bytes(b"not an image")
    return root


def score(ckpt, *args) -> int:
    return cli(["score", *map(str, args), "--weights", str(ckpt), "--device", "cpu", "--workers", "1",
                "--no-progress", "--fp32"])


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 20])
def test_shards_cover_every_input_once_whatever_the_argument_order(n):
    entries = [(f"/x/{c}{i}.jpg", True) for c in "bca" for i in range(4)]
    parts = [shard_of(entries, (k, n)) for k in range(1, n + 1)]
    assert sorted(e for p in parts for e in p) == sorted(entries)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert parts == [shard_of(list(reversed(entries)), (k, n)) for k in range(1, n + 1)]


@pytest.mark.parametrize("shard", ["0/3", "4/3", "a/b", "3", "1/0"])
def test_bad_shard_is_a_usage_error(shard, tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        score(tiny_checkpoint, tmp_path, "--shard", shard, "--out", tmp_path / "x.csv")
    assert exc.value.code == 2 and "--shard" in capsys.readouterr().err


def test_sharded_parts_merge_into_the_plain_run(photos, tiny_checkpoint, tmp_path, capsys):
    assert score(tiny_checkpoint, photos, tmp_path / "missing.jpg", "--out", tmp_path / "all.csv") == 1
    plain = sorted(rows(tmp_path / "all.csv"), key=lambda r: r["path"])
    parts = []
    for k in (1, 2, 3):
        part = tmp_path / f"part-{k}.csv"
        code = score(tiny_checkpoint, tmp_path / "missing.jpg", photos, "--shard", f"{k}/3", "--out", part)
        assert code in (0, 1)  # 1: this shard holds the broken or the missing input
        parts.append(part)
    assert sum(len(rows(p)) for p in parts) == len(plain) == 14
    merged = tmp_path / "merged.csv"
    assert cli(["merge", *map(str, parts), "--out", str(merged), "--expect", "14"]) == 0
    got = rows(merged)
    assert [r["path"] for r in got] == [r["path"] for r in plain]
    for a, b in zip(got, plain):
        assert {k: v for k, v in a.items() if k != "score"} == {k: v for k, v in b.items() if k != "score"}
        assert (a["score"] == b["score"] == "") or abs(float(a["score"]) - float(b["score"])) < 2e-6
    assert {r["reason"] for r in got if r["error"]} == {"not_found", "not_an_image"}

    as_json = tmp_path / "merged.json"
    assert cli(["merge", *map(str, parts), "--out", str(as_json)]) == 0
    records = json.loads(as_json.read_text())
    assert [r["path"] for r in records] == [r["path"] for r in got]
    ok = next(r for r in records if r["score"] is not None)
    assert isinstance(ok["width"], int) and isinstance(ok["warnings"], list) and ok["error"] is None


def test_resume_scores_only_what_the_file_lacks(photos, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "part.csv"
    assert score(tiny_checkpoint, photos, "--shard", "2/2", "--out", out) == 0
    full = rows(out)
    assert len(full) == 7
    # the job was killed after 3 rows, in the middle of the 4th
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:4]) + lines[4][:10])
    capsys.readouterr()
    assert score(tiny_checkpoint, photos, "--shard", "2/2", "--out", out, "--resume") == 0
    err = capsys.readouterr().err
    assert "shard 2/2: 4 of 7 inputs scored" in err and "3 kept from part.csv" in err
    assert rows(out) == full  # same rows, same order, nothing twice
    # resuming a finished shard scores nothing
    assert score(tiny_checkpoint, photos, "--shard", "2/2", "--out", out, "--resume") == 0
    assert "0 of 7 inputs scored" in capsys.readouterr().err and rows(out) == full


def test_merge_refuses_overlapping_or_foreign_parts(photos, tiny_checkpoint, tmp_path, capsys):
    a = tmp_path / "a.csv"
    assert score(tiny_checkpoint, photos / "sub", "--shard", "1/1", "--out", a) == 0
    assert cli(["merge", str(a), str(a), "--out", str(tmp_path / "m.csv")]) == 2
    assert "in two parts" in capsys.readouterr().err
    assert cli(["merge", str(a), "--out", str(tmp_path / "m.csv"), "--expect", "4"]) == 2
    assert "not --expect 4" in capsys.readouterr().err
    other = tmp_path / "other.csv"
    other.write_text("name,value\nx,1\n")
    assert cli(["merge", str(other), "--out", str(tmp_path / "m.csv")]) == 2
    assert "not a CSV written by resmemnet score" in capsys.readouterr().err
    assert cli(["merge", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "m.csv")]) == 2
    assert score(tiny_checkpoint, photos, "--shard", "1/2", "--out", tmp_path / "x.json") == 2
    assert "append rows to a CSV" in capsys.readouterr().err
