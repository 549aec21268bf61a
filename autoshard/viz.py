"""Pictures of a sharded program: the rewritten graph, its pipeline schedule and per-rank memory.

``autoshard viz`` and ``autoshard check`` plan a model on a *virtual* mesh (no processes) and look at
what rank 0 would run. This module does the looking:

* :func:`lower` builds the :class:`~autoshard.api.ShardedModule` and the whole rewritten graph with
  the pipeline stage of every node (with ``pp > 1`` a rank holds only its own stages, so the graph of
  all stages is lowered once more from the same plan);
* :func:`build_view` turns that graph into drawable data: nodes grouped by pipeline stage and module,
  edges labelled with the placement and local shape of the value they carry, collectives with the
  bytes they move, fallbacks with their reason and source line, and repeated blocks (``layers.0``,
  ``layers.1`` …) whose op sequences are identical folded into one group marked ``× N``, so that a
  32-layer model draws like a 1-layer one;
* :func:`render_html` (one self-contained page: inline style, inline script, inline SVG, no network
  references), :func:`render_svg`, :func:`render_dot` and :func:`render_json` draw it. The layout is
  our own layered layout (groups nest, each group's children go in rows by dependency depth), so
  nothing outside the standard library is needed;
* :func:`op_coverage` counts, per op, how many nodes run on shards, run replicated, or fell back.

Every piece of text that comes from the model (module names, op names, source lines, reasons) is
escaped before it is written into SVG or HTML.

Why this module is long: one self-contained HTML/SVG renderer (layout, styles, escaping) with its
graph-to-view conversion; splitting it would spread one picture's rules over several files.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from html import escape
from typing import Any

import torch
from torch.fx import Graph, GraphModule, Node
from torch.utils._pytree import tree_map

from autoshard.api import ShardedModule, autoshard
from autoshard.passes.capture import capture
from autoshard.passes.pipeline_split import find_blocks, split_stages
from autoshard.passes.tensor_parallel import TensorParallelPlan, apply_tensor_parallel, module_path, source_line
from autoshard.runtime import collectives as C
from autoshard.runtime.errors import CaptureError
from autoshard.runtime.mesh import Mesh
from autoshard.runtime.plan import Plan

__all__ = [
    "FORMATS", "GraphView", "Lowered", "build_view", "collective_counts", "layout", "lower", "memory_by_rank",
    "mesh_text", "op_coverage", "op_name", "render", "render_dot", "render_html", "render_json", "render_svg",
    "schedule_data",
]

FORMATS: tuple[str, ...] = ("html", "svg", "dot", "json")

_COLLECTIVE_MODULE = C.__name__
_KIB = 1024.0


# ====================================================================================== lowering
@dataclass
class Lowered:
    """A model sharded on a virtual mesh, and the whole rewritten graph of rank 0's tensor-parallel slice.

    ``graph`` holds every stage (the ranks along ``pp`` together); ``stage_of`` maps a node name to its
    pipeline stage and ``stage_params`` lists the parameters each stage loads (one entry when ``pp == 1``).
    """

    sm: ShardedModule
    model_name: str
    gm: GraphModule
    stage_of: dict[str, int]
    stage_params: list[list[str]]
    inputs: str = ""
    microbatch_note: str = ""

    @property
    def graph(self) -> Graph:
        return self.gm.graph

    @property
    def plan(self) -> Plan:
        return self.sm.plan

    @property
    def tp(self) -> int:
        return self.sm.mesh.size("tp")

    @property
    def pp(self) -> int:
        return self.sm.mesh.size("pp")


def _first_microbatch(args: tuple, kwargs: dict, m: int) -> tuple[tuple, dict]:
    """The first of ``m`` microbatches, cut as the pipeline cuts them (dim 0 of batch-sized tensors)."""
    sizes = [x.shape[0] for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor) and x.dim() > 0]
    if not sizes or m <= 1:
        return args, kwargs
    batch = sizes[0]
    per = batch // m
    return tree_map(lambda x: x[:per] if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == batch else x,
                    (args, kwargs))


def lower(
    model: torch.nn.Module,
    mesh: dict[str, int],
    args: tuple = (),
    kwargs: dict | None = None,
    *,
    loss_fn: Callable | None = None,
    schedule: str = "1f1b",
    microbatches: int | None = None,
    virtual_stages: int = 1,
    progress: Callable[[str], None] | None = None,
    attention: str | None = None,
) -> Lowered:
    """Shard ``model`` on a virtual mesh with the given degrees (rank 0) and collect its rewritten graph.

    ``args``/``kwargs`` are one local batch (a model takes either positional or keyword inputs here,
    as :func:`autoshard.autoshard` does). ``progress`` is told what is being done, for a status line.
    ``attention``: a block-sparse spec, as ``autoshard(attention=...)`` takes; its layout is drawn.
    """
    kwargs = dict(kwargs or {})
    say = progress or (lambda _msg: None)
    say("capturing and planning")
    vmesh = Mesh.virtual(**mesh, rank=0)
    example = kwargs if kwargs else tuple(args)
    sm = autoshard(model, vmesh, example_inputs=example, loss_fn=loss_fn, schedule=schedule,
                   microbatches=microbatches, virtual_stages=virtual_stages, attention=attention)
    plan = sm.plan
    name = type(model).__name__
    if getattr(sm, "fallback", None):  # capture failed and autoshard fell back to the unmodified module
        reason = plan.fallbacks[0]["reason"] if plan.fallbacks else "torch.export failed"
        raise CaptureError(f"there is no graph of {name} to draw or check: {reason}")
    if isinstance(sm.module, GraphModule):
        stage_of = {n.name: 0 for n in sm.module.graph.nodes}
        return Lowered(sm, name, sm.module, stage_of, [list(plan.params)])
    # pp > 1: this rank holds only its stages; lower every stage from the same plan to draw them all
    say("lowering every pipeline stage")
    m = int(plan.pipeline["microbatches"])
    margs, mkwargs = _first_microbatch(tuple(args), kwargs, m)
    gm = capture(model, margs, mkwargs, training=True)
    gm, _ = apply_tensor_parallel(gm, TensorParallelPlan(dict(plan.params), [], []), sm.mesh.size("tp"),
                                  sm.mesh.group("tp").name)
    split = split_stages(gm, sm.schedule.num_stages, plan.pipeline.get("split_points"))
    stage_of: dict[str, int] = {}
    for s, g in enumerate(split.stages):
        for n in g.graph.nodes:
            if n.op not in ("placeholder", "get_attr", "output"):
                stage_of[n.name] = s
    last = split.num_stages - 1
    for n in gm.graph.nodes:
        if n.op == "output":
            stage_of[n.name] = last
        elif n.op == "placeholder":  # drawn in the first stage that reads it
            users = [stage_of[u.name] for u in n.users if u.name in stage_of]
            stage_of[n.name] = min(users, default=0)
    note = f"shapes are those of one microbatch (the local batch cut into {m})"
    return Lowered(sm, name, gm, stage_of, [list(p) for p in split.params], microbatch_note=note)


# ====================================================================================== node facts
def op_name(node: Node) -> str:
    """A readable op name: ``aten.linear``, ``aten.add.Tensor``, ``getitem``, ``autoshard.all_reduce``."""
    t = node.target
    if node.op != "call_function":
        return str(node.op if node.op != "call_module" else t)
    if isinstance(t, torch._ops.OpOverload):
        text = str(t)
        return text[: -len(".default")] if text.endswith(".default") else text
    mod = getattr(t, "__module__", "") or ""
    fn = getattr(t, "__name__", str(t))
    if mod.startswith("autoshard"):
        return f"autoshard.{fn}"
    return fn


def short_op(node: Node) -> str:
    """The op name without namespace or overload: what a node box says first."""
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return t._opname if hasattr(t, "_opname") else str(t).split(".")[1]
    return op_name(node).split(".")[-1]


def is_collective(node: Node) -> bool:
    """A collective the tensor-parallel pass inserted (a function of :mod:`autoshard.runtime.collectives`)."""
    return node.op == "call_function" and getattr(node.target, "__module__", "") == _COLLECTIVE_MODULE


def _drawn(node: Node) -> bool:
    """Nodes worth drawing: inputs, compute, collectives and the output (not parameter loads or asserts)."""
    if node.op in ("get_attr",):
        return False
    if node.op == "call_module" and str(node.target).startswith("_guards"):
        return False
    if node.op == "call_function" and not node.users and node.meta.get("val") is None:
        return False  # metadata assertions
    return True


def _meta_placement(node: Node) -> str | list[str]:
    p = (node.meta.get("autoshard") or {}).get("placement")
    return p if p is not None else "R"


def _local(shape: list[int], placement: str, tp: int) -> list[int]:
    out = list(shape)
    m = re.fullmatch(r"S\((-?\d+)\)", placement)
    if m and out:
        d = int(m.group(1)) % len(out)
        out[d] //= tp
    return out


def _val_shapes(node: Node) -> list[list[int]] | list[int] | None:
    v = node.meta.get("val")
    if isinstance(v, torch.Tensor):
        return [int(s) for s in v.shape]
    if isinstance(v, (tuple, list)) and v and all(isinstance(t, torch.Tensor) for t in v):
        return [[int(s) for s in t.shape] for t in v]
    return None


def _dtype(node: Node) -> str:
    v = node.meta.get("val")
    if isinstance(v, (tuple, list)) and v:
        v = v[0]
    return str(v.dtype).replace("torch.", "") if isinstance(v, torch.Tensor) else ""


def _itemsize(node: Node) -> int:
    v = node.meta.get("val")
    return v.element_size() if isinstance(v, torch.Tensor) else 4


def fmt_bytes(n: float) -> str:
    """``32768`` → ``32.0 KiB``."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < _KIB or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= _KIB
    return f"{n:.1f} TiB"  # pragma: no cover


