"""The `fleet:` section of services.yaml: this daemon is one host of a fleet on Ray.

Ray gives membership (which hosts are alive), pinning and execution; each host's daemon stays
the judge of its own VRAM, so placement asks every live host's planner for a dry run. A host
is found through its Ray node's labels: `fleet-host=<host>` and `gpum-port=<daemon port>`; its
daemon's URL is that node's address plus the port (`gpu-manager fleet join` prints the
`ray start` line that sets them).
"""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from gpu_manager.config.sleep import _Strict

# Ray's label values: what a host name may be (it is one).
LABEL_VALUE = re.compile(r"^[A-Za-z0-9._-]{1,63}$")
HOST_LABEL = "fleet-host"
PORT_LABEL = "gpum-port"


class FleetConfig(_Strict):
    # The Ray cluster's GCS address (`ray start --head` prints it), host:port.
    address: str = Field(min_length=3, max_length=255)
    # This host's name in the fleet: its Ray node's `fleet-host` label.
    host: str
    # Each call to another host's daemon (a dry run, a status, the transition itself is
    # bounded by the operation's own deadline).
    peer_timeout_s: float = Field(default=5.0, gt=0, le=120)
    # Ray's node list is asked at most this often (a placement within this reuses it).
    membership_ttl_s: float = Field(default=0.5, ge=0, le=60)
    # Each question to Ray's GCS.
    ray_timeout_s: float = Field(default=3.0, gt=0, le=60)
    # A transition placed on a host (a phase, a start) may take this long there.
    operation_timeout_s: float = Field(default=600.0, gt=0, le=3600)
    # Places a request tries before it is refused: a host that refuses at execution (its
    # dry run was stale) or goes away is left out of the next.
    attempts: int = Field(default=3, ge=1, le=10)
    # The environment variable holding the token the fleet's daemons share (their
    # mutating routes need it); unset: this daemon's own token, if any.
    token_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")

    @field_validator("host")
    @classmethod
    def _label(cls, v: str) -> str:
        if not LABEL_VALUE.match(v):
            raise ValueError(f"host {v!r} is not a Ray label value ([A-Za-z0-9._-], 1-63)")
        return v

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        host, sep, port = v.removeprefix("ray://").rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"address {v!r} is not host:port (the Ray head's GCS address)")
        return v
