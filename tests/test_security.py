"""Security defaults: what a web page, a DNS-rebinding page, a managed child and a client
reading errors can and cannot get from a daemon on loopback. Mostly against the real daemon."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi import FastAPI
from loguru import logger

from gpu_manager.api import errors
from gpu_manager.api.security import is_json, normalize_origin, split_host
from gpu_manager.redact import redact_url, redact_value
from gpu_manager.units.drivers.native import child_env
from tests.support.daemon import DaemonProc
from tests.support.env import RedisServer, free_port, wait_for

EVIL = "http://evil.example"
# a managed service that writes down the environment it was given, then idles
DUMP_ENV = ("import os, json, time, pathlib; "
            "pathlib.Path(os.environ['ENVFILE']).write_text(json.dumps(dict(os.environ))); "
            "time.sleep(600)")


def post(d: DaemonProc, path: str, **kw: Any) -> httpx.Response:
    """A bare request: none of the DaemonProc client's defaults."""
    return httpx.post(f"{d.url}{path}", trust_env=False, timeout=60, **kw)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    d = DaemonProc(tmp_path_factory.mktemp("sec")).start()
    yield d
    d.close()


def snapshot(d: DaemonProc) -> tuple[dict[str, str], int]:
    """Service states and how many operations were ever run: a refused call changes neither."""
    return d.states(), len(d.get("/gpu/operations").json()["operations"])


def test_cross_origin_posts_are_refused_and_act_on_nothing(daemon: DaemonProc) -> None:
    before = snapshot(daemon)
    # what a page's `fetch(url, {method: "POST", body: "x"})` sends: no preflight needed
    simple = post(daemon, "/gpu/prepare-phase/2", content=b"x",
                  headers={"Origin": EVIL, "Content-Type": "text/plain;charset=UTF-8"})
    assert simple.status_code == 403 and simple.json()["error"] == "cross_origin", simple.text
    empty = post(daemon, "/gpu/prepare-phase/2", headers={"Origin": EVIL})
    assert empty.status_code == 403 and empty.json()["error"] == "cross_origin"
    as_json = post(daemon, "/gpu/prepare-phase/2", json={}, headers={"Origin": "null"})
    assert as_json.status_code == 403
    # another port on the same host is another origin (a local dev server, say)
    other_port = post(daemon, "/gpu/release-all",
                      headers={"Origin": f"http://127.0.0.1:{free_port()}"})
    assert other_port.status_code == 403
    no_origin = post(daemon, "/gpu/prepare-phase/2", headers={"Sec-Fetch-Site": "cross-site"})
    assert no_origin.status_code == 403 and no_origin.json()["error"] == "cross_origin"
    assert snapshot(daemon) == before
    # a preflight gets no CORS approval, so a browser sends nothing further
    pre = httpx.options(f"{daemon.url}/gpu/prepare-phase/2", trust_env=False, headers={
        "Origin": EVIL, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert not any(h.lower().startswith("access-control-") for h in pre.headers), pre.headers
    assert "refused POST '/gpu/prepare-phase/2' (cross_origin)" in daemon.log_text()


def test_own_origin_and_no_origin_are_served(daemon: DaemonProc) -> None:
    try:
        same = post(daemon, "/gpu/prepare-phase/2",
                    headers={"Origin": f"http://127.0.0.1:{daemon.port}",
                             "Sec-Fetch-Site": "same-origin"})
        assert same.status_code == 200, same.text
        assert daemon.states()["vidi"] == "ready"
        by_name = post(daemon, "/gpu/service/vidi/stop", params={"force": "true"},
                       headers={"Origin": f"http://localhost:{daemon.port}",
                                "Host": f"localhost:{daemon.port}"})
        assert by_name.status_code == 200, by_name.text
        # curl -X POST: no Origin, no body, no Content-Type
        assert post(daemon, "/gpu/service/vidi/start").status_code == 200
        assert daemon.states()["vidi"] == "ready"
    finally:
        assert post(daemon, "/gpu/release-all").status_code == 200


def test_foreign_host_is_refused_even_for_reads(daemon: DaemonProc) -> None:
    port = daemon.port
    before = snapshot(daemon)
    for path in ("/gpu/status", "/health"):
        r = httpx.get(f"{daemon.url}{path}", trust_env=False,
                      headers={"Host": f"evil.example:{port}"})
        assert r.status_code == 403 and r.json()["error"] == "forbidden_host", r.text
    # a DNS-rebinding page is same-origin to the browser: its Origin matches its Host
    rebound = post(daemon, "/gpu/prepare-phase/2", headers={
        "Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"})
    assert rebound.status_code == 403 and rebound.json()["error"] == "forbidden_host"
    assert snapshot(daemon) == before
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}",
                 f"app.localhost:{port}", "LOCALHOST"):
        r = httpx.get(f"{daemon.url}/gpu/status", trust_env=False, headers={"Host": host})
        assert r.status_code == 200, (host, r.text)


