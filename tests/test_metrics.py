"""/metrics follows Prometheus' conventions (promtool), and what deploy/ ships checks out:
the scrape config, the alert rules and their unit tests, and a dashboard whose queries name
only metrics the daemon exposes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import ROOT, DaemonProc
from tests.support.env import unavailable, wait_for

DEPLOY = ROOT / "deploy"
MIB = 1024 * 1024
NAME = re.compile(r"\b((?:gpu_manager|process)_[a-z_]+)\b")


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    if exe is None:
        unavailable("promtool not found (Debian package `prometheus`)")
    return subprocess.run([exe, *args], input=stdin, capture_output=True, text=True,
                          timeout=60, check=False, cwd=DEPLOY / "prometheus")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    d = DaemonProc(tmp_path_factory.mktemp("metrics")).start()
    yield d
    d.close()


def sample(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            got = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
            if all(got.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return None


def exposed(text: str) -> set[str]:
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines()
            if line and not line.startswith("#")}


def test_the_scrape_passes_promtool_and_says_what_happened(daemon: DaemonProc) -> None:
    assert daemon.post("/gpu/prepare-phase/2").status_code == 200
    text = daemon.get("/metrics").text
    check = promtool("check", "metrics", stdin=text)
    assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), check
    status = daemon.status()
    assert sample(text, "gpu_manager_vram_total_bytes", device="0") == \
        status["vram"]["total_mb"] * MIB
    assert sample(text, "gpu_manager_vram_used_bytes", device="0") == \
        status["vram"]["used_mb"] * MIB
    assert sample(text, "gpu_manager_vram_reserve_bytes", device="0") == 1024 * MIB
    assert sample(text, "gpu_manager_vram_foreign_bytes", device="0") == 0
    assert sample(text, "gpu_manager_service_state", service="vidi", state="ready") == 1
    assert sample(text, "gpu_manager_service_state", service="vidi", state="stopped") == 0
    assert sample(text, "gpu_manager_service_vram_measured_bytes", service="vidi",
                  device="0") == status["services"]["vidi"]["measured_mb"] * MIB
    assert sample(text, "gpu_manager_transition_duration_seconds_count",
                  kind="PreparePhase", outcome="succeeded") == 1
    assert sample(text, "gpu_manager_lock_held", kind="operation") == 0
    assert sample(text, "gpu_manager_lock_held_seconds") == 0
    # no free-text label values: every label is one of a few known sets
    values = set(re.findall(r'(\w+)="', text))
    assert values <= {"device", "service", "state", "kind", "outcome", "le", "version"}


def test_the_lock_shows_who_holds_it_and_for_how_long(daemon: DaemonProc) -> None:
    got = daemon.post("/gpu/acquire", json={"session_id": "metrics-test", "requester": "t",
                                            "vram_mb": 100, "ttl_s": 60})
    assert got.json()["success"], got.text
    try:
        def held() -> bool:
            text = daemon.get("/metrics").text
            return (sample(text, "gpu_manager_lock_held", kind="leases") == 1
                    and (sample(text, "gpu_manager_lock_held_seconds") or 0) > 0.3)
        wait_for(held, 10, "the lease shown as the lock's holder, held for a while")
        text = daemon.get("/metrics").text
        assert sample(text, "gpu_manager_leases") == 1
        assert sample(text, "gpu_manager_lock_held", kind="operation") == 0
    finally:
        daemon.post("/gpu/release", json={"session_id": "metrics-test"})
    wait_for(lambda: sample(daemon.get("/metrics").text, "gpu_manager_lock_held_seconds") == 0,
             10, "the lock free again")


def test_the_scrape_config_and_alert_rules_check_out() -> None:
    for args in (("check", "config", "prometheus.yml"), ("check", "rules", "alerts.yml"),
                 ("test", "rules", "alerts_test.yml")):
        result = promtool(*args)
        assert result.returncode == 0, (args, result.stdout, result.stderr)


def test_every_alert_fires_in_its_unit_test() -> None:
    rules = (DEPLOY / "prometheus" / "alerts.yml").read_text()
    tested = (DEPLOY / "prometheus" / "alerts_test.yml").read_text()
    alerts = re.findall(r"- alert: (\w+)", rules)
    assert len(alerts) >= 6
    for alert in alerts:
        assert re.search(rf"alertname: {alert}\n\s+exp_alerts:\n\s+- exp_labels", tested), \
            f"{alert} has no unit test that makes it fire"


def test_dashboard_and_alerts_name_only_metrics_the_daemon_exposes(daemon: DaemonProc) -> None:
    # a lease and a transition first, so that optional series (TTL, histogram) are present
    daemon.post("/gpu/prepare-phase/3")
    text = daemon.get("/metrics").text
    names = exposed(text)
    dashboard = json.loads((DEPLOY / "grafana" / "gpu-manager-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs.append(dashboard["templating"]["list"][1]["query"]["query"])
    exprs.append((DEPLOY / "prometheus" / "alerts.yml").read_text())
    used = {n for e in exprs for n in NAME.findall(e)}
    optional = {"gpu_manager_lock_ttl_seconds", "gpu_manager_gpu_temperature_celsius",
                "gpu_manager_gpu_utilization_ratio"}  # only while held / when NVML says
    missing = used - names - optional
    assert not missing, f"queries name metrics the daemon does not expose: {missing}"
    assert len(used) >= 15
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert all(p["datasource"]["uid"] == "${datasource}" for p in dashboard["panels"])


def test_the_probe_age_is_fresh(daemon: DaemonProc) -> None:
    def fresh() -> bool:
        age = sample(daemon.get("/metrics").text, "gpu_manager_probe_age_seconds")
        return age is not None and 0 <= age < 5
    wait_for(fresh, 10, "a probe sample younger than 5 s")


async def test_a_lock_backend_that_cannot_answer_does_not_restart_the_held_clock(
        tmp_path: Path) -> None:
    # Unknown is not free: a Redis that misses one read must not reset "held for" (and hide a
    # lock stuck for an hour behind a fresh zero) nor start a new holder's clock.
    from gpu_manager.daemon import Daemon
    from gpu_manager.lock.base import LockInfo
    from gpu_manager.settings import Settings

    answers = [LockInfo("redis", "legacy-job", 5000), LockInfo("redis", None, None, ok=False,
                                                                  error="timeout"),
               LockInfo("redis", "legacy-job", 4000), LockInfo("redis", None, None)]

    class Lock:
        backend = "redis"

        async def info(self) -> LockInfo:
            return answers.pop(0)

    d = Daemon(Settings(config_dir=ROOT, state_dir=tmp_path))
    d.lock = Lock()  # type: ignore[assignment]
    await d.refresh_lock_info()
    since = d.lock_held_since
    assert since is not None
    await d.refresh_lock_info()
    assert not d.lock_info.ok and d.lock_held_since == since
    await d.refresh_lock_info()
    assert d.lock_held_since == since
    await d.refresh_lock_info()
    assert d.lock_held_since is None
