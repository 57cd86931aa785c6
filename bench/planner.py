"""Planner scale: plan time for 10 .. 10,000 services.

    python -m bench.planner

Two requests per size: a high-priority start that must preempt several of the running half,
and a phase that lists a tenth of the services. Then placement on several GPUs: the same
1,000 services spread over 8 cards, a start placed on any card (it must preempt on one),
and the phase; the single-card plan of the same services is the baseline.
"""

from __future__ import annotations

import random
import time

from bench.common import pct, row, write
from gpu_manager.planner import (
    DeviceBudget,
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


def on_cards(n: int, cards: int, rng: random.Random) -> tuple[PlannerInventory, ObservedState]:
    """`n` services, half of them running spread over `cards` cards that they fill."""
    inv, single = scenario(n, rng)
    running = list(single.running)
    placement = {name: (i % cards,) for i, name in enumerate(running)}
    used = {c: sum(inv.services[r].vram_mb for r in running if placement[r] == (c,))
            for c in range(cards)}
    devices = {c: DeviceBudget(used[c] + 200) for c in range(cards)}
    state = ObservedState(sum(d.total_mb for d in devices.values()), single.running,
                          devices=devices, placement=placement)
    return inv, state


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
    inv, state = on_cards(1000, 8, rng)
    start = timed(inv, state, StartService("vip"), 20)
    phase = timed(inv, state, PreparePhase(1), 20)
    placed = plan(inv, state, StartService("vip"))
    cards = placed.starts[0].devices if isinstance(placed, Plan) else ()
    baseline = results[1000]["start_ms_p50"]
    multi = {"start_ms_p50": pct(start, 50), "phase_ms_p50": pct(phase, 50),
             "vs_single_card_start": pct(start, 50) / max(baseline, 1e-9),
             "placed_on": list(cards),
             "preempted": len(placed.stops) if isinstance(placed, Plan) else -1}
    row("1,000 services on 8 cards: place+start / phase p50",
        f"{pct(start, 50):.2f} / {pct(phase, 50):.2f} ms", "target: <= 20 ms")
    row("  placement vs one card (same services)", f"{multi['vs_single_card_start']:.1f}x",
        f"(placed on card {','.join(map(str, cards))}, preempts {multi['preempted']})")
    print(f"  -> {write('planner', {'sizes': results, 'growth_1k_10k': growth, 'cards': multi})}")


if __name__ == "__main__":
    main()
