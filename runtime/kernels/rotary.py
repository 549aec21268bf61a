"""Rotary position embedding, half-split form: ``y = cat(x₁·cos - x₂·sin, x₁·sin + x₂·cos)``.

``x₁, x₂`` are the two halves of the last dim of ``x`` (batch, heads, seq, head_dim) and ``cos``,
``sin`` are (seq, head_dim/2) tables. Eager runs two slices, four muls, a sub, an add and a cat;
the kernel reads ``x`` once through its strides (the ``transpose`` of a projection's output need
not be copied first) and writes ``y`` once. The backward is the inverse rotation, the same kernel
with ``sin`` negated::

    dx₁ = dy₁·cos + dy₂·sin        dx₂ = -dy₁·sin + dy₂·cos
"""

from __future__ import annotations

import functools

import torch

from . import interpreted, mark_built, next_pow2, use_triton


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The definition, as eager computes it."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    mark_built()

    @triton.jit
    def rotary_rotate(X, COS, SIN, Y, H, T, HALF, sb, sh, st, sign, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        j = tl.arange(0, BLOCK_D)
        mask = (t < T)[:, None] & (j < HALF)[None, :]
        src = X + b.to(tl.int64) * sb + h.to(tl.int64) * sh + t[:, None].to(tl.int64) * st + j[None, :]
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
        tab = t[:, None] * HALF + j[None, :]
        c = tl.load(COS + tab, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(SIN + tab, mask=mask, other=0.0).to(tl.float32) * sign
        dst = Y + (bh.to(tl.int64) * T + t[:, None].to(tl.int64)) * (2 * HALF) + j[None, :]
        tl.store(dst, (x1 * c - x2 * s).to(Y.dtype.element_ty), mask=mask)
        tl.store(dst + HALF, (x1 * s + x2 * c).to(Y.dtype.element_ty), mask=mask)

    return rotary_rotate


def _launch(x4: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float, out_dtype: torch.dtype) -> torch.Tensor:
    b, h, t, d = x4.shape
    half = d // 2
    y = torch.empty((b, h, t, d), dtype=out_dtype, device=x4.device)
    bd = next_pow2(half)
    bt = max(1, min(next_pow2(t), (1 << 14 if interpreted() else 2048) // bd))
    _kernels()[(-(-t // bt), b * h)](x4, cos, sin, y, h, t, half, x4.stride(0), x4.stride(1), x4.stride(2), sign,
                                     BLOCK_T=bt, BLOCK_D=bd)
    return y


def _as4d(x: torch.Tensor) -> torch.Tensor:
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() == 4:
        return x
    if x.dim() == 3:
        return x.unsqueeze(0)
    if x.dim() == 2:
        return x[None, None]
    return x.reshape(-1, 1, *x.shape[-2:])


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        x4 = _as4d(x)
        t, half = x4.shape[-2], x4.shape[-1] // 2
        c = cos.reshape(t, half).contiguous()
        s = sin.reshape(t, half).contiguous()
        out_dtype = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)
        y = _launch(x4, c, s, 1.0, out_dtype)
        ctx.save_for_backward(x, c, s)
        ctx.tab_shapes = (cos.shape, sin.shape, cos.dtype, sin.dtype)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x, c, s = ctx.saved_tensors
        dx = _launch(_as4d(dy), c, s, -1.0, x.dtype).view(x.shape)
        dcos = dsin = None
        cos_shape, sin_shape, cos_dtype, sin_dtype = ctx.tab_shapes
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            half = x.shape[-1] // 2
            x1, x2 = x[..., :half].float(), x[..., half:].float()
            dy1, dy2 = dy[..., :half].float(), dy[..., half:].float()
            if ctx.needs_input_grad[1]:
                dcos = (dy1 * x1 + dy2 * x2).sum_to_size(cos_shape).to(cos_dtype)
            if ctx.needs_input_grad[2]:
                dsin = (dy2 * x1 - dy1 * x2).sum_to_size(sin_shape).to(sin_dtype)
        return dx, dcos, dsin


def _tables_fit(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    if x.dim() < 2 or x.shape[-1] % 2:
        return False
    want = (x.shape[-2], x.shape[-1] // 2)
    return all(t.numel() == want[0] * want[1] and t.shape[-2:] == want for t in (cos, sin))


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply rotary embedding to ``x`` (..., seq, head_dim) with (seq, head_dim/2) ``cos``/``sin`` tables."""
    if use_triton(x) and x.numel() > 0 and _tables_fit(x, cos, sin):
        return _Rotary.apply(x, cos, sin)
    return rotary_reference(x, cos, sin)
