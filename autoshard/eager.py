"""Graceful degradation: train a model that ``torch.export`` cannot capture with plain data parallelism.

Without a graph there is nothing to rewrite for tensor or pipeline parallelism, so the only plan left
is the unmodified module (a deep copy) on every rank, each on its share of the global batch, with
gradients averaged over the data-parallel ranks before every optimizer step. The result computes the
same function as the single-process step on the global batch (contract 1), and the plan says why the
model runs this way: ``plan.notes`` quotes the export failure, ``plan.fallbacks`` has one entry for the
whole module and :attr:`EagerDataParallel.fallback` is ``"eager-data-parallel"``. ZeRO stages 1-2,
optimizer offload and gradient clipping work too (the runtime's ZeroOptimizer over the dp ranks);
ZeRO-3 and mixed precision need the graph (gathers before each block, casts) and are refused.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import torch

from autoshard.runtime import collectives as C
from autoshard.runtime.data_parallel import GradientSync, make_buckets
from autoshard.runtime.errors import CaptureError
from autoshard.runtime.guards import StepGuard
from autoshard.runtime.mesh import Mesh
from autoshard.runtime.plan import ParamPlan, Plan
from autoshard.runtime.zero import ZeroOptimizer

from .steps import finish_step, model_loss

FALLBACK = "eager-data-parallel"


def _as_call(inputs: Any) -> tuple[tuple, dict]:
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    return tuple(inputs), {}


class EagerDataParallel(torch.nn.Module):
    """The unmodified module on every rank of the data-parallel dimension; gradients averaged over it.

    Offers the parts of :class:`autoshard.api.ShardedModule` that make sense without a graph:
    ``train_step``, ``forward``, ``full_state_dict``, ``local_parameters``, ``stats``, ``plan``, ``close``.
    """

    fallback = FALLBACK

    def __init__(self, model: torch.nn.Module, mesh: Mesh, error: CaptureError, *,
                 loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
                 optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer] | None = None,
                 bucket_mb: float = 25.0, zero: int = 0, offload: str | None = None,
                 grad_clip: float | None = None, offload_overlap: bool = True) -> None:
        super().__init__()
        self.mesh = mesh
        self.module = copy.deepcopy(model).to(mesh.device)
        self.loss_fn = loss_fn
        self._params = dict(self.module.named_parameters())
        self._dp_key = mesh.group("dp").name
        if not mesh.virtual:
            C.register_group(mesh.group("dp"))
        names = list(self._params)[::-1]  # gradients arrive roughly in reverse definition order
        nbytes = {n: p.numel() * p.element_size() for n, p in self._params.items()}
        use_zero = zero > 0 or offload is not None or grad_clip is not None
        buckets = make_buckets(names, nbytes, int(bucket_mb * 2**20)) if mesh.size("dp") > 1 or use_zero else []
        self._zero: ZeroOptimizer | None = None
        if use_zero:  # ZeRO 1/2 over dp: the module's parameters become views of the flat compute buckets
            if optimizer is None:
                raise CaptureError(f"{error}\nzero/offload/grad_clip need an optimizer factory: optimizer=lambda ps: ...")
            self._zero = ZeroOptimizer(
                self._params, {n: p.detach() for n, p in self._params.items()}, buckets, group=self._dp_key,
                size=mesh.size("dp"), rank=mesh.coord("dp"), stage=zero, precision="fp32",
                optimizer_factory=optimizer, device=mesh.device, offload=offload, grad_clip=grad_clip,
                global_norm=not mesh.virtual, overlap=offload_overlap)
            self._sync: GradientSync = self._zero
            self.optimizer = self._zero.optimizer
        else:
            self._sync = GradientSync(self._params, buckets, self._dp_key, mesh.size("dp"))
            self.optimizer = optimizer(list(self._params.values())) if optimizer is not None else None
        self.schedule = None
        self._steps = self._skipped = 0
        self._last_dp_bytes = 0.0
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        note = (f"fallback: {FALLBACK}: {first} The whole module runs unmodified on every rank with its gradients "
                f"averaged over dp={mesh.size('dp')}; tensor and pipeline parallelism need a captured graph.")
        aliases: dict[str, list[str]] = {}
        seen = {id(p): n for n, p in self._params.items()}
        for n, p in self.module.named_parameters(remove_duplicate=False):
            if seen.get(id(p), n) != n:
                aliases.setdefault(seen[id(p)], []).append(n)
        self.plan = Plan(
            mesh=mesh.to_dict(),
            params={n: ParamPlan(shape=list(p.shape), placement="R", local_shape=list(p.shape), role="replicated",
                                 aliases=aliases.get(n, [])) for n, p in self._params.items()},
            buffers=sorted(n for n, _ in self.module.named_buffers()),
            fallbacks=[{"node": "*", "op": "torch.export", "reason": f"{FALLBACK}: {str(error)[:1500]}",
                        "source": "", "module": type(model).__name__}],
            dp_buckets=buckets,
            notes=[note],
            zero={"stage": zero, "precision": "fp32", "offload": offload, "grad_clip": grad_clip},
        )
        self._guard = StepGuard(mesh, self, [])  # [reliability] runtime/guards.py
        warnings.warn(f"autoshard: {error}\nFalling back to {FALLBACK}: the unmodified {type(model).__name__} on "
                      f"every rank, gradients averaged over dp={mesh.size('dp')}.", stacklevel=3)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the unmodified module on this rank's inputs."""
        return self.module(*args, **kwargs)

    def train(self, mode: bool = True) -> EagerDataParallel:
        self.training = bool(mode)
        self.module.train(mode)
        return self

    def _loss(self, out: Any, target: Any) -> torch.Tensor:
        return model_loss(out, target, self.loss_fn)

    def train_step(self, inputs: Any, target: Any = None) -> float:
        """Forward, backward, gradient average over dp and optimizer step; returns the global mean loss."""
        if self.optimizer is None:
            raise RuntimeError("train_step needs an optimizer: autoshard(..., optimizer=lambda ps: ...)")
        def move(t: Any) -> Any:
            return t.to(self.mesh.device) if isinstance(t, torch.Tensor) else t

        args, kwargs = _as_call(inputs)
        args = tuple(move(a) for a in args)
        kwargs = {k: move(v) for k, v in kwargs.items()}
        self._guard.begin((args, kwargs, target))
        C.reset_bytes(self._dp_key)
        self._sync.begin()
        loss = self._loss(self.module(*args, **kwargs), move(target))
        if loss.dim() != 0:
            raise ValueError(f"the loss must be a scalar, got shape {tuple(loss.shape)}")
        loss.backward()
        self._sync.finish()
        g = loss.detach().clone().float()
        if self.mesh.data_size > 1:
            g.div_(self.mesh.data_size)
            C.all_reduce_(g, self._dp_key)

        value, stepped = finish_step(self._zero, self.optimizer, g, self._steps, guard=self._guard)
        self._last_dp_bytes = C.bytes_sent(self._dp_key).get(self._dp_key, 0.0)
        self._skipped += not stepped
        self._steps += 1
        return value

    def local_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Every parameter (each rank holds the whole model)."""
        return dict(self._params)

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's ``state_dict`` on CPU (identical on every rank)."""
        return {k: v.detach().to("cpu").clone() for k, v in self.module.state_dict().items()}

    def stats(self) -> dict[str, float]:
        """Communication of the last step (data-parallel gradient averaging only) and step counts."""
        return {"tp_comm_bytes": 0.0, "dp_comm_bytes": self._last_dp_bytes, "pp_comm_bytes": 0.0,
                "comm_bytes_per_step": self._last_dp_bytes, "steps": float(self._steps),
                "skipped_steps": float(self._skipped),
                **({"offload_wait_s": self._zero.offload_wait_s, "offload_host_s": self._zero.offload_host_s}
                   if self._zero is not None and self._zero.offload is not None else {})}

    def close(self) -> None:
        """Remove the gradient hooks."""
        self._sync.remove()


