"""Runtime: the shared vocabulary (Mesh, Plan, placements) and what executes a plan."""

from .choices import Choices
from .errors import (
           AutoshardError,
           CaptureError,
           CheckpointError,
           DesyncError,
           MeshError,
           PlanError,
           PlanMismatchError,
           ScheduleError,
)
from .mesh import Mesh
from .plan import ParamPlan, Plan

__all__ = ["Choices", "AutoshardError", "CaptureError", "CheckpointError", "DesyncError", "ScheduleError", "MeshError", "PlanError", "PlanMismatchError", "Mesh",
           "ParamPlan", "Plan"]
