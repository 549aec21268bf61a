"""Fusion pass: regions of the (sharded) aten graph become single kernel calls with a forward and a backward.

Problem. Eager execution of a training graph runs one kernel per aten op, and most ops between the
matmuls are memory-bound: an RMSNorm is seven kernels that each read and write the activation, a
GELU written out by hand (GPT-2's ``gelu_new``) is eight. Given the rewritten graph, find regions
whose ops can run as one kernel, replace each by a call whose forward reads every input once and
writes every output once, and whose backward likewise, and say for every candidate left alone why.

Method, in two steps on one graph:

1. **Templates.** Patterns with a hand-written kernel (``runtime/kernels``) are matched first:
   RMSNorm (``pow → mean → add eps → rsqrt → mul → [cast] → mul weight``), LayerNorm
   (``aten.layer_norm`` / ``native_layer_norm``), each taking a preceding residual ``add`` along
   (the kernel returns the new residual stream too); softmax over the last dim; SwiGLU
   (``silu(a) · b``); the half-split rotary embedding (``cat(x₁c - x₂s, x₁s + x₂c)``); and
   ``aten.cross_entropy_loss`` (chunked over the vocabulary).
2. **Generated pointwise kernels.** Remaining elementwise ops with a rule in :data:`RULES` are
   grouped, in topological order, into regions whose values all have one shape and placement
   (inputs may broadcast: scalars, rows, columns). A node joins the region of one of its producers
   unless another of its inputs depends on that region through a node outside it (that would make
   the fused call a cycle). Each region becomes a symbolic expression per output (sympy, one symbol
   per input; results rounded to their own dtype where eager would round, so bf16 matches eager);
   the backward is ``dᵢ = Σₒ gₒ · ∂yₒ/∂aᵢ`` by ``sympy.diff``, after common-subexpression
   elimination; only the inputs those expressions read are saved. Both are printed as Triton and as
   torch code (:class:`~autoshard.runtime.kernels.pointwise.PointwiseSpec`).

The pass is pure: ``fuse_graph(gm) -> (gm, report)`` rewrites ``gm`` (a fresh capture) and returns a
JSON-able report: ``regions`` (every fused region: kind, kernel, the aten ops and nodes it
replaced, module and source line) and ``rejected`` (each candidate left alone, with the reason:
``single op, nothing to fuse``, ``mixed shapes ...``, ``op without a rule: aten.xyz``, ...).

Why this module is long: template matching and the pointwise-chain generator share the region
bookkeeping and the rejection reasons the plan reports; kept together until the step program's
Inductor lowering retires the generator.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import sympy
import torch
from torch.fx import GraphModule, Node

from autoshard.runtime.kernels import cross_entropy as ce_kernel
from autoshard.runtime.kernels import layernorm as ln_kernel
from autoshard.runtime.kernels import rmsnorm as rms_kernel
from autoshard.runtime.kernels import rotary as rope_kernel
from autoshard.runtime.kernels import softmax as softmax_kernel
from autoshard.runtime.kernels import swiglu as swiglu_kernel
from autoshard.runtime.kernels.pointwise import PointwiseSpec, get_kernel

from .tensor_parallel import module_path, source_line

aten = torch.ops.aten
prims = torch.ops.prims
_FLOATS = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_MAX_REGION = 64  # ops per generated kernel: keeps sympy and the compiler fast


# =============================================================================== symbolic functions
class Sigmoid(sympy.Function):
    """σ(x); kept whole (not 1/(1+e⁻ˣ)) so both the value and σ' = σ(1-σ) are overflow-free."""

    def fdiff(self, argindex=1):
        s = Sigmoid(self.args[0])
        return s * (1 - s)


class Step(sympy.Function):
    """1 where x > 0 else 0: the derivative of relu (torch's convention at 0)."""

    def fdiff(self, argindex=1):
        return sympy.S.Zero


class Relu(sympy.Function):
    def fdiff(self, argindex=1):
        return Step(self.args[0])


class Where(sympy.Function):
    """``where(c, a, b)``; ``c`` is a bool input and not differentiable."""

    def fdiff(self, argindex=1):
        if argindex == 1:
            return sympy.S.Zero
        return Where(self.args[0], 1, 0) if argindex == 2 else Where(self.args[0], 0, 1)


class Cast(sympy.Function):
    """Round to a narrower float type (code 0: bf16, 1: fp16), as eager does after each 16-bit op.

    Straight-through in the backward (d/dx = 1), as autograd treats casts.
    """

    def fdiff(self, argindex=1):
        return sympy.S.One if argindex == 1 else sympy.S.Zero


_CAST_CODES = {torch.bfloat16: 0, torch.float16: 1}
_CAST_TL = {0: "tl.bfloat16", 1: "tl.float16"}
_CAST_TORCH = {0: "torch.bfloat16", 1: "torch.float16"}


class Unsupported(Exception):
    """A node (or region) the pass leaves alone; the message is the reason recorded in the report."""