def eager_data_parallel(model: torch.nn.Module, mesh: Mesh, error: CaptureError, *, zero: int = 0,
                        precision: str = "fp32", offload: str | None = None, grad_clip: float | None = None,
                        offload_overlap: bool = True, **options: Any) -> EagerDataParallel:
    """The fallback for a model ``torch.export`` cannot capture: plain data parallelism, or ``error`` re-raised.

    ZeRO stages 1 and 2, optimizer offload and gradient clipping work over the data-parallel ranks.
    Raises ``CaptureError`` (quoting ``error``) when the mesh asks for tensor, pipeline or expert
    parallelism, or for ZeRO-3, parameter offload or mixed precision: those need the captured graph today.
    """
    wants = {d: mesh.size(d) for d in ("tp", "pp", "ep") if mesh.size(d) > 1}
    if wants:
        raise CaptureError(f"{error}\nWithout a captured graph only data parallelism works: the mesh asks for "
                           + ", ".join(f"{d}={n}" for d, n in wants.items()) + "; use Mesh(dp=...) alone, or make "
                           "the model capturable.") from error
    extras = {k: v for k, v in (("zero", zero), ("precision", precision), ("offload", offload))
              if v not in (0, 1, 2, "fp32", None, "optimizer")}
    if extras:
        raise CaptureError(f"{error}\nThe {FALLBACK} fallback for uncapturable models does not support "
                           f"{', '.join(f'{k}={v!r}' for k, v in extras.items())} yet; drop them or make the model "
                           "capturable.") from error
    return EagerDataParallel(model, mesh, error, zero=zero, offload=offload, grad_clip=grad_clip,
                             offload_overlap=offload_overlap, **options)
