"""Cost model: a model's FLOPs, bytes, saved activations and collectives per repeated block, and the
symbolic step time and memory of a plan.

**Analysis** (:func:`analyse`). A transformer's cost is its repeated blocks times the cost of one,
plus what comes before (embeddings) and after (final norm, LM head, loss). So the model is captured
once with its block list cut down to one representative of each distinct block (blocks with the
same class and parameter shapes share one), on one sequence, usually on the meta device: an
80-layer 70B model captures in about a second. From that aten graph we read, per region (``pre``,
each block kind, ``post``) and per sequence:

- matmul and attention FLOPs, and the bytes the other (memory-bound) ops read and write;
- the bytes autograd *saves* for backward, measured by running the graph on meta tensors under
  ``torch.autograd.graph.saved_tensors_hooks`` (attention is run as a stand-in that saves what a
  fused kernel saves: q, k, v, output, log-sum-exp; not the ``S × S`` matrix the math path would);
- for each tensor-parallel degree ``tp``, what the tensor-parallel pass itself decides: it is run
  on the captured graph, so per-rank parameter counts, sharded FLOPs/bytes and the collectives
  (Megatron's two all-reduces per block, forward and backward) are the runtime's own, and a ``tp``
  the pass rejects (heads not divisible) is recorded as impossible with the pass's message.

**Symbolic model** (:func:`compile_model`). Step time and per-GPU memory are sympy expressions in
the plan variables: degrees ``dp, tp, pp, ep``, micro-batches ``m``, virtual stages ``v``, the
ZeRO stage (as indicators ``z1 = [z >= 1]``, ``z2``, ``z3``), offload indicators, checkpointed
blocks per stage ``k``, and the per-block coefficients above (one set of symbols per region,
filled from the analysis at the candidate's ``tp``) and the profile's constants. They are compiled
once per process with ``sympy.lambdify`` and evaluated on numpy arrays holding every candidate.

Time of one step (per pipeline rank kind ``r``: first, middle, last stage)::

    b        = B / (dp · ep · m)                                  sequences per micro-batch
    T_dev(r) = b · Σ_x (F_x + Bw_x) + k · b · F_blk                device compute (roofline per op class) + recompute
    T_host(r)= 3 · Σ_x ops_x · o + k · ops_blk · o                 eager dispatch; it overlaps the device's work
    T_c(r)   = max(T_dev, T_host)
    T_tp(r)  = Σ collectives (2(tp-1) α + 2(tp-1)/tp · bytes · β + κ)   NVLink; synchronous, not overlapped
    T_mb(r)  = T_c + T_z3 - η · min(T_z3, T_c) + T_tp + T_ep + T_p2p     (T_z3: ZeRO-3 gathers, prefetched)
    T_pipe   = m · max_r T_mb(r) + (pp - 1)/v · mean_r T_mb(r)     1F1B / GPipe / interleaved bubble
    T_step   = T_pipe + T_dp_exposed + T_gather + T_optimizer + T_flatten + overhead

Collectives are α-β: ring all-reduce ``2(p-1)α + 2(p-1)/p · nβ``, tree ``2 log2(p) α + 2(p-1)/p · nβ``
(the cheaper is taken, as NCCL does), reduce-scatter and all-gather ``(p-1)α + (p-1)/p · nβ``; the
link is NVLink when the group fits in a node and the network otherwise. The data-parallel gradient
reduction overlaps the last micro-batch's backward by a fraction ``η`` (``overlap_efficiency``).

Memory per GPU (the largest rank kind), following the ZeRO paper's terms and what the runtime holds
(``runtime/zero.py``): compute copy ``cΨ`` (``cΨ/dp`` + gathered blocks at stage 3), optimizer
``12Ψ`` (fp32 master + Adam moments; ``8Ψ`` without the ZeRO path) divided by ``dp`` from stage 1,
fp32 gradient shard ``4Ψ/dp`` from stage 2, and the larger of (activations of the micro-batches in
flight + backward transients + gradients accumulating across micro-batches) and (the fp32 gradient
buckets alive at the end of backward below stage 2). Activation checkpointing keeps a block's input
instead of its saved tensors and adds one forward of the block to backward.

Why this module is long: analysis (FLOPs, bytes, saved activations per block) and the symbolic
step-time and memory formulas share one vocabulary of regions and terms; they are one model.
"""

from __future__ import annotations

import copy
import functools
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import sympy as sp
import torch
from torch.fx import GraphModule, Node
from torch.utils._pytree import tree_flatten, tree_map

from autoshard.runtime import collectives as C
from autoshard.runtime.errors import AutoshardError, PlanError
from autoshard.runtime.hardware import HardwareProfile

from .capture import capture
from .memory import VIEW_OPS
from .tensor_parallel import apply_tensor_parallel, plan_tensor_parallel

aten = torch.ops.aten

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

_MATMULS = {aten.linear.default, aten.mm.default, aten.addmm.default, aten.matmul.default, aten.bmm.default,
            aten.baddbmm.default}
_ATTENTION = {aten.scaled_dot_product_attention.default}
_VIEWS = VIEW_OPS | {aten.flatten.using_ints, aten._assert_tensor_metadata.default}  # free: no kernel, no traffic
_COLLECTIVES = {C.all_reduce: "all_reduce", C.reduce_grad: "reduce_grad", C.all_gather: "all_gather",
                C.scatter: "scatter"}

