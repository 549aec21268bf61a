"""Templated kernels against their torch references, under Triton's CPU interpreter.

Every kernel runs with ``AUTOSHARD_KERNELS=triton`` and ``TRITON_INTERPRET=1`` on fresh random
inputs with odd sizes (masked tails, rows that do not fill a tile), forward and backward, in fp32
and bf16. The reference is evaluated in fp32 on the same (rounded) inputs; bf16 results are
compared with bf16's resolution.
"""

from __future__ import annotations

import os

# Triton decorates its own language functions when triton.language is first imported, in the mode
# TRITON_INTERPRET says then: set it at collection, before any test (or torch.compile) imports Triton.
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton.language")

from autoshard.runtime import kernels  # noqa: E402
from autoshard.runtime.kernels import adamw, cross_entropy, layernorm, rmsnorm, rotary, softmax, swiglu  # noqa: E402

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    monkeypatch.setenv("AUTOSHARD_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _leaf(shape, dtype, gen, scale=1.0, shift=0.0, grad=True):
    t = (torch.randn(shape, generator=gen) * scale + shift).to(dtype)
    return t.requires_grad_(grad)


def _compare(fn, ref, inputs, dtype, seed=0):
    """Run ``fn`` (Triton) and ``ref`` (fp32 reference on the same values); compare outputs and gradients."""
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(seed + 7)
    ups = [torch.randn(o.shape, generator=gen) for o in outs]
    sum((o.float() * u).sum() for o, u in zip(outs, ups)).backward()
    tens = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    got = [x.grad.clone() for x in tens]
    for x in tens:
        x.grad = None
    ref_in = [x.detach().float().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) and
              x.is_floating_point() else x for x in inputs]
    routs = ref(*ref_in)
    routs = routs if isinstance(routs, tuple) else (routs,)
    sum((o.float() * u).sum() for o, u in zip(routs, ups)).backward()
    want = [x.grad for x in ref_in if isinstance(x, torch.Tensor) and x.requires_grad]
    for o, r in zip(outs, routs):
        torch.testing.assert_close(o.float(), r.float(), **TOL[dtype])
    for g, w, x in zip(got, want, tens):
        assert g.dtype == x.dtype and g.shape == x.shape
        torch.testing.assert_close(g.float(), w.float(), **TOL[dtype])


DTYPES = [torch.float32, torch.bfloat16]


# ----------------------------------------------------------------------------- norms
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("shape", [(3, 5, 37), (130, 24)], ids=["3x5x37", "130x24"])
def test_rmsnorm(dtype, residual, shape):
    g = torch.Generator().manual_seed(1)
    x, w = _leaf(shape, dtype, g), _leaf(shape[-1:], dtype, g, 0.3, 1.0)
    r = _leaf(shape, dtype, g) if residual else None
    _compare(lambda x, w, r: rmsnorm.rms_norm(x, w, 1e-5, r), lambda x, w, r: rmsnorm.rms_norm_reference(x, w, 1e-5, r),
             (x, w, r), dtype)


def test_rmsnorm_without_weight_and_unused_outputs():
    g = torch.Generator().manual_seed(2)
    x, r = _leaf((4, 19), torch.float32, g), _leaf((4, 19), torch.float32, g)
    y, h = rmsnorm.rms_norm(x, None, 1e-6, r)
    y.sum().backward()  # h's gradient never arrives: only y's path counts
    want_x = x.detach().clone().requires_grad_()
    want_r = r.detach().clone().requires_grad_()
    rmsnorm.rms_norm_reference(want_x, None, 1e-6, want_r)[0].sum().backward()
    torch.testing.assert_close(x.grad, want_x.grad, **TOL[torch.float32])
    torch.testing.assert_close(r.grad, want_r.grad, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_layernorm(dtype, residual):
    g = torch.Generator().manual_seed(3)
    x, w, b = _leaf((2, 9, 45), dtype, g, 2.0, 0.5), _leaf((45,), dtype, g, 0.3, 1.0), _leaf((45,), dtype, g, 0.1)
    r = _leaf((2, 9, 45), dtype, g) if residual else None
    _compare(lambda x, w, b, r: layernorm.layer_norm(x, w, b, 1e-5, r),
             lambda x, w, b, r: layernorm.layer_norm_reference(x, w, b, 1e-5, r), (x, w, b, r), dtype)


def test_layernorm_weight_gradient_is_reduced_over_many_programs():
    """More rows than programs: each program accumulates several row tiles of dw/db before the sum."""
    g = torch.Generator().manual_seed(4)
    x, w, b = _leaf((3000, 8), torch.float32, g), _leaf((8,), torch.float32, g), _leaf((8,), torch.float32, g)
    _compare(lambda x, w, b: layernorm.layer_norm(x, w, b, 1e-5), lambda x, w, b: layernorm.layer_norm_reference(x, w, b, 1e-5),
             (x, w, b), torch.float32)


# ----------------------------------------------------------------------------- softmax, swiglu, rotary
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(3, 7, 33), (3, 9001)], ids=["tile", "streamed"])
def test_softmax(dtype, shape):
    g = torch.Generator().manual_seed(5)
    x = _leaf(shape, dtype, g, 3.0)
    _compare(softmax.softmax, lambda x: softmax.softmax_reference(x), (x,), dtype)


