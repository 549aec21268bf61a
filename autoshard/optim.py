"""Optimizers that use autoshard's fused kernels.

:class:`FusedAdamW` is ``torch.optim.AdamW`` (same hyperparameters, same state names and types, so
checkpoints and ZeRO's state gathering treat it alike) whose update is one Triton launch per
tensor: with ZeRO each tensor is a whole flat fp32 shard, so a step is one launch per bucket::

    from autoshard.optim import FusedAdamW
    sm = autoshard.autoshard(model, mesh, ..., zero=1, optimizer=lambda ps: FusedAdamW(ps, lr=3e-4))
"""

from __future__ import annotations

import torch

from autoshard.runtime.kernels.adamw import fused_adamw_


class FusedAdamW(torch.optim.Optimizer):
    """AdamW with decoupled weight decay; each parameter tensor is updated by one fused kernel.

    Matches ``torch.optim.AdamW(params, lr, betas, eps, weight_decay)`` to rounding (amsgrad,
    maximize and complex parameters are not supported). On CPU, or with ``AUTOSHARD_KERNELS=torch``,
    the update runs as the torch reference.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2) -> None:
        if not lr >= 0.0:
            raise ValueError(f"invalid learning rate: {lr}")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"invalid betas: {betas}")
        if not eps >= 0.0:
            raise ValueError(f"invalid eps: {eps}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient; returns the closure's loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse or p.is_complex():
                    raise RuntimeError("FusedAdamW supports dense real tensors only")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                fused_adamw_(p, p.grad, state["exp_avg"], state["exp_avg_sq"], group["lr"], beta1, beta2, group["eps"],
                             group["weight_decay"], int(state["step"].item()))
        return loss