# =============================================================================== printing
def _num(v) -> str:
    f = float(v)
    if f != f or f in (float("inf"), float("-inf")):
        return f"float('{f}')"
    return repr(f)


def emit(e: sympy.Expr, dialect: str) -> str:
    """``e`` as a Triton (``"tl"``) or torch (``"torch"``) expression over fp32 values."""
    tl = dialect == "tl"
    if e.is_Symbol:
        return e.name
    if e.is_number:
        return _num(e)
    if isinstance(e, sympy.Add):
        return "(" + " + ".join(emit(a, dialect) for a in e.args) + ")"
    if isinstance(e, sympy.Mul):
        coeff, rest = e.as_coeff_Mul()
        if coeff == -1:
            return "(-" + emit(rest, dialect) + ")"
        num, den = [], []
        for a in e.args:
            if isinstance(a, sympy.Pow) and a.exp.is_Integer and a.exp < 0 and not a.base.is_number:
                den.append(a.base if a.exp == -1 else sympy.Pow(a.base, -a.exp))
            else:
                num.append(a)
        top = " * ".join(emit(a, dialect) for a in num) or "1.0"
        if not den:
            return "(" + top + ")"
        return "(" + top + " / (" + " * ".join(emit(a, dialect) for a in den) + "))"
    if isinstance(e, sympy.Pow):
        return _emit_pow(e.base, e.exp, dialect)
    args = [emit(a, dialect) for a in e.args]
    name = {sympy.exp: ("tl.exp", "torch.exp"), sympy.log: ("tl.log", "torch.log"), sympy.tanh: ("_tanh", "torch.tanh"),
            sympy.erf: ("tl.math.erf", "torch.erf"), sympy.sin: ("tl.sin", "torch.sin"),
            sympy.cos: ("tl.cos", "torch.cos"), Sigmoid: ("tl.sigmoid", "torch.sigmoid")}.get(type(e))
    if name is not None:
        return f"{name[0 if tl else 1]}({args[0]})"
    if isinstance(e, Relu):
        return f"tl.maximum({args[0]}, 0.0)" if tl else f"torch.relu({args[0]})"
    if isinstance(e, Step):
        return f"tl.where({args[0]} > 0, 1.0, 0.0)" if tl else f"({args[0]} > 0).float()"
    if isinstance(e, Where):
        return f"tl.where({args[0]}, {args[1]}, {args[2]})" if tl else f"torch.where({args[0]}, {args[1]}, {args[2]})"
    if isinstance(e, Cast):
        code = int(e.args[1])
        if tl:
            return f"{args[0]}.to({_CAST_TL[code]}).to(tl.float32)"
        return f"{args[0]}.to({_CAST_TORCH[code]}).float()"
    raise Unsupported(f"no code for {type(e).__name__}")


def _emit_pow(base: sympy.Expr, ex: sympy.Expr, dialect: str) -> str:
    tl = dialect == "tl"
    b = emit(base, dialect)
    if ex.is_Integer:
        k = int(ex)
        if k == 0:
            return "1.0"
        if 0 < k <= 8:
            return "(" + " * ".join([b] * k) + ")"
        if -8 <= k < 0:
            return "(1.0 / (" + " * ".join([b] * -k) + "))"
    if ex.is_Rational and ex.q == 2:  # half-integer: sqrt / rsqrt times an integer power
        whole = ex - sympy.Rational(1, 2) if ex > 0 else ex + sympy.Rational(1, 2)
        root = (f"tl.sqrt({b})" if tl else f"torch.sqrt({b})") if ex > 0 else (f"tl.rsqrt({b})" if tl else f"torch.rsqrt({b})")
        return root if whole == 0 else f"({root} * {_emit_pow(base, whole, dialect)})"
    if base.is_number:  # c ** x  =  exp(x · ln c)
        return f"{'tl' if tl else 'torch'}.exp({emit(ex, dialect)} * {_num(sympy.log(base))})"
    if tl:
        return f"tl.exp({emit(ex, dialect)} * tl.log({b}))"
    return f"torch.pow({b}, {emit(ex, dialect)})"


# =============================================================================== op rules
def _const(v):
    if isinstance(v, bool):
        return sympy.Integer(int(v))
    if isinstance(v, int):
        return sympy.Integer(v)
    if isinstance(v, float):
        if v.is_integer() and abs(v) < 2**31:
            return sympy.Integer(int(v))
        if (2 * v).is_integer() and abs(v) < 2**31:
            return sympy.Rational(int(2 * v), 2)
        return sympy.Float(v, 17)
    return v


def _alpha(kw: dict):
    return _const(kw.get("alpha", 1))


def _gelu(a, approximate="none"):
    if approximate == "tanh":
        return sympy.Float(0.5) * a * (1 + sympy.tanh(sympy.Float(0.7978845608028654, 17) *
                                                       (a + sympy.Float(0.044715, 17) * a ** 3)))
    return sympy.Float(0.5) * a * (1 + sympy.erf(a * sympy.Float(0.7071067811865476, 17)))