class _Facts:
    """Placements and local shapes of the values in a rewritten graph."""

    def __init__(self, low: Lowered) -> None:
        self.low = low
        self.tp = low.tp
        self.alias = {a: n for n, p in low.plan.params.items() for a in [n, *p.aliases]}

    def param(self, node: Node) -> str | None:
        if node.op == "get_attr" and str(node.target) in self.alias:
            return self.alias[str(node.target)]
        return None

    def placement(self, node: Node) -> str | list[str]:
        """Placement of the value ``node`` produces on the tp dimension (``P`` where it feeds an all-reduce)."""
        pname = self.param(node)
        if pname is not None:
            return self.low.plan.params[pname].placement
        if node.op in ("placeholder", "get_attr"):
            return "R"
        p = _meta_placement(node)
        if p == "R" and any(is_collective(u) and u.target is C.all_reduce for u in node.users):
            return "P"  # the partial sums of a row-parallel product, summed by the all-reduce it feeds
        return p

    def local_shape(self, node: Node) -> list[int] | list[list[int]] | None:
        shp = _val_shapes(node)
        if shp is None:
            return None
        pl = self.placement(node)
        if shp and isinstance(shp[0], list):
            pls = pl if isinstance(pl, list) else [pl] * len(shp)
            return [_local(s, p, self.tp) for s, p in zip(shp, pls)]
        return _local(shp, pl if isinstance(pl, str) else "R", self.tp)

    def sharded(self, node: Node) -> bool:
        """Whether ``node`` works on shards: its result or one of its tensor inputs is not replicated."""
        vals = [self.placement(node)] + [self.placement(a) for a in node.all_input_nodes]
        flat = [p for v in vals for p in (v if isinstance(v, list) else [v])]
        return any(p != "R" for p in flat)


def _value_label(placement: str | list[str], shape: Any) -> str:
    """Edge text: ``S(2) [2,64,96]``; tuples as ``3 × S(2) [2,64,32]`` when their parts agree."""
    def one(p: str, s: list[int] | None) -> str:
        return p + ("" if s is None else " [" + ",".join(str(d) for d in s) + "]")

    if isinstance(placement, list) or (shape and isinstance(shape[0], list)):
        pls = placement if isinstance(placement, list) else [placement] * len(shape or [])
        shapes = shape if shape and isinstance(shape[0], list) else [None] * len(pls)
        parts = [one(p, s) for p, s in zip(pls, shapes)]
        if parts and len(set(parts)) == 1:
            return f"{len(parts)} × {parts[0]}"
        return "(" + ", ".join(parts) + ")"
    return one(placement, shape)


# ====================================================================================== coverage
def op_coverage(low: Lowered) -> dict[str, dict[str, int]]:
    """Per op name: how many nodes run on shards (``sharded``), whole (``replicated``), or fell back.

    Counts the model's ops in the whole rewritten graph (every block, every stage); the inserted
    collectives are not the model's ops and are left out.
    """
    facts = _Facts(low)
    fb_nodes = {f["node"] for f in low.plan.fallbacks}
    out: dict[str, dict[str, int]] = {}
    for node in low.graph.nodes:
        if node.op not in ("call_function", "call_module") or not _drawn(node) or is_collective(node):
            continue
        row = out.setdefault(op_name(node), {"sharded": 0, "replicated": 0, "fallback": 0})
        if node.name in fb_nodes:
            row["fallback"] += 1
        elif facts.sharded(node):
            row["sharded"] += 1
        else:
            row["replicated"] += 1
    return dict(sorted(out.items(), key=lambda kv: (-sum(kv[1].values()), kv[0])))


def collective_counts(low: Lowered) -> Counter[str]:
    """How many collectives of each kind the rewritten graph holds."""
    return Counter(short_op(n) for n in low.graph.nodes if is_collective(n))


# ====================================================================================== the view
@dataclass
class VNode:
    """One drawn node. ``repeat`` > 1 when it stands for the same node in ``repeat`` folded blocks."""

    id: str
    op: str
    target: str
    kind: str  # input | compute | collective | output
    module: str
    group: str | None
    stage: int
    placement: str | list[str]
    local_shape: Any
    dtype: str
    sharded: bool
    params: list[dict[str, Any]] = field(default_factory=list)
    bytes: int = 0  # forward tensor bytes a collective moves (as the plan counts them)
    backward_bytes: int = 0
    mesh_dim: str = ""
    fallback: dict[str, Any] | None = None
    source: str = ""
    repeat: int = 1
    detail: str = ""  # second text line
    out_label: str = ""  # placement and local shape of the value it produces, as its out-edges say
    w: float = 0.0


@dataclass
class VEdge:
    src: str
    dst: str
    label: str  # placement and local shape of the value
    placement: str | list[str]
    local_shape: Any
    kind: str = "data"  # data | pipeline (crosses a stage: sent between pipeline ranks) | input


@dataclass
class VGroup:
    id: str
    label: str
    kind: str  # stage | block | module
    parent: str | None
    stage: int
    path: str = ""
    repeat: int = 1
    members: list[str] = field(default_factory=list)  # the module paths a folded block stands for


@dataclass
class GraphView:
    """Drawable data of a rewritten graph; ``groups`` parents come before children."""

    title: str
    subtitle: str
    nodes: list[VNode]
    edges: list[VEdge]
    groups: list[VGroup]
    stages: int
    block_prefix: str
    low: Lowered

    def node(self, nid: str) -> VNode:
        return self._by_id[nid]

    def __post_init__(self) -> None:
        self._by_id = {n.id: n for n in self.nodes}


