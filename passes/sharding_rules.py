"""Sharding rules: how a placement on the tensor-parallel dimension flows through each aten op.

A rule looks at one FX node and the current placements of its tensor inputs and answers

* ``out``: the placement of the node's result (a tuple of placements for ops returning several
  tensors), and
* ``req``: the placement each tensor input must have for the local op to compute the right
  shard; the pass inserts a collective wherever an input's placement differs from its requirement.

Placements are DTensor's (:class:`Replicate`, :class:`Shard`, :class:`Partial`) over one mesh
dimension. Rules are grouped by kind in tables keyed by aten overload; an op with no rule gets
:func:`replicate_rule` (inputs gathered, op run whole) and is reported as a fallback when that
gathering actually costs a collective. ``Shard`` dims in rules are always non-negative.

The rules only reason about the *global* shapes in ``node.meta["val"]``; the pass rewrites size
arguments to local sizes afterwards.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import Placement
from torch.fx import Node

aten = torch.ops.aten
R: Placement = Replicate()
P: Placement = Partial()


def _ops(*names: str) -> list:
    """Resolve ``"op.overload"`` names to aten overloads, skipping ones this torch lacks."""
    out = []
    for name in names:
        op, overload = name.split(".")
        packet = getattr(aten, op, None)
        if packet is not None and hasattr(packet, overload):
            out.append(getattr(packet, overload))
    return out


@dataclass
class Decision:
    """A rule's answer for one node."""

    out: Placement | tuple[Placement, ...]
    req: dict[Node, Placement] = field(default_factory=dict)
    rewrite: str | None = None  # name of a node rewrite the pass must apply ("view", "split", ...)
    fallback: str | None = None  # why inputs had to be gathered, when they did
    indivisible: str | None = None  # a shard could not follow a view because a dim does not divide


class Context:
    """What a rule may ask about the graph: shapes, current placements, tp degree, blocks."""

    def __init__(self, tp: int) -> None:
        self.tp = tp
        self.spec: dict[Node, Placement | tuple[Placement, ...]] = {}
        self.blocks: dict[Node, int] = {}  # >1: a Shard whose dim holds fused equal segments

    def placement(self, n: Node) -> Placement:
        s = self.spec.get(n, R)
        return s if not isinstance(s, tuple) else R


def shape(n: Node) -> tuple[int, ...] | None:
    v = n.meta.get("val") if isinstance(n, Node) else None
    if isinstance(v, torch.Tensor):
        return tuple(int(s) for s in v.shape)
    return None


def is_tensor(n: object) -> bool:
    return isinstance(n, Node) and shape(n) is not None


def tensor_inputs(node: Node) -> list[Node]:
    return [a for a in node.all_input_nodes if is_tensor(a)]


def _norm(d: int, ndim: int) -> int:
    return d % ndim if ndim else 0


def all_r(node: Node, ctx: Context, out: Placement | tuple | None = None, why: str | None = None) -> Decision:
    ins = tensor_inputs(node)
    gathered = [a for a in ins if not isinstance(ctx.placement(a), Replicate)]
    if out is None:
        v = node.meta.get("val")
        out = tuple(R for _ in v) if isinstance(v, (tuple, list)) else R
    fb = None
    if gathered:
        fb = why or f"no sharding rule for {op_name(node)} with sharded inputs"
    return Decision(out, {a: R for a in ins}, fallback=fb)


def replicate_rule(node: Node, ctx: Context) -> Decision:
    """Default: run the op whole on every rank, gathering sharded inputs."""
    return all_r(node, ctx)


def op_name(node: Node) -> str:
    """A short name for the node's target (``layer_norm.default``, ``getitem``, a module path)."""
    t = node.target
    return t if isinstance(t, str) else str(getattr(t, "__name__", t))


