"""The step program ([compiler]): forward, backward, reduction and update as one graph per signature.

Contract 1 for the plans it runs is in tests/test_parity.py (dp, tp, dp×tp under SGD and AdamW, all on
the step program now); here: which plans it runs and why not the others, contract 2 on the compiled
programs (every rank's step graph issues the same collectives in the same order), clipping, LR
schedulers, the non-finite skip, bf16 masters and what the graph shows.
"""

from __future__ import annotations

import pytest
import torch

import autoshard
from parity import FlagGrad, batch, check, inputs, make_model, make_optimizer, reference, rel


def _gpt_loss(logits, target):
    tokens, flag = target
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    return FlagGrad.apply(loss, flag, float("inf"))


def _collective_signature(sm) -> list[str]:
    """Every collective node of every step graph, in graph order: op, group and shapes."""
    out = []
    for prog in sm._step_programs.values():
        for n in prog.gm.graph.nodes:
            if n.op == "call_function" and "_c10d_functional" in str(n.target):
                val = n.meta.get("val")
                out.append(f"{n.target}{[a for a in n.args[1:]]}{tuple(val.shape) if hasattr(val, 'shape') else ''}")
    return out


def _worker(case: str) -> dict:
    """One case on every rank of a 2-rank launch; returns this rank's result."""
    mesh = autoshard.Mesh(**({"dp": 2} if case.startswith("dp") else {"tp": 2}))
    kind = "gpt" if case == "tp-sched" else "llama"
    per = 8 // mesh.data_size
    lo = mesh.data_rank * per
    inp0, _, loss_fn = inputs(kind, batch(0)[lo:lo + per])
    opts = {"grad_clip": 0.05} if case.startswith("dp") and "plain" not in case else {}
    if case == "dp-zero2":
        opts["zero"] = 2
    opt = {"tp-sched": "sgd", "dp-adagrad": "adagrad", "dp-plain-adagrad": "adagrad"}.get(case, "adamw")
    sm = autoshard.autoshard(make_model(kind), mesh, example_inputs=inp0, loss_fn=loss_fn,
                             optimizer=make_optimizer(opt), **opts)
    sched = torch.optim.lr_scheduler.StepLR(sm.optimizer, step_size=2, gamma=0.5) if case == "tp-sched" else None
    losses = []
    for step in range(5):
        inp, target, _ = inputs(kind, batch(step)[lo:lo + per])
        losses.append(sm.train_step(inp, target))
        if sched is not None:
            sched.step()
    return {"losses": losses, "state": sm.full_state_dict(), "stats": sm.stats(), "executor": sm.executor,
            "collectives": _collective_signature(sm), "rank": mesh.rank, "schedule": sm._step_reports.get("schedule"),
            "notes": [n for n in sm.plan.notes if n.startswith("executor")]}


def _run(cases):
    return [_worker(c) for c in cases]


CASES = ["dp-clip", "tp-sched", "dp-zero2", "dp-adagrad", "dp-plain-adagrad"]


@pytest.fixture(scope="module")
def world2():
    per_rank = autoshard.launch(_run, 2, CASES, device="cpu")
    return {c: [per_rank[r][i] for r in range(2)] for i, c in enumerate(CASES)}


