"""Block-sparse attention: softmax attention restricted to a layout of (query block, key block) pairs.

Problem. Dense attention costs ``O(T²)`` time per head; at sequence 16k-32k it dominates a training
step. Many long-context models attend within a local window plus a few global (and random or strided)
blocks — the Fixed, BigBird and Longformer families. Given such a layout, compute

    ``out[t] = Σ_{s ∈ keys(t)} softmax_s(q[t]·k[s] · scale) · v[s]``

where ``keys(t)`` are the positions of the key blocks the layout gives ``t``'s query block (and, when
causal, only ``s <= t``), visiting only those blocks: time ``O(T · nnz-per-row · block)``, memory
linear in ``T`` (no ``T × T`` mask or score matrix is ever materialised by the Triton path).

Layout (:class:`Layout`), over ``nb = ceil(T / block)`` blocks, query block ``i``, key block ``j``:

* **local** ``w``: causal ``i - w < j <= i``; otherwise ``|i - j| < w`` (the diagonal always, ``w >= 1``);
* **global** ``g``: blocks ``0..g-1`` attend to every block and every block attends to them;
* **random** ``r``: ``r`` further key blocks per query block, drawn with ``seed`` (the same on every rank);
* **stride** ``s`` (``0``: off): key blocks ``j`` with ``j % s == s - 1`` (the Fixed pattern's summary blocks);
* **causal**: pairs with ``j > i`` are dropped, and inside diagonal blocks ``s <= t`` is enforced per element.

The layout is stored as CSR (``row_ptr``, ``col_idx``: sorted key blocks of each query block) and its
transpose (``col_ptr``, ``row_idx``: query blocks of each key block), both int32.

Kernels (Triton; one program per (query or key block, batch·head)):

* forward: online softmax over the row's key blocks; writes ``out`` and the row log-sum-exp (base 2);
* backward ``dq``: per query block over its key blocks, ``ds = p · (dp - δ)`` with ``δ = rowsum(dO · O)``;
* backward ``dk, dv``: per key block over the query blocks that attend to it (transposed CSR), so no
  atomics are needed.

The torch reference (:func:`block_sparse_reference`) is dense attention with the layout expanded into a
boolean ``T × T`` mask: the definition the kernels are tested against and the CPU fallback.
Sequence lengths need not be multiples of ``block`` (the tail is masked); head dims are padded to a
power of two (>= 16); fp32, bf16 and fp16 inputs, fp32 accumulation.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import asdict, dataclass

import torch

from . import interpreted, mark_built, next_pow2, use_triton

BLOCKS = (16, 32, 64, 128)  # block sizes the kernels take (tl.dot needs >= 16; a power of two)
_SPEC = re.compile(r"\s*block_sparse\s*\((.*)\)\s*", re.S)
_KEYS = {"block": "block", "local": "local", "global": "n_global", "random": "n_random", "stride": "stride",
         "seed": "seed"}


class LayoutError(ValueError):
    """A block-sparse attention spec or layout that cannot be built (the message names the fix)."""


@dataclass(frozen=True)
class Layout:
    """Which key blocks each query block visits. Plain data (hashable, JSON-able through :meth:`to_dict`)."""

    block: int = 64
    local: int = 4
    n_global: int = 1
    n_random: int = 0
    stride: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.block not in BLOCKS:
            raise LayoutError(f"block={self.block}: choose one of {', '.join(map(str, BLOCKS))}")
        if self.local < 1:
            raise LayoutError(f"local={self.local}: the local window must hold at least the diagonal block (>= 1)")
        for name in ("n_global", "n_random", "stride", "seed"):
            if getattr(self, name) < 0:
                raise LayoutError(f"{name.removeprefix('n_')}={getattr(self, name)} must be >= 0")

    def spec(self) -> str:
        """The text :func:`parse_attention` reads back into this layout."""
        extra = "".join(f", {k}={getattr(self, f)}" for k, f in (("stride", "stride"), ("seed", "seed"))
                        if getattr(self, f))
        return (f"block_sparse(block={self.block}, local={self.local}, global={self.n_global}, "
                f"random={self.n_random}{extra})")

    def to_dict(self) -> dict:
        return asdict(self)

    # ------------------------------------------------------------------ the pattern
    def mask_blocks(self, n_blocks: int, causal: bool) -> torch.Tensor:
        """``[nb, nb]`` bool: whether query block ``i`` visits key block ``j``."""
        nb = n_blocks
        i = torch.arange(nb)[:, None]
        j = torch.arange(nb)[None, :]
        if causal:
            m = (j <= i) & (j > i - self.local)
        else:
            m = (i - j).abs() < self.local
        g = min(self.n_global, nb)
        m[:g, :] = True
        m[:, :g] = True
        if self.stride:
            m |= (j % self.stride) == self.stride - 1
        if causal:
            m &= j <= i
        if self.n_random:
            gen = torch.Generator().manual_seed(self.seed)
            for r in range(nb):
                allowed = torch.arange(r + 1 if causal else nb)
                free = allowed[~m[r, allowed]]
                if len(free):
                    pick = free[torch.randperm(len(free), generator=gen)[: self.n_random]]
                    m[r, pick] = True
        return m

    def csr(self, seq_len: int, causal: bool) -> BlockCSR:
        """The layout for a sequence of ``seq_len`` positions, as CSR and transposed CSR (cached)."""
        return _csr(self, int(seq_len), bool(causal))


@dataclass(frozen=True)
class BlockCSR:
    """A layout laid out for one sequence length: row and column compressed int32 index tensors."""

    n_blocks: int
    row_ptr: torch.Tensor
    col_idx: torch.Tensor
    col_ptr: torch.Tensor
    row_idx: torch.Tensor
    row_order: torch.Tensor  # query blocks by descending work: the longest programs start first (no tail)
    col_order: torch.Tensor  # likewise key blocks for the dk/dv kernel (a global column is visited by every row)
    mask: torch.Tensor  # [nb, nb] bool, the block pattern (for the reference, viz and density)

    @property
    def nnz(self) -> int:
        return int(self.col_idx.numel())

    def density(self, causal: bool) -> float:
        """Visited blocks over the blocks dense attention computes (all ``nb²``; the lower triangle if causal)."""
        nb = self.n_blocks
        full = nb * (nb + 1) // 2 if causal else nb * nb
        return self.nnz / max(full, 1)

    def to(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        return tuple(t.to(device) for t in (self.row_ptr, self.col_idx, self.col_ptr, self.row_idx, self.row_order,
                                            self.col_order))


@functools.lru_cache(maxsize=64)
def _csr(layout: Layout, seq_len: int, causal: bool) -> BlockCSR:
    nb = max(1, -(-seq_len // layout.block))
    m = layout.mask_blocks(nb, causal)

    def compress(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = mat.sum(1)
        ptr = torch.zeros(nb + 1, dtype=torch.int32)
        ptr[1:] = counts.cumsum(0).to(torch.int32)
        idx = mat.nonzero()[:, 1].to(torch.int32)  # row-major: sorted within each row
        return ptr, idx

    row_ptr, col_idx = compress(m)
    col_ptr, row_idx = compress(m.t().contiguous())

    def order(ptr: torch.Tensor) -> torch.Tensor:
        return torch.sort(ptr.diff(), descending=True, stable=True).indices.to(torch.int32)

    return BlockCSR(nb, row_ptr, col_idx, col_ptr, row_idx, order(row_ptr), order(col_ptr), m)


@functools.lru_cache(maxsize=64)
def _device_csr(layout: Layout, seq_len: int, causal: bool, device: str) -> tuple[torch.Tensor, ...]:
    return _csr(layout, seq_len, causal).to(torch.device(device))


def parse_attention(spec: str | Layout) -> Layout:
    """``"block_sparse(block=64, local=4, global=1, random=0)"`` → :class:`Layout` (keys optional, any order).

    Keys: ``block`` (16, 32, 64 or 128), ``local`` (window in blocks, >= 1), ``global``, ``random``,
    ``stride`` (0: off), ``seed``. Raises :class:`LayoutError` naming the problem.
    """
    if isinstance(spec, Layout):
        return spec
    if not isinstance(spec, str):
        raise LayoutError(f"attention={spec!r}: expected a string like 'block_sparse(block=64, local=4, global=1)'")
    m = _SPEC.fullmatch(spec)
    if m is None:
        raise LayoutError(f"attention={spec!r}: expected 'block_sparse(block=64, local=4, global=1, random=0)' "
                          "(the only attention kind so far)")
    kw: dict[str, int] = {}
    body = m.group(1).strip()
    for part in filter(None, (p.strip() for p in body.split(","))) if body else ():
        key, eq, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or key not in _KEYS:
            raise LayoutError(f"attention={spec!r}: unknown or malformed entry {part!r}; keys are "
                              f"{', '.join(_KEYS)} (as key=integer)")
        if _KEYS[key] in kw:
            raise LayoutError(f"attention={spec!r}: {key} given twice")
        try:
            kw[_KEYS[key]] = int(value)
        except ValueError:
            raise LayoutError(f"attention={spec!r}: {key}={value!r} is not an integer") from None
    return Layout(**kw)


# =============================================================================== reference
def dense_mask(layout: Layout, seq_len: int, causal: bool, device: torch.device | None = None) -> torch.Tensor:
    """``[T, T]`` bool: the layout expanded to positions (with the causal triangle). The reference's mask."""
    full = _dense_mask(layout, int(seq_len), bool(causal))
    return full.to(device) if device is not None else full


