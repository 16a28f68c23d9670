"""`resmemnet export`: the whole model as ONNX, or as an NVIDIA Triton model repository."""
from __future__ import annotations

import sys

from .kit import EXIT_OK, add_weights_arg, fail, weights_path


def register(sub) -> None:
    p = sub.add_parser(
        "export", help="write the model as ONNX or as a Triton model repository",
        description="--format onnx writes FILE.onnx (trunk + head, dynamic batch axis, input float32 "
                    "(batch, 3, H, W) RGB in [0, 1] at the checkpoint's size; output `score` (batch,)) and "
                    "FILE.json naming the checkpoint and the sha256 of everything it came from. --format triton "
                    "writes a model repository: DIR/NAME/config.pbtxt and DIR/NAME/1/model.onnx. The export is "
                    "built from the installed trunk once and cached (RESMEMNET_CACHE_DIR, default "
                    "~/.cache/resmemnet).")
    p.add_argument("--format", required=True, choices=("onnx", "triton"))
    p.add_argument("--out", required=True, metavar="PATH", help="onnx: FILE.onnx; triton: repository folder")
    add_weights_arg(p)
    p.add_argument("--name", default="resmemnet", help="triton: the model's name (its folder in the repository)")
    p.add_argument("--max-batch-size", type=int, default=32, metavar="N", help="triton: largest batch (default 32)")
    p.add_argument("--preferred-batch-sizes", default="8,16,32", metavar="N,N",
                   help="triton: batch sizes the dynamic batcher aims for (default 8,16,32)")
    p.add_argument("--max-queue-delay-us", type=int, default=5000, metavar="US",
                   help="triton: how long a request may wait for a batch to fill (default 5000)")
    p.add_argument("--instance-kind", default="auto", choices=("auto", "cpu", "gpu"),
                   help="triton: where instances run (default auto: a GPU when the server has one)")
    p.set_defaults(func=run_export)


def run_export(args) -> int:
    from pathlib import Path

    from model.export import TritonOptions, export_to, write_triton_repository

    out = Path(args.out)
    weights = weights_path(args)
    try:
        if args.format == "onnx":
            if out.suffix.lower() != ".onnx":
                return fail(f"--out must end in .onnx, not {out.name!r}")
            export = export_to(weights, out)
            print(f"wrote {out} and {export.sidecar.name} (sha256 {export.info['onnx']['sha256'][:16]}...)",
                  file=sys.stderr)
            return EXIT_OK
        try:
            preferred = tuple(int(b) for b in args.preferred_batch_sizes.split(",") if b.strip())
            options = TritonOptions(name=args.name, max_batch_size=args.max_batch_size,
                                    preferred_batch_sizes=preferred, max_queue_delay_us=args.max_queue_delay_us,
                                    kind=f"KIND_{args.instance_kind.upper()}")
        except ValueError as exc:
            return fail(str(exc))
        model_dir = write_triton_repository(weights, out, options)
        print(f"wrote the Triton model repository {out} (model {model_dir.name}: config.pbtxt, 1/model.onnx)",
              file=sys.stderr)
        return EXIT_OK
    except OSError as exc:  # checkpoint, trunk and export errors reach `resmemnet` (one line each)
        return fail(f"could not write {out}: {exc.strerror or exc}")
