"""The charts of the viz page, as inline SVG: the pipeline schedule, memory per rank, and one step of
rank 0 over time (its compute and communication streams, and its memory term by term).

The step charts share one time axis, so a bar of the timeline lies above the memory it causes. Every
text from the model is escaped.
"""

from __future__ import annotations

from html import escape
from typing import Any

from .viz_draw import MESH_COLOURS
from .viz_graph import fmt_bytes

ROLE_COLOURS = {"column": "#3b82f6", "row": "#8b5cf6", "vocab": "#0ea5e9", "replicated": "#94a3b8"}


def schedule_svg(sched: dict[str, Any]) -> str:
    """The pipeline schedule's simulation: one row per pp rank, its F, B and W boxes in time."""
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


def memory_svg(mem: list[dict[str, Any]], total_bytes: float) -> str:
    """Parameter and gradient bytes per pp rank by role, against one device holding the whole model."""
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
                       f'fill="{ROLE_COLOURS[role]}"><title>{role} parameters: {fmt_bytes(b)}</title></rect>')
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
    for role, colour in [*ROLE_COLOURS.items(), ("gradients", "#fcd34d")]:
        out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="10" height="10" fill="{colour}"/>'
                   f'<text x="{x + 13:.1f}" y="{y + 9:.1f}">{role}</text>')
        x += 22 + 7 * len(role)
    out.append("</svg>")
    return "".join(out)


# ====================================================================================== one step
_PHASE_COLOURS = {"forward": "#93c5fd", "backward": "#86efac", "optimizer": "#cbd5e1"}
_TERM_COLOURS = {"steady": "#cbd5e1", "grads": "#fcd34d", "reduce_buffers": "#fb923c", "activations": "#60a5fa"}
_STEP_W, _STEP_LEFT = 900.0, 96.0


def fmt_seconds(s: float) -> str:
    """``0.00042`` → ``420 µs``; ``0.0123`` → ``12.3 ms``."""
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.3g} ms"
    return f"{s:.3g} s"


