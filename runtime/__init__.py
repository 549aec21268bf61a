"""Runtime: the shared vocabulary (Mesh, Plan, placements) and what executes a plan."""

from .errors import AutoshardError, CaptureError, MeshError, PlanError, PlanMismatchError
from .mesh import Mesh
from .plan import ParamPlan, Plan

__all__ = ["AutoshardError", "CaptureError", "MeshError", "PlanError", "PlanMismatchError", "Mesh",
           "ParamPlan", "Plan"]
