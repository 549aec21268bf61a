"""Expert-parallel pass: mixture-of-experts layers found in an unmodified model, experts split over ``ep``.

Problem. A mixture-of-experts (MoE) layer routes each token to ``k`` of ``E`` experts: a router
(a linear map to ``E`` logits, softmax or sigmoid, top-k) picks experts and weights, the experts
(MLPs) run on the tokens routed to them, and the outputs are summed with the routing weights. Given
``ep`` ranks that see different tokens, place ``E / ep`` experts on each and rewrite the layer so
that tokens travel to their experts and back (all-to-all), computing exactly the layer's function.

Why the layer is recognised on the *module*, not in the graph. What the experts do with their tokens
is data-dependent: ``ModuleList`` experts are looped over with ``torch.where(index == e)`` (shapes
that depend on the routing), fused 3-D expert weights go through sorts, histograms and grouped
matmuls. Exported, that is either unbacked symbolic shapes or a long chain of index arithmetic;
matching it op by op would break with every variant of the same idea. So before capture
:func:`find_moe_layers` looks for the two forms real models use, and during capture
:func:`intercept_moe` makes each one a single shape-static custom op in the graph:

* **fused experts** (Hugging Face transformers 5 Mixtral, Qwen-MoE, ... whatever their
  ``experts_implementation``: grouped matmuls, per-expert indexing or the eager loop): a module
  whose parameters are ``[E, ...]`` tensors and whose forward takes ``(hidden [T, H], top_k_index
  [T, k], top_k_weights [T, k])``. Only the experts become ``autoshard::moe_experts``; the router,
  its top-k, the auxiliary load-balancing loss and any shared expert stay the model's own graph
  nodes (and are tensor-parallel like any other).
* **ModuleList blocks**: a module with a ``ModuleList`` of ``E`` identical experts and a router
  (a linear map to ``E`` logits) whose own code loops over the experts. The block becomes
  ``autoshard::moe_block``; at run time the block's code still runs as written (router, routing,
  weighted sum), and only its calls ``experts[e](x_e)`` are served by the dispatch.

The graph is then checked: for fused experts the router is found by walking from the top-k indices
back through ``topk`` and ``softmax``/``sigmoid`` to a parameter ``linear``. :func:`apply_expert_parallel`
replaces each custom op by a call into :mod:`autoshard.runtime.moe` that dispatches tokens over the
``ep`` group, so ``print(graph)`` shows every MoE layer and its group. The user's model is never
changed: forwards are patched only for the duration of the export and put back.
"""

from __future__ import annotations

import contextlib
import inspect
import operator
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.utils._pytree import tree_flatten, tree_unflatten

from autoshard.runtime import moe as M
from autoshard.runtime.errors import PlanError

aten = torch.ops.aten


# ============================================================================== the ops capture sees
@torch.library.custom_op("autoshard::moe_experts", mutates_args=())
def _moe_experts_op(hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, params: list[torch.Tensor],
                    key: str) -> torch.Tensor:
    raise RuntimeError("autoshard::moe_experts is a capture-time stand-in; the expert-parallel pass replaces it "
                       "(apply_expert_parallel) before the graph runs")


@_moe_experts_op.register_fake
def _(hidden, index, weights, params, key):
    return torch.empty_like(hidden)


@torch.library.custom_op("autoshard::moe_block", mutates_args=())
def _moe_block_op(inputs: list[torch.Tensor], params: list[torch.Tensor], key: str, call: int) -> list[torch.Tensor]:
    raise RuntimeError("autoshard::moe_block is a capture-time stand-in; the expert-parallel pass replaces it "
                       "(apply_expert_parallel) before the graph runs")


