"""Soak / overload benchmark of `resmemnet serve` on 127.0.0.1 (bounded in time and count).

    python bench/soak.py --minutes 3 --overload 2 --out soak.json            # the shipped checkpoint
    python bench/soak.py --tiny --minutes 1                                  # a quick run, random 64-px model

1. Starts `resmemnet serve` on a free loopback port (RESMEMNET_* settings, as the container).
2. Scores every test image with an in-process Scorer of the same checkpoint: the expected scores.
3. Measures capacity: closed loop, --clients clients on /score for --capacity-s seconds (images/s).
4. Overload: open loop (Poisson arrivals) at --overload x capacity for --minutes, mixed traffic:
   /score 55%, /score/batch of 2-4 images 15%, /heatmap 10%, bad uploads 20% (text, empty,
   truncated JPEG, wrong field, two files to /score, and the refused kinds of
   bench/hostile_inputs.py: metadata bombs, repeated structure). At most --max-requests requests are sent.
Reported: answers by status (the goal: only 200, the expected 4xx, and 503 with Retry-After; no
timeouts, resets or 5xx), p50/p99 latency of the 200s per endpoint, the server's resident memory
before the overload, once warm (after the first 20% of the overload, when every endpoint and
error path has run under load), its peak and at the end (goal: end under 5% above warm), and
whether every answered score equals the expected score for that file (within --tolerance).
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
from load_test import DEFAULT_IMAGES, list_images, percentile, spawned_server  # noqa: E402


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def bad_uploads(good: bytes) -> list[tuple[str, dict, tuple[int, str]]]:
    """(endpoint, httpx files=, expected (status, reason))."""
    return [
        ("/score", {"file": ("notes.txt", b"not an image at all", "text/plain")}, (415, "not_an_image")),
        ("/score", {"file": ("empty.jpg", b"", "image/jpeg")}, (422, "empty")),
        ("/score", {"file": ("cut.jpg", good[: len(good) // 3], "image/jpeg")}, (422, "corrupt")),
        ("/score", {"image": ("a.jpg", good, "image/jpeg")}, (422, "invalid_request")),
        ("/score", [("file", ("a.jpg", good, "image/jpeg")), ("file", ("b.jpg", good, "image/jpeg"))],
         (422, "multiple_files")),
        ("/heatmap", {"file": ("notes.txt", b"plain text", "text/plain")}, (415, "not_an_image")),
    ] + hostile_uploads()


def hostile_uploads() -> list[tuple[str, dict, tuple[int, str]]]:
    """bench/hostile_inputs.py's kinds that are refused (metadata bombs, repeated structure), at test size."""
    from hostile_inputs import HOSTILE

    return [("/score", {"file": (name, make(1), "application/octet-stream")}, (422, expected))
            for name, (make, expected, _) in HOSTILE.items() if expected != "ok"]


async def closed_loop(url: str, payloads, *, clients: int, seconds: float) -> float:
    import httpx

    ok = 0
    stop = time.perf_counter() + seconds

    async def loop(client, k):
        nonlocal ok
        i = k
        while time.perf_counter() < stop:
            name, data, _ = payloads[i % len(payloads)]
            i += clients
            r = await client.post("/score", files={"file": (name, data, "application/octet-stream")})
            ok += r.status_code == 200

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=clients)) as client:
        started = time.perf_counter()
        await asyncio.gather(*(loop(client, k) for k in range(clients)))
        return ok / (time.perf_counter() - started)


