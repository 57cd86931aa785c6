"""The `gpu-manager` command line: local commands, client verbs and `serve`."""

from __future__ import annotations

import sys


def main() -> None:
    # `serve` is what systemd restarts: it loads only the server's modules, not the client
    # verbs' (tables, the HTTP client's own CLI), so a restart is back on /ready sooner.
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        # The HTTP client's own command line (httpx._main: click, rich, pygments) is
        # imported by `import httpx` whenever its extras are installed; the server never
        # uses it. A None entry makes that import fail, which httpx handles (its `main`
        # then says to install httpx[cli]).
        sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
        from gpu_manager.cli.serve import serve_only  # noqa: PLC0415

        serve_only(sys.argv[2:])
        return
    from gpu_manager.cli import client, fleet, local, serve  # noqa: F401, PLC0415 - they register
    from gpu_manager.cli.common import app  # noqa: PLC0415

    app.command("serve")(serve.serve)
    app()


__all__ = ["main"]
