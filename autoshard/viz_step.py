"""Time and memory of a sharded program, as the viz page charts them: the pipeline schedule, per-rank
parameter memory, and one training step of rank 0 with its memory over time.

Everything here reads what :func:`~autoshard.viz_graph.lower` already built (the plan, the schedule
and the rewritten graph); nothing is captured or lowered again.

**One step** (:func:`step_timeline`) is a two-stream simulation of rank 0's graph, in graph order:

* the *compute* stream runs each op of the forward, then each op's backward in reverse order, then
  the optimizer step. An op takes the longer of its device time (the cost model's per-node FLOPs and
  bytes, at the hardware profile's achieved rates, divided by ``tp`` where the op works on shards;
  backward costs :data:`~autoshard.passes.cost_model.BACKWARD_MATMUL` and friends times the forward)
  and the profile's eager dispatch time per op. View ops are free.
* the *communication* stream runs the collectives. Tensor-parallel ones (``all_reduce``,
  ``all_gather`` in the forward; ``reduce_grad``'s all-reduce in the backward) are synchronous: the
  compute stream waits for them. The data-parallel gradient buckets (``plan.dp_buckets``) start as
  soon as the backward has produced every gradient in them and overlap the rest of the backward; the
  optimizer waits for the last. So the chart shows which communication is hidden and which is not.

**Memory over time** (:func:`memory_timeline`) follows the same events: parameters, optimizer states
and buffers held throughout, activations growing through the forward and released through the
backward, gradients appearing as the backward produces them. The heights of the terms are the plan's
own estimate (``plan.memory``); the walk only gives their shape in time, so the chart and ``explain``
never disagree about the peak.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch.fx import Node

from autoshard.passes.cost_model import (
    BACKWARD_ATTENTION,
    BACKWARD_BYTES,
    BACKWARD_MATMUL,
    OPTIMIZER_BYTES_PLAIN,
    OPTIMIZER_BYTES_ZERO,
    allreduce_seconds,
    node_bytes,
    node_flops,
)
from autoshard.passes.memory import VIEW_OPS
from autoshard.passes.tensor_parallel import module_path
from autoshard.runtime import collectives as C
from autoshard.runtime.hardware import HardwareProfile, get_profile

from .viz_graph import Facts, Lowered, drawn, is_collective, val_shapes


# ====================================================================================== schedule and memory
def schedule_data(low: Lowered) -> dict[str, Any] | None:
    """The pipeline schedule (``Schedule.to_dict``) and its simulation; ``None`` without a pipeline.

    Costs: a stage's forward is proportional to its FLOPs (normalised to a mean of 1) and its backward
    costs twice its forward (split backward: B and W once each), the usual ratio for matmul-bound blocks.
    """
    sched = low.sm.schedule
    if sched is None:
        return None
    flops = [float(s.get("flops", 1.0)) for s in low.plan.pipeline.get("stages", [])]
    if len(flops) != sched.num_stages or not any(flops):
        flops = [1.0] * sched.num_stages
    mean = sum(flops) / len(flops)
    f = [x / mean for x in flops]
    if sched.split_backward:
        sim = sched.simulate(f, f, f)
    else:
        sim = sched.simulate(f, [2 * x for x in f], 0.0)
    d = sched.to_dict()
    d["simulation"] = {
        "costs": {"forward": f, "backward": [2 * x for x in f] if not sched.split_backward else f,
                  "weight": f if sched.split_backward else [0.0] * len(f)},
        "makespan": sim.makespan, "bubble_fraction": sim.bubble_fraction, "busy": sim.busy,
        "peak_inflight": sim.peak_inflight,
        "timeline": [[[start, stop, str(a), a.kind, a.stage, a.microbatch] for start, stop, a in row]
                     for row in sim.timeline],
    }
    return d


def memory_by_rank(low: Lowered) -> list[dict[str, Any]]:
    """Per pipeline rank: parameter bytes by role (local shapes × 4 bytes), gradients, and which ranks.

    Every rank of one pipeline rank holds the same amount (tp shards are even, dp replicates), so the
    list has one entry per pp rank, naming the global ranks it covers.
    """
    plan = low.plan
    mesh = plan.mesh
    inner = math.prod(v for k, v in mesh.items() if k != "pp")
    sched = low.sm.schedule
    out = []
    for r in range(low.pp):
        names: list[str] = []
        if sched is None:
            names = list(plan.params)
        else:
            for s, ps in enumerate(low.stage_params):
                if sched.rank_of(s) == r:
                    names += [p for p in ps if p not in names]
        roles: dict[str, float] = {}
        for n in names:
            p = plan.params.get(n)
            if p is None:
                continue
            roles[p.role] = roles.get(p.role, 0.0) + math.prod(p.local_shape) * 4.0
        total = sum(roles.values())
        out.append({"pp_rank": r, "ranks": [r * inner, (r + 1) * inner - 1], "params": roles,
                    "param_bytes": total, "grad_bytes": total, "total_bytes": 2 * total})
    return out



# ====================================================================================== one step of rank 0
#: the hardware profile the step is timed on when none is given: the cost model's default GPU
DEFAULT_PROFILE = "h100"


def _rank0_nodes(low: Lowered) -> list[Node]:
    """The ops rank 0 runs, in graph order: every stage with ``pp == 1``, else the stages of pp rank 0."""
    sched = low.sm.schedule
    mine = ({s for s in range(sched.num_stages) if sched.rank_of(s) == 0}
            if sched is not None and low.pp > 1 else None)
    return [n for n in low.graph.nodes if n.op == "call_function" and drawn(n)
            and (mine is None or low.stage_of.get(n.name, 0) in mine)]


def _segment(path: str) -> str:
    """Where an op's time is booked: its block (``model.layers.3``) or its top-level module (``lm_head``)."""
    if not path:
        return "(model)"
    parts = path.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[:i + 1])
    return ".".join(parts[:2])


