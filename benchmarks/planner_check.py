"""Is the planner honest? Predicted vs measured step time and peak memory of its top plans.

    torchrun --nproc-per-node 4 benchmarks/planner_check.py [--models 953m,6.7b] [--top 3] [--out check.json]
    python benchmarks/planner_check.py --tiny            # CPU: 4 Gloo ranks, tiny models (checks this script)
    python benchmarks/planner_check.py --calibration     # no GPU: the cost model against RESULTS.md's rows

For each model (examples/llama.py; "953m": d=2048, 16 layers, ffn 5632, vocab 32000, seq 2048, 4
sequences per GPU; "6.7b": d=4096, 32 layers, ffn 11008, 2 sequences per GPU; bf16 compute with fp32
masters, fused AdamW) the planner proposes plans for the world size on the built-in h200 profile,
restricted to what the runtime executes; the best ``--top`` of them (the chosen plan and the
runners-up of other meshes / ZeRO stages) are each built with ``autoshard`` and timed: warm-up
steps, then the median of ``--iters`` synchronised steps; peak memory is
``torch.cuda.max_memory_allocated`` after a reset, each module closed and freed before the next.
The goals (issue [planner]): the chosen plan within 10% of the best measured plan, memory within 15%.

``--calibration`` needs no GPU: it evaluates the cost model on the exact plans of the measured rows
in ``benchmarks/RESULTS.md`` (the numbers the h200 profile was fitted to) and prints the errors.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from typing import Any

import torch

from autoshard.bench import timed  # the one timing loop (median of device-synchronised steps)

MODELS = {
    # name: (d_model, layers, heads, ffn, vocab, seq, sequences per GPU)
    "953m": (2048, 16, 16, 5632, 32000, 2048, 4),
    "6.7b": (4096, 32, 32, 11008, 32000, 2048, 2),
    "tiny": (64, 4, 4, 128, 256, 32, 2),
    "tiny2": (96, 6, 4, 192, 256, 32, 2),
}


def _config(name: str):
    from autoshard.examples.llama import LlamaConfig

    d, layers, heads, ffn, vocab, seq, _ = MODELS[name]
    return LlamaConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=heads, ffn=ffn,
                       seq_len=seq)


def _plans(name: str, world: int, profile: str, precision: str, top: int, spread: bool = False) -> list[dict[str, Any]]:
    """The planner's chosen plan and its best runners-up (each a dict of autoshard options + predictions).

    ``spread``: the runners-up are the best plans of *other meshes* (not other ZeRO stages of the same mesh).
    """
    from autoshard.examples.llama import Llama
    from autoshard.passes import cost_model, planner
    from autoshard.runtime.hardware import get_profile

    cfg = _config(name)
    per_gpu = MODELS[name][6]
    with torch.device("meta"):
        model = Llama(cfg)
    tokens = torch.empty(per_gpu * world, cfg.seq_len, dtype=torch.int64, device="meta")
    cap = min(8, world)
    tps = tuple(t for t in range(1, cap + 1) if cap % t == 0 and world % t == 0)
    analysis = cost_model.analyse(model, (tokens,), precision=precision, tps=tps, name=name)
    hw = get_profile(profile)
    best = planner.plan(analysis, world, hw, space=planner.runtime_space(), alternatives=max(top - 1, 0) * (8 if spread else 1))
    out = [{"plan": best.decision_text(), "mesh": best.mesh, "zero": best.zero, "offload": best.offload,
            "microbatches": best.microbatches, "schedule": best.schedule, "virtual_stages": best.virtual_stages,
            "predicted_step_s": best.step_time_s, "predicted_bytes": best.memory_per_gpu_bytes, "chosen": True}]
    for alt in best.alternatives:
        if len(out) >= top or not alt["feasible"] or (spread and any(o["mesh"] == alt["mesh"] for o in out)):
            continue
        pinned = {**alt["mesh"], "zero": alt["zero"], "offload": alt["offload"]}
        if alt["mesh"]["pp"] > 1:
            pinned.update(microbatches=alt["microbatches"], schedule=alt["schedule"])
        p = planner.plan(analysis, world, hw, space=planner.runtime_space(pinned))
        out.append({"plan": p.decision_text(), "mesh": p.mesh, "zero": p.zero, "offload": p.offload,
                    "microbatches": p.microbatches, "schedule": p.schedule, "virtual_stages": p.virtual_stages,
                    "predicted_step_s": p.step_time_s, "predicted_bytes": p.memory_per_gpu_bytes, "chosen": False})
    return out


def _measure(base: torch.nn.Module, p: dict[str, Any], tokens: torch.Tensor, precision: str, warmup: int,
             iters: int) -> dict[str, Any]:
    """Build plan ``p`` with autoshard and time it; peak memory on CUDA. An out-of-memory run is recorded."""
    import autoshard
    from autoshard.examples.gpt import lm_loss

    mesh = autoshard.Mesh(**p["mesh"])
    per = tokens.shape[0] // mesh.data_size
    x = tokens[mesh.data_rank * per:(mesh.data_rank + 1) * per]
    device = mesh.device
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    fused = device.type == "cuda"
    options = {"zero": p["zero"], "offload": p["offload"], "precision": precision}
    if p["mesh"]["pp"] > 1:
        options.update(schedule=p["schedule"], microbatches=p["microbatches"], virtual_stages=p["virtual_stages"])
    try:
        sm = autoshard.autoshard(base, mesh, example_inputs=(x,), loss_fn=lm_loss,
                                 optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=fused), **options)
        out = {"measured_step_s": timed(lambda: sm.train_step((x,), x), warmup, iters, device),
               "measured_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None}
        sm.close()
        return out
    except torch.cuda.OutOfMemoryError as e:  # a prediction that was wrong about memory: record it
        return {"error": f"out of memory: {str(e).splitlines()[0]}"}


def run(models: list[str], top: int, iters: int, warmup: int, profile: str, precision: str,
        spread: bool = False) -> list[dict[str, Any]]:
    """In every rank of a torchrun / autoshard.launch job: plan, run and measure each model's top plans."""
    import torch.distributed as dist

    from autoshard.examples.llama import Llama

    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and os.environ.get("CUDA_VISIBLE_DEVICES", None) != ""
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if use_cuda else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    rows: list[dict[str, Any]] = []
    for name in models:
        cfg = _config(name)
        per_gpu = MODELS[name][6]
        plans = _plans(name, world, profile, precision, top, spread)
        torch.manual_seed(0)
        base = Llama(cfg)
        g = torch.Generator().manual_seed(7)
        tokens = torch.randint(0, cfg.vocab_size, (per_gpu * world, cfg.seq_len), generator=g)
        for p in plans:
            row = {"model": name, "world": world, **{k: p[k] for k in ("plan", "chosen", "predicted_step_s",
                                                                         "predicted_bytes")}}
            row.update(_measure(base, p, tokens, precision, warmup, iters))
            rows.append(row)
            gc.collect()
    for name in models:
        done = [r for r in rows if r["model"] == name and "measured_step_s" in r]
        if done:
            best = min(r["measured_step_s"] for r in done)
            for r in done:
                r["vs_best_measured"] = r["measured_step_s"] / best - 1.0
    return rows if rank == 0 else []