def test_softmax_to_fp32_from_bf16():
    x = torch.randn(5, 17).to(torch.bfloat16)
    y = softmax.softmax(x, torch.float32)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, torch.softmax(x.float(), -1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_swiglu(dtype):
    g = torch.Generator().manual_seed(6)
    a, b = _leaf((3, 5, 77), dtype, g, 2.0), _leaf((3, 5, 77), dtype, g)
    _compare(swiglu.swiglu, swiglu.swiglu_reference, (a, b), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_rotary_on_a_transposed_view(dtype):
    """x is (batch, heads, seq, head_dim) as a transpose of a projection's output: read through its strides."""
    g = torch.Generator().manual_seed(7)
    base = _leaf((2, 7, 3, 10), dtype, g)  # (b, t, h, hd)
    ang = torch.rand(7, 5, generator=g) * 6
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)

    def fused(base):
        return rotary.rotary(base.transpose(1, 2), cos, sin)

    def ref(base):
        return rotary.rotary_reference(base.transpose(1, 2), cos.float(), sin.float())

    _compare(fused, ref, (base,), dtype)


def test_rotary_table_gradients():
    g = torch.Generator().manual_seed(8)
    x = _leaf((1, 2, 5, 6), torch.float32, g)
    cos, sin = _leaf((5, 3), torch.float32, g), _leaf((5, 3), torch.float32, g)
    _compare(rotary.rotary, rotary.rotary_reference, (x, cos, sin), torch.float32)


# ----------------------------------------------------------------------------- cross-entropy
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_cross_entropy(dtype, reduction, monkeypatch):
    monkeypatch.setattr(cross_entropy, "BLOCK_V", 256)  # several chunks per row under the interpreter too
    monkeypatch.setattr(cross_entropy, "_block", lambda v: 256)
    g = torch.Generator().manual_seed(9)
    logits = _leaf((13, 1001), dtype, g, 3.0)
    target = torch.randint(0, 1001, (13,), generator=g)
    target[[2, 7]] = -100

    def fused(x):
        return cross_entropy.cross_entropy(x, target, reduction=reduction)

    def ref(x):
        return cross_entropy.cross_entropy_reference(x, target, reduction=reduction)

    _compare(fused, ref, (logits,), dtype)


def test_cross_entropy_keeps_the_logits_dtype_in_backward():
    logits = torch.randn(4, 300, dtype=torch.bfloat16, requires_grad=True)
    loss = cross_entropy.cross_entropy(logits, torch.tensor([1, 299, 0, 5]))
    assert loss.dtype == torch.float32
    loss.backward()
    assert logits.grad.dtype == torch.bfloat16


def test_cross_entropy_vocab_parallel_statistics_combine_to_the_full_loss():
    """Simulated split over 3 vocab shards: per-shard (max, sumexp, target logit) combined as the all-reduces do."""
    g = torch.Generator().manual_seed(10)
    logits = torch.randn(11, 999, generator=g) * 4
    target = torch.randint(0, 999, (11,), generator=g)
    mx, s, xt = [], [], []
    for r in range(3):
        shard = logits[:, r * 333:(r + 1) * 333].contiguous()
        m_r, s_r, t_r = cross_entropy.row_stats(shard, target, r * 333, triton=True)
        m_t, s_t, t_t = cross_entropy.row_stats(shard, target, r * 333, triton=False)
        torch.testing.assert_close(m_r, m_t)
        torch.testing.assert_close(s_r, s_t, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(t_r, t_t)
        mx.append(m_r), s.append(s_r), xt.append(t_r)
    top = torch.stack(mx).amax(0)  # all-reduce MAX
    total = sum(s_r * torch.exp(m_r - top) for s_r, m_r in zip(s, mx))  # all-reduce SUM of rescaled sums
    loss = (top + torch.log(total) - sum(xt)).mean()
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, target), rtol=1e-6, atol=1e-6)


