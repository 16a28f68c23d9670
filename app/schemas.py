"""Response bodies of the service, with the examples shown in the OpenAPI docs."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from .errors import REASONS, error_body



PERCENTILE_DOC = ("the score's rank (0-100) among the checkpoint's fixed reference set of diverse photos; null when "
                  "the checkpoint has no reference set")
PROFILE_DOC = ("the score profile of the score and percentile, as asked for with query parameter `profile`: "
               "default or another the checkpoint has (shipped: lnsim, outdoor, cdm, general; /readyz lists them)")
WARNINGS_DOC = ("codes for inputs the model cannot judge (its score then says little): flat, noise, text, "
                "low_resolution; multi_frame when only one frame or page was scored; truncated_end when a JPEG "
                "missing only its end marker was scored as the complete file; empty when none")

class ModelInfo(BaseModel):
    name: str = Field(description="checkpoint name")
    version: str = Field(description="checkpoint version")
    device: str = Field(description="where the model runs: cpu or cuda")


class Timing(BaseModel):
    total_ms: float = Field(description="time spent on this request in the server, upload parsing excluded")
    decode_ms: float = Field(description="decoding and resizing the upload")
    queue_ms: float = Field(description="waiting for a batch to form and the model to be free")
    model_ms: float = Field(description="the batched forward pass this image was part of")
    batch_size: int = Field(description="images in that forward pass")


MODEL_EXAMPLE = {"name": "resmemnet-default", "version": "1.0.0", "device": "cuda"}
TIMING_EXAMPLE = {"total_ms": 18.4, "decode_ms": 4.1, "queue_ms": 5.3, "model_ms": 8.7, "batch_size": 6}


class ScoreResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "score": 0.7312, "profile": "default", "percentile": 68.5, "warnings": [], "filename": "beach.jpg",
        "width": 640, "height": 480, "model": MODEL_EXAMPLE, "elapsed_ms": 18.4, "timing": TIMING_EXAMPLE}]})

    score: float = Field(ge=0.0, le=1.0, description="predicted memorability, 0 (forgettable) to 1 (memorable)")
    profile: str = Field(default="default", description=PROFILE_DOC)
    percentile: float | None = Field(default=None, ge=0.0, le=100.0, description=PERCENTILE_DOC)
    warnings: list[str] = Field(default_factory=list, description=WARNINGS_DOC)
    filename: str | None = Field(default=None, description="the upload's file name, as sent")
    width: int = Field(description="width of the decoded image (after EXIF rotation), pixels")
    height: int = Field(description="height of the decoded image (after EXIF rotation), pixels")
    model: ModelInfo
    elapsed_ms: float = Field(description="same as timing.total_ms")
    timing: Timing


class ErrorDetail(BaseModel):
    status: int = Field(description="the HTTP status, repeated")
    reason: str = Field(description="stable machine-readable code: " + ", ".join(REASONS))
    message: str = Field(description="what went wrong, for people")


class ErrorResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        error_body(415, "not_an_image", "not an image format that Pillow can read")]})

    error: ErrorDetail


class BatchItem(BaseModel):
    index: int = Field(description="position of the file in the request")
    filename: str | None = None
    ok: bool
    score: float | None = Field(default=None, ge=0.0, le=1.0)
    percentile: float | None = Field(default=None, ge=0.0, le=100.0, description=PERCENTILE_DOC)
    warnings: list[str] = Field(default_factory=list, description=WARNINGS_DOC)
    width: int | None = None
    height: int | None = None
    timing: Timing | None = None
    error: ErrorDetail | None = Field(default=None, description="why this file was not scored (ok=false)")


class BatchResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "model": MODEL_EXAMPLE, "profile": "default", "elapsed_ms": 31.0, "scored": 1, "failed": 1,
        "results": [
            {"index": 0, "filename": "beach.jpg", "ok": True, "score": 0.7312, "percentile": 68.5, "warnings": [],
             "width": 640, "height": 480,
             "timing": TIMING_EXAMPLE, "error": None},
            {"index": 1, "filename": "notes.txt", "ok": False, "score": None, "percentile": None, "warnings": [],
             "width": None, "height": None,
             "timing": None, "error": error_body(415, "not_an_image", "not an image format that Pillow can read")["error"]},
        ]}]})

    model: ModelInfo
    profile: str = Field(default="default", description=PROFILE_DOC + "; the same for every file")
    elapsed_ms: float
    scored: int = Field(description="files scored")
    failed: int = Field(description="files with an error entry")
    results: list[BatchItem] = Field(description="one entry per uploaded file, in upload order")


class HealthResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "ok", "phase": "ready"}]})

    status: str = Field(description="ok while the process serves requests")
    phase: str = Field(description="starting, loading, warming_up, ready, failed or stopping")


class ProfileInfo(BaseModel):
    name: str = Field(description="the value of `?profile=`")
    description: str = Field(description="what the profile is for, in a sentence (empty where the checkpoint has none)")
    alias_of: str | None = Field(default=None, description="the profile this name stands for, for an alias")
    has_percentile: bool = Field(description="whether the profile has reference quantiles (a `percentile` in answers)")
    measured: dict | None = Field(default=None, description=(
        "the checkpoint's measured numbers for the profile (Spearman rho: `within_cv` per study, `loso` per "
        "study, `teacher_agreement`, `validation` per set never trained on), from its metadata (metrics.profiles, "
        "or for older checkpoints their cross_validation, final_run and validation records); null where it has none"))


class ReadyResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "status": "ready", "model": MODEL_EXAMPLE, "max_batch_size": 32, "max_wait_ms": 5.0, "queue_size": 128,
        "profiles": [{"name": "default", "description": "the checkpoint's own score", "alias_of": None,
                      "has_percentile": True, "measured": None}]}]})

    status: str
    model: ModelInfo
    max_batch_size: int
    max_wait_ms: float
    queue_size: int
    profiles: list[ProfileInfo] = Field(default_factory=list, description="the score profiles, `default` first")


def error_responses(*statuses: int) -> dict:
    """OpenAPI `responses=` entries for the given error statuses, with one example reason each."""
    out = {}
    for status in statuses:
        reasons = [r for r, (s, _) in REASONS.items() if s == status]
        out[status] = {
            "model": ErrorResponse,
            "description": "; ".join(f"`{r}`: {REASONS[r][1]}" for r in reasons) or "error",
            "content": {"application/json": {"example": error_body(status, reasons[0] if reasons else "internal",
                                                                   REASONS.get(reasons[0], (0, ""))[1] if reasons else "")}},
        }
        if status == 503:
            out[status]["headers"] = {"Retry-After": {"description": "seconds to wait before retrying",
                                                      "schema": {"type": "integer"}}}
    return out
