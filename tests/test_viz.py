"""``autoshard viz``: the rewritten graph drawn as HTML, SVG, DOT and JSON, and rendered by a real browser.

The GPT example is sharded on virtual meshes (dp=2×tp=2, and pp=2×tp=2 with four blocks), drawn in
every format and checked for content: collectives with their bytes, pipeline stages, folded blocks,
a page with no network references, escaped model text. Tiny Hugging Face models (Llama and Qwen2
built from a config: hidden 64, two layers) are checked for what makes their page readable: the
mask and position ops folded into one box, inputs named by their arguments, stage labels naming
their layers, the mesh legend, and one step in time with its memory. Headless Chromium then loads the
pages, and the DOM, the laid-out geometry (read back by a probe script) and a screenshot are checked;
CI installs Chromium (``.ci/run``), so its absence is a failure.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import pytest
import torch

from autoshard import viz
from autoshard.cli import main
from autoshard.examples.gpt import lm_loss, make_model

SVG_NS = "{http://www.w3.org/2000/svg}"


def _lower(mesh: dict[str, int], n_layers: int = 2) -> viz.Lowered:
    tokens = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(0))
    low = viz.lower(make_model(n_layers=n_layers), mesh, (tokens,), loss_fn=lm_loss)
    low.inputs = "int64[8,64]"
    return low


@pytest.fixture(scope="module")
def dp_tp() -> viz.Lowered:
    return _lower({"dp": 2, "tp": 2})


@pytest.fixture(scope="module")
def pp_tp() -> viz.Lowered:
    return _lower({"pp": 2, "tp": 2}, n_layers=4)


def _hf_lower(mesh: dict[str, int], family: str = "llama") -> viz.Lowered:
    """A tiny Hugging Face causal LM built from a config, given ``input_ids`` and ``labels`` (its own loss)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
    if family == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    low = viz.lower(model, mesh, (), {"input_ids": ids, "labels": ids})
    low.inputs = "input_ids=int64[4,32],labels=int64[4,32]"
    return low


@pytest.fixture(scope="module")
def hf_dp_tp() -> viz.Lowered:
    return _hf_lower({"dp": 2, "tp": 2})


@pytest.fixture(scope="module")
def hf_pp() -> viz.Lowered:
    return _hf_lower({"pp": 2, "tp": 2})


# ====================================================================================== formats
def test_svg_is_well_formed_and_draws_every_node(dp_tp):
    view = viz.build_view(dp_tp)
    root = ET.fromstring(viz.render_svg(view))
    assert root.tag == f"{SVG_NS}svg"
    groups = [g for g in root.iter(f"{SVG_NS}g")]
    nodes = [g for g in groups if "node" in g.get("class", "").split()]
    assert len(nodes) == len(view.nodes)
    collectives = [g for g in nodes if "k-collective" in g.get("class", "")]
    assert collectives and all(g.get("data-id") for g in collectives)
    texts = " ".join(t.text or "" for t in root.iter(f"{SVG_NS}text"))
    assert "all_reduce" in texts and "reduce_grad" in texts and "all_gather" in texts
    assert re.search(r"S\(\d\) \[8,64,\d+\]", texts), "edges carry placement and local shape"
    assert "P [8,64,64]" in texts, "the partial sums of a row-parallel product are marked P"
    edges = [p for p in root.iter(f"{SVG_NS}path") if "edge" in p.get("class", "")]
    assert len(edges) == len(view.edges)


def test_json_has_collectives_and_bytes_that_match_the_plan(dp_tp):
    doc = json.loads(viz.render_json(viz.build_view(dp_tp)))
    assert set(doc) >= {"nodes", "edges", "groups", "collectives", "fallbacks", "schedule"}
    assert doc["schedule"] is None and doc["stages"] == 1
    ops = {c["op"] for c in doc["collectives"]}
    assert {"all_reduce", "reduce_grad", "all_gather"} <= ops
    assert all(c["mesh_dim"] == "tp" for c in doc["collectives"])
    forward = sum(c["bytes"] * c["repeat"] for c in doc["collectives"])
    assert forward == dp_tp.plan.estimates["tp_forward_comm_bytes"]
    ids = {n["id"] for n in doc["nodes"]}
    assert all(e["src"] in ids and e["dst"] in ids for e in doc["edges"])
    mem = doc["memory"]
    assert len(mem) == 1 and mem[0]["param_bytes"] == dp_tp.plan.estimates["param_bytes_per_rank"]
    assert doc["fallbacks"] == []


