"""``autoshard viz``: the rewritten graph drawn as HTML, SVG, DOT and JSON, and rendered by a real browser.

The GPT example is sharded on virtual meshes (dp=2×tp=2, and pp=2×tp=2 with four blocks), drawn in
every format and checked for content: collectives with their bytes, pipeline stages, folded blocks,
a page with no network references, escaped model text. Headless Chromium then loads the page, and the
DOM and a screenshot are checked; CI installs Chromium (``.ci/run``), so its absence is a failure.
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
