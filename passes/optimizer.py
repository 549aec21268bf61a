"""Optimizer pass: the joint forward+backward graph plus gradient reduction and the update, as one step graph.

Given a :class:`~autoshard.passes.joint.JointGraph` this pass traces (``make_fx`` on fake tensors) the
function that a training step is::

    loss, grads = joint(params, buffers, inputs, 1)          # forward + backward, one graph
    grads  = all_reduce(bucket(grads), dp) / dp               # functional collectives: graph nodes
    loss   = all_reduce(loss, dp) / dp
    found  = not isfinite(loss) or not isfinite(Σ‖g‖²) or veto   # skip on every rank, no host sync
    grads *= min(1, clip / (‖g‖ + 1e-6))                      # with grad_clip
    masters, states = update(masters, grads, states, lr)      # SGD / Adam / AdamW, torch's formulas
    params = masters.to(compute dtype)                        # bf16: the compute copy, written in place
    return [loss, found, ‖g‖]

Every update is written in place into the program's own tensors (``copy_`` nodes at the end), and
only when ``found`` is false (``where``), so one replay of the graph is one step and the host reads
two numbers. The update formulas follow ``torch.optim`` (single-tensor implementations): SGD with
momentum, dampening, Nesterov and weight decay; Adam (L2 weight decay) and AdamW (decoupled); the
learning rate is an input (LR schedulers keep working), the other hyperparameters are constants of
the program. Anything else (AMSGrad, ``maximize``, other optimizers) is refused with the reason, and
the step runs on the interpreted executor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule

from .joint import JointGraph, inline


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
    loss_scaling: bool = False  # fp16: the loss scale is the last input
    host_update: bool = False  # after the inputs, one gradient buffer per parameter, and nothing else

    def count(self) -> int:
        n = self.num_params * (2 if self.separate_masters else 1)
        if self.host_update:
            return n + self.num_buffers + self.num_inputs + self.num_params
        n += self.num_buffers + self.num_inputs + self.num_params * (len(self.state_keys) + 1) + self.num_groups
        # the veto: a bool the runtime sets when the ranks disagree (runtime/guards.py); then the loss scale
        return n + 1 + int(self.loss_scaling)


@dataclass
class Reduction:
    """How gradients are averaged over data-parallel ranks inside the graph (``None`` group: one rank)."""

    group_name: str | None  # the c10d name of the data-parallel process group
    size: int = 1
    buckets: list[list[int]] = field(default_factory=list)  # parameter indices, each bucket one all-reduce
    # the global gradient norm (non-finite check, clipping) over tensor-parallel shards: each parameter's
    # sum of squares weighted (1/tp for a replicated one, counted on every tp rank) and summed over this group
    norm_group: str | None = None
    norm_weight: list[float] = field(default_factory=list)


def build_step_graph(joint: JointGraph, spec: OptimizerSpec | None, *, separate_masters: bool,
                     trainable: list[bool], reduction: Reduction, grad_clip: float | None,
                     example: list[Any], loss_scaling: bool = False,
                     host_update: bool = False) -> tuple[GraphModule, StepLayout, dict[str, Any]]:
    """The step graph over inputs in :class:`StepLayout` order (``example``: real tensors of that order).

    The tail (reduction, skip, clipping, update) is traced alone over fake tensors and appended to a
    copy of the joint graph, whose outputs feed it: the joint graph is not traced a second time.
    With ``host_update`` (``spec`` unused) the tail ends at the reduced gradients, written into one
    buffer per parameter for the user's optimizer to step on the host; ``report["written"]`` lists the
    parameters that got one (those without a gradient keep ``None``, as in torch.optim).
    Returns the step graph, its input layout and a report (collectives, bytes per step).
    """
    n = len(joint.params)
    joint_out = next(nd for nd in joint.gm.graph.nodes if nd.op == "output").args[0]
    # a parameter no gradient reaches (unused in this signature's graph) gets no update, as in torch.optim
    trainable = [t and g is not None and joint_out[1 + g] is not None for t, g in zip(trainable, joint.grads)]
    layout = StepLayout(num_params=n, num_buffers=len(joint.buffers), num_inputs=joint.num_inputs,
                        separate_masters=separate_masters, state_keys=() if host_update else spec.state_keys,
                        num_groups=0 if host_update else len(spec.groups), trainable=list(trainable),
                        loss_scaling=loss_scaling, host_update=host_update)
    count = layout.count()
    if len(example) != count:
        raise ValueError(f"step graph: {len(example)} example inputs, the layout needs {layout.count()}")
    present = [i for i in range(n) if trainable[i]]

    def tail(*flat):
        with torch.no_grad():  # the joint graph is already forward + backward: nothing here is differentiated
            return _tail(*flat)

    def _tail(*flat):
        it = iter(flat[:count])
        params = [next(it) for _ in range(n)]
        masters = [next(it) for _ in range(n)] if separate_masters else params
        for _ in range(layout.num_buffers + layout.num_inputs):
            next(it)
        loss = flat[count].float()
        grads: list[torch.Tensor | None] = [None] * n  # None: no gradient, never updated (as torch.optim)
        for k, i in enumerate(present):
            grads[i] = flat[count + 1 + k].float()
        if host_update:
            buffers = [next(it) for _ in range(n)]
            if reduction.group_name is not None and reduction.size > 1:
                grads, loss = _all_reduce_mean(grads, loss, reduction)
            for i in present:
                buffers[i].copy_(grads[i])
            zero = torch.zeros((), device=loss.device)
            return torch.stack([loss, zero, zero])
        states = [[next(it) for _ in range(n)] for _ in spec.state_keys]
        steps = [next(it) for _ in range(n)]
        lrs = [next(it) for _ in range(layout.num_groups)]
        veto = next(it)
        scale = next(it) if loss_scaling else None
        if reduction.group_name is not None and reduction.size > 1:
            grads, loss = _all_reduce_mean(grads, loss, reduction)
        if scale is not None:  # unscale (the scale is a power of two: exact)
            grads = [g / scale if g is not None else None for g in grads]
        live = [(i, g) for i, g in enumerate(grads) if g is not None]
        w = reduction.norm_weight or [1.0] * n
        sumsq = (torch.stack([g.pow(2).sum() * w[i] if w[i] != 1.0 else g.pow(2).sum() for i, g in live]).sum()
                 if live else torch.zeros((), device=loss.device))
        if reduction.norm_group is not None:
            sumsq = _all_reduce_sum(sumsq, reduction.norm_group)
        found, coef = _verdict(loss, sumsq, veto, grad_clip)
        for i in range(n):
            g = grads[i]
            if g is None:
                continue
            g = g * coef if coef is not None else g
            gi = spec.group_of[i]
            _apply(found, spec, gi, masters[i], g, [s[i] for s in states], steps[i], lrs[gi])
            if separate_masters:
                params[i].copy_(masters[i].to(params[i].dtype))
        return torch.stack([loss, found.float(), sumsq.sqrt()])

    wanted = [joint_out[0]] + [joint_out[1 + joint.grads[i]] for i in present]
    masters = layout.num_params if layout.separate_masters else 0
    first_buffer = layout.num_params + masters

    def primals(graph: torch.fx.Graph, ph: list[torch.fx.Node]) -> list[torch.fx.Node]:
        return ph[:layout.num_params] + ph[first_buffer:first_buffer + layout.num_buffers + layout.num_inputs]

    gm = _splice(joint, _trace_tail(tail, example, wanted), count, primals, wanted, loss_scaling)
    report = {"collectives": _collectives(gm), "reduce_bytes": _reduce_bytes(reduction, example, layout),
              "written": present if host_update else []}
    return gm, layout, report


@dataclass
class ShardedBucket:
    """One ZeRO bucket (runtime/zero.py lays it out) as the step graph sees it.

    The bucket's parameters are views of one flat compute buffer (an input of the graph); this rank
    owns slice ``part`` (``shard`` elements) of it as an fp32 master, with the optimizer's states.
    """

    members: list[int]  # joint-graph parameter indices, in flat order
    offsets: list[int]
    padded: int  # flat length: a multiple of ``size``
    shard: int
    group_name: str | None  # c10d name of the ranks sharing the bucket; None: one rank
    size: int
    divisor: int  # gradients are summed over the group and divided by this
    weighted: bool  # a per-element norm weight (1/replication) is a graph input
    norm_scale: float = 1.0  # otherwise every element's weight
    whole: bool = False  # ZeRO stage 0: every rank holds the whole bucket; gradients are all-reduced

    def reduce_bytes(self, flat_itemsize: int, gathers: int = 1) -> float:
        """Bytes this rank sends per step: the gradient reduce-scatter (fp32) and ``gathers`` parameter
        all-gathers (one at stages 1-2; forward and backward at stage 3); stage 0 all-reduces."""
        if self.group_name is None or self.size <= 1:
            return 0.0
        if self.whole:
            return 2 * (self.size - 1) / self.size * self.padded * 4
        return (self.size - 1) / self.size * self.padded * (4 + gathers * flat_itemsize)


@dataclass
class ZeroLayout:
    """The order of a ZeRO step graph's flat inputs::

        flats, masters, norm weights (weighted buckets), loose parameters (in no bucket), buffers,
        inputs, states (per key, per bucket), step counters (per bucket), learning rates, veto,
        the loss scale (fp16)

    With ``host_update`` the update is not in the graph: after the inputs come one fp32 gradient
    buffer per bucket (this rank's shard, written by the program), then the loss scale (fp16).
    """

    buckets: list[ShardedBucket]
    loose: list[int]  # joint-graph parameter indices passed as themselves (not trainable: in no bucket)
    num_buffers: int
    num_inputs: int
    state_keys: tuple[str, ...]
    num_groups: int
    loss_scaling: bool = False  # fp16: the loss scale is the last input
    gathered: bool = False  # ZeRO-3: no flat inputs; the program gathers each bucket from the masters
    host_update: bool = False  # the program ends with the reduced gradient shards; the host steps

    @property
    def num_flats(self) -> int:
        return 0 if self.gathered else len(self.buckets)

    def count(self) -> int:
        nb = len(self.buckets)
        head = self.first_input() + self.num_inputs
        if self.host_update:
            return head + nb + int(self.loss_scaling)
        return head + nb * (len(self.state_keys) + 1) + self.num_groups + 1 + int(self.loss_scaling)

    def first_input(self) -> int:
        """Index of the first user input (the runtime puts the batch there)."""
        nb = len(self.buckets)
        return self.num_flats + nb + sum(b.weighted for b in self.buckets) + len(self.loose) + self.num_buffers


def build_zero_step_graph(joint: JointGraph, spec: OptimizerSpec | None, layout: ZeroLayout, *,
                          loss_group: str | None, loss_size: int, norm_group: str | None,
                          grad_clip: float | None, example: list[Any],
                          compute_dtype: torch.dtype = torch.float32,
                          device: torch.device | None = None) -> tuple[GraphModule, dict[str, Any]]:
    """The step graph of ZeRO stages 1 and 2: gradients reduce-scattered into fp32 shards, the update on
    this rank's shard of each bucket, the updated shards all-gathered into the flat compute buffers.

    Inside one program the stages coincide: a gradient lives only as long as the graph needs it, so
    stage 1 holds no more gradient memory than stage 2 (both reduce-scatter). ``spec`` has one entry per
    bucket (the user's optimizer is built over the buckets' masters). Stage 3 (``layout.gathered``)
    gathers each bucket from the masters inside the graph; stage 0 (buckets marked ``whole``) all-reduces.
    With ``layout.host_update`` the graph ends with the reduced shards written into their buffers
    (``spec`` is then unused). Returns the graph and a report.
    """
    count = layout.count()
    if len(example) != count:
        raise ValueError(f"step graph: {len(example)} example inputs, the layout needs {count}")
    joint_out = next(nd for nd in joint.gm.graph.nodes if nd.op == "output").args[0]
    present = [i for i, g in enumerate(joint.grads) if g is not None and joint_out[1 + g] is not None]
    nb = len(layout.buckets)
    shapes: dict[int, tuple[int, ...]] = {}
    for nd, v in zip([n for n in joint.gm.graph.nodes if n.op == "placeholder"], range(len(joint.params))):
        shapes[v] = tuple(nd.meta["val"].shape)

    def tail(*flat):
        with torch.no_grad():
            return _tail(*flat)

    def _tail(*flat):
        it = iter(flat[:count])
        flats = [next(it) for _ in range(layout.num_flats)]
        masters = [next(it) for _ in range(nb)]
        weights = [next(it) if b.weighted else None for b in layout.buckets]
        for _ in range(len(layout.loose) + layout.num_buffers + layout.num_inputs):
            next(it)
        if layout.host_update:
            return _host_tail(it, flat[count:])
        states = [[next(it) for _ in range(nb)] for _ in layout.state_keys]
        steps = [next(it) for _ in range(nb)]
        lrs = [next(it) for _ in range(layout.num_groups)]
        veto = next(it)
        scale = next(it) if layout.loss_scaling else None
        loss = flat[count].float()
        grads = {i: flat[count + 1 + k] for k, i in enumerate(present)}
        shards = [_reduce_scatter(b, grads, shapes, loss.device) for b in layout.buckets]
        if scale is not None:
            shards = [s / scale for s in shards]
        if loss_group is not None and loss_size > 1:
            loss = _all_reduce_sum(loss, loss_group) / loss_size
        parts = [(s.pow(2) * w).sum() if w is not None else s.pow(2).sum() * b.norm_scale
                 for b, s, w in zip(layout.buckets, shards, weights)]
        sumsq = torch.stack(parts).sum() if parts else torch.zeros((), device=loss.device)
        if norm_group is not None:
            sumsq = _all_reduce_sum(sumsq, norm_group)
        found, coef = _verdict(loss, sumsq, veto, grad_clip)
        for j, b in enumerate(layout.buckets):
            g = shards[j] * coef if coef is not None else shards[j]
            gi = spec.group_of[j]
            _apply(found, spec, gi, masters[j], g, [s[j] for s in states], steps[j], lrs[gi])
            if not layout.gathered:  # ZeRO-3: the next step gathers the new masters where it needs them
                flats[j].copy_(_all_gather(b, masters[j].to(flats[j].dtype)))
        return torch.stack([loss, found.float(), sumsq.sqrt()])

    def _host_tail(it, joint_values):
        """Reduce, write each shard into its buffer; unscaling, the checks and the update are the host's."""
        buffers = [next(it) for _ in range(nb)]
        loss = joint_values[0].float()
        grads = {i: joint_values[1 + k] for k, i in enumerate(present)}
        for j, b in enumerate(layout.buckets):
            buffers[j].copy_(_reduce_scatter(b, grads, shapes, loss.device))
        if loss_group is not None and loss_size > 1:
            loss = _all_reduce_sum(loss, loss_group) / loss_size
        zero = torch.zeros((), device=loss.device)
        return torch.stack([loss, zero, zero])

    wanted = [joint_out[0]] + [joint_out[1 + joint.grads[i]] for i in present]
    where: dict[int, tuple[int, int]] = {}
    for j, b in enumerate(layout.buckets):
        for i, off in zip(b.members, b.offsets):
            where[i] = (j, off)
    weights = sum(b.weighted for b in layout.buckets)

    nf = layout.num_flats

    def primals(graph: torch.fx.Graph, ph: list[torch.fx.Node]) -> list[torch.fx.Node]:
        out: list[torch.fx.Node] = []
        loose = iter(ph[nf + nb + weights:nf + nb + weights + len(layout.loose)])
        flat = ph[:nf] if not layout.gathered else [
            _gather_nodes(graph, ph[nf + j], b, j, compute_dtype, device) for j, b in enumerate(layout.buckets)]
        for i in range(len(joint.params)):
            if i not in where:
                out.append(next(loose))
                continue
            j, off = where[i]
            k = math.prod(shapes[i])
            piece = graph.call_function(torch.ops.aten.slice.Tensor, (flat[j], 0, off, off + k))
            out.append(graph.call_function(torch.ops.aten.view.default, (piece, list(shapes[i]))))
            for n in (piece, out[-1]):
                n.meta["autoshard_gather"] = j
            base = flat[j].meta.get("val")
            if base is not None:
                piece.meta["val"] = base[off:off + k]
                out[-1].meta["val"] = piece.meta["val"].view(shapes[i])
        start = layout.first_input() - layout.num_buffers
        return out + ph[start:start + layout.num_buffers + layout.num_inputs]

    gm = _splice(joint, _trace_tail(tail, example, wanted), count, primals, wanted, layout.loss_scaling)
    itemsize = torch.empty((), dtype=compute_dtype).element_size()
    gathers = 2 if layout.gathered else (0 if layout.host_update else 1)  # host_update: the host all-gathers
    reduce = sum(b.reduce_bytes(itemsize, gathers) for b in layout.buckets)
    if loss_group is not None and loss_size > 1:
        reduce += 2 * (loss_size - 1) / loss_size * 4
    return gm, {"collectives": _collectives(gm), "reduce_bytes": reduce}


def _gather_nodes(graph: torch.fx.Graph, master: torch.fx.Node, b: ShardedBucket, j: int,
                  dtype: torch.dtype, device: torch.device | None = None) -> torch.fx.Node:
    """ZeRO-3: nodes that rebuild bucket ``j``'s flat compute buffer from every rank's master shard
    (cast to the compute dtype, all-gather, wait), tagged for passes/schedule.py, which places them
    before the bucket's first use in forward and again before its first use in backward. A shard held
    in host memory (``offload="params"``) is copied to ``device`` by the cast."""
    ops = torch.ops._c10d_functional
    mval = master.meta.get("val")
    kwargs: dict[str, Any] = {"dtype": dtype}
    if device is not None and mval is not None and mval.device != device:
        kwargs["device"] = device
    nodes = [graph.call_function(torch.ops.aten._to_copy.default, (master,), kwargs)]
    if b.group_name is not None and b.size > 1:
        nodes.append(graph.call_function(ops.all_gather_into_tensor.default, (nodes[-1], b.size, b.group_name)))
        nodes.append(graph.call_function(ops.wait_tensor.default, (nodes[-1],)))
    for k, n in enumerate(nodes):
        n.meta["autoshard_gather"] = j
        if mval is not None:
            with mval.fake_mode:
                n.meta["val"] = mval.new_empty((b.shard if k == 0 else b.padded,), dtype=dtype,
                                               device=kwargs.get("device", mval.device))
    return nodes[-1]


def _reduce_scatter(b: ShardedBucket, grads: dict[int, torch.Tensor], shapes: dict[int, tuple[int, ...]],
                    device: torch.device) -> torch.Tensor:
    """This rank's fp32 shard of the bucket's gradient, summed over its group and divided (a graph node)."""
    pieces, pos = [], 0
    for i, off in zip(b.members, b.offsets):  # at each parameter's offset: layouts may leave gaps (1-bit Adam's)
        if off > pos:
            pieces.append(torch.zeros(off - pos, device=device))
        g = grads.get(i)
        k = math.prod(shapes[i])
        pieces.append(g.reshape(-1).float() if g is not None else torch.zeros(k, device=device))
        pos = off + k
    if b.padded > pos:
        pieces.append(torch.zeros(b.padded - pos, device=device))
    flat = torch.cat(pieces)
    if b.divisor != 1:
        flat = flat / b.divisor
    if b.group_name is None or b.size <= 1:
        return flat
    ops = torch.ops._c10d_functional
    if b.whole:
        return ops.wait_tensor(ops.all_reduce(flat, "sum", b.group_name))
    return ops.wait_tensor(ops.reduce_scatter_tensor(flat, "sum", b.size, b.group_name))


def _all_gather(b: ShardedBucket, shard: torch.Tensor) -> torch.Tensor:
    """Every rank's updated shard, concatenated: the bucket's new flat compute buffer (a graph node)."""
    if b.group_name is None or b.size <= 1 or b.whole:
        return shard
    ops = torch.ops._c10d_functional
    return ops.wait_tensor(ops.all_gather_into_tensor(shard.contiguous(), b.size, b.group_name))


def _trace_tail(tail: Callable[..., torch.Tensor], example: list[Any], wanted: list[torch.fx.Node]) -> GraphModule:
    """``make_fx`` of ``tail(*example, *wanted)`` over fake tensors (``wanted``: joint-graph nodes it reads)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes = [fake_mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example]
    with fake_mode:
        extra = [torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device)
                 for v in (w.meta["val"] for w in wanted)]
    return make_fx(tail, tracing_mode="fake")(*fakes, *extra)


def _splice(joint: JointGraph, tail: GraphModule, count: int,
            primals: Callable[[torch.fx.Graph, list[torch.fx.Node]], list[torch.fx.Node]],
            wanted: list[torch.fx.Node], loss_scaling: bool = False) -> GraphModule:
    """One graph: a copy of the joint graph, then the tail fed by the joint graph's loss and gradients.

    The step graph's placeholders are the tail's first ``count``; ``primals`` gives the nodes that
    take the joint graph's placeholders' places (inputs themselves, or views of them). The loss's
    tangent is 1, or with ``loss_scaling`` the last placeholder (the loss scale): backward then
    computes scaled gradients, as ``(loss * scale).backward()`` does.
    """
    graph = torch.fx.Graph()
    root = torch.nn.Module()
    tail_ph = [nd for nd in tail.graph.nodes if nd.op == "placeholder"]
    step_ph = [graph.placeholder(p.name) for p in tail_ph[:count]]
    for p, q in zip(step_ph, tail_ph):
        p.meta = dict(q.meta)
    env: dict[torch.fx.Node, Any] = {}
    jph = [nd for nd in joint.gm.graph.nodes if nd.op == "placeholder"]
    for nd, p in zip(jph, primals(graph, step_ph)):
        env[nd] = p
    loss_val = wanted[0].meta["val"]
    if loss_scaling:
        tangent = graph.call_function(torch.ops.aten._to_copy.default, (step_ph[count - 1],),
                                      {"dtype": joint.loss_dtype})
    else:
        tangent = graph.call_function(torch.ops.aten.full.default, ([], 1.0),
                                      {"dtype": joint.loss_dtype, "device": loss_val.device, "pin_memory": False})
    tangent.meta["autoshard_stage"] = "tangent"  # where backward starts (passes/schedule.py)
    env[jph[-1]] = tangent
    inline(joint.gm, graph, root, env, "joint")
    tenv: dict[torch.fx.Node, Any] = dict(zip(tail_ph[:count], step_ph))
    for k, p in enumerate(tail_ph[count:]):
        tenv[p] = env[wanted[k]]
    before = set(graph.nodes)
    (result,) = inline(tail, graph, root, tenv, "tail")
    for n in graph.nodes:  # what passes/schedule.py may move
        if n not in before:
            n.meta["autoshard_stage"] = "tail"
    graph.output(tenv[result])
    graph.lint()
    return GraphModule(root, graph)


def _all_reduce_sum(x: torch.Tensor, group: str) -> torch.Tensor:
    """A scalar summed over ``group`` (a functional collective: a graph node)."""
    from torch.distributed import _functional_collectives as funcol

    return funcol.wait_tensor(funcol.all_reduce(x.reshape(1), "sum", group)).reshape(())


def _verdict(loss: torch.Tensor, sumsq: torch.Tensor, veto: torch.Tensor,
             grad_clip: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``found`` (skip this step: a non-finite loss or gradient, or the ranks' veto) and the clip factor."""
    found = torch.logical_not(torch.isfinite(loss) & torch.isfinite(sumsq)) | veto
    coef = torch.clamp(grad_clip / (sumsq.sqrt() + 1e-6), max=1.0) if grad_clip is not None else None
    return found, coef


def _apply(found: torch.Tensor, spec: OptimizerSpec, group: int, master: torch.Tensor, g: torch.Tensor,
           states: list[torch.Tensor], step: torch.Tensor, lr: torch.Tensor) -> None:
    """One tensor's update, written in place unless ``found`` (then every value stays as it was)."""
    new_p, new_st, new_step = _update(spec.kind, spec.groups[group], master, g, states, step, lr)
    for old, new in [(master, new_p), *zip(states, new_st), (step, new_step)]:
        old.copy_(torch.where(found, old, new.to(old.dtype)))


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


def _reduce_bytes(reduction: Reduction, example: list[Any], layout: StepLayout) -> float:
    """Bytes this rank sends per step for the gradient and loss all-reduces (ring count, fp32)."""
    if reduction.group_name is None or reduction.size <= 1:
        return 0.0
    elems = sum(example[i].numel() for b in reduction.buckets for i in b if layout.trainable[i]) + 1
    s = reduction.size
    return 2 * (s - 1) / s * 4 * elems
