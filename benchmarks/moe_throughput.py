"""Expert parallelism: the MoE GPT with its experts split over ep=4, next to DDP with every expert on every GPU.

    torchrun --nproc-per-node 4 benchmarks/moe_throughput.py [--dim 1024 --layers 8 --experts 8 --seq 1024 --batch 8]
    python benchmarks/moe_throughput.py --cpu            # 4 local CPU ranks (Gloo), tiny sizes: a smoke run

Model: ``examples/moe_gpt.py`` (top-k of E ``ModuleList`` experts looped over by the model's own code),
in ``--dtype`` (default bf16; parameters and optimizer in that dtype for every system, so the
comparison is of parallelism, not precision). Every GPU gets ``--batch`` sequences of ``--seq``
tokens, so tokens/s/GPU compare directly. Systems:

* ``ddp``: the unmodified model under DistributedDataParallel (experts replicated; the model's own
  loop over experts; ``find_unused_parameters`` because an expert may get no token);
* ``autoshard_dp``: autoshard with Mesh(dp=N): experts replicated, tokens never leave the GPU
  (isolates autoshard's MoE runtime from the all-to-all);
* ``autoshard_ep``: autoshard with Mesh(ep=N): E/N experts per GPU, tokens sent to their experts
  and back by all-to-all, local experts as grouped GEMMs.

All-to-all bandwidth: ``all_to_all_single`` over the N ranks, one MoE layer's dispatch
(batch · seq · top_k rows of ``dim`` values per GPU), median of 20; algorithm bandwidth = bytes each
GPU sends to the others / time, compared with NVLink's 450 GB/s per direction per H200 (NVLink 4,
900 GB/s bidirectional). The bytes each GPU really sends per training step over ep come from
``sm.stats()["ep_comm_bytes"]`` (forward and backward), turned into time at the measured bandwidth.
Prints a table on rank 0 and writes JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

from autoshard.bench import timed  # the one timing loop (median of device-synchronised steps)

NVLINK_GBPS = 450.0  # H100/H200 NVLink 4: 900 GB/s bidirectional per GPU


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--ffn", type=int, default=2816, help="hidden size of each expert")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8, help="sequences per GPU")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--systems", default="ddp,autoshard_dp,autoshard_ep")
    ap.add_argument("--cpu", action="store_true", help="Gloo on CPU with tiny sizes (smoke run)")
    ap.add_argument("--nproc", type=int, default=4, help="--cpu without torchrun: local ranks to start")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)
    if a.cpu:
        a.dim, a.layers, a.heads, a.ffn, a.vocab, a.seq, a.batch = 32, 2, 4, 64, 128, 32, 2
        a.dtype, a.warmup, a.iters = "fp32", 1, 2
    return a


def _all_to_all_bandwidth(rows: int, dim: int, dtype: torch.dtype, device: torch.device) -> dict:
    """One MoE dispatch's all-to-all (equal splits), median of 20: GB/s each GPU sends to the others."""
    n = dist.get_world_size()
    rows -= rows % n
    x = torch.randn(rows, dim, dtype=dtype, device=device)
    out = torch.empty_like(x)
    t = timed(lambda: dist.all_to_all_single(out, x), 3, 20, device)
    sent = x.numel() * x.element_size() * (n - 1) / n
    gbps = sent / t / 1e9
    return {"bytes_per_gpu": sent, "seconds": t, "GB_s": gbps, "fraction_of_nvlink": gbps / NVLINK_GBPS}


