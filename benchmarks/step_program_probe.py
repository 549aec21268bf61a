"""One-GPU probe of the compiled step program against torch.compile on an unmodified HF Llama.

Run: python3 benchmarks/step_program_probe.py OUTDIR [layers]. Prints a table; writes JSON lines to OUTDIR.
"""
import json
import os
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from autoshard.bench import lm_loss, timed
from autoshard.passes.capture import capture
from autoshard.passes.compile import compile_step, make_state

out_dir = sys.argv[1] if len(sys.argv) > 1 else "."
layers = int(sys.argv[2]) if len(sys.argv) > 2 else 16
dev = torch.device("cuda")
B, S = 4, 2048
cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                  num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=S, use_cache=False,
                  attn_implementation="sdpa")
torch.manual_seed(0)
base = LlamaForCausalLM(cfg)
sd = base.state_dict()
x = torch.randint(0, 32000, (B, S), generator=torch.Generator().manual_seed(1)).to(dev)
rows = []


def record(r):
    rows.append(r)
    with open(os.path.join(out_dir, "probe.jsonl"), "a") as f:
        f.write(json.dumps(r) + "\n")
    print(json.dumps(r), flush=True)


def fresh():
    with torch.device("meta"):
        m = LlamaForCausalLM(cfg)
    m = m.to_empty(device=dev)
    m.load_state_dict(sd)
    m.model.rotary_emb.inv_freq.copy_(base.model.rotary_emb.inv_freq)
    return m


def hf_loss(out, t):
    return lm_loss(out.logits, t)


def peer(name):
    torch.cuda.reset_peak_memory_stats()
    m = fresh()
    run = torch.compile(m) if name == "compile" else m
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = run(x)
        loss = lm_loss(out.logits, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    t0 = time.perf_counter()
    l1 = step()
    first = time.perf_counter() - t0
    t = timed(step, 3, 10, dev)
    record({"system": name, "tok_s": B * S / t, "step_ms": 1e3 * t, "first_s": first, "loss1": l1,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30})


def ours(graphs):
    os.environ["AUTOSHARD_CUDA_GRAPHS"] = "1" if graphs else "0"
    torch.cuda.reset_peak_memory_stats()
    m = fresh()
    t0 = time.perf_counter()
    gm = capture(m, (x,), {}, param_dtype=torch.bfloat16)
    params = dict(m.named_parameters())
    for n, p in params.items():  # the graph was traced with bf16 stand-ins: point it at the real parameters
        owner, _, leaf = n.rpartition(".")
        gm.get_submodule(owner)._parameters[leaf] = p
    st = make_state(list(params), params, torch.bfloat16, lambda ps: torch.optim.AdamW(ps, lr=1e-4), dev)
    for n, p in zip(st.names, st.params):  # the bf16 compute copies in the graph
        owner, _, leaf = n.rpartition(".")
        gm.get_submodule(owner)._parameters[leaf] = p
    prog, rep = compile_step(gm, hf_loss, st, (x,), {}, x, dp_group=None, dp_size=1, buckets=[], grad_clip=None,
                             device=dev)

    def step():
        st.set_lrs()
        return float(prog([x, x])[0])

    l1 = step()
    first = time.perf_counter() - t0
    t = timed(step, 3, 10, dev)
    record({"system": f"autoshard-step{'-graphs' if graphs else ''}", "tok_s": B * S / t, "step_ms": 1e3 * t,
            "first_s": first, "loss1": l1, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "compile_s": prog.compile_s, "graph_error": prog.graph_error, "nodes": rep["nodes"], "remat": rep["remat"]})


for name in sys.argv[3].split(",") if len(sys.argv) > 3 else ["compile", "ours-graphs", "ours"]:
    try:
        if name.startswith("ours"):
            ours(name.endswith("graphs"))
        else:
            peer(name)
    except Exception as e:  # noqa: BLE001
        import traceback
        traceback.print_exc()
        record({"system": name, "error": f"{type(e).__name__}: {e}"[:800]})
    torch.cuda.empty_cache()
print("\n| system | tok/s | step ms | first s | peak GiB | loss1 |")
for r in rows:
    if "error" in r:
        print(f"| {r['system']} | error: {r['error'][:100]} |")
    else:
        print(f"| {r['system']} | {r['tok_s']:.0f} | {r['step_ms']:.1f} | {r['first_s']:.1f} | {r['peak_gib']:.2f} | {r['loss1']:.4f} |")
