"""The viz HTML page: one self-contained file (inline style, script and SVG; no network references)
that opens offline and can be attached to a bug report.

The first screen is the model: a legend of the mesh (what each of dp, tp, pp, ep, cp splits, in its
own colour), then the rewritten graph at full width, its pipeline stages side by side in a container
that scrolls both ways, with a button per stage. The cards below hold one step of rank 0 in time
(compute and communication, and their overlap) with its memory over the same axis, the pipeline
schedule, the collectives, the fallbacks and the parameters. Table cells wrap only between words or
after the dots and underscores of long names, never inside a word.
"""

from __future__ import annotations

import math
import re
from html import escape
from typing import Any

from .viz_charts import fmt_seconds, memory_svg, memory_time_svg, schedule_svg, step_svg
from .viz_draw import MESH_COLOURS, render_svg
from .viz_graph import fmt_bytes
from .viz_step import memory_by_rank, schedule_data, step_timeline
from .viz_view import GraphView

_STYLE_PAGE = """
*{box-sizing:border-box}
body{margin:0;font:13px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:#0f172a;background:#f1f5f9}
header{padding:10px 18px;background:#0f172a;color:#e2e8f0}
header h1{margin:0;font-size:18px;font-weight:650}
header .summary{margin:3px 0 0;font:12px ui-monospace,Menlo,Consolas,monospace;color:#cbd5e1;overflow-wrap:normal}
header .meta{margin:2px 0 0;font-size:12px;color:#94a3b8}
main{padding:12px;display:flex;flex-direction:column;gap:12px}
#mesh{display:grid;grid-template-columns:repeat(auto-fill,minmax(400px,1fr));gap:4px 18px;background:#fff;
  border:1px solid #cbd5e1;border-radius:8px;padding:8px 10px}
#mesh h2{margin:0;grid-column:1/-1}
#mesh .dim{display:flex;gap:6px;align-items:baseline}
#mesh .dim.off{color:#64748b}
.badge{display:inline-block;color:#fff;font-weight:700;font-size:12px;border-radius:9px;padding:0 8px;white-space:nowrap}
#graph{min-width:0;background:#fff;border:1px solid #cbd5e1;border-radius:8px;padding:8px}
#graph .scroll{overflow:auto;max-height:calc(100vh - 60px);min-height:320px;border-top:1px solid #e2e8f0}
#stages{display:flex;gap:6px;flex-wrap:wrap;margin:0 0 6px}
#stages button,#fit{font:12px system-ui,sans-serif;border:1px solid #d97706;background:#fffbeb;color:#92400e;border-radius:6px;
  padding:1px 8px;cursor:pointer}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(540px,1fr));gap:12px;align-items:start}
section.card{background:#fff;border:1px solid #cbd5e1;border-radius:8px;padding:8px 10px;min-width:0}
section.card.wide{grid-column:1/-1}
.chart-scroll{overflow-x:auto}
h2{font-size:14px;margin:0 0 6px}
.tbl{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-size:12px}
th,td{text-align:left;padding:2px 6px;border-bottom:1px solid #e2e8f0;vertical-align:top;overflow-wrap:normal;
  word-break:keep-all;hyphens:none}
th{white-space:nowrap}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
code,.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:11.5px}
.legend{display:flex;flex-wrap:wrap;gap:10px;margin:0 0 6px;font-size:12px}
.legend span{display:inline-flex;align-items:center;gap:4px}
.sw{display:inline-block;width:14px;height:11px;border-radius:3px;border:1.5px solid}
.fb{color:#b91c1c;font-weight:600}
.ok{color:#15803d;font-weight:600}
.note{color:#475569;font-size:12px;margin:4px 0 0}
.tl-F{fill:#93c5fd;stroke:#1d4ed8}.tl-B{fill:#86efac;stroke:#15803d}.tl-W{fill:#d8b4fe;stroke:#7e22ce}
.tl text,.chart text{font:10px ui-monospace,Menlo,Consolas,monospace;fill:#0f172a}
.chart .row-label{font:11px system-ui,sans-serif}
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
  var box=document.querySelector('#graph .scroll');
  function fitHeight(){  /* the scroll box ends on screen, so its horizontal scroll bar is always visible */
    var top=Math.max(box.getBoundingClientRect().top,0);
    box.style.maxHeight=Math.max(320,window.innerHeight-top-16)+'px';}
  fitHeight();window.addEventListener('resize',fitHeight);
  var fit=document.getElementById('fit');
  if(fit)fit.addEventListener('click',function(){
    var on=svg.classList.toggle('fit');fit.textContent=on?'actual size':'fit width';
    svg.style.width=on?'100%':'';svg.style.height=on?'auto':'';});
  document.querySelectorAll('#stages button[data-stage]').forEach(function(b){
    b.addEventListener('click',function(){
      var r=svg.querySelector('g[data-group="'+b.getAttribute('data-stage')+'"] rect');
      if(r)box.scrollTo({left:Math.max(0,r.x.baseVal.value-12),top:0,behavior:'smooth'});});
  });
})();
"""

