"""autoshard: train an unmodified PyTorch model on many GPUs.

``autoshard(model, mesh)`` captures the model with ``torch.export``, rewrites its graph with
tensor- and data-parallel passes, and returns a :class:`ShardedModule` whose ``train_step``
computes the same function as the model on one device.

``import autoshard`` is cheap: the public names below are imported on first use (PEP 562), so the
command line (``autoshard --help``) starts without importing torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it, imported when the name is first read
_LAZY = {
    **dict.fromkeys(("AutoshardError", "CaptureError", "CheckpointError", "Choices", "DesyncError", "Mesh", "MeshError",
                     "ParamPlan", "Plan",
                     "PlanError", "PlanMismatchError", "ScheduleError"), "autoshard.runtime"),
    "ShardedModule": "autoshard.api",
    "autoshard": "autoshard.api",
    "build": "autoshard.api",
    "plan": "autoshard.api",
    "backend": "autoshard.backend",
    "set_mesh": "autoshard.backend",
    "launch": "autoshard.launch",
}
# functions named like the submodule that defines them: the package attribute stays the function
_SHADOWED = ("backend", "launch")

if TYPE_CHECKING:  # what static tools (type checkers, the API reference) see
    from autoshard.runtime import (
        AutoshardError,
        CaptureError,
        CheckpointError,
        Choices,
        DesyncError,
        Mesh,
        MeshError,
        ParamPlan,
        Plan,
        PlanError,
        PlanMismatchError,
        ScheduleError,
    )

    from .api import ShardedModule, autoshard, build, plan
    from .backend import backend, set_mesh
    from .launch import launch


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'autoshard' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """Importing ``autoshard.launch`` (or ``autoshard.backend``) binds the package attribute to the submodule;
    keep it the function of the same name, as an eager ``from .launch import launch`` would."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def load(path: str, sm: ShardedModule) -> None:
    """Load a checkpoint written by ``ShardedModule.save`` into ``sm``, whatever its plan (collective)."""
    from autoshard.runtime.checkpoint import load as _load

    _load(path, sm)


__all__ = [
    "AutoshardError", "CaptureError", "CheckpointError", "Choices", "DesyncError", "ScheduleError", "Mesh", "MeshError", "ParamPlan", "Plan", "PlanError",
    "PlanMismatchError", "ShardedModule", "autoshard", "backend", "build", "launch", "load", "plan", "set_mesh",
]
