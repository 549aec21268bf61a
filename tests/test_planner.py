"""The planner: cost model pieces, known-optimal small cases, constraints, the infeasible message, the CLI
(`plan --json/--explain/--diff`, `calibrate`), and a plan chosen by `Mesh.auto()` training with parity.

Everything but the last test runs on virtual meshes in this process (no ranks started).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace

import pytest
import torch

import autoshard
from autoshard.cli import main
from autoshard.passes import cost_model as cm
from autoshard.passes import planner as P
from autoshard.runtime import hardware as H
from autoshard.runtime.schedules import build_schedule
from parity import (
    GLOBAL_BATCH,
    STEPS,
    auto_sharded,
    batch,
    check,
    gpt_loss,
    make_model,
    make_optimizer,
    reference,
)

GiB = 2**30
H100 = H.get_profile("h100")


def _llama(layers: int = 4, d: int = 64, heads: int = 4, kv: int = 2, ffn: int = 128, vocab: int = 128,
           meta: bool = True) -> torch.nn.Module:
    from autoshard.examples.llama import Llama, LlamaConfig

    cfg = LlamaConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=kv, ffn=ffn, seq_len=64)
    if meta:
        with torch.device("meta"):
            return Llama(cfg)
    torch.manual_seed(0)
    return Llama(cfg)


def _tokens(b: int, s: int, meta: bool = True) -> torch.Tensor:
    return torch.zeros(b, s, dtype=torch.int64, device="meta" if meta else "cpu")


@pytest.fixture(scope="module")
def small() -> cm.ModelAnalysis:
    """A 4-layer Llama-style model (4 heads, 2 kv heads), global batch 64 x 64, bf16, tp up to 8."""
    return cm.analyse(_llama(), (_tokens(64, 64),), precision="bf16", tps=(1, 2, 4, 8), name="small")


@pytest.fixture(scope="module")
def mid() -> cm.ModelAnalysis:
    """A 16-layer 1.3B-ish model, 64 x 2048 global batch: big enough for memory to bind on a budget."""
    return cm.analyse(_llama(layers=16, d=2048, heads=16, kv=16, ffn=5632, vocab=32000), (_tokens(64, 2048),),
                      precision="bf16", tps=(1, 2, 4, 8), name="mid")


def _pinned(analysis: cm.ModelAnalysis, gpus: int, profile=H100, memory_gib: float = 1e4, **pins) -> P.AutoPlan:
    space = P.SearchSpace(checkpointing=False, fixed=tuple(sorted(pins.items())))
    return P.plan(analysis, gpus, profile, memory_gib=memory_gib, space=space)


# ====================================================================================== cost model pieces
def test_collectives_alpha_beta():
    n, bw, lat = 1e9, 100.0, 5.0
    # ring: 2(p-1) latency steps and 2(p-1)/p of the bytes; tree: 2 log2(p) steps, same bytes
    assert cm.ring_allreduce(n, 4, bw, lat) == pytest.approx(6 * 5e-6 + 1.5 * n / 100e9)
    assert cm.tree_allreduce(n, 4, bw, lat) == pytest.approx(4 * 5e-6 + 1.5 * n / 100e9)
    assert cm.ring_allreduce(n, 1, bw, lat) == 0.0
    # small messages on many ranks: tree wins (latency); NCCL's choice is the cheaper one
    assert cm.allreduce_seconds(1e3, 512, bw, lat) == cm.tree_allreduce(1e3, 512, bw, lat)
    assert cm.allreduce_seconds(1e3, 512, bw, lat) < cm.ring_allreduce(1e3, 512, bw, lat)


@pytest.mark.parametrize("schedule,v", [("1f1b", 1), ("gpipe", 1), ("interleaved_1f1b", 2)])
def test_bubble_closed_form_and_inflight_match_the_simulator(schedule, v):
    """The planner's closed form m·T + (pp-1)/v·T and its in-flight counts equal Schedule.simulate()."""
    for pp in (2, 4, 8):
        for m in (pp, 2 * pp, 4 * pp):
            sim = build_schedule(schedule, pp, m, v).simulate([1.0 / v] * (pp * v), [2.0 / v] * (pp * v))
            assert sim.makespan == pytest.approx(m * 3.0 + (pp - 1) / v * 3.0)
            assert cm.inflight(schedule, pp, m, v, "f") == pytest.approx(sim.peak_inflight[0] / v)
            if pp > 2:  # the busiest middle rank; with pp=2 there is none
                assert cm.inflight(schedule, pp, m, v, "i") == pytest.approx(sim.peak_inflight[1] / v)


