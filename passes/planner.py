r"""Planner: choose how to parallelise a model on a cluster, by minimising a cost model under a memory budget.

Problem
-------
Given a model (analysed by :mod:`cost_model`: per-block FLOPs, bytes, saved activations, parameter
counts and tensor-parallel collectives), ``N`` GPUs with ``g`` per node, a hardware profile, a
global batch of ``B`` sequences per optimizer step and a per-GPU memory budget ``M``, choose

    x = (dp, tp, pp, ep, z, o, m, s, v, k)

- mesh degrees with ``dp · tp · pp · ep = N``,
- ZeRO stage ``z ∈ {0, 1, 2, 3}`` and offload ``o ∈ {none, optimizer, params}``,
- micro-batches ``m`` and pipeline schedule ``s`` (``1f1b``, ``interleaved_1f1b`` with ``v = 2``
  virtual stages, ``gpipe``),
- ``k``, how many blocks of each pipeline stage recompute their forward in backward (activation
  checkpointing),

to solve

    minimise    T_step(x)                                  (cost_model.build_expressions)
    subject to  max_r Mem_r(x) ≤ M                         per-GPU memory, every pipeline rank r
                Host(x) ≤ H                                CPU memory per GPU when offloading
                tp | g,  tp admitted by the tensor-parallel pass (heads, kv heads divisible)
                pp ≤ #blocks,  v · pp ≤ #blocks
                ep | #experts (ep = 1 without experts)
                dp · ep | B,  m | B / (dp · ep),  m ≥ pp (1F1B), pp | m (interleaved)
                o = params ⇒ z = 3;  z > 0 ⇒ dp > 1;  m = 1 when pp = 1

``zero_bubble`` is not searched (its split backward measured slower than 1F1B in this runtime,
``benchmarks/RESULTS.md``), nor micro-batch counts above ``SearchSpace.max_microbatches``.

Method
------
The feasible set is small and discrete: the factorisations of ``N`` (a few dozen for 512 GPUs),
times the divisors of the local batch, ZeRO stages, offloads and schedules: at most some ten
thousand points. So the planner enumerates it exactly rather than relaxing it. Every candidate is
a row of numpy arrays; the compiled sympy expressions evaluate all rows at once (one expression per
region, filled with the block coefficients of the row's ``tp``). ``k`` is not enumerated: time
grows and memory falls linearly in ``k``, so the best ``k`` is the smallest that fits, solved in
closed form per row (then checked). Rows over the budget are dropped; the fastest remaining row is
the plan (ties: less memory, then the simpler plan). The planner also reports

- the *alternatives*: the best row of each other (mesh, ZeRO, offload, schedule) combination,
- the *binding constraint*: whether memory excludes a faster plan (and which term of it), or, when
  nothing fits, which term alone exceeds the budget and what would relieve it.

An 80-layer model on 512 GPUs plans in a few seconds: one capture of a one-block model, the
tensor-parallel pass once per ``tp``, and a vectorised evaluation of the candidates.

Why this module is long: the search, its constraints and the explanation of the binding constraint
are one algorithm whose docstring states the problem; the cost terms live in cost_model.py.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from autoshard.runtime.errors import PlanError, PlanFileError
from autoshard.runtime.hardware import GiB, HardwareProfile
from autoshard.runtime.plan import Schema, check_mesh, parse_json
from autoshard.runtime.schedules import build_schedule

from . import cost_model as cm

AUTOPLAN_VERSION = 1
SCHEDULES = ("1f1b", "interleaved_1f1b", "gpipe")
OFFLOADS: tuple[str | None, ...] = (None, "optimizer", "params")


def gib(nbytes: float) -> str:
    """Bytes as GiB with sensible precision (MiB below one GiB)."""
    if nbytes < GiB:
        return f"{nbytes / 2**20:.3g} MiB"
    return f"{nbytes / GiB:.3g} GiB" if nbytes < 100 * GiB else f"{nbytes / GiB:.0f} GiB"


class InfeasiblePlanError(PlanError):
    """No plan fits: the message names the binding constraint and what would relieve it."""


@dataclass(frozen=True)
class SearchSpace:
    """Which choices the planner may make. ``fixed`` pins some (e.g. ``{"tp": 2, "zero": 1}``).

    The defaults are everything the cost model knows; :func:`runtime_space` restricts them to what
    this version of the runtime can execute (for ``autoshard(model, Mesh.auto())``).
    """

    zero_stages: tuple[int, ...] = (0, 1, 2, 3)
    offloads: tuple[str | None, ...] = OFFLOADS
    schedules: tuple[str, ...] = SCHEDULES
    checkpointing: bool = True
    expert_parallel: bool = True
    max_microbatches: int = 64
    fixed: tuple[tuple[str, Any], ...] = ()

    def pinned(self, key: str, default: Any = None) -> Any:
        return dict(self.fixed).get(key, default)


def runtime_space(fixed: dict[str, Any] | None = None) -> SearchSpace:
    """The choices this version's runtime executes (activation checkpointing included; ep once supported).
    ``fixed["k"]`` pins the checkpointed blocks per pipeline rank (clipped to the blocks a rank has)."""
    from autoshard.runtime.mesh import SUPPORTED_DIMS

    return SearchSpace(checkpointing=True, expert_parallel="ep" in SUPPORTED_DIMS,
                       fixed=tuple(sorted((fixed or {}).items(), key=lambda kv: kv[0])))


@dataclass
class AutoPlan:
    """The planner's decision and its predictions: plain data, JSON round-trips (``to_json``/``from_json``)."""

    mesh: dict[str, int]
    zero: int
    offload: str | None
    microbatches: int
    schedule: str | None
    virtual_stages: int
    checkpoint_blocks: int  # blocks per pipeline stage whose forward is recomputed in backward
    precision: str
    memory_per_gpu_bytes: int
    memory: dict[str, int]
    step_time_s: float
    time: dict[str, float]
    mfu: float
    tokens_per_s: float
    budget_bytes: int
    binding: str
    alternatives: list[dict[str, Any]]
    hardware: dict[str, Any]
    model: dict[str, Any]
    gpus: int
    runnable: bool
    runnable_reason: str
    planner: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    version: int = AUTOPLAN_VERSION

    # ------------------------------------------------------------------ data
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version, "mesh": dict(self.mesh), "zero": self.zero, "offload": self.offload,
            "microbatches": self.microbatches, "schedule": self.schedule, "virtual_stages": self.virtual_stages,
            "checkpoint_blocks": self.checkpoint_blocks, "precision": self.precision,
            "memory_per_gpu_bytes": self.memory_per_gpu_bytes, "memory": dict(self.memory),
            "step_time_s": self.step_time_s, "time": dict(self.time), "mfu": self.mfu,
            "tokens_per_s": self.tokens_per_s, "budget_bytes": self.budget_bytes, "binding": self.binding,
            "alternatives": list(self.alternatives), "hardware": dict(self.hardware), "model": dict(self.model),
            "gpus": self.gpus, "runnable": self.runnable, "runnable_reason": self.runnable_reason,
            "planner": dict(self.planner), "notes": list(self.notes),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Any) -> AutoPlan:
        """The plan ``to_dict`` made; :class:`PlanFileError` naming the key at fault when ``d`` is not one."""
        validate_autoplan(d)
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_json(cls, text: str | bytes) -> AutoPlan:
        return cls.from_dict(parse_json(text))

    # ------------------------------------------------------------------ text
    def mesh_text(self) -> str:
        return " ".join(f"{k}={self.mesh[k]}" for k in ("dp", "tp", "pp", "ep"))

    def decision_text(self) -> str:
        pipe = f", {self.microbatches} micro-batches, {self.schedule}" + \
            (f" v={self.virtual_stages}" if self.virtual_stages > 1 else "") if self.mesh["pp"] > 1 else ""
        ck = f", checkpoint {self.checkpoint_blocks} block(s)/stage" if self.checkpoint_blocks else ""
        return f"{self.mesh_text()}, zero={self.zero}, offload={self.offload or 'none'}{pipe}{ck}"

    def summary(self) -> str:
        return (f"{self.decision_text()}: step {self.step_time_s:.4g} s, {self.tokens_per_s:,.0f} tokens/s, "
                f"MFU {100 * self.mfu:.1f}%, {gib(self.memory_per_gpu_bytes)} of {gib(self.budget_bytes)} per GPU")

    def explain(self) -> str:
        """Why this plan: what it predicts term by term, what binds, and the runners-up."""
        md, hw = self.model, self.hardware
        lines = [
            f"autoshard plan for {md.get('name')} ({md.get('params', 0) / 1e9:.3g} B parameters, {md.get('blocks')} "
            f"blocks) on {self.gpus} x {hw.get('name')} ({hw.get('gpus_per_node')} per node); global batch "
            f"{md.get('global_batch')} x {md.get('tokens_per_sequence')} tokens, {self.precision}",
            "",
            f"Chosen: {self.decision_text()}",
            f"  predicted step {self.step_time_s * 1e3:,.1f} ms, {self.tokens_per_s:,.0f} tokens/s, MFU "
            f"{100 * self.mfu:.1f}% (of {hw.get('peak_tflops')} TFLOP/s per GPU)",
            f"  memory {gib(self.memory_per_gpu_bytes)} per GPU of a {gib(self.budget_bytes)} budget",
            f"  runnable by this autoshard: {'yes' if self.runnable else 'no: ' + self.runnable_reason}",
            "",
            "Step time (busiest pipeline rank):",
        ]
        labels = {
            "compute": "forward + backward compute (all micro-batches)",
            "tp_comm": "tensor-parallel all-reduces (NVLink, not overlapped)",
            "ep_comm": "expert all-to-all",
            "pp_comm": "pipeline sends between stages",
            "zero3_exposed": "ZeRO-3 parameter gathers not hidden by compute",
            "bubble": "pipeline bubble ((pp-1)/v stage times idle)",
            "dp_comm": "data-parallel gradient reduction not hidden by backward",
            "gather": "all-gather of updated parameters after the step",
            "optimizer": "optimizer step" + (" (on CPU)" if self.offload else ""),
            "flatten": "gradient flatten / copies",
            "overhead": "fixed per-step host time",
        }
        for key, label in labels.items():
            v = self.time.get(key, 0.0)
            if v > 0 or key == "compute":
                share = 100 * v / self.step_time_s if self.step_time_s else 0.0
                lines.append(f"  {key:<14} {v * 1e3:10.2f} ms {share:5.1f}%   {label}")
        if "bubble_simulated" in self.time:
            lines.append(f"  (bubble checked with the schedule simulator: {self.time['bubble_simulated'] * 1e3:.2f} ms)")
        lines += ["", "Memory per GPU (the fullest pipeline rank):"]
        for key in ("params", "grads", "optimizer", "activations", "buffers"):
            if key in self.memory:
                lines.append(f"  {key:<12} {gib(self.memory[key]):>12}")
        if self.memory.get("host_bytes"):
            lines.append(f"  host (CPU)   {gib(self.memory['host_bytes']):>12} (offloaded states)")
        lines += ["", f"Binding constraint: {self.binding}"]
        if self.alternatives:
            lines += ["", f"Alternatives (best of each other mesh / ZeRO / offload / schedule; {len(self.alternatives)} shown):",
                      f"  {'plan':<58} {'step ms':>10} {'vs chosen':>9} {'per GPU':>10}  fits"]
            for a in self.alternatives:
                lines.append(f"  {a['plan']:<58} {a['step_time_s'] * 1e3:10.1f} {a['slowdown'] * 100:+8.1f}% "
                             f"{gib(a['memory_per_gpu_bytes']):>10}  {'yes' if a['feasible'] else 'no'}")
        pl = self.planner
        lines += ["", f"Planner: {pl.get('candidates', 0):,} candidates ({pl.get('feasible', 0):,} fit) in "
                      f"{pl.get('seconds', 0.0):.2f} s (analysis {pl.get('analysis_seconds', 0.0):.2f} s)"]
        if self.notes:
            lines += ["", "Notes:"] + [f"  - {n}" for n in self.notes]
        return "\n".join(lines)