def test_a_body_must_be_json(daemon: DaemonProc) -> None:
    body = json.dumps({"session_id": "s1", "requester": "page"})
    for ctype in ("text/plain", "application/x-www-form-urlencoded",
                  "multipart/form-data; boundary=x", None):
        headers = {"Content-Type": ctype} if ctype else {}
        r = post(daemon, "/gpu/acquire", content=body, headers=headers)
        assert r.status_code == 415 and r.json()["error"] == "unsupported_media_type", (ctype, r)
    # chunked: no Content-Length to go by, the body itself is read
    chunked = post(daemon, "/gpu/acquire", content=iter([body.encode()]),
                   headers={"Content-Type": "text/plain"})
    assert chunked.status_code == 415
    assert daemon.get("/gpu/state").json()["leases"] == []
    # what the clients send: JSON (any charset, +json), and empty bodies of any type
    ok = post(daemon, "/gpu/acquire", content=body,
              headers={"Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 200 and ok.json()["success"], ok.text
    assert post(daemon, "/gemma/release/nobody", json={}).json()["status"] == "not_found"
    rel = post(daemon, "/gpu/release", content=b'{"session_id": "s1"}',
               headers={"Content-Type": "application/merge-patch+json"})
    assert rel.status_code == 200, rel.text
    empty = post(daemon, "/gpu/release-all", headers={"Content-Type": "text/plain"})
    assert empty.status_code == 200


@pytest.mark.redis
def test_allowed_settings_and_a_child_without_secrets(tmp_path: Path,
                                                      redis_server: RedisServer) -> None:
    redis.Redis.from_url(redis_server.url).flushdb()
    envfile = tmp_path / "child-env.json"
    extra = f"""
  envdump:
    type: native
    vram_mb: 100
    priority: 1
    command: ["{{python}}", "-c", {json.dumps(DUMP_ENV)}]
    env: {{ENVFILE: "{envfile}", GPU_MANAGER_GIVEN: "on purpose"}}
"""
    d = DaemonProc(tmp_path, token="tok-s3cret", redis_url=redis_server.url,
                   extra_services=extra, env={
                       "GPU_MANAGER_ALLOWED_ORIGINS": "http://dash.lan:3000, https://ops.lan",
                       "GPU_MANAGER_ALLOWED_HOSTS": "gpu.lan", "gpu_manager_lower": "x"})
    d.start()
    try:
        for origin in ("http://dash.lan:3000", "https://ops.lan:443"):
            r = d.post("/gpu/service/envdump/start", headers={
                "Origin": origin, "Sec-Fetch-Site": "cross-site"})
            assert r.status_code == 200, (origin, r.text)
        assert d.post("/gpu/release-all", headers={"Origin": "http://dash.lan:3001"}
                      ).status_code == 403
        assert d.get("/gpu/status", headers={"Host": f"gpu.lan:{d.port}"}).status_code == 200
        assert d.get("/gpu/status", headers={"Host": "other.lan"}).status_code == 403

        def child() -> dict[str, str] | None:
            try:
                env: dict[str, str] = json.loads(envfile.read_text())
                return env
            except (FileNotFoundError, ValueError):
                return None  # not written yet, or half-written

        wait_for(child, 20, f"the child's environment in {envfile}")
        env = child()
        assert env is not None
        assert env["GPU_MANAGER_UNIT"].startswith("envdump:")
        assert env["GPU_MANAGER_OWNER"] and env["GPU_MANAGER_SIM_DIR"] and env["PATH"]
        assert env["GPU_MANAGER_GIVEN"] == "on purpose"  # a service's own env: still wins
        for gone in ("GPU_MANAGER_TOKEN", "GPU_MANAGER_REDIS_URL", "GPU_MANAGER_STATE_DIR",
                     "GPU_MANAGER_ALLOWED_ORIGINS", "gpu_manager_lower"):
            assert gone not in env, gone
        assert "tok-s3cret" not in envfile.read_text()
        assert redis_server.url not in envfile.read_text()
    finally:
        d.close()


class StartingDaemon(DaemonProc):
    """Up once it answers /health: with its Redis unreachable it is never ready."""

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log_text()}")
        try:
            return self.client.get("/health").status_code == 200
        except httpx.TransportError:
            return False


def test_a_redis_password_reaches_no_client_and_no_log(tmp_path: Path) -> None:
    dead = free_port()
    d = StartingDaemon(tmp_path, redis_url=f"redis://:s3cret@127.0.0.1:{dead}/0").start()
    try:
        wait_for(lambda: d.get("/ready").json()["lock"]["error"] not in (None, "not checked yet"),
                 10, "the lock check")
        ready = d.get("/ready")
        assert ready.status_code == 503 and not ready.json()["lock"]["ok"]
        r = d.post("/gpu/prepare-phase/2")
        assert r.status_code == 503 and r.json()["error"] == "lock_unavailable", r.text
        assert f"redis://***@127.0.0.1:{dead}/0" in r.json()["detail"]
        ops = d.get("/gpu/operations").text
        for text in (ready.text, r.text, ops, d.log_text(),
                     (d.state_dir / "logs" / "gpu-manager.jsonl").read_text()):
            assert "s3cret" not in text
    finally:
        d.close()


async def test_a_500_says_internal_error_and_an_id_found_in_the_log() -> None:
    app = FastAPI()
    errors.install(app)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("db at redis://:hunter2@10.0.0.5/0 said no")

    records: list[dict[str, Any]] = []
    sink = logger.add(lambda m: records.append(m.record), level="ERROR")
    try:
        # as uvicorn does: the handler answers, then the exception goes on to the server
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
            r = await c.get("/boom")
    finally:
        logger.remove(sink)
    body = r.json()
    assert r.status_code == 500 and body["error"] == "internal"
    assert body["detail"] == "internal error" and "RuntimeError" not in r.text
    assert "hunter2" not in r.text and len(body["error_id"]) == 12
    int(body["error_id"], 16)
    [record] = [x for x in records if x["extra"].get("error_id") == body["error_id"]]
    assert body["error_id"] in record["message"] and record["exception"] is not None


LOG_A_SECRET = """
import logging, sys, pathlib
from loguru import logger
from gpu_manager.logs import setup
setup(pathlib.Path(sys.argv[1]))
try:
    raise RuntimeError("at redis://:s3cret@h/0")
except RuntimeError as exc:
    logger.opt(exception=exc).error("failed: redis://u:s3cret@h")
    logging.getLogger("uvicorn.error").error("Exception in ASGI application", exc_info=exc)
logger.complete()
"""


def test_log_lines_and_tracebacks_are_redacted(tmp_path: Path) -> None:
    # a process of its own: setup() reconfigures loguru and the standard library for good
    res = subprocess.run([sys.executable, "-c", LOG_A_SECRET, str(tmp_path)], timeout=60,
                         capture_output=True, text=True, check=True)
    logged = (tmp_path / "logs" / "gpu-manager.jsonl").read_text()
    for text in (res.stderr, logged):
        assert "s3cret" not in text
        assert 'RuntimeError: at redis://***@h/0' in text  # the traceback is still there
    assert "failed: redis://***@h" in logged and "Exception in ASGI application" in res.stderr


@pytest.mark.parametrize(("text", "want"), [
    ("redis://:s3cret@127.0.0.1:6379/0", "redis://***@127.0.0.1:6379/0"),
    ("redis://user:pw@host/0", "redis://***@host/0"),
    ("at rediss://u:p@ss@h:1/2: refused", "at rediss://***@h:1/2: refused"),
    ("redis://h:1/0?password=pw&db=1", "redis://h:1/0?password=***&db=1"),
    ("unix://:pw@/run/redis.sock?db=0", "unix://***@/run/redis.sock?db=0"),
    ("'redis://:a@b', 'x@y'", "'redis://***@b', 'x@y'"),
    ("redis://127.0.0.1:6379/0 and ops@example.com", None),  # None: left as it is
    ("http://example.com/a@b", None),
])
def test_redact_url(text: str, want: str | None) -> None:
    assert redact_url(text) == (want or text)


def test_redact_value_and_child_env() -> None:
    assert redact_value({"a": ["redis://:x@h"], "n": 1}) == {"a": ["redis://***@h"], "n": 1}
    env = child_env({"PATH": "/bin", "GPU_MANAGER_TOKEN": "t", "Gpu_Manager_Redis_Url": "r",
                     "GPU_MANAGER_REDIS_URL": "redis://:pw@h", "GPU_MANAGER_SIM_DIR": "/s",
                     "GPU_MANAGER_UNIT": "u", "GPU_MANAGER_OWNER": "o", "MY_GPU_MANAGER_X": "y"})
    assert env == {"PATH": "/bin", "GPU_MANAGER_SIM_DIR": "/s", "GPU_MANAGER_UNIT": "u",
                   "GPU_MANAGER_OWNER": "o", "MY_GPU_MANAGER_X": "y"}


def test_header_parsing() -> None:
    assert split_host("[::1]:8000") == ("::1", 8000)
    assert split_host("LocalHost.") == ("localhost", None)
    assert split_host("a:b") is None and split_host("::1") is None and split_host("") is None
    assert normalize_origin("HTTP://LocalHost") == "http://localhost:80"
    assert normalize_origin("https://[::1]:8443/") == "https://[::1]:8443"
    assert normalize_origin("null") is None and normalize_origin("ftp://x") is None
    assert is_json("application/json; charset=utf-8") and is_json("application/problem+json")
    assert not is_json("text/json") and not is_json(None) and not is_json("text/plain")
