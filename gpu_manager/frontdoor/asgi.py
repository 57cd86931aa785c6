"""The front door's two entrances on the daemon's own port, as plain ASGI (no FastAPI
routing or validation on the hot path: it adds latency and would buffer bodies):

- `/v1/...`: OpenAI-compatible. `GET /v1/models` lists every served model with its service's
  state; any POST routes by the body's `model` (JSON, multipart or form) to the service that
  serves it. Errors in OpenAI's shape.
- `/svc/<name>/<path>`: a plain reverse proxy to a service with `serve.url`, WebSocket too.

Everything else goes on to the daemon's API. With a token configured, both entrances need it
(`Authorization: Bearer`, i.e. the OpenAI SDK's api_key, or `X-Service-Token`); it is never
forwarded.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from gpu_manager.frontdoor.door import FrontDoor
from gpu_manager.frontdoor.errors import DoorError
from gpu_manager.frontdoor.relay import ClientWatch, Relay, Upstream, up_headers
from gpu_manager.frontdoor.ws import bridge

# A part's `name="model"` (not `filename=`): searched in one header line, never backtracking
# over the body (a regex over the whole body took time quadratic in its size).
_NAME_MODEL = re.compile(rb'(?:^|;)[ \t]*name[ \t]*=[ \t]*(?:"model"|model)[ \t]*(?:;|$)',
                         re.IGNORECASE)
_BOUNDARY = re.compile(r'boundary="?([^";]{1,200})"?', re.IGNORECASE)
MAX_PARTS = 256  # an OpenAI form has a handful of fields: more are not looked at


# The longest a `/v1` body may take to arrive (it is read whole, for its `model`).
BODY_READ_S = 120.0


def proxied(path: str) -> bool:
    return path.startswith(("/v1/", "/svc/")) or path == "/v1"


class FrontDoorApp:
    def __init__(self, app: ASGIApp, door: FrontDoor, token: str | None,
                 max_body: int, foreign: Callable[[Headers, str], str | None] | None = None
                 ) -> None:
        self.app, self.door, self.token, self.max_body = app, door, token, max_body
        # why a request comes from another site's page (the API's Origin policy), or None
        self.foreign = foreign

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] not in ("http", "websocket") or not proxied(path):
            await self.app(scope, receive, send)
            return
        openai = not path.startswith("/svc/")
        try:
            self._authorize(Headers(scope=scope))
            if scope["type"] == "websocket":
                name, rest = self._service_path(path)
                await bridge(self.door, scope, receive, send, name, rest)
            elif openai:
                await self._openai(scope, receive, send, path)
            else:
                await self._svc(scope, receive, send, path)
        except DoorError as err:
            if scope["type"] == "websocket":
                # 1013 "try again later" for a refused or late start; 1008 for the rest
                await send({"type": "websocket.close",
                            "code": 1013 if err.status in (429, 503) else 1008,
                            "reason": err.message[:120]})
            else:
                await err.send(send, openai)

    def _authorize(self, headers: Headers) -> None:
        if self.token is None:
            return
        auth = headers.get("authorization", "")
        given = auth[7:] if auth[:7].lower() == "bearer " else headers.get(
            "x-service-token", "")
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            raise DoorError(401, "unauthorized", "a valid token is required: "
                            "`Authorization: Bearer <token>` (the OpenAI SDK's api_key)")

    # -- /v1 -----------------------------------------------------------------------------------
    async def _openai(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        method = scope["method"]
        if method == "GET" and path.rstrip("/") == "/v1/models":
            await _json(send, 200, {"object": "list", "data": self.model_list()})
            return
        if method == "GET" and path.startswith("/v1/models/"):
            wanted = urllib.parse.unquote(path[len("/v1/models/"):])
            found = [m for m in self.model_list() if m["id"] == wanted]
            if not found:
                raise self._unknown_model(wanted)
            await _json(send, 200, found[0])
            return
        if method != "POST":
            raise DoorError(404, "not_found", f"{method} {path} is not served here: /v1 "
                            "takes GET /v1/models and POSTs that name a `model`")
        headers = Headers(scope=scope)
        try:  # a client trickling its body holds a coroutine: not for ever
            async with asyncio.timeout(BODY_READ_S):
                body = await self._read_body(receive, headers)
        except TimeoutError:
            raise DoorError(408, "request_timeout", f"the request body did not arrive within "
                            f"{BODY_READ_S:g}s") from None
        model = model_of(body, headers.get("content-type", ""))
        if not model:
            raise DoorError(400, "model_required", "the request names no `model`: give one "
                            f"of {', '.join(sorted(self.door.models())) or '(none served)'}")
        name = self.door.models().get(model)
        if name is None:
            raise self._unknown_model(model)
        await self._forward(scope, receive, send, name, path, body, openai=True)

    def _unknown_model(self, model: str) -> DoorError:
        served = sorted(self.door.models())
        return DoorError(404, "model_not_found", f"the model {model!r} is not served here; "
                         f"served: {', '.join(served) or '(none)'}", served=served)

    def model_list(self) -> list[dict[str, Any]]:
        out = []
        for model, name in sorted(self.door.models().items()):
            unit = self.door.daemon.units.get(name)
            out.append({"id": model, "object": "model", "created": 0, "owned_by": name,
                        "service": name,
                        "state": unit.state.value if unit is not None else "unknown"})
        return out

    async def _read_body(self, receive: Receive, headers: Headers) -> bytes:
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            raise _too_large(self.max_body)
        parts: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise DoorError(400, "client_gone", "the client went away")
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise _too_large(self.max_body)
            parts.append(chunk)
            if not msg.get("more_body", False):
                return b"".join(parts)

    # -- /svc ----------------------------------------------------------------------------------
    def _service_path(self, path: str) -> tuple[str, str]:
        name, _, rest = path[len("/svc/"):].partition("/")
        if self.door.serve_of(name) is None:
            served = sorted(self.door.served())
            raise DoorError(404, "unknown_service", f"{name!r} is not a served service; "
                            f"served: {', '.join(served) or '(none)'}", served=served)
        return name, "/" + rest

    async def _svc(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        name, rest = self._service_path(path)
        headers = Headers(scope=scope)
        streamed = "content-length" in headers or "transfer-encoding" in headers
        await self._forward(scope, receive, send, name, rest, None if streamed else b"",
                            openai=False)

    # -- both ----------------------------------------------------------------------------------
    def _no_foreign_start(self, scope: Scope, name: str) -> None:
        """A page of another site may read through a running service (a link, an image: the
        security middleware already refuses its writes), but never start or wake one: that
        preempts others and spends the GPU on a visitor's behalf."""
        unit = self.door.daemon.units.get(name)
        if self.foreign is None or (unit is not None and unit.state.value == "ready"):
            return
        why = self.foreign(Headers(scope=scope), scope.get("scheme", "http"))
        if why is not None:
            raise DoorError(403, "cross_origin", f"{name} is {unit.state.value if unit else '?'}"
                            f" and a request from another site may not start or wake it "
                            f"({why})")

    async def _forward(self, scope: Scope, receive: Receive, send: Send, name: str,
                       path: str, body: bytes | None, openai: bool) -> None:
        cfg = self.door.serve_of(name)
        if cfg is None:
            raise DoorError(404, "unknown_service", f"{name} is not served")
        self._no_foreign_start(scope, name)
        t0 = time.monotonic()
        task = asyncio.current_task()
        assert task is not None
        # the body is read: a client leaving while it waits is heard (a streamed body is
        # watched by the relay once it is sent up)
        watch = ClientWatch(receive, task) if body is not None else None
        try:
            slot = await self.door.admit(name, cfg)
        except DoorError as err:
            if watch is not None:
                watch.close()
            self.door.stats.answered(name, f"{err.status // 100}xx", time.monotonic() - t0)
            raise
        except asyncio.CancelledError:
            if watch is None or not watch.gone:
                if watch is not None:
                    watch.close()
                raise
            task.uncancel()  # ours: the client left while it waited; nobody to answer
            self.door.stats.answered(name, "gone", None)
            return
        except BaseException:
            if watch is not None:
                watch.close()
            raise
        qs = scope.get("query_string", b"")
        url = cfg.url + urllib.parse.quote(path, safe="/:@!$&'()*+,;=-._~%") + (
            "?" + qs.decode("latin-1") if qs else "")
        relay = Relay(self.door.client, self.door.stats, name, cfg, slot,
                      Upstream(scope["method"], url, up_headers(scope["headers"], cfg), body),
                      openai, self.max_body, watch)
        await relay(receive, send)


