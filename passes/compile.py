"""compile: a rank's forward graph, the loss and the optimizer → a :class:`StepProgram` (the whole step).

The ordered passes after capture and the forward rewrites (tensor/expert parallel)::

    joint      passes/joint.py       forward + loss + backward as one aten graph (AOTAutograd joint export);
                                     rematerialize(): the min-cut partitioner chooses what backward recomputes
                                     (AUTOSHARD_REMAT=0 keeps every forward value instead)
    optimizer  passes/optimizer.py   + dp gradient all-reduces (functional collectives) + non-finite skip
                                     + clipping + the SGD/Adam/AdamW update, in place
    lower      runtime/program.py    Inductor + CUDA-graph replay on GPUs; the FX module itself on CPU

:class:`StepState` holds what every input signature's program updates: parameters, fp32 masters,
optimizer states, step counters and learning rates. The user's optimizer object is built over the
masters and its ``state`` refers to these very tensors, so LR schedulers, ``state_dict()`` and
checkpoints see what the program computes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from autoshard.runtime.program import StepProgram, cuda_graphs_enabled

from .joint import LossModule, export_joint, rematerialize
from .optimizer import (
    OptimizerSpec,
    Reduction,
    ShardedBucket,
    Unsupported,
    ZeroLayout,
    build_step_graph,
    build_zero_step_graph,
    optimizer_spec,
)
from .schedule import issue_collectives_early, place_parameter_gathers


@dataclass
class StepState:
    """The tensors a step program reads and updates, in one fixed order (``names``)."""

    names: list[str]
    params: list[torch.nn.Parameter]  # compute copies (the forward graph's parameters)
    masters: list[torch.nn.Parameter]  # fp32; the same objects as params in fp32
    optimizer: torch.optim.Optimizer
    spec: OptimizerSpec
    states: list[list[torch.Tensor]]  # per state key, per parameter
    steps: list[torch.Tensor]
    lrs: list[torch.Tensor]
    _lr_values: list[float] = field(default_factory=list)
    veto: torch.Tensor | None = None  # bool scalar: skip this step (the ranks disagree, runtime/guards.py)
    zero: Any = None  # runtime.zero.ZeroOptimizer (stages 1-2): masters are its buckets' fp32 shards
    scaler: Any = None  # fp16: runtime.zero.DynamicLossScaler, updated on the host from the step's verdict
    scale: torch.Tensor | None = None  # fp16: the loss scale the program multiplies the tangent by
    host_update: bool = False  # the program ends at the reduced gradients; ``zero`` steps on the host
    grads: list[torch.Tensor] = field(default_factory=list)  # host_update: each bucket's reduced fp32 shard
    # ZeRO-3 with the masters in host memory (offload): device copies of this rank's shards in the compute
    # dtype, what the program gathers from; refreshed from the masters after each host update
    sources: list[torch.Tensor] = field(default_factory=list)
    local_grads: list[torch.Tensor] = field(default_factory=list)  # 1-bit Adam on ZeRO: local whole-bucket gradients

    @property
    def separate_masters(self) -> bool:
        return any(p is not m for p, m in zip(self.params, self.masters))

    @torch.no_grad()
    def refresh_sources(self) -> None:
        """Copy the updated masters into the shards the program gathers from (ZeRO-3 + offload; with
        ``offload="params"`` they are ZeroOptimizer's pinned host slices, which it refreshes itself)."""
        if self.zero is not None and self.zero.offload == "params":
            return
        for src, m in zip(self.sources, self.masters):
            src.copy_(m.detach(), non_blocking=True)

    def master(self, name: str) -> torch.nn.Parameter:
        return self.masters[self.names.index(name)]

    def set_lrs(self) -> None:
        """Copy each group's learning rate into its device scalar (only when it changed: no launch otherwise)."""
        if self.host_update:  # the host's optimizer reads its own groups
            return
        for i, g in enumerate(self.optimizer.param_groups):
            lr = float(g["lr"])
            if self._lr_values[i] != lr:
                self.lrs[i].fill_(lr)
                self._lr_values[i] = lr

    def after_step(self, skipped: bool) -> None:
        """fp16: the loss scaler learns the step's verdict (an overflow halves the scale, after its
        hysteresis; raises ``LossScaleError`` at the minimum) and the program's scale follows it."""
        if self.scaler is None:
            return
        self.scaler.update(skipped)
        self.sync_scale()

    def sync_scale(self) -> None:
        """Copy the scaler's scale into the program's scalar (only when it changed)."""
        if self.scaler is not None and float(self.scale) != self.scaler.scale:
            self.scale.fill_(self.scaler.scale)

    def expose(self) -> None:
        """Point ``optimizer.state`` at the program's tensors (torch.optim's keys)."""
        if self.host_update:  # the optimizer keeps its own states
            return
        for i, m in enumerate(self.masters):
            st: dict[str, Any] = {k: self.states[j][i] for j, k in enumerate(self.spec.state_keys)}
            if self.spec.kind != "sgd":
                st["step"] = self.steps[i]
            self.optimizer.state[m] = st

    @torch.no_grad()
    def absorb(self) -> None:
        """Copy values someone put into ``optimizer.state`` (a checkpoint load) into the program's tensors."""
        if self.host_update:  # the optimizer keeps its states; only the gather sources follow the masters
            self.refresh_sources()
            return
        for i, m in enumerate(self.masters):
            st = self.optimizer.state.get(m, {})
            if not st:  # cleared (a fresh optimizer for this parameter): zero states, step 0
                for j in range(len(self.spec.state_keys)):
                    self.states[j][i].zero_()
                self.steps[i].zero_()
                continue
            for j, k in enumerate(self.spec.state_keys):
                v = st.get(k)
                if isinstance(v, torch.Tensor) and v is not self.states[j][i]:
                    self.states[j][i].copy_(v)
            if self.spec.kind == "sgd":
                self.steps[i].fill_(1.0 if isinstance(st.get("momentum_buffer"), torch.Tensor) else 0.0)
            elif "step" in st and st["step"] is not self.steps[i]:
                self.steps[i].fill_(float(st["step"]))
        self.expose()


def make_state(names: list[str], params: dict[str, torch.nn.Parameter], compute_dtype: torch.dtype | None,
               optimizer_factory: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
               device: torch.device) -> StepState:
    """Masters (fp32 copies when ``compute_dtype`` is lower), the user's optimizer over them, zeroed states.

    With a lower ``compute_dtype`` the compute copies are new parameter objects (``state.params``), which
    the caller binds into its forward graphs in place of ``params``.

    Raises :class:`Unsupported` (before anything is changed) when the optimizer has no in-graph update.
    """
    plist = [params[n] for n in names]
    separate = compute_dtype is not None and compute_dtype != torch.float32
    masters = [torch.nn.Parameter(p.detach().float().clone(), requires_grad=p.requires_grad) if separate else p
               for p in plist]
    opt = optimizer_factory([m for m in masters if m.requires_grad])
    spec = optimizer_spec(opt, masters)  # raises Unsupported
    if separate:  # new compute-copy objects (not a dtype change under .data): the caller binds them
        plist = [torch.nn.Parameter(m.detach().to(compute_dtype), requires_grad=m.requires_grad) for m in masters]
    states = [[torch.zeros_like(m, dtype=torch.float32) for m in masters] for _ in spec.state_keys]
    steps = [torch.zeros((), dtype=torch.float32, device=device) for _ in masters]
    lrs = [torch.tensor(float(g["lr"]), dtype=torch.float32, device=device) for g in opt.param_groups]
    state = StepState(names, plist, masters, opt, spec, states, steps, lrs, [float(g["lr"]) for g in opt.param_groups],
                      torch.zeros((), dtype=torch.bool, device=device))
    if compute_dtype == torch.float16:
        from autoshard.runtime.zero import DynamicLossScaler

        _with_scaler(state, DynamicLossScaler(), device)
    state.expose()
    return state


def _with_scaler(state: StepState, scaler: Any, device: torch.device) -> None:
    state.scaler = scaler
    state.scale = torch.tensor(float(scaler.scale), dtype=torch.float32, device=device)


def make_zero_state(zero: Any, device: torch.device) -> StepState:
    """The program's view of a ZeRO stage 1-2 layout (runtime/zero.py): one master per bucket (this
    rank's fp32 shard), the user's optimizer over them, zeroed states. Raises :class:`Unsupported`."""
    masters = [b.master for b in zero.zbuckets]
    opt = zero.optimizer
    spec = optimizer_spec(opt, masters)
    states = [[torch.zeros_like(m, dtype=torch.float32) for m in masters] for _ in spec.state_keys]
    steps = [torch.zeros((), dtype=torch.float32, device=device) for _ in masters]
    lrs = [torch.tensor(float(g["lr"]), dtype=torch.float32, device=device) for g in opt.param_groups]
    state = StepState([f"bucket{i}" for i in range(len(masters))], list(masters), list(masters), opt, spec, states,
                      steps, lrs, [float(g["lr"]) for g in opt.param_groups],
                      torch.zeros((), dtype=torch.bool, device=device), zero=zero)
    if zero.scaler is not None:  # fp16: ZeRO's own scaler, so checkpoints keep saving it
        _with_scaler(state, zero.scaler, device)
    state.expose()
    return state


def make_host_state(zero: Any, device: torch.device) -> StepState:
    """The program's view of a ZeRO layout whose update stays on the host (offload, or an optimizer
    with no in-graph update): the program reduces each bucket's gradient into a buffer of this rank's
    shard; ``zero.receive`` and ``zero.step`` do the rest, as after an eager backward."""
    masters = [b.master for b in zero.zbuckets]
    grads = [torch.zeros(b.shard, dtype=torch.float32, device=device) for b in zero.zbuckets]
    state = StepState([f"bucket{i}" for i in range(len(masters))], list(masters), list(masters), zero.optimizer,
                      None, [], [], [], [], torch.zeros((), dtype=torch.bool, device=device), zero=zero,
                      host_update=True, grads=grads)
    if zero.scaler is not None:  # the tangent is the scale; zero.step unscales and updates the scaler
        _with_scaler(state, zero.scaler, device)
    if zero.stage == 3 and zero.offload == "params":  # the pinned host slices ZeroOptimizer keeps current
        state.sources = [b.local for b in zero.zbuckets]
    elif zero.stage == 3 and zero.offload is not None:
        state.sources = [torch.empty(b.shard, dtype=zero.dtype, device=device) for b in zero.zbuckets]
        state.refresh_sources()
    return state


def make_grad_state(names: list[str], params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                    device: torch.device) -> StepState:
    """The program's view of fp32 parameters whose optimizer has no in-graph update and no ZeRO memory
    manager: the program reduces each gradient into a buffer of the parameter's shape, the runtime
    sets it as ``.grad`` and the user's optimizer steps as after an eager backward."""
    plist = [params[n] for n in names]
    grads = [torch.zeros_like(p) if p.requires_grad else torch.zeros(0, device=device) for p in plist]
    return StepState(names, plist, plist, optimizer, None, [], [], [], [], torch.zeros((), dtype=torch.bool, device=device),
                     host_update=True, grads=grads)


def compile_step(forward_graph: torch.nn.Module, loss: Callable[[Any, Any], torch.Tensor], state: StepState,
                 args: tuple, kwargs: dict, target: Any, *, dp_group: str | None, dp_size: int,
                 buckets: list[list[str]], grad_clip: float | None, device: torch.device,
                 norm_group: str | None = None, norm_weight: dict[str, float] | None = None,
                 compile: bool | None = None, reduce_gradients: bool = True) -> tuple[StepProgram, dict[str, Any]]:
    """Capture the joint graph of ``forward_graph`` + ``loss`` on this batch, add reduction and update,
    and lower it. Returns the program and a report (nodes, collectives, bytes sent per step).
    ``reduce_gradients=False`` (host update only): the gradients stay local, only the loss is averaged
    over dp (1-bit Adam after its warm-up averages compressed momenta itself).

    Raises :class:`Unsupported` or :class:`~autoshard.runtime.errors.CaptureError` when the step cannot be
    expressed; nothing has been changed then.
    """
    from autoshard.runtime import collectives as C

    before = dict(C.bytes_sent())
    times = {"joint_export_s": time.perf_counter()}
    joint = export_joint(LossModule(forward_graph, loss), args, kwargs, target)
    times["partition_s"] = time.perf_counter()
    remat: dict[str, Any] = {"rematerialized": False, "reason": "AUTOSHARD_REMAT=0"}
    checkpointed = sum(1 for n in joint.gm.graph.nodes if "recompute" in n.meta)  # activation checkpointing
    if checkpointed or os.environ.get("AUTOSHARD_REMAT", "1").strip().lower() not in ("0", "false", "off", "no"):
        joint, remat = rematerialize(joint)
    remat["checkpointed_nodes"] = checkpointed
    times["step_graph_s"] = time.perf_counter()
    # tracing ran every forward and backward collective once: that is one step's traffic per group
    traced = {k: v - before.get(k, 0.0) for k, v in C.bytes_sent().items() if v - before.get(k, 0.0) > 0}
    if state.zero is not None:
        if not reduce_gradients and not state.host_update:
            raise Unsupported("gradients left local need the update on the host")
        gm, report, tensors, slots = _zero_step(joint, forward_graph, state, args, kwargs, target, dp_group=dp_group,
                                                dp_size=dp_size, norm_group=norm_group, grad_clip=grad_clip,
                                                reduce_gradients=reduce_gradients)
        return _lower(gm, report, tensors, slots, device, compile, remat, traced, joint, times, state.zero.prefetch)
    ident = {id(p): i for i, p in enumerate(state.params)}
    order: list[int] = []
    for name in joint.params:
        p = forward_graph.get_parameter(name)
        if id(p) not in ident:
            raise Unsupported(f"the joint graph's parameter {name} is not one of this rank's parameters")
        order.append(ident[id(p)])
    buffers = [forward_graph.get_buffer(b) for b in joint.buffers]
    params = [state.params[i] for i in order]
    masters = [state.masters[i] for i in order]
    host = state.host_update
    spec = None if host else OptimizerSpec(state.spec.kind, state.spec.groups, [state.spec.group_of[i] for i in order],
                                           state.spec.state_keys)
    pos = {state.names[i]: k for k, i in enumerate(order)}
    if not reduce_gradients and not host:
        raise Unsupported("gradients left local need the update on the host")
    reduction = Reduction(dp_group if dp_size > 1 else None, dp_size,
                          [[pos[n] for n in b if n in pos] for b in buckets] if reduce_gradients else [], norm_group,
                          [(norm_weight or {}).get(state.names[i], 1.0) for i in order])
    if dp_size > 1 and reduce_gradients:  # parameters in no bucket (none today) still get reduced, one bucket each
        seen = {i for b in reduction.buckets for i in b}
        rest = [k for k in range(len(order)) if k not in seen]
        if rest:
            reduction.buckets.append(rest)
    separate = state.separate_masters
    inputs = joint.flat_inputs(args, kwargs, target)
    tensors: list[Any] = [*params, *(masters if separate else []), *buffers]
    slots = list(range(len(tensors), len(tensors) + len(inputs)))
    tensors += [None] * len(inputs)
    if host:  # the reduced gradients, one buffer per parameter; the user's optimizer steps on the host
        tensors += [state.grads[i] for i in order]
    else:
        states = [[s[i] for i in order] for s in state.states]
        steps = [state.steps[i] for i in order]
        tensors += [t for s in states for t in s] + steps + list(state.lrs) + [state.veto]
        tensors += [state.scale] if state.scaler is not None else []
    example = list(tensors)
    for s, x in zip(slots, inputs):
        example[s] = x
    trainable = [p.requires_grad for p in params]
    gm, layout, report = build_step_graph(joint, spec, separate_masters=separate, trainable=trainable,
                                          reduction=reduction, grad_clip=grad_clip, example=example,
                                          loss_scaling=state.scaler is not None, host_update=host)
    report["written"] = [order[k] for k in report["written"]]  # state order: the runtime sets those .grad
    return _lower(gm, report, tensors, slots, device, compile, remat, traced, joint, times)


def _lower(gm, report: dict[str, Any], tensors: list[Any], slots: list[int], device: torch.device,
           compile: bool | None, remat: dict[str, Any], traced: dict[str, float], joint, times: dict[str, float],
           prefetch: int = 1) -> tuple[StepProgram, dict[str, Any]]:
    times["schedule_s"] = time.perf_counter()
    gm, report["gathers"] = place_parameter_gathers(gm, prefetch=prefetch)
    gm, report["schedule"] = issue_collectives_early(gm)
    marks = list(times.items()) + [("", time.perf_counter())]  # phase start times -> durations
    report["times_s"] = {k: marks[i + 1][1] - t for i, (k, t) in enumerate(marks[:-1])}
    compiled = device.type == "cuda" if compile is None else compile
    program = StepProgram(gm, tensors, slots, device, compile=compiled, cuda_graphs=compiled and cuda_graphs_enabled())
    report.update(remat=remat, traced_bytes=traced, nodes=len(gm.graph.nodes), joint_nodes=len(joint.gm.graph.nodes),
                  compiled=compiled, cuda_graphs=program.cuda_graphs)
    return program, report


def _zero_step(joint, forward_graph: torch.nn.Module, state: StepState, args: tuple, kwargs: dict, target: Any, *,
               dp_group: str | None, dp_size: int, norm_group: str | None, grad_clip: float | None,
               reduce_gradients: bool = True):
    """The ZeRO step graph over ``state.zero``'s buckets (any stage; the update in the graph or, with
    ``state.host_update``, left to the host), and the program's tensors in its order.

    ``reduce_gradients=False``: each bucket's local fp32 gradient, whole and not divided, goes into
    ``state.local_grads`` (1-bit Adam after its warm-up compresses it itself)."""
    zero = state.zero
    index = {name: i for i, name in enumerate(joint.params)}
    buckets = []
    for b in zero.zbuckets:
        missing = [n for n in b.names if n not in index]
        if missing:
            raise Unsupported(f"ZeRO bucket parameters {missing[:3]} are not in this signature's joint graph")
        weighted = b.grad_weight is not None
        if not reduce_gradients:  # the whole local gradient: no collective, no division
            buckets.append(ShardedBucket([index[n] for n in b.names], list(b.offsets), b.padded, b.padded,
                                         None, 1, 1, weighted, b.norm_scale, whole=True))
            continue
        whole = zero.stage == 0  # every rank holds the whole bucket: all-reduce
        group = dp_group if b.parts > 1 or (whole and dp_size > 1) else None
        buckets.append(ShardedBucket([index[n] for n in b.names], list(b.offsets), b.padded, b.shard,
                                     group, dp_size if whole else b.parts, zero.divisor, weighted,
                                     b.norm_scale, whole=whole))
    in_bucket = {i for bk in buckets for i in bk.members}
    loose = [i for i in range(len(joint.params)) if i not in in_bucket]
    gathered = zero.stage == 3  # the program gathers each bucket from the masters where it is used
    host = state.host_update
    layout = ZeroLayout(buckets, loose, len(joint.buffers), joint.num_inputs, () if host else state.spec.state_keys,
                        0 if host else len(state.spec.groups), loss_scaling=state.scaler is not None,
                        gathered=gathered, host_update=host)
    inputs = joint.flat_inputs(args, kwargs, target)
    tensors: list[Any] = ([] if gathered else [b.flat for b in zero.zbuckets]) + list(state.sources or state.masters)
    tensors += [b.grad_weight for b in zero.zbuckets if b.grad_weight is not None]
    tensors += [forward_graph.get_parameter(joint.params[i]) for i in loose]
    tensors += [forward_graph.get_buffer(b) for b in joint.buffers]
    slots = list(range(len(tensors), len(tensors) + len(inputs)))
    tensors += [None] * len(inputs)
    if host and not reduce_gradients:
        if not state.local_grads:
            state.local_grads = [torch.zeros(b.padded, dtype=torch.float32, device=b.flat.device)
                                 for b in zero.zbuckets]
        tensors += list(state.local_grads)
    elif host:
        tensors += list(state.grads)
    else:
        tensors += [t for s in state.states for t in s] + list(state.steps) + list(state.lrs) + [state.veto]
    tensors += [state.scale] if state.scaler is not None else []
    example = list(tensors)
    for s, x in zip(slots, inputs):
        example[s] = x
    gm, report = build_zero_step_graph(joint, state.spec, layout, loss_group=dp_group if dp_size > 1 else None,
                                       loss_size=dp_size, norm_group=norm_group, grad_clip=grad_clip,
                                       example=example, compute_dtype=zero.dtype, device=zero.device)
    return gm, report, tensors, slots


__all__ = ["StepState", "Unsupported", "compile_step", "make_grad_state", "make_host_state", "make_state",
           "make_zero_state"]