@_moe_block_op.register_fake
def _(inputs, params, key, call):
    """Output shapes come from running the block's own code once on random real tensors of the
    inputs' shapes (its routing loop has data-dependent shapes that fake tensors cannot follow),
    with experts that return zeros instead of computing."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily(), torch.no_grad(), torch.random.fork_rng(devices=[]):
        real_in = [_random_like(x) for x in inputs]
        experts_of = M.get_layer(key).expert_of  # the probe's experts return zeros: their weights are never read
        real_params = [_random_like(p) if e < 0 else torch.empty(0, dtype=p.dtype) for p, e in zip(params, experts_of)]
        outs = M.moe_block(real_in, real_params, key, call, probe=True)
        metas = [(tuple(o.shape), o.dtype) for o in outs]
    like = inputs[0] if inputs else params[0]
    return [like.new_empty(s, dtype=d) for s, d in metas]


def _random_like(x: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if x.is_floating_point():
        return (torch.randn(tuple(x.shape), generator=g) * 0.02).to(x.dtype)
    if x.dtype == torch.bool:
        return torch.ones(tuple(x.shape), dtype=torch.bool)
    return torch.zeros(tuple(x.shape), dtype=x.dtype)


MOE_OPS = (torch.ops.autoshard.moe_experts.default, torch.ops.autoshard.moe_block.default)


# ============================================================================== recognition
def _state(module: torch.nn.Module) -> list[tuple[str, torch.Tensor, bool]]:
    """(name, tensor, is_parameter) of a module's parameters then buffers, each tensor once."""
    seen: set[int] = set()
    out = []
    for n, p in module.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append((n, p, True))
    for n, b in module.named_buffers():
        if id(b) not in seen:
            seen.add(id(b))
            out.append((n, b, False))
    return out


