"""AC-1..AC-3 on a real NVIDIA GPU: `--cuda` stand-ins (torch or cupy), the NVML backend.

    python -m bench.gpu_e2e [--scale 0.25]

Sizes are the reference inventory's (vidi 4000, cosyvoice 4000, comfyui 20000 MB) times
--scale, so the run fits any card. Reports each transition, and the real reclaim time (how
long after the stop the driver gave the memory back) after SIGTERM and after SIGKILL.
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import time
from pathlib import Path

from bench.common import row, write
from tests.support.daemon import DaemonProc
from tests.support.env import wait_for


def inventory(dest: Path, scale: float) -> None:
    def svc(name: str, mb: int, prio: int) -> str:
        mb = int(mb * scale)
        port = {"vidi": 18099, "cosyvoice": 18150, "comfyui": 18188}[name]
        return f"""  {name}:
    type: native
    vram_mb: {mb + 600}
    priority: {prio}
    command: ["{{python}}", "-m", "gpu_manager.sim.workload", "--cuda", "--name", "{name}",
              "--vram-mb", "{mb}", "--port", "{port}", "--startup-s", "0.2"]
    health: {{url: "http://127.0.0.1:{port}/health", interval_s: 2}}
"""
    (dest / "services.yaml").write_text(
        "gpu:\n  backend: nvml\n  reserve_mb: 1024\nservices:\n"
        + svc("comfyui", 20000, 100) + svc("cosyvoice", 4000, 50) + svc("vidi", 4000, 40))
    (dest / "phases.yaml").write_text(
        "phases:\n  2: {services: [vidi]}\n  3: {services: [cosyvoice]}\n"
        "  4: {services: [comfyui]}\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=0.25)
    args = ap.parse_args()
    print(f"real GPU end to end (sizes x{args.scale})")
    out: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="gm-gpu-") as tmp:
        d = DaemonProc(Path(tmp))
        inventory(d.config_dir, args.scale)
        d.start()
        try:
            status = d.status()
            assert status["vram"]["source"] == "nvml", status["vram"]
            for phase in (2, 3, 4):
                t0 = time.monotonic()
                r = d.post(f"/gpu/prepare-phase/{phase}")
                assert r.status_code == 200, r.text
                steps = r.json()["plan"]["steps"]
                out[f"phase_{phase}"] = {"total_s": time.monotonic() - t0, "steps": steps}
                row(f"AC-1 phase {phase}", f"{time.monotonic() - t0:.2f} s",
                    ", ".join(f"{s['action']} {s['service']} {s['duration_s']:.2f}s"
                              f" (reclaim {s['reclaim_wait_s'] or 0:.2f}s)" for s in steps))
            assert d.post("/gpu/release-all").status_code == 200
            assert d.post("/gpu/service/cosyvoice/start").status_code == 200
            r = d.post("/gpu/service/comfyui/start")
            assert r.status_code == 200, r.text
            out["ac3"] = r.json()["plan"]["steps"]
            row("AC-3 preempt cosyvoice, start comfyui",
                f"{r.json()['plan']['duration_s']:.2f} s")
            for sig in (signal.SIGTERM, signal.SIGKILL):
                pid = d.status()["services"]["comfyui"]["pids"][0]
                free0 = d.status()["vram"]["free_mb"]
                t0 = time.monotonic()
                os.kill(pid, sig)
                wait_for(lambda f=free0: d.status()["vram"]["free_mb"] >= f + 4000 * args.scale,
                         60, "the memory to come back")
                back = time.monotonic() - t0
                out[f"reclaim_{sig.name}_s"] = back
                row(f"reclaim after {sig.name}", f"{back:.2f} s", "(status poll granularity)")
                wait_for(lambda: d.states()["comfyui"] in ("failed", "stopped"), 10, "death")
                assert d.post("/gpu/service/comfyui/start").status_code == 200
        finally:
            d.close()
    print(f"  -> {write('gpu_e2e', out)}")


if __name__ == "__main__":
    main()
