"""Request body limit (413) enforced while the body streams in, before it is buffered.

A declared Content-Length over the limit is refused without reading the body; a chunked body
is counted as it arrives and refused as soon as it passes the limit, so an upload never costs
more than the limit in memory or temporary disk. Whatever the application was about to answer
(FastAPI turns a failed form parse into a 400) is replaced by the standard 413 error body.
"""
from __future__ import annotations

import json
from typing import Callable

from .errors import error_body, mark_error

# scope key: True/False once a multipart body has been read to its end (closing boundary seen or not)
SCOPE_MULTIPART_COMPLETE = "resmemnet.multipart_complete"


class BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    def __init__(self, app, limit_for: Callable[[str], int | None]):
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope, receive, send):
        limit = self.limit_for(scope["path"]) if scope["type"] == "http" else None
        if limit is None:
            return await self.app(scope, receive, send)

        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await self._reject(scope, send, limit, declared)
            return

        state = {"received": 0, "exceeded": False, "answered": False, "started": False}
        closing = _closing_boundary(scope)
        tail = bytearray()

        async def limited_receive():
            message = await receive()
            if message["type"] == "http.request":
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
                    await self._reject(scope, send, limit, None)
                return
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except BodyTooLarge:
            if not state["answered"] and not state["started"]:
                state["answered"] = True
                await self._reject(scope, send, limit, None)
        except Exception:
            if not state["exceeded"]:
                raise
            if not state["answered"] and not state["started"]:
                state["answered"] = True
                await self._reject(scope, send, limit, None)

    async def _reject(self, scope, send, limit: int, declared: int | None) -> None:
        # replaces whatever reason the swallowed answer recorded: the request is counted once, as a 413
        mark_error(scope, "upload_too_large")
        told = f"is {declared} bytes" if declared is not None else "goes on past the limit"
        body = json.dumps(error_body(413, "upload_too_large", f"the request body {told}; this endpoint takes at most "
                                     f"{limit} bytes (the upload limit plus multipart framing)")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


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
