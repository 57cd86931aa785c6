"""The real NVML backend, through nvidia-ml-py, against a stub libnvidia-ml.so.1 built by gcc.

Each case runs the probe in a subprocess (the binding loads the library once per process, and
LD_LIBRARY_PATH is read at process start) and drives the stub through its state file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support.env import unavailable

STUB_SRC = Path(__file__).parent / "nvml_stub" / "nvml_stub.c"
GB = 1024**3
MB = 1024**2

TWO_GPUS = f"""
init 0
driver 550.54.14
device 0 {24 * GB} {20 * GB} {512 * MB} 45 30
name 0 NVIDIA GeForce RTX 4090
uuid 0 GPU-0000aaaa
device 1 {16 * GB} {15 * GB} 0 38 0
name 1 NVIDIA RTX A4000
uuid 1 GPU-1111bbbb
proc 0 c 4242 {2 * GB}
proc 0 g 4243 {300 * MB}
proc 0 c 4244 NA
"""


@pytest.fixture(scope="session")
def stub_builder(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        unavailable("gcc is needed to build the NVML stub (Debian: apt-get install gcc)")
    built: dict[tuple[str, ...], Path] = {}

    def build(*defines: str) -> Path:
        key = tuple(sorted(defines))
        if key not in built:
            out = tmp_path_factory.mktemp("nvml-" + ("-".join(key) or "full").lower())
            res = subprocess.run(
                [gcc, "-shared", "-fPIC", "-O1", "-Wall", "-Werror",
                 *[f"-D{d}" for d in key], "-o", str(out / "libnvidia-ml.so.1"), str(STUB_SRC)],
                check=False, capture_output=True, text=True,
            )
            assert res.returncode == 0, f"building the NVML stub failed:\n{res.stderr}"
            built[key] = out
        return built[key]

    return build


class Runner:
    def __init__(self, libdir: Path, state: Path, log: Path) -> None:
        env = {**os.environ, "LD_LIBRARY_PATH": str(libdir), "NVML_STUB_STATE": str(state),
               "NVML_STUB_LOG": str(log)}
        self.state, self.log = state, log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.nvml_runner"], env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=Path(__file__).parent.parent,
        )

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the NVML runner died"
        answer: dict[str, Any] = json.loads(line)
        assert "exception" not in answer, answer["exception"]
        return answer

    def snapshot(self, processes: bool = True) -> dict[str, Any]:
        snap: dict[str, Any] = self.ask("sample" if processes else "sample-mem")["snapshot"]
        return snap

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def close(self) -> None:
        assert self.proc.stdin
        self.proc.stdin.close()
        self.proc.wait(10)


@pytest.fixture
def nvml(stub_builder: Callable[..., Path], tmp_path: Path) -> Iterator[Callable[..., Runner]]:
    runners: list[Runner] = []

    def start(state: str, *defines: str, libdir: Path | None = None) -> Runner:
        path = tmp_path / f"state{len(runners)}"
        path.write_text(state)
        r = Runner(libdir or stub_builder(*defines), path, tmp_path / f"calls{len(runners)}")
        runners.append(r)
        return r

    yield start
    for r in runners:
        r.close()


def procs(dev: dict[str, Any]) -> list[tuple[int, int | None]]:
    return [(p["pid"], p["used_mb"]) for p in dev["processes"]]


def utils(dev: dict[str, Any]) -> dict[int, int | None]:
    return {p["pid"]: p["util_pct"] for p in dev["processes"]}


def test_two_devices_with_memory_v2(nvml: Callable[..., Runner]) -> None:
    snap = nvml(TWO_GPUS).snapshot()
    assert snap["source"] == "nvml" and snap["error"] is None
    d0, d1 = snap["devices"]
    assert (d0["index"], d0["name"], d0["uuid"]) == (0, "NVIDIA GeForce RTX 4090", "GPU-0000aaaa")
    assert (d0["total_mb"], d0["free_mb"], d0["used_mb"], d0["reserved_mb"]) == (
        24576, 20480, 4096, 512)
    assert (d0["temperature_c"], d0["utilization_percent"]) == (45, 30)
    # graphics and compute merged; N/A memory is unknown (None), never 0
    assert procs(d0) == [(4242, 2048), (4243, 300), (4244, None)]
    assert (d1["name"], d1["total_mb"], d1["free_mb"], d1["reserved_mb"]) == (
        "NVIDIA RTX A4000", 16384, 15360, 0)
    assert procs(d1) == []


def test_memory_v1_fallback_when_driver_lacks_v2(nvml: Callable[..., Runner]) -> None:
    r = nvml(TWO_GPUS, "NO_MEM_V2")
    d0 = r.snapshot()["devices"][0]
    assert (d0["total_mb"], d0["free_mb"], d0["used_mb"], d0["reserved_mb"]) == (
        24576, 20480, 4096, None)
    answer = r.ask("sample")
    assert answer["snapshot"]["devices"][0]["free_mb"] == 20480
    # the fallback is remembered and logged once, not on every poll
    assert sum("v2 unavailable" in w for w in answer["warnings"]) == 1
    assert r.calls().count("nvmlDeviceGetMemoryInfo") == 4  # 2 devices x 2 samples


@pytest.mark.parametrize("defines,version", [
    ((), "_v3"), (("NO_PROC_V3",), "_v2"), (("NO_PROC_V3", "NO_PROC_V2"), ""),
])
def test_process_list_fallback(nvml: Callable[..., Runner], defines: tuple[str, ...],
                               version: str) -> None:
    r = nvml(TWO_GPUS, *defines)
    for _ in range(2):
        assert procs(r.snapshot()["devices"][0]) == [(4242, 2048), (4243, 300), (4244, None)]
    # only the newest version the driver has is ever called (missing symbols never reach it)
    called = {c for c in r.calls() if "RunningProcesses" in c}
    assert called == {f"nvmlDeviceGetComputeRunningProcesses{version}",
                      f"nvmlDeviceGetGraphicsRunningProcesses{version}"}


def test_not_supported_is_unknown_not_zero(nvml: Callable[..., Runner]) -> None:
    r = nvml(TWO_GPUS + "procret 0 3\nmemret 1 3\ntempret 0 3\n")
    d0, d1 = r.snapshot()["devices"]
    assert d0["processes"] is None  # per-process memory not supported (WDDM / MIG)
    assert d0["temperature_c"] is None
    assert d0["free_mb"] == 20480  # the rest of the device is still read
    assert (d1["total_mb"], d1["used_mb"], d1["free_mb"]) == (None, None, None)  # unified memory
    assert d1["error"] is None and not d1["lost"]


def test_lost_gpu_is_reported_and_the_other_still_read(nvml: Callable[..., Runner]) -> None:
    r = nvml(TWO_GPUS + "lost 1\n")
    d0, d1 = r.snapshot()["devices"]
    assert d0["free_mb"] == 20480 and not d0["lost"]
    assert d1["lost"] and d1["error"] == "GPU is lost"
    assert (d1["total_mb"], d1["free_mb"], d1["processes"]) == (None, None, None)
    answer = r.ask("sample")
    assert answer["snapshot"]["devices"][1]["lost"]
    assert sum("GPU 1 is lost" in w for w in answer["warnings"]) == 1


def test_memory_only_poll_skips_process_calls(nvml: Callable[..., Runner]) -> None:
    r = nvml(TWO_GPUS)
    snap = r.snapshot(processes=False)
    assert snap["devices"][0]["processes"] is None
    assert not [c for c in r.calls() if "RunningProcesses" in c or "ProcessUtilization" in c]


def test_missing_library_degrades_to_declared(nvml: Callable[..., Runner],
                                              tmp_path: Path) -> None:
    empty = tmp_path / "nolib"
    empty.mkdir()
    if any(Path(p, "libnvidia-ml.so.1").exists() for p in ("/usr/lib/x86_64-linux-gnu",
                                                           "/usr/lib64", "/usr/lib")):
        pytest.skip("a real NVIDIA driver library is installed on this machine")
    answer = nvml("", libdir=empty).ask("select 24576")
    assert answer["probe"] == "DeclaredProbe"
    assert "NVML unavailable" in answer["error"] and "Library Not Found" in answer["error"]
    assert any("DEGRADED" in w for w in answer["warnings"])


@pytest.mark.parametrize("code,text", [(9, "Driver Not Loaded"), (18, "version mismatch")])
def test_init_failure_degrades_with_the_reason(nvml: Callable[..., Runner], code: int,
                                               text: str) -> None:
    answer = nvml(f"init {code}\n").ask("select 24576")
    assert answer["probe"] == "DeclaredProbe"
    assert text in answer["error"] and f"code {code}" in answer["error"]


def test_auto_picks_nvml_when_it_initialises(nvml: Callable[..., Runner]) -> None:
    answer = nvml(TWO_GPUS).ask("select 24576")
    assert answer == {"probe": "NvmlProbe", "error": None, "warnings": []}


def test_snapshot_reads_make_no_nvml_call(nvml: Callable[..., Runner]) -> None:
    r = nvml(TWO_GPUS)
    result = r.ask("poll-reads 2000")
    # 2000 reads of the latest snapshot and can_fit, served without a single extra poll
    assert result == {"polls": 0, "fits": ["True"], "distinct_snapshots": 1}
    memory_calls = [c for c in r.calls() if c.startswith("nvmlDeviceGetMemoryInfo")]
    assert len(memory_calls) == 2  # the poller's first sample: one per device


def test_the_daemon_places_by_what_nvml_says_of_each_card(
        stub_builder: Callable[..., Path], tmp_path: Path) -> None:
    """The daemon on NVML (the stub) with two cards: each card's budget is NVML's total less
    its foreign use, a service goes to the card that can hold it, and it is handed that
    card's UUID as NVML names it."""
    from tests.support.daemon import DaemonProc

    state = tmp_path / "nvml-state"
    state.write_text(f"""
init 0
driver 550.54.14
device 0 {24 * GB} {22 * GB} 0 40 10
name 0 Card Zero
uuid 0 GPU-0000aaaa
device 1 {16 * GB} {16 * GB} 0 35 0
name 1 Card One
uuid 1 GPU-1111bbbb
proc 0 c 4242 {2 * GB}
""")
    d = DaemonProc(tmp_path, env={"LD_LIBRARY_PATH": str(stub_builder()),
                                  "NVML_STUB_STATE": str(state)})
    sleeper = '["{python}", "-c", "import time; time.sleep(600)"]'
    (d.config_dir / "services.yaml").write_text(f"""
gpu:
  backend: nvml
  poll_interval_s: 0.2
  devices: [{{index: 0}}, {{index: 1}}]
services:
  big: {{type: native, vram_mb: 20000, command: {sleeper}, stop_timeout_s: 5}}
  small: {{type: native, vram_mb: 8000, command: {sleeper}, stop_timeout_s: 5}}
""")
    (d.config_dir / "phases.yaml").write_text("phases: {}\n")
    d.start()
    try:
        gpus = d.status()["gpus"]
        assert [(g["index"], g["uuid"], g["name"], g["total_mb"], g["foreign_mb"])
                for g in gpus] == [(0, "GPU-0000aaaa", "Card Zero", 24576, 2048),
                                   (1, "GPU-1111bbbb", "Card One", 16384, 0)]
        for name, card, uuid in (("big", 0, "GPU-0000aaaa"), ("small", 1, "GPU-1111bbbb")):
            answer = d.post(f"/gpu/service/{name}/start")
            assert answer.status_code == 200, answer.text
            s = d.status()["services"][name]
            assert s["devices"] == [card], (name, s)
            env = psutil.Process(s["pids"][0]).environ()
            assert env["CUDA_VISIBLE_DEVICES"] == uuid
    finally:
        d.close()