def run(argv: list[str] | None = None) -> dict | None:
    a = _args(argv)
    import autoshard
    from autoshard.examples.gpt import lm_loss
    from autoshard.examples.moe_gpt import MoEGPT, MoEGPTConfig

    if a.cpu:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
        torch.set_num_threads(1)
    world = int(os.environ["WORLD_SIZE"])
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    cfg = MoEGPTConfig(vocab_size=a.vocab, seq_len=a.seq, d_model=a.dim, n_layers=a.layers, n_heads=a.heads,
                       d_ff=a.ffn, n_experts=a.experts, top_k=a.top_k)
    torch.manual_seed(0)
    base = MoEGPT(cfg).to(dtype)
    params = sum(p.numel() for p in base.parameters())
    expert_params = sum(p.numel() for n, p in base.named_parameters() if ".experts." in n)

    def fresh() -> MoEGPT:
        m = MoEGPT(cfg).to(dtype)
        m.load_state_dict(base.state_dict())
        return m

    rows: list[dict] = []
    extras: dict = {}
    mesh = None
    device = torch.device("cpu")
    for system in a.systems.split(","):
        if system == "ddp":
            if mesh is None:
                mesh = autoshard.Mesh(dp=world)  # joins the process group (NCCL on GPUs) and picks the device
            device = mesh.device
            rank = dist.get_rank()
            x = torch.randint(0, a.vocab, (a.batch, a.seq), generator=torch.Generator().manual_seed(1 + rank)).to(device)
            model = torch.nn.parallel.DistributedDataParallel(
                fresh().to(device), device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=True)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

            def step(model=model, opt=opt, x=x):
                lm_loss(model(x), x).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        else:
            degrees = {"ep": world} if system == "autoshard_ep" else {"dp": world}
            m = autoshard.Mesh(**degrees)
            device = m.device
            rank = dist.get_rank()
            x = torch.randint(0, a.vocab, (a.batch, a.seq), generator=torch.Generator().manual_seed(1 + rank))
            sm = autoshard.autoshard(fresh(), m, example_inputs=(x,), loss_fn=lm_loss,
                                     optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-4))
            x = x.to(device)

            def step(sm=sm, x=x):
                sm.train_step((x,), x)
            model = sm
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = timed(step, a.warmup, a.iters, device)
        row = {"system": system, "tok_s_gpu": a.batch * a.seq / t, "step_s": t,
               "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0}
        if system.startswith("autoshard"):
            st = model.stats()
            row["ep_comm_bytes"] = st.get("ep_comm_bytes", 0.0)
            row["dp_comm_bytes"] = st["dp_comm_bytes"]
            row["local_params"] = sum(p.numel() for p in model.local_parameters().values())
            model.close()
        rows.append(row)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    a2a = _all_to_all_bandwidth(a.batch * a.seq * a.top_k, a.dim, dtype, device)
    extras["all_to_all"] = a2a
    for row in rows:
        if row.get("ep_comm_bytes"):
            row["ep_comm_s_at_measured_bw"] = row["ep_comm_bytes"] / (a2a["GB_s"] * 1e9)
    if dist.get_rank() != 0:
        return None
    print(f"MoE GPT: {params / 1e6:.1f}M params ({expert_params / 1e6:.1f}M in experts), {a.layers} layers, "
          f"top-{a.top_k} of {a.experts} experts, d={a.dim}, ffn={a.ffn}, seq {a.seq}, {a.batch} seqs/GPU, {a.dtype}, "
          f"{world} ranks on {device.type}")
    print(f"{'system':14s} {'tok/s/GPU':>12s} {'step ms':>9s} {'peak GiB':>9s} {'params/GPU':>11s} {'ep MB/step':>11s}")
    for r in rows:
        print(f"{r['system']:14s} {r['tok_s_gpu']:12,.0f} {r['step_s'] * 1e3:9.1f} {r['peak_gib']:9.2f} "
              f"{r.get('local_params', params) / 1e6:10.1f}M {r.get('ep_comm_bytes', 0) / 1e6:11.1f}")
    print(f"all-to-all ({a2a['bytes_per_gpu'] / 1e6:.1f} MB sent per GPU): {a2a['GB_s']:.1f} GB/s per GPU = "
          f"{100 * a2a['fraction_of_nvlink']:.1f}% of NVLink's {NVLINK_GBPS:.0f} GB/s per direction")
    result = {"config": vars(a), "params": params, "expert_params": expert_params, "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "world": world,
              "rows": rows, "extras": extras}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


def _launched(argv: list[str]) -> dict | None:
    return run(argv)


if __name__ == "__main__":
    import sys

    if "RANK" in os.environ:
        run()
    else:  # --cpu smoke run without torchrun
        import autoshard

        a = _args()
        if not a.cpu:
            raise SystemExit("run under torchrun (--nproc-per-node 4), or pass --cpu for a local smoke run")
        autoshard.launch(_launched, a.nproc, sys.argv[1:], device="cpu")
