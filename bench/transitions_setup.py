"""The real-looking transitions profile's services, GPU and phases, the config files it
writes for each mode, and the services' own minimum per call. See bench/transitions_real.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

TOTAL_MB, RESERVE_MB, RELEASE_DELAY_MS, RESIDUAL_MB = 24576, 1024, 500, 512
STOP_S = 0.1  # a stand-in's shutdown (times the scale)


@dataclass(frozen=True, slots=True)
class Svc:
    name: str
    api: str
    vram_mb: int
    cold_s: float  # --startup-s: loading from disk, CUDA init, warm-up
    wake_s: float
    sleep_s: float
    priority: int


# Budget 23552 MB: phases 2 and 3 fit awake side by side (21000), 3 and 4 do not (26000), all
# four never (35000); every residual (4 x 512) fits beside any one phase.
SERVICES = [
    Svc("vision", "vllm", 9000, 3.0, 0.3, 0.15, 40),
    Svc("tts", "vllm", 5000, 2.0, 0.2, 0.1, 50),
    Svc("llm", "sglang", 7000, 3.0, 0.3, 0.15, 50),
    Svc("image", "comfyui", 14000, 3.0, 0.3, 0.2, 100),
]
BY_NAME = {s.name: s for s in SERVICES}
PHASES = {2: ("vision", ["vision"]), 3: ("speak", ["tts", "llm"]), 4: ("draw", ["image"])}


@dataclass(frozen=True, slots=True)
class Setup:
    scale: float
    ports: dict[str, int]
    fast_poll_s: float
    health_interval_s: float
    dwell_s: float

    def t(self, seconds: float) -> float:
        return round(seconds * self.scale, 4)

    def command(self, svc: Svc) -> list[str]:
        return ["{python}", "-m", "gpu_manager.sim.workload", "--name", svc.name,
                "--vram-mb", str(svc.vram_mb), "--port", str(self.ports[svc.name]),
                "--startup-s", str(self.t(svc.cold_s)), "--stop-s", str(self.t(STOP_S)),
                "--api", svc.api, "--sleep-s", str(self.t(svc.sleep_s)),
                "--wake-s", str(self.t(svc.wake_s)), "--sleep-vram-mb", str(RESIDUAL_MB)]

    def health_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}/health"


def services_yaml(setup: Setup, sleep: bool, prewarm: bool) -> str:
    lines = ["gpu:", "  backend: simulated", f"  total_mb: {TOTAL_MB}",
             f"  reserve_mb: {RESERVE_MB}", f"  release_delay_ms: {RELEASE_DELAY_MS}",
             f"  fast_poll_interval_s: {setup.fast_poll_s}"]
    if prewarm:
        lines.append("prewarm: true")
    lines.append("services:")
    for svc in SERVICES:
        command = ", ".join(f'"{a}"' for a in setup.command(svc))
        lines += [f"  {svc.name}:", "    type: native", f"    vram_mb: {svc.vram_mb}",
                  f"    priority: {svc.priority}", f"    command: [{command}]",
                  f'    health: {{url: "{setup.health_url(svc.name)}", timeout_s: 2, '
                  f"interval_s: 5, startup_interval_s: {setup.health_interval_s}}}",
                  "    start_timeout_s: 60", "    stop_timeout_s: 10"]
        if sleep:
            lines.append(f'    sleep: {{api: {svc.api}, url: "http://127.0.0.1:'
                         f'{setup.ports[svc.name]}", residual_mb: {RESIDUAL_MB}, '
                         "timeout_s: 10, wake_timeout_s: 30}")
    return "\n".join(lines) + "\n"


def phases_yaml(links: dict[int, int]) -> str:
    lines = ["phases:"]
    for number, (name, services) in PHASES.items():
        lines += [f"  {number}:", f"    name: {name}", f"    services: [{', '.join(services)}]"]
        if number in links:
            lines.append(f"    next: {links[number]}")
    return "\n".join(lines) + "\n"


# -- the services' own times --------------------------------------------------------------------
def own_start_s(setup: Setup, name: str) -> float:
    """A stand-in's own cold start: process creation to /health turning 200 (it reports it)."""
    body = httpx.get(setup.health_url(name), trust_env=False, timeout=5).json()
    return float(body["startup_total_s"])


def release_own_s(setup: Setup, action: str, name: str) -> float:
    """How long a release takes the service itself before its VRAM is free."""
    if action == "sleep":
        return setup.t(BY_NAME[name].sleep_s)
    return setup.t(STOP_S) + RELEASE_DELAY_MS / 1000


def minimums(setup: Setup, steps: list[dict[str, Any]]) -> tuple[float, float]:
    """(own, floor) of a plan's steps (see the module docstring)."""
    own = floor = 0.0
    for step in steps:
        action, name = step["action"], step["service"]
        if action in ("stop", "sleep"):
            floor = max(floor, release_own_s(setup, action, name))
            continue
        mine = own_start_s(setup, name) if action == "start" else setup.t(BY_NAME[name].wake_s)
        before = max((release_own_s(setup, steps[d]["action"], steps[d]["service"])
                      for d in step["after"]), default=0.0)
        own, floor = max(own, mine), max(floor, before + mine)
    return own, floor


# -- (b), (c), (d): the daemon --------------------------------------------------------------------
