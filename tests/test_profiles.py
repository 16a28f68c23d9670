"""Score profiles end to end: every request chooses one (default, general, outdoor), through the
Scorer, the batcher, the HTTP endpoints, Grad-RAM and the command line."""
from __future__ import annotations

import asyncio
import csv
import io
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from conftest import PROFILE_REFERENCE, make_image, serving

from app.batcher import DynamicBatcher
from app.cli import main
from model.network import PROFILES, profile_score, profile_scores

TOL = 1e-4
REFERENCE = PROFILE_REFERENCE


@pytest.fixture(scope="module")
def scorer(profile_checkpoint, one_torch_thread):
    from model.scoring import Scorer

    return Scorer.from_checkpoint(profile_checkpoint, device="cpu", mixed_precision=False, backend="torch")


@pytest.fixture(scope="module")
def plain_scorer(tiny_checkpoint):
    """The shared test checkpoint: an LSTM head without a teacher output."""
    from model.scoring import Scorer

    return Scorer.from_checkpoint(tiny_checkpoint, device="cpu", mixed_precision=False, backend="torch")


def expected(scorer, data: bytes) -> dict[str, float]:
    """Every profile's score of one image: profile_score of the model's head outputs, in fp32."""
    tensor = scorer.prepare(data)[0][None]
    with torch.no_grad():
        outputs = scorer.model.head.outputs(scorer.model.forward_features(tensor))
    return {p: float(profile_score(outputs, scorer.model.cfg, p)[0]) for p in PROFILES}


def photos(n: int, start: int = 0) -> list[bytes]:
    return [make_image(size=(120, 90), seed=start + i) for i in range(n)]


def upload(data: bytes, name: str = "a.jpg"):
    return {"file": (name, data, "image/jpeg")}


def error_of(response, status: int, reason: str) -> dict:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"status", "reason", "message"} and (err["status"], err["reason"]) == (status, reason), err
    return err


def errors_total(client, reason: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for f in text_string_to_metric_families(client.get("/metrics").text) for s in f.samples
               if s.name == "resmemnet_errors_total" and s.labels.get("reason") == reason)


# -- the model and the Scorer ----------------------------------------------------------------
def test_profiles_differ_and_default_is_todays_score(scorer):
    images = torch.stack([scorer.prepare(d)[0] for d in photos(6)])
    with torch.no_grad():
        outputs = scorer.model.head.outputs(scorer.model.forward_features(images))
        today = scorer.model(images)
    table = scorer.profile_score_batch(images)
    assert scorer.profiles == PROFILES and table.shape == (6, 3) and table.dtype == torch.float32
    assert torch.allclose(table, profile_scores(outputs, scorer.model.cfg), atol=1e-6)
    assert torch.equal(scorer.score_tensor_batch(images), table[:, 0])
    assert torch.allclose(scorer.score_tensor_batch(images), today, atol=1e-6)
    for i, name in enumerate(PROFILES):
        assert torch.equal(scorer.score_tensor_batch(images, name), table[:, i])
    # the profiles really are different scores of these photos
    assert (table[:, 1] - table[:, 0]).abs().max() > 0.01 and (table[:, 2] - table[:, 0]).abs().max() > 0.01
    assert torch.equal(scorer.profile_score_batch(images, ["outdoor", "default"]), table[:, [2, 0]])


def test_a_model_without_a_teacher_output_has_only_default(plain_scorer):
    assert plain_scorer.profiles == ("default",)
    images = torch.rand(2, 3, 64, 64)
    assert plain_scorer.profile_score_batch(images).shape == (2, 1)
    for name in ("general", "outdoor", "nope"):
        with pytest.raises(ValueError, match="this model has default$"):
            plain_scorer.score_tensor_batch(images, name)


def test_unknown_profile_names_the_available_ones(scorer, tmp_path):
    with pytest.raises(ValueError, match="unknown profile 'teacher'; this model has default, general, outdoor"):
        scorer.check_profile("teacher")
    make_image(tmp_path / "a.jpg")
    with pytest.raises(ValueError, match="unknown profile"):
        next(scorer.score_paths([str(tmp_path / "a.jpg")], profile="teacher"))


