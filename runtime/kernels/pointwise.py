"""Generated pointwise kernels: a chain of elementwise aten ops as one Triton kernel, forward and backward.

The fusion pass (``passes/fusion.py``) turns a region of the graph into a :class:`PointwiseSpec`:
straight-line assignments over named values (inputs ``a0, a1, ...``, outputs ``y0, ...``; for the
backward, incoming gradients ``g0, ...`` and input gradients ``d0, ...``), each written twice, as a
Triton expression and as a torch expression, from one symbolic expression. This module turns a spec
into a runnable kernel:

* **Indexing is decided at run time**, from the tensors' actual (local, sharded) shapes: an input
  the size of the output is read at ``offs``; a *row* broadcast (shape equal to trailing dims of
  the output, e.g. a bias) at ``offs % R``; a *column* broadcast (leading dims, e.g. a per-row
  statistic) at ``offs // C``; a one-element tensor once. Any other broadcast is materialised.
  Each combination is a separate kernel source, compiled once and cached on the kernel object.
* **Everything is computed in fp32** registers, loaded from and stored to the tensors' own dtypes.
* **The backward saves only what its expressions read** (``spec.saved``): cheap intermediates are
  recomputed from the inputs instead of being stored by the forward. Gradients of broadcast inputs
  are written full-size in fp32 and summed to the input's shape.

Kernels are cached by the spec's structural key (its ``name``), so the same chain in 32 layers is
one kernel object; ``print(kernel.source)`` shows the generated Triton code.
"""

from __future__ import annotations

import hashlib
import linecache
from dataclasses import dataclass

import torch

from . import interpreted, mark_built, use_triton

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "bool": torch.bool}

_TANH = '''
@triton.jit
def _tanh(x):
    # tanh without libdevice: odd series near 0 (no cancellation), (1 - e^-2|x|) / (1 + e^-2|x|) elsewhere
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    x2 = x * x
    small = a * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * -0.05396825396825397)))
    r = tl.where(a < 0.0625, small, (1.0 - e) / (1.0 + e))
    return tl.where(x < 0, -r, r)
'''


@dataclass(frozen=True)
class PointwiseSpec:
    """What the fusion pass derived for one region; plain data, hashable, printable.

    ``fwd`` and ``bwd`` are ``(name, triton_expr, torch_expr)`` assignments in order. ``fwd``
    defines ``y0 .. y{k-1}`` from ``a*``; ``bwd`` defines ``d{i}`` for each ``i`` in ``grads`` from
    the inputs in ``saved`` and the gradients ``g{o}`` for ``o`` in ``used_grads``.
    """

    inputs: tuple[str, ...]  # "float" | "bool" per input
    out_dtypes: tuple[str, ...]  # torch dtype name per output
    exprs: tuple[str, ...]  # the forward expressions, for people
    fwd: tuple[tuple[str, str, str], ...]
    bwd: tuple[tuple[str, str, str], ...]
    grads: tuple[int, ...]
    saved: tuple[int, ...]
    used_grads: tuple[int, ...]

    @property
    def name(self) -> str:
        """Structural key: equal for equal computations, whatever node names they had."""
        return "pointwise_" + hashlib.sha256(repr(self).encode()).hexdigest()[:12]


def _mode(t: torch.Tensor, out_shape: torch.Size) -> tuple[torch.Tensor, str, int]:
    """How a kernel indexes ``t`` broadcast to ``out_shape``: (tensor to pass, mode, size argument)."""
    if t.numel() == 1:
        return t.reshape(1), "scalar", 0
    if tuple(t.shape) == tuple(out_shape):
        return t.contiguous(), "full", 0
    shape = [1] * (len(out_shape) - t.dim()) + list(t.shape)
    nd = len(out_shape)
    lead = next(i for i in range(nd) if shape[i] != 1)
    if all(shape[i] == out_shape[i] for i in range(lead, nd)):  # trailing dims: a row
        size = 1
        for s in out_shape[lead:]:
            size *= s
        return t.contiguous(), "row", size
    last = max(i for i in range(nd) if shape[i] != 1)
    if all(shape[i] == out_shape[i] for i in range(last + 1)) and all(s == 1 for s in shape[last + 1:]):
        size = 1
        for s in out_shape[last + 1:]:
            size *= s
        return t.contiguous(), "col", size
    return t.expand(out_shape).contiguous(), "full", 0


def _load(i: int, kind: str, mode: str, ptr: str = "A") -> str:
    src = {"full": f"{ptr}{i} + offs", "row": f"{ptr}{i} + offs % Z_{ptr}{i}", "col": f"{ptr}{i} + offs // Z_{ptr}{i}"}
    name = {"A": "a", "G": "g"}[ptr]
    if mode == "scalar":
        value = f"tl.load({ptr}{i})"
    else:
        value = f"tl.load({src[mode]}, mask=mask, other={0 if kind == 'bool' else 1.0})"  # 1: no log(0) in the tail
    return f"    {name}{i} = " + (f"{value} != 0" if kind == "bool" else f"{value}.to(tl.float32)")


