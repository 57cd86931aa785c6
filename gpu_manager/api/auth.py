"""The token check on mutating routes, declared in OpenAPI only when a token is configured
(then generated clients and contract tests know to send it; without one, nothing is asked)."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from gpu_manager.api.errors import ApiError

BEARER = HTTPBearer(auto_error=False, description="GPU_MANAGER_TOKEN as a bearer token")
# What the existing GPUClient sends.
SERVICE_TOKEN = APIKeyHeader(name="X-Service-Token", auto_error=False,
                             description="GPU_MANAGER_TOKEN, for older clients")


def make_auth(token: str | None) -> Callable[..., Awaitable[None]]:
    if token is None:
        async def open_() -> None:
            return None
        return open_

    async def authorized(
        bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)] = None,
        service_token: Annotated[str | None, Depends(SERVICE_TOKEN)] = None,
    ) -> None:
        given = bearer.credentials if bearer is not None else service_token or ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise ApiError("unauthorized", "a valid `Authorization: Bearer <token>` is required",
                           headers={"WWW-Authenticate": "Bearer"})

    return authorized