def _table(rows: list[dict[str, Any]]) -> str:
    gib = 2**30
    lines = [f"{'model':6} {'plan':58} {'pred ms':>9} {'meas ms':>9} {'err':>7} {'pred GiB':>9} {'meas GiB':>9} "
             f"{'err':>7} {'vs best':>8}"]
    for r in rows:
        ms = r.get("measured_step_s")
        mb = r.get("measured_bytes")
        err_t = f"{(r['predicted_step_s'] / ms - 1) * 100:+6.1f}%" if ms else "   -"
        err_m = f"{(r['predicted_bytes'] / mb - 1) * 100:+6.1f}%" if mb else "   -"
        vs = f"{r['vs_best_measured'] * 100:+7.1f}%" if "vs_best_measured" in r else r.get("error", "-")[:20]
        mark = "*" if r["chosen"] else " "
        lines.append(f"{r['model']:6} {mark}{r['plan'][:57]:57} {r['predicted_step_s'] * 1e3:9.1f} "
                     f"{(ms or 0) * 1e3:9.1f} {err_t:>7} {r['predicted_bytes'] / gib:9.2f} "
                     f"{(mb or 0) / gib:9.2f} {err_m:>7} {vs:>8}")
    lines.append("* = the planner's choice; err = predicted / measured - 1; vs best = measured / best measured - 1")
    return "\n".join(lines)


