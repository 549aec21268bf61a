"""Local ops that tensor-parallel rewrites call in place of an aten op.

They compute one rank's share of the original op; the collectives around them (inserted by the
tensor-parallel pass) make the result whole.
"""

from __future__ import annotations

import torch

from .collectives import group_rank


def vocab_parallel_embedding(weight: torch.Tensor, ids: torch.Tensor, group: str) -> torch.Tensor:
    """Embedding lookup against this rank's slice of the vocabulary (rows ``[r·V/n, (r+1)·V/n)``).

    Ids outside the slice read row 0 and are zeroed, so the result is Partial: the sum over the
    group equals ``embedding(full_weight, ids)``. The gradient reaches only the owned rows.
    """
    rows = weight.shape[0]
    start = group_rank(group) * rows
    local = ids - start
    inside = (local >= 0) & (local < rows)
    out = torch.nn.functional.embedding(local.clamp(0, rows - 1) * inside, weight)
    return out * inside.unsqueeze(-1).to(out.dtype)


class _ShardParam(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, dim: int, blocks: int, group: str) -> torch.Tensor:
        from .collectives import _group
        from .layout import shard_tensor

        g = _group(group)
        ctx.dim, ctx.blocks, ctx.group = dim, blocks, group
        return shard_tensor(weight, dim, g.size, g.rank, blocks)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        import torch.distributed as dist

        from .collectives import _group, count_bytes
        from .layout import unshard_tensor

        g = _group(ctx.group)
        grad = grad.contiguous()
        if g.size == 1:
            return grad, None, None, None
        pieces = [torch.empty_like(grad) for _ in range(g.size)]
        dist.all_gather(pieces, grad, group=g.group)
        count_bytes(ctx.group, (g.size - 1) * grad.numel() * grad.element_size())
        return unshard_tensor(pieces, ctx.dim, ctx.blocks), None, None, None


def shard_param(weight: torch.Tensor, dim: int, blocks: int, group: str) -> torch.Tensor:
    """This rank's shard of a whole parameter (``blocks`` fused segments, each split).

    Backward all-gathers the shards' gradients into the whole gradient, equal on every rank of the
    group: how the ``torch.compile`` backend keeps the user's parameters whole.
    """
    return _ShardParam.apply(weight, dim, blocks, group)
