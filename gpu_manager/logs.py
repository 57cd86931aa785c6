"""Logging: readable lines on the console, JSON lines in the state dir (loguru).

Every record carries `service`, `reason` and `duration_s` where they apply (bound with
`logger.bind`), so the JSON file answers "what happened to vidi at 10:02 and why". Secrets
never reach a log: the token is a SecretStr and no code path formats it, and every message
and traceback passes through `redact_url`, so no URL in it keeps its password (a Redis URL
may carry one). uvicorn logs through the standard library: its records are redacted too.
"""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger

from gpu_manager.redact import redact_url

if TYPE_CHECKING:
    from loguru import Record  # only in loguru's type stubs

CONSOLE = ("<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
           "<cyan>{extra[service]}</cyan> {message}")


def _redact(record: Record) -> None:
    message = record["message"]
    exc = record["exception"]
    if exc is not None and exc.type is not None:
        # Rendered here as plain text, not by loguru, whose rendering cannot be redacted and
        # (with `diagnose`) prints the values of local variables: secrets included.
        trace = "".join(traceback.format_exception(exc.type, exc.value, exc.traceback))
        message = f"{message}\n{trace.rstrip()}"
        record["exception"] = None
    record["message"] = redact_url(message)


class RedactFilter(logging.Filter):
    """The same for a standard-library record (uvicorn's "Exception in ASGI application")."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact_url(record.getMessage()), None
        if record.exc_info and record.exc_info[0] is not None:
            # a Formatter uses exc_text as it is when set
            record.exc_text = redact_url("".join(traceback.format_exception(
                *record.exc_info)).rstrip())
        return True


def setup(state_dir: Path, level: str = "INFO") -> Path:
    logger.remove()
    logger.configure(extra={"service": "-"}, patcher=_redact)
    logger.add(sys.stderr, level=level.upper(), format=CONSOLE, colorize=None)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).addFilter(RedactFilter())
    path = state_dir / "logs" / "gpu-manager.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    logger.add(path, level="DEBUG", serialize=True, rotation="10 MB", retention=5,
               enqueue=True)
    return path
