"""The dashboard at `/` (static files in the package, no build step, nothing from a CDN) and
`/gpu/history`, the last 15 minutes it charts.

The page is plain HTML, CSS and ES modules under `gpu_manager/web/`; it reads the same API
as any client (status, operations, the event stream) and sends the same calls, from the
daemon's own origin, so the security middleware treats it like any other same-origin caller.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response

from gpu_manager.api.body import Body
from gpu_manager.api.docs import answers
from gpu_manager.daemon import Daemon
from gpu_manager.probe.history import INTERVAL_S, KEEP

WEB = Path(__file__).resolve().parent.parent / "web"
# No inline script or style, nothing from elsewhere: a page on the operator's machine that
# can stop services must not run code it did not ship with.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")


class HistorySample(Body):
    at: float
    device: int
    total_mb: int | None
    used_mb: int | None
    foreign_mb: int | None
    services: dict[str, int]
    temperature_c: int | None
    utilization_percent: int | None


class HistoryBody(Body):
    interval_s: float
    keep: int
    samples: list[HistorySample]


def install(app: FastAPI, daemon: Daemon) -> None:
    router = APIRouter()

    @router.get("/gpu/history", tags=["gpu"], responses=answers(422, ok=HistoryBody))
    async def history(since: Annotated[float | None, Query(
            description="Only samples taken after this time (epoch seconds)")] = None,
            device: Annotated[int | None, Query(
                ge=0, le=63, description="Only this card's samples (default: every managed "
                "card, a sample each per time)")] = None,
    ) -> dict[str, Any]:
        """Each GPU over the last 15 minutes, a sample a second: total, used, foreign and
        each service's measured MB."""
        return {"interval_s": INTERVAL_S, "keep": KEEP,
                "samples": [s.as_dict() for s in daemon.history.since(since, device)]}

    @router.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(WEB / "index.html", headers={
            "Content-Security-Policy": CSP, "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})

    app.include_router(router)
    app.mount("/ui", _Assets(directory=WEB), name="ui")


class _Assets(StaticFiles):
    """The page's files, under the page's policy too: `/ui/index.html` is the page itself."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["Content-Security-Policy"] = CSP
        return response