def _segments(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Compute events merged into one bar per run of the same phase and block (``model.layers.0`` forward)."""
    out: list[dict[str, Any]] = []
    for e in events:
        if e["stream"] != "compute":
            continue
        last = out[-1] if out else None
        if last and last["phase"] == e["phase"] and last["segment"] == e["segment"] and e["start"] - last["stop"] < 1e-12:
            last["stop"] = e["stop"]
            last["ops"] += 1
        else:
            out.append(dict(e, ops=1))
    return out


def _axis(span: float, x0: float, width: float, y: float) -> str:
    """Tick marks and times under a chart whose x axis runs from 0 to ``span`` seconds."""
    out = [f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + width:.1f}" y2="{y:.1f}" stroke="#94a3b8"/>']
    for i in range(5):
        t = span * i / 4
        x = x0 + width * i / 4
        anchor = "start" if i == 0 else "end" if i == 4 else "middle"
        out.append(f'<line x1="{x:.1f}" y1="{y:.1f}" x2="{x:.1f}" y2="{y + 4:.1f}" stroke="#94a3b8"/>'
                   f'<text x="{x:.1f}" y="{y + 15:.1f}" text-anchor="{anchor}">{fmt_seconds(t)}</text>')
    return "".join(out)


def step_svg(step: dict[str, Any]) -> str:
    """Rank 0's step on three rows: compute (forward, backward, optimizer by block), the tensor-parallel
    collectives (synchronous: compute waits) and the data-parallel buckets (overlapping the backward)."""
    span = step["makespan"] or 1.0
    width = _STEP_W - _STEP_LEFT - 10
    scale = width / span
    rows = [("compute", lambda e: e["stream"] == "compute"), ("tp comm", lambda e: e["kind"] == "tp"),
            ("dp comm", lambda e: e["kind"] == "dp")]
    row_h, top = 26.0, 6.0
    height = top + row_h * len(rows) + 26
    out = [f'<svg class="chart step" width="{_STEP_W:.0f}" height="{height:.0f}" '
           f'viewBox="0 0 {_STEP_W:.0f} {height:.0f}" role="img" aria-label="one training step of rank 0">']
    comp = _segments(step["events"])
    for r, (name, keep) in enumerate(rows):
        y = top + r * row_h
        out.append(f'<text class="row-label" x="4" y="{y + 15:.1f}">{name}</text>'
                   f'<rect x="{_STEP_LEFT}" y="{y:.1f}" width="{width:.1f}" height="{row_h - 6}" fill="#f8fafc"/>')
        items = comp if name == "compute" else [e for e in step["events"] if keep(e)]
        for e in items:
            x, w = _STEP_LEFT + e["start"] * scale, max((e["stop"] - e["start"]) * scale, 0.8)
            if name == "compute":
                fill, label = _PHASE_COLOURS.get(e["phase"], "#cbd5e1"), e["segment"].removeprefix("model.")
                tip = f'{e["phase"]} {e["segment"]}: {e["ops"]} ops, {fmt_seconds(e["stop"] - e["start"])}'
            else:
                fill = MESH_COLOURS["tp"] if e["kind"] == "tp" else MESH_COLOURS["dp"]
                label, tip = e["label"].split(" (")[0], f'{e["label"]}: {fmt_seconds(e["stop"] - e["start"])}'
            text = (f'<text class="in-bar" x="{x + 3:.1f}" y="{y + 13:.1f}">{escape(label)}</text>'
                    if w > 7 * len(label) + 6 else "")
            out.append(f'<g class="ev ev-{escape(e["kind"])}"><title>{escape(tip)}</title>'
                       f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{row_h - 6}" fill="{fill}" '
                       f'stroke="#0f172a" stroke-opacity=".25" stroke-width=".5"/>{text}</g>')
    out.append(_axis(span, _STEP_LEFT, width, top + row_h * len(rows)))
    out.append("</svg>")
    return "".join(out)


def memory_time_svg(step: dict[str, Any]) -> str:
    """Rank 0's memory over the same step, stacked term by term, with the plan's predicted peak dashed."""
    mem = step["memory"]
    pts = mem["points"]
    span = step["makespan"] or 1.0
    width = _STEP_W - _STEP_LEFT - 10
    height, top, plot_h = 190.0, 8.0, 140.0
    steady = sum(mem["steady"].values())
    ymax = max(mem["peak_bytes"], mem["predicted_peak_bytes"], 1.0) * 1.08
    sx, sy = width / span, plot_h / ymax

    def y_of(b: float) -> float:
        return top + plot_h - b * sy

    out = [f'<svg class="chart memtime" width="{_STEP_W:.0f}" height="{height:.0f}" '
           f'viewBox="0 0 {_STEP_W:.0f} {height:.0f}" role="img" aria-label="memory of rank 0 over one step">']
    stack = ["steady", "grads", "reduce_buffers", "activations"]
    lower = [0.0] * len(pts)
    for term in stack:
        vals = [steady if term == "steady" else p[term] for p in pts]
        if not any(vals):
            continue
        upper = [lo + v for lo, v in zip(lower, vals)]
        xs = [_STEP_LEFT + p["t"] * sx for p in pts]
        d = "M" + " L".join(f"{x:.1f},{y_of(u):.1f}" for x, u in zip(xs, upper))
        d += " L" + " L".join(f"{x:.1f},{y_of(lo):.1f}" for x, lo in reversed(list(zip(xs, lower)))) + " Z"
        what = {"steady": "parameters, optimizer states, buffers", "grads": "gradients",
                "reduce_buffers": "gradient buckets being reduced", "activations": "activations kept for backward"}
        out.append(f'<path class="term term-{term}" d="{d}" fill="{_TERM_COLOURS[term]}" stroke="none">'
                   f"<title>{what[term]}: up to {fmt_bytes(max(vals))}</title></path>")
        lower = upper
    pred = mem["predicted_peak_bytes"]
    out.append(f'<line class="predicted" x1="{_STEP_LEFT}" x2="{_STEP_LEFT + width:.1f}" y1="{y_of(pred):.1f}" '
               f'y2="{y_of(pred):.1f}" stroke="#dc2626" stroke-dasharray="5 3"/>'
               f'<text x="{_STEP_LEFT + width:.1f}" y="{y_of(pred) - 3:.1f}" text-anchor="end" fill="#b91c1c">'
               f"plan's predicted peak {fmt_bytes(pred)}</text>")
    for frac in (0.0, 0.5, 1.0):
        b = ymax / 1.08 * frac
        out.append(f'<text x="{_STEP_LEFT - 6}" y="{y_of(b) + 4:.1f}" text-anchor="end">{fmt_bytes(b)}</text>')
    out.append(_axis(span, _STEP_LEFT, width, top + plot_h))
    y = top + plot_h + 26
    x = _STEP_LEFT
    for term, name in (("steady", "parameters + optimizer + buffers"), ("grads", "gradients"),
                       ("reduce_buffers", "reduce buffers"), ("activations", "activations")):
        out.append(f'<rect x="{x:.1f}" y="{y - 9:.1f}" width="10" height="10" fill="{_TERM_COLOURS[term]}"/>'
                   f'<text x="{x + 14:.1f}" y="{y:.1f}">{name}</text>')
        x += 24 + 6.2 * len(name)
    out.append("</svg>")
    return "".join(out)
