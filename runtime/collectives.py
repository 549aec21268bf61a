"""Differentiable collectives over a mesh dimension.

Each function here is what a pass inserts into the FX graph as a ``call_function`` node, so
``print(graph)`` shows every collective. The mesh dimension is named by a *group key* string
(``"mesh0.tp"``); :func:`register_group` binds a key to this rank's process group when a real mesh
is built, the way c10d resolves process groups by name.

Gradient convention (Megatron's): the gradient of a replicated activation is itself replicated,
complete on every rank. Every op's backward is then its conjugate under that convention:

=====================  =========================  ============================
function               forward                    backward
=====================  =========================  ============================
``all_reduce``         sum over the group          identity           (Partial → Replicate)
``reduce_grad``        identity                    sum over the group (Replicate fed to a sharded op)
``all_gather``         concatenate the shards      keep the local chunk (Shard → Replicate)
``scatter``            keep the local chunk        concatenate             (Replicate → Shard)
=====================  =========================  ============================

Bytes sent are counted per group as ring algorithms send them: all-reduce ``2(n-1)/n·B``,
all-gather and reduce-scatter ``(n-1)/n·B`` of the full tensor.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.distributed as dist

from .mesh import GroupHandle

_GROUPS: dict[str, GroupHandle] = {}
# torch >= 2.13 renames all_gather_into_tensor to all_gather_single
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_BYTES_SENT: dict[str, float] = defaultdict(float)


def register_group(handle: GroupHandle) -> None:
    """Make ``handle.name`` resolvable by the collectives in this process."""
    _GROUPS[handle.name] = handle


def bytes_sent(prefix: str = "") -> dict[str, float]:
    """Bytes sent so far per group key (optionally only keys starting with ``prefix``)."""
    return {k: v for k, v in _BYTES_SENT.items() if k.startswith(prefix)}


def reset_bytes(prefix: str = "") -> None:
    for k in list(_BYTES_SENT):
        if k.startswith(prefix):
            _BYTES_SENT[k] = 0.0


def count_bytes(key: str, nbytes: float) -> None:
    _BYTES_SENT[key] += nbytes


def _group(key: str) -> GroupHandle:
    try:
        return _GROUPS[key]
    except KeyError:
        raise RuntimeError(
            f"collective on group {key!r}, which no mesh in this process registered; was the graph "
            "built on a virtual mesh? Lower it with a real Mesh before running it."
        ) from None


# The differentiable collectives run torch's functional collectives (``_c10d_functional`` ops): out of
# place, so they work eagerly and trace into a joint forward+backward graph as ordinary nodes.
_F = torch.ops._c10d_functional


def _all_reduce(x: torch.Tensor, key: str) -> torch.Tensor:
    g = _group(key)
    if g.size == 1:
        return x
    out = _F.wait_tensor(_F.all_reduce(x.contiguous(), "sum", g.group.group_name))
    count_bytes(key, 2 * (g.size - 1) / g.size * out.numel() * out.element_size())
    return out


def _all_gather(x: torch.Tensor, dim: int, key: str) -> torch.Tensor:
    g = _group(key)
    if g.size == 1:
        return x
    dim = dim % x.dim()
    moved = x.movedim(dim, 0).contiguous()
    out = _F.wait_tensor(_F.all_gather_into_tensor(moved, g.size, g.group.group_name))
    count_bytes(key, (g.size - 1) * moved.numel() * moved.element_size())
    return out.movedim(0, dim)


def _chunk(x: torch.Tensor, dim: int, key: str) -> torch.Tensor:
    g = _group(key)
    if g.size == 1:
        return x
    return x.chunk(g.size, dim=dim)[g.rank].contiguous()


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, key: str) -> torch.Tensor:
        return _all_reduce(x, key)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _ReduceGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, key: str) -> torch.Tensor:
        ctx.key = key
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_reduce(grad, ctx.key), None


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, key: str) -> torch.Tensor:
        ctx.dim, ctx.key = dim, key
        return _all_gather(x, dim, key)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _chunk(grad, ctx.dim, ctx.key), None, None


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, key: str) -> torch.Tensor:
        ctx.dim, ctx.key = dim, key
        return _chunk(x, dim, key)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_gather(grad, ctx.dim, ctx.key), None, None


def all_reduce(x: torch.Tensor, group: str) -> torch.Tensor:
    """Sum ``x`` over the group (Partial → Replicate); backward passes the gradient through."""
    return _AllReduce.apply(x, group)


def reduce_grad(x: torch.Tensor, group: str) -> torch.Tensor:
    """Identity forward; sums the gradient over the group in backward.

    Inserted where a replicated tensor feeds an op whose output is sharded or partial: each rank
    then sees only part of the gradient, and the sum restores the replicated gradient.
    """
    return _ReduceGrad.apply(x, group)


def all_gather(x: torch.Tensor, dim: int, group: str) -> torch.Tensor:
    """Concatenate the group's shards along ``dim`` (Shard(dim) → Replicate)."""
    return _AllGather.apply(x, dim, group)


