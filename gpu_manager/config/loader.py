"""Load and validate the inventory; every error names the file, the line and the field.

PyYAML's plain `safe_load` loses line numbers and silently keeps the last of two duplicate keys
(two services both called `vidi` would quietly become one). So we compose the node tree first,
record the line of every key path and reject duplicates, then validate with pydantic and map each
error's location back to the line it came from.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from gpu_manager.config.models import (
    DockerService,
    FleetConfig,
    GpuConfig,
    HostConfig,
    LeaseConfig,
    PhaseConfig,
    PhasesFile,
    ServiceConfig,
    ServicesFile,
)

SERVICES_FILE = "services.yaml"
PHASES_FILE = "phases.yaml"
CONFIG_DIR_ENV = "GPU_MANAGER_CONFIG_DIR"

Path_ = tuple[str, ...]
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class ConfigIssue:
    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}"
        if self.field:
            return f"{where}: {self.field}: {self.message}"
        return f"{where}: {self.message}"


class ConfigError(Exception):
    """One or more problems in the inventory files; `issues` lists each with file and line."""

    def __init__(self, issues: Sequence[ConfigIssue]) -> None:
        self.issues = list(issues)
        super().__init__("\n".join(str(i) for i in self.issues))


@dataclass(frozen=True)
class Inventory:
    """The validated inventory: what the daemon manages and how phases use it."""

    gpu: GpuConfig
    services: Mapping[str, ServiceConfig]
    phases: Mapping[int, PhaseConfig]
    config_dir: Path
    lines: Mapping[str, Mapping[Path_, int]] = field(default_factory=dict, repr=False)
    leases: LeaseConfig = field(default_factory=LeaseConfig)
    prewarm: bool = False
    # Accepted but deprecated (`evict:`, `preempt:`): logged at every load, shown by `check`.
    warnings: tuple[ConfigIssue, ...] = ()
    host: HostConfig = field(default_factory=HostConfig)
    fleet: FleetConfig | None = None

    @property
    def budget_mb(self) -> int | None:
        """Declared budget (total - reserve), before foreign usage; None when total unknown."""
        if self.gpu.total_mb is None:
            return None
        return self.gpu.total_mb - self.gpu.reserve_mb

    def phases_of(self, service: str) -> list[int]:
        return sorted(n for n, p in self.phases.items() if service in p.services)

    def summary(self) -> str:
        total = f"{self.gpu.total_mb} MB" if self.gpu.total_mb is not None else "total from NVML"
        if self.gpu.several:
            cards = ", ".join(f"{d.index}: {d.total_mb or 'NVML'} MB - {d.reserve_mb}"
                              for d in self.gpu.managed)
            return (f"{len(self.services)} services, {len(self.phases)} phases, "
                    f"gpu backend {self.gpu.backend} on {len(self.gpu.managed)} devices "
                    f"({cards}), placement {self.gpu.placement}")
        return (
            f"{len(self.services)} services, {len(self.phases)} phases, "
            f"gpu backend {self.gpu.backend} ({total}, reserve {self.gpu.reserve_mb} MB)"
        )


class _Doc:
    """One parsed YAML file: the data and the line of every key path."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = path.name
        self.lines: dict[Path_, int] = {(): 1}
        self.issues: list[ConfigIssue] = []
        self.data: Any = None
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            self.issues.append(ConfigIssue(self.name, 1, "", f"cannot read: {exc.strerror}"))
            return
        except UnicodeDecodeError as exc:
            self.issues.append(ConfigIssue(self.name, 1, "", f"not UTF-8 text: {exc.reason}"))
            return
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is not None:
                self._walk(node, ())
                self.data = loader.construct_document(node)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark is not None else 1
            problem = " ".join(p for p in (exc.context, exc.problem) if p)
            self.issues.append(ConfigIssue(self.name, line, "", f"invalid YAML: {problem}"))
        except yaml.YAMLError as exc:
            self.issues.append(ConfigIssue(self.name, 1, "", f"invalid YAML: {exc}"))
        finally:
            loader.dispose()

    def _walk(self, node: yaml.Node, at: Path_) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key_node, value_node in node.value:
                key = str(key_node.value)
                line = key_node.start_mark.line + 1
                if key in seen:
                    self.issues.append(ConfigIssue(
                        self.name, line, ".".join((*at, key)),
                        f"duplicate key {key!r} (first defined at line {seen[key]})",
                    ))
                    continue
                seen[key] = line
                self.lines[(*at, key)] = line
                self._walk(value_node, (*at, key))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self.lines[(*at, str(i))] = item.start_mark.line + 1
                self._walk(item, (*at, str(i)))

    def locate(self, loc: Sequence[int | str]) -> tuple[int, str]:
        """Line and dotted field path for a pydantic error location."""
        matched: Path_ = ()
        shown: list[str] = []
        for i, item in enumerate(loc):
            candidate = (*matched, str(item))
            if candidate in self.lines:
                matched = candidate
                shown.append(str(item))
            elif i == len(loc) - 1:
                shown.append(str(item))  # a missing or unknown field: name it
            # else: a union tag pydantic inserts (`native`, `docker`); not in the file
        return self.lines.get(matched, 1), ".".join(shown)

    def issue(self, loc: Sequence[int | str], message: str) -> ConfigIssue:
        line, field_path = self.locate(loc)
        return ConfigIssue(self.name, line, field_path, message)

    def validate(self, model: type[M]) -> M | None:
        if self.issues:
            return None
        data = {} if self.data is None else self.data
        if not isinstance(data, dict):
            self.issues.append(ConfigIssue(self.name, 1, "", "expected a mapping at the top level"))
            return None
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            for err in exc.errors(include_url=False):
                self.issues.append(self.issue(err["loc"], _message(err)))
            return None


