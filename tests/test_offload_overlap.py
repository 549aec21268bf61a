"""The offload pipeline: per-bucket host work on a worker thread, overlapped with backward and uploads.

With ``offload`` set, ``offload_overlap=True`` (the default) hands each bucket's reduced gradient to
a worker thread during backward (unscale and norm pass) and steps the buckets there, one after the
other, while the calling thread uploads and all-gathers those already stepped. It must compute
exactly what the serial path (``offload_overlap=False``) computes, and what the unmodified model
computes (contract 1). One 2-rank launch (Gloo, CPU) for the module.

With ``offload="optimizer"`` these plans run as a step program that ends at the reduced gradients (the
update stays on the host: ``executor`` "step-program", the plan's note says "the update by the ZeRO
memory manager"; at ZeRO-3 the program gathers from copies of the shards in the compute dtype: on the
device, refreshed after each update, or with ``offload="params"`` the pinned host slices, copied up inside
the program);
the buckets then reach the worker after the program, not during an eager backward, which the
interpreted executor still does (``AUTOSHARD_EXECUTOR=interpreted``) and one test checks.
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
import tempfile
import threading

import pytest
import torch

import autoshard
from autoshard.runtime.checkpoint import read_manifest
from autoshard.runtime.zero import BucketOptimizers
from parity import STEPS, FlagGrad, batch, check, inputs, make_model, make_optimizer, reference, rel

pytestmark = pytest.mark.slow

SMALL_BUCKETS = 0.05  # MiB: the test GPT falls into many buckets at ZeRO-1/2, so the pipeline has depth
# (optimizer, options); each runs with the pipeline on and off
CASES = [
    ("sgd", {"zero": 1, "offload": "optimizer", "bucket_mb": SMALL_BUCKETS}),
    ("adamw", {"zero": 2, "offload": "optimizer", "bucket_mb": SMALL_BUCKETS, "grad_clip": 0.5}),
    ("sgd", {"zero": 3, "offload": "optimizer", "grad_clip": 0.5}),
    ("adamw", {"zero": 3, "offload": "params"}),
]
LR_DECAY = 0.5  # the LR scheduler test: lr × 0.5 per step



def _rows(mesh) -> slice:
    per = batch(0).shape[0] // mesh.data_size
    return slice(mesh.data_rank * per, (mesh.data_rank + 1) * per)


def _build(opt: str, options: dict, overlap: bool, *, loss_fn=None, threads: list | None = None):
    """A sharded test GPT on dp=2; ``threads`` collects the thread each bucket optimizer stepped on."""
    mesh = autoshard.Mesh(dp=2)
    inp, _, default_loss = inputs("gpt", batch(0)[_rows(mesh)])
    factory = make_optimizer(opt)

    def optimizer(ps):
        o = factory(ps)
        if threads is not None:
            o.register_step_pre_hook(lambda *_: threads.append(threading.current_thread().name))
        return o

    sm = autoshard.autoshard(make_model("gpt"), mesh, example_inputs=inp, loss_fn=loss_fn or default_loss,
                             optimizer=optimizer, offload_overlap=overlap, **options)
    return sm, _rows(mesh)


def _train(sm, rows: slice, steps: range) -> list[float]:
    return [sm.train_step(*inputs("gpt", batch(s)[rows])[:2]) for s in steps]


def _case(opt: str, options: dict, overlap: bool, interpreted: bool = False) -> dict:
    threads: list[str] = []
    if interpreted:
        os.environ["AUTOSHARD_EXECUTOR"] = "interpreted"
    try:
        sm, rows = _build(opt, options, overlap, threads=threads)
    finally:
        os.environ.pop("AUTOSHARD_EXECUTOR", None)
    z = sm._zero
    during_backward = []  # per bucket handed over: was autograd still running?
    complete = z._complete

    def spy(i, payload):
        during_backward.append(torch._C._current_autograd_node() is not None)
        complete(i, payload)

    z._complete = spy
    losses = _train(sm, rows, range(STEPS))
    out = {"losses": losses, "state": sm.full_state_dict(), "stats": sm.stats(), "buckets": len(z.zbuckets),
           "threads": sorted(set(threads)), "updates": len(threads), "during_backward": during_backward,
           "explain": sm.plan.explain(), "plan_zero": dict(sm.plan.zero), "executor": sm.executor}
    sm.close()
    return out


def _fp16(overlap: bool) -> dict:
    """The fp16 scaler with injected infinite gradients, as tests/test_zero.py, under offload."""

    def loss_fn(out, target):
        tokens, poison = target  # a flag in the data, not a Python switch: the step program traces the loss once
        logits = out.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, out.shape[-1]), tokens[:, 1:].reshape(-1))
        return FlagGrad.apply(loss, poison, float("inf"))

    sm, rows = _build("adamw", {"zero": 2, "offload": "optimizer", "precision": "fp16", "bucket_mb": SMALL_BUCKETS},
                      overlap, loss_fn=loss_fn)
    w = sm.local_parameters()["blocks.0.mlp.fc.weight"]
    scales, moved = [], []
    for step in range(5):
        poison = torch.tensor(step in (1, 2))  # two overflows in a row: hysteresis 2 halves the scale on the second
        before = w.detach().clone()
        inp, tokens, _ = inputs("gpt", batch(step)[rows])
        sm.train_step(inp, (tokens, poison))
        scales.append(sm.stats()["loss_scale"])
        moved.append(bool((w.detach() != before).any()))
    out = {"scales": scales, "moved": moved, "skipped": sm.stats()["skipped_steps"], "state": sm.full_state_dict()}
    sm.close()
    return out


def _checkpoint(path: str) -> dict:
    """Save with the pipeline on; resume with it on, off, and without offload: each goes on as the original."""
    options = {"zero": 2, "offload": "optimizer", "bucket_mb": SMALL_BUCKETS}
    sm, rows = _build("adamw", options, True)
    _train(sm, rows, range(2))
    sm.save(path)
    straight = _train(sm, rows, range(2, 4))
    want = sm.full_state_dict()
    out = {"manifest_optimizer": read_manifest(path)["optimizer"], "states": len(sm.optimizer.state),
           "buckets": len(sm._zero.zbuckets), "resumed": {}}
    plain = {"zero": 2, "bucket_mb": SMALL_BUCKETS}
    for name, overlap, opts in (("overlap", True, options), ("serial", False, options),
                                ("no_offload", True, plain), ("step_program", True, plain)):
        # bitwise: the same executor's arithmetic; the step program (its own AdamW formula) within bounds
        interpreted = name == "no_offload"
        if interpreted:
            os.environ["AUTOSHARD_EXECUTOR"] = "interpreted"
        try:
            fresh, _ = _build("adamw", opts, overlap)
        finally:
            os.environ.pop("AUTOSHARD_EXECUTOR", None)
        autoshard.load(path, fresh)
        losses = _train(fresh, rows, range(2, 4))
        got = fresh.full_state_dict()
        if name == "step_program":
            out["resumed"][name] = {"executor": fresh.executor,
                                    "loss_rel": max(abs(a - b) / abs(b) for a, b in zip(losses, straight)),
                                    "param_rel": max(rel(got[k], v) for k, v in want.items()
                                                     if v.is_floating_point() and v.norm() > 0)}
        else:
            out["resumed"][name] = {"losses_equal": losses == straight,
                                    "differ": [k for k in want if not torch.equal(want[k], got[k])]}
        fresh.close()
    sm.close()
    return out


def _scheduled() -> dict:
    """An LR scheduler attached to sm.optimizer drives every bucket's optimizer."""
    sm, rows = _build("sgd", {"zero": 2, "offload": "optimizer", "bucket_mb": SMALL_BUCKETS}, True)
    sched = torch.optim.lr_scheduler.LambdaLR(sm.optimizer, lambda s: LR_DECAY ** s)
    losses = []
    for s in range(3):
        losses.append(_train(sm, rows, range(s, s + 1))[0])
        sched.step()
    groups = [g["lr"] for g in sm.optimizer.param_groups]
    inner = [g["lr"] for o in sm._zero.bucket_optimizers for g in o.param_groups]
    out = {"losses": losses, "state": sm.full_state_dict(), "groups": groups, "inner": inner,
           "buckets": len(sm._zero.zbuckets), "view": type(sm.optimizer).__name__}
    sm.close()
    return out