_MAX_DETAIL = 38


def _clip(text: str, n: int = _MAX_DETAIL) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def build_view(low: Lowered, collapse: bool = True) -> GraphView:
    """Drawable data of ``low``'s graph: groups, labelled edges, folded repeated blocks (see the module docstring)."""
    facts = _Facts(low)
    plan = low.plan
    nodes = [n for n in low.graph.nodes if _drawn(n)]
    order = {n: i for i, n in enumerate(nodes)}
    fb_by_node = {f["node"]: f for f in plan.fallbacks}
    prefix, _nblocks = find_blocks(low.gm) if nodes else ("", 0)
    block_re = re.compile(rf"^{re.escape(prefix)}\.(\d+)(?:\.|$)") if prefix else None
    nstages = max(low.stage_of.values(), default=0) + 1 if low.pp > 1 else 1

    def stage(n: Node) -> int:
        return low.stage_of.get(n.name, 0) if nstages > 1 else 0

    def block(path: str) -> int | None:
        m = block_re.match(path) if block_re else None
        return int(m.group(1)) if m else None

    paths = {n: module_path(n) for n in nodes}

    # ---- fold runs of identical consecutive blocks within a stage
    by_block: dict[tuple[int, int], list[Node]] = {}
    for n in nodes:
        b = block(paths[n])
        if b is not None:
            by_block.setdefault((stage(n), b), []).append(n)

    def signature(members: list[Node], b: int) -> tuple:
        base = f"{prefix}.{b}"
        index = {n: i for i, n in enumerate(members)}
        sig = []
        for n in members:
            ins = tuple(index.get(a, -1) for a in n.all_input_nodes if a in order or a.op == "get_attr")
            params = tuple((facts.param(a) or "").removeprefix(base) for a in n.all_input_nodes if facts.param(a))
            sig.append((op_name(n), str(facts.placement(n)), str(facts.local_shape(n)), paths[n][len(base):],
                        ins, params, n.name in fb_by_node))
        return tuple(sig)

    rep_of: dict[Node, Node] = {}  # a node of a folded block → the node it is drawn as
    runs: dict[tuple[int, int], list[int]] = {}  # (stage, first block) → the blocks it stands for
    if collapse:
        keys = sorted(by_block)
        i = 0
        while i < len(keys):
            s, b0 = keys[i]
            sig0 = signature(by_block[keys[i]], b0)
            j = i + 1
            while (j < len(keys) and keys[j][0] == s and keys[j][1] == keys[j - 1][1] + 1
                   and signature(by_block[keys[j]], keys[j][1]) == sig0):
                j += 1
            runs[(s, b0)] = [k[1] for k in keys[i:j]]
            for k in keys[i + 1:j]:
                for a, r in zip(by_block[k], by_block[keys[i]]):
                    rep_of[a] = r
            i = j
    else:
        runs = {k: [k[1]] for k in by_block}
    run_of_block = {(s, b): (s, first) for (s, first), bs in runs.items() for b in bs}

    # ---- groups
    groups: dict[str, VGroup] = {}
    if nstages > 1:
        pipe = plan.pipeline
        for s in range(nstages):
            info = pipe["stages"][s] if s < len(pipe.get("stages", [])) else {}
            blocks = info.get("blocks") or []
            span = f" · {prefix}.{blocks[0]}–{blocks[-1]}" if blocks and prefix else ""
            groups[f"stage{s}"] = VGroup(f"stage{s}", f"stage {s} · pp rank {info.get('pp_rank', s)}{span}",
                                         "stage", None, s)
    depth = len(prefix.split(".")) if prefix else 1

    def group_of(n: Node) -> str | None:
        s = stage(n)
        parent = f"stage{s}" if nstages > 1 else None
        path = paths[n]
        if not path:
            return parent
        b = block(path)
        if b is not None:
            first = run_of_block[(s, b)][1]
            members = runs[(s, first)]
            base = f"{prefix}.{first}"
            gid = f"s{s}:{base}"
            if gid not in groups:
                label = (f"{prefix}.{members[0]} … {prefix}.{members[-1]}  × {len(members)}" if len(members) > 1
                         else base)
                groups[gid] = VGroup(gid, label, "block", parent, s, base, len(members),
                                     [f"{prefix}.{m}" for m in members])
            rest = path[len(f"{prefix}.{b}"):].lstrip(".")
            if not rest:
                return gid
            child = rest.split(".")[0]
            cid = f"{gid}.{child}"
            if cid not in groups:
                groups[cid] = VGroup(cid, child, "module", gid, s, f"{base}.{child}", len(members))
            return cid
        top = ".".join(path.split(".")[:depth])
        gid = f"s{s}:{top}"
        if gid not in groups:
            groups[gid] = VGroup(gid, top, "module", parent, s, top)
        return gid

    # ---- nodes
    vnodes: list[VNode] = []
    for n in nodes:
        if n in rep_of:
            continue
        kind = ("input" if n.op == "placeholder" else "output" if n.op == "output"
                else "collective" if is_collective(n) else "compute")
        gid = group_of(n) if kind != "output" else (f"stage{stage(n)}" if nstages > 1 else None)
        b = block(paths[n])
        rep = len(runs.get(run_of_block.get((stage(n), b), (0, -1)), [])) if b is not None else 1
        vn = VNode(id=n.name, op=short_op(n) if kind in ("compute", "collective") else n.op, target=op_name(n),
                   kind=kind, module=paths[n], group=gid, stage=stage(n), placement=facts.placement(n),
                   local_shape=facts.local_shape(n), dtype=_dtype(n), sharded=facts.sharded(n) and kind == "compute",
                   source=source_line(n) if kind == "compute" else "", repeat=max(rep, 1))
        for a in n.all_input_nodes:
            pname = facts.param(a)
            if pname is not None:
                lay = plan.params[pname]
                vn.params.append({"name": pname, "placement": lay.placement, "local_shape": lay.local_shape,
                                  "role": lay.role})
        leaf = paths[n].split(".")[-1] if paths[n] else ""
        if kind == "collective":
            src = n.args[0] if n.args and isinstance(n.args[0], Node) else None
            numel = math.prod(facts.local_shape(src) or []) if src is not None and _val_shapes(src) else 0
            nbytes = int(numel * (_itemsize(src) if src is not None else 4))
            key = next((a for a in n.args if isinstance(a, str)), "")
            vn.mesh_dim = key.rsplit(".", 1)[-1]
            fn = n.target.__name__
            vn.bytes = nbytes if fn in ("all_reduce", "all_gather") else 0
            vn.backward_bytes = nbytes if fn in ("reduce_grad", "scatter") else 0
            if vn.bytes:
                vn.detail = f"{vn.mesh_dim} · {fmt_bytes(vn.bytes)}"
            elif vn.backward_bytes:
                vn.detail = f"{vn.mesh_dim} · bwd {fmt_bytes(vn.backward_bytes)}"
            else:
                vn.detail = f"{vn.mesh_dim} · local chunk"
        elif kind == "input":
            vn.detail = f"{vn.dtype} input"
        elif kind == "output":
            vn.detail = "model output"
        else:
            bits = [leaf] if leaf and not leaf.isdigit() else []
            bits += [f"{p['name'].split('.')[-1]} {p['placement']}" for p in vn.params]
            vn.detail = " · ".join(bits)
        if n.name in fb_by_node:
            fb = dict(fb_by_node[n.name])
            vn.fallback = fb
            vn.detail = f"fallback · {fb.get('source', '?')}"
        vn.detail = _clip(vn.detail)
        vnodes.append(vn)

    # ---- edges: one per (drawn source, drawn target), folded blocks mapped to their representative
    drawn_ids = {v.id for v in vnodes}
    seen: set[tuple[str, str]] = set()
    vedges: list[VEdge] = []
    for n in nodes:
        dst = rep_of.get(n, n)
        for a in n.all_input_nodes:
            if a not in order:
                continue
            src = rep_of.get(a, a)
            ka, kn = (stage(a), block(paths[a])), (stage(n), block(paths[n]))
            if (ka[1] is not None and kn[1] is not None and ka != kn
                    and run_of_block.get(ka) == run_of_block.get(kn)):
                continue  # between two blocks of one folded run: the "× N" says it
            if src is dst or (src.name, dst.name) in seen or src.name not in drawn_ids or dst.name not in drawn_ids:
                continue
            seen.add((src.name, dst.name))
            kind = "data"
            if stage(src) != stage(dst):
                kind = "input" if src.op == "placeholder" else "pipeline"
            pl, ls = facts.placement(src), facts.local_shape(src)
            vedges.append(VEdge(src.name, dst.name, _value_label(pl, ls), pl, ls, kind))
    by_id = {v.id: v for v in vnodes}
    for e in vedges:
        if e.kind != "pipeline" and not by_id[e.src].out_label:
            by_id[e.src].out_label = e.label

    # groups in the order of their first node, parents first
    first: dict[str, int] = {}
    idx = {v.id: i for i, v in enumerate(vnodes)}
    for v in vnodes:
        g = v.group
        while g is not None:
            first[g] = min(first.get(g, idx[v.id]), idx[v.id])
            g = groups[g].parent
    ordered = sorted((g for g in groups.values() if g.id in first or g.kind == "stage"),
                     key=lambda g: (g.kind != "stage", first.get(g.id, 0)))
    title = f"{low.model_name} on {mesh_text(plan.mesh)}"
    sub = plan.summary()
    return GraphView(title, sub, vnodes, vedges, ordered, nstages, prefix, low)


