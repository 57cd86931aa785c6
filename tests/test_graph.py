"""Plans as dependency graphs, on the real daemon and real stand-in processes.

The root inventory's stand-ins: vidi (4000 MB, healthy 0.5 s after launch), cosyvoice (4000 MB,
1.0 s), comfyui (20000 MB, 1.5 s) on a simulated 24 GB card with a 500 ms release delay.
"""

from __future__ import annotations

from pathlib import Path

from tests.support.daemon import DaemonProc

TWO = "  6:\n    name: both\n    services: [vidi, cosyvoice]\n"


def steps(body: dict) -> list[dict]:  # type: ignore[type-arg]
    return list(body["plan"]["steps"])


def test_the_starts_of_a_phase_run_side_by_side(tmp_path: Path) -> None:
    d = DaemonProc(tmp_path, extra_phases=TWO).start()
    try:
        r = d.post("/gpu/prepare-phase/6")
        assert r.status_code == 200, r.text
        vidi, cosy = steps(r.json())
        assert (vidi["service"], cosy["service"]) == ("vidi", "cosyvoice")
        assert vidi["after"] == [] and cosy["after"] == []
        # cosyvoice began before vidi (0.5 s to healthy) had finished: side by side
        assert cosy["started_at"] < vidi["started_at"] + vidi["duration_s"]
        total = r.json()["plan"]["duration_s"]
        assert total < vidi["duration_s"] + cosy["duration_s"]  # not one after the other
        assert d.states()["vidi"] == d.states()["cosyvoice"] == "ready"
    finally:
        d.close()


def test_a_start_that_fits_does_not_wait_for_an_unrelated_release(tmp_path: Path) -> None:
    d = DaemonProc(tmp_path).start()
    try:
        assert d.post("/gpu/prepare-phase/2").status_code == 200  # vidi
        r = d.post("/gpu/prepare-phase/3")  # stop vidi, start cosyvoice: it fits beside it
        assert r.status_code == 200, r.text
        stop, start = steps(r.json())
        assert (stop["action"], stop["service"], start["service"]) == (
            "stop", "vidi", "cosyvoice")
        assert start["after"] == []
        # before: it waited for vidi's VRAM to come back (the 500 ms release delay)
        assert start["reclaim_wait_s"] < 0.2, start
        # AC-3 still waits: comfyui needs cosyvoice's VRAM
        r = d.post("/gpu/service/comfyui/start")
        assert r.status_code == 200, r.text
        stop, start = steps(r.json())
        assert start["service"] == "comfyui" and start["after"] == [0]
        assert start["reclaim_wait_s"] >= 0.3  # the release delay, seen on the GPU
    finally:
        d.close()


def test_a_failed_branch_skips_what_waits_on_it_and_reports_the_gpu(tmp_path: Path) -> None:
    # cosyvoice cannot start (its command fails at once); vidi beside it still finishes
    broken = {'"--name", "cosyvoice"': '"--name", "cosyvoice", "--crash-after-s", "0"'}
    d = DaemonProc(tmp_path, extra_phases=TWO, replace=broken).start()
    try:
        r = d.post("/gpu/prepare-phase/6")
        assert r.status_code == 502, r.text
        body = r.json()
        assert body["error"] == "start_failed" and body["gpu_state"]["cosyvoice"] == "failed"
        by = {s["service"]: s for s in body["operation"]["steps"]}
        assert by["cosyvoice"]["status"] == "failed"
        assert by["vidi"]["status"] == "done"  # the other branch finished
        assert d.status()["lock"]["holder"] is None
        assert d.post("/gpu/prepare-phase/2").status_code == 200
    finally:
        d.close()
