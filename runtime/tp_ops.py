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
