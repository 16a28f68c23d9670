"""One error shape for every failure the service reports.

    {"error": {"status": 415, "reason": "not_an_image", "message": "not an image format ..."}}

`reason` is a stable machine-readable code (the table in REASONS), `message` is for people.
Every error answer records its reason in the request's ASGI scope (`mark_error`); the metrics
middleware counts it once, when the answer has gone out, in `resmemnet_errors_total{reason=...}`.
So a reason recorded twice on one request (a 400 replaced by the body limit's 413) is still
counted once, under the reason of the answer the client got.
"""
from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.errors import ResMemNetError

log = logging.getLogger("resmemnet.service")

# reason -> (HTTP status, when it happens). The README's error table is generated from this.
REASONS: dict[str, tuple[int, str]] = {
    "invalid_request": (422, "missing or misnamed multipart field (images go in `file`, or `files` for /score/batch), "
                             "or a query parameter out of range"),
    "unexpected_field": (422, "a multipart field or query parameter the endpoint does not take (it is refused, "
                              "not silently ignored)"),
    "unknown_profile": (422, "query parameter `profile` names a score profile this checkpoint does not have; the "
                             "message lists the ones it has"),
    "multiple_files": (422, "several files in a one-image endpoint (/score, /heatmap); send them to /score/batch "
                            "in repeated field `files`"),
    "empty": (422, "the uploaded file has 0 bytes"),
    "corrupt": (422, "the file looks like an image but cannot be decoded (truncated, damaged)"),
    "non_finite": (422, "a float image with NaN or infinite samples where too many are NaN to judge it"),
    "not_an_image": (415, "the file is not in an image format the server can read"),
    "upload_too_large": (413, "a file or the request body is larger than the upload limit"),
    "too_many_pixels": (413, "the image has more pixels than the limit (decompression-bomb guard)"),
    "too_many_files": (413, "more files in one /score/batch request than allowed"),
    "too_many_fields": (413, "more text fields in one multipart request than `RESMEMNET_MAX_FORM_FIELDS`"),
    "headers_too_large": (431, "the request head is larger than `RESMEMNET_MAX_HEADER_BYTES`; the connection is "
                               "closed"),
    "too_many_connections": (429, "more connections open from one address than `RESMEMNET_MAX_CONNECTIONS_PER_CLIENT`; "
                                  "the connection is closed"),
    "request_timeout": (408, "the request head did not arrive within `RESMEMNET_HEADER_TIMEOUT_S`, or the body "
                             "stopped arriving (no data for `RESMEMNET_BODY_TIMEOUT_S` seconds); the connection is "
                             "closed"),
    "bad_request": (400, "the request body could not be parsed (e.g. malformed multipart)"),
    "unauthorized": (401, "no valid API key: the service has keys configured and the request did not carry one as "
                          "`Authorization: Bearer KEY` (a key in the URL is refused too); see `WWW-Authenticate`"),
    "not_found": (404, "no such endpoint"),
    "method_not_allowed": (405, "the endpoint exists but not for this HTTP method"),
    "queue_full": (503, "the scoring queue is full; retry after `Retry-After` seconds"),
    "heatmap_busy": (503, "all heatmap slots are busy; retry after `Retry-After` seconds"),
    "not_ready": (503, "the model is still loading or warming up"),
    "shutting_down": (503, "the server is shutting down and accepts no new work"),
    "deadline_exceeded": (504, "the request was not answered within the request deadline"),
    "internal": (500, "an unexpected server error (logged); please report it"),
}

# ImageDecodeError.reason -> our reason (the same codes, plus the file-level ones).
DECODE_REASONS = {"empty", "corrupt", "not_an_image", "too_many_pixels", "non_finite"}

HTTP_STATUS_REASONS = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                       408: "request_timeout",
                       413: "upload_too_large",
                       415: "not_an_image", 422: "invalid_request", 503: "not_ready", 504: "deadline_exceeded"}


