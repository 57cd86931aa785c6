"""Run the real daemon as a subprocess (`gpu-manager serve`) on a generated inventory."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from gpu_manager.sim.registry import Registration, SimRegistry
from gpu_manager.units.drivers.native import MARKER_ENV
from tests.support.env import free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent.parent
REFERENCE_PORTS = ("18188", "18150", "18099", "18134")


def write_inventory(dest: Path, extra_services: str = "", extra_phases: str = "",
                    replace: dict[str, str] | None = None) -> None:
    """The root inventory with fresh ports (and optional additions) into `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    services = (ROOT / "services.yaml").read_text()
    for port in REFERENCE_PORTS:
        services = services.replace(port, str(free_port()))
    for old, new in (replace or {}).items():
        assert old in services, old
        services = services.replace(old, new)
    (dest / "services.yaml").write_text(services + extra_services)
    (dest / "phases.yaml").write_text((ROOT / "phases.yaml").read_text() + extra_phases)


class Sampler:
    """Samples the simulated GPU from outside the daemon, every few ms, in a thread."""

    def __init__(self, sim_dir: Path, total_mb: int) -> None:
        self.registry = SimRegistry(sim_dir)
        self.total_mb = total_mb
        self.max_used = 0
        self.samples = 0
        self.seen: dict[int, Registration] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            regs = self.registry.active() if self.registry.procs.exists() else []
            used = sum(r.mb for r in regs) + sum(self.registry.foreign().values())
            self.max_used = max(self.max_used, used)
            for r in regs:
                self.seen[r.pid] = r
            self.samples += 1
            time.sleep(0.005)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def by_name(self, name: str) -> list[Registration]:
        return [r for r in self.seen.values() if r.name == name]


# cosyvoice takes 1.5 s to shut down: room to act in the middle of a transition
SLOW_COSYVOICE = {'"--vram-mb", "4000", "--port"':
                  '"--vram-mb", "4000", "--stop-s", "1.5", "--port"'}


def preempt_in_background(d: DaemonProc) -> tuple[threading.Thread, dict[str, Any]]:
    """With cosyvoice running, start comfyui (a preemption) on a thread; return once the
    stop step is under way. `result["r"]` holds the answer once the thread is done."""
    assert d.post("/gpu/service/cosyvoice/start").status_code == 200
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(
        r=d.post("/gpu/service/comfyui/start")))
    thread.start()
    wait_for(lambda: d.states()["cosyvoice"] == "stopping", 10, "the stop step")
    return thread, result


class DaemonProc:
    def __init__(self, tmp: Path, *, redis_url: str | None = None, token: str | None = None,
                 extra_services: str = "", extra_phases: str = "",
                 env: dict[str, str] | None = None,
                 replace: dict[str, str] | None = None) -> None:
        self.config_dir = tmp / "config"
        self.state_dir = tmp / "state"
        self.sim_dir = self.state_dir / "sim"
        write_inventory(self.config_dir, extra_services, extra_phases, replace)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "GPU_MANAGER_CONFIG_DIR": str(self.config_dir),
                    "GPU_MANAGER_STATE_DIR": str(self.state_dir),
                    "GPU_MANAGER_PORT": str(self.port), "GPU_MANAGER_LOG_LEVEL": "INFO",
                    **(env or {})}
        self.env.pop("GPU_MANAGER_REDIS_URL", None)
        self.env.pop("GPU_MANAGER_TOKEN", None)
        if redis_url:
            self.env["GPU_MANAGER_REDIS_URL"] = redis_url
        if token:
            self.env["GPU_MANAGER_TOKEN"] = token
        self.log = tmp / "daemon.log"
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = httpx.Client(base_url=self.url, timeout=120, trust_env=False,
                                   headers=self.headers)

    def start(self) -> DaemonProc:
        exe = Path(sys.executable).with_name("gpu-manager")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([str(exe), "serve"], env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT)
        wait_for(self._ready, 30, f"the daemon on {self.url} (log: {self.log})")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log_text()}")
        try:
            return self.client.get("/ready").status_code == 200
        except httpx.TransportError:
            return False

    def log_text(self) -> str:
        return self.log.read_text()[-5000:] if self.log.exists() else ""

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.client.get(path, **kw)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return self.client.post(path, **kw)

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = self.get("/gpu/status").json()
        return body

    def states(self) -> dict[str, str]:
        return {n: s["state"] for n, s in self.status()["services"].items()}

    def kill(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)

    def close(self) -> None:
        """Stop services (via the API when possible), the daemon, and any leftovers."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                self.post("/gpu/release-all")
        self.kill()
        self.client.close()
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                env = proc.environ()
                if env.get(MARKER_ENV) and str(self.state_dir) in env.get(
                        "GPU_MANAGER_SIM_DIR", ""):
                    proc.kill()
