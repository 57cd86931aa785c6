"""Inventory validation: the root files are valid; every broken copy names file, line, field."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpu_manager.config import ConfigError, DockerService, NativeService, load_inventory


@pytest.fixture
def cfg(tmp_path: Path, repo_root: Path) -> Path:
    for name in ("services.yaml", "phases.yaml"):
        shutil.copy(repo_root / name, tmp_path / name)
    return tmp_path


def edit(path: Path, old: str, new: str) -> int:
    """Replace `old` once and return the 1-based line where it stood."""
    text = path.read_text()
    assert text.count(old) >= 1, old
    idx = text.index(old)
    path.write_text(text.replace(old, new, 1))
    return text[:idx].count("\n") + 1


def errors(cfg: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_inventory(cfg)
    return [str(i) for i in info.value.issues]


def test_root_inventory_is_the_reference_host(repo_root: Path) -> None:
    inv = load_inventory(repo_root)
    assert inv.gpu.backend == "simulated"
    expected = {"comfyui": (20000, 100, [4]), "cosyvoice": (4000, 50, [3]),
                "vidi": (4000, 40, [2]), "ollama": (18000, 10, [])}
    got = {n: (s.vram_mb, s.priority, inv.phases_of(n)) for n, s in inv.services.items()}
    assert got == expected
    assert sorted(inv.phases) == [1, 2, 3, 4, 5]
    assert inv.phases[1].services == [] and inv.phases[5].services == []
    vidi = inv.services["vidi"]
    assert isinstance(vidi, NativeService)
    assert vidi.restart == "no" and vidi.stop_signal == "SIGTERM"
    assert vidi.command[:3] == ["{python}", "-m", "gpu_manager.sim.workload"]


def test_examples_inventory_is_valid(repo_root: Path) -> None:
    inv = load_inventory(repo_root / "examples")
    cosy = inv.services["cosyvoice"]
    assert isinstance(cosy, DockerService) and cosy.container == "mcn_cosyvoice"
    ollama = inv.services["ollama"]
    assert ollama.sleep is not None and ollama.sleep.api == "ollama"
    assert ollama.residual_mb == 300
    assert {n for n, s in inv.services.items() if s.sleep} >= {"comfyui", "ollama", "llm",
                                                                "training"}
    llm = inv.services["llm"].serve
    assert llm is not None and llm.models == ["Qwen/Qwen2.5-7B-Instruct"]
    assert llm.idle is not None and llm.idle.then == "sleep"
    training = inv.services["training"].sleep
    assert training is not None and training.api == "http" and training.asleep is not None
    assert not inv.warnings


def test_unknown_service_in_phase(cfg: Path) -> None:
    line = edit(cfg / "phases.yaml", "services: [cosyvoice]", "services: [cosyvoce]")
    assert errors(cfg) == [
        f"phases.yaml:{line}: phases.3.services.0: unknown service 'cosyvoce' "
        "(known: comfyui, cosyvoice, ollama, vidi)"
    ]


def test_negative_vram(cfg: Path) -> None:
    line = edit(cfg / "services.yaml", "vram_mb: 4000\n    priority: 40",
                "vram_mb: -5\n    priority: 40")
    (err,) = errors(cfg)
    assert err.startswith(f"services.yaml:{line}: services.vidi.vram_mb: ")
    assert "greater than or equal to 0" in err


def test_duplicate_service_names(cfg: Path) -> None:
    path = cfg / "services.yaml"
    text = path.read_text()
    first = text[: text.index("  vidi:")].count("\n") + 1
    path.write_text(text + "\n  vidi:\n    type: native\n    vram_mb: 1\n    command: [x]\n")
    dup_line = len(text.splitlines()) + 2
    assert errors(cfg) == [
        f"services.yaml:{dup_line}: services.vidi: duplicate key 'vidi' "
        f"(first defined at line {first})"
    ]


def test_budget_larger_than_gpu(cfg: Path) -> None:
    line = edit(cfg / "services.yaml", "vram_mb: 20000", "vram_mb: 24000")
    assert errors(cfg) == [
        f"services.yaml:{line}: services.comfyui.vram_mb: 24000 MB is more than the GPU can "
        "ever give (24576 MB total - 1024 MB reserve = 23552 MB)"
    ]


def test_phase_larger_than_gpu(cfg: Path) -> None:
    line = edit(cfg / "phases.yaml", "services: [comfyui]", "services: [comfyui, vidi]")
    assert errors(cfg) == [
        f"phases.yaml:{line}: phases.4.services: phase needs 24000 MB together, more than the "
        "GPU budget of 23552 MB"
    ]


def test_unknown_key_is_named_at_its_line(cfg: Path) -> None:
    line = edit(cfg / "services.yaml", "    priority: 50\n", "    priority: 50\n    vram: 12\n")
    assert errors(cfg) == [f"services.yaml:{line + 1}: services.cosyvoice.vram: unknown key"]


def test_missing_field_and_bad_type_tag(cfg: Path) -> None:
    path = cfg / "services.yaml"
    text = path.read_text()
    n = len(text.splitlines())
    path.write_text(text + "\n  a:\n    type: native\n    command: [x]\n"
                    "  b:\n    type: podman\n    vram_mb: 1\n")
    errs = errors(cfg)
    assert f"services.yaml:{n + 2}: services.a.vram_mb: required field is missing" in errs
    assert any(e.startswith(f"services.yaml:{n + 5}: services.b: ") and "'podman'" in e
               for e in errs), errs


def test_yaml_syntax_error_points_at_line(cfg: Path) -> None:
    line = edit(cfg / "phases.yaml", "    name: tts\n", "    name: [tts\n")
    (err,) = errors(cfg)
    assert err.startswith("phases.yaml:") and "invalid YAML" in err
    # PyYAML reports where it noticed the problem: at or just after the broken line.
    assert line <= int(err.split(":")[1]) <= line + 2


def test_yaml_no_means_restart_no_and_bad_signal(cfg: Path) -> None:
    line = edit(cfg / "services.yaml", "    restart: no\n",
                "    restart: no\n    stop_signal: SIGNOPE\n")
    assert errors(cfg) == [
        f"services.yaml:{line + 1}: services.comfyui.stop_signal: unknown signal 'SIGNOPE'"
    ]


def test_health_url_the_client_cannot_call_is_refused_at_its_line(cfg: Path) -> None:
    # These pass `^https?://` but the HTTP client chokes on them at the first check.
    line = edit(cfg / "services.yaml", "http://127.0.0.1:18099/health",
                "http://127.0.0.1:99999/health")
    assert errors(cfg) == [
        f"services.yaml:{line}: services.vidi.health.url: invalid URL "
        "'http://127.0.0.1:99999/health': Port out of range 0-65535"]
    edit(cfg / "services.yaml", "http://127.0.0.1:99999/health", "http:///health")
    (err,) = errors(cfg)
    assert err.startswith(f"services.yaml:{line}: services.vidi.health.url: invalid URL")
    assert "needs http:// or https:// and a host" in err


def test_simulated_backend_needs_total(cfg: Path) -> None:
    gpu_line = edit(cfg / "services.yaml", "gpu:\n", "gpu:\n")
    edit(cfg / "services.yaml", "  total_mb: 24576 ", "  #total_mb: 24576 ")
    assert errors(cfg) == [f"services.yaml:{gpu_line}: gpu: backend 'simulated' needs total_mb"]


def test_all_problems_reported_at_once(cfg: Path) -> None:
    edit(cfg / "services.yaml", "vram_mb: 20000", "vram_mb: -1")
    edit(cfg / "phases.yaml", "services: [vidi]", "services: [vdi]")
    errs = errors(cfg)
    assert len(errs) == 2
    assert {e.split(":")[0] for e in errs} == {"services.yaml", "phases.yaml"}


def test_missing_services_file(tmp_path: Path) -> None:
    (err,) = errors(tmp_path)
    assert err.endswith("services.yaml:1: file not found")


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("gpu-manager")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=cwd, timeout=60,
                          check=False)


def test_check_config_cli(cfg: Path, repo_root: Path) -> None:
    ok = _cli("check-config", cwd=repo_root)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().splitlines() == [
        "OK: 4 services, 5 phases, gpu backend simulated (24576 MB, reserve 1024 MB)"
    ]
    line = edit(cfg / "phases.yaml", "services: [comfyui]", "services: [comfy]")
    bad = _cli("check-config", "--config-dir", str(cfg))
    assert bad.returncode == 1
    assert f"phases.yaml:{line}: phases.4.services.0: unknown service 'comfy'" in bad.stderr


def test_cli_plan_prints_reasons(repo_root: Path) -> None:
    res = _cli("plan", "4", "--running", "cosyvoice,ollama", "--config-dir", str(repo_root))
    assert res.returncode == 0, res.stderr
    assert "not in phase 4 (image)" in res.stdout
    assert "kept by phase 4 (image) but does not fit" in res.stdout
    refused = _cli("plan", "9", "--config-dir", str(repo_root))
    assert refused.returncode == 1
    assert "unknown phase 9 (known: 1, 2, 3, 4, 5)" in refused.stderr


def test_sleep_block_defaults_and_rules(cfg: Path) -> None:
    edit(cfg / "services.yaml", "vram_mb: 4000\n    priority: 40",
         "vram_mb: 4000\n    priority: 40\n    sleep: {api: vllm, url: 'http://127.0.0.1:8001'}")
    vidi = load_inventory(cfg).services["vidi"]
    assert vidi.sleep is not None and vidi.sleep.level == 1
    assert vidi.residual_mb == 1000  # a quarter of vram_mb, at most 1024


@pytest.mark.parametrize(("block", "message"), [
    ("{api: sglang}", "api 'sglang' needs url (the server's base URL)"),
    ("{api: http, url: 'http://127.0.0.1:1'}", "api 'http' needs sleep: and wake:"),
    ("{api: tabbyapi, url: 'http://127.0.0.1:1'}", "api 'tabbyapi' needs models:"),
    ("{api: ollama, url: 'http://127.0.0.1:1', level: 2}", "level is for api 'vllm' only"),
    ("{api: vllm, url: 'http://127.0.0.1:1', residual_mb: 5000}",
     "sleep.residual_mb (5000) is more than vram_mb (4000)"),
    ("{api: kserve, url: 'http://127.0.0.1:1'}", "Input should be 'vllm'"),
])
def test_invalid_sleep_block_names_the_line(cfg: Path, block: str, message: str) -> None:
    line = edit(cfg / "services.yaml", "vram_mb: 4000\n    priority: 40",
                f"vram_mb: 4000\n    priority: 40\n    sleep: {block}")
    found = errors(cfg)
    assert len(found) == 1 and message in found[0], found
    assert found[0].startswith("services.yaml:"), found
    assert int(found[0].split(":")[1]) in range(line, line + 3), found


def test_legacy_evict_and_preempt_still_work_with_a_warning(cfg: Path) -> None:
    line = edit(cfg / "services.yaml", "vram_mb: 4000\n    priority: 40",
                "vram_mb: 4000\n    priority: 40\n"
                "    evict: {strategy: ollama, url: 'http://127.0.0.1:11434', timeout_s: 7}")
    inv = load_inventory(cfg)
    sleep = inv.services["vidi"].sleep
    assert sleep is not None and (sleep.api, sleep.url, sleep.timeout_s) == (
        "ollama", "http://127.0.0.1:11434", 7)
    assert [str(w) for w in inv.warnings] == [
        f"services.yaml:{line + 2}: services.vidi.evict: deprecated: read as "
        "`sleep: {api: ollama, url, timeout_s}`; write that instead"]
    edit(cfg / "services.yaml", "    evict: {strategy: ollama, url: 'http://127.0.0.1:11434', "
         "timeout_s: 7}", "    preempt: {strategy: pause, protocol: redis, ack_timeout_s: 3}")
    inv = load_inventory(cfg)
    sleep = inv.services["vidi"].sleep
    assert sleep is not None and sleep.api == "pause" and sleep.wake_when_free
    assert sleep.pause is not None and sleep.pause.ack_timeout_s == 3
    assert "preempt: deprecated" in str(inv.warnings[0])


def test_evict_and_sleep_together_are_refused(cfg: Path) -> None:
    edit(cfg / "services.yaml", "vram_mb: 4000\n    priority: 40",
         "vram_mb: 4000\n    priority: 40\n    evict: {strategy: ollama}\n"
         "    sleep: {api: ollama, url: 'http://127.0.0.1:11434'}")
    assert "evict and sleep are one concept: keep only sleep:" in errors(cfg)[0]


def test_next_phase_must_exist(cfg: Path) -> None:
    line = edit(cfg / "phases.yaml", "services: [cosyvoice]", "services: [cosyvoice]\n    next: 9")
    assert errors(cfg) == [f"phases.yaml:{line + 1}: phases.3.next: unknown phase 9 "
                           "(known: 1, 2, 3, 4, 5)"]


def two_cards(cfg: Path) -> None:
    edit(cfg / "services.yaml", "  total_mb: 24576         # a 24 GB card\n"
         "  reserve_mb: 1024        # headroom: the desktop uses 0.5-1 GB, plus CUDA context "
         "growth\n  device: 0\n",
         "  devices:\n    - {total_mb: 24576, reserve_mb: 1024}\n    - {total_mb: 12288}\n")


def test_several_gpus_load_with_per_card_budgets(cfg: Path) -> None:
    two_cards(cfg)
    edit(cfg / "services.yaml", "vram_mb: 4000\n    priority: 40",
         "vram_mb: 4000\n    priority: 40\n    devices: [0, 1]")
    inv = load_inventory(cfg)
    assert [(d.index, d.total_mb, d.reserve_mb) for d in inv.gpu.managed] == [
        (0, 24576, 1024), (1, 12288, 0)]
    assert inv.gpu.several and inv.gpu.device == 0 and inv.gpu.total_mb == 24576
    assert inv.services["vidi"].allowed_devices == (0, 1)
    assert inv.services["comfyui"].allowed_devices is None
    assert "on 2 devices" in inv.summary()


@pytest.mark.parametrize(("where", "want"), [
    ("device: 3", "services.vidi.device: device 3 is not managed by this daemon "
                  "(gpu devices: 0, 1)"),
    ("devices: [1, 5]", "services.vidi.devices: device 5 is not managed"),
    ("gpus: 3", "services.vidi.gpus: needs 3 cards at once but may use only 2"),
    ("device: 1\n    gpus: 2", "services.vidi.gpus: needs 2 cards at once but may use only 1"),
    ("device: 0\n    devices: [0]", "give `device` (one card) or `devices` (a set), not both"),
])
def test_an_impossible_pin_is_explained_at_its_line(cfg: Path, where: str, want: str) -> None:
    two_cards(cfg)
    line = edit(cfg / "services.yaml", "vram_mb: 4000\n    priority: 40",
                f"vram_mb: 4000\n    priority: 40\n    {where}")
    (err,) = errors(cfg)
    assert want in err, err
    assert err.startswith("services.yaml:"), err
    # at the field, or at the service for a rule across fields
    vidi = (cfg / "services.yaml").read_text().splitlines().index("  vidi:") + 1
    assert int(err.split(":")[1]) in (vidi, line + 2 + where.count("\n")), err


def test_a_service_larger_than_any_card_it_may_use(cfg: Path) -> None:
    two_cards(cfg)
    edit(cfg / "services.yaml", "vram_mb: 4000\n    priority: 40",
         "vram_mb: 20000\n    priority: 40\n    device: 1")
    (err,) = errors(cfg)
    assert "services.vidi.vram_mb: 20000 MB is more than GPU 1 can ever give " \
           "(12288 MB total - 0 MB reserve = 12288 MB)" in err, err


def test_a_phase_with_a_two_card_service_is_checked_against_the_cards_together(
        cfg: Path) -> None:
    two_cards(cfg)  # 23552 + 12288 MB
    edit(cfg / "services.yaml", "vram_mb: 4000\n    priority: 40",
         "vram_mb: 12000\n    priority: 40\n    gpus: 2")
    edit(cfg / "phases.yaml", "services: [vidi]", "services: [vidi, comfyui]")
    (err,) = errors(cfg)
    assert "phase needs 44000 MB together, more than the budget of all GPUs together of " \
           "35840 MB" in err, err
