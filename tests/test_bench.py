"""``autoshard bench``: the runs, the records, the table, the plot and the errors, on CPU ranks (Gloo)."""

from __future__ import annotations

import json
import math

import pytest

from autoshard import bench
from autoshard.cli import main

KEYS = {"date", "device", "torch", "commit", "model", "system", "plan", "tok_s_gpu", "mfu", "peak_gib"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One benchmark job on 2 CPU ranks: every peer that runs on CPU and four autoshard plans, profiled."""
    path = tmp_path_factory.mktemp("bench") / "results.json"
    rc = main(["bench", "--model", "tiny", "--nproc", "2", "--device", "cpu", "--iters", "2", "--warmup", "1",
               "--systems", "ddp,fsdp2,tp,autoshard,autoshard:zero=3,autoshard:tp=2,autoshard:pp=2,microbatches=2",
               "--profile", "--results", str(path), "--commit", "abc1234"])
    return rc, path


@pytest.mark.slow
def test_every_system_runs_and_is_recorded(tiny_run):
    rc, path = tiny_run
    assert rc == 0
    records = json.loads(path.read_text())
    assert [r["system"] for r in records] == ["ddp", "fsdp2", "tp", "autoshard", "autoshard:zero=3",
                                              "autoshard:tp=2", "autoshard:pp=2,microbatches=2"]
    for r in records:
        assert KEYS <= set(r), r
        assert "error" not in r, r
        assert r["tok_s_gpu"] > 0 and r["mfu"] > 0 and r["step_s"] > 0
        assert r["model"] == "tiny" and r["gpus"] == 2 and r["commit"] == "abc1234"
        assert r["device"].startswith("cpu") and r["peak_gib"] is None  # no device memory counter on CPU
    plans = {r["system"]: r["plan"] for r in records}
    # dp, tp and ZeRO run as one compiled step (the [compiler] executor)
    assert plans["autoshard:zero=3"] == "dp=2 zero=3 step program"
    assert plans["autoshard:tp=2"] == "tp=2 step program"
    assert "pp=2" in plans["autoshard:pp=2,microbatches=2"]
    setup = next(r for r in records if r["system"] == "autoshard:tp=2")["setup_s"]  # the first step by phase
    assert {"capture_s", "plan_s", "joint_export_s", "partition_s", "step_graph_s", "schedule_s"} <= set(setup)
    assert all(v >= 0 for v in setup.values()) and setup["joint_export_s"] > 0


@pytest.mark.slow
def test_all_systems_compute_the_same_function(tiny_run):
    """The first step's loss (before any update) over the same global batch: equal across systems (fp32)."""
    records = json.loads(tiny_run[1].read_text())
    losses = [r["loss_step1"] for r in records]
    assert max(losses) - min(losses) <= 1e-5 * abs(losses[0]), losses
    assert bench.summarize(records)["loss_spread"] <= bench.loss_tolerance(records)


@pytest.mark.slow
def test_profile_says_where_the_time_goes(tiny_run):
    records = json.loads(tiny_run[1].read_text())
    for r in records:
        prof = r["profile"]
        assert prof["step_ms"] > 0 and 0 <= prof["busy_ms"] <= prof["step_ms"] + 1e-6
        assert math.isclose(prof["idle_ms"], prof["step_ms"] - prof["busy_ms"], abs_tol=1e-6)
        assert prof.get("matmul_ms", 0) > 0, prof  # linears are matmuls on every system
    ddp = next(r for r in records if r["system"] == "ddp")
    assert ddp["profile"].get("communication_ms", 0) > 0  # gradient all-reduce


@pytest.mark.slow
def test_report_table_and_plot(tiny_run, tmp_path, capsys):
    path = tiny_run[1]
    assert main(["bench", "--report", str(path)]) == 0
    md = capsys.readouterr().out
    # CPU ranks: per-rank rates, no MFU and no ranking (they are not performance figures)
    assert "| system | plan | tok/s/rank |" in md and "autoshard:zero=3" in md
    assert "× the best peer" not in md and "MFU" not in md and "not performance figures" in md
    png = tmp_path / "r.png"
    assert main(["bench", "--plot", str(path), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_moe_model_with_expert_parallel_plan(tmp_path):
    records = bench.run(bench.BenchConfig(model="tiny-moe", systems=["ddp", "fsdp2", "autoshard:ep=2"], iters=1,
                                          warmup=1, device="cpu"), nproc=2)
    assert [r.get("error") for r in records] == [None, None, None]
    assert records[2]["plan"] == "ep=2"
    losses = [r["loss_step1"] for r in records]
    assert max(losses) - min(losses) <= 1e-5 * abs(losses[0]), losses
    spec = bench.build_model("tiny-moe")[1]
    assert spec["active_params"] < spec["params"]  # MFU counts the experts a token runs, not all of them


def test_default_systems():
    assert bench.default_systems(1, "cuda", "llama") == ["eager", "compile", "autoshard"]
    four = bench.default_systems(4, "cuda", "llama")
    assert {"ddp", "ddp_compile", "fsdp2", "fsdp2_compile", "tp_compile", "autoshard", "autoshard:tp=4"} <= set(four)
    assert not any("compile" in s for s in bench.default_systems(2, "cpu", "llama"))
    assert "autoshard:ep=4" in bench.default_systems(4, "cuda", "moe")


def test_split_systems():
    assert bench.split_systems("ddp, autoshard:dp=2,tp=2,zero=1,fsdp2,autoshard") == \
        ["ddp", "autoshard:dp=2,tp=2,zero=1", "fsdp2", "autoshard"]
    assert bench.split_systems("eager,autoshard:attention=block_sparse(block=64,local=4),compile") == \
        ["eager", "autoshard:attention=block_sparse(block=64,local=4)", "compile"]


def test_parse_system():
    assert bench.parse_system("fsdp2", 4) == ("fsdp2", {})
    assert bench.parse_system("autoshard", 4) == ("autoshard", {})
    assert bench.parse_system("autoshard:tp=2,zero=1", 4) == ("autoshard", {"tp": 2, "zero": 1, "dp": 2})
    assert bench.parse_system("autoshard:zero=3,offload=params,fuse=off", 2) == \
        ("autoshard", {"zero": 3, "offload": "params", "fuse": False, "dp": 2})


@pytest.mark.parametrize("spec, msg", [
    ("megatron", "unknown system 'megatron'"),
    ("autoshard:tp", "is not KEY=VALUE"),
    ("autoshard:sp=2", "unknown key 'sp'"),
    ("autoshard:tp=3", "does not divide the 4 ranks"),
    ("autoshard:dp=2,tp=4", "dp·tp·pp·ep = 8 but there are 4 ranks"),
    ("autoshard:zero=three", "is not an integer"),
])
def test_bad_system_names(spec, msg):
    with pytest.raises(bench.BenchError, match=msg):
        bench.parse_system(spec, 4)


def test_cli_errors_exit_2_before_starting_ranks(capsys, tmp_path):
    assert main(["bench", "--model", "tiny", "--nproc", "2", "--device", "cpu", "--systems", "nccl_magic"]) == 2
    assert "unknown system 'nccl_magic'" in capsys.readouterr().err
    assert main(["bench", "--model", "13b", "--nproc", "2", "--device", "cpu"]) == 2
    assert "unknown model '13b'" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a list"}')
    assert main(["bench", "--report", str(bad)]) == 2
    assert "not a list of benchmark records" in capsys.readouterr().err
    bad.write_text("[{truncated")
    assert main(["bench", "--report", str(bad)]) == 2
    capsys.readouterr()


def test_breakdown_counts_overlap_once():
    # compute 0-100 us, an all-reduce 50-150 overlapping it, a gap, then a fused kernel 200-250; 2 steps in 0.5 ms
    events = [("sm90_xmma_gemm_bf16", 0.0, 100.0), ("ncclDevKernel_AllReduce_Sum", 50.0, 150.0),
              ("triton_poi_fused_add_0", 200.0, 250.0)]
    b = bench.breakdown(events, steps=2, wall_s=0.0005)
    assert b["matmul_ms"] == pytest.approx(0.05) and b["communication_ms"] == pytest.approx(0.05)
    assert b["fused (triton)_ms"] == pytest.approx(0.025)
    assert b["busy_ms"] == pytest.approx(0.1)  # (150 + 50) us over 2 steps
    assert b["idle_ms"] == pytest.approx(0.15)


@pytest.mark.parametrize("name, cat", [
    ("ncclKernel_AllGather_RING_LL", "communication"), ("aten::mm", "matmul"),
    ("flash_fwd_kernel", "attention"), ("void cutlass::Kernel2<...>", "matmul"),
    ("triton_red_fused_rmsnorm", "fused (triton)"), ("elementwise_kernel", "other"),
])
def test_classify(name, cat):
    assert bench.classify(name) == cat


def test_results_append_is_atomic_and_keeps_old_records(tmp_path):
    path = tmp_path / "r.json"
    bench.append_results(str(path), [{"system": "a"}])
    bench.append_results(str(path), [{"system": "b"}])
    assert [r["system"] for r in json.loads(path.read_text())] == ["a", "b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temp file left behind


def test_autoshard_triton_kernels_are_classified():
    """Every Triton kernel of runtime/kernels is named after its module, so a profile can attribute it."""
    import re
    from pathlib import Path

    src = Path(bench.__file__).resolve().parents[1] / "runtime" / "kernels"
    names = [m.group(1) for f in src.glob("*.py")
             for m in re.finditer(r"@triton\.jit\n\s*def (\w+)\(", f.read_text()) if not m.group(1).startswith("_")]
    assert len(names) >= 15, names
    for n in names:
        want = "attention" if n.startswith("block_sparse") else "fused (triton)"
        assert bench.classify(n) == want, n
    assert bench.classify("pointwise_0123456789ab_fwd") == "fused (triton)"


def test_report_draws_ratios_only_within_one_job():
    """Timings compare only within one job: a row from another job gets no ratio, and the header names
    the newest job that ran both a peer and autoshard, even when a later record superseded one of them."""
    base = {"model": "m", "gpus": 1, "device": "H100", "seq": 8, "torch": "2.11", "plan": "", "mfu": 0.5,
            "peak_gib": 1.0, "loss_step1": 1.0}
    records = [{**base, "system": "compile", "tok_s_gpu": 100.0, "date": "2026-12-01", "commit": "aaa"},
               {**base, "system": "autoshard:dp=1", "tok_s_gpu": 110.0, "date": "2026-12-01", "commit": "aaa"},
               {**base, "system": "autoshard:dp=1", "tok_s_gpu": 150.0, "date": "2026-12-02", "commit": "bbb"}]
    text = bench.report(records)
    assert "= 1.10× the best peer (compile) in the job of 2026-12-01 at aaa" in text
    row = next(line for line in text.splitlines() if line.startswith("| autoshard:dp=1"))
    assert "| - |" in row and "bbb" in row  # the newest record, from a job without a peer: no ratio
