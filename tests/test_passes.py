"""Unit tests of the graph passes and the runtime vocabulary on a virtual mesh.

No processes and no torch.distributed process group: every pass here is pure and runs on a
virtual mesh (a tp degree and a group key).
"""

from __future__ import annotations

import json
import operator
from collections import Counter

import pytest
import torch
import transformers
from torch.distributed.tensor import Replicate, Shard

import autoshard
from autoshard.examples.gpt import make_model, synthetic_batch
from autoshard.passes import apply_tensor_parallel, capture, plan_tensor_parallel
from autoshard.passes.sharding_rules import view_groups
from autoshard.passes.tensor_parallel import module_path
from autoshard.runtime import collectives as C
from autoshard.runtime import tp_ops
from autoshard.runtime.errors import PlanFileError
from autoshard.runtime.layout import shard_tensor, unshard_tensor
from autoshard.runtime.mesh import Mesh
from autoshard.runtime.plan import ParamPlan, Plan

aten = torch.ops.aten
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _collective_nodes(gm, fn):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is fn]


def _producer_through(node, targets):
    """Walk up first arguments while the node's target is one of ``targets``."""
    while node.op == "call_function" and node.target in targets:
        node = node.args[0]
    return node


# =============================================================================== GPT example
@pytest.fixture(scope="module")
def gpt():
    model = make_model()
    x = synthetic_batch(0, 4, model.cfg)[0]
    return model, x


@pytest.fixture(scope="module")
def gpt_plan(gpt):
    model, x = gpt
    gm = capture(model, (x,))
    return plan_tensor_parallel(gm, 2)


@pytest.fixture(scope="module")
def gpt_rewritten(gpt):
    model, x = gpt
    gm = capture(model, (x,))
    plan = plan_tensor_parallel(gm, 2)
    gm, collectives = apply_tensor_parallel(gm, plan, 2, "g")
    return gm, collectives, plan


def test_capture_drops_export_metadata_asserts():
    """export records a device/dtype assert per ``.to()`` (Hugging Face Llama has a dozen), as written by
    the user (``cuda``, not ``cuda:0``): the joint graph's fake tracing would compare them strictly."""
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, use_cache=False)
    model = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(0, 128, (2, 8))
    exported = torch.export.export(model, (ids,), strict=False).module()

    def asserts(gm):  # subgraphs too: the rotary embedding runs under autocast(enabled=False), a submodule
        return [n for m in gm.modules() if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes
                if n.target is aten._assert_tensor_metadata.default]

    assert asserts(exported)
    gm = capture(model, (ids,))
    assert not asserts(gm)

    class Rotary(torch.nn.Module):  # as on GPUs: the casts inside an autocast-off region, a submodule
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            with torch.autocast("cpu", enabled=False):
                y = x.float().to(x.device) * 2
            return self.lin(y)

    x = torch.randn(2, 4)
    assert asserts(torch.export.export(Rotary(), (x,), strict=False).module())
    assert not asserts(capture(Rotary(), (x,)))
    torch.testing.assert_close(gm(ids).logits, model(ids).logits)  # the graph still computes what the model does


def test_capture_returns_graph_sharing_the_model_parameters(gpt):
    model, x = gpt
    gm = capture(model, (x,))
    assert isinstance(gm, torch.fx.GraphModule)
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert aten.scaled_dot_product_attention.default in targets
    assert aten.embedding.default in targets
    # the captured graph computes what the model computes
    torch.testing.assert_close(gm(x), model(x))
    # capture restores the model's mode
    assert model.training


def _input_projections(model) -> list[tuple[str, int]]:
    """(module name inside a block, expected blocks) of the column-parallel projections.

    The example's attention has either separate ``q``/``k``/``v`` projections or one fused ``qkv``
    (split into three equal pieces, so sharded in three blocks); both are column-parallel.
    """
    attn = model.blocks[0].attn
    if hasattr(attn, "qkv"):
        names = [("attn.qkv", 3)]
    else:
        names = [(f"attn.{p}", 1) for p in ("q", "k", "v")]
    assert names, "the GPT example has no attention input projection"
    return names + [("mlp.fc", 1)]


