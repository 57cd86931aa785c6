"""What an open dashboard costs the daemon: its CPU time and RSS over a window with no page
open, then the same window with the page open in chromium (the baseline is the first window,
measured in the same run). Each window runs the same load: a phase change every 4 s, which is
what makes the page refetch status and operations.

    python -m bench.dashboard [--window 30]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from bench.common import row, write
from tests.support.daemon import DaemonProc
from tests.test_web import CHROMIUM_ARGS


def window(d: DaemonProc, seconds: float) -> dict[str, float]:
    """CPU seconds and RSS of the daemon over `seconds` of phase changes."""
    assert d.proc is not None
    proc = psutil.Process(d.proc.pid)
    stop = threading.Event()

    def load() -> None:
        phases = [2, 3, 1]
        i = 0
        while not stop.wait(4.0):
            d.post(f"/gpu/prepare-phase/{phases[i % 3]}")
            i += 1

    t = threading.Thread(target=load, daemon=True)
    cpu0 = sum(proc.cpu_times()[:2])
    t.start()
    rss_max = 0.0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        rss_max = max(rss_max, proc.memory_info().rss / 2**20)
        time.sleep(0.5)
    stop.set()
    t.join(30)
    cpu = sum(proc.cpu_times()[:2]) - cpu0
    return {"cpu_s": cpu, "cpu_pct": 100 * cpu / seconds, "rss_max_mb": rss_max}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--window", type=float, default=30.0)
    args = ap.parse_args()
    print("dashboard: the daemon's CPU and RSS without and with the page open")
    exe = shutil.which("chromium")
    if exe is None:
        print("  skipped: chromium not found (Debian package `chromium`)")
        return
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="gm-bench-") as tmp:
        d = DaemonProc(Path(tmp)).start()
        try:
            time.sleep(2)  # past start-up work
            closed = window(d, args.window)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
                page = browser.new_page()
                page.goto(f"{d.url}/")
                page.wait_for_selector("body[data-ready=true]", timeout=15_000)
                opened = window(d, args.window)
                browser.close()
        finally:
            d.close()
    data: dict[str, Any] = {"window_s": args.window, "closed": closed, "open": opened}
    row("daemon CPU, page closed / open",
        f"{closed['cpu_pct']:.1f}% / {opened['cpu_pct']:.1f}%",
        f"+{opened['cpu_pct'] - closed['cpu_pct']:.1f} points of one core")
    row("daemon RSS max, page closed / open",
        f"{closed['rss_max_mb']:.0f} / {opened['rss_max_mb']:.0f} MB",
        f"+{opened['rss_max_mb'] - closed['rss_max_mb']:.0f} MB")
    print(f"  -> {write('dashboard', data)}")


if __name__ == "__main__":
    main()
