"""Activation checkpointing at run time: a block's forward is run again in backward instead of kept.

The graph pass :mod:`autoshard.passes.activation_checkpoint` moves each chosen block into a
parameter-free sub-``GraphModule`` and calls it through :func:`checkpoint_block`. That is
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` with two settings fixed:

* ``preserve_rng_state=True``: the recompute restores the RNG state the forward started from, so
  dropout draws the same masks (and the global generator is left as the forward left it).
* ``early_stop=False``: the recompute always runs the *whole* block. Early stopping ends it once
  every saved tensor has been rebuilt, which would skip the block's last operations; when those
  include a collective (a tensor-parallel all-reduce, an expert all-to-all), ranks would disagree on
  which collectives run. Without it the recompute issues exactly the forward's collectives, in the
  forward's order, on every rank (contract 2).

The non-reentrant form keeps the autograd graph of the first forward (built with its saved tensors
replaced by placeholders), so parameter gradients, gradient hooks, ``autograd.grad(inputs=...)``
(zero-bubble pipelines) and ZeRO-3's ``regather`` identities behave as without checkpointing; the
recompute only refills the saved tensors when backward first needs one of the block's.
:func:`recomputing` says whether a recompute is running, so run-time statistics (expert token
counts) are counted once per step.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

_state = threading.local()


def recomputing() -> bool:
    """True while a checkpointed block's forward is being recomputed (in backward), on this thread."""
    return getattr(_state, "depth", 0) > 0


@contextmanager
def _recompute_scope():
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


def checkpoint_block(block: torch.nn.Module, *args: Any) -> Any:
    """Graph node: run ``block(*args)`` keeping only its inputs; backward recomputes the rest.

    Without gradients (eval, ``no_grad``) or without an input that needs one, the block just runs.
    """
    if not torch.is_grad_enabled() or not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return block(*args)
    runs = [0]

    def run(*xs: Any) -> Any:
        runs[0] += 1
        if runs[0] == 1:
            return block(*xs)
        with _recompute_scope():
            return block(*xs)

    return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=True, early_stop=False)