def test_repeated_blocks_fold_into_one_group(dp_tp):
    view = viz.build_view(dp_tp)
    blocks = [g for g in view.groups if g.kind == "block"]
    assert len(blocks) == 1 and blocks[0].repeat == 2 and "× 2" in blocks[0].label
    assert blocks[0].members == ["blocks.0", "blocks.1"]
    big = viz.build_view(_lower({"tp": 2}, n_layers=8))
    assert [g.repeat for g in big.groups if g.kind == "block"] == [8]
    assert len(big.nodes) == len(view.nodes), "eight blocks draw like two: one group marked × 8"
    unfolded = viz.build_view(dp_tp, collapse=False)
    assert len([g for g in unfolded.groups if g.kind == "block"]) == 2
    assert len(unfolded.nodes) > len(view.nodes)


def test_pipeline_stages_schedule_and_memory(pp_tp):
    view = viz.build_view(pp_tp)
    doc = json.loads(viz.render_json(view))
    assert doc["stages"] == 2
    stages = [g for g in doc["groups"] if g["kind"] == "stage"]
    assert [g["id"] for g in stages] == ["stage0", "stage1"]
    assert {n["stage"] for n in doc["nodes"]} == {0, 1}
    assert any(e["kind"] == "pipeline" for e in doc["edges"]), "values sent between stages are drawn"
    assert [g["repeat"] for g in doc["groups"] if g["kind"] == "block"] == [2, 2]
    sched = doc["schedule"]
    assert sched["name"] == "1f1b" and sched["pp"] == 2 and len(sched["actions"]) == 2
    timeline = sched["simulation"]["timeline"]
    assert len(timeline) == 2 and {a[3] for row in timeline for a in row} == {"F", "B"}
    assert 0 < sched["simulation"]["bubble_fraction"] < 1
    mem = doc["memory"]
    assert [m["pp_rank"] for m in mem] == [0, 1]
    assert mem[0]["param_bytes"] == pp_tp.plan.estimates["param_bytes_per_rank"]
    forward = sum(c["bytes"] * c["repeat"] for c in doc["collectives"])
    assert forward == pp_tp.plan.estimates["tp_forward_comm_bytes"]


