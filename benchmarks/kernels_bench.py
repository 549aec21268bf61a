"""Fused kernels on one GPU: per-kernel GB/s against the copy ceiling, and the 953M Llama step with fuse on/off.

    python benchmarks/kernels_bench.py                       # H100/H200: kernels, then the end-to-end step
    python benchmarks/kernels_bench.py --only kernels --out kernels.json
    python benchmarks/kernels_bench.py --tiny                # CPU smoke run: tiny shapes, torch references

Per kernel (shapes of the Llama-style 953M model: 4 × 2048 tokens, d=2048, ffn=5632, vocab 32000,
bf16), three implementations of the same region are timed, forward alone and forward + backward:
``autoshard`` (the Triton kernel), ``eager`` (the torch reference: the aten ops eager runs) and
``compile`` (``torch.compile`` of that reference). Achieved bandwidth is the bytes the region must
move at least (each input read once, each output written once; listed per kernel) over the median
time, next to the ceiling: a device-to-device ``copy_`` of 1 GiB (read + write) measured on the
same GPU. The goal is ≥ 80 % of the ceiling for the Triton kernels.

End to end: ``autoshard(model, Mesh(dp=1), precision="bf16", optimizer=AdamW)`` with ``fuse=True``
and ``fuse=False`` (and FusedAdamW with fuse=True), next to ``torch.compile`` of the plain model under
bf16 autocast with torch's fused AdamW; median step time over ``--iters`` steps after warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import socket

import torch

from autoshard.bench import timed  # the one timing loop (median of device-synchronised steps)


def copy_ceiling(device: torch.device, nbytes: int) -> float:
    """Bytes/s of a device-to-device copy (read + write counted), the practical bandwidth ceiling."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), 3, 20, device)
    return 2 * src.numel() * src.element_size() / t


# ----------------------------------------------------------------------------- kernel cases
def _cases(s: dict, device: torch.device, dtype: torch.dtype):
    """(name, make_inputs, fn(inputs) → outputs, fwd_bytes, fwd_bwd_bytes) per kernel family."""
    from autoshard.runtime.kernels import cross_entropy, layernorm, rmsnorm, rotary, softmax, swiglu

    m, d, ffn, vocab, heads = s["tokens"], s["d"], s["ffn"], s["vocab"], s["heads"]
    hd = d // heads
    e = torch.tensor([], dtype=dtype).element_size()

    def leaf(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, device=device) * scale).to(dt).requires_grad_()

    def ang():
        a = torch.rand(s["seq"], hd // 2, device=device) * 6
        return a.cos().to(dtype), a.sin().to(dtype)

    def gelu_chain(x):  # GPT-2's gelu_new written out: a generated kernel
        return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * torch.pow(x, 3.0))))

    target = torch.randint(0, vocab, (m,), device=device)
    cos, sin = ang()
    return [
        ("rmsnorm+residual", lambda: (leaf(m, d), leaf(d), leaf(m, d)),
         lambda x, w, r: rmsnorm.rms_norm(x, w, 1e-5, r), 4 * m * d * e, 8 * m * d * e),
        ("layernorm+residual", lambda: (leaf(m, d), leaf(d), leaf(d), leaf(m, d)),
         lambda x, w, b, r: layernorm.layer_norm(x, w, b, 1e-5, r), 4 * m * d * e, 8 * m * d * e),
        ("softmax", lambda: (leaf(m, 2048, scale=3.0),), lambda x: softmax.softmax(x), 2 * m * 2048 * e,
         5 * m * 2048 * e),
        ("swiglu", lambda: (leaf(m, ffn), leaf(m, ffn)), swiglu.swiglu, 3 * m * ffn * e, 8 * m * ffn * e),
        ("rotary", lambda: (leaf(s["batch"], s["seq"], heads, hd),),
         lambda x: rotary.rotary(x.transpose(1, 2), cos, sin), 2 * m * d * e, 4 * m * d * e),
        ("cross_entropy", lambda: (leaf(m, vocab, scale=3.0),),
         lambda x: cross_entropy.cross_entropy(x, target), m * vocab * e, 3 * m * vocab * e),
        ("pointwise gelu_tanh", lambda: (leaf(m, ffn),), _generated(gelu_chain, (m, ffn), dtype),
         2 * m * ffn * e, 5 * m * ffn * e),
    ]


def _generated(fn, shape, dtype):
    """The generated kernel the fusion pass makes of ``fn`` (captured at a tiny shape: kernels are shape-generic)."""
    from autoshard.passes.capture import capture
    from autoshard.passes.fusion import fuse_graph
    from autoshard.runtime.kernels.pointwise import PointwiseKernel

    class M(torch.nn.Module):
        def forward(self, x):
            return fn(x)

    gm, _ = fuse_graph(capture(M(), (torch.randn(4, 8).to(dtype),)))
    kernel = next(n.target for n in gm.graph.nodes if isinstance(n.target, PointwiseKernel))
    return kernel


