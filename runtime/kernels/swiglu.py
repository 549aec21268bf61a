"""SwiGLU gate: ``y = silu(a) · b`` (Llama's MLP between the gate/up and down projections).

Forward reads ``a`` and ``b`` once and writes ``y``; eager runs silu and mul as two kernels with an
intermediate the size of ``a``. Backward recomputes ``σ(a)`` from the saved inputs::

    da = dy · b · σ(a) · (1 + a · (1 - σ(a)))        db = dy · a · σ(a)
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import interpreted, mark_built, use_triton


def swiglu_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The definition: ``silu(a) * b`` as eager computes it."""
    return F.silu(a) * b


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    mark_built()

    @triton.jit
    def swiglu_fwd(A, B, Y, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < N
        a = tl.load(A + offs, mask=m, other=0.0).to(tl.float32)
        b = tl.load(B + offs, mask=m, other=0.0).to(tl.float32)
        y = a * tl.sigmoid(a) * b
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=m)

    @triton.jit
    def swiglu_bwd(A, B, DY, DA, DB, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < N
        a = tl.load(A + offs, mask=m, other=0.0).to(tl.float32)
        b = tl.load(B + offs, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=m, other=0.0).to(tl.float32)
        s = tl.sigmoid(a)
        tl.store(DA + offs, (dy * b * s * (1.0 + a * (1.0 - s))).to(DA.dtype.element_ty), mask=m)
        tl.store(DB + offs, (dy * a * s).to(DB.dtype.element_ty), mask=m)

    return swiglu_fwd, swiglu_bwd


def block_size() -> int:
    """Elements per program of the flat elementwise kernels (bigger under the interpreter)."""
    return 1 << 16 if interpreted() else 1024


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        shape = torch.broadcast_shapes(a.shape, b.shape)
        a2, b2 = a.expand(shape).contiguous(), b.expand(shape).contiguous()
        y = torch.empty(shape, dtype=torch.promote_types(a.dtype, b.dtype), device=a.device)
        n = y.numel()
        blk = block_size()
        fwd, _ = _kernels()
        fwd[(-(-n // blk),)](a2, b2, y, n, BLOCK=blk)
        ctx.save_for_backward(a2, b2)
        ctx.shapes = (a.shape, b.shape)
        return y

    @staticmethod
    def backward(ctx, dy):
        a2, b2 = ctx.saved_tensors
        dy = dy.contiguous()
        da, db = torch.empty_like(a2), torch.empty_like(b2)
        n = a2.numel()
        blk = block_size()
        _, bwd = _kernels()
        bwd[(-(-n // blk),)](a2, b2, dy, da, db, n, BLOCK=blk)
        return da.sum_to_size(ctx.shapes[0]), db.sum_to_size(ctx.shapes[1])


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``silu(a) * b`` in one kernel (Triton) or as eager does (reference), per :func:`use_triton`."""
    if use_triton(a, b) and a.numel() > 0:
        return _SwiGLU.apply(a, b)
    return swiglu_reference(a, b)
