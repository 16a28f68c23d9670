"""Long fuzz run of the upload/decode path (the bounded one is tests/test_fuzz.py).

    python bench/fuzz.py --count 20000 --app-count 2000 --seed 1 --out fuzz.json

First the hostile kinds of bench/hostile_inputs.py (metadata bombs, thousands of frames or pages,
repeated structure) at the size of the upload limit (about 20 MB, or 1 GiB of inflated text),
each once through decode_image() and once through the app's /score with the default limits:
outcome, seconds and the process's resident memory are recorded (--hostile-only stops there).
Then random mutations (bit flips, byte sets, inserts, deletes, truncation, repeats, header bytes)
of valid PNG/JPEG/GIF/TIFF/WebP/BMP/PGM/HEIC/AVIF/JPEG 2000 seeds (16-bit, float, ICC, EXIF,
alpha, frames among them) and of the hostile kinds at small sizes go through decode_image(), and
a share of them through the app in-process (a random-trunk model at 64 px, /score, /score/batch
and /heatmap, random part names and content types). A finding is anything but an RGB image / a
score in [0, 1] or a clean refusal: an exception other than ImageDecodeError, a 5xx, a non-JSON
error, a non-finite score, a hostile kind answered otherwise than bench/hostile_inputs.py says,
or one input taking over --slow-s seconds. Findings are written to --findings (one file per
input) and listed in the JSON summary with the outcome counts and the slowest inputs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def mutate(rng: random.Random, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(rng.randint(1, 8)):
        if not data:
            break
        n, pos = len(data), rng.randrange(len(data))
        kind = rng.choice(("flip", "set", "insert", "delete", "truncate", "repeat", "header", "header"))
        if kind == "flip":
            data[pos] ^= 1 << rng.randrange(8)
        elif kind == "set":
            data[pos] = rng.choice((0, 1, 0x7F, 0x80, 0xFF))
        elif kind == "insert":
            data[pos:pos] = os.urandom(rng.randint(1, 16))
        elif kind == "delete":
            del data[pos:pos + rng.randint(1, 64)]
        elif kind == "truncate":
            del data[pos:]
        elif kind == "repeat":
            data[pos:pos] = data[pos:pos + rng.randint(1, 64)]
        else:
            data[rng.randrange(min(n, 64))] = rng.randrange(256)
    return bytes(data)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=20000, help="inputs through decode_image()")
    p.add_argument("--app-count", type=int, default=2000, help="of those, inputs also sent through the app")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-seconds", type=float, default=1800, help="stop after this long whatever the count")
    p.add_argument("--slow-s", type=float, default=5.0, help="an input taking longer is a finding (a hang)")
    p.add_argument("--findings", type=Path, default=Path("fuzz-findings"))
    p.add_argument("--out", type=Path, help="JSON summary")
    p.add_argument("--hostile-only", action="store_true", help="only the hostile kinds at full size")
    p.add_argument("--multipart-count", type=int, default=500,
                   help="multipart bodies of random structure (many parts, many fields, long headers) through the app")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    warnings.simplefilter("ignore")

    import torch

    torch.set_num_threads(1)
    from fastapi.testclient import TestClient

    from app.service import create_app
    from app.settings import ServiceSettings
    from hostile_inputs import HOSTILE
    from model.scoring import Scorer
    from test_fuzz import MAX_PIXELS, REASONS, SEEDS, check_decode

    ckpt = _tiny_checkpoint(Path(tempfile.mkdtemp(prefix="fuzz-ckpt-")))
    scorer = Scorer.from_checkpoint(ckpt, device="cpu")
    app = create_app(ServiceSettings(warmup=False, max_pixels=MAX_PIXELS, max_upload_bytes=200_000), scorer=scorer)
    findings = []
    hostile = _hostile_pass(scorer, HOSTILE, findings, args)
    if args.hostile_only:
        return _finish(args, argv, {"hostile": hostile, "findings": findings})
    pool = SEEDS + [make(1) for make, _, _ in HOSTILE.values()]
    rng = random.Random(args.seed)
    outcomes, app_outcomes, slowest = Counter(), Counter(), []
    started = time.perf_counter()
    app_every = max(1, args.count // max(1, args.app_count))
    done = 0
    with TestClient(app, raise_server_exceptions=False) as client:
        while client.get("/readyz").status_code != 200:
            time.sleep(0.05)
        for i in range(args.count):
            if time.perf_counter() - started > args.max_seconds:
                break
            data = mutate(rng, rng.choice(pool))
            t0 = time.perf_counter()
            try:
                outcomes[check_decode(data)] += 1
            except Exception:
                findings.append(_record(args.findings, i, data, "decode", traceback.format_exc(limit=4)))
                outcomes["FINDING"] += 1
            elapsed = time.perf_counter() - t0
            slowest = sorted(slowest + [(elapsed, i, len(data))], reverse=True)[:5]
            if elapsed > args.slow_s:
                findings.append(_record(args.findings, i, data, "slow", f"{elapsed:.1f} s"))
            if i % app_every == 0:
                path = rng.choice(("/score", "/score/batch", "/heatmap"))
                field = "files" if path == "/score/batch" else "file"
                ctype = rng.choice(("image/png", "image/jpeg", "application/octet-stream", "text/plain", None))
                name = "".join(rng.choice("abc.é €_-/\\ 01") for _ in range(rng.randint(0, 20))) or "x"
                r = client.post(path, files={field: (name, data, ctype)})
                problem = _judge(path, r, REASONS)
                app_outcomes[f"{path} {r.status_code}"] += 1
                if problem:
                    findings.append(_record(args.findings, i, data, f"app {path}", problem))
            done += 1
        multipart_outcomes = fuzz_multipart(client, rng, args.multipart_count, findings, args.findings, args.slow_s)
    wall = time.perf_counter() - started
    return _finish(args, argv, {
        "hostile": hostile, "inputs": done, "app_requests": sum(app_outcomes.values()), "seconds": round(wall, 1),
        "decode_outcomes": dict(outcomes.most_common()), "app_outcomes": dict(sorted(app_outcomes.items())),
        "multipart_outcomes": dict(sorted(multipart_outcomes.items())),
        "findings": findings, "slowest_s": [{"seconds": round(s, 3), "input": i, "bytes": n} for s, i, n in slowest],
    })


def _finish(args, argv, summary: dict) -> int:
    summary["command"] = "python bench/fuzz.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 1 if summary["findings"] else 0


# Scales that bring each hostile kind to about the 20 MiB upload limit (or 1 GiB of inflated text).
FULL_SCALE = {"png_ztxt_bomb": 16, "png_itxt_bomb": 16, "png_iccp_bomb": 16, "png_many_chunks": 16,
              "png_many_chunks_after_idat": 16, "jpeg_many_segments": 500, "jpeg_fill_bytes": 100,
              "gif_header_blocks": 66, "gif_many_frames": 13, "gif_tiny_subblocks": 40, "tiff_many_pages": 8, "webp_many_frames": 10}


def _rss_mib() -> float:
    """Resident memory of this process now (Linux), MiB."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _hostile_pass(scorer, kinds: dict, findings: list, args) -> list[dict]:
    """Each hostile kind at full size, through decode_image() and through /score (default limits)."""
    from fastapi.testclient import TestClient

    from app.service import create_app
    from app.settings import ServiceSettings
    from model.preprocess import ImageDecodeError, decode_image

    rows = []
    app = create_app(ServiceSettings(warmup=False), scorer=scorer)
    with TestClient(app, raise_server_exceptions=False) as client:
        while client.get("/readyz").status_code != 200:
            time.sleep(0.05)
        for name, (make, expected, frames) in kinds.items():
            data = make(FULL_SCALE.get(name, 1))
            rss_before = _rss_mib()
            t0 = time.perf_counter()
            try:
                got = decode_image(data)
                outcome, detail = "ok", got.info["n_frames"]
                del got
            except ImageDecodeError as exc:
                outcome, detail = exc.reason, exc.message
            decode_s = time.perf_counter() - t0
            rss_after = _rss_mib()
            t0 = time.perf_counter()
            r = client.post("/score", files={"file": (name, data, "application/octet-stream")})
            app_s = time.perf_counter() - t0
            answer = r.json().get("warnings") if r.status_code == 200 else r.json().get("error", {}).get("reason")
            row = {"kind": name, "bytes": len(data), "decode": outcome, "detail": detail, "decode_s": round(decode_s, 3),
                   "rss_mib_before": round(rss_before, 1), "rss_mib_after": round(rss_after, 1),
                   "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                   "app_status": r.status_code, "app_answer": answer, "app_s": round(app_s, 3)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if outcome != expected or (frames is not None and detail != frames) or r.status_code >= 500:
                findings.append({"input": name, "where": "hostile", "what": f"expected {expected}: {row}"})
            if max(decode_s, app_s) > args.slow_s:
                findings.append({"input": name, "where": "hostile", "what": f"slow: {row}"})
            del data
    return rows


def fuzz_multipart(client, rng: random.Random, count: int, findings: list, folder: Path, slow_s: float) -> Counter:
    """`count` random_multipart bodies through the app: each must get a JSON answer (no 5xx) in
    under `slow_s` seconds; findings are appended as for the decode fuzzing."""
    from test_fuzz import REASONS, SEEDS
    from test_request_limits import random_multipart

    outcomes = Counter()
    image = SEEDS[0]
    for i in range(count):
        path, body, boundary = random_multipart(rng, image)
        t0 = time.perf_counter()
        r = client.post(path, content=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        elapsed = time.perf_counter() - t0
        reason = r.json().get("error", {}).get("reason", "?") if r.status_code != 200 and _is_json(r) else ""
        outcomes[f"{path} {r.status_code} {reason}".strip()] += 1
        problem = _judge(path, r, REASONS)
        if elapsed > slow_s:
            problem = f"took {elapsed:.1f} s"
        if problem:
            findings.append(_record(folder, 1_000_000 + i, body[:65536], f"multipart {path}", problem))
    return outcomes


def _is_json(r) -> bool:
    return r.headers.get("content-type", "").startswith("application/json")


def _judge(path: str, r, reasons) -> str | None:
    if r.status_code >= 500:
        return f"{r.status_code}: {r.text[:300]}"
    if r.status_code != 200:
        try:
            error = r.json()["error"]
            assert error["status"] == r.status_code and error["reason"]
        except Exception:
            return f"{r.status_code} without the JSON error body: {r.text[:300]}"
        return None
    if path == "/heatmap":
        score = float(r.headers.get("X-Memorability-Score", "nan"))
    else:
        body = r.json()
        item = body["results"][0] if path == "/score/batch" else body
        if path == "/score/batch" and not item["ok"]:
            return None if item["error"]["reason"] in reasons | {"upload_too_large"} else f"odd item {item}"
        score = item["score"]
    return None if math.isfinite(score) and 0.0 <= score <= 1.0 else f"score {score}"


def _record(folder: Path, i: int, data: bytes, where: str, what: str) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"input-{i:06d}.bin"
    path.write_bytes(data)
    return {"input": i, "where": where, "what": what, "file": str(path)}


def _tiny_checkpoint(folder: Path) -> Path:
    import torch

    from model.trunks import TrunkSource
    from model.checkpoint import CheckpointMeta, save_checkpoint
    from model.network import build_resmemnet
    from model.preprocess import Preprocessing, ResizePolicy

    torch.manual_seed(0)
    model = build_resmemnet(backbone="resnet50")
    pre = Preprocessing(resize=ResizePolicy(size=64, multiple=32), input_scaling="imagenet")
    meta = CheckpointMeta(name="fuzz-random", architecture=model.cfg, preprocessing=pre,
                          trunk=TrunkSource(kind="none", depth="resnet50"), trunk_embedded=True,
                          description="random weights for fuzzing", license="test only")
    return save_checkpoint(model, meta, folder / "fuzz-random.json", embed_trunk=True)


if __name__ == "__main__":
    raise SystemExit(main())
