"""Write docs/benchmarks.md from bench/results/*.json (run last by `python -m bench`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.common import RESULTS

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def rows() -> list[tuple[str, str, str, str]]:
    out: list[tuple[str, str, str, str]] = []
    if (s := load("status_load")) is not None:
        o = s["ours"]["open_loop"]
        out.append(("GET /gpu/status p99 at 500 req/s (poller 5 ms/poll + 100 ms/s)",
                    f"{o['p99_ms']:.2f} ms (bare FastAPI {s['bare']['open_loop']['p99_ms']:.2f})",
                    "<= 5 ms", verdict(o["p99_ms"] <= 5)))
        out.append(("status throughput vs bare endpoint", f"{s['throughput_ratio']:.0%}",
                    ">= 60%", verdict(s["throughput_ratio"] >= 0.6)))
        out.append(("RSS under status load", f"{s['rss_load_mb']:.0f} MB", "<= 100 MB",
                    verdict(s["rss_load_mb"] <= 100)))
    if (f := load("frontdoor")) is not None:
        lat, alt = f["latency"], f["alternation"]
        out.append(("front door: added latency, 1-token chat p50 / p99",
                    f"{lat['added_p50_ms']:.2f} / {lat['added_p99_ms']:.2f} ms",
                    "<= 1 / 3 ms", verdict(lat["added_p50_ms"] <= 1
                                           and lat["added_p99_ms"] <= 3)))
        out.append(("front door: streamed tokens/s through vs direct",
                    f"{f['stream']['ratio_decode']:.3f}", ">= 0.95",
                    verdict(f["stream"]["ratio_decode"] >= 0.95)))
        out.append(("front door: first token from asleep vs the server's own wake",
                    f"+{f['wake']['extra_p50_ms']:.0f} ms", "<= +150 ms",
                    verdict(f["wake"]["extra_p50_ms"] <= 150)))
        ours, fifo = alt["gpu_manager"], alt["fifo"]
        fair = max(ours["worst_answer_s"].values()) <= max(fifo["worst_answer_s"].values())
        out.append(("two models taking turns vs a FIFO stop/start swapper (llama-swap's way)",
                    f"{alt['ratio']:.1f}x ({ours['per_min']:.0f} vs {fifo['per_min']:.0f}/min, "
                    f"slowest {max(ours['worst_answer_s'].values()):.2f} s)",
                    ">= 3x, none slower", verdict(alt["ratio"] >= 3 and fair)))
    if (t := load("transitions")) is not None:
        out.append(("transition overhead p95 (AC-1)", f"{t['overhead_ms_p95']:.0f} ms",
                    "<= 150 ms", verdict(t["overhead_ms_p95"] <= 150)))
        out.append(("AC-1 sequence vs the seed's stop/sleep(2)/poll",
                    f"{t['sequence_s_ours']:.2f} s vs {t['sequence_s_baseline']:.2f} s = "
                    f"{t['speedup']:.1f}x", ">= 3x", verdict(t["speedup"] >= 3)))
    if (tr := load("transitions_real")) is not None:
        t = tr["targets"]
        out.append(("real-looking profile, graph + sleep: wall - services' own minimum, p95",
                    f"{t['c_gap_ms_p95']:.0f} ms (wall - floor {t['c_overhead_ms_p95']:.0f})",
                    "<= 150 ms", verdict(t["c_gap_ms_p95"] <= 150)))
        warm = t["d_prewarmed_wall_ms_p95"]
        out.append(("real-looking profile, a call whose services were prewarmed, p95",
                    "none" if warm is None else f"{warm:.0f} ms ({t['d_prewarmed_calls']} calls)",
                    "<= 150 ms", verdict(warm is not None and warm <= 150)))
        out.append(("real-looking profile, back-and-forth vs the seed (a)/(c)",
                    f"{t['bf_speedup_a_over_c']:.1f}x", ">= 5x",
                    verdict(t["bf_speedup_a_over_c"] >= 5)))
    if (r := load("reclaim")) is not None:
        out.append(("reclaim detection beyond the release delay, p95",
                    f"{r['p95_ms']:.0f} ms", f"<= {r['target_ms']:.0f} ms",
                    verdict(r["p95_ms"] <= r["target_ms"])))
    if (lk := load("lock")) is not None:
        out.append(("Redis lock acquire+release p99", f"{lk['cycle_p99_ms']:.3f} ms", "<= 1 ms",
                    verdict(lk["cycle_p99_ms"] <= 1)))
        out.append(("lock hand-off to a waiter (max)", f"{max(lk['handoff_ms']):.1f} ms",
                    "<= 20 ms", verdict(max(lk["handoff_ms"]) <= 20)))
        limit = lk["ttl_ms"] + 200
        out.append(("take-over after kill -9 of the holder (max)",
                    f"{max(lk['takeover_ms']):.0f} ms", f"<= TTL + 200 = {limit} ms",
                    verdict(max(lk["takeover_ms"]) <= limit)))
    if (p := load("planner")) is not None:
        sizes = p["sizes"]
        curve = ", ".join(f"{n}: {v['start_ms_p50']:.2f}" for n, v in sizes.items())
        out.append(("planner, 1,000 services (start with preemption)",
                    f"{sizes['1000']['start_ms_p50']:.2f} ms (curve, ms: {curve})", "<= 10 ms",
                    verdict(sizes["1000"]["start_ms_p50"] <= 10)))
    if (f := load("footprint")) is not None:
        start = sorted(f["start_s"])[len(f["start_s"]) // 2]
        rss = sorted(f["rss_idle_mb"])[len(f["rss_idle_mb"]) // 2]
        stack = f.get("fastapi_uvicorn_s")
        floor = f" (import fastapi+uvicorn {stack:.2f})" if stack else ""
        out.append(("cold start to /ready (p50)", f"{start:.2f} s{floor}", "<= 1.0 s",
                    verdict(start <= 1.0)))
        out.append(("RSS idle (p50)", f"{rss:.0f} MB", "<= 100 MB", verdict(rss <= 100)))
    if (db := load("dashboard")) is not None:
        c, o = db["closed"], db["open"]
        out.append(("daemon CPU with the dashboard open (phase change every 4 s)",
                    f"{o['cpu_pct']:.1f}% vs {c['cpu_pct']:.1f}% closed, RSS "
                    f"{o['rss_max_mb']:.0f} vs {c['rss_max_mb']:.0f} MB", "small", "met"))
    if (cc := load("concurrency")) is not None:
        late = cc["acquire_late_s"]
        fives = sum(v for k, v in cc["status_classes"].items() if k == "5xx")
        out.append((f"{cc['clients']} concurrent mixed clients, {cc['seconds']:g} s: answers "
                    "over 30 s, 5xx, acquire late beyond its timeout (max)",
                    f"{cc['over_30s']}, {fives}, {late['max']:.2f} s", "0, 0, < 1 s",
                    verdict(cc["over_30s"] == 0 and fives == 0 and late["max"] < 1)))
        out.append(("...and never over the GPU's total",
                    f"{cc['max_vram_used_mb']} of {cc['total_mb']} MB", "<= total",
                    verdict(cc["max_vram_used_mb"] <= cc["total_mb"])))
    if (fl := load("fleet")) is not None:
        out += fleet_rows(fl)
    if (pr := load("probe")) is not None:
        sim = pr["simulated"]
        out.append(("snapshot read + can_fit p99 (no probe call)",
                    f"{sim['read_us_p99']:.2f} us", "<< 100 ms (NFR-1)", "met"))
    return out


def fleet_rows(fl: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """bench/fleet.py: no target was set for these; the start's line is a check."""
    p, c, st = fl["placement"], fl["curve"], fl["start"]
    out = [("fleet: placement over 3 Ray hosts, /fleet/acquire?dry_run=true p50 / p99",
            f"{p['fleet']['p50_ms']:.2f} / {p['fleet']['p99_ms']:.2f} ms = "
            f"{p['ratio_p50']:.1f}x one host's /gpu/acquire/plan "
            f"({p['host_plan']['p50_ms']:.2f} ms)", "none set", ""),
           ("fleet: placement p50 at 1 / 3 / 5 / 10 hosts (in-process, real daemons)",
            " / ".join(f"{v['p50_ms']:.2f}" for v in c.values()) + f" ms ({max(c, key=int)} "
            f"hosts: {c[max(c, key=int)]['ratio_to_1']:.1f}x of 1)", "none set", "")]
    if losses := fl.get("host_loss"):
        done = [x["finished_elsewhere_s"] for x in losses]
        dead = [x["status_dead_s"] for x in losses]
        hc = losses[0]["health_check"]
        out.append((f"fleet: host lost mid-task, removal to the task's result from another "
                    f"host ({len(losses)} losses)",
                    f"{min(done):.2f}-{max(done):.2f} s (dead in /fleet/status "
                    f"{min(dead):.2f}-{max(dead):.2f} s; health check every "
                    f"{hc['health_check_period_ms']} ms, dead after "
                    f"{hc['health_check_failure_threshold']} misses)", "none set", ""))
    loaded = (st["ray_mapped_in_fleet_daemon"] or st["ray_in_sys_modules_after_app_import"])
    out.append(("fleet extra out of the single-host start: Ray loaded; cold start with "
                "`fleet:` vs alone (p50)",
                f"{'yes' if loaded else 'no'} (import ray: {st['import_ray_s']:.2f} s); "
                f"{st['fleet_p50_s']:.2f} vs {st['alone_p50_s']:.2f} s = {st['ratio']:.2f}x",
                "not loaded", verdict(not loaded)))
    return out


