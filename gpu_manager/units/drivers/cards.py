"""Whether a Docker container made before (by hand, by compose) may serve a placement."""

from __future__ import annotations

from typing import Any

from gpu_manager.units.drivers.base import DriverError


def check_cards(container: str, service: str, visible: tuple[str, ...],
                cards: tuple[int, ...], asked: list[dict[str, Any]]) -> None:
    """A container keeps the GPUs it was made with (`asked`: its HostConfig.DeviceRequests):
    used as it is when they are the cards the plan placed it on (by UUID or by index),
    refused (naming both) when they are others, or any (a request by count), since its VRAM
    would land on a card the plan did not count. Nothing placed: nothing to check."""
    if not visible:
        return
    ids = sorted({str(i) for r in asked for i in (r.get("DeviceIDs") or [])})
    if asked and not ids:  # `count: all` (or n): the engine picks, any card may be hit
        raise DriverError(
            f"container {container!r} exists with a GPU request by count, not by card, but "
            f"the plan placed {service} on {', '.join(visible)}: its memory could land on a "
            "card the plan did not count; remove the container so that it is created on its "
            "card")
    if ids and not set(ids) <= {*visible, *(str(c) for c in cards)}:
        raise DriverError(
            f"container {container!r} exists pinned to GPU {', '.join(ids)} but the plan "
            f"placed {service} on {', '.join(visible)}: remove the container so that it is "
            "created on its card, or pin the service there (`device:` in services.yaml)")
