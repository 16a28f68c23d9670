"""Steady-state CPU time per image of two checkpoints side by side, interleaved in one process.

    .venv/bin/python bench/compare_checkpoints.py OLD.json NEW.json [--images DIR] [--n 32] [--rounds 5]

Both run through the batch scorer (torch backend, fp32 unless the CPU has native bf16, batch 16)
on the same photos; each round scores the photos once with each checkpoint, in alternating order,
after one warm-up pass each. Prints seconds per image (median and range over rounds) and the
ratio new/old of the medians.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--images", default=str(REPO.parent / "shared" / "data" / "pool"))
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)

    from model.scoring import Scorer

    paths = sorted(str(p) for p in Path(args.images).glob("*.jpg"))[:args.n]
    if not paths:
        print(f"error: no .jpg photos in {args.images}", file=sys.stderr)
        return 2
    scorers = {name: Scorer.from_checkpoint(w, backend="torch", device="cpu") for name, w in
               (("old", args.old), ("new", args.new))}
    tensors = [scorers["old"].prepare(p)[0] for p in paths]  # one preprocessing path: the same tensors
    times = {name: [] for name in scorers}
    for s in scorers.values():
        s.score_tensors(tensors[:16], max_batch=16)  # warm-up
    for r in range(args.rounds):
        for name in (("old", "new") if r % 2 == 0 else ("new", "old")):
            start = time.perf_counter()
            scorers[name].score_tensors(tensors, max_batch=16)
            times[name].append((time.perf_counter() - start) / len(tensors))
    for name, t in times.items():
        print(f"{name}: {statistics.median(t) * 1000:.1f} ms/image (range {min(t) * 1000:.1f}-{max(t) * 1000:.1f}, "
              f"{args.rounds} rounds, {len(tensors)} photos)")
    print(f"new/old: {statistics.median(times['new']) / statistics.median(times['old']):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
