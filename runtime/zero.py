"""ZeRO memory manager: flat buckets, partitioned optimizer state and gradients, mixed precision.

Model states per rank for Ψ parameters trained with Adam in mixed precision (ZeRO paper, §3):
compute copy 2Ψ + gradients 2Ψ + fp32 master, momentum and variance 12Ψ. Over ``N_d`` data-parallel
ranks, stage 1 divides the 12Ψ, stage 2 also the gradients, stage 3 the parameters as well.

Layout. Parameters are packed, in gradient-ready order, into flat buckets padded to a multiple of the
data-parallel size. Each parameter the graph uses is a *view* into its bucket's flat compute buffer
(fp32, bf16 or fp16). Rank ``r`` of ``N_d`` owns the contiguous slice ``r`` of every bucket: an fp32
master copy of that slice (on the device, or in CPU memory with ``offload="optimizer"``) is the only
thing the user's optimizer sees, so its states are 1/N_d of the model. Any *elementwise* optimizer
(SGD, Adam, AdamW, Adagrad, RMSprop, ...) computes exactly what it would on whole tensors.

Step. Gradients accumulate in the compute dtype. When a bucket's gradients are complete (counted
per microbatch under pipelining) they are flattened to fp32 and, in bucket order, all-reduced
(stage 0/1) or reduce-scattered (stage 2) asynchronously during backward; the fp32 shard becomes
the master's gradient. After backward: unscale (fp16), one global check for inf/nan, global-norm
clipping (each element counted once across tp, pp and dp), the optimizer step on the masters, and an
all-gather of the updated masters back into the compute buffers (cast to the compute dtype).

Stage 3. A rank keeps no compute copy of its own between uses: each gather casts its fp32 master
slice to the compute dtype and all-gathers that, so model states are (2 + 12)Ψ / N_d for Adam (the
paper keeps a separate 2Ψ / N_d compute partition as well). With ``offload="params"`` the masters are
in CPU memory, so a pinned compute-dtype slice (``local``) is kept there to copy from. The flat buffer the parameters are views of has its storage freed (resized
to zero bytes) except while the bucket is in use: the graph pass
:func:`autoshard.passes.data_parallel.insert_param_gathers` puts ``gather_params`` before a bucket's
first use (prefetching the next), ``release_params`` after its last forward use, and ``regather``
identities whose backward gathers the bucket again before autograd needs the tensors it saved. A
bucket's storage is freed again once all of its gradients are reduce-scattered. Autograd saved views
of the parameters, so the gather writes under ``_unsafe_preserve_version_counter``: the values it
writes back are the very values that were saved.

fp16 uses a dynamic loss scaler with DeepSpeed's semantics: initial scale 2**16, ×2 after 1000
clean steps, hysteresis 2 (the second overflow in a row halves the scale), a skipped step on every
overflow, and an error when the scale would fall below the minimum.
"""

from __future__ import annotations

import itertools
import math
import weakref
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from . import collectives as C
from .data_parallel import GradientSync

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class LossScaleError(RuntimeError):
    """fp16 gradients overflowed at the minimum loss scale: training cannot continue stably."""


@dataclass
class DynamicLossScaler:
    """DeepSpeed's dynamic loss scaling (initial 2**16, window 1000, hysteresis 2)."""

    scale: float = 2.0**16
    window: int = 1000
    hysteresis: int = 2
    min_scale: float = 1.0
    factor: float = 2.0
    cur_hysteresis: int = 2
    iteration: int = 0
    last_overflow: int = -1
    overflows: int = 0

    def update(self, overflow: bool) -> None:
        if overflow:
            self.overflows += 1
            if self.hysteresis == 1 or self.cur_hysteresis == 1:
                if self.scale <= self.min_scale:
                    raise LossScaleError(
                        f"fp16 gradients overflow at the minimum loss scale {self.min_scale:g}: the model diverges "
                        "or needs a wider type; use precision='bf16', lower the learning rate, or clip gradients")
                self.scale = max(self.scale / self.factor, self.min_scale)
            else:
                self.cur_hysteresis -= 1
            self.last_overflow = self.iteration
        else:
            self.cur_hysteresis = self.hysteresis
            if (self.iteration - self.last_overflow) % self.window == 0:
                self.scale *= self.factor
        self.iteration += 1

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, d: dict) -> None:
        self.__dict__.update(d)