@functools.lru_cache(maxsize=8)
def _dense_mask(layout: Layout, seq_len: int, causal: bool) -> torch.Tensor:
    m = layout.csr(seq_len, causal).mask
    b = layout.block
    full = m.repeat_interleave(b, 0).repeat_interleave(b, 1)[:seq_len, :seq_len]
    if causal:
        full = full & torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    return full


def block_sparse_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout, causal: bool = False,
                           scale: float | None = None) -> torch.Tensor:
    """The definition: dense attention over ``[..., T, D]`` with the layout as a mask, in fp32."""
    t = q.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    mask = dense_mask(layout, t, causal, q.device)
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return (torch.softmax(s, dim=-1) @ v.float()).to(q.dtype)


# =============================================================================== Triton
@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    mark_built()

    @triton.jit
    def block_sparse_fwd(Q, K, V, OUT, LSE, ROW_PTR, COL_IDX, ORDER, qk_scale, T, D,
                         CAUSAL: tl.constexpr, BLOCK: tl.constexpr, DP: tl.constexpr, F32: tl.constexpr,
                         PREC: tl.constexpr):
        i = tl.load(ORDER + tl.program_id(0))
        base = tl.program_id(1).to(tl.int64) * T * D
        offs_m = i * BLOCK + tl.arange(0, BLOCK)
        offs_b = tl.arange(0, BLOCK)
        offs_d = tl.arange(0, DP)
        dmask = (offs_d < D)[None, :]
        qmask = (offs_m < T)[:, None] & dmask
        q = tl.load(Q + base + offs_m[:, None] * D + offs_d[None, :], mask=qmask, other=0.0)
        if F32:  # the interpreter's tl.dot is wrong for 16-bit operands
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK], -float("inf"), tl.float32)
        l_i = tl.zeros([BLOCK], dtype=tl.float32)
        acc = tl.zeros([BLOCK, DP], dtype=tl.float32)
        start = tl.load(ROW_PTR + i)
        end = tl.load(ROW_PTR + i + 1)
        for p in range(start, end):
            j = tl.load(COL_IDX + p)
            offs_n = j * BLOCK + offs_b
            kvmask = (offs_n < T)[:, None] & dmask
            k = tl.load(K + base + offs_n[:, None] * D + offs_d[None, :], mask=kvmask, other=0.0)
            if F32:  # the interpreter's tl.dot is wrong for 16-bit operands
                k = k.to(tl.float32)
            v = tl.load(V + base + offs_n[:, None] * D + offs_d[None, :], mask=kvmask, other=0.0)
            if F32:  # the interpreter's tl.dot is wrong for 16-bit operands
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
            valid = (offs_n < T)[None, :]
            if CAUSAL:
                valid = valid & (offs_m[:, None] >= offs_n[None, :])
            s = tl.where(valid, s, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            pr = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(pr, axis=1)
            acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        tl.store(OUT + base + offs_m[:, None] * D + offs_d[None, :], out.to(OUT.dtype.element_ty), mask=qmask)
        lse = tl.where(l_i == 0.0, 0.0, tl.where(m_i == -float("inf"), 0.0, m_i) + tl.log2(l_safe))
        tl.store(LSE + tl.program_id(1).to(tl.int64) * T + offs_m, lse, mask=offs_m < T)

    @triton.jit
    def block_sparse_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, ROW_PTR, COL_IDX, ORDER, qk_scale, sm_scale, T, D,
                            CAUSAL: tl.constexpr, BLOCK: tl.constexpr, DP: tl.constexpr, F32: tl.constexpr,
                            PREC: tl.constexpr):
        i = tl.load(ORDER + tl.program_id(0))
        base = tl.program_id(1).to(tl.int64) * T * D
        rbase = tl.program_id(1).to(tl.int64) * T
        offs_m = i * BLOCK + tl.arange(0, BLOCK)
        offs_b = tl.arange(0, BLOCK)
        offs_d = tl.arange(0, DP)
        dmask = (offs_d < D)[None, :]
        qmask = (offs_m < T)[:, None] & dmask
        q = tl.load(Q + base + offs_m[:, None] * D + offs_d[None, :], mask=qmask, other=0.0)
        if F32:  # the interpreter's tl.dot is wrong for 16-bit operands
            q = q.to(tl.float32)
        do = tl.load(DO + base + offs_m[:, None] * D + offs_d[None, :], mask=qmask, other=0.0)
        if F32:  # the interpreter's tl.dot is wrong for 16-bit operands
            do = do.to(tl.float32)
        lse = tl.load(LSE + rbase + offs_m, mask=offs_m < T, other=0.0)
        delta = tl.load(DELTA + rbase + offs_m, mask=offs_m < T, other=0.0)
        dq = tl.zeros([BLOCK, DP], dtype=tl.float32)
        start = tl.load(ROW_PTR + i)
        end = tl.load(ROW_PTR + i + 1)
        for p in range(start, end):
            j = tl.load(COL_IDX + p)
            offs_n = j * BLOCK + offs_b
            kvmask = (offs_n < T)[:, None] & dmask
            k = tl.load(K + base + offs_n[:, None] * D + offs_d[None, :], mask=kvmask, other=0.0)
            if F32:  # the interpreter's tl.dot is wrong for 16-bit operands
                k = k.to(tl.float32)
            v = tl.load(V + base + offs_n[:, None] * D + offs_d[None, :], mask=kvmask, other=0.0)
            if F32:  # the interpreter's tl.dot is wrong for 16-bit operands
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
            valid = (offs_n < T)[None, :] & (offs_m < T)[:, None]
            if CAUSAL:
                valid = valid & (offs_m[:, None] >= offs_n[None, :])
            pr = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            ds = pr * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
        tl.store(DQ + base + offs_m[:, None] * D + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
                 mask=qmask)

    @triton.jit
    def block_sparse_bwd_dkv(Q, K, V, DO, DK, DV, LSE, DELTA, COL_PTR, ROW_IDX, ORDER, qk_scale, sm_scale, T, D,
                             CAUSAL: tl.constexpr, BLOCK: tl.constexpr, DP: tl.constexpr, F32: tl.constexpr,
                             PREC: tl.constexpr):
        j = tl.load(ORDER + tl.program_id(0))
        base = tl.program_id(1).to(tl.int64) * T * D
        rbase = tl.program_id(1).to(tl.int64) * T
        offs_n = j * BLOCK + tl.arange(0, BLOCK)
        offs_b = tl.arange(0, BLOCK)
        offs_d = tl.arange(0, DP)
        dmask = (offs_d < D)[None, :]
        kvmask = (offs_n < T)[:, None] & dmask
        k = tl.load(K + base + offs_n[:, None] * D + offs_d[None, :], mask=kvmask, other=0.0)
        if F32:  # the interpreter's tl.dot is wrong for 16-bit operands
            k = k.to(tl.float32)
        v = tl.load(V + base + offs_n[:, None] * D + offs_d[None, :], mask=kvmask, other=0.0)
        if F32:  # the interpreter's tl.dot is wrong for 16-bit operands
            v = v.to(tl.float32)
        dk = tl.zeros([BLOCK, DP], dtype=tl.float32)
        dv = tl.zeros([BLOCK, DP], dtype=tl.float32)
        start = tl.load(COL_PTR + j)
        end = tl.load(COL_PTR + j + 1)
        for p in range(start, end):
            i = tl.load(ROW_IDX + p)
            offs_m = i * BLOCK + offs_b
            qmask = (offs_m < T)[:, None] & dmask
            q = tl.load(Q + base + offs_m[:, None] * D + offs_d[None, :], mask=qmask, other=0.0)
            if F32:  # the interpreter's tl.dot is wrong for 16-bit operands
                q = q.to(tl.float32)
            do = tl.load(DO + base + offs_m[:, None] * D + offs_d[None, :], mask=qmask, other=0.0)
            if F32:  # the interpreter's tl.dot is wrong for 16-bit operands
                do = do.to(tl.float32)
            lse = tl.load(LSE + rbase + offs_m, mask=offs_m < T, other=0.0)
            delta = tl.load(DELTA + rbase + offs_m, mask=offs_m < T, other=0.0)
            st = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale  # [keys, queries]
            valid = (offs_n < T)[:, None] & (offs_m < T)[None, :]
            if CAUSAL:
                valid = valid & (offs_m[None, :] >= offs_n[:, None])
            pt = tl.where(valid, tl.exp2(st - lse[None, :]), 0.0)
            dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
            dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(q.dtype), q, input_precision=PREC)
        tl.store(DK + base + offs_n[:, None] * D + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
                 mask=kvmask)
        tl.store(DV + base + offs_n[:, None] * D + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kvmask)

    return block_sparse_fwd, block_sparse_bwd_dq, block_sparse_bwd_dkv


