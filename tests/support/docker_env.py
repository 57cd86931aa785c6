"""The Docker engine and a local busybox image (no registry is reachable, so we import one)."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path
from typing import Any

from tests.support.env import BUSYBOX_IMAGE, TEST_LABEL, unavailable

BUSYBOX_CANDIDATES = (Path("/bin/busybox"), Path("/usr/bin/busybox"))


def docker_client() -> Any:
    try:
        import docker
    except ImportError:  # pragma: no cover - a dependency of the project
        unavailable("the docker SDK is not installed")
    try:
        client = docker.from_env(timeout=30)
        client.ping()
    except Exception as exc:
        unavailable(f"no Docker engine reachable ({exc.__class__.__name__}: {exc}); "
                    "./dev test starts one as root")
    return client


def _static_busybox() -> Path:
    for path in BUSYBOX_CANDIDATES:
        if path.is_file():
            head = path.read_bytes()[:16384]
            # A dynamically linked busybox names its loader near the top; it cannot run alone
            # in an empty image.
            if b"ld-linux" not in head and b"ld-musl" not in head:
                return path
    unavailable("no static busybox found (Debian: apt-get install busybox-static)")


def ensure_busybox_image(client: Any) -> str:
    """Build `gpu-manager-test/busybox` from the host's static busybox, once."""
    try:
        client.images.get(BUSYBOX_IMAGE)
        return BUSYBOX_IMAGE
    except Exception:  # docker.errors.ImageNotFound
        pass
    binary = _static_busybox()
    applets = subprocess.run([str(binary), "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d in ("bin", "tmp", "proc", "sys", "dev", "etc"):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
        tar.add(str(binary), arcname="bin/busybox")
        for applet in applets:
            if applet == "busybox":
                continue
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type = tarfile.SYMTYPE
            link.linkname = "busybox"
            tar.addfile(link)
    repo, tag = BUSYBOX_IMAGE.rsplit(":", 1)
    client.api.import_image_from_data(buf.getvalue(), repository=repo, tag=tag)
    client.images.get(BUSYBOX_IMAGE)
    return BUSYBOX_IMAGE


def remove_test_containers(client: Any) -> None:
    for c in client.containers.list(all=True, filters={"label": TEST_LABEL}):
        c.remove(force=True)
