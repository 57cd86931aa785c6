"""`gpu-manager serve` loads only what serving needs: a restart by systemd is back on /ready
in about a second (bench/footprint.py measures it; timing would flake here, so this checks
the cause: which modules the serve path imports)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# Run the real entry point up to the moment uvicorn would start, then list the modules.
PROBE = """
import sys, uvicorn
def listed(*args, **kwargs):
    print("\\n".join(sorted(k for k, v in sys.modules.items() if v is not None)))
uvicorn.Server.run = listed
sys.argv = ["gpu-manager", "serve", "--state-dir", sys.argv[1], "--config-dir", sys.argv[2]]
from gpu_manager.cli import main
main()
"""
ROOT = Path(__file__).resolve().parent.parent


def test_serve_does_not_import_the_client_side(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path), str(ROOT)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    modules = set(result.stdout.split())
    assert "gpu_manager.api.app" in modules and "fastapi" in modules  # it did get that far
    unwanted = {m for m in modules if m.split(".")[0] in ("rich", "pygments", "docker")
                or m in ("gpu_manager.cli.client", "gpu_manager.cli.local",
                         "gpu_manager.cli.common", "httpx._main", "gpu_manager.client")}
    assert not unwanted, f"the serve path imports {sorted(unwanted)}"


def test_the_full_command_line_still_has_every_verb() -> None:
    exe = Path(sys.executable).with_name("gpu-manager")
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr
    for verb in ("status", "phase", "start", "stop", "sleep", "serve", "check-config", "plan"):
        assert f" {verb} " in result.stdout, verb
    serve = subprocess.run([str(exe), "serve", "--help"], capture_output=True, text=True,
                           timeout=60, check=False)
    assert serve.returncode == 0 and "--config-dir" in serve.stdout