def model_of(body: bytes, content_type: str) -> str | None:
    """The `model` field of a JSON, multipart or url-encoded body; None if it has none."""
    ctype = content_type.split(";", maxsplit=1)[0].strip().lower()
    if ctype == "multipart/form-data":
        return _multipart_model(body, content_type)
    if ctype == "application/x-www-form-urlencoded":
        values = urllib.parse.parse_qs(body.decode("utf-8", "replace")).get("model")
        return values[0] if values else None
    try:
        data = json.loads(body) if body else None
    except (ValueError, RecursionError):  # RecursionError: nested deeper than it can read
        raise DoorError(400, "invalid_json", "the request body is not valid JSON") from None
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) else None


def _multipart_model(body: bytes, content_type: str) -> str | None:
    """The `model` field of a multipart body: each `find` goes forward, so the work is linear
    in the body (and at most MAX_PARTS parts are looked at)."""
    found = _BOUNDARY.search(content_type)
    if found is None:
        return None
    delim = b"--" + found.group(1).strip().encode("latin-1", "replace")
    pos = body.find(delim)
    for _ in range(MAX_PARTS):
        if pos < 0:
            return None
        head = body.find(b"\r\n", pos + len(delim))
        if head < 0:
            return None
        end_head = body.find(b"\r\n\r\n", head)
        if end_head < 0:
            return None
        nxt = body.find(b"\r\n" + delim, end_head)
        for line in body[head + 2:end_head].split(b"\r\n"):
            key, _, value = line.partition(b":")
            if key.strip().lower() == b"content-disposition" and _NAME_MODEL.search(value):
                raw = body[end_head + 4:nxt if nxt >= 0 else len(body)]
                return raw.decode("utf-8", "replace").strip()
        pos = nxt + 2 if nxt >= 0 else -1
    return None


def _too_large(limit: int) -> DoorError:
    return DoorError(413, "payload_too_large", f"the request body is larger than {limit} bytes "
                     "(GPU_MANAGER_PROXY_MAX_BODY_BYTES)")


async def _json(send: Send, status: int, body: Any) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data, "more_body": False})