def fleet_curve(fl: dict[str, Any]) -> list[str]:
    lines = ["## Placement over more hosts (bench/fleet.py)", "",
             f"`{fl['command']}` (run at {fl['when']}, load average before: "
             f"{', '.join(str(x) for x in fl.get('loadavg_before', []))}; the whole script "
             f"{fl['seconds']:.0f} s): one in-process `Fleet` over N real "
             "daemons on this machine (cards of "
             + ", ".join(f"{mb // 1024}" for mb in fl["curve_mb"]) + " GB), a dry-run lease "
             f"of {fl['lease_mb']} MB; one by one = the same N dry runs asked in turn.", "",
             "| hosts | p50 | p99 | vs 1 host | one by one p50 | vs one by one | asker's CPU "
             "p50 | chosen |", "|---|---|---|---|---|---|---|---|"]
    for n, v in fl["curve"].items():
        lines.append(f"| {n} | {v['p50_ms']:.2f} ms | {v['p99_ms']:.2f} ms | "
                     f"{v['ratio_to_1']:.1f}x | {v['serial_p50_ms']:.2f} ms | "
                     f"{v['ratio_to_serial']:.2f}x | {v['asker_cpu_p50_ms']:.2f} ms | "
                     f"{', '.join(v['chosen'])} |")
    return [*lines, ""]


