"""HTTP endpoints. Handlers only validate, decode (in the decode pool) and await the batcher;
the model itself runs in the batcher's worker thread or the heatmap pool, never on the loop."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from fastapi import APIRouter, Depends, File, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer

from .batcher import BatcherClosedError, QueueFullError
from .body_limit import SCOPE_MULTIPART_COMPLETE
from .errors import SCOPE_FORM_FIELDS, SCOPE_UNCOUNTED, ServiceError, count_file_error, error_body, from_decode_error
from .schemas import (BatchItem, BatchResponse, ErrorDetail, HealthResponse, ModelInfo, ProfileInfo, ReadyResponse, ScoreResponse,
                      Timing, error_responses)

if TYPE_CHECKING:
    from model.scoring import PreparedInput

    from .state import ServiceState

router = APIRouter()

# Documents the Bearer scheme in /openapi.json (and gives /docs its Authorize button); the key
# itself is checked by app.auth_middleware before any of this runs, so this never refuses.
API_KEY = Depends(HTTPBearer(auto_error=False, scheme_name="api_key", description=(
    "an API key as `Authorization: Bearer KEY`, needed when the service has keys configured (RESMEMNET_API_KEYS, "
    "RESMEMNET_API_KEYS_FILE)")))

IMAGE_FIELD_DOC = "the image: JPEG, PNG, WebP, GIF, BMP, TIFF or any other format Pillow reads"
PROFILE_QUERY_DOC = ("score profile: `default` (the checkpoint's own score) or another the checkpoint has (shipped: "
                     "`lnsim`, alias `outdoor`, for outdoor scenes; `cdm`, for photos like the second study's; "
                     "`general`, for photos unlike both); `/readyz` lists them; a checkpoint without a teacher "
                     "output has only `default`")


def profile_query():
    """The `profile` query parameter of every scoring endpoint. No length limit: any name the model
    has not got is 422 unknown_profile (_profile), never a validation error."""
    return Query("default", description=PROFILE_QUERY_DOC)


@dataclass
class Decoded:
    """An upload made ready by the Scorer (model.scoring.PreparedInput), and how long that took."""

    input: PreparedInput
    decode_s: float


def _state(request: Request) -> ServiceState:
    return request.app.state.service


# -- what a request may carry ---------------------------------------------------------------
def form_fields(field: str, *, many: bool, query: tuple[str, ...] = ()):
    """A dependency refusing what the endpoint would otherwise drop without a word: repeated
    one-image fields (422 multiple_files), other multipart fields and unknown or repeated query
    parameters (422 unexpected_field / invalid_request). FastAPI parses the form before any
    dependency runs; `request.form()` returns that parsed form, it does not read the body again."""

    async def check(request: Request) -> None:
        for name in sorted({k for k, _ in request.query_params.multi_items()}):
            if name not in query:
                allowed = f"it takes {', '.join(query)}" if query else "it takes none"
                name = _short(name)  # echo no huge values
                raise ServiceError("unexpected_field", f"query parameter {name!r} is not known to "
                                   f"{request.url.path} ({allowed}); it is refused rather than ignored")
            given = request.query_params.getlist(name)
            if len(given) > 1:
                raise ServiceError("invalid_request", f"query parameter {name!r} is given {len(given)} times "
                                   f"({', '.join(repr(_short(g)) for g in given)}); give it once")
        content_type = request.headers.get("content-type", "").lower()
        if not content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            return  # FastAPI reports the missing field
        form = await request.form()
        if request.scope.get(SCOPE_MULTIPART_COMPLETE) is False:
            raise ServiceError("bad_request", "the multipart body ends without its closing boundary: the upload was "
                               "cut short, so its last part would be lost; nothing was scored", status=400)
        names = [k for k, _ in form.multi_items()]
        request.scope[SCOPE_FORM_FIELDS] = sorted(set(names))
        if field not in names:
            return  # FastAPI answers 422 invalid_request, naming the fields that did come
        others = sorted(set(names) - {field})
        if others:
            raise ServiceError("unexpected_field", f"multipart field(s) {', '.join(repr(_short(n)) for n in others)} "
                               f"are not taken by "
                               f"{request.url.path}; it takes only {field!r}"
                               + ("" if many else " (one image; several images go to /score/batch in field 'files')"))
        count = names.count(field)
        if not many and count > 1:
            files = [_short(getattr(v, "filename", None) or "(no name)") for v in form.getlist(field)]
            raise ServiceError("multiple_files", f"{count} files were sent in field {field!r} ({', '.join(files)}), "
                               f"but {request.url.path} scores one image per request; send several images to "
                               f"/score/batch in repeated field 'files', or one request per image")

    return Depends(check)


def _short(name: str, limit: int = 40) -> str:
    """A name a client chose, cut for an error message (part headers may be 4 KiB each)."""
    return name if len(name) <= limit else f"{name[:limit]}..."


# -- shared steps ----------------------------------------------------------------------------
def _admit(state, count: int):
    try:
        return state.batcher.admit(count)
    except QueueFullError as exc:
        raise ServiceError("queue_full", f"the scoring queue is full ({exc}); retry shortly",
                           retry_after=state.settings.retry_after_s) from None
    except BatcherClosedError:
        raise ServiceError("shutting_down", "the server is shutting down", retry_after=state.settings.retry_after_s) from None


async def _read_upload(state, upload: UploadFile) -> bytes:
    """The upload's bytes, refusing files over the per-file limit before reading them."""
    limit = state.settings.max_upload_bytes
    if upload.size is not None and upload.size > limit:
        raise ServiceError("upload_too_large", f"{_name(upload)} is {upload.size} bytes; the limit is {limit} bytes")
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise ServiceError("upload_too_large", f"{_name(upload)} is larger than the limit of {limit} bytes")
    return data