def _message(err: Mapping[str, Any]) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown key"
    if err["type"] == "missing":
        return "required field is missing"
    msg = str(err["msg"])
    return msg.removeprefix("Value error, ")


def default_config_dir() -> Path:
    return Path(os.environ.get(CONFIG_DIR_ENV) or Path.cwd())


def load_inventory(config_dir: Path | str | None = None) -> Inventory:
    """Load `services.yaml` (required) and `phases.yaml` (optional) from `config_dir`."""
    base = Path(config_dir) if config_dir is not None else default_config_dir()
    services_path = base / SERVICES_FILE
    if not services_path.is_file():
        raise ConfigError([ConfigIssue(str(services_path), 1, "", "file not found")])
    sdoc = _Doc(services_path)
    sfile = sdoc.validate(ServicesFile)
    phases_path = base / PHASES_FILE
    pdoc: _Doc | None = _Doc(phases_path) if phases_path.is_file() else None
    pfile = pdoc.validate(PhasesFile) if pdoc is not None else PhasesFile()

    issues = [*sdoc.issues, *(pdoc.issues if pdoc else [])]
    if sfile is not None:
        issues += _check_services(sfile, sdoc)
    if pdoc is not None and pfile is not None:
        # Even when services.yaml is broken, its keys still tell which names exist, so phase
        # typos are reported in the same run instead of one file at a time.
        raw = sdoc.data.get("services") if isinstance(sdoc.data, dict) else None
        names = set(sfile.services) if sfile else set(raw) if isinstance(raw, dict) else None
        if names is not None:
            issues += _check_phases(pfile, pdoc, names, sfile)
    if issues:
        raise ConfigError(sorted(issues, key=lambda i: (i.file, i.line)))
    assert sfile is not None and pfile is not None
    lines = {sdoc.name: sdoc.lines, **({pdoc.name: pdoc.lines} if pdoc else {})}
    return Inventory(sfile.gpu, sfile.services, pfile.phases, base, lines, sfile.leases,
                     sfile.prewarm, tuple(_legacy_warnings(sdoc)), sfile.host, sfile.fleet)


def _legacy_warnings(sdoc: _Doc) -> list[ConfigIssue]:
    raw = sdoc.data.get("services") if isinstance(sdoc.data, dict) else None
    out: list[ConfigIssue] = []
    for name, svc in (raw or {}).items() if isinstance(raw, dict) else ():
        if not isinstance(svc, dict):
            continue
        if svc.get("evict") is not None:
            out.append(sdoc.issue(("services", name, "evict"), "deprecated: read as "
                                  "`sleep: {api: ollama, url, timeout_s}`; write that instead"))
        if svc.get("preempt") is not None:
            out.append(sdoc.issue(("services", name, "preempt"), "deprecated: read as "
                                  "`sleep: {api: pause, pause: {...}, wake_when_free: true}`; "
                                  "write that instead"))
    return out