def mesh_text(mesh: dict[str, int]) -> str:
    """``{'pp': 1, 'dp': 2, 'tp': 2}`` → ``dp=2, tp=2`` (dimensions of degree 1 left out)."""
    parts = [f"{k}={v}" for k, v in mesh.items() if v > 1]
    return ", ".join(parts) or "one device"


# ====================================================================================== layout
NODE_H = 34
ROW_GAP = 28
COL_GAP = 14
PAD = 10
TITLE_H = 20
CHAR_W = 6.7  # 11px monospace
LABEL_CHAR_W = 5.9  # 9.5px monospace
STAGE_GAP = 70


@dataclass
class Box:
    x: float
    y: float
    w: float
    h: float

    @property
    def cx(self) -> float:
        return self.x + self.w / 2


@dataclass
class Layout:
    nodes: dict[str, Box]
    groups: dict[str, Box]
    width: float
    height: float


def _node_width(v: VNode) -> float:
    first = v.op + (f"  × {v.repeat}" if v.kind == "collective" and v.repeat > 1 else "")
    return max(84.0, CHAR_W * max(len(first), len(v.detail)) + 16)


def layout(view: GraphView) -> Layout:
    """Nested layered layout: every group lays its children (nodes and sub-groups) out in rows by
    dependency depth within the group, and is as big as its rows; pipeline stages sit side by side."""
    children: dict[str | None, list[tuple[str, str]]] = {}  # container → [("n"|"g", id)] in graph order
    gparent = {g.id: g.parent for g in view.groups}
    kinds = {g.id: g.kind for g in view.groups}
    pos = {v.id: i for i, v in enumerate(view.nodes)}
    first: dict[str, int] = {}
    for v in view.nodes:
        g = v.group
        while g is not None:
            first[g] = min(first.get(g, pos[v.id]), pos[v.id])
            g = gparent[g]
    for g in view.groups:
        children.setdefault(g.parent, []).append(("g", g.id))
    for v in view.nodes:
        children.setdefault(v.group, []).append(("n", v.id))
        v.w = _node_width(v)
    for k in children:
        children[k].sort(key=lambda item: pos[item[1]] if item[0] == "n" else first.get(item[1], 0))

    def chain(v: VNode) -> list[str | None]:
        out: list[str | None] = []
        g = v.group
        while g is not None:
            out.append(g)
            g = gparent[g]
        return [None, *reversed(out)]

    chains = {v.id: chain(v) for v in view.nodes}

    def unit(nid: str, container: str | None) -> tuple[str, str] | None:
        ch = chains[nid]
        if container not in ch:
            return None
        i = ch.index(container)
        return ("g", ch[i + 1]) if i + 1 < len(ch) else ("n", nid)

    sizes: dict[tuple[str, str], tuple[float, float]] = {}
    rel: dict[tuple[str, str], tuple[float, float]] = {}  # offset of a unit inside its container

    def measure(container: str | None) -> tuple[float, float]:
        items = children.get(container, [])
        for it in items:
            if it[0] == "g":
                sizes[it] = measure(it[1])
            else:  # room for the value label that starts right of the node's centre
                v = view.node(it[1])
                sizes[it] = (max(v.w, v.w / 2 + 4 + LABEL_CHAR_W * len(v.out_label)), NODE_H)
        side_by_side = container is None and view.stages > 1
        rank = {it: i for i, it in enumerate(items)}
        layer: dict[tuple[str, str], int] = {it: 0 for it in items}
        if not side_by_side:
            preds: dict[tuple[str, str], set] = {it: set() for it in items}
            for e in view.edges:
                us, ud = unit(e.src, container), unit(e.dst, container)
                if us is None or ud is None or us == ud or us not in rank or ud not in rank:
                    continue
                if rank[us] < rank[ud]:
                    preds[ud].add(us)
            for it in items:
                layer[it] = max((layer[p] + 1 for p in preds[it]), default=0)
        rows: dict[int, list] = {}
        for it in items:
            rows.setdefault(layer[it], []).append(it)
        gap = STAGE_GAP if side_by_side else COL_GAP
        widths = {r: sum(sizes[it][0] for it in row) + gap * (len(row) - 1) for r, row in rows.items()}
        inner_w = max(widths.values(), default=0.0)
        is_group = container is not None
        top = (TITLE_H + PAD) if is_group else PAD
        y = top
        for r in sorted(rows):
            row = rows[r]
            x = PAD + (inner_w - widths[r]) / 2
            h = max(sizes[it][1] for it in row)
            for it in row:
                rel[it] = (x, y)
                x += sizes[it][0] + gap
            y += h + (ROW_GAP if not side_by_side else 0)
        right = 40 if is_group and kinds[container] == "stage" else 0  # room for arcs leaving the column
        return inner_w + 2 * PAD + right, y + PAD

    total_w, total_h = measure(None)
    nodes: dict[str, Box] = {}
    groups: dict[str, Box] = {}

    def place(container: str | None, ox: float, oy: float) -> None:
        for it in children.get(container, []):
            dx, dy = rel[it]
            w, h = sizes[it]
            if it[0] == "g":
                groups[it[1]] = Box(ox + dx, oy + dy, w, h)
                place(it[1], ox + dx, oy + dy)
            else:
                nodes[it[1]] = Box(ox + dx, oy + dy, view.node(it[1]).w, h)

    place(None, 0.0, 0.0)
    return Layout(nodes, groups, total_w + 140, total_h + 10)


