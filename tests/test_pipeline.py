"""Pipeline parallelism: parity (contract 1) for every schedule and 3-D compositions, stage cuts,
in-flight activations per rank, and plan-time errors.

One launch per world size (2, 4 and 8 Gloo ranks) runs all of that size's cases.
"""

from __future__ import annotations

import functools

import pytest
import torch

import autoshard
from autoshard.runtime.errors import ScheduleError
from parity import batch, check, gpt_loss, inputs, make_model, reference, run_cases

SCHEDULES = [
    {"schedule": "gpipe", "microbatches": 2},
    {"schedule": "1f1b", "microbatches": 4},
    {"schedule": "zero_bubble", "microbatches": 4},
    {"schedule": "interleaved_1f1b", "virtual_stages": 2, "microbatches": 4},
]
MODELS = ["gpt", "llama", "gpt2"]
CASES_2 = [(k, opt, {"pp": 2}, o) for k in MODELS for opt in ("sgd", "adamw") for o in SCHEDULES]
CASES_4 = [(k, o, d, {"microbatches": 4}) for k in MODELS for o in ("sgd", "adamw")
           for d in ({"pp": 4}, {"pp": 2, "tp": 2}, {"pp": 2, "dp": 2})]
CASES_8 = [(k, o, {"pp": 2, "dp": 2, "tp": 2}, {"microbatches": 2}) for k in MODELS for o in ("sgd", "adamw")]

pytestmark = pytest.mark.slow


def _id(case) -> str:
    kind, opt, deg, o = case
    return f"{kind}-{opt}-{'x'.join(f'{k}{v}' for k, v in deg.items())}-{o.get('schedule', '1f1b')}"


def _inflight_worker() -> list[dict]:
    """Peak microbatches held per rank under 1F1B and GPipe (pp=2, m=4), measured by the executor."""
    out = []
    for schedule in ("1f1b", "gpipe"):
        mesh = autoshard.Mesh(pp=2)
        inp, target, loss_fn = inputs("gpt", batch(0))
        sm = autoshard.autoshard(make_model("gpt"), mesh, example_inputs=inp, loss_fn=loss_fn,
                                 optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1), schedule=schedule, microbatches=4)
        sm.train_step(inp, target)
        sim = sm.schedule.simulate()
        out.append({"schedule": schedule, "measured": sm.stats()["pp_peak_inflight"],
                    "simulated": sim.peak_inflight[mesh.coord("pp")], "render": sm.schedule.render(),
                    "forward_is_none": sm(*inp) is None})
    return out


def _world2() -> dict:
    return {"cases": run_cases(CASES_2), "inflight": _inflight_worker()}


@pytest.fixture(scope="module")
def world2():
    return autoshard.launch(_world2, 2, device="cpu")


@pytest.fixture(scope="module")
def world4():
    return dict(zip(map(repr, CASES_4), autoshard.launch(run_cases, 4, CASES_4, device="cpu")[0]))


@pytest.fixture(scope="module")
def world8():
    return dict(zip(map(repr, CASES_8), autoshard.launch(run_cases, 8, CASES_8, device="cpu")[0]))


@functools.cache
def _ref(kind: str, opt: str):
    return reference(kind, opt)


@pytest.mark.parametrize("i", range(len(CASES_2)), ids=[_id(c) for c in CASES_2])
def test_pp2_every_schedule(world2, i):
    kind, opt, _, options = CASES_2[i]
    result = world2[0]["cases"][i]
    check(result, _ref(kind, opt), opt)
    pipe = result["plan"]["pipeline"]
    assert pipe["schedule"] == options["schedule"]
    assert len(pipe["stages"]) == 2 * options.get("virtual_stages", 1)
    assert result["stats"]["pp_comm_bytes"] > 0
    assert "rank 0 |" in result["schedule"] and "rank 1 |" in result["schedule"]


@pytest.mark.parametrize("case", CASES_4, ids=_id)
def test_four_ranks(world4, case):
    result = world4[repr(case)]
    check(result, _ref(case[0], case[1]), case[1])
    if "tp" in case[2]:
        assert result["stats"]["tp_comm_bytes"] > 0
    if "dp" in case[2]:
        assert result["stats"]["dp_comm_bytes"] > 0


@pytest.mark.parametrize("case", CASES_8, ids=_id)
def test_3d_eight_ranks(world8, case):
    check(world8[repr(case)], _ref(case[0], case[1]), case[1])


def test_tied_embedding_gradients_are_summed_across_stages(world2):
    # GPT-2 ties wte and lm_head, which land on different stages
    result = world2[0]["cases"][[c[0] for c in CASES_2].index("gpt2")]
    assert result["plan"]["pipeline"]["shared_params"] == {"lm_head.weight": [0, 1]}


def test_inflight_activations_bounded_by_pp_under_1f1b(world2):
    for rank, per_rank in enumerate(world2):
        one_f_one_b, gpipe = per_rank["inflight"]
        assert one_f_one_b["measured"] == one_f_one_b["simulated"] == 2 - rank  # ≤ pp, stage 0 holds pp
        assert gpipe["measured"] == gpipe["simulated"] == 4  # GPipe holds all m microbatches
        assert one_f_one_b["forward_is_none"] == (rank == 0)  # output lives on the last stage


# ---------------------------------------------------------------------------- plan-time errors
def _plan(mesh, **options):
    inp, target, loss_fn = inputs("gpt", batch(0))
    return autoshard.autoshard(make_model("gpt"), mesh, example_inputs=inp, loss_fn=gpt_loss, **options)


def test_more_stages_than_blocks():
    with pytest.raises(autoshard.PlanError, match="4 repeated blocks"):
        _plan(autoshard.Mesh.virtual(pp=8))


def test_too_few_microbatches_for_1f1b():
    with pytest.raises(ScheduleError, match="microbatches"):
        _plan(autoshard.Mesh.virtual(pp=4), microbatches=2)


def test_batch_not_divisible_by_microbatches():
    with pytest.raises(autoshard.PlanError, match="does not split into 3 microbatches"):
        _plan(autoshard.Mesh.virtual(pp=2), microbatches=3)


def test_split_point_naming_no_module():
    with pytest.raises(autoshard.PlanError, match="names no module"):
        _plan(autoshard.Mesh.virtual(pp=2), split_points=["blocks.9"])


def test_split_points_choose_the_cut():
    sm = _plan(autoshard.Mesh.virtual(pp=2), split_points=["blocks.3"], microbatches=2)
    assert sm.plan.pipeline["split_points"] == ["blocks.3"]
    assert "blocks.3" in sm.plan.explain()


def test_pipeline_options_need_pp():
    with pytest.raises(autoshard.PlanError, match="need a pipeline"):
        _plan(autoshard.Mesh(), microbatches=4)


def test_balanced_cuts_on_virtual_mesh():
    sm = _plan(autoshard.Mesh.virtual(pp=2), microbatches=2)
    stages = sm.plan.pipeline["stages"]
    assert [s["blocks"] for s in stages] == [[0, 1], [2, 3]]
