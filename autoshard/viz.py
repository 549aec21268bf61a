"""Pictures of a sharded program: the rewritten graph, one step in time, its pipeline schedule and memory.

``autoshard viz`` and ``autoshard check`` plan a model on a *virtual* mesh (no processes) and look at
what rank 0 would run. This module is the entry point; the work is split by stage of the picture:

* :mod:`autoshard.viz_graph`: :func:`lower` builds the :class:`~autoshard.api.ShardedModule` and the
  whole rewritten graph with the pipeline stage of every node, and the node facts (placements, local
  shapes) that :func:`op_coverage` (``autoshard check``) counts;
* :mod:`autoshard.viz_view`: :func:`build_view` turns that graph into drawable data: groups by stage
  and module, labelled edges, collectives with their bytes, fallbacks with their reason, inputs named
  by their arguments, repeated blocks folded into one group marked ``× N`` and the mask and position
  ops folded into one box;
* :mod:`autoshard.viz_draw`: the layout, :func:`render_svg` and :func:`render_dot`;
* :mod:`autoshard.viz_step`: the pipeline schedule, per-rank memory, and one step of rank 0 simulated
  on a compute and a communication stream with its memory over time (:func:`step_timeline`);
* :mod:`autoshard.viz_charts` and :mod:`autoshard.viz_page`: the charts and the one self-contained
  HTML page (:func:`render_html`: inline style, script and SVG, no network references).

Every piece of text that comes from the model (module names, op names, source lines, reasons) is
escaped before it is written into SVG or HTML.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from .viz_draw import MESH_COLOURS, Box, Layout, layout, render_dot, render_svg
from .viz_graph import (
    Lowered,
    collective_counts,
    fmt_bytes,
    is_collective,
    lower,
    op_coverage,
    op_name,
    short_op,
)
from .viz_page import render_html
from .viz_step import memory_by_rank, memory_timeline, schedule_data, step_timeline
from .viz_view import GraphView, VEdge, VGroup, VNode, build_view, mesh_text

__all__ = [
    "FORMATS", "MESH_COLOURS", "Box", "GraphView", "Layout", "Lowered", "VEdge", "VGroup", "VNode", "build_view",
    "collective_counts", "fmt_bytes", "is_collective", "layout", "lower", "memory_by_rank", "memory_timeline",
    "mesh_text", "op_coverage", "op_name", "render", "render_dot", "render_html", "render_json", "render_svg",
    "schedule_data", "short_op", "step_timeline",
]

FORMATS: tuple[str, ...] = ("html", "svg", "dot", "json")


def render_json(view: GraphView) -> str:
    """Everything drawn, as data: nodes, edges, groups, collectives, fallbacks, schedule, memory, the
    simulated step (``step``: its events and memory over time), and the plan's estimates and notes."""
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
        "step": step_timeline(low),
        "estimates": low.plan.estimates,
        "notes": low.plan.notes,
    }
    return json.dumps(doc, indent=1, default=str)


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
