"""Cutting a full tensor into one rank's shard of a layout, and putting the shards back together.

A layout shards dim ``d`` over ``n`` ranks, optionally in ``blocks`` equal segments each split on
its own (a fused q/k/v projection sharded so that every rank holds its heads of q, of k and of v).
"""

from __future__ import annotations

import torch


def shard_tensor(full: torch.Tensor, dim: int, n: int, rank: int, blocks: int = 1) -> torch.Tensor:
    """This rank's shard of ``full`` (a contiguous copy)."""
    dim %= full.dim()
    shp = list(full.shape)
    if shp[dim] % (n * blocks):
        raise ValueError(f"dim {dim} of size {shp[dim]} does not split into {blocks} blocks over {n} ranks")
    seg = shp[dim] // (blocks * n)
    x = full.reshape(shp[:dim] + [blocks, n, seg] + shp[dim + 1:]).select(dim + 1, rank)
    return x.reshape(shp[:dim] + [blocks * seg] + shp[dim + 1:]).contiguous()


def unshard_tensor(pieces: list[torch.Tensor], dim: int, blocks: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard_tensor` given every rank's shard in rank order."""
    dim %= pieces[0].dim()
    ls = list(pieces[0].shape)
    seg = ls[dim] // blocks
    parts = [p.reshape(ls[:dim] + [blocks, seg] + ls[dim + 1:]) for p in pieces]
    x = torch.stack(parts, dim=dim + 1)
    return x.reshape(ls[:dim] + [blocks * len(pieces) * seg] + ls[dim + 1:])
