"""Per-step agreement between ranks (runtime/guards.py): desynchronised ranks, token ids outside the
vocabulary, non-finite gradients, unequal or different batches. Two launches of 2 ranks each: one at
tp=2, one at dp=2; each walks through its cases in order on one ShardedModule."""

from __future__ import annotations

import math
import os
import time

import pytest
import torch

import autoshard
from parity import FlagGrad

pytestmark = pytest.mark.slow

VOCAB, SEQ = 64, 8


def _model() -> torch.nn.Module:
    from autoshard.examples.gpt import make_model

    torch.manual_seed(0)
    return make_model(vocab_size=VOCAB, seq_len=SEQ, d_model=32, n_heads=2, d_ff=64, n_layers=1)


def _tokens(step: int, rows: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, VOCAB, (rows, SEQ), generator=g)


def _attempt(fn) -> tuple[str, str]:
    try:
        return "ok", repr(fn())
    except Exception as e:  # noqa: BLE001 - reported to the test
        return type(e).__name__, str(e)


def _tp_worker() -> dict:
    """tp=2 (vocab-parallel embedding): non-finite gradients, ids out of range, different batches."""
    mesh = autoshard.Mesh(tp=2)

    def loss_fn(out, target):
        # a target (tokens, flag) poisons the gradient where flag is set: the loss is traced once per
        # input signature (the step program), so the poison is data, not Python state
        tokens, flag = target if isinstance(target, tuple) else (target, None)
        loss = torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        return FlagGrad.apply(loss, flag, float("nan")) if flag is not None else loss

    sm = autoshard.autoshard(_model(), mesh, example_inputs=(_tokens(0),), loss_fn=loss_fn,
                             optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    res: dict = {}
    res["normal"] = _attempt(lambda: sm.train_step((_tokens(0),), _tokens(0)))
    res["nan_grads"] = _attempt(lambda: sm.train_step((_tokens(1),), (_tokens(1), torch.tensor(True))))
    res["nan_grads_skipped"] = sm.stats()["skipped_steps"]
    res["params_finite"] = all(bool(torch.isfinite(p).all()) for p in sm.local_parameters().values())
    bad = _tokens(2).clone()
    bad[0, 3] = -100
    res["bad_ids"] = _attempt(lambda: sm.train_step((bad,), _tokens(2)))
    big = _tokens(2).clone()
    big[1, 0] = VOCAB
    res["big_ids"] = _attempt(lambda: sm.train_step((big,), _tokens(2)))
    mine = _tokens(3)
    if mesh.rank == 1:  # the same tokens in another order: same sum, different batch
        mine = mine.flip(1).contiguous()
    res["permuted"] = _attempt(lambda: sm.train_step((mine,), mine))
    target = _tokens(4).clone()
    target[:, -2:] = -100  # ignored labels in the target are fine
    res["after"] = _attempt(lambda: sm.train_step((_tokens(4),), target))
    os.environ["AUTOSHARD_CHECK_INPUTS"] = "0"
    res["permuted_unchecked"] = _attempt(lambda: sm.train_step((mine,), mine))
    res["steps"] = sm.stats()["steps"]
    return res


class _DataDependent(torch.nn.Module):  # torch.export cannot capture it: the eager fallback runs it
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x) if x.sum() > 0 else -self.lin(x)