#: backward cost relative to forward: matmuls compute two products (input and weight gradients);
#: fused attention's backward recomputes the scores (FlashAttention-2: about 2.5x the forward)
BACKWARD_MATMUL, BACKWARD_ATTENTION, BACKWARD_BYTES = 2.0, 2.5, 2.0
#: bytes per element an optimizer step moves: ZeRO path (fp32 master r/w, fp32 grad, two moments r/w, compute
#: copy write) and torch's AdamW on whole fp32 parameters
OPTIMIZER_BYTES_ZERO, OPTIMIZER_BYTES_PLAIN = 34, 28
BUCKET_BYTES = 25 * 2**20  # the runtime's default gradient bucket (bucket_mb=25, counted in fp32 bytes)
BUCKETS_IN_FLIGHT = 4  # runtime/zero.py caps gradient buckets in flight


# ====================================================================================== analysis records
@dataclass
class RegionCost:
    """One region of the model (``pre``, one block, ``post``) on one rank at one ``tp``, per sequence.

    FLOPs and bytes are for the forward of one sequence at this rank's local shapes; ``*_count``
    are collectives per micro-batch (independent of its size), ``*_bytes`` their per-sequence sizes.
    """

    matmul_flops: float = 0.0
    attention_flops: float = 0.0
    ew_bytes: float = 0.0  # bytes read + written by memory-bound ops
    ops: int = 0  # non-view aten ops (each costs host time in eager mode)
    saved_bytes: float = 0.0  # tensors autograd keeps for backward
    boundary_bytes: float = 0.0  # the region's input activations (what checkpointing keeps; pp sends)
    transient_bytes: float = 0.0  # backward working set (largest tensors' gradients)
    params: float = 0.0  # parameter elements on this rank (after tp)
    expert_params: float = 0.0  # of which expert weights (divided by ep)
    ar_count: int = 0  # all-reduces per micro-batch, forward + backward
    ar_bytes: float = 0.0  # their total size per sequence
    ag_count: int = 0  # all-gathers per micro-batch
    ag_bytes: float = 0.0  # their gathered (full) size per sequence
    a2a_bytes: float = 0.0  # expert dispatch volume per sequence (one all-to-all)


@dataclass
class BlockKind:
    """Blocks with the same class and parameter shapes: analysed once, counted ``count`` times."""

    signature: str
    indices: list[int]
    per_tp: dict[int, RegionCost] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.indices)


@dataclass
class ModelAnalysis:
    """What the planner knows about a model: per-region costs at every analysed ``tp``."""

    name: str
    precision: str
    global_batch: int  # sequences per optimizer step
    tokens_per_sequence: int
    block_path: str  # e.g. "model.layers"
    blocks: list[BlockKind]
    pre: dict[int, RegionCost]
    post: dict[int, RegionCost]
    tied_params: float  # parameters used by both pre and post (tied embedding / LM head)
    buffer_bytes: float
    total_params: float
    model_flops_per_sequence: float  # forward + backward (3x forward matmul + attention), for MFU
    tp_errors: dict[int, str]  # tp degrees the tensor-parallel pass rejects, with its reason
    num_experts: int = 0
    top_k: int = 0
    capture_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def num_blocks(self) -> int:
        return sum(b.count for b in self.blocks)

    @property
    def tps(self) -> list[int]:
        return sorted(self.pre)

    def block(self, tp: int) -> RegionCost:
        """The average block at ``tp`` (blocks of different kinds weighted by their count)."""
        out = RegionCost()
        n = max(1, self.num_blocks)
        for kind in self.blocks:
            c = kind.per_tp[tp]
            for k, v in asdict(c).items():
                setattr(out, k, getattr(out, k) + v * kind.count / n)
        return out

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "params": int(self.total_params), "blocks": self.num_blocks,
                "block_kinds": len(self.blocks), "block_path": self.block_path,
                "tokens_per_sequence": self.tokens_per_sequence, "global_batch": self.global_batch,
                "precision": self.precision, "experts": self.num_experts,
                "model_tflops_per_step": self.model_flops_per_sequence * self.global_batch / 1e12}


# ====================================================================================== block detection
def find_block_list(model: torch.nn.Module) -> tuple[str, torch.nn.Module | None]:
    """The ``ModuleList``/``Sequential`` with the most children (the repeated blocks), and its path."""
    best: tuple[int, int, str, torch.nn.Module | None] = (1, 0, "", None)
    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.ModuleList, torch.nn.Sequential)) and name:
            n = len(mod)
            if n > best[0] or (n == best[0] and best[3] is not None and name.count(".") < best[2].count(".")):
                if any(True for _ in mod.parameters()):
                    best = (n, 0, name, mod)
    return best[2], best[3]


def meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A structural copy of ``model`` whose parameters and buffers live on the meta device.

    ``copy.deepcopy`` with every tensor pre-seeded in its memo: the module tree, configs and tied
    parameters are copied, the weights are not (a 70B model copies in milliseconds).
    """
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def _signature(block: torch.nn.Module) -> str:
    shapes = ",".join(f"{n}:{tuple(p.shape)}" for n, p in block.named_parameters())
    return f"{type(block).__name__}[{shapes}]"


def _set_submodule(root: torch.nn.Module, path: str, value: torch.nn.Module) -> None:
    *parents, leaf = path.split(".")
    mod = root
    for p in parents:
        mod = getattr(mod, p)
    setattr(mod, leaf, value)


def _count_experts(model: torch.nn.Module) -> int:
    """Experts per MoE layer: the length of a ``ModuleList`` named ``experts``, or dim 0 of fused expert weights."""
    best = 0
    for name, mod in model.named_modules():
        if name.split(".")[-1] == "experts":
            if isinstance(mod, torch.nn.ModuleList):
                best = max(best, len(mod))
            else:
                dims = [p.shape[0] for p in mod.parameters(recurse=False) if p.dim() == 3]
                best = max(best, max(dims, default=0))
    return best


# ====================================================================================== per-node costs
def _val(n: Any) -> torch.Tensor | None:
    v = n.meta.get("val") if isinstance(n, Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _nbytes(t: torch.Tensor) -> float:
    return float(t.numel() * t.element_size())


def node_flops(node: Node) -> tuple[float, float]:
    """(matmul FLOPs, attention FLOPs) of one forward node at its traced (global) shapes."""
    out = _val(node)
    if out is None:
        return 0.0, 0.0
    if node.target in _MATMULS:
        a = node.args[1] if node.target in (aten.addmm.default, aten.baddbmm.default) else node.args[0]
        av = _val(a)
        k = av.shape[-1] if av is not None and av.dim() else 1
        return 2.0 * out.numel() * int(k), 0.0
    if node.target in _ATTENTION:
        q, k = _val(node.args[0]), _val(node.args[1])
        if q is None or k is None:
            return 0.0, 0.0
        causal = bool(node.kwargs.get("is_causal", node.args[5] if len(node.args) > 5 else False))
        flops = 2.0 * q.numel() * k.shape[-2] + 2.0 * out.numel() * k.shape[-2]
        return 0.0, flops * (0.5 if causal else 1.0)
    if "grouped_mm" in str(node.target):  # MoE expert matmuls (e.g. transformers' grouped_mm fallback)
        w = _val(node.args[1]) if len(node.args) > 1 else None
        k = w.shape[-2] if w is not None and w.dim() >= 2 else 1
        return 2.0 * out.numel() * int(k), 0.0
    return 0.0, 0.0


def node_bytes(node: Node) -> float:
    """Bytes a memory-bound op reads and writes (its tensor inputs and outputs)."""
    total = 0.0
    for a in node.all_input_nodes:
        v = _val(a)
        if v is not None:
            total += _nbytes(v)
    out = node.meta.get("val")
    for v in (out if isinstance(out, (tuple, list)) else [out]):
        if isinstance(v, torch.Tensor):
            total += _nbytes(v)
    return total


def _paths(node: Node) -> list[str]:
    import re

    out = []
    for v in (node.meta.get("nn_module_stack") or {}).values():
        out.append(re.sub(r"^L\['self'\]\.?", "", str(v[0])))
    return out


# ====================================================================================== saved tensors
class _FusedAttention(torch.autograd.Function):
    """Stand-in for a fused attention kernel: saves q, k, v, the output and the log-sum-exp, as FlashAttention does."""

    @staticmethod
    def forward(ctx, q, k, v):  # noqa: ANN001 - autograd.Function signature
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001 - never run
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def _saved_tensors(gm: GraphModule, flat_inputs: list[Any]) -> dict[str, float]:
    """Bytes autograd saves for backward, attributed to the node that produced each tensor.

    Runs ``gm`` on meta tensors (no memory, no compute) under saved-tensor hooks. A saved tensor is
    counted once per storage; one created inside an op (not any node's output) counts for that op.
    """
    params = {id(p) for p in gm.parameters()} | {id(b) for b in gm.buffers()}
    producer: dict[int, str] = {}
    keep: list[torch.Tensor] = []  # keep outputs alive so ids are never reused
    saved: dict[int, tuple[str, float]] = {}
    current = [""]

    def key_of(t: torch.Tensor) -> int:
        base = t._base if t._base is not None else t
        return id(base)

    def pack(t: torch.Tensor) -> torch.Tensor:
        k = key_of(t)
        if k in params or k in saved or not t.is_floating_point():
            return t
        base = t._base if t._base is not None else t
        keep.append(base)
        saved[k] = (producer.get(k, current[0]), _nbytes(base))
        return t

    class Run(torch.fx.Interpreter):
        def run_node(self, n: Node) -> Any:
            current[0] = n.name
            if n.op == "call_function" and n.target in _ATTENTION:
                q, k, v = (self.env[a] for a in n.args[:3])
                r = _FusedAttention.apply(q, k, v)
            else:
                r = super().run_node(n)
            for t in (r if isinstance(r, (tuple, list)) else [r]):
                if isinstance(t, torch.Tensor):
                    producer.setdefault(key_of(t), n.name)
                    keep.append(t)
            return r

    meta_inputs = [x.to("meta") if isinstance(x, torch.Tensor) else x for x in flat_inputs]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        Run(gm).run(*meta_inputs)
    out: dict[str, float] = {}
    for name, nbytes in saved.values():
        out[name] = out.get(name, 0.0) + nbytes
    return out


# ====================================================================================== analyse
def _batch_of(args: tuple, kwargs: dict) -> int:
    sizes = [x.shape[0] for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor) and x.dim() > 0]
    if not sizes:
        raise PlanError("the planner splits the batch over data-parallel ranks, but no input tensor has a batch dim")
    return int(sizes[0])


def _one_sequence(args: tuple, kwargs: dict, batch: int, device: torch.device) -> tuple[tuple, dict]:
    def cut(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == batch:
            x = x[:1]
        return x.to(device) if isinstance(x, torch.Tensor) else x

    return tree_map(cut, (args, kwargs))


def _region_of(node: Node, block_path: str, n_reps: int, seen_block: bool) -> str | int:
    for p in _paths(node):
        if p.startswith(block_path + "."):
            rest = p[len(block_path) + 1:].split(".")[0]
            if rest.isdigit() and int(rest) < n_reps:
                return int(rest)
    return "post" if seen_block else "pre"


def _placement_sharded(node: Node) -> tuple[bool, bool]:
    """(output is split over tp, output is a pending partial sum) from the tp pass's annotation."""
    pl = (node.meta.get("autoshard") or {}).get("placement", "R")
    items = pl if isinstance(pl, list) else [pl]
    return any(str(p).startswith("S") for p in items), any(p == "P" for p in items)


def analyse(model: torch.nn.Module, args: tuple = (), kwargs: dict | None = None, *, precision: str = "bf16",
            tps: tuple[int, ...] = (1, 2, 4, 8), loss: str | None = "cross_entropy",
            name: str | None = None) -> ModelAnalysis:
    """Capture ``model`` with one representative per distinct block, on one sequence, and cost it.

    ``args``/``kwargs`` are one *global* batch (dim 0 = sequences per optimizer step); only their
    shapes matter, and a meta-device model with meta inputs costs no memory. ``loss="cross_entropy"``
    adds the cost of a cross-entropy over the model's (logits) output, computed outside the model;
    ``None`` means the model returns its loss. ``tps`` are the tensor-parallel degrees to analyse.
    """
    if precision not in DTYPE_BYTES:
        raise PlanError(f"precision={precision!r}: choose one of {', '.join(DTYPE_BYTES)}")
    kwargs = dict(kwargs or {})
    t0 = time.perf_counter()
    batch = _batch_of(args, kwargs)
    if any(t.device.type != "meta" for t in (*model.parameters(), *model.buffers())):
        model = meta_copy(model)  # never touch the caller's tensors, never allocate for the analysis
    args1, kwargs1 = _one_sequence(args, kwargs, batch, torch.device("meta"))
    first = next((x for x in tree_flatten((args1, kwargs1))[0] if isinstance(x, torch.Tensor) and x.dim() > 1), None)
    tokens = int(first.shape[1]) if first is not None else 1

    path, blocks = find_block_list(model)
    kinds: list[BlockKind] = []
    if blocks is not None:
        for i, blk in enumerate(blocks):
            sig = _signature(blk)
            kind = next((k for k in kinds if k.signature == sig), None)
            if kind is None:
                kinds.append(BlockKind(sig, [i]))
            else:
                kind.indices.append(i)
    reps = [blocks[k.indices[0]] for k in kinds] if blocks is not None else []
    num_experts = _count_experts(model)
    param_dtype = None if precision == "fp32" else _DTYPES[precision]
    total_params = float(sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()))
    buffer_bytes = float(sum(b.numel() * b.element_size() for b in model.buffers()))

    if blocks is not None:
        _set_submodule(model, path, type(blocks)(reps))
    try:
        gm = capture(model, args1, kwargs1, training=True, param_dtype=param_dtype)
        flat_inputs = tree_flatten((args1, kwargs1))[0]
        saved = _saved_tensors(gm, flat_inputs)  # runs the graph on meta tensors
    except Exception as e:  # noqa: BLE001 - e.g. data-dependent ops that meta tensors cannot run
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise PlanError(f"the planner could not capture {type(model).__name__} on the meta device "
                        f"({type(e).__name__}: {first}); data-dependent code outside the ops autoshard intercepts "
                        "(e.g. experts picked with nonzero in a ModuleList MoE block) cannot be costed without "
                        "running it: give a fixed mesh instead of Mesh.auto(), e.g. Mesh(dp=..., ep=...)") from e
    finally:
        if blocks is not None:
            _set_submodule(model, path, blocks)

    n_reps = len(reps)
    region: dict[str, str | int] = {}
    seen_block = False
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        r = _region_of(node, path, n_reps, seen_block) if path else "pre"
        if isinstance(r, int):
            seen_block = True
        region[node.name] = r

    # parameters by region (tied ones counted on both ends)
    param_names = dict(gm.named_parameters(remove_duplicate=False))
    param_region: dict[str, set] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in param_names and node.users:
            param_region[node.target] = {region.get(u.name, "pre") for u in node.users}
    tied = 0.0
    for pname, regs in param_region.items():
        if "pre" in regs and "post" in regs:
            tied += param_names[pname].numel()

    boundary: dict[int, set[Node]] = {}
    for node in gm.graph.nodes:
        r = region.get(node.name)
        if isinstance(r, int):
            for a in node.all_input_nodes:
                v = _val(a)
                if a.op in ("placeholder", "call_function") and region.get(a.name) != r and v is not None \
                        and v.is_floating_point():
                    boundary.setdefault(r, set()).add(a)

    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    out_vals = [_val(a) for a in out_node.all_input_nodes]
    logits = next((v for v in out_vals if v is not None and v.is_floating_point() and v.dim() >= 2), None)

    pre: dict[int, RegionCost] = {}
    post: dict[int, RegionCost] = {}
    per_kind: list[dict[int, RegionCost]] = [{} for _ in kinds]
    tp_errors: dict[int, str] = {}
    top_k = 0
    for tp in sorted(set(tps)):
        with warnings.catch_warnings():  # torch's pytree spec deprecation noise on GraphModule copies
            warnings.simplefilter("ignore", FutureWarning)
            g = copy.deepcopy(gm)
        try:
            plan = plan_tensor_parallel(g, tp)
            g, _ = apply_tensor_parallel(g, plan, tp, "tp")
        except (AutoshardError, ValueError) as e:
            tp_errors[tp] = str(e).split("\n")[0]
            continue
        costs: dict[str | int, RegionCost] = {"pre": RegionCost(), "post": RegionCost()}
        for i in range(n_reps):
            costs[i] = RegionCost()
        for name_, lay in plan.layouts.items():
            regs = param_region.get(name_, {"pre"})
            local = float(math.prod(lay.local_shape))
            is_expert = ".experts." in f".{name_}." or name_.split(".")[-2:-1] == ["experts"]
            for r in regs:
                if r not in costs:
                    continue
                costs[r].params += local
                if is_expert:
                    costs[r].expert_params += local
        for node in g.graph.nodes:
            if node.op != "call_function":
                continue
            target = node.target
            src = node.args[0] if node.args and isinstance(node.args[0], Node) else None
            if target in _COLLECTIVES:
                kind = _COLLECTIVES[target]
                r = region.get(src.name if src is not None else "", "pre")
                r = r if r in costs else "pre"
                sv = _val(src)
                if sv is None:
                    continue
                sharded, _ = _placement_sharded(src)
                local = _nbytes(sv) / (tp if sharded else 1)
                if kind in ("all_reduce", "reduce_grad"):
                    costs[r].ar_count += 1
                    costs[r].ar_bytes += local
                elif kind == "all_gather":
                    costs[r].ag_count += 1
                    costs[r].ag_bytes += local * tp
                elif kind == "scatter":  # backward all-gathers the gradient
                    costs[r].ag_count += 1
                    costs[r].ag_bytes += _nbytes(sv)
                continue
            r = region.get(node.name)
            if r is None or r not in costs or target in _VIEWS:
                continue
            c = costs[r]
            sharded, partial = _placement_sharded(node)
            mm, at = node_flops(node)
            split = tp if (sharded or partial) else 1
            c.matmul_flops += mm / split
            c.attention_flops += at / split
            if target == aten.topk.default and len(node.args) > 1:
                top_k = max(top_k, int(node.args[1]))
            if not (mm or at):
                c.ew_bytes += node_bytes(node) / (tp if sharded else 1)
            c.ops += 1
            v = _val(node)
            if v is not None and v.is_floating_point():
                c.transient_bytes = max(c.transient_bytes, 2.0 * _nbytes(v) / (tp if sharded else 1))
            c.saved_bytes += saved.get(node.name, 0.0) / (tp if sharded else 1)
        # a block's input: values it reads from outside itself (what checkpointing keeps, pp sends), each once
        for i, names in boundary.items():
            costs[i].boundary_bytes = sum(_nbytes(_val(n)) for n in names)
        if logits is not None and loss is not None:  # cross-entropy in fp32 outside the model
            n = float(logits.numel())
            pc = costs["post"]
            pc.ew_bytes += n * (DTYPE_BYTES[precision] + 4) + 2 * n * 4 * 2
            pc.saved_bytes += n * 4  # log-softmax output, kept for its backward
            pc.transient_bytes = max(pc.transient_bytes, n * (4 + 4 + DTYPE_BYTES[precision]))
            pc.ops += 4
        if num_experts and top_k:
            for i in range(n_reps):
                if costs[i].expert_params:
                    costs[i].a2a_bytes = tokens * top_k * _block_width(gm, region, i) * DTYPE_BYTES[precision]
        pre[tp], post[tp] = costs["pre"], costs["post"]
        for i in range(n_reps):
            per_kind[i][tp] = costs[i]
    if not pre:
        raise PlanError("no tensor-parallel degree is possible for this model: "
                        + "; ".join(f"tp={t}: {m}" for t, m in sorted(tp_errors.items())))
    for kind, cost in zip(kinds, per_kind):
        kind.per_tp = cost
    # model FLOPs (for MFU): unsharded matmul + attention of every block, the embedding side and the head
    mf = 0.0
    if 1 in pre:
        mf = pre[1].matmul_flops + pre[1].attention_flops + post[1].matmul_flops + post[1].attention_flops
        for kind in kinds:
            c = kind.per_tp[1]
            mf += kind.count * (c.matmul_flops + c.attention_flops)
    analysis = ModelAnalysis(
        name=name or type(model).__name__, precision=precision, global_batch=batch, tokens_per_sequence=tokens,
        block_path=path, blocks=kinds, pre=pre, post=post, tied_params=tied, buffer_bytes=buffer_bytes,
        total_params=total_params, model_flops_per_sequence=3.0 * mf, tp_errors=tp_errors,
        num_experts=num_experts, top_k=top_k, capture_seconds=time.perf_counter() - t0)
    if blocks is None:
        analysis.notes.append("no repeated blocks found: the model is one region, pipeline parallelism is not possible")
    return analysis


