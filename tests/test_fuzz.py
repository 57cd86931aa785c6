"""Fuzz the HTTP API from its own OpenAPI schema (schemathesis) against a live daemon:
no 5xx on any input, and the state still adds up afterwards."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.support.daemon import DaemonProc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# The stand-ins start fast so that the transitions the fuzzer triggers stay cheap.
FAST = {'"--startup-s", "1.5"': '"--startup-s", "0.1"',
        '"--startup-s", "1.0"': '"--startup-s", "0.1"',
        '"--startup-s", "0.5"': '"--startup-s", "0.1"'}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    # Leases the fuzzer takes expire fast, and legacy requests wait briefly, so that one
    # example's lease does not make every later one wait out its timeout.
    leases = "leases:\n  legacy_wait_s: 0.3\n  default_ttl_s: 1\n  max_ttl_s: 1\n"
    d = DaemonProc(tmp_path_factory.mktemp("fuzz"), replace=FAST,
                   extra_services="\n" + leases).start()
    yield d
    d.close()


def check(live: DaemonProc, case: Any) -> None:
    if isinstance(case.body, dict) and isinstance(case.body.get("timeout_ms"), int):
        # a valid acquire may wait up to 10 minutes for room; keep the fuzz run short
        case.body["timeout_ms"] = min(case.body["timeout_ms"], 500)
    response = case.call(base_url=live.url, timeout=120)
    # 502/504 report a service that failed to start or VRAM that did not come back: outcomes
    # of real processes, not of the input. Anything else 5xx is a bug.
    assert response.status_code < 500 or response.status_code in (502, 503, 504), (
        case.as_curl_command(), response.status_code, response.text[:500])
    if response.status_code >= 500:  # then it must be our JSON error, saying what happened
        assert response.json()["error"] in ("start_failed", "stop_failed", "reclaim_timeout",
                                            "lock_unavailable", "lock_lost", "shutting_down")


def test_api_never_answers_5xx(live: DaemonProc) -> None:
    # schemathesis' pytest plugin (from_fixture) does not run under pytest 9 yet, so the
    # operations' hypothesis strategies are driven directly.
    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    # An endless event stream is no request/response pair to fuzz.
    operations = [op for op in operations if op.path != "/gpu/events"]
    assert len(operations) >= 15
    took: dict[str, float] = {}
    for op in operations:
        t0 = time.monotonic()

        @settings(max_examples=12, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def fuzz(case: Any) -> None:
            check(live, case)

        fuzz()
        took[f"{op.method.upper()} {op.path}"] = round(time.monotonic() - t0, 1)
    print(sorted(took.items(), key=lambda kv: -kv[1])[:8])


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
