"""Drivers behind one Protocol: native processes and Docker containers."""

from gpu_manager.units.drivers.base import Driver, DriverError, ExitInfo

__all__ = ["Driver", "DriverError", "ExitInfo"]
