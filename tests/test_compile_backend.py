"""torch.compile(model, backend=autoshard.backend(mesh)): the user's own loop and optimizer.

Parity (contract 1): after 5 steps the parameters equal single-process training on the global batch
and the mean of the data-parallel ranks' losses equals the global loss.
"""

from __future__ import annotations

import functools

import pytest
import torch

import autoshard
from parity import GLOBAL_BATCH, STEPS, batch, check, gpt_loss, make_model, make_optimizer, reference

CASES_2 = [(k, o, d) for k in ("gpt", "llama") for o in ("sgd", "adamw") for d in ({"dp": 2}, {"tp": 2})]
CASES_4 = [(k, o, {"dp": 2, "tp": 2}) for k in ("gpt", "llama") for o in ("sgd", "adamw")]

pytestmark = pytest.mark.slow


def _train(kind: str, opt: str, degrees: dict) -> dict:
    mesh = autoshard.Mesh(**degrees)
    model = make_model(kind)
    torch._dynamo.reset()
    be = autoshard.backend(mesh)
    compiled = torch.compile(model, backend=be)
    optim = make_optimizer(opt)(list(model.parameters()))
    per = GLOBAL_BATCH // mesh.data_size
    lo = mesh.data_rank * per
    losses = []
    for step in range(STEPS):
        tokens = batch(step)[lo:lo + per]
        if kind == "gpt":
            loss = gpt_loss(compiled(tokens), tokens)
        else:
            loss = compiled(input_ids=tokens, labels=tokens).loss
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    roles = sorted({lay.role for plan in be.plans for lay in plan.layouts.values()})
    return {"losses": losses, "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "roles": roles, "data_rank": mesh.data_rank}


def _run(cases):
    return [_train(*c) for c in cases]


@pytest.fixture(scope="module")
def world2():
    return autoshard.launch(_run, 2, CASES_2, device="cpu")


@pytest.fixture(scope="module")
def world4():
    return autoshard.launch(_run, 4, CASES_4, device="cpu")


@functools.cache
def _ref(kind, opt):
    return reference(kind, opt)


def _global(per_rank: list[dict]) -> dict:
    """Mean over the data slices of each step's loss (tp ranks of one slice report the same)."""
    by_slice = {r["data_rank"]: r["losses"] for r in per_rank}
    losses = [sum(v[s] for v in by_slice.values()) / len(by_slice) for s in range(STEPS)]
    return {"losses": losses, "state": per_rank[0]["state"]}


def _id(c):
    return f"{c[0]}-{c[1]}-{'x'.join(f'{k}{v}' for k, v in c[2].items())}"


@pytest.mark.parametrize("i", range(len(CASES_2)), ids=[_id(c) for c in CASES_2])
def test_compile_backend_two_ranks(world2, i):
    kind, opt, degrees = CASES_2[i]
    per_rank = [r[i] for r in world2]
    check(_global(per_rank), _ref(kind, opt), opt)
    for r in per_rank[1:]:  # every rank's parameters stay identical
        assert all(torch.equal(r["state"][k], v) for k, v in per_rank[0]["state"].items())
    if "tp" in degrees:
        assert {"column", "row"} <= set(per_rank[0]["roles"])


@pytest.mark.parametrize("i", range(len(CASES_4)), ids=[_id(c) for c in CASES_4])
def test_compile_backend_dp2_tp2(world4, i):
    kind, opt, _ = CASES_4[i]
    check(_global([r[i] for r in world4]), _ref(kind, opt), opt)


def test_registered_name_needs_a_mesh():
    import torch._dynamo

    from autoshard.backend import _default_mesh

    _default_mesh.clear()
    torch._dynamo.reset()
    compiled = torch.compile(make_model("gpt"), backend="autoshard")
    with pytest.raises(Exception, match="set_mesh"):
        compiled(batch(0)[:2])
    autoshard.set_mesh(autoshard.Mesh())
    torch._dynamo.reset()
    out = torch.compile(make_model("gpt"), backend="autoshard")(batch(0)[:2])
    assert out.shape == (2, batch(0).shape[1], 128)
