"""The project's error classes share these bases, and the command line's exit codes live here.

Every error the project raises on purpose is a `ResMemNetError`: its message is written for
people, and `exit_code` is the status a command ends with when it stops on it (`resmemnet`
prints `resmemnet: error: MESSAGE` and exits with it). `InputError` (also a ValueError) is
something the caller gave that cannot be used; `ModelFileError` (also a RuntimeError) is a model
file that is missing, corrupt or does not fit. The service maps its own errors to HTTP statuses
(app/errors.py).
"""
from __future__ import annotations

# Exit codes of every `resmemnet` command (docs/cli.md).
EXIT_OK = 0  # done
EXIT_SOME_FAILED = 1  # done, but some inputs could not be scored (their rows say why); or the server failed to start
EXIT_USAGE = 2  # nothing done: bad arguments, settings, checkpoint or output path
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
EXIT_BROKEN_PIPE = 141  # the reader of stdout went away (128 + SIGPIPE), as a shell reports it


class ResMemNetError(Exception):
    """Base of the project's errors; `exit_code`: the status a command exits with on it."""

    exit_code = EXIT_USAGE


class InputError(ResMemNetError, ValueError):
    """A value, setting or file the caller gave that cannot be used (the message says why)."""


class ModelFileError(ResMemNetError, RuntimeError):
    """A model file (checkpoint, trunk weights, export) that is missing, corrupt or does not fit."""


class TorchMissingError(ResMemNetError, RuntimeError):
    """Something that needs torch (training, export, the torch backend, some heatmaps) in an
    install without it (`pip install resmemnet` is the torch-free runtime)."""
