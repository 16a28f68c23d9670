"""API keys: who may use the scoring endpoints.

Keys come from `RESMEMNET_API_KEYS` (comma-separated) and `RESMEMNET_API_KEYS_FILE` (one a
line; blank lines and `#` comments skipped), each entry `KEY` or `NAME:KEY`. A key is 16 or more
characters of RFC 6750's b64token set (letters, digits and `-._~+/`, then optional `=`), so it
fits an `Authorization: Bearer KEY` header as it is; `openssl rand -hex 32` makes one. A name
(letters, digits, `_.-`, at most 64) is what metrics and logs show; an entry without one is
named after its place (`env-1`, `file-2`, ...).

Only each key's SHA-256 digest is kept, and a presented key is compared, in constant time
(hmac.compare_digest), against every configured digest, all of them every time. Neither a key
nor any part of an entry that failed to parse is ever logged, put in an error message or a
metric label.

The key file is re-read on SIGHUP (ApiKeys.reload, wired by the service) and when it changes:
its mtime, size and inode are checked at most once a second, on the next request. A file that
cannot be read or parsed on a re-read keeps the keys already loaded (and logs why); at start
it is an error.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .settings import SettingsError

log = logging.getLogger("resmemnet.auth")

MIN_KEY_LENGTH = 16
KEY_PATTERN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")  # RFC 6750 b64token
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
ANONYMOUS = "anonymous"  # the key-name label of requests that needed no key
RECHECK_S = 1.0  # the key file's mtime/size are looked at no more often than this
KEYGEN_HINT = "make a key with `openssl rand -hex 32`"


@dataclass(frozen=True)
class ApiKey:
    name: str
    digest: bytes = b""  # SHA-256 of the key; the key itself is not kept

    def __repr__(self) -> str:  # never show even the digest
        return f"ApiKey(name={self.name!r})"


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def parse_keys(entries: list[str], source: str, label: str) -> list[ApiKey]:
    """Entries (`KEY` or `NAME:KEY`) -> ApiKeys. source: where they came from, for messages;
    label: the prefix of unnamed keys' names. SettingsError naming the entry's place, never its text."""
    keys = []
    for number, entry in enumerate(entries, 1):
        name, sep, key = entry.partition(":")
        if not sep:
            name, key = f"{label}-{number}", entry
        elif not NAME_PATTERN.fullmatch(name):
            raise SettingsError(f"{source}, entry {number}: the name before ':' may use only letters, digits, "
                                "'_', '.' and '-' (1 to 64 of them)")
        if len(key) < MIN_KEY_LENGTH:
            raise SettingsError(f"{source}, entry {number} ({name}): the key is {len(key)} characters; a key needs at "
                                f"least {MIN_KEY_LENGTH} ({KEYGEN_HINT})")
        if not KEY_PATTERN.fullmatch(key):
            raise SettingsError(f"{source}, entry {number} ({name}): the key may use only letters, digits and "
                                f"'-._~+/' (then '=' padding), as an Authorization header carries it ({KEYGEN_HINT})")
        keys.append(ApiKey(name, _digest(key)))
    return keys


def _check_unique(keys: list[ApiKey]) -> None:
    names, digests = {}, {}
    for key in keys:
        if key.name in names:
            raise SettingsError(f"API key name {key.name!r} is given twice; every key needs a name of its own")
        if key.digest in digests:
            raise SettingsError(f"the API keys named {digests[key.digest]!r} and {key.name!r} are the same key")
        names[key.name] = True
        digests[key.digest] = key.name


def split_env(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def split_file(text: str) -> list[str]:
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


class ApiKeys:
    """The configured keys: fixed ones from the environment plus a key file re-read when it changes."""

    def __init__(self, env_keys: str = "", key_file: str | os.PathLike | None = None, *, clock=time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._env = parse_keys(split_env(env_keys or ""), "RESMEMNET_API_KEYS", "env")
        self.file = Path(key_file) if key_file else None
        self._file_keys: list[ApiKey] = []
        self._stamp = None
        self._checked = clock()
        if self.file is not None:
            self._file_keys, self._stamp = self._read_file()
        self._keys = self._combine(self._file_keys)

    @property
    def configured(self) -> bool:
        """True when keys are asked for at all (a key in the environment, or a key file)."""
        return bool(self._env) or self.file is not None

    @property
    def names(self) -> list[str]:
        return [k.name for k in self._keys]

    def _combine(self, file_keys: list[ApiKey]) -> tuple[ApiKey, ...]:
        keys = [*self._env, *file_keys]
        _check_unique(keys)
        return tuple(keys)

    def _stat(self):
        st = os.stat(self.file)
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _read_file(self):
        try:
            stamp = self._stat()
            text = self.file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SettingsError(f"RESMEMNET_API_KEYS_FILE {str(self.file)!r} cannot be read: "
                                f"{getattr(exc, 'strerror', None) or type(exc).__name__}") from None
        return parse_keys(split_file(text), f"RESMEMNET_API_KEYS_FILE {str(self.file)!r}", "file"), stamp

    def reload(self, why: str = "SIGHUP") -> bool:
        """Re-read the key file now. True if the keys were replaced; on an error the keys
        loaded before stay (the error is logged, without any key text)."""
        if self.file is None:
            return False
        with self._lock:
            self._checked = self._clock()
            try:
                file_keys, stamp = self._read_file()
                keys = self._combine(file_keys)
            except SettingsError as exc:
                log.error("API keys not reloaded (%s), the %d loaded before stay: %s", why, len(self._keys), exc)
                return False
            self._file_keys, self._stamp, self._keys = file_keys, stamp, keys
        log.info("API keys reloaded (%s): %d key(s), named %s", why, len(keys), ", ".join(k.name for k in keys) or "-")
        if not keys:
            log.warning("no API key is configured now: every request to a protected endpoint is refused")
        return True

    def check_file(self) -> None:
        """Re-read the key file if its mtime, size or inode changed; looked at once a second at most."""
        if self.file is None or self._clock() - self._checked < RECHECK_S:
            return
        self._checked = self._clock()
        try:
            stamp = self._stat()
        except OSError:
            stamp = None
        if stamp != self._stamp:
            self._stamp = stamp  # a file that fails to load is retried when it changes again, not every second
            self.reload("the file changed")

    def match(self, token: str) -> str | None:
        """The name of the configured key `token` is, or None. Constant time in the token's
        content: its digest is compared with every key's digest, with no early exit."""
        self.check_file()
        presented = _digest(token)
        found = None
        for key in self._keys:
            if hmac.compare_digest(presented, key.digest):
                found = key.name
        return found