# --------------------------------------------------------------------------- pointwise
def pointwise_rule(node: Node, ctx: Context) -> Decision:
    out_shape = shape(node)
    ins = tensor_inputs(node)
    if out_shape is None or not ins:
        return all_r(node, ctx)
    n = len(out_shape)
    specs = {a: ctx.placement(a) for a in ins}
    if all(isinstance(s, Partial) for s in specs.values()) and node.target in _LINEAR_POINTWISE:
        return Decision(P, {a: P for a in ins})
    chosen: int | None = None
    for a in ins:
        s = specs[a]
        if isinstance(s, Shard):
            a_shape = shape(a)
            od = s.dim + (n - len(a_shape))
            if a_shape[s.dim] == out_shape[od]:
                chosen = od
                break
    if chosen is None:
        return Decision(R, {a: R for a in ins})
    req = {}
    for a in ins:
        a_shape = shape(a)
        ad = chosen - (n - len(a_shape))
        if ad >= 0 and a_shape[ad] == out_shape[chosen] and out_shape[chosen] != 1:
            req[a] = Shard(ad)
        else:
            req[a] = R
    return Decision(Shard(chosen), req)


_LINEAR_POINTWISE = {aten.add.Tensor, aten.sub.Tensor, aten.neg.default, aten.clone.default,
                     aten.alias.default, aten.to.dtype, aten._to_copy.default}

POINTWISE_OPS = _ops(
    "add.Tensor", "add.Scalar", "sub.Tensor", "sub.Scalar", "rsub.Scalar", "mul.Tensor",
    "mul.Scalar", "div.Tensor", "div.Scalar", "div.Tensor_mode", "neg.default", "exp.default",
    "log.default", "tanh.default", "sigmoid.default", "silu.default", "gelu.default",
    "relu.default", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "rsqrt.default",
    "sqrt.default", "where.self", "to.dtype", "to.dtype_layout", "to.device", "_to_copy.default",
    "clone.default", "alias.default", "detach.default", "contiguous.default", "dropout.default",
    "masked_fill.Scalar", "masked_fill.Tensor", "clamp.default", "clamp_min.default",
    "clamp_max.default", "erf.default", "cos.default", "sin.default", "abs.default",
    "reciprocal.default", "eq.Tensor", "eq.Scalar", "ne.Tensor", "ne.Scalar", "lt.Tensor",
    "lt.Scalar", "le.Tensor", "le.Scalar", "gt.Tensor", "gt.Scalar", "ge.Tensor", "ge.Scalar",
    "__and__.Tensor", "__or__.Tensor", "bitwise_and.Tensor", "bitwise_or.Tensor",
    "bitwise_not.default", "logical_and.default", "logical_or.default", "logical_not.default",
    "type_as.default", "sign.default", "softplus.default", "zeros_like.default",
    "ones_like.default", "full_like.default", "empty_like.default", "isnan.default",
    "isinf.default", "lift_fresh_copy.default", "log1p.default", "expm1.default", "square.default",
    "minimum.default", "maximum.default", "hardtanh.default", "leaky_relu.default", "elu.default",
    "mish.default", "hardswish.default", "hardsigmoid.default", "relu_.default", "silu_.default",
    "add_.Tensor", "mul_.Tensor", "fill.Scalar", "bitwise_xor.Tensor", "floor_divide.default",
    "remainder.Scalar", "remainder.Tensor", "floor.default", "ceil.default", "round.default",
    "trunc.default", "atan.default", "tan.default",
)


