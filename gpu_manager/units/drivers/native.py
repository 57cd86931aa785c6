"""Native services: a command in its own session and process group, never a pattern kill.

How a stop finds what to stop (and nothing else):
1. Every process we launch gets `GPU_MANAGER_UNIT=<service>:<random token>` in its
   environment; children inherit it, including double-forked daemons that left our group with
   setsid(). A decoy whose command line merely looks like the service has no token.
2. The process group (pgid = the leader's pid) is signalled only while the leader is alive and
   its create time matches the one recorded at launch, so a reused pid is never signalled.

Stop escalation, step by step:
1. send `stop_signal` to the group and to every tagged process outside it;
2. wait for the leader to exit (awaited, not polled) and for the rest to go, until
   `stop_timeout_s` has passed since step 1;
3. SIGKILL whatever is left (group and tagged stragglers) and wait until all are gone;
4. the leader is always reaped (our child: `proc.wait()`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil
from loguru import logger

from gpu_manager.aio import within
from gpu_manager.config import NativeService
from gpu_manager.paths import SIM_DIR_ENV
from gpu_manager.units.drivers.base import DriverError, ExitInfo, ExitWatch

MARKER_ENV = "GPU_MANAGER_UNIT"
# How stale the list of our tagged processes outside the group may get between full walks.
TAGGED_TTL_S = 10.0
# The daemon that launched a process (its state dir), so a restarted daemon can find what it
# launched but had not yet recorded when it died.
OWNER_ENV = "GPU_MANAGER_OWNER"
PYTHON_TOKEN = "{python}"  # in a command: the daemon's own interpreter
# The daemon's own variables a child gets: adoption reads the first two back from /proc, and
# the simulated GPU's stand-ins find their registry by the third.
PASSED_ENV = frozenset({MARKER_ENV, OWNER_ENV, SIM_DIR_ENV})


def child_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a service inherits: the daemon's, minus its `GPU_MANAGER_*` settings.

    Those hold secrets (the API token, a Redis URL with its password) that a managed service,
    often third-party code listening on the network, has no business holding. The few the
    project passes on purpose (PASSED_ENV) are set by the driver itself; a service that needs
    anything else gets it from its own `env:` in services.yaml. Settings are read whatever the
    case of the name (pydantic-settings), so the filter ignores case too.
    """
    source = os.environ if environ is None else environ
    return {k: v for k, v in source.items()
            if not k.upper().startswith("GPU_MANAGER_") or k in PASSED_ENV}


def gpu_env(visible: tuple[str, ...]) -> dict[str, str]:
    """The cards a placed service gets: by UUID, which survives a change of enumeration
    order (a card added, a BIOS setting); PCI bus order for any index it may still use."""
    if not visible:
        return {}
    return {"CUDA_VISIBLE_DEVICES": ",".join(visible), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def _same_process(pid: int, create_time: float) -> psutil.Process | None:
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - create_time) > 0.01:
            return None
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except (psutil.Error, OSError):
        return None


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Block (in a worker thread) until every process is dead or a zombie; return survivors.

    Not psutil.wait_procs: it would waitpid() our own child under asyncio's child watcher, and
    it counts zombies as alive, while an orphan's zombie lingers until init gets round to
    reaping it (a second or more on some inits). A zombie holds no memory: it counts as gone.
    """
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in procs if _alive(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.005)


def find_launched(owner: str) -> dict[str, list[dict[str, Any]]]:
    """Records (as `record()` writes them) of live process-group leaders launched by `owner`,
    by service name, newest first. Blocking: call it in a thread."""
    found: dict[str, list[dict[str, Any]]] = {}
    for proc in psutil.process_iter():
        try:
            env = proc.environ()
            token = env.get(MARKER_ENV)
            if env.get(OWNER_ENV) != owner or not token or os.getpgid(proc.pid) != proc.pid:
                continue  # not ours, or a child: the group leader stands for the group
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            found.setdefault(token.split(":", 1)[0], []).append(
                {"kind": "native", "pid": proc.pid, "create_time": proc.create_time(),
                 "token": token, "started_at": proc.create_time()})
        except (psutil.Error, OSError):
            continue
    for records in found.values():
        records.sort(key=lambda r: -float(r["create_time"]))
    return found


def kill_group(record: dict[str, Any]) -> None:
    """SIGKILL a stray copy's group, after checking the leader is still that process."""
    if _same_process(int(record["pid"]), float(record["create_time"])) is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(int(record["pid"]), signal.SIGKILL)


def rotate_log(path: Path, max_bytes: int, backups: int) -> None:
    """Size-based rollover at each start: the child writes to the file directly, so a daemon
    restart never breaks its stdout (a pipe through us would SIGPIPE it)."""
    try:
        if path.stat().st_size < max_bytes:
            return
    except FileNotFoundError:
        return
    for i in range(backups - 1, 0, -1):
        src = path.with_name(f"{path.name}.{i}")
        if src.exists():
            os.replace(src, path.with_name(f"{path.name}.{i + 1}"))
    os.replace(path, path.with_name(f"{path.name}.1"))


