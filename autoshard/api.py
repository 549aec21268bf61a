"""``autoshard(model, mesh)``: capture → plan → passes → lower, and the module that trains.

The returned :class:`ShardedModule` owns this rank's parameter shards. Each distinct input
signature (shapes, dtypes, train/eval) is captured once with ``torch.export`` and rewritten with the
*same* parameter layouts, so any batch size works after the first.

Why this module is long: it still holds the interpreted executor (eager backward, hooks, pipeline
runner) beside the step program; the [compiler] rewrite moves plans onto the step program one by
one (runtime/program.py, passes/compile.py) and this module shrinks as each old path is retired.
"""

from __future__ import annotations

import hashlib
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.fx import GraphModule
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from autoshard.passes.activation_checkpoint import (
    blocks_in,
    checkpoint_blocks,
    choose_blocks,
    find_blocks,
    parse_spec,
    recompute_bytes,
)
from autoshard.passes.capture import capture
from autoshard.passes.data_parallel import (
    block_buckets,
    block_of_params,
    gradient_order,
    insert_param_gathers,
    without_param_gathers,
)
from autoshard.passes.expert_parallel import apply_expert_parallel, find_moe_layers, plan_expert_parallel
from autoshard.passes.memory import saved_activation_bytes
from autoshard.passes.pipeline_split import split_stages
from autoshard.passes.tensor_parallel import apply_tensor_parallel, plan_tensor_parallel
from autoshard.runtime import collectives as C
from autoshard.runtime import moe as moe_runtime
from autoshard.runtime.choices import Choices
from autoshard.runtime.data_parallel import GradientSync, make_buckets
from autoshard.runtime.errors import CaptureError, PlanError, PlanMismatchError
from autoshard.runtime.guards import StepGuard, embedding_inputs
from autoshard.runtime.layout import shard_tensor, unshard_tensor
from autoshard.runtime.mesh import DIM_ORDER, GroupHandle, Mesh
from autoshard.runtime.moe import ExpertGradientSync
from autoshard.runtime.onebit_zero import OneBitZeroOptimizer
from autoshard.runtime.pipeline import PipelineRunner
from autoshard.runtime.plan import Plan, parse_placement
from autoshard.runtime.schedules import Schedule, build_schedule
from autoshard.runtime.zero import DTYPES, ZeroOptimizer

from .steps import finish_step, model_loss

Inputs = tuple | list | dict | torch.Tensor


def autoshard(
    model: torch.nn.Module,
    mesh: Mesh,
    example_inputs: Inputs = (),
    *,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer] | None = None,
    bucket_mb: float = 25.0,
    schedule: str = "1f1b",
    microbatches: int | None = None,
    virtual_stages: int = 1,
    split_points: list[str] | None = None,
    zero: int = 0,
    offload: str | None = None,
    offload_overlap: bool = True,
    precision: str = "fp32",
    grad_clip: float | None = None,
    prefetch: int = 1,
    capacity_factor: float | None = None,
    fuse: bool | None = None,
    attention: str | None = None,
    activation_checkpointing: None | str | int | list[str] = None,
) -> ShardedModule:
    """Shard ``model`` over ``mesh`` and return a module that trains it.

    Args:
        model: an unmodified ``nn.Module`` (its parameters are copied, never changed).
        mesh: where to run; ``Mesh(dp=.., tp=..)``, or ``Mesh.auto()`` to let the planner choose the degrees and
            the options left at their defaults (``example_inputs`` is then the *global* batch; see autoshard/auto.py).
        example_inputs: one *local* batch, a tuple of positional inputs or a dict of keyword inputs.
        loss_fn: ``loss_fn(output, target) -> scalar``; ``None`` if the model returns the loss
            (a scalar tensor, or an output with ``.loss`` such as Hugging Face models given labels).
        optimizer: ``optimizer(params) -> torch.optim.Optimizer``; receives this rank's local shards.
        bucket_mb: data-parallel gradient bucket size.
        schedule: pipeline schedule when ``mesh`` has ``pp > 1``: "gpipe", "1f1b", "interleaved_1f1b"
            or "zero_bubble".
        microbatches: how many microbatches the local batch is cut into (default ``2·pp`` when it
            divides the local batch, else ``pp``).
        virtual_stages: stages per pipeline rank (``interleaved_1f1b``).
        split_points: module names where stages start (e.g. ``["model.layers.8"]``); default:
            balanced cuts between repeated blocks.
        zero: ZeRO stage over the data-parallel ranks: 0, 1 (optimizer states partitioned), 2 (and
            gradients) or 3 (and parameters: each block is gathered just before use and freed after).
            Needs an elementwise optimizer (SGD, Adam, AdamW, ...).
        offload: ``"optimizer"`` keeps fp32 master weights and optimizer states in CPU memory and
            steps there; ``"params"`` (zero=3) also keeps this rank's parameter slices there.
        offload_overlap: with ``offload``, pipeline the host work per bucket on a worker thread: each
            gradient's copy to the host and its norm pass run during backward, each bucket's optimizer
            step beside the uploads and all-gathers of the others (bitwise the same result as
            ``False``, which does it all on the calling thread after backward).
            ``stats()["offload_wait_s"]`` is how long the last step waited for the host.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` compute copies; fp32 master weights either way,
            fp16 with DeepSpeed-style dynamic loss scaling.
        grad_clip: clip gradients to this global norm (over every shard on every rank).
        prefetch: with zero=3, how many buckets ahead to start gathering (forward and backward).
        capacity_factor: mixture-of-experts layers: ``None`` routes every token (dropless); a float caps
            each expert at ``ceil(capacity_factor · routed rows / E)`` rows per rank, GShard-style, and
            counts the rows dropped (``stats()["dropped_tokens"]``).
        fuse: replace regions of the rewritten graph by fused Triton kernels (generated pointwise
            chains; RMSNorm/LayerNorm with the residual add, softmax, SwiGLU, rotary, cross-entropy).
            ``None``: on for CUDA meshes, off on CPU. ``plan.fusions`` lists what was fused and why not.
        attention: ``"block_sparse(block=64, local=4, global=1, random=0)"`` replaces each
            ``scaled_dot_product_attention`` (causal or not; no mask, no dropout) by block-sparse attention
            over that layout (``stride=``, ``seed=`` too; see runtime/kernels/block_sparse.py). ``plan.attention``
            lists the layout, the nodes replaced and those left dense with the reason.
        activation_checkpointing: blocks whose forward is recomputed in backward, keeping only their
            inputs (passes/activation_checkpoint.py): ``None`` (off), ``"all"``, an int ``k`` (the first
            ``k`` blocks of each pipeline rank) or a list of block names (``["model.layers.0", ...]``).
            ``plan.checkpointing`` records the blocks; ``plan.memory["activations"]`` counts the saving.
    """
    choices = Choices(bucket_mb=bucket_mb, schedule=schedule, microbatches=microbatches, virtual_stages=virtual_stages,
                      split_points=split_points, zero=zero, offload=offload, offload_overlap=offload_overlap,
                      precision=precision, grad_clip=grad_clip, prefetch=prefetch, capacity_factor=capacity_factor,
                      fuse=fuse, attention=attention, activation_checkpointing=activation_checkpointing)
    return build(model, mesh, example_inputs, loss_fn=loss_fn, optimizer=optimizer, choices=choices)


def plan(model: torch.nn.Module, mesh: Mesh | dict[str, int], example_inputs: Inputs = (), *,
         loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
         optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer] | None = None,
         choices: Choices | None = None, rank: int = 0, **options: Any) -> Plan:
    """The :class:`Plan` ``autoshard(model, mesh, ...)`` follows, made without processes.

    ``mesh`` is a :class:`Mesh` or its degrees (``{"dp": 8, "tp": 4}``); the plan is made on a virtual
    mesh of those degrees, as rank ``rank`` sees it. A model on the meta device (``with
    torch.device("meta"): model = ...``) is planned without allocating anything: its example inputs
    are taken to the meta device too, so a model larger than this machine plans here. ``options`` are
    :func:`autoshard`'s (or pass ``choices``); ``optimizer`` defaults to AdamW, for ZeRO's layout and the
    optimizer-state terms. ``plan.estimates`` carries ``predicted_device_bytes`` and
    ``predicted_host_bytes`` (what ``sm.predicted_peak_bytes()`` would say before the first step).
    """
    degrees = mesh.degrees if isinstance(mesh, Mesh) else dict(mesh)
    meta = any(p.is_meta for p in model.parameters())
    if meta:
        example_inputs = tree_map(lambda x: x.to("meta") if isinstance(x, torch.Tensor) else x, example_inputs)
    vmesh = Mesh.virtual(**degrees, rank=rank, device="meta" if meta else None)
    c = (choices or Choices()).replace(**options) if options else (choices or Choices())
    sm = build(model, vmesh, example_inputs, loss_fn=loss_fn,
               optimizer=optimizer or (lambda ps: torch.optim.AdamW(ps)), choices=c)
    peak = sm.predicted_peak_bytes()
    sm.plan.estimates["predicted_device_bytes"] = float(peak["device"])
    sm.plan.estimates["predicted_host_bytes"] = float(peak["host"])
    return sm.plan


