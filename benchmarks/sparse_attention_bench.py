"""Block-sparse attention against dense flash attention: forward + backward time on one GPU.

    python benchmarks/sparse_attention_bench.py                      # H100/H200: seq 4k..32k, bf16, 12.5 % density
    python benchmarks/sparse_attention_bench.py --density 0.25 --block 128 --out sparse.json
    python benchmarks/sparse_attention_bench.py --tiny               # CPU smoke run: Triton interpreter, tiny shapes

For each sequence length the layout is ``block_sparse(block=B, local=L, global=G)`` with the smallest
local window ``L`` whose block density reaches ``--density`` (density = visited blocks over the blocks
dense attention computes: the lower triangle when causal, as flash attention skips the upper one too).
Timed: ``sparse`` (autoshard's Triton kernels, forward + backward) and ``flash``
(``F.scaled_dot_product_attention`` restricted to the flash backend, same causality), median over
``--iters`` after warm-up, on ``[batch, heads, T, head_dim]`` bf16 tensors (default: the 953M
Llama-style model's 16 heads of 128). The goal is ``flash / sparse >= 4`` at 12.5 % density.
Correctness is checked first at the smallest length against the dense-masked reference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

if "--tiny" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton.language is imported
    os.environ.setdefault("AUTOSHARD_KERNELS", "triton")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from autoshard.runtime.kernels.block_sparse import Layout, block_sparse_attention, block_sparse_reference  # noqa: E402


def timed(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def layout_for_density(seq: int, density: float, block: int, n_global: int, causal: bool) -> Layout:
    """The layout with the smallest local window whose density at ``seq`` reaches ``density``."""
    nb = -(-seq // block)
    for local in range(1, nb + 1):
        lay = Layout(block=block, local=local, n_global=n_global)
        if lay.csr(seq, causal).density(causal) >= density:
            return lay
    return Layout(block=block, local=nb, n_global=n_global)


def fwd_bwd(attn: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        for x in (q, k, v):
            x.grad = None
        attn(q, k, v).backward(g)
    return step


def flash(causal: bool) -> Callable:
    def attn(q, k, v):
        if q.is_cuda:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return attn


def check(lay: Layout, causal: bool, device: torch.device, dtype: torch.dtype, heads: int, dim: int, seq: int) -> float:
    """Max abs error of the kernel (forward and input gradients) against the dense-masked fp32 reference."""
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, heads, seq, dim, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    up = torch.randn(1, heads, seq, dim, generator=g).to(device)
    out = block_sparse_attention(q, k, v, lay, causal)
    (out.float() * up).sum().backward()
    ref_in = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref = block_sparse_reference(*ref_in, lay, causal)
    (ref * up).sum().backward()
    errs = [(out.float() - ref).abs().max()] + [(x.grad.float() - r.grad).abs().max() for x, r in zip((q, k, v), ref_in)]
    return float(max(errs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", default="4096,8192,16384,32768")
    ap.add_argument("--density", type=float, default=0.125)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--global-blocks", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--no-causal", action="store_true", help="bidirectional attention (default: causal)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run under the Triton interpreter")
    a = ap.parse_args()
    causal = not a.no_causal
    if a.tiny:
        device, dtype = torch.device("cpu"), torch.float32
        a.seqs, a.block, a.batch, a.heads, a.head_dim, a.iters, a.warmup = "128,200", 16, 1, 2, 32, 2, 1
        a.density = max(a.density, 0.3)
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --tiny for the CPU smoke run")
        os.environ.setdefault("AUTOSHARD_KERNELS", "triton")
        device, dtype = torch.device("cuda"), torch.bfloat16
    seqs = [int(s) for s in a.seqs.split(",")]
    lay0 = layout_for_density(seqs[0], a.density, a.block, a.global_blocks, causal)
    err = check(lay0, causal, device, dtype, min(a.heads, 4), a.head_dim, min(seqs[0], 2048))
    print(f"check vs dense-masked reference ({lay0.spec()}): max abs error {err:.3g}")
    rows = []
    for seq in seqs:
        lay = layout_for_density(seq, a.density, a.block, a.global_blocks, causal)
        dens = lay.csr(seq, causal).density(causal)
        shape = (a.batch, a.heads, seq, a.head_dim)
        q, k, v = (torch.randn(shape, device=device, dtype=dtype).requires_grad_() for _ in range(3))
        g = torch.randn(shape, device=device, dtype=dtype)
        t_sparse = timed(fwd_bwd(lambda q, k, v, lay=lay: block_sparse_attention(q, k, v, lay, causal), q, k, v, g),
                         device, a.warmup, a.iters)
        t_flash = timed(fwd_bwd(flash(causal), q, k, v, g), device, a.warmup, a.iters)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
        row = {"seq": seq, "layout": lay.spec(), "density": round(dens, 4), "sparse_ms": t_sparse * 1e3,
               "flash_ms": t_flash * 1e3, "speedup": t_flash / t_sparse, "peak_bytes": peak}
        rows.append(row)
        print(f"seq {seq:>6}  {lay.spec():<52} density {dens:6.3f}  sparse {t_sparse * 1e3:9.2f} ms  "
              f"flash {t_flash * 1e3:9.2f} ms  speedup {t_flash / t_sparse:5.2f}x")
        del q, k, v, g
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)",
              "dtype": str(dtype), "causal": causal, "batch": a.batch, "heads": a.heads, "head_dim": a.head_dim,
              "target_density": a.density, "check_max_abs_error": err, "rows": rows}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