def _block_width(gm: GraphModule, region: dict[str, str | int], i: int) -> int:
    """Hidden size entering block ``i`` (the last dim of its first floating input)."""
    for node in gm.graph.nodes:
        if region.get(node.name) == i:
            for a in node.all_input_nodes:
                v = _val(a)
                if region.get(a.name) != i and v is not None and v.is_floating_point() and v.dim():
                    return int(v.shape[-1])
    return 0


# ====================================================================================== collectives (numeric)
def ring_allreduce(nbytes: float, p: int, gbps: float, latency_us: float) -> float:
    """Seconds of a ring all-reduce of ``nbytes`` over ``p`` ranks: ``2(p-1)α + 2(p-1)/p · n/bw``."""
    if p <= 1:
        return 0.0
    return 2 * (p - 1) * latency_us * 1e-6 + 2 * (p - 1) / p * nbytes / (gbps * 1e9)


def tree_allreduce(nbytes: float, p: int, gbps: float, latency_us: float) -> float:
    """Seconds of a (pipelined, double binary) tree all-reduce: ``2⌈log2 p⌉α + 2(p-1)/p · n/bw``."""
    if p <= 1:
        return 0.0
    return 2 * math.ceil(math.log2(p)) * latency_us * 1e-6 + 2 * (p - 1) / p * nbytes / (gbps * 1e9)