@dataclass
class _Bucket:
    names: list[str]
    offsets: list[int]  # start of each parameter in the flat buffer
    numel: int  # parameters' elements
    padded: int  # multiple of dp
    flat: torch.Tensor  # compute dtype, on device: the parameters are views into it
    master: torch.nn.Parameter  # fp32 slice this rank owns (device or CPU)
    grad_weight: torch.Tensor | None = None  # per-element weight for the global norm (1/replication); None: uniform
    local: torch.Tensor | None = None  # stage 3: this rank's slice of ``flat`` in the compute dtype
    state: str = "ready"  # stage 3: "free" (storage released), "pending" (gather in flight), "ready"
    work: object | None = None
    keep: list = field(default_factory=list)  # tensors an in-flight gather reads
    group: str = ""  # the ranks that share this bucket (reduce, partition, gather over them)
    parts: int = 1  # slices the bucket is cut into (1 at stage 0)
    part: int = 0  # which slice this rank owns
    norm_scale: float = 1.0  # the weight of every element when ``grad_weight`` is None

    @property
    def shard(self) -> int:
        return self.master.numel()


class ZeroOptimizer(GradientSync):
    """Owns this rank's compute parameters (as views of flat buckets) and the sharded optimizer."""

    def __init__(self, params: dict[str, torch.nn.Parameter], full_fp32: dict[str, torch.Tensor],
                 buckets: list[list[str]], *, group: str, size: int, rank: int, stage: int, precision: str,
                 optimizer_factory, device: torch.device, offload: str | None = None, grad_clip: float | None = None,
                 expected: dict[str, int] | None = None, norm_weight: dict[str, float] | None = None,
                 global_norm: bool = False, prefetch: int = 1,
                 bucket_groups: list[tuple[str, int, int]] | None = None, divisor: int | None = None) -> None:
        if stage not in (0, 1, 2, 3):
            raise ValueError(f"zero={stage}: choose a ZeRO stage 0, 1, 2 or 3")
        if offload == "params" and stage != 3:
            raise ValueError('offload="params" partitions parameters: it needs zero=3')
        self.stage = stage
        self.rank = rank
        self.dtype = DTYPES[precision]
        self.precision = precision
        self.offload = offload
        self.grad_clip = grad_clip
        self.device = device
        self.global_norm = global_norm  # reduce norms and overflow flags over every rank
        self.prefetch = prefetch
        self.key = f"{group}.zero{next(_ids)}"  # how graph nodes find this optimizer
        _OWNERS[self.key] = self
        self.gathers = 0  # stage 3: all-gathers of parameters since construction
        # Each bucket is shared by a group of ranks: by default the data-parallel group; with experts
        # split over ep, an expert's bucket by the dp ranks that hold that expert (``bucket_groups``:
        # (group key, size, this rank's index) per bucket). Gradients are summed over the group and
        # divided by ``divisor`` (default: the group size). Stage 0 keeps whole masters on every rank;
        # stages 1-3 give rank r slice r of each bucket.
        groups = bucket_groups or [(group, size, rank)] * len(buckets)
        self.divisor = divisor or size
        self.scaler = DynamicLossScaler() if precision == "fp16" else None
        self.last_grad_norm = float("nan")
        self.last_loss = float("nan")  # the loss passed to the last step(), read with its one host copy
        self.zbuckets: list[_Bucket] = []
        master_device = torch.device("cpu") if offload in ("optimizer", "params") else device
        norm_weight = norm_weight or {}
        for names, (bgroup, gsize, grank) in zip(buckets, groups):
            parts, part = (gsize, grank) if stage >= 1 else (1, 0)
            shapes = [params[n].shape for n in names]
            sizes = [math.prod(s) for s in shapes]
            numel = sum(sizes)
            offsets, padded = self._layout(sizes, gsize)
            flat = torch.empty(padded, dtype=self.dtype, device=device) if stage == 3 else \
                torch.zeros(padded, dtype=self.dtype, device=device)
            full32 = torch.zeros(padded, dtype=torch.float32)
            weight = torch.zeros(padded, dtype=torch.float32)  # padding counts for nothing
            for n, k, off in zip(names, sizes, offsets):
                full32[off:off + k] = full_fp32[n].reshape(-1).float()
                weight[off:off + k] = norm_weight.get(n, 1.0)
            if parts == 1:
                weight /= gsize  # every rank of the group holds the whole gradient: count each element once
            sh = padded // parts
            mine = slice(part * sh, (part + 1) * sh)
            local = None
            if stage == 3:  # never hold the whole bucket; with offload keep a pinned compute slice to copy from
                if offload == "params":
                    local = _pinned(full32[mine].to(self.dtype), device)
            else:
                flat.copy_(full32.to(device))
            for n, k, shp, o in zip(names, sizes, shapes, offsets):
                params[n].data = flat[o:o + k].view(shp)
            if stage == 3:  # views are made; now free the storage under them
                flat.untyped_storage().resize_(0)
            master = torch.nn.Parameter(full32[mine].clone().to(master_device))
            if master_device.type == "cpu" and device.type == "cuda":
                master.data = master.data.pin_memory()
            w = weight[mine]
            live = w[w != 0]  # padding has weight 0, and its gradient is 0 too
            uniform = live.numel() == 0 or bool((live == live[0]).all())
            w = None if uniform else w.clone().to(master_device)  # most buckets: one scalar weight
            self.zbuckets.append(_Bucket(names, offsets, numel, padded, flat, master,
                                         w, local,
                                         "free" if stage == 3 else "ready", group=bgroup, parts=parts, part=part,
                                         norm_scale=float(live[0]) if uniform and live.numel() else 0.0))
        super().__init__(params, buckets, group, size, expected=expected, always=True)
        if stage == 3:
            self.max_inflight = 2  # block-sized fp32 reduction buffers: keep two in flight, not four
        self.optimizer = optimizer_factory([b.master for b in self.zbuckets])

    def _layout(self, sizes: list[int], gsize: int) -> tuple[list[int], int]:
        """Where each parameter of a bucket starts in its flat buffer, and the buffer's length:
        packed end to end, padded to a multiple of the group size (a subclass may align them)."""
        offsets = list(itertools.accumulate(sizes[:-1], initial=0))
        return offsets, -(-sum(sizes) // gsize) * gsize

    # ------------------------------------------------------------------ reduction
    def _launch(self, i: int) -> None:
        b = self.zbuckets[i]
        flat = torch.zeros(b.padded, dtype=torch.float32, device=self.device)
        for n, o in zip(b.names, b.offsets):
            p = self.params[n]
            if p.grad is not None:
                flat[o:o + p.numel()] = p.grad.reshape(-1).float()
                p.grad = None  # the flat fp32 copy replaces it
        flat.div_(self.divisor)
        if self.stage == 3:  # every gradient of the bucket is in: backward no longer needs it
            self.release(i)
        if self.stage >= 2:
            out = torch.empty(b.shard, dtype=torch.float32, device=self.device)
            work = C.reduce_scatter_(out, flat, b.group, async_op=True)
            self._launched[i] = (work, out)
        else:
            work = C.all_reduce_(flat, b.group, async_op=True)
            self._launched[i] = (work, flat)

    def _complete(self, i: int, payload: torch.Tensor) -> None:
        b = self.zbuckets[i]
        if self.stage < 2:
            payload = payload[b.part * b.shard:(b.part + 1) * b.shard]
        b.master.grad = payload.to(b.master.device, non_blocking=True)

    # ------------------------------------------------------------------ step
    def step(self, loss: torch.Tensor | None = None) -> bool:
        """Unscale, check, clip, update the masters, gather them into the compute buffers.

        ``loss`` (the step's global loss, on the device) joins the finiteness check, so the caller
        reads it after this step's one host synchronisation instead of adding a second one.
        Returns False when the step was skipped (a non-finite gradient or loss; fp16 overflow).
        """
        grads = [b.master.grad for b in self.zbuckets]
        if self.offload is not None and self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the device→host gradient copies
        if self.scaler is not None:
            for g in grads:
                g.div_(self.scaler.scale)
        # Σ weight·g² over every bucket, one fp32 pass per bucket (a norm); a NaN or inf anywhere makes
        # the sum non-finite, so the same pass is the overflow check. One copy to the host per step.
        where = grads[0].device if grads else self.device
        parts = [torch.linalg.vector_norm(g, dtype=torch.float32).square() * b.norm_scale
                 for b, g in zip(self.zbuckets, grads) if b.grad_weight is None]
        parts += [(g.float().square() * b.grad_weight).sum()
                  for b, g in zip(self.zbuckets, grads) if b.grad_weight is not None]
        total = torch.stack(parts).sum().double() if parts else torch.zeros((), dtype=torch.float64, device=where)
        bad = (~torch.isfinite(total)).double()
        if loss is not None:
            bad = bad + (~torch.isfinite(loss.detach())).double().to(where)
        sq = torch.stack([torch.nan_to_num(total, nan=0.0, posinf=0.0), bad])
        if self.global_norm and dist.is_initialized() and dist.get_world_size() > 1:
            sq = sq.to(self.device)
            dist.all_reduce(sq)
        if loss is not None:  # the loss comes to the host in the same copy
            sq = torch.cat([sq, loss.detach().reshape(1).to(sq.device, torch.float64)])
        sq = sq.cpu()
        self.last_loss = float(sq[2]) if loss is not None else float("nan")
        overflow = bool(sq[1] > 0)
        self.last_grad_norm = math.sqrt(float(sq[0])) if not overflow else float("inf")
        if self.scaler is not None:
            self.scaler.update(overflow)
        if overflow:
            self.zero_grad()
            return False
        if self.grad_clip is not None and self.last_grad_norm > self.grad_clip:
            coef = self.grad_clip / (self.last_grad_norm + 1e-6)
            for g in grads:
                g.mul_(coef)
        self.optimizer.step()
        self.zero_grad()
        self._gather()
        return True

    def _gather(self) -> None:
        """All-gather every rank's updated master slice into the flat compute buffers.

        Stage 3 only refreshes this rank's compute slice; a bucket still gathered is dropped so its
        next use gathers the new values.
        """
        for i, b in enumerate(self.zbuckets):
            if self.stage == 3:
                if b.local is not None:
                    b.local.copy_(b.master.detach())
                self.release(i)
                continue
            mine = b.master.detach().to(self.device, non_blocking=True).to(self.dtype)
            if b.parts == 1:
                b.flat.copy_(mine)
            else:
                C.all_gather_(b.flat, mine, b.group)

    # ------------------------------------------------------------------ stage 3: parameter residency
    def start(self, i: int) -> None:
        """Begin gathering bucket ``i`` (asynchronously) unless it is already there or on its way."""
        b = self.zbuckets[i]
        if b.state != "free":
            return
        flat = b.flat
        flat.untyped_storage().resize_(flat.numel() * flat.element_size())
        if b.local is not None:  # offloaded: the pinned slice goes up
            src = b.local.to(self.device, non_blocking=True)
        else:  # cast our fp32 master slice
            src = b.master.detach().to(self.dtype)
        # autograd saved views of these parameters in an earlier forward; the gather restores exactly
        # the values they held, so it must not count as a modification
        with torch.autograd._unsafe_preserve_version_counter(flat):
            b.work = C.all_gather_(flat, src, b.group, async_op=True)
        b.keep = [src]
        b.state = "pending"
        self.gathers += 1

    def fetch(self, i: int, then: tuple[int, ...] = ()) -> None:
        """Make bucket ``i`` usable now; start gathering the buckets in ``then`` behind it."""
        b = self.zbuckets[i]
        self.start(i)
        if b.state == "pending":
            if b.work is not None:
                b.work.wait()
            b.work, b.keep, b.state = None, [], "ready"
        for j in then:
            self.start(j)

    def release(self, i: int) -> None:
        """Free bucket ``i``'s gathered storage (stage 3); its parameters become empty views."""
        b = self.zbuckets[i]
        if self.stage != 3 or b.state == "free":
            return
        if b.state == "pending" and b.work is not None:
            b.work.wait()
        b.work, b.keep, b.state = None, [], "free"
        b.flat.untyped_storage().resize_(0)

    def resident_bytes(self) -> int:
        """Bytes of gathered compute buffers held now (stage 3 working set)."""
        return sum(b.flat.numel() * b.flat.element_size() for b in self.zbuckets if b.state != "free")

    def zero_grad(self) -> None:
        for b in self.zbuckets:
            b.master.grad = None
        for p in self.params.values():
            p.grad = None

    def loss_scale(self) -> float:
        return self.scaler.scale if self.scaler is not None else 1.0

    # ------------------------------------------------------------------ memory and state
    def model_state_bytes(self) -> dict[str, int]:
        """Bytes this rank holds for model states, as allocated (not estimated)."""
        if self.stage == 3:  # compute copies exist only while gathered (offload: a pinned slice on the host)
            params = sum(b.local.numel() * b.local.element_size() for b in self.zbuckets if b.local is not None)
        else:
            params = sum(b.flat.numel() * b.flat.element_size() for b in self.zbuckets)
        master = sum(b.master.numel() * 4 for b in self.zbuckets)
        states = 0
        for st in self.optimizer.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor) and v.dim() > 0:
                    states += v.numel() * v.element_size()
        return {"params": params, "master": master, "optimizer_states": states}

    def state_keys(self) -> list[str]:
        """Names of the per-element optimizer states that :meth:`full_state` gathers (same on every rank)."""
        return sorted({k for st in self.optimizer.state.values() for k, v in st.items()
                       if isinstance(v, torch.Tensor) and v.dim() > 0})

    def full_master(self, name: str) -> torch.Tensor:
        """The fp32 master values of parameter ``name`` (gathered over dp), for checkpoints."""
        return self._gather_over_dp(name, lambda b: b.master.detach())

    def full_state(self, name: str, key: str) -> torch.Tensor | None:
        """Optimizer state ``key`` of parameter ``name`` (gathered over dp), e.g. Adam's exp_avg."""
        def src(b):
            st = self.optimizer.state.get(b.master, {})
            v = st.get(key)
            return v if isinstance(v, torch.Tensor) and v.dim() > 0 else None
        return self._gather_over_dp(name, src)

    @torch.no_grad()
    def load_full(self, params: dict[str, torch.Tensor], optim: dict[str, dict[str, torch.Tensor]],
                  scalars: dict[str, dict[str, float]]) -> None:
        """Set masters, compute copies and optimizer states from whole-over-dp per-parameter values."""
        for b in self.zbuckets:
            full = torch.zeros(b.padded, dtype=torch.float32)
            for n, o in zip(b.names, b.offsets):
                full[o:o + self.params[n].numel()] = params[n].reshape(-1).float()
            mine = slice(b.part * b.shard, (b.part + 1) * b.shard)
            b.master.data.copy_(full[mine].to(b.master.device))
            if self.stage == 3:
                if b.local is not None:
                    b.local.copy_(full[mine].to(self.dtype))
                self.release(self.zbuckets.index(b))
            else:
                b.flat.copy_(full.to(self.device, self.dtype))
            keys = sorted({k for n in b.names for k in optim.get(n, {})})
            st: dict[str, torch.Tensor] = {}
            for k in keys:
                flat = torch.zeros(b.padded, dtype=torch.float32)
                for n, o in zip(b.names, b.offsets):
                    v = optim.get(n, {}).get(k)
                    if v is not None:
                        flat[o:o + self.params[n].numel()] = v.reshape(-1).float()
                st[k] = flat[mine].clone().to(b.master.device)
            for n in b.names:
                for k, v in scalars.get(n, {}).items():
                    st[k] = torch.tensor(v, dtype=torch.float32)
            if st:
                self.optimizer.state[b.master] = st

    def _gather_over_dp(self, name: str, src) -> torch.Tensor | None:
        for b in self.zbuckets:
            if name not in b.names:
                continue
            mine = src(b)
            if mine is None:
                return None
            full = torch.empty(b.padded, dtype=mine.dtype, device=self.device)
            if b.parts == 1:
                full.copy_(mine)
            else:
                C.all_gather_(full, mine.to(self.device).contiguous(), b.group)
            i = b.names.index(name)
            o = b.offsets[i]
            return full[o:o + self.params[name].numel()].view(self.params[name].shape).cpu()
        raise KeyError(name)


