"""Fused kernels: Triton kernels that autoshard generates or instantiates from templates.

Every kernel here has two implementations of one function: a Triton kernel (the fast path on GPUs)
and a torch reference (plain aten ops, the definition the Triton kernel is tested against). Which
one runs is decided per call by :func:`use_triton` from ``AUTOSHARD_KERNELS``:

=========  ==================================================================================
``auto``   (default) Triton for CUDA tensors when Triton is installed, the reference otherwise
``triton`` always Triton; on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``,
           set here when it is unset and no kernel has been built yet), which is how CI tests them
``torch``  always the torch reference
=========  ==================================================================================

Triton kernels are defined lazily (on first use, inside a cached builder) rather than at import:
the package imports without Triton, and ``TRITON_INTERPRET`` is read when a kernel is decorated.

Families: :mod:`.pointwise` (kernels generated from the fusion pass's symbolic expressions),
:mod:`.rmsnorm`, :mod:`.layernorm`, :mod:`.softmax`, :mod:`.rotary`, :mod:`.swiglu`,
:mod:`.cross_entropy`, :mod:`.adamw`.
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "triton", "torch")
_built = False  # whether any Triton kernel has been decorated in this process (see use_triton)


class KernelError(RuntimeError):
    """A kernel was asked for on a backend that cannot run it (e.g. Triton not installed)."""


def backend_setting() -> str:
    """The ``AUTOSHARD_KERNELS`` setting, validated: ``auto``, ``triton`` or ``torch``."""
    value = os.environ.get("AUTOSHARD_KERNELS", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise KernelError(f"AUTOSHARD_KERNELS={value!r}: choose one of {', '.join(BACKENDS)}")
    return value


@functools.cache
def triton_available() -> bool:
    """Whether ``import triton`` works in this environment."""
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "no Triton"
        return False
    return True


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether a kernel called on ``tensors`` should run its Triton implementation."""
    setting = backend_setting()
    if setting == "torch":
        return False
    on_cuda = any(t.is_cuda for t in tensors if isinstance(t, torch.Tensor))
    if setting == "auto":
        return on_cuda and triton_available()
    if not triton_available():
        raise KernelError("AUTOSHARD_KERNELS=triton but Triton is not installed: pip install triton "
                          "(or AUTOSHARD_KERNELS=torch for the reference kernels)")
    if not on_cuda and os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true", "True"):
        if _built:
            raise KernelError("Triton kernels were built for the GPU in this process and cannot run on CPU "
                              "tensors; set TRITON_INTERPRET=1 before the first kernel call")
        os.environ["TRITON_INTERPRET"] = "1"
    return True


def interpreted() -> bool:
    """Whether Triton kernels run under the CPU interpreter (sizes tiles for it: fewer, larger programs)."""
    return os.environ.get("TRITON_INTERPRET", "0") in ("1", "true", "True")


def mark_built() -> None:
    """Called by every kernel builder: after it, TRITON_INTERPRET may no longer be switched on here."""
    global _built
    _built = True


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (Triton block sizes must be powers of two)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def row_tile(n_cols: int, n_rows: int, budget: int | None = None) -> tuple[int, int]:
    """``(BLOCK_M, BLOCK_N)`` for a kernel that holds whole rows of ``n_cols`` in one tile.

    ``BLOCK_N`` covers a row; ``BLOCK_M`` rows share a program while the tile stays within
    ``budget`` elements (4096 on GPUs; far larger under the interpreter, where each program costs
    a Python-level iteration).
    """
    if budget is None:
        budget = 1 << 16 if interpreted() else 4096
    bn = next_pow2(n_cols)
    bm = max(1, min(next_pow2(n_rows), budget // bn))
    return bm, bn


def warps(tile: int) -> int:
    """Warps per program for a tile of ``tile`` elements: about 16 elements per thread, 4 to 16 warps."""
    return max(4, min(16, next_pow2(tile) // 512))


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors on ``device`` (a small constant under the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


__all__ = ["BACKENDS", "KernelError", "backend_setting", "interpreted", "mark_built", "next_pow2", "row_tile",
           "sm_count", "triton_available", "use_triton", "warps"]