def test_stage_blocks_balance_the_ends():
    assert cm.stage_blocks(16, 1, 0.5, 1.5) == (16, 16, 16)
    nf, nm, nl = cm.stage_blocks(16, 4, 0.0, 2.0)  # a heavy LM head: the last stage takes fewer blocks
    assert nl < nm and nf + nl + 2 * nm >= 16
    with pytest.raises(autoshard.PlanError):
        cm.stage_blocks(2, 4, 0.0, 0.0)


def test_analysis_of_one_block_stands_for_all(small):
    model = _llama()
    assert small.num_blocks == 4 and len(small.blocks) == 1 and small.block_path == "layers"
    assert small.total_params == sum(p.numel() for p in model.parameters())
    # one block's parameters x 4 + embedding + (final norm, head) = the whole model at tp=1
    whole = 4 * small.block(1).params + small.pre[1].params + small.post[1].params - small.tied_params
    assert whole == small.total_params
    # Megatron's pattern from the tp pass itself: 2 all-reduces forward + 2 backward per block; none at tp=1
    assert small.block(1).ar_count == 0 and small.block(2).ar_count == 4
    # 2 kv heads: k/v stay replicated at tp=4, so a block holds more than a quarter of its parameters
    assert small.block(1).params / 4 < small.block(4).params < small.block(1).params / 2
    # 4 attention heads do not split 8 ways: the tp pass's own message is kept
    assert set(small.tp_errors) == {8} and "attention heads" in small.tp_errors[8]
    assert small.block(2).saved_bytes < small.block(1).saved_bytes
    assert small.model_flops_per_sequence > 0 and small.tokens_per_sequence == 64