def allreduce_seconds(nbytes: float, p: int, gbps: float, latency_us: float) -> float:
    """The cheaper of ring and tree, as NCCL picks per message size."""
    return min(ring_allreduce(nbytes, p, gbps, latency_us), tree_allreduce(nbytes, p, gbps, latency_us))


# ====================================================================================== symbolic model
#: plan variables and per-candidate inputs of the symbolic model, in the order the compiled functions take them
PLAN_SYMBOLS = ("dp", "tp", "pp", "ep", "m", "v", "B", "k", "z1", "z2", "z3", "U", "offO", "offP", "P2")
PROFILE_SYMBOLS = ("membw", "hostbw", "pcie", "eta", "tover", "kappa")
LINK_SYMBOLS = ("a_tp", "b_tp", "a_dp", "b_dp", "a_pp", "b_pp", "a_ep", "b_ep")
REGION_SYMBOLS = ("F", "Bw", "O", "P", "Pe", "A", "X", "T", "ARn", "ARB", "AGn", "AGB", "A2A")
REGIONS = ("blk", "pre", "post")
KIND_SYMBOLS = ("nb", "hp", "hq", "inf")
KINDS = ("f", "i", "l")  # first, middle and last pipeline stage


def _region_inputs(profile: HardwareProfile, precision: str, c: RegionCost) -> dict[str, float]:
    """A region's coefficients: seconds per sequence (F forward, Bw backward), per-micro-batch op time O, sizes."""
    rate = profile.matmul_rate(precision)
    attn = rate * profile.attention_efficiency
    bw = profile.memory_gbps * 1e9
    fwd = c.matmul_flops / rate + c.attention_flops / attn + c.ew_bytes / bw
    bwd = (BACKWARD_MATMUL * c.matmul_flops / rate + BACKWARD_ATTENTION * c.attention_flops / attn
           + BACKWARD_BYTES * c.ew_bytes / bw)
    return {"F": fwd, "Bw": bwd, "O": c.ops * profile.op_overhead_us * 1e-6, "P": c.params - c.expert_params,
            "Pe": c.expert_params, "A": c.saved_bytes, "X": c.boundary_bytes, "T": c.transient_bytes,
            "ARn": float(c.ar_count), "ARB": c.ar_bytes, "AGn": float(c.ag_count), "AGB": c.ag_bytes,
            "A2A": c.a2a_bytes}


