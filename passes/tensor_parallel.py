"""Tensor-parallel pass: Megatron-style splits found by propagating placements through the graph.

Problem. Given an aten-level training graph and a tensor-parallel degree ``tp``, choose for each
parameter a placement on the ``tp`` mesh dimension (Replicate, or Shard of one dim) and rewrite the
graph into the program one rank runs, such that the ranks together compute exactly the original
function, with as few collectives as possible.

Method. Parameters are decided greedily in topological order while placements are propagated
through the graph by the rule table in :mod:`sharding_rules`:

* a parameter matmul whose input is replicated becomes **column-parallel** (weight split on its
  output features, result ``Shard(-1)``); one whose input is feature-sharded becomes
  **row-parallel** (weight split on its input features, result ``Partial``), so column/row pairs
  cost one all-reduce, as in Megatron-LM. A fused projection whose output is split into equal
  pieces (GPT-2's ``c_attn`` → q, k, v) is sharded in *blocks*, each piece split on its own;
* an embedding indexed by the model's input ids is **vocab-parallel** (rows split, ``Partial``);
* everything else follows the placements of its inputs (heads follow ``view``/``transpose``
  into ``scaled_dot_product_attention``); an op with no rule runs replicated.

A column-parallel choice whose shard is immediately gathered again (a view that cannot keep the
split, such as 2 kv-heads on tp=4, or a reduction over the split dim) is reverted to replicated
and propagation re-runs, until the plan is stable. Vocab-sized projections (the LM head) keep
their split: the logits are gathered once at the output.

The pass is pure: :func:`plan_tensor_parallel` returns layouts and :func:`apply_tensor_parallel`
returns the rewritten graph module; both run on a virtual mesh (only ``tp`` and a group key).
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field

import torch
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import Placement
from torch.fx import GraphModule, Node

from autoshard.runtime import collectives as C
from autoshard.runtime import tp_ops
from autoshard.runtime.errors import PlanError
from autoshard.runtime.plan import ParamPlan, parse_placement, placement_str

from .sharding_rules import Context, Decision, P, R, is_tensor, op_name, replicate_rule, rule_for, shape, tensor_inputs

aten = torch.ops.aten

_PARAM_MATMULS = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default}


def source_line(node: Node) -> str:
    """``file:line`` of the user code that produced ``node`` (the last frame of its stack trace)."""
    st = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+)', st)
    if not frames:
        return "?"
    f, ln = frames[-1]
    return f"{f.split('/')[-1]}:{ln}"


def module_path(node: Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return re.sub(r"^L\['self'\]\.?", "", str(path))


def canonical_params(gm: GraphModule) -> dict[str, list[str]]:
    """Each distinct parameter tensor under the name the graph loads it by → its other names.

    Tied weights (GPT-2's ``wte``/``lm_head``) are one tensor with several names; the graph uses one.
    """
    groups: dict[int, list[str]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for n, p in gm.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(n)
        tensors[id(p)] = p
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr" and n.users}
    out: dict[str, list[str]] = {}
    for names in groups.values():
        canon = next((n for n in names if n in used), names[0])
        out[canon] = [n for n in names if n != canon]
    return out


def param_nodes(gm: GraphModule) -> dict[Node, str]:
    """get_attr nodes that load a trainable parameter → the parameter's name."""
    names = {n for n, _ in gm.named_parameters(remove_duplicate=False)}
    return {n: n.target for n in gm.graph.nodes if n.op == "get_attr" and n.target in names}


@dataclass
class Propagation:
    """Result of one propagation: placements per node and the decisions that produced them."""

    ctx: Context
    decisions: dict[Node, Decision]
    layouts: dict[str, ParamPlan]
    needs_grad: dict[Node, bool]
    gathered_origins: set[str] = field(default_factory=set)
    fallbacks: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class _Propagator:
    def __init__(self, gm: GraphModule, tp: int, layouts: dict[str, ParamPlan], forced_r: set[str]) -> None:
        self.gm = gm
        self.tp = tp
        self.layouts = dict(layouts)
        self.forced_r = forced_r
        self.params = param_nodes(gm)
        self.ctx = Context(tp)
        self.origin: dict[Node, frozenset[str]] = {}
        self.from_input: set[Node] = set()
        self.needs_grad: dict[Node, bool] = {}
        self.decisions: dict[Node, Decision] = {}
        self.gathered: set[str] = set()
        self.fallbacks: list[dict] = []
        self.notes: list[str] = []

    # ---------------------------------------------------------------- helpers
    def _param_shape(self, name: str) -> list[int]:
        return list(self.gm.get_parameter(name).shape)

    def _layout(self, name: str, placement: Placement, role: str, blocks: int = 1) -> ParamPlan:
        shp = self._param_shape(name)
        local = list(shp)
        if isinstance(placement, Shard):
            local[placement.dim] //= self.tp
        lay = ParamPlan(shape=shp, placement=placement_str(placement), local_shape=local, role=role, blocks=blocks)
        self.layouts[name] = lay
        return lay

    def _fused_blocks(self, node: Node, n_out: int) -> int:
        """Equal pieces that the output's last dim is split into right after ``node`` (fused qkv)."""
        cur = node
        while len(cur.users) == 1:
            u = next(iter(cur.users))
            if u.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default) and shape(u) and shape(u)[-1] == n_out:
                cur = u
                continue
            if u.target in (aten.split.Tensor, aten.split_with_sizes.default) and shape(cur):
                nd = len(shape(cur))
                dim = u.args[2] if len(u.args) > 2 else u.kwargs.get("dim", 0)
                if dim % nd != nd - 1:
                    return 1
                sizes = [int(t.shape[dim]) for t in u.meta["val"]]
                if len(set(sizes)) == 1 and len(sizes) > 1:
                    return len(sizes)
            return 1
        return 1

    # ---------------------------------------------------------------- param ops
    def _param_matmul(self, node: Node) -> Decision | None:
        t = node.target
        if t == aten.linear.default:
            x, w = node.args[0], node.args[1]
            b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            out_dim, in_dim = 0, 1
        elif t == aten.addmm.default:
            b, x, w = node.args[0], node.args[1], node.args[2]
            out_dim, in_dim = 1, 0
        elif t in (aten.mm.default, aten.matmul.default):
            x, w, b = node.args[0], node.args[1], None
            out_dim, in_dim = 1, 0
        else:
            return None
        if w not in self.params or len(shape(w)) != 2 or node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return None
        wname = self.params[w]
        bname = self.params.get(b) if isinstance(b, Node) else None
        if isinstance(b, Node) and bname is None:
            return None  # bias is an activation: leave to the generic rules
        xs = self.ctx.placement(x)
        nx = len(shape(x))
        n_out, k_in = shape(w)[out_dim], shape(w)[in_dim]
        lay = self.layouts.get(wname)
        if lay is None:
            if self.tp == 1 or wname in self.forced_r:
                lay = self._layout(wname, R, "replicated")
            elif isinstance(xs, Shard) and xs.dim == nx - 1 and self.ctx.blocks.get(x, 1) == 1 and k_in % self.tp == 0:
                lay = self._layout(wname, Shard(in_dim), "row")
            elif not isinstance(xs, Shard) and n_out % self.tp == 0:
                blocks = self._fused_blocks(node, n_out)
                if n_out % (blocks * self.tp):
                    blocks = 1
                lay = self._layout(wname, Shard(out_dim), "column", blocks)
            else:
                lay = self._layout(wname, R, "replicated")
                self.notes.append(f"{wname}: replicated; neither its {n_out} output features nor its "
                                  f"{k_in} input features split over tp={self.tp} with its input here")
            if bname is not None and bname not in self.layouts:
                if lay.role == "column":
                    self._layout(bname, Shard(0), "column", lay.blocks)
                else:
                    self._layout(bname, R, "replicated")
        wp = lay.placement
        req: dict[Node, Placement] = {}
        if wp == f"S({out_dim})":
            req[x] = R
            req[w] = Shard(out_dim)
            if bname is not None:
                req[b] = Shard(0)
            self.ctx.blocks[node] = lay.blocks
            self.origin[node] = frozenset({wname})
            return Decision(Shard(len(shape(node)) - 1), req)
        if wp == f"S({in_dim})":
            req[x] = Shard(nx - 1)
            req[w] = Shard(in_dim)
            if bname is not None:
                req[b] = R
                return Decision(R, req, rewrite="row_bias")
            return Decision(P, req)
        # replicated weight: shard only along batch dims of x
        req[w] = R
        if bname is not None:
            req[b] = R
        if isinstance(xs, Shard) and xs.dim < nx - 1:
            req[x] = xs
            return Decision(xs, req)
        req[x] = R
        return Decision(R, req)

    def _embedding(self, node: Node) -> Decision | None:
        w, ids = node.args[0], node.args[1]
        if w not in self.params:
            return None
        wname = self.params[w]
        padding_idx = node.args[2] if len(node.args) > 2 else -1
        lay = self.layouts.get(wname)
        if lay is None:
            v = self._param_shape(wname)[0]
            if self.tp > 1 and wname not in self.forced_r and ids in self.from_input and padding_idx in (-1, None) and v % self.tp == 0:
                lay = self._layout(wname, Shard(0), "vocab")
            else:
                lay = self._layout(wname, R, "replicated")
                if self.tp > 1:
                    why = ("its indices are computed inside the model, not read from the inputs"
                           if ids not in self.from_input else
                           "it has a padding_idx" if padding_idx not in (-1, None) else
                           f"{v} rows do not split over tp={self.tp}")
                    self.notes.append(f"{wname}: embedding kept replicated ({why})")
        if lay.placement == "S(0)" and padding_idx in (-1, None):
            return Decision(P, {w: Shard(0), ids: R}, rewrite="vocab_embedding")
        if lay.placement == "S(1)":
            return Decision(Shard(len(shape(node)) - 1), {w: Shard(1), ids: R})
        ids_s = self.ctx.placement(ids)
        if isinstance(ids_s, Shard):
            return Decision(ids_s, {w: R, ids: ids_s})
        return Decision(R, {w: R, ids: R})

    # ---------------------------------------------------------------- driver
    def run(self) -> Propagation:
        ctx = self.ctx
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                ctx.spec[node] = R
                self.from_input.add(node)
                self.needs_grad[node] = False
                self.decisions[node] = Decision(R, {})
                continue
            if node.op == "get_attr":
                name = self.params.get(node)
                if name is not None and name in self.layouts:
                    ctx.spec[node] = parse_placement(self.layouts[name].placement)
                else:
                    ctx.spec[node] = R  # decided at first use (see _param_matmul / _embedding)
                self.needs_grad[node] = name is not None
                self.decisions[node] = Decision(ctx.spec[node], {})
                continue
            if node.op == "output":
                outs = [a for a in node.all_input_nodes if is_tensor(a)]
                d = Decision(R, {a: R for a in outs})
                self._account(node, d, at_output=True)
                self.decisions[node] = d
                continue
            d = None
            if node.op == "call_function":
                if node.target in _PARAM_MATMULS:
                    d = self._param_matmul(node)
                elif node.target == aten.embedding.default:
                    d = self._embedding(node)
                if d is None:
                    d = rule_for(node)(node, ctx)
            else:  # call_module: opaque, run replicated
                d = replicate_rule(node, ctx)
            # parameters decided just now: their get_attr spec becomes the layout's placement
            for a in list(d.req):
                if a in self.params and self.params[a] in self.layouts:
                    ctx.spec[a] = parse_placement(self.layouts[self.params[a]].placement)
            self._account(node, d)
            ctx.spec[node] = d.out
            self.decisions[node] = d
            ins = tensor_inputs(node)
            val = node.meta.get("val")
            floating = isinstance(val, torch.Tensor) and val.is_floating_point() or isinstance(val, (tuple, list))
            self.needs_grad[node] = bool(floating and any(self.needs_grad.get(a, False) for a in node.all_input_nodes))
            if node.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.to.dtype,
                               aten._to_copy.default, aten.to.dtype_layout, aten.alias.default) and ins and ins[0] in self.from_input:
                self.from_input.add(node)
            if node not in self.origin:
                if node.target == operator.getitem:
                    self.origin[node] = self.origin.get(node.args[0], frozenset())
                elif _not_replicated(d.out):
                    self.origin[node] = frozenset().union(*(self.origin.get(a, frozenset()) for a in ins))
        return Propagation(ctx, self.decisions, self.layouts, self.needs_grad, self.gathered, self.fallbacks, self.notes)

    def _account(self, node: Node, d: Decision, at_output: bool = False) -> None:
        """Note inputs that must be gathered: fallbacks for the plan, origins for re-planning."""
        for a, r in d.req.items():
            cur = self.ctx.placement(a)
            if isinstance(cur, Shard) and not isinstance(r, Shard):
                if not at_output:
                    self.gathered |= self.origin.get(a, frozenset())
            elif isinstance(cur, Shard) and isinstance(r, Shard) and cur.dim != r.dim:
                self.gathered |= self.origin.get(a, frozenset())
        if d.indivisible:
            x = node.args[0]
            self.gathered |= self.origin.get(x, frozenset())
        if d.fallback and not at_output:
            self.fallbacks.append({
                "node": node.name, "op": op_name(node), "reason": d.fallback,
                "source": source_line(node), "module": module_path(node),
            })


