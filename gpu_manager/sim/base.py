"""What every stand-in server kind shares: the request and reply model, and the route table.

A route turns a `Request` into a `Reply`; the HTTP handler in gpu_manager/sim/workload.py
writes the reply. Three shapes of reply:

- a whole body (`body` as JSON, or `raw` bytes): sent with Content-Length, so an HTTP/1.1
  connection stays open for the next request;
- a `stream`: sent with Transfer-Encoding: chunked, each item written and flushed as it is
  produced (server-sent events); the handler always calls the stream's `close()`, whether it
  ran to the end, failed, or the client went away;
- an `upgrade` (code 101): after the headers, the connection belongs to the callable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from io import BufferedIOBase
from typing import Any

from gpu_manager.sim.memory import DeviceOOM, ModelMemory
from gpu_manager.sim.serving import Serving

MB = 2**20


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any  # the parsed JSON body, None when there was none
    headers: Mapping[str, str] = field(default_factory=dict)  # names in lower case


Upgrade = Callable[[BufferedIOBase, BufferedIOBase], None]  # (reader, writer) of the connection


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    body: Any = None  # JSON-encoded; None sends an empty body (what FastAPI's Response() does)
    raw: bytes | None = None  # sent as is, with `content_type`
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    # Chunks sent as they are yielded (chunked transfer encoding); see the module docstring.
    stream: Iterator[bytes] | None = None
    # Runs the connection after a 101 Switching Protocols; `headers` carry the handshake.
    upgrade: Upgrade | None = None


class Stream(Iterator[bytes]):
    """The chunks of `chunks`, with `on_close` run exactly once when the stream is closed.

    A generator's own `finally` does not run when it is closed before its first item (a client
    that left before the headers went out), so work to undo on every path (the in-flight
    count) belongs in `on_close`.
    """

    def __init__(self, chunks: Iterator[bytes], on_close: Callable[[], None]) -> None:
        self._chunks = chunks
        self._on_close: Callable[[], None] | None = on_close

    def __next__(self) -> bytes:
        return next(self._chunks)

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()  # stop producing: the generator's sleeps and writes end here
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()


Route = Callable[[Request], Reply]


class Api:
    """Routes of one server kind; `memory` does the sleeping and waking."""

    kind: str = ""
    error_key = "error"  # FastAPI servers (TabbyAPI) say "detail"
    # What inference requests get (503) while the model is asleep / not loaded.
    asleep_message = "the model is not loaded"

    def __init__(self, memory: ModelMemory, model: str, serving: Serving | None = None) -> None:
        self.memory = memory
        self.model = model
        self.serving = serving or Serving(model)
        self.routes: dict[tuple[str, str], Route] = {}

    def start(self) -> None:
        """Start background workers, if the server has any."""

    def error(self, code: int, message: str) -> Reply:
        return Reply(code, {self.error_key: message})

    def asleep_reply(self) -> Reply | None:
        """The 503 an inference request gets while the model is asleep; None when awake."""
        return self.error(503, self.asleep_message) if self.memory.asleep else None

    def wake_or_500(self, tags: list[str] | None = None) -> Reply | None:
        """Wake; None when it worked, else the reply a CUDA OOM or a bad tag gets."""
        try:
            self.memory.wake(tags)
        except DeviceOOM as exc:
            return self.error(500, str(exc))
        except ValueError as exc:
            return self.error(400, str(exc))
        return None

    def handle(self, req: Request) -> Reply:
        route = self.routes.get((req.method, req.path))
        if route is not None:
            return route(req)
        if any(path == req.path for _, path in self.routes):
            return self.error(405, "Method Not Allowed")
        return self.error(404, "Not Found")
