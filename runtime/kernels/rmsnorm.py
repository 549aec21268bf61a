"""RMSNorm with the residual add fused: ``h = x + residual; y = h · rsqrt(mean(h²) + eps) · w``.

One read of ``x`` and ``residual`` and one write of ``y`` and ``h`` per element in the forward,
instead of the six aten ops (add, pow, mean, add, rsqrt, mul, mul) eager runs. Statistics are
computed in fp32 whatever the input dtype; ``rstd`` (one fp32 per row) is saved for the backward.

Backward, with ``x̂ = h · rstd`` and ``ĝ = dy · w``::

    dh = rstd · (ĝ - x̂ · mean(x̂ · ĝ)) + dh_residual      dw = Σ_rows dy · x̂

The weight gradient is reduced across the grid: each program walks a strided set of row tiles,
keeps its partial ``Σ dy·x̂`` in registers, and writes one row of partials; the partials (one per
program, a few hundred at most) are summed afterwards.
"""

from __future__ import annotations

import functools

import torch

from . import mark_built, row_tile, sm_count, use_triton, warps

MAX_COLS = 65536  # one row per tile; wider rows run the reference


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
                       residual: torch.Tensor | None = None):
    """The definition: statistics in fp32, result in the promoted dtype of ``h`` and ``weight``."""
    h = x + residual if residual is not None else x
    hf = h.float()
    y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    y = y.to(_out_dtype(h, weight))
    return (y, h) if residual is not None else y


def _out_dtype(h: torch.Tensor, weight: torch.Tensor | None) -> torch.dtype:
    return torch.promote_types(h.dtype, weight.dtype) if weight is not None else h.dtype


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    mark_built()

    @triton.jit
    def rmsnorm_fwd(X, R, W, Y, H, RSTD, M, N, eps, HAS_RES: tl.constexpr, HAS_W: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        rmask = rows < M
        cmask = cols < N
        mask = rmask[:, None] & cmask[None, :]
        offs = rows[:, None].to(tl.int64) * N + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0)
        if HAS_RES:
            x = (x.to(tl.float32) + tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)).to(H.dtype.element_ty)
            tl.store(H + offs, x, mask=mask)
        x = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)
        tl.store(RSTD + rows, rstd, mask=rmask)
        y = x * rstd[:, None]
        if HAS_W:
            w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
            y = y * w[None, :]
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def rmsnorm_bwd(X, W, RSTD, DY, DR, DX, DWP, M, N, HAS_DR: tl.constexpr, HAS_W: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid = tl.program_id(0)
        step = tl.num_programs(0) * BLOCK_M
        cols = tl.arange(0, BLOCK_N)
        cmask = cols < N
        if HAS_W:
            w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(pid * BLOCK_M, M, step):
            rows = start + tl.arange(0, BLOCK_M)
            rmask = rows < M
            mask = rmask[:, None] & cmask[None, :]
            offs = rows[:, None].to(tl.int64) * N + cols[None, :]
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
            xhat = x * rstd[:, None]
            if HAS_W:
                g = dy * w[None, :]
            else:
                g = dy
            c = tl.sum(xhat * g, axis=1) / N
            dx = (g - xhat * c[:, None]) * rstd[:, None]
            if HAS_DR:
                dx += tl.load(DR + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
            dw += tl.sum(dy * xhat, axis=0)
        if HAS_W:
            tl.store(DWP + pid * N + cols, dw, mask=cmask)

    return rmsnorm_fwd, rmsnorm_bwd


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, residual, eps):
        n = x.shape[-1]
        x2 = x.reshape(-1, n).contiguous()
        m = x2.shape[0]
        has_res = residual is not None
        r2 = residual.expand_as(x).reshape(-1, n).contiguous() if has_res else x2
        h_dtype = torch.promote_types(x.dtype, residual.dtype) if has_res else x.dtype
        h2 = torch.empty((m, n), dtype=h_dtype, device=x.device) if has_res else x2
        y2 = torch.empty((m, n), dtype=_out_dtype(h2, weight), device=x.device)
        rstd = torch.empty(m, dtype=torch.float32, device=x.device)
        bm, bn = row_tile(n, m)
        fwd, _ = _kernels()
        w = weight.contiguous() if weight is not None else x2
        fwd[(-(-m // bm),)](x2, r2, w, y2, h2, rstd, m, n, float(eps), HAS_RES=has_res,
                            HAS_W=weight is not None, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps(bm * bn))
        ctx.save_for_backward(h2, weight, rstd)
        ctx.shape, ctx.x_dtype = x.shape, x.dtype
        ctx.res_shape = residual.shape if has_res else None
        ctx.res_dtype = residual.dtype if has_res else None
        y = y2.view(x.shape)
        if has_res:
            return y, h2.view(x.shape)
        return y

    @staticmethod
    def backward(ctx, dy, dh=None):
        h2, weight, rstd = ctx.saved_tensors
        m, n = h2.shape
        dy2 = dy.reshape(m, n).contiguous() if dy is not None else torch.zeros_like(h2)
        has_dr = dh is not None
        dr2 = dh.reshape(m, n).contiguous() if has_dr else dy2
        dx = torch.empty((m, n), dtype=h2.dtype, device=h2.device)
        bm, bn = row_tile(n, m)
        progs = max(1, min(-(-m // bm), 4 * sm_count(h2.device)))
        dwp = torch.empty((progs, n), dtype=torch.float32, device=h2.device) if weight is not None else dx
        _, bwd = _kernels()
        bwd[(progs,)](h2, weight if weight is not None else h2, rstd, dy2, dr2, dx, dwp, m, n, HAS_DR=has_dr,
                      HAS_W=weight is not None, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps(bm * bn))
        dw = dwp.sum(0).to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        dx = dx.view(ctx.shape)
        dres = None
        if ctx.res_shape is not None and ctx.needs_input_grad[2]:
            dres = dx.sum_to_size(ctx.res_shape).to(ctx.res_dtype)
        return dx.to(ctx.x_dtype), dw, dres, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6, residual: torch.Tensor | None = None):
    """RMSNorm over the last dim of ``x`` (after adding ``residual``, when given).

    Returns ``y``, or ``(y, h)`` with ``h = x + residual`` (the new residual stream) when a
    residual is given. Runs the Triton kernel or the torch reference per :func:`use_triton`.
    """
    if use_triton(x) and x.shape[-1] <= MAX_COLS and x.numel() > 0:
        return _RMSNorm.apply(x, weight, residual, eps)
    return rms_norm_reference(x, weight, eps, residual)
