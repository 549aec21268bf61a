"""The layering DESIGN.md asks for, checked over the source: ``python tests/test_architecture.py`` prints it.

* imports run one way: ``autoshard/`` → ``passes/`` → ``runtime/``; runtime never imports the API
  package or the passes, and a pass never imports the top-level package;
* no import cycle between modules, counting imports inside functions;
* a module over 600 lines says in its docstring why it is that long (``Why this module is long: ...``).
"""

from __future__ import annotations

import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {"autoshard": "autoshard", "passes": "autoshard.passes", "runtime": "autoshard.runtime",
            "runtime/kernels": "autoshard.runtime.kernels", "examples": "autoshard.examples"}
LIMIT = 600


def modules() -> dict[str, str]:
    """Dotted module name → file path, for every module of the distribution."""
    out = {}
    for folder, dotted in PACKAGES.items():
        path = os.path.join(ROOT, folder)
        for name in sorted(os.listdir(path)):
            if name.endswith(".py"):
                mod = dotted if name == "__init__.py" else f"{dotted}.{name[:-3]}"
                out[mod] = os.path.join(path, name)
    return out


def imports(mod: str, path: str, known: set[str]) -> set[str]:
    """The distribution's modules that ``mod`` imports anywhere in its file (top level or in functions)."""
    tree = ast.parse(open(path).read(), path)
    pkg = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != mod:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imports(m, p, known) for m, p in mods.items()}


def layer(mod: str) -> int:
    if mod.startswith("autoshard.runtime"):
        return 0
    if mod.startswith("autoshard.passes"):
        return 1
    return 2  # the API package, its CLI and the examples


def layering_violations(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for m, deps in g.items():
        for d in deps:
            if d == "autoshard" and layer(m) < 2:
                bad.append(f"{m} imports the top-level package")
            elif layer(d) > layer(m) and not d.startswith("autoshard.examples"):
                bad.append(f"{m} imports {d}, a layer above it")
    return sorted(bad)


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in g:
        if v not in index:
            visit(v)
    return out


def long_modules() -> list[str]:
    bad = []
    for m, path in modules().items():
        text = open(path).read()
        if text.count("\n") > LIMIT:
            doc = ast.get_docstring(ast.parse(text)) or ""
            if "Why this module is long" not in doc:
                bad.append(f"{m} ({text.count(chr(10))} lines)")
    return bad


def test_imports_run_one_way() -> None:
    assert layering_violations(graph()) == []


def test_no_import_cycles() -> None:
    assert cycles(graph()) == []


def test_long_modules_say_why() -> None:
    assert long_modules() == []


if __name__ == "__main__":
    g = graph()
    print("layering violations:", layering_violations(g) or "none")
    print("import cycles:", cycles(g) or "none")
    print(f"modules over {LIMIT} lines without a reason at the top:", long_modules() or "none")
