"""Optimizers that use autoshard's fused kernels.

:class:`FusedAdamW` is ``torch.optim.AdamW`` (same hyperparameters, same state names and types, so
checkpoints and ZeRO's state gathering treat it alike) whose update is one Triton launch per
tensor: with ZeRO each tensor is a whole flat fp32 shard, so a step is one launch per bucket::

    from autoshard.optim import FusedAdamW
    sm = autoshard.autoshard(model, mesh, ..., zero=1, optimizer=lambda ps: FusedAdamW(ps, lr=3e-4))
"""

from __future__ import annotations

import math

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


class OneBitAdam(torch.optim.Optimizer):
    """1-bit Adam (Tang et al., ICML 2021): exact Adam for ``warmup_steps``, then compressed momenta.

    Warm-up: Adam with bias correction and decoupled weight decay (AdamW's), on the gradients the
    runtime averaged exactly. After it the variance ``exp_avg_sq`` is frozen, the runtime stops
    all-reducing gradients (:meth:`wants_raw_gradients`), and each step this optimizer updates the
    momentum with the *local* gradient and averages it over the data-parallel ranks with
    :func:`autoshard.runtime.compressed.compressed_allreduce_` (1 sign bit per element, error feedback
    on worker and server), then steps ``p -= lr · (m / bc1 / (sqrt(v / bc2_frozen) + eps) + wd · p)``.

    State per parameter (all of it saved by checkpoints): ``step``, ``exp_avg``, ``exp_avg_sq``,
    ``worker_error``, ``server_error`` (parameter-shaped: this rank's server chunk, zeros elsewhere)
    and the scalars ``error_rank`` / ``error_world`` recording whose residuals these are. A checkpoint
    keeps the data-parallel rank 0's states, so on resume every other rank, and every rank after a
    change of data-parallel size, starts its error buffers from zero (m and v are identical on all
    ranks and resume exactly). A checkpoint saved under ZeRO holds every rank's residual
    (``worker_error.{d}``) and the whole server residual: under the same dp size each rank resumes
    with its own.

    Without :meth:`bind_data_parallel` (one process) it runs the same arithmetic with no peers.

    Under ZeRO (``zero=1/2``, or ``precision="bf16"/"fp16"``) it sees this rank's fp32 master slices
    and is exact Adam on them during warm-up; after it
    :class:`autoshard.runtime.onebit_zero.OneBitZeroOptimizer` runs the compressed step over ZeRO's
    buckets (same arithmetic; residuals kept there, saved per dp rank by checkpoints).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, warmup_steps: int = 1000) -> None:
        if not lr >= 0.0:
            raise ValueError(f"invalid learning rate: {lr}")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"invalid betas: {betas}")
        if not eps >= 0.0:
            raise ValueError(f"invalid eps: {eps}")
        if not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"warmup_steps={warmup_steps!r} must be an integer >= 1: the exact Adam steps that "
                             "estimate the variance frozen afterwards (with none it would be zero)")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self.warmup_steps = warmup_steps
        self._group_key: str | None = None
        self._dp_rank, self._dp_size = 0, 1
        self._partition: list[list[torch.nn.Parameter]] | None = None

    # ------------------------------------------------------------------ runtime integration
    def bind_data_parallel(self, group: str | None, size: int, rank: int,
                           partition: list[list[torch.nn.Parameter]]) -> None:
        """Called by autoshard: average momenta over ``group`` (``size`` ranks, this one ``rank``).

        ``partition``: lists of parameters compressed together. Parameters replicated over tensor
        parallelism must not share a list with sharded ones: a chunk's scale depends on every element
        in it, and replicated parameters must come out identical on every tp rank.
        """
        self._group_key = group if size > 1 else None
        self._dp_size, self._dp_rank = size, rank
        self._partition = [list(ps) for ps in partition if ps]

    def _step_count(self) -> int:
        return max((int(float(st["step"])) for st in self.state.values() if "step" in st), default=0)

    def wants_raw_gradients(self) -> bool:
        """True once warm-up is over: the runtime must leave gradients local (this optimizer
        communicates compressed momenta instead). Same answer on every rank: steps advance together."""
        return self._step_count() >= self.warmup_steps

    @property
    def compression_started(self) -> bool:
        return self.wants_raw_gradients()

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter; returns the closure's loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        compressed = self.wants_raw_gradients()
        for group in self.param_groups:
            for p in group["params"]:
                if p.is_complex() or (p.grad is not None and p.grad.is_sparse):
                    raise RuntimeError("OneBitAdam supports dense real tensors only")
                st = self.state[p]
                if not st and p.requires_grad:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        opts = {p: g for g in self.param_groups for p in g["params"] if p.requires_grad}
        if not compressed:
            for p, group in opts.items():
                if p.grad is None:
                    continue
                st = self.state[p]
                beta1, beta2 = group["betas"]
                g = p.grad.float()
                st["exp_avg"].lerp_(g, 1 - beta1)
                st["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                st["step"] += 1
                self._update(p, group, st, bc2_step=int(st["step"]))
            return loss
        for params in self._partition or [list(opts)]:
            self._compressed_momentum(params, opts)
        for p, group in opts.items():
            st = self.state[p]
            st["step"] += 1
            self._update(p, group, st, bc2_step=self.warmup_steps)
        return loss

    def _update(self, p: torch.Tensor, group: dict, st: dict, bc2_step: int) -> None:
        beta1, beta2 = group["betas"]
        t = int(st["step"])
        bc1 = 1 - beta1 ** t
        bc2 = 1 - beta2 ** bc2_step if bc2_step > 0 else 1.0
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        denom = (st["exp_avg_sq"].sqrt() / math.sqrt(bc2)).add_(group["eps"])  # torch.optim.AdamW's rounding
        p.addcdiv_(st["exp_avg"], denom, value=-group["lr"] / bc1)

    def _compressed_momentum(self, params: list[torch.Tensor], opts: dict) -> None:
        """m ← compressed average over dp of (β1·m + (1−β1)·g_local), for one list of parameters."""
        from autoshard.runtime.compressed import compressed_allreduce_, padded_length

        if not params:
            return
        n, r = self._dp_size, self._dp_rank
        for p in params:
            st = self.state[p]
            ranked = [k for k in st if k.startswith("worker_error.")]
            if ranked:  # a ZeRO checkpoint: every dp rank's worker residual, the server residual whole
                if int(st.get("error_world", -1)) == n and f"worker_error.{r}" in st:
                    st["worker_error"] = st[f"worker_error.{r}"].float()
                    st["error_rank"] = torch.tensor(float(r))
                for k in ranked:
                    del st[k]
            if "worker_error" not in st or int(st.get("error_rank", -1)) != r or int(st.get("error_world", -1)) != n:
                st["worker_error"] = torch.zeros_like(p, dtype=torch.float32)
                st["server_error"] = torch.zeros_like(p, dtype=torch.float32)
                st["error_rank"], st["error_world"] = torch.tensor(float(r)), torch.tensor(float(n))
        sizes = [p.numel() for p in params]
        numel = sum(sizes)
        total = padded_length(numel, n)
        c = total // n
        dev = params[0].device

        def flat(key: str) -> torch.Tensor:
            out = torch.zeros(total, dtype=torch.float32, device=dev)
            torch.cat([self.state[p][key].reshape(-1) for p in params], out=out[:numel])
            return out

        m = torch.zeros(total, dtype=torch.float32, device=dev)
        off = 0
        for p, k in zip(params, sizes):
            beta1 = opts[p]["betas"][0]
            g = p.grad.reshape(-1).float() if p.grad is not None else torch.zeros(k, device=dev)
            m[off:off + k] = self.state[p]["exp_avg"].reshape(-1) * beta1 + g * (1 - beta1)
            off += k
        we, se_full = flat("worker_error"), flat("server_error")
        se = se_full[r * c:(r + 1) * c].clone()
        compressed_allreduce_(m, self._group_key, we, se)
        se_full.zero_()
        se_full[r * c:(r + 1) * c] = se
        off = 0
        for p, k in zip(params, sizes):
            st = self.state[p]
            st["exp_avg"].copy_(m[off:off + k].view_as(st["exp_avg"]))
            st["worker_error"].copy_(we[off:off + k].view_as(p))
            st["server_error"].copy_(se_full[off:off + k].view_as(p))
            off += k
