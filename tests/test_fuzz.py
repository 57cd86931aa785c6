"""The published contract, checked the way a user would: the stock schemathesis CLI with
`--checks all` (examples, coverage, fuzzing and stateful phases) against a live daemon, once
without a token and once with one. Every answer must be one the schema documents, in the
shape and media type it declares; invalid input must be refused and valid input taken; with a
token, a call without it must be refused. Then the daemon's state must still add up."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import DaemonProc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# The stand-ins start fast so that the transitions the fuzzer triggers stay cheap.
FAST = {'"--startup-s", "1.5"': '"--startup-s", "0.1"',
        '"--startup-s", "1.0"': '"--startup-s", "0.1"',
        '"--startup-s", "0.5"': '"--startup-s", "0.1"'}
# Leases expire fast and acquires wait at most briefly, so that one case's lease does not
# make the next ones wait out their timeouts (every wait is within the request timeout).
LEASES = "\nleases:\n  legacy_wait_s: 0.3\n  default_ttl_s: 1\n  max_ttl_s: 1\n  max_wait_s: 2\n"
TOKEN = "fuzz-token-7c1d"
CLI = Path(sys.executable).with_name("schemathesis")


def start(tmp: Path, token: str | None = None) -> DaemonProc:
    return DaemonProc(tmp, replace=FAST, extra_services=LEASES, token=token).start()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    d = start(tmp_path_factory.mktemp("fuzz"))
    yield d
    d.close()


def schemathesis(d: DaemonProc, *args: str, budget_s: float = 400) -> str:
    """Run the CLI; fail with its report unless it found nothing."""
    cmd = [str(CLI), "run", f"{d.url}/openapi.json", "--checks", "all", "--workers", "1",
           "--no-color", "--generation-database", "none", *args]
    t0 = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=budget_s, check=False)
    out = result.stdout + result.stderr
    summary = out[out.rfind("SUMMARY"):] if "SUMMARY" in out else out[-3000:]
    print(f"{' '.join(cmd[2:])}: {time.monotonic() - t0:.0f} s\n{summary}")
    assert result.returncode == 0, out[-20000:]
    # exit 0 and the last line says so: nothing failed, nothing errored
    last = out.strip().splitlines()[-1]
    assert re.search(r"(No issues found|\d+ warnings?) in [\d.]+s", last), out[-5000:]
    assert not re.search(r"\d+ (failures?|errors?)", last), out[-5000:]
    return out


def test_the_contract_holds_without_a_token(live: DaemonProc) -> None:
    out = schemathesis(live, "--max-examples", "30", "--exclude-path", "/gpu/events",
                       "--request-timeout", "20")
    assert re.search(r"Tested: (\d+)", out) and int(re.findall(r"Tested: (\d+)", out)[0]) >= 19
    for phase in ("Examples", "Coverage", "Fuzzing", "Stateful"):
        assert re.search(rf"✅ {phase}", out), f"the {phase} phase did not run clean"


def test_the_event_stream_keeps_its_contract(live: DaemonProc) -> None:
    # An endless stream: each case reads until the request timeout, and what it got (the
    # media type, each event against the declared event schema) is checked.
    schemathesis(live, "--max-examples", "5", "--include-path", "/gpu/events",
                 "--request-timeout", "1")


def test_the_contract_holds_with_a_token(tmp_path: Path) -> None:
    d = start(tmp_path, token=TOKEN)
    try:
        schema = d.get("/openapi.json").json()
        assert {"HTTPBearer", "APIKeyHeader"} <= set(schema["components"]["securitySchemes"])
        # with the token: everything works; the `ignored_auth` check also sends each
        # mutating call without it and requires a 401
        schemathesis(d, "--max-examples", "20", "--exclude-path", "/gpu/events",
                     "--request-timeout", "20", "--header", f"Authorization: Bearer {TOKEN}")
    finally:
        d.close()


def test_state_adds_up_after_fuzzing(live: DaemonProc) -> None:
    status = live.status()
    assert status["operations"] == []
    for name, svc in status["services"].items():
        running = svc["state"] in ("starting", "ready", "unhealthy")
        assert running == bool(svc["pids"]), (name, svc)
    assert status["vram"]["used_mb"] <= status["vram"]["total_mb"]
    for lease in live.get("/gpu/state").json()["leases"]:  # the fuzzer's own leases
        assert live.post("/gpu/release", json={"session_id": lease["session_id"]}).json()[
            "success"]
    assert live.post("/gpu/release-all").status_code == 200
    assert live.post("/gpu/prepare-phase/2").status_code == 200


def test_every_route_declares_its_answers(live: DaemonProc) -> None:
    schema = live.get("/openapi.json").json()
    assert schema["openapi"].startswith("3.1")
    for path, methods in schema["paths"].items():
        for method, op in methods.items():
            codes = set(op["responses"])
            assert "200" in codes and "403" in codes, (method, path, codes)
            if op.get("parameters") or op.get("requestBody"):
                invalid = op["responses"]["422"]["content"]["application/json"]["schema"]
                assert invalid == {"$ref": "#/components/schemas/Invalid"}, (method, path)
            assert "HTTPValidationError" not in str(op["responses"])
    metrics = schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain; version=0.0.4; charset=utf-8"]
    events = schema["paths"]["/gpu/events"]["get"]["responses"]["200"]["content"]
    assert list(events) == ["text/event-stream"]


def test_an_acquire_that_can_never_fit_is_refused_at_once(live: DaemonProc) -> None:
    t0 = time.monotonic()
    r = live.post("/gpu/acquire", json={"session_id": "huge", "requester": "t",
                                        "vram_mb": 10**9, "timeout_ms": 60_000})
    assert r.status_code == 409 and "more than this GPU can ever give" in r.json()["error"]
    assert time.monotonic() - t0 < 2
