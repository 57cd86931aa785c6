"""Served stand-ins for the front-door tests: services.yaml blocks with `serve:`."""

from __future__ import annotations

SERVED = """
  {name}:
    type: native
    vram_mb: {vram}
    priority: {priority}
    command: ["{{python}}", "-m", "gpu_manager.sim.workload", "--name", "{name}",
              "--vram-mb", "{vram}", "--port", "{port}", "--startup-s", "{startup}",
              "--api", "{api}", "--sleep-s", "0.1", "--wake-s", "{wake}",
              "--sleep-vram-mb", "300", "--model", "{model}", "--token-ms", "{token_ms}"]
    health: {{url: "http://127.0.0.1:{port}/health", timeout_s: 2, interval_s: 1}}
    start_timeout_s: 20
    stop_timeout_s: 5
    sleep: {{api: {api}, url: "http://127.0.0.1:{port}", residual_mb: 500, timeout_s: 5}}
    serve:
      url: "http://127.0.0.1:{serve_port}"
      models: [{model}]
{serve_extra}"""


def served(name: str, port: int, model: str, *, vram: int = 14000, priority: int = 10,
           api: str = "vllm", startup: float = 0.5, wake: float = 0.1, token_ms: float = 2,
           serve_port: int | None = None, serve_extra: str = "") -> str:
    """A stand-in speaking `api` that serves `model` through the front door. `serve_extra`:
    more lines of its `serve:` block (indented six spaces)."""
    extra = "".join(f"      {line}\n" for line in serve_extra.splitlines() if line.strip())
    return SERVED.format(name=name, port=port, model=model, vram=vram, priority=priority,
                         api=api, startup=startup, wake=wake, token_ms=token_ms,
                         serve_port=serve_port or port, serve_extra=extra)