# --------------------------------------------------------------------------- views
def view_groups(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Pair up runs of input dims and output dims whose sizes multiply to the same number."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) or j < len(b):
        gi, gj = [], []
        pa = pb = 1
        if i < len(a):
            gi.append(i)
            pa = a[i]
            i += 1
        if j < len(b):
            gj.append(j)
            pb = b[j]
            j += 1
        while pa != pb:
            if pa < pb and i < len(a):
                gi.append(i)
                pa *= a[i]
                i += 1
            elif j < len(b):
                gj.append(j)
                pb *= b[j]
                j += 1
            else:
                gi.append(i)
                pa *= a[i]
                i += 1
        groups.append((gi, gj))
    return groups


def view_rule(node: Node, ctx: Context) -> Decision:
    x = node.args[0]
    s = ctx.placement(x)
    if not isinstance(s, Shard):
        return Decision(s, {x: s}, rewrite=None)
    a, b = shape(x), shape(node)
    for gi, gj in view_groups(a, b):
        if s.dim not in gi:
            continue
        major_in = next((d for d in gi if a[d] != 1), None)
        major_out = next((d for d in gj if b[d] != 1), None)
        if major_in != s.dim or major_out is None:
            return Decision(R, {x: R}, fallback=f"view {a}→{b} moves the sharded dim {s.dim} inside a merge")
        if b[major_out] % ctx.tp:
            return Decision(R, {x: R}, indivisible=f"dim of size {b[major_out]} (from {a[s.dim]}) is not divisible by tp={ctx.tp}",
                            fallback=f"view {a}→{b}: dim {b[major_out]} not divisible by tp={ctx.tp}")
        one_to_one = len([d for d in gi if a[d] != 1]) == 1 and len([d for d in gj if b[d] != 1]) == 1
        if ctx.blocks.get(x, 1) > 1:
            if not one_to_one:
                return Decision(R, {x: R}, fallback="view splits a fused (blocked) sharded dim")
            ctx.blocks[node] = ctx.blocks[x]
        return Decision(Shard(major_out), {x: s}, rewrite="size")
    return Decision(R, {x: R}, fallback="view with unmatched dims")


def expand_rule(node: Node, ctx: Context) -> Decision:
    x = node.args[0]
    s = ctx.placement(x)
    if isinstance(s, Partial):
        return Decision(R, {x: R})
    if isinstance(s, Shard):
        od = s.dim + (len(shape(node)) - len(shape(x)))
        return Decision(Shard(od), {x: s}, rewrite="size")
    return Decision(R, {x: R})


def transpose_rule(node: Node, ctx: Context) -> Decision:
    x = node.args[0]
    s = ctx.placement(x)
    if not isinstance(s, Shard):
        return Decision(s, {x: s})
    nd = len(shape(x))
    if node.target == aten.t.default:
        perm = [1, 0] if nd == 2 else [0]
    elif node.target == aten.permute.default:
        perm = [_norm(d, nd) for d in node.args[1]]
    else:
        d0, d1 = _norm(node.args[1], nd), _norm(node.args[2], nd)
        perm = list(range(nd))
        perm[d0], perm[d1] = perm[d1], perm[d0]
    return Decision(Shard(perm.index(s.dim)), {x: s})


def unsqueeze_rule(node: Node, ctx: Context) -> Decision:
    x = node.args[0]
    s = ctx.placement(x)
    if not isinstance(s, Shard):
        return Decision(s, {x: s})
    d = _norm(node.args[1], len(shape(node)))
    return Decision(Shard(s.dim + (1 if d <= s.dim else 0)), {x: s})


def squeeze_rule(node: Node, ctx: Context) -> Decision:
    x = node.args[0]
    s = ctx.placement(x)
    if not isinstance(s, Shard):
        return Decision(s, {x: s})
    a = shape(x)
    if len(node.args) > 1:
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        dims = {_norm(d, len(a)) for d in dims if a[_norm(d, len(a))] == 1}
    else:
        dims = {d for d, n in enumerate(a) if n == 1}
    return Decision(Shard(s.dim - sum(1 for d in dims if d < s.dim)), {x: s})


def slice_rule(node: Node, ctx: Context) -> Decision:
    x = node.args[0]
    s = ctx.placement(x)
    if isinstance(s, Partial):
        return Decision(P, {x: P})
    if not isinstance(s, Shard):
        return Decision(R, {x: R})
    a = shape(x)
    dim = _norm(node.args[1] if len(node.args) > 1 else 0, len(a))
    if dim != s.dim:
        return Decision(s, {x: s})
    if shape(node)[dim] == a[dim]:
        return Decision(s, {x: s}, rewrite="full_slice")
    return Decision(R, {x: R}, fallback="slice along the sharded dim")


def select_rule(node: Node, ctx: Context) -> Decision:
    x = node.args[0]
    s = ctx.placement(x)
    if not isinstance(s, Shard):
        return Decision(R, {x: R})
    dim = _norm(node.args[1], len(shape(x)))
    if dim == s.dim:
        return Decision(R, {x: R}, fallback="select along the sharded dim")
    return Decision(Shard(s.dim - (1 if dim < s.dim else 0)), {x: s})


def split_rule(node: Node, ctx: Context) -> Decision:
    x = node.args[0]
    s = ctx.placement(x)
    outs = node.meta.get("val")
    k = len(outs)
    if not isinstance(s, Shard):
        return Decision(tuple(R for _ in range(k)), {x: R})
    a = shape(x)
    if node.target == aten.unbind.int:
        dim = _norm(node.args[1] if len(node.args) > 1 else 0, len(a))
        if dim == s.dim:
            return all_r(node, ctx, why="unbind along the sharded dim")
        return Decision(tuple(Shard(s.dim - (1 if dim < s.dim else 0)) for _ in range(k)), {x: s})
    dim = _norm(node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0), len(a))
    if dim != s.dim:
        return Decision(tuple(s for _ in range(k)), {x: s})
    sizes = [int(o.shape[dim]) for o in outs]
    blocks = ctx.blocks.get(x, 1)
    if blocks == k and len(set(sizes)) == 1 and sizes[0] % ctx.tp == 0:
        return Decision(tuple(s for _ in range(k)), {x: s}, rewrite="split")
    return all_r(node, ctx, why="split along the sharded dim into pieces the shards do not line up with")