async def overload(url: str, payloads, bad, *, rate: float, seconds: float, max_requests: int, pid: int,
                   tolerance: float, seed: int, timeout: float) -> dict:
    import httpx

    rng = random.Random(seed)
    statuses: Counter = Counter()
    latencies: dict[str, list[float]] = defaultdict(list)
    problems: list[str] = []
    compared, max_diff = 0, 0.0
    rss = {"before_overload": rss_mib(pid), "peak": rss_mib(pid)}
    timeline: list[tuple[float, float]] = []  # (seconds into the overload, RSS MiB) every 15 s

    def check_score(name: str, score: float):
        nonlocal compared, max_diff
        want = payloads_by_name[name]
        diff = abs(score - want)
        compared += 1
        max_diff = max(max_diff, diff)
        if diff > tolerance:
            problems.append(f"{name}: answered {score:.6f}, the scorer says {want:.6f}")

    payloads_by_name = {name: expected for name, _, expected in payloads}

    async def one(client, kind: str):
        started = time.perf_counter()
        try:
            if kind == "score":
                name, data, _ = rng.choice(payloads)
                r = await client.post("/score", files={"file": (name, data, "application/octet-stream")})
                if r.status_code == 200:
                    check_score(name, r.json()["score"])
            elif kind == "batch":
                chosen = rng.sample(payloads, rng.randint(2, 4))
                r = await client.post("/score/batch", files=[("files", (n, d, "application/octet-stream"))
                                                             for n, d, _ in chosen])
                if r.status_code == 200:
                    for item in r.json()["results"]:
                        if item["ok"]:
                            check_score(item["filename"], item["score"])
                        else:
                            problems.append(f"batch item refused: {item['error']}")
            elif kind == "heatmap":
                name, data, _ = rng.choice(payloads)
                r = await client.post("/heatmap", params={"format": "map"},
                                      files={"file": (name, data, "application/octet-stream")})
                if r.status_code == 200:
                    check_score(name, float(r.headers["x-memorability-score"]))
            else:
                path, files, (status, reason) = rng.choice(bad)
                r = await client.post(path, files=files)
                if r.status_code != 503 and (r.status_code, r.json()["error"]["reason"]) != (status, reason):
                    problems.append(f"bad upload to {path}: {r.status_code} {r.text[:200]}, expected {status} {reason}")
            key = f"{kind} {r.status_code}"
            if r.status_code == 503 and "retry-after" not in r.headers:
                key += " (no Retry-After!)"
            statuses[key] += 1
            if r.status_code == 200:
                latencies[kind].append(time.perf_counter() - started)
            if r.status_code >= 500 and r.status_code != 503:
                problems.append(f"{kind}: {r.status_code} {r.text[:200]}")
        except httpx.HTTPError as exc:
            statuses[f"{kind} {type(exc).__name__}"] += 1
            problems.append(f"{kind}: {type(exc).__name__}: {exc}")

    kinds = ["score"] * 55 + ["batch"] * 15 + ["heatmap"] * 10 + ["bad"] * 20
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=64)
    tasks = []
    warm_after_s = 0.2 * seconds
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        started = time.perf_counter()
        next_at, next_rss = started, started
        while time.perf_counter() - started < seconds and len(tasks) < max_requests:
            now = time.perf_counter()
            if now >= next_rss:
                rss["peak"] = max(rss["peak"], rss_mib(pid))
                if "warm" not in rss and now - started >= warm_after_s:
                    rss["warm"] = rss_mib(pid)  # every endpoint and error path has run under load by now
                if not timeline or now - started - timeline[-1][0] >= 15:
                    timeline.append((round(now - started), round(rss_mib(pid))))
                next_rss = now + 2.0
            if now < next_at:
                await asyncio.sleep(min(next_at - now, 0.05))
                continue
            tasks.append(asyncio.create_task(one(client, rng.choice(kinds))))
            next_at += rng.expovariate(rate)
        sent_s = time.perf_counter() - started
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - started
    rss["end"] = rss_mib(pid)
    rss["peak"] = max(rss["peak"], rss["end"])
    rss.setdefault("warm", rss["before_overload"])
    return {
        "requests": len(tasks), "sending_s": round(sent_s, 1), "wall_s": round(wall, 1),
        "offered_per_s": round(len(tasks) / sent_s, 2) if sent_s else 0.0,
        "answers": dict(sorted(statuses.items())),
        "latency_ms_of_200s": {k: {"n": len(v), "p50": round(1000 * percentile(sorted(v), 50), 1),
                                   "p99": round(1000 * percentile(sorted(v), 99), 1)} for k, v in latencies.items()},
        "rss_mib": {k: round(v, 1) for k, v in rss.items()},
        "rss_growth_pct": round(100 * (rss["end"] - rss["warm"]) / rss["warm"], 2),  # end vs warm
        "rss_timeline_s_mib": timeline,
        "scores_compared": compared, "max_score_diff": max_diff, "problems": problems[:50],
        "problem_count": len(problems),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=str(REPO / "weights" / "resmemnet-default.json"))
    p.add_argument("--tiny", action="store_true", help="a random-trunk 64-px model instead (quick runs)")
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="photos to send (default: ../shared/data/pool)")
    p.add_argument("--n-images", type=int, default=24)
    p.add_argument("--clients", type=int, default=8, help="closed-loop clients for the capacity measurement")
    p.add_argument("--capacity-s", type=float, default=30)
    p.add_argument("--overload", type=float, default=2.0, help="offered load as a multiple of capacity")
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--max-requests", type=int, default=20000)
    p.add_argument("--timeout", type=float, default=120, help="client timeout per request, seconds")
    p.add_argument("--tolerance", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    p.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra RESMEMNET_* settings, e.g. queue_size=64")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="other environment for the server process, e.g. MALLOC_ARENA_MAX=2")
    p.add_argument("--attacks", action="store_true",
                   help="instead of capacity and overload: the kinds of bench/attacks.py beside a victim load")
    p.add_argument("--attack-s", type=float, default=20, help="seconds per attack kind (and for the baseline)")
    p.add_argument("--attack-kinds", nargs="+", default=None, metavar="KIND", help="a subset of bench/attacks.py KINDS")
    p.add_argument("--slowloris-connections", type=int, default=300)
    args = p.parse_args(argv)

    weights = args.weights
    if args.tiny:
        from fuzz import _tiny_checkpoint

        weights = str(_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="soak-ckpt-"))))
    payload_files = list_images(args.images, args.n_images) if Path(args.images).is_dir() else []
    payloads = [(f.name, f.read_bytes()) for f in payload_files]
    if not payloads:
        payloads = [(f"gen{i}.png", _generated(i)) for i in range(args.n_images)]

    from model.scoring import Scorer

    scorer = Scorer.from_checkpoint(weights, device="cpu")
    expected = [scorer.score_tensors([scorer.prepare(data)[0]])[0] for _, data in payloads]
    del scorer
    payloads = [(name, data, want) for (name, data), want in zip(payloads, expected)]
    settings = dict(kv.split("=", 1) for kv in args.server_env)
    log = Path(tempfile.mkdtemp(prefix="soak-")) / "server.log"
    os.environ.update(dict(kv.split("=", 1) for kv in args.env))  # inherited by the server only
    with spawned_server(weights, "cpu", log_path=log, **settings) as (url, proc):
        if args.attacks:
            return attack_report(args, url, proc, payloads, log, argv)
        capacity = asyncio.run(closed_loop(url, payloads, clients=args.clients, seconds=args.capacity_s))
        rate = max(0.5, args.overload * capacity)
        result = asyncio.run(overload(url, payloads, bad_uploads(payloads[0][1]), rate=rate,
                                      seconds=args.minutes * 60, max_requests=args.max_requests, pid=proc.pid,
                                      tolerance=args.tolerance, seed=args.seed, timeout=args.timeout))
    summary = {"weights": Path(weights).name, "env": args.env, "images": len(payloads), "capacity_images_per_s": round(capacity, 2),
               "target_per_s": round(rate, 2), **result, "server_log_tail": log.read_text()[-1500:],
               "command": "python bench/soak.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    bad = result["problem_count"] or result["rss_growth_pct"] >= 5
    return 1 if bad else 0


def attack_report(args, url: str, proc, payloads, log: Path, argv) -> int:
    """bench/attacks.py against the running server; 1 if any answer was a 5xx or not JSON, or a
    victim request failed."""
    import attacks

    report = asyncio.run(attacks.run(url, proc.pid, payloads, rss_mib=rss_mib, seconds=args.attack_s,
                                     batch_limit=int(dict(kv.split("=", 1) for kv in args.server_env).get(
                                         "max_files_per_request", 32)),
                                     kinds=tuple(args.attack_kinds or attacks.KINDS),
                                     slowloris_connections=args.slowloris_connections))
    report["server_log_tail"] = log.read_text()[-1500:]
    report["command"] = "python bench/soak.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    bad = [k for k, v in report["kinds"].items() if v["victims"]["errors"] or any(
        o.startswith("5") or o.endswith(" other") for o in v["attacker"]["outcomes"])]
    return 1 if bad else 0


def _generated(i: int) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (180, 240, 3), dtype=np.uint8), "RGB").save(buf, format="JPEG")
    return buf.getvalue()


if __name__ == "__main__":
    raise SystemExit(main())
