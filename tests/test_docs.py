"""The README and docs/ as written: links, the quick-start commands CI runs, the Hugging Face script, the
docs site's strict build, and every ``autoshard ...`` command they show (the cheap ones run here)."""

from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from autoshard.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]


def _read(rel: str) -> str:
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def _commands() -> list[tuple[str, str]]:
    """(page, command) for every ``autoshard ...`` line in a bash block, its trailing comment removed."""
    out = []
    for page in PAGES:
        for block in _blocks(_read(page), "bash"):
            for line in block.splitlines():
                line = line.strip()
                if line.startswith("autoshard "):
                    out.append((page, shlex.split(line, comments=True)))
    return out


def test_readme_is_short_and_its_local_links_exist():
    text = _read("README.md")
    assert len(text.splitlines()) <= 200
    for page in PAGES:
        base = os.path.dirname(os.path.join(ROOT, page))
        prose = re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", _read(page), flags=re.S))
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", prose):
            if not target.startswith(("http://", "https://")):
                assert os.path.exists(os.path.join(base, target)), f"{page}: broken link {target}"


def test_ci_runs_the_readme_test_command():
    text = _read("README.md")
    assert "```bash\npython -m pytest -q\n```" in text
    run = _read(".ci/run").splitlines()
    assert "python -m pytest -q" in run
    assert any(line.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install torch==")
               and line.endswith('pip install -e ".[dev]" && autoshard demo') for line in text.splitlines())


def test_readme_script_is_examples_hf_quickstart():
    blocks = [b for b in _blocks(_read("README.md"), "python") if "autoshard.launch(train" in b]
    assert blocks == [_read("examples/hf_quickstart.py")]


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["model", "logits"])
def test_hf_quickstart_runs_on_cpu(loss):
    """The README's script as a user runs it: 4 CPU ranks, a tiny random Llama, no download."""
    proc = subprocess.run([sys.executable, "examples/hf_quickstart.py", loss, "2"], cwd=ROOT, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dp=2, tp=2" in proc.stdout and "step 1: loss" in proc.stdout and "final loss" in proc.stdout


@pytest.mark.skipif(shutil.which("mkdocs") is None, reason="the docs extra is not installed: pip install -e '.[docs]'")
def test_docs_site_builds_strict(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(["mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in ("autoshard.api.autoshard", "autoshard.runtime.mesh.Mesh", "autoshard.runtime.plan.Plan",
                 "autoshard.api.ShardedModule", "autoshard.launch.launch"):
        assert f'id="{name}"' in api, name


# ====================================================================================== the commands, as written
# Each command shown in README.md or docs/ is classified here, so a new one is either run or skipped for a reason.
FAST = {  # seconds on CPU: run in this process
    "check": "virtual mesh", "viz": "virtual mesh", "plan": "cost model",
}
SLOW = {"demo", "bench --model tiny"}  # tens of seconds to minutes on CPU ranks: marked slow
SKIP = {  # not runnable here as written
    "...": "a placeholder for the arguments of the command above",
    "path/to/": "a placeholder model path",
    "--model 953m": "a GPU benchmark", "--model 6.7b": "a GPU benchmark",
    "calibrate --nprocs": "measures the machine for minutes",
    "--diff a.json b.json": "compares the files the commands above write",
}


def _kind(argv: list[str]) -> str:
    line = " ".join(argv)
    for key, why in SKIP.items():
        if key in line:
            return "skip: " + why
    if any(line.startswith(f"autoshard {s}") for s in SLOW):
        return "slow"
    if argv[1] == "bench" and ("--report" in argv or "--plot" in argv):
        return "fast"
    if argv[1] in FAST:
        return "fast"
    return "unclassified"


COMMANDS = _commands()


def test_every_command_is_classified():
    assert len(COMMANDS) >= 10
    unclassified = [(page, " ".join(argv)) for page, argv in COMMANDS if _kind(argv) == "unclassified"]
    assert not unclassified


def _run(argv: list[str], tmp_path, monkeypatch) -> int:
    """Run one documented command from a scratch directory that sees the repository's examples and a copy of
    its benchmark results (so ``-o`` and ``--plot`` write there, not into the repository)."""
    monkeypatch.chdir(tmp_path)
    os.symlink(os.path.join(ROOT, "examples"), tmp_path / "examples")
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(os.path.join(ROOT, "benchmarks", "results.json"), tmp_path / "benchmarks" / "results.json")
    return main(argv[1:])


def _params(kind: str):
    marks = [pytest.mark.slow] if kind == "slow" else []
    return [pytest.param(argv, id=f"{page}: {' '.join(argv)}"[:120], marks=marks)
            for page, argv in COMMANDS if _kind(argv) == kind]


@pytest.mark.parametrize("argv", _params("fast"))
def test_documented_command_runs(argv, tmp_path, monkeypatch):
    assert _run(argv, tmp_path, monkeypatch) == 0


@pytest.mark.parametrize("argv", _params("slow"))
def test_documented_slow_command_runs(argv, tmp_path, monkeypatch):
    assert _run(argv, tmp_path, monkeypatch) == 0