def test_score_paths_gives_the_profiles_score_and_percentile(scorer, tmp_path):
    data = photos(1, start=20)[0]
    (tmp_path / "a.jpg").write_bytes(data)
    want = expected(scorer, data)
    for name in PROFILES:
        [row] = scorer.score_paths([str(tmp_path / "a.jpg")], profile=name)
        assert row.profile == name and row.score == pytest.approx(want[name], abs=TOL)
        assert row.percentile == scorer.meta.percentile(row.score, name)
    [bad] = scorer.score_paths([str(tmp_path / "missing.jpg")], profile="general")
    assert not bad.ok and bad.profile == "general"


def test_percentile_reads_the_profiles_own_quantiles(scorer):
    meta = scorer.meta
    assert meta.percentile(0.5) == 50.0 and meta.percentile(0.5, "general") == 50.0
    assert meta.percentile(0.4) == 40.0 and meta.percentile(0.4, "general") == 25.0
    assert meta.percentile(0.4, "outdoor") == 0.0 and meta.percentile(0.52, "outdoor") == 70.0
    no_outdoor = {**REFERENCE, "profiles": {"general": REFERENCE["profiles"]["general"]}}
    meta = type(meta)(**{**vars(meta), "reference": no_outdoor})
    assert meta.percentile(0.4, "outdoor") is None and meta.percentile(0.4) == 40.0
    assert type(meta)(**{**vars(meta), "reference": {}}).percentile(0.4, "general") is None


def test_onnxruntime_backend_scores_other_profiles_with_the_torch_model(scorer, profile_checkpoint):
    """The runner gives the default column; every other profile comes from the (lazily loaded) torch model."""
    from model.scoring import Scorer

    calls = []

    def runner(batch):
        calls.append(batch.shape)
        return np.full(batch.shape[0], 0.25, dtype=np.float32)

    onnx_like = Scorer(None, scorer.preprocessing, meta=scorer.meta, runner=runner, weights=profile_checkpoint,
                       mixed_precision=False)
    images = torch.stack([scorer.prepare(d)[0] for d in photos(3)])
    assert onnx_like.profiles == PROFILES and onnx_like._model is None  # known from the metadata alone
    assert torch.equal(onnx_like.score_tensor_batch(images), torch.full((3,), 0.25))
    assert onnx_like._model is None and len(calls) == 1
    table = onnx_like.profile_score_batch(images, ["general", "default", "outdoor"])
    assert torch.equal(table[:, 1], torch.full((3,), 0.25)) and len(calls) == 2
    assert torch.allclose(table[:, [0, 2]], scorer.profile_score_batch(images, ["general", "outdoor"]), atol=1e-6)
    # the torch model loaded inside inference mode still serves Grad-RAM (it needs gradients)
    assert not any(p.is_inference() for p in onnx_like.model.parameters())
    from model.gradram import grad_ram

    assert grad_ram(onnx_like.model, images[:1]) is not None


# -- the batcher -----------------------------------------------------------------------------
def test_batcher_runs_mixed_profiles_in_one_pass_and_each_image_gets_its_own():
    passes = []

    def score_batch(batch, profiles):
        passes.append((tuple(dict.fromkeys(profiles)), batch.shape[0]))
        offsets = {"default": 0.0, "general": 10.0, "outdoor": 20.0}
        return batch.mean(dim=(1, 2, 3)) + torch.tensor([offsets[n] for n in profiles])

    async def scenario():
        batcher = DynamicBatcher(score_batch, max_batch_size=8, max_wait_s=0.2)
        batcher.start()
        asked = [(0.1, "general"), (0.2, "default"), (0.3, "outdoor"), (0.4, "general")]
        results = await asyncio.gather(*(batcher.score(torch.full((3, 4, 4), v), p) for v, p in asked))
        alone = await batcher.score(torch.full((3, 4, 4), 0.5))
        await batcher.close(timeout=5)
        return results, alone

    results, alone = asyncio.run(scenario())
    assert [round(r.score, 5) for r in results] == [10.1, 0.2, 20.3, 10.4]
    assert all(r.batch_size == 4 for r in results)
    assert passes == [(("general", "default", "outdoor"), 4), (("default",), 1)]
    assert round(alone.score, 5) == 0.5  # a default-only batch is scored in the default profile