# =============================================================================== planning
@dataclass
class TensorParallelPlan:
    layouts: dict[str, ParamPlan]
    fallbacks: list[dict]
    notes: list[str]


def plan_tensor_parallel(gm: GraphModule, tp: int, layouts: dict[str, ParamPlan] | None = None) -> TensorParallelPlan:
    """Choose a placement for every parameter (or check given ``layouts``) on ``tp`` ranks."""
    if layouts is not None:
        prop = _Propagator(gm, tp, layouts, set()).run()
        return TensorParallelPlan(prop.layouts, prop.fallbacks, [])
    forced: set[str] = set()
    notes: list[str] = []
    for _ in range(64):
        result = _Propagator(gm, tp, {}, forced).run()
        vocab = {lay.shape[0] for lay in result.layouts.values() if lay.role == "vocab"}
        revert = {
            n for n in result.gathered_origins
            if result.layouts.get(n) and result.layouts[n].role == "column"
            and result.layouts[n].shape[parse_placement(result.layouts[n].placement).dim] not in vocab
        }
        revert -= forced
        if not revert:
            break
        for n in sorted(revert):
            notes.append(f"{n}: kept replicated; a column split of it would be gathered right away")
        forced |= revert
    _check_attention(gm, result, tp)
    notes += result.notes
    # parameters never reached by a matmul/embedding rule: replicated
    for name, aliases in canonical_params(gm).items():
        if name not in result.layouts:
            shp = list(gm.get_parameter(name).shape)
            result.layouts[name] = ParamPlan(shape=shp, placement="R", local_shape=shp, role="replicated")
        result.layouts[name].aliases = aliases
    return TensorParallelPlan(result.layouts, result.fallbacks, notes)


