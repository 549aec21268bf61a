"""Cross-entropy that never holds the full fp32 logits, optionally over vocab-parallel logits.

For one row of logits ``x`` (length V) and target ``t``: ``loss = logsumexp(x) - x[t]``, and
``dloss/dx = softmax(x) - onehot(t)``. Eager ``F.cross_entropy`` on bf16 logits upcasts them
(``.float()`` by the caller, or inside log_softmax) and keeps an fp32 ``log_softmax`` the size of the
logits for the backward: for 4 × 2048 tokens × 32000 vocab that is 1 GiB.

Here the forward streams each row in ``BLOCK_V`` chunks, keeping a running max ``m`` and a running
``s = Σ exp(x - m)`` (online logsumexp: on a new chunk maximum ``m'``, ``s ← s·exp(m - m') +
Σ exp(x - m')``), and picks up ``x[t]``. It saves only the logits themselves (in their own dtype)
and one fp32 ``lse`` per row. The backward streams the chunks again and writes
``(exp(x - lse) - onehot) · g`` in the logits' dtype.

Vocab-parallel: when the logits are this rank's shard ``[vocab_start, vocab_start + V_local)`` of
the vocabulary over a tensor-parallel group, the three row statistics are combined across the
group before the loss: ``m = max_r m_r`` (all-reduce MAX), ``s = Σ_r s_r·exp(m_r - m)`` and
``x[t] = Σ_r x_r[t]`` (all-reduce SUM; only the owner of ``t`` contributes). Every rank then holds
the full loss; the gradient of its shard is local, so the backward needs no communication.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import interpreted, mark_built, next_pow2, use_triton, warps

BLOCK_V = 4096


def cross_entropy_reference(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                            reduction: str = "mean") -> torch.Tensor:
    """The definition: ``F.cross_entropy`` on fp32 logits (holds them whole: the reference only)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                           ignore_index=ignore_index, reduction=reduction)


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    mark_built()

    @triton.jit
    def cross_entropy_stats(X, T, MX, S, XT, V, vstart, stride, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        base = X + row.to(tl.int64) * stride
        cols = tl.arange(0, BLOCK)
        one = tl.arange(0, 1)
        m = tl.full([1], -float("inf"), tl.float32)  # one-element vectors: loop-carried, one exp per logit
        s = tl.zeros([1], dtype=tl.float32)
        for start in range(0, V, BLOCK):
            x = tl.load(base + start + cols, mask=start + cols < V, other=-float("inf")).to(tl.float32)
            new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - new) + tl.sum(tl.exp(x - new), axis=0)
            m = new
        t = tl.load(T + row + one) - vstart
        inside = (t >= 0) & (t < V)
        xt = tl.load(base + tl.where(inside, t, 0)).to(tl.float32)
        tl.store(MX + row + one, m)
        tl.store(S + row + one, s)
        tl.store(XT + row + one, tl.where(inside, xt, 0.0))

    @triton.jit
    def cross_entropy_grad(X, T, LSE, G, DX, V, vstart, stride, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        base = row.to(tl.int64) * stride
        out = row.to(tl.int64) * V
        cols = tl.arange(0, BLOCK)
        t = tl.load(T + row) - vstart
        lse = tl.load(LSE + row)
        g = tl.load(G + row)
        for start in range(0, V, BLOCK):
            c = start + cols
            x = tl.load(X + base + c, mask=c < V, other=0.0).to(tl.float32)
            p = tl.exp(x - lse) - tl.where(c == t, 1.0, 0.0)
            tl.store(DX + out + c, (p * g).to(DX.dtype.element_ty), mask=c < V)

    return cross_entropy_stats, cross_entropy_grad


def _block(v: int) -> int:
    return min(next_pow2(v), 1 << 15 if interpreted() else BLOCK_V)


def row_stats(logits2: torch.Tensor, target: torch.Tensor, vocab_start: int = 0, triton: bool = False):
    """Per-row ``(max, Σ exp(x - max), x[target])`` of a ``[rows, V]`` logits shard, in fp32.

    ``x[target]`` is 0 for rows whose target lies outside ``[vocab_start, vocab_start + V)``.
    The torch path walks the vocabulary in chunks too, so neither path materialises fp32 logits.
    """
    n, v = logits2.shape
    mx = torch.empty(n, dtype=torch.float32, device=logits2.device)
    s = torch.empty_like(mx)
    xt = torch.empty_like(mx)
    if n == 0:
        return mx, s, xt
    if triton:
        stats, _ = _kernels()
        stats[(n,)](logits2, target, mx, s, xt, v, vocab_start, logits2.stride(0), BLOCK=_block(v),
                    num_warps=warps(_block(v)))
        return mx, s, xt
    mx.fill_(-float("inf"))
    s.zero_()
    for start in range(0, v, BLOCK_V):
        chunk = logits2[:, start:start + BLOCK_V].float()
        new = torch.maximum(mx, chunk.amax(-1))
        s = s * torch.exp(mx - new) + torch.exp(chunk - new[:, None]).sum(-1)
        mx = new
    local = target - vocab_start
    inside = (local >= 0) & (local < v)
    xt = torch.where(inside, logits2.gather(1, local.clamp(0, v - 1)[:, None])[:, 0].float(), 0.0)
    return mx, s, xt


def combine_stats(mx: torch.Tensor, s: torch.Tensor, xt: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """All-reduce one rank's row statistics over the vocab-parallel ``group``; returns ``(lse, x[target])``."""
    if group is not None and dist.get_world_size(group) > 1:
        top = mx.clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        s = s * torch.exp(mx - top)
        both = torch.stack([s, xt])
        dist.all_reduce(both, group=group)
        s, xt, mx = both[0], both[1], top
    return mx + torch.log(s), xt


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, ignore_index, reduction, group, vocab_start, triton):
        v = logits.shape[-1]
        x2 = logits.reshape(-1, v)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        t = target.reshape(-1).contiguous()
        mx, s, xt = row_stats(x2, t, vocab_start, triton)
        lse, xt = combine_stats(mx, s, xt, group)
        valid = t != ignore_index
        rows = torch.where(valid, lse - xt, 0.0)
        ctx.save_for_backward(x2, t, lse, valid)
        ctx.meta = (logits.shape, logits.dtype, reduction, vocab_start, triton)
        if reduction == "none":
            return rows.view(target.shape)
        if reduction == "sum":
            return rows.sum()
        return rows.sum() / valid.sum()

    @staticmethod
    def backward(ctx, g):
        x2, t, lse, valid = ctx.saved_tensors
        shape, dtype, reduction, vocab_start, triton = ctx.meta
        g = g.float()
        if reduction == "none":
            scale = g.reshape(-1) * valid
        elif reduction == "sum":
            scale = g * valid.float()
        else:
            scale = g * valid.float() / valid.sum()
        scale = scale.contiguous()
        n, v = x2.shape
        dx = torch.empty((n, v), dtype=dtype, device=x2.device)
        if n and triton:
            _, grad = _kernels()
            grad[(n,)](x2, t, lse, scale, dx, v, vocab_start, x2.stride(0), BLOCK=_block(v),
                       num_warps=warps(_block(v)))
        elif n:
            local = (t - vocab_start)
            for start in range(0, v, BLOCK_V):
                chunk = x2[:, start:start + BLOCK_V].float()
                p = torch.exp(chunk - lse[:, None])
                cols = torch.arange(start, start + chunk.shape[1], device=x2.device)
                p = p - (cols[None, :] == local[:, None]).float()
                dx[:, start:start + chunk.shape[1]] = (p * scale[:, None]).to(dtype)
        return dx.view(shape), None, None, None, None, None, None


def _resolve_group(group):
    if group is None or not isinstance(group, str):
        return group, None
    from ..collectives import _group

    handle = _group(group)
    return handle.group, handle.rank


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100, reduction: str = "mean",
                  group=None, vocab_start: int | None = None) -> torch.Tensor:
    """Cross-entropy of ``logits`` (..., V) against integer ``target`` (...), chunked over the vocabulary.

    Args:
        logits: any float dtype; never copied to fp32 whole.
        target: class indices; ``ignore_index`` rows contribute nothing (and count nothing for "mean").
        reduction: ``"mean"`` (over non-ignored rows), ``"sum"`` or ``"none"``.
        group: vocab-parallel logits: a collectives group key (``"mesh0.tp"``) or a process group
            whose ranks each hold a contiguous vocabulary shard of ``logits.shape[-1]`` columns.
        vocab_start: the first vocabulary index of this shard (default ``rank · V_local``).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction={reduction!r}: choose 'mean', 'sum' or 'none'")
    pg, rank = _resolve_group(group)
    if pg is not None and vocab_start is None:
        rank = dist.get_rank(pg) if rank is None else rank
        vocab_start = rank * logits.shape[-1]
    triton = use_triton(logits)
    if pg is None and not triton:
        return cross_entropy_reference(logits, target, ignore_index, reduction)
    return _CrossEntropy.apply(logits, target, ignore_index, reduction, pg, vocab_start or 0, triton)
