"""Pipeline stage cuts: one captured graph → ``S`` stage graphs, cut between repeated blocks.

Problem. Given a topologically ordered aten graph whose nodes carry ``nn_module_stack`` and a stage
count ``S``, choose ``S - 1`` cut points so that the most expensive stage is as cheap as possible,
and build one graph per stage whose inputs are the user inputs plus the values it receives from the
previous stage and whose outputs are what the next stage needs.

Method. The *repeated blocks* are the children of the module list with the most indexed children
(``model.layers.0 … model.layers.31``). A cut may only fall at the first node of a block (never
inside one unless ``split_points`` names a module), so stages are contiguous runs of blocks; the
nodes before the first block (embeddings, masks, rotary tables) join stage 0 and those after the
last (final norm, LM head, loss) the last stage. Costs are matmul FLOPs from the nodes' shapes;
a small dynamic programme minimises the maximum stage cost.

Stage graphs are flat: ``stage(*user_inputs_flat, *received) -> tuple(sent)`` (the last stage
returns the model's flat outputs). A value produced in stage ``a`` and used in stage ``c > a + 1``
is passed through the stages in between, so each stage talks only to its neighbours. Parameters are
loaded in every stage that uses them; one used by several stages (tied embedding and LM head) is
reported in ``shared_params`` so the runtime can sum its gradients across those stages.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch.fx import Graph, GraphModule, Node

from autoshard.runtime.errors import PlanError

aten = torch.ops.aten
_INDEXED = re.compile(r"^(.*)\.(\d+)$")


@dataclass
class StageSplit:
    num_stages: int
    block_prefix: str
    num_blocks: int
    stage_blocks: list[list[int]]  # block indices per stage
    stages: list[GraphModule]
    recv: list[list[str]]  # names of values each stage receives (stage 0: [])
    send: list[list[str]]  # names of values each stage sends on (last stage: [])
    params: list[list[str]]  # parameter names each stage loads
    shared_params: dict[str, list[int]] = field(default_factory=dict)
    costs: list[float] = field(default_factory=list)


def _paths(node: Node) -> list[str]:
    return [str(v[0]) for v in (node.meta.get("nn_module_stack") or {}).values()]


def find_blocks(gm: GraphModule) -> tuple[str, int]:
    """The module-list prefix with the most indexed children, and how many there are."""
    seen: dict[str, set[int]] = defaultdict(set)
    for node in gm.graph.nodes:
        for p in _paths(node):
            m = _INDEXED.match(p)
            if m:
                seen[m.group(1)].add(int(m.group(2)))
    if not seen:
        return "", 0
    prefix = max(seen, key=lambda k: (len(seen[k]), -k.count(".")))
    return prefix, len(seen[prefix])


def _block_of(node: Node, prefix: str) -> int | None:
    for p in _paths(node):
        m = _INDEXED.match(p)
        if m and m.group(1) == prefix:
            return int(m.group(2))
    return None


def _flops(node: Node) -> float:
    v = node.meta.get("val")
    if node.target in (aten.linear.default, aten.mm.default, aten.addmm.default, aten.matmul.default,
                       aten.bmm.default) and isinstance(v, torch.Tensor):
        x = node.args[1] if node.target == aten.addmm.default else node.args[0]
        xv = x.meta.get("val") if isinstance(x, Node) else None
        k = xv.shape[-1] if isinstance(xv, torch.Tensor) and xv.dim() else 1
        return 2.0 * v.numel() * int(k)
    if node.target == aten.scaled_dot_product_attention.default and isinstance(v, torch.Tensor):
        k = node.args[1].meta["val"]
        return 4.0 * v.numel() * int(k.shape[-2])
    return float(v.numel()) if isinstance(v, torch.Tensor) else 0.0


def _balance(costs: list[float], pre: float, post: float, n: int) -> list[int]:
    """Start block of each of ``n`` stages (contiguous runs) minimising the largest stage cost."""
    nb = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def cost(i: int, j: int, s: int) -> float:  # blocks [i, j) as stage s
        return prefix[j] - prefix[i] + (pre if s == 0 else 0.0) + (post if s == n - 1 else 0.0)

    inf = math.inf
    best = [[inf] * (nb + 1) for _ in range(n + 1)]
    arg = [[0] * (nb + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for s in range(1, n + 1):
        for j in range(s, nb + 1):
            for i in range(s - 1, j):
                v = max(best[s - 1][i], cost(i, j, s - 1))
                if v < best[s][j]:
                    best[s][j], arg[s][j] = v, i
    starts = []
    j = nb
    for s in range(n, 0, -1):
        i = arg[s][j]
        starts.append(i)
        j = i
    return sorted(starts)


def split_stages(gm: GraphModule, num_stages: int, split_points: list[str] | None = None) -> StageSplit:
    """Cut ``gm`` into ``num_stages`` stage graph modules (see the module docstring)."""
    nodes = list(gm.graph.nodes)
    prefix, nb = find_blocks(gm)
    body = [n for n in nodes if n.op not in ("placeholder", "get_attr", "output")
            and not (n.op == "call_module" and str(n.target).startswith("_guards"))]
    if split_points:
        starts_at = []
        for sp in split_points:
            first = next((i for i, n in enumerate(body) if any(p == sp or p.startswith(sp + ".") for p in _paths(n))), None)
            if first is None:
                raise PlanError(f"split point {sp!r} names no module used in the captured graph; module paths "
                                f"look like {prefix + '.0' if prefix else 'model.layers.0'}")
            starts_at.append(first)
        if len(starts_at) != num_stages - 1:
            raise PlanError(f"{len(split_points)} split points make {len(split_points) + 1} stages but the mesh "
                            f"needs {num_stages} (pp × virtual_stages): give {num_stages - 1} split points")
        cut_index = sorted(set(starts_at))
        if len(cut_index) != num_stages - 1 or cut_index[0] == 0:
            raise PlanError("split points must be distinct and each must leave a non-empty first stage")
        stage_blocks: list[list[int]] = [[] for _ in range(num_stages)]
    else:
        if nb < num_stages:
            raise PlanError(f"pp × virtual_stages = {num_stages} stages but the model has {nb} repeated blocks"
                            f"{' under ' + prefix if prefix else ''}: use at most {max(nb, 1)} stages, or give "
                            "split_points to cut inside blocks")
        block_of = {n: _block_of(n, prefix) for n in body}
        costs = [0.0] * nb
        pre = post = 0.0
        seen_block = False
        for n in body:
            b = block_of[n]
            f = _flops(n)
            if b is not None:
                costs[b] += f
                seen_block = True
            elif not seen_block:
                pre += f
            else:
                post += f
        starts = _balance(costs, pre, post, num_stages)
        first_node = {}
        for i, n in enumerate(body):
            b = block_of[n]
            if b is not None and b not in first_node:
                first_node[b] = i
        cut_index = [first_node[b] for b in starts[1:]]
        stage_blocks = [list(range(starts[s], starts[s + 1] if s + 1 < num_stages else nb)) for s in range(num_stages)]

    stage_of: dict[Node, int] = {}
    s = 0
    cuts = list(cut_index)
    for i, n in enumerate(body):
        while cuts and i >= cuts[0]:
            cuts.pop(0)
            s += 1
        stage_of[n] = s
    out_node = nodes[-1]
    stage_of[out_node] = num_stages - 1
    return _build(gm, nodes, stage_of, num_stages, prefix, nb, stage_blocks)


def _build(gm: GraphModule, nodes: list[Node], stage_of: dict[Node, int], n: int, prefix: str, nb: int,
           stage_blocks: list[list[int]]) -> StageSplit:
    placeholders = [x for x in nodes if x.op == "placeholder"]
    # last stage that uses each produced value
    last_use: dict[Node, int] = {}
    for x in nodes:
        if x in stage_of:
            for a in x.all_input_nodes:
                if a in stage_of:
                    last_use[a] = max(last_use.get(a, -1), stage_of[x])
    sends: list[list[Node]] = []
    for s in range(n - 1):
        sends.append([v for v in nodes if v in stage_of and stage_of[v] <= s and last_use.get(v, -1) > s])
    recvs: list[list[Node]] = [[]] + sends
    graphs: list[GraphModule] = []
    params: list[list[str]] = []
    param_names = {name for name, _ in gm.named_parameters(remove_duplicate=False)}
    costs = []
    for s in range(n):
        g = Graph()
        env: dict[Node, Node] = {}
        for p in placeholders:
            env[p] = g.placeholder(p.name)
            env[p].meta = dict(p.meta)
        for v in recvs[s]:
            env[v] = g.placeholder(f"recv_{v.name}")
            env[v].meta = dict(v.meta)
        used_params: list[str] = []
        cost = 0.0
        for x in nodes:
            if stage_of.get(x) != s or x.op == "output":
                continue
            for a in x.all_input_nodes:
                if a not in env and a.op == "get_attr":
                    env[a] = g.get_attr(a.target)
                    env[a].meta = dict(a.meta)
                    if a.target in param_names:
                        used_params.append(a.target)
            env[x] = g.node_copy(x, lambda a, env=env: env[a])
            cost += _flops(x)
        if s < n - 1:
            g.output(tuple(env[v] for v in sends[s]))
        else:
            out = nodes[-1]
            for a in out.all_input_nodes:
                if a not in env and a.op == "get_attr":
                    env[a] = g.get_attr(a.target)
            g.output(torch.fx.node.map_arg(out.args[0], lambda a, env=env: env[a]))
        graphs.append(GraphModule(gm, g, class_name=f"Stage{s}"))
        params.append(used_params)
        costs.append(cost)
    shared: dict[str, list[int]] = {}
    for s, ps in enumerate(params):
        for p in ps:
            shared.setdefault(p, []).append(s)
    shared = {p: ss for p, ss in shared.items() if len(ss) > 1}
    return StageSplit(n, prefix, nb, stage_blocks, graphs, [[v.name for v in r] for r in recvs],
                      [[v.name for v in r] for r in sends] + [[]], params, shared, costs)