@dataclass
class CompiledModel:
    """The lambdified step time and memory: one numpy function computing every named term at once."""

    function: Callable[..., Any]
    keys: tuple[str, ...]
    inputs: tuple[str, ...]
    expressions: dict[str, sp.Expr]

    def evaluate(self, values: dict[str, Any]) -> dict[str, Any]:
        """Every term for the candidates in ``values`` (arrays named by :func:`input_names`)."""
        out = self.function(*[values[n] for n in self.inputs])
        return dict(zip(self.keys, out))


def input_names() -> tuple[str, ...]:
    names = list(PLAN_SYMBOLS) + list(LINK_SYMBOLS) + list(PROFILE_SYMBOLS)
    names += [f"{s}_{r}" for r in REGIONS for s in REGION_SYMBOLS]
    names += [f"{s}_{k}" for k in KINDS for s in KIND_SYMBOLS]
    names += ["Ptied"]
    return tuple(names)


def _max(*args: sp.Expr) -> sp.Expr:
    """``Max`` left unevaluated: sympy's simplification of Max/Min trees costs seconds and gains nothing here."""
    return sp.Max(*args, evaluate=False)


def _min(*args: sp.Expr) -> sp.Expr:
    return sp.Min(*args, evaluate=False)


def build_expressions(precision: str, prefetch: int = 1) -> dict[str, sp.Expr]:
    """The step-time and memory expressions (sympy) for one compute precision.

    Profile constants are symbols too (``membw``, ``hostbw``, ``pcie``, ``eta``, ``tover``), so one
    compiled model serves every profile. Returns named terms: per-kind micro-batch time ``tmb_<kind>``
    and memory ``mem_<kind>`` with its parts, and the step's ``pipeline``, ``bubble``, ``tdp_max``,
    ``tgather_max``, ``topt_max``, ``tflat_max`` and ``step``.
    """
    sym = {n: sp.Symbol(n) for n in input_names()}
    S = sym.__getitem__
    dp, tp, pp, ep, m, v, B = (S(n) for n in ("dp", "tp", "pp", "ep", "m", "v", "B"))
    z1, z2, z3, U, offO, offP, P2 = (S(n) for n in ("z1", "z2", "z3", "U", "offO", "offP", "P2"))
    c = sp.Integer(DTYPE_BYTES[precision])
    membw, hostbw, pcie, eta, tover, kappa = (S(n) for n in PROFILE_SYMBOLS)
    bucket = sp.Float(BUCKET_BYTES)
    b = B / (dp * ep * m)

    def R(name: str, region: str) -> sp.Symbol:
        return S(f"{name}_{region}")

    def beta(x: str) -> sp.Expr:
        return 1 / (S(f"b_{x}") * 1e9)

    def alpha(x: str) -> sp.Expr:
        return S(f"a_{x}") * sp.Float(1e-6)

    out: dict[str, sp.Expr] = {}
    off_any = _max(offO, offP)
    for kind in KINDS:
        nb, hp, hq, inflight = (S(f"{s}_{kind}") for s in KIND_SYMBOLS)
        k = _min(S("k"), nb)  # a stage checkpoints at most the blocks it has
        weights = {"blk": nb, "pre": hp, "post": hq}

        def tot(name: str, weights=weights) -> sp.Expr:
            return sum(w * R(name, r) for r, w in weights.items())

        psi = tot("P") + nb * R("Pe", "blk") / ep - hp * hq * S("Ptied")
        t_f = b * tot("F")
        t_b = b * tot("Bw") + k * b * R("F", "blk")
        # eager launches overlap the device's work: the host's time per op bounds small models only
        host = 3 * tot("O") + k * R("O", "blk")
        calls = _min(tp - 1, 1) * (tot("ARn") + tot("AGn"))
        t_tp = (tot("ARn") * 2 * (tp - 1) * alpha("tp") + 2 * (tp - 1) / tp * b * tot("ARB") * beta("tp")
                + tot("AGn") * (tp - 1) * alpha("tp") + (tp - 1) / tp * b * tot("AGB") * beta("tp")
                + calls * kappa * sp.Float(1e-6))
        t_ep = nb * 4 * ((ep - 1) / ep * b * R("A2A", "blk") * beta("ep")
                         + _min(R("A2A", "blk"), 1) * (ep - 1) * alpha("ep"))
        t_p2p = P2 * 2 * v * (b * R("X", "blk") * beta("pp") + alpha("pp"))
        blk_params = R("P", "blk") + R("Pe", "blk") / ep
        t_z3 = z3 * 2 * ((dp - 1) / dp * c * psi * beta("dp") + nb * (dp - 1) * alpha("dp")) \
            + offP * 2 * c * psi / dp / pcie
        compute = _max(t_f + t_b, host)
        # ZeRO-3 gathers are prefetched behind compute, which hides a fraction eta of them (as the gradient reduction)
        out[f"tmb_{kind}"] = compute + t_z3 - eta * _min(t_z3, compute) + t_tp + t_ep + t_p2p
        out[f"tcompute_{kind}"] = compute
        out[f"ttp_{kind}"] = t_tp
        out[f"tep_{kind}"] = t_ep
        out[f"tp2p_{kind}"] = t_p2p
        out[f"tbwd_{kind}"] = t_b
        # step-level work after the pipeline drains
        grad = 4 * psi
        nbk = sp.ceiling(grad / bucket)
        ring = 2 * (dp - 1) / dp * grad * beta("dp") + nbk * 2 * (dp - 1) * alpha("dp")
        tree = 2 * (dp - 1) / dp * grad * beta("dp") + nbk * 2 * sp.ceiling(sp.log(dp, 2) - sp.Float(1e-9)) * alpha("dp")
        rs = (dp - 1) / dp * grad * beta("dp") + nbk * (dp - 1) * alpha("dp")
        t_dp = (1 - z2) * _min(ring, tree) + z2 * rs
        out[f"tdp_{kind}"] = t_dp - eta * _min(t_dp, t_b)
        out[f"tgather_{kind}"] = U * z1 * (1 - z3) * ((dp - 1) / dp * c * psi * beta("dp") + nbk * (dp - 1) * alpha("dp"))
        elems = psi / (1 + z1 * (dp - 1))
        per_elem = U * OPTIMIZER_BYTES_ZERO + (1 - U) * OPTIMIZER_BYTES_PLAIN
        out[f"topt_{kind}"] = (1 - off_any) * elems * per_elem / membw \
            + off_any * (elems * per_elem / hostbw + elems * 8 / pcie)
        out[f"tflat_{kind}"] = U * psi * (8 + c) / membw
        # memory
        params = (1 - z3) * c * psi + z3 * ((1 - offP) * c * psi / dp + (2 + prefetch) * c * blk_params)
        optimizer = (1 - off_any) * (8 + 4 * U) * psi / (1 + z1 * (dp - 1))
        grads_static = (1 - off_any) * U * z2 * 4 * psi / dp
        buckets = U * _min(BUCKETS_IN_FLIGHT * bucket, 4 * psi)  # fp32 flat gradient buckets in flight
        acts = inflight * b * ((nb - k) * R("A", "blk") + k * R("X", "blk") + hp * R("A", "pre")
                               + hq * R("A", "post")) + _min(k, 1) * b * R("A", "blk")
        trans = b * _max(R("T", "blk"), hq * R("T", "post"))
        g_during = P2 * c * psi
        g_end = (1 - U * z2) * (1 - U * off_any) * 4 * psi
        # stages 2-3: the gradient shards fill bucket by bucket while backward frees the activations,
        # so the peak holds the larger of the two, not both (measured, benchmarks/RESULTS.md)
        dynamic = _max(acts + trans + g_during, g_end + grads_static)
        out[f"mem_params_{kind}"] = params
        out[f"mem_optimizer_{kind}"] = optimizer
        out[f"mem_grads_{kind}"] = buckets + _max(g_during, g_end + grads_static - acts - trans, 0)
        out[f"mem_activations_{kind}"] = acts + trans
        out[f"mem_{kind}"] = params + optimizer + buckets + dynamic
        out[f"host_{kind}"] = off_any * ((12 * psi + 4 * psi) / (1 + z1 * (dp - 1))) + offP * c * psi / dp
    tmax = _max(out["tmb_f"], out["tmb_i"], out["tmb_l"])
    tmean = (out["tmb_f"] + (pp - 2) * out["tmb_i"] + out["tmb_l"]) / pp
    out["pipeline"] = m * tmax + (pp - 1) / v * tmean
    out["bubble"] = (pp - 1) / v * tmean
    after = {name: _max(*(out[f"{name}_{kk}"] for kk in KINDS)) for name in ("tdp", "tgather", "topt", "tflat")}
    out.update({f"{n}_max": e for n, e in after.items()})
    out["step"] = out["pipeline"] + sum(after.values()) + tover
    return out