def build(model: torch.nn.Module, mesh: Mesh, example_inputs: Inputs = (), *,
          loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
          optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer] | None = None,
          choices: Choices | None = None) -> ShardedModule:
    """:func:`autoshard` with its options as one :class:`~autoshard.runtime.choices.Choices` (what
    ``Mesh.auto()``, the CLI and the bench fill). Bad values fail here, before anything is captured."""
    choices = (choices or Choices()).validate()
    if getattr(mesh, "is_auto", False):  # Mesh.auto(): the planner chooses degrees and options (autoshard/auto.py)
        from .auto import plan_and_build

        return plan_and_build(build, model, mesh, example_inputs, loss_fn=loss_fn, optimizer=optimizer, choices=choices)
    try:
        return ShardedModule(model, mesh, example_inputs, loss_fn=loss_fn, optimizer=optimizer, choices=choices)
    except CaptureError as e:  # [zoo] no graph: the unmodified module under data parallelism, with a warning
        from .eager import eager_data_parallel

        c = choices
        if c.activation_checkpointing is not None:
            raise CaptureError(f"{e}\nactivation_checkpointing={c.activation_checkpointing!r} rewrites the captured "
                               "graph, and this model has none: drop it, or make the model capturable.") from e

        return eager_data_parallel(model, mesh, e, zero=c.zero, precision=c.precision, offload=c.offload,
                                   offload_overlap=c.offload_overlap, grad_clip=c.grad_clip, loss_fn=loss_fn,
                                   optimizer=optimizer, bucket_mb=c.bucket_mb)


def _parse_attention(attention: str | None):
    """``attention=`` checked at plan time: ``None`` or a block-sparse :class:`Layout` (bad specs: PlanError)."""
    if attention is None:
        return None
    from autoshard.runtime.kernels.block_sparse import LayoutError, parse_attention

    try:
        return parse_attention(attention)
    except LayoutError as e:
        raise PlanError(str(e)) from None


def _as_call(inputs: Inputs) -> tuple[tuple, dict]:
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    raise TypeError(f"inputs must be a tuple of positional inputs or a dict of keyword inputs, got {type(inputs).__name__}")


