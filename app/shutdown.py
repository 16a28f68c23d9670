"""The documented answer for a request cut short by shutdown: JSON 503 `shutting_down`.

When the graceful-shutdown period runs out (at once with RESMEMNET_GRACEFUL_SHUTDOWN_S=0),
uvicorn cancels the tasks of requests still running, e.g. a client stalled mid-upload or an
image still queued. Left alone, uvicorn would answer them with a plain-text 500. This guard
catches the cancellation, sends the service's standard error body (503, `shutting_down`,
`Retry-After`, `Connection: close`) if no answer has started, and lets the cancellation go on.
"""
from __future__ import annotations

import asyncio

from .errors import send_error


class ShutdownGuardMiddleware:
    def __init__(self, app, retry_after_s: int = 1):
        self.app = app
        self.retry_after_s = retry_after_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = {"response": False}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                started["response"] = True
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except asyncio.CancelledError:
            if not started["response"]:
                started["response"] = True
                try:
                    await send_error(send, scope, 503, "shutting_down", "the server shut down before this request "
                                     "was answered; retry on another instance",
                                     headers=[(b"retry-after", str(self.retry_after_s).encode())], close=True)
                except Exception:  # the client is gone: nothing left to tell it
                    pass
                # The answer is complete; returning (not re-raising) keeps uvicorn from logging a
                # traceback for what is an orderly shutdown. The task ends here either way.
                return
            raise
