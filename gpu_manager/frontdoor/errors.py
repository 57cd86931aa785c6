"""Front-door errors in two shapes: OpenAI's on `/v1` (so the SDKs raise the right exception
and show the message), the daemon's own `{"error", "detail"}` on `/svc`."""

from __future__ import annotations

import json
from typing import Any

from gpu_manager.redact import redact_value

# OpenAI's `type` by status: what its SDKs and clients switch on.
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 408: "invalid_request_error",
          413: "invalid_request_error",
          429: "rate_limit_error", 502: "server_error", 503: "server_error",
          504: "server_error"}


class DoorError(Exception):
    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None,
                 **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.retry_after = retry_after
        self.extra = extra

    def body(self, openai: bool) -> bytes:
        if openai:
            out: dict[str, Any] = {"error": {
                "message": self.message, "type": _TYPES.get(self.status, "server_error"),
                "code": self.code, "param": None, **self.extra}}
        else:
            out = {"error": self.code, "detail": self.message, **self.extra}
        return json.dumps(redact_value(out)).encode()

    def headers(self) -> list[tuple[bytes, bytes]]:
        out = [(b"content-type", b"application/json")]
        if self.retry_after is not None:
            out.append((b"retry-after", str(max(1, round(self.retry_after))).encode()))
        if self.status == 401:
            out.append((b"www-authenticate", b"Bearer"))
        return out

    async def send(self, send: Any, openai: bool) -> None:
        body = self.body(openai)
        await send({"type": "http.response.start", "status": self.status,
                    "headers": [*self.headers(), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body, "more_body": False})
