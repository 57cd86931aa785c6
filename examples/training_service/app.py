"""The training host service (interfaces.md §4), run by gpu-manager as a managed service.

A small FastAPI app that trains a real (small) model: logistic regression on synthetic data,
with torch on CUDA (or MPS) when torch is installed, otherwise numpy on the CPU. One session
at a time; progress at /training/status/{id}.

    python examples/training_service/app.py [--host 127.0.0.1] [--port 5002]
"""

from __future__ import annotations

import argparse
import importlib
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

MAX_CONCURRENT_SESSIONS = 1
SESSION_TIMEOUT_MINUTES = 60


def _torch() -> Any:
    try:
        return importlib.import_module("torch")
    except ImportError:
        return None


def device() -> str:
    torch = _torch()
    if torch is None:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


class StartBody(BaseModel):
    epochs: int = Field(default=200, ge=1, le=100_000)
    learning_rate: float = Field(default=0.1, gt=0, le=10)
    samples: int = Field(default=2000, ge=10, le=1_000_000)
    features: int = Field(default=20, ge=1, le=1000)
    seed: int = 0


class SessionRef(BaseModel):
    session_id: str


@dataclass
class Session:
    id: str
    params: StartBody
    device: str
    status: str = "running"  # running, completed, stopped, failed
    epoch: int = 0
    loss: float | None = None
    accuracy: float | None = None
    error: str | None = None
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    weights: Any = None
    data: Any = None

    def as_dict(self) -> dict[str, Any]:
        return {"session_id": self.id, "status": self.status, "device": self.device,
                "epoch": self.epoch, "epochs": self.params.epochs,
                "progress": round(self.epoch / self.params.epochs, 4),
                "loss": self.loss, "accuracy": self.accuracy, "error": self.error,
                "started_at": self.started_at, "finished_at": self.finished_at}


def make_data(p: StartBody) -> tuple[Any, Any, Any, Any]:
    rng = np.random.default_rng(p.seed)
    x = rng.normal(size=(p.samples, p.features)).astype(np.float32)
    true_w = rng.normal(size=p.features)
    y = (x @ true_w + 0.3 * rng.normal(size=p.samples) > 0).astype(np.float32)
    cut = int(p.samples * 0.8)
    return x[:cut], y[:cut], x[cut:], y[cut:]


def train(s: Session) -> None:
    p = s.params
    try:
        x, y, _, _ = s.data = make_data(p)
        torch = _torch()
        if torch is not None:
            dev = torch.device(s.device)
            xs, ys = torch.tensor(x, device=dev), torch.tensor(y, device=dev)
            w = torch.zeros(p.features, device=dev, requires_grad=True)
            opt = torch.optim.SGD([w], lr=p.learning_rate)
            for epoch in range(p.epochs):
                if s.cancel.is_set():
                    s.status = "stopped"
                    break
                opt.zero_grad()
                loss = torch.nn.functional.binary_cross_entropy_with_logits(xs @ w, ys)
                loss.backward()
                opt.step()
                s.epoch, s.loss = epoch + 1, float(loss)
            s.weights = w.detach().cpu().numpy()
        else:
            w = np.zeros(p.features, dtype=np.float32)
            for epoch in range(p.epochs):
                if s.cancel.is_set():
                    s.status = "stopped"
                    break
                pred = 1 / (1 + np.exp(-(x @ w)))
                w -= p.learning_rate * x.T @ (pred - y) / len(y)
                eps = 1e-7
                s.epoch = epoch + 1
                s.loss = float(-np.mean(y * np.log(pred + eps) + (1 - y) * np.log(1 - pred + eps)))
            s.weights = w
        s.accuracy = evaluate(s)
        if s.status == "running":
            s.status = "completed"
    except Exception as exc:  # a failed session is reported, never kills the service
        s.status, s.error = "failed", f"{type(exc).__name__}: {exc}"
    finally:
        s.finished_at = time.time()


def evaluate(s: Session) -> float | None:
    if s.weights is None or s.data is None:
        return None
    _, _, xt, yt = s.data
    return float(np.mean(((xt @ s.weights) > 0).astype(np.float32) == yt))


def create_app() -> FastAPI:
    app = FastAPI(title="training host service")
    sessions: dict[str, Session] = {}

    def current() -> Session | None:
        return next((s for s in sessions.values() if s.status == "running"), None)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        busy = current()
        return {"healthy": True, "service": "training-host", "timestamp": time.time(),
                "status": "ok", "worker_status": "busy" if busy else "idle",
                "current_operation": busy.id if busy else None}

    @app.get("/health/detailed")
    async def detailed() -> dict[str, Any]:
        torch = _torch()
        gpu: dict[str, Any] = {"cuda_available": bool(torch and torch.cuda.is_available())}
        if gpu["cuda_available"]:
            gpu["name"] = torch.cuda.get_device_name(0)
            free, total = torch.cuda.mem_get_info()
            gpu.update(free_mb=free // 2**20, total_mb=total // 2**20)
        return {**(await health()), "device": device(), "torch": torch is not None,
                "gpu": gpu, "sessions": len(sessions)}

    @app.post("/training/start")
    async def start(body: StartBody) -> JSONResponse:
        busy = current()
        if busy is not None:
            return JSONResponse({"error": "busy", "detail": f"session {busy.id} is running "
                                 f"(max_concurrent_sessions={MAX_CONCURRENT_SESSIONS})"},
                                status_code=409)
        dev = device()
        s = Session(uuid.uuid4().hex[:12], body, dev)
        sessions[s.id] = s
        threading.Thread(target=train, args=(s,), daemon=True).start()
        return JSONResponse({"session_id": s.id, "status": "started",
                             "message": f"training {body.epochs} epochs on {dev}",
                             "gpu_allocated": dev != "cpu", "device": dev})

    def find(session_id: str) -> Session | JSONResponse:
        s = sessions.get(session_id)
        if s is None:
            return JSONResponse({"error": "not_found", "detail": f"no session {session_id!r}"},
                                status_code=404)
        return s

    @app.post("/training/stop")
    async def stop(body: SessionRef) -> Any:
        s = find(body.session_id)
        if isinstance(s, JSONResponse):
            return s
        s.cancel.set()
        return {"session_id": s.id, "status": "stopping" if s.status == "running" else s.status}

    @app.get("/training/status/{session_id}")
    async def status(session_id: str) -> Any:
        s = find(session_id)
        return s if isinstance(s, JSONResponse) else s.as_dict()

    @app.get("/training/sessions")
    async def list_sessions() -> dict[str, Any]:
        return {"sessions": [s.as_dict() for s in sessions.values()]}

    @app.post("/training/evaluate")
    async def eval_(body: SessionRef) -> Any:
        s = find(body.session_id)
        if isinstance(s, JSONResponse):
            return s
        return {"session_id": s.id, "accuracy": evaluate(s), "status": s.status}

    @app.delete("/training/sessions/{session_id}")
    async def delete(session_id: str) -> Any:
        s = find(session_id)
        if isinstance(s, JSONResponse):
            return s
        s.cancel.set()
        del sessions[session_id]
        return {"session_id": session_id, "status": "deleted"}

    return app


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")  # localhost only by default
    ap.add_argument("--port", type=int, default=5002)
    args = ap.parse_args()
    uvicorn.run(create_app(), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
