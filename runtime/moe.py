"""Mixture-of-experts at run time: token dispatch to experts over ``ep`` ranks and back.

The expert-parallel pass (:mod:`autoshard.passes.expert_parallel`) replaces each mixture-of-experts
layer of the captured graph by one call into this module:

* :func:`moe_experts` for *fused* experts, a module holding 3-D expert weights ``[E, ...]`` that is
  called as ``experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])`` (Hugging Face
  transformers 5 Mixtral, Qwen-MoE, ...). The router ran before, as ordinary graph nodes.
* :func:`moe_block` for a block whose experts are a ``ModuleList`` looped over by the block's own
  code. The block's code (router, routing, weighted sum) runs as written; only its calls
  ``experts[e](x_e)`` are served from here.

Dispatch (Lepikhin et al., GShard; Fedus et al., Switch): the rows a rank routes to expert ``e`` are
sorted by expert; per-expert row counts are exchanged with one small all-to-all, then the rows
travel to the ``ep`` rank that holds ``e`` with a variable-size all-to-all (differentiable: its
backward is the all-to-all the other way), the local experts run on their rows (a loop over local
experts; Hugging Face fused experts run their own grouped-GEMM code), and a second all-to-all brings
the results back in the order they left. ``capacity_factor=None`` is dropless; a float caps every
expert at ``ceil(capacity_factor · rows / E)`` rows per sending rank, as GShard does: for fused
experts rows are admitted by top-k slot first, then by token (every token's first choice before any
second choice); for a ``ModuleList`` block in the order the block hands them over. A dropped row's
expert output is zero (the residual carries the token on) and the count is reported.

A ``ModuleList`` block needs every rank's rows before any expert can run, but the block hands them
over one expert at a time. So under ``ep > 1`` (or with a capacity) the block runs twice with the
same RNG state: the first run only records each ``experts[e](x_e)`` call, then the rows are
dispatched and the experts run, and the second run gets the expert outputs in place of its calls.
Autograd reaches the token rows through the first run and the router through the second, so each
gradient is counted once.

Layers are named by a string key (like collective groups) so the rewritten graph prints and
re-emits as Python; :func:`register_layer` binds a key to its :class:`MoeLayer`.

Why this module is long: both MoE forms (fused 3-D experts and ModuleList experts) share dispatch,
capacity, counting and the grouped GEMM; they are one runtime.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.func import functional_call
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import collectives as C
from .data_parallel import GradientSync
from .recompute import recomputing

_LAYERS: dict[str, MoeLayer] = {}
_STATS: dict[str, dict[str, Any]] = {}
_namespaces = iter(range(1 << 62))


@dataclass
class CallSpec:
    """How one call of a ``ModuleList`` block is flattened: its inputs' and outputs' pytrees with
    the non-tensor leaves, which are constants of the captured graph."""

    in_spec: Any
    in_consts: list[Any]  # one per leaf; None where the leaf is a tensor
    out_spec: Any = None
    out_consts: list[Any] = field(default_factory=list)


@dataclass
class MoeLayer:
    """One mixture-of-experts layer, found in the model before capture.

    ``template`` is a copy of the intercepted module on the meta device (no memory): the fused
    experts module, or the block with each expert replaced by an :class:`ExpertCall`. Parameter
    values are supplied at every call with ``torch.func.functional_call``.
    """

    name: str  # module path in the model
    kind: str  # "fused" | "block"
    num_experts: int
    names: list[str]  # state (parameters, then buffers) in the op's order, relative to ``name``
    expert_of: list[int]  # per entry of ``names``: its expert (ModuleList), -1: not an expert's own
    stacked: list[bool]  # per entry: a fused tensor whose dim 0 is the expert (sharded over ep)
    template: torch.nn.Module
    experts: list[torch.nn.Module] = field(default_factory=list)  # block: meta copy of each expert
    experts_path: str = ""  # block: path of the experts' ModuleList inside the block
    router: str | None = None
    top_k: int | None = None
    calls: dict[int, CallSpec] = field(default_factory=dict)
    in_tail: tuple[int, ...] | None = None  # block: trailing shape and dtype of the rows an expert gets
    in_dtype: torch.dtype | None = None
    _local: dict[int, torch.nn.Module] = field(default_factory=dict)
    _out_meta: dict[tuple, tuple[tuple[int, ...], torch.dtype]] = field(default_factory=dict)
    state: Any = None  # the block run in progress (the stubs report to it)
    unrecognised: str | None = None  # why capture left the layer to the model's own code
    grouped: GroupedExperts | None = None  # block: the experts as grouped GEMMs (see GroupedExperts)
    force_grouped: bool = False  # use ``grouped`` on CPU too (tests)

    def local_template(self, local_experts: int) -> torch.nn.Module:
        """The fused experts module as if it held ``local_experts`` experts (its int attributes equal
        to ``num_experts`` are set to the local count, e.g. ``num_experts`` for one-hot and histograms)."""
        if local_experts == self.num_experts:
            return self.template
        mod = self._local.get(local_experts)
        if mod is None:
            mod = _meta_copy(self.template)
            attrs = [k for k, v in vars(mod).items() if type(v) is int and v == self.num_experts]
            named = [k for k in attrs if "expert" in k]
            for k in named or attrs:
                setattr(mod, k, local_experts)
            self._local[local_experts] = mod
        return mod

    def expert_out_meta(self, e: int, x: torch.Tensor) -> tuple[tuple[int, ...], torch.dtype]:
        """Trailing shape and dtype of expert ``e``'s output for rows like ``x`` (run on meta)."""
        key = (e, tuple(x.shape[1:]), x.dtype)
        if key not in self._out_meta:  # in the rows' dtype (bf16 compute copies of fp32 weights, say)
            state = {n: torch.empty_like(t, dtype=x.dtype if t.is_floating_point() else t.dtype, device="meta")
                     for n, t in [*self.experts[e].named_parameters(), *self.experts[e].named_buffers()]}
            y = functional_call(self.experts[e], state, (torch.empty((1, *x.shape[1:]), dtype=x.dtype, device="meta"),))
            self._out_meta[key] = (tuple(y.shape[1:]), y.dtype)
        return self._out_meta[key]


