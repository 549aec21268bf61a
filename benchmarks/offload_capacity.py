"""The largest Llama-style model that trains on one GPU with ZeRO-3 parameter + optimizer offload.

    torchrun --nproc-per-node 1 benchmarks/offload_capacity.py --dim 4096 --layers 24 --ffn 11008 --out cap.json

bf16 compute, fp32 master weights and AdamW states in host memory (the optimizer steps there),
each block's parameters copied up and gathered just before use. Prints step time, tokens/s, the
device's and the host's peak memory next to autoshard's prediction. The model is built in bf16 on
the host (the masters start from those values) to leave host memory for the optimizer states.
"""

from __future__ import annotations

import json
import os
import resource
import time

import torch
from harness import llama_parser

import autoshard
from autoshard.examples.gpt import lm_loss
from autoshard.examples.llama import Llama, LlamaConfig, num_params


def main() -> None:
    ap = llama_parser(__doc__, 1, "sequences", 3)
    ap.add_argument("--gpu-gib", type=float, default=None, help="cap the device memory (emulate a smaller GPU)")
    a = ap.parse_args()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if a.gpu_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(a.gpu_gib * 2**30 / total)
    cfg = LlamaConfig(vocab_size=a.vocab, d_model=a.d, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.heads,
                      ffn=a.ffn, seq_len=a.seq)
    n = num_params(cfg)
    print(f"model: {n / 1e9:.2f}B parameters, d={a.d}, layers={a.layers}, ffn={a.ffn}", flush=True)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = Llama(cfg).to(torch.bfloat16)
    x = torch.randint(0, a.vocab, (a.batch, a.seq))
    mesh = autoshard.Mesh(dp=1)
    sm = autoshard.autoshard(model, mesh, example_inputs=(x,), loss_fn=lm_loss,
                             optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=False),  # no model-sized temporaries
                             zero=3, offload="params", precision="bf16", fuse=False)
    setup = time.perf_counter() - t0
    print(f"set up in {setup:.0f} s; predicted peak {sm.predicted_peak_bytes()}", flush=True)
    times, losses = [], []
    for _ in range(a.iters):
        torch.cuda.synchronize()
        t = time.perf_counter()
        losses.append(sm.train_step((x,), x))
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        print(f"step {len(times)}: loss {losses[-1]:.4f}  {times[-1]:.2f} s", flush=True)
    step = sorted(times[1:] or times)[len(times[1:] or times) // 2]
    pred = sm.predicted_peak_bytes()
    row = {"params": n, "params_b": n / 1e9, "dim": a.d, "layers": a.layers, "ffn": a.ffn, "seq": a.seq,
           "batch": a.batch, "setup_s": setup, "step_s": step, "tok_s": a.batch * a.seq / step, "losses": losses,
           "device_peak_gib": torch.cuda.max_memory_allocated() / 2**30,
           "predicted_device_gib": pred["device"] / 2**30, "predicted_host_gib": pred["host"] / 2**30,
           "host_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
           "device": torch.cuda.get_device_name(), "torch": torch.__version__, "gpu_gib_cap": a.gpu_gib}
    print(json.dumps(row), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
