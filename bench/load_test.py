"""Load generator for the scoring service: N concurrent clients POSTing real photos over HTTP.

    # against a running server
    python bench/load_test.py load --url http://127.0.0.1:8000 --clients 16 --requests 200

    # raw model throughput of the batch scorer (what `resmemnet score --batch-size 16` does, minus model loading)
    python bench/load_test.py baseline --weights weights/resmemnet-default.json --batch-size 16

    # the whole comparison: batch scorer, then `resmemnet serve` with batching on and off (max batch 1),
    # each at 1 and 16 clients; prints a Markdown table and writes JSON
    python bench/load_test.py compare --weights weights/resmemnet-default.json --clients 1,16 --out bench.json

Each client sends its next request as soon as the previous one is answered (closed loop). Reported:
images/s (successful answers per wall-clock second), p50/p95/p99 latency, non-200 answers, and from
the server's /metrics the mean batch size, queue wait and forward-pass time of the run.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "pool"


# -- inputs ----------------------------------------------------------------------------------
def list_images(folder: Path, limit: int) -> list[Path]:
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
    if not files:
        raise SystemExit(f"no images in {folder}")
    # spread over the folder (its files are grouped by source set), deterministic
    step = max(1, len(files) // limit)
    return files[::step][:limit]


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[index]


# -- HTTP load -------------------------------------------------------------------------------
async def drive(url: str, payloads: list[tuple[str, bytes]], *, clients: int, requests: int,
                timeout: float = 300.0) -> dict:
    import httpx

    latencies: list[float] = []
    statuses: dict[int | str, int] = {}
    counter = itertools.count()

    async def client_loop(client):
        while (i := next(counter)) < requests:
            name, data = payloads[i % len(payloads)]
            started = time.perf_counter()
            try:
                r = await client.post("/score", files={"file": (name, data, "image/jpeg")})
                status = r.status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            elapsed = time.perf_counter() - started
            statuses[status] = statuses.get(status, 0) + 1
            if status == 200:
                latencies.append(elapsed)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        wall = time.perf_counter() - started
    latencies.sort()
    ok = statuses.get(200, 0)
    return {
        "clients": clients, "requests": requests, "ok": ok, "statuses": {str(k): v for k, v in statuses.items()},
        "wall_s": round(wall, 3), "images_per_s": round(ok / wall, 3) if wall > 0 else 0.0,
        "p50_ms": round(1000 * percentile(latencies, 50), 1), "p95_ms": round(1000 * percentile(latencies, 95), 1),
        "p99_ms": round(1000 * percentile(latencies, 99), 1), "latencies": latencies,
    }


def server_counters(url: str) -> dict:
    """Sums from /metrics, to turn into per-run means by differencing."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=30).text
    wanted = {"resmemnet_batch_size_sum", "resmemnet_batch_size_count", "resmemnet_queue_wait_seconds_sum",
              "resmemnet_queue_wait_seconds_count", "resmemnet_model_inference_seconds_sum",
              "process_cpu_seconds_total"}
    out = dict.fromkeys(wanted, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                out[sample.name] += sample.value
    return out


def run_load(url: str, files: list[Path], *, clients: int, requests: int, warmup: int) -> dict:
    payloads = [(p.name, p.read_bytes()) for p in files]
    if warmup:
        asyncio.run(drive(url, payloads, clients=clients, requests=warmup))
    before = server_counters(url)
    client_cpu = time.process_time()
    result = asyncio.run(drive(url, payloads, clients=clients, requests=requests))
    client_cpu = time.process_time() - client_cpu
    after = server_counters(url)
    d = {k: after[k] - before[k] for k in after}
    if result["ok"]:
        # CPU time is far less sensitive than wall time to other processes on a shared machine.
        result["server_cpu_ms_per_image"] = round(1000 * d["process_cpu_seconds_total"] / result["ok"], 1)
        result["client_cpu_ms_per_image"] = round(1000 * client_cpu / result["ok"], 1)
    batches = d["resmemnet_batch_size_count"]
    if batches:
        result["mean_batch_size"] = round(d["resmemnet_batch_size_sum"] / batches, 2)
        result["mean_model_ms"] = round(1000 * d["resmemnet_model_inference_seconds_sum"] / batches, 1)
    if d["resmemnet_queue_wait_seconds_count"]:
        result["mean_queue_wait_ms"] = round(
            1000 * d["resmemnet_queue_wait_seconds_sum"] / d["resmemnet_queue_wait_seconds_count"], 1)
    return result


# -- the real server -------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command() -> list[str]:
    script = Path(sys.executable).parent / "resmemnet"
    return [str(script), "serve"] if script.exists() else [sys.executable, "-m", "app.cli", "serve"]


@contextmanager
def spawned_server(weights: str, device: str, *, log_path: Path | None = None, **settings):
    """`resmemnet serve` on a free loopback port, configured like the container (RESMEMNET_* variables);
    yields (url, process). Its output goes to `log_path` (default: a temporary file)."""
    import httpx

    port = free_port()
    env = {**os.environ, "RESMEMNET_HOST": "127.0.0.1", "RESMEMNET_PORT": str(port), "RESMEMNET_WEIGHTS": weights,
           "RESMEMNET_DEVICE": device, "RESMEMNET_LOG_LEVEL": "warning"}
    env.update({f"RESMEMNET_{k.upper()}": str(v) for k, v in settings.items()})
    log = open(log_path, "wb") if log_path else tempfile.NamedTemporaryFile(prefix="resmemnet-bench-", suffix=".log",
                                                                              delete=False)
    proc = subprocess.Popen(serve_command(), env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"server exited ({proc.returncode}); log: {Path(log.name).read_text()[-2000:]}")
            try:
                if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("server did not get ready in 10 minutes")
            time.sleep(0.2)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()


# -- the batch scorer --------------------------------------------------------------------------
def load_scorer(weights: str, device: str, batch_size: int):
    from model.scoring import Scorer

    return Scorer.from_checkpoint(weights, device=device, max_batch=batch_size)


def run_baseline(scorer, files: list[Path], *, batch_size: int, workers: int = 2, warmup: int = 16,
                 threads: int = 0) -> dict:
    """Images/s of Scorer.score_paths (the `resmemnet score` code path), model loading excluded.
    threads: torch intra-op threads for this run (0: leave as is)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    paths = [str(p) for p in files]
    if warmup:
        list(scorer.score_paths(paths[:warmup], batch_size=batch_size, workers=workers))
    started, cpu = time.perf_counter(), time.process_time()
    rows = list(scorer.score_paths(paths, batch_size=batch_size, workers=workers))
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    ok = sum(r.ok for r in rows)
    return {"images": len(rows), "ok": ok, "batch_size": batch_size, "wall_s": round(wall, 3),
            "torch_threads": torch.get_num_threads(),
            "images_per_s": round(ok / wall, 3), "cpu_ms_per_image": round(1000 * cpu / max(ok, 1), 1)}


# -- commands ---------------------------------------------------------------------------------
def cmd_load(args) -> dict:
    files = list_images(args.images, args.limit)
    result = run_load(args.url.rstrip("/"), files, clients=args.clients_one, requests=args.requests, warmup=args.warmup)
    result.pop("latencies")
    return result


def cmd_baseline(args) -> dict:
    scorer = load_scorer(args.weights, args.device, args.batch_size)
    return run_baseline(scorer, list_images(args.images, args.limit), batch_size=args.batch_size,
                        threads=args.threads)


def cmd_compare(args) -> dict:
    """Interleaved rounds (batch scorer, then each server setting), so that the load of a shared
    machine drifting over minutes hits every configuration alike; medians over rounds are reported."""
    import statistics
    from contextlib import ExitStack

    files = list_images(args.images, args.limit)
    clients = [int(c) for c in args.clients.split(",")]
    report = {"weights": args.weights, "device": args.device, "images": len(files), "cpu_count": os.cpu_count(),
              "rounds": args.rounds, "loadavg_start": os.getloadavg()}
    modes = {"on": {"max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms},
             "off": {"max_batch_size": 1, "max_wait_ms": 0}}
    import torch

    thread_counts = [int(t) for t in args.baseline_threads.split(",")] if args.baseline_threads else \
        [torch.get_num_threads()]
    baselines_by_threads = {t: [] for t in thread_counts}
    runs = {(m, n): [] for m in modes for n in clients}
    scorer = load_scorer(args.weights, args.device, args.batch_size)
    with ExitStack() as stack:
        urls = {mode: stack.enter_context(spawned_server(args.weights, args.device,
                                                         queue_size=max(256, 4 * max(clients)), **settings))[0]
                for mode, settings in modes.items()}
        for round_ in range(args.rounds):
            for t in thread_counts:
                b = run_baseline(scorer, files, batch_size=args.batch_size, threads=t)
                baselines_by_threads[t].append(b)
                print(f"round {round_ + 1}: batch scorer (batch {args.batch_size}, {t} torch threads): "
                      f"{b['images_per_s']:.2f} img/s", file=sys.stderr)
            for mode, url in urls.items():
                for n in clients:
                    r = run_load(url, files, clients=n, requests=max(args.requests, 4 * n), warmup=n)
                    runs[(mode, n)].append(r)
                    print(f"round {round_ + 1}: batching {mode:3s} clients {n:3d}: {r['images_per_s']:.2f} img/s "
                          f"p50 {r['p50_ms']:.0f} ms p95 {r['p95_ms']:.0f} ms mean batch {r.get('mean_batch_size')}",
                          file=sys.stderr)
    report["loadavg_end"] = os.getloadavg()
    report["baselines"] = {
        t: {**bs[0], "images_per_s": round(statistics.median(b["images_per_s"] for b in bs), 3),
            "per_round": [b["images_per_s"] for b in bs],
            "cpu_ms_per_image": round(statistics.median(b["cpu_ms_per_image"] for b in bs), 1)}
        for t, bs in baselines_by_threads.items()}
    # the reference is the batch scorer's best setting on this machine
    best_threads = max(report["baselines"], key=lambda t: report["baselines"][t]["images_per_s"])
    report["baseline"] = report["baselines"][best_threads]
    baselines = baselines_by_threads[best_threads]
    report["runs"] = []
    for (mode, n), rs in runs.items():
        latencies = sorted(x for r in rs for x in r["latencies"])
        report["runs"].append({
            "batching": mode, "clients": n, "requests": sum(r["requests"] for r in rs), "ok": sum(r["ok"] for r in rs),
            "images_per_s": round(statistics.median(r["images_per_s"] for r in rs), 3),
            "per_round": [r["images_per_s"] for r in rs],
            "p50_ms": round(1000 * percentile(latencies, 50), 1), "p95_ms": round(1000 * percentile(latencies, 95), 1),
            "p99_ms": round(1000 * percentile(latencies, 99), 1),
            "mean_batch_size": round(statistics.mean(r.get("mean_batch_size", 1.0) for r in rs), 2),
            "mean_queue_wait_ms": round(statistics.mean(r.get("mean_queue_wait_ms", 0.0) for r in rs), 1),
            "mean_model_ms": round(statistics.mean(r.get("mean_model_ms", 0.0) for r in rs), 1),
            "server_cpu_ms_per_image": round(statistics.median(r.get("server_cpu_ms_per_image", 0.0) for r in rs), 1),
            "client_cpu_ms_per_image": round(statistics.median(r.get("client_cpu_ms_per_image", 0.0) for r in rs), 1),
        })
    base = report["baseline"]["images_per_s"]
    by = {(r["batching"], r["clients"]): r for r in report["runs"]}
    report["summary"] = {}
    for n in clients:
        on, off = by[("on", n)], by[("off", n)]
        # per-round ratios too: within a round the machine's load is roughly the same
        gains = [a["images_per_s"] / b["images_per_s"] for a, b in zip(runs[("on", n)], runs[("off", n)])
                 if b["images_per_s"]]
        shares = [a["images_per_s"] / b["images_per_s"] for a, b in zip(runs[("on", n)], baselines)
                  if b["images_per_s"]]
        report["summary"][n] = {
            "batching_gain": round(statistics.median(gains), 3) if gains else None,
            "server_vs_batch_scorer": round(statistics.median(shares), 3) if shares else None,
        }
    print(markdown(report))
    return report


def markdown(report: dict) -> str:
    base = report["baseline"]
    lines = [f"Batch scorer (`Scorer.score_paths`, batch {b['batch_size']}, {b['images']} images, "
             f"{b['torch_threads']} torch threads): **{b['images_per_s']:.2f} images/s**, "
             f"{b['cpu_ms_per_image']} CPU-ms/image (median of {report.get('rounds', 1)} rounds)"
             for b in report.get("baselines", {0: base}).values()]
    lines += [f"Reference: the best of these, {base['images_per_s']:.2f} images/s.", "",
             "| batching | clients | images/s | p50 ms | p95 ms | p99 ms | mean batch | non-200 | vs batch scorer "
             "| server CPU-ms/image |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["runs"]:
        bad = r["requests"] - r["ok"]
        lines.append(f"| {r['batching']} | {r['clients']} | {r['images_per_s']:.2f} | {r['p50_ms']:.0f} | "
                     f"{r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {r.get('mean_batch_size', '-')} | {bad} | "
                     f"{r['images_per_s'] / base['images_per_s']:.0%} | {r.get('server_cpu_ms_per_image', '-')} |")
    lines.append("")
    for n, s in report["summary"].items():
        lines.append(f"- {n} clients: batching on/off = {s['batching_gain']}x; server (batching on) / batch "
                     f"scorer = {s['server_vs_batch_scorer']:.0%} (medians of per-round ratios)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of photos (default ../shared/data/pool)")
        p.add_argument("--limit", type=int, default=64, help="photos to cycle through")
        p.add_argument("--out", type=Path, help="write the results as JSON")

    p = sub.add_parser("load", help="drive a running server")
    common(p)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--clients", dest="clients_one", type=int, default=16)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--warmup", type=int, default=16, help="untimed requests first")
    p.set_defaults(func=cmd_load)

    for name, func, help_ in (("baseline", cmd_baseline, "batch scorer throughput"),
                              ("compare", cmd_compare, "batch scorer vs server with batching on/off")):
        p = sub.add_parser(name, help=help_)
        common(p)
        p.add_argument("--weights", default=str(REPO / "weights" / "resmemnet-default.json"))
        p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
        p.add_argument("--batch-size", type=int, default=16, help="batch scorer's batch size")
        p.set_defaults(func=func)
        if name == "baseline":
            p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
        if name == "compare":
            p.add_argument("--clients", default="1,16", help="comma list of client counts")
            p.add_argument("--requests", type=int, default=96, help="timed requests per run (at least 4 per client)")
            p.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; medians are reported")
            p.add_argument("--baseline-threads", default="1,2",
                           help="torch thread counts to run the batch scorer with; the best is the reference")
            p.add_argument("--max-batch-size", type=int, default=32)
            p.add_argument("--max-wait-ms", type=float, default=5.0)

    args = parser.parse_args(argv)
    result = args.func(args)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.command != "compare":
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
