"""``autoshard bench``: autoshard and the systems people would use instead, side by side in one run.

One job (``torchrun``, or ``autoshard bench --nproc N`` which starts the ranks itself) trains the
same model on the same data, with the same precision (bf16 on GPUs, fp32 on CPU) and optimizer
(AdamW), under each *system* in turn and reports tokens/s/GPU, MFU and peak memory:

=================  =========================================================================
system             what runs
=================  =========================================================================
``eager``          the unmodified model on one GPU (bf16 autocast); only with one rank
``compile``        the same, ``torch.compile``'d
``ddp``            ``DistributedDataParallel`` (bf16 autocast)
``ddp_compile``    ``torch.compile`` of the DDP-wrapped model
``fsdp2``          ``fully_shard`` on each block and the root, bf16 ``MixedPrecisionPolicy``
``fsdp2_compile``  the same with each block ``torch.compile``'d first (as torchtitan does)
``tp``             DTensor tensor parallelism (``parallelize_module``: column/row linears, head-
                   sharded attention, column-parallel LM head) over every rank
``tp_compile``     the same with each block ``torch.compile``'d
``autoshard``      ``autoshard(model, Mesh.auto())``: the planner's choice
``autoshard:K=V``  a named plan, e.g. ``autoshard:zero=3`` or ``autoshard:tp=4`` or
                   ``autoshard:dp=2,tp=2,zero=1`` (keys: dp tp pp ep zero offload microbatches
                   schedule prefetch fuse attention checkpoint); dp defaults to what the other
                   degrees leave; ``checkpoint=all`` or ``=K`` recomputes blocks in backward
=================  =========================================================================

Every system sees the global batch of ``batch × world`` sequences of one step: data-parallel
systems give each rank ``batch`` of them, tensor-parallel ones give every rank all of them. The
first step's loss (the mean over the global batch, before any update) is recorded for each
system, so a table whose losses disagree shows a system that does not compute the same function.
Timing: warm-up steps (more for compiled systems), then the median of timed steps, each ended by
a device synchronisation, ranks aligned before the first. MFU = tokens/s/GPU × (6N + 12·L·d·seq)
/ 989 TFLOP/s (dense bf16 peak of an H100/H200; N counts the parameters a token uses, so an MoE
model counts ``top_k`` of its experts). ``--profile`` records where a step's device time goes.

Records (``--results FILE`` appends them to a JSON list) have the keys ``date, device, torch,
commit, model, system, plan, tok_s_gpu, mfu, peak_gib`` plus ``gpus, batch, seq, step_s,
loss_step1, params`` and, with ``--profile``, ``profile``. ``plot()`` draws a results file as
a PNG; ``report()`` prints it as a Markdown table (the README's).

Why this module is long: every peer system's set-up, the timing loop, the profiler breakdown and
the report/plot writers must live in one module so one job measures them side by side.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import math
import os
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

PEAK_FLOPS = 989e12  # dense bf16, H100/H200 SXM: the MFU denominator
PEERS = ("eager", "compile", "ddp", "ddp_compile", "fsdp2", "fsdp2_compile", "tp", "tp_compile")
PLAN_KEYS = ("dp", "tp", "pp", "ep", "zero", "offload", "microbatches", "schedule", "prefetch", "fuse", "attention",
             "checkpoint")

# name → (architecture, sizes, sequences per GPU, sequence length)
MODELS: dict[str, dict[str, Any]] = {
    "953m": {"arch": "llama", "d_model": 2048, "n_layers": 16, "n_heads": 16, "ffn": 5632, "vocab": 32000,
             "seq": 2048, "batch": 4},
    "6.7b": {"arch": "llama", "d_model": 4096, "n_layers": 32, "n_heads": 32, "ffn": 11008, "vocab": 32000,
             "seq": 2048, "batch": 2},
    "moe": {"arch": "moe", "d_model": 1024, "n_layers": 8, "n_heads": 16, "ffn": 2816, "vocab": 32000,
            "seq": 1024, "batch": 8, "experts": 8, "top_k": 2},
    # unmodified Hugging Face transformers models built from a config (random weights, no download)
    "hf-llama-953m": {"arch": "hf-llama", "d_model": 2048, "n_layers": 16, "n_heads": 16, "ffn": 5632,
                      "vocab": 32000, "seq": 2048, "batch": 4},
    "hf-llama-8b": {"arch": "hf-llama", "d_model": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8,
                    "ffn": 14336, "vocab": 128256, "seq": 2048, "batch": 1},
    "hf-llama-tiny": {"arch": "hf-llama", "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn": 128,
                      "vocab": 256, "seq": 32, "batch": 2},
    "tiny": {"arch": "llama", "d_model": 64, "n_layers": 2, "n_heads": 4, "ffn": 128, "vocab": 256,
             "seq": 32, "batch": 2},
    "tiny-moe": {"arch": "moe", "d_model": 32, "n_layers": 2, "n_heads": 4, "ffn": 64, "vocab": 128,
                 "seq": 16, "batch": 2, "experts": 4, "top_k": 2},
}


class BenchError(ValueError):
    """A benchmark request that cannot run (unknown system or model, a degree that does not divide)."""


@dataclass
class BenchConfig:
    """What one ``autoshard bench`` run measures."""

    model: str = "953m"
    systems: list[str] = field(default_factory=list)  # empty: the defaults for the world size and device
    batch: int | None = None  # sequences per GPU (default: the model's)
    seq: int | None = None
    warmup: int = 2
    iters: int = 6
    device: str | None = None  # "cuda" | "cpu"; default cuda when available
    profile: bool = False
    commit: str | None = None
    results: str | None = None  # rank 0 appends each system's record here as soon as it is measured


def default_systems(world: int, device: str, arch: str) -> list[str]:
    """Every peer that applies, then autoshard's automatic plan and the named plans worth comparing."""
    compiled = device == "cuda"  # inductor on CPU needs a C++ toolchain and minutes per system
    if world == 1:
        out = ["eager"] + (["compile"] if compiled else []) + ["autoshard"]
        return out
    out = ["ddp"] + (["ddp_compile"] if compiled else []) + ["fsdp2"] + (["fsdp2_compile"] if compiled else [])
    if arch == "llama":
        out += ["tp_compile"] if compiled else ["tp"]
    out += ["autoshard", "autoshard:zero=1", "autoshard:zero=3"]
    if arch == "llama":
        out += [f"autoshard:tp={world}"]
    if arch == "moe":
        out += [f"autoshard:ep={world}"]
    return out