def test_analysis_never_touches_a_real_model():
    model = _llama(meta=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    a = cm.analyse(model, (torch.randint(0, 128, (8, 32)),), precision="fp32", tps=(1, 2))
    assert a.total_params == sum(p.numel() for p in model.parameters())
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert len(model.layers) == 4 and all(p.device.type == "cpu" for p in model.parameters())


def test_memory_terms_agree_with_sharded_module():
    """Model-state terms equal ShardedModule._memory_estimate on the same plan (virtual mesh)."""
    model = make_model("llama_ex")
    a = cm.analyse(model, (batch(0),), precision="bf16", tps=(1, 2), loss="cross_entropy")
    for deg, zero in (({"dp": 2, "tp": 2}, 1), ({"dp": 4}, 2), ({"dp": 4}, 0)):
        mesh = autoshard.Mesh.virtual(**deg)
        sm = autoshard.autoshard(make_model("llama_ex"), mesh, example_inputs=(batch(0)[:GLOBAL_BATCH // mesh.data_size],),
                                 loss_fn=gpt_loss, optimizer=make_optimizer("adamw"), zero=zero, precision="bf16")
        mine = _pinned(a, 4, zero=zero, offload=None, tp=deg.get("tp", 1), pp=1)
        assert mine.memory["params"] == pytest.approx(sm.plan.memory["params"], rel=0.01)
        assert mine.memory["optimizer"] == pytest.approx(sm.plan.memory["optimizer"], rel=0.01)


# ====================================================================================== the solver
def test_ample_memory_fast_links_big_batch_is_pure_data_parallel(small):
    """Compute-bound, nothing binds: tp only adds all-reduces and pp only adds a bubble, so dp=N is optimal."""
    p = P.plan(small, 8, H100)
    assert p.mesh == {"dp": 8, "tp": 1, "pp": 1, "ep": 1}
    assert p.binding.startswith("none")
    assert p.memory_per_gpu_bytes <= p.budget_bytes


def test_the_solver_returns_the_best_of_every_candidate(small):
    """Exhaustive check: no pinned single plan that fits is faster than the one chosen."""
    best = P.plan(small, 4, H100, space=P.SearchSpace(checkpointing=False))
    seen = 0
    for tp in (1, 2, 4):
        for pp in (1, 2, 4):
            if 4 % (tp * pp):
                continue
            for zero in (0, 1, 2, 3):
                try:
                    alt = _pinned(small, 4, memory_gib=None, tp=tp, pp=pp, zero=zero)
                except P.InfeasiblePlanError:
                    continue
                seen += 1
                assert best.step_time_s <= alt.step_time_s * (1 + 1e-9), (best.decision_text(), alt.decision_text())
    assert seen >= 10


def test_memory_binds_and_is_named(mid):
    """A budget below the fastest plan's footprint rules it out: the planner takes the next and says why."""
    space = P.SearchSpace(zero_stages=(0,), offloads=(None,), checkpointing=False)
    fastest = P.plan(mid, 8, H100, memory_gib=1e4, space=space)
    assert fastest.binding.startswith("none")
    budget = fastest.memory_per_gpu_bytes * 0.8 / GiB
    p = P.plan(mid, 8, H100, memory_gib=budget, space=space)
    assert p.memory_per_gpu_bytes <= budget * GiB < fastest.memory_per_gpu_bytes
    assert p.step_time_s >= fastest.step_time_s
    assert p.binding.startswith("memory: the fastest plan (dp=8 tp=1 pp=1") and f"budget {P.gib(budget * GiB)}" in p.binding
    # ZeRO-1 shards the optimizer states: allowed, it fits pure data parallelism again
    z1 = P.plan(mid, 8, H100, memory_gib=budget, space=replace(space, zero_stages=(0, 1)))
    assert z1.mesh["dp"] == 8 and z1.zero == 1


def test_checkpointing_is_the_least_that_fits(mid):
    """With checkpointing allowed and a tight budget, k is the smallest count of blocks that fits."""
    space = P.SearchSpace(zero_stages=(1,), offloads=(None,), fixed=(("pp", 1), ("tp", 1)))
    free = P.plan(mid, 8, H100, memory_gib=1e4, space=space)
    budget = free.memory_per_gpu_bytes * 0.75 / GiB
    p = P.plan(mid, 8, H100, memory_gib=budget, space=space)
    assert p.checkpoint_blocks > 0 and p.memory_per_gpu_bytes <= budget * GiB
    assert p.step_time_s > free.step_time_s  # recomputation costs a forward per checkpointed block
    assert free.checkpoint_blocks == 0
    assert p.runnable and not p.runnable_reason  # the runtime checkpoints (tests/test_activation_checkpoint.py)


def test_constraints_are_respected(small, mid):
    for a, gpus, gpn, budget in ((small, 8, 8, None), (small, 16, 4, None), (mid, 8, 8, 40.0), (mid, 32, 8, 20.0),
                                 (mid, 16, 8, 60.0)):
        p = P.plan(a, gpus, H100, memory_gib=budget, gpus_per_node=gpn, alternatives=8)
        for cand in [{"mesh": p.mesh, "zero": p.zero, "offload": p.offload, "microbatches": p.microbatches,
                      "schedule": p.schedule, "memory_per_gpu_bytes": p.memory_per_gpu_bytes, "feasible": True},
                     *p.alternatives]:
            d = cand["mesh"]
            assert d["dp"] * d["tp"] * d["pp"] * d["ep"] == gpus
            assert d["tp"] <= gpn and d["tp"] not in a.tp_errors and gpn % d["tp"] == 0
            assert d["pp"] <= a.num_blocks
            assert a.global_batch % (d["dp"] * d["ep"]) == 0
            local = a.global_batch // (d["dp"] * d["ep"])
            assert local % cand["microbatches"] == 0
            if d["pp"] == 1:
                assert cand["microbatches"] == 1
            if cand["schedule"] == "1f1b":
                assert cand["microbatches"] >= d["pp"]
            if cand["zero"] > 0:
                assert d["dp"] > 1
            if cand["offload"] == "params":
                assert cand["zero"] == 3
            if cand["feasible"]:
                assert cand["memory_per_gpu_bytes"] <= p.budget_bytes


def test_the_global_batch_limits_data_parallelism():
    a = cm.analyse(_llama(), (_tokens(2, 64),), precision="bf16", tps=(1, 2, 4, 8))
    p = P.plan(a, 8, H100)
    assert p.mesh["dp"] * p.mesh["ep"] <= 2 and 2 % (p.mesh["dp"] * p.mesh["ep"]) == 0
    assert any("does not split" in n for n in p.notes)


def test_no_feasible_plan_names_the_binding_constraint(mid):
    # parameters of the 1.3B model in bf16 at tp=8: about 0.3 GiB; a 0.1 GiB budget cannot hold them
    space = P.SearchSpace(zero_stages=(0,), offloads=(None,), checkpointing=False, fixed=(("tp", 8),))
    with pytest.raises(P.InfeasiblePlanError) as e:
        P.plan(mid, 8, H100, memory_gib=0.1, space=space)
    msg = str(e.value)
    assert msg.startswith("no feasible plan: parameters alone need") and "at tp=8" in msg
    assert "(budget 102 MiB)" in msg and "use zero=3, offload, or more GPUs" in msg
    # with ZeRO-3 and offload allowed, the message no longer proposes them
    with pytest.raises(P.InfeasiblePlanError) as e:
        P.plan(mid, 8, H100, memory_gib=0.01)
    assert "zero=3" not in str(e.value).split(": use ")[-1] and "no feasible plan" in str(e.value)


def test_80_layers_on_512_gpus(capsys):
    """A 70B-shaped model (80 layers, GQA) on 512 H100s plans from one block; the time goes to the notes."""
    from autoshard.examples.llama import Llama, LlamaConfig

    t0 = time.perf_counter()
    with torch.device("meta"):
        model = Llama(LlamaConfig(d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn=28672, vocab_size=128256,
                                  seq_len=4096))
    a = cm.analyse(model, (_tokens(1024, 4096),), precision="bf16", tps=(1, 2, 4, 8))
    p = P.plan(a, 512, H100, gpus_per_node=8)
    seconds = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\n80 layers on 512 GPUs: planned in {seconds:.2f} s ({p.planner['candidates']} candidates): "
              f"{p.decision_text()}")
    assert a.num_blocks == 80 and len(a.blocks) == 1
    assert math.prod(p.mesh.values()) == 512 and p.mesh["tp"] <= 8
    assert p.memory_per_gpu_bytes <= p.budget_bytes and p.step_time_s > 0 and 0 < p.mfu < 1


def test_plan_json_round_trip_and_diff(small):
    p = P.plan(small, 8, H100)
    q = P.AutoPlan.from_json(p.to_json())
    assert q.to_dict() == json.loads(p.to_json())
    changed, lines = P.diff(p, q)
    assert not changed and lines == ["decisions are the same"]
    r = _pinned(small, 8, tp=2, zero=1)
    changed, lines = P.diff(p, r)
    assert changed and any(line.strip().startswith("tp: 1 -> 2") for line in lines)
    with pytest.raises(ValueError):
        P.AutoPlan.from_json('{"mesh": {}}')


# ====================================================================================== hardware profiles
def test_hardware_profiles(tmp_path, monkeypatch):
    h100, h200, cpu = H.get_profile("h100"), H.get_profile("H200"), H.get_profile("cpu")
    assert h100.gpus_per_node == h200.gpus_per_node == 8
    assert h100.inter_gbps == pytest.approx(45.0)  # 400 Gb/s per GPU, ~90% achieved
    assert h200.memory_bytes > h100.memory_bytes and h200.memory_gbps > h100.memory_gbps
    assert h100.matmul_rate("bf16") > h100.matmul_rate("fp32") > 0 and cpu.name == "cpu"
    path = h200.save(str(tmp_path / "mine.json"))
    assert H.get_profile(path) == h200
    monkeypatch.setenv("AUTOSHARD_PROFILES", str(tmp_path))
    assert H.get_profile("mine") == h200
    with pytest.raises(ValueError, match="not a built-in profile"):
        H.get_profile("a100")
    with pytest.raises(ValueError, match="unknown keys"):
        H.HardwareProfile.from_dict({**h100.to_dict(), "bogus": 1})


def test_mesh_auto_reads_the_world(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "16")
    auto = autoshard.Mesh.auto(profile="h100", memory_gib=40)
    assert auto.is_auto and auto.world_size == 16 and auto.memory_gib == 40


# ====================================================================================== CLI
_MODEL = "autoshard.examples.gpt:make_model(vocab_size=512, seq_len=128, d_model=128, n_heads=4, d_ff=256, n_layers=4)"


def test_cli_plan_json_schema(capsys):
    assert main(["plan", _MODEL, "--gpus", "8", "--gpu", "h100", "--input", "int64[64,128]", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert set(d["mesh"]) == {"dp", "tp", "pp", "ep"} and math.prod(d["mesh"].values()) == 8
    for key, kind in (("zero", int), ("microbatches", int), ("memory_per_gpu_bytes", int), ("step_time_s", float),
                      ("mfu", float), ("alternatives", list), ("binding", str), ("checkpoint_blocks", int)):
        assert isinstance(d[key], kind), key
    assert d["offload"] in (None, "optimizer", "params")
    for alt in d["alternatives"]:
        assert {"mesh", "zero", "step_time_s", "memory_per_gpu_bytes", "feasible"} <= set(alt)
    assert d["model"]["global_batch"] == 64 and d["hardware"]["name"] == "h100"


def test_cli_plan_explain_and_brief(capsys):
    assert main(["plan", _MODEL, "--gpus", "4", "--gpu", "h200", "--input", "int64[16,128]", "--explain"]) == 0
    out = capsys.readouterr().out
    for part in ("Chosen:", "Step time", "Memory per GPU", "Binding constraint:", "Alternatives", "Planner:"):
        assert part in out, part
    assert main(["plan", _MODEL, "--gpus", "4", "--gpu", "h200", "--input", "int64[16,128]"]) == 0
    assert capsys.readouterr().out.startswith("plan: dp=")


def test_cli_plan_diff(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["plan", _MODEL, "--gpus", "8", "--input", "int64[64,128]", "--json", "-o", str(a)]) == 0
    assert main(["plan", _MODEL, "--gpus", "8", "--input", "int64[64,128]", "--fix", "tp=2,zero=1", "--json",
                 "-o", str(b)]) == 0
    capsys.readouterr()
    assert main(["plan", "--diff", str(a), str(a)]) == 0
    assert "decisions are the same" in capsys.readouterr().out
    assert main(["plan", "--diff", str(a), str(b)]) == 1
    out = capsys.readouterr().out
    assert "tp: 1 -> 2" in out and "step time" in out
    (tmp_path / "bad.json").write_text("{}")
    assert main(["plan", "--diff", str(a), str(tmp_path / "bad.json")]) == 2
    assert "not an autoshard plan" in capsys.readouterr().err


def test_cli_plan_errors(capsys):
    assert main(["plan", _MODEL, "--gpus", "8", "--input", "int64[64,128]", "--memory-gib", "0.001",
                 "--fix", "zero=0,offload=none"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("autoshard: error: no feasible plan:") and "budget" in err
    assert main(["plan", _MODEL, "--input", "int64[64,128]"]) == 2
    assert "--gpus" in capsys.readouterr().err
    assert main(["plan", _MODEL, "--gpus", "8", "--input", "int64[64,128]", "--gpu", "a100"]) == 2
    assert "not a built-in profile" in capsys.readouterr().err
    assert main(["plan", _MODEL, "--gpus", "8", "--input", "int64[64,128]", "--fix", "tp=two"]) == 2


def test_cli_calibrate(tmp_path, capsys):
    out = tmp_path / "cpu.json"
    assert main(["calibrate", "--device", "cpu", "--quick", "--nprocs", "2", "--name", "here", "--out", str(out)]) == 0
    prof = H.get_profile(str(out))
    assert prof.name == "here" and prof.matmul_tflops["fp32"] > 0 and prof.memory_gbps > 0
    assert prof.intra_gbps > 0 and "all-reduce over 2 local ranks" in prof.sources["intra_gbps"]
    assert "wrote" in capsys.readouterr().out
    assert main(["plan", _MODEL, "--gpus", "2", "--gpu", str(out), "--input", "int64[4,128]"]) == 0


# ====================================================================================== Mesh.auto() trains with parity
def _auto_worker(budgets: list[float | None]) -> list[dict] | None:
    out = [auto_sharded(budget, steps=STEPS) for budget in budgets]
    for o in out:
        o["plan"] = o["auto"]  # the tests read the planner's choice under "plan"
    return out if out[0]["rank"] == 0 else None


@pytest.mark.slow
def test_auto_plan_trains_with_parity():
    """Mesh.auto() on 4 CPU ranks: the planner's choice (free, then under a budget that excludes it) trains
    like the unmodified model on one process (contract 1)."""
    a = cm.analyse(make_model("gpt"), (batch(0),), precision="fp32", tps=(1, 2, 4), loss="cross_entropy")
    free = P.plan(a, 4, H.get_profile("cpu"), space=P.runtime_space())
    tight = free.memory_per_gpu_bytes * 0.9 / GiB
    results = autoshard.launch(_auto_worker, 4, [None, tight], device="cpu")[0]
    ref = reference("gpt", "adamw")
    for r in results:
        check(r, ref, "adamw")
        assert r["degrees"] == {"pp": r["plan"]["mesh"]["pp"], "dp": r["plan"]["mesh"]["dp"],
                                "ep": r["plan"]["mesh"]["ep"], "tp": r["plan"]["mesh"]["tp"]}
        assert any(n.startswith("planner: ") for n in r["notes"])
        assert r["plan"]["runnable"]
    first, second = results
    assert first["plan"]["mesh"] == free.mesh and first["plan"]["zero"] == free.zero
    assert second["plan"]["memory_per_gpu_bytes"] <= tight * GiB
    decision = ("mesh", "zero", "offload", "checkpoint_blocks")
    assert [second["plan"][k] for k in decision] != [first["plan"][k] for k in decision]
    assert second["plan"]["binding"].startswith("memory:")


def test_uncapturable_on_meta_is_a_plan_error_naming_the_fix():
    """A ModuleList MoE block picks its tokens with nonzero, which meta tensors cannot run: the planner
    says so and what to do, rather than leaking the meta-kernel error."""
    from autoshard.examples.moe_gpt import MoEGPT, MoEGPTConfig
    from autoshard.passes import cost_model
    from autoshard.runtime.errors import PlanError

    model = MoEGPT(MoEGPTConfig(vocab_size=64, seq_len=8, d_model=16, n_layers=2, n_heads=2, d_ff=32,
                                n_experts=4, top_k=2))
    with pytest.raises(PlanError, match=r"could not capture MoEGPT on the meta device .*Mesh\(dp=\.\.\., ep=\.\.\.\)"):
        cost_model.analyse(model, (torch.randint(0, 64, (4, 8)),), precision="fp32")
