"""Throughput of every scoring backend beside the `resmem` package, on the same photos, in one run.

- whole process: wall time of a fresh `resmemnet score` process (import, load, decode, score,
  write) per backend, and of a fresh process of the `resmem` package's own loop, as images/s;
  rounds are interleaved (every tool once per round), so a change in machine load hits all alike;
- first score: the same for a single photo (start-up plus one forward pass), in seconds;
- steady state: images/s of decode + preprocess + forward with the model already loaded, all
  engines in this one process, interleaved the same way.

    .venv/bin/python bench/bench_backends.py --n 64 --rounds 3 --json bench64.json
    .venv/bin/python bench/bench_backends.py --n 512 --rounds 2 --no-steady

Prints Markdown tables (median and range over the rounds). The ONNX export is built (and cached)
before timing starts, as a user's first `--backend onnxruntime` run would.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from bench_scorer import RESMEM_SCRIPT, photos  # noqa: E402  (the resmem package's own loop; photo list)


def summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "runs": [round(v, 3) for v in values]}


def cell(stats: dict | None) -> str:
    if not stats:
        return ""
    return f"{stats['median']:.2f} ({stats['min']:.2f}-{stats['max']:.2f})"


def whole_process_commands(weights: str, out: str, batch: int, fp32: bool = True,
                           resmem: bool = True) -> dict[str, list[str]]:
    cli = [str(Path(sys.executable).parent / "resmemnet"), "score", "--no-progress", "--batch-size", str(batch),
           "--weights", weights, "--out", out]
    commands = {
        "resmemnet, torch (default precision)": cli + ["--backend", "torch"],
        "resmemnet, torch --fp32": cli + ["--backend", "torch", "--fp32"],
        "resmemnet, onnxruntime": cli + ["--backend", "onnxruntime"],
        "resmem 1.1.6 package, one photo at a time": [sys.executable, "-c", RESMEM_SCRIPT],
    }
    if not fp32:
        del commands["resmemnet, torch --fp32"]
    if not resmem:
        del commands["resmem 1.1.6 package, one photo at a time"]
    return commands


def time_process(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def run_whole_process(paths: list[str], weights: str, rounds: int, batch: int, *, first_score: bool = True,
                      fp32: bool = True, resmem: bool = True) -> dict:
    out = str(Path(tempfile.mkdtemp()) / "scores.csv")
    commands = whole_process_commands(weights, out, batch, fp32, resmem)
    seconds = {name: [] for name in commands}
    first = {name: [] for name in commands}
    for r in range(rounds):
        for name, cmd in commands.items():
            seconds[name].append(time_process(cmd + paths))
            if first_score:
                first[name].append(time_process(cmd + paths[:1]))
            print(f"round {r + 1} {name}: {seconds[name][-1]:.1f} s" +
                  (f", first score {first[name][-1]:.2f} s" if first_score else ""), file=sys.stderr, flush=True)
    return {name: {"images_per_s": summary([len(paths) / s for s in seconds[name]]),
                   "seconds": summary(seconds[name]), "first_score_s": summary(first[name]) if first_score else None}
            for name in commands}


def run_steady(paths: list[str], weights: str, rounds: int, batch: int) -> dict:
    import torch

    from model.scoring import Scorer

    engines = {
        "resmemnet, torch (default precision)": Scorer.from_checkpoint(weights, device="cpu", backend="torch"),
        "resmemnet, torch --fp32": Scorer.from_checkpoint(weights, device="cpu", backend="torch",
                                                          mixed_precision=False),
        "resmemnet, onnxruntime": Scorer.from_checkpoint(weights, device="cpu", backend="onnxruntime"),
    }

    def ours(scorer):
        def run():
            results = list(scorer.score_paths(paths, batch_size=batch))
            assert all(r.ok for r in results)
        return run

    runs = {name: ours(scorer) for name, scorer in engines.items()}
    from PIL import Image
    from resmem import ResMem, transformer

    resmem_model = ResMem(pretrained=True).eval()

    def resmem_loop():
        with torch.no_grad():
            for p in paths:
                resmem_model(transformer(Image.open(p).convert("RGB")).view(-1, 3, 227, 227)).item()

    runs["resmem 1.1.6 package, one photo at a time"] = resmem_loop
    warm = paths[: 2 * batch]
    for scorer in engines.values():  # allocator, oneDNN kernels, ONNX Runtime arenas
        list(scorer.score_paths(warm, batch_size=batch))
    with torch.no_grad():
        resmem_model(torch.rand(1, 3, 227, 227))
    rates = {name: [] for name in runs}
    for r in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            rates[name].append(len(paths) / (time.perf_counter() - start))
            print(f"steady round {r + 1} {name}: {rates[name][-1]:.2f} images/s", file=sys.stderr, flush=True)
    return {name: {"images_per_s": summary(v)} for name, v in rates.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default=str(REPO.parent / "shared" / "data" / "pool"))
    ap.add_argument("--n", type=int, default=64, help="photos per measurement")
    ap.add_argument("--weights", default=str(REPO / "weights" / "resmemnet-default.json"))
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; tables give median (min-max)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--no-whole-process", action="store_true")
    ap.add_argument("--no-steady", action="store_true")
    ap.add_argument("--no-first-score", action="store_true", help="skip the one-photo processes")
    ap.add_argument("--no-fp32", action="store_true", help="skip the `--fp32` torch rows")
    ap.add_argument("--no-resmem", action="store_true", help="skip the resmem package's whole-process rows")
    ap.add_argument("--json", help="write the raw numbers here")
    args = ap.parse_args(argv)

    from model.export import cached_onnx

    from model.engines import onnxruntime_runner

    # The export and ONNX Runtime's optimised graph are built once, outside the timings, as a
    # user's first run builds them; files this fresh are hashed on every start
    # (model.filecache.RACY_WINDOW_NS), so wait that out and load once more to record them.
    cached_onnx(args.weights)
    onnxruntime_runner(args.weights)
    time.sleep(2.5)
    onnxruntime_runner(args.weights)
    paths = photos(args.images, args.n)
    result = {"n": len(paths), "rounds": args.rounds, "cpus": os.cpu_count(),
              "load_average_start": os.getloadavg()}
    if not args.no_whole_process:
        result["whole_process"] = run_whole_process(paths, args.weights, args.rounds, args.batch_size,
                                                    first_score=not args.no_first_score, fp32=not args.no_fp32,
                                                    resmem=not args.no_resmem)
    if not args.no_steady:
        result["steady"] = run_steady(paths, args.weights, args.rounds, args.batch_size)
    result["load_average_end"] = os.getloadavg()
    names = list((result.get("whole_process") or result.get("steady")).keys())
    print(f"\n{len(paths)} photos from {args.images}, {args.rounds} interleaved rounds, {os.cpu_count()} CPUs, "
          f"load average {result['load_average_start'][0]:.1f} at start, {result['load_average_end'][0]:.1f} at end\n")
    print("| tool | whole process, images/s | first score, s | steady state, images/s |")
    print("|---|---|---|---|")
    for name in names:
        wp = result.get("whole_process", {}).get(name, {})
        st = result.get("steady", {}).get(name, {})
        print(f"| {name} | {cell(wp.get('images_per_s'))} | {cell(wp.get('first_score_s'))} | "
              f"{cell(st.get('images_per_s'))} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