def _name(upload: UploadFile) -> str:
    return repr(upload.filename) if upload.filename else "the upload"


async def _decode(state, upload: UploadFile, *, keep_image: bool = False) -> Decoded:
    """Scorer.prepare of an upload, in the decode pool; ImageDecodeError -> ServiceError.
    keep_image: keep the decoded image too (heatmaps)."""
    from model.preprocess import ImageDecodeError

    data = await _read_upload(state, upload)
    max_pixels = state.settings.max_pixels
    scorer = state.scorer

    def work():
        started = time.perf_counter()
        prepared = scorer.prepare(data, max_pixels=max_pixels, keep_image=keep_image)
        return Decoded(prepared, time.perf_counter() - started)

    try:
        result = await asyncio.get_running_loop().run_in_executor(state.preprocess_pool, work)
    except ImageDecodeError as exc:
        raise from_decode_error(exc) from None
    if not keep_image:  # the metric is of what a scored image costs
        state.metrics.preprocess_time.observe(result.decode_s)
    return result


def _profile(state, profile: str) -> str:
    """The score profile asked for, or 422 unknown_profile naming those the served model has."""
    try:
        return state.scorer.check_profile(profile)
    except ValueError as exc:
        raise ServiceError("unknown_profile", f"query parameter profile: {exc}") from None


def _percentile(state, score: float, profile: str) -> float | None:
    """The score's rank among the checkpoint's reference photos by the profile's quantiles (None without)."""
    return state.scorer.percentile(score, profile)


async def _await_deadline(awaitable, deadline: float):
    remaining = deadline - time.perf_counter()
    try:
        if remaining <= 0:
            raise asyncio.TimeoutError
        return await asyncio.wait_for(awaitable, remaining)
    except asyncio.TimeoutError:
        if asyncio.iscoroutine(awaitable):
            awaitable.close()
        raise ServiceError("deadline_exceeded", "the request was not answered within the request deadline "
                           "(the server is overloaded or the image is very large)") from None
    except BatcherClosedError:
        raise ServiceError("shutting_down", "the server shut down before this image was scored") from None


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def _timing(prepared: Decoded, result, total_s: float) -> Timing:
    return Timing(total_ms=_ms(total_s), decode_ms=_ms(prepared.decode_s), queue_ms=_ms(result.queue_wait_s),
                  model_ms=_ms(result.model_s), batch_size=result.batch_size)


