"""Activation checkpointing: chosen blocks keep only their inputs and recompute their forward in backward.

Contract 1 against the unmodified model on one process for checkpointed runs under dp=2, tp=2 (with
fused kernels too), pp=2 (1F1B and zero bubble), ZeRO-3 and experts (ep=2, both MoE forms); dropout
(the recompute draws the same masks: a checkpointed run equals the plain one bit for bit, sharded,
and equals the unmodified model on one process); the memory autograd keeps, measured with
saved-tensor hooks, against the plan's estimate; the pass's graph; bad input; and ``Mesh.auto()``
under a budget that makes the planner checkpoint, trained on 2 ranks. One 2-rank launch for the module.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoshard
from autoshard.passes import cost_model as cm
from autoshard.passes import planner as P
from autoshard.passes.activation_checkpoint import checkpoint_blocks, find_blocks
from autoshard.runtime import hardware as H
from autoshard.runtime.recompute import checkpoint_block
from parity import (
    GLOBAL_BATCH,
    VOCAB,
    auto_sharded,
    batch,
    check,
    inputs,
    make_model,
    make_optimizer,
    reference,
    sharded,
)

GiB = 2**30
STEPS_HERE = 3  # several optimizer steps, few enough to keep the module fast
CASES = [
    ("gpt", "sgd", {"dp": 2}, {"activation_checkpointing": "all"}),
    ("gpt", "adamw", {"tp": 2}, {"activation_checkpointing": ["blocks.1", "blocks.3"], "fuse": True}),
    ("gpt", "sgd", {"pp": 2}, {"activation_checkpointing": 1, "microbatches": 4}),
    ("gpt", "adamw", {"pp": 2}, {"activation_checkpointing": "all", "microbatches": 2, "schedule": "zero_bubble"}),
    ("gpt", "adamw", {"dp": 2}, {"activation_checkpointing": 2, "zero": 3}),
    ("moe_gpt", "sgd", {"ep": 2}, {"activation_checkpointing": "all"}),
    ("mixtral", "sgd", {"ep": 2}, {"activation_checkpointing": "all", "zero": 3}),
]
DROPOUT_MESHES = [{"dp": 2}, {"tp": 2}]

pytestmark = pytest.mark.slow


# =============================================================================== a model with dropout
class DropBlock(nn.Module):
    def __init__(self, d: int, p: float) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 2 * d)
        self.out = nn.Linear(2 * d, d)
        self.drop = nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.out(self.drop(F.gelu(self.fc(self.ln(x))))))


class DropNet(nn.Module):
    """Token embedding, three residual MLP blocks with dropout inside, an LM head."""

    def __init__(self, d: int = 32, layers: int = 3, p: float = 0.25) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.layers = nn.ModuleList(DropBlock(d, p) for _ in range(layers))
        self.head = nn.Linear(d, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _lm_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def _dropnet() -> DropNet:
    torch.manual_seed(0)
    return DropNet()


def _dropout_run(degrees: dict[str, int], spec, seed: int = 7) -> dict | None:
    mesh = autoshard.Mesh(**degrees)
    per = GLOBAL_BATCH // mesh.data_size
    lo = mesh.data_rank * per
    sm = autoshard.autoshard(_dropnet(), mesh, example_inputs=(batch(0)[lo:lo + per],), loss_fn=_lm_loss,
                             optimizer=make_optimizer("sgd"), activation_checkpointing=spec)
    torch.manual_seed(seed)  # the same generator state on every rank and in both runs
    losses = [sm.train_step((batch(s)[lo:lo + per],), batch(s)[lo:lo + per]) for s in range(STEPS_HERE)]
    state = sm.full_state_dict()
    sm.close()
    return {"losses": losses, "state": state} if mesh.rank == 0 else None


# =============================================================================== the 2-rank launch
def _auto_run(budget_gib: float) -> dict | None:
    out = auto_sharded(budget_gib, steps=STEPS_HERE, profile="cpu")
    return out if out["rank"] == 0 else None


def _world2(budget_gib: float) -> dict:
    cases = [sharded(c[0], c[1], c[2], steps=STEPS_HERE, **c[3]) for c in CASES]
    dropout = [{"plain": _dropout_run(d, None), "ckpt": _dropout_run(d, "all")} for d in DROPOUT_MESHES]
    return {"cases": cases, "dropout": dropout, "auto": _auto_run(budget_gib)}


def _tight_budget() -> tuple[float, P.AutoPlan]:
    """The largest budget (in 5% steps below the free plan's memory) at which the planner checkpoints."""
    a = cm.analyse(make_model("gpt"), (batch(0),), precision="fp32", tps=(1, 2), loss="cross_entropy")
    cpu = H.get_profile("cpu")
    free = P.plan(a, 2, cpu, space=P.runtime_space())
    assert free.checkpoint_blocks == 0
    for pct in range(95, 30, -5):
        budget = free.memory_per_gpu_bytes * pct / 100 / GiB
        p = P.plan(a, 2, cpu, memory_gib=budget, space=P.runtime_space())
        if p.checkpoint_blocks:
            return budget, p
    raise AssertionError("no budget made the planner checkpoint")


@pytest.fixture(scope="module")
def tight():
    return _tight_budget()


@pytest.fixture(scope="module")
def world2(tight):
    return autoshard.launch(_world2, 2, tight[0], device="cpu")[0]


@functools.cache
def _ref(kind: str, opt: str):
    return reference(kind, opt, steps=STEPS_HERE)


def _id(c) -> str:
    return f"{c[0]}-{c[1]}-{'x'.join(f'{k}{v}' for k, v in c[2].items())}-" + "-".join(
        f"{k}{v}" for k, v in c[3].items() if k != "activation_checkpointing") + f"-ckpt{c[3]['activation_checkpointing']}"


# =============================================================================== parity
@pytest.mark.parametrize("i", range(len(CASES)), ids=[_id(c) for c in CASES])
def test_checkpointed_parity(world2, i):
    kind, opt, degrees, options = CASES[i]
    result = world2["cases"][i]
    check(result, _ref(kind, opt), opt)
    ck = result["plan"]["checkpointing"]
    assert ck["spec"] == options["activation_checkpointing"]
    stages = ck["stages"]
    assert len(stages) == degrees.get("pp", 1) and all(stages)
    if options["activation_checkpointing"] == 1:  # the first block of each pipeline rank
        assert all(len(s) == 1 for s in stages) and stages[0] == ["blocks.0"]
    if isinstance(options["activation_checkpointing"], list):
        assert stages == [options["activation_checkpointing"]]
    if options.get("fuse"):  # fused kernels inside the checkpointed blocks
        assert result["plan"]["fusions"]["regions"]
    assert "Activation checkpointing" in result["explain"]
    if "tp" in degrees:  # the row-parallel all-reduces inside each block run again in the recompute
        assert all(b["recomputed_collectives"] for b in ck["blocks"])
    if kind in ("moe_gpt", "mixtral"):  # the dispatch is in the block; its tokens are counted once
        assert all(any("moe" in c for c in b["recomputed_collectives"]) for b in ck["blocks"])
        for layer, counts in result["stats"]["expert_tokens"].items():
            assert sum(counts) == GLOBAL_BATCH * 16 * 2, layer  # every token's top-2, not twice


def test_dropout_recompute_draws_the_same_masks(world2):
    """Sharded (dp=2, tp=2): checkpointing every block changes nothing, bit for bit: the recompute
    restores the RNG state the forward started from."""
    for r in world2["dropout"]:
        plain, ckpt = r["plain"], r["ckpt"]
        assert ckpt["losses"] == plain["losses"]
        for k, v in plain["state"].items():
            assert torch.equal(ckpt["state"][k], v), k


def test_dropout_parity_with_the_unmodified_model():
    """One process: the checkpointed graph draws the masks the unmodified model draws (same seed), and
    the masks matter (another seed gives another loss)."""
    def train_ref(seed: int) -> tuple[list[float], dict]:
        model = _dropnet()
        opt = make_optimizer("sgd")(list(model.parameters()))
        torch.manual_seed(seed)
        losses = []
        for s in range(3):
            loss = _lm_loss(model(batch(s)), batch(s))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses, model.state_dict()

    sm = autoshard.autoshard(_dropnet(), autoshard.Mesh(), example_inputs=(batch(0),), loss_fn=_lm_loss,
                             optimizer=make_optimizer("sgd"), activation_checkpointing="all")
    torch.manual_seed(7)
    losses = [sm.train_step((batch(s),), batch(s)) for s in range(3)]
    ref_losses, ref_state = train_ref(7)
    check({"losses": losses, "state": sm.full_state_dict()}, (ref_losses, ref_state), "sgd")
    assert train_ref(8)[0][0] != ref_losses[0]


# =============================================================================== memory
def _saved_bytes(spec) -> tuple[int, int]:
    """(bytes autograd keeps after one forward, measured; the plan's activation estimate) on one process."""
    inp, target, loss_fn = inputs("gpt", batch(0))
    sm = autoshard.autoshard(make_model("gpt"), autoshard.Mesh(), example_inputs=inp, loss_fn=loss_fn,
                             optimizer=make_optimizer("sgd"), activation_checkpointing=spec)
    params = {p.untyped_storage().data_ptr() for p in sm.local_parameters().values()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            kept[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = sm(*inp)
    loss_fn(out, target).backward()  # the recompute runs (and must work) after the hooks are gone
    assert all(p.grad is not None for p in sm.local_parameters().values())
    return sum(kept.values()), sm.plan.memory["activations"]


def test_checkpointing_cuts_saved_activations():
    none, est_none = _saved_bytes(None)
    two, est_two = _saved_bytes(2)
    every, est_all = _saved_bytes("all")
    assert every < two < none
    assert every < 0.35 * none  # 4 blocks keep one residual-stream tensor each instead of ~20
    assert est_all < est_two < est_none
    # the estimate counts what the measurement sees, plus the one block alive during its recompute
    assert est_all >= every
    saved_per_block = (none - every) / 4
    assert abs((est_none - est_all) - (none - every)) <= saved_per_block + 0.5 * (none - every)


def test_plan_memory_adds_one_block_during_recompute():
    from autoshard.passes.activation_checkpoint import recompute_bytes

    inp, _, loss_fn = inputs("gpt", batch(0))
    sm = autoshard.autoshard(make_model("gpt"), autoshard.Mesh(), example_inputs=inp, loss_fn=loss_fn,
                             optimizer=make_optimizer("sgd"), activation_checkpointing=1)
    one = recompute_bytes(sm.module, set(sm.plan.params))
    assert one > 0
    sm2 = autoshard.autoshard(make_model("gpt"), autoshard.Mesh(), example_inputs=inp, loss_fn=loss_fn,
                              optimizer=make_optimizer("sgd"), activation_checkpointing=3)
    assert recompute_bytes(sm2.module, set(sm2.plan.params)) == one  # one block at a time, however many


# =============================================================================== the pass and the plan
def test_pass_makes_one_legible_call_per_block():
    inp, _, loss_fn = inputs("gpt", batch(0))
    sm = autoshard.autoshard(make_model("gpt"), autoshard.Mesh(), example_inputs=inp, loss_fn=loss_fn,
                             optimizer=make_optimizer("sgd"), activation_checkpointing=["blocks.1", "blocks.2"])
    g = sm.module
    calls = [n for n in g.graph.nodes if n.target is checkpoint_block]
    assert [n.name for n in calls] == ["checkpoint_blocks_1", "checkpoint_blocks_2"]
    text = str(g.graph)
    assert "autoshard.runtime.recompute.checkpoint_block" in text and "ckpt_blocks_1" in text
    assert "aten.layer_norm" in str(g.ckpt_blocks_1.graph)  # the block itself, printed on its own
    assert find_blocks(g) == ("blocks", 4)  # block membership survives for later passes
    assert sm.plan.checkpointing["stages"] == [["blocks.1", "blocks.2"]]
    assert "2 checkpointed blocks" in sm.plan.summary()
    assert checkpoint_blocks(g, [], "blocks") == []
    # fingerprints: unchanged without the option, different with it
    plain = autoshard.autoshard(make_model("gpt"), autoshard.Mesh(), example_inputs=inp, loss_fn=loss_fn,
                                optimizer=make_optimizer("sgd"))
    assert "checkpointing" not in plain.plan.to_json() or plain.plan.checkpointing == {}
    d = plain.plan.to_dict()
    d.pop("fingerprint")
    d.pop("checkpointing")
    restored = autoshard.Plan.from_json(plain.plan.to_json())
    assert restored.fingerprint == plain.plan.fingerprint != sm.plan.fingerprint
    assert autoshard.Plan.from_json(sm.plan.to_json()).checkpointing == sm.plan.checkpointing
    with torch.no_grad():  # eval and no_grad just run the blocks
        sm.eval()
        torch.testing.assert_close(sm(*inp), plain(*inp))


@pytest.mark.parametrize("bad,match", [
    (True, "'all' for every block"), (-1, "cannot be negative"), ("some", "pass None"), ([], "pass None"),
    (["blocks.0", "blocks.0"], "twice"), (["blocks.9"], "not blocks of this model"), (99, "has 4 blocks"),
    (1.5, "pass None"),
])
def test_bad_values_are_plan_errors(bad, match):
    inp, _, loss_fn = inputs("gpt", batch(0))
    with pytest.raises(autoshard.PlanError, match=match):
        autoshard.autoshard(make_model("gpt"), autoshard.Mesh(), example_inputs=inp, loss_fn=loss_fn,
                            optimizer=make_optimizer("sgd"), activation_checkpointing=bad)


def test_models_without_blocks_and_in_place_blocks_are_refused():
    mlp = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    with pytest.raises(autoshard.PlanError, match="no repeated blocks"):
        autoshard.autoshard(mlp, autoshard.Mesh(), example_inputs=(torch.randn(4, 8),),
                            loss_fn=lambda o, t: o.sum(), optimizer=make_optimizer("sgd"), activation_checkpointing="all")

    class Counting(nn.Module):  # a block that updates a buffer in place: the recompute would do it twice
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls.add_(1)
            return x + self.fc(x)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(Counting() for _ in range(2))

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    with pytest.raises(autoshard.PlanError, match="in place"):
        autoshard.autoshard(Net(), autoshard.Mesh(), example_inputs=(torch.randn(4, 8),),
                            loss_fn=lambda o, t: o.sum(), optimizer=make_optimizer("sgd"), activation_checkpointing="all")


def test_mesh_auto_rejects_a_list():
    from autoshard.auto import plan_for

    with pytest.raises(autoshard.PlanError, match="needs a fixed mesh"):
        plan_for(autoshard.Mesh.auto(profile="cpu"), make_model("gpt"), (batch(0),), loss_fn=_lm_loss,
                 activation_checkpointing=["blocks.0"])


# =============================================================================== the planner
def test_planner_pins_and_runtime_space(tight):
    a = cm.analyse(make_model("gpt"), (batch(0),), precision="fp32", tps=(1, 2), loss="cross_entropy")
    cpu = H.get_profile("cpu")
    assert P.runtime_space().checkpointing
    pinned = P.plan(a, 2, cpu, space=P.runtime_space({"k": 3, "pp": 1}))
    assert pinned.checkpoint_blocks == 3 and pinned.runnable
    everything = P.plan(a, 2, cpu, space=P.runtime_space({"k": 1 << 20, "pp": 1}))
    assert everything.checkpoint_blocks == 4  # clipped to the blocks a rank has
    budget, p = tight
    assert p.checkpoint_blocks > 0 and p.runnable and p.memory_per_gpu_bytes <= budget * GiB
    # memory binds: the fastest plan is named as it is without recomputation, and does not fit
    assert p.binding.startswith("memory: the fastest plan (") and " ckpt=" not in p.binding.split(")")[0]


def test_mesh_auto_under_a_tight_budget_checkpoints_and_trains(world2, tight):
    """The planner picks k > 0 for the budget; the runtime checkpoints those blocks and trains with parity."""
    r = world2["auto"]
    _, expected = tight
    assert r["auto"]["checkpoint_blocks"] == expected.checkpoint_blocks > 0 and r["auto"]["runnable"]
    stages = r["plan"]["checkpointing"]["stages"]
    assert r["plan"]["checkpointing"]["spec"] == expected.checkpoint_blocks
    assert sum(map(len, stages)) >= expected.checkpoint_blocks
    assert "checkpoint_block" in r["graph"]
    check(r, _ref("gpt", "adamw"), "adamw")