_ZERO = {1: "optimizer states", 2: "optimizer states and gradients", 3: "optimizer states, gradients and parameters"}


def _cell(text: str) -> str:
    """Escaped cell text whose long names may break after ``.``, ``_`` or ``/`` (``<wbr>``), never inside a word."""
    out = []
    for word in re.split(r"(\s+)", str(text)):
        esc = escape(word)
        if len(word) > 14:
            esc = re.sub(r"([._/])(?=\w)", r"\1<wbr>", esc)
        out.append(esc)
    return "".join(out)


def _table(head: list[str], rows: list[list[str]], num: set[int] | None = None) -> str:
    num = num or set()
    th = "".join(f'<th class="{"num" if i in num else ""}">{escape(h)}</th>' for i, h in enumerate(head))
    body = "".join("<tr>" + "".join(f'<td class="{"num" if i in num else ""}">{_cell(str(c))}</td>'
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f'<div class="tbl"><table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table></div>'


def _mesh_legend(view: GraphView) -> str:
    """One line per mesh dimension, in its colour: its degree and which tensor dimensions it splits.

    Data parallelism always has a line (``dp=1`` says that every rank sees the whole batch), so the
    picture never hides how the batch is divided.
    """
    plan = view.low.plan
    mesh = {k: int(v) for k, v in plan.mesh.items()}
    inputs = [v for v in view.nodes if v.kind == "input"]
    names = ", ".join(f"{v.id} [{','.join(str(d) for d in v.local_shape)}]" for v in inputs
                      if isinstance(v.local_shape, list) and v.local_shape and not isinstance(v.local_shape[0], list))
    roles: dict[str, int] = {}
    for p in plan.params.values():
        roles[p.role] = roles.get(p.role, 0) + 1
    text: dict[str, str] = {}
    dp = mesh.get("dp", 1)
    zero = int(plan.zero.get("stage", 0) or 0)
    text["dp"] = (f"data parallel: splits the batch, dim 0 of every input ({names or 'the inputs'} per rank); "
                  f"parameters replicated, gradients averaged over dp in {len(plan.dp_buckets)} bucket(s)"
                  + (f"; ZeRO-{zero} shards the {_ZERO[zero]} over dp" if zero in _ZERO else "")
                  if dp > 1 else "no data parallelism: every rank sees the whole batch")
    if mesh.get("tp", 1) > 1:
        text["tp"] = ("tensor parallel: splits parameters (column S(0): output features, row S(1): input "
                      "features, vocab S(0): rows of the embedding or head; "
                      + ", ".join(f"{n} {r}" for r, n in sorted(roles.items())) + ") and the activations "
                      "between them along dim d, drawn S(d) on the edges; P marks partial sums an all_reduce adds")
    if mesh.get("pp", 1) > 1:
        stages = plan.pipeline.get("stages", [])
        text["pp"] = (f"pipeline parallel: splits the layers into {len(stages)} stages (the amber columns); "
                      f"{plan.pipeline.get('microbatches', '?')} microbatches, schedule "
                      f"{plan.pipeline.get('schedule', '?')}")
    if mesh.get("ep", 1) > 1:
        text["ep"] = (f"expert parallel: splits the experts of each MoE layer (dim 0 of the expert weights); "
                      f"{plan.experts.get('num_experts', '?')} experts, tokens exchanged all-to-all")
    if mesh.get("cp", 1) > 1:
        text["cp"] = "context parallel: splits the sequence, dim 1 of the inputs and activations"
    order = ["dp", "tp", "pp", "ep", "cp"]
    rows = []
    for dim in order:
        if dim not in text:
            continue
        off = dim == "dp" and dp == 1
        colour = "#94a3b8" if off else MESH_COLOURS[dim]
        rows.append(f'<div class="dim{" off" if off else ""}" data-dim="{dim}">'
                    f'<span class="badge" style="background:{colour}">{dim}={mesh.get(dim, 1)}</span>'
                    f"<span>{escape(text[dim])}</span></div>")
    world = math.prod(mesh.values())
    return (f'<section id="mesh"><h2>Mesh · {world} rank{"s" if world != 1 else ""}</h2>{"".join(rows)}</section>')


def _step_card(view: GraphView) -> str:
    """The card with one step of rank 0 in time and its memory over the same axis."""
    step = step_timeline(view.low)
    hidden = step["hidden_comm_s"]
    what = "one microbatch's forward and backward on pp rank 0, then" if step["microbatch"] else "forward, backward,"
    return (f'<section class="card wide" id="step"><h2>One step of rank 0 in time</h2>'
            f'<p class="note">{what} the optimizer, estimated on the {escape(step["profile"])} profile at '
            f'{escape(step["precision"])}: step {fmt_seconds(step["makespan"])}; compute '
            f'{fmt_seconds(step["compute_s"])}; communication {fmt_seconds(step["comm_s"])} (tp '
            f'{fmt_seconds(step["tp_comm_s"])}, synchronous; dp {fmt_seconds(step["dp_comm_s"])}), of which '
            f'{fmt_seconds(hidden)} overlaps compute.</p>'
            f'<div class="chart-scroll">{step_svg(step)}</div>'
            f'<h2 id="memory-time">Memory of rank 0 over the step</h2>'
            f'<p class="note">peak {fmt_bytes(step["memory"]["peak_bytes"])}; term heights are the plan\'s '
            f"estimate (<code>plan.memory</code>), their course in time follows the step above.</p>"
            f'<div class="chart-scroll">{memory_time_svg(step)}</div></section>')


def render_html(view: GraphView) -> str:
    """One self-contained page (inline style, script and SVG; no network references): the mesh legend,
    the graph, one step in time with its memory, the pipeline schedule (pp > 1), the collectives, the
    fallbacks, per-rank memory and the parameters (see the module docstring)."""
    low = view.low
    plan = low.plan
    svg = render_svg(view, standalone=False)
    legend = ('<div class="legend">'
              '<span><i class="sw" style="background:#dbeafe;border-color:#2563eb"></i>runs on shards</span>'
              '<span><i class="sw" style="background:#f1f5f9;border-color:#94a3b8"></i>replicated</span>'
              '<span><i class="sw" style="background:#fed7aa;border-color:#c2410c"></i>collective (bytes moved)</span>'
              '<span><i class="sw" style="background:#fee2e2;border-color:#dc2626"></i>fallback</span>'
              '<span><i class="sw" style="background:#dcfce7;border-color:#16a34a"></i>input / output</span>'
              '<span><i class="sw" style="background:#f8fafc;border-color:#64748b;border-style:dashed"></i>'
              'folded ops that read only the inputs (hover for the list)</span>'
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
    stage_nav = '<nav id="stages"><button type="button" id="fit">fit width</button>' + "".join(
        f'<button type="button" data-stage="{escape(g.id)}">{escape(g.label)}</button>'
        for g in view.groups if g.kind == "stage") + "</nav>"
    sched = schedule_data(low)
    if sched is not None:
        sim = sched["simulation"]
        costs = "B = W = forward" if sched["split_backward"] else "backward = 2 × forward"
        sched_html = (f'<section class="card" id="schedule"><h2>Pipeline schedule: {escape(sched["name"])}</h2>'
                      f'<p class="note">pp={sched["pp"]}, {sched["virtual_stages"]} stage(s) per rank, '
                      f'{sched["microbatches"]} microbatches; bubble {sim["bubble_fraction"]:.1%}, makespan '
                      f'{sim["makespan"]:.2f} (forward ∝ stage FLOPs, {costs}); peak in-flight '
                      f'microbatches per rank {sim["peak_inflight"]}</p>{schedule_svg(sched)}'
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
                f"{memory_svg(mem, total)}{_table(['plan estimate (rank 0)', 'value'], est_rows, {1})}</section>")
    params_html = _table(["parameter", "shape", "placement", "local", "role"],
                         [[n + (f" (= {', '.join(p.aliases)})" if p.aliases else ""), str(p.shape), p.placement,
                           str(p.local_shape), p.role + (f" ×{p.blocks} blocks" if p.blocks > 1 else "")]
                          for n, p in plan.params.items()])
    notes = "".join(f"<li>{escape(n)}</li>" for n in plan.notes)
    folded = [g for g in view.groups if g.repeat > 1 and g.kind == "block"]
    fold_note = ("; repeated blocks folded: " + ", ".join(f"{g.label}" for g in folded)) if folded else ""
    meta = (f"rank 0's view on a virtual mesh; inputs {low.inputs or '-'}"
            + (f"; {low.microbatch_note}" if low.microbatch_note else "") + fold_note)
    graph_title = "Rewritten graph" + (" by pipeline stage (side by side: scroll, or pick a stage)"
                                       if view.stages > 1 else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>autoshard viz · {escape(view.title)}</title><style>{_STYLE_PAGE}</style></head>
<body>
<header><h1>autoshard viz · {escape(view.title)}</h1><p class="summary">{escape(view.subtitle)}</p>
<p class="meta">{escape(meta)}</p></header>
<main>
{_mesh_legend(view)}
<section id="graph"><h2>{graph_title}</h2>{legend}{stage_nav}
<div class="scroll">{svg}</div></section>
{_step_card(view)}
<div class="cards">
{sched_html}
<section class="card" id="collectives"><h2>Collectives</h2>{coll_html}</section>
<section class="card" id="fallbacks">{fb_head}{fb_html}</section>
{_attention_html(plan.attention)}
{mem_html}
<section class="card" id="params"><details><summary>Parameters ({len(plan.params)})</summary>{params_html}</details>
{f'<details><summary>Notes ({len(plan.notes)})</summary><ul>{notes}</ul></details>' if notes else ''}</section>
</div>
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