# -- scoring ---------------------------------------------------------------------------------
@router.post("/score", response_model=ScoreResponse, tags=["scoring"], summary="Score one image",
             responses=error_responses(400, 401, 413, 415, 422, 503, 504),
             dependencies=[API_KEY])
async def score(request: Request, file: UploadFile = File(..., description=IMAGE_FIELD_DOC),
                profile: str = profile_query(),
                _form: None = form_fields("file", many=False, query=("profile",))) -> ScoreResponse:
    """Memorability of one image, sent as multipart/form-data field `file`.

    Concurrent calls are batched together (whatever their profiles); the score does not depend on the batch.
    `curl -F file=@photo.jpg 'http://localhost:8000/score?profile=default'`
    """
    state = _state(request)
    started = time.perf_counter()
    state.require_ready()
    profile = _profile(state, profile)
    deadline = started + state.settings.request_timeout_s
    with _admit(state, 1) as admission:
        decoded = await _decode(state, file)
        future = admission.submit([decoded.input.tensor], profile)[0]
    result = await _await_deadline(future, deadline)
    total = time.perf_counter() - started
    image = decoded.input
    return ScoreResponse(score=result.score, profile=profile, percentile=_percentile(state, result.score, profile),
                         warnings=image.warnings, filename=file.filename, width=image.width,
                         height=image.height, model=ModelInfo(**state.model_info), elapsed_ms=_ms(total),
                         timing=_timing(decoded, result, total))


@router.post("/score/batch", response_model=BatchResponse, tags=["scoring"], summary="Score several images",
             responses=error_responses(400, 401, 413, 422, 503, 504),
             dependencies=[API_KEY])
async def score_batch(request: Request,
                      files: list[UploadFile] = File(..., description="repeat the field once per image"),
                      profile: str = profile_query(),
                      _form: None = form_fields("files", many=True, query=("profile",))) -> BatchResponse:
    """Memorability of several images, sent as repeated multipart field `files`.

    Returns one entry per file, in order. A file that cannot be scored gets an error entry
    (`ok: false`) and does not fail the others.
    `curl -F files=@a.jpg -F files=@b.png http://localhost:8000/score/batch`
    """
    state = _state(request)
    started = time.perf_counter()
    state.require_ready()
    profile = _profile(state, profile)
    limit = state.settings.max_files_per_request
    if len(files) > limit:
        raise ServiceError("too_many_files", f"{len(files)} files in one request; the limit is {limit}")
    deadline = started + state.settings.request_timeout_s
    with _admit(state, len(files)) as admission:
        decoded = await asyncio.gather(*(_decode(state, f) for f in files), return_exceptions=True)
        for outcome in decoded:
            if isinstance(outcome, BaseException) and not isinstance(outcome, ServiceError):
                raise outcome
        good = [i for i, outcome in enumerate(decoded) if isinstance(outcome, Decoded)]
        futures = admission.submit([decoded[i].input.tensor for i in good], profile)
    results = dict(zip(good, await _await_deadline(asyncio.gather(*futures), deadline)))
    total = time.perf_counter() - started
    items = []
    for i, (upload, outcome) in enumerate(zip(files, decoded)):
        if isinstance(outcome, ServiceError):
            count_file_error(request, outcome.reason)
            items.append(BatchItem(index=i, filename=upload.filename, ok=False, error=ErrorDetail(**outcome.body()["error"])))
        else:
            result = results[i]
            image = outcome.input
            items.append(BatchItem(index=i, filename=upload.filename, ok=True, score=result.score,
                                   percentile=_percentile(state, result.score, profile), warnings=image.warnings,
                                   width=image.width, height=image.height, timing=_timing(outcome, result, total)))
    return BatchResponse(model=ModelInfo(**state.model_info), profile=profile, elapsed_ms=_ms(total),
                         scored=len(good), failed=len(files) - len(good), results=items)