def _signature(training: bool, args: tuple, kwargs: dict) -> tuple:
    leaves, spec = tree_flatten((args, kwargs))
    sig = tuple((tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else repr(x) for x in leaves)
    return (training, str(spec), sig)


def _set_attr(root: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    *path, leaf = name.split(".")
    mod = root
    for p in path:
        mod = getattr(mod, p)
    if isinstance(value, torch.nn.Parameter):
        mod._parameters[leaf] = value
    elif leaf in mod._buffers:
        mod._buffers[leaf] = value
    else:
        setattr(mod, leaf, value)


def _retarget_device(gm: GraphModule, device: torch.device) -> None:
    """Point factory ops and metadata asserts traced on one device at the mesh's device."""
    def fix(v):
        return device if isinstance(v, torch.device) else v

    for mod in gm.modules():  # the top graph and the subgraphs of higher-order ops
        if not isinstance(mod, GraphModule):
            continue
        for node in mod.graph.nodes:
            if node.op == "call_function":
                node.args = tuple(fix(a) for a in node.args)
                node.kwargs = {k: fix(v) for k, v in node.kwargs.items()}
        mod.recompile()


@dataclass
class _Piped:
    """A pipelined program: this rank's stages, their runner, and how to flatten inputs/outputs."""

    runner: PipelineRunner
    in_keys: list[str] | None
    out_spec: Any

    def flat(self, args: tuple, kwargs: dict) -> list:
        if self.in_keys is not None:
            missing = set(self.in_keys) ^ set(kwargs)
            if missing:
                raise TypeError(f"keyword inputs {sorted(kwargs)} do not match the captured {self.in_keys}")
            kwargs = {k: kwargs[k] for k in self.in_keys}
        return tree_flatten((args, kwargs))[0]


def _batch_size(tree: Any) -> int:
    sizes = [x.shape[0] for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor) and x.dim() > 0]
    if not sizes:
        raise PlanError("pipelining splits the batch into microbatches, but no input tensor has a batch dim")
    return sizes[0]


def _microbatches(tree: Any, batch: int, m: int) -> list[Any]:
    """Cut every tensor whose dim 0 is the local batch into ``m`` equal microbatches."""
    per = batch // m

    def cut(i: int):
        return tree_map(lambda x: x[i * per:(i + 1) * per] if isinstance(x, torch.Tensor) and x.dim() > 0
                        and x.shape[0] == batch else x, tree)

    return [cut(i) for i in range(m)]


class ShardedModule(torch.nn.Module):
    """One rank's share of a model sharded by autoshard. Train with :meth:`train_step`."""

    def __init__(self, model: torch.nn.Module, mesh: Mesh, example_inputs: Inputs, *, loss_fn=None,
                 optimizer=None, choices: Choices | None = None) -> None:
        super().__init__()
        t_start = time.perf_counter()
        self._times: dict[str, float] = {}  # setup_times(): where the first step's time went
        self.choices = c = (choices or Choices()).validate()
        bucket_mb, schedule, microbatches, virtual_stages = c.bucket_mb, c.schedule, c.microbatches, c.virtual_stages
        split_points, zero, offload, offload_overlap = c.split_points, c.zero, c.offload, c.offload_overlap
        precision, grad_clip, prefetch, capacity_factor = c.precision, c.grad_clip, c.prefetch, c.capacity_factor
        fuse, attention, activation_checkpointing = c.fuse, c.attention, c.activation_checkpointing
        self._ckpt_spec = parse_spec(activation_checkpointing)  # bad values: PlanError before any capture
        self._ckpt_stages: list[list[int]] | None = None  # blocks each stage checkpoints (decided once)
        self._ckpt_record: dict[str, Any] = {}
        self._zero_stage, self._precision, self._offload, self._grad_clip = zero, precision, offload, grad_clip
        self._prefetch = prefetch
        self._use_zero = zero > 0 or precision != "fp32" or offload is not None or grad_clip is not None
        # [compiler] the whole step as one program where the plan allows it (see _executor_mode)
        self._mode, self._joint_reason = _executor_mode(mesh, zero=zero, offload=offload, precision=precision,
                                                        grad_clip=grad_clip, fuse=fuse, optimizer=optimizer)
        self._joint = None  # passes.compile.StepState, made with the optimizer below
        self._step_programs: dict[tuple, Any] = {}
        self._step_reports: dict[str, Any] = {}  # the report of the program the last step ran
        self._reports_by_key: dict[tuple, dict[str, Any]] = {}
        self._grad_norm = float("nan")  # the step program's global gradient norm (before clipping)
        self._zero: ZeroOptimizer | None = None
        self._gathers: list[dict] = []
        self.mesh = mesh
        self._model = [model]  # not registered: autoshard works on its own copies
        self.loss_fn = loss_fn
        self._programs: dict[tuple, Any] = {}
        self._steps = 0
        self._skipped = 0
        self._last_comm: dict[str, float] = {}
        self._last_inflight = 0
        self._tp = mesh.size("tp")
        self._pp = mesh.size("pp")
        self._keys = {d: mesh.group(d).name for d in DIM_ORDER}
        self._tp_key, self._dp_key = self._keys["tp"], self._keys["dp"]
        if not mesh.virtual:
            for d in DIM_ORDER:
                C.register_group(mesh.group(d))
        self._setup_experts(model, capacity_factor)  # [experts] MoE layers; with ep > 1, _dp_key becomes dp × ep
        self._fuse = mesh.device.type == "cuda" if fuse is None else bool(fuse)  # [kernels]
        if self._mode != "interpreted" and self._moe:
            self._mode, self._joint_reason = "interpreted", "mixture-of-experts layers run through the interpreted MoE runtime"
        if self._mode != "interpreted":
            self._fuse = False  # Inductor generates the step's kernels
        if self._mode == "program":
            # the step program keeps masters, skips non-finite steps and clips itself; ZeRO lays out its buckets
            self._use_zero = zero > 0
        self._fusions: dict = {}  # [kernels] the fusion report of the first program, for the plan
        self._attention, self._attention_report = _parse_attention(attention), {}  # [comm] block-sparse attention

        args, kwargs = _as_call(example_inputs)
        self.schedule: Schedule | None = None
        self._m = 1
        self._split_points = list(split_points) if split_points else None
        if self._pp > 1:
            local_b = _batch_size((args, kwargs))
            m = microbatches if microbatches is not None else (2 * self._pp if local_b % (2 * self._pp) == 0 else self._pp)
            if m < 1 or local_b % m:
                raise PlanError(f"the local batch of {local_b} does not split into {m} microbatches: choose "
                                f"microbatches dividing {local_b}, or a local batch divisible by {m}")
            self.schedule = build_schedule(schedule, self._pp, m, virtual_stages)
            self._m = m
            args, kwargs = _microbatches((args, kwargs), local_b, m)[0]
        elif (microbatches or 1) != 1 or virtual_stages != 1 or split_points:
            raise PlanError("microbatches, virtual_stages and split_points need a pipeline: use Mesh(pp=...) > 1")
        self._capture_dtype = None if precision == "fp32" else DTYPES[precision]
        gm = self._capture(model, args, kwargs, training=True)
        self._times["capture_s"] = time.perf_counter() - t_start
        if loss_fn is None:
            _check_output_is_loss(gm)
        self._tp_plan = plan_tensor_parallel(gm, self._tp)
        layouts = self._tp_plan.layouts
        self._guard = StepGuard(mesh, self, embedding_inputs(  # [reliability] runtime/guards.py
            gm, {a: lay.shape[0] for n, lay in layouts.items() if lay.role == "vocab" for a in (n, *lay.aliases)}, (args, kwargs)))
        self._params: dict[str, torch.nn.Parameter] = {}
        self._buffers_local = {n: b.detach().to(mesh.device).clone() for n, b in model.named_buffers()
                               if n in dict(gm.named_buffers())}
        self._sd_keys = list(model.state_dict().keys())
        self._alias_of = {a: n for n in layouts for a in [n, *layouts[n].aliases]}

        program, full_gm, collectives, split = self._lower(gm)
        self._programs[_signature(True, args, kwargs)] = program
        if split is None:
            self.module = program  # registered: sm.parameters() are the local shards
        else:
            self.module = torch.nn.ModuleDict({str(s): g for s, g in program.runner.stages.items()})

        # ---- gradient buckets (and, with a pipeline, how often each gradient accumulates)
        order = gradient_order(full_gm, list(layouts))
        full_bytes = {n: math.prod(lay.local_shape) * 4 for n, lay in layouts.items()}
        bucket_bytes = int(bucket_mb * 2**20)
        tied_names = set(split.shared_params) if split is not None else set()
        block = block_of_params(full_gm, list(layouts)) if zero == 3 else {}

        def pack(names: set[str]) -> list[list[str]]:
            # parameters shared between pipeline stages go last, in their own bucket: their gradients are
            # summed across stages after the pipeline finishes, before they are reduced over dp
            plain = [n for n in order if n in names and n not in tied_names and self._trainable(n)]
            tied = [n for n in order if n in names and n in tied_names and self._trainable(n)]
            if zero == 3:  # gathered as units: one bucket per repeated block
                return block_buckets(plain, block, full_bytes, bucket_bytes) + ([tied] if tied else [])
            return make_buckets(plain, full_bytes, bucket_bytes) + ([tied] if tied else [])

        if mesh.data_size == 1 and not self._use_zero:
            buckets, my_buckets = [], []
        elif split is None:
            buckets = my_buckets = pack(set(layouts))
        else:  # one bucket list per pipeline rank, each over the parameters its stages hold
            per_rank = [pack({n for s in range(split.num_stages) if self.schedule.rank_of(s) == r for n in split.params[s]})
                        for r in range(self._pp)]
            buckets = [b for rb in per_rank for b in rb]
            my_buckets = per_rank[mesh.coord("pp")]
        expected = None
        pipeline: dict[str, Any] = {}
        self._tied: list[tuple[str, str]] = []
        if split is not None:
            mine = program.runner.stages
            never = 1 << 30  # tied: reduced in finish(), after the cross-stage sum
            expected = {n: never if n in tied_names else self._m * sum(n in split.params[s] for s in mine)
                        for n in self._params}
            self._tied = self._tied_groups(split)
            self._stage_params_names = split.params
            pipeline = {
                "schedule": self.schedule.name, "microbatches": self._m,
                "virtual_stages": self.schedule.virtual_stages, "split_points": self._split_points,
                "stages": [{"stage": s, "pp_rank": self.schedule.rank_of(s), "blocks": split.stage_blocks[s],
                            "params": len(split.params[s]), "flops": split.costs[s],
                            "receives": len(split.recv[s])} for s in range(split.num_stages)],
                "shared_params": split.shared_params,
            }
        nbytes = {n: p.numel() * p.element_size() for n, p in self._params.items()}
        if self._use_zero:
            if optimizer is None:
                raise PlanError("zero/precision/offload/grad_clip need an optimizer factory: optimizer=lambda ps: ...")
            weight = {}
            for n in self._params:
                w = 1.0 / self._tp if not parse_placement(layouts[n].placement).is_shard() else 1.0
                if n in tied_names:
                    w /= len({self.schedule.rank_of(s) for s in split.shared_params[n]})
                weight[n] = w
            zero_buckets, groups, divisor = my_buckets, None, None
            if self._ep_key is not None:  # [experts] dense buckets over dp × ep, experts' over the dp ranks holding them
                expert = self._ep_plan.is_expert
                dense_g = (self._dp_key, self._data_group.size, self._data_group.rank)
                expert_g = (self._keys["dp"], mesh.size("dp"), mesh.coord("dp"))
                zero_buckets, groups = [], []
                for b in my_buckets:
                    for part, g in (([n for n in b if not expert(n)], dense_g), ([n for n in b if expert(n)], expert_g)):
                        if part:
                            zero_buckets.append(part)
                            groups.append(g)
                divisor = mesh.data_size
            zero_cls = ZeroOptimizer
            if _compressing(optimizer):  # [comm] 1-bit Adam: its own bucket layout and post-warm-up step
                self._check_onebit_zero(optimizer)
                zero_cls = OneBitZeroOptimizer
            self._zero = zero_cls(
                self._params, {n: p.detach() for n, p in self._params.items()}, zero_buckets,
                group=self._dp_key, size=mesh.size("dp"), rank=mesh.coord("dp"), stage=zero, precision=precision,
                optimizer_factory=optimizer, device=mesh.device, offload=offload, grad_clip=grad_clip,
                expected=expected, norm_weight=weight, global_norm=not mesh.virtual, prefetch=prefetch,
                bucket_groups=groups, divisor=divisor, overlap=offload_overlap)
            self._sync = self._zero
            self._gathers = self._zero3_rewrite(program)
        elif self._ep_key is not None:  # [experts] dense gradients over dp × ep, experts' over dp
            self._sync = ExpertGradientSync(self._params, my_buckets, self._ep_plan.is_expert, self._dp_key,
                                            self._keys["dp"], mesh.data_size, expected=expected)
        else:
            self._sync = GradientSync(self._params, my_buckets, self._dp_key, mesh.size("dp"), expected=expected)
        memory = self._memory_estimate(layouts, split)
        memory["activations"] = self._activation_estimate(program, full_gm)

        self.plan = Plan(
            mesh=mesh.to_dict(),
            params={n: layouts[n] for n in layouts},
            buffers=sorted(self._buffers_local),
            collectives=collectives,
            fallbacks=self._tp_plan.fallbacks,
            dp_buckets=buckets,
            pipeline=pipeline,
            notes=list(self._tp_plan.notes) + self._expert_notes() + self._onebit_notes() + [self._executor_note()],
            experts=self._ep_plan.to_dict() if self._moe else {},
            zero={"stage": zero, "precision": precision, "offload": offload, "grad_clip": grad_clip,
                  **({"offload_overlap": bool(offload_overlap)} if offload else {}),
                  **({"prefetch": prefetch, "gathered_buckets": len(self._gathers)} if zero == 3 else {})},
            memory=memory,
            fusions=self._fusions,
            attention=self._attention_report,
            checkpointing=self._ckpt_record,
            choices=c.to_dict(),
            estimates={
                "param_bytes_per_rank": float(sum(nbytes.values())),
                "param_bytes_total": float(sum(math.prod(lay.shape) * 4 for lay in layouts.values())),
                "tp_forward_comm_bytes": float(sum(c["bytes"] for c in collectives)),
            },
        )
        self._check_fingerprints()
        if self._zero is not None:
            self.optimizer = self._zero.optimizer  # over this rank's fp32 master slices
            if self._mode == "program":  # [compiler] ZeRO buckets, the step run as one program over them
                from autoshard.passes.compile import make_zero_state

                self._joint = make_zero_state(self._zero, mesh.device)
            elif self._mode == "host-update":  # [compiler] the program reduces into ZeRO's buckets; the host steps
                from autoshard.passes.compile import make_host_state

                self._joint = make_host_state(self._zero, mesh.device)
        elif self._mode == "program":  # [compiler] the user's optimizer over fp32 masters, states in the program
            from autoshard.passes.compile import make_state

            self._joint = make_state(list(self._params), self._params, self._capture_dtype, optimizer, mesh.device)
            self.optimizer = self._joint.optimizer
            if self._joint.separate_masters:  # the bf16 compute copies take the parameters' places in the graphs
                self._params.update(zip(self._joint.names, self._joint.params))
                for prog in self._programs.values():
                    self._bind(prog, list(self._tp_plan.layouts))
        else:
            self.optimizer = optimizer(list(self._params.values())) if optimizer is not None else None
            if self._mode == "host-update":  # [compiler] the program reduces into .grad buffers; the host steps
                from autoshard.passes.compile import make_grad_state

                self._joint = make_grad_state(list(self._params), self._params, self.optimizer, mesh.device)
        self._bind_compressing_optimizer(layouts)
        self._times["plan_s"] = time.perf_counter() - t_start - self._times["capture_s"]

    def setup_times(self) -> dict[str, float]:
        """Seconds spent on the way to the first step, by phase: ``capture_s`` (torch.export), ``plan_s``
        (the forward passes, buckets, the plan); on the step program also ``joint_export_s`` (AOTAutograd's
        joint graph), ``partition_s`` (min-cut rematerialisation), ``step_graph_s`` (reduction and update
        added), ``schedule_s`` (gather placement and collective order), ``inductor_s`` (code generation, on
        CUDA) and ``cuda_graph_s`` (recording the replayed step). The first input signature's figures."""
        out = dict(self._times)
        for key, prog in list(self._step_programs.items())[:1]:
            out.update(self._reports_by_key[key].get("times_s", {}))
            out["inductor_s"] = prog.compile_s
            out["cuda_graph_s"] = prog.capture_s
        return out

    @property
    def executor(self) -> str:
        """``"step-program"`` (forward, backward and update compiled as one program) or ``"interpreted"``."""
        return "step-program" if self._joint is not None else "interpreted"

    def _executor_note(self) -> str:
        how = "Inductor + CUDA graphs" if self.mesh.device.type == "cuda" else "an FX module (uncompiled, CPU)"
        if self._mode == "program":
            return ("executor: the step program — forward, backward, data-parallel reduction and optimizer update "
                    f"as one graph per input signature, run as {how}")
        if self._mode == "host-update":
            who = "the ZeRO memory manager" if self._use_zero else "the optimizer over the parameters' .grad"
            return ("executor: the step program — forward, backward and data-parallel reduction as one graph per "
                    f"input signature, run as {how}; the update by {who} ({self._joint_reason})")
        return f"executor: interpreted (eager backward): {self._joint_reason}"

    def _joint_train_step(self, args: tuple, kwargs: dict, target: Any) -> float:
        """[compiler] One step of the step program for this input signature (captured and compiled once)."""
        from autoshard.passes.compile import compile_step

        raw = getattr(self.optimizer, "wants_raw_gradients", None)  # 1-bit Adam: local gradients after warm-up
        local = bool(raw is not None and raw())
        key = (_signature(True, args, kwargs), _signature(True, (target,), {}), local)
        prog = self._step_programs.get(key)
        if prog is None:
            fwd = self._program(args, kwargs, training=True)
            if self._zero_stage == 3:  # the step program gathers inside its own graph (passes/schedule.py)
                fwd = without_param_gathers(fwd)
            dp, tp = self.mesh.group("dp"), self.mesh.group("tp")
            weight = {n: 1.0 if parse_placement(lay.placement).is_shard() else 1.0 / tp.size
                      for n, lay in self._tp_plan.layouts.items()}
            norm_group = tp.group.group_name if tp.size > 1 else None
            if self._zero is not None and self.mesh.world_size > 1:  # ZeRO weights each element: sum over every rank
                norm_group = dist.group.WORLD.group_name
            prog, report = compile_step(
                fwd, self._loss, self._joint, args, kwargs, target,
                dp_group=dp.group.group_name if dp.size > 1 else None, dp_size=dp.size,
                buckets=self.plan.dp_buckets, grad_clip=self._grad_clip, device=self.mesh.device,
                norm_group=norm_group, norm_weight=weight, reduce_gradients=not local)
            report["local_gradients"] = local
            self._step_programs[key] = prog
            self._reports_by_key[key] = report
            C.reset_bytes(f"mesh{self.mesh.id}.")  # tracing ran the collectives once: not this step's traffic
        self._step_reports = self._reports_by_key[key]  # this program's (bytes per step, written gradients)
        if self._joint.host_update:
            return self._host_update_step(prog, args, kwargs, target)
        self._joint.set_lrs()
        if self._guard.enabled:  # [reliability] the ranks' agreement vetoes the update inside the program
            agreed = self._guard.exchange(torch.zeros((), device=self.mesh.device))
            self._joint.veto.copy_(torch.isnan(agreed))
        out = prog(tree_flatten((args, kwargs, target))[0])
        loss, found, self._grad_norm = out.tolist()  # the one host synchronisation of the step
        problem = self._guard.problem(self._steps)
        if problem is not None:
            raise problem  # no update was applied (the veto), on every rank
        stepped = not found
        self._joint.after_step(bool(found))  # fp16: the loss scaler (raises LossScaleError at its minimum)
        self._count_program_bytes()
        self._count_comm()
        overflow = self._joint.scaler is not None and math.isfinite(loss)  # fp16: the scaler's business
        if not stepped and not overflow:
            warnings.warn(f"step {self._steps}: loss {loss} or a gradient is not finite; optimizer step skipped "
                          "on every rank", stacklevel=3)
        self._skipped += not stepped
        self._steps += 1
        return loss

    def _host_update_step(self, prog, args: tuple, kwargs: dict, target: Any) -> float:
        """[compiler] The program runs forward, backward and the reduction; the optimizer (ZeRO's, or the
        user's over the parameters) steps as after an eager backward."""
        self._joint.sync_scale()  # fp16: the tangent is the scaler's current scale
        if self._zero is not None:
            self._zero.begin()  # nothing of an earlier step still on the host worker; offload timers reset
        out = prog(tree_flatten((args, kwargs, target))[0])
        if self._zero is not None and self._step_reports.get("local_gradients"):  # 1-bit Adam after warm-up
            self._zero.receive_local(self._joint.local_grads)
        elif self._zero is not None:
            for i, shard in enumerate(self._joint.grads):
                self._zero.receive(i, shard)
        else:  # the user's optimizer over the parameters: the averaged gradients become their .grad
            for i in self._step_reports["written"]:
                self._joint.params[i].grad = self._joint.grads[i]
        self._count_program_bytes()
        value, stepped = finish_step(self._zero, self.optimizer, out[0], self._steps, guard=self._guard)
        self._grad_norm = self._zero.last_grad_norm if self._zero is not None else float("nan")
        if stepped:
            self._joint.refresh_sources()  # ZeRO-3 with host masters: the device shards the program gathers
        self._count_comm()
        self._skipped += not stepped
        self._steps += 1
        return value

    def _count_program_bytes(self) -> None:
        """Count a step program's collectives (the reduction's, and those traced in forward and backward)."""
        if self._step_reports.get("reduce_bytes"):
            C.count_bytes(self._dp_key, self._step_reports["reduce_bytes"])
        for group_key, nbytes in self._step_reports.get("traced_bytes", {}).items():
            C.count_bytes(group_key, nbytes)

    def _bind_compressing_optimizer(self, layouts) -> None:
        """[comm] An optimizer that averages compressed momenta itself (autoshard.optim.OneBitAdam).

        After its warm-up, GradientSync leaves gradients local; the optimizer reduces over dp. Its
        momentum lists keep tp-replicated and tp-sharded parameters apart (see bind_data_parallel).
        """
        opt = self.optimizer
        if opt is None or not hasattr(opt, "bind_data_parallel") or isinstance(self._zero, OneBitZeroOptimizer):
            return  # on the ZeRO path OneBitZeroOptimizer does the compressed step
        name = type(opt).__name__
        if self._zero is not None:  # the factory's probe said otherwise: refuse rather than run it uncompressed
            raise PlanError(f"{name} was not recognised as a compressing optimizer when ZeRO laid out its buckets; "
                            "build it directly in the factory: optimizer=lambda ps: OneBitAdam(ps, ...)")
        if self._pp > 1 or self._ep_key is not None:
            raise PlanError(f"{name} supports data and tensor parallelism only (not pp or ep yet); "
                            "use Mesh(dp=.., tp=..) or another optimizer")
        trainable = [(n, p) for n, p in self._params.items() if p.requires_grad]
        parts = [[p for n, p in trainable if parse_placement(layouts[n].placement).is_shard() == sh]
                 for sh in (False, True)]
        opt.bind_data_parallel(self._dp_key, self.mesh.size("dp"), self.mesh.coord("dp"), parts)
        self._sync.raw_gradients = opt.wants_raw_gradients

    def _check_onebit_zero(self, optimizer) -> None:
        """[comm] 1-bit Adam on the ZeRO path: zero=1/2 (or zero=0 with bf16/fp16), with dp and tp.

        Refused, each with its reason and fix: zero=3 and offload (the compressed step needs each
        rank's whole local momentum of a bucket on the device), grad_clip (after warm-up gradients
        stay local, so there is no global norm to clip by), pp and ep.
        """
        name = type(optimizer([torch.nn.Parameter(torch.zeros(1))])).__name__
        if self._pp > 1 or self._ep_key is not None:
            raise PlanError(f"{name} supports data and tensor parallelism only (not pp or ep yet); "
                            "use Mesh(dp=.., tp=..) or another optimizer")
        if self._zero_stage == 3:
            raise PlanError(f"{name} with zero=3: after warm-up each rank compresses its whole local momentum of "
                            "a bucket and applies the averaged one to every parameter, which ZeRO-3 never holds; "
                            "use zero=2 (gradients and optimizer states sharded) or zero=1")
        if self._offload is not None:
            raise PlanError(f"{name} with offload={self._offload!r}: its compressed momentum step runs on the "
                            "device over whole buckets; use offload=None (zero=1/2 shard the states instead)")
        if self._grad_clip is not None:
            raise PlanError(f"{name} with grad_clip: after warm-up each rank's gradient stays local (only compressed "
                            "momenta are sent), so there is no global gradient norm to clip by; drop grad_clip "
                            "(the frozen variance normalises the steps) or use torch.optim.AdamW with grad_clip")

    def _onebit_notes(self) -> list[str]:
        """[comm] What 1-bit Adam does on the ZeRO path, for ``plan.explain()``."""
        z = self._zero
        if not isinstance(z, OneBitZeroOptimizer):
            return []
        after = ("every rank applies the averaged momentum to its whole fp32 buffer with the frozen denominator "
                 "(no parameter all-gather)" if z.full_update else
                 "each rank updates its fp32 master slice and the parameters are all-gathered in the compute dtype")
        return [f"1-bit Adam on ZeRO-{z.stage}: buckets aligned to 256-element scale blocks; after warm-up gradients "
                f"stay local, momenta are averaged compressed (chunk r = slice r) and {after}"]

    def _zero3_rewrite(self, program) -> list[dict]:
        """ZeRO-3: put parameter gathers, releases and backward re-gathers into ``program``'s graphs."""
        if self._zero is None or self._zero_stage != 3:
            return []
        graphs = list(program.runner.stages.values()) if isinstance(program, _Piped) else [program]
        aliases = {n: list(lay.aliases) for n, lay in self._tp_plan.layouts.items()}
        names = [b.names for b in self._zero.zbuckets]
        return [r for g in graphs for r in insert_param_gathers(g, names, aliases, self._zero.key, self._prefetch)]

    def _trainable(self, name: str) -> bool:
        return self._model[0].get_parameter(name).requires_grad

    def _activation_estimate(self, program, full_gm: GraphModule) -> int:
        """Bytes of activations autograd keeps for backward on this rank, per step (passes/memory.py).

        What the graph saves, its floating outputs, and — when ``loss_fn`` runs outside the graph —
        an fp32 copy of the largest output and its gradient (a cross-entropy over logits upcasts
        them). A pipeline rank holds the activations of as many microbatches as the schedule keeps
        in flight (from the simulator). A checkpointed block counts its inputs, plus, once, the largest
        checkpointed block's own activations, which its recompute holds during backward.
        """
        graphs = list(program.runner.stages.values()) if isinstance(program, _Piped) else [full_gm]
        params = set(self._tp_plan.layouts)
        total = 0
        # a checkpointed block keeps only its inputs (counted by saved_activation_bytes); while backward
        # recomputes it, that one block's activations are alive once more, whatever the microbatches in flight
        recompute = max((recompute_bytes(g, params, self._tp) for g in graphs), default=0)
        for g in graphs:
            r = saved_activation_bytes(g, params, self._tp)
            total += r["saved"] + r["outputs"]
            if self.loss_fn is not None and r["outputs"]:
                out = next(n for n in g.graph.nodes if n.op == "output")
                vals = [a.meta.get("val") for a in out.all_input_nodes]
                biggest = max((v.numel() for v in vals if isinstance(v, torch.Tensor) and v.is_floating_point()),
                              default=0)
                total += 2 * 4 * biggest
        if isinstance(program, _Piped):
            total *= self.schedule.simulate().peak_inflight[self.mesh.coord("pp")]
        return int(total + recompute)

    def _memory_estimate(self, layouts, split) -> dict[str, int]:
        """Predicted bytes on this rank, term by term.

        ``params``: compute copies held between steps (cΨ; none at stage 3, which casts the fp32
        master at each gather). ``grads``: the fp32 gradient slices the masters hold from the
        reduction to the step (4Ψ / N_d from stage 1 on; the paper's 2Ψ assumes fp16 gradients, this
        runtime reduces in fp32); without the ZeRO path, gradients in the parameters' dtype.
        ``optimizer``: fp32 masters and Adam's two moments (12Ψ / N_d; 8Ψ without the ZeRO path,
        whose parameters are the masters). ``reduce_buffers``: fp32 bucket copies being reduced at
        once. Stage 3 adds ``params_gathered``: the buckets gathered at once. Ψ = this rank's
        parameter elements (its tensor-parallel shards, pipeline stages and experts).
        """
        if split is None:
            names = list(layouts)
        else:
            me = self.mesh.coord("pp")
            names = sorted({n for s in range(split.num_stages) if self.schedule.rank_of(s) == me for n in split.params[s]})
        # this rank's own tensors: tp shards, pipeline stages and, with ep, only its experts
        psi = sum(self._params[n].numel() if n in self._params else math.prod(layouts[n].local_shape) for n in names)
        dp = self.mesh.size("dp")
        c = 4 if self._precision == "fp32" else 2
        stage = self._zero_stage
        z = self._zero
        parts = dp if stage >= 1 else 1
        if z is not None:
            bucket_elems = sorted((b.padded for b in z.zbuckets), reverse=True)
            out = {
                "params": 0 if stage >= 3 else c * psi,
                "grads": 4 * psi // parts,
                "optimizer": 12 * psi // parts,
                "reduce_buffers": 4 * sum(bucket_elems[:z.max_inflight]),
            }
            if isinstance(z, OneBitZeroOptimizer):  # [comm] after warm-up: local gradients, residuals, bits
                out["grads"] = max(out["grads"], c * psi)
                out.update(z.compressed_state_bytes())
        else:
            bucket_elems = sorted((sum(math.prod(layouts[n].local_shape) for n in b) for b in self._sync.buckets),
                                  reverse=True)
            out = {"params": c * psi, "grads": c * psi, "optimizer": 8 * psi,
                   "reduce_buffers": c * sum(bucket_elems[:self._sync.max_inflight])}
        out["optimizer_on_cpu"] = int(self._offload in ("optimizer", "params"))
        out["buffers"] = sum(b.numel() * b.element_size() for b in self._buffers_local.values())
        if stage >= 3:
            # gathered at once: the bucket in use, the `prefetch` ones behind it and the one kept for
            # backward; ZeRO-3 buckets are blocks, so this is a few blocks' compute copies
            out["params_gathered"] = c * sum(bucket_elems[:2 + self._prefetch])
            out["params_on_cpu"] = c * psi // dp if self._offload == "params" else 0
        return out

    def predicted_peak_bytes(self) -> dict[str, int]:
        """Predicted peak memory of this rank: ``device`` (what the accelerator holds) and ``host``
        (offloaded optimizer states and parameter slices).

        Once a step program holding the whole step has been built, read off its graph
        (passes/memory.step_graph_memory: the persistent inputs plus the peak of what the step
        creates, the largest over input signatures); before that, and on the other executors, from
        ``plan.memory``'s terms.
        """
        if self._mode == "program" and self._step_programs:
            from autoshard.passes.memory import step_graph_memory

            return {"device": max(step_graph_memory(p.gm)["peak"] for p in self._step_programs.values()), "host": 0}
        m = self.plan.memory
        host_terms = ("grads", "optimizer") if m.get("optimizer_on_cpu") else ()
        device = sum(v for k, v in m.items() if k not in host_terms and k not in ("optimizer_on_cpu", "params_on_cpu"))
        if self._zero_stage >= 2 and "grads" not in host_terms:
            # the gradient shards fill bucket by bucket while backward frees the activations: the peak
            # holds the larger of the two, not both (measured on 953M and 6.7B, benchmarks/RESULTS.md)
            device -= min(m.get("grads", 0), m.get("activations", 0))
        host = sum(m[k] for k in host_terms) + m.get("params_on_cpu", 0)
        return {"device": int(device), "host": int(host)}

    # ------------------------------------------------------------------ lowering
    def _local_param(self, name: str) -> torch.nn.Parameter:
        """This rank's shard of parameter ``name``, created on first use from the model's tensor."""
        p = self._params.get(name)
        if p is None:
            src = self._model[0].get_parameter(name)  # the user's tensor (full precision), not the capture's
            lay = self._tp_plan.layouts[name]
            pl = parse_placement(lay.placement)
            full = src.detach()
            if self._ep_key is not None:  # [experts] this ep rank's experts only
                full = self._ep_plan.local(name, full, self.mesh.coord("ep"))
            local = shard_tensor(full, pl.dim, self._tp, self.mesh.coord("tp"), lay.blocks) if pl.is_shard() else full
            # ZeRO-3 partitions it right away: never hold the whole parameter on the device
            where = ("cpu" if self._zero_stage == 3 and src.requires_grad and self.mesh.device.type != "meta"
                     else self.mesh.device)
            p = torch.nn.Parameter(local.to(where).clone(), requires_grad=src.requires_grad)
            self._params[name] = p
        return p

    def _bind(self, gm: GraphModule, names: list[str]) -> None:
        """Point ``gm``'s parameter and buffer attributes (those it has) at this rank's tensors."""
        for n in names:
            p = self._local_param(n)
            for a in (n, *self._tp_plan.layouts[n].aliases):
                if _has_attr(gm, a):
                    _set_attr(gm, a, p)
        for n, b in self._buffers_local.items():
            if _has_attr(gm, n):
                _set_attr(gm, n, b)
        for node in gm.graph.nodes:  # tensor constants lifted by export
            if node.op == "get_attr" and node.target not in self._params and node.target not in self._buffers_local:
                try:
                    v = _get_attr(gm, node.target)
                except AttributeError:
                    continue
                if isinstance(v, torch.Tensor) and not isinstance(v, torch.nn.Parameter) and v.device != self.mesh.device:
                    _set_attr(gm, node.target, v.to(self.mesh.device))

    def _lower(self, gm: GraphModule):
        """TP rewrite, then (with pp) stage split; bind this rank's parameters. Returns the program."""
        from autoshard.passes.tensor_parallel import TensorParallelPlan

        out_spec = getattr(gm, "_out_spec", None)
        in_spec = getattr(gm, "_in_spec", None)
        plan = TensorParallelPlan(self._tp_plan.layouts, [], [])
        gm, collectives = apply_tensor_parallel(gm, plan, self._tp, self._tp_key)
        _retarget_device(gm, self.mesh.device)
        if self._attention is not None:  # [comm] block-sparse attention in place of sdpa, on local (tp) heads
            from autoshard.passes.sparse_attention import sparse_attention_graph

            gm, report = sparse_attention_graph(gm, self._attention)
            self._attention_report = self._attention_report or report
        if self._fuse:  # [kernels] fused Triton kernels (torch references on CPU), before binding and stage cuts
            from autoshard.passes.fusion import fuse_graph

            gm, report = fuse_graph(gm)
            self._fusions = self._fusions or report
        prefix, num_blocks = find_blocks(gm)
        if self._pp == 1:
            self._checkpoint(prefix, num_blocks, {0: gm}, [gm], [0])
            self._bind(gm, list(self._tp_plan.layouts))
            return gm, gm, collectives, None
        sched = self.schedule
        split = split_stages(gm, sched.num_stages, self._split_points)
        if self._split_points is None:
            self._split_points = [f"{split.block_prefix}.{b[0]}" for b in split.stage_blocks[1:]]
        me = self.mesh.coord("pp")
        stages = {s: split.stages[s] for s in range(sched.num_stages) if sched.rank_of(s) == me}
        self._checkpoint(prefix, num_blocks, stages, split.stages, [sched.rank_of(s) for s in range(sched.num_stages)])
        for s, g in stages.items():
            self._bind(g, split.params[s])
        runner = PipelineRunner(
            stages, sched, [self.mesh.rank_of(pp=sched.rank_of(s)) for s in range(sched.num_stages)], me,
            self.mesh.device, {s: [self._params[n] for n in split.params[s]] for s in stages}, self._keys["pp"],
            self._p2p_groups())
        keys = None
        try:
            kw_spec = in_spec.child(1) if hasattr(in_spec, "child") else in_spec.children_specs[1]
            keys = list(kw_spec.context)
        except (AttributeError, IndexError, TypeError):
            keys = None
        return _Piped(runner, keys, out_spec), gm, collectives, split

    def _checkpoint(self, prefix: str, num_blocks: int, mine: dict[int, GraphModule], all_stages: list[GraphModule],
                    stage_rank: list[int]) -> None:
        """Activation checkpointing: choose the blocks of every stage (once, the same on every rank), then
        rewrite this rank's stage graphs so those blocks recompute their forward in backward."""
        if self._ckpt_spec is None:
            return
        if self._ckpt_stages is None:
            stage_blocks = [blocks_in(g, prefix) for g in all_stages]
            self._ckpt_stages = choose_blocks(self._ckpt_spec, prefix, num_blocks, stage_blocks, stage_rank)
            self._ckpt_record = {
                "spec": self._ckpt_spec,
                "stages": [[f"{prefix}.{b}" for b in bs] for bs in self._ckpt_stages],
            }
        for s, g in mine.items():
            report = checkpoint_blocks(g, self._ckpt_stages[s], prefix)
            if self._pp == 1 and "blocks" not in self._ckpt_record:  # the same graph on every rank: recorded
                self._ckpt_record["blocks"] = report

    def _p2p_groups(self) -> dict[str, object]:
        """One process group per direction of pipeline traffic (see runtime/pipeline.py), made once."""
        if not hasattr(self, "_p2p"):
            self._p2p = {}
            if not self.mesh.virtual and dist.is_initialized():
                world = list(range(dist.get_world_size()))
                for name in ("fwd", "fwd_wrap", "bwd", "bwd_wrap"):
                    self._p2p[name] = dist.new_group(world)
        return self._p2p

    def _tied_groups(self, split) -> list[tuple[str, str]]:
        """Process groups that sum the gradients of a parameter used on several pipeline ranks."""
        out = []
        if self.mesh.virtual:
            return out
        for name in sorted(split.shared_params):
            owners = sorted({self.schedule.rank_of(s) for s in split.shared_params[name]})
            if len(owners) < 2:
                continue
            mine = None
            for dp in range(self.mesh.size("dp")):
                for ep in range(self.mesh.size("ep")):
                    for tp in range(self.mesh.size("tp")):
                        ranks = [self.mesh.rank_of(pp=o, dp=dp, ep=ep, tp=tp) for o in owners]
                        group = dist.new_group(ranks)
                        if self.mesh.rank in ranks:
                            mine = GroupHandle(f"mesh{self.mesh.id}.tied.{name}", len(ranks),
                                               ranks.index(self.mesh.rank), group)
            if mine is not None and name in self._params:
                C.register_group(mine)
                out.append((name, mine.name))
        return out

    def _program(self, args: tuple, kwargs: dict, training: bool):
        key = _signature(training, args, kwargs)
        prog = self._programs.get(key)
        if prog is None:
            cpu_args = tree_map(lambda x: x.to("cpu") if isinstance(x, torch.Tensor) else x, (args, kwargs))
            gm = self._capture(self._model[0], cpu_args[0], cpu_args[1], training=training)
            prog = self._lower(gm)[0]
            self._zero3_rewrite(prog)
            self._programs[key] = prog
        return prog

    # ------------------------------------------------------------------ running
    def _to_device(self, x):
        return tree_map(lambda t: t.to(self.mesh.device) if isinstance(t, torch.Tensor) else t, x)

    def forward(self, *args, **kwargs):
        """Run the model on this rank's inputs; returns the full, unsharded output.

        With a pipeline (pp > 1) the output exists on the ranks of the last stage; others get None.
        """
        args, kwargs = self._to_device((args, kwargs))
        prog = self._program(args, kwargs, self.training)
        if isinstance(prog, _Piped):
            flat = prog.runner.forward(prog.flat(args, kwargs))
            return None if flat is None else tree_unflatten(list(flat), prog.out_spec)
        return prog(*args, **kwargs)

    def train(self, mode: bool = True) -> ShardedModule:
        """Set training or eval mode. Each mode runs its own captured program (dropout, batch-norm
        statistics), so the captured graphs themselves are not switched."""
        self.training = bool(mode)
        return self

    def _loss(self, out, target) -> torch.Tensor:
        return model_loss(out, target, self.loss_fn)

    def train_step(self, inputs: Inputs, target: Any = None) -> float:
        """Forward, backward and optimizer step on this rank's local batch.

        Returns the mean loss over the global batch (the mean of the data-parallel ranks' losses).
        A step whose global loss is not finite is skipped (no update) and counted in ``stats()``.
        """
        if self.optimizer is None:
            raise RuntimeError("train_step needs an optimizer: autoshard(..., optimizer=lambda ps: torch.optim.AdamW(ps))")
        args, kwargs = self._to_device(_as_call(inputs))
        target = self._to_device(target)
        self._guard.begin((args, kwargs, target))  # [reliability] step counter, batch hash, token ids
        C.reset_bytes(f"mesh{self.mesh.id}.")
        if self._joint is not None:
            return self._joint_train_step(args, kwargs, target)
        moe_runtime.reset_stats(self._moe_ns)
        scale = self._zero.loss_scale() if self._zero is not None else 1.0
        if self._pp > 1:
            g = self._pipeline_step(args, kwargs, target, scale)
        else:
            prog = self._program(args, kwargs, training=True)
            self._sync.begin()
            out = prog(*args, **kwargs)
            loss = self._loss(out, target)
            if loss.dim() != 0:
                raise ValueError(f"the loss must be a scalar, got shape {tuple(loss.shape)}")
            (loss * scale if scale != 1.0 else loss).backward()
            self._sync.finish()
            g = loss.detach().clone().float()
        if self.mesh.data_size > 1:
            g.div_(self.mesh.data_size)
            C.all_reduce_(g, self._dp_key)
        value, stepped = finish_step(self._zero, self.optimizer, g, self._steps, guard=self._guard)
        self._collect_expert_stats()  # [experts]
        self._count_comm()  # after the step: its traffic too (parameter all-gathers, 1-bit Adam's momenta)
        self._skipped += not stepped
        self._steps += 1
        return value

    def _count_comm(self) -> None:
        """Bytes this rank has sent since the step began, per mesh dimension (``stats()``)."""
        sent = C.bytes_sent(f"mesh{self.mesh.id}.")
        self._last_comm = {"tp": sent.get(self._tp_key, 0.0), "dp": sent.get(self._dp_key, 0.0),
                           "pp": sum(v for k, v in sent.items() if k == self._keys["pp"] or ".tied." in k)}
        if self._ep_key is not None:  # [experts] dp carries the experts' gradients, ep the tokens
            self._last_comm["dp"] += sent.get(self._keys["dp"], 0.0)
            self._last_comm["ep"] = sent.get(self._keys["ep"], 0.0)

    def _pipeline_step(self, args: tuple, kwargs: dict, target: Any, scale: float = 1.0) -> torch.Tensor:
        local_b = _batch_size((args, kwargs))
        if local_b % self._m:
            raise ValueError(f"the local batch of {local_b} does not split into {self._m} microbatches")
        mbs = _microbatches((args, kwargs), local_b, self._m)
        targets = _microbatches(target, local_b, self._m) if target is not None else [None] * self._m
        prog = self._program(*mbs[0], training=True)
        flat = [prog.flat(a, k) for a, k in mbs]

        def finish(outs, i: int) -> torch.Tensor:
            loss = self._loss(tree_unflatten(list(outs), prog.out_spec), targets[i])
            if loss.dim() != 0:
                raise ValueError(f"the loss must be a scalar, got shape {tuple(loss.shape)}")
            return loss

        self._sync.begin()
        prog.runner.grad_scale = scale
        loss = prog.runner.step(flat, finish)
        self._last_inflight = prog.runner.peak_inflight
        for name, key in self._tied:  # sum across the stages that share it, then reduce over dp
            p = self._params[name]
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            C.all_reduce_(p.grad, key)
        self._sync.finish()
        g = (loss.detach().float() if loss is not None else torch.zeros((), device=self.mesh.device)).reshape(1).clone()
        last = self.mesh.rank_of(pp=self.schedule.rank_of(self.schedule.num_stages - 1))
        dist.broadcast(g, src=last, group=self.mesh.group("pp").group)
        return g.reshape(())

    def close(self) -> None:
        """Remove the gradient hooks on this module's parameters.

        The hooks and the gradient synchroniser refer to each other, so without ``close()`` a
        discarded module's memory returns only when Python's cycle collector runs.
        """
        self._sync.remove()

    # ------------------------------------------------------------------ state
    def local_parameters(self) -> dict[str, torch.nn.Parameter]:
        """This rank's parameter shards by the model's parameter names."""
        return dict(self._params)

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's ``state_dict`` (same keys and shapes), gathered on every rank, on CPU.

        Collective: every rank must call it. With a pipeline, each parameter comes from the first
        stage that holds it.
        """
        full: dict[str, torch.Tensor] = {}
        pp_group = self.mesh.group("pp").group
        for n, lay in self.plan.params.items():
            pl = parse_placement(lay.placement)
            p = self._params.get(n)
            t = None
            if p is not None:
                if self._zero is not None:  # fp32 masters, gathered over dp
                    p = self._zero.full_master(n).to(self.mesh.device)
                elif self._joint is not None:
                    p = self._joint.master(n)
                if pl.is_shard() and self._tp > 1:
                    pieces = [torch.empty_like(p) for _ in range(self._tp)]
                    dist.all_gather(pieces, p.detach().contiguous(), group=self.mesh.group("tp").group)
                    t = unshard_tensor(pieces, pl.dim, lay.blocks)
                else:
                    t = p.detach().clone()
                if self._ep_key is not None and self._ep_plan.is_expert(n):  # [experts] from their ep ranks
                    t = self._gather_experts(n, t, lay.shape)
            if self._pp > 1:
                owner = min(s["stage"] for s in self.plan.pipeline["stages"] if self._owns(s["stage"], n))
                src = self.mesh.rank_of(pp=self.schedule.rank_of(owner))
                if t is None or self.mesh.rank != src:
                    t = torch.empty(lay.shape, dtype=self._dtype_of(n), device=self.mesh.device) if t is None else t
                dist.broadcast(t, src=src, group=pp_group)
            full[n] = t.cpu()
        out = {}
        for k in self._sd_keys:
            if k in self._alias_of:
                out[k] = full[self._alias_of[k]]
            elif k in self._buffers_local:
                out[k] = self._buffers_local[k].cpu().clone()
            else:
                out[k] = self._model[0].state_dict()[k].clone()
        return out

    def save(self, path: str) -> None:
        """Write a sharded, atomic checkpoint of model, optimizer, loss scaler, RNG and step (collective)."""
        from autoshard.runtime.checkpoint import save

        save(self, path)

    # ------------------------------------------------------------------ checkpoint state
    @torch.no_grad()
    def local_training_state(self) -> dict[str, Any]:
        """This rank's training state in plan-independent pieces, for checkpoints (collective over dp).

        ``params[name]`` and ``optim[name][key]`` are this rank's *tensor-parallel* shard of each
        parameter it holds, whole over data parallelism (ZeRO slices gathered), in fp32; ``optim``
        holds every per-parameter tensor state of the optimizer (Adam's ``exp_avg``, ``exp_avg_sq``;
        SGD's ``momentum_buffer``) and ``optim_scalars`` the scalar ones (``step``).
        """
        params: dict[str, torch.Tensor] = {}
        optim: dict[str, dict[str, torch.Tensor]] = {}
        scalars: dict[str, dict[str, float]] = {}
        opt = self.optimizer
        for n, p in self._params.items():
            if self._zero is not None:
                params[n] = self._zero.full_master(n)
                keys = self._zero.state_keys()
                optim[n] = {k: self._zero.full_state(n, k) for k in keys}
                st = next(iter(opt.state.values()), {})
            else:
                if self._joint is not None:  # [compiler] the fp32 master, and the state keyed by it
                    p = self._joint.master(n)
                params[n] = p.detach().float().cpu().clone()
                st = opt.state.get(p, {}) if opt is not None else {}
                optim[n] = {k: v.detach().cpu().clone() for k, v in st.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
            scalars[n] = {k: float(v) for k, v in st.items() if not (isinstance(v, torch.Tensor) and v.dim() > 0)
                          and isinstance(v, (int, float, torch.Tensor))}
            if self._ep_key is not None and self._ep_plan.is_expert(n):  # [experts] whole over ep, as ep=1 holds it
                shape = list(self.plan.params[n].local_shape)
                params[n] = self._gather_experts(n, params[n].to(self.mesh.device), shape).cpu()
                optim[n] = {k: self._gather_experts(n, v.to(self.mesh.device), shape).cpu() for k, v in optim[n].items()}
        return {
            "params": params, "optim": optim, "optim_scalars": scalars,
            "loss_scaler": self._scaler().state_dict() if self._scaler() is not None else None,
            "step": self._steps, "skipped": self._skipped,
            "rng": {"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state() if self.mesh.device.type == "cuda" else None},
        }

    @torch.no_grad()
    def load_local_training_state(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`local_training_state` (this rank's tp shards, whole over dp and ep)."""
        missing = [n for n in self._params if n not in state["params"]]
        if missing:
            raise KeyError(f"the state has no values for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if self._ep_key is not None:  # [experts] this ep rank's experts out of the whole
            ep = self.mesh.coord("ep")
            state = dict(state, params=dict(state["params"]), optim=dict(state["optim"]))
            for n in self._params:
                if self._ep_plan.is_expert(n):
                    state["params"][n] = self._ep_plan.local(n, state["params"][n], ep)
                    state["optim"][n] = {k: self._ep_plan.local(n, v, ep) for k, v in state["optim"].get(n, {}).items()}
        for n, p in self._params.items():
            if tuple(state["params"][n].shape) != tuple(p.shape):
                raise ValueError(f"{n}: the state holds shape {tuple(state['params'][n].shape)}, this rank needs "
                                 f"{tuple(p.shape)}")
        if self._zero is not None:
            self._zero.load_full(state["params"], state["optim"], state["optim_scalars"])
            if self._joint is not None:
                self._joint.absorb()  # [compiler] the loaded states into the program's own tensors
        else:
            opt = self.optimizer
            for n, p in self._params.items():
                if self._joint is not None:  # [compiler] the master, then the compute copy from it
                    p.data.copy_(state["params"][n].to(p.device, p.dtype))
                    p = self._joint.master(n)
                p.data.copy_(state["params"][n].to(p.device, p.dtype))
                if opt is not None and (state["optim"].get(n) or state["optim_scalars"].get(n)):
                    st = {k: v.to(p.device).clone() for k, v in state["optim"].get(n, {}).items()}
                    for k, v in state["optim_scalars"].get(n, {}).items():
                        st[k] = torch.tensor(v, dtype=torch.float32)
                    opt.state[p] = st
            if self._joint is not None:
                self._joint.absorb()  # the loaded states into the program's own tensors
        if state.get("loss_scaler") and self._scaler() is not None:
            self._scaler().load_state_dict(state["loss_scaler"])
            if self._joint is not None:
                self._joint.sync_scale()
        self._steps = int(state.get("step", 0))
        self._skipped = int(state.get("skipped", 0))
        rng = state.get("rng") or {}
        if rng.get("cpu") is not None:
            torch.set_rng_state(rng["cpu"])
        if rng.get("cuda") is not None and self.mesh.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"])

    def _scaler(self) -> Any:
        """fp16's dynamic loss scaler (``None`` in other precisions), whichever executor holds it."""
        if self._joint is not None:
            return self._joint.scaler
        return self._zero.scaler if self._zero is not None else None

    def _owns(self, stage: int, name: str) -> bool:
        split_params = self._stage_params_names
        return name in split_params[stage]

    def _dtype_of(self, name: str) -> torch.dtype:
        return torch.float32 if self._zero is not None else self._model[0].get_parameter(name).dtype

    def stats(self) -> dict[str, float]:
        """Counters of the last step: bytes this rank sent (tp and dp), steps, programs, fallbacks."""
        return {
            "comm_bytes_per_step": sum(self._last_comm.values()),
            "tp_comm_bytes": self._last_comm.get("tp", 0.0),
            "dp_comm_bytes": self._last_comm.get("dp", 0.0),
            "pp_comm_bytes": self._last_comm.get("pp", 0.0),
            "pp_peak_inflight": self._last_inflight,
            "loss_scale": self._scaler().scale if self._scaler() is not None else 1.0,
            "grad_norm": self._zero.last_grad_norm if self._zero is not None and self._mode != "program" else self._grad_norm,
            **self._offload_stats(),
            "steps": self._steps,
            "skipped_steps": self._skipped,
            "programs": len(self._programs),
            "fallbacks": len(self.plan.fallbacks),
            **self._expert_stats,
        }

    def _offload_stats(self) -> dict[str, float]:
        """With offload: seconds the last optimizer step waited for host work, and that work's length."""
        z = self._zero
        if z is None or z.offload is None:
            return {}
        return {"offload_wait_s": z.offload_wait_s, "offload_host_s": z.offload_host_s}

    # ------------------------------------------------------------------ safety
    def _check_fingerprints(self) -> None:
        if self.mesh.virtual or not dist.is_initialized() or self.mesh.world_size == 1:
            return
        digest = hashlib.sha256(self.plan.fingerprint.encode()).digest()
        mine = torch.tensor(list(digest), dtype=torch.uint8, device=self.mesh.device)
        alls = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(alls, mine)
        bad = [r for r, t in enumerate(alls) if not torch.equal(t, alls[0])]
        if bad:
            raise PlanMismatchError(
                f"ranks {bad} built a different plan than rank 0 (this rank: {self.plan.fingerprint}); every "
                "rank must pass the same model, example input shapes and mesh"
            )

    # ------------------------------------------------------------------ experts [experts]
    def _setup_experts(self, model: torch.nn.Module, capacity_factor: float | None) -> None:
        """Find the model's mixture-of-experts layers and check ``ep`` and the options against them.

        With ``ep > 1`` the batch is cut into ``dp × ep`` slices, so the loss and the dense gradients
        are averaged over that group (``_dp_key``) and the experts' gradients over ``dp``.
        """
        mesh, ep = self.mesh, self.mesh.size("ep")
        self._moe_ns = f"mesh{mesh.id}.{moe_runtime.new_namespace()}"
        self._moe = find_moe_layers(model, self._moe_ns)
        self._ep_plan = plan_expert_parallel(self._moe, ep, capacity_factor)
        self._ep_key = self._keys["ep"] if ep > 1 else None
        self._expert_counts: dict[str, Any] = {}
        if ep > 1:
            data = mesh.data_group()
            self._data_group = data
            self._dp_key = data.name
            if not mesh.virtual:
                C.register_group(data)

    def _capture(self, model: torch.nn.Module, args: tuple, kwargs: dict, training: bool) -> GraphModule:
        """Capture, each MoE layer as one op, then the expert-parallel pass over the ep group."""
        gm = capture(model, args, kwargs, training=training, param_dtype=self._capture_dtype, moe=self._moe)
        if not self._moe:
            return gm
        if self._ep_key is not None:
            for layer in self._moe.values():
                if layer.unrecognised:
                    raise PlanError(f"{layer.name} {layer.unrecognised}: its experts cannot be placed over "
                                    f"ep={self.mesh.size('ep')}; use ep=1 (dp) for this model")
        return apply_expert_parallel(gm, self._ep_plan, self._ep_key)

    def _expert_notes(self) -> list[str]:
        return [f"{ly.name}: mixture-of-experts layer left to the model's own code: it {ly.unrecognised}"
                for ly in self._moe.values() if ly.unrecognised]

    def _gather_experts(self, name: str, t: torch.Tensor, shape: list[int]) -> torch.Tensor:
        """The whole of an expert parameter from the ep ranks holding its pieces (collective over ep)."""
        g = self.mesh.group("ep")
        if self._ep_plan.params[name][0] == "stacked":
            pieces = [torch.empty_like(t) for _ in range(g.size)]
            dist.all_gather(pieces, t.contiguous(), group=g.group)
            return torch.cat(pieces, dim=0)
        owner = self._ep_plan.owner(name)
        buf = t.contiguous() if g.rank == owner else torch.empty(shape, dtype=t.dtype, device=t.device)
        dist.broadcast(buf, src=self.mesh.rank_of(ep=owner), group=g.group)
        return buf

    def _collect_expert_stats(self) -> None:
        """Rows routed to each expert and rows dropped in this step, summed over every rank's tokens."""
        if not self._moe:
            return
        st = moe_runtime.read_stats(self._moe_ns)
        vec: list[float] = []
        for key, layer in self._moe.items():
            s = st.get(key, {"routed": [0] * layer.num_experts, "dropped": 0})
            vec += [*s["routed"], s["dropped"]]
        t = torch.tensor(vec, dtype=torch.float64, device=self.mesh.device)
        if not self.mesh.virtual and dist.is_initialized():
            for g in (self.mesh.data_group(), self.mesh.group("pp")):  # tp ranks saw the same tokens
                if g.size > 1:
                    dist.all_reduce(t, group=g.group)
        vals, off, tokens = [int(v) for v in t.tolist()], 0, {}
        dropped = 0
        for layer in self._moe.values():
            tokens[layer.name] = vals[off:off + layer.num_experts]
            dropped += vals[off + layer.num_experts]
            off += layer.num_experts + 1
        self._expert_counts = {"expert_tokens": tokens, "dropped_tokens": dropped}

    @property
    def _expert_stats(self) -> dict[str, Any]:
        if not self._moe:
            return {}
        return {"expert_tokens": {}, "dropped_tokens": 0, **self._expert_counts,
                "ep_comm_bytes": self._last_comm.get("ep", 0.0)}


def _executor_mode(mesh: Mesh, *, zero: int, offload: str | None, precision: str, grad_clip: float | None,
                   fuse: bool | None, optimizer: Any) -> tuple[str, str | None]:
    """How this plan's training step runs, and why not more of it in the graph. [compiler]

    ``("program", None)``: forward, backward, reduction and update as one step program.
    ``("host-update", why)``: the step program ends at the reduced gradients and the optimizer steps on
    the host: CPU offload, or an optimizer with no in-graph update (over ZeRO's flat masters where ZeRO
    manages the plan: zero > 0, bf16/fp16, offload or grad_clip; else over the parameters themselves).
    ``("interpreted", why)``: the eager executor. ``AUTOSHARD_EXECUTOR=interpreted`` forces it for any plan.
    """
    import os

    forced = os.environ.get("AUTOSHARD_EXECUTOR", "auto").strip().lower()
    if forced == "interpreted":
        return "interpreted", "AUTOSHARD_EXECUTOR=interpreted"
    checks = [
        (mesh.virtual, "a virtual mesh has no processes to run it"),
        (optimizer is None, "no optimizer (forward only)"),
        (mesh.size("pp") > 1, "pipeline stages are not cut from the joint graph yet"),
        (mesh.size("ep") > 1, "expert parallelism is not in the step program yet"),
        (bool(fuse), "fuse=True asks for autoshard's own kernels, launched by the interpreted executor"),
    ]
    for bad, why in checks:
        if bad:
            return "interpreted", why
    if _compressing(optimizer):
        return "host-update", "1-bit Adam averages compressed momenta itself after its warm-up"
    if offload is not None:
        return "host-update", "offload='optimizer': the optimizer steps in host memory"
    from autoshard.passes.optimizer import Unsupported, optimizer_spec

    try:
        probe = torch.nn.Parameter(torch.zeros(1, device=mesh.device))
        optimizer_spec(optimizer([probe]), [probe])
    except Unsupported as e:  # the user's optimizer steps on the host: over ZeRO's flat masters where ZeRO
        return "host-update", f"{e}; it steps on the host"  # manages the plan, else over the parameters
    except Exception:  # noqa: BLE001 - a factory that cannot take one probe parameter
        return "interpreted", "the optimizer factory could not be probed"
    return "program", None


def _compressing(factory) -> bool:
    """[comm] Whether ``factory`` builds an optimizer that averages compressed momenta itself (1-bit
    Adam). ZeRO must know before it lays out its buckets, so the factory is called once on a
    one-element probe parameter (a factory that cannot take it is taken for an ordinary optimizer)."""
    try:
        probe = factory([torch.nn.Parameter(torch.zeros(1))])
    except Exception:  # noqa: BLE001 - e.g. a factory that splits the list into param groups
        return False
    return hasattr(probe, "bind_data_parallel")


def _has_attr(root: torch.nn.Module, target: str) -> bool:
    try:
        _get_attr(root, target)
    except AttributeError:
        return False
    return True


def _get_attr(gm: torch.nn.Module, target: str):
    obj = gm
    for p in target.split("."):
        obj = getattr(obj, p)
    return obj


def _check_output_is_loss(gm: GraphModule) -> None:
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    vals = [a.meta.get("val") for a in out_node.all_input_nodes]
    spec = getattr(gm, "_out_spec", None)
    ctx = getattr(spec, "context", None)
    keys = list(ctx) if isinstance(ctx, (list, tuple)) else []
    if "loss" in keys:
        return
    if len(vals) == 1 and isinstance(vals[0], torch.Tensor) and vals[0].dim() == 0:
        return
    kind = getattr(spec, "type", None)
    raise PlanError(
        f"loss_fn is None but the model's output ({getattr(kind, '__name__', kind)} with "
        f"{len(vals)} tensor(s){', keys ' + str(keys) if keys else ''}) is not a scalar loss and has no "
        "'loss' field: pass loss_fn=lambda out, target: ..., or give the model its labels"
    )
