"""The orchestrator executes the planner's plans under the GPU lock."""

from gpu_manager.orchestrator.core import Orchestrator
from gpu_manager.orchestrator.operations import Operation, OperationError, OperationLog

__all__ = ["Operation", "OperationError", "OperationLog", "Orchestrator"]
