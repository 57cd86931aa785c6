"""Every error the API returns is JSON `{"error": code, "detail": ...}`, never a bare 500.

What a client sees is redacted (no credentials of any URL) and a 500 tells nothing about the
exception: it gives an `error_id` to find the traceback in the daemon's log.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from loguru import logger
from starlette.exceptions import HTTPException as StarletteHTTPException

from gpu_manager.lock import LockHeld, LockLost, LockUnavailable
from gpu_manager.orchestrator import OperationError
from gpu_manager.redact import redact_value

STATUS = {
    "unknown_service": 404, "unknown_phase": 404, "unknown_operation": 404,
    "insufficient_vram": 409, "needed_by_phase": 409, "unmanaged_device": 409,
    "cannot_sleep": 409, "not_running": 409,
    "start_failed": 502, "stop_failed": 502, "sleep_failed": 502,
    "reclaim_timeout": 504, "deadline_exceeded": 504,
    "lock_held": 423, "lock_unavailable": 503, "lock_lost": 503, "probe_unavailable": 503,
    "unauthorized": 401, "shutting_down": 503, "invalid_request": 422,
    "forbidden_host": 403, "cross_origin": 403, "unsupported_media_type": 415,
    "too_many_operations": 429, "queue_timeout": 429, "payload_too_large": 413,
}
# Retry-After (s) on the answers that say "later": transitions take seconds.
RETRY_AFTER = {"too_many_operations": 2, "queue_timeout": 2, "shutting_down": 5}


class ApiError(Exception):
    def __init__(self, code: str, detail: Any, status: int | None = None,
                 headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(str(detail))
        self.code = code
        self.detail = detail
        self.status = status or STATUS.get(code, 400)
        if headers is None and code in RETRY_AFTER:
            headers = {"Retry-After": str(RETRY_AFTER[code])}
        self.headers = headers
        self.extra = extra

    def response(self) -> JSONResponse:
        # Redacted here, the one way out: details carry lock and driver messages with URLs.
        body = redact_value({"error": self.code, "detail": self.detail, **self.extra})
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def from_exception(exc: Exception, **extra: Any) -> ApiError:
    if isinstance(exc, OperationError):
        return ApiError(exc.code, exc.detail, **exc.extra, **extra)
    if isinstance(exc, LockHeld):
        ttl = exc.ttl_ms / 1000 if exc.ttl_ms is not None else None
        return ApiError("lock_held", str(exc), holder=exc.holder, ttl=ttl, **extra)
    if isinstance(exc, LockUnavailable):
        return ApiError("lock_unavailable", str(exc), **extra)
    if isinstance(exc, LockLost):
        return ApiError("lock_lost", f"the GPU lock was lost mid-transition: {exc}", **extra)
    raise exc


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg")} for e in exc.errors()]
        return JSONResponse({"error": "invalid_request", "detail": errors}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:
            # FastAPI's answer to a body it cannot decode at all: the same 422 as any other
            # request that does not fit the schema, so clients handle one shape.
            return JSONResponse({"error": "invalid_request", "detail": [
                {"loc": ["body"], "msg": str(exc.detail)}]}, status_code=422)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse({"error": code, "detail": exc.detail}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The exception's text may name paths, URLs or internals: it goes to the log only,
        # under an id the caller can quote.
        error_id = uuid.uuid4().hex[:12]
        logger.bind(error_id=error_id).opt(exception=exc).error(
            f"internal error {error_id} on {request.method} {request.url.path}: "
            f"{type(exc).__name__}: {exc}")
        return JSONResponse({"error": "internal", "detail": "internal error",
                             "error_id": error_id}, status_code=500)
