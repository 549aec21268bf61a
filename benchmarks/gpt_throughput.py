"""Throughput of the GPT example: autoshard plans next to PyTorch DDP, in one torchrun job.

    torchrun --nproc-per-node 4 benchmarks/gpt_throughput.py [--dim 1024 --layers 8 --seq 1024 --batch 8]

Same model, data, fp32 weights with TF32 matmuls, AdamW, for every system. Warm-up steps, then the
median of timed steps (CUDA-synchronised). Reports tokens/s/GPU, MFU (6N + 12·L·d·seq FLOPs per token
over 989 TFLOP/s, the bf16 dense peak used for all figures in RESULTS.md) and peak memory.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from harness import Results, timed

import autoshard
from autoshard.examples.gpt import GPT, GPTConfig, lm_loss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", dest="d", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8, help="sequences per data-parallel slice")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = GPTConfig(vocab_size=a.vocab, seq_len=a.seq, d_model=a.d, n_layers=a.layers, n_heads=a.heads, d_ff=4 * a.d)
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl")
    torch.manual_seed(0)
    base = GPT(cfg)
    n_params = sum(p.numel() for p in base.parameters())
    flops_tok = 6 * n_params + 12 * a.layers * a.d * a.seq
    results = Results(flops_tok, vars(a), n_params)

    def report(system: str, seqs_per_step_global: int, t: float) -> None:
        results.add(system, seqs_per_step_global * a.seq / world, t)

    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g)

    def run_ddp() -> float:
        model = GPT(cfg).cuda()
        model.load_state_dict(base.state_dict())
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local])
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-4, fused=True)
        xc = x.cuda()

        def step():
            loss = lm_loss(ddp(xc), xc)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return timed(step, 3, a.iters)

    def run_autoshard(mesh) -> float:
        sm = autoshard.autoshard(base, mesh, example_inputs=(x,), loss_fn=lm_loss,
                                 optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True))
        return timed(lambda: sm.train_step((x,), x), 3, a.iters)

    torch.cuda.reset_peak_memory_stats()
    report(f"DDP x{world}", a.batch * world, run_ddp())
    torch.cuda.empty_cache()
    for degrees in ({"dp": world}, {"dp": world // 2, "tp": 2}, {"tp": world}):
        torch.cuda.reset_peak_memory_stats()
        mesh = autoshard.Mesh(**degrees)
        name = "autoshard " + "x".join(f"{k}{v}" for k, v in degrees.items())
        report(name, a.batch * mesh.data_size, run_autoshard(mesh))
        torch.cuda.empty_cache()
    results.write(a.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
