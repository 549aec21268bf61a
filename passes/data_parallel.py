"""Data-parallel passes: gradient-ready order, per-block buckets, and ZeRO-3 parameter gathers.

Backward visits the graph in reverse, so a parameter whose first use is late in the forward gets its
gradient early. Buckets packed in this order fill, and can be reduced, while backward is still
running (see :mod:`autoshard.runtime.data_parallel`).

ZeRO-3 keeps only a 1/N slice of every bucket on each rank. :func:`insert_param_gathers` rewrites a
graph so that each bucket is all-gathered just before its first use, prefetching the next bucket,
and freed right after its last use in the forward. Backward needs the parameters again; every
tensor that leaves a bucket's region of the graph is passed through an identity whose backward
re-gathers the bucket (and prefetches the one before it), so the gather happens before autograd
reaches any operation that saved the bucket's parameters. The runtime side is in
:mod:`autoshard.runtime.zero`.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from autoshard.runtime import zero as Z

from .memory import VIEW_OPS
from .pipeline_split import _block_of, find_blocks


def gradient_order(gm: GraphModule, names: list[str]) -> list[str]:
    """``names`` sorted by the reverse position of their first use in ``gm``'s graph."""
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    first_use: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in names and node.users:
            first_use[node.target] = min(position[u] for u in node.users)
    unused = [n for n in names if n not in first_use]
    return sorted(first_use, key=lambda n: -first_use[n]) + unused


def block_of_params(gm: GraphModule, names: list[str]) -> dict[str, int | None]:
    """The repeated block (``model.layers.<i>``) whose nodes use each parameter; None outside blocks."""
    prefix, count = find_blocks(gm)
    out: dict[str, int | None] = {n: None for n in names}
    if not count:
        return out
    wanted = set(names)
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in wanted:
            blocks = {_block_of(u, prefix) for u in node.users}
            out[node.target] = blocks.pop() if len(blocks) == 1 else None
    return out


def block_buckets(order: list[str], block: dict[str, int | None], nbytes: dict[str, int],
                  bucket_bytes: int) -> list[list[str]]:
    """Buckets for ZeRO-3: one per repeated block (gathered as a unit, like one FSDP unit), the
    parameters outside blocks packed consecutively to about ``bucket_bytes``. ``order`` is the
    gradient-ready order, which keeps a block's parameters together."""
    buckets: list[list[str]] = []
    cur: list[str] = []
    cur_block: object = object()
    size = 0
    for n in order:
        b = block.get(n)
        if cur and (b != cur_block or (b is None and size >= bucket_bytes)):
            buckets.append(cur)
            cur, size = [], 0
        cur.append(n)
        cur_block = b
        size += nbytes[n]
    if cur:
        buckets.append(cur)
    return buckets


def insert_param_gathers(gm: GraphModule, buckets: list[list[str]], aliases: dict[str, list[str]], key: str,
                         prefetch: int = 1) -> list[dict]:
    """Rewrite ``gm`` in place for ZeRO-3; returns one record per bucket the graph uses.

    For bucket ``i`` with region ``[first, last]`` (the nodes that use its parameters, through views):
    ``gather_params(key, i, next)`` before ``first`` (``next``: the following ``prefetch`` buckets,
    started asynchronously), ``release_params(key, i, keep)`` after ``last`` (``keep`` for the bucket
    whose region ends last: backward needs it first, so it stays while gradients are enabled), and
    ``regather(t, key, i, prev)`` on every floating tensor ``t`` made inside the region and used after it.
    """
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    attr_bucket: dict[str, int] = {}
    for i, names in enumerate(buckets):
        for n in names:
            for a in (n, *aliases.get(n, [])):
                attr_bucket[a] = i
    param_view: dict[Node, int] = {}  # nodes that are a parameter or a view of one → bucket
    uses: dict[int, list[int]] = {}
    for node in nodes:
        if node.op == "get_attr" and node.target in attr_bucket:
            param_view[node] = attr_bucket[node.target]
        elif node.op == "call_function":
            srcs = {param_view[a] for a in node.all_input_nodes if a in param_view}
            # a view shares the parameter's storage: a use through it is a use of the parameter
            if node.target in VIEW_OPS and len(srcs) == 1 and node.args and node.args[0] in param_view:
                param_view[node] = srcs.pop()
                continue
            for b in srcs:
                uses.setdefault(b, []).append(pos[node])
    regions = {b: (min(p), max(p)) for b, p in uses.items()}
    if not regions:
        return []
    fwd = sorted(regions, key=lambda b: regions[b])
    ends_last = max(regions, key=lambda b: regions[b][1])
    order = {b: k for k, b in enumerate(fwd)}
    marks: dict[Node, list[int]] = {}  # tensor → buckets whose region it leaves
    records = []
    for k, b in enumerate(fwd):
        first, last = regions[b]
        nxt = tuple(fwd[k + 1:k + 1 + prefetch])
        with gm.graph.inserting_before(nodes[first]):
            gm.graph.call_function(Z.gather_params, (key, b, nxt))
        with gm.graph.inserting_after(nodes[last]):
            gm.graph.call_function(Z.release_params, (key, b, b == ends_last))
        escaping = 0
        for node in nodes[first:last + 1]:
            val = node.meta.get("val")
            if node.op != "call_function" or node in param_view:
                continue
            if isinstance(val, (tuple, list)):  # a multi-output op: its parts are read by getitem nodes
                for u in node.users:
                    uval = u.meta.get("val")
                    if u.target is operator.getitem and pos[u] > last and isinstance(uval, torch.Tensor) \
                            and uval.is_floating_point():
                        marks.setdefault(u, []).append(b)
                        escaping += 1
                continue
            if not isinstance(val, torch.Tensor) or not val.is_floating_point():
                continue
            if any(u.op == "output" or pos[u] > last for u in node.users):
                marks.setdefault(node, []).append(b)
                escaping += 1
        records.append({"bucket": b, "first": first, "last": last, "escaping": escaping,
                        "prefetch": list(nxt), "kept_for_backward": b == ends_last})
    # The identity sits right after the tensor and takes all its uses: its backward runs once the
    # tensor's whole gradient is known, which is before any operation of the region runs backward.
    for node, bs in marks.items():
        users = list(node.users)
        cur = node
        for b in sorted(bs, key=lambda b: -order[b]):
            k = order[b]
            prev = tuple(reversed(fwd[max(0, k - prefetch):k]))
            with gm.graph.inserting_after(cur):
                cur = gm.graph.call_function(Z.regather, (cur, key, b, prev))
            cur.meta["val"] = node.meta["val"]
        for u in users:
            u.replace_input_with(node, cur)
    gm.graph.lint()
    gm.recompile()
    return records


def without_param_gathers(gm: GraphModule) -> GraphModule:
    """A forward graph over the same parameters with :func:`insert_param_gathers`' nodes taken out.

    The step program gathers ZeRO-3 buckets inside its own graph (passes/schedule.py); it traces this
    copy, while ``gm`` itself keeps its gathers for forward-only calls (evaluation). The copy shares
    ``gm``'s parameter objects (a new ``GraphModule`` over the same root), so parameters are found by
    identity as usual.
    """
    graph = torch.fx.Graph()
    env: dict[Node, Node] = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in (Z.gather_params, Z.release_params):
            continue
        if n.op == "call_function" and n.target is Z.regather:
            env[n] = env[n.args[0]]
            continue
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph._codegen = gm.graph._codegen
    graph.lint()
    return GraphModule(gm, graph)
