"""Guarantees of docs/reliability.md that no other test module checks: a non-finite loss on one rank
skips the step on every rank, and nothing in the package unpickles (``torch.load`` only with
``weights_only=True``, no ``pickle``, no object collectives)."""

from __future__ import annotations

import ast
import pathlib
import warnings

import pytest
import torch

import autoshard

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE_DIRS = ("autoshard", "passes", "runtime")


# =============================================================================== non-finite loss, one rank
class _Regression(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x).pow(2).mean()


def _nan_on_one_rank() -> dict:
    """dp=2: rank 1's batch holds a NaN, rank 0's does not; both must skip, then both train on."""
    mesh = autoshard.Mesh(dp=2)
    torch.manual_seed(0)
    x = torch.randn(4, 4)
    sm = autoshard.autoshard(_Regression(), mesh, example_inputs=(x,), optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    before = {n: p.detach().clone() for n, p in sm.local_parameters().items()}
    bad = x.clone()
    if mesh.rank == 1:
        bad[0, 0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = sm.train_step((bad,))
    unchanged = all(torch.equal(p.detach(), before[n]) for n, p in sm.local_parameters().items())
    skipped = sm.stats()["skipped_steps"]
    sm.train_step((x,))
    moved = any(not torch.equal(p.detach(), before[n]) for n, p in sm.local_parameters().items())
    return {"rank": mesh.rank, "loss_finite": bool(torch.isfinite(torch.as_tensor(loss))), "unchanged": unchanged,
            "skipped": skipped, "warned": any("skipped" in str(w.message) for w in caught), "moved_after": moved,
            "steps": sm.stats()["steps"], "state": sm.full_state_dict()}


@pytest.mark.slow
def test_nan_on_one_rank_skips_the_step_on_every_rank():
    ranks = autoshard.launch(_nan_on_one_rank, 2, device="cpu", timeout=300)
    for r in ranks:
        assert r["unchanged"] and r["skipped"] == 1 and r["warned"], r["rank"]
        assert r["moved_after"] and r["steps"] == 2
    a, b = ranks[0]["state"], ranks[1]["state"]
    assert [k for k in a if not torch.equal(a[k], b[k])] == []  # the ranks still agree


# =============================================================================== nothing unpickled
def _calls(path: pathlib.Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _name(func: ast.expr) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def _sources() -> list[pathlib.Path]:
    return sorted(p for d in PACKAGE_DIRS for p in (ROOT / d).rglob("*.py"))


def test_torch_load_is_weights_only_everywhere():
    loads = []
    for path in _sources():
        for call in _calls(path):
            if _name(call.func) == "torch.load":
                kw = {k.arg: k.value for k in call.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                loads.append((f"{path.relative_to(ROOT)}:{call.lineno}", ok))
    assert loads, "no torch.load found: the scan is broken"
    assert [where for where, ok in loads if not ok] == []


# launch() returns what the user's own function returned in the child processes it spawned itself (spawn
# pickles the function and its arguments anyway): no file, plan, checkpoint or other rank's data
PICKLE_ALLOWED = {"autoshard/launch.py"}


def test_no_pickle_and_no_object_collectives_in_the_package():
    banned_modules = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve"}
    banned_calls = {"all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list",
                    "send_object_list", "recv_object_list"}
    found = []
    for path in _sources():
        if str(path.relative_to(ROOT)) in PICKLE_ALLOWED:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found += [f"{path.relative_to(ROOT)}:{node.lineno} import {a.name}" for a in node.names
                          if a.name.split(".")[0] in banned_modules]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in banned_modules:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} from {node.module}")
            elif isinstance(node, ast.Call) and _name(node.func).split(".")[-1] in banned_calls:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {_name(node.func)}")
    assert found == []