def _floating(node: Node) -> bool:
    v = node.meta.get("val")
    if isinstance(v, (tuple, list)):
        return any(isinstance(t, torch.Tensor) and t.is_floating_point() for t in v)
    return isinstance(v, torch.Tensor) and v.is_floating_point()


def _local_bytes(node: Node, facts: Facts) -> int:
    """Bytes of the value ``node`` produces on one rank (its local shape)."""
    shp = facts.local_shape(node)
    if shp is None or not val_shapes(node):
        return 0
    v = node.meta.get("val")
    size = (v[0] if isinstance(v, (tuple, list)) else v).element_size()
    parts = shp if shp and isinstance(shp[0], list) else [shp]
    return int(sum(math.prod(s) for s in parts) * size)


def _collective_seconds(fn: str, nbytes: float, p: int, gbps: float, latency_us: float, call_us: float) -> float:
    """α-β time of one collective (the cost model's formulas): all-reduce as NCCL picks ring or tree,
    all-gather and reduce-scatter ``(p-1)α + (p-1)/p · n/bw``."""
    if p <= 1 or nbytes <= 0:
        return 0.0
    if fn == "all_reduce":
        t = allreduce_seconds(nbytes, p, gbps, latency_us)
    else:
        t = (p - 1) * latency_us * 1e-6 + (p - 1) / p * nbytes / (gbps * 1e9)
    return t + call_us * 1e-6