# ====================================================================================== SVG
_STYLE_SVG = """
.g-stage>rect{fill:#fffbeb;stroke:#d97706;stroke-width:1.5}
.g-block>rect{fill:#f8fafc;stroke:#475569;stroke-width:1.2}
.g-module>rect{fill:#ffffff;stroke:#94a3b8;stroke-dasharray:4 3}
.g-title{font:600 12px system-ui,sans-serif;fill:#334155}
.g-stage>.g-title{fill:#92400e;font-size:13px}
.g-block>.g-title{fill:#0f172a}
.node rect{stroke-width:1.3;rx:5;ry:5}
.node text{font:11px ui-monospace,Menlo,Consolas,monospace;fill:#0f172a}
.node .op{font-weight:700}
.node .detail{fill:#334155;font-size:10px}
.k-compute.repl rect{fill:#f1f5f9;stroke:#94a3b8}
.k-compute.shard rect{fill:#dbeafe;stroke:#2563eb}
.k-collective rect{fill:#fed7aa;stroke:#c2410c;stroke-width:2.2}
.k-collective .op{fill:#9a3412}
.k-input rect,.k-output rect{fill:#dcfce7;stroke:#16a34a}
.fallback rect{fill:#fee2e2;stroke:#dc2626;stroke-width:2.4;stroke-dasharray:5 3}
.fallback .op{fill:#b91c1c}
.edge{fill:none;stroke:#64748b;stroke-width:1.1;marker-end:url(#arrow)}
.edge.pipeline{stroke:#d97706;stroke-width:2;stroke-dasharray:7 4;marker-end:url(#arrow-pp)}
.edge.input{stroke:#16a34a;stroke-dasharray:2 3}
.edge.hl{stroke:#dc2626;stroke-width:2.4}
.vlabel{font:9.5px ui-monospace,Menlo,Consolas,monospace;fill:#475569;paint-order:stroke;stroke:#fff;stroke-width:3px}
.vlabel.p{fill:#7c3aed}
.vlabel.s{fill:#1d4ed8}
.pp-label{font:600 10px system-ui,sans-serif;fill:#b45309;paint-order:stroke;stroke:#fff;stroke-width:3px}
"""


def _edge_path(a: Box, b: Box, kind: str) -> str:
    x1, y1 = a.cx, a.y + a.h
    x2, y2 = b.cx, b.y
    if kind in ("pipeline", "input") and (b.x > a.x + a.w or b.x + b.w < a.x):
        # across stage columns: leave from the side facing the target
        if b.x > a.x:
            x1, y1, x2, y2 = a.x + a.w, a.y + a.h / 2, b.x, b.y + b.h / 2
            return f"M{x1:.1f},{y1:.1f} C{x1 + 60:.1f},{y1:.1f} {x2 - 60:.1f},{y2:.1f} {x2:.1f},{y2:.1f}"
        x1, y1, x2, y2 = a.x, a.y + a.h / 2, b.x + b.w, b.y + b.h / 2
        return f"M{x1:.1f},{y1:.1f} C{x1 - 60:.1f},{y1:.1f} {x2 + 60:.1f},{y2:.1f} {x2:.1f},{y2:.1f}"
    dy = y2 - y1
    if dy > NODE_H + 2 * ROW_GAP + 4:  # skips rows: arc out to the right of both ends
        cx = max(a.x + a.w, b.x + b.w) + min(90.0, 18.0 + dy * 0.05)
        return (f"M{x1:.1f},{y1:.1f} C{x1:.1f},{y1 + 24:.1f} {cx:.1f},{y1 + 24:.1f} {cx:.1f},{(y1 + y2) / 2:.1f} "
                f"S{x2:.1f},{y2 - 24:.1f} {x2:.1f},{y2:.1f}")
    if dy < 8:  # upwards or level: loop around
        cx = max(a.x + a.w, b.x + b.w) + 40
        return f"M{x1:.1f},{y1:.1f} C{cx:.1f},{y1 + 40:.1f} {cx:.1f},{y2 - 40:.1f} {x2:.1f},{y2:.1f}"
    k = max(12.0, dy / 2)
    return f"M{x1:.1f},{y1:.1f} C{x1:.1f},{y1 + k:.1f} {x2:.1f},{y2 - k:.1f} {x2:.1f},{y2:.1f}"


def _node_title(v: VNode) -> str:
    lines = [f"{v.id}: {v.target}"]
    if v.module:
        lines.append(f"module {v.module}")
    lines.append(f"placement {v.placement}, local shape {v.local_shape} {v.dtype}".rstrip())
    for p in v.params:
        lines.append(f"param {p['name']}: {p['placement']} local {p['local_shape']} ({p['role']})")
    if v.kind == "collective":
        lines.append(f"{v.mesh_dim}: forward {fmt_bytes(v.bytes)}, backward {fmt_bytes(v.backward_bytes)}"
                     + (f", ×{v.repeat} (folded blocks)" if v.repeat > 1 else ""))
    if v.fallback:
        lines.append(f"FALLBACK: {v.fallback.get('reason', '')} at {v.fallback.get('source', '?')}")
    elif v.source and v.source != "?":
        lines.append(f"source {v.source}")
    return "\n".join(lines)


def render_svg(view: GraphView, lay: Layout | None = None, *, standalone: bool = True) -> str:
    """The graph drawing as SVG: a file of its own (``standalone``) or an element for the HTML page."""
    lay = lay or layout(view)
    W, H = math.ceil(lay.width), math.ceil(lay.height)
    out: list[str] = []
    ns = ' xmlns="http://www.w3.org/2000/svg"' if standalone else ""
    out.append(f'<svg{ns} class="graph" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
               f'font-family="system-ui,sans-serif" role="img" aria-label="{escape(view.title)}">')
    out.append(f"<style>{_STYLE_SVG}</style>")
    out.append('<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
               'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#64748b"/></marker>'
               '<marker id="arrow-pp" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="6" markerHeight="6" '
               'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#d97706"/></marker></defs>')
    out.append(f'<rect width="{W}" height="{H}" fill="#ffffff"/>')
    for g in view.groups:
        b = lay.groups.get(g.id)
        if b is None:
            continue
        tip = escape(f"{g.path or g.label}" + (f": stands for {', '.join(g.members)}" if g.repeat > 1 and g.members
                                                else ""))
        out.append(f'<g class="group g-{g.kind}" data-group="{escape(g.id)}"><title>{tip}</title>'
                   f'<rect x="{b.x:.1f}" y="{b.y:.1f}" width="{b.w:.1f}" height="{b.h:.1f}" rx="8" ry="8"/>'
                   f'<text class="g-title" x="{b.x + 8:.1f}" y="{b.y + 14:.1f}">{escape(g.label)}</text></g>')
    for e in view.edges:
        a, b = lay.nodes[e.src], lay.nodes[e.dst]
        d = _edge_path(a, b, e.kind)
        out.append(f'<path class="edge {e.kind}" data-src="{escape(e.src)}" data-dst="{escape(e.dst)}" d="{d}">'
                   f"<title>{escape(e.src)} → {escape(e.dst)}: {escape(e.label)}</title></path>")
        if e.kind == "pipeline":
            mx, my = (a.x + a.w + b.x) / 2, (a.y + a.h / 2 + b.y + b.h / 2) / 2
            out.append(f'<text class="pp-label" x="{mx:.1f}" y="{my - 4:.1f}" text-anchor="middle">'
                       f"send/recv {escape(e.label)}</text>")
    labelled: set[str] = set()
    for e in view.edges:
        if e.src in labelled or e.kind == "pipeline":
            continue
        labelled.add(e.src)
        a = lay.nodes[e.src]
        first = (e.placement[0] if isinstance(e.placement, list) and e.placement else e.placement) or "R"
        cls = "p" if first == "P" else "s" if str(first).startswith("S") else ""
        out.append(f'<text class="vlabel {cls}" x="{a.cx + 4:.1f}" y="{a.y + a.h + 12:.1f}">{escape(e.label)}</text>')
    for v in view.nodes:
        b = lay.nodes[v.id]
        cls = f"node k-{v.kind}"
        if v.kind == "compute":
            cls += " shard" if v.sharded else " repl"
        if v.fallback:
            cls += " fallback"
        first = v.op + (f"  × {v.repeat}" if v.kind == "collective" and v.repeat > 1 else "")
        out.append(f'<g class="{cls}" data-id="{escape(v.id)}"><title>{escape(_node_title(v))}</title>'
                   f'<rect x="{b.x:.1f}" y="{b.y:.1f}" width="{b.w:.1f}" height="{b.h:.1f}"/>'
                   f'<text class="op" x="{b.x + 8:.1f}" y="{b.y + 14:.1f}">{escape(first)}</text>'
                   f'<text class="detail" x="{b.x + 8:.1f}" y="{b.y + 27:.1f}">{escape(v.detail)}</text></g>')
    out.append("</svg>")
    return "\n".join(out)


