"""The real-looking transitions profile's modes, sequences and targets, and its report:
percentiles per mode and sequence, the ratios, PASS/MISS against the targets (not asserted:
benchmarks are not tests). See bench/transitions_real.py."""

from __future__ import annotations

from typing import Any

from bench.common import pct, row

MODES = {"a": "seed stop/sleep(2)/poll", "b": "serial stop-then-start",
         "c": "graph + sleep", "d": "graph + sleep + prewarm"}
SEQUENCES = {"ac1": [2, 3, 4], "bf": [2, 3, 2, 3]}
SEQ_LABEL = {"ac1": "AC-1 2->3->4", "bf": "back-and-forth 2->3->2->3"}
NEXT = {"ac1": {2: 3, 3: 4}, "bf": {2: 3, 3: 2}}
TARGET_MS = 150.0
TARGET_SPEEDUP = 5.0


def _ms(values: list[float]) -> str:
    return f"{pct(values, 50) * 1000:.0f} / {pct(values, 95) * 1000:.0f} ms"


def summarize(records: list[dict[str, Any]], rounds: int) -> dict[str, Any]:
    summary: dict[str, Any] = {"modes": {}}
    for seq in SEQUENCES:
        for mode in MODES:
            mine = [r for r in records if r["mode"] == mode and r["sequence"] == seq]
            if not mine:
                continue
            arrows = [r for r in mine if r["index"] > 0]
            summary["modes"][f"{mode}/{seq}"] = {
                "total_s": sum(r["wall_s"] for r in mine) / rounds,
                "transitions_s": sum(r["wall_s"] for r in arrows) / rounds,
                "gap_ms_p50": pct([r["wall_s"] - r["own_s"] for r in mine], 50) * 1000,
                "gap_ms_p95": pct([r["wall_s"] - r["own_s"] for r in mine], 95) * 1000,
                "overhead_ms_p50": pct([r["wall_s"] - r["floor_s"] for r in mine], 50) * 1000,
                "overhead_ms_p95": pct([r["wall_s"] - r["floor_s"] for r in mine], 95) * 1000,
                "split_ms_p50": {
                    key: pct([r[f"{key}_s"] for r in mine], 50) * 1000
                    for key in ("before_steps", "in_steps", "after_steps")} if mode != "a"
                else None,
                "per_call": {
                    f"{r['index']}:{r['from']}->{r['to']}": {
                        key: pct([x[key] for x in mine if x["index"] == r["index"]], 50)
                        for key in ("wall_s", "own_s", "floor_s")}
                    for r in mine},
            }
    m = summary["modes"]

    def ratio(a: str, b: str, key: str = "transitions_s") -> float | None:
        if f"{a}/bf" not in m or f"{b}/bf" not in m:
            return None
        return float(m[f"{a}/bf"][key] / m[f"{b}/bf"][key])

    summary["suspect"] = [
        {k: r[k] for k in ("mode", "sequence", "index", "from", "to", "mismatches")}
        for r in records if r.get("mismatches")]
    summary["ratios"] = {
        f"{a}/{b}": {"transitions": ratio(a, b), "with_entry": ratio(a, b, "total_s")}
        for a, b in (("a", "c"), ("a", "d"), ("b", "c"))}
    graph = [r for r in records if r["mode"] == "c"]
    warm = [r for r in records if r["mode"] == "d" and r["all_prewarmed"]]
    summary["targets"] = {
        "c_gap_ms_p95": pct([r["wall_s"] - r["own_s"] for r in graph], 95) * 1000
        if graph else None,
        "c_overhead_ms_p95": pct([r["wall_s"] - r["floor_s"] for r in graph], 95) * 1000
        if graph else None,
        "d_prewarmed_wall_ms_p95": pct([r["wall_s"] for r in warm], 95) * 1000
        if warm else None,
        "d_prewarmed_wall_ms_max": max(r["wall_s"] for r in warm) * 1000 if warm else None,
        "d_prewarmed_calls": len(warm),
        "suspect_calls": len(summary["suspect"]),
        "bf_speedup_a_over_c": summary["ratios"]["a/c"]["transitions"],
    }
    return summary


def report(summary: dict[str, Any]) -> None:
    m = summary["modes"]
    for seq in SEQUENCES:
        if not any(f"{mode}/{seq}" in m for mode in MODES):
            continue
        print(f"\n  {SEQ_LABEL[seq]} (every prepare-phase call: median of rounds; total: mean)")
        print(f"  {'mode':<28} {'calls (s)':>28} {'total':>8} {'wall-own p50/p95':>20} "
              f"{'wall-floor p50/p95':>20}")
        for mode, label in MODES.items():
            s = m.get(f"{mode}/{seq}")
            if s is None:
                continue
            calls = " ".join(f"{v['wall_s']:.2f}" for v in s["per_call"].values())
            print(f"  ({mode}) {label:<23} {calls:>28} {s['total_s']:>7.2f}s "
                  f"{s['gap_ms_p50']:>8.0f} /{s['gap_ms_p95']:>6.0f} ms "
                  f"{s['overhead_ms_p50']:>8.0f} /{s['overhead_ms_p95']:>6.0f} ms")
        own = " ".join(f"{v['own_s']:.2f}" for v in m[f"c/{seq}"]["per_call"].values()) \
            if f"c/{seq}" in m else ""
        print(f"  {'(c) own minimum per call':<32} {own:>24}")
        for mode in "bcd":
            split = m.get(f"{mode}/{seq}", {}).get("split_ms_p50")
            if split:
                print(f"  ({mode}) wall - floor, p50 split: {split['before_steps']:.0f} ms before "
                      f"the steps, {split['in_steps']:.0f} in them (beyond own), "
                      f"{split['after_steps']:.0f} after")
    print()
    for rec in summary["suspect"]:
        print(f"  WARNING: ({rec['mode']}) {rec['sequence']} call {rec['index']} "
              f"({rec['from']} -> {rec['to']}): the daemon and the GPU disagree: "
              f"{'; '.join(rec['mismatches'])}")
    r = summary["ratios"]
    for key in ("a/c", "a/d", "b/c"):
        if r[key]["transitions"] is not None:
            row(f"back-and-forth {key} (3 transitions; with entry)",
                f"{r[key]['transitions']:.1f}x; {r[key]['with_entry']:.1f}x")
    t = summary["targets"]

    def verdict(value: float | None, ok: bool) -> str:
        return "n/a" if value is None else "PASS" if ok else "MISS"

    c = t["c_gap_ms_p95"]
    if c is not None:
        row("(c) wall - own minimum, p95", f"{c:.0f} ms",
            f"<= {TARGET_MS:.0f} ms: {verdict(c, c <= TARGET_MS)} "
            f"(wall - floor p95 {t['c_overhead_ms_p95']:.0f} ms)")
    w = t["d_prewarmed_wall_ms_p95"]
    row("(d) prewarmed calls: wall p95 (max)",
        "none" if w is None else f"{w:.0f} ms ({t['d_prewarmed_wall_ms_max']:.0f})",
        f"<= {TARGET_MS:.0f} ms: {verdict(w, w is not None and w <= TARGET_MS)} "
        f"({t['d_prewarmed_calls']} calls)")
    s = t["bf_speedup_a_over_c"]
    if s is not None:
        row("back-and-forth (a)/(c)", f"{s:.1f}x",
            f">= {TARGET_SPEEDUP:.0f}x: {verdict(s, s >= TARGET_SPEEDUP)}")