def _vocab_parallel_worker(seed: int) -> dict:
    import os

    os.environ["AUTOSHARD_KERNELS"] = "triton"
    os.environ["TRITON_INTERPRET"] = "1"
    import autoshard
    from autoshard.runtime import collectives as C

    mesh = autoshard.Mesh(tp=2)
    C.register_group(mesh.group("tp"))  # as ShardedModule does: collectives find the group by its key
    key = mesh.group("tp").name
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(9, 130, generator=g) * 3
    target = torch.randint(0, 130, (9,), generator=g)
    target[4] = -100
    full = logits.clone().requires_grad_()
    want = torch.nn.functional.cross_entropy(full, target)
    want.backward()
    r = mesh.coord("tp")
    shard = logits[:, r * 65:(r + 1) * 65].clone().requires_grad_()
    loss = cross_entropy.cross_entropy(shard, target, group=key)
    loss.backward()
    return {"loss": float(loss), "want": float(want),
            "grad_err": float((shard.grad - full.grad[:, r * 65:(r + 1) * 65]).abs().max())}


def test_cross_entropy_vocab_parallel_over_two_gloo_ranks():
    import autoshard

    for res in autoshard.launch(_vocab_parallel_worker, 2, 11, device="cpu"):
        assert abs(res["loss"] - res["want"]) <= 1e-5 * abs(res["want"])
        assert res["grad_err"] < 1e-6


# ----------------------------------------------------------------------------- AdamW
def test_fused_adamw_matches_torch_adamw_on_a_flat_shard():
    g = torch.Generator().manual_seed(12)
    p0 = torch.randn(1001, generator=g)
    ours = p0.clone()
    m, v = torch.zeros_like(ours), torch.zeros_like(ours)
    theirs = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([theirs], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for step in range(1, 4):
        grad = torch.randn(1001, generator=g)
        adamw.fused_adamw_(ours, grad, m, v, 1e-2, 0.9, 0.95, 1e-8, 0.1, step)
        theirs.grad = grad.clone()
        opt.step()
        torch.testing.assert_close(ours, theirs.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(m, opt.state[theirs]["exp_avg"], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(v, opt.state[theirs]["exp_avg_sq"], rtol=1e-6, atol=1e-10)


def test_fused_adamw_optimizer_trains_like_torch_adamw():
    from autoshard.optim import FusedAdamW

    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    b = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    b.load_state_dict(a.state_dict())
    oa = FusedAdamW(a.parameters(), lr=1e-2, weight_decay=0.01, eps=1e-6)
    ob = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.01, eps=1e-6)
    for step in range(4):
        x = torch.randn(6, 7, generator=torch.Generator().manual_seed(step))
        for model, opt in ((a, oa), (b, ob)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    assert set(oa.state[next(a.parameters())]) == {"step", "exp_avg", "exp_avg_sq"}
    assert float(oa.state[next(a.parameters())]["step"]) == 4.0


# ----------------------------------------------------------------------------- backend switch
def test_backend_switch(monkeypatch):
    x = torch.randn(4, 8)
    assert kernels.use_triton(x)  # forced by the fixture
    monkeypatch.setenv("AUTOSHARD_KERNELS", "torch")
    assert not kernels.use_triton(x)
    monkeypatch.setattr(swiglu, "_kernels", lambda: pytest.fail("the torch backend must not launch Triton"))
    torch.testing.assert_close(swiglu.swiglu(x, x), swiglu.swiglu_reference(x, x))
    monkeypatch.setenv("AUTOSHARD_KERNELS", "auto")
    assert not kernels.use_triton(x)  # auto: the reference on CPU tensors
    monkeypatch.setenv("AUTOSHARD_KERNELS", "cuda")
    with pytest.raises(kernels.KernelError, match="auto, triton, torch"):
        kernels.use_triton(x)