def _meta_copy(module: torch.nn.Module, replace: dict[int, torch.nn.Module] | None = None) -> torch.nn.Module:
    """A deep copy of ``module`` whose parameters and buffers live on the meta device (no data is
    copied); modules whose ``id`` is in ``replace`` are swapped for the given ones."""
    import copy

    memo: dict[int, Any] = dict(replace or {})
    for p in module.parameters():
        memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)


class ExpertCall(torch.nn.Module):
    """Stands in for expert ``index`` inside a block's template; the block run in progress serves it."""

    def __init__(self, index: int, layer: MoeLayer) -> None:
        super().__init__()
        self.index = index
        self._layer = [layer]  # a list: not a submodule, no reference cycle through _modules

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if len(tensors) != 1 or len(args) != 1 or kwargs:
            raise NotImplementedError(
                f"{self._layer[0].name}: an expert is called with {len(args)} positional and {len(kwargs)} keyword "
                "arguments; expert parallelism supports experts called as experts[e](x) with one tensor")
        state = self._layer[0].state
        if state is None:
            raise RuntimeError(f"{self._layer[0].name}: expert {self.index} called outside a dispatch")
        return state.expert(self.index, args[0])


class GroupedExperts:
    """All local experts of a ``ModuleList`` at once: each ``nn.Linear`` of the expert becomes one
    grouped GEMM over the experts' stacked weights (``torch.nn.functional.grouped_mm`` with the
    row offsets of each expert), everything else in it must act on each row alone (activations,
    products, sums) and runs on all rows together.

    Built from ``torch.fx.symbolic_trace`` of one expert; :meth:`build` returns None for an expert
    of any other form, which then runs in the per-expert loop.
    """

    _ROWWISE_MODULES = (torch.nn.GELU, torch.nn.SiLU, torch.nn.ReLU, torch.nn.Tanh, torch.nn.Sigmoid, torch.nn.Identity)
    _ROWWISE_FNS = {torch.nn.functional.gelu, torch.nn.functional.silu, torch.nn.functional.relu, torch.relu,
                    torch.tanh, torch.sigmoid, torch.nn.functional.sigmoid, torch.mul, torch.add}
    _ROWWISE_METHODS = {"mul", "add", "relu", "sigmoid", "tanh"}

    def __init__(self, gm: torch.fx.GraphModule, linears: dict[str, tuple[int, int, bool]]) -> None:
        self.gm, self.linears = gm, linears

    @classmethod
    def build(cls, expert: torch.nn.Module) -> GroupedExperts | None:
        import operator

        if not hasattr(torch.nn.functional, "grouped_mm"):
            return None
        try:
            gm = torch.fx.symbolic_trace(expert)
        except Exception:  # noqa: BLE001 - any untraceable expert simply runs in the loop
            return None
        linears: dict[str, tuple[int, int, bool]] = {}
        for n in gm.graph.nodes:
            if n.op == "call_module":
                m = gm.get_submodule(n.target)
                if isinstance(m, torch.nn.Linear):
                    linears[n.target] = (m.in_features, m.out_features, m.bias is not None)
                elif not isinstance(m, cls._ROWWISE_MODULES):
                    return None
            elif n.op == "call_function" and n.target not in cls._ROWWISE_FNS | {operator.mul, operator.add}:
                return None
            elif n.op == "call_method" and n.target not in cls._ROWWISE_METHODS:
                return None
            elif n.op == "get_attr":
                return None
        if not linears or sum(n.op == "placeholder" for n in gm.graph.nodes) != 1:
            return None
        return cls(gm, linears)

    def fits(self, dtype: torch.dtype) -> bool:
        """The grouped kernel wants 16-byte aligned rows: every feature count a multiple of 16 bytes."""
        size = torch.empty((), dtype=dtype).element_size()
        return all((i * size) % 16 == 0 and (o * size) % 16 == 0 for i, o, _ in self.linears.values())

    def __call__(self, rows: torch.Tensor, counts: list[int], params: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        offs = torch.tensor(counts, device=rows.device).cumsum(0).to(torch.int32)
        ids = torch.repeat_interleave(torch.arange(len(counts), device=rows.device), torch.tensor(counts, device=rows.device))
        linears = self.linears

        class _Run(torch.fx.Interpreter):
            def call_module(self, target, args, kwargs):
                if target not in linears:
                    return super().call_module(target, args, kwargs)
                w = torch.stack([p[f"{target}.weight"] for p in params])  # [E_local, out, in]
                y = torch.nn.functional.grouped_mm(args[0].contiguous(), w.transpose(-2, -1), offs=offs)
                if linears[target][2]:
                    y = y + torch.stack([p[f"{target}.bias"] for p in params])[ids]
                return y

        return _GroupedOut.apply(_Run(self.gm).run(rows))


class _GroupedOut(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (the grouped GEMM's backward
    rejects expanded gradients, such as the one of a sum)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


# ============================================================================== registry and stats
def new_namespace() -> str:
    """A fresh key prefix for the layers of one sharded module (``moe0.``, ``moe1.``, ...)."""
    return f"moe{next(_namespaces)}."


def register_layer(key: str, layer: MoeLayer) -> None:
    """Make ``key`` resolvable by :func:`moe_experts` / :func:`moe_block` in this process."""
    _LAYERS[key] = layer


def get_layer(key: str) -> MoeLayer:
    try:
        return _LAYERS[key]
    except KeyError:
        raise RuntimeError(f"mixture-of-experts layer {key!r} is not registered in this process") from None


def unregister(prefix: str) -> None:
    for k in [k for k in _LAYERS if k.startswith(prefix)]:
        del _LAYERS[k]
        _STATS.pop(k, None)


def reset_stats(prefix: str) -> None:
    for k in [k for k in _STATS if k.startswith(prefix)]:
        del _STATS[k]


def read_stats(prefix: str) -> dict[str, dict[str, Any]]:
    """Per layer key: ``routed`` rows per expert and ``dropped`` rows since :func:`reset_stats`."""
    return {k: {"routed": list(v["routed"]), "dropped": v["dropped"]} for k, v in _STATS.items() if k.startswith(prefix)}


def _record(key: str, routed: list[int], dropped: int) -> None:
    if recomputing():  # a checkpointed block run again in backward: its tokens were counted in the forward
        return
    st = _STATS.setdefault(key, {"routed": [0] * len(routed), "dropped": 0})
    st["routed"] = [a + b for a, b in zip(st["routed"], routed)]
    st["dropped"] += dropped


def capacity(capacity_factor: float, rows: int, num_experts: int) -> int:
    """Rows each expert accepts from one sending rank: ``ceil(capacity_factor · rows / E)`` (GShard)."""
    return math.ceil(capacity_factor * rows / num_experts)


# ============================================================================== dispatch
def _ep(group: str | None) -> tuple[int, int]:
    if group is None:
        return 1, 0
    g = C._group(group)
    return g.size, g.rank


def _connect(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Keep ``y`` on the autograd graph of ``x`` (an empty result must still send its gradient back,
    or the backward all-to-all of this rank would be missing and its peers would wait forever)."""
    if torch.is_grad_enabled() and x.requires_grad and not y.requires_grad:
        y = y + (x.sum() * 0).to(y.dtype)
    return y


def exchange(x: torch.Tensor, counts: list[int], compute: Callable[[torch.Tensor, list[int]], torch.Tensor],
             group: str | None) -> torch.Tensor:
    """Send rows to their experts' ranks, run ``compute`` there, and bring the results back.

    ``x`` holds this rank's rows sorted by expert, ``counts[e]`` of them for expert ``e`` (``E``
    entries). ``compute(rows, local_counts)`` runs this rank's ``E / ep`` experts on rows sorted by
    local expert. Returns the expert outputs for ``x``'s rows, in ``x``'s order.
    """
    ep, _ = _ep(group)
    if ep == 1:
        return _connect(compute(x, counts), x)
    E = len(counts)
    el = E // ep
    send = torch.tensor(counts, dtype=torch.int64, device=x.device)
    recv = C.all_to_all_counts(send, group).view(ep, el).tolist()  # recv[s][i]: rows from rank s for local expert i
    send_splits = [sum(counts[j * el:(j + 1) * el]) for j in range(ep)]
    recv_splits = [sum(r) for r in recv]
    xr = C.all_to_all(x, send_splits, recv_splits, group)
    # rows arrive grouped by source rank, then by expert: regroup by expert for the local compute
    local_counts = [sum(recv[s][i] for s in range(ep)) for i in range(el)]
    perm = None
    if el > 1 and ep > 1:
        starts, off = [[0] * el for _ in range(ep)], 0
        for s in range(ep):
            for i in range(el):
                starts[s][i] = off
                off += recv[s][i]
        idx = [torch.arange(starts[s][i], starts[s][i] + recv[s][i]) for i in range(el) for s in range(ep)]
        perm = torch.cat(idx).to(x.device) if idx else torch.empty(0, dtype=torch.int64, device=x.device)
        xr = xr.index_select(0, perm)
    y = _connect(compute(xr, local_counts), xr)
    if perm is not None:
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(len(perm), device=perm.device)
        y = y.index_select(0, inv)
    return C.all_to_all(y, recv_splits, send_splits, group)


# ============================================================================== fused experts
def _gshard_keep(index: torch.Tensor, num_experts: int, cap: int) -> torch.Tensor:
    """Which (token, slot) pairs fit their expert's capacity, GShard's priority: all first choices
    (slot 0) in token order, then all second choices, ... Returns a bool mask in (token, slot) order."""
    t, k = index.shape
    by_slot = index.t().reshape(-1)
    onehot = torch.nn.functional.one_hot(by_slot, num_experts)
    pos = (onehot.cumsum(0) * onehot).sum(-1) - 1
    return (pos < cap).view(k, t).t().reshape(-1)


def moe_experts(hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, params: list[torch.Tensor],
                key: str, group: str | None = None, capacity_factor: float | None = None) -> torch.Tensor:
    """``experts(hidden, index, weights)`` of a fused experts module, its experts spread over ``group``.

    ``params`` are this rank's tensors of the module (fused ones hold its ``E / ep`` experts). The
    local experts run the module's own forward on the rows they receive (with unit routing weights);
    the weighted sum over the top-k slots is then done here as Hugging Face's grouped and batched
    implementations do it: ``(out · w).view(T, k, H).sum(1)`` in the weights' dtype, cast back.
    """
    layer = get_layer(key)
    E = layer.num_experts
    ep, rank = _ep(group)
    t, k = index.shape
    flat = index.reshape(-1)
    routed = torch.bincount(flat, minlength=E)
    sort_key = flat
    if capacity_factor is not None:
        keep = _gshard_keep(index, E, capacity(capacity_factor, t * k, E))
        sort_key = torch.where(keep, flat, torch.full_like(flat, E))
    sorted_e, order = torch.sort(sort_key, stable=True)
    counts_all = torch.cat([routed, torch.bincount(sorted_e, minlength=E + 1)]).tolist()  # one host sync
    routed_l, counts, dropped = counts_all[:E], counts_all[E:2 * E], counts_all[2 * E]
    _record(key, routed_l, dropped)
    kept = t * k - dropped
    order = order[:kept]
    x = hidden.index_select(0, order // k)
    state = dict(zip(layer.names, params))
    el = E // ep
    tmpl = layer.local_template(el)

    def compute(rows: torch.Tensor, local_counts: list[int]) -> torch.Tensor:
        if rows.shape[0] == 0:
            return rows.new_zeros((0, hidden.shape[-1]), dtype=hidden.dtype)
        ids = torch.repeat_interleave(torch.arange(el, device=rows.device),
                                      torch.tensor(local_counts, device=rows.device))
        ones = torch.ones((rows.shape[0], 1), dtype=weights.dtype, device=rows.device)
        return functional_call(tmpl, state, (rows, ids[:, None], ones))

    y = exchange(x, counts, compute, group)
    if dropped:
        pairs = y.new_zeros((t * k, *y.shape[1:])).index_copy(0, order, y)
    else:
        inv = torch.empty_like(order)
        inv[order] = torch.arange(len(order), device=order.device)
        pairs = y.index_select(0, inv)
    out = (pairs * weights.reshape(-1, 1)).view(t, k, -1).sum(dim=1)
    return out.to(hidden.dtype)


# ============================================================================== ModuleList blocks
class _BlockRun:
    """One call of a ``ModuleList`` block: serves its ``experts[e](x)`` calls (see the module docstring)."""

    def __init__(self, layer: MoeLayer, key: str, experts: dict[int, dict[str, torch.Tensor]], group: str | None,
                 capacity_factor: float | None) -> None:
        self.layer, self.key, self.experts = layer, key, experts
        self.group, self.capacity_factor = group, capacity_factor
        self.ep, self.rank = _ep(group)
        self.mode = "local"
        self.calls: list[tuple[int, torch.Tensor]] = []
        self.replies: list[torch.Tensor] = []
        self.routed = [0] * layer.num_experts
        self.dropped = 0

    # ---------------------------------------------------------------- expert calls from the block's code
    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if self.layer.in_tail is None:
            self.layer.in_tail, self.layer.in_dtype = tuple(x.shape[1:]), x.dtype
        if self.mode == "local":
            self.routed[e] += x.shape[0]
            return self.run_expert(e, x)
        if self.mode == "record":
            self.calls.append((e, x))
            tail, dtype = self.layer.expert_out_meta(e, x)
            return x.new_zeros((x.shape[0], *tail), dtype=dtype)
        if not self.replies:
            raise RuntimeError(f"{self.layer.name}: the block called its experts more often in its second run "
                               "than in its first (is the routing random?)")
        i = len(self.calls) - len(self.replies)
        want_e, want_x = self.calls[i]
        y = self.replies.pop(0)
        if want_e != e or want_x.shape != x.shape:
            raise RuntimeError(f"{self.layer.name}: the block's second run called expert {e} on {tuple(x.shape)} "
                               f"where its first called expert {want_e} on {tuple(want_x.shape)}")
        return y

    def run_expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.layer.experts[e], self.experts[e], (x,))

    def compute(self, rows: torch.Tensor, local_counts: list[int]) -> torch.Tensor:
        """This rank's experts on rows sorted by local expert: one grouped GEMM per linear layer on
        GPUs (when the expert traces to linears and row-wise ops), else a loop over the experts."""
        first = self.rank * len(local_counts)
        grouped = self.layer.grouped
        if grouped is not None and rows.shape[0] and (rows.is_cuda or self.layer.force_grouped) \
                and grouped.fits(rows.dtype):
            try:
                return grouped(rows, local_counts, [self.experts[first + i] for i in range(len(local_counts))])
            except (RuntimeError, NotImplementedError) as e:  # e.g. a dtype this GPU's grouped GEMM lacks
                import warnings

                warnings.warn(f"{self.layer.name}: grouped GEMM unavailable ({e}); looping over experts", stacklevel=2)
                self.layer.grouped = None
        outs, off = [], 0
        for i, n in enumerate(local_counts):
            if n:
                outs.append(self.run_expert(first + i, rows[off:off + n]))
            off += n
        if outs:
            return torch.cat(outs)
        tail, dtype = self.layer.expert_out_meta(first, rows)
        return rows.new_zeros((0, *tail), dtype=dtype)

    # ---------------------------------------------------------------- the dispatch between the two runs
    def dispatch(self) -> None:
        layer, E = self.layer, self.layer.num_experts
        sizes = [x.shape[0] for _, x in self.calls]
        total = sum(sizes)
        cap = capacity(self.capacity_factor, total, E) if self.capacity_factor is not None else None
        used, kept = [0] * E, []
        for (e, _), n in zip(self.calls, sizes):
            keep = n if cap is None else max(0, min(n, cap - used[e]))
            used[e] += keep
            kept.append(keep)
            self.routed[e] += n
        order = sorted(range(len(self.calls)), key=lambda i: self.calls[i][0])
        parts = [self.calls[i][1][:kept[i]] for i in order]
        if parts:
            x = torch.cat(parts)
        else:  # this rank routes nothing here, but its peers may: take part in the exchange anyway
            x = torch.zeros((0, *layer.in_tail), dtype=layer.in_dtype, device=self.device)
        y = exchange(x, used, self.compute, self.group)
        replies: list[torch.Tensor | None] = [None] * len(self.calls)
        off = 0
        for i in order:
            e, xi = self.calls[i]
            part = y[off:off + kept[i]]
            off += kept[i]
            if kept[i] < sizes[i]:
                part = torch.cat([part, part.new_zeros((sizes[i] - kept[i], *part.shape[1:]))])
            replies[i] = part
        self.replies = replies  # type: ignore[assignment]
        self.dropped = total - sum(kept)

    device = torch.device("cpu")


def moe_block(inputs: list[torch.Tensor], params: list[torch.Tensor], key: str, call: int = 0,
              group: str | None = None, capacity_factor: float | None = None, probe: bool = False) -> list[torch.Tensor]:
    """One call of a ``ModuleList`` mixture-of-experts block; returns its outputs' tensor leaves.

    ``params`` are the block's parameters and buffers in ``MoeLayer.names`` order; an expert this
    rank does not hold arrives as an empty tensor and is never read. ``probe``: run the block's code
    once with experts that return zeros, only to learn the outputs' structure and shapes (capture).
    """
    layer = get_layer(key)
    spec = layer.calls[call]
    leaves = list(spec.in_consts)
    it = iter(inputs)
    leaves = [next(it) if c is None else c for c in leaves]
    args, kwargs = tree_unflatten(leaves, spec.in_spec)
    dense: dict[str, torch.Tensor] = {}
    experts: dict[int, dict[str, torch.Tensor]] = {}
    for name, e, p in zip(layer.names, layer.expert_of, params):
        if e < 0:
            dense[name] = p
        else:
            experts.setdefault(e, {})[name[len(layer.experts_path) + 1:].split(".", 1)[1]] = p
    run = _BlockRun(layer, key, experts, group, capacity_factor)
    if inputs:
        run.device = inputs[0].device

    def call_block(a: tuple, kw: dict) -> Any:
        layer.state = run
        try:
            return functional_call(layer.template, dense, tuple(a), kw)
        finally:
            layer.state = None

    if probe:
        run.mode = "record"
        out = call_block(args, kwargs)
    elif run.ep == 1 and capacity_factor is None:
        out = call_block(args, kwargs)
    else:
        rng = _rng_state(run.device)
        clone = [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]
        run.mode = "record"
        call_block(*tree_unflatten(clone, spec.in_spec))  # result dropped: only the expert calls matter
        run.dispatch()
        _set_rng_state(rng, run.device)
        run.mode = "replay"
        out = call_block(args, kwargs)
        if run.replies:
            raise RuntimeError(f"{layer.name}: the block called its experts fewer times in its second run than in its "
                               "first (is the routing random?)")
    rows = sum(x.shape[0] for _, x in run.calls) if probe else sum(run.routed)
    if not probe:
        _record(key, run.routed, run.dropped)
    if layer.top_k is None and inputs and inputs[0].dim() >= 2:  # rows per token: the block's k
        tokens = math.prod(inputs[0].shape[:-1])
        if tokens and rows % tokens == 0:
            layer.top_k = rows // tokens
    out_leaves, out_spec = tree_flatten(out)
    if spec.out_spec is None:  # first run (at capture): remember the structure the graph will expect
        spec.out_spec = out_spec
        spec.out_consts = [None if isinstance(x, torch.Tensor) else x for x in out_leaves]
    elif out_spec != spec.out_spec:
        raise RuntimeError(f"{layer.name}: the block returned {out_spec}, the captured graph expects {spec.out_spec}")
    return [x for x in out_leaves if isinstance(x, torch.Tensor)]


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


# ============================================================================== gradients
class ExpertGradientSync:
    """Gradient averaging when experts are split over ``ep``.

    Each rank's loss is the mean over its slice of the batch, which is cut into ``dp·ep`` slices.
    A dense parameter's gradient is the average over those ``dp·ep`` ranks. An expert's parameters
    live on one ``ep`` rank per ``dp`` row; the all-to-all backward already brought that rank the
    gradient of every loss in its ``ep`` group, so it is *summed* over the ``dp`` ranks that hold the
    same expert and divided by ``dp·ep``. Two :class:`GradientSync` objects, one per group.
    """

    def __init__(self, params: dict[str, torch.nn.Parameter], buckets: list[list[str]], is_expert: Callable[[str], bool],
                 dense_group: str, expert_group: str, data_size: int, expected: dict[str, int] | None = None) -> None:
        dense = [[n for n in b if not is_expert(n)] for b in buckets]
        experts = [[n for n in b if is_expert(n)] for b in buckets]
        self.dense = GradientSync(params, dense, dense_group, data_size, expected=expected)
        self.experts = GradientSync(params, experts, expert_group, data_size, expected=expected)
        self.max_inflight = self.dense.max_inflight + self.experts.max_inflight

    @property
    def buckets(self) -> list[list[str]]:
        """Every bucket of both groups (dense first), as :class:`GradientSync` lists its own."""
        return self.dense.buckets + self.experts.buckets

    def begin(self) -> None:
        self.dense.begin()
        self.experts.begin()

    def finish(self) -> None:
        self.dense.finish()
        self.experts.finish()

    def remove(self) -> None:
        self.dense.remove()
        self.experts.remove()
