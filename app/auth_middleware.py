"""The API-key gate in front of the scoring endpoints (and /metrics with RESMEMNET_METRICS_AUTH=1).

A pure ASGI middleware: a request is judged on its head alone, before anything reads its body,
so a refused upload costs no decoding and no memory. It passes when

- keys are configured (app/auth.py) and it carries `Authorization: Bearer KEY` with one of them
  (the scheme in any letter case, RFC 7235); the key's *name* is counted;
- or no key is asked for: RESMEMNET_AUTH=off, or no key is configured and the request came in
  on a loopback address (`resmemnet serve` refuses to bind elsewhere without keys; this catches
  an app mounted some other way). It is counted as `anonymous`.

Anything else is 401 `unauthorized` with `WWW-Authenticate: Bearer realm="resmemnet"`, the
standard JSON error body, and a count under the rejection's reason. A key in the query string
is refused, never accepted. Nothing a client sent in the header or the URL is repeated.

A refused request's body, when it has one, is read and thrown away (up to `drain_limit` bytes,
under the body limit's size and stall guards) so that the client gets its 401 on a connection
still open, not a reset; a larger or chunked body, or one the client holds back behind
`Expect: 100-continue`, is not read: the 401 goes out at once with `Connection: close`.
"""
from __future__ import annotations

import ipaddress
import logging
import re
from typing import Callable
from urllib.parse import parse_qsl

from .auth import ANONYMOUS, ApiKeys, is_loopback
from .errors import send_error

# Query parameters a client might put a key in: refused with a 401 saying so, never read as a key.
CREDENTIAL_PARAMS = frozenset({"api_key", "apikey", "api-key", "key", "token", "access_token", "auth", "authorization",
                               "bearer", "password", "secret"})
CHALLENGE = b'Bearer realm="resmemnet"'
SCOPE_KEY_NAME = "resmemnet.api_key_name"

MESSAGES = {
    "missing": "this endpoint needs an API key: send it as the header `Authorization: Bearer KEY`",
    "several": "the request has more than one Authorization header; send one: `Authorization: Bearer KEY`",
    "malformed": "the Authorization header must be `Bearer KEY`: the Bearer scheme, a space, then the key",
    "empty": "the Authorization header names the Bearer scheme but carries no key",
    "unknown_key": "this API key is not accepted here (it is wrong, or it has been revoked)",
    "no_keys": ("this service has no API keys configured, so it serves only requests from its own machine; its "
                "operator can set RESMEMNET_API_KEYS (or RESMEMNET_AUTH=off, to serve everyone without a key)"),
}


def bearer_token(headers) -> tuple[str | None, str | None]:
    """(token, None) from an `Authorization: Bearer TOKEN` header, or (None, rejection reason)."""
    values = [value for name, value in headers if name == b"authorization"]
    if not values:
        return None, "missing"
    if len(values) > 1:
        return None, "several"
    scheme, _, rest = values[0].decode("latin-1").strip().partition(" ")
    if scheme.lower() != "bearer":
        return None, "malformed"
    token = rest.strip()
    if not token:
        return None, "empty"
    return token, None


def credential_in_query(scope) -> str | None:
    """The name of a query parameter that looks like it carries a key, or None."""
    query = scope.get("query_string", b"").decode("latin-1")
    for name, _ in parse_qsl(query, keep_blank_values=True):
        if name.lower() in CREDENTIAL_PARAMS:
            return name.lower()
    return None


def came_in_on_loopback(scope) -> bool:
    """True when the request arrived on a loopback address of this server, or not over IP at
    all (a Unix socket; an in-process test client)."""
    server = scope.get("server")
    host = server[0] if server else None
    if not host:
        return True
    try:
        ipaddress.ip_address(str(host).strip("[]"))
    except ValueError:
        return True  # a socket path or a test client's made-up name: not a network interface
    return is_loopback(str(host))


class ApiKeyMiddleware:
    def __init__(self, app, *, keys: ApiKeys, mode: str, protected: Callable[[str], bool], metrics,
                 drain_limit: int):
        self.app = app
        self.keys = keys
        self.mode = mode
        self.protected = protected
        self.metrics = metrics
        self.drain_limit = drain_limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.protected(scope["path"]):
            return await self.app(scope, receive, send)
        if self.mode == "off" or (self.mode == "auto" and not self.keys.configured and came_in_on_loopback(scope)):
            self.metrics.key_requests.labels(key=ANONYMOUS).inc()
            return await self.app(scope, receive, send)
        param = credential_in_query(scope)
        if param is not None:
            return await self._refuse(scope, receive, send, "key_in_url", (
                f"an API key in the URL (query parameter {param!r}) is not accepted: URLs are written to logs and "
                "browser histories. Send the key as the header `Authorization: Bearer KEY`, and replace a key that "
                "was sent this way"))
        if not self.keys.configured:
            return await self._refuse(scope, receive, send, "no_keys", MESSAGES["no_keys"])
        token, problem = bearer_token(scope.get("headers", ()))
        name = self.keys.match(token) if token is not None else None
        if name is None:
            problem = problem or "unknown_key"
            return await self._refuse(scope, receive, send, problem, MESSAGES[problem])
        scope[SCOPE_KEY_NAME] = name
        self.metrics.key_requests.labels(key=name).inc()
        await self.app(scope, receive, send)

    async def _refuse(self, scope, receive, send, reason: str, message: str) -> None:
        self.metrics.auth_rejections.labels(reason=reason).inc()
        drained = await self._drain(scope, receive)
        challenge = CHALLENGE + (b', error="invalid_token"' if reason == "unknown_key" else b"")
        await send_error(send, scope, 401, "unauthorized", message, headers=[(b"www-authenticate", challenge)],
                         close=not drained)

    async def _drain(self, scope, receive) -> bool:
        """Read and drop the request body if it is small enough; False if it was left unread."""
        headers = dict(scope.get("headers", ()))
        if headers.get(b"expect", b"").lower() == b"100-continue" or b"transfer-encoding" in headers:
            return False
        try:
            length = int(headers.get(b"content-length", b"0"))
        except ValueError:
            return False
        if length > self.drain_limit:
            return False
        more = length > 0
        while more:
            message = await receive()  # under the body limit's guards: too long a pause is its 408
            if message["type"] != "http.request":
                return False  # the client went away
            more = message.get("more_body", False)
        return True


_QUERY_VALUE = re.compile(r"([?&])([^=&#]*)=([^&#]*)")


def redact_query(path: str) -> str:
    """A path with query string, with the values of key-like parameters replaced by `REDACTED`."""
    def redact(m: re.Match) -> str:
        return f"{m.group(1)}{m.group(2)}=REDACTED" if m.group(2).lower() in CREDENTIAL_PARAMS else m.group(0)

    return _QUERY_VALUE.sub(redact, path) if "?" in path else path


class RedactKeysFilter(logging.Filter):
    """On uvicorn's access log: a key sent in the URL (refused, but still in the request line) is
    not written to the log. uvicorn's record args are (client, method, path with query, version, status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            record.args = (*args[:2], redact_query(args[2]), *args[3:])
        return True


def install_access_log_filter() -> None:
    """Add RedactKeysFilter to uvicorn's access logger once per process."""
    logger = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactKeysFilter) for f in logger.filters):
        logger.addFilter(RedactKeysFilter())