def _div(a, b, rounding_mode=None):
    if rounding_mode is not None:
        raise Unsupported(f"div with rounding_mode={rounding_mode!r}")
    return a / b


def _cast(a, dtype=None, **kw):
    if dtype is None:
        return a
    if dtype not in _FLOATS:
        raise Unsupported(f"cast to {dtype}")
    return Cast(a, _CAST_CODES[dtype]) if dtype in _CAST_CODES else a


def _to_dtype(a, dtype, *rest, **kw):
    return _cast(a, dtype)


#: aten op → builder of its symbolic value from its (symbolic or constant) arguments
RULES = {
    aten.add.Tensor: lambda a, b, **kw: a + _alpha(kw) * b,
    aten.add.Scalar: lambda a, b, **kw: a + _alpha(kw) * b,
    aten.sub.Tensor: lambda a, b, **kw: a - _alpha(kw) * b,
    aten.sub.Scalar: lambda a, b, **kw: a - _alpha(kw) * b,
    aten.rsub.Scalar: lambda a, b, **kw: b - _alpha(kw) * a,
    aten.rsub.Tensor: lambda a, b, **kw: b - _alpha(kw) * a,
    aten.mul.Tensor: lambda a, b: a * b,
    aten.mul.Scalar: lambda a, b: a * b,
    aten.div.Tensor: lambda a, b: a / b,
    aten.div.Scalar: lambda a, b: a / b,
    aten.div.Tensor_mode: _div,
    aten.neg.default: lambda a: -a,
    aten.exp.default: sympy.exp,
    aten.log.default: sympy.log,
    aten.tanh.default: sympy.tanh,
    aten.sin.default: sympy.sin,
    aten.cos.default: sympy.cos,
    aten.sigmoid.default: Sigmoid,
    aten.silu.default: lambda a: a * Sigmoid(a),
    aten.gelu.default: _gelu,
    aten.relu.default: Relu,
    aten.pow.Tensor_Scalar: lambda a, e: a ** e,
    aten.pow.Tensor_Tensor: lambda a, e: a ** e,
    aten.pow.Scalar: lambda c, e: c ** e,
    aten.square.default: lambda a: a ** 2,
    aten.sqrt.default: sympy.sqrt,
    aten.rsqrt.default: lambda a: a ** sympy.Rational(-1, 2),
    aten.reciprocal.default: lambda a: 1 / a,
    aten.where.self: lambda c, a, b: Where(c, a, b),
    aten._to_copy.default: _cast,
    aten.to.dtype: _to_dtype,
    aten.to.dtype_layout: _cast,
    prims.convert_element_type.default: _to_dtype,
    aten.clone.default: lambda a, **kw: a,
}
_BOOL_ARGS = {aten.where.self: {0}}  # argument positions that are bool tensors


