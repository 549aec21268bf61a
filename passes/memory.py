"""Activation memory: what autograd keeps from the forward for the backward, read off the graph.

Eager autograd saves, per operation, only what that operation's derivative needs: a linear layer
keeps its input (for the weight gradient), softmax its output, an addition nothing. Counting every
forward result overestimates the activations of a transformer by about half. This analysis walks the
aten graph with a table of those needs (``SAVES``), follows views back to the tensor that owns the
memory, counts each such tensor once, and skips parameters (model states are counted by ZeRO's
terms) and anything that does not require a gradient. A generated fused kernel keeps what its spec
says its backward reads; other operations not in the table are assumed to keep all their floating
inputs, so an unknown op errs high.

Shapes come from the nodes' ``meta["val"]`` (global shapes of the local batch); a tensor placed
``Shard`` by the tensor-parallel pass counts ``1/tp`` of its bytes. ``scaled_dot_product_attention``
is counted as the fused GPU kernels keep it (q, k, v, output and a row log-sum-exp), not as the
quadratic math path on CPU.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
from torch.fx import GraphModule, Node

from autoshard.runtime.recompute import checkpoint_block

aten = torch.ops.aten

# ops whose result shares its input's storage: the one list the passes use (ZeRO-3 regions, cost model, here)
VIEW_OPS = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
                      aten.permute.default, aten.t.default, aten.expand.default, aten.unsqueeze.default,
                      aten.squeeze.dim, aten.squeeze.dims, aten.slice.Tensor, aten.select.int, aten.alias.default,
                      aten.detach.default, aten.split.Tensor, aten.split_with_sizes.default, aten.unflatten.int,
                      aten.view_as.default})
_VIEWS = VIEW_OPS | {aten.contiguous.default}  # a copy only when its input is not contiguous
_IN, _OUT = "in", "out"


def _args(node: Node, *idx: int) -> list:
    return [node.args[i] for i in idx if i < len(node.args)]


def _both_operands(node: Node, rg: Callable[[object], bool]) -> list:
    """Binary products: each operand is needed for the other's gradient."""
    a, b = node.args[0], node.args[1]
    return ([b] if rg(a) else []) + ([a] if rg(b) else [])


def _addmm(node: Node, rg) -> list:
    a, b = node.args[1], node.args[2]
    return ([b] if rg(a) else []) + ([a] if rg(b) else [])


def _div(node: Node, rg) -> list:
    a, b = node.args[0], node.args[1]
    if not isinstance(b, Node):
        return []
    return [b] + ([a] if rg(b) else [])


_NOTHING = (aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.neg.default,
            aten.sum.default, aten.sum.dim_IntList, aten.mean.default, aten.mean.dim, aten.cat.default,
            aten.clone.default, aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.split.Tensor,
            aten.split_with_sizes.default, aten.stack.default, aten.zeros_like.default, aten.ones_like.default,
            aten.full_like.default, aten.arange.default, aten.arange.start, aten.full.default,
            aten.zeros.default, aten.ones.default, aten.empty.memory_format, aten.scalar_tensor.default,
            aten.expand.default, aten.repeat.default, aten.rsub.Scalar, aten.eq.Scalar, aten.ne.Scalar,
            aten.lt.Scalar, aten.gt.Scalar, aten.ge.Scalar, aten.le.Scalar, aten.triu.default, aten.tril.default,
            aten.lift_fresh_copy.default, aten.type_as.default, aten.masked_fill.Scalar)

