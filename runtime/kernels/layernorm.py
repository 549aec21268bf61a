"""LayerNorm with the residual add fused: ``h = x + residual; y = (h - μ) · rstd · w + b``.

Forward reads ``x`` (and ``residual``) once and writes ``y`` (and ``h``); mean and rstd are
computed in fp32 and saved (one float each per row). Backward, with ``x̂ = (h - μ)·rstd`` and
``ĝ = dy · w``::

    dh = rstd · (ĝ - mean(ĝ) - x̂ · mean(x̂ · ĝ)) + dh_residual
    dw = Σ_rows dy · x̂        db = Σ_rows dy

Weight and bias gradients are reduced across the grid as in :mod:`.rmsnorm`: per-program partial
sums in registers, one row of partials per program, summed afterwards.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import mark_built, row_tile, sm_count, use_triton, warps

MAX_COLS = 65536


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                         residual: torch.Tensor | None = None):
    """The definition: ``aten.layer_norm`` on ``x + residual``."""
    h = x + residual if residual is not None else x
    y = F.layer_norm(h, (h.shape[-1],), weight, bias, eps)
    return (y, h) if residual is not None else y


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    mark_built()

    @triton.jit
    def layernorm_fwd(X, R, W, B, Y, H, MEAN, RSTD, M, N, eps, HAS_RES: tl.constexpr, HAS_W: tl.constexpr,
                      HAS_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
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
        mean = tl.sum(x, axis=1) / N
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / N + eps)
        tl.store(MEAN + rows, mean, mask=rmask)
        tl.store(RSTD + rows, rstd, mask=rmask)
        y = xc * rstd[:, None]
        if HAS_W:
            y = y * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            y = y + tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def layernorm_bwd(X, W, MEAN, RSTD, DY, DR, DX, DWP, DBP, M, N, HAS_DR: tl.constexpr, HAS_W: tl.constexpr,
                      HAS_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid = tl.program_id(0)
        step = tl.num_programs(0) * BLOCK_M
        cols = tl.arange(0, BLOCK_N)
        cmask = cols < N
        if HAS_W:
            w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        db = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(pid * BLOCK_M, M, step):
            rows = start + tl.arange(0, BLOCK_M)
            rmask = rows < M
            mask = rmask[:, None] & cmask[None, :]
            offs = rows[:, None].to(tl.int64) * N + cols[None, :]
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
            rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            if HAS_W:
                g = dy * w[None, :]
            else:
                g = dy
            c1 = tl.sum(xhat * g, axis=1) / N
            c2 = tl.sum(g, axis=1) / N
            dx = (g - c2[:, None] - xhat * c1[:, None]) * rstd[:, None]
            if HAS_DR:
                dx += tl.load(DR + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
            dw += tl.sum(dy * xhat, axis=0)
            db += tl.sum(dy, axis=0)
        if HAS_W:
            tl.store(DWP + pid * N + cols, dw, mask=cmask)
        if HAS_B:
            tl.store(DBP + pid * N + cols, db, mask=cmask)

    return layernorm_fwd, layernorm_bwd


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps):
        n = x.shape[-1]
        x2 = x.reshape(-1, n).contiguous()
        m = x2.shape[0]
        has_res = residual is not None
        r2 = residual.expand_as(x).reshape(-1, n).contiguous() if has_res else x2
        h_dtype = torch.promote_types(x.dtype, residual.dtype) if has_res else x.dtype
        h2 = torch.empty((m, n), dtype=h_dtype, device=x.device) if has_res else x2
        y2 = torch.empty((m, n), dtype=h_dtype, device=x.device)
        mean = torch.empty(m, dtype=torch.float32, device=x.device)
        rstd = torch.empty(m, dtype=torch.float32, device=x.device)
        bm, bn = row_tile(n, m)
        fwd, _ = _kernels()
        w = weight.contiguous() if weight is not None else x2
        b = bias.contiguous() if bias is not None else x2
        fwd[(-(-m // bm),)](x2, r2, w, b, y2, h2, mean, rstd, m, n, float(eps), HAS_RES=has_res,
                            HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_M=bm, BLOCK_N=bn,
                            num_warps=warps(bm * bn))
        ctx.save_for_backward(h2, weight, mean, rstd)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.shape, ctx.x_dtype = x.shape, x.dtype
        ctx.res_shape = residual.shape if has_res else None
        ctx.res_dtype = residual.dtype if has_res else None
        y = y2.view(x.shape)
        if has_res:
            return y, h2.view(x.shape)
        return y

    @staticmethod
    def backward(ctx, dy, dh=None):
        h2, weight, mean, rstd = ctx.saved_tensors
        m, n = h2.shape
        dy2 = dy.reshape(m, n).contiguous() if dy is not None else torch.zeros_like(h2)
        has_dr = dh is not None
        dr2 = dh.reshape(m, n).contiguous() if has_dr else dy2
        dx = torch.empty((m, n), dtype=h2.dtype, device=h2.device)
        bm, bn = row_tile(n, m)
        progs = max(1, min(-(-m // bm), 4 * sm_count(h2.device)))
        dwp = torch.empty((progs, n), dtype=torch.float32, device=h2.device) if weight is not None else dx
        dbp = torch.empty((progs, n), dtype=torch.float32, device=h2.device) if ctx.has_bias else dx
        _, bwd = _kernels()
        bwd[(progs,)](h2, weight if weight is not None else h2, mean, rstd, dy2, dr2, dx, dwp, dbp, m, n,
                      HAS_DR=has_dr, HAS_W=weight is not None, HAS_B=ctx.has_bias, BLOCK_M=bm, BLOCK_N=bn,
                      num_warps=warps(bm * bn))
        dw = dwp.sum(0).to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        db = dbp.sum(0).to(ctx.bias_dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        dx = dx.view(ctx.shape)
        dres = None
        if ctx.res_shape is not None and ctx.needs_input_grad[3]:
            dres = dx.sum_to_size(ctx.res_shape).to(ctx.res_dtype)
        return dx.to(ctx.x_dtype), dw, db, dres, None


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-5,
               residual: torch.Tensor | None = None):
    """LayerNorm over the last dim of ``x`` (after adding ``residual``, when given).

    Returns ``y``, or ``(y, h)`` with ``h = x + residual`` when a residual is given.
    """
    if use_triton(x) and x.shape[-1] <= MAX_COLS and x.numel() > 0:
        return _LayerNorm.apply(x, weight, bias, residual, eps)
    return layer_norm_reference(x, weight, bias, eps, residual)
