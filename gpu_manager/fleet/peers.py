"""Calls to the fleet's daemons (this one included: it is asked like any other host, so
every host's answer comes the same way). Each call is bounded; what a call could not learn
is an answer too (`Reply.error`), never an exception."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from gpu_manager.fleet.members import Host


@dataclass(frozen=True, slots=True)
class Reply:
    host: Host
    status: int | None  # None: no HTTP answer (see `error`)
    body: Any
    error: str | None = None  # why there was no answer: unreachable, timed out
    sent: bool = True  # False: the request never left (a refused connection)
    timed_out: bool = False  # sent, and no answer within the call's deadline

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class Peers:
    def __init__(self, token: str | None, timeout_s: float) -> None:
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http_: httpx.AsyncClient | None = None
        self.timeout_s = timeout_s

    @property
    def _http(self) -> httpx.AsyncClient:
        # Made at the first call, not at the daemon's start: an httpx client builds an SSL
        # context (13-25 ms here) even for plain http:// peers.
        if self._http_ is None:
            # trust_env=False: a proxy from the environment must not sit between the daemons
            self._http_ = httpx.AsyncClient(headers=self._headers, trust_env=False,
                                            timeout=httpx.Timeout(self.timeout_s),
                                            limits=httpx.Limits(max_connections=64))
        return self._http_

    async def call(self, host: Host, method: str, path: str, *, json: Any = None,
                   params: dict[str, str] | None = None,
                   timeout_s: float | None = None) -> Reply:
        timeout = httpx.Timeout(timeout_s or self.timeout_s, connect=self.timeout_s)
        try:
            resp = await self._http.request(method, host.url + path, json=json, params=params,
                                            timeout=timeout)
        except httpx.ConnectError as exc:
            return Reply(host, None, None, f"unreachable: {exc or type(exc).__name__}", False)
        except httpx.TimeoutException as exc:
            sent = not isinstance(exc, httpx.ConnectTimeout)
            return Reply(host, None, None, f"no answer within {timeout.read:g}s", sent, sent)
        except httpx.HTTPError as exc:
            return Reply(host, None, None, f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # a URL no socket can take, a client closed at shutdown
            return Reply(host, None, None, f"{type(exc).__name__}: {exc}", False)
        try:
            body = resp.json()
        except ValueError:
            body = {"error": "bad_answer", "detail": resp.text[:200]}
        return Reply(host, resp.status_code, body)

    async def aclose(self) -> None:
        if self._http_ is not None:
            await self._http_.aclose()
