"""autoshard: train an unmodified PyTorch model on many GPUs.

``autoshard(model, mesh)`` captures the model with ``torch.export``, rewrites its graph with
tensor- and data-parallel passes, and returns a :class:`ShardedModule` whose ``train_step``
computes the same function as the model on one device.
"""

from autoshard.runtime import (
    AutoshardError,
    CaptureError,
    CheckpointError,
    DesyncError,
    Mesh,
    MeshError,
    ParamPlan,
    Plan,
    PlanError,
    PlanMismatchError,
    ScheduleError,
)

from .api import ShardedModule, autoshard
from .backend import backend, set_mesh
from .launch import launch


def load(path: str, sm: ShardedModule) -> None:
    """Load a checkpoint written by ``ShardedModule.save`` into ``sm``, whatever its plan (collective)."""
    from autoshard.runtime.checkpoint import load as _load

    _load(path, sm)


__version__ = "0.1.0"

__all__ = [
    "AutoshardError", "CaptureError", "CheckpointError", "DesyncError", "ScheduleError", "Mesh", "MeshError", "ParamPlan", "Plan", "PlanError",
    "PlanMismatchError", "ShardedModule", "autoshard", "backend", "launch", "load", "set_mesh",
]
