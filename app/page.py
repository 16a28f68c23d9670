"""The web page at `/`: try the model in a browser.

Pick or drop photos; each gets its score, percentile, warnings and Grad-RAM overlay, and a table
of results sorts by score and downloads as CSV. The page is three static files in `app/static/`
with no external assets (it works offline) and talks to the same public API as any client
(`GET /readyz`, `POST /score`, `POST /heatmap`). A client that does not ask for HTML (curl,
scripts) still gets the JSON index at `/`.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from starlette.exceptions import HTTPException

STATIC = Path(__file__).resolve().parent / "static"
ASSETS = {"page.css": "text/css; charset=utf-8", "page.js": "text/javascript; charset=utf-8"}
# Only this server's own files may load: a typo can never pull in a third-party asset.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
       "form-action 'none'; base-uri 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache",
           "Referrer-Policy": "no-referrer"}

router = APIRouter(include_in_schema=False)


def wants_html(accept: str) -> bool:
    """Browsers list text/html in Accept; curl (`*/*`) and API clients do not."""
    return "text/html" in accept.lower()


@router.api_route("/", methods=["GET", "HEAD"])  # HEAD: uptime checkers probe with it
async def page(request: Request):
    """The page for browsers; the JSON index (service, phase, endpoints) for everyone else."""
    if not wants_html(request.headers.get("accept", "")):
        return index(request)
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/static/{name}")
async def asset(name: str):
    """The page's stylesheet and script (a fixed list: nothing else under app/ is served)."""
    if name not in ASSETS:
        raise HTTPException(404)
    return FileResponse(STATIC / name, media_type=ASSETS[name], headers=HEADERS)


def index(request: Request) -> dict:
    """The JSON index at /: the service, its phase and its endpoints."""
    state = request.app.state.service
    return {"service": "resmemnet", "phase": state.phase, "docs": "/docs",
            "endpoints": ["POST /score", "POST /score/batch", "POST /heatmap", "GET /healthz", "GET /readyz",
                          "GET /metrics"]}