# ====================================================================================== calibration
#: measured rows of benchmarks/RESULTS.md (4 x H200): the numbers the h200 profile was fitted to
CALIBRATION_ROWS = [
    # (RESULTS.md section, model kwargs, precision, global batch, seq, pinned plan, step s, peak GiB or None)
    ("GPT example, first throughput: autoshard dp=4", "gpt", "fp32", 32, 1024,
     {"dp": 4, "tp": 1, "pp": 1, "zero": 0, "offload": None}, 0.0529, 9.54),
    ("GPT example: autoshard dp=2 x tp=2 (peak carries the dp=4 module)", "gpt", "fp32", 16, 1024,
     {"dp": 2, "tp": 2, "pp": 1, "zero": 0, "offload": None}, 0.0453, None),
    ("GPT example: autoshard tp=4 (peak carries earlier modules)", "gpt", "fp32", 8, 1024,
     {"dp": 1, "tp": 4, "pp": 1, "zero": 0, "offload": None}, 0.0354, None),
    ("Pipelines: autoshard pp=4, 1f1b (fp32/TF32)", "953m", "fp32", 8, 2048,
     {"dp": 1, "tp": 1, "pp": 4, "zero": 0, "offload": None, "schedule": "1f1b", "microbatches": 8}, 0.2844, 9.61),
    ("Pipelines: autoshard pp=2 x tp=2, 1f1b (peak carries earlier runs)", "953m", "fp32", 8, 2048,
     {"dp": 1, "tp": 2, "pp": 2, "zero": 0, "offload": None, "schedule": "1f1b", "microbatches": 8}, 0.3307, None),
    ("ZeRO re-run: autoshard dp=4, zero=1, bf16", "953m", "bf16", 16, 2048,
     {"dp": 4, "tp": 1, "pp": 1, "zero": 1, "offload": None}, 0.1605, 18.48),
    ("ZeRO re-run: autoshard dp=4, zero=2, bf16 (peak minus the 4.4 GiB left by zero=1)", "953m", "bf16", 16, 2048,
     {"dp": 4, "tp": 1, "pp": 1, "zero": 2, "offload": None}, 0.1532, 23.82 - 4.4),
    ("6.7B: autoshard dp=4, zero=2, bf16", "6.7b", "bf16", 8, 2048,
     {"dp": 4, "tp": 1, "pp": 1, "zero": 2, "offload": None}, 2 * 2048 / 7407, 61.09),
    # benchmarks/zero3_953m_2026-11-22_h200x4.json and zero3_6.7b_...: ZeRO-3 runs (not used in the fit)
    ("zero3_953m json: autoshard dp=4, zero=2, bf16", "953m", "bf16", 16, 2048,
     {"dp": 4, "tp": 1, "pp": 1, "zero": 2, "offload": None}, 0.15335, 19.39),
    ("zero3_953m json: autoshard dp=4, zero=3, bf16 (prefetch 1)", "953m", "bf16", 16, 2048,
     {"dp": 4, "tp": 1, "pp": 1, "zero": 3, "offload": None}, 0.14520, 17.25),
    ("zero3_6.7b json: autoshard dp=4, zero=3, bf16 (prefetch 2)", "6.7b", "bf16", 8, 2048,
     {"dp": 4, "tp": 1, "pp": 1, "zero": 3, "offload": None, "prefetch": 2}, 0.49621, 53.39),
]


