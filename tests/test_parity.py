"""Contract 1: sharded training equals the unmodified model trained on one process.

Each world size is spawned once for the module (process start-up dominates on CPU); every case runs
inside those processes and each test checks one case against its single-process reference.
"""

from __future__ import annotations

import functools

import pytest

import autoshard
from parity import check, reference, run_cases

MODELS = ["gpt", "llama", "gpt2"]
OPTS = ["sgd", "adamw"]
CASES_2 = [(m, o, d) for m in MODELS for o in OPTS for d in ({"dp": 2}, {"tp": 2})]
CASES_4 = [(m, o, {"dp": 2, "tp": 2}) for m in MODELS for o in OPTS]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world2():
    return dict(zip([repr(c) for c in CASES_2], autoshard.launch(run_cases, 2, CASES_2, device="cpu")[0]))


@pytest.fixture(scope="module")
def world4():
    return dict(zip([repr(c) for c in CASES_4], autoshard.launch(run_cases, 4, CASES_4, device="cpu")[0]))


@functools.cache
def _ref(kind: str, opt: str):
    return reference(kind, opt)


def _mesh_id(d: dict) -> str:
    return "x".join(f"{k}{v}" for k, v in d.items())


@pytest.mark.parametrize("case", CASES_2, ids=[f"{m}-{o}-{_mesh_id(d)}" for m, o, d in CASES_2])
def test_parity_two_ranks(world2, case):
    kind, opt, deg = case
    result = world2[repr(case)]
    worst_loss, worst_param = check(result, _ref(kind, opt), opt)
    if "tp" in deg:
        assert result["stats"]["tp_comm_bytes"] > 0
        roles = {p["role"] for p in result["plan"]["params"].values()}
        assert {"column", "row"} <= roles, roles
    else:
        assert result["stats"]["dp_comm_bytes"] > 0


@pytest.mark.parametrize("case", CASES_4, ids=[f"{m}-{o}-dp2xtp2" for m, o, _ in CASES_4])
def test_parity_four_ranks(world4, case):
    kind, opt, _ = case
    result = world4[repr(case)]
    check(result, _ref(kind, opt), opt)
    stats = result["stats"]
    assert stats["tp_comm_bytes"] > 0 and stats["dp_comm_bytes"] > 0
    assert stats["comm_bytes_per_step"] == stats["tp_comm_bytes"] + stats["dp_comm_bytes"]
    assert result["plan"]["fallbacks"] == [] or kind != "gpt", result["explain"]