def _check_services(sfile: ServicesFile, sdoc: _Doc) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = []
    containers: dict[str, str] = {}
    models: dict[str, str] = {}
    for name, svc in sfile.services.items():
        for i, model in enumerate(svc.serve.models if svc.serve else ()):
            if model in models:
                issues.append(sdoc.issue(
                    ("services", name, "serve", "models", str(i)),
                    f"model {model!r} is already served by service {models[model]!r}"))
            models.setdefault(model, name)
        issues += _check_placement(sfile.gpu, sdoc, name, svc)
        if svc.residual_mb is not None and svc.residual_mb > svc.vram_mb:
            issues.append(sdoc.issue(
                ("services", name, "sleep", "residual_mb"),
                f"sleep.residual_mb ({svc.residual_mb}) is more than vram_mb ({svc.vram_mb})"))
        if isinstance(svc, DockerService):
            cname = svc.container.lstrip("/")
            if cname in containers:
                issues.append(sdoc.issue(
                    ("services", name, "container"),
                    f"container {cname!r} is already managed by service {containers[cname]!r}",
                ))
            containers.setdefault(cname, name)
    return issues


def _check_placement(gpu: GpuConfig, sdoc: _Doc, name: str,
                     svc: ServiceConfig) -> list[ConfigIssue]:
    """An impossible pin, explained: a card that is not managed, more cards than it may
    use, or a size no card it may use can ever give."""
    cards = {d.index: d for d in gpu.managed}
    known = ", ".join(str(i) for i in cards)
    allowed = svc.allowed_devices
    where: tuple[str | int, ...] = ("services", name, "device" if isinstance(
        svc.device, int) else "devices")
    missing = [i for i in allowed or () if i not in cards]
    if missing:
        what = "device" if len(missing) == 1 else "devices"
        return [sdoc.issue(where, f"{what} {', '.join(map(str, missing))} "
                           f"{'is' if len(missing) == 1 else 'are'} not managed by this "
                           f"daemon (gpu devices: {known})")]
    usable = [cards[i] for i in (allowed or tuple(cards))]
    if svc.gpus > len(usable):
        return [sdoc.issue(("services", name, "gpus"),
                           f"needs {svc.gpus} cards at once but may use only {len(usable)} "
                           f"(devices {', '.join(str(d.index) for d in usable)})")]
    budgets = [(d.budget_mb, d) for d in usable if d.budget_mb is not None]
    fitting = [d for b, d in budgets if svc.vram_mb <= b]
    if len(budgets) == len(usable) and len(fitting) < svc.gpus:
        if len(usable) == 1:
            d = usable[0]
            gpu_word = "the GPU" if len(cards) == 1 else f"GPU {d.index}"
            why = (f"{svc.vram_mb} MB is more than {gpu_word} can ever give "
                   f"({d.total_mb} MB total - {d.reserve_mb} MB reserve = {d.budget_mb} MB)")
        else:
            best = max(b for b, _ in budgets)
            why = (f"{svc.vram_mb} MB{' on each card' if svc.gpus > 1 else ''} is more than "
                   f"{'enough' if fitting else 'any'} of its cards can give "
                   f"(the largest budget is {best} MB"
                   + (f"; {len(fitting)} of the {svc.gpus} cards it needs fit it)"
                      if fitting else ")"))
        return [sdoc.issue(("services", name, "vram_mb"), why)]
    return []


def _check_phases(
    pfile: PhasesFile, pdoc: _Doc, names: set[str], sfile: ServicesFile | None
) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = []
    known = ", ".join(sorted(names)) or "(none)"
    for number, phase in pfile.phases.items():
        for field_name in ("services", "keep"):
            for i, svc_name in enumerate(getattr(phase, field_name)):
                if svc_name not in names:
                    issues.append(pdoc.issue(
                        ("phases", number, field_name, i),
                        f"unknown service {svc_name!r} (known: {known})",
                    ))
        if phase.next is not None and phase.next not in pfile.phases:
            issues.append(pdoc.issue(
                ("phases", number, "next"),
                f"unknown phase {phase.next} (known: "
                f"{', '.join(str(n) for n in sorted(pfile.phases))})"))
        if sfile is None or any(d.budget_mb is None for d in sfile.gpu.managed):
            continue
        cards = [d.budget_mb or 0 for d in sfile.gpu.managed]
        budget, largest = sum(cards), max(cards)
        listed = [sfile.services[s] for s in phase.services if s in sfile.services]
        sizes = [svc.vram_mb * svc.gpus for svc in listed]
        # One oversized service is already reported at its own line (its size per card).
        if sum(sizes) > budget and all(svc.vram_mb <= largest for svc in listed):
            what = "the GPU budget" if len(cards) == 1 else "the budget of all GPUs together"
            issues.append(pdoc.issue(
                ("phases", number, "services"),
                f"phase needs {sum(sizes)} MB together, more than {what} of {budget} MB",
            ))
    return issues
