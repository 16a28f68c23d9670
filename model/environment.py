"""What the process was started with, as the model package sees it: the `RESMEMNET_*` variables
it honours and the versions of installed packages.

Every variable is read here, by `env_value`, when it is needed (never at import), so a test or a
caller that sets it later is heard. The service reads its own settings through the same function
(app/settings.py). Nothing here imports torch.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

ENV_PREFIX = "RESMEMNET_"
# The checkpoint that ships in the repository (weights/); RESMEMNET_WEIGHTS names another.
SHIPPED_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "resmemnet-default.json"


# RESMEMNET_* variables read outside the service settings (app/settings.py names the rest): the
# trunk cache, the compose file's interpolation and the test suite's switches. Any other
# RESMEMNET_* name is most likely a typo, which `resmemnet serve` warns about (unknown_variables).
OTHER_VARIABLES = frozenset({
    "RESMEMNET_CACHE_DIR",
    "RESMEMNET_IMAGE", "RESMEMNET_PROMETHEUS_IMAGE", "RESMEMNET_HAPROXY_IMAGE", "RESMEMNET_PUBLISH_PORT",
    "RESMEMNET_LB_PUBLISH_PORT", "RESMEMNET_LB_STATS_PORT", "RESMEMNET_REPLICA_DEVICE",
    "RESMEMNET_REQUIRE_DOCKER", "RESMEMNET_REQUIRE_HAPROXY", "RESMEMNET_REQUIRE_BROWSER", "RESMEMNET_DOCKER_ROOT",
    "RESMEMNET_CONTAINER_REPORT", "RESMEMNET_LB_REPORT", "RESMEMNET_CHROMIUM", "RESMEMNET_CHROMEDRIVER",
})


def unknown_variables(known: set[str] | frozenset[str], environ: Mapping[str, str] | None = None) -> list[str]:
    """One warning per RESMEMNET_* variable that is set but neither in `known` nor in
    OTHER_VARIABLES, naming the closest known name when there is one (a typo is ignored silently
    otherwise). Values are never shown: a key may sit in a misspelt variable."""
    import difflib

    names = set(known) | OTHER_VARIABLES
    warnings = []
    for name in sorted(os.environ if environ is None else environ):
        if name.startswith(ENV_PREFIX) and name not in names:
            close = difflib.get_close_matches(name, sorted(names), n=1, cutoff=0.8)
            hint = f"; did you mean {close[0]}?" if close else " (docs/api.md lists the settings)"
            warnings.append(f"{name} is not a setting, so it is ignored{hint}")
    return warnings


def env_name(setting: str) -> str:
    """'max_batch_size' -> 'RESMEMNET_MAX_BATCH_SIZE'."""
    return ENV_PREFIX + setting.upper()


def env_value(setting: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The value of RESMEMNET_<SETTING> (surrounding blanks removed), or None when it is unset or
    blank. `environ` defaults to the process environment."""
    raw = (os.environ if environ is None else environ).get(env_name(setting))
    if raw is None or not raw.strip():
        return None
    return raw.strip()


def default_weights(environ: Mapping[str, str] | None = None) -> Path:
    """The checkpoint a command uses without --weights: $RESMEMNET_WEIGHTS, else the shipped one."""
    value = env_value("weights", environ)
    return Path(value) if value else SHIPPED_WEIGHTS


def backend_setting(name: str | None, *, default: str, environ: Mapping[str, str] | None = None) -> str:
    """The inference backend asked for: `name` (a flag or argument), else $RESMEMNET_BACKEND,
    else `default`, lower-cased. Checked by model.engines.check_backend."""
    return (name or env_value("backend", environ) or default).strip().lower()


# What a trunk precision setting may name (model.devices.autocast_dtype says what each runs).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def precision_setting(name: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The trunk precision asked for: `name` (an argument or flag), else $RESMEMNET_PRECISION,
    else "auto", lower-cased. Checked by model.devices.check_precision; the one place the
    variable is read (the Scorer, the service and the command line all come here)."""
    return (name or env_value("precision", environ) or "auto").strip().lower()


def installed_version(package: str = "resmemnet") -> str | None:
    """An installed distribution's version from its metadata (nothing is imported), or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None
