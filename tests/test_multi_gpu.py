"""Several GPUs end to end: the real daemon on two simulated 24 GB cards, real stand-in
processes that register on the card CUDA_VISIBLE_DEVICES names. Placement without
preemption, preemption on the cheapest card only, what each child is handed, pins, a
two-card service, leases per card, and adoption after `kill -9` keeping the cards."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from gpu_manager.sim.registry import SimRegistry
from tests.support.daemon import DaemonProc
from tests.support.env import free_port, wait_for

pytestmark = pytest.mark.timeout(300)


def service(name: str, mb: int, priority: int, extra: str = "") -> str:
    port = free_port()
    return f"""
  {name}:
    type: native
    vram_mb: {mb}
    priority: {priority}
    command: ["{{python}}", "-m", "gpu_manager.sim.workload", "--name", "{name}",
              "--vram-mb", "{mb}", "--port", "{port}"]
    health: {{url: "http://127.0.0.1:{port}/health", timeout_s: 2, interval_s: 5}}
    start_timeout_s: 30
    stop_timeout_s: 10{extra}
"""


def inventory(tmp: Path, placement: str = "best_fit") -> None:
    services = "".join([
        service("a", 20000, 5), service("b", 20000, 1), service("c", 20000, 3),
        service("pin", 6000, 9, "\n    device: 1"),
        service("tp", 10000, 2, "\n    gpus: 2"),
    ])
    (tmp / "config" / "services.yaml").write_text(f"""
gpu:
  backend: simulated
  release_delay_ms: 100
  poll_interval_s: 0.2
  placement: {placement}
  devices:
    - {{total_mb: 24576, reserve_mb: 1024}}
    - {{total_mb: 24576}}
services:{services}""")
    (tmp / "config" / "phases.yaml").write_text("""
phases:
  1: {name: both, services: [a, b]}
  2: {name: pinned, services: [pin]}
""")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProc]:
    d = DaemonProc(tmp_path)
    inventory(tmp_path)
    d.start()
    yield d
    d.close()


def start(d: DaemonProc, name: str) -> dict[str, Any]:
    answer = d.post(f"/gpu/service/{name}/start")
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def child_cards(d: DaemonProc, name: str) -> tuple[str, ...]:
    """What the service's process was handed, read from its environment."""
    pids = d.status()["services"][name]["pids"]
    assert pids, f"{name} has no pid"
    env = psutil.Process(pids[0]).environ()
    assert env.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID"
    return tuple(env["CUDA_VISIBLE_DEVICES"].split(","))


def registered_on(d: DaemonProc, name: str) -> set[int]:
    return {dev for r in SimRegistry(d.sim_dir).active() if r.name == name for dev in r.devices}


def test_placement_preemption_handoff_and_pins(daemon: DaemonProc) -> None:
    d = daemon
    start(d, "a")
    start(d, "b")
    status = d.status()
    cards = {n: status["services"][n]["devices"] for n in ("a", "b")}
    assert sorted(cards.values()) == [[0], [1]], cards  # both run: nothing was preempted
    assert {n: s["state"] for n, s in status["services"].items() if n in "ab"} == {
        "a": "ready", "b": "ready"}
    uuids = {g["index"]: g["uuid"] for g in status["gpus"]}
    for n in ("a", "b"):
        # the child was told its card by UUID, and its memory landed there
        assert child_cards(d, n) == (uuids[cards[n][0]],)
        assert registered_on(d, n) == set(cards[n])
        gpu = status["gpus"][cards[n][0]]
        assert gpu["services"][n] == 20000
    # c (priority 3) preempts b (priority 1), on b's card only; a is untouched
    op = start(d, "c")
    steps = [(s["action"], s["service"]) for s in op["plan"]["steps"]]
    assert steps == [("stop", "b"), ("start", "c")], steps
    status = d.status()
    assert status["services"]["c"]["devices"] == cards["b"]
    assert status["services"]["a"]["state"] == "ready"
    assert status["services"]["b"]["state"] == "stopped"
    assert registered_on(d, "c") == set(cards["b"])
    # pinned to card 1: it goes there whatever is cheaper, preempting only there
    pinned = start(d, "pin")
    assert status["services"]["pin"]["allowed_devices"] == [1]
    assert d.status()["services"]["pin"]["devices"] == [1]
    assert child_cards(d, "pin") == (uuids[1],)
    victims = [s["service"] for s in pinned["plan"]["steps"] if s["action"] == "stop"]
    on_one = [n for n in ("a", "c") if d.status()["services"][n]["devices"] == [1]]
    assert victims == on_one, (victims, on_one)


