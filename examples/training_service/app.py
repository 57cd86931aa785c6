"""The training host service (interfaces.md §4), run by gpu-manager as a managed service.

A small FastAPI app that trains a real (small) model: logistic regression on synthetic data,
with torch on CUDA (or MPS) when torch is installed, otherwise numpy on the CPU. One session
at a time; progress at /training/status/{id}.

It sleeps and wakes for gpu-manager (`sleep: {api: http}` in services.yaml):
- `POST /training/sleep`: a running session finishes the epoch in progress (it is counted;
  the pause between epochs is cut short), writes a checkpoint under `--checkpoint-dir` and
  drops its tensors; the device memory goes back to the driver. Answers
  `{"asleep": true, "session_id", "epoch", "checkpoint"}` (nulls when no run was going).
  The session's status is then "sleeping". New runs are refused (409) while asleep. (A
  checkpoint that cannot be written fails the session, reported in its status; the service
  sleeps all the same: the GPU is what was asked for.)
- `POST /training/wake`: takes the memory back and resumes the session from its checkpoint
  (503 and still asleep when the memory is not there: CUDA out of memory).
- `GET /training/sleeping`: `{"asleep": bool, ...}`. Both calls are idempotent.
Every epoch is counted once: a session's status lists `history` (epoch index and loss).

    python examples/training_service/app.py [--host 127.0.0.1] [--port 5002]
        [--checkpoint-dir DIR] [--sim-vram-mb N [--sim-residual-mb R] [--sim-dir DIR]]

`--sim-vram-mb N` is for gpu-manager's simulated GPU (tests, demos): the process holds N MB in
its registry while awake and R (default 0) while asleep, as a CUDA process holds its model.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from trainer import (
    OutOfMemory,
    Run,
    Session,
    StartBody,
    accuracy,
    device,
    is_oom,
    release_device_memory,
    torch_module,
)

if TYPE_CHECKING:
    from simgpu import SimGpu

MAX_CONCURRENT_SESSIONS = 1
SESSION_TIMEOUT_MINUTES = 60
EXIT_OOM = 3


class SessionRef(BaseModel):
    session_id: str


class Service:
    def __init__(self, checkpoint_dir: Path, gpu: SimGpu | None) -> None:
        self.sessions: dict[str, Session] = {}
        self.checkpoint_dir = checkpoint_dir
        self.gpu = gpu
        self.asleep = False
        self.lock = asyncio.Lock()  # one sleep, wake or stop at a time

    def current(self) -> Session | None:
        """The session that holds the service's one slot: running, or asleep to resume."""
        return next((s for s in self.sessions.values()
                     if s.status in ("running", "sleeping")), None)

    def sleep_state(self) -> dict[str, Any]:
        s = next((s for s in self.sessions.values() if s.status == "sleeping"), None)
        return {"asleep": self.asleep, "session_id": s.id if s else None,
                "epoch": s.epoch if s else None,
                "checkpoint": str(s.checkpoint_path) if s else None}

    async def sleep(self) -> dict[str, Any]:
        async with self.lock:
            if not self.asleep:
                self.asleep = True  # no new run from here on
                s = self.current()
                if s is not None and s.status == "running" and s.thread is not None:
                    s.pause.set()
                    s.interrupt.set()
                    await asyncio.to_thread(s.thread.join)  # the epoch ends, the checkpoint
                await asyncio.to_thread(release_device_memory)
                if self.gpu is not None:
                    await asyncio.to_thread(self.gpu.sleep)
            return self.sleep_state()

    async def wake(self) -> JSONResponse:
        async with self.lock:
            resumed: dict[str, Any] = {}
            if self.asleep:
                try:
                    resumed = await self._take_back()
                except OutOfMemory as exc:
                    await asyncio.to_thread(release_device_memory)
                    if self.gpu is not None:
                        await asyncio.to_thread(self.gpu.sleep)
                    return JSONResponse({"error": "out_of_memory", "detail": str(exc),
                                         **self.sleep_state()}, status_code=503)
                self.asleep = False
            return JSONResponse({"asleep": False, "session_id": resumed.get("session_id"),
                                 "epoch": resumed.get("epoch"),
                                 "resumed_from": resumed.get("checkpoint")})

    async def _take_back(self) -> dict[str, Any]:
        """Take the memory back and resume the sleeping session, if any: what was resumed."""
        if self.gpu is not None:
            await asyncio.to_thread(self.gpu.wake)  # raises OutOfMemory
        s = next((s for s in self.sessions.values() if s.status == "sleeping"), None)
        if s is None:
            return {}
        try:
            run, history = await asyncio.to_thread(Run.restore, s.checkpoint_path, s.params,
                                                   s.device)
        except Exception as exc:
            if is_oom(exc):
                raise OutOfMemory(f"{type(exc).__name__}: {exc}") from exc
            s.fail(f"resuming from {s.checkpoint_path} failed: {type(exc).__name__}: {exc}")
            return {}
        s.history, s.epoch = history, run.epoch
        resumed = {"session_id": s.id, "epoch": run.epoch, "checkpoint": str(s.checkpoint_path)}
        s.launch(lambda: run)
        return resumed


