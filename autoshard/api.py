"""``autoshard(model, mesh)``: capture → plan → passes → lower, and the module that trains.

The returned :class:`ShardedModule` owns this rank's parameter shards. Each distinct input
signature (shapes, dtypes, train/eval) is captured once with ``torch.export`` and rewritten with the
*same* parameter layouts, so any batch size works after the first.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.fx import GraphModule
from torch.utils._pytree import tree_flatten, tree_map

from autoshard.passes.capture import capture
from autoshard.passes.data_parallel import gradient_order
from autoshard.passes.tensor_parallel import apply_tensor_parallel, plan_tensor_parallel
from autoshard.runtime import collectives as C
from autoshard.runtime.data_parallel import GradientSync, make_buckets
from autoshard.runtime.errors import PlanError, PlanMismatchError
from autoshard.runtime.layout import shard_tensor, unshard_tensor
from autoshard.runtime.mesh import DIM_ORDER, Mesh
from autoshard.runtime.plan import Plan, parse_placement

Inputs = tuple | list | dict | torch.Tensor


def autoshard(
    model: torch.nn.Module,
    mesh: Mesh,
    example_inputs: Inputs = (),
    *,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer] | None = None,
    bucket_mb: float = 25.0,
) -> ShardedModule:
    """Shard ``model`` over ``mesh`` and return a module that trains it.

    Args:
        model: an unmodified ``nn.Module`` (its parameters are copied, never changed).
        mesh: where to run; ``Mesh(dp=.., tp=..)``.
        example_inputs: one *local* batch, a tuple of positional inputs or a dict of keyword inputs.
        loss_fn: ``loss_fn(output, target) -> scalar``; ``None`` if the model returns the loss
            (a scalar tensor, or an output with ``.loss`` such as Hugging Face models given labels).
        optimizer: ``optimizer(params) -> torch.optim.Optimizer``; receives this rank's local shards.
        bucket_mb: data-parallel gradient bucket size.
    """
    return ShardedModule(model, mesh, example_inputs, loss_fn=loss_fn, optimizer=optimizer, bucket_mb=bucket_mb)


def _as_call(inputs: Inputs) -> tuple[tuple, dict]:
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    raise TypeError(f"inputs must be a tuple of positional inputs or a dict of keyword inputs, got {type(inputs).__name__}")


def _signature(training: bool, args: tuple, kwargs: dict) -> tuple:
    leaves, spec = tree_flatten((args, kwargs))
    sig = tuple((tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else repr(x) for x in leaves)
    return (training, str(spec), sig)


def _set_attr(root: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    *path, leaf = name.split(".")
    mod = root
    for p in path:
        mod = getattr(mod, p)
    if isinstance(value, torch.nn.Parameter):
        mod._parameters[leaf] = value
    elif leaf in mod._buffers:
        mod._buffers[leaf] = value
    else:
        setattr(mod, leaf, value)


def _retarget_device(gm: GraphModule, device: torch.device) -> None:
    """Point factory ops and metadata asserts traced on one device at the mesh's device."""
    def fix(v):
        return device if isinstance(v, torch.device) else v

    for mod in gm.modules():  # the top graph and the subgraphs of higher-order ops
        if not isinstance(mod, GraphModule):
            continue
        for node in mod.graph.nodes:
            if node.op == "call_function":
                node.args = tuple(fix(a) for a in node.args)
                node.kwargs = {k: fix(v) for k, v in node.kwargs.items()}
        mod.recompile()


