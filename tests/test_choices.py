"""Choices: the one object every way in fills (autoshard(), Mesh.auto(), bench systems, the plan record)."""

from __future__ import annotations

import json

import pytest

import autoshard
from autoshard import Choices, PlanError
from parity import batch, inputs, make_model, make_optimizer


@pytest.mark.parametrize("options, names", [
    ({"zero": 4}, "zero=4"), ({"zero": True}, "zero=True"), ({"precision": "fp8"}, "precision='fp8'"),
    ({"offload": "disk"}, "offload='disk'"), ({"offload": "params"}, "zero=3"), ({"prefetch": -1}, "prefetch=-1"),
    ({"grad_clip": 0}, "grad_clip=0"), ({"bucket_mb": 0}, "bucket_mb=0"), ({"schedule": "pipedream"}, "schedule="),
    ({"microbatches": 0}, "microbatches=0"), ({"virtual_stages": 0}, "virtual_stages=0"),
    ({"split_points": [""]}, "split_points"), ({"capacity_factor": -1.0}, "capacity_factor"),
    ({"fuse": "yes"}, "fuse='yes'"), ({"offload_overlap": 1}, "offload_overlap"), ({"attention": 3}, "attention=3"),
])
def test_each_bad_value_names_its_option(options, names):
    with pytest.raises(PlanError, match=names.replace("(", r"\(").replace("[", r"\[")):
        Choices(**options).validate()


def test_json_round_trip_pinned_and_replace():
    c = Choices(zero=2, precision="bf16", activation_checkpointing=["model.layers.0"], split_points=["a.b"])
    assert c.activation_checkpointing == ("model.layers.0",) and hash(c)  # lists become tuples: hashable
    d = json.loads(json.dumps(c.to_dict()))
    assert Choices.from_dict(d) == c
    assert c.pinned() == {"zero": 2, "precision": "bf16", "activation_checkpointing": ("model.layers.0",),
                          "split_points": ("a.b",)}
    assert c.replace(zero=3).zero == 3 and c.zero == 2  # frozen: a copy
    with pytest.raises(PlanError, match="unknown option"):
        c.replace(zer0=1)
    with pytest.raises(PlanError, match="unknown key"):
        Choices.from_dict({**d, "tp": 2})
    with pytest.raises(PlanError, match="zero=7"):
        Choices.from_dict({**d, "zero": 7})


def test_autoshard_records_what_it_was_asked():
    inp, _, loss_fn = inputs("gpt", batch(0))
    sm = autoshard.autoshard(make_model("gpt"), autoshard.Mesh(), example_inputs=inp, loss_fn=loss_fn,
                             optimizer=make_optimizer("sgd"), grad_clip=1.0, bucket_mb=1.0)
    assert sm.choices == Choices(grad_clip=1.0, bucket_mb=1.0)
    assert Choices.from_dict(sm.plan.choices) == sm.choices
    assert "Options asked for: bucket_mb=1.0, grad_clip=1.0" in sm.plan.explain()
    same = autoshard.build(make_model("gpt"), autoshard.Mesh(), inp, loss_fn=loss_fn, optimizer=make_optimizer("sgd"),
                           choices=sm.choices)
    assert same.plan.fingerprint == sm.plan.fingerprint  # one object in, the same plan out
    with pytest.raises(PlanError, match="grad_clip=-1"):  # before anything is captured
        autoshard.autoshard(make_model("gpt"), autoshard.Mesh(), example_inputs=inp, loss_fn=loss_fn,
                            optimizer=make_optimizer("sgd"), grad_clip=-1)