def _fused_experts(module: torch.nn.Module) -> int | None:
    """``E`` if ``module`` holds fused experts: direct parameters ``[E, ...]`` (at least one 3-D)
    and a forward taking (hidden, top_k_index, top_k_weights)."""
    direct = [p for p in module.parameters(recurse=False)]
    if not direct or any(p.dim() < 2 for p in direct) or not any(p.dim() >= 3 for p in direct):
        return None
    lead = {p.shape[0] for p in direct}
    if len(lead) != 1 or next(iter(lead)) < 2:
        return None
    try:
        sig = inspect.signature(type(module).forward)
    except (TypeError, ValueError):
        return None
    positional = [p for p in list(sig.parameters.values())[1:]
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return next(iter(lead)) if len(positional) >= 3 else None


def _expert_in_features(expert: torch.nn.Module) -> int | None:
    for m in expert.modules():
        if isinstance(m, torch.nn.Linear):
            return m.in_features
    for p in expert.parameters():
        if p.dim() == 2:
            return p.shape[1]
    return None


def _modulelist_block(module: torch.nn.Module) -> tuple[str, int, str] | None:
    """(experts path, E, router name) if ``module`` is a block with a ``ModuleList`` of identical
    experts and a router: a linear map from the experts' input features to ``E`` logits."""
    for path, child in module.named_children():
        if not isinstance(child, torch.nn.ModuleList) or len(child) < 2:
            continue
        experts = list(child)
        first = experts[0]
        shapes = [(n, tuple(p.shape)) for n, p in first.named_parameters()]
        if not shapes or any(type(e) is not type(first) or [(n, tuple(p.shape)) for n, p in e.named_parameters()] != shapes
                             for e in experts):
            continue
        if any(isinstance(m, torch.nn.ModuleList) for e in experts for m in e.modules()):
            continue
        E, h = len(experts), _expert_in_features(first)
        for rname, m in module.named_modules():
            if rname == path or rname.startswith(path + "."):
                continue
            w = getattr(m, "weight", None)
            is_router = isinstance(m, torch.nn.Linear) or any(s in type(m).__name__.lower() for s in ("router", "gate"))
            if is_router and isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[0] == E and w.shape[1] == h:
                return path, E, f"{rname}.weight" if rname else "weight"
    return None


def find_moe_layers(model: torch.nn.Module, namespace: str) -> dict[str, M.MoeLayer]:
    """Every mixture-of-experts layer of ``model``, registered with the runtime under ``namespace + name``.

    A ``ModuleList`` block claims everything inside it; fused experts are looked for elsewhere.
    """
    found: dict[str, M.MoeLayer] = {}
    claimed: set[int] = set()
    for name, mod in model.named_modules():
        if id(mod) in claimed:
            continue
        block = _modulelist_block(mod)
        if block is not None:
            path, E, router = block
            experts = list(mod.get_submodule(path))
            names, expert_of, stacked = [], [], []
            for n, _, _ in _state(mod):
                names.append(n)
                e = -1
                if n.startswith(path + "."):
                    e = int(n[len(path) + 1:].split(".", 1)[0])
                expert_of.append(e)
                stacked.append(False)
            layer = M.MoeLayer(name=name, kind="block", num_experts=E, names=names, expert_of=expert_of,
                               stacked=stacked, template=torch.nn.Module(), experts_path=path,
                               router=f"{name}.{router}" if name else router)
            layer.template = M._meta_copy(mod, {id(ex): M.ExpertCall(i, layer) for i, ex in enumerate(experts)})
            layer.experts = [M._meta_copy(ex) for ex in experts]
            layer.grouped = M.GroupedExperts.build(layer.experts[0])
            claimed |= {id(m) for m in mod.modules()}
        else:
            E = _fused_experts(mod)
            if E is None:
                continue
            st = _state(mod)
            layer = M.MoeLayer(name=name, kind="fused", num_experts=E, names=[n for n, _, _ in st],
                               expert_of=[-1] * len(st),
                               stacked=[is_p and t.dim() >= 2 and t.shape[0] == E for _, t, is_p in st],
                               template=M._meta_copy(mod))
            claimed |= {id(m) for m in mod.modules()}
        key = namespace + name
        M.register_layer(key, layer)
        found[key] = layer
    return found


# ============================================================================== capture
@contextlib.contextmanager
def intercept_moe(model: torch.nn.Module, layers: dict[str, M.MoeLayer] | None) -> Iterator[None]:
    """While exporting, make each MoE layer of ``layers`` one custom op (see the module docstring).

    The forwards are instance attributes set here and removed afterwards: the model is unchanged.
    """
    if not layers:
        yield
        return
    patched: list[tuple[torch.nn.Module, Any]] = []
    try:
        for key, layer in layers.items():
            mod = model.get_submodule(layer.name)
            had = mod.__dict__.get("forward", _MISSING)
            fwd = _fused_forward(key, layer, mod) if layer.kind == "fused" else _block_forward(key, layer, mod)
            mod.forward = fwd
            patched.append((mod, had))
        yield
    finally:
        for mod, had in patched:
            if had is _MISSING:
                del mod.forward
            else:
                mod.forward = had


_MISSING = object()


def _tensors_of(mod: torch.nn.Module, layer: M.MoeLayer) -> list[torch.Tensor]:
    st = {n: t for n, t, _ in _state(mod)}
    return [st[n] for n in layer.names]


def _fused_forward(key: str, layer: M.MoeLayer, mod: torch.nn.Module):
    original = type(mod).forward
    sig = inspect.signature(original)

    def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        bound = sig.bind(mod, *args, **kwargs)
        vals = list(bound.arguments.values())[1:4]
        hidden, index, weights = (vals + [None] * 3)[:3]
        ok = (isinstance(hidden, torch.Tensor) and hidden.dim() == 2 and hidden.is_floating_point()
              and isinstance(index, torch.Tensor) and index.dim() == 2 and not index.is_floating_point()
              and isinstance(weights, torch.Tensor) and tuple(weights.shape) == tuple(index.shape)
              and index.shape[0] == hidden.shape[0] and len(bound.arguments) == 4)
        if not ok:  # not the interface we route: leave it to the model's own code, and say so in the plan
            layer.unrecognised = ("holds fused experts [E, ...] but is not called as experts(hidden [tokens, "
                                  "features], top_k_index [tokens, k], top_k_weights [tokens, k])")
            return original(mod, *args, **kwargs)
        layer.top_k = int(index.shape[1])
        return torch.ops.autoshard.moe_experts(hidden, index, weights, _tensors_of(mod, layer), key)

    return forward


def _block_forward(key: str, layer: M.MoeLayer, mod: torch.nn.Module):
    def forward(*args: Any, **kwargs: Any) -> Any:
        call = len(layer.calls)
        leaves, spec = tree_flatten((args, kwargs))
        layer.calls[call] = M.CallSpec(spec, [None if isinstance(x, torch.Tensor) else x for x in leaves])
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        outs = torch.ops.autoshard.moe_block(tensors, _tensors_of(mod, layer), key, call)
        cs = layer.calls[call]
        it = iter(outs)
        return tree_unflatten([next(it) if c is None else c for c in cs.out_consts], cs.out_spec)

    return forward


# ============================================================================== plan
@dataclass
class ExpertParallelPlan:
    """Which parameters are experts and where each lives. Plain data apart from the layer objects."""

    ep: int
    capacity_factor: float | None
    layers: dict[str, M.MoeLayer]
    # full parameter name → ("stacked", E): dim 0 is the expert, split in ep equal slices;
    # ("expert", e): the whole tensor belongs to expert e (a ModuleList expert)
    params: dict[str, tuple[str, int]] = field(default_factory=dict)
    num_experts: dict[str, int] = field(default_factory=dict)  # full parameter name → E of its layer

    def is_expert(self, name: str) -> bool:
        return name in self.params

    def owner(self, name: str) -> int | None:
        """The ep coordinate that holds a ModuleList expert's parameter (None: not one)."""
        kind, e = self.params.get(name, ("", -1))
        return e // (self.num_experts[name] // self.ep) if kind == "expert" else None

    def local(self, name: str, full: torch.Tensor, ep_rank: int) -> torch.Tensor:
        """This ep rank's piece of parameter ``name``: its experts' slice of a fused tensor, a
        ModuleList expert's tensor whole on its owner and empty (``[0, ...]``) elsewhere."""
        kind, _ = self.params.get(name, ("", -1))
        if kind == "stacked":
            per = full.shape[0] // self.ep
            return full[ep_rank * per:(ep_rank + 1) * per]
        if kind == "expert":
            return full if self.owner(name) == ep_rank else full[:0]
        return full

    def to_dict(self) -> dict[str, Any]:
        return {
            "ep": self.ep, "capacity_factor": self.capacity_factor,
            "layers": [{"name": ly.name, "kind": "fused experts" if ly.kind == "fused" else "ModuleList block",
                        "experts": ly.num_experts, "experts_per_rank": ly.num_experts // self.ep,
                        "router": ly.router, "top_k": ly.top_k,
                        "expert_params": [_full(ly.name, n) for n, e, s in zip(ly.names, ly.expert_of, ly.stacked)
                                          if e >= 0 or s]}
                       for ly in self.layers.values()],
        }


def _full(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def plan_expert_parallel(layers: dict[str, M.MoeLayer], ep: int, capacity_factor: float | None) -> ExpertParallelPlan:
    """Check that ``ep`` fits every layer and name each expert parameter's placement.

    Raises :class:`PlanError` for a number of experts that ``ep`` does not divide, a bad capacity
    factor, or ``ep > 1`` on a model without MoE layers.
    """
    if capacity_factor is not None and (isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float))
                                        or not capacity_factor > 0):
        raise PlanError(f"capacity_factor={capacity_factor!r} must be None (dropless) or a positive number "
                        "(GShard capacity: each expert takes ceil(capacity_factor * routed rows / E) rows per rank)")
    if ep > 1 and not layers:
        raise PlanError(f"ep={ep} splits experts over ranks, but no mixture-of-experts layer was found in the model "
                        "(a module with fused [E, ...] expert weights called as experts(hidden, top_k_index, "
                        "top_k_weights), or a ModuleList of identical experts next to a linear router with E outputs); "
                        "put these ranks in dp instead")
    plan = ExpertParallelPlan(ep, float(capacity_factor) if capacity_factor is not None else None, dict(layers))
    for layer in layers.values():
        E = layer.num_experts
        if E % ep:
            divisors = [d for d in range(1, E + 1) if E % d == 0]
            raise PlanError(f"{layer.name}: {E} experts cannot be split over ep={ep} ({E} % {ep} = {E % ep}); "
                            f"use an ep that divides {E} (one of {divisors}) and put the remaining ranks in dp")
        for n, e, s in zip(layer.names, layer.expert_of, layer.stacked):
            full = _full(layer.name, n)
            if s:
                plan.params[full] = ("stacked", E)
            elif e >= 0:
                plan.params[full] = ("expert", e)
            else:
                continue
            plan.num_experts[full] = E
    return plan


