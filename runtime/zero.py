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

Offload pipeline (``offload`` set, ``overlap=True``, the default). The host-side work of a step is
cut per bucket and run on one worker thread (torch's CPU kernels release the GIL), in two phases:

* phase A, as soon as a bucket's reduction completes during backward: its fp32 gradient slice is
  copied to a pinned host buffer on a side CUDA stream (an event marks the copy done), then the
  worker unscales it (fp16) and adds up its share of the squared global norm. This needs nothing
  but the bucket itself, so it overlaps the backward of earlier layers and the other buckets' copies.
* phase B, once every rank's norm and overflow flag are summed (one small all-reduce after
  backward): the worker clips and steps each bucket's optimizer in bucket order while the calling
  thread uploads (non-blocking, from pinned memory) and all-gathers the buckets already stepped;
  at stage 3 the worker also refreshes the pinned compute-dtype slice.

No bucket steps before the global verdict: a non-finite gradient anywhere skips the whole step on
every rank (in every precision) and clipping scales every gradient by one global factor, and an
update cannot be undone without a second copy of the masters and states. Each bucket has its own
optimizer (``optimizer_factory([master])``) so buckets step independently; :class:`BucketOptimizers`
presents them as one (``sm.optimizer``). The per-element arithmetic is that of the serial path
(``overlap=False``), so both give bitwise equal results.

fp16 uses a dynamic loss scaler with DeepSpeed's semantics: initial scale 2**16, ×2 after 1000
clean steps, hysteresis 2 (the second overflow in a row halves the scale), a skipped step on every
overflow, and an error when the scale would fall below the minimum.

Why this module is long: flat buckets, partitioned states, mixed precision, offload and the
one-sync step are one memory manager whose invariants span them; the step program takes them over
stage by stage.
"""

from __future__ import annotations

import itertools
import math
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, MutableMapping
from concurrent.futures import Future, ThreadPoolExecutor
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


_NORM_CHUNK = 1 << 20  # elements per float64 temporary in the host norm pass (8 MiB: stays in cache)


def _sum_squares(g: torch.Tensor, weight: torch.Tensor | None, scale: float = 1.0) -> torch.Tensor:
    """``sum(weight * g**2)`` (``scale * sum(g**2)`` when ``weight`` is None: a bucket whose elements
    all count the same): one bucket's share of the squared global gradient norm, as a float64 scalar.

    A non-finite element makes the sum non-finite (weights are >= 0, and 0 * inf is nan), so the same
    number also answers "did anything overflow". On the device it is one fp32 pass (a norm kernel);
    on the host it works in float64 a chunk at a time: the temporaries of a whole multi-GiB shard
    would cost more memory traffic than the sum itself.
    """
    if g.device.type != "cpu":
        if weight is None:
            return torch.linalg.vector_norm(g, dtype=torch.float32).square().double() * scale
        return (g.float().square() * weight).sum().double()
    total = torch.zeros((), dtype=torch.float64, device=g.device)
    for lo in range(0, g.numel(), _NORM_CHUNK):
        part = g[lo:lo + _NORM_CHUNK].double().square_()
        if weight is not None:
            part.mul_(weight[lo:lo + _NORM_CHUNK])
        total += part.sum()
    return total * scale if weight is None else total


class _JoinedState(MutableMapping):
    """``state`` of :class:`BucketOptimizers`: each master's entry lives in its bucket optimizer's state.

    Behaves like ``Optimizer.state`` (a ``defaultdict(dict)`` keyed by parameter): indexing a known
    master creates its entry, ``get`` and ``in`` do not.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self._optimizers = optimizers
        self._owner = {p: o for o in optimizers for g in o.param_groups for p in g["params"]}

    def _of(self, p: torch.Tensor) -> torch.optim.Optimizer:
        o = self._owner.get(p)
        if o is None:
            raise KeyError("not a parameter of these optimizers")
        return o

    def __getitem__(self, p: torch.Tensor) -> dict:
        return self._of(p).state[p]

    def __setitem__(self, p: torch.Tensor, value: dict) -> None:
        self._of(p).state[p] = value

    def __delitem__(self, p: torch.Tensor) -> None:
        del self._of(p).state[p]

    def __contains__(self, p: object) -> bool:
        o = self._owner.get(p) if isinstance(p, torch.Tensor) else None
        return o is not None and p in o.state

    def get(self, p: torch.Tensor, default=None):
        return self[p] if p in self else default

    def __iter__(self) -> Iterator[torch.Tensor]:
        for o in self._optimizers:
            yield from list(o.state)

    def __len__(self) -> int:
        return sum(len(o.state) for o in self._optimizers)

    def clear(self) -> None:
        for o in self._optimizers:
            o.state.clear()


