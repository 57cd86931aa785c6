"""Regenerate docs/dashboard.png: the dashboard after the AC-1 sequence (phases 2, 3, 4 on
the root inventory, simulated GPU), in Debian's chromium.

    .venv/bin/python scripts/screenshot.py [--out docs/dashboard.png] [--width 1280]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from playwright.sync_api import expect, sync_playwright  # noqa: E402

from tests.support.daemon import DaemonProc  # noqa: E402
from tests.test_web import CHROMIUM_ARGS  # noqa: E402


def shoot(d: DaemonProc, exe: str, args: argparse.Namespace) -> None:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": args.width, "height": args.height})
        page.goto(f"{d.url}/")
        page.wait_for_selector("body[data-ready=true]", timeout=15_000)
        for phase, service in ((2, "vidi"), (3, "cosyvoice"), (4, "comfyui")):
            assert d.post(f"/gpu/prepare-phase/{phase}").status_code == 200
            expect(page.locator(f'tr[data-service="{service}"] .state').first
                   ).to_have_text("ready", timeout=10_000)
        page.locator('button[data-preview="3"]').click()
        expect(page.locator("#preview")).to_contain_text("would", timeout=5_000)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(args.out), full_page=True)
        browser.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=900)
    args = ap.parse_args()
    exe = shutil.which("chromium")
    if exe is None:
        sys.exit("chromium not found (Debian package `chromium`)")
    with tempfile.TemporaryDirectory(prefix="gm-shot-") as tmp:
        d = DaemonProc(Path(tmp)).start()
        try:
            shoot(d, exe, args)
        finally:
            d.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