def test_dot_is_graphviz_text(pp_tp):
    dot = viz.render_dot(viz.build_view(pp_tp))
    assert dot.startswith("digraph autoshard {") and dot.rstrip().endswith("}")
    assert dot.count("{") == dot.count("}")
    assert 'subgraph "cluster_0"' in dot and "stage 0" in dot and "stage 1" in dot
    edge_lines = [ln for ln in dot.splitlines() if " -> " in ln]
    assert edge_lines and all(re.fullmatch(r'\s*"[^"]+" -> "[^"]+" \[.*\];', ln) for ln in edge_lines)
    dot_bin = shutil.which("dot")
    if dot_bin:  # graphviz, where installed, must accept it too
        proc = subprocess.run([dot_bin, "-Tsvg"], input=dot, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr


def _network_refs(page: str) -> list[str]:
    """Every http(s) reference in ``page`` that is not an XML namespace declaration."""
    bad = []
    for m in re.finditer(r"https?://", page):
        before = page[max(0, m.start() - 16):m.start()]
        if not re.search(r'xmlns(:\w+)?="$', before):
            bad.append(page[max(0, m.start() - 30):m.end() + 30])
    return bad


@pytest.mark.parametrize("which", ["dp_tp", "pp_tp"])
def test_html_is_one_self_contained_page(which, request):
    low = request.getfixturevalue(which)
    page = viz.render_html(viz.build_view(low))
    assert page.startswith("<!DOCTYPE html>")
    assert _network_refs(page) == []
    assert not re.search(r"<link\b|<script[^>]+src=|<img\b|@import|url\((?!#)", page)
    assert page.count("<script>") == 1 and page.count("<style>") >= 1
    for text in ("Collectives", "all_reduce", "Memory per rank", "× 2"):
        assert text in page
    if which == "pp_tp":
        assert "stage 0 · pp rank 0" in page and "stage 1 · pp rank 1" in page
        assert "Pipeline schedule: 1f1b" in page and 'class="tl-F"' in page


# ====================================================================================== escaping
_EVIL = '''
import torch
import torch.nn as nn


class Evil(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(64, 16)
        self.parts = nn.ModuleDict({"<script>alert(1)</script>": nn.Linear(16, 64)})

    def forward(self, x):
        h = self.parts["<script>alert(1)</script>"](self.emb(x))
        return torch.cumsum(h, dim=-1)
'''


def test_text_from_the_model_is_escaped(tmp_path, capsys):
    folder = tmp_path / "<script>x"
    folder.mkdir()
    src = folder / "<script>.py"
    src.write_text(textwrap.dedent(_EVIL))
    line = next(i for i, text in enumerate(src.read_text().splitlines(), 1) if "cumsum" in text)
    out = {fmt: tmp_path / f"evil.{fmt}" for fmt in ("html", "svg", "json", "dot")}
    for path in out.values():
        assert main(["viz", f"{src}:Evil", "--mesh", "tp=2", "--input", "int64[2,8]", "-o", str(path)]) == 0
    capsys.readouterr()
    doc = json.loads(out["json"].read_text())
    modules = {n["module"] for n in doc["nodes"]}
    assert "parts.<script>alert(1)</script>" in modules, "the hostile name reaches the drawing"
    assert [f["source"] for f in doc["fallbacks"]] == [f"<script>.py:{line}"]
    page = out["html"].read_text()
    assert "<script>alert" not in page and "</script>\"" not in page
    assert page.count("<script>") == 1, "only the page's own script"
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert f"&lt;script&gt;.py:{line}" in page, "the fallback's source line is shown, escaped"
    ET.fromstring(out["svg"].read_text())  # still well-formed XML
    assert "<script>" not in out["svg"].read_text()



_QUOTE = '''
import torch.nn as nn


class Quote(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(64, 16)
        self.add_module('a"b', nn.Linear(16, 64))

    def forward(self, x):
        return getattr(self, 'a"b')(self.emb(x))
'''


def test_module_name_with_a_quote_is_a_capture_error(tmp_path, capsys):
    """torch.fx cannot write ``getattr(self, "a"b")`` as Python: a capture error, exit 2, not a SyntaxError (exit 1)."""
    from autoshard.passes.capture import capture
    from autoshard.runtime.errors import CaptureError

    src = tmp_path / "quote.py"
    src.write_text(textwrap.dedent(_QUOTE))
    for mesh in ("tp=2", "dp=2"):  # dp alone: autoshard falls back to the eager module, which has no graph to draw
        assert main(["viz", f"{src}:Quote", "--mesh", mesh, "--input", "int64[2,8]", "-o",
                     str(tmp_path / "q.html")]) == 2, mesh
        err = capsys.readouterr().err
        assert "autoshard: error:" in err and "could not turn the graph into a module" in err, err
        assert "SyntaxError" in err and "rename it" in err and "Traceback" not in err
    assert not (tmp_path / "q.html").exists()
    assert main(["check", f"{src}:Quote", "--mesh", "tp=2", "--input", "int64[2,8]"]) == 2  # 1 would mean fallbacks
    assert "could not turn the graph into a module" in capsys.readouterr().err
    proc = subprocess.run([sys.executable, "-m", "autoshard", "viz", f"{src}:Quote", "--mesh", "tp=2", "--input",
                           "int64[2,8]", "-o", str(tmp_path / "q.html")], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    import importlib.util

    spec = importlib.util.spec_from_file_location("quote_model", src)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(CaptureError, match="could not turn the graph into a module"):
        capture(module.Quote(), (torch.zeros(2, 8, dtype=torch.int64),))


# ====================================================================================== command line
def test_viz_command_formats_and_default_output(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    spec = ["autoshard.examples.gpt:make_model", "--mesh", "dp=2,tp=2", "--input", "int64[8,64]"]
    assert main(["viz", *spec]) == 0
    assert (tmp_path / "autoshard_viz.html").read_text().startswith("<!DOCTYPE html>")
    assert main(["viz", *spec, "-o", "g.svg"]) == 0
    ET.parse(tmp_path / "g.svg")
    capsys.readouterr()
    assert main(["viz", *spec, "--format", "json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["collectives"]
    assert "wrote json to stdout" in captured.err


def test_viz_help_and_usage_errors():
    proc = subprocess.run([sys.executable, "-m", "autoshard", "viz", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--format" in proc.stdout and "× N" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "autoshard", "viz", "autoshard.examples.gpt:make_model",
                           "--input", "int64[8,64]", "--format", "png"], capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


# ====================================================================================== a real browser
def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if Path("/usr/bin/chromium").exists():
        return "/usr/bin/chromium"
    pytest.fail("Chromium is needed to render the viz page headless and was not found: install it "
                "(Debian: apt-get install -y chromium; .ci/run does this in CI)")


def _browser(page: Path, tmp: Path, *mode: str) -> subprocess.CompletedProcess:
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp / 'profile'}",
           "--window-size=1400,1000", *mode, page.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def _png_pixels(data: bytes) -> tuple[int, int, bytes]:
    """Width, height and the decompressed scanlines (filter bytes included) of a PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    return width, height, zlib.decompress(idat)


@pytest.mark.parametrize("which", ["dp_tp", "pp_tp"])
def test_chromium_renders_the_page(which, request, tmp_path):
    low = request.getfixturevalue(which)
    page = tmp_path / f"{which}.html"
    page.write_text(viz.render_html(viz.build_view(low)), encoding="utf-8")

    dom = _browser(page, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert "<svg" in html and 'class="node k-collective' in html
    for label in ("all_reduce", "reduce_grad", "all_gather", "tp · "):
        assert label in html, f"collective label {label!r} missing from the rendered DOM"
    if which == "pp_tp":
        assert "stage 0 · pp rank 0" in html and "stage 1 · pp rank 1" in html
        assert "rank 1" in html and ">F0<" in html and ">B0<" in html

    shot = tmp_path / "shot.png"
    proc = _browser(page, tmp_path, f"--screenshot={shot}")
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    width, height, raw = _png_pixels(shot.read_bytes())
    assert (width, height) == (1400, 1000)
    assert len(set(raw)) > 32, "the screenshot is blank"



# ====================================================================================== Hugging Face models
_MASK_OPS = {"arange", "cumsum", "unsqueeze", "expand", "eq", "le", "__and__", "new_ones", "cos", "sin"}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_hf_mask_and_position_ops_fold_into_one_box(family, hf_dp_tp):
    low = hf_dp_tp if family == "llama" else _hf_lower({"dp": 2, "tp": 2}, "qwen2")
    view = viz.build_view(low)
    boxes = [v for v in view.nodes if v.kind == "folded" and v.op.startswith("attention mask & positions")]
    assert len(boxes) == 1, [v.op for v in view.nodes if v.kind == "folded"]
    box = boxes[0]
    assert box.op == f"attention mask & positions ({len(box.members)} ops)" and len(box.members) >= 20
    graph_ops = {n.name: n for n in low.graph.nodes}
    assert any("arange" in str(graph_ops[m].target) for m in box.members)
    assert any("cumsum" in str(graph_ops[m].target) or "cos" in str(graph_ops[m].target) for m in box.members)
    assert not [v.id for v in view.nodes if "arange" in v.target], "no arange is drawn: it is in the box"
    top = [v for v in view.nodes if v.kind == "compute" and (v.group is None or v.group == "s0:model")]
    assert not [v.id for v in top if v.op in _MASK_OPS], "the top level shows the model, not its mask ops"
    assert any(e.src == box.id for e in view.edges), "the box feeds the attention"
    root = ET.fromstring(viz.render_svg(view))
    ops = [t.text for t in root.iter(f"{SVG_NS}text") if t.get("class") == "op"]
    assert box.op in ops
    unfolded = viz.build_view(low, collapse=False)  # --no-fold draws every op
    assert not [v for v in unfolded.nodes if v.kind == "folded"]
    assert any("arange" in v.target for v in unfolded.nodes)
    assert len(view.nodes) < len(unfolded.nodes) - 40


def test_hf_inputs_are_named_by_their_arguments(hf_dp_tp):
    view = viz.build_view(hf_dp_tp)
    inputs = [v for v in view.nodes if v.kind == "input"]
    assert [v.op for v in inputs] == ["input_ids", "labels"]
    assert all(v.detail == "int64 [4,32]" for v in inputs)
    svg = viz.render_svg(view)
    root = ET.fromstring(svg)
    ops = {t.text for t in root.iter(f"{SVG_NS}text") if t.get("class") == "op"}
    assert {"input_ids", "labels"} <= ops and "placeholder" not in ops
    assert "int64 input" not in svg
    badges = [g for g in root.iter(f"{SVG_NS}g") if g.get("class") == "badge"]
    assert len(badges) == 2, "each input carries the dp badge: data parallelism splits its dim 0"
    assert all("dp S(0)" in "".join(g.itertext()) for g in badges)


def test_hf_stage_labels_name_their_layers(hf_pp):
    view = viz.build_view(hf_pp)
    labels = [g.label for g in view.groups if g.kind == "stage"]
    assert labels == ["stage 0 · pp rank 0 · model.layers.0", "stage 1 · pp rank 1 · model.layers.1"]
    assert not any(re.search(r"(\d+)[–-]\1\b", label) for label in labels)
    from autoshard.viz_view import _block_span

    assert _block_span("model.layers", [0, 1, 2, 3, 4, 5, 6, 7]) == "model.layers.0–7"
    page = viz.render_html(view)
    assert page.count('data-stage="stage') == 2, "one button per stage scrolls it into view"


def test_mesh_legend_names_every_dimension(hf_dp_tp, hf_pp):
    page = viz.render_html(viz.build_view(hf_dp_tp))
    legend = page[page.index('<section id="mesh">'):page.index("</section>", page.index('<section id="mesh">'))]
    assert re.findall(r'data-dim="(\w+)"', legend) == ["dp", "tp"]
    assert ">dp=2<" in legend and ">tp=2<" in legend and "Mesh · 4 ranks" in legend
    assert "dim 0 of every input (input_ids [4,32], labels [4,32] per rank)" in legend
    assert viz.MESH_COLOURS["dp"] in legend and viz.MESH_COLOURS["tp"] in legend
    page = viz.render_html(viz.build_view(hf_pp))
    legend = page[page.index('<section id="mesh">'):page.index("</section>", page.index('<section id="mesh">'))]
    assert re.findall(r'data-dim="(\w+)"', legend) == ["dp", "tp", "pp"]
    assert 'class="dim off" data-dim="dp"' in legend and "no data parallelism" in legend


def test_table_cells_break_only_between_words(hf_dp_tp):
    from autoshard.viz_page import _STYLE_PAGE, _cell

    assert "anywhere" not in _STYLE_PAGE and "break-all" not in _STYLE_PAGE
    assert "word-break:keep-all" in _STYLE_PAGE and "overflow-wrap:normal" in _STYLE_PAGE
    assert _cell("model.layers.0.post_attention_layernorm") == \
        "model.<wbr>layers.<wbr>0.<wbr>post_<wbr>attention_<wbr>layernorm"
    assert _cell("all_reduce") == "all_reduce", "short words stay whole"
    hostile = _cell("<b>x</b>.<i>y_long_name</i>")
    assert "<b>" not in hostile and "<i>" not in hostile and "&lt;b&gt;" in hostile, "escaped before <wbr> is added"
    assert hostile.replace("<wbr>", "") == "&lt;b&gt;x&lt;/b&gt;.&lt;i&gt;y_long_name&lt;/i&gt;"


def test_hf_step_timeline_and_memory_over_time(hf_dp_tp, monkeypatch):
    low = hf_dp_tp
    import autoshard.viz_graph as vg

    def no_second_lowering(*a, **k):
        raise AssertionError("the step is read from the lowered graph, not lowered again")

    monkeypatch.setattr(vg, "capture", no_second_lowering)
    monkeypatch.setattr(vg, "autoshard", no_second_lowering)
    step = viz.step_timeline(low)
    ev = step["events"]
    assert {e["phase"] for e in ev} == {"forward", "backward", "optimizer"}
    counts = viz.collective_counts(low)
    tp = [e for e in ev if e["kind"] == "tp"]
    assert len(tp) == counts["all_reduce"] + counts["all_gather"] + counts["reduce_grad"]
    dp = [e for e in ev if e["kind"] == "dp"]
    assert dp and all(e["stream"] == "comm" and e["phase"] == "backward" for e in dp)
    opt = next(e for e in ev if e["kind"] == "optimizer")
    assert opt["start"] >= max(e["stop"] for e in dp), "the optimizer waits for the gradients"
    fwd_end = max(e["stop"] for e in ev if e["phase"] == "forward")
    assert min(e["start"] for e in ev if e["phase"] == "backward") >= fwd_end - 1e-12
    assert 0 <= step["hidden_comm_s"] <= step["comm_s"] and step["makespan"] >= step["compute_s"]
    compute = sorted((e["start"], e["stop"]) for e in ev if e["stream"] == "compute")
    assert all(b[0] >= a[1] - 1e-12 for a, b in zip(compute, compute[1:])), "one compute stream"
    mem = step["memory"]
    plan_mem = low.plan.memory
    assert max(p["activations"] for p in mem["points"]) == pytest.approx(plan_mem["activations"])
    assert mem["points"][-1]["grads"] == pytest.approx(plan_mem["grads"])
    assert mem["points"][-1]["activations"] == pytest.approx(0, abs=1e-6), "backward releases the activations"
    assert mem["predicted_peak_bytes"] == low.sm.predicted_peak_bytes()["device"]
    assert mem["peak_bytes"] <= mem["predicted_peak_bytes"] + 1
    page = viz.render_html(viz.build_view(low))
    assert 'id="step"' in page and 'id="memory-time"' in page
    assert page.count('class="ev ev-tp"') == len(tp) and 'class="ev ev-dp"' in page
    assert 'class="term term-activations"' in page and "plan's predicted peak" in page
    doc = json.loads(viz.render_json(viz.build_view(low)))
    assert doc["step"]["events"] and doc["step"]["memory"]["points"]


_PROBE = """<script>
(function(){
  var out={innerHeight:innerHeight,innerWidth:innerWidth};
  var box=document.querySelector('#graph .scroll'),cs=getComputedStyle(box),br=box.getBoundingClientRect();
  out.overflowX=cs.overflowX;out.scrollWidth=box.scrollWidth;out.clientWidth=box.clientWidth;
  out.box={top:br.top,bottom:br.bottom,left:br.left,right:br.right};
  out.stages=[].map.call(document.querySelectorAll('#graph g.g-stage > rect'),function(r){
    var b=r.getBoundingClientRect();return {left:b.left,right:b.right,top:b.top};});
  out.broken=[];
  document.querySelectorAll('td,th').forEach(function(c){
    var w=document.createTreeWalker(c,NodeFilter.SHOW_TEXT),t;
    while((t=w.nextNode())){var re=/\\S+/g,m;while((m=re.exec(t.data))){
      var r=document.createRange();r.setStart(t,m.index);r.setEnd(t,m.index+m[0].length);
      var tops={};[].forEach.call(r.getClientRects(),function(x){tops[Math.round(x.top)]=1;});
      if(Object.keys(tops).length>1)out.broken.push(m[0]);}}});
  out.folded=[].map.call(document.querySelectorAll('#graph g.k-folded'),function(g){
    var b=g.getBoundingClientRect();return {top:b.top,bottom:b.bottom};});
  out.legend=[].map.call(document.querySelectorAll('#mesh .dim'),function(d){return d.getAttribute('data-dim');});
  var pre=document.createElement('pre');pre.id='probe';pre.textContent=JSON.stringify(out);document.body.appendChild(pre);
})();
</script>"""


@pytest.mark.parametrize("which", ["hf_dp_tp", "hf_pp"])
def test_chromium_renders_a_hugging_face_model(which, request, tmp_path):
    """The HF pages in a real browser: geometry read back by a probe script, then a screenshot."""
    low = request.getfixturevalue(which)
    html = viz.render_html(viz.build_view(low))
    page = tmp_path / f"{which}.html"
    page.write_text(html.replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    dom = _browser(page, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    m = re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout, re.S)
    assert m, "the probe did not run"
    probe = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert probe["broken"] == [], "table cells break inside words"
    assert probe["overflowX"] in ("auto", "scroll"), "the graph scrolls sideways"
    assert probe["box"]["bottom"] <= probe["innerHeight"] + 1, "its horizontal scroll bar is on the first screen"
    assert probe["folded"] and probe["folded"][0]["top"] < probe["innerHeight"], "the folded box is on screen"
    if which == "hf_pp":
        assert probe["legend"] == ["dp", "tp", "pp"]
        (a, b) = probe["stages"]
        assert abs(a["top"] - b["top"]) < 1 and a["right"] <= b["left"], "stages side by side"
        wide = probe["scrollWidth"] > probe["clientWidth"]
        assert not wide or b["left"] < probe["box"]["right"] or probe["overflowX"] in ("auto", "scroll")
    else:
        assert probe["legend"] == ["dp", "tp"]
        assert "input_ids" in dom.stdout and "attention mask &amp; positions" in dom.stdout
    shot = tmp_path / "shot.png"
    proc = _browser(page, tmp_path, f"--screenshot={shot}")
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    width, height, raw = _png_pixels(shot.read_bytes())
    assert (width, height) == (1400, 1000) and len(set(raw)) > 32
