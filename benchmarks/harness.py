"""What every GPU benchmark here shares: timing, MFU and the result rows.

MFU = tokens/s/GPU × (6N + 12·L·d·seq) FLOPs per token / 989 TFLOP/s (H100/H200 dense bf16).
"""

from __future__ import annotations

import json

import torch
import torch.distributed as dist

from autoshard.bench import PEAK_FLOPS, timed  # noqa: F401 - the one timing loop, shared with `autoshard bench`


class Results:
    """Rows of tokens/s/GPU, MFU and peak memory; printed on rank 0 and written as JSON."""

    def __init__(self, flops_per_token: float, config: dict, params: int) -> None:
        self.flops_per_token = flops_per_token
        self.config = config
        self.params = params
        self.rows: list[dict] = []
        self.extras: dict[str, dict] = {}
        self.rank = dist.get_rank() if dist.is_initialized() else 0

    def add(self, system: str, tokens_per_step_per_gpu: float, step_s: float) -> None:
        tok = tokens_per_step_per_gpu / step_s
        peak = torch.cuda.max_memory_allocated() / 2**30
        mfu = tok * self.flops_per_token / PEAK_FLOPS
        self.rows.append({"system": system, "tok_s_gpu": tok, "mfu": mfu, "peak_gib": peak, "step_s": step_s})
        if self.rank == 0:
            print(f"{system:34s} {tok:10,.0f} tok/s/GPU  MFU {100 * mfu:5.1f}%  peak {peak:6.2f} GiB  "
                  f"step {step_s * 1e3:8.1f} ms", flush=True)

    def extra(self, name: str, values: dict) -> None:
        """Anything else a benchmark measured (predicted vs measured memory, bandwidths), kept in the JSON."""
        self.extras[name] = values

    def write(self, path: str | None) -> None:
        if self.rank == 0 and path:
            with open(path, "w") as f:
                json.dump({"config": self.config, "params": self.params, "torch": torch.__version__,
                           "device": torch.cuda.get_device_name(), "rows": self.rows, "extras": self.extras}, f,
                          indent=1)


def llama_parser(description: str, batch: int, batch_help: str, iters: int):
    """Command-line flags of the Llama-style model (defaults: the 953M model) shared by benchmarks."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--dim", dest="d", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=batch, help=batch_help)
    ap.add_argument("--iters", type=int, default=iters)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    return ap
