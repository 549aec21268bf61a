"""Softmax over the last dim: ``y = exp(x - max) / Σ exp(x - max)``, backward ``dx = y · (dy - Σ dy·y)``.

Rows up to ``TILE_COLS`` wide are held whole in one tile (several rows per program when they are
short): one read of ``x``, one write of ``y``. Wider rows (a vocabulary) are streamed in chunks with
an online max and sum (two reads of ``x``), one row per program. The output ``y`` is what the
backward saves; nothing else is kept.
"""

from __future__ import annotations

import functools

import torch

from . import mark_built, next_pow2, row_tile, use_triton, warps

TILE_COLS = 8192
CHUNK = 2048


def softmax_reference(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The definition: ``torch.softmax`` over the last dim (computed in fp32 for 16-bit inputs)."""
    return torch.softmax(x, dim=-1, dtype=dtype)


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    mark_built()

    @triton.jit
    def softmax_fwd_tile(X, Y, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        mask = (rows < M)[:, None] & (cols < N)[None, :]
        offs = rows[:, None].to(tl.int64) * N + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=-float("inf")).to(tl.float32)
        mx = tl.max(x, axis=1)
        mx = tl.where(mx == -float("inf"), 0.0, mx)  # a fully masked (padding) row
        e = tl.exp(x - mx[:, None])
        s = tl.sum(e, axis=1)
        s = tl.where(s == 0.0, 1.0, s)  # padding rows past M: no 0/0
        tl.store(Y + offs, (e / s[:, None]).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def softmax_bwd_tile(Yp, DY, DX, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        mask = (rows < M)[:, None] & (cols < N)[None, :]
        offs = rows[:, None].to(tl.int64) * N + cols[None, :]
        y = tl.load(Yp + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        c = tl.sum(y * dy, axis=1)
        tl.store(DX + offs, (y * (dy - c[:, None])).to(DX.dtype.element_ty), mask=mask)

    @triton.jit
    def softmax_fwd_loop(X, Y, N, BLOCK_N: tl.constexpr):
        base = tl.program_id(0).to(tl.int64) * N
        cols = tl.arange(0, BLOCK_N)
        mx = tl.full([BLOCK_N], -float("inf"), tl.float32)
        s = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            x = tl.load(X + base + start + cols, mask=start + cols < N, other=-float("inf")).to(tl.float32)
            new = tl.maximum(mx, x)
            new_safe = tl.where(new == -float("inf"), 0.0, new)
            s = s * tl.exp(mx - new_safe) + tl.exp(x - new_safe)
            mx = new
        top = tl.max(mx, axis=0)
        top_safe = tl.where(top == -float("inf"), 0.0, top)
        total = tl.sum(s * tl.exp(mx - top_safe), axis=0)
        for start in range(0, N, BLOCK_N):
            m = start + cols < N
            x = tl.load(X + base + start + cols, mask=m, other=-float("inf")).to(tl.float32)
            tl.store(Y + base + start + cols, (tl.exp(x - top_safe) / total).to(Y.dtype.element_ty), mask=m)

    @triton.jit
    def softmax_bwd_loop(Yp, DY, DX, N, BLOCK_N: tl.constexpr):
        base = tl.program_id(0).to(tl.int64) * N
        cols = tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            m = start + cols < N
            y = tl.load(Yp + base + start + cols, mask=m, other=0.0).to(tl.float32)
            dy = tl.load(DY + base + start + cols, mask=m, other=0.0).to(tl.float32)
            acc += y * dy
        c = tl.sum(acc, axis=0)
        for start in range(0, N, BLOCK_N):
            m = start + cols < N
            y = tl.load(Yp + base + start + cols, mask=m, other=0.0).to(tl.float32)
            dy = tl.load(DY + base + start + cols, mask=m, other=0.0).to(tl.float32)
            tl.store(DX + base + start + cols, (y * (dy - c)).to(DX.dtype.element_ty), mask=m)

    return softmax_fwd_tile, softmax_bwd_tile, softmax_fwd_loop, softmax_bwd_loop


def _launch_fwd(x2: torch.Tensor, y2: torch.Tensor) -> None:
    m, n = x2.shape
    fwd_tile, _, fwd_loop, _ = _kernels()
    if n <= TILE_COLS:
        bm, bn = row_tile(n, m)
        fwd_tile[(-(-m // bm),)](x2, y2, m, n, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps(bm * bn))
    else:
        fwd_loop[(m,)](x2, y2, n, BLOCK_N=min(CHUNK, next_pow2(n)), num_warps=warps(CHUNK))


class _Softmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dtype):
        n = x.shape[-1]
        x2 = x.reshape(-1, n).contiguous()
        y2 = torch.empty(x2.shape, dtype=dtype or x.dtype, device=x.device)
        _launch_fwd(x2, y2)
        ctx.save_for_backward(y2)
        ctx.shape, ctx.x_dtype = x.shape, x.dtype
        return y2.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        (y2,) = ctx.saved_tensors
        m, n = y2.shape
        dy2 = dy.reshape(m, n).contiguous()
        dx = torch.empty((m, n), dtype=ctx.x_dtype, device=y2.device)
        _, bwd_tile, _, bwd_loop = _kernels()
        if n <= TILE_COLS:
            bm, bn = row_tile(n, m)
            bwd_tile[(-(-m // bm),)](y2, dy2, dx, m, n, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps(bm * bn))
        else:
            bwd_loop[(m,)](y2, dy2, dx, n, BLOCK_N=min(CHUNK, next_pow2(n)), num_warps=warps(CHUNK))
        return dx.view(ctx.shape), None


def softmax(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Softmax over the last dim of ``x`` (result in ``dtype``, default ``x.dtype``)."""
    if use_triton(x) and x.numel() > 0 and x.dim() > 0:
        return _Softmax.apply(x, dtype)
    return softmax_reference(x, dtype)