SAVES: dict[object, Callable[[Node, Callable[[object], bool]], list]] = {
    aten.linear.default: lambda n, rg: ([n.args[0]] if rg(n.args[1]) else []) + ([n.args[1]] if rg(n.args[0]) else []),
    aten.mm.default: _both_operands, aten.bmm.default: _both_operands, aten.matmul.default: _both_operands,
    aten.mul.Tensor: lambda n, rg: _both_operands(n, rg) if isinstance(n.args[1], Node) else [],
    aten.mul.Scalar: lambda n, rg: [],
    aten.addmm.default: _addmm,
    aten.div.Tensor: _div,
    aten.div.Scalar: lambda n, rg: [],
    aten.pow.Tensor_Scalar: lambda n, rg: _args(n, 0),
    aten.rsqrt.default: lambda n, rg: [_OUT], aten.sqrt.default: lambda n, rg: [_OUT],
    aten.exp.default: lambda n, rg: [_OUT], aten.tanh.default: lambda n, rg: [_OUT],
    aten.sigmoid.default: lambda n, rg: [_OUT], aten.relu.default: lambda n, rg: [_OUT],
    aten.log.default: lambda n, rg: _args(n, 0), aten.sin.default: lambda n, rg: _args(n, 0),
    aten.cos.default: lambda n, rg: _args(n, 0), aten.silu.default: lambda n, rg: _args(n, 0),
    aten.gelu.default: lambda n, rg: _args(n, 0),
    aten._softmax.default: lambda n, rg: [_OUT], aten.softmax.int: lambda n, rg: [_OUT],
    aten._log_softmax.default: lambda n, rg: [_OUT], aten.log_softmax.int: lambda n, rg: [_OUT],
    aten.native_layer_norm.default: lambda n, rg: _args(n, 0), aten.layer_norm.default: lambda n, rg: _args(n, 0),
    aten.embedding.default: lambda n, rg: _args(n, 1),
    aten.where.self: lambda n, rg: _args(n, 0),
    aten.dropout.default: lambda n, rg: [_OUT], aten.native_dropout.default: lambda n, rg: [_OUT],
    aten.nll_loss_forward.default: lambda n, rg: _args(n, 1),
    aten.scaled_dot_product_attention.default: lambda n, rg: [*_args(n, 0, 1, 2), _OUT],
    aten.index.Tensor: lambda n, rg: [],
    aten.gather.default: lambda n, rg: _args(n, 2),
}
# a checkpointed block (passes/activation_checkpoint.py) keeps its tensor inputs, nothing made inside it
SAVES[checkpoint_block] = lambda n, rg: [a for a in n.args[1:] if isinstance(a, Node)]
for _op in _NOTHING:
    SAVES[_op] = lambda n, rg: []
for _name in ("rms_norm",):
    if hasattr(aten, _name):
        SAVES[getattr(aten, _name).default] = lambda n, rg: _args(n, 0)


