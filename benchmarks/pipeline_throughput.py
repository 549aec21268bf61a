"""Pipeline throughput on a Llama-style model: autoshard's schedules next to torch.distributed.pipelining.

    torchrun --nproc-per-node 4 benchmarks/pipeline_throughput.py [--dim 2048 --layers 16 --seq 2048]

Same model (examples/llama.py), global batch, microbatches, fp32 weights with TF32 matmuls and AdamW
for every system. The peer is ``torch.distributed.pipelining`` with ``Schedule1F1B`` over manual
splits at the same block boundaries. Median of timed steps after warm-up, CUDA-synchronised.
"""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
import torch.nn as nn
from harness import Results, llama_parser, timed

import autoshard
from autoshard.examples.gpt import lm_loss
from autoshard.examples.llama import Llama, LlamaConfig, num_params


class _Stage(nn.Module):
    """A manual pipeline stage of examples/llama.py for the torch.distributed.pipelining peer."""

    def __init__(self, model: Llama, lo: int, hi: int, first: bool, last: bool) -> None:
        super().__init__()
        self.embed = model.embed if first else None
        self.layers = nn.ModuleList(model.layers[lo:hi])
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        if self.lm_head is not None:
            x = self.lm_head(self.norm(x))
        return x


def main() -> None:
    ap = llama_parser(__doc__, 8, "sequences per step (global)", 5)
    ap.add_argument("--microbatches", type=int, default=8)
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
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
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g)
    results = Results(flops_tok, vars(a), n)

    def report(system: str, t: float) -> None:
        results.add(system, a.batch * a.seq / world, t)

    def run_peer() -> float:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B

        per = a.layers // world
        # a copy: .cuda() must not move the shared base model that the autoshard runs capture next
        mod = copy.deepcopy(_Stage(base, rank * per, (rank + 1) * per, rank == 0, rank == world - 1)).cuda()
        stage = PipelineStage(mod, rank, world, torch.device("cuda", local))
        sched = Schedule1F1B(stage, n_microbatches=a.microbatches, loss_fn=lm_loss)
        opt = torch.optim.AdamW(mod.parameters(), lr=1e-4, fused=True)
        xc = x.cuda()

        def step():
            if rank == 0:
                sched.step(xc)
            elif rank == world - 1:
                sched.step(target=xc)
            else:
                sched.step()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return timed(step, 2, a.iters)

    def run_autoshard(degrees: dict, schedule: str) -> float:
        mesh = autoshard.Mesh(**degrees)
        per_slice = a.batch // mesh.data_size
        xs = x[:per_slice]
        sm = autoshard.autoshard(base, mesh, example_inputs=(xs,), loss_fn=lm_loss,
                                 optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True),
                                 schedule=schedule, microbatches=a.microbatches)
        if rank == 0:
            print(sm.plan.summary(), flush=True)
        return timed(lambda: sm.train_step((xs,), xs), 2, a.iters)

    for name, fn in (
        (f"torch pipelining 1F1B pp{world}", run_peer),
        (f"autoshard pp{world} 1f1b", lambda: run_autoshard({"pp": world}, "1f1b")),
        (f"autoshard pp{world} zero_bubble", lambda: run_autoshard({"pp": world}, "zero_bubble")),
        (f"autoshard pp{world // 2}xtp2 1f1b", lambda: run_autoshard({"pp": world // 2, "tp": 2}, "1f1b")),
    ):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            report(name, fn())
        except Exception as e:  # noqa: BLE001 - one system failing must not hide the others
            if rank == 0:
                print(f"{name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            raise
    results.write(a.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
