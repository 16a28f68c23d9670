"""`resmemnet merge`: join the CSV parts of a sharded `resmemnet score` (app/cli/score.py) into one
CSV or JSON in path order, checking that they are such parts (same columns) and that no path is
in two of them."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from .kit import EXIT_OK, EXIT_USAGE, FIELDS, PartError, fail, read_part

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


def json_record(row: dict) -> dict:
    """A CSV row back as the record `resmemnet score --out x.json` writes."""
    def num(text, kind):
        return kind(text) if text not in ("", None) else None

    return {"path": row["path"], "score": num(row["score"], float), "percentile": num(row["percentile"], float),
            "warnings": [w for w in row["warnings"].split(";") if w], "width": num(row["width"], int),
            "height": num(row["height"], int), "error": row["error"] or None, "reason": row["reason"] or None}


def run_merge(args) -> int:
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
