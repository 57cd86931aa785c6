"""The base of every answer model: extra keys allowed (an answer may grow a field before its
schema does; a client must not break on it)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Body(BaseModel):
    model_config = ConfigDict(extra="allow")
