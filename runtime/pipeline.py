"""Pipeline executor: runs a :class:`~autoshard.runtime.schedules.Schedule` on this rank's stages.

Why our own executor rather than ``torch.distributed.pipelining``: autoshard's stages are FX graphs
that already contain tensor-parallel collectives, take the user's flat inputs next to what they
receive, pass values through to later stages, and may share a tied parameter with another stage.
``PipelineStage`` wants an ``nn.Module`` per stage with one positional input stream and infers shapes
by running it, and its schedules are classes rather than inspectable data. Here the schedule is plain
data (per-rank action lists, simulated and checked before it runs), and the executor is a small loop
that turns each action into sends, receives and autograd calls:

* ``F(s, m)``: receive stage ``s-1``'s outputs for microbatch ``m`` (leaves that require grad), run
  the stage, send its outputs to stage ``s+1``; the last stage computes the loss, scaled by ``1/M``.
* ``B(s, m)``: receive the gradients of the outputs from stage ``s+1``, backpropagate, send the
  gradients of the received inputs to stage ``s-1``. When the schedule splits backward (zero
  bubble), ``B`` computes only input gradients and ``W(s, m)`` the weight gradients later.

Messages between two ranks are matched by order: the schedules run every stage's microbatches in
the same order on sender and receiver (``Schedule.check`` verifies it per link). Each direction of
traffic has its own process group (activations forward, gradients backward, and the wrap-around
links of interleaved schedules), so a pair of ranks never has a send and a receive queued on one
NCCL stream, where one could wait behind the other forever. The first message on each link is a
small header with the shapes, dtypes and requires-grad flags of the bundle, so stages need no shape
inference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.fx import GraphModule

from . import collectives as C
from .schedules import Schedule

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.bool,
           torch.uint8, torch.int8, torch.int16]
_MAX_TENSORS = 64
_MAX_DIMS = 8
_HEADER = 1 + _MAX_TENSORS * (3 + _MAX_DIMS)


class PipelineRunner:
    """Executes one schedule per step over this rank's stage programs."""

    def __init__(self, stages: dict[int, GraphModule], schedule: Schedule, stage_ranks: list[int], pp_index: int,
                 device: torch.device, stage_params: dict[int, list[torch.nn.Parameter]], comm_key: str,
                 groups: dict[str, object] | None = None) -> None:
        self.groups = groups or {}
        self.pp_index = pp_index
        self.stages = stages
        self.schedule = schedule
        self.stage_ranks = stage_ranks
        self.device = device
        self.stage_params = stage_params
        self.comm_key = comm_key
        self.last = schedule.num_stages - 1
        self._meta: dict[int, list[tuple[tuple[int, ...], torch.dtype, bool]]] = {}  # per receiving stage
        self._header_sent: set[int] = set()
        self._sends: list[tuple[object, torch.Tensor]] = []
        self.peak_inflight = 0  # most microbatches whose activations this rank held at once, last step
        self.grad_scale = 1.0  # fp16 loss scale applied to the backward seed

    # ------------------------------------------------------------------ messaging
    def _group(self, src_stage: int, dst_stage: int):
        """The process group of the direction a message from ``src_stage`` to ``dst_stage`` travels."""
        pp = self.schedule.pp
        if dst_stage > src_stage:
            return self.groups.get("fwd_wrap" if dst_stage % pp == 0 else "fwd")
        return self.groups.get("bwd_wrap" if src_stage % pp == 0 else "bwd")

    def _send(self, tensors: list[torch.Tensor], dst_stage: int, header: bool, src_stage: int) -> None:
        dst = self.stage_ranks[dst_stage]
        group = self._group(src_stage, dst_stage)
        if header and dst_stage not in self._header_sent:
            if len(tensors) > _MAX_TENSORS:
                raise RuntimeError(f"a stage boundary carries {len(tensors)} tensors; at most {_MAX_TENSORS} are supported")
            h = torch.zeros(_HEADER, dtype=torch.int64)
            h[0] = len(tensors)
            for i, t in enumerate(tensors):
                if t.dim() > _MAX_DIMS:
                    raise RuntimeError(f"a stage boundary tensor has {t.dim()} dims; at most {_MAX_DIMS}")
                o = 1 + i * (3 + _MAX_DIMS)
                h[o] = _DTYPES.index(t.dtype)
                h[o + 1] = int(t.requires_grad)
                h[o + 2] = t.dim()
                h[o + 3:o + 3 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
            self._isend(h.to(self.device), dst, group)
            self._header_sent.add(dst_stage)
        for t in tensors:
            self._isend(t.detach().contiguous(), dst, group)

    def _isend(self, t: torch.Tensor, dst: int, group) -> None:
        C.count_bytes(self.comm_key, t.numel() * t.element_size())
        self._sends.append((dist.isend(t, dst, group=group), t))

    def _recv_acts(self, stage: int) -> list[torch.Tensor]:
        src = self.stage_ranks[stage - 1]
        group = self._group(stage - 1, stage)
        if stage not in self._meta:
            h = torch.empty(_HEADER, dtype=torch.int64, device=self.device)
            dist.recv(h, src, group=group)
            h = h.cpu()
            meta = []
            for i in range(int(h[0])):
                o = 1 + i * (3 + _MAX_DIMS)
                nd = int(h[o + 2])
                meta.append((tuple(int(v) for v in h[o + 3:o + 3 + nd]), _DTYPES[int(h[o])], bool(h[o + 1])))
            self._meta[stage] = meta
        out = []
        for shape, dtype, req in self._meta[stage]:
            buf = torch.empty(shape, dtype=dtype, device=self.device)
            dist.recv(buf, src, group=group)
            out.append(buf.requires_grad_(req))
        return out

    def _recv_like(self, like: list[torch.Tensor], src_stage: int) -> list[torch.Tensor]:
        src = self.stage_ranks[src_stage]
        group = self._group(src_stage, src_stage - 1)
        out = []
        for t in like:
            buf = torch.empty_like(t, memory_format=torch.contiguous_format)
            dist.recv(buf, src, group=group)
            out.append(buf)
        return out

    # ------------------------------------------------------------------ one step
    def step(self, inputs: list[list], finish: Callable[[object, int], torch.Tensor]) -> torch.Tensor | None:
        """Run the schedule over microbatches ``inputs[m]`` (flat user inputs).

        ``finish(outputs, m)`` turns the last stage's flat outputs into microbatch ``m``'s loss.
        Returns the mean loss over microbatches on ranks holding the last stage, else ``None``.
        """
        m_total = self.schedule.microbatches
        saved: dict[tuple[int, int], tuple] = {}
        pending_w: dict[tuple[int, int], tuple] = {}
        losses: list[torch.Tensor] = []
        self.peak_inflight = 0
        for a in self.schedule.actions[self.pp_index]:
            self.peak_inflight = max(self.peak_inflight, len(saved) + len(pending_w))
            if a.kind == "F":
                ins = self._recv_acts(a.stage) if a.stage > 0 else []
                outs = self.stages[a.stage](*inputs[a.microbatch], *ins)
                if a.stage == self.last:
                    loss = finish(outs, a.microbatch)
                    losses.append(loss.detach())
                    saved[(a.stage, a.microbatch)] = (ins, [loss * (self.grad_scale / m_total)])
                else:
                    outs = list(outs)
                    self._send(outs, a.stage + 1, header=True, src_stage=a.stage)
                    saved[(a.stage, a.microbatch)] = (ins, outs)
            elif a.kind == "B":
                ins, outs = saved.pop((a.stage, a.microbatch))
                roots = [o for o in outs if o.requires_grad]
                if a.stage == self.last:
                    grads = [None] * len(roots)
                else:
                    grads = self._recv_like(roots, a.stage + 1)
                wanted = [i for i in ins if i.requires_grad]
                if self.schedule.split_backward:
                    in_grads = list(torch.autograd.grad(roots, wanted, grads, retain_graph=True, allow_unused=True)) if wanted and roots else [None] * len(wanted)
                    pending_w[(a.stage, a.microbatch)] = (roots, grads)
                else:
                    if roots:
                        torch.autograd.backward(roots, grads)
                    in_grads = [i.grad for i in wanted]
                if a.stage > 0:
                    self._send([g if g is not None else torch.zeros_like(i) for g, i in zip(in_grads, wanted)],
                               a.stage - 1, header=False, src_stage=a.stage)
            elif a.kind == "W":
                roots, grads = pending_w.pop((a.stage, a.microbatch))
                params = [p for p in self.stage_params.get(a.stage, []) if p.requires_grad]
                if roots and params:
                    torch.autograd.backward(roots, grads, inputs=params)
            else:  # pragma: no cover - schedules only hold F/B/W
                raise RuntimeError(f"unknown pipeline action {a}")
        self.wait()
        if not losses:
            return None
        return torch.stack(losses).mean()

    def forward(self, inputs: list) -> object | None:
        """Forward only, one microbatch, stages in order; returns flat outputs on the last stage."""
        result = None
        for s in sorted(self.stages):
            ins = self._recv_acts(s) if s > 0 else []
            with torch.no_grad():
                outs = self.stages[s](*inputs, *ins)
            if s == self.last:
                result = outs
            else:
                self._send(list(outs), s + 1, header=True, src_stage=s)
        self.wait()
        return result

    def wait(self) -> None:
        for work, _ in self._sends:
            work.wait()
        self._sends = []