# -- heatmaps --------------------------------------------------------------------------------
HEATMAP_HEADERS = {
    "X-Memorability-Score": {"description": "the image's score, as /score gives it for the same profile",
                             "schema": {"type": "number"}},
    "X-Profile": {"description": "the score profile of the score, the percentile and the map",
                  "schema": {"type": "string"}},
    "X-Model": {"description": "checkpoint name@version", "schema": {"type": "string"}},
    "X-Image-Width": {"description": "decoded image width (the PNG has the same size)", "schema": {"type": "integer"}},
    "X-Image-Height": {"description": "decoded image height", "schema": {"type": "integer"}},
    "X-Percentile": {"description": "the score's rank (0-100) among the checkpoint's reference photos, as /score "
                                    "gives it; empty when the checkpoint has no reference set",
                     "schema": {"type": "string"}},
    "X-Warnings": {"description": "comma-separated codes of what the model cannot judge in this input (flat, "
                                  "noise, text, low_resolution; multi_frame: only one frame/page of "
                                  "an animated or multi-page file was scored; truncated_end: a JPEG missing "
                                  "only its end marker); empty if none", "schema": {"type": "string"}},
}


@router.post("/heatmap", tags=["scoring"], summary="Grad-RAM heatmap of one image", response_class=Response,
             responses={200: {"content": {"image/png": {}}, "headers": HEATMAP_HEADERS,
                              "description": "a PNG the size of the image; the score is in X-Memorability-Score"},
                        **error_responses(400, 401, 413, 415, 422, 503, 504)},
             dependencies=[API_KEY])
async def heatmap(
    request: Request,
    file: UploadFile = File(..., description=IMAGE_FIELD_DOC),
    output: Literal["overlay", "map"] = Query("overlay", alias="format",
                                              description="`overlay`: the heatmap blended over the image; "
                                                          "`map`: the heatmap alone"),
    alpha: float = Query(0.5, ge=0.0, le=1.0, description="overlay opacity of the heatmap"),
    colormap: str | None = Query(None, description="colormap name (default: inferno for overlays, "
                                                   "grey for maps)", max_length=32),
    layer: str | None = Query(None, description="trunk stage(s): layer1..layer4, a comma list, or all "
                                                "(default: layer3,layer4, the mean of their maps)", max_length=64),
    profile: str = profile_query(),
    _form: None = form_fields("file", many=False, query=("format", "alpha", "colormap", "layer", "profile")),
) -> Response:
    """Which regions of the image raise its memorability score (Grad-RAM), as a PNG; with `profile`,
    that profile's score (`X-Profile` says which).

    Heatmaps are computed a few at a time (`RESMEMNET_HEATMAP_CONCURRENCY`) so they cannot starve
    `/score`; when all slots are busy the answer is 503 with `Retry-After`.
    `curl -F file=@photo.jpg -o heat.png -D - 'http://localhost:8000/heatmap?format=overlay&alpha=0.5'`
    """
    state = _state(request)
    started = time.perf_counter()
    state.require_ready()
    profile = _profile(state, profile)
    from model import overlay
    from model.heatmaps import parse_layers

    try:
        layers = None if layer is None else parse_layers(layer)
        state.scorer.heatmap_layers(layers)  # the torch-free runtime draws layer4 only: say so before any work
    except ValueError as exc:
        raise ServiceError("invalid_request", f"layer: {exc}") from None
    _check_colormap(colormap)
    if state.heatmaps_running >= state.settings.heatmap_concurrency:
        raise ServiceError("heatmap_busy", f"{state.heatmaps_running} heatmaps are being computed (the limit); "
                           "retry shortly", retry_after=state.settings.retry_after_s)
    deadline = started + state.settings.request_timeout_s
    loop = asyncio.get_running_loop()
    scorer = state.scorer
    slot = _HeatmapSlot(state, loop)
    try:
        decoded = await _decode(state, file, keep_image=True)
        img = decoded.input.image

        def work():
            t0 = time.perf_counter()
            result = scorer.heatmap(decoded.input, layers=layers, profile=profile)
            if output == "overlay":
                png = overlay.overlay_png(img, result.heatmap, alpha=alpha, colormap=colormap or overlay.DEFAULT_COLORMAP)
            else:
                png = overlay.heatmap_png(result.heatmap, colormap=colormap)
            state.metrics.heatmap_time.observe(time.perf_counter() - t0)
            return result.score, tuple(getattr(result, "layers", ())), png

        job = state.heatmap_pool.submit(work)
        slot.hand_over(job)
        try:
            score_value, used_layers, png = await _await_deadline(asyncio.wrap_future(job), deadline)
        except ValueError as exc:  # an option the overlay code refuses, e.g. an unknown colormap
            raise ServiceError("invalid_request", str(exc)) from None
    finally:
        slot.release_unless_handed_over()
    percentile = _percentile(state, score_value, profile)
    headers = {
        "X-Memorability-Score": f"{score_value:.8f}",
        "X-Profile": profile,
        "X-Heatmap-Layers": ",".join(used_layers),  # the torch-free runtime draws layer4 only
        "X-Percentile": "" if percentile is None else f"{percentile:g}",
        "X-Warnings": ",".join(decoded.input.warnings),
        "X-Model": f"{state.model_info['name']}@{state.model_info['version']}",
        "X-Image-Width": str(img.width), "X-Image-Height": str(img.height),
        "X-Elapsed-Ms": f"{_ms(time.perf_counter() - started)}",
    }
    return Response(png, media_type="image/png", headers=headers)