def step_timeline(low: Lowered, profile: str | HardwareProfile = DEFAULT_PROFILE) -> dict[str, Any]:
    """One training step of rank 0 on ``profile``, simulated on two streams (see the module docstring).

    Returns ``events`` (``stream``: compute or comm; ``phase``: forward, backward or optimizer; ``kind``:
    compute, tp, dp or optimizer; ``start``/``stop`` in seconds; ``label``; ``segment``: the block or
    module), the totals ``compute_s``, ``comm_s``, ``hidden_comm_s`` (communication that overlaps
    compute), ``makespan``, the ``profile`` and ``precision``, and ``memory`` (:func:`memory_timeline`).
    With ``pp > 1`` it is one microbatch's forward and backward on pp rank 0 (the schedule chart shows
    how microbatches interleave).
    """
    prof = get_profile(profile)
    plan = low.plan
    facts = Facts(low)
    precision = str(plan.zero.get("precision") or "fp32")
    rate = prof.matmul_rate(precision)
    world = math.prod(plan.mesh.values())
    link = (prof.intra_gbps, prof.intra_latency_us) if world <= prof.gpus_per_node else \
        (prof.inter_gbps, prof.inter_latency_us)
    tp, dp = low.tp, int(plan.mesh.get("dp", 1))
    nodes = _rank0_nodes(low)

    def op_seconds(n: Node, backward: bool) -> float:
        if n.target in VIEW_OPS or n.target is operator.getitem:
            return 0.0
        mm, att = node_flops(n)
        nb = 0.0 if (mm or att) else node_bytes(n)
        if backward:
            mm, att, nb = mm * BACKWARD_MATMUL, att * BACKWARD_ATTENTION, nb * BACKWARD_BYTES
        dev = mm / rate + att / (rate * prof.attention_efficiency) + nb / (prof.memory_gbps * 1e9)
        dev /= tp if facts.sharded(n) else 1
        return max(dev, prof.op_overhead_us * 1e-6 * (2 if backward else 1))

    # which ops have a backward: those downstream of a parameter (or of a received activation)
    requires: set[Node] = set()
    for n in low.graph.nodes:
        if n.op == "get_attr" and facts.param(n) is not None:
            requires.add(n)
        elif n.op == "placeholder" and _floating(n) and low.pp > 1:
            requires.add(n)
        elif n.op == "call_function" and any(a in requires for a in n.all_input_nodes) and (
                _floating(n) or isinstance(n.meta.get("val"), (tuple, list))):
            requires.add(n)
    # the gradients each op's backward completes: a parameter's is done after its first consumer's backward
    first_user: dict[str, Node] = {}
    for n in nodes:
        for a in n.all_input_nodes:
            pname = facts.param(a)
            if pname is not None and pname not in first_user:
                first_user[pname] = n
    done_by: dict[Node, list[str]] = {}
    for pname, n in first_user.items():
        done_by.setdefault(n, []).append(pname)

    events: list[dict[str, Any]] = []
    mem: list[tuple[float, float, float]] = [(0.0, 0.0, 0.0)]  # (time, activation units, gradient units)
    t_compute = t_comm = 0.0
    act = grads = 0.0

    def emit(stream: str, phase: str, kind: str, start: float, stop: float, label: str, segment: str) -> None:
        if stop > start:
            events.append({"stream": stream, "phase": phase, "kind": kind, "start": start, "stop": stop,
                           "label": label, "segment": segment})

    def sync_collective(n: Node, phase: str, nbytes: float) -> None:
        nonlocal t_compute, t_comm
        fn = "all_reduce" if n.target in (C.all_reduce, C.reduce_grad) else "all_gather"
        start = max(t_compute, t_comm)
        stop = start + _collective_seconds(fn, nbytes, tp, prof.intra_gbps, prof.intra_latency_us,
                                           prof.collective_overhead_us)
        emit("comm", phase, "tp", start, stop, f"{n.target.__name__} ({n.name})", _segment(module_path(n)))
        t_compute = t_comm = stop  # synchronous: the compute stream waits

    def tp_bytes(n: Node) -> float:
        src = n.args[0] if n.args and isinstance(n.args[0], Node) else None
        return float(_local_bytes(src, facts)) if src is not None else 0.0

    saved: dict[Node, float] = {}
    for n in nodes:  # forward
        if is_collective(n):
            if n.target in (C.all_reduce, C.all_gather):
                sync_collective(n, "forward", tp_bytes(n))
            continue
        dt = op_seconds(n, backward=False)
        emit("compute", "forward", "compute", t_compute, t_compute + dt, n.name, _segment(module_path(n)))
        t_compute += dt
        if n in requires and n.target not in VIEW_OPS and n.target is not operator.getitem:
            saved[n] = float(_local_bytes(n, facts))
            act += saved[n]
            mem.append((t_compute, act, grads))
    t_forward = t_compute

    buckets = [[p for p in b if p in first_user] for b in plan.dp_buckets] if dp > 1 else []
    buckets = [b for b in buckets if b]
    ready: set[str] = set()
    waiting = list(range(len(buckets)))
    zero = int(plan.zero.get("stage", 0) or 0)
    dp_fn = "all_reduce" if zero == 0 else "reduce_scatter"
    grad_bytes = {p: math.prod(plan.params[p].local_shape) * 4.0 for p in first_user if p in plan.params}
    dp_done = 0.0
    dp_first = None
    for n in reversed(nodes):  # backward
        if is_collective(n):
            if n.target is C.reduce_grad:
                sync_collective(n, "backward", tp_bytes(n))
            continue
        if n not in requires:
            continue
        dt = op_seconds(n, backward=True)
        emit("compute", "backward", "compute", t_compute, t_compute + dt, n.name, _segment(module_path(n)))
        t_compute += dt
        act -= saved.pop(n, 0.0)
        for pname in done_by.get(n, []):
            ready.add(pname)
            grads += grad_bytes.get(pname, 0.0)
        mem.append((t_compute, act, grads))
        for i in list(waiting):  # a bucket all-reduces once all of its gradients exist, overlapping what is left
            if all(p in ready for p in buckets[i]):
                waiting.remove(i)
                nbytes = sum(grad_bytes.get(p, 0.0) for p in buckets[i])
                start = max(t_compute, t_comm)
                t_comm = start + _collective_seconds(dp_fn, nbytes, dp, *link, prof.collective_overhead_us)
                emit("comm", "backward", "dp", start, t_comm, f"dp {dp_fn} bucket {i} ({len(buckets[i])} grads)",
                     "dp buckets")
                dp_first = start if dp_first is None else dp_first
                dp_done = t_comm
    t_backward_end = t_compute
    # the optimizer: after the last bucket; its bytes per element as the cost model counts them
    start = max(t_compute, dp_done)
    elems = sum(math.prod(plan.params[p].local_shape) for p in first_user if p in plan.params)
    per = OPTIMIZER_BYTES_ZERO if zero else OPTIMIZER_BYTES_PLAIN
    opt = max(elems * per / (dp if zero >= 1 else 1) / (prof.memory_gbps * 1e9), prof.op_overhead_us * 1e-6)
    emit("compute", "optimizer", "optimizer", start, start + opt, "optimizer step", "optimizer")
    t_compute = start + opt
    if zero in (1, 2) and dp > 1:  # updated parameter shards are gathered back
        nbytes = sum(grad_bytes.values()) * (1 - 1 / dp)
        stop = t_compute + _collective_seconds("all_gather", nbytes, dp, *link, prof.collective_overhead_us)
        emit("comm", "optimizer", "dp", t_compute, stop, "dp all_gather parameters", "dp buckets")
        t_compute = t_comm = stop
    makespan = max(t_compute, t_comm)
    mem.append((makespan, act, grads))

    comm = [(e["start"], e["stop"]) for e in events if e["stream"] == "comm"]
    busy = [(e["start"], e["stop"]) for e in events if e["stream"] == "compute"]
    hidden = sum(_overlap(c, busy) for c in comm)
    out = {
        "profile": prof.name, "precision": precision, "makespan": makespan,
        "forward_s": t_forward, "backward_s": t_backward_end - t_forward,
        "compute_s": sum(b - a for a, b in busy), "comm_s": sum(b - a for a, b in comm), "hidden_comm_s": hidden,
        "tp_comm_s": sum(e["stop"] - e["start"] for e in events if e["kind"] == "tp"),
        "dp_comm_s": sum(e["stop"] - e["start"] for e in events if e["kind"] == "dp"),
        "microbatch": low.pp > 1,
        "events": events,
    }
    out["memory"] = memory_timeline(low, mem, dp_first, dp_done)
    return out