def test_per_process_utilisation_from_the_samples_since_the_last_read(
        nvml: Callable[..., Runner]) -> None:
    samples = """
putil 0 4242 100 30
putil 0 4242 200 70
putil 0 4243 150 10
putil 0 9999 160 50
"""
    r = nvml(TWO_GPUS + samples)
    d0, d1 = r.snapshot()["devices"]
    # a pid's highest sample; a listed pid without a sample did not run (0, not unknown);
    # a sampled pid that is not listed is not made up
    assert utils(d0) == {4242: 70, 4243: 10, 4244: 0}
    assert utils(d1) == {}
    # nothing newer than 200 (NVML_ERROR_NOT_FOUND): everyone idle
    assert utils(r.snapshot()["devices"][0]) == {4242: 0, 4243: 0, 4244: 0}
    r.state.write_text(TWO_GPUS + samples + "putil 0 4244 300 55\nputil 1 4242 50 20\n")
    d0, d1 = r.snapshot()["devices"]
    assert utils(d0) == {4242: 0, 4243: 0, 4244: 55}
    assert utils(d1) == {}  # its sample's pid is not on that card
    r.snapshot()
    asked = [int(c.split("since=")[1]) for c in r.calls() if "ProcessUtilization" in c]
    # per device, after the newest sample that device's last read saw; the binding asks
    # twice when there are samples (their count, then the samples)
    assert asked == [0, 0, 0,  # device 0: 4 samples; device 1: none
                     200, 0,  # nothing new on either
                     200, 200, 0, 0,  # one new sample on each
                     300, 50]


@pytest.mark.parametrize("ret,warned", [(3, False), (999, True)])
def test_process_utilisation_unknown_when_the_driver_cannot_say(
        nvml: Callable[..., Runner], ret: int, warned: bool) -> None:
    r = nvml(TWO_GPUS + f"putilret 0 {ret}\n")
    for _ in range(2):
        answer = r.ask("sample")
        d0 = answer["snapshot"]["devices"][0]
        # NOT_SUPPORTED (vGPU, MIG) or another error: unknown; the rest is still read
        assert utils(d0) == {4242: None, 4243: None, 4244: None}
        assert d0["error"] is None and d0["free_mb"] == 20480
    assert sum("per-process utilisation" in w for w in answer["warnings"]) == int(warned)


def test_process_utilisation_unknown_when_the_driver_lacks_it(
        nvml: Callable[..., Runner]) -> None:
    r = nvml(TWO_GPUS + "putil 0 4242 100 30\n", "NO_PROC_UTIL")
    for _ in range(2):
        answer = r.ask("sample")
        assert utils(answer["snapshot"]["devices"][0]) == {4242: None, 4243: None, 4244: None}
    assert sum("nvmlDeviceGetProcessUtilization" in w for w in answer["warnings"]) == 1