# ====================================================================================== DOT
def _dot_str(text: str) -> str:
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def render_dot(view: GraphView) -> str:
    """Graphviz text: one cluster per group (stages, folded blocks, modules), every id quoted."""
    fills = {"input": "#dcfce7", "output": "#dcfce7", "collective": "#fed7aa"}
    lines = ["digraph autoshard {", "  rankdir=TB;", '  graph [fontname="Helvetica", fontsize=11, labeljust=l];',
             '  node [shape=box, style="rounded,filled", fontname="Courier", fontsize=10];',
             '  edge [fontname="Courier", fontsize=8, color="#64748b"];',
             f"  label={_dot_str(view.title + chr(10) + view.subtitle)};"]
    kids: dict[str | None, list[VGroup]] = {}
    for g in view.groups:
        kids.setdefault(g.parent, []).append(g)
    members: dict[str | None, list[VNode]] = {}
    for v in view.nodes:
        members.setdefault(v.group, []).append(v)
    cluster_ids = {g.id: f"cluster_{i}" for i, g in enumerate(view.groups)}

    def node_line(v: VNode, ind: str) -> str:
        fill = "#fee2e2" if v.fallback else fills.get(v.kind, "#dbeafe" if v.sharded else "#f1f5f9")
        extra = ', color="#dc2626", penwidth=2' if v.fallback else ', color="#c2410c", penwidth=2' \
            if v.kind == "collective" else ""
        label = v.op + (f" × {v.repeat}" if v.kind == "collective" and v.repeat > 1 else "") + "\n" + v.detail
        return f'{ind}{_dot_str(v.id)} [label={_dot_str(label)}, fillcolor="{fill}"{extra}];'

    def emit(parent: str | None, ind: str) -> None:
        for g in kids.get(parent, []):
            style = {"stage": 'style="rounded,filled"; fillcolor="#fffbeb"; color="#d97706"',
                     "block": 'style="rounded"; color="#475569"',
                     "module": 'style="dashed"; color="#94a3b8"'}[g.kind]
            lines.append(f"{ind}subgraph {_dot_str(cluster_ids[g.id])} {{")
            lines.append(f"{ind}  label={_dot_str(g.label)}; {style};")
            emit(g.id, ind + "  ")
            lines.append(f"{ind}}}")
        for v in members.get(parent, []):
            lines.append(node_line(v, ind))

    emit(None, "  ")
    for e in view.edges:
        style = ', color="#d97706", style=dashed, penwidth=2' if e.kind == "pipeline" else ""
        lines.append(f"  {_dot_str(e.src)} -> {_dot_str(e.dst)} [label={_dot_str(e.label)}{style}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


# ====================================================================================== schedule and memory
def schedule_data(low: Lowered) -> dict[str, Any] | None:
    """The pipeline schedule (``Schedule.to_dict``) and its simulation; ``None`` without a pipeline.

    Costs: a stage's forward is proportional to its FLOPs (normalised to a mean of 1) and its backward
    costs twice its forward (split backward: B and W once each), the usual ratio for matmul-bound blocks.
    """
    sched = low.sm.schedule
    if sched is None:
        return None
    flops = [float(s.get("flops", 1.0)) for s in low.plan.pipeline.get("stages", [])]
    if len(flops) != sched.num_stages or not any(flops):
        flops = [1.0] * sched.num_stages
    mean = sum(flops) / len(flops)
    f = [x / mean for x in flops]
    if sched.split_backward:
        sim = sched.simulate(f, f, f)
    else:
        sim = sched.simulate(f, [2 * x for x in f], 0.0)
    d = sched.to_dict()
    d["simulation"] = {
        "costs": {"forward": f, "backward": [2 * x for x in f] if not sched.split_backward else f,
                  "weight": f if sched.split_backward else [0.0] * len(f)},
        "makespan": sim.makespan, "bubble_fraction": sim.bubble_fraction, "busy": sim.busy,
        "peak_inflight": sim.peak_inflight,
        "timeline": [[[start, stop, str(a), a.kind, a.stage, a.microbatch] for start, stop, a in row]
                     for row in sim.timeline],
    }
    return d


def memory_by_rank(low: Lowered) -> list[dict[str, Any]]:
    """Per pipeline rank: parameter bytes by role (local shapes × 4 bytes), gradients, and which ranks.

    Every rank of one pipeline rank holds the same amount (tp shards are even, dp replicates), so the
    list has one entry per pp rank, naming the global ranks it covers.
    """
    plan = low.plan
    mesh = plan.mesh
    inner = math.prod(v for k, v in mesh.items() if k != "pp")
    sched = low.sm.schedule
    out = []
    for r in range(low.pp):
        names: list[str] = []
        if sched is None:
            names = list(plan.params)
        else:
            for s, ps in enumerate(low.stage_params):
                if sched.rank_of(s) == r:
                    names += [p for p in ps if p not in names]
        roles: dict[str, float] = {}
        for n in names:
            p = plan.params.get(n)
            if p is None:
                continue
            roles[p.role] = roles.get(p.role, 0.0) + math.prod(p.local_shape) * 4.0
        total = sum(roles.values())
        out.append({"pp_rank": r, "ranks": [r * inner, (r + 1) * inner - 1], "params": roles,
                    "param_bytes": total, "grad_bytes": total, "total_bytes": 2 * total})
    return out


# ====================================================================================== JSON
def render_json(view: GraphView) -> str:
    """Everything drawn, as data: nodes, edges, groups, collectives, fallbacks, schedule, memory, plan."""
    low = view.low
    coll = [{"node": v.id, "op": v.op, "mesh_dim": v.mesh_dim, "bytes": v.bytes, "backward_bytes": v.backward_bytes,
             "module": v.module, "stage": v.stage, "repeat": v.repeat} for v in view.nodes if v.kind == "collective"]
    stage_of = {v.id: v.stage for v in view.nodes}
    fbs = [dict(f, stage=stage_of.get(f["node"], low.stage_of.get(f["node"], 0))) for f in low.plan.fallbacks]
    nodes = []
    for v in view.nodes:
        d = asdict(v)
        d.pop("w", None)
        nodes.append(d)
    doc = {
        "title": view.title,
        "summary": view.subtitle,
        "mesh": low.plan.mesh,
        "fingerprint": low.plan.fingerprint,
        "block_prefix": view.block_prefix,
        "stages": view.stages,
        "nodes": nodes,
        "edges": [asdict(e) for e in view.edges],
        "groups": [asdict(g) for g in view.groups],
        "collectives": coll,
        "fallbacks": fbs,
        "schedule": schedule_data(low),
        "memory": memory_by_rank(low),
        "estimates": low.plan.estimates,
        "notes": low.plan.notes,
    }
    return json.dumps(doc, indent=1, default=str)


# ====================================================================================== HTML
_STYLE_PAGE = """
*{box-sizing:border-box}
body{margin:0;font:13px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:#0f172a;background:#f1f5f9}
header{padding:10px 18px;background:#0f172a;color:#e2e8f0}
header h1{margin:0;font-size:18px;font-weight:650}
header .summary{margin:3px 0 0;font:12px ui-monospace,Menlo,Consolas,monospace;color:#cbd5e1}
header .meta{margin:2px 0 0;font-size:12px;color:#94a3b8}
main{display:flex;gap:12px;padding:12px;align-items:flex-start}
#graph{flex:1 1 auto;min-width:0;background:#fff;border:1px solid #cbd5e1;border-radius:8px;padding:8px}
#graph .scroll{overflow:auto;max-height:calc(100vh - 150px)}
aside{flex:0 0 500px;display:flex;flex-direction:column;gap:12px;max-width:500px;min-width:0}
section.card{background:#fff;border:1px solid #cbd5e1;border-radius:8px;padding:8px 10px}
h2{font-size:14px;margin:0 0 6px}
table{border-collapse:collapse;width:100%;font-size:12px}
th,td{text-align:left;padding:2px 6px;border-bottom:1px solid #e2e8f0;vertical-align:top;overflow-wrap:anywhere}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap;overflow-wrap:normal}
code,.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:11.5px}
.legend{display:flex;flex-wrap:wrap;gap:10px;margin:0 0 6px;font-size:12px}
.legend span{display:inline-flex;align-items:center;gap:4px}
.sw{display:inline-block;width:14px;height:11px;border-radius:3px;border:1.5px solid}
.fb{color:#b91c1c;font-weight:600}
.ok{color:#15803d;font-weight:600}
.note{color:#475569;font-size:12px;margin:4px 0 0}
.tl-F{fill:#93c5fd;stroke:#1d4ed8}.tl-B{fill:#86efac;stroke:#15803d}.tl-W{fill:#d8b4fe;stroke:#7e22ce}
.tl text{font:10px ui-monospace,Menlo,Consolas,monospace;fill:#0f172a}
.bar text{font:11px system-ui,sans-serif;fill:#0f172a}
details summary{cursor:pointer;font-weight:600}
"""

_SCRIPT = """
(function(){
  var svg=document.querySelector('#graph svg');if(!svg)return;
  svg.addEventListener('click',function(ev){
    var g=ev.target.closest('g.node');
    svg.querySelectorAll('path.edge.hl').forEach(function(p){p.classList.remove('hl');});
    if(!g)return;var id=g.getAttribute('data-id');
    svg.querySelectorAll('path.edge').forEach(function(p){
      if(p.getAttribute('data-src')===id||p.getAttribute('data-dst')===id)p.classList.add('hl');});
  });
})();
"""

_ROLE_COLOURS = {"column": "#3b82f6", "row": "#8b5cf6", "vocab": "#0ea5e9", "replicated": "#94a3b8"}


def _timeline_svg(sched: dict[str, Any]) -> str:
    sim = sched["simulation"]
    rows = sim["timeline"]
    width, left, row_h = 470.0, 52.0, 24.0
    span = sim["makespan"] or 1.0
    scale = (width - left - 8) / span
    height = 26 + row_h * len(rows) + 18
    out = [f'<svg class="tl" width="{width:.0f}" height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}">']
    for r, row in enumerate(rows):
        y = 8 + r * row_h
        out.append(f'<text x="4" y="{y + 15:.1f}">rank {r}</text>')
        out.append(f'<rect x="{left}" y="{y:.1f}" width="{span * scale:.1f}" height="{row_h - 4}" fill="#f1f5f9"/>')
        for start, stop, text, kind, stage, mb in row:
            if stop <= start:
                continue
            x, w = left + start * scale, (stop - start) * scale
            out.append(f'<g><title>{escape(text)}: stage {stage}, microbatch {mb}, t={start:.2f}–{stop:.2f}</title>'
                       f'<rect class="tl-{escape(kind)}" x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{row_h - 4}" '
                       f'rx="2"/>' + (f'<text x="{x + w / 2:.1f}" y="{y + 14:.1f}" text-anchor="middle">'
                                      f"{escape(text)}</text>" if w > 16 else "") + "</g>")
    y = 8 + len(rows) * row_h + 12
    out.append(f'<text x="{left}" y="{y:.1f}">0</text><text x="{width - 8:.1f}" y="{y:.1f}" '
               f'text-anchor="end">{span:.2f}</text>')
    out.append("</svg>")
    return "".join(out)


def _memory_svg(mem: list[dict[str, Any]], total_bytes: float) -> str:
    width, left, bar_h = 470.0, 118.0, 20.0
    rows = [(f"pp rank {m['pp_rank']}" if len(mem) > 1 else "every rank", m) for m in mem]
    biggest = max([2 * total_bytes] + [m["total_bytes"] for m in mem]) or 1.0
    scale = (width - left - 80) / biggest
    height = 30 + (len(rows) + 1) * (bar_h + 10)
    out = [f'<svg class="bar" width="{width:.0f}" height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}">']
    y = 4.0
    for label, m in rows:
        out.append(f'<text x="0" y="{y + 14:.1f}">{escape(label)}<title>ranks {m["ranks"][0]}–{m["ranks"][1]}'
                   "</title></text>")
        x = left
        for role in ("column", "row", "vocab", "replicated"):
            b = m["params"].get(role, 0.0)
            if b <= 0:
                continue
            out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{b * scale:.1f}" height="{bar_h}" '
                       f'fill="{_ROLE_COLOURS[role]}"><title>{role} parameters: {fmt_bytes(b)}</title></rect>')
            x += b * scale
        g = m["grad_bytes"]
        out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{g * scale:.1f}" height="{bar_h}" fill="#fcd34d">'
                   f"<title>gradients: {fmt_bytes(g)}</title></rect>")
        x += g * scale
        out.append(f'<text x="{x + 4:.1f}" y="{y + 14:.1f}">{fmt_bytes(m["total_bytes"])}</text>')
        y += bar_h + 10
    out.append(f'<text x="0" y="{y + 14:.1f}">one device</text>')
    out.append(f'<rect x="{left}" y="{y:.1f}" width="{total_bytes * scale:.1f}" height="{bar_h}" fill="#cbd5e1">'
               f"<title>unsharded parameters: {fmt_bytes(total_bytes)}</title></rect>"
               f'<rect x="{left + total_bytes * scale:.1f}" y="{y:.1f}" width="{total_bytes * scale:.1f}" '
               f'height="{bar_h}" fill="#fde68a"><title>unsharded gradients</title></rect>'
               f'<text x="{left + 2 * total_bytes * scale + 4:.1f}" y="{y + 14:.1f}">'
               f"{fmt_bytes(2 * total_bytes)}</text>")
    y += bar_h + 14
    x = 0.0
    for role, colour in [*_ROLE_COLOURS.items(), ("gradients", "#fcd34d")]:
        out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="10" height="10" fill="{colour}"/>'
                   f'<text x="{x + 13:.1f}" y="{y + 9:.1f}">{role}</text>')
        x += 22 + 7 * len(role)
    out.append("</svg>")
    return "".join(out)


