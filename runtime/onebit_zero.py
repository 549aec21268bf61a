"""1-bit Adam on the ZeRO path (stages 1 and 2, fp32 or bf16/fp16 compute copies, with tp).

The optimizer (``autoshard.optim.OneBitAdam``) sees this rank's fp32 master slices, as every
optimizer under ZeRO does. While it warms up it is exact Adam and this class is a plain
:class:`~autoshard.runtime.zero.ZeroOptimizer`: gradients are all-reduced (stage 1) or
reduce-scattered (stage 2) in fp32 and rank ``r`` updates master slice ``r`` with its slices of
``exp_avg`` and ``exp_avg_sq``. Once the optimizer reports ``wants_raw_gradients()`` (the variance
is frozen) gradients stay local and :meth:`OneBitZeroOptimizer.step` does, per bucket of ``n``
ranks::

    m_i  = β1 · m̂ + (1 − β1) · g_i                      whole bucket, this rank's local gradient
    row  = compressed_reduce_scatter_(m_i)              phase 1: all-to-all of 1-bit chunks, then the
                                                        server average of chunk r, compressed again
    rows = compressed_all_gather(row)                   phase 2: every rank's compressed chunk
    m̂    = decompress(rows)                             the averaged momentum, equal on every rank

The compressed all-reduce's chunk ``r`` *is* ZeRO's slice ``r``: buckets are laid out so that it is
(each parameter starts on a 256-element scale block, the bucket is padded to 256·n), so the server
half of the error feedback and the frozen variance live on the same rank as the master slice.

The update ``p ← p·(1 − lr·wd) − lr/bc1 · m̂ / (sqrt(v / bc2_frozen) + eps)`` then runs in one of
two ways:

* fp32 compute copies: every rank applies it to its whole compute buffer (which, in fp32, holds
  exactly the gathered masters) with the frozen denominator of the whole bucket, gathered once
  when warm-up ends; the master slice is then copied out of it. No parameter all-gather after
  warm-up, so a step sends only the compressed momenta (28× less than an fp32 all-reduce).
* bf16/fp16 compute copies: rank ``r`` updates its fp32 master slice with its own ``v`` slice and the
  parameters are all-gathered in bf16 as ZeRO does (the compute copies cannot take updates
  without fp32 values of every element).

What is replicated and what is sharded, per rank (Ψ = this rank's parameter elements, n = dp):
the worker residual covers the whole bucket (4Ψ: each rank compresses its whole local momentum),
the averaged momentum is kept compressed (rows: Ψ·(1/8 + 1/64) bytes) and, in fp32, the frozen
denominator of the whole bucket (4Ψ); sharded are the fp32 master, ``exp_avg`` (this rank's slice
of m̂), ``exp_avg_sq`` and the server residual (4Ψ/n each). Gradients after warm-up are local and
held in the compute dtype until the step (cΨ): they are never reduced, so stage 2 holds what
stage 1 holds.

Checkpoints: ``exp_avg``, ``exp_avg_sq``, ``step`` as any ZeRO optimizer state; ``server_error``
gathered whole over dp (each element's residual, wherever its chunk lives, so it reshards under
any plan); ``worker_error.{d}`` for every dp rank ``d`` (parameter-shaped, so tp reshards them),
and ``error_world`` (the dp size that saved them). Loading under the same dp size restores every
rank's residual bitwise; under another one each rank takes their mean, which keeps the average
residual (what error feedback owes the averaged momentum) exactly, with a warning.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist

from . import collectives as C
from .compressed import BLOCK, compressed_all_gather, compressed_reduce_scatter_, decompress
from .zero import ZeroOptimizer

ONEBIT_KEYS = ("server_error", "worker_error")


class OneBitZeroOptimizer(ZeroOptimizer):
    """A :class:`ZeroOptimizer` whose optimizer averages compressed momenta after its warm-up.

    The optimizer built by ``optimizer_factory`` must offer ``wants_raw_gradients()`` (True once its
    variance is frozen), ``warmup_steps``, the param-group keys ``lr``, ``betas``, ``eps``,
    ``weight_decay`` and the states ``step``, ``exp_avg``, ``exp_avg_sq`` (``OneBitAdam`` does).
    Stages 1 and 2 (and stage 0 with bf16/fp16, whose masters are whole); fp16's loss scaler skips
    a step on overflow before any residual changes. Not stage 3, offload or clipping (the caller
    refuses them with the reason).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.stage == 3 or self.offload is not None or self.grad_clip is not None:
            raise ValueError("1-bit Adam on the ZeRO path supports zero=1/2, without offload or grad_clip")
        opt = self.optimizer
        if not hasattr(opt, "wants_raw_gradients") or not hasattr(opt, "warmup_steps"):
            raise TypeError(f"{type(opt).__name__} is not a compressing optimizer (no wants_raw_gradients/warmup_steps)")
        self.raw_gradients = opt.wants_raw_gradients  # GradientSync leaves gradients local once it says so
        self.full_update = self.dtype == torch.float32
        nb = len(self.zbuckets)
        self._worker: list[torch.Tensor | None] = [None] * nb  # whole bucket, this rank's residual
        self._server: list[torch.Tensor | None] = [None] * nb  # this rank's chunk (= its ZeRO slice at stage >= 1)
        self._rows: list[torch.Tensor | None] = [None] * nb  # the averaged momentum, compressed (n, width)
        self._denom: list[tuple[tuple, torch.Tensor] | None] = [None] * nb  # fp32: frozen denominator, whole bucket
        self._gaps: list[torch.Tensor | None] = []  # padding indices, kept at zero in m̂ and the residual
        for b in self.zbuckets:
            valid = torch.zeros(b.padded, dtype=torch.bool)
            for n, o in zip(b.names, b.offsets):
                valid[o:o + self.params[n].numel()] = True
            gaps = (~valid).nonzero().squeeze(1)
            self._gaps.append(gaps.to(self.device) if gaps.numel() else None)
        self._ckpt_cache: tuple[tuple, list[torch.Tensor]] | None = None

    def _layout(self, sizes: list[int], gsize: int) -> tuple[list[int], int]:
        """Each parameter starts on a scale block (a block's scale never mixes two parameters, so
        tp-replicated ones stay identical over tp); the bucket is whole blocks per rank, so the
        compressed all-reduce's chunk r is ZeRO's slice r."""
        self.__dict__.setdefault("_gsizes", []).append(gsize)  # called per bucket, before __init__ ends
        offsets, off = [], 0
        for k in sizes:
            offsets.append(off)
            off += -(-k // BLOCK) * BLOCK
        unit = BLOCK * gsize
        return offsets, max(unit, -(-off // unit) * unit)

    # ------------------------------------------------------------------ step
    @property
    def compressing(self) -> bool:
        """True once warm-up is over (the same on every rank: steps advance together)."""
        return bool(self.optimizer.wants_raw_gradients())

    def step(self, loss: torch.Tensor | None = None) -> bool:
        """Warm-up: ZeRO's exact step. After it: the compressed-momentum step (module docstring).

        ``loss`` joins the finiteness check and is read in the same host copy (see ZeroOptimizer.step)."""
        if not self._local:
            return super().step(loss)
        return self._compressed_step(loss)

    def _group_of(self, p: torch.Tensor) -> dict:
        return next(g for g in self.optimizer.param_groups if any(q is p for q in g["params"]))

    def receive_local(self, flats: list[torch.Tensor]) -> None:
        """After warm-up, from a step program: each bucket's local fp32 gradient, whole (laid out as the
        bucket, not reduced); the next :meth:`step` compresses these instead of the parameters' ``.grad``."""
        self._local_flats = list(flats)

    @torch.no_grad()
    def _compressed_step(self, loss: torch.Tensor | None = None) -> bool:
        flats, self._local_flats = getattr(self, "_local_flats", None), None
        grads = flats if flats is not None else [p.grad for p in self.params.values() if p.grad is not None]
        bad = torch.zeros(1, dtype=torch.float64, device=self.device)
        for g in grads:
            bad += (~torch.isfinite(g)).sum()
        if loss is not None:
            bad += (~torch.isfinite(loss.detach())).double().to(self.device)
        if self.global_norm and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad)
        self.last_grad_norm = float("nan")  # gradients are local: no global norm exists without sending them
        del grads
        if loss is not None:  # one host copy for the check and the loss
            bad = torch.cat([bad, loss.detach().reshape(1).to(bad.device, torch.float64)])
        host = bad.cpu()
        self.last_loss = float(host[1]) if loss is not None else float("nan")
        overflow = float(host[0]) > 0
        scale = self.scaler.scale if self.scaler is not None else 1.0
        if self.scaler is not None:
            self.scaler.update(overflow)
        if overflow:  # skip on every rank before any residual or momentum changes
            self.zero_grad()
            return False
        warmup = int(self.optimizer.warmup_steps)
        for i, b in enumerate(self.zbuckets):
            st = self.optimizer.state[b.master]
            group = self._group_of(b.master)
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            if flats is not None:
                g = flats[i]
            else:
                g = torch.zeros(b.padded, dtype=torch.float32, device=self.device)
                for n, o in zip(b.names, b.offsets):
                    p = self.params[n]
                    if p.grad is not None:
                        g[o:o + p.numel()] = p.grad.reshape(-1).float()
                        p.grad = None
            if scale != 1.0:  # fp16: the loss scaler's factor
                g.div_(scale)
            m = self._previous_momentum(i) * beta1 + g * (1 - beta1)  # OneBitAdam's rounding
            del g
            we, se = self._errors(i)
            row = compressed_reduce_scatter_(m, b.group, we, se)
            self._rows[i] = compressed_all_gather(row, b.group)
            del m
            avg = self._momentum_from_rows(i)
            if self._gaps[i] is not None:  # padding carries no residual (as zero=0 drops its padding's)
                we.index_fill_(0, self._gaps[i], 0.0)
                c, r = se.numel(), C.group_rank(b.group)
                own = self._gaps[i][(self._gaps[i] >= r * c) & (self._gaps[i] < (r + 1) * c)] - r * c
                se.index_fill_(0, own, 0.0)
            mine = slice(b.part * b.shard, (b.part + 1) * b.shard)
            st["exp_avg"].copy_(avg[mine])
            st["step"] += 1
            st["error_world"] = torch.tensor(float(self._group_size(i)))
            bc1 = 1 - beta1 ** int(st["step"])
            bc2 = 1 - beta2 ** warmup
            if self.full_update:  # every rank updates the whole (fp32) bucket; the master is its slice
                denom = self._denominator(i, bc2, eps)
                if wd:
                    b.flat.mul_(1 - lr * wd)
                b.flat.addcdiv_(avg, denom, value=-lr / bc1)
                b.master.data.copy_(b.flat[mine])
            else:  # this rank's slice, then ZeRO's all-gather of the compute copies
                denom = (st["exp_avg_sq"].sqrt() / math.sqrt(bc2)).add_(eps)
                if wd:
                    b.master.data.mul_(1 - lr * wd)
                b.master.data.addcdiv_(st["exp_avg"], denom, value=-lr / bc1)
        self.zero_grad()
        if not self.full_update:
            self._gather()
        return True

    def _group_size(self, i: int) -> int:
        return self._gsizes[i]

    def _errors(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Bucket ``i``'s residuals (zeros the first time): the worker's, whole, and this rank's server chunk."""
        b = self.zbuckets[i]
        if self._worker[i] is None:
            self._worker[i] = torch.zeros(b.padded, dtype=torch.float32, device=self.device)
        if self._server[i] is None:
            self._server[i] = torch.zeros(b.padded // self._group_size(i), dtype=torch.float32, device=self.device)
        return self._worker[i], self._server[i]

    def _momentum_from_rows(self, i: int) -> torch.Tensor:
        avg = decompress(self._rows[i]).reshape(-1)
        if self._gaps[i] is not None:
            avg.index_fill_(0, self._gaps[i], 0.0)
        return avg

    def _whole(self, i: int, mine: torch.Tensor) -> torch.Tensor:
        """The whole bucket of a master-shaped state (all-gathered over the bucket's group)."""
        b = self.zbuckets[i]
        if b.parts == 1:
            return mine.detach().to(self.device, torch.float32).clone()
        full = torch.empty(b.padded, dtype=torch.float32, device=self.device)
        C.all_gather_(full, mine.detach().to(self.device).contiguous(), b.group)
        return full

    def _previous_momentum(self, i: int) -> torch.Tensor:
        """m̂ of the last step, whole: decompressed rows, or (first compressed step, or after loading a
        checkpoint) the exact sharded ``exp_avg`` gathered once, which holds the same values."""
        if self._rows[i] is not None:
            return self._momentum_from_rows(i)
        return self._whole(i, self.optimizer.state[self.zbuckets[i].master]["exp_avg"])

    def _denominator(self, i: int, bc2: float, eps: float) -> torch.Tensor:
        """``sqrt(v / bc2) + eps`` over the whole bucket (v is frozen: gathered once, then kept)."""
        key = (bc2, eps)
        if self._denom[i] is None or self._denom[i][0] != key:
            v = self._whole(i, self.optimizer.state[self.zbuckets[i].master]["exp_avg_sq"])
            self._denom[i] = (key, (v.sqrt() / math.sqrt(bc2)).add_(eps))  # OneBitAdam's rounding
        return self._denom[i][1]

    # ------------------------------------------------------------------ memory
    def model_state_bytes(self) -> dict[str, int]:
        """As :meth:`ZeroOptimizer.model_state_bytes`, the residuals, compressed momenta and frozen
        denominators counted with the optimizer states."""
        out = super().model_state_bytes()
        extra = [t for t in (*self._worker, *self._server, *self._rows) if t is not None]
        extra += [d[1] for d in self._denom if d is not None]
        out["optimizer_states"] += sum(t.numel() * t.element_size() for t in extra)
        return out

    def compressed_state_bytes(self) -> dict[str, int]:
        """Predicted bytes of the buffers 1-bit Adam adds after warm-up on this rank (the layout is known
        up front): the worker residual (whole buckets), the server residual (this rank's chunks), the
        compressed averaged momentum and, with fp32 compute copies, the frozen denominator."""
        padded = [b.padded for b in self.zbuckets]
        sizes = self._gsizes
        return {
            "onebit_worker_error": 4 * sum(padded),
            "onebit_server_error": sum(4 * p // n for p, n in zip(padded, sizes)),
            "onebit_momentum_bits": sum(p // 8 + 4 * p // BLOCK for p in padded),
            "onebit_denominator": 4 * sum(padded) if self.full_update else 0,
        }

    # ------------------------------------------------------------------ checkpoints
    def state_keys(self) -> list[str]:
        """ZeRO's keys, plus the residuals once compression has started: ``server_error`` and one
        ``worker_error.{d}`` per data-parallel rank ``d``."""
        keys = super().state_keys()
        if self.zbuckets and self.compressing:
            keys += ["server_error"] + [f"worker_error.{d}" for d in range(self._group_size(0))]
        return keys

    def full_state(self, name: str, key: str) -> torch.Tensor | None:
        """As :meth:`ZeroOptimizer.full_state`; ``server_error`` gathered whole over dp, and
        ``worker_error.{d}`` the residual of data-parallel rank ``d`` (collective)."""
        if key != "server_error" and not key.startswith("worker_error."):
            return super().full_state(name, key)
        i = next(j for j, b in enumerate(self.zbuckets) if name in b.names)
        b = self.zbuckets[i]
        p = self.params[name]
        o = b.offsets[b.names.index(name)]
        we, se = self._errors(i)
        if key == "server_error":
            full = torch.empty(b.padded, dtype=torch.float32, device=self.device)
            C.all_gather_(full, se, b.group)
            return full[o:o + p.numel()].view(p.shape).cpu()
        d = int(key.split(".", 1)[1])
        tag = (name, id(we), we._version)  # gathered once per parameter for the n keys
        if self._ckpt_cache is None or self._ckpt_cache[0] != tag:
            mine = we[o:o + p.numel()].contiguous()
            n = self._group_size(i)
            every = torch.empty(n * mine.numel(), dtype=torch.float32, device=self.device)
            C.all_gather_(every, mine, b.group)
            self._ckpt_cache = (tag, [t.view(p.shape).cpu() for t in every.chunk(n)])
        return self._ckpt_cache[1][d]

    @torch.no_grad()
    def load_full(self, params: dict[str, torch.Tensor], optim: dict[str, dict[str, torch.Tensor]],
                  scalars: dict[str, dict[str, float]]) -> None:
        """ZeRO's load, then the residuals: the server's element by element; the workers' exactly when
        the saving dp size is this one, else every rank takes their mean (their average, which error
        feedback owes the averaged momentum, is kept), with a warning. Compressed momenta and frozen
        denominators are rebuilt from ``exp_avg`` / ``exp_avg_sq`` at the next step (the same values)."""
        def onebit(k: str) -> bool:
            return k == "server_error" or k.split(".", 1)[0] == "worker_error"

        rest = {n: {k: v for k, v in d.items() if not onebit(k)} for n, d in optim.items()}
        super().load_full(params, rest, scalars)
        nb = len(self.zbuckets)
        self._worker, self._server, self._rows, self._denom = [None] * nb, [None] * nb, [None] * nb, [None] * nb
        self._ckpt_cache = None
        notes: set[str] = set()
        for i, b in enumerate(self.zbuckets):
            saved = [optim.get(n, {}) for n in b.names]
            if not any(onebit(k) for d in saved for k in d):
                if self.compressing:
                    notes.add("the checkpoint has no 1-bit Adam residuals: they start from zero")
                continue
            n, r = self._group_size(i), C.group_rank(b.group)
            we, se = self._errors(i)
            server = torch.zeros(b.padded, dtype=torch.float32)
            worker = torch.zeros(b.padded, dtype=torch.float32)
            world = {int(scalars.get(nm, {}).get("error_world", -1)) for nm in b.names}
            ranks = sorted({int(k.split(".", 1)[1]) for d in saved for k in d if k.startswith("worker_error.")})
            exact = world == {n} and ranks == list(range(n))
            for nm, o, d in zip(b.names, b.offsets, saved):
                k = self.params[nm].numel()
                if "server_error" in d:
                    server[o:o + k] = d["server_error"].reshape(-1).float()
                if exact:
                    worker[o:o + k] = d[f"worker_error.{r}"].reshape(-1).float()
                elif ranks:
                    worker[o:o + k] = torch.stack([d[f"worker_error.{j}"].reshape(-1).float() for j in ranks]).mean(0)
            if not exact:
                notes.add(f"1-bit Adam worker residuals saved by {len(ranks)} data-parallel ranks were "
                          f"{'averaged' if ranks else 'reset to zero'} for {n} ranks"
                          + ("" if ranks else " (the checkpoint keeps one rank's only)"))
            c = b.padded // n
            se.copy_(server[r * c:(r + 1) * c])
            we.copy_(worker)
        for note in sorted(notes):
            warnings.warn(note, stacklevel=3)
