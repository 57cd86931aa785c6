"""Planner scale: plan time for 10 .. 10,000 services.

    python -m bench.planner

Two requests per size: a high-priority start that must preempt several of the running half,
and a phase that lists a tenth of the services.
"""

from __future__ import annotations

import random
import time

from bench.common import pct, row, write
from gpu_manager.planner import (
    ObservedState,
    PhaseSpec,
    Plan,
    PlannerInventory,
    PreparePhase,
    ServiceSpec,
    StartService,
    plan,
)

SIZES = (10, 100, 1000, 10_000)


def scenario(n: int, rng: random.Random) -> tuple[PlannerInventory, ObservedState]:
    services = {f"s{i}": ServiceSpec(f"s{i}", rng.randint(50, 400), rng.randint(0, 50),
                                     rng.random() > 0.1) for i in range(n)}
    services["vip"] = ServiceSpec("vip", 2000, 100)
    running = {name: None for name in list(services)[: n // 2]}
    total = sum(services[r].vram_mb for r in running) + 1000
    members = tuple(rng.sample(list(services), max(1, n // 10)))
    phases = {1: PhaseSpec(1, "p", members)}
    return PlannerInventory(services, phases), ObservedState(total, running)


def timed(inv: PlannerInventory, state: ObservedState, req: object, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        plan(inv, state, req)  # type: ignore[arg-type]
        out.append((time.perf_counter() - t0) * 1000)
    return out


def main() -> None:
    print("planner scale")
    rng = random.Random(7)
    results = {}
    for n in SIZES:
        inv, state = scenario(n, rng)
        reps = max(3, 2000 // n)
        start = timed(inv, state, StartService("vip"), reps)
        phase = timed(inv, state, PreparePhase(1), reps)
        result = plan(inv, state, StartService("vip"))
        stops = len(result.stops) if isinstance(result, Plan) else -1
        results[n] = {"start_ms_p50": pct(start, 50), "phase_ms_p50": pct(phase, 50),
                      "preempted": stops}
        row(f"{n:>6} services: start (preempts {stops}) / phase p50",
            f"{pct(start, 50):.2f} / {pct(phase, 50):.2f} ms",
            "target: <= 10 ms" if n == 1000 else "")
    growth = results[10_000]["start_ms_p50"] / max(results[1000]["start_ms_p50"], 1e-9)
    row("growth 1,000 -> 10,000 (start)", f"{growth:.1f}x", "(10x = linear)")
    print(f"  -> {write('planner', {'sizes': results, 'growth_1k_10k': growth})}")


if __name__ == "__main__":
    main()
