"""The real llama.cpp OpenAI server (llama-cpp-python's `llama_cpp.server`) for the tests.

It runs on the CPU with a tiny random model that examples/llama_cpp/make_tiny_model.py writes
(no download), as a native service whose VRAM on the simulated GPU is held for its own pid by
`gpu_manager.sim.hold` (which execs the server in the same process).

Its health check is on /openapi.json, not /v1/models: every API route of this server takes
its one model lock, so a check there waits behind a generation, and (with the server's
default `interrupt_requests`) ends a stream in flight with `[DONE]` and no finish_reason.
/openapi.json takes no lock, and answers only once the model is loaded (nothing listens
before).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.support.daemon import ROOT, DaemonProc
from tests.support.env import unavailable, wait_for

MAKE_MODEL = ROOT / "examples" / "llama_cpp" / "make_tiny_model.py"
VRAM_MB = 6000

BLOCK = """
  {name}:
    type: native
    vram_mb: {vram}
    priority: {priority}
    command: ["{{python}}", "-m", "gpu_manager.sim.hold", "--vram-mb", "{vram}",
              "--name", "{name}", "--", "{{python}}", "-m", "llama_cpp.server", {args}]
    health: {{url: "http://127.0.0.1:{port}/openapi.json", timeout_s: 2, interval_s: 0.5}}
    start_timeout_s: 30
    stop_timeout_s: 5
    restart: on-failure
{serve}"""


def require_llama() -> None:
    """Skip (fail under CI=true) where the realservers group is not installed."""
    missing = [m for m in ("llama_cpp", "gguf") if importlib.util.find_spec(m) is None]
    if missing:
        unavailable(f"{', '.join(missing)} not installed: the realservers group "
                    "(./dev test installs it; its build may have failed)")


def make_model(out: Path, seed: int = 0, context: int = 512) -> Path:
    """The generator, run as its users run it."""
    res = subprocess.run([sys.executable, str(MAKE_MODEL), str(out), "--seed", str(seed),
                          "--context", str(context)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0 and out.exists(), res.stderr
    return out


def server_args(model: Path, port: int, alias: str, n_ctx: int = 512) -> list[str]:
    return ["--model", str(model), "--model_alias", alias, "--host", "127.0.0.1",
            "--port", str(port), "--n_ctx", str(n_ctx), "--embedding", "True",
            "--interrupt_requests", "False", "--verbose", "False"]


def llama_service(name: str, port: int, args: list[str], *, models: list[str] | None = None,
                  vram: int = VRAM_MB, priority: int = 20, serve_extra: str = "") -> str:
    """A services.yaml block running the real server; `models`: its `serve:` block's."""
    serve = ""
    if models is not None:
        # one request at a time, as the server answers them: the others wait in the door's
        # queue (bounded, drained, counted), not inside the server
        serve = (f'    serve:\n      url: "http://127.0.0.1:{port}"\n'
                 f"      models: [{', '.join(models)}]\n      max_concurrent: 1\n")
        serve += "".join(f"      {line}\n" for line in serve_extra.splitlines() if line)
    return BLOCK.format(name=name, vram=vram, priority=priority, port=port, serve=serve,
                        args=", ".join(json.dumps(a) for a in args))


def service(d: DaemonProc, name: str) -> dict[str, Any]:
    out: dict[str, Any] = d.status()["services"][name]
    return out


def wait_service(d: DaemonProc, name: str, cond: Callable[[dict[str, Any]], bool],
                 timeout: float, what: str) -> dict[str, Any]:
    """Wait until `cond` holds for the service's status (within `timeout`); that status."""
    seen: list[dict[str, Any]] = []

    def holds() -> bool:
        seen.append(service(d, name))
        return cond(seen[-1])

    wait_for(holds, timeout, what, every=0.02)
    return seen[-1]


def events_through(d: DaemonProc, op_id: str, timeout: float = 15) -> list[dict[str, Any]]:
    """Every event the daemon still holds, from the first to the end of operation `op_id`
    (the `data` of each): what happened before that operation ended, none missed."""
    deadline = time.monotonic() + timeout
    out: list[dict[str, Any]] = []
    with httpx.stream("GET", f"{d.url}/gpu/events", params={"after": 0}, trust_env=False,
                      timeout=httpx.Timeout(10, read=timeout)) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            assert time.monotonic() < deadline, f"operation {op_id} did not end: {out}"
            if not line.startswith("data: "):
                continue
            data = json.loads(line[6:])
            out.append(data)
            if data.get("kind") == "operation" and data.get("id") == op_id \
                    and data.get("status") != "queued":
                return out
    raise AssertionError(f"the event stream ended before operation {op_id} did: {out}")