_LOG2E = 1.4426950408889634


def _precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision: exact fp32 products for fp32 inputs (not TF32: fp32 training keeps parity)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _meta(layout: Layout, causal: bool, dp: int, dtype: torch.dtype) -> dict:
    """Compile-time arguments and launch options shared by the three kernels."""
    return dict(CAUSAL=causal, BLOCK=layout.block, DP=dp, F32=interpreted(), PREC=_precision(dtype),
                num_warps=4 if layout.block * dp <= 64 * 64 else 8)


# The kernels run behind two operators registered with torch.library, so a traced training step (the
# step program's AOTAutograd joint graph, Inductor, CUDA graphs) keeps them as single opaque nodes with
# their own backward; eager autograd goes through the same registration.
@torch.library.custom_op("autoshard::block_sparse_attention", mutates_args=())
def _bs_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: str, causal: bool,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward kernel over ``[B·H, T, D]`` contiguous tensors: ``(out, row log-sum-exp base 2)``."""
    layout = parse_attention(spec)
    bh, t, d = q.shape
    row_ptr, col_idx, _, _, row_order, _ = _device_csr(layout, t, causal, str(q.device))
    nb = row_ptr.numel() - 1
    o = torch.empty_like(q)
    lse = torch.empty((bh, t), dtype=torch.float32, device=q.device)
    dp = max(16, next_pow2(d))
    fwd, _, _ = _kernels()
    fwd[(nb, bh)](q, k, v, o, lse, row_ptr, col_idx, row_order, scale * _LOG2E, t, d,
                  **_meta(layout, causal, dp, q.dtype))
    return o, lse


@_bs_forward.register_fake
def _(q, k, v, spec, causal, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:2], dtype=torch.float32)


@torch.library.custom_op("autoshard::block_sparse_attention_backward", mutates_args=())
def _bs_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                 do: torch.Tensor, spec: str, causal: bool,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward kernels: ``(dq, dk, dv)`` from the forward's ``out`` and log-sum-exp."""
    layout = parse_attention(spec)
    bh, t, d = q.shape
    do = do.contiguous()
    delta = (do.float() * o.float()).sum(-1)
    row_ptr, col_idx, col_ptr, row_idx, row_order, col_order = _device_csr(layout, t, causal, str(q.device))
    nb = row_ptr.numel() - 1
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dp = max(16, next_pow2(d))
    _, bwd_dq, bwd_dkv = _kernels()
    meta = _meta(layout, causal, dp, q.dtype)
    bwd_dq[(nb, bh)](q, k, v, do, dq, lse, delta, row_ptr, col_idx, row_order, scale * _LOG2E, scale, t, d, **meta)
    bwd_dkv[(nb, bh)](q, k, v, do, dk, dv, lse, delta, col_ptr, row_idx, col_order, scale * _LOG2E, scale, t, d,
                      **meta)
    return dq, dk, dv


