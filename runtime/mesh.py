"""Mesh: named parallel dimensions over ranks.

A :class:`Mesh` names how the world's ranks are arranged: ``Mesh(dp=2, tp=2)`` puts 4 ranks on a
2×2 grid whose inner dimension is tensor parallel (``tp``, fastest links) and whose outer one is
data parallel (``dp``). Dimensions are laid out outer→inner in the order ``pp, dp, ep, tp``, so
``rank = ((pp_i * dp + dp_i) * ep + ep_i) * tp + tp_i``.

A real mesh joins (or initialises) the default process group and builds one sub-group per
dimension through :func:`torch.distributed.device_mesh.init_device_mesh`. A *virtual* mesh
(``Mesh.virtual(...)``) has no processes: the planner, the CLI and pass unit tests use it.
"""

from __future__ import annotations

import datetime
import itertools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import MeshError

DIM_ORDER: tuple[str, ...] = ("pp", "dp", "ep", "tp")
SUPPORTED_DIMS: frozenset[str] = frozenset({"pp", "dp", "ep", "tp"})

_mesh_ids = itertools.count()


@dataclass(frozen=True)
class GroupHandle:
    """One mesh dimension as seen from this rank: its process group, size and our index in it."""

    name: str  # unique key, e.g. "mesh0.tp"
    size: int
    rank: int
    group: object | None  # torch.distributed.ProcessGroup, or None when size == 1 / virtual


def collective_timeout() -> datetime.timedelta | None:
    """How long one collective waits for its peers before failing: ``AUTOSHARD_COLLECTIVE_TIMEOUT``
    seconds when set (``autoshard.launch`` sets it, 300 s by default), else torch's default."""
    value = os.environ.get("AUTOSHARD_COLLECTIVE_TIMEOUT")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        raise MeshError(f"AUTOSHARD_COLLECTIVE_TIMEOUT={value!r} must be a number of seconds") from None
    if not seconds > 0:
        raise MeshError(f"AUTOSHARD_COLLECTIVE_TIMEOUT={value!r} must be a positive number of seconds")
    return datetime.timedelta(seconds=seconds)