class ShardedModule(torch.nn.Module):
    """One rank's share of a model sharded by autoshard. Train with :meth:`train_step`."""

    def __init__(self, model: torch.nn.Module, mesh: Mesh, example_inputs: Inputs, *, loss_fn=None,
                 optimizer=None, bucket_mb: float = 25.0) -> None:
        super().__init__()
        self.mesh = mesh
        self._model = [model]  # not registered: autoshard works on its own copies
        self.loss_fn = loss_fn
        self._programs: dict[tuple, GraphModule] = {}
        self._steps = 0
        self._skipped = 0
        self._last_comm = {"tp": 0.0, "dp": 0.0}
        self._checked_inputs = False
        self._tp = mesh.size("tp")
        self._tp_key = mesh.group("tp").name
        self._dp_key = mesh.group("dp").name
        if not mesh.virtual:
            for d in DIM_ORDER:
                C.register_group(mesh.group(d))

        args, kwargs = _as_call(example_inputs)
        gm = capture(model, args, kwargs, training=True)
        self._tp_plan = plan_tensor_parallel(gm, self._tp)
        layouts = self._tp_plan.layouts

        # ---- this rank's shards (one per distinct tensor; tied names are aliases)
        canonical = list(layouts)
        tp_rank = mesh.coord("tp")
        self._params: dict[str, torch.nn.Parameter] = {}
        for n in canonical:
            src = gm.get_parameter(n)
            lay = layouts[n]
            pl = parse_placement(lay.placement)
            full = src.detach()
            local = shard_tensor(full, pl.dim, self._tp, tp_rank, lay.blocks) if pl.is_shard() else full
            self._params[n] = torch.nn.Parameter(local.to(mesh.device).clone(), requires_grad=src.requires_grad)
        self._buffers_local = {n: b.detach().to(mesh.device).clone() for n, b in gm.named_buffers()}
        self._sd_keys = list(model.state_dict().keys())
        self._alias_of = {a: n for n in canonical for a in [n, *layouts[n].aliases]}

        # ---- lower the first program
        if loss_fn is None:
            _check_output_is_loss(gm)
        program, collectives = self._lower(gm)
        self._programs[_signature(True, args, kwargs)] = program
        self.module = program  # registered: sm.parameters() are the local shards

        # ---- data parallel buckets
        order = gradient_order(program, canonical)
        nbytes = {n: p.numel() * p.element_size() for n, p in self._params.items()}
        buckets = make_buckets(order, nbytes, int(bucket_mb * 2**20)) if mesh.size("dp") > 1 else []
        self._sync = GradientSync(self._params, buckets, self._dp_key, mesh.size("dp"))

        self.plan = Plan(
            mesh=mesh.to_dict(),
            params={n: layouts[n] for n in canonical},
            buffers=sorted(self._buffers_local),
            collectives=collectives,
            fallbacks=self._tp_plan.fallbacks,
            dp_buckets=buckets,
            notes=list(self._tp_plan.notes),
            estimates={
                "param_bytes_per_rank": float(sum(nbytes.values())),
                "param_bytes_total": float(sum(math.prod(layouts[n].shape) * self._params[n].element_size() for n in canonical)),
                "tp_forward_comm_bytes": float(sum(c["bytes"] for c in collectives)),
            },
        )
        self._check_fingerprints()
        self.optimizer = optimizer(list(self._params.values())) if optimizer is not None else None

    # ------------------------------------------------------------------ lowering
    def _lower(self, gm: GraphModule) -> tuple[GraphModule, list[dict]]:
        from autoshard.passes.tensor_parallel import TensorParallelPlan

        plan = TensorParallelPlan(self._tp_plan.layouts, [], [])
        gm, collectives = apply_tensor_parallel(gm, plan, self._tp, self._tp_key)
        for n, p in self._params.items():
            for a in (n, *self._tp_plan.layouts[n].aliases):
                _set_attr(gm, a, p)
        for n, b in self._buffers_local.items():
            _set_attr(gm, n, b)
        for node in gm.graph.nodes:  # tensor constants lifted by export
            if node.op == "get_attr" and node.target not in self._params and node.target not in self._buffers_local:
                try:
                    v = _get_attr(gm, node.target)
                except AttributeError:
                    continue
                if isinstance(v, torch.Tensor) and v.device != self.mesh.device:
                    _set_attr(gm, node.target, v.to(self.mesh.device))
        _retarget_device(gm, self.mesh.device)
        return gm, collectives

    def _program(self, args: tuple, kwargs: dict, training: bool) -> GraphModule:
        key = _signature(training, args, kwargs)
        prog = self._programs.get(key)
        if prog is None:
            cpu_args = tree_map(lambda x: x.to("cpu") if isinstance(x, torch.Tensor) else x, (args, kwargs))
            gm = capture(self._model[0], cpu_args[0], cpu_args[1], training=training)
            prog, _ = self._lower(gm)
            self._programs[key] = prog
        return prog

    # ------------------------------------------------------------------ running
    def _to_device(self, x):
        return tree_map(lambda t: t.to(self.mesh.device) if isinstance(t, torch.Tensor) else t, x)

    def forward(self, *args, **kwargs):
        """Run the model on this rank's inputs; returns the full, unsharded output."""
        args, kwargs = self._to_device((args, kwargs))
        return self._program(args, kwargs, self.training)(*args, **kwargs)

    def _loss(self, out, target) -> torch.Tensor:
        if self.loss_fn is not None:
            return self.loss_fn(out, target)
        if isinstance(out, torch.Tensor):
            return out
        loss = getattr(out, "loss", None)
        if loss is None and isinstance(out, dict):
            loss = out.get("loss")
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"the model returned {type(out).__name__} with no loss; pass loss_fn=...")
        return loss

    def train_step(self, inputs: Inputs, target: Any = None) -> float:
        """Forward, backward and optimizer step on this rank's local batch.

        Returns the mean loss over the global batch (the mean of the data-parallel ranks' losses).
        A step whose global loss is not finite is skipped (no update) and counted in ``stats()``.
        """
        if self.optimizer is None:
            raise RuntimeError("train_step needs an optimizer: autoshard(..., optimizer=lambda ps: torch.optim.AdamW(ps))")
        args, kwargs = self._to_device(_as_call(inputs))
        target = self._to_device(target)
        if not self._checked_inputs:
            self._check_same_inputs_across_tp((args, kwargs, target))
            self._checked_inputs = True
        prog = self._program(args, kwargs, training=True)
        C.reset_bytes(f"mesh{self.mesh.id}.")
        self._sync.begin()
        out = prog(*args, **kwargs)
        loss = self._loss(out, target)
        if loss.dim() != 0:
            raise ValueError(f"the loss must be a scalar, got shape {tuple(loss.shape)}")
        loss.backward()
        self._sync.finish()
        g = loss.detach().clone().float()
        if self.mesh.size("dp") > 1:
            g.div_(self.mesh.size("dp"))
            C.all_reduce_(g, self._dp_key)
        value = float(g)
        sent = C.bytes_sent(f"mesh{self.mesh.id}.")
        self._last_comm = {"tp": sent.get(self._tp_key, 0.0), "dp": sent.get(self._dp_key, 0.0)}
        if math.isfinite(value):
            self.optimizer.step()
        else:
            self._skipped += 1
            warnings.warn(f"step {self._steps}: loss is {value}; optimizer step skipped on every rank", stacklevel=2)
        self.optimizer.zero_grad(set_to_none=True)
        self._steps += 1
        return value

    # ------------------------------------------------------------------ state
    def local_parameters(self) -> dict[str, torch.nn.Parameter]:
        """This rank's parameter shards by the model's parameter names."""
        return dict(self._params)

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's ``state_dict`` (same keys and shapes), gathered on every rank, on CPU."""
        full: dict[str, torch.Tensor] = {}
        for n, p in self._params.items():
            lay = self.plan.params[n]
            pl = parse_placement(lay.placement)
            if pl.is_shard() and self._tp > 1:
                pieces = [torch.empty_like(p) for _ in range(self._tp)]
                dist.all_gather(pieces, p.detach().contiguous(), group=self.mesh.group("tp").group)
                full[n] = unshard_tensor(pieces, pl.dim, lay.blocks).cpu()
            else:
                full[n] = p.detach().cpu().clone()
        out = {}
        for k in self._sd_keys:
            if k in self._alias_of:
                out[k] = full[self._alias_of[k]]
            elif k in self._buffers_local:
                out[k] = self._buffers_local[k].cpu().clone()
            else:
                out[k] = self._model[0].state_dict()[k].clone()
        return out

    def stats(self) -> dict[str, float]:
        """Counters of the last step: bytes this rank sent (tp and dp), steps, programs, fallbacks."""
        return {
            "comm_bytes_per_step": self._last_comm["tp"] + self._last_comm["dp"],
            "tp_comm_bytes": self._last_comm["tp"],
            "dp_comm_bytes": self._last_comm["dp"],
            "steps": self._steps,
            "skipped_steps": self._skipped,
            "programs": len(self._programs),
            "fallbacks": len(self.plan.fallbacks),
        }

    # ------------------------------------------------------------------ safety
    def _check_fingerprints(self) -> None:
        if self.mesh.virtual or not dist.is_initialized() or self.mesh.world_size == 1:
            return
        digest = hashlib.sha256(self.plan.fingerprint.encode()).digest()
        mine = torch.tensor(list(digest), dtype=torch.uint8, device=self.mesh.device)
        alls = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(alls, mine)
        bad = [r for r, t in enumerate(alls) if not torch.equal(t, alls[0])]
        if bad:
            raise PlanMismatchError(
                f"ranks {bad} built a different plan than rank 0 (this rank: {self.plan.fingerprint}); every "
                "rank must pass the same model, example input shapes and mesh"
            )

    def _check_same_inputs_across_tp(self, batch) -> None:
        if self._tp == 1 or self.mesh.virtual:
            return
        leaves = [x for x in tree_flatten(batch)[0] if isinstance(x, torch.Tensor)]
        s = torch.tensor([float(x.double().sum()) if x.numel() else 0.0 for x in leaves] or [0.0],
                         dtype=torch.float64, device=self.mesh.device)
        every = [torch.empty_like(s) for _ in range(self._tp)]
        dist.all_gather(every, s, group=self.mesh.group("tp").group)  # every rank decides alike
        if not all(torch.equal(every[0], t) for t in every):
            raise ValueError(
                "ranks that differ only in tp were given different batches: each must load the slice "
                f"mesh.data_rank ({self.mesh.data_rank} of {self.mesh.data_size}) of the global batch"
            )


def _get_attr(gm: torch.nn.Module, target: str):
    obj = gm
    for p in target.split("."):
        obj = getattr(obj, p)
    return obj


def _check_output_is_loss(gm: GraphModule) -> None:
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    vals = [a.meta.get("val") for a in out_node.all_input_nodes]
    spec = getattr(gm, "_out_spec", None)
    ctx = getattr(spec, "context", None)
    keys = list(ctx) if isinstance(ctx, (list, tuple)) else []
    if "loss" in keys:
        return
    if len(vals) == 1 and isinstance(vals[0], torch.Tensor) and vals[0].dim() == 0:
        return
    kind = getattr(spec, "type", None)
    raise PlanError(
        f"loss_fn is None but the model's output ({getattr(kind, '__name__', kind)} with "
        f"{len(vals)} tensor(s){', keys ' + str(keys) if keys else ''}) is not a scalar loss and has no "
        "'loss' field: pass loss_fn=lambda out, target: ..., or give the model its labels"
    )
