"""Logging: readable lines on the console, JSON lines in the state dir (loguru).

Every record carries `service`, `reason` and `duration_s` where they apply (bound with
`logger.bind`), so the JSON file answers "what happened to vidi at 10:02 and why". Secrets
never reach a log: the token is a SecretStr and no code path formats it, and every message
passes through `redact_url`, so no URL in it keeps its password (a Redis URL may carry one).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger

from gpu_manager.redact import redact_url

if TYPE_CHECKING:
    from loguru import Record  # only in loguru's type stubs

CONSOLE = ("<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
           "<cyan>{extra[service]}</cyan> {message}")


def _redact(record: Record) -> None:
    record["message"] = redact_url(record["message"])


def setup(state_dir: Path, level: str = "INFO") -> Path:
    logger.remove()
    logger.configure(extra={"service": "-"}, patcher=_redact)
    logger.add(sys.stderr, level=level.upper(), format=CONSOLE, colorize=None)
    path = state_dir / "logs" / "gpu-manager.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    logger.add(path, level="DEBUG", serialize=True, rotation="10 MB", retention=5,
               enqueue=True)
    return path