def saved_activation_bytes(gm: GraphModule, params: set[str], tp: int = 1,
                           extra_saves: dict | None = None) -> dict[str, int]:
    """Bytes autograd keeps for backward after ``gm``'s forward, per rank; see the module docstring.

    Returns ``saved`` (the activations), ``outputs`` (floating outputs, which the loss holds) and
    ``largest`` (the biggest single activation, a measure of backward's transient buffers).
    """
    rules = dict(SAVES, **(extra_saves or {}))
    requires: dict[Node, bool] = {}
    base: dict[Node, Node] = {}
    param_nodes: set[Node] = set()

    def val(x):
        return x.meta.get("val") if isinstance(x, Node) else None

    def floating(x) -> bool:
        v = val(x)
        return isinstance(v, torch.Tensor) and v.is_floating_point()

    def rg(x) -> bool:
        return isinstance(x, Node) and requires.get(x, False)

    def nbytes(n: Node) -> int:
        v = val(n)
        if not isinstance(v, torch.Tensor):
            return 0
        pl = (n.meta.get("autoshard") or {}).get("placement", "R")
        div = tp if isinstance(pl, str) and pl.startswith("S") else 1
        return v.numel() * v.element_size() // div

    saved: set[Node] = set()
    largest = 0
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            requires[node] = node.target in params
            if node.target in params:
                param_nodes.add(node)
            continue
        if node.op == "placeholder":
            requires[node] = floating(node)  # received activations (pipeline stages) need gradients
            if node.meta.get("autoshard_param") is not None:  # a parameter passed in (checkpointed blocks)
                requires[node] = node.meta["autoshard_param"] in params
                param_nodes.add(node)
            continue
        if node.op != "call_function":
            continue
        ins = node.all_input_nodes
        requires[node] = any(rg(a) for a in ins) and (floating(node) or isinstance(val(node), (tuple, list)))
        if node.target in _VIEWS and node.args and isinstance(node.args[0], Node):
            base[node] = base.get(node.args[0], node.args[0])
            if node.args[0] in param_nodes:
                param_nodes.add(node)
            continue
        if node.target is operator.getitem:
            src = node.args[0]
            if isinstance(src, Node) and src in saved:  # a saved multi-output op: its parts hold the memory
                saved.add(node)
            continue
        if not requires[node]:
            continue
        largest = max(largest, nbytes(node))
        rule = rules.get(node.target)
        spec = getattr(node.target, "spec", None)
        if rule is None and spec is not None and hasattr(spec, "saved"):  # a generated fused kernel
            keep = [node.args[i] for i in spec.saved if i < len(node.args)]
        else:
            keep = rule(node, rg) if rule is not None else [a for a in ins if floating(a)]
        for k in keep:
            k = node if k == _OUT else k
            if not isinstance(k, Node):
                continue
            k = base.get(k, k)
            if k in param_nodes or (k.op == "get_attr"):
                continue
            saved.add(k)
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    outputs = {base.get(a, a) for a in out_node.all_input_nodes if floating(a)}
    return {"saved": sum(nbytes(n) for n in saved), "outputs": sum(nbytes(n) for n in outputs - saved),
            "largest": largest}


def _tensor_bytes(v) -> int:
    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()
    if isinstance(v, (tuple, list)):
        return sum(_tensor_bytes(x) for x in v)
    return 0


def _writes_input(target) -> bool:
    """An op that returns (a view of) an input it writes or passes on: ``copy_``, ``add_``, ``wait_tensor``."""
    if "wait_tensor" in str(target):
        return True
    schema = getattr(target, "_schema", None)
    return schema is not None and any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)


def step_graph_memory(gm: GraphModule) -> dict[str, int]:
    """Bytes a step graph holds, read off the graph itself: ``inputs`` (its placeholders: parameters,
    masters, optimizer states, the batch; they live across steps) and ``transient`` (the peak of the
    tensors it creates while it runs), with ``peak`` their sum.

    Eager liveness in graph order: every node that is not a view (views, ``wait_tensor`` and in-place
    ops alias their first input) allocates its outputs and frees them after the last use of the
    storage or of any view of it. Inductor frees at the same points and fuses pointwise chains, so
    this errs high by the unfused intermediates live at the peak (the peak is usually where backward
    starts, with every saved activation live).
    """
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    root: dict[Node, Node] = {}
    inputs = 0
    size: dict[Node, int] = {}
    for n in nodes:
        if n.op == "placeholder":
            inputs += _tensor_bytes(n.meta.get("val"))
            continue
        if n.op != "call_function":
            continue
        first = n.args[0] if n.args else None
        aliasing = n.target in _VIEWS or n.target is operator.getitem or _writes_input(n.target)
        if aliasing and isinstance(first, Node):
            root[n] = root.get(first, first)
            continue
        size[n] = _tensor_bytes(n.meta.get("val"))
    last: dict[Node, int] = {}
    for n in nodes:
        for a in n.all_input_nodes:
            r = root.get(a, a)
            last[r] = max(last.get(r, 0), order[n])
    frees: dict[int, int] = {}
    for n, b in size.items():
        frees[last.get(n, order[n])] = frees.get(last.get(n, order[n]), 0) + b
    live = peak = 0
    for i, n in enumerate(nodes):
        live += size.get(n, 0)
        peak = max(peak, live)
        live -= frees.get(i, 0)
    return {"inputs": inputs, "transient": peak, "peak": inputs + peak}
