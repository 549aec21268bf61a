"""1-bit compressed all-reduce with error feedback (the communication of 1-bit Adam).

The average over ``n`` ranks of a flat fp32 tensor ``x`` (padded to ``N = n·c`` elements, ``c`` a
multiple of 8) is computed in two compressed rounds, as in 1-bit Adam (Tang et al., ICML 2021):

1. *worker*: ``y = x + e_w``; each rank-sized chunk ``j`` of ``y`` becomes ``c`` sign bits packed 8
   per byte and one fp32 scale per block of ``BLOCK`` = 256 elements, ``‖y_b‖₁ / 256`` (the
   least-squares optimal scale for a sign vector; DeepSpeed uses one per chunk, which lets large
   and small parameters share a scale); ``e_w ← y − decompress(compress(y))``. An all-to-all hands chunk ``j`` of every rank to
   rank ``j``.
2. *server*: rank ``r`` averages the ``n`` decompressed copies of chunk ``r``, adds ``e_s``, compresses
   the sum again and keeps ``e_s ← z − decompress(compress(z))``. An all-gather gives every rank every
   compressed chunk, which it decompresses into ``x``: all ranks end with the same values.

Each compression keeps its residual and adds it back the next round (error feedback), so the errors
do not accumulate: the running mean of the results over ``T`` rounds differs from the running mean
of the true averages by ``O(1/T)`` (tests/test_onebit.py checks it).

Bytes. Both rounds move rows of ``c/8 + 4c/256`` bytes (bits + scales): ``2(n−1)·c·(1/8 + 1/64)``
bytes sent per rank against ``2(n−1)/n · 4N = 2(n−1)·4c`` for a ring all-reduce of fp32: 28.4×
fewer. The all-to-all uses ``all_to_all_single`` (Gloo and NCCL both implement it); the bytes
are counted on the group key, like every other collective, so ``ShardedModule.stats()`` shows them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import collectives as C

_SHIFTS = torch.arange(8, dtype=torch.uint8)


BLOCK = 256  # elements per fp32 scale: 4 bytes per 32 bytes of sign bits (a scale per rank-chunk is too coarse)


def padded_length(numel: int, world: int) -> int:
    """``numel`` rounded up to a multiple of ``BLOCK · world`` (every rank's chunk whole blocks, whole bytes)."""
    unit = BLOCK * world
    return max(unit, -(-numel // unit) * unit)


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """Sign bits of a 1-D tensor whose length is a multiple of 8, packed 8 per uint8 (bit set: ``x >= 0``)."""
    bits = (x >= 0).to(torch.uint8).view(-1, 8)
    return (bits << _SHIFTS.to(x.device)).sum(dim=1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_signs`: a float tensor of ±1, 8 per byte."""
    bits = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 1
    return bits.reshape(*packed.shape[:-1], -1).to(torch.float32) * 2 - 1


def compress(chunks: torch.Tensor) -> torch.Tensor:
    """Rows of ``chunks`` (k, c), ``c`` a multiple of ``BLOCK`` → uint8 rows (k, 4c/BLOCK + c/8): one fp32
    scale per block of ``BLOCK`` elements (its mean absolute value), then the sign bits."""
    k, c = chunks.shape
    scales = chunks.reshape(k, c // BLOCK, BLOCK).abs().mean(dim=2, dtype=torch.float32).contiguous()
    packed = pack_signs(chunks.reshape(-1)).view(k, c // 8)
    return torch.cat([scales.view(torch.uint8).view(k, -1), packed], dim=1)


def decompress(rows: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`compress` up to the compression error: uint8 rows → float (k, c)."""
    k, width = rows.shape
    c = width * 8 * BLOCK // (32 + BLOCK)  # width = 4c/BLOCK + c/8
    scales = rows[:, :4 * c // BLOCK].reshape(-1).view(torch.float32).view(k, c // BLOCK, 1)
    signs = unpack_signs(rows[:, 4 * c // BLOCK:]).view(k, c // BLOCK, BLOCK)
    return (signs * scales).reshape(k, c)


def compressed_reduce_scatter_(flat: torch.Tensor, group: str | None, worker_error: torch.Tensor,
                               server_error: torch.Tensor) -> torch.Tensor:
    """Phase 1 of the compressed average: this rank's chunk of it, as one compressed row.

    Compresses ``flat + worker_error`` per chunk (updating ``worker_error``), hands chunk ``j`` to rank
    ``j`` (all-to-all), averages the ``n`` decompressed copies of this rank's chunk, adds
    ``server_error``, compresses that and keeps the new residual in ``server_error``. Returns the
    uint8 row (``decompress(row.view(1, -1))`` is this rank's chunk of the result). ``flat`` is
    read, not written. Arguments as for :func:`compressed_allreduce_`.
    """
    if flat.dim() != 1 or flat.dtype != torch.float32:
        raise ValueError("compressed_allreduce_ takes a 1-D fp32 tensor")
    g = C._group(group) if group is not None else None
    n = g.size if g is not None else 1
    if flat.numel() % (BLOCK * n) or worker_error.shape != flat.shape or server_error.numel() * n != flat.numel():
        raise ValueError(f"lengths: flat {flat.numel()} must be a multiple of {BLOCK}·{n}, worker_error the same, "
                         f"server_error one chunk ({flat.numel() // n})")
    c = flat.numel() // n
    y = (flat + worker_error).view(n, c)
    sent = compress(y)
    worker_error.copy_((y - decompress(sent)).reshape(-1))
    row = sent.shape[1]
    if n > 1:
        recv = torch.empty_like(sent)
        dist.all_to_all_single(recv, sent, group=g.group)  # row j of `sent` goes to rank j
        C.count_bytes(group, (n - 1) * row)
    else:
        recv = sent
    z = decompress(recv).mean(dim=0) + server_error
    mine = compress(z.view(1, c))
    server_error.copy_(z - decompress(mine).view(-1))
    return mine.view(-1)


def compressed_all_gather(row: torch.Tensor, group: str | None) -> torch.Tensor:
    """Phase 2: every rank's compressed row (from :func:`compressed_reduce_scatter_`), in rank order,
    as a uint8 tensor ``(n, width)``; ``decompress`` of it is the whole average, the same on every rank."""
    g = C._group(group) if group is not None else None
    n = g.size if g is not None else 1
    if n == 1:
        return row.view(1, -1)
    every = torch.empty((n, row.numel()), dtype=torch.uint8, device=row.device)
    C._ALL_GATHER(every.view(-1), row, group=g.group)
    C.count_bytes(group, (n - 1) * row.numel())
    return every


def compressed_allreduce_(flat: torch.Tensor, group: str | None, worker_error: torch.Tensor,
                          server_error: torch.Tensor) -> torch.Tensor:
    """Replace ``flat`` by the compressed average of ``flat`` over the ranks of ``group``, in place.

    ``flat``: 1-D fp32 of length ``padded_length(·, n)``; ``worker_error`` the same length and
    ``server_error`` one chunk (``len(flat) / n``), both updated in place (error feedback). Every
    rank of the group must call it with the same length. ``group=None`` (or a group of one) still
    compresses once, so a single process sees the same arithmetic. The two phases are
    :func:`compressed_reduce_scatter_` and :func:`compressed_all_gather` (ZeRO uses them apart: after
    the first, rank ``r`` holds the average of the chunk whose optimizer states it owns).
    """
    mine = compressed_reduce_scatter_(flat, group, worker_error, server_error)
    every = compressed_all_gather(mine, group)
    flat.copy_(decompress(every).reshape(-1))
    return flat