def _world(path: str) -> dict:
    return {
        "cases": [{ov: _case(opt, options, ov) for ov in (True, False)} for opt, options in CASES],
        "interpreted": _case(*CASES[1], True, interpreted=True),
        "fp16": {ov: _fp16(ov) for ov in (True, False)},
        "checkpoint": _checkpoint(path),
        "scheduled": _scheduled(),
    }


@pytest.fixture(scope="module")
def world():
    tmp = tempfile.mkdtemp(prefix="autoshard-offload-")
    try:
        yield autoshard.launch(_world, 2, os.path.join(tmp, "ckpt"), device="cpu")[0]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@functools.cache
def _ref(opt: str, clip: float | None):
    return reference("gpt", opt, grad_clip=clip)


def _id(c) -> str:
    return f"{c[0]}-" + "-".join(f"{k}{v}" for k, v in c[1].items())


@pytest.mark.parametrize("i", range(len(CASES)), ids=[_id(c) for c in CASES])
def test_pipeline_matches_model_and_serial_path_bitwise(world, i):
    opt, options = CASES[i]
    on, off = world["cases"][i][True], world["cases"][i][False]
    check(on, _ref(opt, options.get("grad_clip")), opt)  # contract 1 against the unmodified model
    assert on["losses"] == off["losses"]
    assert [k for k in on["state"] if not torch.equal(on["state"][k], off["state"][k])] == []
    assert on["plan_zero"]["offload_overlap"] is True and off["plan_zero"]["offload_overlap"] is False
    assert "pipelined per bucket" in on["explain"]
    # forward, backward and reduction as a step program, the update on the host
    assert on["executor"] == off["executor"] == "step-program"
    assert "the update by the ZeRO memory manager" in on["explain"]


