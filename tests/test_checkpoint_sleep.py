"""`sleep: {api: cuda-checkpoint}` on the real daemon: a stand-in with no sleep API of its own is
checkpointed in place (its VRAM off the simulated GPU, the process alive) and restored at wake
(the same process, its VRAM back, healthy)."""

from __future__ import annotations

from pathlib import Path

from gpu_manager.sim.registry import SimRegistry
from tests.support.daemon import DaemonProc
from tests.support.env import free_port

PLAIN = """
  plain:
    type: native
    vram_mb: 6000
    priority: 5
    command: ["{{python}}", "-m", "gpu_manager.sim.workload", "--name", "plain",
              "--vram-mb", "6000", "--port", "{port}", "--startup-s", "0.3"]
    health: {{url: "http://127.0.0.1:{port}/health", timeout_s: 2, interval_s: 1}}
    start_timeout_s: 20
    stop_timeout_s: 5
    sleep: {{api: cuda-checkpoint, timeout_s: 10}}
"""


def held(d: DaemonProc, pid: int) -> tuple[int, int] | None:
    reg = next((r for r in SimRegistry(d.sim_dir).active() if r.pid == pid), None)
    return None if reg is None else (reg.mb, reg.host_mb)


def test_a_service_without_a_sleep_api_is_checkpointed_and_restored(tmp_path: Path) -> None:
    d = DaemonProc(tmp_path, extra_services=PLAIN.format(port=free_port())).start()
    try:
        assert d.post("/gpu/service/plain/start").status_code == 200
        (pid,) = d.status()["services"]["plain"]["pids"]
        assert held(d, pid) == (6000, 0)
        svc = d.status()["services"]["plain"]
        assert (svc["residual_mb"], svc["host_ram_mb"]) == (0, 6000)  # the defaults
        r = d.post("/gpu/service/comfyui/start")  # needs plain's room
        assert r.status_code == 200, r.text
        step = next(s for s in r.json()["plan"]["steps"] if s["service"] == "plain")
        assert step["action"] == "sleep", step
        assert "checkpointed 1 process(es) to host memory" in step["detail"], step
        svc = d.status()["services"]["plain"]
        assert svc["state"] == "sleeping" and svc["pids"] == [pid]
        assert held(d, pid) == (0, 6000)  # off the GPU, in host memory, alive
        assert d.post("/gpu/service/comfyui/stop").status_code == 200
        r = d.post("/gpu/service/plain/start")  # the wake: a restore
        assert r.status_code == 200, r.text
        svc = d.status()["services"]["plain"]
        assert svc["state"] == "ready" and svc["pids"] == [pid] and svc["wakes"] == 1
        assert held(d, pid) == (6000, 0)
        costs = svc["costs"]  # learned as what they are
        assert costs["checkpoint"]["n"] == 1 and costs["restore"]["n"] == 1
        assert "sleep" not in costs and "wake" not in costs
    finally:
        d.close()


async def test_without_the_driver_api_the_sleep_fails_with_the_reason() -> None:
    """The real driver layer on a machine without libcuda: the sleep answers why, and the
    plan falls back to a stop that says it (the release steps' fallback)."""
    from gpu_manager.checkpoint.libcuda import LibcudaCheckpointer
    from gpu_manager.config import SleepConfig
    from gpu_manager.units.checkpoint_sleep import CheckpointSleeper

    sleeper = CheckpointSleeper(LibcudaCheckpointer("/nonexistent/libcuda.so.1"),
                                lambda name: [12345])
    out = await sleeper.sleep("x", SleepConfig(api="cuda-checkpoint"), "test", "test")
    assert not out.ok and out.detail.startswith("cuda-checkpoint is not possible here: ")
    assert "libcuda" in out.detail