def _check_colormap(colormap: str | None) -> None:
    """Refuse an unknown colormap before any work."""
    from model.overlay import COLORMAPS

    if colormap is not None and colormap not in COLORMAPS:
        raise ServiceError("invalid_request", f"unknown colormap {colormap!r}; use one of {', '.join(sorted(COLORMAPS))}")


class _HeatmapSlot:
    """One of the `heatmap_concurrency` places, held until the computation ends (even past the deadline:
    a running thread cannot be stopped, and a freed slot must mean a free thread)."""

    def __init__(self, state, loop):
        self.state, self.loop = state, loop
        self.handed_over = False
        self.released = False
        state.heatmaps_running += 1
        state.metrics.heatmaps_in_progress.set(state.heatmaps_running)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.state.heatmaps_running -= 1
            self.state.metrics.heatmaps_in_progress.set(self.state.heatmaps_running)

    def hand_over(self, job) -> None:
        self.handed_over = True

        def done(_):
            try:
                self.loop.call_soon_threadsafe(self.release)
            except RuntimeError:  # loop already closed at shutdown
                pass

        job.add_done_callback(done)

    def release_unless_handed_over(self) -> None:
        if not self.handed_over:
            self.release()


# -- operations ------------------------------------------------------------------------------
@router.api_route("/healthz", methods=["GET", "HEAD"], response_model=HealthResponse, tags=["operations"], summary="Liveness",
            responses=error_responses(503))
async def healthz(request: Request):
    """200 while the process serves requests (also while the model loads); 503 if the model failed to load."""
    state = _state(request)
    request.scope[SCOPE_UNCOUNTED] = True  # a probe's answer, not a refused request
    if state.phase == "failed":
        return JSONResponse(error_body(503, "not_ready", f"the model failed to load ({state.load_error})"), 503)
    return HealthResponse(status="ok", phase=state.phase)


@router.api_route("/readyz", methods=["GET", "HEAD"], response_model=ReadyResponse, tags=["operations"], summary="Readiness",
            responses=error_responses(503))
async def readyz(request: Request):
    """200 once the model is loaded and warmed up; 503 (with the phase) before that and while shutting down."""
    state = _state(request)
    try:
        state.require_ready()
    except ServiceError as exc:
        # Not counted in resmemnet_errors_total: probes poll this during every start-up.
        request.scope[SCOPE_UNCOUNTED] = True
        return JSONResponse(exc.body(), exc.status, headers={"Retry-After": str(exc.retry_after or 1)})
    s = state.settings
    return ReadyResponse(status="ready", model=ModelInfo(**state.model_info), max_batch_size=s.max_batch_size,
                         max_wait_ms=s.max_wait_ms, queue_size=s.queue_size,
                         profiles=[ProfileInfo(**p) for p in state.profile_info])


@router.get("/metrics", tags=["operations"], summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition format"}})
async def metrics(request: Request) -> Response:
    data, content_type = _state(request).metrics.render()
    return Response(data, media_type=content_type)
