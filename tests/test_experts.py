"""Mixture of experts: expert parallelism found in unmodified models.

Contract 1 on the MoE GPT of ``examples/moe_gpt.py`` (ModuleList experts looped over) and Hugging
Face ``MixtralForCausalLM`` (fused 3-D experts, grouped matmuls), dropless, under ep=2, ep=4,
dp=2×ep=2, tp=2×ep=2 and pp=2×ep=2 with SGD and AdamW; the router's auxiliary loss; GShard capacity
with the count of dropped tokens; the pass on a virtual mesh; bad input. Each world size is spawned
once for the module, as in ``test_parity.py``.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import tempfile

import pytest
import torch
import torch.distributed as dist

import autoshard
from autoshard import Mesh, MeshError, PlanError
from autoshard.passes.capture import capture
from autoshard.passes.expert_parallel import apply_expert_parallel, find_moe_layers, plan_expert_parallel
from autoshard.runtime import moe as moe_runtime
from parity import GLOBAL_BATCH, SEQ, STEPS, VOCAB, batch, check, make_model, make_optimizer, reference, sharded

MODELS = ["moe_gpt", "mixtral"]
OPTS = ["sgd", "adamw"]
PARITY_2 = [(m, o, {"ep": 2}) for m in MODELS for o in OPTS]
PARITY_4 = [(m, o, d) for m in MODELS for o in OPTS for d in ({"ep": 4}, {"dp": 2, "ep": 2}, {"tp": 2, "ep": 2})]
PIPE_4 = [("moe_gpt", "sgd", {"pp": 2, "ep": 2})]
# ZeRO with experts split over ep: dense buckets over dp × ep, expert buckets over the dp ranks holding them
ZERO_2 = [("moe_gpt", "sgd", {"ep": 2}, {"zero": 1}), ("moe_gpt", "adamw", {"ep": 2}, {"zero": 2}),
          ("mixtral", "sgd", {"ep": 2}, {"zero": 2, "grad_clip": 0.5}), ("moe_gpt", "sgd", {"ep": 2}, {"zero": 3}),
          ("mixtral", "adamw", {"ep": 2}, {"zero": 3})]
ZERO_4 = [("moe_gpt", "sgd", {"dp": 2, "ep": 2}, {"zero": 2}), ("mixtral", "adamw", {"dp": 2, "ep": 2}, {"zero": 1})]
CAPACITY = 1.0


# =============================================================================== models beyond parity.py
def _make(kind: str) -> torch.nn.Module:
    """``moe_gpt1``: one MoE block (its router input does not depend on earlier drops);
    ``mixtral_aux``: Mixtral whose loss includes the router's load-balancing loss (coefficient 0.1)."""
    torch.manual_seed(0)
    if kind == "moe_gpt1":
        from autoshard.examples.moe_gpt import make_model as make_moe

        return make_moe(vocab_size=VOCAB, seq_len=SEQ, d_model=32, n_heads=4, d_ff=64, n_layers=1)
    if kind in ("mixtral_aux", "mixtral1"):
        from transformers import MixtralConfig, MixtralForCausalLM

        aux = kind == "mixtral_aux"
        cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2 if aux else 1,
                            num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                            max_position_embeddings=64, use_cache=False, output_router_logits=aux,
                            router_aux_loss_coef=0.1)
        return MixtralForCausalLM(cfg)
    return make_model(kind)


def _inputs(kind: str, tokens: torch.Tensor):
    if kind.startswith("moe_gpt"):
        from parity import gpt_loss

        return (tokens,), tokens, gpt_loss
    return {"input_ids": tokens, "labels": tokens}, None, None


