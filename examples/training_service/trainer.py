"""One training session: logistic regression on synthetic data, trained epoch by epoch with
torch (CUDA, MPS or CPU) when it is installed, else numpy on the CPU, and checkpointed so that
a run put to sleep resumes exactly where it stopped.

A checkpoint is taken at an epoch boundary and holds everything the next epoch depends on: the
weights, the optimizer's state (torch), the epoch counter, the shuffling RNG's state (with
`batch_size`), the per-epoch history and the run's parameters (the data set is regenerated
from its seed). A resumed run therefore computes bit for bit what an uninterrupted one would,
and no finished epoch is lost or counted twice.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import io
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

CHECKPOINT_VERSION = 1


def torch_module() -> Any:
    try:
        return importlib.import_module("torch")
    except ImportError:
        return None


def device() -> str:
    torch = torch_module()
    if torch is None:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


def release_device_memory() -> None:
    """Hand freed device memory back to the driver. Dropping a tensor only returns its block
    to torch's caching allocator; nvidia-smi (and gpu-manager) see it free once emptied."""
    gc.collect()
    torch = torch_module()
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


class OutOfMemory(Exception):
    """The device does not have the memory asked for (CUDA out of memory, or simulated)."""


def is_oom(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


class StartBody(BaseModel):
    epochs: int = Field(default=200, ge=1, le=100_000)
    learning_rate: float = Field(default=0.1, gt=0, le=10)
    samples: int = Field(default=2000, ge=10, le=1_000_000)
    features: int = Field(default=20, ge=1, le=1000)
    seed: int = 0
    # None: one full-batch step per epoch; else shuffled minibatches of this size
    batch_size: int | None = Field(default=None, ge=1, le=1_000_000)
    # a pause after each epoch (pacing, and for tests: a run that lasts long enough to preempt)
    epoch_delay_s: float = Field(default=0.0, ge=0, le=60)


def make_data(p: StartBody) -> tuple[Any, Any, Any, Any]:
    rng = np.random.default_rng(p.seed)
    x = rng.normal(size=(p.samples, p.features)).astype(np.float32)
    true_w = rng.normal(size=p.features)
    y = (x @ true_w + 0.3 * rng.normal(size=p.samples) > 0).astype(np.float32)
    cut = int(p.samples * 0.8)
    return x[:cut], y[:cut], x[cut:], y[cut:]


def accuracy(weights: Any, xt: Any, yt: Any) -> float:
    return float(np.mean(((xt @ weights) > 0).astype(np.float32) == yt))


class Run:
    """What a session holds on its device while it trains: data, weights, optimizer, RNG."""

    def __init__(self, p: StartBody, dev: str, *, epoch: int = 0, weights: Any = None,
                 rng_state: dict[str, Any] | None = None, opt_state: bytes | None = None) -> None:
        self.p, self.epoch = p, epoch
        x, y, self.xt, self.yt = make_data(p)
        self.n = len(y)
        self.rng = np.random.default_rng([p.seed, 1])  # a stream of its own: the shuffling
        if rng_state is not None:
            self.rng.bit_generator.state = rng_state
        w0 = np.zeros(p.features, dtype=np.float32) if weights is None else weights
        self.torch = torch_module()
        self.opt: Any = None
        if self.torch is not None:
            t = self.torch
            where = t.device(dev)
            self.x, self.y = t.tensor(x, device=where), t.tensor(y, device=where)
            self.w = t.tensor(np.asarray(w0, dtype=np.float32), device=where,
                              requires_grad=True)
            self.opt = t.optim.SGD([self.w], lr=p.learning_rate)
            if opt_state is not None:
                self.opt.load_state_dict(t.load(io.BytesIO(opt_state), weights_only=True))
        else:
            self.x, self.y = x, y
            self.w = np.array(w0, dtype=np.float32)

    def _batches(self) -> list[Any]:
        bs = self.p.batch_size
        if bs is None or bs >= self.n:
            return [None]  # the whole set, in order
        order = self.rng.permutation(self.n)
        return [order[i:i + bs] for i in range(0, self.n, bs)]

    def train_epoch(self) -> float:
        """One pass over the data; the mean loss of its steps."""
        losses = [self._step(idx) for idx in self._batches()]
        self.epoch += 1
        return float(np.mean(losses))

    def _step(self, idx: Any) -> float:
        lr = self.p.learning_rate
        if self.torch is not None:
            t = self.torch
            x, y = self.x, self.y
            if idx is not None:
                sel = t.as_tensor(idx, device=self.x.device)
                x, y = x[sel], y[sel]
            self.opt.zero_grad()
            loss = t.nn.functional.binary_cross_entropy_with_logits(x @ self.w, y)
            loss.backward()
            self.opt.step()
            return float(loss.detach())
        x, y = (self.x, self.y) if idx is None else (self.x[idx], self.y[idx])
        pred = 1 / (1 + np.exp(-(x @ self.w)))
        self.w -= lr * x.T @ (pred - y) / len(y)
        eps = 1e-7
        return float(-np.mean(y * np.log(pred + eps) + (1 - y) * np.log(1 - pred + eps)))

    def weights(self) -> Any:
        if self.torch is not None:
            return self.w.detach().cpu().numpy().copy()
        return self.w.copy()

    def save(self, path: Path, history: list[dict[str, Any]]) -> None:
        """Write the checkpoint atomically (a crash mid-write leaves the previous one)."""
        meta = {"version": CHECKPOINT_VERSION, "epoch": self.epoch, "history": history,
                "params": self.p.model_dump(), "rng": self.rng.bit_generator.state}
        arrays: dict[str, Any] = {"weights": self.weights(), "meta": np.array(json.dumps(meta))}
        if self.opt is not None:
            buf = io.BytesIO()
            self.torch.save(self.opt.state_dict(), buf)
            arrays["optimizer"] = np.frombuffer(buf.getvalue(), dtype=np.uint8)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    @classmethod
    def restore(cls, path: Path, p: StartBody, dev: str) -> tuple[Run, list[dict[str, Any]]]:
        """The run as it was saved, on `dev`, and its history."""
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            weights = z["weights"].copy()
            opt = z["optimizer"].tobytes() if "optimizer" in z.files else None
        if meta.get("version") != CHECKPOINT_VERSION or meta.get("params") != p.model_dump():
            raise ValueError(f"checkpoint {path} belongs to another run")
        run = cls(p, dev, epoch=int(meta["epoch"]), weights=weights, rng_state=meta["rng"],
                  opt_state=opt)
        return run, list(meta["history"])

    def free(self) -> None:
        """Drop every device tensor (the caller then empties the allocator's cache)."""
        self.x = self.y = self.w = self.opt = None


@dataclass
class Session:
    id: str
    params: StartBody
    device: str
    checkpoint_path: Path
    status: str = "running"  # running, sleeping, completed, stopped, failed
    epoch: int = 0
    loss: float | None = None
    accuracy: float | None = None
    error: str | None = None
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # {epoch, loss} per epoch
    sleeps: int = 0  # times it was checkpointed and put to sleep
    cancel: threading.Event = field(default_factory=threading.Event)
    pause: threading.Event = field(default_factory=threading.Event)
    interrupt: threading.Event = field(default_factory=threading.Event)  # cuts the pacing
    thread: threading.Thread | None = None
    weights: Any = None
    test_set: tuple[Any, Any] | None = None

    def as_dict(self, history: bool = False) -> dict[str, Any]:
        out = {"session_id": self.id, "status": self.status, "device": self.device,
               "epoch": self.epoch, "epochs": self.params.epochs,
               "progress": round(self.epoch / self.params.epochs, 4),
               "loss": self.loss, "accuracy": self.accuracy, "error": self.error,
               "started_at": self.started_at, "finished_at": self.finished_at,
               "sleeps": self.sleeps,
               "checkpoint": str(self.checkpoint_path) if self.status == "sleeping" else None}
        if history:
            out["history"] = self.history
        return out

    def launch(self, make_run: Callable[[], Run]) -> None:
        """Train on a thread of its own, from the run `make_run` builds (fresh or restored)."""
        self.status = "running"
        self.pause.clear()
        self.interrupt.clear()
        self.thread = threading.Thread(target=self._train, args=(make_run,), daemon=True,
                                       name=f"train-{self.id}")
        self.thread.start()

    def stop(self) -> None:
        self.cancel.set()
        self.interrupt.set()
        if self.status == "sleeping":  # no thread: it ends here
            self._end("stopped")

    def fail(self, error: str) -> None:
        self.error = error
        self._end("failed")

    def _end(self, status: str) -> None:
        """The final status, set last: whoever sees it sees the run's final state."""
        self.finished_at = time.time()
        with contextlib.suppress(OSError):
            self.checkpoint_path.unlink(missing_ok=True)
        self.status = status

    def _train(self, make_run: Callable[[], Run]) -> None:
        p = self.params
        run: Run | None = None
        outcome = "completed"
        try:
            run = make_run()
            while run.epoch < p.epochs:
                if self.cancel.is_set():
                    outcome = "stopped"
                    break
                if self.pause.is_set():
                    # at an epoch boundary: the epoch in progress has finished and is counted
                    run.save(self.checkpoint_path, self.history)
                    self.sleeps += 1
                    self.status = "sleeping"
                    return  # the sleep joins this thread: its tensors are gone by then
                index = run.epoch
                loss = run.train_epoch()
                self.history.append({"epoch": index, "loss": loss})
                self.epoch, self.loss = run.epoch, loss
                if run.epoch < p.epochs and p.epoch_delay_s > 0:
                    self.interrupt.wait(p.epoch_delay_s)
            self.weights, self.test_set = run.weights(), (run.xt, run.yt)
            self.accuracy = accuracy(self.weights, run.xt, run.yt)
        except Exception as exc:  # a failed session is reported, never kills the service
            outcome, self.error = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            if run is not None:
                run.free()
        self._end(outcome)