def _table(head: list[str], rows: list[list[str]], num: set[int] | None = None) -> str:
    num = num or set()
    th = "".join(f'<th class="{"num" if i in num else ""}">{escape(h)}</th>' for i, h in enumerate(head))
    body = "".join("<tr>" + "".join(f'<td class="{"num" if i in num else ""}">{escape(str(c))}</td>'
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def render_html(view: GraphView) -> str:
    """One self-contained page (inline style, script and SVG; no network references) showing the graph,
    the collectives, the fallbacks, the pipeline timeline (pp > 1) and per-rank memory."""
    low = view.low
    plan = low.plan
    svg = render_svg(view, standalone=False)
    legend = ('<div class="legend">'
              '<span><i class="sw" style="background:#dbeafe;border-color:#2563eb"></i>runs on shards</span>'
              '<span><i class="sw" style="background:#f1f5f9;border-color:#94a3b8"></i>replicated</span>'
              '<span><i class="sw" style="background:#fed7aa;border-color:#c2410c"></i>collective (bytes moved)</span>'
              '<span><i class="sw" style="background:#fee2e2;border-color:#dc2626"></i>fallback</span>'
              '<span><i class="sw" style="background:#dcfce7;border-color:#16a34a"></i>input / output</span>'
              '<span class="mono">edge text: placement on tp (R, S(d), P) and local shape</span>'
              + ('<span><i class="sw" style="background:#fff;border-color:#d97706"></i>send/recv between stages</span>'
                 if view.stages > 1 else "") + "</div>")
    # collectives, grouped by kind and where
    agg: dict[tuple[str, str, str], list[int]] = {}
    for v in view.nodes:
        if v.kind != "collective":
            continue
        k = (v.op, v.mesh_dim, v.module or "(model)")
        row = agg.setdefault(k, [0, 0, 0])
        row[0] += v.repeat
        row[1] += v.bytes * v.repeat
        row[2] += v.backward_bytes * v.repeat
    coll_rows = [[op, dim, where, str(n), fmt_bytes(fb), fmt_bytes(bb)]
                 for (op, dim, where), (n, fb, bb) in agg.items()]
    total_fwd = sum(r[1] for r in agg.values())
    coll_html = (_table(["collective", "dim", "module", "count", "forward", "backward"], coll_rows, {3, 4, 5})
                 + f'<p class="note">{"per microbatch" if view.stages > 1 else "per step"}: {fmt_bytes(total_fwd)} '
                   f"forward (plan estimate {fmt_bytes(plan.estimates.get('tp_forward_comm_bytes', 0))}); "
                   "all_reduce sums partial results, reduce_grad all-reduces gradients in backward.</p>"
                 if coll_rows else '<p class="note">none: nothing is split over tp</p>')
    if plan.fallbacks:
        fb_html = _table(["op", "node", "module", "reason", "source"],
                         [[f["op"], f["node"], f.get("module", ""), f["reason"], f.get("source", "?")]
                          for f in plan.fallbacks])
        fb_head = f'<h2 class="fb">Fallbacks ({len(plan.fallbacks)}): ops run replicated, inputs gathered</h2>'
    else:
        fb_html, fb_head = '<p class="ok">none: every op has a sharding rule for its inputs</p>', "<h2>Fallbacks</h2>"
    sched = schedule_data(low)
    if sched is not None:
        sim = sched["simulation"]
        costs = "B = W = forward" if sched["split_backward"] else "backward = 2 × forward"
        sched_html = (f'<section class="card" id="schedule"><h2>Pipeline schedule: {escape(sched["name"])}</h2>'
                      f'<p class="note">pp={sched["pp"]}, {sched["virtual_stages"]} stage(s) per rank, '
                      f'{sched["microbatches"]} microbatches; bubble {sim["bubble_fraction"]:.1%}, makespan '
                      f'{sim["makespan"]:.2f} (forward ∝ stage FLOPs, {costs}); peak in-flight '
                      f'microbatches per rank {sim["peak_inflight"]}</p>{_timeline_svg(sched)}'
                      '<p class="note"><span class="sw tl-F" style="background:#93c5fd;border-color:#1d4ed8"></span>'
                      ' F forward <span class="sw" style="background:#86efac;border-color:#15803d"></span> B backward '
                      '<span class="sw" style="background:#d8b4fe;border-color:#7e22ce"></span> W weight gradients'
                      "</p></section>")
    else:
        sched_html = ""
    mem = memory_by_rank(low)
    total = sum(math.prod(p.shape) * 4.0 for p in plan.params.values())
    est_rows = [[k, fmt_bytes(v) if "bytes" in k else f"{v:,.0f}"] for k, v in plan.estimates.items()]
    mem_html = (f'<section class="card" id="memory"><h2>Memory per rank (fp32 parameters and gradients)</h2>'
                f"{_memory_svg(mem, total)}{_table(['plan estimate (rank 0)', 'value'], est_rows, {1})}</section>")
    params_html = _table(["parameter", "shape", "placement", "local", "role"],
                         [[n + (f" (= {', '.join(p.aliases)})" if p.aliases else ""), str(p.shape), p.placement,
                           str(p.local_shape), p.role + (f" ×{p.blocks} blocks" if p.blocks > 1 else "")]
                          for n, p in plan.params.items()])
    notes = "".join(f"<li>{escape(n)}</li>" for n in plan.notes)
    folded = [g for g in view.groups if g.repeat > 1 and g.kind == "block"]
    fold_note = ("; repeated blocks folded: " + ", ".join(f"{g.label}" for g in folded)) if folded else ""
    meta = (f"rank 0's view on a virtual mesh; inputs {low.inputs or '-'}"
            + (f"; {low.microbatch_note}" if low.microbatch_note else "") + fold_note)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>autoshard viz · {escape(view.title)}</title><style>{_STYLE_PAGE}</style></head>
<body>
<header><h1>autoshard viz · {escape(view.title)}</h1><p class="summary">{escape(view.subtitle)}</p>
<p class="meta">{escape(meta)}</p></header>
<main>
<section id="graph"><h2>Rewritten graph{' by pipeline stage' if view.stages > 1 else ''}</h2>{legend}
<div class="scroll">{svg}</div></section>
<aside>
<section class="card" id="collectives"><h2>Collectives</h2>{coll_html}</section>
<section class="card" id="fallbacks">{fb_head}{fb_html}</section>
{sched_html}
{_attention_html(plan.attention)}
{mem_html}
<section class="card" id="params"><details><summary>Parameters ({len(plan.params)})</summary>{params_html}</details>
{f'<details><summary>Notes ({len(plan.notes)})</summary><ul>{notes}</ul></details>' if notes else ''}</section>
</aside>
</main>
<script>{_SCRIPT}</script>
</body></html>
"""


def _attention_html(att: dict[str, Any]) -> str:
    """The block-sparse attention card: the layout as a grid of blocks (query blocks down, key blocks across)."""
    if not att:
        return ""
    grid = att.get("grid") or []
    cell = 8 if len(grid) <= 32 else 4
    rects = "".join(f'<rect x="{j * cell}" y="{i * cell}" width="{cell - 1}" height="{cell - 1}" fill="#2563eb"/>'
                    for i, row in enumerate(grid) for j, c in enumerate(row) if c == "#")
    n = len(grid)
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{n * cell}" height="{n * cell}" role="img" '
           f'aria-label="block layout"><rect width="{n * cell}" height="{n * cell}" fill="#f1f5f9"/>{rects}</svg>'
           if n else "")
    rows = [[r["node"], r.get("module") or "-", "causal" if r["causal"] else "bidirectional", str(r["blocks"]),
             f"{r['density']:.3f}"] for r in att.get("replaced", [])]
    rows += [[r["node"], r.get("module") or "-", "left dense: " + r["reason"], "-", "-"] for r in att.get("rejected", [])]
    return (f'<section class="card" id="attention"><h2>Block-sparse attention</h2>'
            f'<p class="note mono">{escape(att.get("spec", ""))}</p>{svg}'
            f'{_table(["node", "module", "kind", "blocks", "density"], rows, {3, 4})}</section>')


def render(view: GraphView, fmt: str) -> str:
    """``view`` in one of :data:`FORMATS`."""
    if fmt == "html":
        return render_html(view)
    if fmt == "svg":
        return render_svg(view)
    if fmt == "dot":
        return render_dot(view)
    if fmt == "json":
        return render_json(view)
    raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