MODE_LABELS = {"a": "(a) seed: stop, sleep(2), start, poll 1 s",
               "b": "(b) serial stop-then-start", "c": "(c) graph + sleep",
               "d": "(d) graph + sleep + prewarm"}


def real_profile(tr: dict[str, Any]) -> list[str]:
    """The per-mode table of bench/transitions_real.py."""
    m = tr["machine"]
    load = ", ".join(f"{x:.2f}" for x in tr["loadavg_before"])
    lines = [
        "## Transitions with real-looking services (bench/transitions_real.py)",
        "",
        f"`{tr['command']}` on {m.get('cpus')} CPUs, simulated GPU; run at {tr['when']} in "
        f"{tr['seconds']:.0f} s (load average before: {load}). Cold start "
        f"{3 * tr['scale']:g} s, wake {0.3 * tr['scale']:g} s, sleep "
        f"{0.1 * tr['scale']:g}-{0.2 * tr['scale']:g} s. Seconds per prepare-phase call "
        "(median of rounds); own = the slowest start or wake the call cannot avoid; floor = "
        "own plus the release it had to wait for and any release the answer waits for.",
        "",
    ]
    for seq, label in (("ac1", "AC-1, phases 2 -> 3 -> 4"),
                       ("bf", "back-and-forth, phases 2 -> 3 -> 2 -> 3")):
        rows_ = [(mode, tr["modes"].get(f"{mode}/{seq}")) for mode in MODE_LABELS]
        present = [(mode, x) for mode, x in rows_ if x is not None]
        if not present:
            continue
        calls = list(present[0][1]["per_call"])
        head = " | ".join(c.split(":", 1)[1].replace("None", "empty") for c in calls)
        lines += [f"{label}:", "", f"| mode | {head} | total | wall - own p50 / p95 | "
                  "wall - floor p50 / p95 |", "|---|" + "---|" * (len(calls) + 3)]
        for mode, x in present:
            cells = " | ".join(f"{v['wall_s']:.2f}" for v in x["per_call"].values())
            lines.append(f"| {MODE_LABELS[mode]} | {cells} | {x['total_s']:.2f} | "
                         f"{x['gap_ms_p50']:.0f} / {x['gap_ms_p95']:.0f} ms | "
                         f"{x['overhead_ms_p50']:.0f} / {x['overhead_ms_p95']:.0f} ms |")
        for mode, x in present:
            if mode in "cd":
                own = " | ".join(f"{v['own_s']:.2f}" for v in x["per_call"].values())
                lines.append(f"| own minimum in ({mode}) | {own} | | | |")
        lines.append("")
    ratios = tr["ratios"]
    parts = [f"{k}: {v['transitions']:.1f}x ({v['with_entry']:.1f}x with the entry into "
             "phase 2)" for k, v in ratios.items() if v["transitions"] is not None]
    if parts:
        lines += ["Back-and-forth, the three transitions' total: " + "; ".join(parts) + ".", ""]
    return lines