def create_app(checkpoint_dir: Path | None = None, gpu: SimGpu | None = None) -> FastAPI:
    own_dir = checkpoint_dir is None
    ckpt = Path(tempfile.mkdtemp(prefix="training-checkpoints-")) if own_dir else checkpoint_dir
    assert ckpt is not None
    ckpt.mkdir(parents=True, exist_ok=True)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if own_dir:
            shutil.rmtree(ckpt, ignore_errors=True)

    app = FastAPI(title="training host service", lifespan=lifespan)
    svc = Service(ckpt, gpu)
    sessions = svc.sessions

    @app.get("/health")
    async def health() -> dict[str, Any]:
        busy = svc.current()
        return {"healthy": True, "service": "training-host", "timestamp": time.time(),
                "status": "ok", "worker_status": "busy" if busy else "idle",
                "current_operation": busy.id if busy else None, "asleep": svc.asleep}

    @app.get("/health/detailed")
    async def detailed() -> dict[str, Any]:
        torch = torch_module()
        gpu_info: dict[str, Any] = {"cuda_available": bool(torch and torch.cuda.is_available())}
        if gpu_info["cuda_available"]:
            gpu_info["name"] = torch.cuda.get_device_name(0)
            free, total = torch.cuda.mem_get_info()
            gpu_info.update(free_mb=free // 2**20, total_mb=total // 2**20)
        if gpu is not None:
            gpu_info["simulated_held_mb"] = gpu.held_mb()
        return {**(await health()), "device": device(), "torch": torch is not None,
                "gpu": gpu_info, "sessions": len(sessions)}

    @app.post("/training/start")
    async def start(body: StartBody) -> JSONResponse:
        if svc.asleep:
            return JSONResponse({"error": "asleep", "detail": "the service is asleep: "
                                 "POST /training/wake first"}, status_code=409)
        busy = svc.current()
        if busy is not None:
            return JSONResponse({"error": "busy", "detail": f"session {busy.id} is {busy.status} "
                                 f"(max_concurrent_sessions={MAX_CONCURRENT_SESSIONS})"},
                                status_code=409)
        dev = device()
        sid = uuid.uuid4().hex[:12]
        s = Session(sid, body, dev, svc.checkpoint_dir / f"{sid}.npz")
        sessions[s.id] = s
        s.launch(lambda: Run(body, dev))
        return JSONResponse({"session_id": s.id, "status": "started",
                             "message": f"training {body.epochs} epochs on {dev}",
                             "gpu_allocated": dev != "cpu", "device": dev})

    @app.post("/training/sleep")
    async def sleep() -> dict[str, Any]:
        return await svc.sleep()

    @app.post("/training/wake")
    async def wake() -> JSONResponse:
        return await svc.wake()

    @app.get("/training/sleeping")
    async def sleeping() -> dict[str, Any]:
        return svc.sleep_state()

    def find(session_id: str) -> Session | JSONResponse:
        s = sessions.get(session_id)
        if s is None:
            return JSONResponse({"error": "not_found", "detail": f"no session {session_id!r}"},
                                status_code=404)
        return s

    @app.post("/training/stop")
    async def stop(body: SessionRef) -> Any:
        async with svc.lock:
            s = find(body.session_id)
            if isinstance(s, JSONResponse):
                return s
            s.stop()
            return {"session_id": s.id,
                    "status": "stopping" if s.status == "running" else s.status}

    @app.get("/training/status/{session_id}")
    async def status(session_id: str) -> Any:
        s = find(session_id)
        return s if isinstance(s, JSONResponse) else s.as_dict(history=True)

    @app.get("/training/sessions")
    async def list_sessions() -> dict[str, Any]:
        return {"sessions": [s.as_dict() for s in sessions.values()]}

    @app.post("/training/evaluate")
    async def eval_(body: SessionRef) -> Any:
        s = find(body.session_id)
        if isinstance(s, JSONResponse):
            return s
        acc = None if s.weights is None or s.test_set is None else accuracy(s.weights,
                                                                             *s.test_set)
        return {"session_id": s.id, "accuracy": acc, "status": s.status}

    @app.delete("/training/sessions/{session_id}")
    async def delete(session_id: str) -> Any:
        async with svc.lock:
            s = find(session_id)
            if isinstance(s, JSONResponse):
                return s
            s.stop()
            del sessions[session_id]
            return {"session_id": session_id, "status": "deleted"}

    return app


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")  # localhost only by default
    ap.add_argument("--port", type=int, default=5002)
    ap.add_argument("--checkpoint-dir", type=Path, default=None,
                    help="where a sleeping run's checkpoint goes [default: a temporary "
                         "folder, removed at exit]")
    ap.add_argument("--sim-vram-mb", type=int, default=None,
                    help="hold this many MB on gpu-manager's simulated GPU while awake")
    ap.add_argument("--sim-residual-mb", type=int, default=0,
                    help="MB still held there while asleep [default: 0]")
    ap.add_argument("--sim-dir", type=Path, default=None,
                    help="the simulated GPU's registry [default: $GPU_MANAGER_SIM_DIR]")
    ap.add_argument("--name", default="training", help="its name in that registry")
    args = ap.parse_args()
    gpu = None
    if args.sim_vram_mb is not None:
        if not 0 <= args.sim_residual_mb <= args.sim_vram_mb:
            ap.error("--sim-residual-mb must be between 0 and --sim-vram-mb")
        # only here: the service itself needs no gpu-manager package
        from simgpu import SimGpu  # noqa: PLC0415

        try:
            gpu = SimGpu(args.sim_vram_mb, args.sim_residual_mb, args.sim_dir, args.name)
        except OutOfMemory as exc:  # as a CUDA service that cannot load its model
            print(exc, file=sys.stderr, flush=True)
            return EXIT_OOM
    uvicorn.run(create_app(args.checkpoint_dir, gpu), host=args.host, port=args.port,
                log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