# ============================================================================== pass
_PASS_THROUGH = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.to.dtype, aten._to_copy.default,
                 aten.alias.default, aten.clone.default, aten.detach.default, aten.contiguous.default,
                 aten.to.dtype_layout, aten.expand.default}
_SCORES = {aten.softmax.int, aten._softmax.default, aten.sigmoid.default, aten.log_softmax.int}


def _router_of(index: Node) -> tuple[str | None, int | None]:
    """Walk from the top-k indices back to the router: ``topk`` ← softmax/sigmoid ← parameter linear."""
    cur: Any = index
    while isinstance(cur, Node) and cur.target in _PASS_THROUGH:
        cur = cur.args[0]
    if not (isinstance(cur, Node) and cur.target is operator.getitem):
        return None, None
    topk = cur.args[0]
    if not (isinstance(topk, Node) and topk.target == aten.topk.default):
        return None, None
    k = int(topk.args[1])
    cur, seen_score = topk.args[0], False
    for _ in range(16):
        if not isinstance(cur, Node):
            break
        if cur.target in _SCORES:
            seen_score = True
        elif cur.target in (aten.linear.default, aten.mm.default, aten.matmul.default, aten.addmm.default):
            w = cur.args[2] if cur.target == aten.addmm.default else cur.args[1]
            while isinstance(w, Node) and w.target in (aten.t.default, aten.transpose.int, aten.permute.default):
                w = w.args[0]
            if isinstance(w, Node) and w.op == "get_attr" and seen_score:
                return str(w.target), k
            break
        elif cur.target not in _PASS_THROUGH and cur.target not in (aten.add.Tensor, aten.mul.Tensor, aten.div.Tensor):
            break
        cur = cur.args[0]
    return None, k


def moe_nodes(gm: GraphModule) -> list[Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in MOE_OPS]


def apply_expert_parallel(gm: GraphModule, plan: ExpertParallelPlan, group: str | None) -> GraphModule:
    """Replace every MoE stand-in of ``gm`` by its runtime call over ``group`` (the ep group key; None
    for ep=1: experts run where the tokens are). Fills in each layer's router from the graph."""
    for node in moe_nodes(gm):
        if node.target == torch.ops.autoshard.moe_experts.default:
            hidden, index, weights, params, key = node.args
            layer = plan.layers[key]
            router, k = _router_of(index)
            layer.router = layer.router or router
            layer.top_k = layer.top_k or k
            node.target = M.moe_experts
            node.args = (hidden, index, weights, params, key, group, plan.capacity_factor)
        else:
            inputs, params, key, call = node.args
            node.target = M.moe_block
            node.args = (inputs, params, key, call, group, plan.capacity_factor)
        node.kwargs = {}
    gm.graph.lint()
    gm.recompile()
    return gm
