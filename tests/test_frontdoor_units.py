"""The front door's pure parts: the `serve:` block's rules at the line, the planner's swap of
an idle equal, how `/v1` finds the model in a body, and the gate's drain."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from gpu_manager.config import ConfigError, load_inventory
from gpu_manager.frontdoor.asgi import model_of
from gpu_manager.frontdoor.errors import DoorError
from gpu_manager.frontdoor.gate import Gate
from gpu_manager.planner import (
    ObservedState,
    Plan,
    PlannerInventory,
    Refusal,
    RequestStart,
    ServiceSpec,
    StartService,
    plan,
)

SERVED = """
  llm-a:
    type: native
    command: "sleep 100"
    vram_mb: 100
    serve:
      url: http://127.0.0.1:9001/
      models: [m1, m2]
  llm-b:
    type: native
    command: "sleep 100"
    vram_mb: 100
    serve:
      models:
        - m3
        - m1
"""


@pytest.fixture
def cfg(tmp_path: Path, repo_root: Path) -> Path:
    for name in ("services.yaml", "phases.yaml"):
        shutil.copy(repo_root / name, tmp_path / name)
    return tmp_path


def test_serve_rules_are_reported_at_their_line(cfg: Path) -> None:
    base = (cfg / "services.yaml").read_text()
    text = base + SERVED
    (cfg / "services.yaml").write_text(text)
    lines = text.splitlines()
    b_serve = next(i for i, line in enumerate(lines, 1) if "llm-b:" in line) + 4
    with pytest.raises(ConfigError) as info:
        load_inventory(cfg)
    assert [str(i) for i in info.value.issues] == [
        f"services.yaml:{b_serve}: services.llm-b.serve.url: required field is missing"]
    # with its url, the model both serve is the one problem, at its line
    (cfg / "services.yaml").write_text(text.replace(
        "    serve:\n      models:", "    serve:\n      url: http://127.0.0.1:9002\n      models:"))
    with pytest.raises(ConfigError) as info:
        load_inventory(cfg)
    assert [str(i) for i in info.value.issues] == [
        f"services.yaml:{len(lines) + 1}: services.llm-b.serve.models.1: model 'm1' is "
        "already served by service 'llm-a'"]


def test_a_valid_serve_block(cfg: Path) -> None:
    text = (cfg / "services.yaml").read_text() + SERVED.replace(
        "    serve:\n      models:", "    serve:\n      url: http://127.0.0.1:9002\n      models:"
    ).replace("- m1", "- m4")
    (cfg / "services.yaml").write_text(text)
    serve = load_inventory(cfg).services["llm-a"].serve
    assert serve is not None
    assert serve.url == "http://127.0.0.1:9001"  # the trailing slash is dropped
    assert (serve.max_concurrent, serve.queue.max, serve.queue.timeout_s, serve.drain_s) == (
        8, 64, 120.0, 30.0)


INV = PlannerInventory({"a": ServiceSpec("a", 14000, 10), "b": ServiceSpec("b", 14000, 10)})


def test_a_request_swaps_out_an_idle_equal_never_a_busy_one() -> None:
    state = ObservedState(23552, {"a": 14000})
    # an operator's start does not preempt an equal; a request's start swaps it
    assert isinstance(plan(INV, state, StartService("b")), Refusal)
    swap = plan(INV, state, RequestStart("b"))
    assert isinstance(swap, Plan)
    assert [(s.action, s.service) for s in swap.steps] == [("stop", "a"), ("start", "b")]
    assert "no request in flight" in swap.steps[0].reason
    busy = plan(INV, ObservedState(23552, {"a": 14000}, in_use=frozenset({"a"})),
                RequestStart("b"))
    assert isinstance(busy, Refusal)
    assert busy.blockers[0].reason.endswith("requests in flight")


@pytest.mark.parametrize(("body", "ctype", "model"), [
    (b'{"model": "m1", "messages": []}', "application/json", "m1"),
    (b'{"messages": []}', "application/json", None),
    (b"model=m2&x=1", "application/x-www-form-urlencoded", "m2"),
    (b'--XX\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
     b"Content-Type: audio/wav\r\n\r\nRIFF....\r\n--XX\r\n"
     b'Content-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n--XX--\r\n',
     "multipart/form-data; boundary=XX", "whisper-1"),
])
def test_the_model_is_found_in_any_body(body: bytes, ctype: str, model: str | None) -> None:
    assert model_of(body, ctype) == model


def test_a_body_that_is_not_json_is_a_clear_400() -> None:
    with pytest.raises(DoorError) as err:
        model_of(b"{not json", "application/json")
    assert err.value.status == 400 and err.value.code == "invalid_json"


async def test_a_drain_waits_for_what_ends_and_cuts_what_does_not() -> None:
    gate = Gate("a")

    async def request(seconds: float) -> str:
        slot = gate.take(asyncio.current_task())
        try:
            await asyncio.sleep(seconds)
            return "done"
        except asyncio.CancelledError:
            return f"cut: {slot.cut_reason}"
        finally:
            slot.release()

    quick = asyncio.create_task(request(0.05))
    slow = asyncio.create_task(request(10))
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert await gate.drain(0.3) == (2, 1)
    assert 0.25 <= loop.time() - t0 < 1.0
    assert await quick == "done"
    assert (await slow).startswith("cut: a is being released")
    assert not gate.in_flight and gate.cut == 1

