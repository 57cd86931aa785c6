"""Stand-ins speaking a server's API on the simulated GPU, for the stand-in tests."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gpu_manager.probe import SimulatedProbe
from tests.support.env import wait_for
from tests.support.workloads import Workload

TOTAL_MB = 8000
FULL_MB = 3000
RESIDUAL_MB = 200
SLEEP_S = 0.4
WAKE_S = 0.3
SLACK_S = 2.0  # upper bound on scheduling noise on a busy 2-core machine


@dataclass(frozen=True)
class Http:
    code: int
    body: bytes
    elapsed: float

    def json(self) -> Any:
        return json.loads(self.body)


def call(port: int, method: str, path: str, body: Any = None) -> Http:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return Http(int(resp.status), resp.read(), time.monotonic() - t0)
    except urllib.error.HTTPError as exc:
        return Http(int(exc.code), exc.read(), time.monotonic() - t0)


@dataclass(frozen=True)
class Kind:
    api: str
    sleep: tuple[str, str, Any]
    wake: tuple[str, str, Any]
    asleep: Callable[[int], bool] | None  # what the server's own status endpoint says
    answers_before_release: bool = False
    repeat_sleep_code: int = 200


def vllm_asleep(port: int) -> bool:
    return bool(call(port, "GET", "/is_sleeping").json()["is_sleeping"])


def _ollama_asleep(port: int) -> bool:
    models = call(port, "GET", "/api/ps").json()["models"]
    assert models == [] or models[0]["size_vram"] == (FULL_MB - RESIDUAL_MB) * 2**20
    return not models


def _tabby_asleep(port: int) -> bool:
    res = call(port, "GET", "/v1/model")
    assert res.code in (200, 503), res
    return res.code == 503


KINDS = {
    "vllm": Kind("vllm", ("POST", "/sleep?level=1", None), ("POST", "/wake_up", None),
                 vllm_asleep),
    "sglang": Kind("sglang", ("POST", "/release_memory_occupation", {}),
                   ("POST", "/resume_memory_occupation", {}), None),
    "comfyui": Kind("comfyui", ("POST", "/free", {"unload_models": True, "free_memory": True}),
                    ("POST", "/prompt", {"prompt": {}}), None, answers_before_release=True),
    "ollama": Kind("ollama", ("POST", "/api/generate", {"model": "m", "keep_alive": 0}),
                   ("POST", "/api/generate", {"model": "m"}), _ollama_asleep),
    # TabbyAPI refuses an unload with nothing loaded (check_model_container): 503, not 200.
    "tabbyapi": Kind("tabbyapi", ("POST", "/v1/model/unload", None),
                     ("POST", "/v1/model/load", {"model_name": "m"}), _tabby_asleep,
                     repeat_sleep_code=503),
}


@pytest.fixture
def sim(tmp_path: Path) -> SimulatedProbe:
    return SimulatedProbe(tmp_path / "sim", total_mb=TOTAL_MB, release_delay_ms=300)


@pytest.fixture
def workloads() -> Iterator[list[Workload]]:
    started: list[Workload] = []
    yield started
    for w in started:
        w.stop()


def start(sim: SimulatedProbe, workloads: list[Workload], api: str, *extra: str) -> Workload:
    w = Workload(sim.registry.root, FULL_MB, "--api", api, "--model", "m",
                 "--sleep-vram-mb", str(RESIDUAL_MB), "--sleep-s", str(SLEEP_S),
                 "--wake-s", str(WAKE_S), *extra)
    workloads.append(w)
    w.wait_registered()
    return w


def held_mb(sim: SimulatedProbe, pid: int) -> int | None:
    proc = sim.sample().devices[0].process(pid)
    return None if proc is None else proc.used_mb


def do(w: Workload, step: tuple[str, str, Any]) -> Http:
    return call(w.port, *step)


def put_to_sleep(sim: SimulatedProbe, w: Workload, kind: Kind) -> Http:
    res = do(w, kind.sleep)
    assert res.code == 200, res
    wait_for(lambda: held_mb(sim, w.pid) == RESIDUAL_MB, SLEEP_S + SLACK_S, "the release")
    return res
