"""`gpu-manager serve`: run the daemon.

`gpu-manager serve ...` comes here straight from `cli.main` (`serve_only`), without the
client verbs' modules; `gpu-manager --help` lists it with the others (`cli.main` adds it).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

import typer
from loguru import logger

from gpu_manager import statedir
from gpu_manager.cli.options import ConfigDirOpt
from gpu_manager.config import ConfigError, load_inventory
from gpu_manager.logs import setup as setup_logs
from gpu_manager.settings import Settings


def serve(
    host: Annotated[str | None, typer.Option(help="Bind address [$GPU_MANAGER_HOST, "
                                             "default 127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option(help="[$GPU_MANAGER_PORT, default 8000]")] = None,
    config_dir: ConfigDirOpt = None,
    state_dir: Annotated[Path | None, typer.Option(help="[$GPU_MANAGER_STATE_DIR]")] = None,
) -> None:
    """Run the daemon: the HTTP API on the inventory in --config-dir."""
    overrides: dict[str, Any] = {k: v for k, v in {
        "host": host, "port": port, "config_dir": config_dir, "state_dir": state_dir,
    }.items() if v is not None}
    settings = Settings(**overrides)
    if not settings.loopback and settings.token_value() is None:
        typer.secho(f"refusing to bind {settings.host}: a non-loopback address needs "
                    "GPU_MANAGER_TOKEN set (every mutating call then needs it)", fg="red",
                    err=True)
        raise typer.Exit(2)
    try:
        inventory = load_inventory(settings.config_dir)
    except ConfigError as exc:
        for issue in exc.issues:
            typer.echo(str(issue), err=True)
        raise typer.Exit(1) from None
    try:
        # One daemon per state directory, before anything is read, adopted or logged there.
        statedir.hold(settings.state_dir)
    except statedir.StateDirBusy as exc:
        typer.secho(f"refusing to start: {exc}", fg="red", err=True)
        raise typer.Exit(1) from None
    log_file = setup_logs(settings.state_dir, settings.log_level)
    logger.info(f"logging JSON lines to {log_file}")
    # The web stack and drivers load only to serve, so client verbs start fast.
    from gpu_manager.api.app import create_app  # noqa: PLC0415

    app_ = create_app(settings, inventory, exit_watchdog=True)
    import uvicorn  # noqa: PLC0415

    daemon = app_.state.daemon

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            # The shutdown budget counts from the signal: operations in flight get what
            # is left of it (then they are cancelled and their callers answered), not a
            # full budget of their own after uvicorn's wait for open requests.
            if self.started:
                loop = asyncio.get_running_loop()
                loop.call_soon_threadsafe(daemon.begin_shutdown)

    # Open requests (a client waiting on its transition) may run the whole budget: the
    # daemon cancels the transitions in flight before it, so they are answered in it.
    config = uvicorn.Config(app_, host=settings.host, port=settings.port,
                            log_level="warning", lifespan="on", access_log=False,
                            timeout_graceful_shutdown=max(1, int(settings.shutdown_timeout_s)))
    Server(config).run()


def serve_only(args: list[str]) -> None:
    """`gpu-manager serve ARGS`: the same command, alone on an app of its own."""
    single = typer.Typer(add_completion=False)
    single.command()(serve)
    single(args=args, prog_name="gpu-manager serve")
