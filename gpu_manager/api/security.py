"""Browser-facing defences (the same idea as Ollama's OLLAMA_ORIGINS and allowed-host check).

A daemon on 127.0.0.1 without a token is reachable by every web page its operator opens:
- a cross-origin "simple" request (a form or `fetch` with `text/plain`, no preflight) is sent
  and acted on, even though the page cannot read the answer;
- a DNS-rebinding page (evil.example resolving to 127.0.0.1) is same-origin to the browser,
  so it can even read answers. Its requests carry `Host: evil.example`.

So, before any route runs:
1. Host: on a loopback bind only loopback names and addresses (plus GPU_MANAGER_ALLOWED_HOSTS)
   are answered. Elsewhere a token is required anyway; ALLOWED_HOSTS, if set, still applies.
2. Origin, on mutating methods: a browser always sends `Origin` on a cross-origin POST; it
   must be the daemon's own (vetted by 1) or in GPU_MANAGER_ALLOWED_ORIGINS. Without an
   Origin, `Sec-Fetch-Site: cross-site` is refused too. curl, the CLI and the Python clients
   send neither and pass.
3. Content type, on mutating methods: a non-empty body must be JSON. That is what every route
   expects, and it is what a browser cannot send cross-origin without a CORS preflight, which
   this daemon never approves (it sends no CORS headers at all).
4. Size: a body over `max_body_bytes` is refused (413) before any route reads it, by its
   Content-Length or, chunked, by counting as it arrives (the API's bodies are small; a 10 MB
   JSON body would otherwise be parsed in full on the event loop).

Pure ASGI rather than BaseHTTPMiddleware, so that streaming (/gpu/events) is untouched.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from loguru import logger
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gpu_manager.api.errors import ApiError
from gpu_manager.settings import Settings

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# The front door's entrances (gpu_manager/frontdoor): bodies of any type and size are theirs.
FORWARDED = ("/v1/", "/svc/")
DEFAULT_PORTS = {"http": 80, "https": 443}


def split_host(host: str) -> tuple[str, int | None] | None:
    """A Host header's name and port: `[::1]:8000` -> ("::1", 8000); None if malformed."""
    host = host.strip().lower()
    if host.startswith("["):
        name, sep, rest = host[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        port = rest[1:]
    else:
        name, _, port = host.partition(":")
        if ":" in port:
            return None  # a bare IPv6 address: not a valid Host
    if port and not port.isdigit():
        return None
    name = name.rstrip(".")  # `localhost.` is the same name
    return (name, int(port) if port else None) if name else None


def is_loopback_name(name: str) -> bool:
    if name == "localhost" or name.endswith(".localhost"):
        return True  # RFC 6761: these always resolve to loopback
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def normalize_origin(origin: str) -> str | None:
    """`HTTP://LocalHost` -> `http://localhost:80`; None for `null` and anything unparsable."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if not parts.hostname or scheme not in DEFAULT_PORTS:
        return None
    name = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{scheme}://{name}:{port or DEFAULT_PORTS[scheme]}"


def is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    maintype, _, subtype = media.partition("/")
    return maintype == "application" and (subtype == "json" or subtype.endswith("+json"))


@dataclass(frozen=True)
class Policy:
    restrict_hosts: bool
    allowed_hosts: frozenset[str]  # `name` (any port) or `name:port`; `*` for any
    allowed_origins: frozenset[str]  # normalized; `*` for any
    max_body_bytes: int = 1024 * 1024

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        hosts: set[str] = set()
        for entry in settings.allowed_hosts:
            parsed = split_host(entry)
            if entry.strip() == "*":
                hosts.add("*")
            elif parsed is None:
                logger.warning(f"GPU_MANAGER_ALLOWED_HOSTS: ignoring {entry!r} (not a host)")
            else:
                name, port = parsed
                hosts.add(name if port is None else f"{name}:{port}")
        origins: set[str] = set()
        for entry in settings.allowed_origins:
            origin = "*" if entry.strip() == "*" else normalize_origin(entry)
            if origin is None:
                logger.warning(f"GPU_MANAGER_ALLOWED_ORIGINS: ignoring {entry!r} "
                               "(expected scheme://host[:port])")
            else:
                origins.add(origin)
        return cls(settings.loopback or bool(hosts), frozenset(hosts), frozenset(origins),
                   settings.max_body_bytes)

    def host_ok(self, host: str | None) -> bool:
        if host is None:
            return True  # HTTP/1.0 without Host: not a browser, which always sends one
        parsed = split_host(host)
        if parsed is None:
            return not self.restrict_hosts
        name, port = parsed
        if is_loopback_name(name) or not self.restrict_hosts:
            return True
        return bool({"*", name, f"{name}:{port}"} & self.allowed_hosts)

    def cross_origin(self, headers: Headers, scheme: str) -> str | None:
        """Why a mutating request is refused as cross-origin, or None if it is not."""
        origin = headers.get("origin")
        if origin is not None:
            host = headers.get("host")
            own = normalize_origin(f"{scheme}://{host}") if host else None
            given = normalize_origin(origin)
            if "*" in self.allowed_origins or (
                    given is not None and given in self.allowed_origins | {own}):
                return None
            return (f"a request from the web page at {origin!r} is refused: mutating calls "
                    "are taken only from the daemon's own origin, clients that send no "
                    "Origin, or an origin listed in GPU_MANAGER_ALLOWED_ORIGINS")
        if headers.get("sec-fetch-site", "").lower() == "cross-site":
            return ("a cross-site browser request is refused (Sec-Fetch-Site: cross-site); "
                    "list its origin in GPU_MANAGER_ALLOWED_ORIGINS to allow it")
        return None


async def _bounded_body(receive: Receive, limit: int) -> tuple[bool, Receive]:
    """Read the whole body (up to `limit` bytes): whether it fits, and a `receive` that
    replays it."""
    buffered: list[Message] = []
    size = 0
    while True:
        message = await receive()
        buffered.append(message)
        size += len(message.get("body", b""))
        if size > limit:
            return False, receive
        if message["type"] != "http.request" or not message.get("more_body", False):
            break

    async def replay() -> Message:
        return buffered.pop(0) if buffered else await receive()

    return True, replay


def _too_large(headers: Headers, limit: int) -> bool | None:
    """By Content-Length: True/False; None when there is none (chunked)."""
    length = headers.get("content-length")
    if length is None:
        return None
    try:
        return int(length) > limit
    except ValueError:
        return None


async def _peek_body(receive: Receive) -> tuple[bool, Receive]:
    """Whether the request has a non-empty body, and a `receive` that replays what was read.

    Read rather than trusted from Content-Length: a chunked body has none.
    """
    buffered: list[Message] = []
    while True:
        message = await receive()
        buffered.append(message)
        if (message["type"] != "http.request" or message.get("body")
                or not message.get("more_body", False)):
            break
    has_body = message["type"] == "http.request" and bool(message.get("body"))

    async def replay() -> Message:
        return buffered.pop(0) if buffered else await receive()

    return has_body, replay


# On every answer: no page of ours (the dashboard, /docs) may be framed by another site,
# which could trick an operator into pressing its buttons; no answer is sniffed as HTML.
HARDENING = [(b"x-frame-options", b"DENY"), (b"x-content-type-options", b"nosniff")]


def _hardened(send: Send) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            present = {k.lower() for k, _ in message.get("headers", [])}
            extra = [(k, v) for k, v in HARDENING if k not in present]
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return wrapped


class SecurityMiddleware:
    def __init__(self, app: ASGIApp, policy: Policy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        method, path = scope["method"], scope["path"]
        refusal: ApiError | None = None
        host = headers.get("host")
        if not self.policy.host_ok(host):
            refusal = ApiError(
                "forbidden_host", f"Host {host!r} is refused: a daemon bound to loopback "
                "answers only to localhost, 127.0.0.1 and [::1], or to names listed in "
                "GPU_MANAGER_ALLOWED_HOSTS")
        elif method in MUTATING and path.startswith(FORWARDED):
            # the front door forwards any body (audio, images, forms) and bounds its size
            # itself (GPU_MANAGER_PROXY_MAX_BODY_BYTES); a foreign web page still may not
            why = self.policy.cross_origin(headers, scope["scheme"])
            if why is not None:
                refusal = ApiError("cross_origin", why)
        elif method in MUTATING:
            why = self.policy.cross_origin(headers, scope["scheme"])
            limit = self.policy.max_body_bytes
            large = _too_large(headers, limit)
            if why is None and large is None:  # chunked: counted as it arrives
                fits, receive = await _bounded_body(receive, limit)
                large = not fits
            if why is not None:
                refusal = ApiError("cross_origin", why)
            elif large:
                refusal = ApiError("payload_too_large", f"the request body is larger than "
                                   f"{limit} bytes (GPU_MANAGER_MAX_BODY_BYTES)")
            elif not is_json(headers.get("content-type")):
                has_body, receive = await _peek_body(receive)
                if has_body:
                    refusal = ApiError(
                        "unsupported_media_type", "the request body must be JSON "
                        f"(Content-Type: application/json), not {headers.get('content-type')!r}")
        if refusal is None:
            await self.app(scope, receive, _hardened(send))
            return
        # repr(): header values are the caller's, and must not forge log lines
        logger.warning(f"refused {method} {path!r} ({refusal.code}): host={host!r} "
                       f"origin={headers.get('origin')!r} "
                       f"content-type={headers.get('content-type')!r}")
        await refusal.response()(scope, receive, _hardened(send))

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A WebSocket (the front door's `/svc/.../ws`) is held to the same Host and Origin
        rules as a mutating request: browsers send an Origin with every WebSocket and apply
        no same-origin policy to them, so a foreign page could otherwise drive a service."""
        headers = Headers(scope=scope)
        scheme = "https" if scope.get("scheme") == "wss" else "http"
        why = None if self.policy.host_ok(headers.get("host")) else "forbidden host"
        why = why or self.policy.cross_origin(headers, scheme)
        if why is None:
            await self.app(scope, receive, send)
            return
        logger.warning(f"refused WebSocket {scope.get('path')!r}: {why}")
        await receive()  # websocket.connect
        await send({"type": "websocket.close", "code": 1008})