@_bs_backward.register_fake
def _(q, k, v, o, lse, do, spec, causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _bs_setup(ctx, inputs, output) -> None:
    q, k, v, spec, causal, scale = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.spec, ctx.causal, ctx.scale = spec, causal, scale


def _bs_grad(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _bs_backward(q, k, v, o, lse, do, ctx.spec, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None, None


_bs_forward.register_autograd(_bs_grad, setup_context=_bs_setup)


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout | str,
                           causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """Block-sparse attention over ``[..., T, D]`` tensors (``q``, ``k``, ``v`` of one shape).

    Triton kernels or the dense-masked torch reference, as :func:`~autoshard.runtime.kernels.use_triton` says.
    """
    layout = parse_attention(layout)
    if q.shape != k.shape or q.shape != v.shape or q.dim() < 2:
        raise ValueError(f"block-sparse attention needs q, k, v of one shape [..., T, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if use_triton(q) and q.numel() > 0:
        if q.shape[-1] > 256:
            raise ValueError(f"block-sparse attention: head dim {q.shape[-1]} > 256 is not supported by the kernels")
        shape, t, d = q.shape, q.shape[-2], q.shape[-1]
        q3, k3, v3 = (x.reshape(-1, t, d).contiguous() for x in (q, k, v))
        return _bs_forward(q3, k3, v3, layout.spec(), bool(causal), scale)[0].view(shape)
    return block_sparse_reference(q, k, v, layout, causal, scale)


def sdpa_block_sparse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: str, is_causal: bool = False,
                      scale: float | None = None) -> torch.Tensor:
    """What the sparse-attention pass puts in place of ``aten.scaled_dot_product_attention`` (plain args for FX)."""
    return block_sparse_attention(q, k, v, spec, is_causal, scale)


__all__ = ["BLOCKS", "BlockCSR", "Layout", "LayoutError", "block_sparse_attention", "block_sparse_reference",
           "dense_mask", "parse_attention", "sdpa_block_sparse"]
