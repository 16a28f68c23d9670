"""uvicorn's HTTP/1.1 protocol (h11) with the guards it lacks, for `resmemnet serve`.

uvicorn limits the size of a request head (h11's max incomplete event size) and closes idle
kept-alive connections, but it has no deadline for a request head still arriving: a client can
open a connection and send its head one byte at a time, or nothing at all, and hold the
connection for ever (slowloris). And what it answers to a malformed or oversized head is a plain
text 400. This subclass adds, per connection:

- a head deadline: the request line and headers must be complete within `header_timeout_s` of
  the connection opening, or of the first byte of the next request on a kept-alive connection;
  past it the answer is 408 `request_timeout` and the connection is closed;
- the standard JSON error body for heads h11 refuses: 431 `headers_too_large` over the size
  limit (counted here too: h11 checks it only on a head still incomplete after a read), else 400
  `bad_request`;
- optionally, at most `max_per_client` connections open at once from one client address;
  beyond, 429 `too_many_connections` at once and the connection is closed.

Each refusal is counted in resmemnet_errors_total under its reason (`on_refused`). Body stalls
are the app's business (app/body_limit.py, RESMEMNET_BODY_TIMEOUT_S).
"""
from __future__ import annotations

import json
from collections import Counter
from typing import Callable

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import error_body

DEFAULT_HEAD_LIMIT = 16 * 1024  # h11's own default


def guarded_protocol(*, header_timeout_s: float, max_per_client: int = 0,
                     on_refused: Callable[[str], None] = lambda reason: None) -> type:
    """A protocol class for uvicorn.Config(http=...) with these limits (a class per server: the
    per-client counts are the server's own)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {
        "header_timeout_s": float(header_timeout_s), "max_per_client": int(max_per_client),
        "on_refused": staticmethod(on_refused), "open_per_client": Counter()})


class GuardedH11Protocol(H11Protocol):
    header_timeout_s = 10.0
    max_per_client = 0
    open_per_client: Counter = Counter()

    @staticmethod
    def on_refused(reason: str) -> None:
        pass

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_timer = None
        self._head_cycle = None
        self._refused = False
        self._address = self.client[0] if self.client else None
        if self.max_per_client and self._address is not None:
            self.open_per_client[self._address] += 1
            if self.open_per_client[self._address] > self.max_per_client:
                self._refuse(429, "too_many_connections",
                             f"more than {self.max_per_client} connections are open from this address; close some, "
                             "or send requests over fewer connections (keep-alive)")
                return
        self._start_head_timer()

    def connection_lost(self, exc) -> None:
        self._stop_head_timer()
        if self.max_per_client and self._address is not None:
            self.open_per_client[self._address] -= 1
            if self.open_per_client[self._address] <= 0:
                del self.open_per_client[self._address]
            self._address = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._head_timer is None and self.conn.their_state is h11.IDLE and (
                self.cycle is None or self.cycle.response_complete):
            # the first bytes of the next request on a kept-alive connection (not the rest of a body
            # that uvicorn reads and drops after an early answer: their_state is SEND_BODY then)
            self._start_head_timer()
        if self._head_timer is not None and self._head_too_large(data):
            return
        super().data_received(data)
        if self._head_timer is not None and self.cycle is not self._head_cycle:
            self._stop_head_timer()  # h11 has parsed a request head: the app has it now

    # -- the head deadline -------------------------------------------------------------------
    def _head_too_large(self, data: bytes) -> bool:
        """Count the head's bytes (h11 checks its limit only on a head that is still incomplete
        after a read, so a large head arriving in one piece would pass); refuse past the limit."""
        window = self._head_tail + data
        end = window.find(b"\r\n\r\n")
        self._head_bytes += (end + 4 - len(self._head_tail)) if end >= 0 else len(data)
        self._head_tail = window[-3:]
        if self._head_bytes <= self._head_limit:
            return False
        self._refuse_large_head()
        return True

    def _refuse_large_head(self) -> None:
        self._refuse(431, "headers_too_large", f"the request head (request line and headers) is larger than "
                     f"{self._head_limit} bytes, the limit (RESMEMNET_MAX_HEADER_BYTES)")

    @property
    def _head_limit(self) -> int:
        return self.config.h11_max_incomplete_event_size or DEFAULT_HEAD_LIMIT

    def _start_head_timer(self) -> None:
        self._head_bytes, self._head_tail = 0, b""
        self._head_cycle = self.cycle
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.cycle is self._head_cycle and not self.transport.is_closing():
            self._refuse(408, "request_timeout", f"the request head (request line and headers) did not arrive "
                         f"within {self.header_timeout_s:g} s; send it whole, without pausing")

    # -- answers for what h11 refuses --------------------------------------------------------
    def send_400_response(self, msg: str) -> None:
        if len(self.conn.trailing_data[0]) > self._head_limit:  # h11: "Receive buffer too long"
            self._refuse_large_head()
        else:
            self._refuse(400, "bad_request", "the request is not valid HTTP/1.1 (its request line or headers "
                         "could not be parsed)")

    def _refuse(self, status: int, reason: str, message: str) -> None:
        """Write the standard JSON error and close the connection (no request is in the app)."""
        self._refused = True
        self._stop_head_timer()
        body = json.dumps(error_body(status, reason, message)).encode()
        phrase = {400: "Bad Request", 408: "Request Timeout", 429: "Too Many Requests",
                  431: "Request Header Fields Too Large"}[status]
        head = (f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
                "connection: close\r\n\r\n").encode()
        self.on_refused(reason)
        if not self.transport.is_closing():
            self.transport.write(head + body)
            self.transport.close()


def uvicorn_config(app, settings, **overrides):
    """The uvicorn.Config `resmemnet serve` runs `app` with: these guards, the head size limit,
    keep-alive and shutdown settings from `settings` (ServiceSettings). overrides: e.g. tests
    serving on a socket of their own."""
    import uvicorn

    metrics = app.state.metrics
    protocol = guarded_protocol(header_timeout_s=settings.header_timeout_s,
                                max_per_client=settings.max_connections_per_client,
                                on_refused=lambda reason: metrics.errors.labels(reason=reason).inc())
    options = dict(
        host=settings.host, port=settings.port, log_level=settings.log_level, lifespan="on", http=protocol,
        h11_max_incomplete_event_size=settings.max_header_bytes,
        # 0 means no grace (requests still running are answered 503 shutting_down at once); never None,
        # which uvicorn takes as "wait forever", e.g. for a client stalled mid-upload.
        timeout_graceful_shutdown=settings.graceful_shutdown_s,
        # idle kept-alive connections (load balancers keep theirs) are closed after this long
        timeout_keep_alive=settings.keep_alive_s,
    )
    options.update(overrides)
    return uvicorn.Config(app, **options)