def test_a_scorer_that_refuses_a_profile_fails_that_request():
    """The batcher takes any profile; what the scoring callable refuses (Scorer.score_batch: an
    unknown profile) reaches the request that asked for it."""
    def default_only(batch, profiles):
        if set(profiles) != {"default"}:
            raise ValueError("this model scores only the 'default' profile")
        return batch.mean(dim=(1, 2, 3))

    async def scenario():
        batcher = DynamicBatcher(default_only)
        batcher.start()
        with pytest.raises(ValueError, match="only the 'default' profile"):
            await batcher.score(torch.zeros(3, 4, 4), "general")
        await batcher.close(timeout=5)

    asyncio.run(scenario())


def test_scorer_score_batch_gives_each_image_its_own_profile(scorer):
    images = torch.stack([scorer.prepare(d).tensor for d in photos(3, start=40)])
    table = scorer.profile_score_batch(images)  # (3, P): every profile of every image
    asked = ["outdoor", "default", "general"]
    got = scorer.score_batch(images, asked)
    assert got == [table[i, PROFILES.index(name)].item() for i, name in enumerate(asked)]


# -- HTTP ------------------------------------------------------------------------------------
def test_score_endpoint_gives_each_profiles_score(client, scorer):
    data = photos(1, start=30)[0]
    want = expected(scorer, data)
    plain = client.post("/score", files=upload(data)).json()
    assert plain["profile"] == "default" and plain["score"] == pytest.approx(want["default"], abs=TOL)
    for name in PROFILES:
        body = client.post("/score", params={"profile": name}, files=upload(data)).json()
        assert body["profile"] == name and body["score"] == pytest.approx(want[name], abs=TOL), body
        assert body["percentile"] == scorer.meta.percentile(body["score"], name)


def test_batch_endpoint_scores_every_file_with_the_profile(client, scorer):
    images = photos(3, start=40)
    files = [("files", (f"{i}.jpg", d, "image/jpeg")) for i, d in enumerate(images)]
    files.append(("files", ("notes.txt", b"not an image", "text/plain")))
    body = client.post("/score/batch", params={"profile": "general"}, files=files).json()
    assert body["profile"] == "general" and body["scored"] == 3 and body["failed"] == 1
    for item, data in zip(body["results"], images):
        assert item["score"] == pytest.approx(expected(scorer, data)["general"], abs=TOL)
        assert item["percentile"] == scorer.meta.percentile(item["score"], "general")
    assert client.post("/score/batch", files=files[:1]).json()["profile"] == "default"


def test_requests_of_different_profiles_share_batches_and_keep_their_scores(scorer):
    """In flight together, requests of every profile are batched together, and each gets the score
    it gets alone."""
    images = photos(6, start=50)
    asked = [PROFILES[i % 3] for i in range(6)]
    with serving(scorer, max_wait_ms=500, max_batch_size=8) as c:
        alone = [c.post("/score", params={"profile": p}, files=upload(d)).json()["score"]
                 for p, d in zip(asked, images)]
        barrier = threading.Barrier(6)

        def post(job):
            profile, data = job
            barrier.wait(timeout=30)
            return c.post("/score", params={"profile": profile}, files=upload(data)).json()

        with ThreadPoolExecutor(6) as pool:
            together = list(pool.map(post, zip(asked, images)))
    # two images of each profile: any batch of three holds two profiles at least
    assert max(b["timing"]["batch_size"] for b in together) >= 3
    assert [b["profile"] for b in together] == asked
    for body, score, profile, data in zip(together, alone, asked, images):
        assert body["score"] == pytest.approx(score, abs=TOL)
        assert body["score"] == pytest.approx(expected(scorer, data)[profile], abs=TOL)


