"""The dashboard in a real browser (Debian's chromium driven by Playwright) against the real
daemon on the simulated GPU: it renders without console errors, follows the API live over
the event stream, runs a phase, shows a refusal's blockers, and honours the token."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import DaemonProc
from tests.support.env import unavailable, wait_for

pytestmark = pytest.mark.timeout(300)

# Without the background-networking flags Chromium keeps calling Google's hosts, which this
# closed network refuses; --no-sandbox because CI runs as root.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
TOKEN = "web-token-51f0"


def chromium_path() -> str:
    exe = os.environ.get("GPU_MANAGER_CHROMIUM") or shutil.which("chromium")
    if exe is None:
        unavailable("chromium not found (Debian package `chromium`)")
    return exe


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    exe = chromium_path()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Page:
    """A tab on the dashboard, collecting every console error and page error."""

    def __init__(self, browser: Any, d: DaemonProc) -> None:
        self.d = d
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        # Chromium logs every 4xx/5xx answer as a console error; a test that provokes a
        # refusal on purpose lists its status here, and only those are let through.
        self.expected: set[int] = set()
        # A daemon without `fleet:` answers the fleet view's GET /fleet/status (at most once
        # a minute) with 404 `fleet_disabled`: that is how the page learns to hide the view.
        self.page.on("console", lambda m: m.type == "error" and not (
            "status of 404 " in m.text and m.location.get("url", "").endswith("/fleet/status"))
            and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(f"{d.url}/")
        self.page.wait_for_selector("body[data-ready=true]", timeout=15_000)

    def row(self, service: str) -> Any:
        return self.page.locator(f'tr[data-service="{service}"]')

    def state(self, service: str) -> Any:
        return self.row(service).locator(".state").first

    def unexpected(self) -> list[str]:
        return [e for e in self.errors if not any(
            f"status of {code} " in e for code in self.expected)]

    def close(self) -> None:
        self.context.close()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    d = DaemonProc(tmp_path_factory.mktemp("web")).start()
    yield d
    d.close()


@pytest.fixture
def tab(browser: Any, daemon: DaemonProc) -> Iterator[Page]:
    daemon.post("/gpu/release-all")
    t = Page(browser, daemon)
    yield t
    t.close()
    assert not t.unexpected(), f"console errors: {t.errors}"


def test_it_renders_and_follows_a_phase_prepared_elsewhere(tab: Page) -> None:
    from playwright.sync_api import expect

    expect(tab.page.locator("#services-table tbody tr")).to_have_count(4)
    expect(tab.page.locator("#live")).to_have_text("live", timeout=5_000)
    tab.page.evaluate("window.__same_page = true")  # gone if the page reloaded
    assert tab.d.post("/gpu/prepare-phase/2").status_code == 200
    expect(tab.state("vidi")).to_have_text("ready", timeout=2_000)
    expect(tab.page.locator('li[data-phase="2"] .pill')).to_have_text("current", timeout=2_000)
    expect(tab.page.locator("#ops-body article").first).to_contain_text("PreparePhase 2",
                                                                        timeout=2_000)
    expect(tab.page.locator("#event-log")).to_contain_text("vidi")
    assert tab.page.evaluate("window.__same_page") is True
    # the VRAM bar has vidi's measured share
    expect(tab.page.locator(".bar .seg").first).to_have_attribute("title", "vidi: 3.9 GB")


def test_pressing_prepare_runs_the_phase(tab: Page) -> None:
    from playwright.sync_api import expect

    tab.page.locator('button[data-preview="3"]').click()
    expect(tab.page.locator("#preview")).to_contain_text("needed by phase 3", timeout=5_000)
    expect(tab.page.locator("#preview")).to_contain_text("cosyvoice")
    assert tab.d.status()["phase"] != 3  # a preview changes nothing
    tab.page.locator('button[data-prepare="3"]').click()
    expect(tab.state("cosyvoice")).to_have_text("ready", timeout=10_000)
    expect(tab.page.locator("#notice")).to_contain_text("Prepare phase 3: done")
    assert tab.d.status()["phase"] == 3


def test_a_refused_start_shows_its_blockers(tab: Page) -> None:
    from playwright.sync_api import expect

    assert tab.d.post("/gpu/prepare-phase/4").status_code == 200  # comfyui, priority 100
    expect(tab.state("comfyui")).to_have_text("ready", timeout=5_000)
    tab.expected.add(409)
    tab.row("ollama").locator('button[data-action="start"]').click()
    notice = tab.page.locator("#notice")
    expect(notice).to_contain_text("insufficient_vram", timeout=5_000)
    expect(notice).to_contain_text("Blocked by comfyui")
    expect(notice).to_contain_text("Short by")
    assert tab.d.states()["ollama"] == "stopped"


def test_history_and_page_headers(daemon: DaemonProc) -> None:
    wait_for(lambda: len(daemon.get("/gpu/history").json()["samples"]) >= 2, 10,
             "two history samples")
    body = daemon.get("/gpu/history").json()
    sample = body["samples"][-1]
    assert body["interval_s"] == 1.0 and body["keep"] == 900
    assert sample["total_mb"] == 24576 and isinstance(sample["services"], dict)
    later = daemon.get("/gpu/history", params={"since": sample["at"]}).json()["samples"]
    assert all(s["at"] > sample["at"] for s in later)
    page = daemon.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert daemon.get("/ui/vendor/uplot/LICENSE").status_code == 200
    # No other site may frame the page (and trick an operator into pressing its buttons),
    # whichever address it is loaded from.
    for path in ("/", "/ui/index.html", "/docs", "/gpu/status"):
        answer = daemon.get(path)
        assert answer.headers["x-frame-options"] == "DENY", path
        assert answer.headers["x-content-type-options"] == "nosniff", path
    assert "frame-ancestors 'none'" in daemon.get("/ui/index.html").headers[
        "content-security-policy"]


def test_with_a_token_the_page_is_read_only_until_given_it(browser: Any,
                                                          tmp_path: Path) -> None:
    from playwright.sync_api import expect

    d = DaemonProc(tmp_path, token=TOKEN).start()
    tab = Page(browser, d)
    try:
        start = tab.row("vidi").locator('button[data-action="start"]')
        expect(start).to_be_disabled()
        expect(tab.page.locator('button[data-prepare="2"]')).to_be_disabled()
        # the daemon itself refuses the page's call without the token
        refused = tab.page.evaluate(
            "fetch('/gpu/service/vidi/start', {method: 'POST'}).then(r => r.status)")
        assert refused == 401
        tab.page.locator("#token-button").click()
        tab.page.locator("#token-input").fill(TOKEN)
        tab.page.locator("#token-form button[type=submit]").click()
        expect(start).to_be_enabled()
        start.click()
        expect(tab.state("vidi")).to_have_text("ready", timeout=10_000)
        assert d.states()["vidi"] == "ready"
        assert tab.page.evaluate("sessionStorage.getItem('gpu-manager-token')") == TOKEN
        tab.expected.add(401)  # the refusal above, which the browser logs
        assert not tab.unexpected(), tab.errors
    finally:
        tab.close()
        d.close()


def test_status_shows_the_acquires_waiting_for_room(daemon: DaemonProc) -> None:
    import threading

    daemon.post("/gpu/release-all")
    first = daemon.post("/gpu/acquire", json={"session_id": "holder", "requester": "a",
                                              "ttl_s": 60})  # the whole budget
    assert first.json()["success"], first.text
    answer: dict[str, Any] = {}

    def second() -> None:
        answer.update(daemon.post("/gpu/acquire", json={
            "session_id": "waiter", "requester": "b", "vram_mb": 1000, "priority": 2,
            "timeout_ms": 20_000}).json())

    t = threading.Thread(target=second, daemon=True)
    t.start()
    try:
        wait_for(lambda: daemon.status()["waiting"] == ["waiter"], 10, "the waiter listed")
    finally:
        daemon.post("/gpu/release", json={"session_id": "holder"})
    t.join(20)
    assert answer.get("success"), answer
    assert daemon.status()["waiting"] == []
    daemon.post("/gpu/release", json={"session_id": "waiter"})


def test_history_keeps_one_sample_per_time() -> None:
    # A stalled probe repeats its snapshot's time; a second sample of it would be served
    # twice or never by `?since=`.
    import dataclasses

    from gpu_manager.probe.history import History, Sample

    def at(t: float) -> Sample:
        return Sample(t, 0, 100, 10, 0, {}, None, None)

    h = History(keep=3)
    assert h.add(at(1.0)) and h.add(at(2.0))
    assert not h.add(at(2.0)) and not h.add(at(1.5))
    assert h.add(at(3.0)) and h.add(at(4.0))
    assert [s.at for s in h.since()] == [2.0, 3.0, 4.0]
    assert [s.at for s in h.since(2.0)] == [3.0, 4.0]
    # each card keeps its own samples: one card's time does not hold back another's
    other = dataclasses.replace(at(4.0), device=1)
    assert h.add(other) and not h.add(other)
    assert [(s.at, s.device) for s in h.since(3.0)] == [(4.0, 0), (4.0, 1)]
    assert [s.device for s in h.since(device=1)] == [1]


def test_one_bar_per_card_and_the_cards_in_tables(browser: Any, tmp_path: Path) -> None:
    """On two simulated cards: a bar for each, a pinned service's share on its own card,
    the services table's GPU column, and the operation's step "on GPU 1"."""
    from playwright.sync_api import expect

    from tests.test_multi_gpu import inventory

    d = DaemonProc(tmp_path)
    inventory(tmp_path)
    d.start()
    tab = Page(browser, d)
    try:
        bars = tab.page.locator("#gpu-body .bar")
        expect(bars).to_have_count(2)
        expect(tab.page.locator('#gpu-body .card[data-gpu="1"] .card-label')).to_contain_text(
            "GPU 1")
        pin = tab.row("pin").locator('td[data-label="GPU"]')
        expect(pin).to_contain_text("pin 1")
        expect(tab.row("tp").locator('td[data-label="GPU"]')).to_contain_text("\u00d72")  # times 2
        assert d.post("/gpu/prepare-phase/2").status_code == 200  # pin, on card 1
        expect(tab.state("pin")).to_have_text("ready", timeout=10_000)
        expect(pin).to_contain_text("1")
        expect(tab.page.locator('.bar[data-gpu="1"] .seg').first).to_have_attribute(
            "title", "pin: 5.9 GB", timeout=5_000)
        expect(tab.page.locator('.bar[data-gpu="0"] .seg[title^="pin"]')).to_have_count(0)
        expect(tab.page.locator("#ops-body article").first).to_contain_text(
            "start pin on GPU 1", timeout=5_000)
        # the chart draws a line per card, from a history kept per card
        legend = tab.page.locator("#chart .u-legend")
        expect(legend).to_contain_text("GPU 0 used", timeout=5_000)
        expect(legend).to_contain_text("GPU 1 used")
        wait_for(lambda: d.get("/gpu/history", params={"device": 1}).json()["samples"], 10,
                 "a sample of card 1")
        ones = d.get("/gpu/history", params={"device": 1}).json()["samples"]
        assert {x["device"] for x in ones} == {1} and ones[-1]["total_mb"] == 24576
        both = d.get("/gpu/history").json()["samples"]
        assert {x["device"] for x in both} == {0, 1}
        wait_for(lambda: any(x["services"].get("pin") for x in
                             d.get("/gpu/history", params={"device": 1}).json()["samples"]),
                 10, "pin's memory in card 1's history")
        assert not any(x["services"].get("pin") for x in
                       d.get("/gpu/history", params={"device": 0}).json()["samples"])
        assert not tab.unexpected(), tab.errors
    finally:
        tab.close()
        d.close()


def test_a_single_card_has_a_single_bar(tab: Page) -> None:
    from playwright.sync_api import expect

    expect(tab.page.locator("#gpu-body .bar")).to_have_count(1)
    expect(tab.page.locator("#gpu-body .card-label")).to_contain_text("GPU 0")
    cell = tab.row("vidi").locator('td[data-label="GPU"]')
    expect(cell).to_have_text("any")  # stopped, not pinned
    expect(cell.locator(".gpu-cell")).to_have_attribute("title", "not placed; may use any card")


def test_a_served_service_shows_its_requests(browser: Any, tmp_path: Path) -> None:
    """The Requests cell: what the front door counts for a service with `serve:`."""
    from tests.support.env import free_port
    from tests.support.served import served

    d = DaemonProc(tmp_path, extra_services=served("llm-a", free_port(), "model-a")).start()
    try:
        r = d.post("/v1/chat/completions", json={
            "model": "model-a", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 1})
        assert r.status_code == 200, r.text
        t = Page(browser, d)
        try:
            cell = t.row("llm-a").locator('td[data-label="Requests"]')
            wait_for(lambda: "1 started by requests" in cell.inner_text(), 15,
                     "the request-caused start on the page")
            assert "0 in flight" in cell.inner_text()
            # what its start cost (learned)
            costs = t.row("llm-a").locator('td[data-label="Costs"]')
            wait_for(lambda: "start " in costs.inner_text(), 15, "the learned start cost")
            assert "Host RAM held by sleepers" in t.page.locator("#gpu-body").inner_text()
            assert t.row("vidi").locator('td[data-label="Requests"]').inner_text() == "\u2013"
            assert not t.unexpected(), t.errors
        finally:
            t.close()
    finally:
        d.close()
