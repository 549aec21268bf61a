"""Fused AdamW over one flat tensor: a whole ZeRO shard updated in one kernel launch.

The update is ``torch.optim.AdamW``'s (decoupled weight decay, bias-corrected moments), written
in the same operation order so the two agree to rounding::

    p ← p · (1 - lr·λ)
    m ← m + (1 - β₁)·(g - m)                     (lerp)
    v ← β₂·v + (1 - β₂)·g²
    p ← p - (lr / (1 - β₁ᵗ)) · m / (√v / √(1 - β₂ᵗ) + ε)

Eager AdamW over a flat shard runs about a dozen elementwise kernels, each reading and writing the
shard; the fused kernel reads ``p, g, m, v`` once and writes ``p, m, v`` once (28 bytes per fp32
parameter instead of ~100).
"""

from __future__ import annotations

import functools
import math

import torch

from . import interpreted, mark_built, use_triton


@torch.no_grad()
def adamw_reference_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                     lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int) -> None:
    """The definition, as ``torch.optim.AdamW`` (single-tensor, non-capturable) computes it, in place."""
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr / (1 - beta1 ** step)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** step)).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    mark_built()

    @triton.jit
    def adamw(P, G, M, V, N, decay, beta1, beta2, one_minus_beta1, one_minus_beta2, step_size, bc2_sqrt, eps,
              BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        p = tl.load(P + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(M + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(V + offs, mask=mask, other=0.0).to(tl.float32)
        p = p * decay
        m = m + one_minus_beta1 * (g - m)
        v = v * beta2 + one_minus_beta2 * g * g
        p = p - step_size * (m / (tl.sqrt(v) / bc2_sqrt + eps))
        tl.store(P + offs, p.to(P.dtype.element_ty), mask=mask)
        tl.store(M + offs, m.to(M.dtype.element_ty), mask=mask)
        tl.store(V + offs, v.to(V.dtype.element_ty), mask=mask)

    return adamw


@torch.no_grad()
def fused_adamw_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int) -> None:
    """One AdamW step on a flat (contiguous) tensor, in place; ``step`` counts from 1 (this step included).

    ``param``, ``exp_avg`` and ``exp_avg_sq`` are updated; ``grad`` is read. Non-contiguous
    tensors, or a backend that is not Triton, take :func:`adamw_reference_`.
    """
    if step < 1:
        raise ValueError(f"step={step}: AdamW steps count from 1")
    tensors = (param, grad, exp_avg, exp_avg_sq)
    same = all(t.shape == param.shape and t.device == param.device for t in tensors)
    if not (use_triton(param) and same and all(t.is_contiguous() for t in tensors)) or param.numel() == 0:
        adamw_reference_(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step)
        return
    n = param.numel()
    block = 1 << 16 if interpreted() else 2048
    _kernels()[(-(-n // block),)](
        param, grad, exp_avg, exp_avg_sq, n, 1 - lr * weight_decay, beta1, beta2, 1 - beta1, 1 - beta2,
        lr / (1 - beta1 ** step), math.sqrt(1 - beta2 ** step), eps, BLOCK=block)