def _check_attention(gm: GraphModule, prop: Propagation, tp: int) -> None:
    if tp == 1:
        return
    for node in gm.graph.nodes:
        if node.target != aten.scaled_dot_product_attention.default:
            continue
        q = node.args[0]
        heads = shape(q)[1] if shape(q) and len(shape(q)) == 4 else None
        if heads is not None and heads % tp:
            where = module_path(node) or node.name
            divisors = [d for d in range(1, heads + 1) if heads % d == 0]
            raise PlanError(
                f"{where}: {heads} attention heads cannot be split over tp={tp} "
                f"({heads} % {tp} = {heads % tp}); use a tp that divides {heads} "
                f"(one of {divisors}) and put the remaining ranks in dp"
            )


# =============================================================================== rewrite
def _local_shape(global_shape: tuple[int, ...], p: Placement, tp: int) -> list[int]:
    out = list(global_shape)
    if isinstance(p, Shard):
        out[p.dim] //= tp
    return out


def apply_tensor_parallel(gm: GraphModule, tp_plan: TensorParallelPlan, tp: int, group: str) -> tuple[GraphModule, list[dict]]:
    """Rewrite ``gm`` in place into one rank's program; returns it and the collectives it inserted."""
    prop = _Propagator(gm, tp, tp_plan.layouts, set()).run()
    ctx, decisions = prop.ctx, prop.decisions
    graph = gm.graph
    collectives: list[dict] = []
    cache: dict[tuple, Node] = {}

    def record(op: str, consumer: Node, src: Node, placement: Placement) -> None:
        s = shape(src)
        numel = 1
        for v in _local_shape(s, placement, tp) if s else []:
            numel *= v
        itemsize = src.meta["val"].element_size() if isinstance(src.meta.get("val"), torch.Tensor) else 4
        collectives.append({"op": op, "node": consumer.name, "bytes": int(numel * itemsize),
                            "where": module_path(consumer) or consumer.name})

    def emit(fn, args, like: Node, placement: Placement) -> Node:
        n = graph.call_function(fn, args)
        n.meta["nn_module_stack"] = like.meta.get("nn_module_stack", {})
        n.meta["stack_trace"] = like.meta.get("stack_trace")
        if isinstance(like.meta.get("val"), torch.Tensor):
            n.meta["val"] = like.meta["val"]
        n.meta["autoshard"] = {"placement": placement_str(placement)}
        return n

    def redistribute(a: Node, cur: Placement, want: Placement, consumer: Node) -> Node:
        key = (a, placement_str(want))
        if key in cache:
            return cache[key]
        with graph.inserting_before(consumer):
            x = a
            if isinstance(cur, Partial):
                record("all_reduce", consumer, a, cur)
                x = emit(C.all_reduce, (x, group), a, R)
                cur = R
            elif isinstance(cur, Shard) and cur != want:
                record("all_gather", consumer, a, cur)
                x = emit(C.all_gather, (x, cur.dim, group), a, R)
                cur = R
            if isinstance(want, Shard) and isinstance(cur, Replicate):
                x = emit(C.scatter, (x, want.dim, group), a, want)
        cache[key] = x
        return x

    for node in list(graph.nodes):
        d = decisions.get(node)
        if d is None or node.op in ("placeholder", "get_attr"):
            continue
        out_sharded = _not_replicated(d.out)
        for a, want in d.req.items():
            cur = ctx.placement(a)
            new = a
            if placement_str(cur) != placement_str(want):
                new = redistribute(a, cur, want, node)
            if isinstance(want, Replicate) and out_sharded and prop.needs_grad.get(a) and node.op != "output":
                key = (new, "reduce_grad")
                if key not in cache:
                    with graph.inserting_before(node):
                        cache[key] = emit(C.reduce_grad, (new, group), a, R)
                    collectives.append({"op": "reduce_grad", "node": node.name, "bytes": 0,
                                        "where": module_path(node) or node.name})
                new = cache[key]
            if new is not a:
                node.replace_input_with(a, new)
        _rewrite_node(gm, node, d, ctx, tp, group, emit, record)
        node.meta["autoshard"] = {"placement": placement_str(d.out) if not isinstance(d.out, tuple) else [placement_str(p) for p in d.out]}
    graph.lint()
    gm.recompile()
    return gm, collectives


