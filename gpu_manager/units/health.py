"""HTTP health checks: GET with a timeout; any 2xx (or the configured status) is healthy."""

from __future__ import annotations

import httpx

from gpu_manager.config import HealthConfig


class HealthChecker:
    def __init__(self) -> None:
        # trust_env=False: a proxy from the environment must never sit between us and localhost.
        self._client = httpx.AsyncClient(trust_env=False, follow_redirects=False)

    async def check(self, cfg: HealthConfig) -> tuple[bool, str]:
        """(healthy, what was seen): never raises."""
        try:
            resp = await self._client.get(cfg.url, timeout=cfg.timeout_s)
        except httpx.TimeoutException:
            return False, f"no answer within {cfg.timeout_s:g}s"
        except httpx.HTTPError as exc:
            return False, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if cfg.expected_status is not None:
            ok = resp.status_code == cfg.expected_status
        else:
            ok = 200 <= resp.status_code < 300
        return ok, f"HTTP {resp.status_code}"

    async def aclose(self) -> None:
        await self._client.aclose()