@pytest.mark.parametrize("i", range(len(CASES)), ids=[_id(c) for c in CASES])
def test_pipeline_steps_buckets_on_the_worker(world, i):
    on, off = world["cases"][i][True], world["cases"][i][False]
    assert on["buckets"] > 1
    assert on["updates"] == off["updates"] == on["buckets"] * STEPS  # every bucket steps once per step
    assert on["threads"] == ["autoshard-offload_0"] and off["threads"] == ["MainThread"]
    for r in (on, off):
        assert r["stats"]["offload_host_s"] > 0 and r["stats"]["offload_wait_s"] >= 0


def test_gradients_reach_the_worker_during_backward(world):
    on = world["interpreted"]  # ZeRO-2, many buckets, eager backward: the oldest drain while backward still runs
    assert on["executor"] == "interpreted"
    assert any(on["during_backward"]) and not all(on["during_backward"])  # the last ones drain in finish()
    check(on, _ref("adamw", 0.5), "adamw")
    assert world["cases"][1][True]["during_backward"] == []  # the step program hands buckets over after it ran


def test_fp16_overflow_skips_and_halves_under_the_pipeline(world):
    s0 = 2.0**16
    for overlap in (True, False):
        r = world["fp16"][overlap]
        assert r["scales"] == [s0, s0, s0 / 2, s0 / 2, s0 / 2]
        assert r["moved"] == [True, False, False, True, True]
        assert r["skipped"] == 2
    on, off = world["fp16"][True]["state"], world["fp16"][False]["state"]
    assert [k for k in on if not torch.equal(on[k], off[k])] == []


def test_checkpoint_resumes_bitwise_with_offload(world):
    r = world["checkpoint"]
    assert r["manifest_optimizer"] == "AdamW"  # the user's optimizer, not the per-bucket view
    assert r["states"] == r["buckets"] > 1  # one state entry per bucket master
    for name in ("overlap", "serial", "no_offload"):
        assert r["resumed"][name] == {"losses_equal": True, "differ": []}, name
    # the same checkpoint resumed on the step program (no offload): the same training within DESIGN's bounds
    sp = r["resumed"]["step_program"]
    assert sp["executor"] == "step-program"
    assert sp["loss_rel"] <= 1e-5 and sp["param_rel"] <= 1e-3, sp


def test_lr_scheduler_drives_every_bucket(world):
    r = world["scheduled"]
    base = 0.5  # parity.make_optimizer("sgd")
    assert r["view"] == "BucketOptimizers" and r["buckets"] > 1
    assert r["groups"] == r["inner"] == [base * LR_DECAY**3] * r["buckets"]
    # the unmodified model under the same schedule: the parameters agree (contract 1, SGD)
    model = make_model("gpt")
    optim = torch.optim.SGD(model.parameters(), lr=base)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: LR_DECAY ** s)
    losses = []
    for s in range(3):
        inp, target, loss_fn = inputs("gpt", batch(s))
        loss = loss_fn(model(*inp), target)
        optim.zero_grad()
        loss.backward()
        optim.step()
        sched.step()
        losses.append(loss.item())
    check(r, (losses, model.state_dict()), "sgd")


# ------------------------------------------------------------------ the optimizer view, one process
def _two_buckets():
    torch.manual_seed(0)
    masters = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3))]
    return masters, BucketOptimizers([torch.optim.AdamW([m], lr=0.1) for m in masters])


def _step(masters, opt, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in masters:
        m.grad = torch.randn(m.shape, generator=g)
    opt.step()


def test_view_state_dict_round_trip_and_state_mapping():
    masters, opt = _two_buckets()
    _step(masters, opt, 1)
    assert len(opt.state) == 2 and all(m in opt.state for m in masters)
    assert opt.state.get(torch.zeros(1)) is None and opt.kind == "AdamW"
    sd = copy.deepcopy(opt.state_dict())  # as a save does: state_dict() hands out the live tensors
    assert len(sd["param_groups"]) == 2 and sorted(sd["state"]) == [0, 1]
    fresh_masters, fresh = _two_buckets()
    for a, b in zip(masters, fresh_masters):
        b.data.copy_(a.data)
    fresh.load_state_dict(sd)
    for a, b in zip(masters, fresh_masters):
        assert torch.equal(opt.state[a]["exp_avg"], fresh.state[b]["exp_avg"])
    _step(masters, opt, 2)
    _step(fresh_masters, fresh, 2)
    assert all(torch.equal(a, b) for a, b in zip(masters, fresh_masters))  # resumed exactly
    opt.state.clear()
    assert len(opt.state) == 0


def test_view_rejects_new_groups_and_runs_hooks_once():
    masters, opt = _two_buckets()
    calls = []
    opt.register_step_post_hook(lambda *_: calls.append(1))
    _step(masters, opt, 1)
    assert calls == [1]  # one step of the view, whatever the number of buckets
    with pytest.raises(NotImplementedError, match="cannot be added"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))]})
    with pytest.raises(AttributeError, match="param_groups"):
        opt.param_groups = []
