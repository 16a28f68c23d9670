"""Batch scoring at scale: shards, resumable output, merge.

    resmemnet score PHOTOS/ --shard 3/16 --out part-03.csv --resume   # one of 16 jobs, anywhere
    resmemnet merge part-*.csv --out scores.csv                       # when all 16 are done

`--shard K/N` (1 <= K <= N) sorts every input path (folders walked recursively) and scores the
K-th of N contiguous, near-equal slices, so N jobs on any scheduler (Slurm array, Kubernetes
indexed Job, xargs) cover every input exactly once without talking to each other. Rows are
appended to the CSV as they are scored; `--resume` keeps the rows already in --out and scores
only the inputs it lacks, so a killed job continues where it stopped. `resmemnet merge` checks
the parts (same columns, no path twice) and writes one CSV or JSON in path order.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

MERGE_HELP = "merge the CSV parts of a sharded `resmemnet score` into one CSV or JSON"


def register(sub) -> None:
    p = sub.add_parser("merge", help=MERGE_HELP,
                       description="Join the CSV files written by `resmemnet score --shard K/N --out PART.csv` "
                                   "into one file in path order (.csv or .json by --out). A path found in two "
                                   "parts is an error (parts of different runs), as is a file that is not such "
                                   "a part.")
    p.add_argument("parts", nargs="+", metavar="PART.csv", help="CSV parts written by resmemnet score")
    p.add_argument("--out", required=True, metavar="FILE", help="merged output, .csv or .json")
    p.add_argument("--expect", type=int, metavar="N",
                   help="fail unless the parts hold exactly N rows (e.g. the number of inputs)")
    p.set_defaults(func=run_merge)


def add_shard_arguments(p) -> None:
    """--shard and --resume for `resmemnet score` (app/cli_score.py)."""
    p.add_argument("--shard", type=parse_shard, metavar="K/N",
                   help="score only slice K of N (1 <= K <= N) of the inputs sorted by path; N jobs with "
                        "K = 1..N cover every input once. Combine the parts with `resmemnet merge`")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows already in --out (a CSV) and score only the inputs it lacks, appending")


def parse_shard(text: str) -> tuple[int, int]:
    """'K/N' -> (K, N) with 1 <= K <= N; argparse reports a ValueError's text as a usage error."""
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


class PartError(ValueError):
    """A CSV that is not a part written by `resmemnet score`."""


def read_part(path: Path) -> list[dict]:
    """The rows of a scores CSV; a last line cut off by a killed job is ignored."""
    from app.cli_score import FIELDS

    with open(path, newline="") as fh:
        text = fh.read()
    if not text:
        return []
    if not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]  # the row being written when the job stopped
    reader = csv.DictReader(text.splitlines(keepends=True))
    if tuple(reader.fieldnames or ()) != FIELDS:
        raise PartError(f"{path}: not a CSV written by resmemnet score (columns {reader.fieldnames})")
    return list(reader)


def run_sharded_score(args, entries: list, scorer) -> int:
    """`resmemnet score` with --shard and/or --resume: score this job's inputs that --out does not
    hold yet, appending one CSV row per input as it is scored (flushed per row)."""
    from app.cli_score import EXIT_OK, EXIT_SOME_FAILED, FIELDS, Progress, fail, profile_note, record
    from model.scoring import ScoreResult

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
    files = [path for path, exists in todo if exists]
    fresh = not present
    # rewrite what is kept (drops a cut-off last line), then append
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(present)
    mine_paths = {e[0] for e in mine}
    failed = sum(1 for row in present if row["error"] and row["path"] in mine_paths)
    progress = Progress(len(files), enabled=not args.no_progress)
    try:
        with open(out, "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=FIELDS, lineterminator="\n")
            scored = scorer.score_paths(files, batch_size=args.batch_size, workers=args.workers, progress=progress,
                                        profile=args.profile)
            for path, exists in todo:
                row = next(scored) if exists else ScoreResult(path=path, error="no such file or folder",
                                                              reason="not_found", profile=args.profile)
                failed += not row.ok
                writer.writerow(csv_record(record(row)))
                fh.flush()
    finally:
        progress.close()
    where = f"shard {args.shard[0]}/{args.shard[1]}: " if args.shard else ""
    kept = "" if fresh else f", {len(mine) - len(todo)} kept from {out.name}"
    print(f"{where}{len(todo)} of {len(mine)} inputs scored with {scorer.model_name}{profile_note(args.profile)}{kept}"
          + (f"; {failed} failed (see the error column)" if failed else ""), file=sys.stderr)
    return EXIT_SOME_FAILED if failed else EXIT_OK


def csv_record(rec: dict) -> dict:
    """A record as `resmemnet score` writes it to CSV (score to 6 decimals, warnings joined by ';')."""
    rec = dict(rec)
    if rec["score"] is not None:
        rec["score"] = f"{rec['score']:.6f}"
    if rec["percentile"] is not None:
        rec["percentile"] = f"{rec['percentile']:.1f}"
    rec["warnings"] = ";".join(rec["warnings"])
    return rec


def json_record(row: dict) -> dict:
    """A CSV row back as the record `resmemnet score --out x.json` writes."""
    def num(text, kind):
        return kind(text) if text not in ("", None) else None

    return {"path": row["path"], "score": num(row["score"], float), "percentile": num(row["percentile"], float),
            "warnings": [w for w in row["warnings"].split(";") if w], "width": num(row["width"], int),
            "height": num(row["height"], int), "error": row["error"] or None, "reason": row["reason"] or None}


def run_merge(args) -> int:
    from app.cli_score import EXIT_OK, EXIT_USAGE, FIELDS, fail

    out = Path(args.out)
    if out.suffix.lower() not in (".csv", ".json"):
        return fail(f"--out must end in .csv or .json, not {out.name!r}")
    rows: dict[str, dict] = {}
    for name in args.parts:
        path = Path(name)
        if not path.is_file():
            return fail(f"{name}: no such file")
        try:
            part = read_part(path)
        except (PartError, UnicodeDecodeError, csv.Error) as exc:
            return fail(str(exc))
        for row in part:
            if row["path"] in rows:
                return fail(f"{row['path']} is in two parts (the second: {name}); were they made by one run?")
            rows[row["path"]] = row
    if args.expect is not None and len(rows) != args.expect:
        return fail(f"the parts hold {len(rows)} rows, not --expect {args.expect}: a shard is missing or unfinished",
                    EXIT_USAGE)
    ordered = [rows[p] for p in sorted(rows)]
    if out.suffix.lower() == ".json":
        out.write_text(json.dumps([json_record(r) for r in ordered], indent=2) + "\n")
    else:
        with open(out, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=FIELDS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(ordered)
    failed = sum(1 for r in ordered if r["error"])
    print(f"merged {len(ordered)} rows from {len(args.parts)} parts into {out}"
          + (f" ({failed} with errors)" if failed else ""), file=sys.stderr)
    return EXIT_OK
