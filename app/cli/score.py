"""`resmemnet score`: score image files and folders into CSV or JSON, whole or as one of N shards.

    resmemnet score PHOTOS/ --out scores.csv
    resmemnet score PHOTOS/ --shard 3/16 --out part-03.csv --resume   # one of 16 jobs, anywhere
    resmemnet merge part-*.csv --out scores.csv                       # when all 16 are done (merge.py)

`--shard K/N` (1 <= K <= N) sorts every input path (folders walked recursively) and scores the
K-th of N contiguous, near-equal slices, so N jobs on any scheduler (Slurm array, Kubernetes
indexed Job, xargs) cover every input exactly once without talking to each other. Rows are
appended to the CSV as they are scored; `--resume` keeps the rows already in --out and scores
only the inputs it lacks, so a killed job continues where it stopped.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

from .kit import (EXIT_OK, EXIT_SOME_FAILED, FIELDS, PartError, Progress, add_onnx_arg, add_precision_arg,
                  add_profile_arg, add_weights_arg, checked_profile, csv_record, fail, load_scorer, positive_int, profile_note,
                  read_part, record, write_rows)


def register(sub) -> None:
    p = sub.add_parser("score", help="score image files and folders",
                       description="Score images with the checkpoint. Folders are walked recursively. Rows come "
                                   "out in input order; unreadable files get an error row in place, and the "
                                   "exit status is 1 if any failed.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    add_weights_arg(p)
    p.add_argument("--out", metavar="FILE", help="write .csv or .json (default: CSV on stdout)")
    p.add_argument("--shard", type=parse_shard, metavar="K/N",
                   help="score only slice K of N (1 <= K <= N) of the inputs sorted by path; N jobs with "
                        "K = 1..N cover every input once. Combine the parts with `resmemnet merge`")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows already in --out (a CSV) and score only the inputs it lacks, appending")
    p.add_argument("--batch-size", type=positive_int, default=16, metavar="N")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--workers", type=positive_int, default=2, help="decoding threads")
    p.add_argument("--fp32", action="store_true",
                   help="full fp32 everywhere, the same as --precision fp32 (default: the trunk in fp16 on CUDA and "
                        "in bf16 on CPUs with native bf16; docs/robustness.md gives how far those scores move)")
    add_precision_arg(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    add_profile_arg(p)
    p.add_argument("--backend", choices=("auto", "torch", "onnxruntime"), default=None,
                   help="inference engine (default: $RESMEMNET_BACKEND, else auto: onnxruntime on a CPU where it is "
                        "installed and torch would run fp32, else torch). onnxruntime runs the model's ONNX export "
                        "in fp32 (exported and cached on first use); scores equal torch --fp32 within 1e-3 "
                        "(docs/benchmarks.md)")
    add_onnx_arg(p)
    p.set_defaults(func=run_score)


def parse_shard(text: str) -> tuple[int, int]:
    """'K/N' -> (K, N) with 1 <= K <= N; argparse reports the error as a usage error."""
    import argparse

    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not K/N (e.g. 3/16)") from None
    if not 1 <= k <= n:
        raise argparse.ArgumentTypeError(f"{text!r}: K must be between 1 and N")
    return k, n


def shard_of(entries: list, shard: tuple[int, int] | None) -> list:
    """Entries (path, ...) sorted by path, and of them the K-th of N contiguous slices
    (sizes differ by at most one). Deterministic: the same inputs give the same slices."""
    ordered = sorted(entries, key=lambda e: e[0])
    if shard is None:
        return ordered
    k, n = shard
    return ordered[(k - 1) * len(ordered) // n: k * len(ordered) // n]


def ordered_inputs(paths) -> list[tuple[str, bool]]:
    """(path, exists) for every input in the order given; folders expand in place (sorted, recursive)."""
    from model.scoring import collect_inputs

    entries: list[tuple[str, bool]] = []
    for raw in paths:
        files, missing = collect_inputs([raw])
        entries.extend([(f, True) for f in files] + [(m, False) for m in missing])
    return entries


def scored_rows(scorer, entries: list[tuple[str, bool]], args, profile: str, progress):
    """One model.scoring.ScoreResult per entry, in order: inputs that do not exist keep their
    place as not_found rows between the scored ones."""
    from model.scoring import ScoreResult

    scored = scorer.score_paths([path for path, exists in entries if exists], batch_size=args.batch_size,
                                workers=args.workers, progress=progress, profile=profile)
    for path, exists in entries:
        yield next(scored) if exists else ScoreResult(path=path, error="no such file or folder", reason="not_found",
                                                      profile=profile)


def run_score(args) -> int:
    from model.engines import CLI_DEFAULT_BACKEND
    from model.environment import backend_setting

    out_path = Path(args.out) if args.out else None
    if out_path is not None and out_path.suffix.lower() not in (".csv", ".json"):
        return fail(f"--out must end in .csv or .json, not {out_path.name!r}")
    if out_path is not None and not out_path.parent.is_dir():
        return fail(f"--out: folder {str(out_path.parent)!r} does not exist")
    entries = ordered_inputs(args.paths)
    if not entries:
        return fail("no files found under the given paths")
    # An export named with --onnx is what the user wants run: without --backend (or
    # $RESMEMNET_BACKEND) it means onnxruntime, not "auto" (which picks torch on bf16 CPUs and
    # would ignore the file).
    backend = backend_setting(args.backend, default="onnxruntime" if getattr(args, "onnx", None) else CLI_DEFAULT_BACKEND)
    scorer = load_scorer(args, precision="fp32" if args.fp32 else args.precision, backend=backend)
    profile = checked_profile(scorer, args.profile)
    if args.shard or args.resume:  # one slice of the inputs and/or appending to --out
        return run_sharded_score(args, entries, scorer, profile)
    progress = Progress(sum(exists for _, exists in entries), enabled=not args.no_progress)
    try:
        rows = list(scored_rows(scorer, entries, args, profile, progress))
    finally:
        progress.close()
    write_rows(rows, out_path)
    failed = [r for r in rows if not r.ok]
    print(f"scored {len(rows) - len(failed)} of {len(rows)} inputs with {scorer.model_name}{profile_note(profile)}"
          + (f"; {len(failed)} failed (see the error column)" if failed else ""), file=sys.stderr)
    return EXIT_SOME_FAILED if failed else EXIT_OK


def run_sharded_score(args, entries: list, scorer, profile: str) -> int:
    """`resmemnet score` with --shard and/or --resume: score this job's inputs that --out does not
    hold yet, appending one CSV row per input as it is scored (flushed per row)."""
    out = Path(args.out) if args.out else None
    if out is None or out.suffix.lower() != ".csv":
        return fail("--shard and --resume append rows to a CSV: give --out PART.csv "
                    "(`resmemnet merge` writes JSON if needed)")
    mine = shard_of(entries, args.shard)
    try:
        present = read_part(out) if args.resume and out.is_file() else []
    except PartError as exc:
        return fail(f"--resume: {exc}")
    done = {row["path"] for row in present}
    todo = [e for e in mine if e[0] not in done]
    fresh = not present
    # rewrite what is kept (drops a cut-off last line), then append
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(present)
    mine_paths = {e[0] for e in mine}
    failed = sum(1 for row in present if row["error"] and row["path"] in mine_paths)
    progress = Progress(sum(exists for _, exists in todo), enabled=not args.no_progress)
    try:
        with open(out, "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=FIELDS, lineterminator="\n")
            for row in scored_rows(scorer, todo, args, profile, progress):
                failed += not row.ok
                writer.writerow(csv_record(record(row)))
                fh.flush()
    finally:
        progress.close()
    where = f"shard {args.shard[0]}/{args.shard[1]}: " if args.shard else ""
    kept = "" if fresh else f", {len(mine) - len(todo)} kept from {out.name}"
    print(f"{where}{len(todo)} of {len(mine)} inputs scored with {scorer.model_name}{profile_note(profile)}{kept}"
          + (f"; {failed} failed (see the error column)" if failed else ""), file=sys.stderr)
    return EXIT_SOME_FAILED if failed else EXIT_OK
