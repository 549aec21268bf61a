"""The drawable view of a rewritten graph: nodes, labelled edges and nested groups, before any layout.

:func:`build_view` groups nodes by pipeline stage and module, labels every edge with the placement and
local shape of the value it carries, gives collectives the bytes they move and fallbacks their reason
and source line, and folds what would crowd the first screen: repeated blocks (``layers.0``,
``layers.1`` …) whose op sequences are identical become one group marked ``× N``, and the ops that
build attention masks and position ids (they read only the inputs, never a parameter) become one box
per stage, ``attention mask & positions (N ops)``.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from torch.fx import Node

from autoshard.passes.pipeline_split import find_blocks
from autoshard.passes.tensor_parallel import module_path, source_line

from .viz_graph import (
    Facts,
    Lowered,
    drawn,
    dtype_of,
    fmt_bytes,
    is_collective,
    itemsize,
    op_name,
    short_op,
    val_shapes,
    value_label,
)


# ====================================================================================== the view
@dataclass
class VNode:
    """One drawn node. ``repeat`` > 1 when it stands for the same node in ``repeat`` folded blocks."""

    id: str
    op: str
    target: str
    kind: str  # input | compute | collective | output | folded (ops that read only the inputs, one box)
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
    members: list[str] = field(default_factory=list)  # a folded box: the graph nodes it stands for
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
    facts = Facts(low)
    plan = low.plan
    nodes = [n for n in low.graph.nodes if drawn(n)]
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

    # ---- ops that read only the inputs (masks, position ids, rotary tables) outside the blocks: one box each
    prep: dict[Node, int] = {}  # node → its component
    components: list[list[Node]] = []
    if collapse:
        prep, components = _input_only_components(low, nodes, facts, stage, lambda n: block(paths[n]) is not None,
                                                  set(fb_by_node))

    # ---- groups
    groups: dict[str, VGroup] = {}
    if nstages > 1:
        pipe = plan.pipeline
        for s in range(nstages):
            info = pipe["stages"][s] if s < len(pipe.get("stages", [])) else {}
            blocks = info.get("blocks") or []
            span = f" · {_block_span(prefix, blocks)}" if blocks and prefix else ""
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
    drawn_as: dict[Node, str] = {n: rep_of.get(n, n).name for n in nodes}
    for n, c in prep.items():
        drawn_as[n] = f"fold{c}"
    for n in nodes:
        if n in prep:
            c = prep[n]
            if components[c][0] is n:
                vnodes.append(_folded_box(f"fold{c}", components[c], stage(n),
                                          f"stage{stage(n)}" if nstages > 1 else None))
            continue
        if n in rep_of:
            continue
        kind = ("input" if n.op == "placeholder" else "output" if n.op == "output"
                else "collective" if is_collective(n) else "compute")
        gid = group_of(n) if kind != "output" else (f"stage{stage(n)}" if nstages > 1 else None)
        b = block(paths[n])
        rep = len(runs.get(run_of_block.get((stage(n), b), (0, -1)), [])) if b is not None else 1
        vn = VNode(id=n.name, op=short_op(n) if kind in ("compute", "collective") else n.name, target=op_name(n),
                   kind=kind, module=paths[n], group=gid, stage=stage(n), placement=facts.placement(n),
                   local_shape=facts.local_shape(n), dtype=dtype_of(n), sharded=facts.sharded(n) and kind == "compute",
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
            numel = math.prod(facts.local_shape(src) or []) if src is not None and val_shapes(src) else 0
            nbytes = int(numel * (itemsize(src) if src is not None else 4))
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
        elif kind == "input":  # named by the model's argument (input_ids, labels, ...)
            shape = vn.local_shape if isinstance(vn.local_shape, list) else []
            vn.detail = f"{vn.dtype} [{','.join(str(d) for d in shape)}]" if shape else (vn.dtype or "input")
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
        dst = drawn_as[n]
        for a in n.all_input_nodes:
            if a not in order:
                continue
            src = drawn_as[a]
            ka, kn = (stage(a), block(paths[a])), (stage(n), block(paths[n]))
            if (ka[1] is not None and kn[1] is not None and ka != kn
                    and run_of_block.get(ka) == run_of_block.get(kn)):
                continue  # between two blocks of one folded run: the "× N" says it
            if src == dst or (src, dst) in seen or src not in drawn_ids or dst not in drawn_ids:
                continue
            seen.add((src, dst))
            kind = "data"
            if stage(a) != stage(n):
                kind = "input" if a.op == "placeholder" else "pipeline"
            pl, ls = facts.placement(a), facts.local_shape(a)
            vedges.append(VEdge(src, dst, value_label(pl, ls), pl, ls, kind))
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




#: ops whose presence names a folded box "attention mask & positions": index ranges, running counts,
#: comparisons and masks, and the sines and cosines of rotary tables
_MASK_OPS = frozenset({"arange", "cumsum", "eq", "ne", "lt", "le", "gt", "ge", "__and__", "__or__", "bitwise_and",
                       "bitwise_or", "logical_and", "logical_or", "logical_not", "tril", "triu", "where", "full",
                       "new_ones", "ones", "zeros", "sin", "cos", "masked_fill"})


def _input_only_components(low: Lowered, nodes: list[Node], facts: Facts, stage, in_block, fallbacks: set[str],
                           ) -> tuple[dict[Node, int], list[list[Node]]]:
    """The ops outside repeated blocks that depend on no parameter (only on inputs, their shapes and
    buffers such as rotary frequencies), split into connected pieces of at least two ops per stage.

    These are a Hugging Face model's attention-mask and position-id construction (``arange``,
    ``cumsum``, ``expand``, comparisons, the rotary ``cos``/``sin`` tables) and the shift of the labels
    for its loss: dozens of small replicated ops that tell nothing about the sharding, so they are
    drawn as one box each. Collectives, fallbacks and ops inside blocks are never folded.
    """
    depends: dict[Node, bool] = {}
    for n in low.graph.nodes:
        if n.op == "get_attr":
            depends[n] = facts.param(n) is not None
        elif n.op == "placeholder":
            depends[n] = False
        else:
            depends[n] = any(depends.get(a, False) for a in n.all_input_nodes)
    cand = [n for n in nodes if n.op == "call_function" and not depends[n] and not is_collective(n)
            and not in_block(n) and n.name not in fallbacks]
    cset = set(cand)
    parent: dict[Node, Node] = {n: n for n in cand}

    def find(n: Node) -> Node:
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for n in cand:
        for a in n.all_input_nodes:
            if a in cset and stage(a) == stage(n):
                parent[find(a)] = find(n)
    pieces: dict[Node, list[Node]] = {}
    for n in cand:  # in graph order, so each piece's first node comes first
        pieces.setdefault(find(n), []).append(n)
    # the mask-like pieces of one stage are one box (a model builds several masks and tables side by side)
    order = {n: i for i, n in enumerate(nodes)}
    merged: dict[tuple[int, str], list[Node]] = {}
    for piece in pieces.values():
        key = (stage(piece[0]), "mask" if _mask_like(piece) else f"other{order[piece[0]]}")
        merged.setdefault(key, []).extend(piece)
    comps = [sorted(p, key=order.__getitem__) for p in merged.values() if len(p) >= 2]
    comps.sort(key=lambda p: order[p[0]])
    return {n: i for i, p in enumerate(comps) for n in p}, comps


def _mask_like(members: list[Node]) -> bool:
    """Whether ops build attention masks or positions: index ranges, comparisons, rotary tables."""
    return any(short_op(n) in _MASK_OPS or "rotary" in module_path(n) for n in members)


def _folded_box(fid: str, members: list[Node], stage: int, group: str | None) -> VNode:
    """One box standing for ``members``: named for what they build, with their count and commonest ops."""
    ops = [short_op(n) for n in members]
    paths = {module_path(n) for n in members}
    name = "attention mask & positions" if _mask_like(members) else "input preparation"
    common = [o for o, _ in sorted(Counter(ops).items(), key=lambda kv: (-kv[1], ops.index(kv[0])))][:3]
    return VNode(id=fid, op=f"{name} ({len(members)} ops)", target="folded", kind="folded",
                 module=", ".join(sorted(p for p in paths if p)) or "", group=group, stage=stage, placement="R",
                 local_shape=None, dtype="", sharded=False, detail=_clip("replicated · " + ", ".join(common)),
                 members=[n.name for n in members])


def _block_span(prefix: str, blocks: list[int]) -> str:
    """The blocks of a pipeline stage: ``model.layers.0`` for one, ``model.layers.0–7`` for a range."""
    if len(blocks) == 1 or blocks[0] == blocks[-1]:
        return f"{prefix}.{blocks[0]}"
    return f"{prefix}.{blocks[0]}–{blocks[-1]}"
