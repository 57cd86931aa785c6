"""The training service sleeps by checkpointing its run and wakes by resuming it (issue 12).

Real processes throughout: the service (examples/training_service/app.py) on the simulated
GPU, alone and then managed by the daemon, which puts it to sleep for a higher-priority
service and wakes it afterwards. A preempted run must lose no finished epoch and count none
twice: its per-epoch history is 0..N-1 exactly once, and its losses are those of the same run
trained without interruption (so the weights, optimizer and shuffling RNG all came back).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpu_manager.sim.registry import SimRegistry
from tests.support.daemon import ROOT, DaemonProc
from tests.support.env import free_port, wait_for

APP = ROOT / "examples" / "training_service" / "app.py"
TOTAL_MB = 24576
# shuffled minibatches (the RNG must come back too), paced so that the run takes ~3 s
RUN = {"epochs": 60, "batch_size": 200, "epoch_delay_s": 0.05, "seed": 3}


class Training:
    """The training service as a real process on the simulated GPU in `sim`."""

    def __init__(self, tmp: Path, sim: Path, *extra: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.ckpt = tmp / "checkpoints"
        self.log = tmp / "training.log"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(APP), "--port", str(self.port),
                 "--checkpoint-dir", str(self.ckpt), *extra],
                env={**os.environ, "GPU_MANAGER_SIM_DIR": str(sim)}, cwd=ROOT,
                stdout=log, stderr=subprocess.STDOUT)
        self.client = httpx.Client(base_url=self.base, timeout=30, trust_env=False)
        wait_for(self._up, 30, f"the training service on {self.base}")

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"exited {self.proc.returncode}: {self.log.read_text()}")
        try:
            return self.client.get("/health").status_code == 200
        except httpx.TransportError:
            return False

    def close(self) -> None:
        self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def status(base: str, sid: str) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{base}/training/status/{sid}", trust_env=False).json()
    return body


def start_run(base: str, body: dict[str, Any]) -> str:
    r = httpx.post(f"{base}/training/start", json=body, trust_env=False)
    assert r.status_code == 200, r.text
    return str(r.json()["session_id"])


def finish(base: str, sid: str, timeout: float = 30) -> dict[str, Any]:
    wait_for(lambda: status(base, sid)["status"] not in ("running", "sleeping"), timeout,
             f"session {sid} to finish")
    st = status(base, sid)
    assert st["status"] == "completed", st
    return st


def assert_every_epoch_once(st: dict[str, Any], epochs: int) -> None:
    assert [h["epoch"] for h in st["history"]] == list(range(epochs))
    assert st["epoch"] == epochs and st["progress"] == 1.0


def stays(cond: Callable[[], bool], seconds: float, what: str) -> None:
    """`cond` holds throughout a short observation window (a thing that must not change)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert cond(), what
        time.sleep(0.02)


def held_mb(registry: SimRegistry, pid: int) -> int | None:
    return next((r.mb for r in registry.active() if r.pid == pid), None)


@pytest.fixture
def registry(tmp_path: Path) -> SimRegistry:
    reg = SimRegistry(tmp_path / "sim")
    reg.write_gpu(TOTAL_MB, 0, 0)  # a GPU to refuse allocations against
    return reg


def test_a_run_put_to_sleep_resumes_from_its_checkpoint_losing_no_epoch(
        tmp_path: Path, registry: SimRegistry) -> None:
    t = Training(tmp_path, registry.root, "--sim-vram-mb", "6000")
    try:
        base, pid = t.base, t.proc.pid
        assert held_mb(registry, pid) == 6000
        sid = start_run(base, RUN)
        wait_for(lambda: status(base, sid)["epoch"] >= 5, 20, "a few epochs")

        r = t.client.post("/training/sleep")
        assert r.status_code == 200, r.text
        slept = r.json()
        assert slept["asleep"] is True and slept["session_id"] == sid
        epoch = slept["epoch"]
        assert 5 <= epoch < RUN["epochs"]
        assert Path(slept["checkpoint"]).is_file()
        st = status(base, sid)
        assert st["status"] == "sleeping" and st["checkpoint"] == slept["checkpoint"]
        assert [h["epoch"] for h in st["history"]] == list(range(epoch))
        assert held_mb(registry, pid) == 0  # the model is off the (simulated) GPU
        stays(lambda: status(base, sid)["epoch"] == epoch, 0.3, "no training while asleep")
        assert t.client.get("/training/sleeping").json()["asleep"] is True
        health = t.client.get("/health")
        assert health.status_code == 200 and health.json()["asleep"] is True
        refused = t.client.post("/training/start", json={})
        assert refused.status_code == 409 and refused.json()["error"] == "asleep"
        again = t.client.post("/training/sleep")  # idempotent
        assert again.status_code == 200 and again.json() == slept

        # a wake that does not fit fails like CUDA, and the run stays asleep, intact
        registry.set_foreign(TOTAL_MB - 1000)
        oom = t.client.post("/training/wake")
        assert oom.status_code == 503 and "out of memory" in oom.json()["detail"]
        assert t.client.get("/training/sleeping").json()["asleep"] is True
        assert status(base, sid)["status"] == "sleeping" and held_mb(registry, pid) == 0
        registry.set_foreign(0)

        woke = t.client.post("/training/wake")
        assert woke.status_code == 200, woke.text
        assert woke.json() == {"asleep": False, "session_id": sid, "epoch": epoch,
                               "resumed_from": slept["checkpoint"]}
        assert held_mb(registry, pid) == 6000
        assert t.client.post("/training/wake").json()["asleep"] is False  # idempotent
        done = finish(base, sid)
        assert_every_epoch_once(done, RUN["epochs"])
        assert done["sleeps"] == 1 and done["accuracy"] > 0.8
        assert not Path(slept["checkpoint"]).exists()  # cleaned up with the run

        # the same run, never interrupted, computes exactly the same losses
        ref = finish(base, start_run(base, {**RUN, "epoch_delay_s": 0}))
        assert [h["loss"] for h in done["history"]] == pytest.approx(
            [h["loss"] for h in ref["history"]], rel=1e-6, abs=0)
        assert done["accuracy"] == ref["accuracy"]
    finally:
        t.close()