def concurrency(after: dict[str, Any], before: dict[str, Any] | None) -> list[str]:
    """bench/concurrency.py, with the figures of the code before the books' fixes when
    they were kept (bench/results/concurrency_before.json)."""
    runs = [("before (commit 470f0f9)", before)] if before else []
    runs.append(("now", after))
    lines = ["## Many clients at once (bench/concurrency.py)", "",
             f"`python -m bench.concurrency` ({after['clients']} clients, "
             f"{after['seconds']:g} s, root inventory on the simulated 24 GB GPU; run at "
             f"{after['when']}).", "",
             "| run | answers (/s) | over 30 s | 5xx | 4xx | worst phase / start / acquire / "
             "status (s) | acquire late p50 / p99 / max (s) | max VRAM (MB) |",
             "|---|---|---|---|---|---|---|---|"]
    for label, r in runs:
        assert r is not None
        cls, worst, late = r["status_classes"], r["worst_s"], r["acquire_late_s"]
        lines.append(
            f"| {label} | {r['answers']} ({r['answers_per_s']}) | {r['over_30s']} | "
            f"{cls.get('5xx', 0)} | {cls.get('4xx', 0)} | {worst.get('phase')} / "
            f"{worst.get('start')} / {worst.get('acquire')} / {worst.get('status')} | "
            f"{late['p50']} / {late['p99']} / {late['max']} | {r['max_vram_used_mb']} |")
    return [*lines, ""]


def main() -> None:
    any_result = next((load(n) for n in ("status_load", "transitions", "probe") if load(n)), None)
    machine = any_result["machine"] if any_result else {}
    when = any_result["when"] if any_result else "?"
    lines = [
        "# Benchmarks",
        "",
        "Written by `python -m bench.summary` from `bench/results/*.json` (`./dev bench` runs",
        "every script, then this). Ratios compare against a baseline measured in the same run.",
        "",
        f"Machine: {machine.get('cpus')} CPUs ({machine.get('cpu_model')}), "
        f"{machine.get('memory_gb')} GB, Python {machine.get('python')}, "
        f"{machine.get('platform')}; run at {when}.",
        "",
        "| what | measured | target | |",
        "|---|---|---|---|",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows()],
        "",
        "See the scripts' docstrings for what each measures and how; the JSON files hold every",
        "sample. Real-GPU figures (bench/gpu_e2e.py, bench/gpu_probe_check.py) are in",
        "docs/gpu-validation.md when a GPU machine was available.",
        "",
    ]
    if (tr := load("transitions_real")) is not None:
        lines += real_profile(tr)
    if (cc := load("concurrency")) is not None:
        lines += concurrency(cc, load("concurrency_before"))
    if (fl := load("fleet")) is not None:
        lines += fleet_curve(fl)
    notes = DOC.with_name("benchmarks-notes.md")
    if notes.exists():
        lines += ["## Notes", "", notes.read_text().strip(), ""]
    DOC.write_text("\n".join(lines))
    print(f"  -> {DOC}")


if __name__ == "__main__":
    main()