def test_a_two_card_service_gets_two_cards_or_a_refusal_that_says_why(
        daemon: DaemonProc) -> None:
    d = daemon
    start(d, "a")  # priority 5: tp (priority 2) cannot preempt it
    refused = d.post("/gpu/service/tp/start")
    assert refused.status_code == 409, refused.text
    body = refused.json()
    assert "needs 2 cards" in body["detail"] and body["blockers"], body
    assert {b["name"] for b in body["blockers"]} == {"a"}
    assert {b["device"] for b in body["blockers"]} == set(d.status()["services"]["a"]["devices"])
    d.post("/gpu/service/a/stop")
    start(d, "tp")
    status = d.status()
    assert status["services"]["tp"]["devices"] == [0, 1]
    uuids = [g["uuid"] for g in status["gpus"]]
    assert child_cards(d, "tp") == tuple(uuids)
    assert registered_on(d, "tp") == {0, 1}
    assert [g["services"].get("tp") for g in status["gpus"]] == [10000, 10000]
    exe = Path(sys.executable).with_name("gpu-manager")
    shown = subprocess.run([str(exe), "status", "--url", d.url], capture_output=True,
                           text=True, timeout=30, check=True,
                           env={**os.environ, "COLUMNS": "200"}).stdout
    assert "GPU" in shown and "0,1" in shown, shown  # the CLI shows the cards
    assert "tp 10000" in shown, shown
    metrics = d.get("/metrics").text
    for card in (0, 1):  # the card is a label of what the service holds
        want = re.compile(r'^gpu_manager_service_vram_measured_bytes\{(?=.*device="'
                          + str(card) + r'")(?=.*service="tp")[^}]*\} (\S+)$', re.M)
        found = want.search(metrics)
        assert found is not None and float(found.group(1)) == 10000 * 1024 * 1024, metrics


def test_leases_per_card(daemon: DaemonProc) -> None:
    d = daemon
    start(d, "a")
    a_on = d.status()["services"]["a"]["devices"][0]
    other = 1 - a_on
    # any card: the one where it fits without preempting a
    got = d.post("/gpu/acquire", json={"session_id": "l1", "requester": "t", "vram_mb": 8000,
                                       "priority": 2}).json()
    assert got["success"] and got["device"] == other, got
    uuids = {g["index"]: g["uuid"] for g in d.status()["gpus"]}
    assert got["cuda_visible_devices"] == uuids[other]
    assert d.status()["leases"][0]["devices"] == [other]
    # a named card that does not exist: a clear refusal
    bad = d.post("/gpu/acquire", json={"session_id": "l2", "requester": "t", "vram_mb": 10,
                                       "device": 7})
    assert bad.status_code == 422 and "device 7 is not managed" in str(bad.json()["detail"])
    d.post("/gpu/release", json={"session_id": "l1"})
    # the GPUClient asks for a card and learns what to hand CUDA
    from gpu_manager.client import GPUClient

    async def client_on(card: int) -> str | None:
        client = GPUClient(d.url, timeout_seconds=5, vram_mb=1000, device=card,
                           fallback_to_cpu=False)
        got = await client.request_gpu("probe")
        assert got.acquired, got
        seen = client.cuda_visible_devices
        await client.release_gpu()
        return seen

    assert asyncio.run(client_on(a_on)) == uuids[a_on]


def test_adoption_after_kill_9_keeps_the_cards(daemon: DaemonProc) -> None:
    d = daemon
    start(d, "pin")
    start(d, "tp")
    before = {n: (s["devices"], s["pids"]) for n, s in d.status()["services"].items()
              if n in ("pin", "tp")}
    assert d.proc is not None
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(10)
    d.start()
    wait_for(lambda: all(d.status()["services"][n]["state"] == "ready" for n in before), 20,
             "the services adopted")
    after = {n: (s["devices"], s["pids"]) for n, s in d.status()["services"].items()
             if n in before}
    assert after == before
    # and the planner counts them where they are: a 20 GB start must go to neither card
    # without preempting (tp holds 10 GB of each)
    answer = d.post("/gpu/service/c/start")
    assert answer.status_code == 200, answer.text
    stops = [s["service"] for s in answer.json()["plan"]["steps"] if s["action"] == "stop"]
    assert stops == ["tp"], stops


