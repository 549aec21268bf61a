"""StepProgram: one rank's whole training step (forward, backward, reduction, update) as one program.

It runs the step graph of passes/optimizer.py over the tensors it owns: the parameters (compute
copies), fp32 masters where the precision asks for them, the optimizer states and step counters, one
learning-rate scalar per optimizer group. Two speeds, one path:

* uncompiled (CPU, tests): the step graph runs as an FX module, op by op;
* compiled (CUDA): Inductor generates its kernels (``torch._inductor.compile_fx``), and from the second
  step on the step is replayed as a CUDA graph (the inputs are copied into static buffers), so the
  host launches one graph per step instead of a few thousand kernels. ``AUTOSHARD_CUDA_GRAPHS=0``
  turns the replay off; a capture that fails falls back to plain launches with a warning.

A step returns a device tensor ``[global loss, skipped, gradient norm]``; the caller reads it once.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.fx import GraphModule


def cuda_graphs_enabled() -> bool:
    """Whether CUDA steps replay as CUDA graphs (``AUTOSHARD_CUDA_GRAPHS=0`` turns it off)."""
    return os.environ.get("AUTOSHARD_CUDA_GRAPHS", "1").strip().lower() not in ("0", "false", "off", "no")


class StepProgram:
    """Runs a step graph over fixed tensors; see the module docstring."""

    def __init__(self, gm: GraphModule, tensors: list[Any], input_slots: list[int], device: torch.device,
                 compile: bool, cuda_graphs: bool) -> None:
        """``tensors``: the graph's inputs in its order, with ``None`` at ``input_slots`` (the batch)."""
        self.gm = gm
        # detached views of the same storage: the program updates them in place, and nothing in it is
        # differentiated (Inductor then compiles an inference graph with input mutations)
        self.tensors = [t.detach() if isinstance(t, torch.Tensor) else t for t in tensors]
        self.input_slots = input_slots
        self.device = device
        self.compiled = compile
        self.cuda_graphs = cuda_graphs and device.type == "cuda"
        self.compile_s = 0.0  # Inductor's code generation (first call)
        self.capture_s = 0.0  # recording the CUDA graph (second call)
        self._fn: Callable[..., Any] = gm
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static_in: list[Any] | None = None
        self._static_out: torch.Tensor | None = None
        self._calls = 0
        self.graph_error: str | None = None

    def _args(self, inputs: list[Any]) -> list[Any]:
        args = list(self.tensors)
        for slot, x in zip(self.input_slots, inputs):
            args[slot] = x
        return args

    def _compile(self, args: list[Any]) -> None:
        from torch._inductor.compile_fx import compile_fx

        t = time.perf_counter()
        with torch.no_grad():
            self._fn = compile_fx(self.gm, args)
        self.compile_s = time.perf_counter() - t

    def __call__(self, inputs: list[Any]) -> torch.Tensor:
        self._calls += 1
        if self._graph is not None:
            for s, x in zip(self._static_in, inputs):
                if isinstance(s, torch.Tensor):
                    s.copy_(x, non_blocking=True)
            self._graph.replay()
            return self._static_out
        args = self._args(inputs)
        if self.compiled and self._fn is self.gm:
            self._compile(args)
        if self.cuda_graphs and self._calls >= 2:  # the first call warmed up (cuBLAS handles, lazy inits)
            out = self._capture(inputs)
            if out is not None:
                return out
        return self._run(args)

    def _run(self, args: list[Any]) -> torch.Tensor:
        with torch.no_grad():  # the program updates parameters in place; it has its own backward
            out = self._fn(*args)
        return out[0] if isinstance(out, (tuple, list)) else out

    def _capture(self, inputs: list[Any]) -> torch.Tensor | None:
        """Record one step as a CUDA graph and replay it (that replay is this step)."""
        static = [x.clone() if isinstance(x, torch.Tensor) else x for x in inputs]
        args = self._args(static)
        graph = torch.cuda.CUDAGraph()
        t = time.perf_counter()
        try:
            torch.cuda.synchronize(self.device)
            with torch.cuda.graph(graph):
                out = self._run(args)
        except Exception as e:  # noqa: BLE001 - recorded; the program goes on without graphs
            self.cuda_graphs = False
            self.graph_error = f"{type(e).__name__}: {e}"[:500]
            warnings.warn(f"CUDA graph capture of the training step failed ({self.graph_error}); "
                          "running it without graphs", stacklevel=3)
            torch.cuda.synchronize(self.device)
            return None
        self._graph, self._static_in, self._static_out = graph, static, out
        self.capture_s = time.perf_counter() - t
        graph.replay()
        return out
