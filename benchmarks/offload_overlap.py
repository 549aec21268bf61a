"""The offload pipeline on one GPU: step time with ``offload_overlap`` on and off, for both offload modes.

    torchrun --nproc-per-node 1 benchmarks/offload_overlap.py --out overlap.json            # 953M, 4 configs
    torchrun --nproc-per-node 1 benchmarks/offload_overlap.py --dim 4096 --layers 18 --ffn 11008 --batch 1 \\
        --configs params:off --out overlap_3.9b.json                                        # 3.9B, one config

Configurations (``--configs``, comma-separated ``mode:overlap``):
  ``optimizer:on|off``  ZeRO-1 (dp=1), fp32 masters and AdamW states in host memory, bf16 compute copy on the GPU
  ``params:on|off``     ZeRO-3 + ``offload="params"``: the parameter slices in host memory too

Same Llama-style model (examples/llama.py, built once in bf16 on the host), data and seed for every
configuration. Per configuration: step time (median of ``--iters`` after ``--warmup``, CUDA-synchronised),
``offload_wait_s`` (how long the step waited for host work) and ``offload_host_s`` (the host work itself:
norm pass and CPU optimizer updates, wherever it ran); ``hidden`` = host − wait is what the pipeline
overlapped. The losses of ``on`` and ``off`` should be identical (the pipeline changes no arithmetic).

Host memory: about 16 bytes per parameter (masters, Adam moments, gradients) plus the bf16 model; at
3.9B that is ~100 GiB resident, so run one configuration per invocation there: rows accumulate in
``--out`` (an existing file's rows for other configurations are kept) and the table printed at the end
covers all of them (rows are keyed by configuration and ``--adam``; "vs off" compares rows of the same
``--adam``). A configuration that fails (out of memory, ...) is recorded with its error and the
others still run.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import time
import traceback

import torch
from harness import PEAK_FLOPS, llama_parser, timed

import autoshard
from autoshard.examples.gpt import lm_loss
from autoshard.examples.llama import Llama, LlamaConfig, num_params

ZERO = {"optimizer": 1, "params": 3}
CONFIGS = "optimizer:off,optimizer:on,params:off,params:on"


def parse_configs(text: str) -> list[tuple[str, bool]]:
    out = []
    for item in text.split(","):
        mode, _, overlap = item.strip().partition(":")
        if mode not in ZERO or overlap not in ("on", "off"):
            raise SystemExit(f"--configs: {item!r} is not mode:overlap with mode in {sorted(ZERO)} and overlap on|off")
        out.append((mode, overlap == "on"))
    return out


def free_memory() -> None:
    """Return what the previous configuration held: device cache and the pinned host cache."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    host_empty = getattr(torch._C, "_host_emptyCache", None)  # pinned blocks stay cached otherwise
    if host_empty is not None:
        host_empty()
    torch.cuda.reset_peak_memory_stats()


def run_one(model: torch.nn.Module, x: torch.Tensor, mode: str, overlap: bool, a, flops_tok: float) -> dict:
    adam = {"fused": True} if a.adam == "fused" else {"foreach": False}
    t0 = time.perf_counter()
    mesh = autoshard.Mesh(dp=1)
    sm = autoshard.autoshard(model, mesh, example_inputs=(x,), loss_fn=lm_loss,
                             optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-4, **adam),
                             zero=ZERO[mode], offload=mode, offload_overlap=overlap, precision="bf16", fuse=False)
    setup = time.perf_counter() - t0
    name = f"{mode}:{'on' if overlap else 'off'}"
    print(f"[{name}] set up in {setup:.0f} s, {len(sm._zero.zbuckets)} buckets", flush=True)
    losses, stats = [], []

    def step() -> None:
        t = time.perf_counter()
        losses.append(sm.train_step((x,), x))
        torch.cuda.synchronize()
        stats.append(dict(sm.stats(), step_s=time.perf_counter() - t))
        s = stats[-1]
        print(f"  step {len(losses)}: loss {losses[-1]:.5f}  {s['step_s']:.2f} s  waited for host "
              f"{s.get('offload_wait_s', float('nan')):.2f} s of {s.get('offload_host_s', float('nan')):.2f} s",
              flush=True)

    step_s = timed(step, a.warmup, a.iters)
    timed_stats = stats[a.warmup:]
    wait = statistics.median(s.get("offload_wait_s", float("nan")) for s in timed_stats)
    host = statistics.median(s.get("offload_host_s", float("nan")) for s in timed_stats)
    row = {"config": name, "adam": a.adam, "mode": mode, "overlap": overlap, "zero": ZERO[mode],
           "step_s": step_s, "offload_wait_s": wait, "offload_host_s": host, "hidden_s": host - wait,
           "tok_s": a.batch * a.seq / step_s, "mfu": a.batch * a.seq / step_s * flops_tok / PEAK_FLOPS,
           "device_peak_gib": torch.cuda.max_memory_allocated() / 2**30, "setup_s": setup, "losses": losses,
           "buckets": len(sm._zero.zbuckets)}
    sm.close()  # the hooks and the offload worker; the rest goes with this frame
    return row