class PointwiseKernel:
    """A generated pointwise region: call it like the aten ops it replaces (tensors in, tensor(s) out)."""

    __module__ = __name__

    def __init__(self, spec: PointwiseSpec) -> None:
        self.spec = spec
        self.__name__ = spec.name
        self.__qualname__ = spec.name
        self._compiled: dict[tuple, object] = {}
        self._torch_fns = None

    def __repr__(self) -> str:
        return f"<{self.spec.name}: " + "; ".join(f"y{i} = {e}" for i, e in enumerate(self.spec.exprs)) + ">"

    # ------------------------------------------------------------------ source
    def triton_source(self, which: str = "fwd", modes: tuple[str, ...] | None = None, int64: bool = False) -> str:
        """Triton source of the forward (``which="fwd"``) or backward kernel for the given index modes.

        ``modes`` gives one of full/row/col/scalar per kernel tensor argument that is read: every
        input for the forward; the saved inputs then the used gradients for the backward.
        """
        s = self.spec
        reads = [("A", i, s.inputs[i]) for i in range(len(s.inputs))] if which == "fwd" else \
            [("A", i, s.inputs[i]) for i in s.saved] + [("G", o, "float") for o in s.used_grads]
        modes = modes or tuple("full" for _ in reads)
        writes = [("Y", o) for o in range(len(s.out_dtypes))] if which == "fwd" else [("D", i) for i in s.grads]
        params = [f"{p}{i}" for p, i, _ in reads] + [f"{p}{i}" for p, i in writes] + ["N"]
        params += [f"Z_{p}{i}" for (p, i, _), m in zip(reads, modes) if m in ("row", "col")]
        if which == "bwd":
            params += [f"NEED{i}: tl.constexpr" for i in s.grads]
        params.append("BLOCK: tl.constexpr")
        pid = "tl.program_id(0).to(tl.int64)" if int64 else "tl.program_id(0)"
        lines = [_TANH, "@triton.jit", f"def {s.name}_{which}({', '.join(params)}):",
                 f"    offs = {pid} * BLOCK + tl.arange(0, BLOCK)", "    mask = offs < N",
                 "    zero = tl.zeros([BLOCK], dtype=tl.float32)"]
        lines += [_load(i, kind, m, p) for (p, i, kind), m in zip(reads, modes)]
        lines += [f"    {name} = {tri}" for name, tri, _ in (s.fwd if which == "fwd" else s.bwd)]
        for p, i in writes:
            var = f"y{i}" if p == "Y" else f"d{i}"
            store = f"tl.store({p}{i} + offs, ({var} + zero).to({p}{i}.dtype.element_ty), mask=mask)"
            lines.append(f"    {store}" if p == "Y" else f"    if NEED{i}:\n        {store}")
        return "\n".join(lines) + "\n"

    @property
    def source(self) -> str:
        """The generated Triton forward and backward kernels (every tensor at the output's shape)."""
        return self.triton_source("fwd") + "\n" + self.triton_source("bwd")

    def torch_source(self) -> str:
        """The torch reference: the same assignments as plain torch expressions."""
        s = self.spec
        args = ", ".join(f"a{i}" for i in range(len(s.inputs)))
        out = [f"def forward({args}):"] + [f"    {n} = {t}" for n, _, t in s.fwd]
        out.append("    return (" + "".join(f"y{o}, " for o in range(len(s.out_dtypes))) + ")")
        bargs = [f"a{i}" for i in s.saved] + [f"g{o}" for o in s.used_grads]
        out.append(f"def backward({', '.join(bargs)}):")
        out += [f"    {n} = {t}" for n, _, t in s.bwd]
        out.append("    return (" + "".join(f"d{i}, " for i in s.grads) + ")")
        return "\n".join(out) + "\n"

    def _compile(self, text: str, fn: str, namespace: dict) -> object:
        filename = f"<autoshard-{self.spec.name}-{hashlib.sha256(text.encode()).hexdigest()[:8]}>"
        # Triton (and tracebacks) read a kernel's source through linecache
        linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
        # a module name for the functions defined here: Triton's code generator reads the __module__
        # of every jitted function a kernel calls (the _tanh helper), and None breaks compilation
        namespace.setdefault("__name__", f"{__name__}.{self.spec.name}")
        exec(compile(text, filename, "exec"), namespace)  # noqa: S102 - our own generated code
        return namespace[fn]

    def _triton(self, which: str, modes: tuple[str, ...], int64: bool):
        key = (which, modes, int64)
        k = self._compiled.get(key)
        if k is None:
            import triton
            import triton.language as tl

            mark_built()
            k = self._compile(self.triton_source(which, modes, int64), f"{self.spec.name}_{which}",
                              {"triton": triton, "tl": tl})
            self._compiled[key] = k
        return k

    def _torch(self):
        if self._torch_fns is None:
            ns: dict = {"torch": torch}
            self._compile(self.torch_source(), "forward", ns)
            self._torch_fns = (ns["forward"], ns["backward"])
        return self._torch_fns

    # ------------------------------------------------------------------ running
    def __call__(self, *tensors: torch.Tensor):
        outs = _Pointwise.apply(self, *tensors)
        return outs[0] if len(outs) == 1 else outs

    def forward(self, xs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Run the forward (no autograd): the Triton kernel or the torch reference."""
        s = self.spec
        shape = torch.broadcast_shapes(*(x.shape for x in xs))
        dtypes = [_DTYPES[d] for d in s.out_dtypes]
        device = xs[0].device
        if not use_triton(*xs):
            fwd, _ = self._torch()
            vals = fwd(*(x if x.dtype == torch.bool else x.float() for x in xs))
            outs = [_full(v, shape, device).to(dt) for v, dt in zip(vals, dtypes)]
            ptrs = {x.data_ptr() for x in xs}  # an output that is an input (a region that only casts to its dtype)
            return tuple(o.clone() if o.data_ptr() in ptrs else o for o in outs)
        outs = tuple(torch.empty(shape, dtype=dt, device=device) for dt in dtypes)
        n = outs[0].numel()
        if n == 0:
            return outs
        prepared = [_mode(x, shape) for x in xs]
        modes = tuple(m for _, m, _ in prepared)
        sizes = [z for _, m, z in prepared if m in ("row", "col")]
        block = 1 << 16 if interpreted() else 1024
        kernel = self._triton("fwd", modes, n >= 2**31)
        kernel[(-(-n // block),)](*(t for t, _, _ in prepared), *outs, n, *sizes, BLOCK=block)
        return outs

    def backward(self, saved: list[torch.Tensor], grads: list[torch.Tensor], need: list[bool],
                 shape: torch.Size, in_meta: list[tuple[torch.Size, torch.dtype]]) -> list[torch.Tensor | None]:
        """Gradients of the inputs in ``spec.grads`` (None where ``need`` is False)."""
        s = self.spec
        device = grads[0].device if grads else saved[0].device
        if not use_triton(*saved, *grads):
            _, bwd = self._torch()
            vals = bwd(*(x if x.dtype == torch.bool else x.float() for x in saved), *(g.float() for g in grads))
            return [_full(v, shape, device).sum_to_size(in_meta[i][0]).to(in_meta[i][1]) if nd else None
                    for v, i, nd in zip(vals, s.grads, need)]
        n = 1
        for d in shape:
            n *= d
        prepared = [_mode(x, shape) for x in (*saved, *grads)]
        modes = tuple(m for _, m, _ in prepared)
        sizes = [z for _, m, z in prepared if m in ("row", "col")]
        outs = []
        for i, nd in zip(s.grads, need):
            in_shape, dt = in_meta[i]
            whole = tuple(in_shape) == tuple(shape)
            outs.append(torch.empty(shape, dtype=dt if whole else torch.float32, device=device) if nd
                        else torch.empty(1, dtype=torch.float32, device=device))
        if n:
            block = 1 << 16 if interpreted() else 1024
            kernel = self._triton("bwd", modes, n >= 2**31)
            flags = {f"NEED{i}": nd for i, nd in zip(s.grads, need)}
            kernel[(-(-n // block),)](*(t for t, _, _ in prepared), *outs, n, *sizes, BLOCK=block, **flags)
        return [o.sum_to_size(in_meta[i][0]).to(in_meta[i][1]) if nd else None
                for o, i, nd in zip(outs, s.grads, need)]


def _full(v, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """A reference result as a tensor of ``shape`` (constants and broadcast results expanded)."""
    if not isinstance(v, torch.Tensor):
        return torch.full(shape, float(v), dtype=torch.float32, device=device)
    return v if tuple(v.shape) == tuple(shape) else v.expand(shape).contiguous()


class _Pointwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernel: PointwiseKernel, *xs: torch.Tensor):
        outs = kernel.forward(xs)
        ctx.kernel = kernel
        ctx.save_for_backward(*(xs[i] for i in kernel.spec.saved))
        ctx.in_meta = [(x.shape, x.dtype) for x in xs]
        ctx.out_meta = [(o.dtype, o.device) for o in outs]
        ctx.shape = outs[0].shape
        return outs

    @staticmethod
    def backward(ctx, *gs):
        kernel: PointwiseKernel = ctx.kernel
        s = kernel.spec
        need = [bool(ctx.needs_input_grad[1 + i]) for i in s.grads]
        result: list = [None] * (1 + len(s.inputs))
        if not any(need):
            return tuple(result)
        grads = []
        for o in s.used_grads:
            g = gs[o]
            if g is None:
                dt, dev = ctx.out_meta[o]
                g = torch.zeros((), dtype=dt, device=dev)
            grads.append(g)
        for i, d in zip(s.grads, kernel.backward(list(ctx.saved_tensors), grads, need, ctx.shape, ctx.in_meta)):
            result[1 + i] = d
        return tuple(result)


_CACHE: dict[str, PointwiseKernel] = {}


def get_kernel(spec: PointwiseSpec) -> PointwiseKernel:
    """The kernel object for ``spec``, shared by every region with the same structural key."""
    k = _CACHE.get(spec.name)
    if k is None or k.spec != spec:
        k = _CACHE[spec.name] = PointwiseKernel(spec)
    return k
