"""Request body limit (413) and body timeout (408) enforced while the body streams in.

A declared Content-Length over the limit is refused without reading the body; a chunked body
is counted as it arrives and refused as soon as it passes the limit, so an upload never costs
more than the limit in memory or temporary disk. A body that stops arriving (no data for
`timeout_s` before it is complete) is answered 408 `request_timeout` and the connection closed,
so a stalled client cannot hold a connection and its partial upload open. Whatever the
application was about to answer (FastAPI turns a failed form parse into a 400) is replaced by
the standard error body.
"""
from __future__ import annotations

import asyncio
from typing import Callable

from model.errors import ResMemNetError

from .errors import send_error

# scope key: True/False once a multipart body has been read to its end (closing boundary seen or not)
SCOPE_MULTIPART_COMPLETE = "resmemnet.multipart_complete"


DEFAULT_BODY_TIMEOUT_S = 30.0


class BodyTooLarge(ResMemNetError):
    """The request body is over its limit (the middleware answers 413 itself)."""


class BodyTimeout(BodyTooLarge):
    """The body stopped arriving (a subclass so every path that handles a refused body handles it)."""


class BodyLimitMiddleware:
    def __init__(self, app, limit_for: Callable[[str], int | None], timeout_s: float | None = None):
        """`timeout_s`: longest wait for the next body message; None: the app's
        `state.settings.body_timeout_s` (ServiceSettings), else DEFAULT_BODY_TIMEOUT_S."""
        self.app = app
        self.limit_for = limit_for
        self.timeout_s = timeout_s

    def _timeout(self, scope) -> float:
        if self.timeout_s is not None:
            return self.timeout_s
        settings = getattr(getattr(scope.get("app"), "state", None), "settings", None)
        return float(getattr(settings, "body_timeout_s", DEFAULT_BODY_TIMEOUT_S))

    async def __call__(self, scope, receive, send):
        limit = self.limit_for(scope["path"]) if scope["type"] == "http" else None
        if limit is None:
            return await self.app(scope, receive, send)

        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await self._reject(scope, send, limit, declared)
            return

        timeout = self._timeout(scope)
        state = {"received": 0, "exceeded": False, "timed_out": False, "body_done": False,
                 "answered": False, "started": False}
        closing = _closing_boundary(scope)
        tail = bytearray()

        async def limited_receive():
            if state["body_done"]:
                return await receive()  # waiting for a disconnect after the body is not a stall
            try:
                message = await asyncio.wait_for(receive(), timeout)
            except asyncio.TimeoutError:
                state["exceeded"] = state["timed_out"] = True
                raise BodyTimeout() from None
            if message["type"] == "http.request":
                if not message.get("more_body", False):
                    state["body_done"] = True
                chunk = message.get("body", b"")
                state["received"] += len(chunk)
                if state["received"] > limit:
                    state["exceeded"] = True
                    raise BodyTooLarge()
                if closing is not None:
                    # keep the last bytes: a multipart body must end with its closing boundary, or
                    # its last part was cut off and the parser would drop it without a word
                    tail.extend(chunk)
                    del tail[:-(len(closing) + 256)]
                    if not message.get("more_body", False):
                        scope[SCOPE_MULTIPART_COMPLETE] = closing in tail
            return message

        async def guarded_send(message):
            if state["exceeded"]:
                # Swallow the app's own answer to the aborted parse; send ours instead.
                if message["type"] == "http.response.start" and not state["answered"]:
                    state["answered"] = True
                    await self._refuse(scope, send, limit, state)
                return
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except BodyTooLarge:
            if not state["answered"] and not state["started"]:
                state["answered"] = True
                await self._refuse(scope, send, limit, state)
        except Exception:
            if not state["exceeded"]:
                raise
            if not state["answered"] and not state["started"]:
                state["answered"] = True
                await self._refuse(scope, send, limit, state)

    async def _refuse(self, scope, send, limit: int, state: dict) -> None:
        if state["timed_out"]:
            await self._time_out(scope, send, state["received"])
        else:
            await self._reject(scope, send, limit, None)

    async def _time_out(self, scope, send, received: int) -> None:
        message = (f"the request body stopped arriving: no data for {self._timeout(scope):g} s after "
                   f"{received} bytes; send the whole body without pausing")
        await send_error(send, scope, 408, "request_timeout", message, close=True)

    async def _reject(self, scope, send, limit: int, declared: int | None) -> None:
        # replaces whatever reason the swallowed answer recorded: the request is counted once, as a 413
        told = f"is {declared} bytes" if declared is not None else "goes on past the limit"
        await send_error(send, scope, 413, "upload_too_large", f"the request body {told}; this endpoint takes at most "
                         f"{limit} bytes (the upload limit plus multipart framing)", close=True)


def _closing_boundary(scope) -> bytes | None:
    """b"--BOUNDARY--" of a multipart/form-data request, or None."""
    for name, value in scope.get("headers", ()):
        if name == b"content-type" and value.lower().startswith(b"multipart/form-data"):
            for param in value.split(b";")[1:]:
                key, _, val = param.strip().partition(b"=")
                if key.lower() == b"boundary" and val:
                    return b"--" + val.strip(b'"') + b"--"
    return None


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
