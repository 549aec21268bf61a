"""Where one autoshard training step spends host and device time (torch.profiler), on one GPU or more.

    torchrun --nproc-per-node 1 benchmarks/profile_step.py --model 953m [--plan zero=1] [--trace out.json]

Prints the device-time breakdown of ``autoshard bench --profile`` (matmul, attention, fused kernels,
communication, other, idle), then the host operators with the most self CPU time: when the device
is idle, the host is what it waits for. ``--trace`` writes a Chrome trace (chrome://tracing, Perfetto).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from autoshard import bench


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="953m")
    ap.add_argument("--plan", default="", help="autoshard plan keys, e.g. 'zero=1' or 'tp=2,fuse=off'")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--trace", default=None, help="write a Chrome trace here (rank 0)")
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl")
    world, rank = dist.get_world_size(), dist.get_rank()
    device = torch.device("cuda", local)
    base, spec = bench.build_model(a.model, {"batch": a.batch, "seq": a.seq})
    x_global = torch.randint(0, spec["vocab"], (spec["batch"] * world, spec["seq"]),
                             generator=torch.Generator().manual_seed(1))
    ctx = bench._Ctx(world, rank, device, True, spec, a.model, base, spec["batch"], spec["seq"], x_global,
                     overrides={"batch": a.batch, "seq": a.seq})
    _, opts = bench.parse_system(f"autoshard:{a.plan}" if a.plan else "autoshard", world)
    step, plan, sm = bench._setup_autoshard(ctx, opts)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    if rank == 0:
        print(f"plan: {plan}", flush=True)
        print(bench.profile_table([{"system": "autoshard", "profile": bench.profile_steps(step, device, a.steps)}]))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(a.steps):
            step()
        torch.cuda.synchronize()
    if rank == 0:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.top, max_name_column_width=60))
        if a.trace:
            prof.export_chrome_trace(a.trace)
    sm.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
