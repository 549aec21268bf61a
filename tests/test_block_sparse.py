"""Block-sparse attention: layouts, Triton kernels against the dense-masked reference, the pass, the plan.

Kernels run with ``AUTOSHARD_KERNELS=triton`` under ``TRITON_INTERPRET=1`` on CPU, forward and
backward, at a sequence length that is not a multiple of the block (masked tail) and a head dim that
is not a power of two (padded), causal and not, fp32 and bf16. The pass is checked by parity: a model
trained with ``attention=...`` equals the same model whose sdpa is replaced by the reference.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton.language (see test_kernels.py)

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from autoshard.runtime.kernels import block_sparse as bs  # noqa: E402
from autoshard.runtime.plan import Plan  # noqa: E402

SPEC = "block_sparse(block=16, local=2, global=1, random=1)"


# ----------------------------------------------------------------------------- layout
def test_layout_counts_and_density():
    lay = bs.Layout(block=16, local=3, n_global=1)
    nb = 10
    m = lay.mask_blocks(nb, causal=False)
    # interior row: 2·3-1 window blocks + global column 0
    assert m[5].sum() == 5 + 1 and m[5, 3:8].all() and m[5, 0]
    assert m[0].all() and m[:, 0].all()  # global row and column
    mc = lay.mask_blocks(nb, causal=True)
    assert not torch.triu(mc, 1).any()  # nothing above the diagonal
    assert mc[5].sum() == 3 + 1 and mc[5, 3:6].all()
    csr = lay.csr(nb * 16 - 5, causal=True)  # odd length: still 10 blocks
    assert csr.n_blocks == nb and csr.nnz == int(mc.sum())
    assert csr.density(True) == pytest.approx(int(mc.sum()) / (nb * (nb + 1) / 2))
    # CSR rows are sorted, and the transposed CSR holds the same pairs
    pairs = {(i, int(j)) for i in range(nb) for j in csr.col_idx[csr.row_ptr[i]:csr.row_ptr[i + 1]]}
    tpairs = {(int(i), j) for j in range(nb) for i in csr.row_idx[csr.col_ptr[j]:csr.col_ptr[j + 1]]}
    assert pairs == tpairs == {tuple(p) for p in mc.nonzero().tolist()}
    for i in range(nb):
        row = csr.col_idx[csr.row_ptr[i]:csr.row_ptr[i + 1]]
        assert torch.equal(row, row.sort().values)


def test_random_and_strided_blocks():
    base = bs.Layout(block=16, local=1, n_global=0)
    rnd = bs.Layout(block=16, local=1, n_global=0, n_random=2, seed=3)
    m0, m1 = base.mask_blocks(12, False), rnd.mask_blocks(12, False)
    assert (m1.sum(1) == m0.sum(1) + 2).all() and (m1 >= m0).all()
    assert torch.equal(m1, bs.Layout(block=16, local=1, n_global=0, n_random=2, seed=3).mask_blocks(12, False))
    assert not torch.equal(m1, bs.Layout(block=16, local=1, n_global=0, n_random=2, seed=4).mask_blocks(12, False))
    mc = rnd.mask_blocks(12, True)
    assert not torch.triu(mc, 1).any()
    st = bs.Layout(block=16, local=1, n_global=0, stride=4).mask_blocks(12, False)
    assert st[0, 3] and st[0, 7] and st[0, 11] and not st[0, 5]


def test_dense_mask_matches_blocks_and_causal_triangle():
    lay = bs.parse_attention(SPEC)
    t = 37
    mask = bs.dense_mask(lay, t, causal=True)
    assert mask.shape == (t, t) and not torch.triu(mask, 1).any() and mask.diagonal().all()
    blocks = lay.csr(t, True).mask
    assert bool(mask[20, 5]) == bool(blocks[1, 0])


@pytest.mark.parametrize("spec, message", [
    ("dense", "expected 'block_sparse("),
    ("block_sparse(block=48)", "block=48"),
    ("block_sparse(local=0)", "local=0"),
    ("block_sparse(window=3)", "unknown or malformed entry 'window=3'"),
    ("block_sparse(block=64, block=32)", "block given twice"),
    ("block_sparse(global=x)", "global='x' is not an integer"),
    ("block_sparse(random=-1)", "random=-1"),
])
def test_bad_specs(spec, message):
    with pytest.raises(bs.LayoutError, match=None) as err:
        bs.parse_attention(spec)
    assert message in str(err.value)


def test_spec_round_trip():
    lay = bs.parse_attention("block_sparse( block = 32 ,local=4, global=2, random=1, stride=8, seed=5 )")
    assert lay == bs.Layout(32, 4, 2, 1, 8, 5) and bs.parse_attention(lay.spec()) == lay
    assert bs.parse_attention("block_sparse()") == bs.Layout()


# ----------------------------------------------------------------------------- kernels
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape, spec", [((2, 2, 80, 24), SPEC),
                                         ((1, 3, 61, 64), "block_sparse(block=32, local=1, global=0, stride=2)")],
                         ids=["t80-d24-b16", "t61-d64-b32"])
def test_kernel_matches_reference(shape, spec, causal, dtype, monkeypatch):
    monkeypatch.setenv("AUTOSHARD_KERNELS", "triton")
    lay = bs.parse_attention(spec)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g).to(dtype).requires_grad_() for _ in range(3))
    out = bs.block_sparse_attention(q, k, v, lay, causal)
    assert out.dtype == dtype and out.shape == q.shape
    up = torch.randn(shape, generator=g)
    (out.float() * up).sum().backward()
    ref_in = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref = bs.block_sparse_reference(*ref_in, lay, causal)
    (ref * up).sum().backward()
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])
    for x, r in zip((q, k, v), ref_in):
        assert x.grad.dtype == dtype
        torch.testing.assert_close(x.grad.float(), r.grad, **TOL[dtype])


def test_full_layout_equals_dense_sdpa(monkeypatch):
    """A layout that covers every block is ordinary attention: the kernel equals F.sdpa."""
    monkeypatch.setenv("AUTOSHARD_KERNELS", "triton")
    lay = bs.Layout(block=16, local=8)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 50, 16, generator=g) for _ in range(3))
    for causal in (False, True):
        torch.testing.assert_close(bs.block_sparse_attention(q, k, v, lay, causal, scale=0.3),
                                   F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=0.3),
                                   rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- pass and plan
def _gpt(seq=64):
    from autoshard.examples.gpt import make_model

    return make_model(vocab_size=64, seq_len=seq, d_model=32, n_heads=2, d_ff=64, n_layers=2)


def _tokens(step, batch=2, seq=64):
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(100 + step))


def _loss(logits, tokens):
    return F.cross_entropy(logits[:, :-1].reshape(-1, 64), tokens[:, 1:].reshape(-1))


def test_pass_replaces_sdpa_and_reports():
    from autoshard.passes.capture import capture
    from autoshard.passes.sparse_attention import sparse_attention_graph

    model = _gpt()
    x = _tokens(0)
    gm, report = sparse_attention_graph(capture(model, (x,)), SPEC)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.scaled_dot_product_attention.default not in targets
    assert targets.count(bs.sdpa_block_sparse) == 2
    assert len(report["replaced"]) == 2 and not report["rejected"]
    r = report["replaced"][0]
    assert r["causal"] and r["blocks"] == 4 and 0 < r["density"] <= 1
    assert report["grid"][0] == "#..." and len(report["grid"]) == 4
    with torch.no_grad():
        want = _reference_model_output(model, x)
        torch.testing.assert_close(gm(x), want, rtol=1e-5, atol=1e-5)


def _reference_model_output(model, x):
    orig = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _masked_sdpa
    try:
        return model(x)
    finally:
        F.scaled_dot_product_attention = orig


def _masked_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return bs.block_sparse_reference(q, k, v, bs.parse_attention(SPEC), is_causal, scale)


def test_pass_refuses_mask_and_dropout():
    from autoshard.passes.capture import capture
    from autoshard.passes.sparse_attention import sparse_attention_graph

    class Attn(torch.nn.Module):
        def forward(self, q, k, v, m):
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
            b = F.scaled_dot_product_attention(q, k, v, dropout_p=0.1)
            return a + b + F.scaled_dot_product_attention(q, k, v)

    q = torch.randn(1, 2, 32, 16)
    m = torch.ones(32, 32, dtype=torch.bool)
    _, report = sparse_attention_graph(capture(Attn(), (q, q, q, m)), SPEC)
    reasons = sorted(r["reason"] for r in report["rejected"])
    assert len(report["replaced"]) == 1 and len(reasons) == 2
    assert "dropout" in reasons[0] and "attn_mask" in reasons[1]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_training_parity_with_masked_reference(backend, monkeypatch):
    """autoshard(attention=...) trains exactly like the model with sdpa replaced by the dense-masked reference."""
    import autoshard

    monkeypatch.setenv("AUTOSHARD_KERNELS", backend)
    steps = 3
    # with the torch backend, the fusion pass runs after this one (their composition is part of the check)
    sm = autoshard.autoshard(_gpt(), autoshard.Mesh(), example_inputs=(_tokens(0),), loss_fn=_loss,
                             optimizer=lambda ps: torch.optim.SGD(ps, lr=0.5), attention=SPEC,
                             fuse=backend == "torch")
    losses = [sm.train_step((_tokens(s),), _tokens(s)) for s in range(steps)]
    _check_against_reference(losses, sm.full_state_dict(), steps)
    if backend == "triton":  # the kernels are custom ops: the step program keeps them, forward and backward
        assert sm.executor == "step-program"
        (prog,) = sm._step_programs.values()
        targets = {str(n.target) for n in prog.gm.graph.nodes if n.op == "call_function"}
        assert {"autoshard.block_sparse_attention.default",
                "autoshard.block_sparse_attention_backward.default"} <= targets, sorted(targets)
    att = sm.plan.attention
    assert att["spec"] == bs.parse_attention(SPEC).spec() and len(att["replaced"]) == 2
    text = sm.plan.explain()
    assert "Block-sparse attention" in text and "density" in text and "#" in text
    assert "2 block-sparse attention nodes" in sm.plan.summary()


def _check_against_reference(losses, state, steps):
    ref = _gpt()
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    ref_losses = []
    for s in range(steps):
        loss = _loss(_reference_model_output(ref, _tokens(s)), _tokens(s))
        opt.zero_grad()
        loss.backward()
        opt.step()
        ref_losses.append(loss.item())
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    for name, p in ref.state_dict().items():
        err = float((state[name].double() - p.double()).norm() / p.double().norm().clamp_min(1e-12))
        assert err < 1e-5, (name, err)


def _tp_worker(steps):
    """One rank of a tp=2 run with block-sparse attention (heads sharded: one local head per rank)."""
    import autoshard

    mesh = autoshard.Mesh(tp=2)
    sm = autoshard.autoshard(_gpt(), mesh, example_inputs=(_tokens(0),), loss_fn=_loss,
                             optimizer=lambda ps: torch.optim.SGD(ps, lr=0.5), attention=SPEC)
    losses = [sm.train_step((_tokens(s),), _tokens(s)) for s in range(steps)]
    state = sm.full_state_dict()
    shapes = [(r["shape"], r["placement"]) for r in sm.plan.attention["replaced"]]
    assert sm.executor == "step-program"
    return (losses, state, shapes) if mesh.rank == 0 else None


def test_composes_with_tensor_parallel(monkeypatch):
    """tp=2 on Gloo, Triton kernels under the interpreter: the sharded run equals the masked reference."""
    import autoshard

    monkeypatch.setenv("AUTOSHARD_KERNELS", "triton")
    steps = 2
    losses, state, shapes = autoshard.launch(_tp_worker, 2, steps, device="cpu")[0]
    assert shapes == [([2, 2, 64, 16], "S(1)")] * 2  # global shape; heads sharded: one per tp rank
    _check_against_reference(losses, state, steps)


def test_plan_attention_round_trip_and_fingerprint():
    plan = Plan(mesh={"pp": 1, "dp": 1, "ep": 1, "tp": 1})
    plain = plan.fingerprint
    assert Plan(mesh=dict(plan.mesh), attention={}).fingerprint == plain  # empty field: fingerprint unchanged
    rep = {"spec": SPEC, "layout": bs.parse_attention(SPEC).to_dict(), "replaced": [], "rejected": [], "grid": []}
    with_att = Plan(mesh=dict(plan.mesh), attention=rep)
    assert with_att.fingerprint != plain
    back = Plan.from_json(with_att.to_json())
    assert back.attention == rep and back.fingerprint == with_att.fingerprint


def test_bad_spec_fails_at_plan_time():
    import autoshard
    from autoshard.runtime.errors import PlanError

    with pytest.raises(PlanError, match="block=48"):
        autoshard.autoshard(_gpt(), autoshard.Mesh(), example_inputs=(_tokens(0),), loss_fn=_loss,
                            attention="block_sparse(block=48)")


def test_viz_draws_the_layout():
    from autoshard.viz import build_view, lower, render_html

    low = lower(_gpt(), {"tp": 2}, (_tokens(0),), loss_fn=_loss, attention=SPEC)
    html = render_html(build_view(low))
    card = html[html.index('id="attention"'):]
    assert "block_sparse(block=16" in card and card.count('fill="#2563eb"') == sum(
        row.count("#") for row in low.plan.attention["grid"])
