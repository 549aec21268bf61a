"""``autoshard(model, Mesh.auto(), ...)``: let the planner choose the mesh and the memory options.

:func:`resolve` runs the planner (``passes/planner.py``) for the world's size on the detected (or
given) hardware profile, restricted to what this runtime executes, and returns the real
:class:`~autoshard.runtime.mesh.Mesh`, this rank's slice of the example batch and the chosen
options. Rank 0 plans and broadcasts the plan (as JSON), so every rank makes the same choice; the
plan fingerprint check in ``ShardedModule`` would catch a divergence anyway.

With ``Mesh.auto()``, ``example_inputs`` is the **global** batch of one optimizer step (before
knowing ``dp`` nobody can cut it); feed each rank ``sm.mesh.data_rank``'s slice of
``sm.mesh.data_size`` afterwards, as with a fixed mesh. Options left at their defaults (``zero=0``,
``offload=None``, ``schedule="1f1b"``, ``microbatches=None``, ``virtual_stages=1``,
``activation_checkpointing=None``) are the planner's to choose; any other value pins that choice
(``activation_checkpointing``: an int ``k`` or ``"all"``; a list of names needs a fixed mesh).
``precision`` is always the caller's. The planner's ``checkpoint_blocks`` (the smallest ``k`` that
fits the budget) becomes ``activation_checkpointing=k``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_flatten, tree_map

from autoshard.passes import cost_model
from autoshard.passes.planner import AutoPlan, gib, plan, runtime_space
from autoshard.runtime.choices import Choices
from autoshard.runtime.errors import PlanError
from autoshard.runtime.hardware import AutoMesh, detect_profile, get_profile
from autoshard.runtime.mesh import Mesh

_DEFAULTS = {"zero": 0, "offload": None, "schedule": "1f1b", "microbatches": None, "virtual_stages": 1,
             "activation_checkpointing": None}
_ALL_BLOCKS = 1 << 20  # "all": more blocks than any rank has (the planner clips k to each rank's blocks)


def _pin_checkpointing(value: Any) -> int:
    """``activation_checkpointing=`` given with ``Mesh.auto()``: the planner's ``k`` it pins."""
    if value == "all":
        return _ALL_BLOCKS
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise PlanError(f"activation_checkpointing={value!r} with Mesh.auto(): pass None (the planner chooses), 'all' or "
                    "an int k (blocks per pipeline rank); a list of block names needs a fixed mesh, "
                    "e.g. Mesh(dp=...)")


def _as_tuple_dict(inputs: Any) -> tuple[tuple, dict]:
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    return tuple(inputs), {}


def _slice(inputs: Any, batch: int, parts: int, index: int) -> Any:
    """This data slice of every tensor whose dim 0 is the global batch."""
    per = batch // parts
    return tree_map(lambda x: x[index * per:(index + 1) * per] if isinstance(x, torch.Tensor) and x.dim() > 0
                    and x.shape[0] == batch else x, inputs)


def plan_for(auto: AutoMesh, model: torch.nn.Module, example_inputs: Any, *, precision: str = "fp32",
             loss_fn: Any = None, **options: Any) -> AutoPlan:
    """The planner's choice for ``model`` on ``auto.world_size`` ranks (no process group needed)."""
    args, kwargs = _as_tuple_dict(example_inputs)
    if auto.profile is not None:
        profile = get_profile(auto.profile)
    else:
        profile = detect_profile(auto.device)
    gpn = auto.gpus_per_node or profile.gpus_per_node
    cap = min(gpn, auto.world_size)
    tps = tuple(t for t in range(1, cap + 1) if cap % t == 0 and auto.world_size % t == 0)
    analysis = cost_model.analyse(model, args, kwargs, precision=precision, tps=tps,
                                  loss="cross_entropy" if loss_fn is not None else None)
    pins = {k: v for k, v in options.items() if k in _DEFAULTS and v != _DEFAULTS[k]}
    if "microbatches" in pins:
        pins["microbatches"] = int(pins["microbatches"])
    if "activation_checkpointing" in pins:
        pins["k"] = _pin_checkpointing(pins.pop("activation_checkpointing"))
    return plan(analysis, auto.world_size, profile, memory_gib=auto.memory_gib, gpus_per_node=auto.gpus_per_node,
                space=runtime_space(pins))


def _join(auto: AutoMesh) -> None:
    """Start the default process group from torchrun's environment, as ``Mesh`` would (NCCL with CUDA)."""
    if auto.world_size == 1 or dist.is_initialized():
        return
    use_cuda = torch.cuda.is_available() and (auto.device is None or torch.device(auto.device).type == "cuda")
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo")