def cat_rule(node: Node, ctx: Context) -> Decision:
    tensors = [t for t in node.args[0] if is_tensor(t)]
    out_shape = shape(node)
    dim = _norm(node.args[1] if len(node.args) > 1 else 0, len(out_shape))
    specs = [ctx.placement(t) for t in tensors]
    stack = node.target == aten.stack.default
    first = specs[0] if specs else R
    if isinstance(first, Shard) and all(sp == first for sp in specs) and (stack or first.dim != dim):
        od = first.dim + (1 if stack and dim <= first.dim else 0)
        return Decision(Shard(od), {t: first for t in tensors})
    return all_r(node, ctx, why=None if all(isinstance(sp, Replicate) for sp in specs) else "cat along the sharded dim")


def getitem_rule(node: Node, ctx: Context) -> Decision:
    src, idx = node.args
    s = ctx.spec.get(src, R)
    if isinstance(s, tuple) and isinstance(idx, int):
        return Decision(s[idx], {})
    return Decision(R, {})


def noop_rule(node: Node, ctx: Context) -> Decision:
    """Ops with no tensor result that accept any placement (metadata assertions)."""
    return Decision(R, {a: ctx.placement(a) for a in tensor_inputs(node)})


# --------------------------------------------------------------------------- reductions
def _reduced_dims(node: Node, ndim: int) -> tuple[set[int], bool]:
    t = node.target
    args = node.args
    if t in (aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default,
             aten.cumsum.default, aten.cumprod.default, aten.logcumsumexp.default):
        return {_norm(args[1], ndim)}, True
    if t in (aten.topk.default, aten.sort.default, aten.argsort.default):
        d = args[2] if t == aten.topk.default and len(args) > 2 else (args[1] if len(args) > 1 else -1)
        if t != aten.topk.default and not isinstance(d, int):
            d = -1
        return {_norm(d, ndim)}, True
    if t in (aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default):
        k = len(args[1])
        return set(range(ndim - k, ndim)), True
    if t in (aten.tril.default, aten.triu.default):
        return {ndim - 2, ndim - 1}, True
    if t == aten.diff.default:
        return {_norm(args[2] if len(args) > 2 else -1, ndim)}, True
    # sum / mean / amax / var / argmax / max.dim ...: (x, dims, keepdim)
    dims = args[1] if len(args) > 1 else node.kwargs.get("dim")
    keep = bool(args[2]) if len(args) > 2 and isinstance(args[2], bool) else bool(node.kwargs.get("keepdim", False))
    if t in (aten.var.correction, aten.std.correction):
        keep = bool(node.kwargs.get("keepdim", False))
    if dims is None or dims == [] or dims == ():
        return set(range(ndim)), keep
    if isinstance(dims, int):
        dims = [dims]
    return {_norm(d, ndim) for d in dims}, keep