def _custom(kind: str, opt: str, degrees: dict, steps: int, **options) -> dict:
    """Like ``parity.sharded`` for the models of :func:`_make`; also returns every step's stats."""
    mesh = Mesh(**degrees)
    model = _make(kind)
    per = GLOBAL_BATCH // mesh.data_size
    lo = mesh.data_rank * per
    inp0, _, loss_fn = _inputs(kind, batch(0)[lo:lo + per])
    sm = autoshard.autoshard(model, mesh, example_inputs=inp0, loss_fn=loss_fn, optimizer=make_optimizer(opt), **options)
    losses, stats = [], []
    for step in range(steps):
        inp, target, _ = _inputs(kind, batch(step)[lo:lo + per])
        losses.append(sm.train_step(inp, target))
        stats.append(sm.stats())
    sd = sm.full_state_dict()
    # a checkpoint saved with experts split over ep loads under dp only (and back), weights unchanged
    ckpt = os.path.join(tempfile.gettempdir(), f"autoshard-test-ep-{os.getppid()}")
    sm.save(ckpt)
    other = autoshard.autoshard(_make(kind), Mesh(dp=mesh.world_size), example_inputs=inp0, loss_fn=loss_fn,
                                optimizer=make_optimizer(opt), **options)
    autoshard.load(ckpt, other)
    reloaded = other.full_state_dict()
    other.save(ckpt)
    again = autoshard.autoshard(_make(kind), mesh, example_inputs=inp0, loss_fn=loss_fn, optimizer=make_optimizer(opt),
                                **options)
    autoshard.load(ckpt, again)
    back = again.full_state_dict()
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(ckpt, ignore_errors=True)
    differ = [k for k in sd if not torch.equal(sd[k], reloaded[k]) or not torch.equal(sd[k], back[k])]
    return {"losses": losses, "state": sd, "stats": stats, "reload_differs": differ, "plan": sm.plan.to_dict(),
            "steps_after_load": again.stats()["steps"]}


def run_all(parity_cases: list[tuple], custom_cases: list[tuple]) -> dict | None:
    """One launch: the parity cases (``parity.sharded``) and the custom ones; rank 0's results."""
    torch.set_num_threads(1)  # ranks share the cores; OpenMP barriers in small index ops cost ~1000x otherwise
    out = {repr(c): sharded(*c[:3], **(c[3] if len(c) > 3 else {})) for c in parity_cases}
    for c in custom_cases:
        kind, opt, degrees, steps, options = c
        out[repr(c)] = _custom(kind, opt, degrees, steps, **options)
    return out if dist.get_rank() == 0 else None


AUX_CASE = ("mixtral_aux", "sgd", {"ep": 2}, STEPS, {})
CAPACITY_CASE = ("moe_gpt1", "sgd", {"ep": 2}, 1, {"capacity_factor": CAPACITY})

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The references run here, next to the launched ranks: one intra-op thread, as they use."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world2():
    return autoshard.launch(run_all, 2, PARITY_2 + ZERO_2, [AUX_CASE, CAPACITY_CASE], device="cpu")[0]


@pytest.fixture(scope="module")
def world4():
    return autoshard.launch(run_all, 4, PARITY_4 + PIPE_4 + ZERO_4, [], device="cpu")[0]


@functools.cache
def _ref(kind: str, opt: str):
    return reference(kind, opt)


def _mesh_id(d: dict) -> str:
    return "x".join(f"{k}{v}" for k, v in d.items())


def _check_moe(result: dict, kind: str) -> None:
    stats = result["stats"]
    tokens = stats["expert_tokens"]
    assert len(tokens) == 2 and all(len(v) == 8 for v in tokens.values()), tokens
    assert all(sum(v) == GLOBAL_BATCH * SEQ * 2 for v in tokens.values()), tokens  # every token, top-2
    assert stats["dropped_tokens"] == 0
    assert stats["ep_comm_bytes"] > 0
    layers = result["plan"]["experts"]["layers"]
    assert [ly["experts"] for ly in layers] == [8, 8] and all(ly["top_k"] == 2 for ly in layers)
    if kind == "mixtral":
        assert layers[0]["router"] == "model.layers.0.mlp.gate.weight"
        assert layers[0]["kind"] == "fused experts"
    else:
        assert layers[0]["router"] == "blocks.0.moe.router.weight"
        assert layers[0]["kind"] == "ModuleList block"


