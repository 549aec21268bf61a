"""Scheduling pass: issue every gradient reduction as soon as the gradients it reads exist.

The optimizer pass (passes/optimizer.py) appends its *tail* — bucket reductions, the loss mean, the
global norm, the update — after the whole joint graph, so as written every collective waits for the
last gradient and every gradient stays alive until then. This pass moves each collective the tail
issues (``_c10d_functional.all_reduce`` / ``reduce_scatter_tensor`` / ``all_gather_into_tensor``),
together with the tail nodes that feed it (the bucket's casts, ``cat``, padding, division), to just
after the last node it depends on. The matching ``wait_tensor`` stays where the tail first reads the
result, so the reduction of a bucket runs while backward computes the gradients of earlier layers,
and the bucket's gradients are freed once copied into it (ZeRO-2's gradient memory: one bucket in
flight instead of every gradient).

The order of collectives is a function of the graph alone, identical on every rank (contract 2).
On CPU the FX module runs nodes in this order; Inductor keeps collectives where the graph puts them
(its own comm reordering is off by default). A pass of the one shape: ``(graph, plan) -> (graph,
report)``; here the plan is implicit in the graph's nodes (the tail's are tagged by the optimizer
pass, ``meta["autoshard_stage"] == "tail"``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import GraphModule, Node

_ISSUE = ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor")


def _issues_collective(n: Node) -> bool:
    return (n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
            and n.target.namespace == "_c10d_functional" and n.target._opname in _ISSUE)


def issue_collectives_early(gm: GraphModule, plan: Any = None) -> tuple[GraphModule, dict[str, Any]]:
    """Move each tail collective (and the tail nodes feeding it) right after its last dependency.

    ``plan`` is unused (the tags carry what the pass needs); it is accepted for the pass shape.
    Returns the graph (changed in place) and a report: how many collectives moved and, per tail
    collective in graph order, how many forward/backward nodes run after it is issued (the work it
    can overlap).
    """
    graph = gm.graph
    tail = {n for n in graph.nodes if n.meta.get("autoshard_stage") == "tail"}
    if not tail:
        return gm, {"moved": 0, "overlap_nodes": []}
    # tensors the step writes in place (masters, states): a read of one depends on the write before it,
    # which the graph does not show as an edge, so a collective reading one keeps its place
    written = {n.args[0] for n in graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.copy_.default}
    moved, overlap = 0, []
    for n in [x for x in graph.nodes if x in tail and _issues_collective(x)]:
        pos = {x: i for i, x in enumerate(graph.nodes)}
        closure = _tail_ancestors(n, tail)
        deps = {a for c in closure for a in c.all_input_nodes if a not in closure}
        if not deps or deps & written:
            continue
        anchor = max(deps, key=pos.__getitem__)
        if pos[anchor] + len(closure) >= pos[n]:  # already as early as it can be
            continue
        cur = anchor
        for c in sorted(closure, key=pos.__getitem__):
            cur.append(c)
            cur = c
        moved += 1
    for n in graph.nodes:  # per collective: the joint-graph (forward/backward) nodes it can overlap
        if n in tail and _issues_collective(n):
            later = list(graph.nodes)
            overlap.append(sum(1 for x in later[later.index(n) + 1:] if x not in tail and x.op == "call_function"))
    graph.lint()
    gm.recompile()
    return gm, {"moved": moved, "overlap_nodes": overlap}


def _tail_ancestors(n: Node, tail: set[Node]) -> set[Node]:
    """``n`` and every tail node it (transitively) reads."""
    out: set[Node] = set()
    stack = [n]
    while stack:
        x = stack.pop()
        if x in out or x not in tail:
            continue
        out.add(x)
        stack.extend(x.all_input_nodes)
    return out


def place_parameter_gathers(gm: GraphModule, plan: Any = None, prefetch: int = 1) -> tuple[GraphModule, dict[str, Any]]:
    """ZeRO-3: put each bucket's gather (cast of the master shard, all-gather, wait, parameter views)
    before the bucket's first use in forward, and a second copy before its first use in backward.

    The optimizer pass emits one gather per bucket at the top of the graph (tagged
    ``meta["autoshard_gather"] = bucket``). Left there, every bucket would be gathered at once and
    held from forward through backward: ZeRO-2's memory, not ZeRO-3's. Here the forward copy is
    placed just before the bucket's first forward use (its buffer dies after the last forward use),
    the backward copy just before its first backward use (the boundary: the first node that depends
    on the loss's tangent), and each all-gather is issued ``prefetch`` buckets ahead of its wait, so
    it overlaps the previous block's compute. Returns the graph and a report.
    """
    graph = gm.graph
    nodes = list(graph.nodes)
    chains: dict[int, list[Node]] = {}
    for n in nodes:
        j = n.meta.get("autoshard_gather")
        if j is not None:
            chains.setdefault(j, []).append(n)
    if not chains:
        return gm, {"gathered_buckets": 0}
    tangent = next((n for n in nodes if n.meta.get("autoshard_stage") == "tangent"), None)
    dep: set[Node] = {tangent} if tangent is not None else set()
    for n in nodes:
        if n not in dep and any(a in dep for a in n.all_input_nodes):
            dep.add(n)
    pos = {n: i for i, n in enumerate(nodes)}
    boundary = min((pos[n] for n in dep if n is not tangent), default=len(nodes))
    views = {j: [n for n in c if n.target in (torch.ops.aten.slice.Tensor, torch.ops.aten.view.default)]
             for j, c in chains.items()}
    users: dict[int, tuple[list[Node], list[Node]]] = {}
    for j in chains:
        us = {u for v in views[j] for u in v.users if u.meta.get("autoshard_gather") is None}
        users[j] = (sorted((u for u in us if pos[u] < boundary), key=pos.__getitem__),
                    sorted((u for u in us if pos[u] >= boundary), key=pos.__getitem__))
    backward: dict[int, list[Node]] = {}
    for j, c in chains.items():  # the backward's own copy of the gather, its users rewired to it
        fw_users, bw_users = users[j]
        if not bw_users:
            continue
        if not fw_users:
            backward[j] = c
            continue
        env: dict[Node, Node] = {}
        with graph.inserting_before(bw_users[0]):
            for n in c:
                env[n] = graph.node_copy(n, lambda a, env=env: env.get(a, a))
        for u in bw_users:
            for v in views[j]:
                u.replace_input_with(v, env[v])
        backward[j] = [env[n] for n in c]
    forward = {j: c for j, c in chains.items() if users[j][0]}
    placed = _place(forward, {j: users[j][0][0] for j in forward}, prefetch)
    placed += _place(backward, {j: users[j][1][0] for j in backward}, prefetch)
    graph.lint()
    gm.recompile()
    return gm, {"gathered_buckets": len(chains), "forward_gathers": len(forward), "backward_gathers": len(backward),
                "prefetch": prefetch, "placed": placed}


def _place(chains: dict[int, list[Node]], first_use: dict[int, Node], prefetch: int) -> int:
    """Each chain's views and wait just before its first use; its cast and all-gather ``prefetch``
    chains earlier (before the first use of the bucket used that many places before it)."""
    order = sorted(chains, key=lambda j: _index(first_use[j]))
    for k, j in enumerate(order):
        chain = chains[j]
        issue = [n for n in chain if n.target is torch.ops.aten._to_copy.default or _issues_collective(n)]
        rest = [n for n in chain if n not in issue]
        for n in rest:
            first_use[j].prepend(n)
        early = first_use[order[k - prefetch]] if k >= prefetch and prefetch > 0 else (rest[0] if rest else first_use[j])
        for n in issue:
            early.prepend(n)
    return len(order)


def _index(n: Node) -> int:
    i = 0
    for x in n.graph.nodes:
        if x is n:
            return i
        i += 1
    return i


__all__ = ["issue_collectives_early", "place_parameter_gathers"]