class NativeDriver(ExitWatch):
    def __init__(
        self, name: str, cfg: NativeService, log_dir: Path,
        extra_env: Mapping[str, str] | None = None,
        log_max_bytes: int = 10 * 1024 * 1024, log_backups: int = 3,
    ) -> None:
        self.name = name
        self.cfg = cfg
        self.log_path = log_dir / f"{name}.log"
        self.extra_env = dict(extra_env or {})
        self.log_max_bytes = log_max_bytes
        self.log_backups = log_backups
        self.pid: int | None = None
        self.create_time: float | None = None
        self.token: str | None = None
        # tagged processes outside the group, from the last full walk (pid -> create time)
        self._tagged: dict[int, float] = {}
        self._tagged_at = -TAGGED_TTL_S
        self.started_at: float | None = None
        self._exit: asyncio.Future[ExitInfo] | None = None
        self._watch: asyncio.Task[None] | None = None

    # -- launch -------------------------------------------------------------------------------
    def argv(self) -> list[str]:
        return [sys.executable if a == PYTHON_TOKEN else a for a in self.cfg.command]

    async def start(self) -> None:
        if self.running():
            raise DriverError(f"{self.name} is already running (pid {self.pid})")
        argv = self.argv()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        rotate_log(self.log_path, self.log_max_bytes, self.log_backups)
        token = f"{self.name}:{uuid.uuid4().hex}"
        env = {**child_env(), **self.extra_env, **self.cfg.env, **gpu_env(self.visible),
               MARKER_ENV: token}
        # A local file opened for append: no I/O wait worth a thread.
        with open(self.log_path, "ab") as log:  # noqa: ASYNC230
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"\n=== {stamp} gpu-manager starts {self.name}: {argv}\n".encode())
            log.flush()
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv, cwd=self.cfg.cwd, env=env, stdin=asyncio.subprocess.DEVNULL,
                    stdout=log, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
                )
            except OSError as exc:
                raise DriverError(f"cannot start {self.name}: {argv[0]}: {exc.strerror or exc}"
                                  ) from exc
        self.pid, self.token, self.started_at = proc.pid, token, time.time()
        self._tagged, self._tagged_at = {}, -TAGGED_TTL_S
        try:
            self.create_time = psutil.Process(proc.pid).create_time()
        except psutil.Error:
            self.create_time = None  # died at once; the watcher reports the exit
        loop = asyncio.get_running_loop()
        self._exit = loop.create_future()
        self._watch = asyncio.create_task(self._watch_child(proc), name=f"{self.name}-exit")

    async def _watch_child(self, proc: asyncio.subprocess.Process) -> None:
        rc = await proc.wait()  # reaps the leader
        info = ExitInfo(None, -rc) if rc < 0 else ExitInfo(rc)
        self._resolve(info)

    def _resolve(self, info: ExitInfo) -> None:
        if self._exit is not None and not self._exit.done():
            self._exit.set_result(info)

    # -- observe ------------------------------------------------------------------------------
    def record(self) -> dict[str, Any] | None:
        if not self.running() or self.pid is None or self.create_time is None:
            return None
        return {"kind": "native", "pid": self.pid, "create_time": self.create_time,
                "token": self.token, "started_at": self.started_at}

    def _leader(self) -> psutil.Process | None:
        if self.pid is None or self.create_time is None:
            return None
        return _same_process(self.pid, self.create_time)

    def _members(self) -> list[psutil.Process]:
        """Our processes: tagged with our token, or in our group while the leader is ours."""
        leader_ok = self._leader() is not None
        me = os.getpid()
        found: list[psutil.Process] = []
        for proc in psutil.process_iter():
            if proc.pid == me:
                continue
            try:
                in_group = leader_ok and os.getpgid(proc.pid) == self.pid
                tagged = bool(self.token) and proc.environ().get(MARKER_ENV) == self.token
                if (in_group or tagged) and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
            except (psutil.Error, OSError):
                continue
        return found

    def _quick_members(self) -> list[int]:
        """Our pids without reading every process's environment (a pid read runs several
        times per transition; a full walk costs ~18 ms per unit on a host of 370
        processes): the group by `getpgid` (a syscall, no file read), plus the tagged
        processes outside it that the last full walk found and that are still the same
        processes. A full walk runs again once that is older than TAGGED_TTL_S."""
        now = time.monotonic()
        if now - self._tagged_at > TAGGED_TTL_S:
            members = self._members()
            leader = self.pid if self._leader() is not None else None
            self._tagged = {}
            for proc in members:
                with contextlib.suppress(psutil.Error, OSError):
                    if leader is None or os.getpgid(proc.pid) != leader:
                        self._tagged[proc.pid] = proc.create_time()
            self._tagged_at = now
            return [p.pid for p in members]
        found: list[int] = []
        if self.pid is not None and self._leader() is not None:
            me = os.getpid()
            for pid in psutil.pids():
                with contextlib.suppress(OSError):
                    if pid != me and os.getpgid(pid) == self.pid:
                        found.append(pid)
        for pid, created in list(self._tagged.items()):
            if pid not in found and _same_process(pid, created) is not None:
                found.append(pid)
        return found

    async def pids(self) -> list[int]:
        return await asyncio.to_thread(self._quick_members)

    # -- stop ---------------------------------------------------------------------------------
    def _signal_all(self, sig: int) -> list[psutil.Process]:
        members = self._members()
        if self._leader() is not None and self.pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)
        for proc in members:
            with contextlib.suppress(psutil.Error, OSError):
                proc.send_signal(sig)
        return members

    async def stop(self, timeout: float) -> ExitInfo:
        sig = signal.Signals[self.cfg.stop_signal]
        deadline = time.monotonic() + timeout
        members = await asyncio.to_thread(self._signal_all, sig)
        if self._exit is not None and not self._exit.done():
            with contextlib.suppress(TimeoutError):
                await within(asyncio.shield(self._exit), max(0.0, timeout))
        left = max(0.0, deadline - time.monotonic())
        alive = await asyncio.to_thread(wait_gone, members, left)
        stragglers = await asyncio.to_thread(self._members)
        if alive or stragglers or self.running():
            logger.warning(f"{self.name}: still running {timeout:g}s after {sig.name}; "
                           "sending SIGKILL")
            killed = await asyncio.to_thread(self._signal_all, signal.SIGKILL)
            alive = await asyncio.to_thread(wait_gone, killed, 5)
            if alive:  # pragma: no cover - only an unkillable (D-state) process gets here
                raise DriverError(f"{self.name}: pids {[p.pid for p in alive]} survived SIGKILL")
        if self._exit is None:
            return ExitInfo(None, detail="was not running")
        return await asyncio.shield(self._exit)

    # -- adoption -----------------------------------------------------------------------------
    async def adopt(self, record: dict[str, Any]) -> bool:
        """Take over the process a record names, on the process's own proof only: the same
        pid and create time, and in its environment our token naming THIS unit and the
        owner naming THIS daemon's state dir. A record that disagrees (another unit's
        process, another daemon's, a token that does not match) is refused and reported,
        never acted on."""
        try:
            pid, create_time = int(record["pid"]), float(record["create_time"])
            token = str(record["token"]) if record.get("token") else None
        except (KeyError, TypeError, ValueError):
            return False
        why = await asyncio.to_thread(self._disproof, pid, create_time, token)
        if why is not None:
            if why != "gone":
                logger.error(f"{self.name}: the record names pid {pid}, but {why}: the record "
                             "is dropped and the process left alone")
            return False
        assert token is not None
        self.pid, self.create_time, self.token = pid, create_time, token
        self._tagged, self._tagged_at = {}, -TAGGED_TTL_S
        self.started_at = record.get("started_at")
        loop = asyncio.get_running_loop()
        self._exit = loop.create_future()
        self._watch = asyncio.create_task(self._watch_adopted(pid), name=f"{self.name}-exit")
        return True

    def _disproof(self, pid: int, create_time: float, token: str | None) -> str | None:
        """Why the process is not this unit's, on its own word (None: it is). Blocking."""
        proc = _same_process(pid, create_time)
        if proc is None:
            return "gone"  # gone, or the pid now belongs to another process
        if token is None or token.split(":", 1)[0] != self.name:
            return f"the record's token {token!r} does not name {self.name}"
        try:
            env = proc.environ()
        except (psutil.Error, OSError) as exc:
            return f"its environment cannot be read ({exc})"
        if env.get(MARKER_ENV) != token:
            seen = env.get(MARKER_ENV)
            return (f"that process is {seen.split(':', 1)[0]!r}'s" if seen
                    else "that process carries no token of ours")
        owner = self.extra_env.get(OWNER_ENV)
        if owner is not None and env.get(OWNER_ENV) != owner:
            return f"that process belongs to the daemon of {env.get(OWNER_ENV)!r}"
        return None

    async def _watch_adopted(self, pid: int) -> None:
        """Not our child after a daemon restart: wait on a pidfd (instant), else poll."""
        info = ExitInfo(None, detail="exited while adopted; status unknown")
        try:
            fd = os.pidfd_open(pid)
        except (OSError, AttributeError):
            while self._leader() is not None:  # noqa: ASYNC110 - no event exists to wait on
                await asyncio.sleep(0.05)
            self._resolve(info)
            return
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        def readable() -> None:
            if not done.done():
                done.set_result(None)

        loop.add_reader(fd, readable)
        try:
            await done
        finally:
            loop.remove_reader(fd)
            os.close(fd)
        self._resolve(info)