def reduction_rule(node: Node, ctx: Context) -> Decision:
    x = node.args[0]
    s = ctx.placement(x)
    ins = tensor_inputs(node)
    v = node.meta.get("val")
    multi = isinstance(v, (tuple, list))
    if not isinstance(s, Shard):
        return all_r(node, ctx)
    dims, keep = _reduced_dims(node, len(shape(x)))
    if s.dim in dims:
        return all_r(node, ctx, why=f"{op_name(node)} reduces over the sharded dim {s.dim}")
    od = s.dim if keep else s.dim - sum(1 for d in dims if d < s.dim)
    out = Shard(od)
    req = {a: R for a in ins}
    req[x] = s
    if multi:
        return Decision(tuple(out if isinstance(t, torch.Tensor) and t.dim() > od else R for t in v), req)
    return Decision(out, req)


REDUCTION_OPS = _ops(
    "sum.dim_IntList", "sum.default", "mean.dim", "mean.default", "amax.default", "amin.default",
    "max.dim", "min.dim", "argmax.default", "argmin.default", "var.correction", "std.correction",
    "softmax.int", "_softmax.default", "log_softmax.int", "_log_softmax.default", "cumsum.default",
    "topk.default", "sort.default", "argsort.default", "layer_norm.default",
    "native_layer_norm.default", "rms_norm.default", "logsumexp.default", "any.dim", "all.dim",
    "tril.default", "triu.default", "diff.default", "norm.ScalarOpt_dim",
    "linalg_vector_norm.default",
)


# --------------------------------------------------------------------------- matmul / attention
def matmul_rule(node: Node, ctx: Context) -> Decision:
    """Activation × activation products (mm, bmm, matmul) with no parameter operand."""
    a, b = node.args[0], node.args[1]
    sa, sb = ctx.placement(a), ctx.placement(b)
    if isinstance(sa, Partial) or isinstance(sb, Partial):
        return Decision(R, {a: R, b: R})
    na, nb, no = len(shape(a)), len(shape(b)), len(shape(node))
    if isinstance(sa, Replicate) and isinstance(sb, Replicate):
        return Decision(R, {a: R, b: R})
    # contracted dims: a[-1], b[-2] (b 1-D: b[0])
    ka, kb = na - 1, (nb - 2 if nb >= 2 else 0)
    if isinstance(sa, Shard) and isinstance(sb, Shard) and sa.dim == ka and sb.dim == kb:
        return Decision(P, {a: sa, b: sb})
    if isinstance(sa, Shard) and na >= 2 and sa.dim == na - 2 and isinstance(sb, Replicate):
        return Decision(Shard(no - 2), {a: sa, b: R})
    if isinstance(sb, Shard) and nb >= 2 and sb.dim == nb - 1 and isinstance(sa, Replicate):
        return Decision(Shard(no - 1), {a: R, b: sb})
    # batch dims (aligned from the right, excluding the two matrix dims)
    for s_this, n_this, other, n_other, this in ((sa, na, b, nb, a), (sb, nb, a, na, b)):
        if isinstance(s_this, Shard) and n_this > 2 and s_this.dim < n_this - 2:
            od = s_this.dim + (no - n_this)
            o_dim = od - (no - n_other)
            o_shape = shape(other)
            if o_dim >= 0 and n_other > 2 and o_shape[o_dim] != 1:
                return Decision(Shard(od), {this: s_this, other: Shard(o_dim)})
            return Decision(Shard(od), {this: s_this, other: R})
    return all_r(node, ctx, why="matmul operands sharded on dims that do not line up")


