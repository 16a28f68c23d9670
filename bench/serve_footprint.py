"""Start-up time and memory of one `resmemnet serve` replica: what the Kubernetes start-up probe
and memory requests/limits in deploy/kubernetes are sized from (docs/deploy.md).

    python bench/serve_footprint.py                      # shipped checkpoint, CPU
    python bench/serve_footprint.py --device cuda --requests 64

Prints seconds from process start to /healthz and to /readyz (model loaded and warmed up), and
the process's resident memory (VmRSS, peak VmHWM) when ready and after scoring --requests
images of 640x480 sent by 4 clients at once.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image


def rss(pid: int) -> dict:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)  # MiB
    return fields


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="", help="checkpoint (default: the shipped one)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="RESMEMNET_TORCH_THREADS (0: torch's default)")
    ap.add_argument("--requests", type=int, default=16)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RESMEMNET_PORT": str(port), "RESMEMNET_DEVICE": args.device,
           "RESMEMNET_TORCH_THREADS": str(args.threads), "RESMEMNET_LOG_LEVEL": "warning"}
    if args.weights:
        env["RESMEMNET_WEIGHTS"] = args.weights
    script = Path(sys.executable).parent / "resmemnet"
    start = time.perf_counter()
    proc = subprocess.Popen([str(script), "serve"], env=env)
    base = f"http://127.0.0.1:{port}"
    times = {}
    try:
        while "readyz_s" not in times:
            if proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode}")
            for name in ("healthz", "readyz"):
                if f"{name}_s" in times:
                    continue
                try:
                    if httpx.get(f"{base}/{name}", timeout=2).status_code == 200:
                        times[f"{name}_s"] = round(time.perf_counter() - start, 1)
                except httpx.HTTPError:
                    pass
            time.sleep(0.2)
        ready = rss(proc.pid)
        rng = np.random.default_rng(0)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(buf, format="JPEG")
        data = buf.getvalue()

        def one(i):
            return httpx.post(f"{base}/score", files={"file": (f"{i}.jpg", data, "image/jpeg")}, timeout=120).status_code

        t0 = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            codes = list(pool.map(one, range(args.requests)))
        result = {"device": args.device, "torch_threads": args.threads, **times, "ready_MiB": ready,
                  "after_load_MiB": rss(proc.pid), "requests": args.requests, "status_200": codes.count(200),
                  "images_per_s": round(args.requests / (time.perf_counter() - t0), 2)}
        print(json.dumps(result))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
