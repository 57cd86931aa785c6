"""`GET /gpu/events`: the event stream (Server-Sent Events, framed by sse-starlette).

A client that reconnects with `Last-Event-ID` (browsers' EventSource does it by itself) gets
the events it missed from the bus's ring buffer, then the live ones, none twice: the stream
subscribes before it reads the buffer and skips live events it already replayed. What can no
longer be replayed is announced by a `gap` event rather than skipped in silence.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Header, Query
from sse_starlette import EventSourceResponse, ServerSentEvent

from gpu_manager.api.docs import answers
from gpu_manager.daemon import Daemon
from gpu_manager.units.events import Event, Gap, Subscription, matches

# A service name as services.yaml allows it (config.models.ServiceName), or a lease's.
SERVICE_PATTERN = r"^(lease:)?[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
# Advice to EventSource on how soon to reconnect (ms): transitions take seconds, so a quick
# retry keeps a dashboard current without hammering a daemon that is restarting.
RETRY_MS = 2000
# After uvicorn's shutdown signal, how long a stream may take to send its `shutdown` event.
SHUTDOWN_GRACE_S = 2.0

# One event on the wire (before OpenAPI 3.2's itemSchema, `schema` describes each event).
EVENT_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["data"],
    "properties": {
        "event": {"type": "string", "description": "The kind (`state`, `operation`, ...)"},
        "id": {"type": "string", "pattern": "^[0-9]+$"},
        "data": {"type": "string", "contentMediaType": "application/json",
                 "description": "The event as a JSON object"},
        "retry": {"type": "integer"},
    },
}

EVENT_TYPES = """\
Each event has an `id` (an integer, increasing across restarts too), an `event` field naming
its kind, and a JSON `data` object with `event_id` (the same id), `kind`, `service` (or null)
and `at` (epoch seconds) plus the fields of its kind:

- `state`: a service changed state (or its reason did): `state`, `previous`, `reason`.
- `operation`: an operation was queued (`id`, `status: queued`) or ended (the whole
  operation as `/gpu/operations/{id}` gives it, with `duration_s`).
- `step`: a step of a plan started or ended: `op`, `action`, `mb`, `reason`, `status`,
  `started_at`, `duration_s`, `reclaim_wait_s`, `detail`, `after`.
- `lease`: a client lease: `session_id`, `requester`, `vram_mb`, `status`: `acquired`,
  `released`, `expired`; for an acquire that has to wait, `waiting` (with `reason`) and then,
  unless `acquired`, how it ended: `timeout`, `unavailable` or `cancelled`.
- `restart_scheduled`: a failed service is restarted in `in_s` seconds: `reason`.
- `sleep_fallback`: a sleep failed and the service was stopped instead: `reason`.

Stream-level events (no `service`):

- `gap`: events were missed: `after` (the last id the client had), `until` (the last id lost),
  `reason` (`too_old`: the ring buffer moved on; `restart`: the id is from another run of the
  daemon; `slow_reader`: this client read too slowly). Refetch `/gpu/status` on a gap.
- `shutdown`: the daemon is stopping; the stream ends after it. Reconnect later.

Comment lines (`: ping`) keep idle connections open through proxies.
"""


def make_router(daemon: Daemon) -> APIRouter:
    router = APIRouter()
    settings = daemon.settings

    @router.get(
        "/gpu/events", tags=["gpu"], response_class=EventSourceResponse,
        description=EVENT_TYPES,
        responses={200: {"description": "An endless stream of events.",
                         "content": {"text/event-stream": {"schema": EVENT_SCHEMA}}},
                   **answers(422)})
    async def events(
        # A string with a pattern, not `int | None`: a header has no null, and a schema that
        # offers one invites clients (and generated tests) to send the text "null".
        last_event_id: Annotated[str, Header(
            pattern=r"^[0-9]{1,18}$",
            description="The last id the client saw: the stream starts after it.")] = "",
        after: Annotated[int | None, Query(
            ge=0, description="As Last-Event-ID, for clients that cannot set headers."
        )] = None,
        # Patterned lists with an empty default (no `null`): what no event can match is a
        # clear 422, not an empty stream that looks like an idle daemon.
        service: Annotated[list[Annotated[str, Query(pattern=SERVICE_PATTERN)]], Query(
            description="Only events of these services (repeatable).")] = [],  # noqa: B006
        kind: Annotated[list[Annotated[str, Query(pattern=r"^[a-z_]{1,32}$")]], Query(
            description="Only events of these kinds (repeatable).")] = [],  # noqa: B006
    ) -> EventSourceResponse:
        """Server-sent events: every state change, transition and step, resumable."""
        shutdown = anyio.Event()
        since = int(last_event_id) if last_event_id else after
        services, kinds = list(service), list(kind)
        return EventSourceResponse(
            _stream(daemon, since, services, kinds, shutdown),
            ping=settings.sse_ping_s, send_timeout=settings.sse_send_timeout_s,
            shutdown_event=shutdown, shutdown_grace_period=SHUTDOWN_GRACE_S,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return router


async def _stream(daemon: Daemon, since: int | None, services: list[str], kinds: list[str],
                  shutdown: anyio.Event) -> AsyncIterator[ServerSentEvent]:
    bus = daemon.bus
    async with bus.subscribe(daemon.settings.sse_queue) as sub:
        yield ServerSentEvent(comment="connected", retry=RETRY_MS)
        # Subscribed first, so nothing published from here on can fall between the replay
        # and the live events; the live ones already replayed are skipped by id.
        gap, replay = bus.since(since)
        sent = since or 0
        if gap is not None:
            yield _gap(gap)
            sent = gap.until  # a future id (not ours) must not hide what follows
        for event in replay:
            if event.id > sent:
                sent = event.id
                if matches(event, services, kinds):
                    yield _event(event)
        while True:
            item = await _next(sub, shutdown)
            if item is None:
                body = {"kind": "shutdown", "service": None, "at": time.time(),
                        "reason": "the daemon is shutting down"}
                yield ServerSentEvent(json.dumps(body), event="shutdown")
                return
            if isinstance(item, Gap):
                # The queue may have dropped events the replay already sent (they were
                # published between subscribing and reading the buffer): only the rest is lost.
                if item.until > sent:
                    yield _gap(Gap(max(item.after, sent), item.until, item.reason))
                    sent = item.until
            elif item.id > sent:
                sent = item.id
                if matches(item, services, kinds):
                    yield _event(item)


async def _next(sub: Subscription, shutdown: anyio.Event) -> Event | Gap | None:
    """The next item, or None once the server shuts down (whichever comes first)."""
    item = sub.get_nowait()
    if item is not None:
        return item
    get = asyncio.ensure_future(sub.get())
    stop = asyncio.ensure_future(shutdown.wait())
    try:
        done, _ = await asyncio.wait({get, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        get.cancel()
        stop.cancel()
    return get.result() if get in done else None


def _event(event: Event) -> ServerSentEvent:
    return ServerSentEvent(json.dumps(event.as_dict(), default=str), event=event.kind,
                           id=str(event.id))


def _gap(gap: Gap) -> ServerSentEvent:
    body: dict[str, Any] = {"kind": "gap", "service": None, "at": time.time(),
                            "after": gap.after, "until": gap.until, "reason": gap.reason}
    # Its id is the last one lost, so a client that reconnects after it is not told twice.
    return ServerSentEvent(json.dumps(body), event="gap", id=str(gap.until))
