"""Start stand-in workloads as real processes for tests."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tests.support.env import free_port, wait_for


def health_status(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return None


class Workload:
    def __init__(self, sim_dir: Path, mb: int, *extra: str, name: str = "w",
                 port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpu_manager.sim.workload", "--vram-mb", str(mb),
             "--port", str(self.port), "--name", name, *extra],
            env={**os.environ, "GPU_MANAGER_SIM_DIR": str(sim_dir)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.pid = self.proc.pid

    def wait_registered(self, timeout: float = 15) -> None:
        wait_for(lambda: health_status(self.port) is not None or self.proc.poll() is not None,
                 timeout, f"workload {self.pid} to serve /health")
        assert self.proc.poll() is None, self.proc.communicate()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
