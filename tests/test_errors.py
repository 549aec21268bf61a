"""Bad input: each error names its cause and a fix.

One multi-process launch for the whole module (spawning ranks is the slow part); everything else
runs in this process on a single-device ``Mesh()``, which needs no process group.
"""

from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch
import torch.distributed as dist

import autoshard
from autoshard import CaptureError, Mesh, MeshError, PlanError
from autoshard.examples.gpt import make_model, synthetic_batch
from autoshard.passes import capture, plan_tensor_parallel


# =============================================================================== launched workers
def _world_size_mismatch_worker() -> dict:
    """Runs on each of 2 ranks: a mesh of 4 ranks must refuse a world of 2."""
    out = {"rank": int(os.environ["RANK"]), "world": int(os.environ["WORLD_SIZE"])}
    try:
        Mesh(dp=2, tp=2)
    except MeshError as e:
        out["message"] = str(e)
    else:
        out["message"] = None
    out["initialized"] = dist.is_initialized()
    return out


@pytest.fixture(scope="module")
def launched():
    # the ranks unpickle the worker by module name: make sure this file's folder is importable there
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    return autoshard.launch(_world_size_mismatch_worker, 2, device="cpu", timeout=300)


@pytest.fixture
def no_launcher_env(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert not dist.is_initialized()


# =============================================================================== mesh
def test_mesh_without_process_group_says_how_to_launch(no_launcher_env):
    with pytest.raises(MeshError) as ei:
        Mesh(dp=2, tp=2)
    msg = str(ei.value)
    assert "torchrun" in msg
    assert "--nproc-per-node 4" in msg
    assert "autoshard.launch(fn, 4)" in msg
    assert "needs 4 ranks" in msg and "Mesh(dp=2, tp=2)" in msg
    assert not dist.is_initialized()


def test_single_device_mesh_needs_no_process_group(no_launcher_env):
    mesh = Mesh()
    assert (mesh.world_size, mesh.rank, mesh.data_size, mesh.data_rank) == (1, 0, 1, 0)
    assert not dist.is_initialized()


@pytest.mark.parametrize("kwargs, bad", [({"dp": 0}, "dp=0"), ({"tp": 0}, "tp=0"), ({"tp": -2}, "tp=-2"),
                                         ({"dp": "2"}, "dp='2'"), ({"tp": 1.5}, "tp=1.5")])
def test_mesh_rejects_non_positive_or_non_integer_degrees(kwargs, bad):
    with pytest.raises(MeshError, match="must be a positive integer") as ei:
        Mesh(**kwargs)
    assert bad in str(ei.value)


@pytest.mark.parametrize("dim", ["ep"])
def test_mesh_counts_every_dimension(dim, no_launcher_env):
    with pytest.raises(MeshError) as ei:  # every dimension is supported; each one multiplies the ranks needed
        Mesh(dp=2, **{dim: 2})
    msg = str(ei.value)
    assert f"Mesh(dp=2, {dim}=2) needs 4 ranks" in msg
    assert "--nproc-per-node 4" in msg
    # MeshError is also a ValueError and an AutoshardError
    assert isinstance(ei.value, ValueError) and isinstance(ei.value, autoshard.AutoshardError)


def test_mesh_world_size_mismatch_under_launch(launched):
    assert [r["rank"] for r in launched] == [0, 1]
    for r in launched:
        assert r["world"] == 2
        msg = r["message"]
        assert msg is not None, "Mesh(dp=2, tp=2) was accepted on a world of 2 ranks"
        assert "needs 4 ranks" in msg
        assert "the world has 2" in msg
        assert "start 4 processes" in msg and "Mesh(dp=2)" in msg
        # refused before joining a process group of the wrong size
        assert r["initialized"] is False


# =============================================================================== plan
def test_indivisible_attention_heads():
    model = make_model(n_heads=6, d_model=48, d_ff=96)
    x = synthetic_batch(0, 2, model.cfg)[0]
    gm = capture(model, (x,))
    with pytest.raises(PlanError) as ei:
        plan_tensor_parallel(gm, 4)
    msg = str(ei.value)
    assert "6 attention heads" in msg
    assert "tp=4" in msg
    assert "blocks.0.attn" in msg  # names the module
    assert "[1, 2, 3, 6]" in msg and "dp" in msg  # says which tp would work
    # a tp that divides the heads plans fine
    plan = plan_tensor_parallel(gm, 2)
    assert any(p.role == "row" for p in plan.layouts.values())


class _TwoOutputs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        return y, y * 2


def test_output_that_is_not_a_loss_needs_loss_fn(no_launcher_env):
    with pytest.raises(PlanError) as ei:
        autoshard.autoshard(_TwoOutputs(), Mesh(), example_inputs=(torch.randn(2, 4),), loss_fn=None,
                            optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    msg = str(ei.value)
    assert "loss_fn" in msg
    assert "tuple with 2 tensor(s)" in msg
    assert "not a scalar loss" in msg


# =============================================================================== capture
class _DataDependent(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.lin(x)
        return -self.lin(x)


def test_data_dependent_control_flow_is_a_capture_error():
    with pytest.raises(CaptureError) as ei:
        capture(_DataDependent(), (torch.randn(2, 4),))
    msg = str(ei.value)
    assert "torch.export could not capture _DataDependent" in msg
    assert "data-dependent" in msg  # quotes the export failure
    assert "What to try" in msg
    assert "control flow" in msg
    assert ei.value.__cause__ is not None  # the original export error is chained
    assert isinstance(ei.value, RuntimeError)


def test_autoshard_surfaces_capture_errors(no_launcher_env):
    # data parallelism needs no graph: the export failure is quoted in a warning and the eager module trains
    with pytest.warns(UserWarning, match="What to try"):
        sm = autoshard.autoshard(_DataDependent(), Mesh(), example_inputs=(torch.randn(2, 4),),
                                 loss_fn=lambda out, y: out.sum())
    assert sm.fallback == "eager-data-parallel"
    # tensor parallelism does: the same failure is an error
    with pytest.raises(CaptureError, match="What to try"):
        autoshard.autoshard(_DataDependent(), Mesh.virtual(tp=2, rank=0), example_inputs=(torch.randn(2, 4),),
                            loss_fn=lambda out, y: out.sum())


# =============================================================================== training
class _Regression(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x).pow(2).mean()


def test_nan_loss_skips_the_step(no_launcher_env):
    torch.manual_seed(0)
    x = torch.randn(8, 4)
    sm = autoshard.autoshard(_Regression(), Mesh(), example_inputs=(x,),
                             optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    before = {n: p.detach().clone() for n, p in sm.local_parameters().items()}

    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.warns(UserWarning, match="optimizer step skipped"):
        loss = sm.train_step((bad,))
    assert loss != loss  # nan
    for n, p in sm.local_parameters().items():
        torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=0)
        assert p.grad is None  # the poisoned gradients were dropped
    stats = sm.stats()
    assert stats["skipped_steps"] == 1
    assert stats["steps"] == 1

    # the next finite step trains as usual
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = sm.train_step((x,))
    assert loss == loss and loss > 0
    assert any(not torch.equal(p.detach(), before[n]) for n, p in sm.local_parameters().items())
    assert sm.stats()["skipped_steps"] == 1 and sm.stats()["steps"] == 2


def test_train_step_without_optimizer(no_launcher_env):
    x = torch.randn(8, 4)
    sm = autoshard.autoshard(_Regression(), Mesh(), example_inputs=(x,))
    with pytest.raises(RuntimeError, match="optimizer") as ei:
        sm.train_step((x,))
    assert "autoshard(..., optimizer=" in str(ei.value)
    # inference still works without one
    torch.testing.assert_close(sm(x), _reference_loss(sm, x))


def _reference_loss(sm, x):
    lin = sm.local_parameters()
    return (x @ lin["lin.weight"].detach().T + lin["lin.bias"].detach()).pow(2).mean()
