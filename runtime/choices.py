"""Choices: what the user (or the planner) asks of a plan, before anything is captured.

Every way in fills the same object: ``autoshard(model, mesh, **options)`` (its keyword options are
these fields), ``Mesh.auto()`` (the planner replaces the fields left at their defaults, see
autoshard/auto.py), ``autoshard bench`` systems (``autoshard:zero=3,checkpoint=all``) and the plan a
checkpoint stores (``Plan.choices``). :meth:`Choices.validate` is the one place a bad value becomes a
:class:`~autoshard.runtime.errors.PlanError` that names the option and the fix, before any capture;
what needs the mesh or the graph (microbatches dividing the batch, block names, an unshardable
dimension) is checked where that is known.

Plain data: :meth:`to_dict` is JSON, :meth:`from_dict` reads it back and refuses unknown keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from .errors import PlanError

PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULE_NAMES = ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble")  # runtime/schedules.py's SCHEDULES


@dataclass(frozen=True)
class Choices:
    """The options of :func:`autoshard.autoshard`; see its docstring for what each one does."""

    bucket_mb: float = 25.0
    schedule: str = "1f1b"
    microbatches: int | None = None
    virtual_stages: int = 1
    split_points: tuple[str, ...] | None = None
    zero: int = 0
    offload: str | None = None
    offload_overlap: bool = True
    precision: str = "fp32"
    grad_clip: float | None = None
    prefetch: int = 1
    capacity_factor: float | None = None
    fuse: bool | None = None
    attention: str | None = None
    activation_checkpointing: None | str | int | tuple[str, ...] = None

    def __post_init__(self) -> None:  # lists arrive from users and JSON: keep the object hashable
        for name in ("split_points", "activation_checkpointing"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))

    # ------------------------------------------------------------------ checks
    def validate(self) -> Choices:
        """Raise :class:`PlanError` for a value no plan can take (names the option and the fix); else self."""
        def bad(name: str, why: str) -> PlanError:
            return PlanError(f"{name}={getattr(self, name)!r}: {why}")

        if self.zero not in (0, 1, 2, 3) or isinstance(self.zero, bool):
            raise bad("zero", "choose 0 (none), 1 (optimizer states), 2 (+ gradients) or 3 (+ parameters)")
        if self.precision not in PRECISIONS:
            raise bad("precision", f"choose one of {', '.join(PRECISIONS)}")
        if self.offload not in (None, "optimizer", "params"):
            raise bad("offload", "choose None, 'optimizer' or 'params'")
        if self.offload == "params" and self.zero != 3:
            raise PlanError("offload='params' keeps each rank's parameter slices in CPU memory, which needs "
                            "partitioned parameters: use zero=3 (or offload='optimizer')")
        if not _count(self.prefetch, 0):
            raise bad("prefetch", "must be a non-negative integer (buckets gathered ahead)")
        if self.grad_clip is not None and not (_number(self.grad_clip) and self.grad_clip > 0):
            raise bad("grad_clip", "must be a positive number (the maximum global gradient norm)")
        if not (_number(self.bucket_mb) and self.bucket_mb > 0):
            raise bad("bucket_mb", "must be a positive number of MiB (the data-parallel gradient bucket size)")
        if self.schedule not in SCHEDULE_NAMES:
            raise bad("schedule", f"choose one of {', '.join(SCHEDULE_NAMES)}")
        if self.microbatches is not None and not _count(self.microbatches, 1):
            raise bad("microbatches", "must be a positive integer (or None: 2·pp when it divides the local batch)")
        if not _count(self.virtual_stages, 1):
            raise bad("virtual_stages", "must be a positive integer (stages per pipeline rank)")
        if self.split_points is not None and not all(isinstance(s, str) and s for s in self.split_points):
            raise bad("split_points", "must be a list of module names such as ['model.layers.8']")
        if self.capacity_factor is not None and not (_number(self.capacity_factor) and self.capacity_factor > 0):
            raise bad("capacity_factor", "must be a positive number (or None: every token routed)")
        if self.fuse is not None and not isinstance(self.fuse, bool):
            raise bad("fuse", "must be True, False or None (on for CUDA meshes)")
        if not isinstance(self.offload_overlap, bool):
            raise bad("offload_overlap", "must be True or False")
        if self.attention is not None and not isinstance(self.attention, str):
            raise bad("attention", "must be a spec string such as 'block_sparse(block=64, local=4, global=1)'")
        return self

    # ------------------------------------------------------------------ queries and changes
    def replace(self, **changes: Any) -> Choices:
        """A copy with ``changes`` (unknown names: :class:`PlanError`)."""
        unknown = sorted(set(changes) - set(names()))
        if unknown:
            raise PlanError(f"unknown option(s) {', '.join(unknown)}; the options are {', '.join(names())}")
        return dataclasses.replace(self, **changes)

    def pinned(self) -> dict[str, Any]:
        """The fields that differ from their defaults: what the caller chose (the planner keeps them)."""
        default = Choices()
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != getattr(default, f.name)}

    def options(self) -> dict[str, Any]:
        """Every field as ``autoshard()`` keyword arguments (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible: every field, tuples as lists."""
        return self.options()

    @classmethod
    def from_dict(cls, d: Any) -> Choices:
        """The object :meth:`to_dict` wrote, validated (unknown keys and bad values: :class:`PlanError`)."""
        if not isinstance(d, dict):
            raise PlanError(f"choices: expected a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - set(names()))
        if unknown:
            raise PlanError(f"choices: unknown key(s) {', '.join(map(str, unknown))}")
        return cls(**d).validate()


def names() -> tuple[str, ...]:
    """The option names, in declaration order."""
    return tuple(f.name for f in fields(Choices))


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _count(v: Any, least: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


__all__ = ["PRECISIONS", "SCHEDULE_NAMES", "Choices", "names"]