def _backend(system: str, device: torch.device) -> str:
    """The kernel backend of a column: references for eager/compile, Triton for autoshard (references on CPU)."""
    return "triton" if system == "autoshard" and device.type == "cuda" else "torch"


def bench_kernels(s: dict, device: torch.device, dtype: torch.dtype, systems: list[str], iters: int) -> list[dict]:
    from autoshard.runtime.kernels import adamw

    ceiling = copy_ceiling(device, s["copy_bytes"])
    print(f"copy ceiling: {ceiling / 1e9:8.1f} GB/s  ({device}, {s['copy_bytes'] / 2**30:.2f} GiB copy)", flush=True)
    rows = []
    for name, make, fn, fwd_bytes, total_bytes in _cases(s, device, dtype):
        for system in systems:
            os.environ["AUTOSHARD_KERNELS"] = _backend(system, device)
            run = torch.compile(fn) if system == "compile" else fn
            xs = make()
            try:
                with torch.no_grad():
                    t_fwd = timed(lambda run=run, xs=xs: run(*xs), 3, iters, device)
                outs = run(*xs)
                outs = outs if isinstance(outs, tuple) else (outs,)
                ups = [torch.randn_like(o) for o in outs]

                def step(run=run, xs=xs, ups=ups):
                    for x in xs:
                        x.grad = None
                    out = run(*xs)
                    out = out if isinstance(out, tuple) else (out,)
                    torch.autograd.backward(out, ups)

                t_all = timed(step, 3, iters, device)
            except Exception as err:  # noqa: BLE001 - one failing system must not hide the others
                print(f"{name:22s} {system:9s} failed: {type(err).__name__}: {str(err)[:200]}", flush=True)
                continue
            row = {"kernel": name, "system": system, "fwd_ms": t_fwd * 1e3, "fwd_bwd_ms": t_all * 1e3,
                   "fwd_gbs": fwd_bytes / t_fwd / 1e9, "fwd_bwd_gbs": total_bytes / t_all / 1e9,
                   "fwd_pct_ceiling": 100 * fwd_bytes / t_fwd / ceiling,
                   "fwd_bwd_pct_ceiling": 100 * total_bytes / t_all / ceiling}
            rows.append(row)
            print(f"{name:22s} {system:9s} fwd {row['fwd_ms']:8.3f} ms {row['fwd_gbs']:8.1f} GB/s "
                  f"({row['fwd_pct_ceiling']:5.1f}%)   fwd+bwd {row['fwd_bwd_ms']:8.3f} ms {row['fwd_bwd_gbs']:8.1f} GB/s "
                  f"({row['fwd_bwd_pct_ceiling']:5.1f}%)", flush=True)
    # AdamW over one flat fp32 shard: read p, g, m, v; write p, m, v
    n = s["adamw_numel"]
    nbytes = 7 * 4 * n
    for system in systems + (["torch_fused"] if device.type == "cuda" else []):
        p, g = torch.randn(n, device=device), torch.randn(n, device=device)
        mo, v = torch.zeros_like(p), torch.zeros_like(p)
        if system == "torch_fused":
            param = torch.nn.Parameter(p)
            param.grad = g
            opt = torch.optim.AdamW([param], lr=1e-4, fused=True)
            fn = opt.step
        else:
            os.environ["AUTOSHARD_KERNELS"] = _backend(system, device)
            ref = torch.compile(adamw.adamw_reference_) if system == "compile" else adamw.fused_adamw_

            def fn(ref=ref, p=p, g=g, mo=mo, v=v):
                ref(p, g, mo, v, 1e-4, 0.9, 0.95, 1e-8, 0.1, 10)
        try:
            t = timed(fn, 3, iters, device)
        except Exception as err:  # noqa: BLE001
            print(f"{'adamw (flat shard)':22s} {system:9s} failed: {type(err).__name__}: {str(err)[:200]}", flush=True)
            continue
        rows.append({"kernel": "adamw", "system": system, "fwd_ms": t * 1e3, "fwd_gbs": nbytes / t / 1e9,
                     "fwd_pct_ceiling": 100 * nbytes / t / ceiling})
        print(f"{'adamw (flat shard)':22s} {system:11s} step {t * 1e3:8.3f} ms {nbytes / t / 1e9:8.1f} GB/s "
              f"({100 * nbytes / t / ceiling:5.1f}%)", flush=True)
    os.environ.pop("AUTOSHARD_KERNELS", None)
    return [{"ceiling_gbs": ceiling / 1e9}] + rows