def _split_top(text: str) -> list[str]:
    """Split on commas outside parentheses (``attention=block_sparse(block=64,local=4)`` stays whole)."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def split_systems(text: str) -> list[str]:
    """``"ddp,autoshard:dp=2,tp=2,fsdp2"`` → ["ddp", "autoshard:dp=2,tp=2", "fsdp2"]: a KEY=VALUE after a
    comma continues the autoshard plan before it."""
    out: list[str] = []
    for tok in (t.strip() for t in _split_top(text)):
        if not tok:
            continue
        if "=" in tok and ":" not in tok and out and out[-1].startswith("autoshard:"):
            out[-1] += "," + tok
        else:
            out.append(tok)
    return out


def parse_system(spec: str, world: int) -> tuple[str, dict[str, Any]]:
    """``"fsdp2"`` → ("fsdp2", {}); ``"autoshard:tp=2,zero=1"`` → ("autoshard", {"tp": 2, "zero": 1, "dp": ...})."""
    spec = spec.strip()
    if spec in PEERS:
        return spec, {}
    if spec == "autoshard":
        return "autoshard", {}
    if not spec.startswith("autoshard:"):
        raise BenchError(f"unknown system {spec!r}: choose from {', '.join(PEERS)}, autoshard, autoshard:K=V,...")
    opts: dict[str, Any] = {}
    for part in _split_top(spec.split(":", 1)[1]):
        if not part:
            continue
        if "=" not in part:
            raise BenchError(f"{spec!r}: {part!r} is not KEY=VALUE")
        k, v = (s.strip() for s in part.split("=", 1))
        if k not in PLAN_KEYS:
            raise BenchError(f"{spec!r}: unknown key {k!r} (keys: {', '.join(PLAN_KEYS)})")
        if k in ("offload", "schedule", "attention"):
            opts[k] = None if v in ("none", "None") else v
        elif k == "checkpoint" and not v.isdigit():
            opts[k] = None if v in ("none", "None") else v  # "all"
        elif k == "fuse":
            opts[k] = v.lower() in ("1", "true", "yes", "on")
        else:
            try:
                opts[k] = int(v)
            except ValueError as e:
                raise BenchError(f"{spec!r}: {k}={v!r} is not an integer") from e
    rest = opts.get("tp", 1) * opts.get("pp", 1) * opts.get("ep", 1)
    if world % rest:
        raise BenchError(f"{spec!r}: tp·pp·ep = {rest} does not divide the {world} ranks")
    opts.setdefault("dp", world // rest)
    if opts["dp"] * rest != world:
        raise BenchError(f"{spec!r}: dp·tp·pp·ep = {opts['dp'] * rest} but there are {world} ranks")
    return "autoshard", opts


# ====================================================================================== models
def build_model(name: str, overrides: dict[str, Any] | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The named model (seeded, so every rank and system starts from the same weights) and its sizes."""
    if name not in MODELS:
        raise BenchError(f"unknown model {name!r}: choose from {', '.join(MODELS)}")
    spec = {**MODELS[name], **{k: v for k, v in (overrides or {}).items() if v is not None}}
    torch.manual_seed(0)
    if spec["arch"] == "llama":
        from autoshard.examples.llama import Llama, LlamaConfig

        model: torch.nn.Module = Llama(LlamaConfig(
            vocab_size=spec["vocab"], d_model=spec["d_model"], n_layers=spec["n_layers"], n_heads=spec["n_heads"],
            n_kv_heads=spec["n_heads"], ffn=spec["ffn"], seq_len=spec["seq"]))
    elif spec["arch"] == "hf-llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=spec["vocab"], hidden_size=spec["d_model"], intermediate_size=spec["ffn"],
            num_hidden_layers=spec["n_layers"], num_attention_heads=spec["n_heads"],
            num_key_value_heads=spec.get("n_kv_heads", spec["n_heads"]), max_position_embeddings=spec["seq"],
            use_cache=False, tie_word_embeddings=False, attn_implementation="sdpa"))
    else:
        from autoshard.examples.moe_gpt import MoEGPT, MoEGPTConfig

        model = MoEGPT(MoEGPTConfig(vocab_size=spec["vocab"], seq_len=spec["seq"], d_model=spec["d_model"],
                                    n_layers=spec["n_layers"], n_heads=spec["n_heads"], d_ff=spec["ffn"],
                                    n_experts=spec["experts"], top_k=spec["top_k"]))
    total = sum(p.numel() for p in model.parameters())
    active = total
    if spec["arch"] == "moe":  # a token runs top_k of the experts
        experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
        active = total - experts + experts * spec["top_k"] // spec["experts"]
    spec["params"] = total
    spec["active_params"] = active
    spec["flops_per_token"] = 6 * active + 12 * spec["n_layers"] * spec["d_model"] * spec["seq"]
    return model, spec