def table(rows: list[dict]) -> str:
    head = (f"{'config':14s} {'adam':5s} {'step s':>8s} {'wait s':>8s} {'host s':>8s} {'hidden s':>8s} {'tok/s':>8s} "
            f"{'peak GiB':>8s}  vs off")
    lines = [head, "-" * len(head)]
    by = {(r["config"], r.get("adam")): r for r in rows}
    for r in rows:
        if "error" in r:
            lines.append(f"{r['config']:14s} {r.get('adam', ''):5s} failed: {r['error'].splitlines()[0][:90]}")
            continue
        off = by.get((f"{r['mode']}:off", r.get("adam")))
        vs = ""
        if r["overlap"] and off and "error" not in off:
            same = "same losses" if off["losses"] == r["losses"] else "LOSSES DIFFER"
            vs = f"speed-up {off['step_s'] / r['step_s']:.2f}x, {same}"
        lines.append(f"{r['config']:14s} {r['adam']:5s} {r['step_s']:8.2f} {r['offload_wait_s']:8.2f} {r['offload_host_s']:8.2f} "
                     f"{r['hidden_s']:8.2f} {r['tok_s']:8.0f} {r['device_peak_gib']:8.2f}  {vs}")
    return "\n".join(lines)


def main() -> None:
    ap = llama_parser(__doc__, 1, "sequences", 3)
    ap.add_argument("--configs", default=CONFIGS, help=f"comma-separated mode:overlap (default {CONFIGS})")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--adam", choices=("loop", "fused"), default="loop",
                    help="CPU AdamW: torch's per-tensor loop (foreach=False, as offload_capacity.py) or fused=True")
    a = ap.parse_args()
    configs = parse_configs(a.configs)
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    cfg = LlamaConfig(vocab_size=a.vocab, d_model=a.d, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.heads,
                      ffn=a.ffn, seq_len=a.seq)
    n = num_params(cfg)
    flops_tok = 6 * n + 12 * a.layers * a.d * a.seq
    print(f"model: {n / 1e9:.2f}B parameters, d={a.d}, layers={a.layers}, ffn={a.ffn}, batch {a.batch}x{a.seq}; "
          f"host cores {os.cpu_count()}, torch threads {torch.get_num_threads()}", flush=True)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = Llama(cfg).to(torch.bfloat16)  # the masters start from these values; autoshard copies them
    x = torch.randint(0, a.vocab, (a.batch, a.seq), generator=torch.Generator().manual_seed(1))
    previous: list[dict] = []
    if a.out and os.path.exists(a.out):
        with open(a.out) as f:
            previous = json.load(f).get("rows", [])
    done: list[dict] = []
    for mode, overlap in configs:
        free_memory()
        try:
            done.append(run_one(model, x, mode, overlap, a, flops_tok))
        except Exception as e:  # noqa: BLE001 - recorded, and the next configuration still runs
            traceback.print_exc()
            done.append({"config": f"{mode}:{'on' if overlap else 'off'}", "adam": a.adam, "mode": mode,
                         "overlap": overlap, "error": f"{type(e).__name__}: {e}"})
    mine = {(r["config"], r["adam"]) for r in done}
    rows = sorted([r for r in previous if (r["config"], r.get("adam")) not in mine] + done,
                  key=lambda r: (r.get("adam", ""), r["mode"], r["overlap"]))
    print("\n" + table(rows), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"config": vars(a), "params": n, "torch": torch.__version__,
                       "device": torch.cuda.get_device_name(), "host_cores": os.cpu_count(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