# ----------------------------------------------------------------------------- end to end
def _single_process_group(device: torch.device) -> None:
    """World size 1 without torchrun: autoshard.Mesh reads torchrun's environment variables."""
    if "RANK" in os.environ:
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})


def bench_e2e(cfg_kw: dict, batch: int, device: torch.device, systems: list[str], iters: int) -> list[dict]:
    import autoshard
    from autoshard.examples.gpt import lm_loss
    from autoshard.examples.llama import Llama, LlamaConfig, num_params
    from autoshard.optim import FusedAdamW

    cfg = LlamaConfig(**cfg_kw)
    torch.manual_seed(0)
    base = Llama(cfg)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), generator=torch.Generator().manual_seed(1))
    _single_process_group(device)
    mesh = autoshard.Mesh(dp=1, device=device)
    precision = "bf16" if device.type == "cuda" else "fp32"
    rows = []

    def run_autoshard(fuse: bool, fused_adam: bool) -> tuple[float, str]:
        opt = (lambda ps: FusedAdamW(ps, lr=1e-4)) if fused_adam else \
            (lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=device.type == "cuda"))
        sm = autoshard.autoshard(base, mesh, example_inputs=(x,), loss_fn=lm_loss, optimizer=opt,
                                 precision=precision, fuse=fuse)
        xd = x.to(device)
        t = timed(lambda: sm.train_step((xd,), xd), 2, iters, device)
        summary = sm.plan.summary()
        sm.close()
        return t, summary

    def run_compile() -> tuple[float, str]:
        model = Llama(cfg)
        model.load_state_dict(base.state_dict())
        model = model.to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        compiled = torch.compile(model)
        xd = x.to(device)

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = lm_loss(compiled(xd), xd)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return timed(step, 3, iters, device), "torch.compile(model), bf16 autocast, fused AdamW"

    table = {
        "fuse": ("autoshard fuse=True", lambda: run_autoshard(True, False)),
        "fuse_fusedadam": ("autoshard fuse=True + FusedAdamW", lambda: run_autoshard(True, True)),
        "nofuse": ("autoshard fuse=False", lambda: run_autoshard(False, False)),
        "compile": ("torch.compile", run_compile),
    }
    tokens = batch * cfg.seq_len
    for key in systems:
        name, fn = table[key]
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            t, what = fn()
        except Exception as err:  # noqa: BLE001
            print(f"{name:34s} failed: {type(err).__name__}: {str(err)[:300]}", flush=True)
            continue
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        rows.append({"system": name, "step_ms": t * 1e3, "tok_s": tokens / t, "peak_gib": peak, "what": what,
                     "params": num_params(cfg)})
        print(f"{name:34s} step {t * 1e3:9.1f} ms  {tokens / t:10,.0f} tok/s  peak {peak:6.2f} GiB   [{what}]",
              flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny shapes, torch reference kernels")
    ap.add_argument("--only", choices=["kernels", "e2e"], default=None)
    ap.add_argument("--kernel-systems", default="autoshard,eager,compile")
    ap.add_argument("--e2e-systems", default="fuse,fuse_fusedadam,nofuse,compile")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not a.tiny else "cpu")
    if a.tiny:
        shapes = {"tokens": 64, "d": 64, "ffn": 96, "vocab": 512, "heads": 4, "batch": 2, "seq": 32,
                  "copy_bytes": 8 << 20, "adamw_numel": 1 << 16}
        cfg = {"vocab_size": 256, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "ffn": 128, "seq_len": 32}
        batch, dtype = 2, torch.float32
        kernel_systems = [s for s in a.kernel_systems.split(",") if s != "compile"]  # no C++ compiler needed
    else:
        shapes = {"tokens": 4 * 2048, "d": 2048, "ffn": 5632, "vocab": 32000, "heads": 16, "batch": 4, "seq": 2048,
                  "copy_bytes": 1 << 30, "adamw_numel": 64 << 20}
        cfg = {"vocab_size": 32000, "d_model": 2048, "n_layers": 16, "n_heads": 16, "n_kv_heads": 16, "ffn": 5632,
               "seq_len": 2048}
        batch, dtype = 4, torch.bfloat16
        kernel_systems = a.kernel_systems.split(",")
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}",
          flush=True)
    out: dict = {"torch": torch.__version__, "tiny": a.tiny}
    if a.only in (None, "kernels"):
        out["kernels"] = bench_kernels(shapes, device, dtype, kernel_systems, a.iters or (3 if a.tiny else 20))
    if a.only in (None, "e2e"):
        e2e_iters = a.iters or (2 if a.tiny else 10)
        systems = [s for s in a.e2e_systems.split(",") if not (a.tiny and s == "compile")]
        out["e2e"] = bench_e2e(cfg, batch, device, systems, e2e_iters)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