def scatter(x: torch.Tensor, dim: int, group: str) -> torch.Tensor:
    """Keep this rank's chunk of a replicated tensor along ``dim`` (Replicate → Shard(dim))."""
    return _Scatter.apply(x, dim, group)


def all_reduce_(tensor: torch.Tensor, group: str, *, async_op: bool = False):
    """In-place, non-differentiable all-reduce for gradient buckets; returns the work handle."""
    g = _group(group)
    if g.size == 1:
        return None
    count_bytes(group, 2 * (g.size - 1) / g.size * tensor.numel() * tensor.element_size())
    return dist.all_reduce(tensor, group=g.group, async_op=async_op)


COLLECTIVES = (all_reduce, reduce_grad, all_gather, scatter)


def group_rank(group: str) -> int:
    """This rank's index in the group named ``group``."""
    return _group(group).rank


_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def reduce_scatter_(out: torch.Tensor, inp: torch.Tensor, group: str, *, async_op: bool = False):
    """Non-differentiable reduce-scatter of ``inp`` (size n·len(out)) into ``out``; returns the work handle."""
    g = _group(group)
    if g.size == 1:
        out.copy_(inp)
        return None
    count_bytes(group, (g.size - 1) / g.size * inp.numel() * inp.element_size())
    return _REDUCE_SCATTER(out, inp, group=g.group, async_op=async_op)


def all_gather_(out: torch.Tensor, inp: torch.Tensor, group: str, *, async_op: bool = False):
    """Non-differentiable all-gather of every rank's ``inp`` into ``out`` (rank order)."""
    g = _group(group)
    if g.size == 1:
        out.copy_(inp)
        return None
    count_bytes(group, (g.size - 1) * inp.numel() * inp.element_size())
    return _ALL_GATHER(out, inp, group=g.group, async_op=async_op)


# ---------------------------------------------------------------------------- all-to-all (experts)
def _all_to_all(x: torch.Tensor, send: list[int], recv: list[int], key: str) -> torch.Tensor:
    """Rows ``x[sum(send[:j]):sum(send[:j+1])]`` go to rank j; returns the rows received, in rank order."""
    g = _group(key)
    x = x.contiguous()
    if g.size == 1:
        return x.clone()
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x, output_split_sizes=list(recv), input_split_sizes=list(send), group=g.group)
    row = math.prod(x.shape[1:]) * x.element_size()
    count_bytes(key, (sum(send) - send[g.rank]) * row)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], key: str) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.key = send, recv, key
        return _all_to_all(x, send, recv, key)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_to_all(grad, ctx.recv, ctx.send, ctx.key), None, None, None


def all_to_all(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group: str) -> torch.Tensor:
    """Variable-size all-to-all along dim 0: ``send_splits[j]`` rows go to rank ``j`` of the group,
    ``recv_splits[j]`` rows come from it. Backward sends the gradients back the other way.

    Both split lists must be known on every rank beforehand (exchange counts with
    :func:`all_to_all_counts` first); every rank of the group must call it, in the same order.
    """
    return _AllToAll.apply(x, list(send_splits), list(recv_splits), group)


def all_to_all_counts(counts: torch.Tensor, group: str) -> torch.Tensor:
    """Equal-chunk, non-differentiable all-to-all of a 1-D integer tensor: chunk ``j`` goes to rank ``j``.

    Used to tell every rank how many rows it will receive before :func:`all_to_all`.
    """
    g = _group(group)
    if g.size == 1:
        return counts.clone()
    counts = counts.contiguous()
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts, group=g.group)
    count_bytes(group, (g.size - 1) / g.size * counts.numel() * counts.element_size())
    return out