def sdpa_rule(node: Node, ctx: Context) -> Decision:
    q, k, v = node.args[:3]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    qkv = [q, k, v]
    dim = None
    for t in qkv:
        s = ctx.placement(t)
        if isinstance(s, Shard) and s.dim in (0, 1) and s.dim < len(shape(t)) - 2:
            dim = s.dim
            break
    if dim is None or any(shape(t)[dim] % ctx.tp for t in qkv):
        return all_r(node, ctx, why=None if dim is None else "attention heads not divisible by tp")
    req: dict[Node, Placement] = {t: Shard(dim) for t in qkv}
    if is_tensor(mask):
        m = shape(mask)
        md = dim - (4 - len(m))
        req[mask] = Shard(md) if md >= 0 and m[md] != 1 else R
    out = Shard(dim)
    v_out = node.meta.get("val")
    if isinstance(v_out, (tuple, list)):
        return Decision(tuple(out if isinstance(t, torch.Tensor) and t.dim() == 4 else R for t in v_out), req)
    return Decision(out, req)


LOSS_GATHER = "loss over a vocab-sharded head: the logits are gathered here, as they would be at the graph output"


def loss_rule(node: Node, ctx: Context) -> Decision:
    """Cross-entropy / NLL inside the graph (Hugging Face models given ``labels``).

    The loss needs whole rows of class scores, so class-sharded logits from a vocab-parallel head are
    gathered first: the same all-gather an external ``loss_fn`` costs at the output (a vocab-parallel
    cross-entropy would reduce it to three row-sized all-reduces). Reported with that reason.
    """
    return all_r(node, ctx, why=LOSS_GATHER)


def factory_rule(node: Node, ctx: Context) -> Decision:
    return Decision(R, {})


RULES: dict[object, Callable[[Node, Context], Decision]] = {}
for _op in POINTWISE_OPS:
    RULES[_op] = pointwise_rule
for _op in REDUCTION_OPS:
    RULES[_op] = reduction_rule
for _op in (aten.view.default, aten.reshape.default, aten._unsafe_view.default,
            aten.flatten.using_ints, aten.unflatten.int):
    RULES[_op] = view_rule
RULES.update({
    aten.expand.default: expand_rule,
    aten.transpose.int: transpose_rule,
    aten.permute.default: transpose_rule,
    aten.t.default: transpose_rule,
    aten.unsqueeze.default: unsqueeze_rule,
    aten.squeeze.dim: squeeze_rule,
    aten.squeeze.dims: squeeze_rule,
    aten.squeeze.default: squeeze_rule,
    aten.slice.Tensor: slice_rule,
    aten.select.int: select_rule,
    aten.split.Tensor: split_rule,
    aten.split_with_sizes.default: split_rule,
    aten.unbind.int: split_rule,
    aten.cat.default: cat_rule,
    aten.stack.default: cat_rule,
    operator.getitem: getitem_rule,
    aten._assert_tensor_metadata.default: noop_rule,
    aten.mm.default: matmul_rule,
    aten.bmm.default: matmul_rule,
    aten.matmul.default: matmul_rule,
    aten.scaled_dot_product_attention.default: sdpa_rule,
})
for _op in _ops("cross_entropy_loss.default", "nll_loss.default", "nll_loss_forward.default", "nll_loss2d.default"):
    RULES[_op] = loss_rule
for _op in _ops("arange.default", "arange.start", "arange.start_step", "full.default", "zeros.default",
                "ones.default", "empty.memory_format", "scalar_tensor.default", "new_ones.default",
                "new_zeros.default", "new_full.default", "new_empty.default", "rand.default",
                "randn.default"):
    RULES[_op] = factory_rule


def rule_for(node: Node) -> Callable[[Node, Context], Decision]:
    return RULES.get(node.target, replicate_rule)