def _eager_nan_grads(mesh) -> dict:
    """The eager data-parallel fallback at zero=0: a finite loss with NaN gradients skips the step."""
    import warnings

    poison = {"on": False}

    def loss_fn(out, _):
        loss = out.pow(2).mean()
        return loss + 0 * torch.sqrt(out.sum() * 0) if poison["on"] else loss

    torch.manual_seed(0)
    x = torch.rand(2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sm = autoshard.autoshard(_DataDependent(), mesh, example_inputs=(x,), loss_fn=loss_fn,
                                 optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
        first = _attempt(lambda: sm.train_step((x,)))
        poison["on"] = True
        poisoned = _attempt(lambda: sm.train_step((x,)))
    return {"fallback": getattr(sm, "fallback", None), "first": first, "poisoned": poisoned,
            "skipped": sm.stats().get("skipped_steps"),
            "finite": all(bool(torch.isfinite(p).all()) for p in sm.local_parameters().values())}


def _dp_worker() -> dict:
    """dp=2: unequal local batches, then a rank whose train_step raises once and is caught."""
    # a loss_fn that raises on one rank at one step is Python state: the step program traces the loss once
    # per input signature, so this walk-through runs on the interpreted executor (the tp walk-through above
    # checks the same per-step agreement on the step program)
    os.environ["AUTOSHARD_EXECUTOR"] = "interpreted"
    mesh = autoshard.Mesh(dp=2)
    fail = {"on": False}

    def loss_fn(out, tokens):
        if fail["on"] and mesh.rank == 1:
            fail["on"] = False
            raise RuntimeError("a bad batch on rank 1")
        return torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))

    sm = autoshard.autoshard(_model(), mesh, example_inputs=(_tokens(0),), loss_fn=loss_fn,
                             optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    res: dict = {}
    res["normal"] = _attempt(lambda: sm.train_step((_tokens(0),), _tokens(0)))
    rows = 2 + mesh.rank
    res["unequal"] = _attempt(lambda: sm.train_step((_tokens(1, rows),), _tokens(1, rows)))
    res["normal_again"] = _attempt(lambda: sm.train_step((_tokens(2),), _tokens(2)))
    res["eager"] = _eager_nan_grads(mesh)
    fail["on"] = True
    t0 = time.monotonic()
    res["desync"] = []
    for step in range(3, 7):  # the user catches the exception and goes on
        r = _attempt(lambda s=step: sm.train_step((_tokens(s),), _tokens(s)))
        res["desync"].append(r)
        if r[0] == "DesyncError":
            break
    res["desync_s"] = time.monotonic() - t0
    return res


@pytest.fixture(scope="module")
def tp_run():
    return autoshard.launch(_tp_worker, 2, device="cpu", timeout=240, collective_timeout=30)


@pytest.fixture(scope="module")
def dp_run():
    return autoshard.launch(_dp_worker, 2, device="cpu", timeout=240, collective_timeout=30)


def test_nonfinite_gradients_skip_the_step_at_zero0(tp_run):
    for r in tp_run:
        assert r["normal"][0] == "ok"
        kind, value = r["nan_grads"]
        assert kind == "ok" and math.isfinite(float(value))  # the loss was finite
        assert r["nan_grads_skipped"] == 1
        assert r["params_finite"]


@pytest.mark.parametrize("case", ["bad_ids", "big_ids"])
def test_token_ids_outside_the_vocabulary_raise_index_error_at_tp2(tp_run, case):
    for r in tp_run:
        kind, msg = r[case]
        assert kind == "IndexError", (kind, msg)
        assert f"[0, {VOCAB})" in msg and "index out of range" in msg and "input args[0]" in msg


def test_ranks_of_a_tp_group_fed_different_batches_raise_every_step(tp_run):
    for r in tp_run:
        kind, msg = r["permuted"]
        assert kind == "ValueError" and "differ only in tp" in msg, (kind, msg)
        assert r["after"][0] == "ok"  # the ranks stay in step after a refused batch
        assert r["permuted_unchecked"][0] == "ok"  # AUTOSHARD_CHECK_INPUTS=0 turns it off


def test_unequal_local_batches_are_refused(dp_run):
    for r in dp_run:
        kind, msg = r["unequal"]
        assert kind == "ValueError", (kind, msg)
        assert "data rank 0: 2 rows" in msg and "data rank 1: 3 rows" in msg
        assert r["normal_again"][0] == "ok"


def test_a_caught_exception_on_one_rank_fails_every_rank_with_a_desync_error(dp_run):
    r0, r1 = dp_run
    assert r1["desync"][0] == ("RuntimeError", "a bad batch on rank 1")
    for r in (r0, r1):
        kind, msg = r["desync"][-1]
        assert kind == "DesyncError", r["desync"]
        assert "out of step" in msg and "rank 0" in msg and "rank 1" in msg and "ranks [1] are ahead" in msg
        assert r["desync_s"] < 20  # not the collective timeout


def test_nonfinite_gradients_skip_the_step_in_the_eager_fallback(dp_run):
    for r in dp_run:
        e = r["eager"]
        assert e["fallback"] == "eager-data-parallel"
        assert e["first"][0] == "ok" and e["poisoned"][0] == "ok", e
        assert e["skipped"] == 1 and e["finite"], e