def is_loopback(host: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and `localhost`; False for every other address or name (0.0.0.0 included)."""
    if host is None:
        return False
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def auth_problem(settings, keys: ApiKeys) -> str | None:
    """Why the service must not start with these settings and keys, or None. The one rule:
    off loopback, keys are the default (docs/api.md, "API keys")."""
    if settings.auth == "off":
        if keys.configured:
            return ("RESMEMNET_AUTH=off, but API keys are configured (RESMEMNET_API_KEYS or RESMEMNET_API_KEYS_FILE): "
                    "unset one or the other")
        return None
    if keys.configured:
        return None
    if settings.auth == "on":
        return ("RESMEMNET_AUTH=on, but no API key is configured: set RESMEMNET_API_KEYS (comma-separated, each "
                f"optionally NAME:KEY) or RESMEMNET_API_KEYS_FILE ({KEYGEN_HINT})")
    if not is_loopback(settings.host):
        return (f"refusing to serve on {settings.host}:{settings.port} without API keys: anyone who can reach that "
                "address could use the service. Set RESMEMNET_API_KEYS (comma-separated, each optionally NAME:KEY) "
                "or RESMEMNET_API_KEYS_FILE to require a key, or RESMEMNET_AUTH=off to serve without keys on purpose "
                "(e.g. behind a proxy that authenticates)")
    return None


def keys_from_settings(settings) -> ApiKeys:
    """The ApiKeys the settings name (SettingsError for a bad entry or an unreadable file)."""
    return ApiKeys(settings.api_keys, settings.api_keys_file or None)