#: the terms :meth:`CompiledModel.evaluate` returns
TERMS = ("step", "pipeline", "bubble", "tdp_max", "tgather_max", "topt_max", "tflat_max", "host") + tuple(
    f"{t}_{kk}" for t in ("tmb", "tcompute", "ttp", "tep", "tp2p", "mem", "mem_params", "mem_optimizer", "mem_grads",
                          "mem_activations") for kk in KINDS)


@functools.lru_cache(maxsize=8)
def compile_model(precision: str, prefetch: int = 1) -> CompiledModel:
    """Lambdify every term of :func:`build_expressions` into one numpy function (once per process)."""
    exprs = build_expressions(precision, prefetch)
    exprs["host"] = _max(*(exprs[f"host_{kk}"] for kk in KINDS))
    names = input_names()
    symbols = [sp.Symbol(n) for n in names]
    fn = sp.lambdify(symbols, [exprs[k] for k in TERMS], modules="numpy", cse=True)
    return CompiledModel(fn, TERMS, names, exprs)


def profile_inputs(profile: HardwareProfile) -> dict[str, float]:
    """The profile constants of :func:`build_expressions`, in bytes/s and seconds."""
    return {"membw": profile.memory_gbps * 1e9, "hostbw": profile.host_memory_gbps * 1e9,
            "pcie": profile.pcie_gbps * 1e9, "eta": profile.overlap_efficiency, "tover": profile.step_overhead_s,
            "kappa": profile.collective_overhead_us}