# ---------------------------------------------------------------------- stage 3: graph-facing calls
_ids = itertools.count()
_OWNERS: weakref.WeakValueDictionary[str, ZeroOptimizer] = weakref.WeakValueDictionary()


def _pinned(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.pin_memory() if device.type == "cuda" else t


def _owner(key: str) -> ZeroOptimizer:
    try:
        return _OWNERS[key]
    except KeyError:
        raise RuntimeError(f"no ZeRO-3 optimizer {key!r}: the module that owned this graph was closed") from None


def gather_params(key: str, bucket: int, then: tuple[int, ...] = ()) -> None:
    """Graph node: bucket ``bucket`` is used next; gather it (and start the buckets in ``then``)."""
    _owner(key).fetch(bucket, then)


def release_params(key: str, bucket: int, keep_for_backward: bool = False) -> None:
    """Graph node: the forward is done with ``bucket``. Kept while gradients are enabled when
    ``keep_for_backward`` (the bucket backward starts with)."""
    if keep_for_backward and torch.is_grad_enabled():
        return
    _owner(key).release(bucket)


class _Regather(torch.autograd.Function):
    """Identity forward; backward first gathers the bucket whose region produced the tensor."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, key: str, bucket: int, then: tuple[int, ...]) -> torch.Tensor:
        ctx.args = (key, bucket, then)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        key, bucket, then = ctx.args
        _owner(key).fetch(bucket, then)
        return g, None, None, None


def regather(x: torch.Tensor, key: str, bucket: int, then: tuple[int, ...] = ()) -> torch.Tensor:
    """Graph node on a tensor leaving ``bucket``'s region: backward re-gathers the bucket."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x
    return _Regather.apply(x, key, bucket, then)
