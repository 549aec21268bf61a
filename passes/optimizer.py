"""Optimizer pass: the joint forward+backward graph plus gradient reduction and the update, as one step graph.

Given a :class:`~autoshard.passes.joint.JointGraph` this pass traces (``make_fx`` on fake tensors) the
function that a training step is::

    loss, grads = joint(params, buffers, inputs, 1)          # forward + backward, one graph
    grads  = all_reduce(bucket(grads), dp) / dp               # functional collectives: graph nodes
    loss   = all_reduce(loss, dp) / dp
    found  = not isfinite(loss) or not isfinite(Σ‖g‖²)        # skip the step on every rank, no host sync
    grads *= min(1, clip / (‖g‖ + 1e-6))                      # with grad_clip
    masters, states = update(masters, grads, states, lr)      # SGD / Adam / AdamW, torch's formulas
    params = masters.to(compute dtype)                        # bf16: the compute copy, written in place
    return [loss, found]

Every update is written in place into the program's own tensors (``copy_`` nodes at the end), and
only when ``found`` is false (``where``), so one replay of the graph is one step and the host reads
two numbers. The update formulas follow ``torch.optim`` (single-tensor implementations): SGD with
momentum, dampening, Nesterov and weight decay; Adam (L2 weight decay) and AdamW (decoupled); the
learning rate is an input (LR schedulers keep working), the other hyperparameters are constants of
the program. Anything else (AMSGrad, ``maximize``, other optimizers) is refused with the reason, and
the step runs on the interpreted executor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule

from .joint import JointGraph


class Unsupported(Exception):
    """The plan or optimizer has something the step program does not express yet (the message says what)."""


@dataclass
class OptimizerSpec:
    """What the update needs to know of the user's optimizer: its kind and each group's constants."""

    kind: str  # "sgd" | "adam" | "adamw"
    groups: list[dict[str, Any]]  # hyperparameters per group, lr excluded
    group_of: list[int]  # for each master, in program order, its group
    state_keys: tuple[str, ...]  # per-parameter state tensors, as torch.optim names them

    def key(self) -> tuple:
        return (self.kind, tuple(tuple(sorted(g.items())) for g in self.groups), tuple(self.group_of))


_KINDS = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adamw"}


def optimizer_spec(opt: torch.optim.Optimizer, masters: list[torch.Tensor]) -> OptimizerSpec:
    """Read ``opt`` (built over ``masters``) into an :class:`OptimizerSpec`, or raise :class:`Unsupported`."""
    kind = _KINDS.get(type(opt))
    if kind is None:
        raise Unsupported(f"optimizer {type(opt).__name__} has no in-graph update (SGD, Adam and AdamW do)")
    index = {id(p): i for i, p in enumerate(masters)}
    group_of = [-1] * len(masters)
    groups = []
    for gi, g in enumerate(opt.param_groups):
        if g.get("maximize") or g.get("amsgrad") or g.get("differentiable"):
            raise Unsupported("maximize, amsgrad and differentiable optimizers have no in-graph update yet")
        if isinstance(g["lr"], torch.Tensor) or any(isinstance(b, torch.Tensor) for b in g.get("betas", ())):
            raise Unsupported("tensor learning rates or betas have no in-graph update yet")
        if kind == "sgd":
            groups.append({"momentum": float(g["momentum"]), "dampening": float(g["dampening"]),
                           "nesterov": bool(g["nesterov"]), "weight_decay": float(g["weight_decay"])})
        else:
            b1, b2 = g["betas"]
            groups.append({"beta1": float(b1), "beta2": float(b2), "eps": float(g["eps"]),
                           "weight_decay": float(g["weight_decay"])})
        for p in g["params"]:
            if id(p) not in index:
                raise Unsupported("the optimizer holds tensors that are not this rank's parameters")
            group_of[index[id(p)]] = gi
    if -1 in group_of:
        raise Unsupported("some parameters are in no optimizer group")
    keys = ("momentum_buffer",) if kind == "sgd" else ("exp_avg", "exp_avg_sq")
    return OptimizerSpec(kind, groups, group_of, keys)


@dataclass
class StepLayout:
    """The order of the step graph's flat inputs; the runtime assembles its arguments by it."""

    num_params: int  # compute copies (bf16/fp16), or the fp32 parameters themselves
    num_buffers: int
    num_inputs: int  # flattened user inputs (tensors and scalars as the joint graph takes them)
    separate_masters: bool  # fp32 masters beside low-precision compute copies
    state_keys: tuple[str, ...]
    num_groups: int
    trainable: list[bool] = field(default_factory=list)  # per parameter: has a gradient and an update

    def count(self) -> int:
        n = self.num_params * (2 if self.separate_masters else 1)
        return n + self.num_buffers + self.num_inputs + self.num_params * (len(self.state_keys) + 1) + self.num_groups


@dataclass
class Reduction:
    """How gradients are averaged over data-parallel ranks inside the graph (``None`` group: one rank)."""

    group_name: str | None  # the c10d name of the data-parallel process group
    size: int = 1
    buckets: list[list[int]] = field(default_factory=list)  # parameter indices, each bucket one all-reduce