def calibration(profile: str = "h200") -> list[dict[str, Any]]:
    """Predicted vs RESULTS.md for the exact plans measured there (no GPU needed)."""
    from autoshard.examples.gpt import GPT, GPTConfig
    from autoshard.examples.llama import Llama
    from autoshard.passes import cost_model, planner
    from autoshard.runtime.hardware import get_profile

    hw = get_profile(profile)
    cache: dict[tuple, Any] = {}
    out = []
    for where, name, precision, batch, seq, pins, step_s, peak in CALIBRATION_ROWS:
        key = (name, precision, batch, seq)
        if key not in cache:
            with torch.device("meta"):
                model = GPT(GPTConfig(vocab_size=32000, seq_len=seq, d_model=1024, n_heads=16, d_ff=4096, n_layers=8)) \
                    if name == "gpt" else Llama(_config(name))
            tokens = torch.empty(batch, seq, dtype=torch.int64, device="meta")
            cache[key] = cost_model.analyse(model, (tokens,), precision=precision, tps=(1, 2, 4), name=name)
        pins = dict(pins)
        prefetch = pins.pop("prefetch", 1)
        space = planner.SearchSpace(checkpointing=False, fixed=tuple(sorted(pins.items())))
        p = planner.plan(cache[key], 4, hw, memory_gib=1e4, space=space, prefetch=prefetch)
        out.append({"row": where, "plan": p.decision_text(), "predicted_step_s": p.step_time_s, "measured_step_s": step_s,
                    "step_error": p.step_time_s / step_s - 1, "predicted_gib": p.memory_per_gpu_bytes / 2**30,
                    "measured_gib": peak, "memory_error": (p.memory_per_gpu_bytes / 2**30 / peak - 1) if peak else None})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="953m,6.7b", help="comma-separated: 953m, 6.7b (tiny, tiny2 for --tiny)")
    ap.add_argument("--top", type=int, default=3, help="plans per model to run (default 3)")
    ap.add_argument("--spread", action="store_true", help="runners-up from other meshes, not other ZeRO stages")
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--profile", default="h200", help="hardware profile the planner uses (default h200)")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--tiny", action="store_true", help="CPU check: 4 Gloo ranks, tiny models, cpu profile, fp32")
    ap.add_argument("--calibration", action="store_true", help="the cost model against RESULTS.md (no GPU)")
    a = ap.parse_args()
    if a.calibration:
        rows = calibration(a.profile)
        for r in rows:
            mem = f"{r['predicted_gib']:6.2f} vs {r['measured_gib']:6.2f} GiB ({r['memory_error'] * 100:+5.1f}%)" \
                if r["measured_gib"] else f"{r['predicted_gib']:6.2f} GiB (no clean measurement)"
            print(f"{r['row'][:72]:72} step {r['predicted_step_s'] * 1e3:7.1f} vs {r['measured_step_s'] * 1e3:7.1f} ms "
                  f"({r['step_error'] * 100:+5.1f}%)  memory {mem}")
        _write(a.out, {"calibration": rows})
        return
    models = a.models.split(",")
    if a.tiny:
        import autoshard

        models = [m for m in models if m.startswith("tiny")] or ["tiny", "tiny2"]
        rows = autoshard.launch(run, 4, models, a.top, 2, 1, "cpu", "fp32", a.spread, device="cpu")[0]
    else:
        rows = run(models, a.top, a.iters, a.warmup, a.profile, a.precision, a.spread)
    if rows:
        print(_table(rows), flush=True)
        _write(a.out, {"rows": rows, "torch": torch.__version__,
                       "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"})
    if not a.tiny:
        import torch.distributed as dist

        dist.destroy_process_group()


def _write(path: str | None, data: dict[str, Any]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=1, default=str)
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