# ====================================================================================== enumeration
def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class _Rows:
    """Candidates as columns (lists, then numpy arrays)."""

    cols: dict[str, list] = field(default_factory=dict)

    def add(self, **kv: Any) -> None:
        for k, v in kv.items():
            self.cols.setdefault(k, []).append(v)

    def __len__(self) -> int:
        return len(next(iter(self.cols.values()), []))

    def arrays(self) -> dict[str, np.ndarray]:
        out = {}
        for k, v in self.cols.items():
            out[k] = np.asarray(v, dtype=object if k in ("offload", "schedule") else float)
        return out


def _links(profile: HardwareProfile, gpn: int, dp: int, tp: int, pp: int, ep: int) -> dict[str, float]:
    out = {}
    for name, span in (("tp", tp), ("ep", ep * tp), ("dp", dp * ep * tp), ("pp", dp * ep * tp * pp)):
        bw, lat = (profile.intra_gbps, profile.intra_latency_us) if span <= gpn else \
            (profile.inter_gbps, profile.inter_latency_us)
        out[f"b_{name}"], out[f"a_{name}"] = bw, lat
    return out


def _enumerate(a: cm.ModelAnalysis, gpus: int, gpn: int, space: SearchSpace, profile: HardwareProfile,
               precision: str) -> tuple[_Rows, list[str]]:
    """Every candidate satisfying the discrete constraints, and why whole families were excluded."""
    rows = _Rows()
    excluded: list[str] = []
    B = a.global_batch
    L = a.num_blocks
    pin = dict(space.fixed)
    region = {tp: cm.region_inputs(profile, precision, a, tp) for tp in a.tps}
    prof_in = cm.profile_inputs(profile)
    tps = [t for t in a.tps if gpus % t == 0 and t <= gpn]
    for t, why in sorted(a.tp_errors.items()):
        if gpus % t == 0 and t <= gpn:
            excluded.append(f"tp={t}: {why}")
    eps = [1]
    if a.num_experts and space.expert_parallel:
        eps = [e for e in _divisors(a.num_experts) if gpus % e == 0]
    for tp in tps:
        if "tp" in pin and pin["tp"] != tp:
            continue
        reg = region[tp]
        step_blk = reg["F_blk"] + reg["Bw_blk"]
        pre_eq = (reg["F_pre"] + reg["Bw_pre"]) / step_blk if step_blk else 0.0
        post_eq = (reg["F_post"] + reg["Bw_post"]) / step_blk if step_blk else 0.0
        for pp in _divisors(gpus // tp):
            if "pp" in pin and pin["pp"] != pp:
                continue
            if pp > 1 and pp > L:
                continue
            kinds_nb = cm.stage_blocks(L, pp, pre_eq, post_eq) if L else (0, 0, 0)
            for ep in eps:
                if "ep" in pin and pin["ep"] != ep:
                    continue
                if (gpus // tp // pp) % ep:
                    continue
                dp = gpus // (tp * pp * ep)
                if "dp" in pin and pin["dp"] != dp:
                    continue
                if B % (dp * ep):
                    excluded.append(f"dp={dp}{f' x ep={ep}' if ep > 1 else ''} (tp={tp}, pp={pp}): the global batch of "
                                    f"{B} sequences does not split into {dp * ep} data-parallel slices")
                    continue
                local = B // (dp * ep)
                links = _links(profile, gpn, dp, tp, pp, ep)
                if pp == 1:
                    pipes = [(None, 1, 1)]
                else:
                    pipes = []
                    ms = [d for d in _divisors(local) if d <= space.max_microbatches]
                    for s in space.schedules:
                        if "schedule" in pin and pin["schedule"] != s:
                            continue
                        for m in ms:
                            if s == "1f1b" and m < pp:
                                continue
                            if s == "interleaved_1f1b" and (m % pp or 2 * pp > L):
                                continue
                            pipes.append((s, m, 2 if s == "interleaved_1f1b" else 1))
                    if not pipes:
                        excluded.append(f"pp={pp} (tp={tp}, dp={dp}): the local batch of {local} sequences has no "
                                        f"micro-batch count a schedule accepts (1F1B needs >= {pp})")
                for sched, m, v in pipes:
                    if "microbatches" in pin and pin["microbatches"] not in (None, m) and pp > 1:
                        continue
                    for z in space.zero_stages:
                        if "zero" in pin and pin["zero"] != z:
                            continue
                        if z > 0 and dp == 1:
                            continue
                        for off in space.offloads:
                            if "offload" in pin and pin["offload"] != off:
                                continue
                            if off == "params" and z != 3:
                                continue
                            use_zero = int(z > 0 or precision != "fp32" or off is not None)
                            row = dict(dp=dp, tp=tp, pp=pp, ep=ep, m=m, v=v, B=B, k=0, z1=int(z >= 1),
                                       z2=int(z >= 2), z3=int(z >= 3), U=use_zero, offO=int(off == "optimizer"),
                                       offP=int(off == "params"), P2=int(pp > 1), zero=z, offload=off,
                                       schedule=sched, **links)
                            for kind, nb, hp, hq in (("f", kinds_nb[0], 1, int(pp == 1)), ("i", kinds_nb[1], 0, 0),
                                                     ("l", kinds_nb[2], int(pp == 1), 1)):
                                if pp == 1:
                                    nb, hp, hq = L, 1, 1
                                row.update({f"nb_{kind}": nb, f"hp_{kind}": hp, f"hq_{kind}": hq,
                                            f"inf_{kind}": cm.inflight(sched or "1f1b", pp, m, v, kind)})
                            row.update(reg)
                            row.update(prof_in)
                            row["Ptied"] = a.tied_params
                            rows.add(**row)
    return rows, excluded


# ====================================================================================== solve
def _evaluate(model: cm.CompiledModel, arr: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(time terms, memory terms) of every candidate, each an array over the rows."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = model.evaluate(arr)
    n = len(arr["dp"])
    terms = {k: np.broadcast_to(np.asarray(v, dtype=float), (n,)) for k, v in terms.items()}
    mems = {k: v for k, v in terms.items() if k.startswith("mem") or k == "host"}
    times = {k: v for k, v in terms.items() if k not in mems}
    return times, mems


def _peak(mems: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    stacked = np.stack([mems[f"mem_{k}"] for k in cm.KINDS])
    return stacked.max(axis=0), stacked.argmax(axis=0)


def _solve_checkpointing(model: cm.CompiledModel, arr: dict[str, np.ndarray], budget: float) -> None:
    """Smallest ``k`` (checkpointed blocks per stage) that brings each row under the budget, in place."""
    _, mems = _evaluate(model, arr)
    peak, _ = _peak(mems)
    b = arr["B"] / (arr["dp"] * arr["ep"] * arr["m"])
    need = np.zeros_like(peak)
    for kind in cm.KINDS:
        slope = arr[f"inf_{kind}"] * b * np.maximum(arr["A_blk"] - arr["X_blk"], 1e-9)
        over = mems[f"mem_{kind}"] - budget + b * arr["A_blk"]
        need = np.maximum(need, np.where(mems[f"mem_{kind}"] > budget, np.ceil(over / slope), 0))
    nb_max = np.maximum.reduce([arr[f"nb_{k}"] for k in cm.KINDS])
    arr["k"] = np.clip(need, 0, nb_max)
    for _ in range(8):  # the closed form ignores the max() terms: step up where a row still does not fit
        _, mems = _evaluate(model, arr)
        peak, _ = _peak(mems)
        bump = (peak > budget) & (arr["k"] < nb_max)
        if not bump.any():
            break
        arr["k"] = np.where(bump, arr["k"] + 1, arr["k"])


def _label(arr: dict[str, np.ndarray], i: int) -> str:
    mesh = f"dp={int(arr['dp'][i])} tp={int(arr['tp'][i])} pp={int(arr['pp'][i])} ep={int(arr['ep'][i])}"
    z = f"zero={int(arr['zero'][i])}"
    off = arr["offload"][i]
    extra = f" offload={off}" if off else ""
    if arr["pp"][i] > 1:
        extra += f" m={int(arr['m'][i])} {arr['schedule'][i]}"
    if arr["k"][i]:
        extra += f" ckpt={int(arr['k'][i])}"
    return f"{mesh} {z}{extra}"


def plan(analysis: cm.ModelAnalysis, gpus: int, profile: HardwareProfile, *, memory_gib: float | None = None,
         gpus_per_node: int | None = None, space: SearchSpace | None = None, alternatives: int = 5,
         prefetch: int = 1) -> AutoPlan:
    """Solve the problem in the module docstring; raise :class:`InfeasiblePlanError` when nothing fits."""
    t0 = time.perf_counter()
    space = space or SearchSpace()
    if not isinstance(gpus, int) or gpus < 1:
        raise PlanError(f"gpus={gpus!r} must be a positive integer")
    gpn = min(gpus_per_node or profile.gpus_per_node, gpus)
    if gpus_per_node is not None:
        profile = replace(profile, gpus_per_node=gpus_per_node)
    precision = analysis.precision
    budget = float(profile.budget_bytes(memory_gib))
    rows, excluded = _enumerate(analysis, gpus, gpn, space, profile, precision)
    if not len(rows):
        why = "; ".join(excluded[:6]) or "no factorisation of the GPU count satisfies the pinned choices"
        raise InfeasiblePlanError(f"no mesh of {gpus} GPUs is possible for this model: {why}")
    arr = rows.arrays()
    model = cm.compile_model(precision, prefetch)
    if space.pinned("k") is not None:  # the caller's count of checkpointed blocks, as far as a rank has them
        nb_max = np.maximum.reduce([arr[f"nb_{kk}"] for kk in cm.KINDS])
        arr["k"] = np.minimum(float(space.pinned("k")), nb_max)
    elif space.checkpointing:
        _solve_checkpointing(model, arr, budget)
    times, mems = _evaluate(model, arr)
    peak, worst = _peak(mems)
    host = mems["host"]
    step = times["step"]
    fits = (peak <= budget) & (host <= profile.host_memory_bytes) & np.isfinite(step)
    # deterministic order: time, then memory, then the simpler plan
    simple = arr["pp"] * 1e3 + arr["tp"] * 10 + arr["zero"] + arr["k"] * 1e-2 + \
        np.array([OFFLOADS.index(o) for o in arr["offload"]]) * 0.1 + arr["m"] * 1e-6
    order = np.lexsort((simple, np.round(peak / 2**20), np.round(step, 9)))
    feasible = order[fits[order]]
    if not len(feasible):
        raise InfeasiblePlanError(_infeasible_message(analysis, arr, mems, peak, host, budget, profile, space,
                                                      gpus, excluded))
    best = int(feasible[0])
    fastest = int(order[0])
    free = None
    if arr["k"].any():  # memory made rows checkpoint: the fastest plan is the fastest without recomputation
        arr0 = dict(arr, k=np.zeros_like(arr["k"]))
        times0, mems0 = _evaluate(model, arr0)
        peak0, _ = _peak(mems0)
        fastest = int(np.lexsort((simple, np.round(peak0 / 2**20), np.round(times0["step"], 9)))[0])
        free = (arr0, mems0, peak0, times0["step"])
    binding = _binding(arr, mems, peak, step, fits, best, fastest, budget, space, free)
    alts = _alternatives(arr, step, peak, fits, best, order, alternatives)
    kind = cm.KINDS[int(worst[best])]
    tkind = cm.KINDS[int(np.argmax([times[f"tmb_{kk}"][best] for kk in cm.KINDS]))]
    m = float(arr["m"][best])
    tmb = times[f"tmb_{tkind}"][best]
    comp = times[f"tcompute_{tkind}"][best]
    parts = {
        "compute": m * comp,
        "tp_comm": m * times[f"ttp_{tkind}"][best],
        "ep_comm": m * times[f"tep_{tkind}"][best],
        "pp_comm": m * times[f"tp2p_{tkind}"][best],
        "zero3_exposed": m * max(0.0, tmb - comp - times[f"ttp_{tkind}"][best] - times[f"tep_{tkind}"][best]
                                 - times[f"tp2p_{tkind}"][best]),
        "bubble": times["bubble"][best],
        "dp_comm": times["tdp_max"][best],
        "gather": times["tgather_max"][best],
        "optimizer": times["topt_max"][best],
        "flatten": times["tflat_max"][best],
        "overhead": profile.step_overhead_s,
    }
    parts = {k: float(v) for k, v in parts.items()}
    sched = arr["schedule"][best]
    pp = int(arr["pp"][best])
    v = int(arr["v"][best])
    if pp > 1 and pp * int(m) * v <= 4096:
        parts["bubble_simulated"] = _simulated_bubble(sched, pp, int(m), v, times, best)
    memory = {p: int(mems[f"mem_{p}_{kind}"][best]) for p in ("params", "grads", "optimizer", "activations")}
    memory["buffers"] = int(analysis.buffer_bytes)
    memory["host_bytes"] = int(host[best])
    step_s = float(step[best])
    tokens = analysis.global_batch * analysis.tokens_per_sequence
    flops = analysis.model_flops_per_sequence * analysis.global_batch
    off = arr["offload"][best]
    runnable, reason = _runnable(int(arr["k"][best]), int(arr["ep"][best]))
    notes = list(analysis.notes) + [f"excluded: {e}" for e in excluded[:8]]
    if analysis.num_blocks and len(analysis.blocks) > 1:
        notes.append(f"{len(analysis.blocks)} distinct block kinds: stages are balanced on their average cost")
    result = AutoPlan(
        mesh={"dp": int(arr["dp"][best]), "tp": int(arr["tp"][best]), "pp": pp, "ep": int(arr["ep"][best])},
        zero=int(arr["zero"][best]), offload=off, microbatches=int(m), schedule=sched if pp > 1 else None,
        virtual_stages=v, checkpoint_blocks=int(arr["k"][best]), precision=precision,
        memory_per_gpu_bytes=int(peak[best]), memory=memory, step_time_s=step_s, time=parts,
        mfu=float(flops / (step_s * gpus * profile.peak_tflops * 1e12)) if step_s > 0 else 0.0,
        tokens_per_s=float(tokens / step_s) if step_s > 0 else 0.0, budget_bytes=int(budget), binding=binding,
        alternatives=alts,
        hardware={"name": profile.name, "gpus_per_node": gpn, "peak_tflops": profile.peak_tflops,
                  "memory_bytes": profile.memory_bytes},
        model=analysis.summary(), gpus=gpus, runnable=runnable, runnable_reason=reason,
        planner={"candidates": int(len(step)), "feasible": int(fits.sum()), "seconds": time.perf_counter() - t0,
                 "analysis_seconds": analysis.capture_seconds},
        notes=notes)
    result.planner["seconds"] = time.perf_counter() - t0
    return result


def _runnable(k: int, ep: int) -> tuple[bool, str]:
    """Whether this version's runtime executes the plan (the planner models more than the runtime runs):
    ZeRO 0-3, both offloads, every searched schedule and activation checkpointing (``k`` blocks per
    pipeline rank, ``autoshard(..., activation_checkpointing=k)``) run."""
    from autoshard.runtime.mesh import SUPPORTED_DIMS

    why = []
    if ep > 1 and "ep" not in SUPPORTED_DIMS:
        why.append("expert parallelism (ep) is not in the runtime yet")
    return (not why, "; ".join(why))


def _simulated_bubble(sched: str, pp: int, m: int, v: int, times: dict[str, np.ndarray], i: int) -> float:
    """The bubble of the chosen schedule from ``Schedule.simulate`` with this plan's per-stage times."""
    s = build_schedule(sched, pp, m, v)
    per_rank = [times["tmb_f"][i]] + [times["tmb_i"][i]] * (pp - 2) + [times["tmb_l"][i]]
    stage = [per_rank[s_ % pp] / v for s_ in range(pp * v)]
    f = [t / 3 for t in stage]
    b = [2 * t / 3 for t in stage]
    sim = s.simulate(f, b)
    return float(sim.makespan - m * max(per_rank))


def _binding(arr, mems, peak, step, fits, best: int, fastest: int, budget: float, space: SearchSpace,
             free: tuple | None = None) -> str:
    """What keeps the chosen plan from being the fastest. ``free``: (arr, mems, peak, step) of the rows
    without checkpointing, where ``fastest`` indexes them (memory may have made that row checkpoint)."""
    fa, fm, fp, fs = free or (arr, mems, peak, step)
    if best == fastest and arr["k"][best] == fa["k"][fastest]:
        spare = budget - peak[best]
        return f"none: the fastest plan fits, with {gib(spare)} per GPU to spare; it is bound by time, not memory"
    arr, mems, peak = fa, fm, fp
    gain = (step[best] - fs[fastest]) / step[best]
    step = fs
    if peak[fastest] <= budget:
        return (f"host memory: the fastest plan ({_label(arr, fastest)}, {step[fastest] * 1e3:.4g} ms) offloads "
                f"{gib(mems['host'][fastest])} per GPU to CPU memory, more than the profile's host memory; the chosen "
                f"plan is {100 * gain:.1f}% slower and fits")
    kind = cm.KINDS[int(np.argmax([mems[f'mem_{k}'][fastest] for k in cm.KINDS]))]
    terms = {p: mems[f"mem_{p}_{kind}"][fastest] for p in ("params", "optimizer", "grads", "activations")}
    top = max(terms, key=terms.get)
    return (f"memory: the fastest plan ({_label(arr, fastest)}, {step[fastest] * 1e3:.4g} ms) needs "
            f"{gib(peak[fastest])} per GPU (budget {gib(budget)}; its largest term is {top}, {gib(terms[top])}); the "
            f"chosen plan is {100 * gain:.1f}% slower and fits")


def _alternatives(arr, step, peak, fits, best: int, order, limit: int) -> list[dict[str, Any]]:
    seen = {_family(arr, best)}
    out = []
    for i in order:
        i = int(i)
        fam = _family(arr, i)
        if fam in seen:
            continue
        seen.add(fam)
        out.append({"plan": _label(arr, i), "mesh": {d: int(arr[d][i]) for d in ("dp", "tp", "pp", "ep")},
                    "zero": int(arr["zero"][i]), "offload": arr["offload"][i], "microbatches": int(arr["m"][i]),
                    "schedule": arr["schedule"][i], "checkpoint_blocks": int(arr["k"][i]),
                    "step_time_s": float(step[i]), "memory_per_gpu_bytes": int(peak[i]),
                    "feasible": bool(fits[i]), "slowdown": float(step[i] / step[best] - 1.0)})
        if len([a for a in out if a["feasible"]]) >= limit:
            break
    # keep the feasible runners-up, plus any faster plans memory rules out (they explain the choice)
    faster = [a for a in out if not a["feasible"] and a["step_time_s"] < step[best]][:3]
    return [a for a in out if a["feasible"]][:limit] + faster


def _family(arr, i: int) -> tuple:
    return (int(arr["dp"][i]), int(arr["tp"][i]), int(arr["pp"][i]), int(arr["ep"][i]), int(arr["zero"][i]),
            arr["offload"][i], arr["schedule"][i])


def _infeasible_message(a: cm.ModelAnalysis, arr, mems, peak, host, budget: float, profile: HardwareProfile,
                        space: SearchSpace, gpus: int, excluded: list[str]) -> str:
    """Name the binding constraint at the plan that comes closest to fitting."""
    i = int(np.argmin(np.where(host <= profile.host_memory_bytes, peak, np.inf)))
    if not np.isfinite(peak[i]) or host[i] > profile.host_memory_bytes:
        i = int(np.argmin(peak))
    kind = cm.KINDS[int(np.argmax([mems[f'mem_{k}'][i] for k in cm.KINDS]))]
    terms = {p: float(mems[f"mem_{p}_{kind}"][i]) for p in ("params", "optimizer", "grads", "activations")}
    where = f"tp={int(arr['tp'][i])}" + (f", pp={int(arr['pp'][i])}" if arr["pp"][i] > 1 else "") + \
        f", dp={int(arr['dp'][i])}" + (f", zero={int(arr['zero'][i])}" if arr["zero"][i] else "") + \
        (f", offload={arr['offload'][i]}" if arr["offload"][i] else "")
    cap = f"(budget {gib(budget)})"
    pin = dict(space.fixed)
    zeros = [z for z in space.zero_stages if pin.get("zero", z) == z]
    offloads = [o for o in space.offloads if pin.get("offload", o) == o]
    fixes = []
    if 3 not in zeros:
        fixes.append("zero=3")
    if "params" not in offloads and "optimizer" not in offloads:
        fixes.append("offload")
    elif "params" not in offloads:
        fixes.append("offload='params'")
    if host[i] > profile.host_memory_bytes:
        return (f"no feasible plan: offloading needs {gib(host[i])} of CPU memory per GPU (host budget "
                f"{gib(profile.host_memory_bytes)}) and without it the model does not fit in {gib(budget)} per GPU: "
                "use more GPUs")
    if terms["params"] > budget:
        fix = ", ".join(fixes + ["or more GPUs"]) if fixes else "more GPUs (or a smaller model)"
        return f"no feasible plan: parameters alone need {gib(terms['params'])} per GPU at {where} {cap}: use {fix}"
    states = terms["params"] + terms["optimizer"]
    if states > budget:
        fix = ", ".join(fixes + ["or more GPUs"]) if fixes else "more GPUs"
        return (f"no feasible plan: model states (parameters {gib(terms['params'])} + optimizer "
                f"{gib(terms['optimizer'])}) need {gib(states)} per GPU at {where} {cap}: use {fix}")
    b = a.global_batch / max(1.0, float(arr["dp"][i] * arr["ep"][i] * arr["m"][i]))
    ck = "" if not space.checkpointing else " even with every block checkpointed"
    return (f"no feasible plan: activations of a micro-batch of {b:g} sequence(s) need {gib(terms['activations'])} "
            f"per GPU{ck} at {where}, on top of {gib(states)} of model states {cap}: use a smaller "
            f"global batch or sequence, more GPUs{'' if space.checkpointing else ', or activation checkpointing'}")


# ====================================================================================== plan files
def _nonneg(v: Any, key: str) -> None:
    Schema.number(v, key, minimum=0)


_AUTOPLAN_FIELDS: dict[str, Any] = {
    "mesh": lambda v, k: check_mesh(v, k, require_all=True),
    "zero": lambda v, k: Schema.int_(v, k, 0, 3),
    "offload": lambda v, k: v is None or Schema.str_(v, k, tuple(o for o in OFFLOADS if o)),
    "microbatches": lambda v, k: Schema.int_(v, k, minimum=1),
    "schedule": lambda v, k: v is None or Schema.str_(v, k, SCHEDULES),
    "virtual_stages": lambda v, k: Schema.int_(v, k, minimum=1),
    "checkpoint_blocks": lambda v, k: Schema.int_(v, k, minimum=0),
    "precision": Schema.str_,
    "memory_per_gpu_bytes": _nonneg,
    "memory": lambda v, k: Schema.map_(v, k, Schema.number),
    "step_time_s": _nonneg,
    "time": lambda v, k: Schema.map_(v, k, Schema.number),
    "mfu": _nonneg,
    "tokens_per_s": _nonneg,
    "budget_bytes": _nonneg,
    "binding": Schema.str_,
    "alternatives": lambda v, k: Schema.list_(v, k, Schema.obj),
    "hardware": Schema.obj,
    "model": Schema.obj,
    "gpus": lambda v, k: Schema.int_(v, k, minimum=1),
    "runnable": lambda v, k: isinstance(v, bool) or Schema.fail(k, "expected true or false"),
    "runnable_reason": Schema.str_,
}
_AUTOPLAN_OPTIONAL: dict[str, Any] = {
    "planner": Schema.obj,
    "notes": lambda v, k: Schema.list_(v, k, Schema.str_),
}


def validate_autoplan(d: Any) -> None:
    """Check the JSON object ``autoshard plan --json`` writes; :class:`PlanFileError` names the key at fault.
    Keys this version does not know are ignored (newer files add predictions)."""
    if not isinstance(d, dict) or "mesh" not in d or "step_time_s" not in d:
        raise PlanFileError("not an autoshard plan: expected the JSON object `autoshard plan --json` writes")
    if d.get("version") != AUTOPLAN_VERSION:
        raise PlanFileError(f"invalid autoshard plan: version: plan version {d.get('version')!r} is not supported "
                            f"(expected {AUTOPLAN_VERSION})")
    Schema.keys(d, "", tuple(_AUTOPLAN_FIELDS), allow_unknown=True)
    for fields in (_AUTOPLAN_FIELDS, _AUTOPLAN_OPTIONAL):
        for k, check in fields.items():
            if k in d:
                check(d[k], k)


# ====================================================================================== diff
_DECISIONS = ("mesh", "zero", "offload", "microbatches", "schedule", "virtual_stages", "checkpoint_blocks", "precision")
_PREDICTIONS = (("step_time_s", "step time", 1e3, "ms"), ("memory_per_gpu_bytes", "memory per GPU", 1 / GiB, "GiB"),
                ("mfu", "MFU", 100.0, "%"), ("tokens_per_s", "tokens/s", 1.0, ""))


def diff(a: AutoPlan | dict, b: AutoPlan | dict) -> tuple[bool, list[str]]:
    """(decisions differ, lines): what changed between two plans, decisions first, then predictions."""
    da = a.to_dict() if isinstance(a, AutoPlan) else AutoPlan.from_dict(a).to_dict()
    db = b.to_dict() if isinstance(b, AutoPlan) else AutoPlan.from_dict(b).to_dict()
    lines: list[str] = []
    changed = False
    for key in _DECISIONS:
        if da.get(key) != db.get(key):
            changed = True
            if key == "mesh":
                for d in ("dp", "tp", "pp", "ep"):
                    if da["mesh"].get(d) != db["mesh"].get(d):
                        lines.append(f"  {d}: {da['mesh'].get(d)} -> {db['mesh'].get(d)}")
            else:
                lines.append(f"  {key}: {da.get(key)} -> {db.get(key)}")
    head = ["decisions differ:"] if changed else ["decisions are the same"]
    preds = []
    for key, label, scale, unit in _PREDICTIONS:
        x, y = da.get(key), db.get(key)
        if x is None or y is None or x == y:
            continue
        rel = (y - x) / x * 100 if x else math.inf
        preds.append(f"  {label}: {x * scale:,.4g} -> {y * scale:,.4g} {unit} ({rel:+.1f}%)")
    for key in ("gpus", "precision"):
        if da.get(key) != db.get(key) and key not in _DECISIONS:
            preds.append(f"  {key}: {da.get(key)} -> {db.get(key)}")
    if da.get("hardware", {}).get("name") != db.get("hardware", {}).get("name"):
        preds.append(f"  hardware: {da['hardware'].get('name')} -> {db['hardware'].get('name')}")
    if da.get("binding") != db.get("binding"):
        preds.append(f"  binding: {da.get('binding')}\n        -> {db.get('binding')}")
    return changed, head + lines + (["predictions:"] + preds if preds else [])