class BucketOptimizers(torch.optim.Optimizer):
    """One optimizer per ZeRO bucket (offload), presented as the one optimizer the user asked for.

    Why: the offload pipeline steps each bucket on its own, as soon as that bucket may step, so each
    bucket's fp32 master has its own optimizer built by the user's factory. An elementwise optimizer
    (the only kind ZeRO supports) computes the same per element either way, and each bucket optimizer
    steps once per training step, so per-parameter step counts stay right.

    This view is ``sm.optimizer``. ``param_groups`` are the bucket optimizers' own group dicts
    (bucket order), so an LR scheduler attached to the view sets every bucket's ``lr``; ``state``
    maps each master to its entry in its bucket optimizer; ``step()`` steps every bucket in order
    (optimizer hooks and LR-scheduler bookkeeping see one step); ``state_dict``/``load_state_dict``
    use torch's format over all buckets. ``kind`` is the bucket optimizers' class name, recorded in
    checkpoints in place of this class's.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        if not optimizers:
            raise ValueError("BucketOptimizers needs at least one bucket optimizer")
        self.optimizers = list(optimizers)
        self._joined_state = _JoinedState(self.optimizers)
        self._built = False
        # Optimizer.__init__ sets up hooks and profiling; the parameters stay grouped in their buckets
        params = [p for o in self.optimizers for g in o.param_groups for p in g["params"]]
        super().__init__(params, dict(self.optimizers[0].defaults))
        self._built = True

    @property
    def kind(self) -> str:
        return type(self.optimizers[0]).__name__

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    @param_groups.setter
    def param_groups(self, value: list) -> None:
        if self._built:
            raise AttributeError("the param_groups of BucketOptimizers are its bucket optimizers'; set values "
                                 "in them (group['lr'] = ...) instead of replacing the list")

    @property
    def state(self) -> _JoinedState:
        return self._joined_state

    @state.setter
    def state(self, value) -> None:
        if self._built:
            raise AttributeError("the state of BucketOptimizers lives in its bucket optimizers")

    def add_param_group(self, param_group: dict) -> None:
        if self._built:
            raise NotImplementedError("the ZeRO buckets are fixed when the module is built: new parameter "
                                      "groups cannot be added to BucketOptimizers")
        # during Optimizer.__init__: the parameters are grouped in the bucket optimizers already

    def step(self, closure: Callable[[], float] | None = None, *, run: Callable[[], None] | None = None):
        """Step every bucket's optimizer, in bucket order.

        ``run``, when given, replaces that loop: the ZeRO runtime passes its own schedule of the same
        per-bucket steps (on a worker thread, between uploads), so hooks and schedulers still see one step.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if run is not None:
            run()
        else:
            for o in self.optimizers:
                o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a ``state_dict()`` of this view: its groups and states are split over the buckets."""
        groups, states = state_dict["param_groups"], state_dict["state"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"the state dict has {len(groups)} parameter groups, these optimizers "
                             f"{len(self.param_groups)} (one per bucket and group)")
        at = 0
        for o in self.optimizers:
            mine = groups[at:at + len(o.param_groups)]
            at += len(o.param_groups)
            ids = {old: new for new, old in enumerate(i for g in mine for i in g["params"])}
            o.load_state_dict({"state": {ids[i]: v for i, v in states.items() if i in ids},
                               "param_groups": [dict(g, params=[ids[i] for i in g["params"]]) for g in mine]})


def optimizer_name(opt: torch.optim.Optimizer | None) -> str | None:
    """The class name of the user's optimizer (through :class:`BucketOptimizers`), for checkpoints."""
    if opt is None:
        return None
    return opt.kind if isinstance(opt, BucketOptimizers) else type(opt).__name__


