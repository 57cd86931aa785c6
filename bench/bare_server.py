"""The baseline for the status load test: a bare FastAPI endpoint returning a JSON body of the
same size and shape as a captured /gpu/status, with nothing behind it.

    python -m bench.bare_server PORT PAYLOAD_JSON_FILE
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse


def main() -> None:
    port, payload_file = int(sys.argv[1]), Path(sys.argv[2])
    payload: dict[str, Any] = json.loads(payload_file.read_text())
    app = FastAPI()

    @app.get("/gpu/status")
    async def status() -> JSONResponse:
        return JSONResponse(payload)  # serialised per request, as the real endpoint does

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