def _reference_sched():
    model = make_model("gpt")
    opt = make_optimizer("sgd")(list(model.parameters()))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    losses = []
    for step in range(5):
        inp, target, loss_fn = inputs("gpt", batch(step))
        loss = loss_fn(model(*inp), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_dp_with_clipping_matches_the_unmodified_model(world2):
    r0, _ = world2["dp-clip"]
    assert r0["executor"] == "step-program"
    check(r0, reference("llama", "adamw", grad_clip=0.05), "adamw")
    assert r0["stats"]["dp_comm_bytes"] > 0 and r0["stats"]["grad_norm"] > 0.05  # clipping was active


@pytest.mark.slow
def test_zero2_shards_the_update_inside_the_program(world2):
    """ZeRO-2 on the step program: gradients reduce-scattered, the update on each rank's shard, the
    updated shards all-gathered: graph nodes, and the result is the unmodified model's."""
    r0, r1 = world2["dp-zero2"]
    assert r0["executor"] == r1["executor"] == "step-program"
    check(r0, reference("llama", "adamw", grad_clip=0.05), "adamw")
    ops = " ".join(r0["collectives"])
    assert "reduce_scatter_tensor" in ops and "all_gather_into_tensor" in ops
    assert r0["stats"]["grad_norm"] > 0.05  # clipping was active


@pytest.mark.slow
def test_an_update_the_graph_cannot_hold_runs_on_the_host(world2):
    """Adagrad has no in-graph update; with clipping ZeRO manages the plan (stage 0: whole buckets), so
    the program ends at the all-reduced gradients and ZeRO clips and steps: the unmodified model's result."""
    r0, r1 = world2["dp-adagrad"]
    assert r0["executor"] == r1["executor"] == "step-program"
    assert "the update by the ZeRO memory manager" in r0["notes"][0] and "Adagrad" in r0["notes"][0]
    check(r0, reference("llama", "adagrad", grad_clip=0.05), "adagrad")
    ops = " ".join(r0["collectives"])
    assert "all_reduce" in ops and "all_gather" not in ops  # the reduction in the graph, no update there
    assert r0["stats"]["grad_norm"] > 0.05 and r0["stats"]["dp_comm_bytes"] > 0
    # fp32 without ZeRO: the reduced gradients land in the parameters' .grad, the optimizer steps on them
    r0, r1 = world2["dp-plain-adagrad"]
    assert r0["executor"] == r1["executor"] == "step-program"
    assert "the optimizer over the parameters' .grad" in r0["notes"][0]
    check(r0, reference("llama", "adagrad"), "adagrad")
    assert "all_reduce" in " ".join(r0["collectives"]) and r0["stats"]["dp_comm_bytes"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("case", ["dp-clip", "dp-zero2", "dp-adagrad", "dp-plain-adagrad"])
def test_reductions_are_issued_during_backward(world2, case):
    """The scheduling pass (passes/schedule.py): each bucket's reduction is issued as soon as its
    gradients exist, so backward work remains after it (the overlap), in the same order on every rank."""
    r0, r1 = world2[case]
    sched = r0["schedule"]
    assert sched == r1["schedule"] and sched["moved"] >= 1
    assert max(sched["overlap_nodes"]) > 0


@pytest.mark.slow
def test_lr_scheduler_drives_the_program(world2):
    r0, _ = world2["tp-sched"]
    assert r0["executor"] == "step-program"
    check(r0, _reference_sched(), "sgd")
    assert r0["stats"]["tp_comm_bytes"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_every_rank_issues_the_same_collectives_in_the_same_order(world2, case):
    """Contract 2 on the compiled programs: the step graphs' collective nodes agree rank by rank."""
    a, b = world2[case]
    assert a["collectives"], "the step graph should hold the plan's collectives"
    assert a["collectives"] == b["collectives"]
    if case.startswith("dp"):
        assert any("all_reduce" in c for c in a["collectives"])
    else:
        assert any("all_gather" in c for c in a["collectives"]) or any("all_reduce" in c for c in a["collectives"])


# ------------------------------------------------------------------ one process
def _single(kind="gpt", opt="sgd", **options):
    inp, _, loss_fn = inputs(kind, batch(0))
    return autoshard.autoshard(make_model(kind), autoshard.Mesh(), example_inputs=inp, loss_fn=loss_fn,
                               optimizer=make_optimizer(opt), **options)


def test_plans_it_cannot_run_say_why():
    sm = _single(fuse=True)
    assert sm.executor == "interpreted"
    assert any("executor: interpreted" in n and "fuse=True" in n for n in sm.plan.notes)
    sm = _single("gpt", "adagrad")  # no in-graph update: the user's optimizer steps on the host over .grad
    assert sm.executor == "step-program"
    assert any("the update by the optimizer over the parameters' .grad" in n and "Adagrad" in n
               for n in sm.plan.notes), sm.plan.notes
    for options in ({"zero": 1, "offload": "optimizer"}, {"zero": 1}):  # the update on the host, the rest a program
        sm = _single("gpt", "adagrad", **options)
        assert sm.executor == "step-program"
        assert any("the update by the ZeRO memory manager" in n for n in sm.plan.notes), sm.plan.notes


def test_executor_switch(monkeypatch):
    monkeypatch.setenv("AUTOSHARD_EXECUTOR", "interpreted")
    assert _single().executor == "interpreted"
    monkeypatch.delenv("AUTOSHARD_EXECUTOR")
    sm = _single()
    assert sm.executor == "step-program"
    assert any("executor: the step program" in n for n in sm.plan.notes)


def test_non_finite_gradient_skips_the_step_and_counts_it():
    inp, tokens, _ = inputs("gpt", batch(0))
    sm = autoshard.autoshard(make_model("gpt"), autoshard.Mesh(), example_inputs=inp, loss_fn=_gpt_loss,
                             optimizer=make_optimizer("adamw"))
    clean, poison = torch.tensor(False), torch.tensor(True)
    sm.train_step(inp, (tokens, clean))
    before = {n: p.detach().clone() for n, p in sm.local_parameters().items()}
    steps_before = {n: float(sm.optimizer.state[p]["step"]) for n, p in sm.local_parameters().items()}
    with pytest.warns(UserWarning, match="not finite"):
        loss = sm.train_step(inp, (tokens, poison))  # finite loss, infinite gradients
    assert loss == loss and abs(loss) != float("inf")
    assert sm.stats()["skipped_steps"] == 1
    for n, p in sm.local_parameters().items():
        assert torch.equal(p, before[n]), n
        assert float(sm.optimizer.state[p]["step"]) == steps_before[n]
    sm.train_step(inp, (tokens, clean))
    assert sm.stats()["skipped_steps"] == 1 and sm.stats()["steps"] == 3
    assert any(not torch.equal(p, before[n]) for n, p in sm.local_parameters().items())


def test_bf16_keeps_fp32_masters_in_the_optimizer():
    sm = _single(opt="adamw", precision="bf16")
    assert sm.executor == "step-program"
    inp, target, _ = inputs("gpt", batch(1))
    losses = [sm.train_step(inp, target) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    for n, p in sm.local_parameters().items():
        assert p.dtype == torch.bfloat16
        master = sm._joint.master(n)
        assert master.dtype == torch.float32 and sm.optimizer.state[master]["exp_avg"].dtype == torch.float32
        assert torch.equal(master.to(torch.bfloat16), p)
    ref_losses, _ = reference("gpt", "adamw", steps=1)
    fresh = _single(opt="adamw", precision="bf16")
    first = fresh.train_step(*inputs("gpt", batch(0))[:2])
    assert abs(first - ref_losses[0]) / ref_losses[0] < 2e-2  # bf16 compute: within bf16 rounding


def test_the_step_graph_shows_forward_backward_and_update():
    sm = _single(opt="adamw")
    inp, target, _ = inputs("gpt", batch(0))
    sm.train_step(inp, target)
    (prog,) = sm._step_programs.values()
    text = str(prog.gm.graph)
    assert "aten.mm" in text or "aten.addmm" in text  # forward and backward matmuls
    copies = [n for n in prog.gm.graph.nodes if n.target is torch.ops.aten.copy_.default]
    # each trainable parameter: parameter, exp_avg, exp_avg_sq and step written in place
    trainable = sum(p.requires_grad for p in sm.local_parameters().values())
    assert len(copies) == 4 * trainable
    assert "aten.where" in text and "aten.logical_not" in text  # the device-side skip


@pytest.mark.slow
def test_inductor_lowering_computes_what_the_fx_program_computes():
    """The GPU lowering (Inductor's compile_fx over the step graph, inputs updated in place), here on CPU."""
    from autoshard.passes.compile import compile_step

    results = []
    for compiled in (False, True):
        sm = _single(opt="adamw", grad_clip=1.0)
        inp, target, _ = inputs("gpt", batch(0))
        fwd = sm._program(inp, {}, training=True)
        prog, _ = compile_step(fwd, sm._loss, sm._joint, inp, {}, target, dp_group=None, dp_size=1,
                               buckets=[], grad_clip=1.0, device=torch.device("cpu"), compile=compiled)
        losses = []
        for step in range(2):
            inp, target, _ = inputs("gpt", batch(step))
            losses.append(prog([*inp, target]).tolist())
        results.append((losses, {n: p.detach().clone() for n, p in sm.local_parameters().items()}))
    (l0, p0), (l1, p1) = results
    assert prog.compiled and prog.compile_s > 0
    for a, b in zip(l0, l1):
        assert abs(a[0] - b[0]) <= 1e-5 * abs(a[0]) and a[1] == b[1] == 0.0
    for n in p0:
        assert float((p0[n] - p1[n]).norm() / p0[n].norm().clamp_min(1e-12)) < 1e-4, n


def test_fp16_loss_scaling_in_the_program(tmp_path):
    """fp16 without ZeRO on the step program: the tangent is the loss scale, gradients are unscaled in the
    graph, an overflow skips the step and the host-side scaler halves the scale after its hysteresis;
    the scale is saved and restored with a checkpoint."""
    def loss_fn(logits, target):
        tokens, poison = target
        logits = logits.float()  # the loss in fp32, as mixed precision computes it
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        return FlagGrad.apply(loss, poison, float("inf"))

    inp, tokens, _ = inputs("gpt", batch(0))
    sm = autoshard.autoshard(make_model("gpt"), autoshard.Mesh(), example_inputs=inp, loss_fn=loss_fn,
                             optimizer=make_optimizer("adamw"), precision="fp16")
    assert sm.executor == "step-program"
    assert all(p.dtype == torch.float16 for p in sm.local_parameters().values())
    (name, w), *_ = sm.local_parameters().items()
    scales, moved = [], []
    for step in range(5):
        before = w.detach().clone()
        sm.train_step(inp, (tokens, torch.tensor(step in (1, 2))))
        scales.append(sm.stats()["loss_scale"])
        moved.append(not torch.equal(w, before))
    s0 = 2.0**16
    assert scales == [s0, s0, s0 / 2, s0 / 2, s0 / 2]
    assert moved == [True, False, False, True, True]
    assert sm.stats()["skipped_steps"] == 2
    (prog,) = sm._step_programs.values()
    assert float(prog.tensors[-1]) == s0 / 2  # the program's scale input follows the scaler
    sm.save(str(tmp_path / "ckpt"))
    fresh = autoshard.autoshard(make_model("gpt"), autoshard.Mesh(), example_inputs=inp, loss_fn=loss_fn,
                                optimizer=make_optimizer("adamw"), precision="fp16")
    autoshard.load(str(tmp_path / "ckpt"), fresh)
    assert fresh.stats()["loss_scale"] == s0 / 2
    a = fresh.train_step(inp, (tokens, torch.tensor(False)))
    b = sm.train_step(inp, (tokens, torch.tensor(False)))
    assert a == b


def test_activation_checkpointing_recomputes_blocks_in_the_program():
    """Checkpointed blocks are tagged for AOTAutograd's partitioner: the program keeps fewer activations
    for backward and recomputes the blocks there, and computes what the unmodified model computes."""
    runs = {}
    for ac in (None, "all"):
        inp, _, loss_fn = inputs("llama", batch(0))
        sm = autoshard.autoshard(make_model("llama"), autoshard.Mesh(), example_inputs=inp, loss_fn=loss_fn,
                                 optimizer=make_optimizer("adamw"), activation_checkpointing=ac)
        assert sm.executor == "step-program"
        losses = [sm.train_step(*inputs("llama", batch(s))[:2]) for s in range(3)]
        runs[ac] = (losses, sm._step_reports, sm.full_state_dict())
    plain, ckpt = runs[None][1], runs["all"][1]
    assert ckpt["remat"]["checkpointed_nodes"] > 0 and plain["remat"]["checkpointed_nodes"] == 0
    assert ckpt["remat"]["saved_bytes"] < 0.6 * plain["remat"]["saved_bytes"]
    assert ckpt["nodes"] > plain["nodes"]  # the recomputed forward ops
    ref_losses, ref_state = reference("llama", "adamw", steps=3)
    for a, b in zip(runs["all"][0], ref_losses):
        assert abs(a - b) <= 1e-5 * abs(b)
    for k, v in ref_state.items():  # DESIGN.md's bound for AdamW (elementwise steps amplify rounding)
        if v.is_floating_point() and v.norm() > 0:
            assert rel(runs["all"][2][k], v) <= 1e-3, k


def test_memory_prediction_reads_the_program():
    """Before the first step the plan's terms; after it, the step graph's own liveness walk."""
    from autoshard.passes.memory import step_graph_memory

    sm = _single("llama", "adamw")
    before = sm.predicted_peak_bytes()["device"]
    inp, target, _ = inputs("llama", batch(0))
    sm.train_step(inp, target)
    (prog,) = sm._step_programs.values()
    walked = step_graph_memory(prog.gm)
    assert sm.predicted_peak_bytes() == {"device": walked["peak"], "host": 0}
    states = sum(p.numel() * 4 * 3 for p in sm.local_parameters().values())  # fp32 params, exp_avg, exp_avg_sq
    assert states <= walked["inputs"] <= states * 1.1  # + step counters, learning rate, the batch
    assert 0.5 * before <= walked["peak"] <= 2 * before, (before, walked)