class Mesh:
    """Named parallel dimensions over the world's ranks.

    ``Mesh(dp=2, tp=2)`` under ``torchrun`` (or :func:`autoshard.launch`) joins the default process
    group, initialising it if needed (NCCL when CUDA is available, Gloo otherwise). The product of
    the degrees must equal the world size.
    """

    def __init__(
        self,
        *,
        dp: int = 1,
        tp: int = 1,
        pp: int = 1,
        ep: int = 1,
        device: str | torch.device | None = None,
        _virtual_rank: int | None = None,
    ) -> None:
        self.degrees: dict[str, int] = {"pp": pp, "dp": dp, "ep": ep, "tp": tp}
        for name, deg in self.degrees.items():
            if not isinstance(deg, int) or isinstance(deg, bool) or deg < 1:
                raise MeshError(f"mesh degree {name}={deg!r} must be a positive integer")
        unsupported = [d for d in DIM_ORDER if self.degrees[d] > 1 and d not in SUPPORTED_DIMS]
        if unsupported:
            raise MeshError(
                f"mesh dimension(s) {', '.join(unsupported)} are not supported yet; this version "
                f"shards over {', '.join(sorted(SUPPORTED_DIMS))}. Use Mesh(pp=..., dp=..., tp=...)."
            )
        self.id = next(_mesh_ids)
        self.virtual = _virtual_rank is not None
        self.world_size = 1
        for d in self.degrees.values():
            self.world_size *= d
        self._groups: dict[str, GroupHandle] = {}
        self.device_mesh = None
        if self.virtual:
            if not 0 <= _virtual_rank < self.world_size:
                raise MeshError(f"virtual rank {_virtual_rank} outside a mesh of {self.world_size} ranks")
            self.rank = _virtual_rank
            self.device = torch.device(device or "cpu")
        else:
            self.rank = self._join(device)
        self._coords = self._coords_of(self.rank)
        if not self.virtual:
            self._build_groups()

    # ------------------------------------------------------------------ construction
    @classmethod
    def virtual(cls, *, dp: int = 1, tp: int = 1, pp: int = 1, ep: int = 1, rank: int = 0,
                device: str | torch.device | None = None) -> Mesh:
        """A mesh with no processes, for planning and for unit tests of passes (``device="meta"``: a model
        on the meta device is planned without allocating anything)."""
        return cls(dp=dp, tp=tp, pp=pp, ep=ep, device=device, _virtual_rank=rank)

    @classmethod
    def auto(cls, *, profile: object = None, memory_gib: float | None = None, gpus_per_node: int | None = None,
             device: str | None = None) -> AutoMesh:  # noqa: F821 - runtime/hardware.py, imported when called
        """A mesh whose degrees ``autoshard()`` chooses with the planner, for this world's size.

        Returns an :class:`~autoshard.runtime.hardware.AutoMesh` request (the world size comes from
        the running process group, else ``WORLD_SIZE``, else 1); ``profile`` is a hardware profile or
        its name (default: detected from the device), ``memory_gib`` the per-rank budget.
        """
        from .hardware import AutoMesh

        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else \
            int(os.environ.get("WORLD_SIZE", "1"))
        return AutoMesh(world, profile, memory_gib, gpus_per_node, device)

    def _join(self, device: str | torch.device | None) -> int:
        want = self.world_size
        if not dist.is_available():
            raise MeshError("torch.distributed is not available in this PyTorch build")
        if not dist.is_initialized():
            env_world = os.environ.get("WORLD_SIZE")
            if env_world is None:
                if want == 1:
                    self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
                    return 0
                raise MeshError(
                    f"{self.describe()} needs {want} ranks but no process group is running: launch "
                    f"with `torchrun --nproc-per-node {want} script.py` or autoshard.launch(fn, {want})"
                )
            if int(env_world) != want:
                raise MeshError(self._size_message(int(env_world)))
            use_cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
            if use_cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl" if use_cuda else "gloo", timeout=collective_timeout())
        world = dist.get_world_size()
        if world != want:
            raise MeshError(self._size_message(world))
        if device is None:
            backend = dist.get_backend()
            if backend == "nccl" and torch.cuda.is_available():
                device = torch.device("cuda", torch.cuda.current_device())
            else:
                device = torch.device("cpu")
        self.device = torch.device(device)
        return dist.get_rank()

    def _size_message(self, world: int) -> str:
        return (
            f"{self.describe()} needs {self.world_size} ranks (the product of its degrees) but the "
            f"world has {world}: start {self.world_size} processes, or choose degrees whose product "
            f"is {world} (e.g. Mesh(dp={world}))"
        )

    def _build_groups(self) -> None:
        names = [d for d in DIM_ORDER if self.degrees[d] > 1]
        if self.world_size > 1 and dist.is_initialized():
            from torch.distributed.device_mesh import init_device_mesh

            self.device_mesh = init_device_mesh(
                self.device.type, tuple(self.degrees[d] for d in names), mesh_dim_names=tuple(names)
            )
        for d in DIM_ORDER:
            group = self.device_mesh.get_group(d) if (self.device_mesh is not None and self.degrees[d] > 1) else None
            self._groups[d] = GroupHandle(f"mesh{self.id}.{d}", self.degrees[d], self._coords[d], group)
        if self.degrees["dp"] > 1 and self.degrees["ep"] > 1 and dist.is_initialized():
            # dp × ep together: the ranks that load different slices of the batch (every rank makes every group)
            for pp, tp in itertools.product(range(self.degrees["pp"]), range(self.degrees["tp"])):
                ranks = [self.rank_of(pp=pp, dp=d, ep=e, tp=tp) for d in range(self.degrees["dp"])
                         for e in range(self.degrees["ep"])]
                group = dist.new_group(ranks)
                if self.rank in ranks:
                    self._groups["dp_ep"] = GroupHandle(f"mesh{self.id}.dp_ep", len(ranks), ranks.index(self.rank), group)

    def _coords_of(self, rank: int) -> dict[str, int]:
        coords: dict[str, int] = {}
        rest = rank
        for d in reversed(DIM_ORDER):
            coords[d] = rest % self.degrees[d]
            rest //= self.degrees[d]
        return coords

    # ------------------------------------------------------------------ queries
    def size(self, dim: str) -> int:
        """Degree of mesh dimension ``dim`` (1 for a dimension the mesh does not use)."""
        self._check_dim(dim)
        return self.degrees[dim]

    def coord(self, dim: str) -> int:
        """This rank's index along ``dim``."""
        self._check_dim(dim)
        return self._coords[dim]

    @property
    def data_size(self) -> int:
        """How many slices the global batch is cut into (ranks differing only in tp share one)."""
        return self.degrees["dp"] * self.degrees["ep"]

    @property
    def data_rank(self) -> int:
        """Which slice of the global batch this rank loads."""
        return self._coords["dp"] * self.degrees["ep"] + self._coords["ep"]

    def data_group(self) -> GroupHandle:
        """The ranks that load different slices of the batch and share every other coordinate (dp × ep):
        dense gradients and the loss are averaged over it. It is the dp group when ep = 1."""
        if self.degrees["ep"] == 1:
            return self.group("dp")
        if self.degrees["dp"] == 1 or self.virtual:  # the ep ranks; its own key, so its bytes are counted apart
            group = None if self.virtual else self.group("ep").group
            return GroupHandle(f"mesh{self.id}.dp_ep", self.data_size, self.data_rank, group)
        return self._groups["dp_ep"]

    def group(self, dim: str) -> GroupHandle:
        """The process group of ``dim`` containing this rank (virtual meshes have none)."""
        self._check_dim(dim)
        if self.virtual:
            return GroupHandle(f"mesh{self.id}.{dim}", self.degrees[dim], self._coords[dim], None)
        return self._groups[dim]

    def ranks_along(self, dim: str) -> list[int]:
        """Global ranks that share every coordinate with this rank except ``dim``."""
        self._check_dim(dim)
        return [self.rank_of(**{dim: i}) for i in range(self.degrees[dim])]

    def rank_of(self, **coords: int) -> int:
        """Global rank at ``coords``; dimensions not given keep this rank's coordinate."""
        c = dict(self._coords, **coords)
        r = 0
        for d in DIM_ORDER:
            r = r * self.degrees[d] + c[d]
        return r

    def _check_dim(self, dim: str) -> None:
        if dim not in self.degrees:
            raise MeshError(f"unknown mesh dimension {dim!r}; known: {', '.join(DIM_ORDER)}")

    def describe(self) -> str:
        parts = [f"{d}={self.degrees[d]}" for d in DIM_ORDER if self.degrees[d] > 1]
        return f"Mesh({', '.join(parts) or 'dp=1'})"

    def to_dict(self) -> dict[str, int]:
        return {d: self.degrees[d] for d in DIM_ORDER}

    def __repr__(self) -> str:
        kind = "virtual " if self.virtual else ""
        return f"<{kind}{self.describe()} rank={self.rank} device={self.device}>"
