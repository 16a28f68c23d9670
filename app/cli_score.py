"""`resmemnet score` (batch scorer) and `resmemnet info` (checkpoint summary)."""
from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2
FIELDS = ("path", "score", "width", "height", "error", "reason")


def register(sub) -> None:
    p = sub.add_parser("score", help="score image files and folders",
                       description="Score images with the checkpoint. Folders are walked recursively. "
                                   "Unreadable files get an error row; the exit status is 1 if any failed.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    add_weights_arg(p)
    p.add_argument("--out", metavar="FILE", help="write .csv or .json (default: CSV on stdout)")
    p.add_argument("--batch-size", type=positive_int, default=16, metavar="N")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--workers", type=positive_int, default=2, help="decoding threads")
    p.add_argument("--fp32", action="store_true",
                   help="full fp32 everywhere (default: the trunk in fp16 on CUDA and in bf16 on CPUs with "
                        "native bf16; scores then differ from fp32 by about 2e-3)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    p.set_defaults(func=run_score)

    q = sub.add_parser("info", help="print a checkpoint's metadata, parameter count and metrics")
    add_weights_arg(q)
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=run_info)


def add_weights_arg(parser) -> None:
    from model.checkpoint import DEFAULT_WEIGHTS

    parser.add_argument("--weights", default=str(DEFAULT_WEIGHTS), metavar="FILE",
                        help="checkpoint .json (or its .safetensors); default: the shipped one")


def positive_int(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def fail(message: str, code: int = EXIT_USAGE) -> int:
    print(f"resmemnet: error: {message}", file=sys.stderr)
    return code


def load_scorer(weights: str, device: str, **kwargs):
    from model.backbones import TrunkLoadError
    from model.checkpoint import CheckpointError
    from model.scoring import Scorer

    try:
        return Scorer.from_checkpoint(weights, device=device, **kwargs)
    except (CheckpointError, TrunkLoadError, ValueError) as exc:
        raise SystemExit(fail(str(exc)))


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


def run_score(args) -> int:
    from model.scoring import ScoreResult, collect_inputs

    out_path = Path(args.out) if args.out else None
    if out_path is not None and out_path.suffix.lower() not in (".csv", ".json"):
        return fail(f"--out must end in .csv or .json, not {out_path.name!r}")
    files, missing = collect_inputs(args.paths)
    if not files and not missing:
        return fail("no files found under the given paths")
    scorer = load_scorer(args.weights, args.device, mixed_precision=not args.fp32)
    progress = Progress(len(files), enabled=not args.no_progress)
    rows = [ScoreResult(path=p, error="no such file or folder", reason="not_found") for p in missing]
    try:
        rows.extend(scorer.score_paths(files, batch_size=args.batch_size, workers=args.workers, progress=progress))
    finally:
        progress.close()
    write_rows(rows, out_path)
    failed = [r for r in rows if not r.ok]
    print(f"scored {len(rows) - len(failed)} of {len(rows)} inputs with {scorer.model_name}"
          + (f"; {len(failed)} failed (see the error column)" if failed else ""), file=sys.stderr)
    return EXIT_SOME_FAILED if failed else EXIT_OK


def write_rows(rows, out_path: Path | None) -> None:
    records = [{k: getattr(r, k) for k in FIELDS} for r in rows]
    if out_path is not None and out_path.suffix.lower() == ".json":
        out_path.write_text(json.dumps(records, indent=2) + "\n")
        return
    fh = open(out_path, "w", newline="") if out_path else sys.stdout
    try:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        for rec in records:
            if rec["score"] is not None:
                rec["score"] = f"{rec['score']:.6f}"
            writer.writerow(rec)
    finally:
        if out_path:
            fh.close()


def run_info(args) -> int:
    from model.backbones import TrunkLoadError
    from model.checkpoint import CheckpointError, load_checkpoint
    from model.network import count_parameters

    try:
        model, meta = load_checkpoint(args.weights)
    except (CheckpointError, TrunkLoadError) as exc:
        return fail(str(exc))
    info = meta.to_dict()
    info["parameters"] = {"total": count_parameters(model), "head": count_parameters(model.head),
                          "trunk": count_parameters(model.trunk)}
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    print(f"{meta.name} {meta.version}: {meta.description}")
    arch = meta.architecture
    sizes = "" if arch.head == "readout" else f", proj={arch.proj_dim}, hidden={arch.hidden_size}"
    outputs = f", outputs={arch.n_outputs} (score = {arch.score_blend:g} x labelled + {1 - arch.score_blend:g} x teacher)" \
        if arch.teacher_output else ""
    print(f"architecture: {arch.backbone}, head={arch.head}, taps={arch.taps}{sizes}{outputs}")
    p = info["parameters"]
    print(f"parameters: {p['total']:,} (trunk {p['trunk']:,}, head {p['head']:,})")
    print(f"preprocessing: {json.dumps(meta.preprocessing.to_dict())}")
    print(f"trunk: {meta.trunk.description} [{'embedded' if meta.trunk_embedded else 'from ' + str(meta.trunk.package)}]")
    print(f"license: {meta.license}")
    if meta.metrics:
        print("metrics:")
        print(json.dumps(meta.metrics, indent=2))
    return EXIT_OK