def test_idle_sleep_frees_to_the_residual_and_a_sleeping_run_can_be_stopped(
        tmp_path: Path, registry: SimRegistry) -> None:
    t = Training(tmp_path, registry.root, "--sim-vram-mb", "6000", "--sim-residual-mb", "500")
    try:
        pid = t.proc.pid
        idle = t.client.post("/training/sleep").json()
        assert idle == {"asleep": True, "session_id": None, "epoch": None, "checkpoint": None}
        assert held_mb(registry, pid) == 500
        assert t.client.post("/training/wake").json()["asleep"] is False
        assert held_mb(registry, pid) == 6000

        sid = start_run(t.base, RUN)
        wait_for(lambda: status(t.base, sid)["epoch"] >= 1, 20, "an epoch")
        ckpt = Path(t.client.post("/training/sleep").json()["checkpoint"])
        assert ckpt.is_file()
        stopped = t.client.post("/training/stop", json={"session_id": sid}).json()
        assert stopped["status"] == "stopped" and not ckpt.exists()
        woke = t.client.post("/training/wake").json()  # nothing left to resume
        assert woke["asleep"] is False and woke["session_id"] is None
        assert status(t.base, sid)["status"] == "stopped"
        assert_every_epoch_once(finish(t.base, start_run(t.base, {"epochs": 5})), 5)
    finally:
        t.close()


def training_service(port: int, ckpt: Path) -> str:
    return f"""
  training:
    type: native
    vram_mb: 6000
    priority: 60
    command: ["{{python}}", "examples/training_service/app.py", "--port", "{port}",
              "--checkpoint-dir", "{ckpt}", "--sim-vram-mb", "6000"]
    cwd: {ROOT}
    health: {{url: "http://127.0.0.1:{port}/health", interval_s: 0.5}}
    sleep:
      api: http
      url: http://127.0.0.1:{port}
      sleep: {{method: POST, path: /training/sleep}}
      wake: {{method: POST, path: /training/wake}}
      asleep: {{path: /training/sleeping, field: asleep, equals: true}}
      residual_mb: 0
      timeout_s: 30
      wake_timeout_s: 60
"""


def test_the_daemon_sleeps_a_training_run_for_a_higher_priority_service_and_resumes_it(
        tmp_path: Path) -> None:
    port = free_port()
    d = DaemonProc(tmp_path, extra_services=training_service(port, tmp_path / "ckpt")).start()
    base = f"http://127.0.0.1:{port}"
    try:
        assert d.post("/gpu/service/training/start").status_code == 200
        pid = d.status()["services"]["training"]["pids"][0]
        registry = SimRegistry(d.sim_dir)
        assert held_mb(registry, pid) == 6000
        sid = start_run(base, {**RUN, "epochs": 100})
        wait_for(lambda: status(base, sid)["epoch"] >= 5, 20, "a few epochs")

        # comfyui (20000 MB, priority 100) does not fit beside training (6000): it sleeps
        r = d.post("/gpu/service/comfyui/start")
        assert r.status_code == 200, r.text
        steps = {s["service"]: s for s in r.json()["plan"]["steps"]}
        assert steps["training"]["action"] == "sleep", steps
        assert d.states()["training"] == "sleeping" and d.states()["comfyui"] == "ready"
        assert d.status()["sleeping"] == ["training"]
        assert d.status()["services"]["training"]["pids"] == [pid]  # the same process
        st = status(base, sid)
        assert st["status"] == "sleeping" and 5 <= st["epoch"] < 100
        assert held_mb(registry, pid) == 0

        assert d.post("/gpu/service/comfyui/stop").status_code == 200
        r = d.post("/gpu/service/training/start")  # wakes it: the run resumes
        assert r.status_code == 200, r.text
        steps = {s["service"]: s for s in r.json()["plan"]["steps"]}
        assert steps["training"]["action"] == "wake", steps
        assert d.states()["training"] == "ready"
        assert d.status()["services"]["training"]["pids"] == [pid]  # woken, not restarted
        assert held_mb(registry, pid) == 6000
        done = finish(base, sid)
        assert_every_epoch_once(done, 100)
        assert done["sleeps"] == 1 and done["accuracy"] > 0.8
    finally:
        d.close()
