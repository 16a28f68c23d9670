"""`resmemnet` command line: one entry point, one module per group of subcommands."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from app import cli_heatmap, cli_score, cli_serve
    from model.training import cli as training_cli

    parser = argparse.ArgumentParser(prog="resmemnet", description="ResMem-Net image memorability")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (cli_score, cli_serve, cli_heatmap, training_cli):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`resmemnet info | head`): stop quietly, and keep Python's exit-time
        # flush of stdout from raising again.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # what a shell reports for a process ended by SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