# =============================================================================== graph helpers
def _val(n) -> torch.Tensor | None:
    v = n.meta.get("val") if isinstance(n, Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _shape(n) -> tuple[int, ...] | None:
    v = _val(n)
    return tuple(int(s) for s in v.shape) if v is not None else None


def _placement(n: Node) -> str:
    p = (n.meta.get("autoshard") or {}).get("placement", "R")
    return p if isinstance(p, str) else repr(p)


def _op(n: Node) -> str:
    t = n.target
    if isinstance(t, torch._ops.OpOverload):
        return f"aten.{t.__name__}" if t.namespace == "aten" else str(t)
    return getattr(t, "__name__", str(t))


def _users_outside(n: Node, region: set[Node]) -> bool:
    return any(u not in region for u in n.users)


def _only_user(n: Node) -> Node | None:
    users = list(n.users)
    return users[0] if len(users) == 1 else None


def _is_last_dim(dims, ndim: int) -> bool:
    if isinstance(dims, (list, tuple)):
        if len(dims) != 1:
            return False
        dims = dims[0]
    return isinstance(dims, int) and dims % max(ndim, 1) == ndim - 1


@dataclass
class _Match:
    """A template match: the nodes it replaces, the call that replaces them, and which nodes it outputs."""

    kind: str
    nodes: list[Node]
    target: object
    args: tuple
    kwargs: dict
    outputs: list[Node]
    anchor: Node  # the node whose module and source line describe the region


class _Fuser:
    def __init__(self, gm: GraphModule) -> None:
        self.gm = gm
        self.graph = gm.graph
        self.regions: list[dict] = []
        self.rejected: list[dict] = []
        self._specs: dict[tuple, PointwiseSpec] = {}

    # ------------------------------------------------------------------ bookkeeping
    def reject(self, node: Node, reason: str) -> None:
        self.rejected.append({"node": node.name, "op": _op(node), "reason": reason, "module": module_path(node),
                              "source": source_line(node)})

    def replace(self, nodes: list[Node], target, args: tuple, kwargs: dict, outputs: list[Node], kind: str,
                anchor: Node, kernel: str) -> Node:
        """Replace ``nodes`` by one call of ``target`` returning ``outputs`` (in order)."""
        graph = self.graph
        order = {n: i for i, n in enumerate(graph.nodes)}
        region = set(nodes)
        nodes = sorted(nodes, key=order.__getitem__)
        last = nodes[-1]
        # nodes between the region's first and last op that depend on it move after the fused call
        tainted, movers = set(region), []
        for n in list(graph.nodes)[order[nodes[0]]:order[last]]:
            if n not in region and any(a in tainted for a in n.all_input_nodes):
                tainted.add(n)
                movers.append(n)
        with graph.inserting_before(last):
            fused = graph.call_function(target, args, kwargs)
        fused.meta["nn_module_stack"] = anchor.meta.get("nn_module_stack", {})
        fused.meta["stack_trace"] = anchor.meta.get("stack_trace")
        fused.meta["autoshard_fused"] = kind
        if len(outputs) == 1:
            fused.meta.update({k: v for k, v in outputs[0].meta.items() if k in ("val", "autoshard", "tensor_meta")})
            values = [fused]
        else:
            fused.meta["val"] = tuple(o.meta.get("val") for o in outputs)
            values, at = [], fused
            for i, o in enumerate(outputs):
                with graph.inserting_after(at):
                    g = graph.call_function(operator.getitem, (fused, i))
                g.meta = {k: v for k, v in o.meta.items() if k in ("val", "autoshard", "tensor_meta", "nn_module_stack",
                                                                     "stack_trace")}
                g.meta["nn_module_stack"] = fused.meta["nn_module_stack"]
                values.append(g)
                at = g
        for o, v in zip(outputs, values):
            o.replace_all_uses_with(v, delete_user_cb=lambda u: u not in region)
        for v in values[1:] if len(values) > 1 else []:
            if not v.users:  # an output nobody outside reads (a residual stream that ends here)
                values.remove(v)
                graph.erase_node(v)
        at = values[-1]
        for m in movers:
            at.append(m)
            at = m
        for n in reversed(nodes):
            graph.erase_node(n)
        self.regions.append({"kind": kind, "node": fused.name, "kernel": kernel, "ops": [_op(n) for n in nodes],
                             "nodes": [n.name for n in nodes], "outputs": len(outputs),
                             "module": module_path(anchor), "source": source_line(anchor)})
        return fused

    def apply(self, m: _Match) -> None:
        name = getattr(m.target, "__name__", str(m.target))
        self.replace(m.nodes, m.target, m.args, m.kwargs, m.outputs, m.kind, m.anchor, name)

    # ------------------------------------------------------------------ templates
    def templates(self) -> None:
        for node in list(self.graph.nodes):
            if getattr(node, "_erased", False) or node.op != "call_function":
                continue
            try:
                m = self._match(node)
            except Unsupported as e:
                self.reject(node, str(e))
                continue
            if m is not None:
                self.apply(m)

    def _match(self, node: Node) -> _Match | None:
        t = node.target
        if t == aten.mean.dim:
            return self._rmsnorm(node)
        if t in (aten.layer_norm.default, aten.native_layer_norm.default):
            return self._layernorm(node)
        if t in (aten._softmax.default, aten.softmax.int):
            return self._softmax(node)
        if t == aten.mul.Tensor:
            return self._swiglu(node)
        if t == aten.cat.default:
            return self._rotary(node)
        if t == aten.cross_entropy_loss.default:
            return self._cross_entropy(node)
        return None

    def _residual(self, x: Node, nodes: list[Node]) -> tuple[Node, Node | None]:
        """If ``x`` is ``a + b`` of two same-shape tensors, fuse the add: returns (a, b) and adds it to ``nodes``."""
        if isinstance(x, Node) and x.op == "call_function" and x.target == aten.add.Tensor and len(x.args) == 2 \
                and not x.kwargs and all(isinstance(a, Node) for a in x.args) \
                and _shape(x.args[0]) == _shape(x.args[1]) == _shape(x) \
                and all(_val(a) is not None and _val(a).dtype == _val(x).dtype for a in x.args):
            nodes.append(x)
            return x.args[0], x.args[1]
        return x, None

    def _rmsnorm(self, mean: Node) -> _Match | None:
        sq = mean.args[0]
        if not (isinstance(sq, Node) and sq.target == aten.pow.Tensor_Scalar and sq.args[1] == 2):
            return None
        x = sq.args[0]
        shp = _shape(x)
        if shp is None or not _is_last_dim(mean.args[1], len(shp)) or not (len(mean.args) > 2 and mean.args[2]):
            raise Unsupported("rmsnorm pattern: the mean is not over the last dim with keepdim")
        if _placement(x).startswith("S(") and _placement(x) in (f"S({len(shp) - 1})", "S(-1)"):
            raise Unsupported("rmsnorm pattern: the normalised dim is sharded")
        chain = [sq, mean]
        add = _only_user(mean)
        if not (add is not None and add.target in (aten.add.Tensor, aten.add.Scalar) and add.args[0] is mean
                and isinstance(add.args[1], (int, float))):
            raise Unsupported("rmsnorm pattern: mean(x²) is not followed by + eps")
        eps = float(add.args[1])
        rs = _only_user(add)
        if rs is None or rs.target != aten.rsqrt.default:
            raise Unsupported("rmsnorm pattern: no rsqrt after + eps")
        mul = _only_user(rs)
        if mul is None or mul.target != aten.mul.Tensor or set(mul.args) != {x, rs}:
            raise Unsupported("rmsnorm pattern: rsqrt(...) does not scale the normalised input")
        chain += [add, rs, mul]
        if len(sq.users) != 1 or len(mul.users) != 1:
            raise Unsupported("rmsnorm pattern: an intermediate value is used outside the norm")
        y = mul
        nxt = _only_user(y)
        if nxt is not None and nxt.target in (aten.to.dtype, aten._to_copy.default, prims.convert_element_type.default):
            chain.append(nxt)
            y = nxt
            nxt = _only_user(y)
        weight = None
        if nxt is not None and nxt.target == aten.mul.Tensor and y in nxt.args and len(nxt.args) == 2:
            w = nxt.args[1] if nxt.args[0] is y else nxt.args[0]
            if isinstance(w, Node) and _shape(w) == (shp[-1],):
                weight = w
                chain.append(nxt)
                y = nxt
        nodes = list(chain)
        src = x
        # an up-cast to fp32 used only by the norm is absorbed: the kernel computes in fp32 anyway
        if x.op == "call_function" and x.target in (aten.to.dtype, aten._to_copy.default) and \
                set(x.users) <= {sq, mul} and _val(x) is not None and _val(x).dtype == torch.float32 \
                and isinstance(x.args[0], Node) and _val(x.args[0]) is not None:
            nodes.append(x)
            src = x.args[0]
        a, b = self._residual(src, nodes)
        h = src if b is not None else None
        yv, hv = _val(y), _val(src)
        want = torch.promote_types(hv.dtype, _val(weight).dtype) if weight is not None else hv.dtype
        if yv is None or yv.dtype != want:
            if h is not None:
                nodes.remove(h)
            raise Unsupported(f"rmsnorm pattern: result dtype {yv.dtype if yv is not None else '?'} is not the "
                              f"kernel's {want}")
        outputs = [y, h] if h is not None else [y]  # with a residual the kernel returns (y, h)
        kind = "rmsnorm+residual" if b is not None else "rmsnorm"
        return _Match(kind, nodes, rms_kernel.rms_norm, (a, weight, eps, b), {}, outputs, y)

    def _layernorm(self, ln: Node) -> _Match | None:
        x, normalized = ln.args[0], ln.args[1]
        if len(normalized) != 1:
            raise Unsupported(f"layer_norm over {len(normalized)} dims: the kernel normalises the last dim only")
        w = ln.args[2] if len(ln.args) > 2 else ln.kwargs.get("weight")
        b = ln.args[3] if len(ln.args) > 3 else ln.kwargs.get("bias")
        eps = ln.args[4] if len(ln.args) > 4 else ln.kwargs.get("eps", 1e-5)
        nodes, out = [ln], ln
        if ln.target == aten.native_layer_norm.default:
            users = list(ln.users)
            if len(users) != 1 or users[0].target is not operator.getitem or users[0].args[1] != 0:
                raise Unsupported("native_layer_norm whose mean/rstd outputs are used")
            out = users[0]
            nodes.append(out)
        if _placement(x) in (f"S({len(_shape(x) or ()) - 1})", "S(-1)"):
            raise Unsupported("layer_norm over a sharded dim")
        a, r = self._residual(x, nodes)
        outputs = [out, x] if r is not None else [out]
        kind = "layernorm+residual" if r is not None else "layernorm"
        return _Match(kind, nodes, ln_kernel.layer_norm, (a, w, b, float(eps), r), {}, outputs, out)

    def _softmax(self, sm: Node) -> _Match | None:
        x, dim = sm.args[0], sm.args[1]
        shp = _shape(x)
        if shp is None or not _is_last_dim(dim, len(shp)):
            raise Unsupported(f"softmax over dim {dim}: the kernel normalises the last dim")
        if _placement(x) in (f"S({len(shp) - 1})", "S(-1)"):
            raise Unsupported("softmax over a sharded dim")
        if sm.target == aten._softmax.default:
            dtype = torch.float32 if sm.args[2] else None
        else:
            dtype = sm.args[2] if len(sm.args) > 2 else sm.kwargs.get("dtype")
        return _Match("softmax", [sm], softmax_kernel.softmax, (x, dtype), {}, [sm], sm)

    def _swiglu(self, mul: Node) -> _Match | None:
        if len(mul.args) != 2 or not all(isinstance(a, Node) for a in mul.args):
            return None
        for s, b in (mul.args, mul.args[::-1]):
            if s.target == aten.silu.default and len(s.users) == 1 and _shape(s.args[0]) == _shape(b) == _shape(mul):
                a = s.args[0]
                if _val(mul).dtype != torch.promote_types(_val(a).dtype, _val(b).dtype):
                    return None
                return _Match("swiglu", [s, mul], swiglu_kernel.swiglu, (a, b), {}, [mul], mul)
        return None

    def _rotary(self, cat: Node) -> _Match | None:
        parts = cat.args[0]
        dim = cat.args[1] if len(cat.args) > 1 else 0
        shp = _shape(cat)
        if len(parts) != 2 or shp is None or not _is_last_dim(dim, len(shp)):
            return None
        u, v = parts
        if not (u.target == aten.sub.Tensor and v.target == aten.add.Tensor and not u.kwargs and not v.kwargs):
            return None

        def mul_pair(n):
            if isinstance(n, Node) and n.target == aten.mul.Tensor and len(n.users) == 1:
                return n.args
            return None

        terms = [mul_pair(a) for a in (*u.args, *v.args)]
        if any(t is None for t in terms) or len(u.users) != 1 or len(v.users) != 1:
            return None
        half = shp[-1] // 2

        def split(n):
            if isinstance(n, Node) and n.target == aten.slice.Tensor and _is_last_dim(n.args[1], len(shp)):
                start = n.args[2] if len(n.args) > 2 else 0
                end = n.args[3] if len(n.args) > 3 else None
                if start == 0 and end == half:
                    return n.args[0], 1
                if start == half and (end is None or end >= shp[-1]):
                    return n.args[0], 2
            return None

        # u = x1·c - x2·s and v = x1·s + x2·c (each product in either order, v's terms in either order)
        def factors(pair):
            for xs, tab in (pair, pair[::-1]):
                sp = split(xs)
                if sp is not None:
                    return sp, tab
            return None

        f = [factors(t) for t in terms]
        if any(x is None for x in f):
            return None
        (p1, c), (p2, s) = f[0], f[1]
        vs = {f[2][0][1]: f[2][1], f[3][0][1]: f[3][1]}
        src = {p1[0], p2[0], f[2][0][0], f[3][0][0]}
        if p1[1] != 1 or p2[1] != 2 or len(src) != 1 or vs.get(1) is not s or vs.get(2) is not c:
            return None
        x = src.pop()
        slices = [t for pair in terms for t in pair if split(t) is not None]
        slice_nodes = list(dict.fromkeys(slices))
        if any(set(sl.users) - {t for t in (u.args + v.args)} for sl in slice_nodes):
            return None
        nodes = [*slice_nodes, *(u.args), *(v.args), u, v, cat]
        return _Match("rotary", list(dict.fromkeys(nodes)), rope_kernel.rotary, (x, c, s), {}, [cat], cat)

    def _cross_entropy(self, node: Node) -> _Match | None:
        args = list(node.args) + [None] * (6 - len(node.args))
        logits, target = args[0], args[1]
        weight = args[2] if args[2] is not None else node.kwargs.get("weight")
        reduction = args[3] if args[3] is not None else node.kwargs.get("reduction", 1)
        ignore = args[4] if args[4] is not None else node.kwargs.get("ignore_index", -100)
        smoothing = args[5] if args[5] is not None else node.kwargs.get("label_smoothing", 0.0)
        if weight is not None or smoothing:
            raise Unsupported("cross_entropy with class weights or label smoothing")
        shp = _shape(logits)
        if shp is None or len(shp) != 2:
            raise Unsupported("cross_entropy over logits that are not [rows, classes]")
        red = {0: "none", 1: "mean", 2: "sum"}[int(reduction)]
        return _Match("cross_entropy", [node], ce_kernel.cross_entropy, (logits, target),
                      {"ignore_index": int(ignore), "reduction": red}, [node], node)

    # ------------------------------------------------------------------ generated pointwise kernels
    def _fusible(self, n: Node) -> str | None:
        """None if ``n`` may join a pointwise region, else why not."""
        rule = RULES.get(n.target)
        if rule is None:
            return "no rule"
        v = _val(n)
        if v is None or v.dtype not in _FLOATS:
            return f"result dtype {v.dtype if v is not None else '?'} (generated kernels compute floats)"
        for i, a in enumerate(n.args):
            if isinstance(a, Node):
                av = _val(a)
                if av is None:
                    return f"input {a.name} has no shape"
                if av.dtype == torch.bool and i in _BOOL_ARGS.get(n.target, ()):
                    continue
                if av.dtype not in _FLOATS:
                    return f"input {a.name} is {av.dtype}"
                if torch.broadcast_shapes(tuple(av.shape), tuple(v.shape)) != tuple(v.shape):
                    return f"input {a.name} does not broadcast to the result"
            elif isinstance(a, (list, tuple)):
                return "list arguments"
        for k, a in n.kwargs.items():
            if isinstance(a, Node):
                return f"tensor keyword argument {k}"
        if n.target in (aten._to_copy.default, aten.to.dtype_layout):
            if set(n.kwargs) - {"dtype", "layout", "device", "memory_format", "non_blocking", "pin_memory"}:
                return "cast with other options"
            if n.kwargs.get("layout") not in (None, torch.strided):
                return "cast to another layout"
        if n.target == aten.clone.default and n.kwargs.get("memory_format") not in (None, torch.preserve_format,
                                                                                  torch.contiguous_format):
            return "clone to another memory format"
        return None

    def pointwise(self) -> None:
        nodes = list(self.graph.nodes)
        order_of = {n: i for i, n in enumerate(nodes)}
        region_of: dict[Node, int] = {}  # node → region id (follow `parent` to the region it was merged into)
        parent: list[int] = []
        anc: dict[Node, int] = {}  # bitset of the region ids a node depends on (itself included)
        members: list[list[Node]] = []
        mask: list[int] = []  # bits of every id merged into a region
        key_of: list[tuple] = []
        why: dict[Node, str] = {}

        def find(r: int) -> int:
            while parent[r] != r:
                r = parent[r]
            return r

        def inside(b: Node, r: int) -> bool:
            return b in region_of and find(region_of[b]) == r

        def depends(b: Node, r: int) -> bool:
            return bool(anc.get(b, 0) & mask[r])

        def external(r: int, extra: list[Node] = ()) -> list[Node]:
            inside = set(members[r]) | set(extra)
            return [a for m in (*members[r], *extra) for a in m.all_input_nodes if a not in inside]

        for n in nodes:
            deps = 0
            for a in n.all_input_nodes:
                deps |= anc.get(a, 0)
            reason = self._fusible(n) if n.op == "call_function" else "not an op"
            if reason is not None:
                anc[n] = deps
                if reason != "no rule" and reason != "not an op" and n.op == "call_function":
                    why[n] = reason
                elif reason == "no rule" and isinstance(n.target, torch._ops.OpOverload) \
                        and torch.Tag.pointwise in n.target.tags:
                    why[n] = f"op without a rule: {_op(n)}"
                continue
            key = (_shape(n), _placement(n))
            cands = [r for r in dict.fromkeys(find(region_of[x]) for x in n.all_input_nodes if x in region_of)
                     if key_of[r] == key]
            chosen = None
            for r in cands:
                # joining r is safe unless another input of n depends on r through a node outside it
                if len(members[r]) < _MAX_REGION and all(inside(b, r) or not depends(b, r) for b in n.all_input_nodes):
                    chosen = r
                    break
            if chosen is None:
                chosen = len(members)
                parent.append(chosen)
                members.append([])
                mask.append(1 << chosen)
                key_of.append(key)
            members[chosen].append(n)
            region_of[n] = chosen
            anc[n] = deps | mask[chosen]
            for r in cands:  # other producers' regions merge in when no outside node sits between them
                if r == chosen or find(r) != r or len(members[r]) + len(members[chosen]) > _MAX_REGION:
                    continue
                if any(depends(b, chosen) for b in external(r)) or \
                        any(depends(b, r) for b in external(chosen) if not inside(b, r)):
                    continue
                parent[r] = chosen
                members[chosen] = sorted(members[chosen] + members[r], key=order_of.__getitem__)
                members[r] = []
                mask[chosen] |= mask[r]
                anc[n] |= mask[chosen]
        for n, reason in why.items():
            self.reject(n, reason)
        for r, group in enumerate(members):
            if not group:  # merged into another region
                continue
            if len(group) == 1:
                n = group[0]
                near = [m for m in (*n.all_input_nodes, *n.users) if m in region_of and key_of[find(region_of[m])] != key_of[r]]
                if near:
                    other = near[0]
                    self.reject(n, f"mixed shapes: {_shape(n)} {_placement(n)} next to {other.name} "
                                   f"{_shape(other)} {_placement(other)}")
                else:
                    self.reject(n, "single op, nothing to fuse")
                continue
            try:
                self._fuse_region(group)
            except Unsupported as e:
                for n in group:
                    self.reject(n, f"region not fused: {e}")

    def _fuse_region(self, group: list[Node]) -> None:
        region = set(group)
        inputs: list[Node] = []
        for n in group:
            for a in n.all_input_nodes:
                if a not in region and a not in inputs:
                    inputs.append(a)
        outputs = [n for n in group if _users_outside(n, region)]
        index = {n: i for i, n in enumerate(group)}
        inpos = {a: i for i, a in enumerate(inputs)}

        def sig(a):
            if isinstance(a, Node):
                return ("n", index[a]) if a in region else ("a", inpos[a])
            if isinstance(a, torch.dtype):
                return ("dtype", str(a))
            return ("c", repr(a))

        key = (tuple((str(n.target), tuple(sig(a) for a in n.args), tuple((k, sig(v)) for k, v in sorted(n.kwargs.items())),
                      str(_val(n).dtype)) for n in group),
               tuple(str(_val(a).dtype) for a in inputs), tuple(index[o] for o in outputs))
        spec = self._specs.get(key)
        if spec is None:
            spec = self._specs[key] = _derive(group, inputs, outputs)
        kernel = get_kernel(spec)
        self.replace(group, kernel, tuple(inputs), {}, outputs, "pointwise", group[-1], spec.name)


# =============================================================================== derivation
def _derive(group: list[Node], inputs: list[Node], outputs: list[Node]) -> PointwiseSpec:
    """Symbolic forward and backward of a pointwise region → a :class:`PointwiseSpec`."""
    syms = {a: sympy.Symbol(f"a{i}") for i, a in enumerate(inputs)}
    exprs: dict[Node, sympy.Expr] = {}

    def arg(a):
        if isinstance(a, Node):
            return exprs[a] if a in exprs else syms[a]
        return _const(a)

    for n in group:
        rule = RULES[n.target]
        try:
            e = rule(*(arg(a) for a in n.args), **{k: arg(v) for k, v in n.kwargs.items()
                                                   if k not in ("layout", "device", "memory_format", "non_blocking",
                                                                "pin_memory")})
        except TypeError as err:
            raise Unsupported(f"{_op(n)} with arguments the rule does not take ({err})") from None
        dt = _val(n).dtype
        if dt in _CAST_CODES and not (isinstance(e, Cast) and int(e.args[1]) == _CAST_CODES[dt]):
            e = Cast(e, _CAST_CODES[dt])
        exprs[n] = sympy.sympify(e)
    ys = [exprs[o] for o in outputs]
    floats = [i for i, a in enumerate(inputs) if _val(a).dtype in _FLOATS]
    gs = [sympy.Symbol(f"g{o}") for o in range(len(outputs))]
    grads = []
    for i in floats:
        d = sympy.Add(*(g * sympy.diff(y, syms[inputs[i]]) for g, y in zip(gs, ys)))
        grads.append(_mask_where(d))
    fwd = _assignments(ys, "y", list(range(len(ys))))
    bwd = _assignments(grads, "d", floats)
    free = set().union(*(g.free_symbols for g in grads)) if grads else set()
    saved = tuple(i for i, a in enumerate(inputs) if syms[a] in free)
    used = tuple(o for o, g in enumerate(gs) if g in free)
    return PointwiseSpec(
        inputs=tuple("bool" if _val(a).dtype == torch.bool else "float" for a in inputs),
        out_dtypes=tuple(_FLOATS[_val(o).dtype] for o in outputs),
        exprs=tuple(str(y) for y in ys), fwd=fwd, bwd=bwd, grads=tuple(floats), saved=saved, used_grads=used)


def _mask_where(e: sympy.Expr) -> sympy.Expr:
    """``where(c, 1, 0) · t`` → ``where(c, t, 0)``: a masked-out branch's inf or nan never reaches the sum."""
    def is_mask(f):
        return isinstance(f, Where) and {f.args[1], f.args[2]} == {sympy.S.One, sympy.S.Zero}

    def fold(m):
        masks = [f for f in m.args if is_mask(f)]
        rest = sympy.Mul(*(f for f in m.args if f is not masks[0]))
        c, one, _ = masks[0].args
        return Where(c, rest, 0) if one == 1 else Where(c, 0, rest)

    return e.replace(lambda m: isinstance(m, sympy.Mul) and any(is_mask(f) for f in m.args), fold)


def _assignments(exprs: list[sympy.Expr], prefix: str, names: list[int]) -> tuple[tuple[str, str, str], ...]:
    """CSE'd straight-line code computing ``{prefix}{name}`` for each expression, in both dialects."""
    temps, reduced = sympy.cse(exprs, symbols=sympy.numbered_symbols("t"), order="none")
    lines = [(str(t), emit(e, "tl"), emit(e, "torch")) for t, e in temps]
    lines += [(f"{prefix}{k}", emit(e, "tl"), emit(e, "torch")) for k, e in zip(names, reduced)]
    return tuple(lines)


# =============================================================================== entry point
def fuse_graph(gm: GraphModule) -> tuple[GraphModule, dict]:
    """Fuse ``gm`` in place: templated kernels first, then generated pointwise kernels.

    Returns the graph module and the report ``{"regions": [...], "rejected": [...]}``.
    """
    for n in list(gm.graph.nodes):  # dtype/device asserts on values that fused kernels no longer materialise
        if n.op == "call_function" and n.target == aten._assert_tensor_metadata.default and not n.users:
            gm.graph.erase_node(n)
    f = _Fuser(gm)
    f.templates()
    f.pointwise()
    gm.graph.lint()
    gm.recompile()
    return gm, {"regions": f.regions, "rejected": f.rejected}