async def test_a_restart_by_policy_goes_only_where_the_plan_would_put_it(
        tmp_path: Path) -> None:
    # In-process, on the real daemon parts: a restart by policy relaunches on the cards the
    # service ran on (no executor places it), so the gate lets it go only when the plan
    # would put it there; a card filled meanwhile must not get it on top.
    from gpu_manager.daemon import Daemon
    from gpu_manager.orchestrator.operations import Operation
    from gpu_manager.planner import StartService, StopAll
    from gpu_manager.settings import Settings

    (tmp_path / "config").mkdir()
    inventory(tmp_path)
    d = Daemon(Settings(config_dir=tmp_path / "config", state_dir=tmp_path / "state"))
    await d.start()
    try:
        orch = d.orchestrator
        await orch.execute(Operation(StartService("a")))  # 20 GB, to card 0 (best fit)
        assert d.units["a"].devices == (0,)
        await orch.refresh_pids()
        crashed = d.units["c"]  # as if it had run on card 0 and crashed since
        crashed.devices = (0,)
        assert await orch.restart_gate("c") is False  # it would land on a's card
        crashed.devices = (1,)
        assert await orch.restart_gate("c") is True  # its card has room: it may go
    finally:
        await d.orchestrator.execute(Operation(StopAll()))  # the stand-ins go with the test
        await d.stop()


async def test_one_gpu_hands_no_cards_even_to_a_unit_that_had_some(tmp_path: Path) -> None:
    # A unit adopted from a several-GPU record, now on a one-GPU inventory: its next launch
    # gets no CUDA_VISIBLE_DEVICES (one card: the service finds its own, as before).
    from gpu_manager.daemon import Daemon
    from gpu_manager.orchestrator.operations import Operation
    from gpu_manager.planner import StartService, StopAll
    from gpu_manager.settings import Settings
    from tests.support.daemon import write_inventory

    write_inventory(tmp_path / "config")
    d = Daemon(Settings(config_dir=tmp_path / "config", state_dir=tmp_path / "state"))
    await d.start()
    try:
        unit = d.units["vidi"]
        unit.devices, unit.visible = (1,), ("GPU-simulated-1",)
        await d.orchestrator.execute(Operation(StartService("vidi")))
        await d.orchestrator.refresh_pids()
        pids = d.orchestrator.ledger.view().unit_pids["vidi"]
        assert unit.devices == () and pids
        assert "CUDA_VISIBLE_DEVICES" not in psutil.Process(pids[0]).environ()
    finally:
        await d.orchestrator.execute(Operation(StopAll()))  # the stand-in goes with the test
        await d.stop()


def test_a_two_card_sleeper_keeps_its_residual_on_each_card(tmp_path: Path) -> None:
    # residual_mb is per card: 800 MB left on each of two cards is within 1000 (the sum,
    # 1600, used to be compared with it, and the sleeper was stopped instead, then taken
    # for awake by the pid refresh)
    port = free_port()
    (tmp_path / "config").mkdir()
    d = DaemonProc(tmp_path)
    (tmp_path / "config" / "services.yaml").write_text(f"""
gpu:
  backend: simulated
  release_delay_ms: 100
  poll_interval_s: 0.2
  devices:
    - {{total_mb: 24576, reserve_mb: 1024}}
    - {{total_mb: 24576}}
services:
  tp:
    type: native
    vram_mb: 6000
    priority: 5
    gpus: 2
    command: ["{{python}}", "-m", "gpu_manager.sim.workload", "--name", "tp", "--vram-mb",
              "6000", "--port", "{port}", "--api", "vllm", "--sleep-vram-mb", "800"]
    health: {{url: "http://127.0.0.1:{port}/health", timeout_s: 2, interval_s: 5}}
    sleep: {{api: vllm, url: "http://127.0.0.1:{port}", residual_mb: 1000, timeout_s: 5}}
    start_timeout_s: 30
    stop_timeout_s: 10
""")
    (tmp_path / "config" / "phases.yaml").write_text("phases: {}\n")
    d.start()
    try:
        assert d.post("/gpu/service/tp/start").status_code == 200
        assert registered_on(d, "tp") == {0, 1}
        slept = d.post("/gpu/service/tp/sleep")
        assert slept.status_code == 200, slept.text
        step = slept.json()["plan"]["steps"][0]
        assert step["action"] == "sleep" and "stopped instead" not in (step["detail"] or "")
        assert "1600 MB left" in step["detail"], step
        # The woke check runs at every pid refresh (each second) on the latest snapshot: once
        # the status measures the sleeper (1600 MB, 800 a card), it must stay asleep through
        # the refreshes that follow (an absence: watched over two refresh periods).
        wait_for(lambda: d.status()["services"]["tp"]["measured_mb"] == 1600, 10,
                 "the sleeper measured after its sleep")
        until_t = time.monotonic() + 2.2
        while time.monotonic() < until_t:
            assert d.states()["tp"] == "sleeping", "taken for awake"
            time.sleep(0.1)
        woken = d.post("/gpu/service/tp/start")
        assert [s["action"] for s in woken.json()["plan"]["steps"]] == ["wake"]
    finally:
        d.close()