def _not_replicated(out) -> bool:
    if isinstance(out, tuple):
        return any(not isinstance(p, Replicate) for p in out)
    return not isinstance(out, Replicate)


def _rewrite_node(gm, node: Node, d: Decision, ctx: Context, tp: int, group: str, emit, record) -> None:
    if d.rewrite == "size":
        local = _local_shape(shape(node), d.out, tp)
        if node.target in (aten.flatten.using_ints, aten.unflatten.int):
            node.target = aten.reshape.default
            node.args = (node.args[0], local)
        else:
            node.args = (node.args[0], local, *node.args[2:])
    elif d.rewrite == "split":
        args = list(node.args)
        if node.target == aten.split.Tensor:
            args[1] = args[1] // tp
        else:
            args[1] = [s // tp for s in args[1]]
        node.args = tuple(args)
    elif d.rewrite == "full_slice":
        args = list(node.args)
        if len(args) > 2:
            args[2] = 0
        if len(args) > 3:
            args[3] = 9223372036854775807
        node.args = tuple(args)
    elif d.rewrite == "vocab_embedding":
        node.target = tp_ops.vocab_parallel_embedding
        node.args = (node.args[0], node.args[1], group)
        node.kwargs = {}
    elif d.rewrite == "row_bias":
        graph = gm.graph
        if node.target == aten.linear.default:
            x, w, b = node.args[0], node.args[1], node.args[2] if len(node.args) > 2 else node.kwargs["bias"]
            node.args, node.kwargs = (x, w), {}
        else:  # addmm(b, x, w) → mm(x, w)
            b, x, w = node.args[0], node.args[1], node.args[2]
            node.target = aten.mm.default
            node.args, node.kwargs = (x, w), {}
        users = list(node.users)
        with graph.inserting_after(node):
            record("all_reduce", node, node, R)
            red = emit(C.all_reduce, (node, group), node, R)
        with graph.inserting_after(red):
            add = emit(aten.add.Tensor, (red, b), node, R)
        for u in users:
            u.replace_input_with(node, add)