class ServiceError(ResMemNetError):
    """An expected failure with a reason code; rendered as the standard error body."""

    def __init__(self, reason: str, message: str, *, status: int | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.status = status or REASONS.get(reason, (500, ""))[0]
        self.retry_after = retry_after

    def body(self) -> dict:
        return error_body(self.status, self.reason, self.message)


def from_decode_error(exc) -> ServiceError:
    """ImageDecodeError -> ServiceError with the matching status."""
    reason = exc.reason if exc.reason in DECODE_REASONS else "corrupt"
    return ServiceError(reason, exc.message)


def error_body(status: int, reason: str, message: str) -> dict:
    return {"error": {"status": status, "reason": reason, "message": message}}


SCOPE_REASON = "resmemnet.error_reason"
SCOPE_UNCOUNTED = "resmemnet.error_uncounted"
SCOPE_FORM_FIELDS = "resmemnet.form_fields"


def mark_error(scope: dict, reason: str) -> None:
    """Record the reason of the error this request is answered with (the last one recorded wins)."""
    scope[SCOPE_REASON] = reason


def count_file_error(request_or_app, reason: str) -> None:
    """Count one failed file of a /score/batch request (the request itself answers 200)."""
    app = getattr(request_or_app, "app", request_or_app)
    metrics = getattr(getattr(app, "state", None), "metrics", None)
    if metrics is not None:
        metrics.errors.labels(reason=reason).inc()


async def send_error(send, scope: dict, status: int, reason: str, message: str, *,
                     headers: list[tuple[bytes, bytes]] = (), close: bool = False) -> None:
    """Send the standard error body straight through ASGI `send` (for middleware that answers
    before the app runs), recording its reason for the metrics. close: ask the client to close
    the connection (the request body was not read)."""
    mark_error(scope, reason)
    body = json.dumps(error_body(status, reason, message)).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    if close:
        head.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


def error_response(request: Request | None, status: int, reason: str, message: str, *,
                   retry_after: int | None = None) -> JSONResponse:
    if request is not None:
        mark_error(request.scope, reason)
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse(error_body(status, reason, message), status_code=status, headers=headers)


def reason_for_status(status: int) -> str:
    """The reason an error answer with no recorded reason is counted under."""
    return HTTP_STATUS_REASONS.get(status, "bad_request" if status < 500 else "internal")


def _describe_validation(errors, received: list[str] | None = None) -> str:
    parts = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
        where = ".".join(loc) or "request"
        in_body = err.get("loc", ("",))[0] == "body"
        if err.get("type") == "missing" and in_body:
            got = (f" (this request's fields: {', '.join(map(repr, received))})" if received
                   else " (this request had no multipart fields)" if received is not None else "")
            parts.append(f"multipart field {where!r} is required{got}")
        elif in_body and "UploadFile" in str(err.get("msg", "")):
            # curl -F file=<photo.jpg (no @) sends the bytes as a text value, without a file name
            parts.append(f"multipart field {where!r} was sent without a file name, so as a text value, not as a "
                         f"file (with curl: -F {where}=@photo.jpg, with the @; in a browser form: no file chosen)")
        else:
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
    hint = ("; send the image as multipart/form-data in field 'file' (or repeated 'files' for /score/batch)"
            if any(e.get("loc", ("",))[0] == "body" for e in errors) else "")
    return "; ".join(parts) + hint


def _form_parse_error(request: Request, message: str) -> tuple[str, int, str]:
    """Starlette's multipart limits, told in the service's terms (reason, status, message)."""
    if message.startswith("Too many files"):
        settings = getattr(request.app.state, "settings", None)
        limit = getattr(settings, "max_files_per_request", None)
        return "too_many_files", 413, f"{message} (this service takes at most {limit} files per /score/batch request)"
    if message.startswith("Too many fields"):
        settings = getattr(request.app.state, "settings", None)
        limit = getattr(settings, "max_form_fields", None)
        return "too_many_fields", 413, (f"more than {limit} text fields in one request (RESMEMNET_MAX_FORM_FIELDS); "
                                        "the endpoints take none: images go in file fields ('file', or 'files' for "
                                        "/score/batch)")
    if message.startswith(("Part exceeded maximum size", "Field exceeded maximum size")):
        return "invalid_request", 422, (f"{message} A text field that large is usually an image sent without a file "
                                        "name (with curl: -F file=@photo.jpg, with the @)")
    if message == "Invalid multipart data.":
        message = ("the multipart body could not be parsed: a malformed part, or a part with more header lines "
                   "than 8 or one longer than 4 KiB (python-multipart's limits)")
    return "bad_request", 400, message


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError):
        return error_response(request, exc.status, exc.reason, exc.message, retry_after=exc.retry_after)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return error_response(request, 422, "invalid_request",
                              _describe_validation(exc.errors(), request.scope.get(SCOPE_FORM_FIELDS)))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        reason = reason_for_status(exc.status_code)
        message = str(exc.detail) if exc.detail else reason
        if exc.status_code == 400:
            reason, status, message = _form_parse_error(request, message)
            return error_response(request, status, reason, message)
        if exc.status_code == 404:
            message = f"no endpoint at {request.url.path}; see /docs"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return error_response(request, exc.status_code, reason, message)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        # Last resort: anything reaching here is a bug; log it with the traceback, answer JSON.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(request, 500, "internal", f"unexpected server error ({type(exc).__name__}); it was logged")
