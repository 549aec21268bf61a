"""ZeRO + bf16 throughput on the Llama-style 953M model, next to DDP and FSDP2, in one torchrun job.

    torchrun --nproc-per-node 4 benchmarks/zero_throughput.py [--dim 2048 --layers 16 --seq 2048 --batch 4]

Same model (examples/llama.py), data, fused AdamW. Peers use bf16 autocast (DDP) or FSDP2's bf16
MixedPrecisionPolicy (eager, and with each block torch.compile'd as torchtitan does); autoshard uses
bf16 compute copies with fp32 master weights. 2 warm-up steps (more for compiled peers), median of
timed steps, CUDA-synchronised; peak memory from torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from harness import Results, llama_parser, timed

import autoshard
from autoshard.examples.gpt import lm_loss
from autoshard.examples.llama import Llama, LlamaConfig, num_params


def main() -> None:
    ap = llama_parser(__doc__, 4, "sequences per GPU", 6)
    ap.add_argument("--systems", default="ddp,fsdp2,fsdp2_compile,as_z1,as_z2")
    a = ap.parse_args()
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl")
    world, rank = dist.get_world_size(), dist.get_rank()
    cfg = LlamaConfig(vocab_size=a.vocab, d_model=a.d, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.heads,
                      ffn=a.ffn, seq_len=a.seq)
    torch.manual_seed(0)
    base = Llama(cfg)
    n = num_params(cfg)
    flops_tok = 6 * n + 12 * a.layers * a.d * a.seq
    g = torch.Generator().manual_seed(1 + rank)
    x = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g)
    results = Results(flops_tok, vars(a), n)

    def report(system: str, t: float) -> None:
        results.add(system, a.batch * a.seq, t)

    def fresh() -> Llama:
        m = Llama(cfg)
        m.load_state_dict(base.state_dict())
        return m.cuda()

    def run_ddp() -> float:
        model = torch.nn.parallel.DistributedDataParallel(fresh(), device_ids=[local])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        xc = x.cuda()

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = lm_loss(model(xc), xc)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return timed(step, 2, a.iters)

    def run_fsdp2(compile_blocks: bool) -> float:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        model = fresh()
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for i, block in enumerate(model.layers):
            if compile_blocks:
                block.compile()
            fully_shard(block, mp_policy=mp, reshard_after_forward=i < len(model.layers) - 1)
        fully_shard(model, mp_policy=mp)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        xc = x.cuda()

        def step():
            loss = lm_loss(model(xc), xc)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return timed(step, 4 if compile_blocks else 2, a.iters)

    def run_autoshard(zero: int, prefetch: int = 1) -> float:
        mesh = autoshard.Mesh(dp=world)
        sm = autoshard.autoshard(base, mesh, example_inputs=(x,), loss_fn=lm_loss,
                                 optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True),
                                 zero=zero, precision="bf16", prefetch=prefetch)
        t = timed(lambda: sm.train_step((x,), x), 2, a.iters)
        mem = sm.plan.memory
        predicted = sum(mem.get(k, 0) for k in ("params", "grads", "optimizer", "buffers", "activations",
                                                 "params_gathered"))
        measured = torch.cuda.max_memory_allocated()
        results.extra(f"autoshard zero{zero}", {"predicted_peak_gib": predicted / 2**30,
                                                "measured_peak_gib": measured / 2**30,
                                                "terms_gib": {k: v / 2**30 for k, v in mem.items()}})
        if rank == 0:
            print(sm.plan.summary(), {k: f"{v / 2**30:.2f} GiB" for k, v in mem.items()},
                  f"predicted peak {predicted / 2**30:.2f} GiB, measured {measured / 2**30:.2f}",
                  flush=True)
        sm.close()  # free it now, so the next system's peak memory starts clean
        return t

    systems = {
        "ddp": (f"DDP x{world} (bf16 autocast)", run_ddp),
        "fsdp2": (f"FSDP2 x{world} (bf16 MP)", lambda: run_fsdp2(False)),
        "fsdp2_compile": (f"FSDP2 x{world} + block compile", lambda: run_fsdp2(True)),
        "as_z1": (f"autoshard dp{world} zero1 bf16", lambda: run_autoshard(1)),
        "as_z2": (f"autoshard dp{world} zero2 bf16", lambda: run_autoshard(2)),
        "as_z3": (f"autoshard dp{world} zero3 bf16", lambda: run_autoshard(3)),
        "as_z3p2": (f"autoshard dp{world} zero3 bf16 prefetch2", lambda: run_autoshard(3, 2)),
    }
    for key in a.systems.split(","):
        name, fn = systems[key]
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        report(name, fn())
    results.write(a.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