def _broadcast_plan(decision: AutoPlan | None) -> AutoPlan:
    """Rank 0's plan on every rank, as JSON bytes in a tensor (nothing is unpickled)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    blob = decision.to_json(indent=None).encode() if decision is not None else b""
    size = torch.tensor([len(blob)], dtype=torch.int64, device=device)
    dist.broadcast(size, src=0)
    data = torch.zeros(int(size), dtype=torch.uint8, device=device)
    if decision is not None:
        data.copy_(torch.frombuffer(bytearray(blob), dtype=torch.uint8))
    dist.broadcast(data, src=0)
    return AutoPlan.from_json(bytes(data.cpu().tolist()).decode())


def resolve(auto: AutoMesh, model: torch.nn.Module, example_inputs: Any, *, precision: str = "fp32",
            loss_fn: Any = None, **options: Any) -> tuple[Mesh, Any, dict[str, Any], AutoPlan]:
    """Plan, build the real mesh, and return (mesh, this rank's example inputs, options, the plan).

    Rank 0 plans and sends the plan to the others (planning is deterministic, but one plan costs
    one rank's CPU time instead of every rank's); an error on rank 0 is raised on every rank.
    """
    _join(auto)
    if auto.world_size > 1 and dist.is_initialized():
        decision, error = None, ""
        if dist.get_rank() == 0:
            try:
                decision = plan_for(auto, model, example_inputs, precision=precision, loss_fn=loss_fn, **options)
            except PlanError as e:
                error = str(e)
        flag = torch.tensor([1 if error else 0], dtype=torch.int64,
                            device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.broadcast(flag, src=0)
        if int(flag):
            if dist.get_rank() == 0:
                raise PlanError(error)
            raise PlanError("rank 0 found no plan for Mesh.auto() (its error names the binding constraint)")
        decision = _broadcast_plan(decision)
    else:
        decision = plan_for(auto, model, example_inputs, precision=precision, loss_fn=loss_fn, **options)
    if not decision.runnable:  # runtime_space() should have excluded it
        raise PlanError(f"the planner chose a plan this runtime cannot run ({decision.runnable_reason})")
    d = decision.mesh
    mesh = Mesh(dp=d["dp"], tp=d["tp"], pp=d["pp"], ep=d["ep"], device=auto.device)
    batch = next(x.shape[0] for x in tree_flatten(example_inputs)[0] if isinstance(x, torch.Tensor) and x.dim() > 0)
    local = _slice(example_inputs, batch, mesh.data_size, mesh.data_rank)
    chosen = {
        "zero": decision.zero, "offload": decision.offload,
        "schedule": decision.schedule or options.get("schedule", "1f1b"),
        "microbatches": decision.microbatches if d["pp"] > 1 else None,
        "virtual_stages": decision.virtual_stages if d["pp"] > 1 else 1,
        # the planner's k (blocks per pipeline rank); "all" stays "all" (k was clipped per rank)
        "activation_checkpointing": (options["activation_checkpointing"]
                                     if options.get("activation_checkpointing") == "all"
                                     else decision.checkpoint_blocks or None),
    }
    return mesh, local, chosen, decision


def attach(sm: Any, decision: AutoPlan) -> None:
    """Record the planner's decision on the sharded module: ``sm.auto_plan`` and notes in ``sm.plan``."""
    sm.auto_plan = decision
    sm.plan.notes.append(f"planner: {decision.decision_text()} (predicted step {decision.step_time_s * 1e3:.4g} ms, "
                         f"{gib(decision.memory_per_gpu_bytes)} per rank on {decision.hardware['name']}); "
                         "sm.auto_plan.explain() says why")
    sm.plan.notes.append(f"planner binding constraint: {decision.binding}")
    sm.plan.estimates["planner_step_time_us"] = decision.step_time_s * 1e6
    sm.plan.estimates["planner_memory_per_gpu_bytes"] = float(decision.memory_per_gpu_bytes)


def plan_and_build(build: Any, model: torch.nn.Module, auto: AutoMesh, example_inputs: Any, *, loss_fn: Any,
                   optimizer: Any, choices: Choices) -> Any:
    """What ``autoshard(model, Mesh.auto(), ...)`` does: plan, then ``build`` (``api.build``) on the real mesh.

    The planner's choices replace those of ``choices`` left at their defaults (see the module docstring).
    """
    pinned = {k: v for k, v in choices.pinned().items() if k in _DEFAULTS}
    mesh, local, chosen, decision = resolve(auto, model, example_inputs, precision=choices.precision,
                                            loss_fn=loss_fn, **pinned)
    sm = build(model, mesh, local, loss_fn=loss_fn, optimizer=optimizer, choices=choices.replace(**chosen))
    attach(sm, decision)
    return sm