def _overlap(span: tuple[float, float], busy: list[tuple[float, float]]) -> float:
    """How much of ``span`` is covered by the (disjoint, sorted) ``busy`` intervals."""
    a, b = span
    return sum(max(0.0, min(b, y) - max(a, x)) for x, y in busy if y > a and x < b)


def memory_timeline(low: Lowered, walk: list[tuple[float, float, float]], dp_start: float | None = None,
                    dp_stop: float = 0.0) -> dict[str, Any]:
    """Memory of rank 0 over one step, term by term, scaled to the plan's estimate (``plan.memory``).

    ``walk`` holds ``(time, activation units, gradient units)`` from :func:`step_timeline`: their shape
    in time. Each term's height is the plan's: the activations peak at ``plan.memory["activations"]``,
    the gradients end at ``plan.memory["grads"]``, and the reduce buffers are alive while the
    data-parallel buckets reduce (``dp_start`` to ``dp_stop``). Parameters, optimizer states and
    buffers (and, at ZeRO-3, the gathered parameters) are held throughout.
    """
    m = low.plan.memory
    on_host = ("grads", "optimizer") if m.get("optimizer_on_cpu") else ()
    steady_keys = [k for k in m if k not in ("grads", "activations", "reduce_buffers", "optimizer_on_cpu",
                                             "params_on_cpu", *on_host)]
    steady = {k: float(m[k]) for k in steady_keys if m[k]}
    peak_act = max((a for _, a, _ in walk), default=0.0)
    last_grad = max((g for _, _, g in walk), default=0.0)
    sa = float(m.get("activations", 0)) / peak_act if peak_act else 0.0
    sg = float(m.get("grads", 0)) / last_grad if last_grad and "grads" not in on_host else 0.0
    rb = float(m.get("reduce_buffers", 0))
    points = []
    for t, a, g in walk:
        live_rb = rb if dp_start is not None and dp_start <= t <= dp_stop else 0.0
        points.append({"t": t, "activations": a * sa, "grads": g * sg, "reduce_buffers": live_rb})
    peak = max((sum(steady.values()) + p["activations"] + p["grads"] + p["reduce_buffers"] for p in points),
               default=sum(steady.values()))
    try:
        predicted = float(low.sm.predicted_peak_bytes()["device"])
    except (AttributeError, KeyError):  # pragma: no cover - a module without the estimate
        predicted = float(sum(v for k, v in m.items() if k not in on_host))
    return {"steady": steady, "points": points, "peak_bytes": peak, "predicted_peak_bytes": predicted}
