"""The inventory: `services.yaml` and `phases.yaml`, validated with file:line errors."""

from gpu_manager.config.loader import (
    CONFIG_DIR_ENV,
    PHASES_FILE,
    SERVICES_FILE,
    ConfigError,
    ConfigIssue,
    Inventory,
    default_config_dir,
    load_inventory,
)
from gpu_manager.config.models import (
    DeviceRequestConfig,
    DockerService,
    GpuConfig,
    HealthConfig,
    LeaseConfig,
    NativeService,
    OllamaEvict,
    PauseConfig,
    PhaseConfig,
    ServiceConfig,
    SleepConfig,
)

__all__ = [
    "CONFIG_DIR_ENV",
    "PHASES_FILE",
    "SERVICES_FILE",
    "ConfigError",
    "ConfigIssue",
    "DeviceRequestConfig",
    "DockerService",
    "GpuConfig",
    "HealthConfig",
    "Inventory",
    "LeaseConfig",
    "NativeService",
    "OllamaEvict",
    "PauseConfig",
    "PhaseConfig",
    "ServiceConfig",
    "SleepConfig",
    "default_config_dir",
    "load_inventory",
]