def blocks_of(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's repeated blocks: its first ``ModuleList`` (at any depth) with more than one entry."""
    for _, child in model.named_modules():
        if isinstance(child, torch.nn.ModuleList) and len(child) > 1:
            return child
    raise BenchError(f"{type(model).__name__} has no ModuleList of blocks to wrap")


def lm_loss(logits: Any, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32 (the loss every system trains on); takes the logits or a
    Hugging Face output that has them."""
    logits = getattr(logits, "logits", logits)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


# ====================================================================================== timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], object], warmup: int, iters: int, device: torch.device | None = None) -> float:
    """Median seconds of ``step`` after ``warmup`` calls, device-synchronised, ranks aligned first."""
    device = device or (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                        else torch.device("cpu"))
    for _ in range(warmup):
        step()
    _sync(device)
    if dist.is_initialized():
        dist.barrier()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


_CATEGORIES = (  # first match wins; names of device kernels (CUDA) or of aten ops (CPU)
    ("communication", re.compile(r"nccl|gloo|all_?reduce|all_?gather|reduce_?scatter|all_?to_?all|broadcast|"
                                 r"c10d|record_param_comms", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|sdpa|block_sparse", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|cublas|sm90_xmma|sm80_xmma|nvjet|aten::(mm|addmm|bmm|matmul|linear)\b",
                          re.I)),
    ("fused (triton)", re.compile(r"triton", re.I)),
)


# autoshard's own Triton kernels (runtime/kernels), named after their module; block-sparse attention
# counts as attention
OUR_KERNELS = ("pointwise_", "rmsnorm_", "layernorm_", "softmax_", "rotary_", "swiglu_", "cross_entropy_",
               "adamw")


def classify(name: str) -> str:
    """The category of a kernel or op name: communication, attention, matmul, fused (triton), other."""
    if name.startswith(OUR_KERNELS):
        return "fused (triton)"
    for cat, pat in _CATEGORIES:
        if pat.search(name):
            return cat
    return "other"


def breakdown(events: list[tuple[str, float, float]], steps: int, wall_s: float) -> dict[str, float]:
    """Where ``steps`` steps' time went, per step in ms, from (name, start_us, end_us) device events.

    Each category's sum of kernel time (categories may overlap in time: communication runs beside
    compute), ``busy`` (the union of all kernels' intervals) and ``idle`` (wall time with no kernel
    running: launch overhead, host work, waits).
    """
    out: dict[str, float] = {}
    for name, s, e in events:
        cat = classify(name)
        out[cat] = out.get(cat, 0.0) + (e - s)
    busy, last = 0.0, -math.inf
    for _, s, e in sorted(events, key=lambda t: t[1]):
        if e <= last:
            continue
        busy += e - max(s, last)
        last = e
    res = {f"{k}_ms": v / 1e3 / steps for k, v in sorted(out.items())}
    res["step_ms"] = wall_s * 1e3 / steps
    res["busy_ms"] = busy / 1e3 / steps
    res["idle_ms"] = max(res["step_ms"] - res["busy_ms"], 0.0)
    return res


def profile_steps(step: Callable[[], object], device: torch.device, steps: int = 2) -> dict[str, float]:
    """Run ``steps`` steps under ``torch.profiler`` and return :func:`breakdown` of their device time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        wall = time.perf_counter() - t0
    def counted(ev) -> bool:  # on CPU: aten ops and communication, each counted once (not its sub-ops)
        return ev.name.startswith("aten::") or classify(ev.name) == "communication"

    events = []
    for ev in prof.events():
        if device.type == "cuda":
            if ev.device_type != torch.autograd.DeviceType.CUDA:
                continue
        else:
            if not counted(ev):
                continue
            parent = ev.cpu_parent
            while parent is not None and not counted(parent):
                parent = parent.cpu_parent
            if parent is not None:
                continue
        events.append((ev.name, float(ev.time_range.start), float(ev.time_range.end)))
    return breakdown(events, steps, wall)


# ====================================================================================== systems
@dataclass
class _Ctx:
    world: int
    rank: int
    device: torch.device
    bf16: bool
    spec: dict[str, Any]
    model_name: str
    base: torch.nn.Module
    batch: int  # sequences per GPU
    seq: int
    x_global: torch.Tensor

    def local_batch(self, parts: int, index: int) -> torch.Tensor:
        rows = self.x_global.shape[0] // parts
        return self.x_global[index * rows:(index + 1) * rows]

    def fresh(self) -> torch.nn.Module:
        """A copy of the base model on the device, built on the meta device (no second initialisation)."""
        with torch.device("meta"):
            m, _ = build_model(self.model_name, self.overrides)
        m = m.to_empty(device=self.device)
        m.load_state_dict(self.base.state_dict())
        for name, buf in self.base.named_buffers():  # non-persistent buffers are not in the state dict
            owner, _, attr = name.rpartition(".")
            getattr(m.get_submodule(owner), attr).copy_(buf) if owner else getattr(m, attr).copy_(buf)
        return m

    overrides: dict[str, Any] = field(default_factory=dict)


def _adamw(params, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda", foreach=None if device.type == "cuda"
                             else True)


def _mean_over_ranks(value: float, device: torch.device) -> float:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def _autocast(ctx: _Ctx):
    import contextlib

    if ctx.bf16:
        return torch.autocast(ctx.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _peer_step(ctx: _Ctx, model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
               autocast: bool = True) -> Callable[[], torch.Tensor]:
    def step() -> torch.Tensor:
        if autocast:
            with _autocast(ctx):
                out = model(x)
        else:
            out = model(x)
        loss = lm_loss(out, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _setup_peer(ctx: _Ctx, name: str) -> tuple[Callable[[], torch.Tensor], str, bool]:
    """(step function returning the local loss, plan description, whether the loss is already global)."""
    x_dp = ctx.local_batch(ctx.world, ctx.rank).to(ctx.device)
    if name in ("eager", "compile"):
        if ctx.world != 1:
            raise BenchError(f"{name!r} runs the model on one rank; with {ctx.world} ranks use ddp or fsdp2")
        model = ctx.fresh()
        if name == "compile":
            model = torch.compile(model)
        return _peer_step(ctx, model, _adamw(model.parameters(), ctx.device), x_dp), "1 GPU", True
    if name in ("ddp", "ddp_compile"):
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = ctx.fresh()
        ddp = DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        run = torch.compile(ddp) if name == "ddp_compile" else ddp
        return _peer_step(ctx, run, _adamw(ddp.parameters(), ctx.device), x_dp), f"dp={ctx.world}", False
    if name in ("fsdp2", "fsdp2_compile"):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        model = ctx.fresh()
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if ctx.bf16 else None, reduce_dtype=torch.float32)
        blocks = blocks_of(model)
        for i, block in enumerate(blocks):
            if name == "fsdp2_compile":
                block.compile()
            fully_shard(block, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
        fully_shard(model, mp_policy=mp)
        step = _peer_step(ctx, model, _adamw(model.parameters(), ctx.device), x_dp, autocast=False)
        return step, f"dp={ctx.world} (sharded params, grads, optimizer)", False
    if name in ("tp", "tp_compile"):
        return _setup_dtensor_tp(ctx, compile_blocks=name == "tp_compile")
    raise BenchError(f"unknown peer {name!r}")


def _setup_dtensor_tp(ctx: _Ctx, compile_blocks: bool) -> tuple[Callable[[], torch.Tensor], str, bool]:
    """Megatron-style TP with DTensor, as a user of ``parallelize_module`` writes it for a Llama model."""
    import dataclasses

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    if ctx.spec["arch"] != "llama":
        raise BenchError("the DTensor TP peer is written for the Llama-style models")
    tp = ctx.world
    if ctx.spec["n_heads"] % tp:
        raise BenchError(f"{ctx.spec['n_heads']} heads do not split over tp={tp}")
    model = ctx.fresh()
    mesh = init_device_mesh(ctx.device.type, (tp,))
    for block in blocks_of(model):
        parallelize_module(block, mesh, {
            "attn.q_proj": ColwiseParallel(), "attn.k_proj": ColwiseParallel(), "attn.v_proj": ColwiseParallel(),
            "attn.o_proj": RowwiseParallel(), "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel()})
        c = block.attn.cfg  # the module reads its head counts from its config: give it the local ones
        block.attn.cfg = dataclasses.replace(c, d_model=c.d_model // tp, n_heads=c.n_heads // tp,
                                             n_kv_heads=c.n_kv_heads // tp)
        if compile_blocks:
            block.compile()
    parallelize_module(model, mesh, {"lm_head": ColwiseParallel(output_layouts=Replicate())})
    x = ctx.x_global.to(ctx.device)  # every rank runs the whole global batch
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())  # fused/foreach AdamW cannot mix DTensors and plain tensors in one call
    opt = _Optimizers([_adamw(group, ctx.device) for group in (
        [p for p in params if isinstance(p, DTensor)], [p for p in params if not isinstance(p, DTensor)]) if group])
    step = _peer_step(ctx, model, opt, x)
    return step, f"tp={tp}", True


class _Optimizers:
    """Several optimizers stepped as one (the DTensor TP peer's sharded and replicated parameters)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)


def _setup_autoshard(ctx: _Ctx, opts: dict[str, Any]):
    import autoshard

    kwargs = {k: opts[k] for k in ("zero", "offload", "microbatches", "schedule", "prefetch", "fuse", "attention")
              if k in opts}
    if "checkpoint" in opts:
        kwargs["activation_checkpointing"] = opts["checkpoint"]
    choices = autoshard.Choices(precision="bf16" if ctx.bf16 else "fp32", **kwargs)  # what autoshard() fills
    optimizer = lambda ps: _adamw(ps, ctx.device)  # noqa: E731
    if not opts:  # the planner's choice, for the global batch
        mesh_req = autoshard.Mesh.auto(device=ctx.device.type)
        sm = autoshard.build(ctx.base, mesh_req, (ctx.x_global,), loss_fn=lm_loss, optimizer=optimizer, choices=choices)
    else:
        mesh = autoshard.Mesh(dp=opts["dp"], tp=opts.get("tp", 1), pp=opts.get("pp", 1), ep=opts.get("ep", 1),
                              device=ctx.device.type)
        x0 = ctx.local_batch(mesh.data_size, mesh.data_rank)
        sm = autoshard.build(ctx.base, mesh, (x0,), loss_fn=lm_loss, optimizer=optimizer, choices=choices)
    x = ctx.local_batch(sm.mesh.data_size, sm.mesh.data_rank).to(ctx.device)
    step = lambda: torch.tensor(sm.train_step((x,), x))  # noqa: E731 - the global mean loss
    return step, describe_plan(sm), sm


def describe_plan(sm: Any) -> str:
    """One line: mesh degrees above 1, ZeRO stage, offload, micro-batches, fused regions."""
    p = sm.plan
    parts = [f"{k}={v}" for k, v in p.mesh.items() if v > 1] or ["1 GPU"]
    z = p.zero or {}
    if z.get("stage"):
        parts.append(f"zero={z['stage']}")
    if z.get("offload"):
        parts.append(f"offload={z['offload']}")
    if p.pipeline:
        parts.append(f"m={p.pipeline.get('microbatches')} {p.pipeline.get('schedule')}")
    if p.fusions:
        parts.append(f"{len(p.fusions.get('regions', []))} fused")
    if p.checkpointing:
        parts.append(f"checkpoint {sum(map(len, p.checkpointing['stages']))} blocks")
    if p.attention and p.attention.get("replaced"):
        density = p.attention["replaced"][0]["density"]
        parts.append(f"block-sparse attention ({100 * density:.1f}% of blocks)")
    if getattr(sm, "executor", "") == "step-program":
        parts.append("step program")
    return " ".join(parts)


def _commit(given: str | None) -> str:
    if given:
        return given
    if os.environ.get("AUTOSHARD_COMMIT"):
        return os.environ["AUTOSHARD_COMMIT"]
    try:
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, Gloo)"


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_rank(cfg: BenchConfig) -> list[dict[str, Any]] | None:
    """One rank's part of a benchmark run (inside torchrun or :func:`autoshard.launch`).

    Returns the records on rank 0, None elsewhere. A system that fails (out of memory, an error)
    is recorded with its error and the run goes on with the next.
    """
    if cfg.device is None:
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
        world_hint = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_hint))  # ranks share the cores
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=_dt.timedelta(minutes=10))
    world, rank = dist.get_world_size(), dist.get_rank()
    base, spec = build_model(cfg.model, {"batch": cfg.batch, "seq": cfg.seq})
    batch, seq = spec["batch"], spec["seq"]
    g = torch.Generator().manual_seed(1)
    x_global = torch.randint(0, spec["vocab"], (batch * world, seq), generator=g)
    ctx = _Ctx(world, rank, device, device.type == "cuda", spec, cfg.model, base, batch, seq, x_global,
               overrides={"batch": cfg.batch, "seq": cfg.seq})
    systems = cfg.systems or default_systems(world, device.type, spec["arch"])
    parsed = [(s, *parse_system(s, world)) for s in systems]  # all bad names fail before anything runs
    peak_flops = PEAK_FLOPS if device.type == "cuda" else _cpu_peak()
    common = {"date": _dt.date.today().isoformat(), "device": _device_name(device), "torch": torch.__version__,
              "commit": _commit(cfg.commit), "model": cfg.model, "gpus": world, "batch": batch, "seq": seq,
              "params": spec["params"]}
    records: list[dict[str, Any]] = []
    for label, kind, opts in parsed:
        _free(device)
        rec: dict[str, Any] = {**common, "system": label, "plan": "", "tok_s_gpu": None, "mfu": None,
                               "peak_gib": None, "step_s": None, "loss_step1": None}
        sm = None
        try:
            t_setup = time.perf_counter()
            if kind == "autoshard":
                step, rec["plan"], sm = _setup_autoshard(ctx, opts)
                is_global = True
            else:
                step, rec["plan"], is_global = _setup_peer(ctx, kind)
            first = float(step())  # the first warm-up step: its loss is the same function on every system
            rec["first_step_s"] = time.perf_counter() - t_setup  # capture + plan + compile + one step
            rec["loss_step1"] = first if is_global else _mean_over_ranks(first, device)
            warm = cfg.warmup + (2 if "compile" in kind else 0)  # compiled systems recompile once more
            t = timed(step, max(warm - 1, 0), cfg.iters, device)
            t = _mean_over_ranks(t, device) if world > 1 else t  # one number for the job
            tok = batch * seq / t
            rec.update(step_s=t, tok_s_gpu=tok, mfu=tok * spec["flops_per_token"] / peak_flops)
            if device.type == "cuda":
                peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30], device=device)
                dist.all_reduce(peak, op=dist.ReduceOp.MAX)
                rec["peak_gib"] = float(peak)
            if sm is not None:  # the plan's memory prediction next to the measured peak; the first step by phase
                rec["predicted_peak_gib"] = sm.predicted_peak_bytes()["device"] / 2**30
                rec["setup_s"] = {k: round(v, 2) for k, v in sm.setup_times().items()}
            if cfg.profile:
                rec["profile"] = profile_steps(step, device)
        except Exception as e:  # noqa: BLE001 - recorded, the next system still runs
            import traceback

            rec["error"] = _short_error(e)
            rec["traceback"] = "".join(traceback.format_exception(e))[-6000:]  # in the results file, for a report
        finally:
            if sm is not None:
                sm.close()
            step = None  # noqa: F841 - drop the model and optimizer before the next system
        _free(device)
        if rank == 0:
            _print_row(rec)
            if cfg.results:  # at once: a job stopped later keeps what it measured
                append_results(cfg.results, [rec])
        records.append(rec)
    return records if rank == 0 else None


def _cpu_peak() -> float:
    from autoshard.runtime.hardware import get_profile

    return get_profile("cpu").peak_tflops * 1e12


def _short_error(e: BaseException) -> str:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return "out of memory"
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return text[:300]


def _print_row(r: dict[str, Any]) -> None:
    if r.get("error"):
        print(f"{r['system']:28s} failed: {r['error']}", flush=True)
        return
    peak = f"{r['peak_gib']:6.2f} GiB" if r["peak_gib"] is not None else "     -    "
    if on_cpu([r]):  # MFU is counted against a GPU's peak: meaningless here
        rate = f"{r['tok_s_gpu']:11,.0f} tok/s/rank"
    else:
        rate = f"{r['tok_s_gpu']:11,.0f} tok/s/GPU  MFU {100 * r['mfu']:5.1f}%"
    print(f"{r['system']:28s} {rate}  peak {peak}  step {r['step_s'] * 1e3:8.1f} ms  loss@1 {r['loss_step1']:.6f}  "
          f"[{r['plan']}]", flush=True)
    if r.get("first_step_s") is not None:
        phases = ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.1f}" for k, v in r.get("setup_s", {}).items())
        print(f"{'':28s} first step {r['first_step_s']:.1f} s" + (f" ({phases} s)" if phases else ""), flush=True)


# ====================================================================================== tables and plots
def is_peer(system: str) -> bool:
    return not system.startswith("autoshard")


def on_cpu(records: list[dict[str, Any]]) -> bool:
    """Records of CPU ranks (Gloo): they show that each system runs and computes the same function; their
    rates, taken on a shared CPU, are not performance figures and say nothing about GPUs."""
    return bool(records) and all(str(r.get("device", "")).startswith("cpu") for r in records)


CPU_NOTE = ("CPU ranks (Gloo): these figures show that every system runs and computes the same function; "
            "they are not performance figures (a shared CPU, no GPU kernels), so no system is ranked")


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Best peer and best autoshard system of one run, and their ratio (the issue's goal is ≥ 1.10)."""
    ok = [r for r in records if r.get("tok_s_gpu")]
    peers = [r for r in ok if is_peer(r["system"])]
    ours = [r for r in ok if not is_peer(r["system"])]
    best_peer = max(peers, key=lambda r: r["tok_s_gpu"], default=None)
    best_ours = max(ours, key=lambda r: r["tok_s_gpu"], default=None)
    ratio = best_ours["tok_s_gpu"] / best_peer["tok_s_gpu"] if best_peer and best_ours else None
    losses = [r["loss_step1"] for r in ok if r.get("loss_step1") is not None]
    spread = (max(losses) - min(losses)) / max(abs(statistics.median(losses)), 1e-12) if losses else 0.0
    return {"best_peer": best_peer and best_peer["system"], "best_autoshard": best_ours and best_ours["system"],
            "ratio": ratio, "loss_spread": spread}


def loss_tolerance(records: list[dict[str, Any]]) -> float:
    """How far first-step losses may differ between systems: fp32 on CPU computes the same sums in
    another order (1e-5); bf16 rounds each system's matmuls differently (2e-2)."""
    return 1e-5 if on_cpu(records) else 2e-2


def peer_best(records: list[dict[str, Any]]) -> dict[tuple, float]:
    """The best peer's tokens/s/GPU of each job (see :func:`job`)."""
    best: dict[tuple, float] = {}
    for r in records:
        if r.get("tok_s_gpu") and is_peer(r["system"]):
            best[job(r)] = max(best.get(job(r), 0.0), r["tok_s_gpu"])
    return best


def table(records: list[dict[str, Any]], markdown: bool = False, best_of: dict[tuple, float] | None = None) -> str:
    """The records as a table (rich text, or Markdown), with each system's ratio to the best peer of the
    same job (timings compare only within one job on one machine; no peer in its job: no ratio)."""
    best_of = peer_best(records) if best_of is None else best_of
    head = ["system", "plan", "tok/s/GPU", "MFU", "peak GiB", "× best peer", "loss@1"]
    cpu = on_cpu(records)  # CPU rates are not performance figures: no MFU, no ratio, per rank
    if cpu:
        head = ["system", "plan", "tok/s/rank", "peak GiB", "loss@1"]
    rows = []
    for r in records:
        if r.get("error"):
            rows.append([r["system"], r.get("plan", ""), f"failed: {r['error'][:80]}", *[""] * (len(head) - 3)])
            continue
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        if cpu:
            rows.append([r["system"], r["plan"], f"{r['tok_s_gpu']:,.0f}", peak, f"{r['loss_step1']:.5f}"])
            continue
        best = best_of.get(job(r))
        rows.append([r["system"], r["plan"], f"{r['tok_s_gpu']:,.0f}", f"{100 * r['mfu']:.1f}%", peak,
                     f"{r['tok_s_gpu'] / best:.2f}" if best else "-", f"{r['loss_step1']:.5f}"])
    if markdown:  # with each row's commit: a report may join runs of several commits
        head = [*head, "commit"]
        rows = [[*row, r.get("commit", "")] for row, r in zip(rows, records)]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        return "\n".join(lines)
    from rich.console import Console
    from rich.table import Table

    t = Table(*head)
    for row in rows:
        t.add_row(*row)
    con = Console(width=200, record=True, no_color=True)
    with con.capture() as cap:
        con.print(t)
    return cap.get()


def profile_table(records: list[dict[str, Any]]) -> str:
    """Where each profiled system's step goes (ms per step): device time by category, busy and idle."""
    rows = [r for r in records if r.get("profile")]
    cats = sorted({k[:-3] for r in rows for k in r["profile"]} - {"step", "busy", "idle"})
    head = ["system", "step", *cats, "busy", "idle"]
    lines = ["  ".join(f"{h:>14s}" if i else f"{h:28s}" for i, h in enumerate(head))]
    for r in rows:
        p = r["profile"]
        vals = [p["step_ms"], *(p.get(f"{c}_ms", 0.0) for c in cats), p["busy_ms"], p["idle_ms"]]
        lines.append(f"{r['system']:28s}  " + "  ".join(f"{v:14.1f}" for v in vals))
    return "\n".join(lines)


def load_results(path: str) -> list[dict[str, Any]]:
    """A results file: a JSON list of records (an absent file is an empty list)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise BenchError(f"{path} is not a list of benchmark records")
    return data


def append_results(path: str, records: list[dict[str, Any]]) -> None:
    """Append ``records`` to the JSON list at ``path``, atomically (temp file + rename)."""
    data = load_results(path) + records
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def job(r: dict[str, Any]) -> tuple:
    """The job a record came from, as far as records tell: its date and commit (one job per machine)."""
    return r.get("date"), r.get("commit")


def _group(r: dict[str, Any]) -> tuple[str, int, str, int]:
    return r["model"], int(r.get("gpus", 1)), r["device"], int(r.get("seq") or 0)


def latest_runs(records: list[dict[str, Any]]) -> dict[tuple[str, int, str, int], list[dict[str, Any]]]:
    """The newest record of each system, grouped by (model, gpus, device, seq); later records win."""
    groups: dict[tuple[str, int, str, int], dict[str, dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(_group(r), {})[r["system"]] = r
    return {k: list(v.values()) for k, v in groups.items()}


def _title(model: str, gpus: int, device: str, seq: int) -> str:
    return f"{model}{f', seq {seq}' if seq else ''}, {gpus} × {device}"


def report(records: list[dict[str, Any]]) -> str:
    """Markdown: one table per (model, GPUs, device) with the latest figure of each system."""
    out = []
    order = {id(r): i for i, r in enumerate(records)}  # later in the file = later run
    for key, rows in sorted(latest_runs(records).items()):
        dates = sorted({r["date"] for r in rows})
        head = f"**{_title(*key)}**, torch {rows[-1]['torch']}, {' to '.join(dict.fromkeys((dates[0], dates[-1])))}"
        every = [r for r in records if _group(r) == key]  # older records too: a job's own peer may be superseded
        jobs = [[r for r in every if job(r) == j] for j in dict.fromkeys(job(r) for r in every)]
        both = [js for js in jobs if summarize(js)["ratio"]]  # jobs that ran a peer and autoshard
        if both and not on_cpu(rows):
            newest = max(both, key=lambda js: max(order[id(r)] for r in js))
            s = summarize(newest)
            head += (f": best autoshard ({s['best_autoshard']}) = {s['ratio']:.2f}× the best peer ({s['best_peer']}) "
                     f"in the job of {newest[0]['date']} at {newest[0].get('commit', '?')}")
        out += [head, ""]
        if on_cpu(rows):
            out += [f"({CPU_NOTE}.)", ""]
        out += [table(rows, markdown=True, best_of=peer_best([r for r in records if _group(r) == key])), ""]
    return "\n".join(out)


def plot(records: list[dict[str, Any]], path: str) -> str:
    """A PNG of tokens/s/GPU and peak memory per system, one row of panels per (model, GPUs, device)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise BenchError("plotting needs matplotlib: pip install 'autoshard[bench]'") from e
    groups = sorted(latest_runs(records).items())
    if not groups:
        raise BenchError("no records to plot")
    groups = [(key, [r for r in rows if r.get("tok_s_gpu")]) for key, rows in groups]
    # a memory panel only where some record measured memory (CPU ranks have no device memory counter)
    cols = 2 if any(r.get("peak_gib") for _, rows in groups for r in rows) else 1
    fig, axes = plt.subplots(len(groups), cols, figsize=(7 * cols, 3.2 * len(groups) + 0.6), squeeze=False)
    for i, (key, rows) in enumerate(groups):
        names = [r["system"] for r in rows]
        colors = ["#c44e52" if not is_peer(n) else "#4c72b0" for n in names]
        cpu = on_cpu(rows)
        ax = axes[i][0]
        ax.barh(names, [r["tok_s_gpu"] for r in rows], color=colors)
        ax.set_title(f"{_title(*key)}: " + ("tokens/s/rank (CPU: not a performance figure)" if cpu
                                           else "tokens/s/GPU"), fontsize=9)
        ax.invert_yaxis()
        if cols == 2:
            ax = axes[i][1]
            if any(r.get("peak_gib") for r in rows):
                ax.barh(names, [r["peak_gib"] or 0.0 for r in rows], color=colors)
                ax.set_title("peak memory per GPU (GiB)", fontsize=9)
                ax.invert_yaxis()
            else:
                ax.set_axis_off()
                ax.text(0.5, 0.5, "no memory measured", ha="center", va="center", fontsize=9)
        for a in axes[i]:
            a.tick_params(labelsize=8)
    fig.suptitle("autoshard (red) and its peers (blue)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(cfg: BenchConfig, nproc: int | None = None) -> list[dict[str, Any]]:
    """Run a benchmark: inside ``torchrun`` (``WORLD_SIZE`` set) on this job's ranks, else on ``nproc``
    ranks started here. Returns rank 0's records (an empty list on other ranks under torchrun)."""
    if "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ:
        return run_rank(cfg) or []
    from autoshard.launch import launch

    nproc = nproc or (torch.cuda.device_count() if torch.cuda.is_available() and cfg.device != "cpu" else 2)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg.device = device
    return launch(run_rank, nproc, cfg, device=device, timeout=None)[0]