class ZeroOptimizer(GradientSync):
    """Owns this rank's compute parameters (as views of flat buckets) and the sharded optimizer."""

    def __init__(self, params: dict[str, torch.nn.Parameter], full_fp32: dict[str, torch.Tensor],
                 buckets: list[list[str]], *, group: str, size: int, rank: int, stage: int, precision: str,
                 optimizer_factory, device: torch.device, offload: str | None = None, grad_clip: float | None = None,
                 expected: dict[str, int] | None = None, norm_weight: dict[str, float] | None = None,
                 global_norm: bool = False, prefetch: int = 1,
                 bucket_groups: list[tuple[str, int, int]] | None = None, divisor: int | None = None,
                 overlap: bool = True) -> None:
        if stage not in (0, 1, 2, 3):
            raise ValueError(f"zero={stage}: choose a ZeRO stage 0, 1, 2 or 3")
        if offload == "params" and stage != 3:
            raise ValueError('offload="params" partitions parameters: it needs zero=3')
        self.stage = stage
        self.rank = rank
        self.dtype = DTYPES[precision]
        self.precision = precision
        self.offload = offload
        self.overlap = bool(overlap) and offload is not None  # the per-bucket host pipeline (module docstring)
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
        meta = torch.device(device).type == "meta"  # planning on a virtual mesh: shapes only, nothing allocated
        master_device = torch.device("cpu") if offload in ("optimizer", "params") and not meta else device
        norm_weight = norm_weight or {}
        for names, (bgroup, gsize, grank) in zip(buckets, groups):
            parts, part = (gsize, grank) if stage >= 1 else (1, 0)
            shapes = [params[n].shape for n in names]
            sizes = [math.prod(s) for s in shapes]
            numel = sum(sizes)
            offsets, padded = self._layout(sizes, gsize)
            flat = torch.empty(padded, dtype=self.dtype, device=device) if stage == 3 else \
                torch.zeros(padded, dtype=self.dtype, device=device)
            full32 = torch.zeros(padded, dtype=torch.float32, device="meta" if meta else "cpu")
            for n, k, off in zip(names, sizes, offsets):
                full32[off:off + k] = full_fp32[n].reshape(-1).float()
            sh = padded // parts
            mine = slice(part * sh, (part + 1) * sh)
            local = None
            if stage == 3:  # never hold the whole bucket; with offload keep a pinned compute slice to copy from
                if offload == "params":
                    local = full32[mine].to(self.dtype) if meta else _pinned(full32[mine].to(self.dtype), device)
            else:
                flat.copy_(full32.to(device))
            for n, k, shp, o in zip(names, sizes, shapes, offsets):
                params[n].data = flat[o:o + k].view(shp)
            if stage == 3 and not meta:  # views are made; now free the storage under them
                flat.untyped_storage().resize_(0)
            master = torch.nn.Parameter(full32[mine].clone().to(master_device))
            if master_device.type == "cpu" and device.type == "cuda":
                master.data = master.data.pin_memory()
            # the global norm counts each element once: a weight per parameter (1/replication), divided
            # by the group size where every rank of the group holds the whole gradient; padding counts 0
            scale = 1.0 / gsize if parts == 1 else 1.0
            here = [(n, k, off) for n, k, off in zip(names, sizes, offsets) if off < mine.stop and off + k > mine.start]
            values = {float(torch.tensor(norm_weight.get(n, 1.0) * scale, dtype=torch.float32)) for n, _, _ in here}
            w = None
            if len(values) > 1:  # mixed weights in this slice: one per element (most buckets: one scalar)
                w = torch.zeros(sh, dtype=torch.float32, device=master_device)
                for n, k, off in here:
                    lo, hi = max(off, mine.start) - mine.start, min(off + k, mine.stop) - mine.start
                    w[lo:hi] = norm_weight.get(n, 1.0) * scale
            self.zbuckets.append(_Bucket(names, offsets, numel, padded, flat, master,
                                         w, local,
                                         "free" if stage == 3 else "ready", group=bgroup, parts=parts, part=part,
                                         norm_scale=values.pop() if len(values) == 1 else 0.0))
        super().__init__(params, buckets, group, size, expected=expected, always=True)
        if stage == 3:
            self.max_inflight = 2  # block-sized fp32 reduction buffers: keep two in flight, not four
        if offload is not None:  # buckets step one by one: each has its own optimizer
            self.bucket_optimizers = [optimizer_factory([b.master]) for b in self.zbuckets]
            self.optimizer = BucketOptimizers(self.bucket_optimizers)
        else:
            self.optimizer = optimizer_factory([b.master for b in self.zbuckets])
        # offload pipeline: one worker thread, per-bucket phase-A jobs, pinned gradient buffers, a copy stream
        self._worker: ThreadPoolExecutor | None = None
        self._host_jobs: list[Future | None] = [None] * len(self.zbuckets)
        self._host_grads: list[torch.Tensor | None] = [None] * len(self.zbuckets)
        self._copy_stream = None
        self._copies: deque = deque()  # events of this backward's gradient copies not yet waited for
        self.offload_wait_s = 0.0  # last step: seconds the calling thread waited for host work
        self.offload_host_s = 0.0  # last step: seconds of host work (norm pass, updates), wherever it ran

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
        self.receive(i, payload)

    def receive(self, i: int, shard: torch.Tensor) -> None:
        """Bucket ``i``'s reduced fp32 gradient, this rank's shard of it, becomes its master's gradient.

        Called when the bucket's reduction completes: by the backward hooks, or by a step program that
        reduced the gradients in its graph and left the update to this optimizer. With offload it is
        copied to host memory (the overlapped pipeline starts its unscale and norm pass there).
        """
        b = self.zbuckets[i]
        payload = shard
        if not self.overlap:
            b.master.grad = payload.to(b.master.device, non_blocking=True)
            return
        grad, copied = self._to_host(i, payload)
        b.master.grad = grad
        scale = self.scaler.scale if self.scaler is not None else None  # the scale this backward ran with
        self._host_jobs[i] = self._pool().submit(self._grad_arrived, i, grad, copied, scale)

    # ------------------------------------------------------------------ offload pipeline
    def _pool(self) -> ThreadPoolExecutor:
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="autoshard-offload")
        return self._worker

    def _to_host(self, i: int, payload: torch.Tensor):
        """Start copying bucket ``i``'s reduced gradient slice into host memory; (host tensor, done event).

        CUDA: into a pinned buffer kept per bucket, on a side stream, so the copy runs beside the
        backward kernels instead of between them; the event tells the worker when it has landed. The
        compute stream waits for the copy ``max_inflight`` buckets back: should copies fall behind,
        the device memory of gradients waiting for them stays bounded (the host never blocks here).
        """
        if payload.device.type != "cuda":
            return payload.to(self.zbuckets[i].master.device), None
        host = self._host_grads[i]
        if host is None:
            host = self._host_grads[i] = torch.empty(payload.numel(), dtype=torch.float32, pin_memory=True)
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        stream = self._copy_stream
        stream.wait_stream(torch.cuda.current_stream(self.device))  # the reduction wrote ``payload`` there
        with torch.cuda.stream(stream):
            host.copy_(payload, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        payload.record_stream(stream)  # its memory is not reused before the copy has read it
        self._copies.append(done)
        if len(self._copies) > self.max_inflight:
            torch.cuda.current_stream(self.device).wait_event(self._copies.popleft())
        return host, done

    @torch.no_grad()
    def _grad_arrived(self, i: int, grad: torch.Tensor, copied, scale: float | None) -> torch.Tensor:
        """Worker, phase A: once bucket ``i``'s gradient is on the host, unscale it and sum its squares."""
        if copied is not None:
            copied.synchronize()
        t0 = time.perf_counter()
        if scale is not None:
            grad.div_(scale)
        sq = _sum_squares(grad, self.zbuckets[i].grad_weight, self.zbuckets[i].norm_scale)
        self.offload_host_s += time.perf_counter() - t0  # only the worker writes it during a step
        return sq

    @torch.no_grad()
    def _update(self, i: int, coef: float | None) -> None:
        """Worker, phase B: clip and step bucket ``i`` (stage 3: refresh its pinned compute slice)."""
        t0 = time.perf_counter()
        b = self.zbuckets[i]
        if coef is not None:
            b.master.grad.mul_(coef)
        self.bucket_optimizers[i].step()
        if self.stage == 3 and b.local is not None:
            b.local.copy_(b.master.detach())
        self.offload_host_s += time.perf_counter() - t0

    def _wait(self, job: Future):
        """The result of a worker job, counting the time the calling thread waited for it."""
        t0 = time.perf_counter()
        try:
            return job.result()
        finally:
            self.offload_wait_s += time.perf_counter() - t0

    def _settle(self) -> list[torch.Tensor | None]:
        """Wait for every phase-A job of this backward; their sums of squares (None: no job)."""
        jobs, self._host_jobs = self._host_jobs, [None] * len(self.zbuckets)
        out, error = [], None
        for job in jobs:  # every job is waited for, even after one failed: none may outlive the step
            try:
                out.append(self._wait(job) if job is not None else None)
            except BaseException as e:  # noqa: BLE001 - re-raised below
                error = error or e
                out.append(None)
        if error is not None:
            raise error
        return out

    def _pipelined_update(self, coef: float | None) -> None:
        """Phase B: the worker steps bucket after bucket while this thread uploads those already stepped."""
        jobs = [self._pool().submit(self._update, i, coef) for i in range(len(self.zbuckets))]
        try:
            for i, job in enumerate(jobs):
                self._wait(job)
                self._upload(i)
        except BaseException:
            for job in jobs:  # let the worker finish before the error leaves the step
                job.cancel() or job.exception()
            raise

    def begin(self) -> None:
        self._settle()  # nothing of an abandoned step may still be running
        self.offload_wait_s = self.offload_host_s = 0.0
        self._copies.clear()
        super().begin()

    def remove(self) -> None:
        super().remove()
        if self._worker is not None:
            self._settle()
            self._worker.shutdown(wait=True)
            self._worker = None

    # ------------------------------------------------------------------ step
    def step(self, loss: torch.Tensor | None = None) -> bool:
        """Unscale, check, clip, update the masters, gather them into the compute buffers.

        ``loss`` (the step's global loss, on the device) joins the finiteness check, so the caller
        reads it after this step's one host synchronisation instead of adding a second one.
        Returns False when the step was skipped (a non-finite gradient or loss; fp16 overflow).
        With the offload pipeline, unscaling and the norm pass already ran per bucket during backward;
        here the updates run on the worker, interleaved with the uploads (module docstring).
        """
        t0 = time.perf_counter()
        if self.overlap:
            sqs = self._settle()
            for b, sq_b in zip(self.zbuckets, sqs):
                if sq_b is None:  # defensive: a bucket the backward never completed
                    raise RuntimeError(f"ZeRO bucket {b.names[:2]} has no gradient this step; was finish() called?")
        else:
            grads = [b.master.grad for b in self.zbuckets]
            if self.offload is not None and self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()  # the device→host gradient copies
            if self.scaler is not None:
                for g in grads:
                    g.div_(self.scaler.scale)
            sqs = [_sum_squares(g, b.grad_weight, b.norm_scale) for b, g in zip(self.zbuckets, grads)]
        # accumulate where the gradients live; one copy to the host per step, not two per bucket
        sq = torch.zeros(2, dtype=torch.float64, device=sqs[0].device if sqs else self.device)
        for sq_b in sqs:
            sq[0] += sq_b
        sq[1] = (~torch.isfinite(sq[0])).double()  # a non-finite element anywhere makes the sum non-finite
        if loss is not None:
            sq[1] += (~torch.isfinite(loss.detach())).double().to(sq.device)
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
            self._record_serial(t0)
            self.zero_grad()
            return False
        coef = None
        if self.grad_clip is not None and self.last_grad_norm > self.grad_clip:
            coef = self.grad_clip / (self.last_grad_norm + 1e-6)
        if self.overlap:
            self.optimizer.step(run=lambda: self._pipelined_update(coef))
            self.zero_grad()
            return True
        if coef is not None:
            for b in self.zbuckets:
                b.master.grad.mul_(coef)
        self.optimizer.step()
        self._record_serial(t0)
        self.zero_grad()
        self._gather()
        return True

    def _record_serial(self, t0: float) -> None:
        """Offload without the pipeline: the calling thread did all of the host work itself."""
        if self.offload is not None and not self.overlap:
            self.offload_wait_s = self.offload_host_s = time.perf_counter() - t0

    def _gather(self) -> None:
        """All-gather every rank's updated master slice into the flat compute buffers.

        Stage 3 only refreshes this rank's compute slice; a bucket still gathered is dropped so its
        next use gathers the new values.
        """
        for i, b in enumerate(self.zbuckets):
            if self.stage == 3 and b.local is not None:
                b.local.copy_(b.master.detach())
            self._upload(i)

    def _upload(self, i: int) -> None:
        """Bring bucket ``i``'s updated master slice to the compute copies (stage 3: drop the stale gather).

        The host-to-device copy is non-blocking from pinned memory: it runs while the worker steps the
        next bucket. The master is not written again before the next backward has copied this bucket's
        gradients, which the current stream orders after this copy.
        """
        b = self.zbuckets[i]
        if self.stage == 3:
            self.release(i)
            return
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
            src = b.master.detach().to(self.device, non_blocking=True).to(self.dtype)  # host masters too (NCCL needs device tensors)
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
        self._settle()  # a skipped step: the worker may still be reading the gradients
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