def test_a_service_that_cannot_sleep_here_is_stopped_and_the_plan_says_why() -> None:
    from gpu_manager.planner import (
        ObservedState,
        Plan,
        PlannerInventory,
        ServiceSpec,
        StartService,
        plan,
    )

    inv = PlannerInventory({
        "tts": ServiceSpec("tts", 6000, 5, residual_mb=None,
                           no_sleep="cuda-checkpoint unavailable: libcuda.so.1 not found"),
        "big": ServiceSpec("big", 20000, 50)})
    result = plan(inv, ObservedState(23552, {"tts": 6000}), StartService("big"))
    assert isinstance(result, Plan)
    (stop,) = [s for s in result.steps if s.service == "tts"]
    assert stop.action == "stop"
    assert stop.reason.endswith("stopped, not asleep: cuda-checkpoint unavailable: "
                                "libcuda.so.1 not found")


TWO_CARDS = """gpu:
  backend: simulated
  devices: [{total_mb: 24576}, {total_mb: 24576}]
services:
  tp:
    type: native
    command: "sleep 100"
    vram_mb: 8000
    gpus: 2
    sleep: {api: cuda-checkpoint}
  one:
    type: native
    command: "sleep 100"
    vram_mb: 8000
    sleep: {api: cuda-checkpoint}
"""


def test_check_config_probe_says_what_this_host_can_checkpoint(tmp_path: Path) -> None:
    import subprocess
    import sys

    (tmp_path / "services.yaml").write_text(TWO_CARDS)
    (tmp_path / "phases.yaml").write_text("phases: {}\n")
    exe = Path(sys.executable).with_name("gpu-manager")
    got = subprocess.run([str(exe), "check-config", "--config-dir", str(tmp_path), "--probe"],
                         capture_output=True, text=True, timeout=60, check=False,
                         env={"GPU_MANAGER_SIM_DIR": str(tmp_path / "sim"), "PATH": "/usr/bin"})
    assert got.returncode == 0, got.stderr
    lines = [line for line in got.stdout.splitlines() if line.startswith("probe: ")]
    assert lines == [
        "probe: tp: cuda-checkpoint NOT available: tensor-parallel across 2 cards: "
        "cuda-checkpoint does not support multi-process NCCL; a release stops it instead",
        "probe: one: cuda-checkpoint available (simulated)"]


LADDER = """
  llm:
    type: native
    vram_mb: 6000
    priority: 5
    command: ["{{python}}", "-m", "gpu_manager.sim.workload", "--name", "llm",
              "--vram-mb", "6000", "--port", "{port}", "--startup-s", "0.3", "--api", "vllm",
              "--sleep-vram-mb", "300"]
    health: {{url: "http://127.0.0.1:{port}/health", timeout_s: 2, interval_s: 1}}
    start_timeout_s: 20
    stop_timeout_s: 5
    # its API's sleep keeps (as declared) 5000 MB: in comfyui's way; a checkpoint keeps none
    sleep: {{api: vllm, url: "http://127.0.0.1:{port}", residual_mb: 5000, timeout_s: 5}}
    release: [sleep, checkpoint, stop]
"""


def test_the_ladder_takes_the_checkpoint_when_the_sleeps_residual_is_in_the_way(
        tmp_path: Path) -> None:
    d = DaemonProc(tmp_path, extra_services=LADDER.format(port=free_port())).start()
    try:
        assert d.post("/gpu/service/llm/start").status_code == 200
        (pid,) = d.status()["services"]["llm"]["pids"]
        r = d.post("/gpu/service/comfyui/start")  # 20000 MB: llm's residual would not fit
        assert r.status_code == 200, r.text
        step = next(s for s in r.json()["plan"]["steps"] if s["service"] == "llm")
        assert step["action"] == "sleep" and step["how"] == "checkpoint", step
        assert "checkpointed: its sleep's residual does not fit" in step["reason"]
        assert "checkpointed 1 process(es)" in step["detail"]
        assert held(d, pid) == (0, 6000)
        assert d.post("/gpu/service/comfyui/stop").status_code == 200
        assert d.post("/gpu/service/llm/start").status_code == 200  # woken by a restore
        svc = d.status()["services"]["llm"]
        assert svc["state"] == "ready" and svc["pids"] == [pid] and held(d, pid) == (6000, 0)
        assert svc["costs"]["checkpoint"]["n"] == 1
    finally:
        d.close()


