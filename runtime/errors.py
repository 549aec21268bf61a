"""Errors autoshard raises. Each message names the cause and a fix."""


class AutoshardError(Exception):
    """Base class of every error autoshard raises on purpose."""


class MeshError(AutoshardError, ValueError):
    """The mesh does not fit the world (wrong world size, bad degrees, no process group)."""


class PlanError(AutoshardError, ValueError):
    """The requested parallelisation is impossible for this model (e.g. indivisible dims)."""


class PlanFileError(PlanError):
    """A plan read from JSON is malformed or altered; the message names the key at fault."""


class CaptureError(AutoshardError, RuntimeError):
    """torch.export could not capture the model."""


class PlanMismatchError(AutoshardError, RuntimeError):
    """Ranks built different plans; running on would deadlock or compute garbage."""


class ScheduleError(AutoshardError, ValueError):
    """A pipeline schedule is invalid: bad sizes, a missing or duplicated action, or an order that deadlocks."""


class CheckpointError(AutoshardError, RuntimeError):
    """A checkpoint cannot be written or read: missing, corrupt, incomplete, or from another model."""


class DesyncError(AutoshardError, RuntimeError):
    """Ranks reached a training step in different states (step counters or plans differ): they no
    longer make the same collectives, and the step's gradients are mixed."""
