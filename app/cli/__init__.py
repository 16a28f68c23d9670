"""`resmemnet` command line: one entry point (`main`), one module per command in this package,
and the kit they share (app/cli/kit.py). `train` and `evaluate` live with the training code.

Start-up is kept light: `resmemnet`, `--help` and `--version` import no command module (they
pull in torch, seconds of import), and `resmemnet COMMAND ...` imports only the module that
defines COMMAND. COMMANDS names every command's module and one-line help for that; a test
checks it against what the modules register.

A command returns its exit status (model.errors: EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE) or
raises a model.errors.ResMemNetError, reported here as one `resmemnet: error: ...` line with the
error's exit_code.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module that registers it, its one-line help), in the order `--help` lists them
COMMANDS: dict[str, tuple[str, str]] = {
    "score": ("app.cli.score", "score image files and folders"),
    "info": ("app.cli.info", "summarise a checkpoint: model, parameters, data, results, licence"),
    "serve": ("app.cli.serve", "run the HTTP scoring service"),
    "heatmap": ("app.cli.heatmap", "write Grad-RAM heatmap overlays for images"),
    "train": ("model.training.cli", "train ResMem-Net (phased recipe, cross-validation, checkpoint)"),
    "evaluate": ("model.training.cli",
                 "score a dataset with a checkpoint and report rho, r, MSE, top/bottom table"),
    "adapt": ("app.cli.adapt", "fit a new score profile to your own labelled photos (a checkpoint with it added)"),
    "export": ("app.cli.export", "write the model as ONNX or as a Triton model repository"),
    "merge": ("app.cli.merge", "merge the CSV parts of a sharded `resmemnet score` into one CSV or JSON"),
}


def package_version() -> str:
    """The installed distribution's version (pyproject.toml), without importing the model."""
    from model.environment import installed_version

    return installed_version() or "unknown (not installed)"  # a source tree that was never installed


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or with `only` a command name: that command's module registers its real
    subparser(s) and every other command gets a stub carrying its help line (no import)."""
    parser = argparse.ArgumentParser(prog="resmemnet", description="ResMem-Net image memorability")
    parser.add_argument("--version", action="version", version=f"resmemnet {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = list(dict.fromkeys(module for module, _ in COMMANDS.values()))
    if only is not None:
        modules = [COMMANDS[only][0]] if only in COMMANDS else []
    for name in modules:
        importlib.import_module(name).register(sub)
    for command, (_, text) in COMMANDS.items():
        if command not in sub.choices:
            sub.add_parser(command, help=text)
    return parser


def command_of(argv: list[str]) -> str | None:
    """The subcommand named in argv (the first word that is not an option), if any."""
    for word in argv:
        if word == "--":
            return None
        if not word.startswith("-"):
            return word
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = command_of(argv)
    # Without a known command this parse ends in --help, --version or a usage error.
    parser = build_parser(only=command if command in COMMANDS else "")
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):  # a stub matched: the command word came after an option
        parser.error(f"put the command first: resmemnet {args.command} [OPTIONS]")
    from model.errors import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, EXIT_OK, ResMemNetError

    try:
        return int(args.func(args) or EXIT_OK)
    except ResMemNetError as exc:
        from .kit import fail

        return fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`resmemnet info | head`): stop quietly, and keep Python's exit-time
        # flush of stdout from raising again.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