def test_the_ladder_is_checked_at_its_line(tmp_path: Path, repo_root: Path) -> None:
    import pytest

    from gpu_manager.config import ConfigError, load_inventory

    base = (repo_root / "services.yaml").read_text()
    (tmp_path / "phases.yaml").write_text((repo_root / "phases.yaml").read_text())
    cases = {
        "release: [stop, sleep]": "release: stop is the last rung",
        "release: [checkpoint, sleep]": "list checkpoint after sleep",
        "release: [sleep, sleep]": "release lists a rung more than once",
    }
    for line, message in cases.items():
        (tmp_path / "services.yaml").write_text(base + LADDER.format(port=1).replace(
            "release: [sleep, checkpoint, stop]", line))
        with pytest.raises(ConfigError) as err:
            load_inventory(tmp_path)
        (issue,) = err.value.issues
        assert message in str(issue) and "services.llm" in str(issue), issue
    # `[checkpoint]` alone: its sleep is a cuda-checkpoint; `[stop]`: it never sleeps
    for line, api in (("release: [checkpoint]", "cuda-checkpoint"), ("release: [stop]", None)):
        (tmp_path / "services.yaml").write_text(base + LADDER.format(port=1).replace(
            "release: [sleep, checkpoint, stop]", line))
        sleep = load_inventory(tmp_path).services["llm"].sleep
        assert (sleep.api if sleep is not None else None) == api


TWO = """
  pair:
    type: native
    vram_mb: 6000
    priority: 5
    # a server with a worker process: both hold GPU memory (3000 MB each)
    command: ["/bin/sh", "-c", "{python} -m gpu_manager.sim.workload --name pair-worker
      --vram-mb 3000 --port {worker} & exec {python} -m gpu_manager.sim.workload
      --name pair --vram-mb 3000 --port {port} --startup-s 0.3"]
    health: {{url: "http://127.0.0.1:{port}/health", timeout_s: 2, interval_s: 1}}
    start_timeout_s: 20
    stop_timeout_s: 5
    sleep: {{api: cuda-checkpoint, timeout_s: 10}}
"""


def test_every_gpu_process_of_a_service_is_checkpointed_and_restored(tmp_path: Path) -> None:
    import sys

    from tests.support.env import wait_for

    d = DaemonProc(tmp_path, extra_services=TWO.format(port=free_port(), worker=free_port(),
                                                       python=sys.executable))
    d.start()
    try:
        assert d.post("/gpu/service/pair/start").status_code == 200
        wait_for(lambda: len(d.status()["services"]["pair"]["pids"]) >= 2, 10,
                 "both processes of the service")
        regs = {r.name: r.pid for r in SimRegistry(d.sim_dir).active()
                if r.name in ("pair", "pair-worker")}
        assert len(regs) == 2
        r = d.post("/gpu/service/comfyui/start")  # needs the pair's 6000 MB
        assert r.status_code == 200, r.text
        step = next(s for s in r.json()["plan"]["steps"] if s["service"] == "pair")
        assert step["action"] == "sleep" and "checkpointed 2 process(es)" in step["detail"]
        assert {held(d, pid) for pid in regs.values()} == {(0, 3000)}
        assert d.post("/gpu/service/comfyui/stop").status_code == 200
        assert d.post("/gpu/service/pair/start").status_code == 200
        assert {held(d, pid) for pid in regs.values()} == {(3000, 0)}
        assert d.status()["services"]["pair"]["state"] == "ready"
    finally:
        d.close()
