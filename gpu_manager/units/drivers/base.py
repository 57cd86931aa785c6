"""The driver interface: how a unit starts, stops, watches and re-adopts one service."""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass
from typing import Any, Protocol


class DriverError(Exception):
    """A start/stop/adopt that failed for a reason worth showing the operator."""


# The polite stop signals: a process that dies of one (or exits 128 + it, as a shell or a
# container runtime reports that death) stopped as asked, as systemd counts it by default.
# Real servers do this: uvicorn (llama.cpp's Python server, vLLM) shuts down on SIGTERM and
# then re-raises it, so its exit status is "killed by SIGTERM" (143 in a shell) after a
# clean shutdown. SIGKILL, SIGSEGV, SIGABRT and any other code are failures.
CLEAN_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})
CLEAN_CODES = frozenset({0, *(128 + s for s in CLEAN_SIGNALS)})


@dataclass(frozen=True, slots=True)
class ExitInfo:
    code: int | None  # exit status; None when unknown (e.g. an adopted process)
    signal: int | None = None
    detail: str = ""

    @property
    def clean(self) -> bool:
        if self.signal is not None:
            return self.signal in CLEAN_SIGNALS
        return self.code in CLEAN_CODES

    def describe(self) -> str:
        if self.signal is not None:
            what = (f"stopped by signal {self.signal} ({_signame(self.signal)})" if self.clean
                    else f"killed by signal {self.signal}")
            return what + (f" ({self.detail})" if self.detail else "")
        if self.code is None:
            return self.detail or "exited"
        named = f" ({_signame(self.code - 128)})" if self.code in CLEAN_CODES - {0} else ""
        return f"exited with code {self.code}{named}" + (
            f" ({self.detail})" if self.detail else "")


def _signame(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class ExitWatch:
    """The exit of what a driver launched or adopted: one future, resolved once."""

    name: str
    _exit: asyncio.Future[ExitInfo] | None = None
    # The GPUs (UUIDs) its next launch gets; () leaves the service to find its own.
    visible: tuple[str, ...] = ()
    cards: tuple[int, ...] = ()  # the same GPUs by index

    def running(self) -> bool:
        return self._exit is not None and not self._exit.done()

    async def wait_exit(self) -> ExitInfo:
        if self._exit is None:
            raise DriverError(f"{self.name} was never started")
        return await asyncio.shield(self._exit)


class Driver(Protocol):
    """One service's process or container. All methods are async and never block the loop."""

    visible: tuple[str, ...]  # the GPUs (UUIDs) the next launch is handed
    cards: tuple[int, ...]  # the same by index

    async def start(self) -> None:
        """Launch the service; returns once it is launched (not once it is healthy)."""
        ...

    async def wait_exit(self) -> ExitInfo:
        """Resolve when the launched or adopted service dies."""
        ...

    async def stop(self, timeout: float) -> ExitInfo:
        """Stop gracefully, escalate after `timeout`, and return once nothing is left."""
        ...

    def running(self) -> bool:
        """Whether the launched or adopted service is alive, as far as the driver knows."""
        ...

    def record(self) -> dict[str, Any] | None:
        """Identity to persist so a restarted daemon can re-adopt (None when not running)."""
        ...

    async def adopt(self, record: dict[str, Any]) -> bool:
        """Take over a service from a record; False when it is gone or is not ours."""
        ...

    async def pids(self) -> list[int]:
        """Host pids of the service's processes (for matching against the GPU's list)."""
        ...
