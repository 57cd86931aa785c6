"""HTTP health checks: GET with a timeout; any 2xx (or the configured status) is healthy.

`check` never raises and always answers within the configured timeout (plus a little): a URL
that passes the config's `^https?://` rule but that the HTTP client cannot parse (httpx raises
`InvalidURL`, which is not an `HTTPError`) used to escape from here, kill the start task and
leave the unit `starting` for good. Any exception is now an unhealthy answer that says why.
"""

from __future__ import annotations

import asyncio

import httpx

from gpu_manager.config import HealthConfig

# asyncio's own deadline on top of httpx's: httpx's timeout covers each phase (connect, read),
# not the whole exchange, and a server that trickles bytes could stretch it.
GRACE_S = 1.0


class HealthChecker:
    def __init__(self) -> None:
        # trust_env=False: a proxy from the environment must never sit between us and localhost.
        self._client = httpx.AsyncClient(trust_env=False, follow_redirects=False)

    async def check(self, cfg: HealthConfig) -> tuple[bool, str]:
        """(healthy, what was seen): never raises, bounded by `cfg.timeout_s`."""
        try:
            async with asyncio.timeout(cfg.timeout_s + GRACE_S):
                resp = await self._client.get(cfg.url, timeout=cfg.timeout_s)
        except (httpx.TimeoutException, TimeoutError):
            return False, f"no answer within {cfg.timeout_s:g}s"
        except httpx.HTTPError as exc:
            return False, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        except Exception as exc:  # InvalidURL, UnicodeError from IDNA, a bug in a transport
            return False, f"cannot check {cfg.url!r}: {type(exc).__name__}: {exc}"
        if cfg.expected_status is not None:
            ok = resp.status_code == cfg.expected_status
        else:
            ok = 200 <= resp.status_code < 300
        return ok, f"HTTP {resp.status_code}"

    async def aclose(self) -> None:
        await self._client.aclose()
