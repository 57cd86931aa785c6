"""Logging: readable lines on the console, JSON lines in the state dir (loguru).

Every record carries `service`, `reason` and `duration_s` where they apply (bound with
`logger.bind`), so the JSON file answers "what happened to vidi at 10:02 and why". Secrets
never reach a log: the token is a SecretStr and no code path formats it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from loguru import logger

CONSOLE = ("<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
           "<cyan>{extra[service]}</cyan> {message}")


def setup(state_dir: Path, level: str = "INFO") -> Path:
    logger.remove()
    logger.configure(extra={"service": "-"})
    logger.add(sys.stderr, level=level.upper(), format=CONSOLE, colorize=None)
    path = state_dir / "logs" / "gpu-manager.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    logger.add(path, level="DEBUG", serialize=True, rotation="10 MB", retention=5,
               enqueue=True)
    return path
