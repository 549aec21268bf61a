"""The two ends of a training step shared by both executors' modules (api.py and eager.py): the loss of
one forward, and the optimizer step that is skipped on every rank when the loss or a gradient is not
finite. Kept apart so that neither module imports the other.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch


def finish_step(zero: Any, optimizer: Any, loss: torch.Tensor, step: int, guard: Any = None) -> tuple[float, bool]:
    """The end of a training step, shared by the graph and the eager paths: the optimizer step unless
    the global ``loss`` (on the device) or a gradient is not finite, then the gradients cleared.

    With the ZeRO memory manager the loss joins its one host synchronisation (read there, before the
    update is launched); otherwise the loss is read first. Returns (loss value, whether it stepped).
    ``guard`` (runtime/guards.py): the ranks' per-step agreement, read at the same synchronisation;
    without ZeRO it also carries whether every rank's gradients are finite. A failed check raises on
    every rank, after the gradients are cleared and with no update applied.
    """
    if guard is not None:
        loss = guard.exchange(loss, optimizer if zero is None else None)
    if zero is not None:
        stepped = zero.step(loss=loss)
        value = zero.last_loss
    else:
        value = float(loss)
        stepped = math.isfinite(value) and (guard is None or guard.grads_finite())
        if stepped:
            optimizer.step()
    problem = guard.problem(step) if guard is not None else None
    if problem is None and not math.isfinite(value):
        warnings.warn(f"step {step}: loss is {value}; optimizer step skipped on every rank", stacklevel=3)
    elif problem is None and not stepped and zero is None:
        warnings.warn(f"step {step}: a gradient is not finite (loss {value}); optimizer step skipped on every rank",
                      stacklevel=3)
    if zero is not None:
        zero.zero_grad()
    else:
        optimizer.zero_grad(set_to_none=True)
    if problem is not None:
        raise problem
    return value, stepped


def model_loss(out: Any, target: Any, loss_fn: Callable[[Any, Any], torch.Tensor] | None) -> torch.Tensor:
    """The training loss of one forward: ``loss_fn(out, target)``, else the model's own (a tensor it
    returned, or the ``loss`` of an output such as a Hugging Face ``ModelOutput`` or a dict)."""
    if loss_fn is not None:
        return loss_fn(out, target)
    if isinstance(out, torch.Tensor):
        return out
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, dict):
        loss = out.get("loss")
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"the model returned {type(out).__name__} with no loss; pass loss_fn=...")
    return loss