def build_step_graph(joint: JointGraph, spec: OptimizerSpec, *, separate_masters: bool,
                     trainable: list[bool], reduction: Reduction, grad_clip: float | None,
                     example: list[Any]) -> tuple[GraphModule, StepLayout, dict[str, Any]]:
    """Trace the step function over ``example`` (real tensors in :class:`StepLayout` order).

    Returns the step graph, its input layout and a report (collectives, bytes per step).
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    n = len(joint.params)
    trainable = [t and g is not None for t, g in zip(trainable, joint.grads)]  # an unused parameter: no update
    layout = StepLayout(num_params=n, num_buffers=len(joint.buffers), num_inputs=joint.num_inputs,
                        separate_masters=separate_masters, state_keys=spec.state_keys,
                        num_groups=len(spec.groups), trainable=list(trainable))
    if len(example) != layout.count():
        raise ValueError(f"step graph: {len(example)} example inputs, the layout needs {layout.count()}")
    def step(*flat):
        with torch.no_grad():  # the graph is already forward + backward: nothing here is differentiated
            return _step(*flat)

    def _step(*flat):
        it = iter(flat)
        params = [next(it) for _ in range(n)]
        masters = [next(it) for _ in range(n)] if separate_masters else params
        buffers = [next(it) for _ in range(layout.num_buffers)]
        inputs = [next(it) for _ in range(layout.num_inputs)]
        states = [[next(it) for _ in range(n)] for _ in spec.state_keys]
        steps = [next(it) for _ in range(n)]
        lrs = [next(it) for _ in range(layout.num_groups)]
        tangent = torch.ones((), dtype=joint.loss_dtype, device=lrs[0].device if lrs else None)
        (loss,), joint_grads = joint.gm([*params, *buffers, *inputs], [tangent])
        loss = loss.float()
        grads: list[torch.Tensor | None] = []
        for i, g in enumerate(joint.grads):
            t = joint_grads[g] if (g is not None and trainable[i]) else None
            grads.append(t.float() if t is not None else None)  # None: unused, never updated (as torch.optim)
        if reduction.group_name is not None and reduction.size > 1:
            grads, loss = _all_reduce_mean(grads, loss, reduction)
        live = [g for g in grads if g is not None]
        sumsq = torch.stack([g.pow(2).sum() for g in live]).sum() if live else torch.zeros((), device=loss.device)
        found = torch.logical_not(torch.isfinite(loss) & torch.isfinite(sumsq))
        if grad_clip is not None:
            coef = torch.clamp(grad_clip / (sumsq.sqrt() + 1e-6), max=1.0)
            grads = [g * coef if g is not None else None for g in grads]
        for i in range(n):
            g = grads[i]
            if g is None:
                continue
            hp = spec.groups[spec.group_of[i]]
            lr = lrs[spec.group_of[i]]
            st = [s[i] for s in states]
            new_p, new_st, new_step = _update(spec.kind, hp, masters[i], g, st, steps[i], lr)
            keep = found
            for old, new in [(masters[i], new_p), *zip(st, new_st), (steps[i], new_step)]:
                old.copy_(torch.where(keep, old, new.to(old.dtype)))
            if separate_masters:
                params[i].copy_(masters[i].to(params[i].dtype))
        return torch.stack([loss, found.float()])

    gm = make_fx(step, tracing_mode="fake")(*example)
    report = {"collectives": _collectives(gm), "reduce_bytes": _reduce_bytes(joint, reduction, example, layout)}
    return gm, layout, report


def _all_reduce_mean(grads, loss, reduction: Reduction):
    """Average gradients (bucket by bucket: one flat all-reduce each) and the loss over dp, as graph nodes."""
    from torch.distributed import _functional_collectives as funcol

    name, size = reduction.group_name, reduction.size
    out = list(grads)
    for bucket in reduction.buckets:
        members = [i for i in bucket if out[i] is not None]
        if not members:
            continue
        flat = torch.cat([out[i].reshape(-1) for i in members])
        flat = funcol.wait_tensor(funcol.all_reduce(flat, "sum", name)) / size
        off = 0
        for i in members:
            k = out[i].numel()
            out[i] = flat[off:off + k].view(out[i].shape)
            off += k
    loss = funcol.wait_tensor(funcol.all_reduce(loss.reshape(1), "sum", name)).reshape(()) / size
    return out, loss


def _update(kind: str, hp: dict[str, Any], p: torch.Tensor, g: torch.Tensor, st: list[torch.Tensor],
            step: torch.Tensor, lr: torch.Tensor):
    """One parameter's update, torch.optim's single-tensor formulas (fp32)."""
    p32 = p.float()
    new_step = step + 1
    if kind == "sgd":
        d = g + hp["weight_decay"] * p32 if hp["weight_decay"] else g
        if hp["momentum"]:
            buf = st[0]
            # torch starts the buffer at the first step's d_p (no dampening then)
            nb = torch.where(step == 0, d, buf * hp["momentum"] + (1 - hp["dampening"]) * d)
            d = d + hp["momentum"] * nb if hp["nesterov"] else nb
            return p32 - lr * d, [nb], new_step
        return p32 - lr * d, [st[0]], new_step
    b1, b2, eps, wd = hp["beta1"], hp["beta2"], hp["eps"], hp["weight_decay"]
    m, v = st
    if kind == "adamw":
        p32 = p32 * (1 - lr * wd) if wd else p32
    elif wd:
        g = g + wd * p32
    m = m.lerp(g, 1 - b1)
    v = v * b2 + (1 - b2) * g * g
    bc1 = 1 - torch.pow(b1, new_step)
    bc2 = 1 - torch.pow(b2, new_step)
    denom = v.sqrt() / bc2.sqrt() + eps
    return p32 - (lr / bc1) * m / denom, [m, v], new_step


def _collectives(gm: GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes
            if n.op == "call_function" and "_c10d_functional" in str(n.target) and "wait" not in str(n.target)]


def _reduce_bytes(joint: JointGraph, reduction: Reduction, example: list[Any], layout: StepLayout) -> float:
    """Bytes this rank sends per step for the gradient and loss all-reduces (ring count, fp32)."""
    if reduction.group_name is None or reduction.size <= 1:
        return 0.0
    elems = sum(example[i].numel() for b in reduction.buckets for i in b if layout.trainable[i]) + 1
    s = reduction.size
    return 2 * (s - 1) / s * 4 * elems