def region_inputs(profile: HardwareProfile, precision: str, analysis: ModelAnalysis, tp: int) -> dict[str, float]:
    """The region coefficients of :func:`build_expressions` for one ``tp``, named ``<symbol>_<region>``."""
    out: dict[str, float] = {}
    for region, cost in (("blk", analysis.block(tp)), ("pre", analysis.pre[tp]), ("post", analysis.post[tp])):
        for k, v in _region_inputs(profile, precision, cost).items():
            out[f"{k}_{region}"] = v
    return out


# ====================================================================================== pipelines
def stage_blocks(num_blocks: int, pp: int, pre: float, post: float) -> tuple[int, int, int]:
    """Blocks on the first, busiest middle and last of ``pp`` stages, balancing ``pre``/``post`` (in blocks).

    Contiguous runs of blocks minimising the largest stage, as ``passes/pipeline_split.py`` does
    with FLOPs; the ends take fewer blocks when embeddings or the LM head weigh on them.
    """
    if pp == 1:
        return num_blocks, num_blocks, num_blocks
    best: tuple[float, int, int, int] | None = None
    for nf in range(1, num_blocks - pp + 2):
        for nl in range(1, num_blocks - nf - (pp - 2) + 1):
            rest = num_blocks - nf - nl
            if pp == 2 and rest:
                continue
            nm = math.ceil(rest / (pp - 2)) if pp > 2 else 0
            load = max(nf + pre, nl + post, nm)
            if best is None or load < best[0] - 1e-12:
                best = (load, nf, nm, nl)
    if best is None:
        raise PlanError(f"{num_blocks} blocks cannot fill {pp} pipeline stages")
    _, nf, nm, nl = best
    return nf, (nm if pp > 2 else nf), nl


def inflight(schedule: str, pp: int, m: int, v: int, kind: str) -> float:
    """Micro-batches whose activations a rank holds at its peak (in whole-rank units).

    1F1B: rank r holds ``min(pp - r, m)`` (first stage ``pp``, last 1; the busiest middle rank
    about half); GPipe holds all ``m``; interleaved 1F1B holds its warm-up forwards plus one, in
    chunks of ``1/v`` of the rank's blocks (Megatron-LM's schedule). Checked against
    ``Schedule.simulate().peak_inflight`` in the tests.
    """
    if pp == 1:
        return 1.0
    r = {"f": 0, "i": 1 if pp > 2 else 0, "l": pp - 1}[kind]
    if schedule == "gpipe":
        return float(m)
    if schedule == "interleaved_1f1b":
        warm = min((pp - r - 1) * 2 + (v - 1) * pp, m * v)
        return min(warm + 1, m * v) / v
    return float(min(pp - r, m))