def test_gpt_plan_roles(gpt, gpt_plan):
    model, _ = gpt
    lay = gpt_plan.layouts
    n_layers = model.cfg.n_layers
    for i in range(n_layers):
        pre = f"blocks.{i}"
        for name, blocks in _input_projections(model):
            w = lay[f"{pre}.{name}.weight"]
            assert (w.role, w.placement, w.blocks) == ("column", "S(0)", blocks), name
            assert w.local_shape == [w.shape[0] // 2, w.shape[1]]
            b = lay[f"{pre}.{name}.bias"]
            assert (b.role, b.placement, b.blocks) == ("column", "S(0)", blocks), name
        for name in ("attn.proj", "mlp.out"):
            w = lay[f"{pre}.{name}.weight"]
            assert (w.role, w.placement) == ("row", "S(1)"), name
            assert w.local_shape == [w.shape[0], w.shape[1] // 2]
            # a row-parallel bias is added once, after the all-reduce
            assert lay[f"{pre}.{name}.bias"].placement == "R"
        for ln in ("ln1", "ln2"):
            for p in ("weight", "bias"):
                assert lay[f"{pre}.{ln}.{p}"].role == "replicated"
                assert lay[f"{pre}.{ln}.{p}"].placement == "R"
    assert lay["ln_f.weight"].role == "replicated"

    # tied head / token embedding: one tensor, vocab-parallel, the other name recorded as alias
    head = lay["head.weight"]
    assert (head.role, head.placement) == ("vocab", "S(0)")
    assert head.aliases == ["tok.weight"]
    assert head.local_shape == [128, 64]
    assert "tok.weight" not in lay
    # position ids come from arange, not from the input: the position table stays whole
    assert lay["pos.weight"].role == "replicated"
    assert gpt_plan.fallbacks == []


def test_gpt_plan_covers_every_distinct_parameter_once(gpt, gpt_plan):
    model, _ = gpt
    # one entry per distinct tensor: the tied head/token weight appears once, its other name as alias
    assert len(gpt_plan.layouts) == len(list(model.parameters()))
    covered = set(gpt_plan.layouts) | {a for p in gpt_plan.layouts.values() for a in p.aliases}
    assert covered == set(model.state_dict())


def test_gpt_plan_is_deterministic(gpt, gpt_plan):
    model, x = gpt
    again = plan_tensor_parallel(capture(model, (x,)), 2)
    assert again.layouts == gpt_plan.layouts


def test_tp1_plan_replicates_everything(gpt):
    model, x = gpt
    plan = plan_tensor_parallel(capture(model, (x,)), 1)
    assert {p.role for p in plan.layouts.values()} == {"replicated"}
    assert all(p.local_shape == p.shape for p in plan.layouts.values())


def test_apply_inserts_megatron_collectives(gpt, gpt_rewritten):
    model, _ = gpt
    gm, collectives, _ = gpt_rewritten
    n_layers = model.cfg.n_layers

    all_reduces = _collective_nodes(gm, C.all_reduce)
    all_gathers = _collective_nodes(gm, C.all_gather)
    reduce_grads = _collective_nodes(gm, C.reduce_grad)
    assert not _collective_nodes(gm, C.scatter)

    # per block: attention proj + MLP out (row-parallel); plus the vocab-parallel embedding
    assert len(all_reduces) == 2 * n_layers + 1
    # one reduce_grad per replicated input feeding column-parallel matmuls (q/k/v share one) + head
    assert len(reduce_grads) == 2 * n_layers + 1
    assert len(all_gathers) == 1

    sources = Counter()
    for n in all_reduces:
        src = n.args[0]
        if src.target is tp_ops.vocab_parallel_embedding:
            sources["embedding"] += 1
        else:
            assert src.target == aten.linear.default
            sources[module_path(src).split(".", 2)[-1]] += 1
    assert sources == {"embedding": 1, "attn.proj": n_layers, "mlp.out": n_layers}

    # every collective names the group key it was given
    for n in all_reduces + reduce_grads:
        assert n.args[1] == "g"
    (gather,) = all_gathers
    assert gather.args[2] == "g"
    assert gather.args[1] == 2  # logits are Shard(-1) of a [b, t, vocab] tensor
    out = next(n for n in gm.graph.nodes if n.op == "output")
    assert gather in out.all_input_nodes

    # the returned record matches the graph
    ops = Counter(c["op"] for c in collectives)
    assert ops == {"all_reduce": 2 * n_layers + 1, "reduce_grad": 2 * n_layers + 1, "all_gather": 1}
    assert all(c["bytes"] > 0 for c in collectives if c["op"] != "reduce_grad")

    text = str(gm.graph)
    for name in ("all_reduce", "all_gather", "reduce_grad", "vocab_parallel_embedding"):
        assert name in text
    assert "all_reduce" in gm.code


def test_apply_rewrites_head_views_to_local_sizes(gpt, gpt_rewritten):
    model, x = gpt
    gm, _, _ = gpt_rewritten
    cfg = model.cfg
    b, t = x.shape
    local_heads = cfg.n_heads // 2
    head_dim = cfg.d_model // cfg.n_heads

    sdpas = [n for n in gm.graph.nodes if n.target == aten.scaled_dot_product_attention.default]
    assert len(sdpas) == cfg.n_layers
    for sdpa in sdpas:
        for qkv in sdpa.args[:3]:
            view = _producer_through(qkv, (aten.transpose.int,))
            assert view.target in _VIEWS
            assert list(view.args[1]) == [b, t, local_heads, head_dim]
            assert local_heads in view.args[1]
            lin = _producer_through(view.args[0], (operator.getitem, aten.split.Tensor, aten.split_with_sizes.default))
            assert lin.target == aten.linear.default
            assert module_path(lin).endswith(("attn.q", "attn.k", "attn.v", "attn.qkv"))
    # the merge back before the row-parallel projection uses the local width
    merges = [n for n in gm.graph.nodes if n.target in _VIEWS and list(n.args[1]) == [b, t, cfg.d_model // 2]]
    assert len(merges) == cfg.n_layers
    # no view keeps the global head count
    for n in gm.graph.nodes:
        if n.target in _VIEWS:
            assert list(n.args[1]) != [b, t, cfg.n_heads, head_dim]


def test_apply_replaces_embedding_with_vocab_parallel_lookup(gpt_rewritten):
    gm, _, _ = gpt_rewritten
    vocab = [n for n in gm.graph.nodes if n.target is tp_ops.vocab_parallel_embedding]
    assert len(vocab) == 1
    (emb,) = vocab
    assert emb.args[2] == "g"
    assert emb.args[0].op == "get_attr"
    # the position embedding stays an ordinary lookup
    assert sum(1 for n in gm.graph.nodes if n.target == aten.embedding.default) == 1


def test_rewritten_graph_refuses_to_run_without_a_registered_group(gpt, gpt_rewritten):
    _, x = gpt
    gm, _, _ = gpt_rewritten
    with pytest.raises(RuntimeError, match="virtual mesh"):
        gm(x)


# =============================================================================== Hugging Face
@pytest.fixture(scope="module")
def hf_gpt2_plan():
    cfg = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, use_cache=False,
                                  resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 128, (2, 16))
    gm = capture(model, (), {"input_ids": ids, "labels": ids})
    return model, plan_tensor_parallel(gm, 2)


def test_hf_gpt2_fused_qkv_is_sharded_in_three_blocks(hf_gpt2_plan):
    model, plan = hf_gpt2_plan
    lay = plan.layouts
    for i in range(2):
        pre = f"transformer.h.{i}"
        c_attn = lay[f"{pre}.attn.c_attn.weight"]  # Conv1D: [in, 3 * out]
        assert (c_attn.role, c_attn.placement, c_attn.blocks) == ("column", "S(1)", 3)
        assert c_attn.shape == [64, 192] and c_attn.local_shape == [64, 96]
        bias = lay[f"{pre}.attn.c_attn.bias"]
        assert (bias.placement, bias.blocks) == ("S(0)", 3)
        c_proj = lay[f"{pre}.attn.c_proj.weight"]
        assert (c_proj.role, c_proj.placement) == ("row", "S(0)")
        assert lay[f"{pre}.mlp.c_fc.weight"].role == "column"
        assert lay[f"{pre}.mlp.c_fc.weight"].blocks == 1
        assert lay[f"{pre}.mlp.c_proj.weight"].role == "row"
    head = lay["lm_head.weight"]
    assert head.role == "vocab" and head.aliases == ["transformer.wte.weight"]
    assert model.config.use_cache is False


@pytest.fixture(scope="module")
def llama_gm():
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(0, 128, (2, 16))
    return capture(model, (), {"input_ids": ids, "labels": ids})


def test_llama_gqa_tp2_shards_kv_heads(llama_gm):
    plan = plan_tensor_parallel(llama_gm, 2)
    lay = plan.layouts
    for i in range(2):
        attn = f"model.layers.{i}.self_attn"
        for proj in ("q_proj", "k_proj", "v_proj"):
            assert (lay[f"{attn}.{proj}.weight"].role, lay[f"{attn}.{proj}.weight"].placement) == ("column", "S(0)")
        assert lay[f"{attn}.k_proj.weight"].local_shape == [16, 64]  # one of the two kv heads
        assert lay[f"{attn}.o_proj.weight"].role == "row"
        mlp = f"model.layers.{i}.mlp"
        assert lay[f"{mlp}.gate_proj.weight"].role == "column"
        assert lay[f"{mlp}.up_proj.weight"].role == "column"
        assert lay[f"{mlp}.down_proj.weight"].role == "row"
    assert lay["model.embed_tokens.weight"].role == "vocab"
    assert not any("k_proj" in n for n in plan.notes)


def test_llama_gqa_tp4_keeps_indivisible_kv_heads_replicated(llama_gm):
    plan = plan_tensor_parallel(llama_gm, 4)
    lay = plan.layouts
    for i in range(2):
        attn = f"model.layers.{i}.self_attn"
        q = lay[f"{attn}.q_proj.weight"]
        assert (q.role, q.placement, q.local_shape) == ("column", "S(0)", [16, 64])
        for proj in ("k_proj", "v_proj"):
            kv = lay[f"{attn}.{proj}.weight"]
            assert (kv.role, kv.placement) == ("replicated", "R"), proj
            assert kv.local_shape == kv.shape == [32, 64]
            notes = [n for n in plan.notes if n.startswith(f"{attn}.{proj}.weight")]
            assert len(notes) == 1 and "replicated" in notes[0]
        assert lay[f"{attn}.o_proj.weight"].role == "row"


# =============================================================================== sharding rules
@pytest.mark.parametrize(
    "a, b, expected",
    [
        ((4, 64, 64), (4, 64, 4, 16), [([0], [0]), ([1], [1]), ([2], [2, 3])]),  # split heads
        ((4, 64, 2, 16), (4, 64, 32), [([0], [0]), ([1], [1]), ([2, 3], [2])]),  # merge heads
        ((2, 3, 4), (6, 4), [([0, 1], [0]), ([2], [1])]),  # flatten leading dims
        ((6,), (2, 3), [([0], [0, 1])]),
        ((2, 1, 3), (2, 3), [([0], [0]), ([1, 2], [1])]),  # size-1 dim folded into its neighbour
        ((2, 3), (2, 3, 1), [([0], [0]), ([1], [1]), ([], [2])]),  # trailing new size-1 dim
        ((5, 7), (5, 7), [([0], [0]), ([1], [1])]),
    ],
)
def test_view_groups(a, b, expected):
    groups = view_groups(a, b)
    assert groups == expected
    # every dim appears exactly once, in order, and each group's sizes multiply to the same number
    assert [d for gi, _ in groups for d in gi] == list(range(len(a)))
    assert [d for _, gj in groups for d in gj] == list(range(len(b)))
    for gi, gj in groups:
        pa = pb = 1
        for d in gi:
            pa *= a[d]
        for d in gj:
            pb *= b[d]
        assert pa == pb


# =============================================================================== layout
@pytest.mark.parametrize("blocks", [1, 3])
@pytest.mark.parametrize("dim", [0, 1, 2])
@pytest.mark.parametrize("n", [2, 4])
def test_shard_unshard_round_trip(blocks, dim, n):
    shape = [5, 6, 7]
    shape[dim] = blocks * n * 2
    full = torch.randn(*shape)
    pieces = [shard_tensor(full, dim, n, r, blocks) for r in range(n)]
    for p in pieces:
        assert p.is_contiguous()
        expect = list(shape)
        expect[dim] //= n
        assert list(p.shape) == expect
    torch.testing.assert_close(unshard_tensor(pieces, dim, blocks), full, rtol=0, atol=0)


def test_shard_tensor_blocks_take_each_ranks_slice_of_every_segment():
    full = torch.arange(12)  # three fused segments [0..3], [4..7], [8..11]
    assert shard_tensor(full, 0, 2, 0, blocks=3).tolist() == [0, 1, 4, 5, 8, 9]
    assert shard_tensor(full, 0, 2, 1, blocks=3).tolist() == [2, 3, 6, 7, 10, 11]
    # blocks=1 is a plain chunk
    assert shard_tensor(full, 0, 2, 1).tolist() == list(range(6, 12))
    torch.testing.assert_close(shard_tensor(full, 0, 4, 2), full.chunk(4)[2])


def test_shard_tensor_rejects_indivisible_dim():
    with pytest.raises(ValueError, match="does not split into 3 blocks over 2 ranks"):
        shard_tensor(torch.zeros(4, 9), 1, 2, 0, blocks=3)


# =============================================================================== plan
@pytest.fixture
def plan(gpt_plan):
    return Plan(
        mesh={"pp": 1, "dp": 2, "ep": 1, "tp": 2},
        params=dict(gpt_plan.layouts),
        buffers=[],
        collectives=[{"op": "all_reduce", "node": "linear_3", "bytes": 65536, "where": "blocks.0.attn.proj"}],
        fallbacks=[],
        dp_buckets=[["head.weight"], ["blocks.1.mlp.out.weight", "blocks.1.mlp.out.bias"]],
        notes=list(gpt_plan.notes),
        estimates={"param_bytes_per_rank": 1234.0},
    )


def test_plan_json_round_trip_keeps_fingerprint(plan):
    text = plan.to_json()
    assert json.loads(text)["fingerprint"] == plan.fingerprint
    back = Plan.from_json(text)
    assert back.fingerprint == plan.fingerprint
    assert back == plan
    assert isinstance(back.params["head.weight"], ParamPlan)
    assert back.params["head.weight"].aliases == ["tok.weight"]
    assert back.placement("blocks.0.mlp.fc.weight") == Shard(0)
    assert back.placement("blocks.0.attn.proj.weight") == Shard(1)
    assert back.placement("ln_f.weight") == Replicate()
    assert Plan.from_json(plan.to_json(indent=None)).fingerprint == plan.fingerprint


def test_plan_fingerprint_tracks_decisions_not_estimates(plan):
    fp = plan.fingerprint
    plan.estimates["param_bytes_per_rank"] = 1.0
    assert plan.fingerprint == fp
    plan.params["blocks.0.mlp.fc.weight"].placement = "R"
    assert plan.fingerprint != fp


def test_plan_from_json_rejects_altered_text(plan):
    text = plan.to_json()
    needle = '"placement": "S(1)"'
    assert needle in text
    altered = text.replace(needle, '"placement": "R"', 1)
    with pytest.raises(ValueError, match="fingerprint does not match"):
        Plan.from_json(altered)
    # changing the mesh is caught too
    d = json.loads(text)
    d["mesh"]["tp"] = 4
    with pytest.raises(ValueError, match="altered or corrupted"):
        Plan.from_json(json.dumps(d))


@pytest.mark.parametrize("text", ["[1, 2, 3]", '{"params": {}}', '"plan"', "null"])
def test_plan_from_json_rejects_non_plans(text):
    with pytest.raises(ValueError, match="not an autoshard plan"):
        Plan.from_json(text)


def test_plan_from_json_rejects_other_versions(plan):
    d = json.loads(plan.to_json())
    d["version"] = 99
    with pytest.raises(ValueError, match="version 99"):
        Plan.from_json(json.dumps(d))



def _edit(d: dict, change) -> dict:
    d = json.loads(json.dumps(d))
    change(d)
    return d


_W = "blocks.0.mlp.fc.weight"
# (what is wrong, change to the plan's JSON object, the key the message must name): schema errors come before
# the fingerprint check, so each names its own key although the fingerprint no longer matches either
BAD_PLANS = [
    ("no fingerprint", lambda d: d.pop("fingerprint"), "fingerprint: missing"),
    ("unknown placement", lambda d: d["params"][_W].update(placement="Q(9)"),
     f"params['{_W}'].placement: not a placement: 'Q(9)'"),
    ("shard of a missing dim", lambda d: d["params"][_W].update(placement="S(5)"),
     f"params['{_W}'].placement: S(5) shards dim 5 of a 2-dim tensor"),
    ("mesh as a string", lambda d: d.update(mesh="dp=2,tp=2"), "mesh: expected a JSON object, got a string"),
    ("mesh degree 0", lambda d: d["mesh"].update(tp=0), "mesh.tp: expected an integer >= 1, got 0"),
    ("mesh degree text", lambda d: d["mesh"].update(tp="2"), "mesh.tp: expected an integer, got a string '2'"),
    ("unknown mesh dim", lambda d: d["mesh"].update(xp=2), "mesh.xp: unknown mesh dimension"),
    ("no params", lambda d: d.pop("params"), "params: missing"),
    ("param without role", lambda d: d["params"][_W].pop("role"), f"params['{_W}'].role: missing"),
    ("shape of text", lambda d: d["params"][_W].update(shape="256x64"), f"params['{_W}'].shape: expected a JSON array"),
    ("unknown key", lambda d: d.update(bogus=1), "bogus: unknown key"),
    ("buckets of numbers", lambda d: d.update(dp_buckets=[[1]]), "dp_buckets[0][0]: expected a string"),
    ("collective without op", lambda d: d.update(collectives=[{"node": "x"}]), "collectives[0].op: missing"),
    ("pipeline without stages", lambda d: d.update(pipeline={"schedule": "1f1b"}), "pipeline.stages: missing"),
]


@pytest.mark.parametrize("case", BAD_PLANS, ids=[c[0] for c in BAD_PLANS])
def test_plan_from_json_validates_the_schema(plan, case):
    _, change, message = case
    with pytest.raises(PlanFileError) as e:
        Plan.from_json(json.dumps(_edit(json.loads(plan.to_json()), change)))
    assert message in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text, message", [
    ('{"mesh": {"tp": 2}, "params": {', "not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"mesh": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    (b"\xff\xfe{", "not JSON"),
])
def test_plan_from_json_rejects_malformed_text(text, message):
    with pytest.raises(PlanFileError, match=message):
        Plan.from_json(text)


def test_plan_from_json_accepts_what_it_wrote_and_summarises(plan):
    back = Plan.from_json(plan.to_json())
    assert back.summary() == plan.summary() and back.explain().startswith(back.summary())


def test_plan_explain_names_parameters_and_decisions(plan):
    text = plan.explain()
    assert text.startswith(f"plan {plan.fingerprint}")
    for name in ("blocks.0.mlp.fc.weight", "blocks.1.mlp.out.weight", "head.weight", "ln_f.bias"):
        assert name in text
    assert "column-parallel" in text and "row-parallel" in text and "vocab-parallel" in text
    assert "(tied: tok.weight)" in text
    assert "Tensor parallel (tp=2)" in text
    assert "Data parallel (dp=2)" in text and "2 buckets" in text
    assert "param_bytes_per_rank: 1,234" in text
    summary = plan.summary()
    assert "dp=2, tp=2" in summary and "1 tp collectives (1 all_reduce)" in summary


# =============================================================================== mesh
def test_virtual_mesh_coordinates():
    mesh = Mesh.virtual(dp=2, tp=2, rank=3)
    assert mesh.virtual and mesh.world_size == 4 and mesh.rank == 3
    assert mesh.device == torch.device("cpu")
    assert (mesh.coord("dp"), mesh.coord("tp")) == (1, 1)
    assert (mesh.coord("pp"), mesh.coord("ep")) == (0, 0)
    assert (mesh.size("dp"), mesh.size("tp"), mesh.size("pp"), mesh.size("ep")) == (2, 2, 1, 1)
    assert mesh.data_size == 2
    assert mesh.data_rank == 1
    assert mesh.ranks_along("tp") == [2, 3]
    assert mesh.ranks_along("dp") == [1, 3]
    assert mesh.ranks_along("pp") == [3]
    assert mesh.describe() == "Mesh(dp=2, tp=2)"
    assert mesh.to_dict() == {"pp": 1, "dp": 2, "ep": 1, "tp": 2}
    g = mesh.group("tp")
    assert (g.size, g.rank, g.group) == (2, 1, None)
    assert g.name.endswith(".tp")


def test_virtual_mesh_ranks_differing_only_in_tp_share_data_rank():
    meshes = [Mesh.virtual(dp=2, tp=2, rank=r) for r in range(4)]
    assert [m.data_rank for m in meshes] == [0, 0, 1, 1]
    assert [m.coord("tp") for m in meshes] == [0, 1, 0, 1]
    for m in meshes:
        # the tp peers of a rank all load the same data slice
        assert {meshes[r].data_rank for r in m.ranks_along("tp")} == {m.data_rank}
        # its dp peers load every slice once
        assert sorted(meshes[r].data_rank for r in m.ranks_along("dp")) == list(range(m.data_size))
        assert m.rank in m.ranks_along("tp") and m.rank in m.ranks_along("dp")


def test_virtual_mesh_rank_layout_is_tp_innermost():
    mesh = Mesh.virtual(dp=3, tp=2, rank=5)
    assert (mesh.coord("dp"), mesh.coord("tp")) == (2, 1)
    assert mesh.ranks_along("tp") == [4, 5]
    assert mesh.ranks_along("dp") == [1, 3, 5]
    assert mesh.data_size == 3 and mesh.data_rank == 2


def test_virtual_mesh_rejects_bad_rank_and_dim():
    with pytest.raises(autoshard.MeshError, match="outside a mesh of 4 ranks"):
        Mesh.virtual(dp=2, tp=2, rank=4)
    mesh = Mesh.virtual(tp=2)
    with pytest.raises(autoshard.MeshError, match="unknown mesh dimension 'xp'"):
        mesh.size("xp")



def test_step_graph_memory_follows_liveness():
    """Inputs persist; each new tensor lives until the last use of it or of a view of it; views,
    in-place writes and wait_tensor allocate nothing."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from autoshard.passes.memory import step_graph_memory

    def step(x, buf):
        a = x * 2                      # 4 KiB, alive until c is made (through its view)
        b = a.view(-1)
        c = b + 1                      # 4 KiB: a and c live together -> 8 KiB
        d = c.sum()                    # 4 bytes
        buf.copy_(c.view_as(buf))      # writes an input: nothing new
        return d

    x, buf = torch.zeros(32, 32), torch.zeros(32, 32)
    gm = make_fx(step)(x, buf)
    m = step_graph_memory(gm)
    assert m["inputs"] == 2 * 32 * 32 * 4
    assert m["transient"] == 2 * 32 * 32 * 4
    assert m["peak"] == m["inputs"] + m["transient"]
