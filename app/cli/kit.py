"""What the `resmemnet` commands share: exit codes, the one error line, common arguments, the
scorer they load, the progress bar, and the scores table (CSV/JSON rows) that `score` writes and
`merge` reads.

Errors: a command raises a model.errors.ResMemNetError (InputError for a bad argument) and
`resmemnet` (app/cli/__init__.py) prints it as one `resmemnet: error: ...` line and exits with
its `exit_code`; `fail()` does the same for a command that returns instead.
"""
from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

from model.errors import EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, InputError  # noqa: F401  (the table, for commands)

# The scores table: CSV columns (a tested contract); JSON records also name the score profile.
FIELDS = ("path", "score", "percentile", "warnings", "width", "height", "error", "reason")
JSON_FIELDS = (*FIELDS, "profile")


def fail(message: str, code: int = EXIT_USAGE, *, command: str | None = None) -> int:
    """Print `resmemnet[ COMMAND]: error: MESSAGE` on stderr; returns `code` for the command to return."""
    prog = f"resmemnet {command}" if command else "resmemnet"
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


# -- arguments -------------------------------------------------------------------------------
def add_weights_arg(parser) -> None:
    # No default here: resolving it imports the model package (and torch), which `--help` must not pay for.
    parser.add_argument("--weights", default=None, metavar="FILE",
                        help="checkpoint .json (or its .safetensors); default: $RESMEMNET_WEIGHTS or the shipped one")


def add_onnx_arg(parser) -> None:
    parser.add_argument("--onnx", default=None, metavar="FILE",
                        help="the ONNX export the onnxruntime backend runs (what `resmemnet export --format onnx` "
                             "wrote, its sidecar JSON beside it); default: $RESMEMNET_ONNX, else this checkpoint's "
                             "export in the cache (made there on first use where torch is installed)")


def add_profile_arg(parser) -> None:
    # Any name: which profiles there are depends on the checkpoint, so checked_profile checks it
    # once the model is loaded (one error line, exit status 2), not argparse.
    parser.add_argument("--profile", default="default", metavar="NAME",
                        help="score profile: default (the checkpoint's own score) or another the checkpoint has "
                             "(shipped: lnsim, alias outdoor, for outdoor scenes; cdm, for photos like the second "
                             "study's; general, for photos unlike both); `resmemnet info` lists the checkpoint's. "
                             "Default: default")


def add_precision_arg(parser) -> None:
    from model.environment import PRECISIONS  # no torch: `--help` stays fast

    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="the trunk's precision (default: $RESMEMNET_PRECISION, else auto: fp16 on CUDA, bf16 on "
                             "CPUs with native bf16, fp32 elsewhere). bf16/fp16 run also where the CPU emulates them "
                             "(slower); fp32 gives the reference scores")


def weights_path(args) -> str:
    """The --weights value, or the default checkpoint (RESMEMNET_WEIGHTS, else the shipped one)."""
    if args.weights:
        return args.weights
    from model.environment import default_weights

    return str(default_weights())


def positive_int(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


# -- the model -------------------------------------------------------------------------------
def load_scorer(args, **kwargs):
    """The Scorer of --weights on --device. Errors (checkpoint, trunk, backend, device) are
    ResMemNetErrors: `resmemnet` reports them as one line, exit status 2."""
    from model.scoring import Scorer

    kwargs.setdefault("precision", getattr(args, "precision", None))
    kwargs.setdefault("onnx", getattr(args, "onnx", None))
    return Scorer.from_checkpoint(weights_path(args), device=args.device, **kwargs)


def checked_profile(scorer, profile: str) -> str:
    """`profile` if the loaded model has it, else InputError (exit status 2) naming those it has."""
    try:
        return scorer.check_profile(profile)
    except ValueError as exc:
        raise InputError(f"--profile: {exc}") from None


def profile_note(profile: str) -> str:
    """For the summary line: nothing for the default profile, else which profile the scores are of."""
    return "" if profile == "default" else f" (profile {profile})"


class Progress:
    """A one-line progress bar on stderr, drawn only on a terminal."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled = total, 0, enabled and sys.stderr.isatty()
        self.start = time.perf_counter()

    def __call__(self, n: int = 1) -> None:
        self.done += n
        if self.enabled:
            rate = self.done / max(time.perf_counter() - self.start, 1e-9)
            filled = int(30 * self.done / max(self.total, 1))
            print(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} {rate:.1f} img/s",
                  end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            print(file=sys.stderr)


# -- the scores table --------------------------------------------------------------------------
def record(row, fields: tuple[str, ...] = FIELDS) -> dict:
    """One output record of a model.scoring.ScoreResult; `percentile` and `warnings` are None / []
    where the scorer gives none."""
    rec = {k: getattr(row, k, None) for k in fields}
    rec["warnings"] = list(rec["warnings"] or [])
    return rec


def csv_record(rec: dict) -> dict:
    """A record as it goes into the CSV: score to 6 decimals, percentile to 1, warnings joined by ';'."""
    rec = dict(rec)
    if rec["score"] is not None:
        rec["score"] = f"{rec['score']:.6f}"
    if rec["percentile"] is not None:
        rec["percentile"] = f"{rec['percentile']:.1f}"
    rec["warnings"] = ";".join(rec["warnings"])
    return rec


def write_rows(rows, out_path: Path | None) -> None:
    """CSV (plain \\n line ends) or JSON (a list of records, with `profile`), in row order; no
    out_path: CSV on stdout."""
    if out_path is not None and out_path.suffix.lower() == ".json":
        out_path.write_text(json.dumps([record(r, JSON_FIELDS) for r in rows], indent=2) + "\n")
        return
    fh = open(out_path, "w", newline="") if out_path else sys.stdout
    try:
        writer = csv.DictWriter(fh, fieldnames=FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(csv_record(record(r)) for r in rows)
    finally:
        if out_path:
            fh.close()


class PartError(InputError):
    """A CSV that is not a part written by `resmemnet score`."""


def read_part(path: Path) -> list[dict]:
    """The rows of a scores CSV; a last line cut off by a killed job is ignored. PartError when
    the file is not such a CSV."""
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