@pytest.mark.parametrize("path", ["/score", "/score/batch", "/heatmap"])
def test_unknown_profile_is_422_unknown_profile_and_counted(client, path):
    field = "files" if path == "/score/batch" else "file"
    before = errors_total(client, "unknown_profile")
    r = client.post(path, params={"profile": "teacher"}, files={field: ("a.jpg", make_image(), "image/jpeg")})
    err = error_of(r, 422, "unknown_profile")
    assert "'teacher'" in err["message"] and "default, general, outdoor" in err["message"]
    assert errors_total(client, "unknown_profile") == before + 1


def test_a_model_without_a_teacher_output_refuses_other_profiles_over_http(plain_scorer):
    data = make_image(seed=3)
    with serving(plain_scorer) as c:
        assert c.post("/score", params={"profile": "default"}, files=upload(data)).json()["profile"] == "default"
        err = error_of(c.post("/score", params={"profile": "general"}, files=upload(data)), 422, "unknown_profile")
        assert err["message"].endswith("this model has default")
        error_of(c.post("/heatmap", params={"profile": "outdoor"}, files=upload(data)), 422, "unknown_profile")


def test_heatmap_works_for_every_profile(client, scorer):
    from PIL import Image

    data = photos(1, start=60)[0]
    want = expected(scorer, data)
    for name in PROFILES:
        r = client.post("/heatmap", params={"profile": name, "format": "map"}, files=upload(data))
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
        assert r.headers["X-Profile"] == name
        score = float(r.headers["X-Memorability-Score"])
        assert score == pytest.approx(want[name], abs=TOL)
        assert float(r.headers["X-Percentile"]) == pytest.approx(scorer.meta.percentile(score, name), abs=0.01)
        assert Image.open(io.BytesIO(r.content)).size == (120, 90)
    assert client.post("/heatmap", files=upload(data)).headers["X-Profile"] == "default"


def test_openapi_documents_the_profile_parameter_and_field(client):
    spec = client.get("/openapi.json").json()
    for path in ("/score", "/score/batch", "/heatmap"):
        params = {p["name"]: p for p in spec["paths"][path]["post"]["parameters"]}
        assert params["profile"]["schema"]["default"] == "default" and "general" in params["profile"]["description"]
    assert "profile" in spec["components"]["schemas"]["ScoreResponse"]["properties"]
    assert "X-Profile" in spec["paths"]["/heatmap"]["post"]["responses"]["200"]["headers"]
    assert "unknown_profile" in json.dumps(spec["paths"]["/score"]["post"]["responses"]["422"])


# -- Grad-RAM --------------------------------------------------------------------------------
def test_gradram_targets_the_profiles_score(scorer):
    from model.gradram import grad_ram

    images = torch.stack([scorer.prepare(d)[0] for d in photos(2, start=70)])
    table = scorer.profile_score_batch(images)
    maps = {}
    for i, name in enumerate(PROFILES):
        maps[name], scores = grad_ram(scorer.model, images, profile=name)
        assert torch.allclose(scores, table[:, i], atol=TOL)
    default_maps, _ = grad_ram(scorer.model, images)
    assert torch.equal(default_maps, maps["default"])
    assert not torch.allclose(maps["general"], maps["default"])  # another target, another map
    with pytest.raises(ValueError, match="unknown profile"):
        grad_ram(scorer.model, images, profile="teacher")


