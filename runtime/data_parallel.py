"""Data-parallel gradient averaging: bucketed all-reduce launched during backward.

Parameters are grouped into buckets of about ``bucket_bytes`` in the order their gradients become
ready (the reverse of first use in the forward graph). When every gradient of bucket ``k`` has been
accumulated *and* buckets ``0..k-1`` have been launched, bucket ``k``'s gradients are flattened and
an asynchronous all-reduce starts, so communication overlaps the rest of backward. Launching in
bucket order keeps the collectives identical in kind and order on every rank (contract 2).
"""

from __future__ import annotations

import torch

from . import collectives as C


def make_buckets(names_in_grad_order: list[str], nbytes: dict[str, int], bucket_bytes: int) -> list[list[str]]:
    """Greedy consecutive packing of parameter names into buckets of about ``bucket_bytes``."""
    buckets: list[list[str]] = []
    cur: list[str] = []
    size = 0
    for n in names_in_grad_order:
        cur.append(n)
        size += nbytes[n]
        if size >= bucket_bytes:
            buckets.append(cur)
            cur, size = [], 0
    if cur:
        buckets.append(cur)
    return buckets


class GradientSync:
    """Averages gradients over a data-parallel group, one flat all-reduce per bucket."""

    def __init__(self, params: dict[str, torch.nn.Parameter], buckets: list[list[str]], group: str, size: int,
                 expected: dict[str, int] | None = None, always: bool = False) -> None:
        self.params = params
        # accumulations per step before a gradient is final (microbatches × stages using it)
        self.expected = expected or {}
        self._count: dict[str, int] = {}
        self.buckets = [[n for n in b if params[n].requires_grad] for b in buckets]
        self.buckets = [b for b in self.buckets if b]
        self.group = group
        self.size = size
        self._bucket_of = {n: i for i, b in enumerate(self.buckets) for n in b}
        self._pending: list[int] = []
        self._ready: list[set[str]] = []
        self._launched: list[tuple[object, torch.Tensor] | None] = []
        self._next = 0
        self._handles = []
        self.active = size > 1 or always  # always: the gradients must be moved even without peers
        if self.active:
            for name in self._bucket_of:
                self._handles.append(params[name].register_post_accumulate_grad_hook(self._make_hook(name)))

    def _make_hook(self, name: str):
        def hook(p: torch.Tensor) -> None:
            if not self._armed:
                return
            self._count[name] = self._count.get(name, 0) + 1
            if self._count[name] < self.expected.get(name, 1):
                return
            i = self._bucket_of[name]
            self._ready[i].add(name)
            self._launch_ready()

        return hook

    # [comm] set by autoshard for an optimizer that reduces compressed momenta itself (1-bit Adam):
    # while it returns True, gradients stay local (neither reduced nor divided)
    raw_gradients = None

    def begin(self) -> None:
        """Arm the hooks for one backward pass."""
        self._local = bool(self.raw_gradients is not None and self.raw_gradients())
        self._armed = self.active and not self._local
        self._count = {}
        self._ready = [set() for _ in self.buckets]
        self._launched = [None] * len(self.buckets)
        self._next = 0
        self._done = 0

    _armed = False
    _local = False

    max_inflight = 4  # buckets reduced concurrently: bounds the memory of flat gradient copies

    def _launch_ready(self) -> None:
        while self._next < len(self.buckets) and len(self._ready[self._next]) == len(self.buckets[self._next]):
            self._launch(self._next)
            self._next += 1
            self._drain(self._next - self.max_inflight)

    def _drain(self, upto: int) -> None:
        """Wait for and complete launched buckets with index < ``upto``, oldest first."""
        while self._done < min(upto, self._next):
            work, payload = self._launched[self._done]
            if work is not None:
                work.wait()
            self._complete(self._done, payload)
            self._launched[self._done] = None
            self._done += 1

    def _launch(self, i: int) -> None:
        """Start bucket ``i``'s reduction (overridden by ZeRO, which reduce-scatters instead)."""
        grads = []
        for n in self.buckets[i]:
            p = self.params[n]
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad.reshape(-1))
        flat = torch.cat(grads).div_(self.size)
        work = C.all_reduce_(flat, self.group, async_op=True)
        self._launched[i] = (work, flat)

    def _complete(self, i: int, flat: torch.Tensor) -> None:
        """Bucket ``i``'s reduction has finished: write the averages back into the gradients."""
        off = 0
        for n in self.buckets[i]:
            g = self.params[n].grad
            k = g.numel()
            g.copy_(flat[off:off + k].view_as(g))
            off += k

    def finish(self) -> None:
        """Launch what backward did not reach (unused parameters), wait, and complete every bucket."""
        if not self.active or self._local:
            return
        while self._next < len(self.buckets):
            self._launch(self._next)
            self._next += 1
            self._drain(self._next - self.max_inflight)
        self._drain(len(self.buckets))
        self._armed = False

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