@pytest.mark.parametrize("case", PARITY_2, ids=[f"{m}-{o}-{_mesh_id(d)}" for m, o, d in PARITY_2])
def test_parity_ep2(world2, case):
    kind, opt, _ = case
    result = world2[repr(case)]
    check(result, _ref(kind, opt), opt)
    _check_moe(result, kind)


@pytest.mark.parametrize("case", PARITY_4 + PIPE_4, ids=[f"{m}-{o}-{_mesh_id(d)}" for m, o, d in PARITY_4 + PIPE_4])
def test_parity_four_ranks(world4, case):
    kind, opt, deg = case
    result = world4[repr(case)]
    check(result, _ref(kind, opt), opt)
    _check_moe(result, kind)
    stats = result["stats"]
    if "dp" in deg:
        assert stats["dp_comm_bytes"] > 0
    if "tp" in deg:
        assert stats["tp_comm_bytes"] > 0
        roles = {p["role"] for p in result["plan"]["params"].values()}
        assert {"column", "row"} <= roles, roles  # dense layers tensor-parallel; experts whole per rank


def _reference_per_slice(kind: str, opt: str, slices: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The unmodified model, each step's global batch run slice by slice, gradients averaged: the
    function data parallelism computes when the loss of a slice depends on the whole slice."""
    model = _make(kind)
    optim = make_optimizer(opt)(list(model.parameters()))
    losses = []
    per = GLOBAL_BATCH // slices
    for step in range(STEPS):
        optim.zero_grad()
        total = 0.0
        for r in range(slices):
            inp, _, _ = _inputs(kind, batch(step)[r * per:(r + 1) * per])
            loss = model(**inp).loss
            (loss / slices).backward()
            total += loss.item() / slices
        optim.step()
        losses.append(total)
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_aux_loss_is_the_models_own(world2):
    """Mixtral with its load-balancing loss (coefficient 0.1) under ep=2 equals the model run on each
    rank's slice of the batch, with the gradients averaged over the slices."""
    result = world2[repr(AUX_CASE)]
    ref = _reference_per_slice("mixtral_aux", "sgd", 2)
    check(result, ref, "sgd")
    # the auxiliary loss couples the tokens of a batch (a product of two batch means), so it differs
    # from the loss of the whole batch in one piece: this is what makes the comparison above a real test
    whole = _reference_per_slice("mixtral_aux", "sgd", 1)
    assert abs(whole[0][0] - ref[0][0]) / ref[0][0] > 1e-5


def _router_counts(model: torch.nn.Module, kind: str, tokens: torch.Tensor) -> torch.Tensor:
    """Rows per expert that the unmodified model's first router sends on ``tokens`` (top-2)."""
    seen = []
    if kind == "moe_gpt1":
        hook = model.blocks[0].moe.router.register_forward_hook(lambda m, i, o: seen.append(o))
    else:
        hook = model.model.layers[0].mlp.gate.register_forward_hook(lambda m, i, o: seen.append(o[0]))
    with torch.no_grad():
        inp, _, _ = _inputs(kind, tokens)
        model(*inp) if isinstance(inp, tuple) else model(**inp)
    hook.remove()
    index = torch.softmax(seen[0].float(), dim=-1).topk(2, dim=-1).indices
    return torch.bincount(index.reshape(-1), minlength=8)


def _expected_drops(counts: torch.Tensor, rows: int) -> int:
    cap = math.ceil(CAPACITY * rows / 8)
    return int((counts - cap).clamp_min(0).sum())


def test_capacity_factor_drops_the_overflow(world2):
    """ep=2, capacity_factor=1.0: each rank admits ceil(1.0 · 128 rows / 8) = 16 rows per expert; the
    dropped count is what the unmodified model's router, run on each rank's slice, sends beyond that."""
    result = world2[repr(CAPACITY_CASE)]
    model = _make("moe_gpt1")
    per = GLOBAL_BATCH // 2
    counts = [_router_counts(model, "moe_gpt1", batch(0)[r * per:(r + 1) * per]) for r in range(2)]
    expected = sum(_expected_drops(c, per * SEQ * 2) for c in counts)
    stats = result["stats"][0]
    assert expected > 0  # the initial routing is unbalanced enough to overflow
    assert stats["dropped_tokens"] == expected
    assert stats["expert_tokens"]["blocks.0.moe"] == (counts[0] + counts[1]).tolist()
    assert math.isfinite(result["losses"][0])
    assert result["plan"]["experts"]["capacity_factor"] == CAPACITY


def test_checkpoint_under_ep_loads_under_dp_and_back(world2):
    for case in (AUX_CASE, CAPACITY_CASE):
        r = world2[repr(case)]
        assert r["reload_differs"] == []  # ep=2 → dp=2 → ep=2: every tensor bitwise equal
        assert r["steps_after_load"] == case[3]


# =============================================================================== in this process
def test_capacity_fused_experts_single_device():
    """Mixtral (fused experts) on one device with a capacity: the dropped count matches its router."""
    model = _make("mixtral1")
    tokens = batch(0)
    sm = autoshard.autoshard(model, Mesh(), example_inputs={"input_ids": tokens, "labels": tokens},
                             optimizer=make_optimizer("sgd"), capacity_factor=CAPACITY)
    sm.train_step({"input_ids": tokens, "labels": tokens})
    counts = _router_counts(_make("mixtral1"), "mixtral1", tokens)
    stats = sm.stats()
    assert stats["expert_tokens"]["model.layers.0.mlp.experts"] == counts.tolist()
    assert stats["dropped_tokens"] == _expected_drops(counts, GLOBAL_BATCH * SEQ * 2) > 0
    sm.close()


class _FusedExperts(torch.nn.Module):
    """Fused experts written out token by token: the reference for the runtime's dispatch."""

    def __init__(self, num_experts: int = 4, hidden: int = 8, ffn: int = 16) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.up = torch.nn.Parameter(torch.randn(num_experts, ffn, hidden) * 0.3)
        self.down = torch.nn.Parameter(torch.randn(num_experts, hidden, ffn) * 0.3)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(x @ self.up[e].t()) @ self.down[e].t()

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        for e in range(self.num_experts):
            token, slot = torch.where(top_k_index == e)
            out = out.index_add(0, token, self.expert(e, hidden[token]) * top_k_weights[token, slot, None])
        return out


class _Layer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.gate = torch.nn.Linear(8, 4, bias=False)
        self.experts = _FusedExperts()


def test_gshard_capacity_keeps_first_choices_first():
    """The fused dispatch with a capacity equals a token-by-token GShard reference: slot 0 of every
    token is admitted before any slot 1, in token order, up to ceil(cf · T · k / E) per expert."""
    layer = _Layer()
    found = find_moe_layers(layer, "unit.")
    key = "unit.experts"
    assert list(found) == [key] and found[key].kind == "fused" and found[key].num_experts == 4
    hidden = torch.randn(12, 8, generator=torch.Generator().manual_seed(1))
    probs = torch.softmax(layer.gate(hidden), -1)
    weights, index = probs.topk(2, dim=-1)
    cf = 0.5
    experts = layer.experts
    out = moe_runtime.moe_experts(hidden, index, weights, [experts.up, experts.down], key, None, cf)
    cap = math.ceil(cf * 12 * 2 / 4)
    used, want, dropped = [0] * 4, torch.zeros_like(hidden), 0
    for j in range(2):
        for t in range(12):
            e = int(index[t, j])
            if used[e] < cap:
                used[e] += 1
                want[t] += weights[t, j] * experts.expert(e, hidden[t:t + 1])[0]
            else:
                dropped += 1
    assert dropped > 0
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    assert moe_runtime.read_stats("unit.")[key]["dropped"] == dropped
    # dropless: the model's own forward, values and gradients
    moe_runtime.reset_stats("unit.")
    out = moe_runtime.moe_experts(hidden, index, weights, [experts.up, experts.down], key, None, None)
    torch.testing.assert_close(out, experts(hidden, index, weights), rtol=1e-5, atol=1e-6)
    moe_runtime.unregister("unit.")


def test_block_two_runs_and_grouped_gemm_match_the_model():
    """The ModuleList path as used under ep > 1 (record the expert calls, dispatch, replay) and the
    grouped-GEMM expert compute give the model's own values and gradients."""
    model = make_model("moe_gpt")
    ids = batch(0)
    layers = find_moe_layers(model, "unit2.")
    assert all(ly.kind == "block" and ly.grouped is not None for ly in layers.values())
    gm = capture(model, (ids,), {}, moe=layers)
    assert all("forward" not in model.get_submodule(ly.name).__dict__ for ly in layers.values())  # model untouched
    gm = apply_expert_parallel(gm, plan_expert_parallel(layers, 1, 1e6), None)  # a capacity: two runs, none dropped
    for ly in layers.values():
        ly.force_grouped = True
    out, ref = gm(ids), model(ids)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    params = dict(gm.named_parameters())
    for n, p in model.named_parameters():
        torch.testing.assert_close(params[n].grad, p.grad, rtol=1e-4, atol=1e-6, msg=n)
    moe_runtime.unregister("unit2.")


def test_pass_on_a_virtual_mesh():
    """Capture Mixtral, plan ep=2, rewrite: the graph calls the runtime over the ep group; each ep rank's
    pieces of the fused and ModuleList expert parameters."""
    model = make_model("mixtral")
    tokens = batch(0)
    mesh = Mesh.virtual(ep=2, rank=1)
    layers = find_moe_layers(model, "unit3.")
    gm = capture(model, (), {"input_ids": tokens, "labels": tokens}, moe=layers)
    plan = plan_expert_parallel(layers, 2, None)
    gm = apply_expert_parallel(gm, plan, mesh.group("ep").name)
    calls = [n for n in gm.graph.nodes if n.target is moe_runtime.moe_experts]
    assert len(calls) == 2 and all(n.args[5] == mesh.group("ep").name for n in calls)
    assert "autoshard_runtime_moe_moe_experts(" in gm.code  # print(graph) shows each layer and its group
    info = plan.to_dict()["layers"][1]
    assert info["router"] == "model.layers.1.mlp.gate.weight" and info["top_k"] == 2
    assert info["experts_per_rank"] == 4
    w = model.get_parameter("model.layers.0.mlp.experts.gate_up_proj")
    local = plan.local("model.layers.0.mlp.experts.gate_up_proj", w, mesh.coord("ep"))
    assert torch.equal(local, w[4:])
    moe = make_model("moe_gpt")
    mplan = plan_expert_parallel(find_moe_layers(moe, "unit4."), 2, None)
    w5, w1 = moe.get_parameter("blocks.0.moe.experts.5.fc.weight"), moe.get_parameter("blocks.0.moe.experts.1.fc.weight")
    assert mplan.local("blocks.0.moe.experts.5.fc.weight", w5, 1) is w5
    assert mplan.local("blocks.0.moe.experts.1.fc.weight", w1, 1).shape == (0, w1.shape[1])
    assert not mplan.is_expert("blocks.0.moe.router.weight")
    moe_runtime.unregister("unit3.")
    moe_runtime.unregister("unit4.")


def test_qwen_moe_shared_expert_stays_dense():
    """Qwen2-MoE: only the fused experts become the MoE op; the shared expert and its gate stay graph
    nodes (dense, tensor-parallel like any MLP); the captured program computes the model's loss."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2MoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                         shared_expert_intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, max_position_embeddings=64,
                         use_cache=False)
    model = Qwen2MoeForCausalLM(cfg)
    tokens = batch(0)
    layers = find_moe_layers(model, "unit5.")
    assert [ly.name for ly in layers.values()] == ["model.layers.0.mlp.experts"]
    plan = plan_expert_parallel(layers, 2, None)
    assert plan.is_expert("model.layers.0.mlp.experts.gate_up_proj")
    assert not any("shared" in n for n in plan.params)
    gm = capture(model, (), {"input_ids": tokens, "labels": tokens}, moe=layers)
    gm = apply_expert_parallel(gm, plan_expert_parallel(layers, 1, None), None)
    shared = {n.target for n in gm.graph.nodes if n.op == "get_attr" and "shared_expert" in str(n.target)}
    assert "model.layers.0.mlp.shared_expert.gate_proj.weight" in shared
    assert plan.to_dict()["layers"][0]["router"] == "model.layers.0.mlp.gate.weight"
    torch.testing.assert_close(gm(input_ids=tokens, labels=tokens).loss, model(input_ids=tokens, labels=tokens).loss)
    moe_runtime.unregister("unit5.")


# =============================================================================== bad input
def _moe(**kw) -> torch.nn.Module:
    from autoshard.examples.moe_gpt import make_model as make_moe

    return make_moe(vocab_size=VOCAB, seq_len=SEQ, d_model=32, n_heads=4, d_ff=64, n_layers=1, **kw)


def _sm(model, mesh, **kw):
    from parity import gpt_loss

    return autoshard.autoshard(model, mesh, example_inputs=(batch(0)[:2],), loss_fn=gpt_loss,
                               optimizer=make_optimizer("sgd"), **kw)


def test_experts_not_divisible_by_ep():
    with pytest.raises(PlanError) as ei:
        _sm(_moe(n_experts=6), Mesh.virtual(ep=4))
    msg = str(ei.value)
    assert "blocks.0.moe: 6 experts cannot be split over ep=4" in msg and "[1, 2, 3, 6]" in msg


def test_fused_experts_not_divisible_by_ep():
    tokens = batch(0)[:2]
    with pytest.raises(PlanError, match="8 experts cannot be split over ep=3"):
        autoshard.autoshard(make_model("mixtral"), Mesh.virtual(ep=3), example_inputs={"input_ids": tokens, "labels": tokens},
                            optimizer=make_optimizer("sgd"))


def test_ep_on_a_model_without_experts():
    with pytest.raises(PlanError, match="no mixture-of-experts layer was found"):
        _sm(make_model("gpt"), Mesh.virtual(ep=2))


@pytest.mark.parametrize("cf", [0, -1.0, "1", True])
def test_bad_capacity_factor(cf):
    with pytest.raises(PlanError, match="capacity_factor"):
        _sm(_moe(), Mesh.virtual(ep=2), capacity_factor=cf)


@pytest.mark.parametrize("case", ZERO_2 + ZERO_4, ids=[f"{m}-{o}-{_mesh_id(d)}-" + "-".join(f"{k}{v}" for k, v in x.items())
                                                      for m, o, d, x in ZERO_2 + ZERO_4])
def test_zero_with_experts(world2, world4, case):
    kind, opt, deg, options = case
    result = (world4 if len(deg) > 1 else world2)[repr(case)]
    check(result, reference(kind, opt, grad_clip=options.get("grad_clip")), opt)
    assert result["plan"]["zero"]["stage"] == options["zero"]


def test_mesh_with_ep_needs_its_ranks(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(MeshError, match="--nproc-per-node 4"):
        Mesh(dp=2, ep=2)
    mesh = Mesh.virtual(dp=2, ep=2, tp=2, rank=5)  # rank = ((dp·2 + ep)·2 + tp)
    assert (mesh.coord("dp"), mesh.coord("ep"), mesh.coord("tp")) == (1, 0, 1)
    assert (mesh.data_size, mesh.data_rank) == (4, 2)
    assert mesh.data_group().size == 4


def test_memory_estimate_counts_only_this_ranks_experts():
    model = _moe()
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    whole = _sm(_moe(), Mesh.virtual(ep=1, dp=2, rank=0)).plan.memory["params"]
    split = _sm(_moe(), Mesh.virtual(ep=2, rank=0)).plan.memory["params"]
    assert experts > 0 and whole - split == 4 * experts // 2  # fp32: half the experts' bytes live elsewhere
