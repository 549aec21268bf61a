"""Runtime behaviour on 2 Gloo ranks: plan fingerprints, input checks, forward, new input shapes."""

from __future__ import annotations

import pytest
import torch

import autoshard
from parity import SEQ, VOCAB, batch, gpt_loss, make_model

pytestmark = pytest.mark.slow


def _worker() -> dict:
    import torch.distributed as dist

    out: dict = {}
    rank = dist.get_rank() if dist.is_initialized() else int(__import__("os").environ["RANK"])
    # 1. ranks that build different plans (here: different example shapes) fail loudly, on every rank
    model = make_model("gpt")
    x = batch(0)[: 2 + rank]
    try:
        autoshard.autoshard(model, autoshard.Mesh(tp=2), example_inputs=(x,), loss_fn=gpt_loss,
                            optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
        out["mismatch"] = None
    except autoshard.PlanMismatchError as e:
        out["mismatch"] = str(e)
    # 2. tp ranks must see the same batch
    mesh = autoshard.Mesh(tp=2)
    x = batch(0)[:4]
    sm = autoshard.autoshard(make_model("gpt"), mesh, example_inputs=(x,), loss_fn=gpt_loss,
                             optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    try:
        sm.train_step((batch(mesh.rank)[:4],), None)
        out["same_inputs"] = None
    except ValueError as e:
        out["same_inputs"] = str(e)
    # 3. forward: full output of the model's own type, equal to the unmodified model
    hf = make_model("llama")
    ref_model = make_model("llama")
    sm2 = autoshard.autoshard(hf, mesh, example_inputs={"input_ids": x}, loss_fn=lambda o, t: o.logits.mean(),
                              optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    got = sm2(input_ids=x)
    want = ref_model(input_ids=x)
    out["forward_type"] = (type(got).__name__, type(want).__name__)
    out["forward_err"] = float((got.logits - want.logits).abs().max())
    # 4. a new input signature (a smaller last batch) is captured again with the same layouts
    y = batch(3)[:3]
    got_small = sm2(input_ids=y).logits
    out["small_err"] = float((got_small - ref_model(input_ids=y).logits).abs().max())
    out["programs"] = sm2.stats()["programs"]
    out["stats_keys"] = sorted(sm2.stats())
    return out


@pytest.fixture(scope="module")
def results():
    return autoshard.launch(_worker, 2, device="cpu")


def test_plan_mismatch_is_an_error_on_every_rank(results):
    for r in results:
        assert r["mismatch"] is not None and "different plan" in r["mismatch"]


def test_tp_ranks_must_load_the_same_batch(results):
    for r in results:
        assert r["same_inputs"] is not None and "data_rank" in r["same_inputs"]


def test_forward_returns_full_output_of_the_model_type(results):
    for r in results:
        assert r["forward_type"] == ("CausalLMOutputWithPast", "CausalLMOutputWithPast")
        assert r["forward_err"] < 1e-5


def test_new_input_shape_gets_its_own_program(results):
    for r in results:
        assert r["small_err"] < 1e-5
        assert r["programs"] == 2
        assert {"comm_bytes_per_step", "tp_comm_bytes", "dp_comm_bytes", "steps"} <= set(r["stats_keys"])


def test_shapes_used_here_are_consistent():
    assert batch(0).shape == (8, SEQ) and int(batch(0).max()) < VOCAB
