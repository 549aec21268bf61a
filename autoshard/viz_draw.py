"""The graph drawn: our own nested layered layout, as SVG (for the page or a file) and as Graphviz text.

Groups nest (pipeline stages, folded blocks, modules); each group lays its children out in rows by
dependency depth and is as big as its rows, and pipeline stages sit side by side. Nothing outside the
standard library is needed. Every piece of text from the model is escaped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

from .viz_graph import fmt_bytes
from .viz_view import GraphView, VGroup, VNode

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
    badge = BADGE_W if v.kind == "input" else 0.0
    return max(84.0, CHAR_W * max(len(first), len(v.detail)) + 16 + badge)


#: one colour per mesh dimension, used by the legend, the badges and the charts alike
MESH_COLOURS = {"dp": "#0d9488", "tp": "#2563eb", "pp": "#d97706", "ep": "#9333ea", "cp": "#db2777"}
BADGE_W = 52.0


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
.k-folded rect{fill:#f8fafc;stroke:#64748b;stroke-width:1.4;stroke-dasharray:6 2}
.k-folded .op{fill:#334155}
.badge rect{stroke:none}
.badge text{font:600 9px system-ui,sans-serif;fill:#fff}
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


def _node_title(v: VNode, dp: int = 1) -> str:
    if v.kind == "folded":
        return (f"{v.op}: ops that read only the inputs (no parameter), replicated on every rank\n"
                + (f"modules {v.module}\n" if v.module else "") + "stands for " + ", ".join(v.members))
    if v.kind == "input":
        line = f"input {v.id}: {v.dtype} local shape {v.local_shape}"
        if dp > 1:
            line += f"\nsplit over dp={dp} along dim 0: each data-parallel rank gets its own slice of the batch"
        return line
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
    dp = int(view.low.plan.mesh.get("dp", 1))
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
        badge = ""
        if v.kind == "input" and dp > 1:  # the batch dimension is what data parallelism splits
            bx = b.x + b.w - BADGE_W + 4
            badge = (f'<g class="badge"><rect x="{bx:.1f}" y="{b.y + 4:.1f}" width="{BADGE_W - 8:.0f}" height="13" '
                     f'rx="6" style="fill:{MESH_COLOURS["dp"]}"/><text x="{bx + 5:.1f}" y="{b.y + 14:.1f}">dp S(0)</text></g>')
        out.append(f'<g class="{cls}" data-id="{escape(v.id)}"><title>{escape(_node_title(v, dp))}</title>'
                   f'<rect x="{b.x:.1f}" y="{b.y:.1f}" width="{b.w:.1f}" height="{b.h:.1f}"/>'
                   f'<text class="op" x="{b.x + 8:.1f}" y="{b.y + 14:.1f}">{escape(first)}</text>'
                   f'<text class="detail" x="{b.x + 8:.1f}" y="{b.y + 27:.1f}">{escape(v.detail)}</text>{badge}</g>')
    out.append("</svg>")
    return "\n".join(out)


# ====================================================================================== DOT
def _dot_str(text: str) -> str:
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def render_dot(view: GraphView) -> str:
    """Graphviz text: one cluster per group (stages, folded blocks, modules), every id quoted."""
    fills = {"input": "#dcfce7", "output": "#dcfce7", "collective": "#fed7aa", "folded": "#f8fafc"}
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