# -- command line ----------------------------------------------------------------------------
def test_cli_score_profile_reaches_json_and_leaves_csv_columns_alone(profile_checkpoint, scorer, tmp_path, capsys):
    data = photos(1, start=80)[0]
    (tmp_path / "a.jpg").write_bytes(data)
    want = expected(scorer, data)
    argv = ["score", str(tmp_path / "a.jpg"), str(tmp_path / "gone.jpg"), "--weights", str(profile_checkpoint),
            "--no-progress", "--fp32", "--profile", "general"]
    assert main([*argv, "--out", str(tmp_path / "s.json")]) == 1
    good, missing = json.loads((tmp_path / "s.json").read_text())
    assert good["profile"] == missing["profile"] == "general"
    assert good["score"] == pytest.approx(want["general"], abs=TOL)
    assert good["percentile"] == scorer.meta.percentile(good["score"], "general")
    assert "(profile general)" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "s.csv")]) == 1
    with open(tmp_path / "s.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert tuple(reader.fieldnames) == ("path", "score", "percentile", "warnings", "width", "height", "error", "reason")
    assert float(rows[0]["score"]) == pytest.approx(want["general"], abs=1e-5)
    assert main(["score", str(tmp_path / "a.jpg"), "--weights", str(profile_checkpoint), "--fp32", "--backend", "torch",
                 "--out", str(tmp_path / "d.json")]) == 0
    [row] = json.loads((tmp_path / "d.json").read_text())
    assert row["profile"] == "default" and row["score"] == pytest.approx(want["default"], abs=TOL)


@pytest.mark.parametrize("command", ["score", "heatmap"])
def test_cli_unknown_profile_is_one_error_line_and_exit_2(command, tiny_checkpoint, tmp_path, capsys):
    make_image(tmp_path / "a.jpg")
    argv = [command, str(tmp_path / "a.jpg"), "--weights", str(tiny_checkpoint), "--profile", "general"]
    if command == "heatmap":
        argv += ["-o", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("resmemnet: error: --profile: unknown profile 'general'") and len(err.splitlines()) == 1
    assert "this model has default" in err
    assert not (tmp_path / "out").exists()  # a usage error leaves no output folder behind


def test_cli_heatmap_profile(profile_checkpoint, scorer, tmp_path, capsys):
    data = photos(1, start=90)[0]
    (tmp_path / "a.jpg").write_bytes(data)
    assert main(["heatmap", str(tmp_path / "a.jpg"), "-o", str(tmp_path / "o"), "--weights", str(profile_checkpoint),
                 "--device", "cpu", "--profile", "outdoor", "--precision", "fp32"]) == 0
    captured = capsys.readouterr()
    printed = float(captured.out.split("(score ")[1].split(")")[0])
    assert (tmp_path / "o" / "a.overlay.png").is_file() and "(profile outdoor)" in captured.err
    # fp32 both sides (`expected` is fp32); the score is printed with 6 decimals
    assert printed == pytest.approx(expected(scorer, data)["outdoor"], abs=1e-5)


def test_info_lists_the_profiles(profile_checkpoint, tiny_checkpoint, capsys):
    assert main(["info", "--weights", str(profile_checkpoint)]) == 0
    assert "profiles    default, general, outdoor (" in capsys.readouterr().out
    assert main(["info", "--weights", str(tiny_checkpoint)]) == 0
    assert "profiles    default (" in capsys.readouterr().out


def test_readyz_lists_the_profiles_with_descriptions_and_measured_numbers(client, scorer):
    """/readyz names every profile (default first), what it is for, whether it has a percentile,
    and the metadata's measured numbers (none for this test checkpoint)."""
    from model.profiles import profile_specs

    body = client.get("/readyz").json()
    rows = {p["name"]: p for p in body["profiles"]}
    assert [p["name"] for p in body["profiles"]] == list(scorer.profiles) and body["profiles"][0]["name"] == "default"
    for spec in profile_specs(scorer.config):
        row = rows[spec.name]
        assert row["description"] == spec.description
        assert row["alias_of"] == (spec.inputs[0] if spec.kind == "alias" else None)
        assert row["has_percentile"] == (scorer.percentile(0.5, spec.name) is not None)
        assert row["measured"] is None
    measured = {"within_cv": {"lnsim": 0.58}, "loso": {"cdm": 0.2}, "teacher_agreement": 0.9}
    scorer.meta.metrics["profiles"] = {"default": measured}
    try:
        assert client.get("/readyz").json()["profiles"][0]["measured"] == measured
    finally:
        del scorer.meta.metrics["profiles"]
